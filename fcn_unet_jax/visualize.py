"""Pictures of segmentations: coloured label maps, overlays, legends, panels, confusion.

Pure NumPy and Pillow (matplotlib for the confusion matrix), so the training loop, the demo
and the prediction CLI share it without touching JAX. Label maps are integer [H, W] arrays;
pixels equal to `ignore_label` (or with no palette entry) are drawn in `ignore_color` and
left unblended in overlays. Every picture is a uint8 RGB array, ready for `save_png` or a
TensorBoard image summary:

  * `with_legend(picture, class_names, palette)`: a strip of colour swatches and class
    names under a picture (`legend` renders the strip alone);
  * `evaluation_panels(images, labels, predictions, class_names, mean, std)`: one
    image | ground truth | prediction panel per example of a normalised batch, with legend;
  * `confusion_matrix_image(confusion, class_names)`: the row-normalised confusion matrix.
"""

import os
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IGNORE_COLOR = (255, 255, 255)
# Legend and title text: Pillow's built-in font, so no font file has to be installed.
FONT_SIZE = 12
_PAD = 4


def colorize(
    label: np.ndarray,
    palette: np.ndarray | Sequence[Sequence[int]],
    *,
    ignore_label: int = 255,
    ignore_color: Sequence[int] = IGNORE_COLOR,
) -> np.ndarray:
    """RGB rendering of a label map.

    Args:
      label: integer [H, W] class indices.
      palette: [num_classes, 3] uint8 colours.
      ignore_label: label drawn in `ignore_color`.
      ignore_color: RGB colour of ignored (and out-of-palette) pixels.

    Returns:
      uint8 [H, W, 3].
    """
    palette = np.asarray(palette, np.uint8).reshape(-1, 3)
    label = np.asarray(label)
    known = (label >= 0) & (label < len(palette)) & (label != ignore_label)
    rgb = palette[np.where(known, label, 0)]
    rgb[~known] = np.asarray(ignore_color, np.uint8)
    return rgb


def overlay(
    image: np.ndarray,
    label: np.ndarray,
    palette: np.ndarray | Sequence[Sequence[int]],
    *,
    alpha: float = 0.5,
    ignore_label: int = 255,
) -> np.ndarray:
    """Blends the coloured `label` over `image`; ignored pixels show the image unchanged.

    Args:
      image: uint8 [H, W, 3] (or [H, W] / [H, W, 1] grey, broadcast to RGB).
      label: integer [H, W] class indices.
      palette: [num_classes, 3] uint8 colours.
      alpha: opacity of the label colours.
      ignore_label: label left unblended.

    Returns:
      uint8 [H, W, 3].
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    image = np.broadcast_to(image, (*image.shape[:2], 3)).astype(np.float32)
    colours = colorize(label, palette, ignore_label=ignore_label).astype(np.float32)
    blended = (1 - alpha) * image + alpha * colours
    blended = np.where((np.asarray(label) == ignore_label)[..., None], image, blended)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def comparison_panel(
    image: np.ndarray,
    ground_truth: np.ndarray,
    prediction: np.ndarray,
    palette: np.ndarray | Sequence[Sequence[int]],
    *,
    ignore_label: int = 255,
    gap: int = 4,
) -> np.ndarray:
    """Image | ground-truth overlay | prediction overlay, side by side with white gaps.

    Returns:
      uint8 [H, 3 W + 2 gap, 3].
    """
    rgb = overlay(
        image, np.full_like(ground_truth, ignore_label), palette, ignore_label=ignore_label
    )
    tiles = [
        rgb,
        overlay(image, ground_truth, palette, ignore_label=ignore_label),
        overlay(image, prediction, palette, ignore_label=ignore_label),
    ]
    spacer = np.full((rgb.shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([tiles[0], spacer, tiles[1], spacer, tiles[2]], axis=1)


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Writes a uint8 RGB (or label) array as PNG, creating the parent folder."""
    os.makedirs(os.path.dirname(os.fspath(path)) or '.', exist_ok=True)
    Image.fromarray(np.asarray(rgb, np.uint8)).save(path)


def default_palette(num_classes: int) -> np.ndarray:
    """PASCAL VOC's colour map (bit-interleaved class ids): distinct colours for any count.

    For pictures of datasets that carry no palette of their own.

    Returns:
      uint8 [num_classes, 3].
    """
    palette = np.zeros((num_classes, 3), np.uint8)
    for index in range(num_classes):
        value, shift = index, 7
        while value:
            for channel in range(3):
                palette[index, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
            shift -= 1
    return palette


def present_classes(*labels: np.ndarray, num_classes: int, ignore_label: int = 255) -> list[int]:
    """Sorted class ids that occur in any of `labels` (ignored and unknown ids left out)."""
    found = set()
    for label in labels:
        found.update(int(v) for v in np.unique(np.asarray(label)))
    return sorted(c for c in found if 0 <= c < num_classes and c != ignore_label)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=FONT_SIZE)


