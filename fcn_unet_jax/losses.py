"""Segmentation losses: cross-entropy with an ignore label, Dice, and their combination.

Every loss is computed in float32 whatever the model's compute dtype, so bfloat16 training
does not lose precision in the softmax or in the reduction over millions of pixels.

Conventions (shared by all functions here):
  * `logits` are NHWC, `labels` are int [N, H, W]; pixels whose label equals
    `ignore_label` (255) contribute nothing, neither to the numerator nor to the
    normaliser.
  * `class_weights` ([num_classes]) rescale each pixel's loss by the weight of its
    ground-truth class; `pixel_weights` ([N, H, W], e.g. the U-Net border weight map) rescale
    each pixel individually.
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

LOSS_NAMES = ('cross_entropy', 'dice', 'cross_entropy+dice')
NORMALIZATIONS = ('mean', 'sum')


def _valid_and_safe_labels(
    labels: jax.Array, num_classes: int, ignore_label: int
) -> tuple[jax.Array, jax.Array]:
    """Returns (valid mask, labels with ignored pixels mapped to class 0 for safe indexing)."""
    valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    return valid, jnp.where(valid, labels, 0)


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_label: int = 255,
    class_weights: Sequence[float] | jax.Array | None = None,
    pixel_weights: jax.Array | None = None,
    normalization: str = 'mean',
) -> jax.Array:
    """Softmax cross-entropy over pixels, ignoring `ignore_label`.

    Args:
      logits: [N, H, W, C] logits, any float dtype.
      labels: [N, H, W] integer labels.
      ignore_label: label value whose pixels are left out.
      class_weights: optional [C] weight per ground-truth class.
      pixel_weights: optional [N, H, W] weight per pixel (the U-Net border weight map).
      normalization: 'mean' divides the weighted sum by the summed class weights of the
        valid pixels (PyTorch's `CrossEntropyLoss(weight=..., ignore_index=255)`; with no
        class weights this is the number of valid pixels; pixel weights are not part of the
        normaliser, so the border map raises the loss near borders as in the paper's
        energy). 'sum' is the FCN's unnormalised loss (Caffe `normalize: false`): the sum
        over pixels, averaged over the images of the batch.

    Returns:
      A float32 scalar. 0 when every pixel is ignored.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f'Unknown loss normalization {normalization!r}; use {NORMALIZATIONS}.')
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    valid, safe_labels = _valid_and_safe_labels(labels, num_classes, ignore_label)
    # -log softmax(logits)[label] = logsumexp(logits) - logits[label], with the label's
    # logit picked by a comparison rather than a gather: the gradient is then elementwise
    # (softmax - one-hot, fused by XLA) instead of a scatter through an index tensor.
    is_label = jnp.arange(num_classes) == safe_labels[..., None]
    label_logits = jnp.sum(jnp.where(is_label, logits, 0.0), axis=-1)
    nll = jax.nn.logsumexp(logits, axis=-1) - label_logits
    weight = valid.astype(jnp.float32)
    if class_weights is not None:
        weight = weight * jnp.asarray(class_weights, jnp.float32)[safe_labels]
    normaliser = jnp.sum(weight)
    if pixel_weights is not None:
        weight = weight * pixel_weights.astype(jnp.float32)
    total = jnp.sum(weight * nll)
    if normalization == 'sum':
        return total / logits.shape[0]
    return total / jnp.maximum(normaliser, 1e-12)


def dice_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_label: int = 255,
    class_weights: Sequence[float] | jax.Array | None = None,
    smooth: float = 1.0,
) -> jax.Array:
    """Soft multi-class Dice loss, 1 - mean over classes of the soft Dice coefficient.

    Soft Dice of class c over the batch: (2 sum p_c y_c + smooth) / (sum p_c + sum y_c +
    smooth), with p the softmax probabilities and y the one-hot labels, both zeroed on
    ignored pixels. Classes absent from the batch score 1 through `smooth` when nothing is
    predicted for them, so they do not dominate the loss.

    Args:
      logits: [N, H, W, C] logits.
      labels: [N, H, W] integer labels.
      ignore_label: label value whose pixels are left out.
      class_weights: optional [C] weights of the per-class terms (normalised to sum 1).
      smooth: additive smoothing of numerator and denominator.

    Returns:
      A float32 scalar in [0, 1].
    """
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    valid, safe_labels = _valid_and_safe_labels(labels, num_classes, ignore_label)
    valid = valid[..., None].astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1) * valid
    onehot = jax.nn.one_hot(safe_labels, num_classes, dtype=jnp.float32) * valid
    axes = tuple(range(logits.ndim - 1))
    intersection = jnp.sum(probs * onehot, axis=axes)
    denominator = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    if class_weights is None:
        return 1.0 - jnp.mean(dice)
    class_weights = jnp.asarray(class_weights, jnp.float32)
    return 1.0 - jnp.sum(class_weights * dice) / jnp.sum(class_weights)


