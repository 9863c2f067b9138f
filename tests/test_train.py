"""End-to-end tests of the train loop on a tiny `shapes` build with tiny models.

Covered: 1 vs 4 devices, exact resume, NaN error, SIGTERM save and resume through
`python -m fcn_unet_jax.main`, eval mode, sliding-window + flip eval, VALID U-Net eval on
full labels, init_from, frozen variables, bfloat16; a resumed run's config history and
metrics log, a checkpoint that does not fit (refused, kept) and restarting from scratch.
"""

import os
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from fcn_unet_jax import checkpointing, errors, models, optimizers, sharding, train, train_steps
from fcn_unet_jax import workdir as workdir_files
from fcn_unet_jax.data import input_pipeline

pytestmark = pytest.mark.usefixtures('fast_compile')


def train_losses(workdir) -> list[float]:
    return [r['train/loss'] for r in workdir_files.read_metrics_log(workdir) if 'train/loss' in r]


def saved_params(workdir):
    return checkpointing.restore_variables(str(workdir))['params']


def assert_trees_close(a, b, **tolerance):
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerance), a, b
    )


@pytest.fixture(scope='module')
def four_device_run(tiny_trained_run):
    """The reference: `tiny_config()`, 4 steps straight on 4 devices (conftest)."""
    return tiny_trained_run.workdir, tiny_trained_run.summaries


def test_run_writes_everything(four_device_run):
    workdir, summaries = four_device_run
    assert summaries['step'] == 4 and not summaries['preempted']
    assert np.isfinite(summaries['train_loss'])
    report = workdir_files.read_eval_results(workdir)
    assert report == summaries['eval']
    assert set(report['per_class_iou']) == {'background', 'circle', 'rectangle', 'triangle'}
    assert 0 <= report['mean_iou'] <= 1
    assert np.sum(report['confusion_matrix']) == 8 * 64 * 64  # Every real pixel, once.
    assert workdir_files.read_config(workdir).model.width == 0.0625
    assert len(train_losses(workdir)) == 4
    assert list(os.listdir(workdir / 'checkpoints')) == ['4']
    assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))


def test_one_device_matches_four_devices(four_device_run, tiny_config, tmp_path):
    workdir, _ = four_device_run
    train.train_and_evaluate(tiny_config(), str(tmp_path), devices=jax.devices()[:1])
    np.testing.assert_allclose(train_losses(tmp_path), train_losses(workdir), rtol=1e-4)
    assert_trees_close(saved_params(tmp_path), saved_params(workdir), rtol=1e-4, atol=1e-5)


def test_resume_matches_uninterrupted_run(four_device_run, tiny_config, tmp_path):
    workdir, _ = four_device_run
    stopped = train.train_and_evaluate(tiny_config(num_train_steps=2), str(tmp_path))
    assert stopped['step'] == 2
    resumed = train.train_and_evaluate(tiny_config(), str(tmp_path))
    assert resumed['step'] == 4
    assert train_losses(tmp_path) == pytest.approx(train_losses(workdir), rel=1e-6)
    assert_trees_close(saved_params(tmp_path), saved_params(workdir), rtol=1e-6, atol=1e-7)
    # The safe change is recorded; the metrics log holds each step of each kind once.
    (change,) = workdir_files.read_config_history(tmp_path)
    assert change['step'] == 2 and change['changes'] == {'num_train_steps': [2, 4]}
    train.train_and_evaluate(tiny_config(), str(tmp_path))  # Finished: evaluated again.
    records = [(r['step'], 'eval/mean_iou' in r) for r in workdir_files.read_metrics_log(tmp_path)]
    assert sorted(records) == [(1, False), (2, False), (2, True), (3, False), (4, False), (4, True)]


def _files(directory) -> dict[str, int]:
    """Every file and folder under `directory`, with file sizes (-1 for folders)."""
    return {
        str(p.relative_to(directory)): p.stat().st_size if p.is_file() else -1
        for p in sorted(directory.rglob('*'))
    }


def test_a_checkpoint_that_does_not_fit_is_refused_and_kept(four_device_run, tiny_config, tmp_path):
    workdir = shutil.copytree(four_device_run[0], tmp_path / 'run')
    os.remove(workdir / workdir_files.CONFIG_FILE)  # Only the checkpoint can tell now.
    before = _files(workdir)
    with pytest.raises(checkpointing.CheckpointMismatchError) as error:
        train.train_and_evaluate(tiny_config(**{'optimizer.name': 'adam'}), str(workdir))
    assert "trained -> asked: optimizer.name 'sgd' -> 'adam'" in str(error.value)
    assert _files(workdir) == before


