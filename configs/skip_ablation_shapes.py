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

Budgets (`STEPS`, and `VARIANT_STEPS` for a variant that flattens later) come from
learning curves (docs/replication.md lists them) and from the sweeps' time limit of about
an hour on 2 CPU cores for both families:

* U-Net, 400 steps: `full` gains 0.004 mean IoU from step 300 to 400 in a 400-step run
  (on plain cross-entropy; on the border map its 5 seeds end at the same 0.94).
  `none` trains 800 steps: in an 800-step run (seed 0, validation every 100 steps) it
  sits near 0.42 for 300 steps, jumps to 0.66 when it starts to predict stars and bars,
  and flattens from step 600 (0.688, 0.690, 0.693); a 400-step run ends 0.10 lower.
  `no_s1` has the full model's budget (its curve is not measured).
* FCN, 600 steps: every FCN run also evaluates at 200 and 400 steps. Over the 5 seeds,
  32s averages 0.329, 0.475 and 0.504 mean IoU at 200, 400 and 600 steps, 16s 0.518,
  0.526 and 0.544, 8s 0.583, 0.593 and 0.615: each still gains 0.02 to 0.03 over the last
  third as the cosine schedule anneals, so the FCN rows are lower bounds. A longer budget
  would take the two sweeps, already about 78 minutes of a busy 2-core CPU, further past
  the hour.

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
STEPS = {'unet': 400, 'fcn': 600}
VARIANT_STEPS = {'unet': {'none': 800}, 'fcn': {}}
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
    # The U-Net runs are scored once, at the end; the FCN runs also at 1/3 and 2/3 of the
    # budget, so that every run's learning curve shows whether it has flattened.
    config.eval_every_steps = STEPS[family] // 3 if family == 'fcn' else STEPS[family]
    config.checkpoint_every_steps = STEPS[family]
    if 'runlocal' in parts:
        default.apply_runlocal(config)
        config.variant_train_steps = ml_collections.ConfigDict()
    return config
