"""Tests of palette colouring and overlays."""

import numpy as np
from PIL import Image

from fcn_unet_jax import visualize

PALETTE = [(0, 0, 0), (255, 0, 0), (0, 0, 255)]


def test_colorize_uses_palette_and_ignore_color():
    label = np.array([[0, 1], [2, 255]])
    rgb = visualize.colorize(label, PALETTE)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    np.testing.assert_array_equal(rgb[0, 1], [255, 0, 0])
    np.testing.assert_array_equal(rgb[1, 0], [0, 0, 255])
    np.testing.assert_array_equal(rgb[1, 1], visualize.IGNORE_COLOR)


def test_overlay_blends_and_keeps_ignored_pixels():
    image = np.full((1, 2, 3), 100, np.uint8)
    out = visualize.overlay(image, np.array([[1, 255]]), PALETTE, alpha=0.5)
    np.testing.assert_array_equal(out[0, 0], [178, 50, 50])  # (100 + 255) / 2 rounds up.
    np.testing.assert_array_equal(out[0, 1], [100, 100, 100])


def test_grey_image_and_panel_and_png(tmp_path):
    image = np.zeros((4, 5), np.uint8)
    label = np.ones((4, 5), np.int32)
    panel = visualize.comparison_panel(image, label, label * 2, PALETTE, gap=2)
    assert panel.shape == (4, 3 * 5 + 2 * 2, 3)
    path = tmp_path / 'sub' / 'panel.png'
    visualize.save_png(path, panel)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), panel)