def segmentation_loss(
    logits: jax.Array,
    labels: jax.Array,
    loss_config: ml_collections.ConfigDict,
    *,
    ignore_label: int = 255,
    pixel_weights: jax.Array | None = None,
) -> jax.Array:
    """The loss named by `loss_config.name` for one logits tensor.

    Logits smaller or larger than the labels (FCN heads, the VALID U-Net) must be resized or
    cropped by the caller; this function requires matching spatial shapes.

    Args:
      logits: [N, H, W, C] logits.
      labels: [N, H, W] integer labels.
      loss_config: `config.loss` (`name`, `normalization`, `class_weights`, `dice_weight`).
      ignore_label: label value whose pixels are left out.
      pixel_weights: optional [N, H, W] per-pixel weights (cross-entropy term only).

    Returns:
      A float32 scalar.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f'Logits {logits.shape} do not match labels {labels.shape}.')
    if loss_config.name not in LOSS_NAMES:
        raise ValueError(f'Unknown loss {loss_config.name!r}; use one of {LOSS_NAMES}.')
    class_weights = loss_config.class_weights
    loss = jnp.zeros((), jnp.float32)
    if 'cross_entropy' in loss_config.name:
        loss += cross_entropy(
            logits,
            labels,
            ignore_label=ignore_label,
            class_weights=class_weights,
            pixel_weights=pixel_weights,
            normalization=loss_config.normalization,
        )
    if loss_config.name == 'dice':
        loss += dice_loss(logits, labels, ignore_label=ignore_label, class_weights=class_weights)
    elif 'dice' in loss_config.name:
        loss += loss_config.dice_weight * dice_loss(
            logits, labels, ignore_label=ignore_label, class_weights=class_weights
        )
    return loss


def crop_to_output(
    logits: jax.Array, labels: jax.Array, pixel_weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array | None]:
    """Center-crops the labels (and pixel weights) to a smaller output's height and width.

    The classic VALID U-Net's output is smaller than its input (572 -> 388), so its loss
    compares the output with the centre of the labels. Only training needs this:
    evaluation goes through `inference`, whose output always has the input's size (the
    VALID U-Net is overlap-tiled on a mirror-padded image).

    Args:
      logits: [N, h, w, C] model output.
      labels: [N, H, W] labels with H >= h, W >= w.
      pixel_weights: optional [N, H, W] per-pixel weights.

    Returns:
      (labels, pixel_weights), cropped to [N, h, w]; unchanged when the sizes agree.

    Raises:
      ValueError: when the output is larger than the labels.
    """
    size = logits.shape[1:3]
    if size == labels.shape[1:3]:
        return labels, pixel_weights
    if size[0] > labels.shape[1] or size[1] > labels.shape[2]:
        raise ValueError(f'Model output {size} is larger than the labels {labels.shape}.')
    top = (labels.shape[1] - size[0]) // 2
    left = (labels.shape[2] - size[1]) // 2

    def crop(x):
        return x[:, top : top + size[0], left : left + size[1]]

    return crop(labels), None if pixel_weights is None else crop(pixel_weights)


def total_loss(
    outputs: jax.Array | Mapping[str, jax.Array],
    labels: jax.Array,
    loss_config: ml_collections.ConfigDict,
    *,
    ignore_label: int = 255,
    pixel_weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss of a model's outputs, including torchvision's auxiliary head when present.

    Args:
      outputs: logits, or a dict `{'out': logits, 'aux': aux_logits}` (models built with
        `aux_head=True`); the aux term is weighted by `loss_config.aux_weight`.
      labels: [N, H, W] integer labels.
      loss_config: `config.loss`.
      ignore_label: label value whose pixels are left out.
      pixel_weights: optional [N, H, W] per-pixel weights.

    Returns:
      (total loss, dict of its float32 terms: 'loss' and, with an aux head, 'main_loss' and
      'aux_loss').
    """
    if not isinstance(outputs, Mapping):
        loss = segmentation_loss(
            outputs, labels, loss_config, ignore_label=ignore_label, pixel_weights=pixel_weights
        )
        return loss, {'loss': loss}
    main = segmentation_loss(
        outputs['out'], labels, loss_config, ignore_label=ignore_label, pixel_weights=pixel_weights
    )
    terms = {'main_loss': main}
    loss = main
    if 'aux' in outputs:
        aux = segmentation_loss(
            outputs['aux'],
            labels,
            loss_config,
            ignore_label=ignore_label,
            pixel_weights=pixel_weights,
        )
        terms['aux_loss'] = aux
        loss = loss + loss_config.aux_weight * aux
    terms['loss'] = loss
    return loss, terms