def test_restart_from_scratch_moves_the_run_aside(four_device_run, tiny_config, tmp_path):
    workdir = shutil.copytree(four_device_run[0], tmp_path / 'run')
    before = _files(workdir)
    # Other data, the same shapes: the compiled steps of the session are reused.
    config = tiny_config(num_train_steps=1, **{'dataset.train_split': 'train[:32]'})
    with pytest.raises(errors.UserError, match=r"train_split 'train\[:64\]' -> 'train\[:32\]'"):
        train.train_and_evaluate(config, str(workdir))
    assert _files(workdir) == before
    summaries = train.train_and_evaluate(config, str(workdir), restart_from_scratch=True)
    assert summaries['step'] == 1
    previous = workdir / workdir_files.PREVIOUS_RUNS_DIR / '1'
    assert _files(previous) == before  # Every file of the old run, unchanged.
    assert workdir_files.read_config(workdir).dataset.train_split == 'train[:32]'
    assert [r['step'] for r in workdir_files.read_metrics_log(workdir)] == [1, 1]


def test_eval_with_sliding_windows_and_flip(four_device_run, tiny_config, tmp_path):
    workdir, _ = four_device_run
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)  # Keep the shared run as it is.
    config = tiny_config(
        **{'eval.mode': 'sliding', 'eval.window_size': (32, 32), 'eval.flip': True}
    )
    report = train.evaluate_checkpoint(config, str(tmp_path), split='validation[:4]')
    assert report['step'] == 4
    assert np.sum(report['confusion_matrix']) == 4 * 64 * 64
    assert 0 <= report['mean_iou'] <= 1 and 0 <= report['pixel_accuracy'] <= 1


def test_valid_unet_eval_scores_every_labelled_pixel(tiny_config):
    # The VALID U-Net's output is smaller than its input; inference overlap-tiles a mirrored
    # image, so evaluation covers the full label, not only a centre crop of it.
    config = tiny_config(
        **{'model.padding': 'VALID', 'model.batch_norm': False, 'input.crop_size': (188, 188)}
    )
    config.dataset.eval_split = 'validation[:4]'
    trainer = train.Trainer(config, jax.devices())
    labelled = sum(
        int(np.sum(batch['mask'] & (batch['label'] != config.dataset.ignore_label)))
        for batch in input_pipeline.create_eval_iterable(config)
    )
    assert labelled == 4 * 64 * 64
    assert np.sum(trainer.evaluate()['confusion_matrix']) == labelled


def test_nan_loss_names_the_step(tiny_config, tmp_path):
    # An enormous learning rate overflows the parameters in the first update, so the second
    # step's loss is not finite.
    config = tiny_config(**{'optimizer.learning_rate': 1e38, 'model.batch_norm': False})
    with pytest.raises(FloatingPointError, match='at step 2'):
        train.train_and_evaluate(config, str(tmp_path))
    assert not os.listdir(tmp_path / 'checkpoints')  # Nothing non-finite was saved.


def test_init_from_previous_workdir(four_device_run, tiny_config):
    workdir, _ = four_device_run
    config = tiny_config(init_from=str(workdir))
    mesh = sharding.create_mesh()
    model = models.build_model(config.model)
    state, _, _ = train_steps.create_train_state(config, model, mesh, jax.random.key(7))
    assert_trees_close(state.params, saved_params(workdir), rtol=0, atol=0)
    assert int(state.step) == 0


def test_a_run_whose_pretrained_source_is_gone_still_evaluates_and_resumes(
    four_device_run, tiny_config, tmp_path
):
    # A checkpoint replaces the pretrained start, so a moved or deleted `init_from` (a
    # previous FCN stage, converted weights) matters only for a fresh start.
    source = tmp_path / 'source'
    shutil.copytree(four_device_run[0], source)
    workdir = str(tmp_path / 'run')
    train.train_and_evaluate(tiny_config(init_from=str(source)), workdir)
    shutil.rmtree(source)
    assert train.evaluate_checkpoint(tiny_config(init_from=str(source)), workdir)['step'] == 4
    resumed = train.train_and_evaluate(
        tiny_config(init_from=str(source), num_train_steps=5), workdir
    )
    assert resumed['step'] == 5
    fresh = tmp_path / 'fresh'
    with pytest.raises(errors.MissingInputError, match='source'):
        train.train_and_evaluate(tiny_config(init_from=str(source)), str(fresh))
    assert not fresh.exists()


def _synthetic_batch(size=36, batch=2, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, classes, (batch, size, size)).astype(np.int32)
    labels[:, :3] = 255
    return {'image': jnp.asarray(images), 'label': jnp.asarray(labels)}


def _run_steps(config, steps=2):
    model = models.build_model(config.model)
    state, tx, schedule = train_steps.create_train_state(
        config, model, sharding.create_mesh(jax.devices()[:1]), jax.random.key(0)
    )
    initial = jax.tree_util.tree_map(np.asarray, state)
    step = jax.jit(train_steps.bind_train_step(config, model, tx, schedule))
    for _ in range(steps):
        state, summary = step(state, _synthetic_batch(), jax.random.key(1))
    return initial, state, summary


