r"""FCN-32s (VGG16) on PASCAL VOC (SBD train, seg11valid): the FCN paper's recipe.

Reproduces Long, Shelhamer, Darrell, Fully Convolutional Networks for Semantic Segmentation
(CVPR 2015 / PAMI 2016) and the reference code shelhamer/fcn.berkeleyvision.org
(`voc-fcn32s/`): mean IU 63.6 on seg11valid.
Recipe (configs/fcn_voc_recipe.py): SGD momentum 0.99, batch 1, summed loss, learning
rate 1e-10 (biases x2, no weight decay on biases, 5e-4 on weights), constant schedule,
100,000 iterations, frozen bilinear upsamplers, whole images padded with the ignore label
to 512 x 512.

`init_from` defaults to `weights/vgg16_fcn`, the ImageNet VGG16 converted once with

    python -m fcn_unet_jax.weights.convert --input=vgg16.pth --model=fcn32s_vgg16 \
        --output=weights/vgg16_fcn

(override with `--config.init_from=PATH`).
With `runlocal` (smoke run), `init_from` is cleared: the run starts from scratch.

    python -m fcn_unet_jax.main --config=configs/fcn32s_voc.py --workdir=workdirs/fcn32s_voc
"""

import ml_collections

from configs import fcn_voc_recipe

INIT_FROM = 'weights/vgg16_fcn'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg='runlocal'` shrinks it to a smoke run."""
    config = fcn_voc_recipe.get_config(arg, model_name='fcn32s_vgg16')
    runlocal = bool(arg) and 'runlocal' in arg.split(',')
    config.init_from = None if runlocal else INIT_FROM
    return config
