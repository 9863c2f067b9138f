"""Importing torchvision where its compiled ops cannot load (parity tests, benchmarks).

The project never needs torch at run time; the parity tests and the model benchmark compare
against torchvision / segmentation_models_pytorch when they are installed. The offline
wheel index holds only torchvision's CUDA build, whose `_C` library does not load next to
the CPU build of torch: torchvision's import then fails while registering fake kernels for
the ops that never loaded. The models used here are plain Python, so on that failure
torchvision is imported again without those registrations.
"""

import importlib
import sys
import types


def import_torchvision() -> types.ModuleType:
    """Returns the torchvision module (see the module docstring for the fallback).

    Raises:
      ImportError: torchvision (or torch) is not installed.
    """
    try:
        return importlib.import_module('torchvision')
    except RuntimeError:
        for name in [n for n in sys.modules if n.split('.')[0] == 'torchvision']:
            del sys.modules[name]
        name = 'torchvision._meta_registrations'
        sys.modules[name] = types.ModuleType(name)
        return importlib.import_module('torchvision')
