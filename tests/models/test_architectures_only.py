"""`fcn_unet_jax/models/` holds architectures only: nothing in it is platform-specific.

A reader of an architecture meets `ops.Conv`, never the trick behind it: how an op runs
on each platform is `fcn_unet_jax.ops`' business.
"""

import pathlib

import pytest

import fcn_unet_jax.models

SOURCES = sorted(pathlib.Path(fcn_unet_jax.models.__file__).parent.glob('*.py'))


def test_the_models_package_has_sources():
    assert {path.name for path in SOURCES} >= {'__init__.py', 'encoders.py', 'fcn.py', 'unet.py'}


@pytest.mark.parametrize('path', SOURCES, ids=lambda path: path.name)
def test_no_platform_specific_code_in_models(path):
    source = path.read_text()
    assert 'platform_dependent' not in source
    assert 'cpu' not in source.lower()
