r"""torchvision FCN-ResNet101 (dilated, output stride 8, aux head) on PASCAL VOC train_aug.

The same torchvision reference recipe as `fcn_resnet50_voc.py` (SGD momentum 0.9, poly lr
0.02, wd 1e-4, global batch 32, crop 480, random rescale 0.5-2.0, aux loss 0.5, 30 epochs
= 9,900 steps on `voc_segmentation/train_aug`), on ResNet-101.

Numbers torchvision reports for its `FCN_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1`:
mean IoU 63.7, pixel accuracy 91.9. Those are NOT VOC results: that model is trained on the
subset of COCO train2017 that contains the 20 VOC categories (others mapped to
background) and scored on the same subset of COCO val2017. On VOC 2012 val, this recipe
has no published number to match; treat 63.7 as a sanity reference only.

`init_from` defaults to `weights/fcn_resnet101_imagenet`, torchvision's ImageNet ResNet-101
converted once with

    python -m fcn_unet_jax.weights.convert --input=resnet101.pth --model=fcn_resnet101 \
        --output=weights/fcn_resnet101_imagenet

(override with `--config.init_from=PATH`; cleared by `runlocal`).

    python -m fcn_unet_jax.main --config=configs/fcn_resnet101_voc.py \
        --workdir=workdirs/fcn_resnet101_voc
"""

import ml_collections

from configs import fcn_resnet50_voc

INIT_FROM = 'weights/fcn_resnet101_imagenet'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg='runlocal'` shrinks it to a smoke run."""
    config = fcn_resnet50_voc.get_config(arg)
    config.model.name = 'fcn_resnet101'
    if config.init_from is not None:  # None after runlocal.
        config.init_from = INIT_FROM
    return config
