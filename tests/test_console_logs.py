"""What a run prints and writes for a person: short logs, TensorBoard pictures, presets.

One 6-step tiny run goes through the real command (`fcn-unet train`, as a subprocess):
its log must stay under 40 lines with the key lines in it, and its event files must hold
the evaluation pictures. The config resolution of the presets is checked in-process.
"""

import io
import os
import pathlib
import subprocess

import numpy as np
import pytest
from PIL import Image

from fcn_unet_jax import console, errors, eval_pictures, train
from fcn_unet_jax.data import builders

MAX_LINES = 40


@pytest.fixture(scope='module')
def six_step_run(tiny_main_command, tmp_path_factory, fast_compile):
    """A 6-step tiny run through `fcn-unet train`: (workdir, output lines)."""
    workdir = tmp_path_factory.mktemp('six_steps') / 'run'
    overrides = {'eval.tensorboard_images': 4}  # The tiny runs leave them out.
    command = tiny_main_command(
        workdir, num_train_steps=6, log_every_steps=2, eval_every_steps=3, **overrides
    )
    module = command.index('fcn_unet_jax.main')
    command[module : module + 1] = ['fcn_unet_jax.cli', 'train']
    env = {**os.environ, **fast_compile}
    env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
    process = subprocess.run(command, env=env, capture_output=True, text=True)
    assert process.returncode == 0, process.stderr
    return workdir, (process.stdout + process.stderr).splitlines()


def test_a_short_run_prints_a_short_readable_log(six_step_run):
    workdir, lines = six_step_run
    assert len(lines) < MAX_LINES, '\n'.join(lines)
    text = '\n'.join(lines)
    for expected in (
        'model unet (width 0.0625, 4 classes',  # the resolved config
        'dataset shapes/small: 64 train, 8 eval images; 4 classes',
        'parameters (table in',
        'compiling the train step ...',
        'compiled the train step in',
        'step 2/6  loss',
        'step 6/6  loss',
        'ETA',
        'eval validation[:8]: 2 batches in',
        'eval validation[:8] at step 3: mIoU',
        'per-class scores:',
        'circle',
    ):
        assert expected in text, f'{expected!r} missing from:\n{text}'
    for chatter in ('orbax', 'oneDNN', 'dataset_info.py', 'Parameter', '+----'):
        assert chatter not in text, text
    table = (workdir / train.MODEL_SUMMARY_FILE).read_text()
    assert 'down1/conv1/kernel' in table and 'Total:' in table


def test_evaluations_write_pictures_to_tensorboard(six_step_run):
    from tensorboard.backend.event_processing import event_accumulator

    workdir, _ = six_step_run
    events = event_accumulator.EventAccumulator(str(workdir), size_guidance={'tensors': 0})
    events.Reload()
    for tag in (eval_pictures.PREDICTIONS_TAG, eval_pictures.CONFUSION_TAG):
        assert events.SummaryMetadata(tag).plugin_data.plugin_name == 'images', tag
        written = events.Tensors(tag)
        assert [e.step for e in written] == [3, 6], tag
    # An image summary holds width, height, then one PNG per image.
    panels = events.Tensors(eval_pictures.PREDICTIONS_TAG)[-1].tensor_proto.string_val
    width, height = int(panels[0]), int(panels[1])
    assert len(panels) == 2 + 4  # config.eval.tensorboard_images

    first = np.asarray(Image.open(io.BytesIO(panels[2])))
    assert first.shape == (height, width, 3)
    assert width > 3 * 32  # image | ground truth | prediction, plus the legend


def test_init_from_none_or_empty_means_from_scratch(tiny_config):
    for value in ('None', ''):
        config = tiny_config(init_from=value)
        train.resolve_config(config)
        assert config.init_from is None


def test_a_missing_pretrained_file_says_how_to_make_it(tiny_config, tmp_path):
    config = tiny_config(**{'model.name': 'unet_vgg16'})
    config.init_from = str(tmp_path / 'weights' / 'unet_vgg16_imagenet')
    with pytest.raises(errors.MissingInputError) as raised:
        train.check_init_from(config)
    assert config.init_from in raised.value.message
    hint = raised.value.hint
    assert f'fcn-unet download-weights unet_vgg16_imagenet --dir={tmp_path}/weights' in hint
    assert '--input=vgg16-397923af.pth --model=unet_vgg16 --output=' in hint
    assert '--config.init_from=None' in hint
    config.init_from = 'workdirs/fcn_voc_16s'  # An FCN stage starts from the one before.
    with pytest.raises(errors.MissingInputError) as raised:
        train.check_init_from(config)
    assert 'fcn-unet train --config=fcn_voc:16s --workdir=workdirs/fcn_voc_16s' in (
        raised.value.hint
    )


def test_the_run_header_names_the_loss_with_its_weights(tiny_config):
    config = tiny_config()
    assert console.describe_loss(config) == 'cross_entropy'
    config.input.border_weights = True
    config.loss.class_weights = (1.0, 2.5)
    assert console.describe_loss(config) == (
        'cross_entropy with the border weight map (w0 10, sigma 5 px), class weights (1, 2.5)'
    )


def test_border_weights_need_a_cross_entropy_term(tiny_config):
    config = tiny_config(**{'input.border_weights': True, 'loss.name': 'dice'})
    with pytest.raises(errors.UserError, match="loss.name='dice' has none"):
        train.resolve_config(config)
    config.loss.name = 'cross_entropy+dice'
    train.resolve_config(config)


def test_num_classes_comes_from_the_dataset(tiny_config):
    config = tiny_config()
    config.model.num_classes = None
    train.resolve_config(config)
    assert config.model.num_classes == 4  # shapes: background and three shapes


def _folder_root(root: pathlib.Path) -> pathlib.Path:
    for folder in ('images', 'masks'):
        (root / folder).mkdir(parents=True)
    for i in range(3):
        mask = np.zeros((8, 8), np.uint8)
        mask[i:, :4] = 1 + i % 2
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / f'images/{i}.png')
        Image.fromarray(mask, mode='L').save(root / f'masks/{i}.png')
    (root / 'classes.txt').write_text('background\na\nb\n')
    return root


def test_a_folder_build_prints_no_download_sizes(tiny_config, tmp_path, capfd):
    config = tiny_config(
        **{
            'dataset.name': 'folder',
            'dataset.folder_root': str(_folder_root(tmp_path / 'mine')),
            'dataset.folder_val_fraction': 0.0,
            'dataset.train_split': 'train',
            'dataset.eval_split': 'train',
            'dataset.data_dir': str(tmp_path / 'tfds'),
        }
    )
    console.quiet_tfds()
    builders.prepare(config.dataset)
    out, err = capfd.readouterr()
    assert 'Downloading and preparing' not in out + err
    assert 'Unknown size' not in out + err
    config.model.num_classes = None
    train.resolve_config(config)
    assert config.model.num_classes == 3  # the lines of classes.txt
