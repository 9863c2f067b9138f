"""Reading weights files into flat name -> numpy array dicts.

PyTorch state dicts come from `.pth`/`.pt`/`.bin`/`.ckpt` (torch, loaded with
`weights_only=True`), `.npz` or `.safetensors` (no torch needed); Keras weights come from
HDF5 in its three layouts (Keras 3 `.weights.h5`, the legacy layout of
`keras.applications` downloads and `model.save('x.h5')`, and `.keras` archives), read with
h5py so Keras itself is not needed. What the names mean is for the rule tables
(`torchvision.py`, `keras.py`); this module only reads.
"""

import io
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt')
KERAS_SUFFIXES = ('.h5', '.hdf5', '.keras')


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Reads a PyTorch-style state dict (name -> array) from a local file.

    `.pth`/`.pt`/`.bin`/`.ckpt` need torch (loaded with `weights_only=True`, so no code in the
    file runs); `.npz` and `.safetensors` are read without it. Checkpoints that wrap the state
    dict (`{'state_dict': ...}` or `{'model': ...}`) and `DataParallel`'s `module.` prefix are
    unwrapped.

    Args:
        path: the weights file.

    Returns:
        The state dict with float32 numpy arrays.

    Raises:
        FileNotFoundError: `path` does not exist.
        ImportError: a torch pickle was given but torch is not installed.
        ValueError: the extension is not one of the supported formats.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'No weights file at {path!r}.')
    suffix = os.path.splitext(path)[1].lower()
    if suffix == '.npz':
        with np.load(path, allow_pickle=False) as data:
            state = {k: data[k] for k in data.files}
    elif suffix == '.safetensors':
        from safetensors.numpy import load_file

        state = load_file(path)
    elif suffix in TORCH_SUFFIXES:
        state = _load_torch_file(path)
    else:
        raise ValueError(
            f'Unsupported weights file {path!r}: expected .pth/.pt (torch), .npz or .safetensors '
            '(or .h5/.keras for from_keras).'
        )
    return strip_prefix(as_numpy_dict(state), 'module.')


def _load_torch_file(path: str) -> Mapping[str, Any]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f'Reading {path!r} needs PyTorch: `pip install torch`, or convert the file where '
            'torch is available, e.g. `numpy.savez(out, **{k: v.numpy() for k, v in '
            'torch.load(path).items()})` or safetensors.torch.save_file, and pass the .npz or '
            '.safetensors file instead.'
        ) from e
    state = torch.load(path, map_location='cpu', weights_only=True)
    for wrapper in ('state_dict', 'model'):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise ValueError(f'{path!r} holds a {type(state).__name__}, not a state dict.')
    return state


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, 'detach'):  # A torch tensor; bfloat16 has no numpy dtype, hence float().
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def as_numpy_dict(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A state dict with string keys and numpy values (torch tensors are converted).

    Args:
        state: name -> array or torch tensor.

    Returns:
        name -> numpy array.
    """
    return {str(k): _to_numpy(v) for k, v in state.items()}


def strip_prefix(state: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Removes `prefix` from every key, but only if every key has it.

    Args:
        state: name -> array.
        prefix: e.g. `DataParallel`'s 'module.'.

    Returns:
        The state dict without the common prefix (or `state` itself).
    """
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


# Keras layers store their weights in a fixed order; these are the names of that order for
# the layer types found in VGG16 and ResNet50 (the Keras 3 `.weights.h5` format stores only
# the order, the legacy format names that differ between Keras versions).
_KERAS_WEIGHT_ORDER = {
    1: ('kernel',),
    2: ('kernel', 'bias'),
    4: ('gamma', 'beta', 'moving_mean', 'moving_variance'),
}


def read_keras_weights(path: str) -> dict[str, np.ndarray]:
    """Reads Keras weights as {'<layer name>/<kernel|bias|gamma|...>': array}.

    Handles the Keras 3 `.weights.h5` layout (`layers/<path>/vars/<i>`, layer name in the
    `name` attribute), the legacy HDF5 layout that `keras.applications` ships and `model.save`
    writes (`layer_names` attribute, `<layer>/<weight name>`; full saves nest it under
    `model_weights`), and `.keras` archives (which hold a `model.weights.h5`).

    Args:
        path: the Keras weights file.

    Returns:
        '<layer>/<weight>' -> array, weights named by their position in the layer.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file is not a Keras weights file, or holds a layer type other than
            convolution, dense and batch normalisation.
    """
    import h5py

    if not os.path.isfile(path):
        raise FileNotFoundError(f'No Keras weights file at {path!r}.')
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            source = io.BytesIO(archive.read('model.weights.h5'))
    else:
        source = path
    with h5py.File(source, 'r') as f:
        root = f.get('model_weights', f)
        if 'layer_names' in root.attrs:
            layers = _read_keras_legacy(root)
        elif 'layers' in root:
            layers = _read_keras3(root['layers'])
        else:
            raise ValueError(f'{path!r} is not a Keras weights file (no layer_names or layers).')
    weights = {}
    for layer, arrays in layers.items():
        names = _KERAS_WEIGHT_ORDER.get(len(arrays))
        if names is None:
            raise ValueError(
                f'{path!r}: layer {layer!r} has {len(arrays)} weights; expected a convolution, '
                'dense or batch-normalisation layer.'
            )
        weights.update({f'{layer}/{name}': a for name, a in zip(names, arrays, strict=True)})
    return weights


def _decode(name: bytes | str) -> str:
    return name.decode('utf8') if isinstance(name, bytes) else str(name)


def _read_keras_legacy(root: Any) -> dict[str, list[np.ndarray]]:
    layers = {}
    for layer in map(_decode, root.attrs['layer_names']):
        group = root[layer]
        names = [_decode(n) for n in group.attrs.get('weight_names', [])]
        if names:
            layers[layer] = [np.asarray(group[n]) for n in names]
    return layers


def _read_keras3(group: Any) -> dict[str, list[np.ndarray]]:
    layers = {}

    def visit(_: str, node: Any) -> None:
        if node.name.endswith('/vars') and len(node) and 'name' in node.attrs:
            layers[_decode(node.attrs['name'])] = [
                np.asarray(node[k]) for k in sorted(node, key=int)
            ]

    group.visititems(visit)
    if not layers:
        raise ValueError(
            'Keras 3 weights file without layer names (written by an older Keras 3); re-save it '
            'with the current Keras or with model.save("x.h5").'
        )
    return layers
