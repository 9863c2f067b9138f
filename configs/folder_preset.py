r"""Presets for training on your own data (`folder` dataset): 4 models x 2 crop sizes.

Not a paper reproduction: sensible starting recipes for a user's images and masks (layout
in fcn_unet_jax/data/builders/folder.py). The argument string picks the preset,
`MODEL,SIZE[,runlocal]`:

* MODEL: `fcn_resnet50`, `fcn_resnet101` (torchvision FCN: dilated ResNet, aux head) or
  `unet_resnet50`, `unet_vgg16` (U-Net decoder on an ImageNet encoder).
* SIZE: `320` (global batch 16) or `640` (global batch 8): the side of the square
  training crops, taken after a random rescale by 0.5 to 2.0 and padded with the ignore
  label where the image is smaller.

Recipes. FCN-ResNet: torchvision's segmentation recipe (SGD momentum 0.9, poly schedule,
power 0.9, weight decay 1e-4, aux loss weight 0.5), its learning rate 0.02 at batch 32
scaled linearly with the batch. U-Net: AdamW 3e-4 with 500 warm-up steps and a cosine
schedule, weight decay 1e-4, cross-entropy + Dice loss (robust to small foreground
classes). All: 10,000 steps, ImageNet mean/std, whole-image evaluation.

`config.dataset.folder_root` must be given. `config.model.num_classes` is left unset: the
run takes the class count from the dataset (the lines of classes.txt, or the labels found);
a count given with `--config.model.num_classes=N` must agree with it. `init_from` defaults
to `weights/MODEL_imagenet`, the ImageNet encoder (torchvision's `resnet50.pth` /
`resnet101.pth` / `vgg16.pth`) converted once for that model (a converted checkpoint only
loads into the model it was made for), relative to the working directory:

    fcn-unet download-weights unet_resnet50_imagenet --dir=weights
    fcn-unet convert-weights --input=resnet50-0676ba61.pth --model=unet_resnet50 \
        --output=weights/unet_resnet50_imagenet

(the first downloads torchvision's file and converts it; the second converts a file you
have). Override it with `--config.init_from=PATH`; `--config.init_from=None` and
`runlocal` train from scratch.

Launch:

    fcn-unet train --config=folder_preset:unet_resnet50,640 \
        --workdir=workdirs/my_data_unet_resnet50_640 --config.dataset.folder_root=/path/to/data
"""

import ml_collections

from configs import default

MODELS = ('fcn_resnet50', 'fcn_resnet101', 'unet_resnet50', 'unet_vgg16')
BATCH_SIZES = {320: 16, 640: 8}  # Global batch per crop side: about the same memory.


def parse_arg(arg: str | None) -> tuple[str, int, bool]:
    """Splits `MODEL,SIZE[,runlocal]` into (model, size, runlocal).

    Raises:
      ValueError: naming the valid presets, for a missing or unknown model or size.
    """
    parts = arg.split(',') if arg else []
    runlocal = 'runlocal' in parts
    parts = [p for p in parts if p != 'runlocal']
    if len(parts) != 2 or parts[0] not in MODELS or not parts[1].isdigit():
        raise ValueError(
            f'configs/folder_preset.py needs the argument MODEL,SIZE[,runlocal] with MODEL in '
            f'{sorted(MODELS)} and SIZE in {sorted(BATCH_SIZES)}, got {arg!r}; e.g. '
            '--config=configs/folder_preset.py:unet_resnet50,640'
        )
    size = int(parts[1])
    if size not in BATCH_SIZES:
        raise ValueError(f'SIZE must be one of {sorted(BATCH_SIZES)}, got {size}.')
    return parts[0], size, runlocal


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the preset `arg` = `MODEL,SIZE[,runlocal]` (see the module docstring)."""
    model_name, size, runlocal = parse_arg(arg)
    config = default.get_config()
    config.dataset.name = 'folder'
    config.model.name = model_name
    # From the dataset's classes (train.resolve_config), unless given.
    config.model.num_classes = ml_collections.config_dict.placeholder(int)
    config.input.crop_size = (size, size)
    config.input.scale_range = (0.5, 2.0)
    config.input.hflip = True
    config.input.normalization = 'imagenet'
    config.batch_size = BATCH_SIZES[size]
    config.eval_batch_size = BATCH_SIZES[size]
    if model_name.startswith('fcn_'):
        config.model.aux_head = True
        config.loss.aux_weight = 0.5
        config.optimizer.name = 'sgd'
        config.optimizer.momentum = 0.9
        config.optimizer.learning_rate = 0.02 * config.batch_size / 32
        config.optimizer.schedule = 'poly'
        config.optimizer.poly_power = 0.9
    else:
        config.loss.name = 'cross_entropy+dice'
        config.optimizer.name = 'adamw'
        config.optimizer.learning_rate = 3e-4
        config.optimizer.warmup_steps = 500
        config.optimizer.schedule = 'cosine'
    config.optimizer.weight_decay = 1e-4
    config.num_train_steps = 10_000
    config.log_every_steps = 50
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000
    config.init_from = f'weights/{model_name}_imagenet'
    if runlocal:
        default.apply_runlocal(config)
        config.init_from = None
        config.optimizer.warmup_steps = 0
    return config
