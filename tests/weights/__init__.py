"""Tests of fcn_unet_jax/weights."""
