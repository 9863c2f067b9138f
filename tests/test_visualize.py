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


NAMES = ['background', 'circle', 'square']


def test_default_palette_is_vocs_colour_map():
    palette = visualize.default_palette(21)
    assert palette.shape == (21, 3) and len({tuple(c) for c in palette}) == 21
    np.testing.assert_array_equal(palette[:3], [(0, 0, 0), (128, 0, 0), (0, 128, 0)])
    np.testing.assert_array_equal(palette[15], (192, 128, 128))  # VOC's 'person'.


def test_legend_draws_a_swatch_per_listed_class_and_wraps():
    palette = [(10, 20, 30), (200, 0, 0), (0, 0, 250)]
    strip = visualize.legend(NAMES, palette, 400)
    for colour in palette:
        assert np.all(strip == colour, axis=-1).sum() >= 8 * 8, colour
    only_square = visualize.legend(NAMES, palette, 400, classes=[2])
    assert not np.all(only_square == palette[1], axis=-1).any()
    narrow = visualize.legend(NAMES, palette, 60)
    assert narrow.shape[1] == 60 and narrow.shape[0] > 2 * strip.shape[0]  # One row each.


def test_with_legend_keeps_the_picture_on_top():
    picture = np.full((10, 200, 3), 7, np.uint8)
    out = visualize.with_legend(picture, NAMES, PALETTE, classes=[1])
    assert out.shape[1] == 200 and out.shape[0] > 10
    np.testing.assert_array_equal(out[:10], picture)
    assert np.all(out[10:] == (255, 0, 0), axis=-1).any()


def test_evaluation_panels_denormalise_enlarge_and_title():
    mean, std = (100.0, 110.0, 120.0), (50.0, 50.0, 50.0)
    pixels = np.array([[[150, 60, 120]]], np.float32)  # One RGB pixel.
    images = np.broadcast_to((pixels - mean) / std, (2, 8, 8, 3))
    labels = np.zeros((2, 8, 8), np.int32)
    labels[:, :, :4] = 255
    predictions = np.full((2, 8, 8), 2, np.int32)
    panels = visualize.evaluation_panels(
        images, labels, predictions, NAMES, mean, std, palette=PALETTE, min_height=32
    )
    assert panels.dtype == np.uint8 and panels.shape[0] == 2
    assert panels.shape[2] == 3 * 32 + 2 * 4  # 8 px tiles enlarged 4 times, two gaps.
    header = visualize.FONT_SIZE + 8
    tile = panels[0, header : header + 32]
    np.testing.assert_array_equal(tile[5, 5], [150, 60, 120])  # The image, denormalised.
    np.testing.assert_array_equal(tile[5, 36 + 5], [150, 60, 120])  # Ignored: unblended.
    np.testing.assert_array_equal(tile[5, 36 + 30], [75, 30, 60])  # Background (black) at 0.5.
    np.testing.assert_array_equal(tile[5, 72 + 5], [75, 30, 188])  # Square (blue) at 0.5.
    assert (panels[0, :header] < 128).any()  # Titles are drawn.
    bgr = visualize.evaluation_panels(
        images[..., ::-1], labels, predictions, NAMES, mean[::-1], std, bgr=True, min_height=32
    )
    np.testing.assert_array_equal(bgr[0, header + 5, 5], [150, 60, 120])
    grey = visualize.evaluation_panels(
        np.zeros((1, 8, 8, 1)), labels[:1], predictions[:1], NAMES, 120.0, 60.0, min_height=8
    )
    assert grey.shape[2] == 3 * 8 + 2 * 4  # Not enlarged.
    np.testing.assert_array_equal(grey[0, header + 1, 1], [120, 120, 120])


def test_normalized_confusion_rows_sum_to_one_and_absent_rows_are_nan():
    confusion = np.array([[8, 2, 0], [0, 5, 5], [0, 0, 0]])
    normalized = visualize.normalized_confusion(confusion)
    np.testing.assert_allclose(normalized[:2], [[0.8, 0.2, 0.0], [0.0, 0.5, 0.5]])
    assert np.isnan(normalized[2]).all()


def test_confusion_matrix_image_shades_cells_by_row_share():
    darkest = np.array([8, 48, 107])  # 'Blues' at 1.0.

    def dark_pixels(confusion):
        image = visualize.confusion_matrix_image(np.asarray(confusion), NAMES)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        return (np.abs(image.astype(int) - darkest).sum(-1) < 30).sum()

    perfect = dark_pixels(np.eye(3) * 100)
    confused = dark_pixels(np.full((3, 3), 10))
    assert perfect > confused + 3 * 400  # Three full cells of at least 20 x 20 px.
