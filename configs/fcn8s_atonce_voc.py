r"""FCN-8s at-once (VGG16) on PASCAL VOC (SBD train, seg11valid): the FCN paper's recipe.

Reproduces Long, Shelhamer, Darrell, Fully Convolutional Networks for Semantic Segmentation
(CVPR 2015 / PAMI 2016) and the reference code shelhamer/fcn.berkeleyvision.org
(`voc-fcn8s-atonce/`): the PAMI paper reports all-at-once training on par with the staged
FCN-8s (65.5 mean IU on seg11valid) without a separate number, so `experiments.replicate`
lists this recipe with that note instead of a delta.
Recipe (configs/fcn_voc_recipe.py): SGD momentum 0.99, batch 1, summed loss, learning
rate 1e-10 (biases x2, no weight decay on biases, 5e-4 on weights), constant schedule,
100,000 iterations, frozen bilinear upsamplers, whole images padded with the ignore label
to 512 x 512.

Trained in one stage from ImageNet VGG16 (pool4 scaled by 0.01 and pool3 by 0.0001 before
scoring): `init_from` defaults to `weights/vgg16_fcn8s_atonce`, converted once with

    python -m fcn_unet_jax.weights.convert --input=vgg16.pth --model=fcn8s_atonce_vgg16 \
        --output=weights/vgg16_fcn8s_atonce

(override with `--config.init_from=PATH`).
With `runlocal` (smoke run), `init_from` is cleared: the run starts from scratch.

    python -m fcn_unet_jax.main --config=configs/fcn8s_atonce_voc.py \
        --workdir=workdirs/fcn8s_atonce_voc
"""

import ml_collections

from configs import fcn_voc_recipe

INIT_FROM = 'weights/vgg16_fcn8s_atonce'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg='runlocal'` shrinks it to a smoke run."""
    config = fcn_voc_recipe.get_config(arg, model_name='fcn8s_atonce_vgg16')
    runlocal = bool(arg) and 'runlocal' in arg.split(',')
    config.init_from = None if runlocal else INIT_FROM
    return config
