r"""U-Net on 2D axial slices of your own NIfTI / DICOM volumes (`volumes` dataset).

Not a paper reproduction: a starting recipe for volumetric data (layout of the root in
fcn_unet_jax/data/builders/volumes.py: `images/`, `labels/`, optional `classes.txt` and
`splits/`). The classic U-Net (SAME padding, BatchNorm, half the paper's widths) on one
input channel, trained on 256 px crops of axial slices (`slice_axis=2`) with
cross-entropy + Dice (robust to small organs), AdamW with a cosine schedule, 20,000
steps; whole-slice evaluation.

Intensities: the builder normalises each volume ('percentile_zscore' here; set
`--config.dataset.intensity=ct_window` with `ct_window` for CT) and stores uint8 slices
with their range, so `input.normalization='unit'` only maps them back to [0, 1];
`predict_volume` repeats exactly the builder's normalisation. `skip_empty_slices=False`:
slices without foreground stay in, so the model learns to predict empty slices (which a
volume mostly holds at prediction time) instead of hallucinating organs in them; set it
True to speed up training when foreground is rare and false positives are cheap.

`config.dataset.volume_root` must be given; `config.model.num_classes` defaults to 2 (set
it to the class count of `classes.txt`). Commands:

    python -m fcn_unet_jax.data.build --config=configs/unet_nifti.py \
        --config.dataset.volume_root=/path/to/root
    python -m fcn_unet_jax.main --config=configs/unet_nifti.py \
        --workdir=workdirs/unet_nifti --config.dataset.volume_root=/path/to/root
    python -m fcn_unet_jax.predict_volume --workdir=workdirs/unet_nifti \
        --input=/path/to/new_cases --output=/path/to/predictions [--labels=/path/to/labels]

`predict_volume --split=validation` instead evaluates the run's validation cases (Dice per
class and mean IoU per volume). `:runlocal` shrinks the run to a smoke test.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg='runlocal'` shrinks it to a smoke run."""
    config = default.get_config()
    config.dataset.name = 'volumes'
    config.dataset.slice_axis = 2
    config.dataset.skip_empty_slices = False
    config.dataset.intensity = 'percentile_zscore'
    config.model.name = 'unet'
    config.model.num_classes = 2
    config.model.input_channels = 1
    config.model.width = 0.5
    config.model.batch_norm = True
    config.input.normalization = 'unit'
    config.input.crop_size = (256, 256)
    config.input.scale_range = (0.75, 1.25)
    # In RAS-ordered slices a flip would turn a left organ into a right one (mislabelling
    # left/right classes such as kidneys).
    config.input.hflip = False
    config.batch_size = 16
    config.eval_batch_size = 16
    config.loss.name = 'cross_entropy+dice'
    config.optimizer.name = 'adamw'
    config.optimizer.learning_rate = 3e-4
    config.optimizer.warmup_steps = 500
    config.optimizer.schedule = 'cosine'
    config.num_train_steps = 20_000
    config.log_every_steps = 100
    config.eval_every_steps = 2_000
    config.checkpoint_every_steps = 2_000
    if arg and 'runlocal' in arg.split(','):
        default.apply_runlocal(config)
    return config
