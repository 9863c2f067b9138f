r"""FCN (VGG16) on PASCAL VOC (SBD train, seg11valid): the FCN paper's recipe, stage by stage.

Reproduces Long, Shelhamer, Darrell, Fully Convolutional Networks for Semantic Segmentation
(CVPR 2015 / PAMI 2016) and the reference code shelhamer/fcn.berkeleyvision.org. The
argument picks the stage, `--config=configs/fcn_voc.py:STAGE[,runlocal]`:

    stage      model               lr     init_from                    mean IU (seg11valid)
    32s        fcn32s_vgg16        1e-10  weights/vgg16_fcn            63.6
    16s        fcn16s_vgg16        1e-12  workdirs/fcn_voc_32s         65.0
    8s         fcn8s_vgg16         1e-14  workdirs/fcn_voc_16s         65.5
    8s_atonce  fcn8s_atonce_vgg16  1e-10  weights/vgg16_fcn8s_atonce   none of its own

The reported numbers are `config.reported.mean_iou` (`STAGES`), which
`experiments.replicate` compares runs with; a test keeps this table in step with `STAGES`.
The PAMI paper reports all-at-once training on par with the staged FCN-8s without a
separate number, so the table lists `8s_atonce` with that note instead of a delta.

Reference recipe (`voc-fcn*/solver.prototxt`, `solve.py`), the same for every stage but the
learning rate: SBD train (8,498 images, the FCN split) for training, seg11valid (736
images) for validation; SGD with momentum 0.99, batch 1, the loss summed over pixels (not
averaged: hence the tiny learning rates), learning rate x2 on biases, weight decay 5e-4 on
weights only, a constant ("fixed") schedule, 100,000 iterations, seg11valid scored every
4,000; final upsampler and the x2 upsamplers frozen at bilinear (the reference
`surgery.interp` + lr_mult 0); no augmentation. The reference feeds whole images (at most
500 x 500 in VOC); the pipeline needs a static training shape, so each image is padded
with the ignore label (255) to a 512 x 512 crop, which holds every VOC image whole and adds
no pixel to the loss.

Staging: 32s starts from the ImageNet VGG16, 16s from the 32s run's workdir, 8s from the
16s run's (arrays that match in path and shape are copied; the new score_pool4 /
score_pool3 layer keeps its zero init). 8s_atonce trains in one stage from ImageNet VGG16,
with pool4 scaled by 0.01 and pool3 by 0.0001 before scoring. Override `init_from` with
`--config.init_from=PATH`; `runlocal` (smoke run) clears it, so the run starts from scratch.

Convert torchvision's ImageNet VGG16 once for each starting model, then launch the stages
in order (each default workdir is where the next stage looks):

    python -m fcn_unet_jax.weights.convert --input=vgg16.pth --model=fcn32s_vgg16 \
        --output=weights/vgg16_fcn
    python -m fcn_unet_jax.main --config=configs/fcn_voc.py:32s --workdir=workdirs/fcn_voc_32s
    python -m fcn_unet_jax.main --config=configs/fcn_voc.py:16s --workdir=workdirs/fcn_voc_16s
    python -m fcn_unet_jax.main --config=configs/fcn_voc.py:8s --workdir=workdirs/fcn_voc_8s

    python -m fcn_unet_jax.weights.convert --input=vgg16.pth --model=fcn8s_atonce_vgg16 \
        --output=weights/vgg16_fcn8s_atonce
    python -m fcn_unet_jax.main --config=configs/fcn_voc.py:8s_atonce \
        --workdir=workdirs/fcn_voc_8s_atonce
"""

import dataclasses

import ml_collections

from configs import default

