"""Tests of the data-parallel mesh and the host <-> global array moves (`sharding.py`).

Run on the 4 CPU devices that conftest simulates; one process, so every array is fully
addressable (the multi-process paths run in tests/test_multiprocess.py).
"""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fcn_unet_jax import sharding


def test_mesh_spans_the_given_devices_on_the_data_axis():
    mesh = sharding.create_mesh()
    assert mesh.axis_names == (sharding.DATA_AXIS,) == ('data',)
    assert list(mesh.devices.flat) == jax.devices() and len(jax.devices()) == 4
    two = sharding.create_mesh(jax.devices()[2:])
    assert list(two.devices.flat) == jax.devices()[2:]
    assert sharding.data_axis_size(mesh) == 4 and sharding.data_axis_size(two) == 2
    assert sharding.replicated_sharding(mesh).spec == P()
    assert sharding.batch_sharding(mesh).spec == P('data')


def test_data_axis_size_needs_a_data_axis():
    mesh = Mesh(np.asarray(jax.devices()), ('batch',))
    with pytest.raises(ValueError, match="'data' axis"):
        sharding.data_axis_size(mesh)


def test_global_batch_splits_the_batch_over_the_devices():
    mesh = sharding.create_mesh()
    images = np.arange(8 * 3 * 2, dtype=np.float32).reshape(8, 3, 2)
    labels = np.arange(8, dtype=np.int32)
    names = np.asarray([f'image{i}.png' for i in range(8)], dtype=object)
    batch = sharding.global_batch(
        {'image': images, 'label': labels, 'file_name': names}, sharding.batch_sharding(mesh)
    )
    assert set(batch) == {'image', 'label'}  # Non-numeric entries stay on the host.
    assert batch['image'].shape == (8, 3, 2) and batch['image'].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(batch['image']), images)
    np.testing.assert_array_equal(np.asarray(batch['label']), labels)
    # Device i holds rows 2i and 2i + 1: the leading axis is split in mesh order.
    for shard in batch['label'].addressable_shards:
        index = list(mesh.devices.flat).index(shard.device)
        np.testing.assert_array_equal(np.asarray(shard.data), labels[2 * index : 2 * index + 2])


def test_replicate_then_to_host_round_trip():
    mesh = sharding.create_mesh()
    tree = {'kernel': np.arange(6, dtype=np.float32).reshape(2, 3), 'step': np.int32(7)}
    replicated = sharding.replicate(tree, sharding.replicated_sharding(mesh))
    kernel = replicated['kernel']
    assert kernel.sharding.is_fully_replicated and len(kernel.addressable_shards) == 4
    for shard in kernel.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), tree['kernel'])
    host = jax.tree_util.tree_map(sharding.to_host, replicated)
    assert isinstance(host['kernel'], np.ndarray)
    np.testing.assert_array_equal(host['kernel'], tree['kernel'])
    assert host['step'] == 7 and host['step'].dtype == np.int32