def test_per_device_batch_norm_statistics_train_through_the_trainers_step(tiny_config):
    # The trainer's jitted step traces under its mesh, which per-device statistics need;
    # on 2 devices each normalises its own half of the batch, so the running statistics
    # differ from those of the global batch (one device's equality: tests/ops).
    def one_step(stats):
        config = tiny_config(**{'model.batch_norm_stats': stats, 'input.crop_size': (36, 36)})
        mesh = sharding.create_mesh(jax.devices()[:2])
        model = models.build_model(config.model)
        state, tx, schedule = train_steps.create_train_state(config, model, mesh, jax.random.key(0))
        step = train_steps.jit_train_step(config, model, tx, schedule, mesh)
        batch = sharding.global_batch(
            {k: np.asarray(v) for k, v in _synthetic_batch(seed=3).items()},
            sharding.batch_sharding(mesh),
        )
        rng = jax.device_put(jax.random.key(1), sharding.replicated_sharding(mesh))
        state, summary = step(state, batch, rng)
        assert np.isfinite(summary['loss'])
        return jax.tree.leaves(jax.tree_util.tree_map(np.asarray, state.model_state))

    per_device, global_ = one_step('per_device'), one_step('global')
    assert not all(np.allclose(a, b) for a, b in zip(per_device, global_, strict=True))


def test_frozen_collection_and_frozen_params_stay_fixed():
    config = default.get_config()
    config.model.name = 'fcn8s_vgg16'
    config.model.width = 0.0625
    config.input.crop_size = (36, 36)
    config.optimizer.frozen_params = ('^backbone/conv1_',)
    initial, state, _ = _run_steps(config)
    assert 'frozen' in state.model_state
    assert_trees_close(state.model_state['frozen'], initial.model_state['frozen'], rtol=0, atol=0)
    groups = optimizers.param_groups(state.params, config.optimizer.frozen_params)
    moved = jax.tree_util.tree_map(
        lambda a, b: bool(np.any(np.asarray(a) != b)), state.params, initial.params
    )
    pairs = list(
        zip(jax.tree_util.tree_leaves(groups), jax.tree_util.tree_leaves(moved), strict=True)
    )
    frozen_moved = [m for g, m in pairs if g == 'frozen']
    trained_moved = [m for g, m in pairs if g != 'frozen']
    assert frozen_moved and not any(frozen_moved)
    assert any(trained_moved)


def test_bfloat16_compute_keeps_float32_params_and_loss():
    config = default.get_config()
    config.model.width = 0.0625
    config.model.dtype = 'bfloat16'
    config.input.crop_size = (36, 36)
    _, state, summary = _run_steps(config)
    assert {x.dtype for x in jax.tree_util.tree_leaves(state.params)} == {jnp.dtype('float32')}
    assert summary['loss'].dtype == jnp.float32 and np.isfinite(float(summary['loss']))


# The long run must neither evaluate nor checkpoint before it is stopped.
_NO_EVAL_OR_CHECKPOINT = {'eval_every_steps': 100000, 'checkpoint_every_steps': 100000}


@pytest.mark.slow
def test_main_sigterm_saves_at_step_boundary_then_resumes_and_evaluates(
    tiny_main_command, subprocess_env, repo_root, tmp_path
):
    """SIGTERM mid-run saves the current step; rerunning the command finishes the run."""
    long_run = tiny_main_command(tmp_path, num_train_steps=100000, **_NO_EVAL_OR_CHECKPOINT)
    process = subprocess.Popen(
        long_run, env=subprocess_env, cwd=repo_root, stderr=subprocess.PIPE, text=True
    )
    log = tmp_path / workdir_files.METRICS_LOG_FILE
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline, 'training did not start'
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert 'Stopped by SIGTERM' in stderr
    steps = checkpointing.CheckpointManager(str(tmp_path), keep=None).all_steps()
    assert len(steps) == 1 and 2 <= steps[0] < 100000
    assert workdir_files.read_eval_results(tmp_path) is None

    finish = tiny_main_command(tmp_path, num_train_steps=steps[0] + 1, **_NO_EVAL_OR_CHECKPOINT)
    run = {'env': subprocess_env, 'cwd': repo_root, 'check': True, 'capture_output': True}
    subprocess.run(finish, **run)
    report = workdir_files.read_eval_results(tmp_path)
    assert report['step'] == steps[0] + 1

    evaluate = tiny_main_command(tmp_path, '--mode=eval', '--split=validation[:4]')
    subprocess.run(evaluate, **run)
    split_report = workdir_files.read_eval_results(tmp_path, 'validation[:4]')
    assert (tmp_path / 'eval_results_validation_4.json').exists()
    assert split_report['step'] == steps[0] + 1 and split_report['split'] == 'validation[:4]'
    assert np.sum(split_report['confusion_matrix']) == 4 * 64 * 64
