"""Reading weights files without torch: npz, safetensors, and the errors for the rest.

The Keras HDF5 layouts are read in test_keras.py (they need Keras to write them); torch
pickles in test_parity_torch.py.
"""

import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from fcn_unet_jax import weights


def test_npz_and_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    state = {
        'module.conv1.weight': rng.normal(size=(4, 3, 3, 3)).astype('f4'),
        'module.bn1.running_var': rng.uniform(size=4).astype('f4'),
    }
    np.savez(tmp_path / 'w.npz', **state)
    save_file(state, str(tmp_path / 'w.safetensors'))
    for name in ('w.npz', 'w.safetensors'):
        loaded = weights.load_state_dict(tmp_path / name)
        # DataParallel's `module.` prefix is removed.
        assert sorted(loaded) == ['bn1.running_var', 'conv1.weight']
        for key, value in state.items():
            np.testing.assert_array_equal(loaded[key.removeprefix('module.')], value)


def test_pth_without_torch_says_what_to_do(tmp_path, monkeypatch):
    path = tmp_path / 'weights.pth'
    path.write_bytes(b'not read')
    monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now fails.
    with pytest.raises(ImportError, match=r'pip install torch.*\.npz.*\.safetensors'):
        weights.load_state_dict(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.npz'):
        weights.load_state_dict(tmp_path / 'nope.npz')
    (tmp_path / 'weights.txt').write_text('')
    with pytest.raises(ValueError, match='Unsupported weights file'):
        weights.load_state_dict(tmp_path / 'weights.txt')
