"""`build_model` on partial model configs: unset fields take configs/default.py's values.

The defaults are written once, in configs/default.py; a field that is unknown, or missing
where those defaults cannot be imported, is a user error that names it.
"""

import sys

import ml_collections
import pytest

from configs import default
from fcn_unet_jax import errors, models


def test_partial_config_takes_the_documented_defaults():
    partial = ml_collections.ConfigDict({'name': 'unet', 'num_classes': 2, 'width': 0.25})
    model = models.build_model(partial)
    base = default.get_config().model
    assert (model.num_classes, model.width) == (2, 0.25)
    assert (model.input_channels, model.padding, model.batch_norm) == (
        base.input_channels,
        base.padding,
        base.batch_norm,
    )
    assert model.merge == 'concat'  # merge None: the U-Net's paper default.
    assert set(partial) == {'name', 'num_classes', 'width'}  # The argument is not changed.
    complete = models.complete_model_config(partial)
    assert set(complete) == set(base) and complete.width == 0.25


def test_unknown_or_missing_fields_are_named(monkeypatch):
    with pytest.raises(errors.UserError, match='no field.*widht') as error:
        models.build_model(ml_collections.ConfigDict({'name': 'unet', 'widht': 2.0}))
    assert error.value.hint == 'closest valid fields: width'
    with pytest.raises(errors.UserError, match="Unknown config.model.name 'unett'") as error:
        models.build_model(ml_collections.ConfigDict({'name': 'unett'}))
    assert error.value.hint == 'did you mean unet?'
    # An installed package without the repository's configs/ has no defaults to fill in.
    monkeypatch.setattr(models, 'default_model_config', lambda: None)
    with pytest.raises(errors.UserError, match=r"lacks the field '\w+'"):
        models.build_model(ml_collections.ConfigDict({'name': 'unet', 'num_classes': 2}))


def test_a_users_configs_package_does_not_supply_the_defaults(tmp_path, monkeypatch):
    # A project of the user's with its own configs/default.py, first on the path.
    (tmp_path / 'configs').mkdir()
    (tmp_path / 'configs' / '__init__.py').write_text('')
    (tmp_path / 'configs' / 'default.py').write_text('def get_config():\n    raise ValueError\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ('configs', 'configs.default'):
        monkeypatch.delitem(sys.modules, name, raising=False)
    model = models.build_model(ml_collections.ConfigDict({'name': 'unet', 'num_classes': 2}))
    assert model.input_channels == default.get_config().model.input_channels
