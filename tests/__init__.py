"""Tests of the fcn_unet_jax package, laid out like it."""
