"""FCN-8s (VGG16) on PASCAL VOC (SBD train, seg11valid): the FCN paper's recipe.

Reproduces Long, Shelhamer, Darrell, Fully Convolutional Networks for Semantic Segmentation
(CVPR 2015 / PAMI 2016) and the reference code shelhamer/fcn.berkeleyvision.org
(`voc-fcn8s/`): mean IU 65.5 on seg11valid.
Recipe (configs/fcn_voc_recipe.py): SGD momentum 0.99, batch 1, summed loss, learning
rate 1e-14 (biases x2, no weight decay on biases, 5e-4 on weights), constant schedule,
100,000 iterations, frozen bilinear upsamplers, whole images padded with the ignore label
to 512 x 512.

Stage 3 of 3: `init_from` defaults to `workdirs/fcn16s_voc`, the workdir of the FCN-16s run
launched as in configs/fcn16s_voc.py (override with `--config.init_from=DIR`); arrays that
match in path and shape are copied, the new score_pool3 layer keeps its zero init.
With `runlocal` (smoke run), `init_from` is cleared: the run starts from scratch.

    python -m fcn_unet_jax.main --config=configs/fcn8s_voc.py --workdir=workdirs/fcn8s_voc
"""

import ml_collections

from configs import fcn_voc_recipe

INIT_FROM = 'workdirs/fcn16s_voc'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg='runlocal'` shrinks it to a smoke run."""
    config = fcn_voc_recipe.get_config(arg, model_name='fcn8s_vgg16')
    runlocal = bool(arg) and 'runlocal' in arg.split(',')
    config.init_from = None if runlocal else INIT_FROM
    return config
