"""Export round trips (`fcn_unet_jax.export`) on the session's tiny trained run.

Each artifact is reloaded the way a user would (the StableHLO with `jax.export.deserialize`,
the SavedModel with TensorFlow) and its logits compared with the run's own whole-image
inference (`inference.logits`, the model as trained, CPU rewrites included) to 1e-5.
"""

import json
import os

import jax
import numpy as np
import pytest
from absl import flags

from fcn_unet_jax import checkpointing, errors, export, inference, models
from fcn_unet_jax import workdir as workdir_files
from fcn_unet_jax.data import input_pipeline

pytestmark = pytest.mark.usefixtures('fast_compile')

TOLERANCE = 1e-5


@pytest.fixture(scope='module')
def run(tiny_trained_run):
    """(workdir, config, model, variables) of the session's tiny U-Net run."""
    workdir = str(tiny_trained_run.workdir)
    config = workdir_files.read_config(workdir)
    model, variables = checkpointing.restore_model(workdir, config)
    return workdir, config, model, variables


@pytest.fixture(scope='module')
def exported(run, tmp_path_factory) -> str:
    """The run exported with free sizes, logits, StableHLO and SavedModel."""
    output = str(tmp_path_factory.mktemp('export') / 'model')
    export.export_run(run[0], output)
    return output


