r"""torchvision FCN-ResNet (dilated, output stride 8, aux head) on PASCAL VOC train_aug.

The argument picks the encoder's depth, `--config=configs/fcn_resnet_voc.py:DEPTH[,runlocal]`
with DEPTH `50` (FCN-ResNet50) or `101` (FCN-ResNet101); the recipe is the same.

Follows torchvision's segmentation reference recipe (references/segmentation/train.py, the
recipe behind `fcn_resnet50` / `fcn_resnet101`): SGD momentum 0.9, poly schedule from 0.02
with power 0.9, weight decay 1e-4, global batch 32, 30 epochs, auxiliary FCNHead on layer3
with loss weight 0.5, ImageNet-pretrained backbone. Augmentation: torchvision resizes the
shorter side to a random size in [260, 1040] (0.5x to 2x its base size 520), flips and
crops 480; here the equivalent is a random rescale by 0.5 to 2.0, flip, and a 480 x 480
crop padded with the ignore label. Data: `voc_segmentation/train_aug` (VOC 2012 train +
SBD, 10,582 images), evaluated on VOC 2012 val (1,449). 30 epochs = 30 x floor(10,582 /
32) = 9,900 steps.

Numbers torchvision reports for its `COCO_WITH_VOC_LABELS_V1` weights (`config.reported`,
from `DEPTHS`; a test keeps this list in step):

    50   FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1   mean IoU 60.5, pixel accuracy 91.4
    101  FCN_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1  mean IoU 63.7, pixel accuracy 91.9

Those are NOT VOC results: those models are trained on the subset of COCO train2017 that
contains the 20 VOC categories (others mapped to background) and scored on the same subset
of COCO val2017. On VOC 2012 val, this recipe has no published number to match; treat them
as a sanity reference only (the replication table flags them).

`init_from` defaults to `weights/fcn_resnet{50,101}_imagenet`, torchvision's ImageNet
ResNet converted once (override with `--config.init_from=PATH`; cleared by `runlocal`):

    python -m fcn_unet_jax.weights.convert --input=resnet50.pth --model=fcn_resnet50 \
        --output=weights/fcn_resnet50_imagenet
    python -m fcn_unet_jax.main --config=configs/fcn_resnet_voc.py:50 \
        --workdir=workdirs/fcn_resnet_voc_50

    python -m fcn_unet_jax.weights.convert --input=resnet101.pth --model=fcn_resnet101 \
        --output=weights/fcn_resnet101_imagenet
    python -m fcn_unet_jax.main --config=configs/fcn_resnet_voc.py:101 \
        --workdir=workdirs/fcn_resnet_voc_101
"""

import dataclasses

import ml_collections

from configs import default

CONFIG_PATH = 'configs/fcn_resnet_voc.py'
TRAIN_AUG_IMAGES = 10_582
EPOCHS = 30


@dataclasses.dataclass(frozen=True)
class Depth:
    """One encoder depth: its model and the numbers torchvision reports for it.

    Attributes:
      model: the model's name in fcn_unet_jax.models.
      init_from: torchvision's ImageNet ResNet, converted for `model`.
      weights: torchvision's name of its COCO-with-VOC-labels weights.
      mean_iou: the mean IoU torchvision reports for them (COCO subset), in percent.
      pixel_accuracy: the pixel accuracy torchvision reports for them, in percent.
    """

    model: str
    init_from: str
    weights: str
    mean_iou: float
    pixel_accuracy: float


DEPTHS = {
    '50': Depth(
        'fcn_resnet50',
        'weights/fcn_resnet50_imagenet',
        'FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1',
        60.5,
        91.4,
    ),
    '101': Depth(
        'fcn_resnet101',
        'weights/fcn_resnet101_imagenet',
        'FCN_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1',
        63.7,
        91.9,
    ),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the depth `arg` = `DEPTH[,runlocal]`, DEPTH a key of `DEPTHS`."""
    depth, runlocal = default.parse_arg(arg, CONFIG_PATH, list(DEPTHS))
    config = default.get_config()
    config.dataset.name = 'voc_segmentation/train_aug'
    config.model.name = DEPTHS[depth].model
    config.model.num_classes = 21
    config.model.aux_head = True
    config.input.crop_size = (480, 480)
    config.input.scale_range = (0.5, 2.0)
    config.input.hflip = True
    config.input.normalization = 'imagenet'
    config.batch_size = 32
    config.eval_batch_size = 8
    config.loss.aux_weight = 0.5
    config.optimizer.name = 'sgd'
    config.optimizer.learning_rate = 0.02
    config.optimizer.schedule = 'poly'
    config.optimizer.poly_power = 0.9
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    config.num_train_steps = EPOCHS * (TRAIN_AUG_IMAGES // 32)
    config.log_every_steps = 50
    config.eval_every_steps = 990  # Every 3 epochs.
    config.checkpoint_every_steps = 330  # Every epoch.
    config.init_from = DEPTHS[depth].init_from
    default.set_reported(
        config,
        recipe=f'{CONFIG_PATH}:{depth}',
        title=f'torchvision FCN-ResNet{depth}',
        split_label='VOC 2012 val',
        metric='mean IoU',
        mean_iou=DEPTHS[depth].mean_iou,
        pixel_accuracy=DEPTHS[depth].pixel_accuracy,
        source=f'torchvision `{DEPTHS[depth].weights}`',
        flag='not comparable: COCO subset',
        caveat=(
            f'torchvision reports {DEPTHS[depth].mean_iou} mean IoU for its '
            f'`{DEPTHS[depth].weights}` weights, trained and scored on the subset of COCO '
            'train2017 / val2017 with the 20 VOC categories (others mapped to background), '
            'not on VOC 2012 val; this recipe has no published VOC number, so the delta is '
            f'a sanity reference only (see {CONFIG_PATH}).'
        ),
    )
    if runlocal:
        default.apply_runlocal(config)
        config.init_from = None
    return config