CONFIG_PATH = 'configs/fcn_voc.py'
# Default workdir of each stage's launch command; the next stage starts from it.
WORKDIR = 'workdirs/fcn_voc_{stage}'
NUM_TRAIN_STEPS = 100_000
VOC_CROP = (512, 512)  # >= 500, the largest side of a VOC image: whole images, ignore-padded.
PAPER = (
    'Long, Shelhamer, Darrell, Fully Convolutional Networks for Semantic Segmentation '
    '(CVPR 2015 / PAMI 2016) and shelhamer/fcn.berkeleyvision.org'
)


@dataclasses.dataclass(frozen=True)
class Stage:
    """What sets one stage apart in the reference code.

    Attributes:
      model: the model's name in fcn_unet_jax.models.
      learning_rate: the stage's solver.prototxt learning rate (loss summed over pixels).
      init_from: the converted ImageNet VGG16, or the previous stage's default workdir.
      title: the stage's name in the replication table.
      reference: the stage's folder in shelhamer/fcn.berkeleyvision.org.
      mean_iou: the mean IU the paper reports on seg11valid; None when it gives none.
    """

    model: str
    learning_rate: float
    init_from: str
    title: str
    reference: str
    mean_iou: float | None


STAGES = {
    '32s': Stage('fcn32s_vgg16', 1e-10, 'weights/vgg16_fcn', 'FCN-32s', 'voc-fcn32s', 63.6),
    '16s': Stage('fcn16s_vgg16', 1e-12, WORKDIR.format(stage='32s'), 'FCN-16s', 'voc-fcn16s', 65.0),
    '8s': Stage('fcn8s_vgg16', 1e-14, WORKDIR.format(stage='16s'), 'FCN-8s', 'voc-fcn8s', 65.5),
    '8s_atonce': Stage(
        'fcn8s_atonce_vgg16',
        1e-10,
        'weights/vgg16_fcn8s_atonce',
        'FCN-8s at-once',
        'voc-fcn8s-atonce',
        None,
    ),
}


def recipe(stage: str) -> ml_collections.ConfigDict:
    """The reference solver settings for `stage`'s model: no `init_from`, no reported number.

    configs/fcn8s_cityscapes.py builds on it too.

    Args:
      stage: a key of `STAGES`.

    Returns:
      The config.
    """
    config = default.get_config()
    config.dataset.name = 'voc_segmentation/sbd_fcn'
    config.dataset.train_split = 'train'
    config.dataset.eval_split = 'validation'
    config.model.name = STAGES[stage].model
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
    config.optimizer.learning_rate = STAGES[stage].learning_rate
    config.optimizer.schedule = 'constant'
    config.optimizer.momentum = 0.99
    config.optimizer.weight_decay = 5e-4
    config.optimizer.bias_lr_multiplier = 2.0
    config.optimizer.bias_weight_decay = False
    config.num_train_steps = NUM_TRAIN_STEPS
    config.log_every_steps = 100
    config.eval_every_steps = 4000  # The reference scores seg11valid every 4,000 iterations.
    config.checkpoint_every_steps = 4000
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the stage `arg` = `STAGE[,runlocal]`, STAGE a key of `STAGES`."""
    stage, runlocal = default.parse_arg(arg, CONFIG_PATH, list(STAGES))
    config = recipe(stage)
    config.init_from = STAGES[stage].init_from
    flag = caveat = ''
    if STAGES[stage].mean_iou is None:
        flag = 'no separate number: compare with staged FCN-8s'
        caveat = (
            'The PAMI paper reports all-at-once training of FCN-8s as on par with the staged '
            f'FCN-8s ({STAGES["8s"].mean_iou} mean IU on seg11valid); no separate at-once '
            'number is given here.'
        )
    default.set_reported(
        config,
        recipe=f'{CONFIG_PATH}:{stage}',
        title=STAGES[stage].title,
        split_label='seg11valid',
        metric='mean IU',
        mean_iou=STAGES[stage].mean_iou,
        source=f'{PAPER} (`{STAGES[stage].reference}/`)',
        flag=flag,
        caveat=caveat,
    )
    if runlocal:
        default.apply_runlocal(config)
        config.init_from = None
    return config
