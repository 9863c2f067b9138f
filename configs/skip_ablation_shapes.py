r"""Base config of the skip-connection ablation (experiments/skip_ablation.py) on `shapes_fine`.

Not a paper reproduction: the sweep varies `model.skip_strides` / `model.merge` around this
config to measure, on a CPU, what the FCN paper (Table 2: FCN-32s 59.4 -> FCN-16s 62.4 ->
FCN-8s 62.7 mean IU on seg11valid; its figure 4: finer boundaries) and the U-Net paper
(separating touching objects) attribute to skips. The data is `shapes_fine` (256 px: large
objects that a stride-32 output resolves, small and thin ones that it cannot, touching
instances separated by 2 px gaps, rippled contours), so the coarse/fine difference shows
in mean IoU, Boundary IoU and the trimap metrics. The argument picks the family, `fcn` or
`unet` (default), plus the usual `runlocal`:

* `unet`: the classic U-Net (SAME padding, BatchNorm, no dropout) at 1/8 width
  (8-16-32-64-128 channels), Adam 3e-3 with a cosine schedule, trained on the paper's
  weighted loss: the border weight map (w_c balancing each crop's class frequencies,
  w0 = 10, sigma = 5 px), which makes the gaps between touching cells expensive and keeps
  the thin bars and the stars from being ignored.
* `fcn`: FCN-8s (VGG16, conv1_1 padded by 100, fc6 as a 7x7 conv) at 1/16 width, no
  dropout, learnable x2 upsamplers (the final x8/x16/x32 one frozen at bilinear, as in the
  reference), trained from scratch on plain cross-entropy with Adam 1e-3 and a cosine
  schedule.

Neither is the papers' recipe, which cannot train here: the FCN paper fine-tunes an
ImageNet VGG16 with SGD (momentum 0.99, lr 1e-10 on the summed loss) and the VGG16 has no
BatchNorm, so a from-scratch FCN needs Adam at a rate that the deep, BatchNorm-free stack
tolerates (1e-3; 3e-3 learned more slowly over the first 300 steps); the U-Net paper trains
for days with SGD (momentum 0.99). Both train on random 128 px crops of the 256 px images
(whole images would cost 3 to 4 times more per step) with flips, global batch 8, and are
scored on the whole 256 px validation images (100).

Budgets (`STEPS`, and `VARIANT_STEPS` for a variant that flattens later; none here) come from
learning curves (docs/replication.md lists them): each is long enough that the run's own
validation curve is flat over its last part and a longer run ends within the seed-to-seed
spread.

* U-Net, 800 steps for every variant: in 800-step runs (seed 0, validation every 100
  steps) `full` reaches 0.979 mean IoU at step 600 and ends 0.980, `no_s1` 0.925 and
  0.922, `none` 0.688 and 0.693. 400 steps were too few: 400-step runs ended at 0.944
  (`full`, 5 seeds), 0.895 (`no_s1`, seed 0) and about 0.10 lower (`none`), and `full`'s
  600-step runs ended 0.004 to 0.011 below its 800-step runs on seeds 0-2.
* FCN, 1,200 steps for every variant, scored at steps 400, 800 and 1,200. Over 5 seeds
  of 1,200 steps, 16s scored 0.588, 0.589, 0.591 and 0.594 mean IoU at steps 600 to
  1,200 and 8s 0.663, 0.705, 0.702 and 0.707; their 600-step runs had ended at 0.544 and
  0.615. 32s, first kept at 600 steps on one seed's curve, was not flat either: its five
  1,200-step runs end at 0.561 +- 0.013 against 0.504 +- 0.044 at 600 (every seed
  higher, by 0.010 to 0.127), and their mean moves by 0.008 from step 800 to 1,200.

The sweeps take under an hour of an idle 2-core CPU together: 58 minutes on an AMD EPYC
(Zen 4), 26 for the FCN (1,200-step runs of 94 to 114 s) and 32 for the U-Net (800-step
runs of 111 to 167 s); docs/replication.md has the Intel Xeon's times.

    python -m experiments.skip_ablation --family=fcn --config=configs/skip_ablation_shapes.py:fcn \
        --variants=32s,16s,8s --seeds=0,1,2,3,4 --output=workdirs/ablation_fcn
    python -m experiments.skip_ablation --family=unet \
        --config=configs/skip_ablation_shapes.py:unet --variants=full,no_s1,none \
        --seeds=0,1,2,3,4 --output=workdirs/ablation_unet
"""

import ml_collections

from configs import default, shapes_fcn8s, shapes_unet

# Each family's base model and optimiser: the `make demo` config of that model.
FAMILY_RECIPES = {'unet': shapes_unet, 'fcn': shapes_fcn8s}
# Train steps per family, and per variant where its curve flattens later (see the
# docstring for how they were chosen).
STEPS = {'unet': 800, 'fcn': 1200}
VARIANT_STEPS: dict[str, dict[str, int]] = {'unet': {}, 'fcn': {}}
LEARNING_RATES = {'unet': 3e-3, 'fcn': 1e-3}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the base config for `arg` = `[fcn|unet][,runlocal]` (default `unet`)."""
    parts = arg.split(',') if arg else []
    families = [p for p in parts if p in FAMILY_RECIPES]
    unknown = [p for p in parts if p not in FAMILY_RECIPES and p != 'runlocal']
    if unknown or len(families) > 1:
        raise ValueError(
            f'configs/skip_ablation_shapes.py takes [fcn|unet][,runlocal], got {arg!r}.'
        )
    family = families[0] if families else 'unet'
    config = FAMILY_RECIPES[family].get_config()
    config.dataset.name = 'shapes_fine'
    config.input.crop_size = (128, 128)
    # No rescaling: the 2 px gaps and bars are the detail being measured.
    config.input.scale_range = (1.0, 1.0)
    # The 1,000 training images decode to 260 MB: decoded once per sweep, not ten times per
    # run (the same batches; data/decoded_cache.py).
    config.input.cache_decoded = True
    config.batch_size = 8
    config.eval_batch_size = 20
    config.optimizer.learning_rate = LEARNING_RATES[family]
    if family == 'unet':
        # The U-Net paper's loss: the border weight map (w_c balancing the class
        # frequencies, w0 = 10, sigma = 5 px) on each crop.
        config.input.border_weights = True
    config.num_train_steps = STEPS[family]
    config.variant_train_steps = ml_collections.ConfigDict(VARIANT_STEPS[family])
    config.log_every_steps = 50
    # The U-Net runs are scored once, at the end; the FCN runs at a third and two thirds of
    # the budget as well, so that every FCN run's curve shows whether it has flattened.
    config.eval_every_steps = STEPS[family] // 3 if family == 'fcn' else STEPS[family]
    config.checkpoint_every_steps = STEPS[family]
    if 'runlocal' in parts:
        default.apply_runlocal(config)
        config.variant_train_steps = ml_collections.ConfigDict()
    return config
