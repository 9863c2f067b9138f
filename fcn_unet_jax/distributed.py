"""Starting JAX's multi-process runtime: one process per host, all hosts one program.

A run over several hosts (a TPU VM slice, GPU nodes under SLURM) is one process per host;
`jax.distributed.initialize` connects them before the first computation, after which
`jax.devices()` lists every host's devices and the one `Mesh('data')` spans them all.
`initialize` chooses how, in this order:

1. explicit: `coordinator_address`, `num_processes` and `process_id` given (the
   `--coordinator_address --num_processes --process_id` flags), e.g. two CPU processes on
   127.0.0.1 in the tests (CPU collectives then go through gloo);
2. asked for: `auto=True` (`--distributed`) calls `jax.distributed.initialize()` with no
   arguments, and JAX detects the cluster itself (SLURM, Open MPI, Cloud TPU VMs and GKE
   TPU pods from their metadata, Kubernetes) or fails saying it found none;
3. detected: with neither, the same call when the environment shows a launcher that
   started several processes (`detect_cluster`): SLURM or Open MPI with more than one
   task, TPU worker lists with several hosts (GKE), or TPU chips attached to this machine
   (a Cloud TPU VM, where the worker list is only in the metadata server: JAX reads it;
   a single-host VM initialises as a cluster of one);
4. otherwise a single process, and nothing is started.
"""

import glob
import os
import pathlib
from collections.abc import Mapping

import jax

# PCI vendor id of Google's TPU chips, as the kernel lists them in sysfs.
GOOGLE_PCI_VENDOR = '0x1ae0'
PCI_DEVICES = '/sys/bus/pci/devices'


def _more_than_one(value: str | None) -> bool:
    try:
        return int(value or '1') > 1
    except ValueError:
        return False


def tpu_chips_attached(pci_devices: str = PCI_DEVICES) -> int:
    """Number of PCI devices of Google's vendor id: the TPU chips of a Cloud TPU VM."""
    vendors = glob.glob(os.path.join(pci_devices, '*', 'vendor'))
    return sum(pathlib.Path(path).read_text().strip() == GOOGLE_PCI_VENDOR for path in vendors)


def detect_cluster(
    environ: Mapping[str, str] = os.environ, pci_devices: str = PCI_DEVICES
) -> str | None:
    """The launcher that started this process as one of several, or None.

    Args:
      environ: the environment to read (default this process's).
      pci_devices: sysfs folder of PCI devices, where a Cloud TPU VM lists its chips.

    Returns:
      'slurm', 'open_mpi', 'tpu_worker_hostnames' (GKE TPU pods) or 'cloud_tpu_vm'; None
      for a single process (or a Cloud TPU VM that `TPU_SKIP_MDS_QUERY` marks as not one).
    """
    if _more_than_one(environ.get('SLURM_NTASKS') or environ.get('SLURM_NPROCS')):
        return 'slurm'
    if _more_than_one(environ.get('OMPI_COMM_WORLD_SIZE')):
        return 'open_mpi'
    workers = environ.get('TPU_PROCESS_ADDRESSES') or environ.get('TPU_WORKER_HOSTNAMES', '')
    if ',' in workers:
        return 'tpu_worker_hostnames'
    if 'TPU_SKIP_MDS_QUERY' not in environ and tpu_chips_attached(pci_devices):
        return 'cloud_tpu_vm'
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    environ: Mapping[str, str] = os.environ,
    pci_devices: str = PCI_DEVICES,
) -> str:
    """Starts JAX's multi-process runtime when this run is one of several processes.

    Call it first, before any JAX computation (`fcn_unet_jax.main` does).

    Args:
      coordinator_address: host:port of process 0, for an explicit start.
      num_processes: number of processes (explicit start).
      process_id: this process's index (explicit start).
      auto: start with JAX's own cluster detection even where `detect_cluster` sees none.
      environ: the environment to read (default this process's).
      pci_devices: sysfs folder of PCI devices (see `detect_cluster`).

    Returns:
      How the runtime was started: 'explicit', 'auto', 'detected: NAME' (`detect_cluster`)
      or 'single' (one process, nothing started; also when it already runs).

    Raises:
      ValueError: when only some of the explicit arguments are given, or together with
        `auto`.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(value is not None for value in explicit):
        if any(value is None for value in explicit):
            raise ValueError(
                'An explicit multi-process start needs all of --coordinator_address, '
                f'--num_processes and --process_id; got {explicit}.'
            )
        if auto:
            raise ValueError(
                '--distributed starts with JAX cluster detection; it cannot be combined '
                'with --coordinator_address, --num_processes and --process_id.'
            )
    if jax.distributed.is_initialized():
        return 'single'
    if coordinator_address is not None:
        # CPU-only runs need a collectives backend for computations across processes.
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
        return 'explicit'
    if auto:
        jax.distributed.initialize()
        return 'auto'
    cluster = detect_cluster(environ, pci_devices)
    if cluster is None:
        return 'single'
    jax.distributed.initialize()
    return f'detected: {cluster}'
