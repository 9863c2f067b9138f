"""Small FCN-8s (VGG16) on the synthetic `shapes` dataset (128 x 128 build): the demo FCN.

Not the paper's recipe: the paper fine-tunes an ImageNet VGG16 with SGD (momentum 0.99,
lr 1e-10 on the unnormalised loss), which does not train a network from scratch in a few
minutes. Here FCN-8s keeps its architecture (conv1_1 padding 100, fc6/fc7 as convs,
zero-initialised score layers, bilinear-initialised transposed convs, final upsampler
frozen, crops 5/9/31) at 1/16 of the VGG widths (4-8-16-32-32, fc 256), without dropout,
with learnable intermediate upsamplers, trained from scratch with Adam on whole 128 px
images. It uses the 128 px build rather than the U-Net's 64 px one: its stride-8 scores,
upsampled by the frozen bilinear kernel, blur the boundaries of small shapes (mean IoU
0.84 after 1,000 steps on the 64 px build). Thanks to the 100 px padding, 128 px inputs
cost only about 1.5x the compute of 64 px ones.

Measured with `make demo` on a 2-core CPU (about 4.8 steps/s): mean IoU 0.898 at step 600
of the 1,200, 0.919 at the end (about 4.5 minutes).

    python -m fcn_unet_jax.main --config=configs/shapes_fcn8s.py --workdir=/tmp/shapes_fcn8s
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg='runlocal'` shrinks it to a smoke run."""
    config = default.get_config()
    config.dataset.name = 'shapes'
    config.model.name = 'fcn8s_vgg16'
    config.model.width = 0.0625
    config.model.dropout_rate = 0.0
    config.model.learnable_upsampling = True
    config.input.crop_size = (128, 128)
    config.input.scale_range = (0.75, 1.25)
    config.batch_size = 8
    config.eval_batch_size = 20
    config.optimizer.name = 'adam'
    config.optimizer.learning_rate = 3e-3
    config.optimizer.schedule = 'cosine'
    config.optimizer.weight_decay = 0.0
    config.num_train_steps = 1200
    config.log_every_steps = 50
    config.eval_every_steps = 600
    config.checkpoint_every_steps = 600
    if arg and 'runlocal' in arg.split(','):
        default.apply_runlocal(config)
    return config
