"""Launch scripts that produce the project's tables, plots and demos."""

import sys

if sys.argv[:1] == ['-m']:
    # `python -m experiments.<script>`: restarted on huge pages and TensorFlow's banners
    # silenced, as for the programs of fcn_unet_jax (see fcn_unet_jax/__init__.py).
    from fcn_unet_jax import console, huge_pages

    huge_pages.restart_program_on_huge_pages()
    console.silence_native_logs()