def _images(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _reference(run, images):
    _, _, model, variables = run
    settings = inference.InferenceSettings(mode='whole')
    return np.asarray(
        jax.jit(inference.logits, static_argnums=(0, 3))(model, variables, images, settings)
    )


def test_stablehlo_round_trip_for_free_batch_and_sizes(run, exported):
    with open(os.path.join(exported, export.STABLEHLO_FILE), 'rb') as f:
        loaded = jax.export.deserialize(bytearray(f.read()))
    assert loaded.platforms == ('cpu', 'cuda', 'tpu')
    for shape in ((3, 32, 64, 3), (1, 64, 32, 3)):
        images = _images(shape)
        logits = np.asarray(loaded.call(images))
        reference = _reference(run, images)
        assert logits.shape == (*shape[:3], 4) and np.abs(reference).max() > 0.1
        np.testing.assert_allclose(logits, reference, atol=TOLERANCE, rtol=TOLERANCE)
    with pytest.raises(Exception, match='32'):  # Free sizes are multiples of 32.
        loaded.call(_images((1, 40, 32, 3)))


def test_saved_model_round_trip(run, exported):
    import tensorflow as tf

    loaded = tf.saved_model.load(os.path.join(exported, export.SAVED_MODEL_DIR))
    serve = loaded.signatures['serving_default']
    images = _images((2, 64, 96, 3), seed=1)
    logits = serve(images=tf.constant(images))['logits'].numpy()
    np.testing.assert_allclose(logits, _reference(run, images), atol=TOLERANCE, rtol=TOLERANCE)


def test_metadata_describes_classes_and_preprocessing(run, exported):
    _, config, _, _ = run
    with open(os.path.join(exported, export.METADATA_FILE)) as f:
        metadata = json.load(f)
    assert sorted(os.listdir(os.path.dirname(exported))) == ['model']  # No staging folder.
    assert metadata['model'] == 'unet' and metadata['num_classes'] == 4
    assert metadata['class_names'][0] == 'background' and len(metadata['palette']) == 4
    assert metadata['files'] == {'stablehlo': 'model.stablehlo', 'saved_model': 'saved_model'}
    assert metadata['input']['shape'] == ['batch', '32*hk', '32*wk', 3]
    assert metadata['output'] == {
        'kind': 'logits',
        'dtype': 'float32',
        'shape': ['batch', 'H', 'W', 'num_classes'],
        'layout': 'NHWC',
    }
    # The recorded normalisation is the one the run trained with.
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    recorded = metadata['preprocessing']
    assert recorded['channel_order'] == 'RGB'
    ours = (pixels - np.asarray(recorded['mean'])) / np.asarray(recorded['std'])
    np.testing.assert_allclose(ours, input_pipeline.preprocess_image(pixels, config), atol=1e-5)


@pytest.mark.parametrize(
    ('overrides', 'order'),
    [
        ({'model.name': 'fcn8s_vgg16', 'model.batch_norm': False}, 'BGR'),
        ({'model.input_channels': 1, 'input.normalization': 'imagenet'}, 'grey'),
    ],
)
def test_preprocessing_matches_the_pipeline(tiny_config, overrides, order):
    config = tiny_config(**overrides)
    recorded = export.preprocessing(config)
    assert recorded['channel_order'] == order
    pixels = np.random.default_rng(1).integers(0, 256, (4, 6, 3)).astype(np.float64)
    if order == 'BGR':
        pixels_in = pixels[..., ::-1]
    else:
        pixels_in = (pixels * np.asarray(recorded['grey_weights'])).sum(-1, keepdims=True)
    ours = (pixels_in - np.asarray(recorded['mean'])) / np.asarray(recorded['std'])
    expected = input_pipeline.preprocess_image(pixels.astype(np.uint8), config)
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_fixed_size_argmax_and_refusals(run, tmp_path, capsys):
    workdir, config, _, _ = run
    output = tmp_path / 'argmax'
    metadata = export.export_run(
        workdir, str(output), image_size=(40, 24), output_kind='argmax', formats=['stablehlo']
    )
    assert metadata['input']['shape'] == ['batch', 40, 24, 3]
    assert sorted(os.listdir(output)) == ['metadata.json', 'model.stablehlo']
    plain = tmp_path / 'plain'
    plain.mkdir()  # A server running as another user reads it as it reads any folder.
    assert output.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    loaded = jax.export.deserialize(bytearray((output / export.STABLEHLO_FILE).read_bytes()))
    images = _images((2, 40, 24, 3), seed=2)
    ids = np.asarray(loaded.call(images))
    assert ids.dtype == np.int32
    reference = _reference(run, images)
    # Two compilations of the same network differ by float rounding, so a pixel whose two
    # best classes tie to within it may go either way; every other pixel must agree.
    top2 = np.sort(reference, axis=-1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] > 1e-4
    assert decided.mean() > 0.99
    np.testing.assert_array_equal(ids[decided], reference.argmax(-1)[decided])

    # An existing output is never touched; one error line through the program.
    fv = flags.FlagValues()
    export.define_flags(fv)
    errors.define_traceback_flag(fv)
    fv(['export', f'--workdir={workdir}', f'--output={output}'])
    with pytest.raises(SystemExit):
        errors.guard(export.main, flag_values=fv)(['export'], fv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith(f'error: {output} exists') and lines[1].startswith('hint: ')
    assert sorted(os.listdir(output)) == ['metadata.json', 'model.stablehlo']

    # The classic VALID U-Net has no free size: said before anything is written.
    valid = config.model.copy_and_resolve_references()
    valid.padding = 'VALID'
    with pytest.raises(errors.UserError, match='needs a fixed image size'):
        export.input_spec(models.build_model(valid), config, None)
    with pytest.raises(errors.UserError, match='--image_size'):
        export.parse_image_size('32x32')
    assert export.parse_image_size('dynamic') is None


def test_valid_unet_fixed_size_is_the_overlap_tile_inference(tiny_config):
    """The classic U-Net's export mirror-pads like `inference.logits` in 'whole' mode."""
    config = tiny_config(**{'model.padding': 'VALID', 'model.batch_norm': False})
    model = models.build_model(config.model)
    shape = models.example_input_shape(config.model)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
        np.zeros(shape, np.float32)
    )
    fn = export.inference_function(model, 'logits')
    _, spec = export.input_spec(model, config, (20, 28))
    exported = export.export_stablehlo(fn, variables, spec, ['cpu'])
    images = _images((2, 20, 28, 3), seed=4)
    settings = inference.InferenceSettings(mode='whole')
    reference = jax.jit(lambda x: inference.logits(model, variables, x, settings))(images)
    logits = np.asarray(exported.call(images))
    assert logits.shape == (2, 20, 28, 4) and np.abs(reference).max() > 0
    np.testing.assert_allclose(logits, reference, atol=TOLERANCE, rtol=TOLERANCE)


def test_torchvision_fcn_takes_any_size(tiny_config):
    config = tiny_config(**{'model.name': 'fcn_resnet50', 'model.batch_norm': False})
    model = models.build_model(config.model)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
        np.zeros((1, 32, 32, 3), np.float32)
    )
    _, spec = export.input_spec(model, config, None)
    plain = config.model.copy_and_resolve_references()
    plain.plain_ops = True
    fn = export.inference_function(models.build_model(plain), 'logits')
    exported = export.export_stablehlo(fn, variables, spec, ['cpu'])
    images = _images((2, 45, 37, 3), seed=5)
    settings = inference.InferenceSettings(mode='whole')
    reference = np.asarray(
        jax.jit(lambda x: inference.logits(model, variables, x, settings))(images)
    )
    logits = np.asarray(exported.call(images))
    # Random initial weights give logits in the tens: the tolerance is relative to them.
    assert logits.shape == (2, 45, 37, 4)
    assert np.abs(logits - reference).max() <= TOLERANCE * np.abs(reference).max()
