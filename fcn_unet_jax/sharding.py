"""The data-parallel mesh and the moves between host arrays and global device arrays.

One code path for 1 device, many devices and many processes: `Mesh(devices, ('data',))`
with batches sharded on their leading axis (`batch_sharding`) and the train state
replicated (`replicated_sharding`). The global batch is assembled from every process's
slice with `jax.make_array_from_process_local_data`, so `config.batch_size` is the global
batch whatever the number of devices or processes.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D data-parallel mesh over `devices` (default: every device of every process)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimiser state, keys)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis is split over the mesh's devices."""
    return NamedSharding(mesh, P(DATA_AXIS))


def data_axis_size(mesh: Mesh) -> int:
    """Number of devices along the data axis.

    Raises:
      ValueError: when the mesh has no 'data' axis.
    """
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f'The mesh needs a {DATA_AXIS!r} axis, got {mesh.axis_names}.')
    return mesh.shape[DATA_AXIS]


def to_host(x: jax.Array) -> np.ndarray:
    """Fetches a replicated array, also when it spans devices of other processes."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(x.addressable_data(0))


def replicate(tree: Any, sharding: NamedSharding) -> Any:
    """Puts identical host values of every process onto `sharding` (replicated).

    Args:
      tree: a pytree of host arrays, the same in every process (e.g. imported weights).
      sharding: a replicated sharding (`replicated_sharding(mesh)`).

    Returns:
      The tree of global `jax.Array`s.
    """

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(put, tree)


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
    """Assembles the global batch from every process's slice.

    Args:
      local_batch: this process's slice: arrays whose leading axis is the local batch
        (the global batch divided by the process count).
      sharding: the batch sharding (`batch_sharding(mesh)`).

    Returns:
      Global arrays of `process_count` times the local batch; entries of object dtype (e.g.
      the eval file names) are left out.
    """
    count = jax.process_count()
    return {
        key: jax.make_array_from_process_local_data(
            sharding, value, (value.shape[0] * count, *value.shape[1:])
        )
        for key, value in local_batch.items()
        if np.asarray(value).dtype != object  # e.g. the eval file names.
    }
