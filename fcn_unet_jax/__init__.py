"""fcn_unet_jax: paper-faithful FCNs and U-Nets for semantic segmentation in JAX/Flax."""

import sys

if sys.argv[:1] == ['-m']:
    # `python -m fcn_unet_jax.<program>` (Python sets argv[0] to '-m' while it imports the
    # program's packages): silence TensorFlow's banners before the program imports it.
    from fcn_unet_jax import console

    console.silence_native_logs()

__version__ = '0.1.0'
