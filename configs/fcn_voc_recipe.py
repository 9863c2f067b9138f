"""Shared recipe of the FCN-VGG16 PASCAL VOC configs (fcn32s/16s/8s/8s_atonce_voc.py).

Not an experiment itself: `get_config` here returns the reference solver settings of
shelhamer/fcn.berkeleyvision.org (`voc-fcn*/solver.prototxt`, `solve.py`) for one model,
and each `fcn*_voc.py` picks its model, learning rate and `init_from`. It loads like any
config (as FCN-32s) so that the config tests cover it too:

    python -m fcn_unet_jax.main --config=configs/fcn_voc_recipe.py --workdir=/tmp/x

Reference recipe: SBD train (8,498 images, the FCN split) for training, seg11valid (736
images) for validation; SGD with momentum 0.99, batch 1, the loss summed over pixels (not
averaged: hence the tiny learning rates), learning rate x2 on biases, weight decay 5e-4
on weights only, a constant ("fixed") schedule, 100,000 iterations; final upsampler and
the x2 upsamplers frozen at bilinear (the reference `surgery.interp` + lr_mult 0); no
augmentation. The reference feeds whole images (at most 500 x 500 in VOC); the pipeline
needs a static training shape, so each image is padded with the ignore label (255) to a
512 x 512 crop, which holds every VOC image whole and adds no pixel to the loss.
"""

import ml_collections

from configs import default

# Learning rates of the reference solver.prototxt files (loss summed over pixels).
LEARNING_RATES = {
    'fcn32s_vgg16': 1e-10,
    'fcn16s_vgg16': 1e-12,
    'fcn8s_vgg16': 1e-14,
    'fcn8s_atonce_vgg16': 1e-10,
}
NUM_TRAIN_STEPS = 100_000
VOC_CROP = (512, 512)  # >= 500, the largest side of a VOC image: whole images, ignore-padded.


def get_config(
    arg: str | None = None, model_name: str = 'fcn32s_vgg16'
) -> ml_collections.ConfigDict:
    """Returns the reference FCN VOC recipe for `model_name`.

    Args:
      arg: comma-separated options; `runlocal` shrinks the run to a smoke test.
      model_name: one of `LEARNING_RATES`.

    Returns:
      The config; `init_from` is left unset (each stage's config sets it).
    """
    config = default.get_config()
    config.dataset.name = 'voc_segmentation/sbd_fcn'
    config.dataset.train_split = 'train'
    config.dataset.eval_split = 'validation'
    config.model.name = model_name
    config.model.num_classes = 21
    config.model.learnable_upsampling = False
    config.input.crop_size = VOC_CROP
    config.input.scale_range = (1.0, 1.0)
    config.input.hflip = False
    config.input.normalization = 'fcn_bgr'
    config.batch_size = 1
    config.eval_batch_size = 1
    config.loss.normalization = 'sum'
    config.optimizer.name = 'sgd'
    config.optimizer.learning_rate = LEARNING_RATES[model_name]
    config.optimizer.schedule = 'constant'
    config.optimizer.momentum = 0.99
    config.optimizer.weight_decay = 5e-4
    config.optimizer.bias_lr_multiplier = 2.0
    config.optimizer.bias_weight_decay = False
    config.num_train_steps = NUM_TRAIN_STEPS
    config.log_every_steps = 100
    config.eval_every_steps = 4000  # The reference scores seg11valid every 4,000 iterations.
    config.checkpoint_every_steps = 4000
    if arg and 'runlocal' in arg.split(','):
        default.apply_runlocal(config)
    return config
