r"""The original U-Net (VALID padding, 572 -> 388 tiles) on ISBI-style `folder` data.

Reproduces Ronneberger, Fischer, Brox, U-Net: Convolutional Networks for Biomedical Image
Segmentation (MICCAI 2015): warping error 0.000353 on the ISBI 2012 EM segmentation
challenge (rand error 0.0382), and IoU 0.9203 on PhC-U373 and 0.7756 on DIC-HeLa (ISBI
cell tracking challenge 2015). Only the IoU numbers can be checked with this code base
(the warping and rand errors are computed by the challenge's server or its Fiji scripts),
and which one applies depends on the `folder` data, which the config does not name: so
`config.reported` gives no number, and the replication table lists a run of this recipe
with that caveat instead of a delta.

Recipe from the paper: unpadded convolutions, one large tile per batch (batch 1, 572 x 572
input, 388 x 388 output), SGD with momentum 0.99, dropout at the end of the contracting
path, the border weight map (w0 = 10, sigma = 5; `input.border_weights`), elastic
deformations (3 x 3 grid, 10 px std, bicubic; `input.elastic`), random flips, He init,
1 input channel (grayscale) and 2 classes (cell / membrane vs background). The paper does
not give the learning rate or the number of iterations: 0.01 on the pixel-averaged loss
and 20,000 iterations are our choices.

The data is the user's (`folder` layout: `images/` and `masks/` with 0/1 masks, see
fcn_unet_jax/data/builders/folder.py); ISBI 2012's 30 training slices must first be
exported from its TIFF stacks to single images:

    python -m fcn_unet_jax.main --config=configs/unet_paper.py --workdir=workdirs/unet_paper \
        --config.dataset.folder_root=/path/to/isbi2012
"""

import ml_collections

from configs import default

CONFIG_PATH = 'configs/unet_paper.py'
# The paper's IoUs on the ISBI cell tracking data sets; none is `config.reported.mean_iou`,
# since the config does not know which data the user's `folder` holds.
IOU_PHC_U373 = 0.9203
IOU_DIC_HELA = 0.7756
TILE = (572, 572)  # The paper's input tile; its 388 x 388 output is scored.
RUNLOCAL_TILE = (188, 188)  # The smallest valid VALID-U-Net input (output 4 x 4).


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg='runlocal'` shrinks it to a smoke run."""
    config = default.get_config()
    config.dataset.name = 'folder'
    config.model.name = 'unet'
    config.model.padding = 'VALID'
    config.model.batch_norm = False
    config.model.num_classes = 2
    config.model.input_channels = 1
    config.input.crop_size = TILE
    config.input.scale_range = (1.0, 1.0)
    config.input.hflip = True
    config.input.elastic = True
    config.input.border_weights = True
    config.input.normalization = 'unit'
    config.batch_size = 1
    config.eval_batch_size = 1
    config.optimizer.name = 'sgd'
    config.optimizer.learning_rate = 0.01
    config.optimizer.momentum = 0.99
    config.optimizer.schedule = 'constant'
    config.optimizer.weight_decay = 0.0
    config.num_train_steps = 20_000
    config.log_every_steps = 100
    config.eval_every_steps = 2000
    config.checkpoint_every_steps = 2000
    default.set_reported(
        config,
        recipe=CONFIG_PATH,
        title='U-Net (paper)',
        split_label='user folder data',
        metric='IoU',
        source='Ronneberger, Fischer, Brox, U-Net (MICCAI 2015)',
        flag='no comparable number',
        caveat=(
            f'The U-Net paper reports IoU {100 * IOU_PHC_U373:.2f} (PhC-U373) and '
            f'{100 * IOU_DIC_HELA:.2f} (DIC-HeLa) and warping error on ISBI 2012; which '
            'applies depends on the `folder` data, which the config does not name, so no '
            'delta is computed.'
        ),
        # The VALID U-Net is the paper's; a SAME one on the same data is another model.
        applies_to=default.REPORTED_APPLIES_TO + ('model.padding',),
    )
    if arg and 'runlocal' in arg.split(','):
        default.apply_runlocal(config)
        config.input.crop_size = RUNLOCAL_TILE
        config.batch_size = 1
        config.eval_batch_size = 1
    return config
