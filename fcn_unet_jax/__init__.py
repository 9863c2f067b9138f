"""fcn_unet_jax: paper-faithful FCNs and U-Nets for semantic segmentation in JAX/Flax."""

__version__ = '0.1.0'