def legend(
    class_names: Sequence[str],
    palette: np.ndarray | Sequence[Sequence[int]],
    width: int,
    *,
    classes: Iterable[int] | None = None,
) -> np.ndarray:
    """A white strip of colour swatches, each followed by its class name, `width` pixels wide.

    Entries flow left to right and wrap onto new rows; an entry wider than the strip gets a
    row of its own and its name is cut at the border.

    Args:
      class_names: one name per class.
      palette: [num_classes, 3] uint8 colours.
      width: the strip's width in pixels.
      classes: the class ids to list, in order; None lists every class.

    Returns:
      uint8 [rows * (FONT_SIZE + 4) + 4, width, 3].
    """
    palette = np.asarray(palette, np.uint8).reshape(-1, 3)
    classes = range(len(class_names)) if classes is None else list(classes)
    font = _font()
    swatch, row_height = FONT_SIZE, FONT_SIZE + _PAD
    entries, x, row = [], _PAD, 0
    for c in classes:
        name = str(class_names[c])
        entry_width = swatch + 3 + int(np.ceil(font.getlength(name)))
        if x > _PAD and x + entry_width > width - _PAD:
            x, row = _PAD, row + 1
        entries.append((x, row, c, name))
        x += entry_width + 3 * _PAD
    strip = Image.new('RGB', (width, (row + 1) * row_height + _PAD), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for x, row, c, name in entries:
        y = _PAD + row * row_height
        colour = tuple(int(v) for v in palette[c]) if c < len(palette) else IGNORE_COLOR
        draw.rectangle((x, y, x + swatch - 1, y + swatch - 1), fill=colour, outline=(0, 0, 0))
        draw.text((x + swatch + 3, y + swatch // 2), name, fill=(0, 0, 0), font=font, anchor='lm')
    return np.asarray(strip, np.uint8)


def with_legend(
    picture: np.ndarray,
    class_names: Sequence[str],
    palette: np.ndarray | Sequence[Sequence[int]],
    *,
    classes: Iterable[int] | None = None,
) -> np.ndarray:
    """`picture` (uint8 [H, W, 3]) with a `legend` of `classes` (None: all) underneath.

    Returns:
      uint8 [H + legend height, W, 3].
    """
    picture = np.asarray(picture, np.uint8)
    strip = legend(class_names, palette, picture.shape[1], classes=classes)
    return np.concatenate([picture, strip], axis=0)


def _titles(titles: Sequence[str], tile_width: int, gap: int) -> np.ndarray:
    """A white header row with each title centred over its tile."""
    width = len(titles) * tile_width + (len(titles) - 1) * gap
    header = Image.new('RGB', (width, FONT_SIZE + 2 * _PAD), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    for i, title in enumerate(titles):
        centre = i * (tile_width + gap) + tile_width // 2
        draw.text((centre, header.height // 2), title, fill=(0, 0, 0), font=_font(), anchor='mm')
    return np.asarray(header, np.uint8)


def labelled_panel(
    image: np.ndarray,
    ground_truth: np.ndarray,
    prediction: np.ndarray,
    class_names: Sequence[str],
    palette: np.ndarray | Sequence[Sequence[int]],
    *,
    ignore_label: int = 255,
    min_height: int = 128,
    classes: Iterable[int] | None = None,
) -> np.ndarray:
    """`comparison_panel` with titles above the tiles and a class legend below.

    Small images are enlarged by an integer factor (nearest neighbour, so label edges stay
    sharp) until they are at least `min_height` pixels tall, so that the text fits.

    Args:
      image: uint8 [H, W, 3] (or grey [H, W] / [H, W, 1]).
      ground_truth: integer [H, W] class ids.
      prediction: integer [H, W] class ids.
      class_names: one name per class.
      palette: [num_classes, 3] uint8 colours.
      ignore_label: label left unblended.
      min_height: smallest height of the tiles.
      classes: the class ids the legend lists; None lists every class.

    Returns:
      uint8 [header + k H + legend, 3 k W + 8, 3] for the enlargement factor k.
    """
    factor = max(1, -(-min_height // max(1, np.asarray(ground_truth).shape[0])))

    def enlarge(array: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(np.asarray(array), factor, axis=0), factor, axis=1)

    panel = comparison_panel(
        enlarge(image),
        enlarge(ground_truth),
        enlarge(prediction),
        palette,
        ignore_label=ignore_label,
    )
    tile_width = np.asarray(ground_truth).shape[1] * factor
    header = _titles(('image', 'ground truth', 'prediction'), tile_width, gap=4)
    return with_legend(
        np.concatenate([header, panel], axis=0), class_names, palette, classes=classes
    )


def denormalize(
    images: np.ndarray,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    *,
    bgr: bool = False,
) -> np.ndarray:
    """Maps normalised model inputs back to uint8 pixels: `image * std + mean`, clipped.

    Args:
      images: float [..., H, W, C], normalised as `(pixel - mean) / std`.
      mean: per-channel mean in pixel units (0-255), in the images' channel order.
      std: per-channel scale in pixel units, in the same order.
      bgr: the images' channels are BGR (the FCN-VGG convention): returned as RGB.

    Returns:
      uint8 [..., H, W, C].
    """
    pixels = np.asarray(images, np.float32) * np.asarray(std, np.float32)
    pixels = pixels + np.asarray(mean, np.float32)
    if bgr:
        pixels = pixels[..., ::-1]
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def evaluation_panels(
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    class_names: Sequence[str],
    mean: float | Sequence[float],
    std: float | Sequence[float],
    *,
    palette: np.ndarray | Sequence[Sequence[int]] | None = None,
    ignore_label: int = 255,
    bgr: bool = False,
    min_height: int = 128,
) -> np.ndarray:
    """Image | ground truth | prediction for each example of a batch, titled, with legend.

    The form TensorBoard's image summaries take (`writer.write_images(step, {name: panels})`).
    Every legend lists all classes, so the panels of a batch have one size and the colours
    read the same in each.

    Args:
      images: normalised float model inputs [N, H, W, C] (C = 1 or 3).
      labels: integer ground truth [N, H, W] (ignored pixels: `ignore_label`).
      predictions: integer predicted class ids [N, H, W].
      class_names: one name per class.
      mean: per-channel mean of the normalisation, in pixel units (see `denormalize`).
      std: per-channel scale of the normalisation, in pixel units.
      palette: [num_classes, 3] uint8 colours; None uses `default_palette`.
      ignore_label: label left unblended.
      bgr: the images' channels are BGR (see `denormalize`).
      min_height: smallest height of each tile (see `labelled_panel`).

    Returns:
      uint8 [N, height, width, 3].
    """
    palette = default_palette(len(class_names)) if palette is None else palette
    pixels = denormalize(images, mean, std, bgr=bgr)
    panels = [
        labelled_panel(
            image,
            label,
            prediction,
            class_names,
            palette,
            ignore_label=ignore_label,
            min_height=min_height,
        )
        for image, label, prediction in zip(
            pixels, np.asarray(labels), np.asarray(predictions), strict=True
        )
    ]
    return np.stack(panels)


def normalized_confusion(confusion: np.ndarray) -> np.ndarray:
    """Each row of a confusion matrix (rows: ground truth) divided by its sum.

    Row i is then the share of class i's pixels predicted as each class (its diagonal entry
    is class i's recall); a class without ground-truth pixels has a row of NaN.

    Returns:
      float64 [K, K].
    """
    confusion = np.asarray(confusion, np.float64)
    totals = confusion.sum(axis=1, keepdims=True)
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(totals > 0, confusion / totals, np.nan)


def confusion_matrix_image(
    confusion: np.ndarray, class_names: Sequence[str], *, annotate_up_to: int = 30
) -> np.ndarray:
    """The row-normalised confusion matrix (`normalized_confusion`) as a labelled heat map.

    Rows are ground truth, columns predictions (`metrics.confusion_matrix`'s layout); rows of
    classes absent from the ground truth stay blank. Each cell shows its value when there
    are at most `annotate_up_to` classes.

    Args:
      confusion: [K, K] pixel counts.
      class_names: K names.
      annotate_up_to: the most classes whose cells get a number.

    Returns:
      uint8 [height, width, 3]; the size grows with K.
    """
    # The object-oriented API, not pyplot: no global figure state, safe in a training loop.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = normalized_confusion(confusion)
    k = len(class_names)
    if matrix.shape != (k, k):
        raise ValueError(f'confusion is {matrix.shape}, expected ({k}, {k}) for the class names.')
    side = min(2.0 + 0.4 * k, 20.0)  # Inches at 100 dpi: at most 2000 px for many classes.
    figure = Figure(figsize=(side + 1.2, side), dpi=100, layout='constrained')
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    shown = axes.imshow(np.ma.masked_invalid(matrix), cmap='Blues', vmin=0.0, vmax=1.0)
    axes.set_xticks(range(k), [str(n) for n in class_names], rotation=90)
    axes.set_yticks(range(k), [str(n) for n in class_names])
    axes.set_xlabel('prediction')
    axes.set_ylabel('ground truth')
    if k <= annotate_up_to:
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                colour = 'white' if value > 0.5 else 'black'
                axes.text(j, i, f'{value:.2f}', ha='center', va='center', color=colour, fontsize=8)
    figure.colorbar(shown, ax=axes, fraction=0.05)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
