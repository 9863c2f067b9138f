"""`fcn_unet_jax.distributed`: when and how the multi-process runtime is started.

`jax.distributed.initialize` is replaced by a recorder: a real start of several processes
is `tests/test_multiprocess.py`.
"""

import pytest

from fcn_unet_jax import distributed


@pytest.fixture
def started(monkeypatch):
    """The calls of `jax.distributed.initialize` (keyword arguments), none made for real."""
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, 'is_initialized', lambda: False)
    monkeypatch.setattr(distributed.jax.distributed, 'initialize', lambda **kw: calls.append(kw))
    monkeypatch.setattr(distributed.jax.config, 'update', lambda *args: None)
    return calls


def _pci(tmp_path, *vendors):
    """A sysfs-like PCI folder with one device per vendor id."""
    for i, vendor in enumerate(vendors):
        device = tmp_path / f'0000:00:0{i}.0'
        device.mkdir()
        (device / 'vendor').write_text(f'{vendor}\n')
    return str(tmp_path)


@pytest.mark.parametrize(
    ('environ', 'expected'),
    [
        ({}, None),
        ({'SLURM_NTASKS': '1', 'SLURM_JOB_ID': '7'}, None),
        ({'SLURM_NTASKS': '16', 'SLURM_JOB_ID': '7'}, 'slurm'),
        ({'SLURM_NPROCS': '2'}, 'slurm'),
        ({'OMPI_COMM_WORLD_SIZE': '4'}, 'open_mpi'),
        ({'OMPI_COMM_WORLD_SIZE': '1'}, None),
        ({'TPU_WORKER_HOSTNAMES': 'host-0,host-1'}, 'tpu_worker_hostnames'),
        ({'TPU_PROCESS_ADDRESSES': '10.0.0.2:8476,10.0.0.3:8476'}, 'tpu_worker_hostnames'),
        ({'TPU_WORKER_HOSTNAMES': 'localhost'}, None),
    ],
)
def test_launchers_of_several_processes_are_detected(tmp_path, environ, expected):
    no_tpu = _pci(tmp_path, '0x8086', '0x1af4')
    assert distributed.detect_cluster(environ, no_tpu) == expected


def test_a_cloud_tpu_vm_is_detected_by_its_chips(tmp_path):
    tpu_vm = _pci(tmp_path, '0x1ae0', '0x1ae0', '0x1ae0', '0x1ae0', '0x1af4')
    assert distributed.tpu_chips_attached(tpu_vm) == 4
    assert distributed.detect_cluster({}, tpu_vm) == 'cloud_tpu_vm'
    # JAX's own marker of a machine that is not a TPU cluster.
    assert distributed.detect_cluster({'TPU_SKIP_MDS_QUERY': '1'}, tpu_vm) is None


def test_a_single_process_starts_nothing(tmp_path, started):
    assert distributed.initialize(environ={}, pci_devices=_pci(tmp_path)) == 'single'
    assert started == []


def test_explicit_arguments_start_with_them(tmp_path, started):
    how = distributed.initialize('127.0.0.1:1234', 2, 1, environ={}, pci_devices=str(tmp_path))
    assert how == 'explicit'
    assert started == [
        {'coordinator_address': '127.0.0.1:1234', 'num_processes': 2, 'process_id': 1}
    ]


def test_asked_for_or_detected_the_start_is_jaxs_auto_detection(tmp_path, started):
    pci = _pci(tmp_path)
    assert distributed.initialize(auto=True, environ={}, pci_devices=pci) == 'auto'
    environ = {'SLURM_NTASKS': '8', 'SLURM_JOB_ID': '7'}
    assert distributed.initialize(environ=environ, pci_devices=pci) == 'detected: slurm'
    assert started == [{}, {}]


@pytest.mark.parametrize(
    ('args', 'kwargs'),
    [
        (('127.0.0.1:1234',), {}),
        ((None, 2, 0), {}),
        (('127.0.0.1:1234', 2, 0), {'auto': True}),
    ],
)
def test_incomplete_or_conflicting_arguments_are_refused(started, args, kwargs):
    with pytest.raises(ValueError, match='--coordinator_address'):
        distributed.initialize(*args, environ={}, **kwargs)
    assert started == []


def test_an_initialised_runtime_is_left_alone(tmp_path, started, monkeypatch):
    monkeypatch.setattr(distributed.jax.distributed, 'is_initialized', lambda: True)
    assert distributed.initialize(auto=True, environ={}, pci_devices=str(tmp_path)) == 'single'
    assert started == []


def test_main_starts_the_runtime_from_its_flags(started):
    from absl import flags

    from fcn_unet_jax import errors, main

    def parsed(*args):
        values = flags.FlagValues()
        argv = ['main', '--config=configs/default.py', '--workdir=unused', *args]
        main.define_flags(values, sys_argv=argv)
        values(argv)
        return values

    main.initialize_distributed(parsed('--distributed'))
    assert started == [{}]
    with pytest.raises(errors.UserError, match='--num_processes and --process_id'):
        main.initialize_distributed(parsed('--coordinator_address=127.0.0.1:1234'))
    assert started == [{}]
