r"""torchvision FCN-ResNet50 (dilated, output stride 8, aux head) on PASCAL VOC train_aug.

Follows torchvision's segmentation reference recipe (references/segmentation/train.py, the
recipe behind `fcn_resnet50`): SGD momentum 0.9, poly schedule from 0.02 with power
0.9, weight decay 1e-4, global batch 32, 30 epochs, auxiliary FCNHead on layer3 with loss
weight 0.5, ImageNet-pretrained backbone. Augmentation: torchvision resizes the shorter
side to a random size in [260, 1040] (0.5x to 2x its base size 520), flips and crops 480;
here the equivalent is a random rescale by 0.5 to 2.0, flip, and a 480 x 480 crop padded
with the ignore label. Data: `voc_segmentation/train_aug` (VOC 2012 train + SBD, 10,582
images), evaluated on VOC 2012 val (1,449). 30 epochs = 30 x floor(10,582 / 32) = 9,900
steps.

Numbers torchvision reports for its `FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1`:
mean IoU 60.5, pixel accuracy 91.4. Those are NOT VOC results: that model is trained on the
subset of COCO train2017 that contains the 20 VOC categories (others mapped to
background) and scored on the same subset of COCO val2017. On VOC 2012 val, this recipe
has no published number to match; treat 60.5 as a sanity reference only.

`init_from` defaults to `weights/fcn_resnet50_imagenet`, torchvision's ImageNet ResNet-50
converted once with

    python -m fcn_unet_jax.weights.convert --input=resnet50.pth --model=fcn_resnet50 \
        --output=weights/fcn_resnet50_imagenet

(override with `--config.init_from=PATH`; cleared by `runlocal`).

    python -m fcn_unet_jax.main --config=configs/fcn_resnet50_voc.py \
        --workdir=workdirs/fcn_resnet50_voc
"""

import ml_collections

from configs import default

TRAIN_AUG_IMAGES = 10_582
EPOCHS = 30
INIT_FROM = 'weights/fcn_resnet50_imagenet'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg='runlocal'` shrinks it to a smoke run."""
    config = default.get_config()
    config.dataset.name = 'voc_segmentation/train_aug'
    config.model.name = 'fcn_resnet50'
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
    config.init_from = INIT_FROM
    if arg and 'runlocal' in arg.split(','):
        default.apply_runlocal(config)
        config.init_from = None
    return config
