"""fcn_unet_jax: paper-faithful FCNs and U-Nets for semantic segmentation in JAX/Flax."""

import sys

if sys.argv[:1] == ['-m']:
    # `python -m fcn_unet_jax.<program>` (Python sets argv[0] to '-m' while it imports the
    # program's packages), before the program imports JAX or TensorFlow: restart it on
    # huge pages (`huge_pages.py`; nothing for a program of another package) and silence
    # TensorFlow's banners.
    from fcn_unet_jax import console, huge_pages

    huge_pages.restart_program_on_huge_pages()
    console.silence_native_logs()

__version__ = '0.1.0'
