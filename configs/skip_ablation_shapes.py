r"""Base config of the skip-connection ablation (experiments/skip_ablation.py) on `shapes`.

Not a paper reproduction: the sweep varies `model.skip_strides` / `model.merge` around this
config to show, in minutes on a CPU, what the FCN paper (Table 2: FCN-32s 59.4 -> FCN-16s
62.4 -> FCN-8s 62.7 mean IU on seg11valid) and the U-Net paper motivate: fusing finer
encoder levels sharpens boundaries. The argument picks the family, `fcn` or `unet`
(default), plus the usual `runlocal`:

* `unet`: the classic U-Net (SAME padding, BatchNorm, no dropout) at 1/8 width.
* `fcn`: FCN-8s (VGG16) at 1/16 width with learnable x2 upsamplers, no dropout.

Both train from scratch with Adam (3e-3, cosine) for 300 steps on 64 px crops of the
`shapes/small` build (1,000 train / 100 validation images) and are evaluated on the whole
validation split.

    python -m experiments.skip_ablation --family=unet \
        --config=configs/skip_ablation_shapes.py:unet --seeds=0,1,2 --output=workdirs/ablation_unet
    python -m experiments.skip_ablation --family=fcn \
        --config=configs/skip_ablation_shapes.py:fcn --seeds=0,1,2 --output=workdirs/ablation_fcn
"""

import ml_collections

from configs import default, shapes_fcn8s, shapes_unet

# Each family's base recipe: the `make demo` config of that model.
FAMILY_RECIPES = {'unet': shapes_unet, 'fcn': shapes_fcn8s}


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
    # The demo recipes, shortened; the FCN uses the U-Net's 64 px build rather than the
    # demo's 128 px one, so that both families' sweeps take minutes.
    config = FAMILY_RECIPES[family].get_config()
    if family == 'fcn':
        config.dataset.name = 'shapes/small'
        config.input.crop_size = (64, 64)
        config.batch_size = 16
    config.num_train_steps = 300
    config.log_every_steps = 100
    config.eval_every_steps = 300
    config.checkpoint_every_steps = 300
    if 'runlocal' in parts:
        default.apply_runlocal(config)
    return config
