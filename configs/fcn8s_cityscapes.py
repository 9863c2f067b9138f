r"""FCN-8s (VGG16) on Cityscapes fine (19 train ids), trained at once from ImageNet VGG16.

Reproduces the FCN-8s baseline of Cordts et al., The Cityscapes Dataset for Semantic Urban
Scene Understanding (CVPR 2016), Table 4: 65.3 class IoU on the Cityscapes test set
(`config.reported`, from `CLASS_IOU`; a test keeps this sentence in step). The paper trains
on the fine train + val annotations; this config trains on `train`, 2,975 images, and
reports IoU on `validation`, 500 images, as is usual for a baseline (the replication table
flags the difference).

The FCN reference code has no Cityscapes solver, so the recipe is the all-at-once FCN-8s
VOC recipe (configs/fcn_voc.py, `recipe('8s_atonce')`: SGD momentum 0.99, batch 1, summed
loss, lr 1e-10, biases x2 without weight decay, weight decay 5e-4, constant schedule,
frozen bilinear upsamplers) on the at-once model (pool4 x 0.01, pool3 x 0.0001 before
scoring), with random 1024 x 1024 crops of the 1024 x 2048 images and horizontal flips, and
whole-image evaluation. 100,000 iterations are about 34 epochs of the train split.

`init_from` defaults to `weights/vgg16_fcn8s_atonce`, the at-once stage's (see
configs/fcn_voc.py for the conversion command; override with `--config.init_from=PATH`;
cleared by `runlocal`).

    python -m fcn_unet_jax.main --config=configs/fcn8s_cityscapes.py \
        --workdir=workdirs/fcn8s_cityscapes
"""

import ml_collections

from configs import default, fcn_voc

CONFIG_PATH = 'configs/fcn8s_cityscapes.py'
CLASS_IOU = 65.3  # Cordts et al., Table 4: FCN-8s on the Cityscapes test set.


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg='runlocal'` shrinks it to a smoke run."""
    config = fcn_voc.recipe('8s_atonce')
    config.dataset.name = 'cityscapes_trainids'
    config.model.num_classes = 19
    config.input.crop_size = (1024, 1024)
    config.input.hflip = True
    config.input.eval_pad_size = (1024, 2048)
    config.init_from = fcn_voc.STAGES['8s_atonce'].init_from
    default.set_reported(
        config,
        recipe=CONFIG_PATH,
        title='FCN-8s Cityscapes',
        split_label='Cityscapes val',
        metric='class IoU',
        mean_iou=CLASS_IOU,
        source='Cordts et al., The Cityscapes Dataset for Semantic Urban Scene Understanding '
        '(CVPR 2016), Table 4',
        flag='paper: test set',
        caveat=(
            f'Cordts et al. report {CLASS_IOU} class IoU on the Cityscapes test set, trained '
            'on the fine train + val annotations; the recipe trains on train and scores '
            'validation.'
        ),
    )
    if arg and 'runlocal' in arg.split(','):
        default.apply_runlocal(config)
        config.init_from = None
    return config
