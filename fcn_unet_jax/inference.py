"""Inference: whole-image, sliding-window (overlap-tile) and test-time augmentation.

Every mode is one traceable function of (variables, images), so `train.py` can call it
inside its jitted eval step and `predict.py` through `Predictor`, which jits it once per
image shape. Images are already-normalised float NHWC batches of any size; the result
always has the input's height and width.

How an image is cut into windows (`plan_tiles`):
  * 'whole': one window per image. SAME-padded models see the image exactly as given (no
    padding to a bucket size: the FCN-VGG's crop offsets and the models' zero padding make
    border predictions depend on such padding, so results would change with the bucket).
  * 'sliding': windows of `config.eval.window_size` with a stride of
    `window * (1 - window_overlap)`, the last window moved back to end at the border, and
    logits averaged where windows overlap (mmsegmentation's `slide_inference`: a sum
    divided by a count map). An image smaller than a window is padded with zeros (the
    normalised mean colour, which is also what the convs' SAME padding sees) and cropped.
  * The classic VALID U-Net uses the paper's overlap-tile strategy in both modes: the
    network's output tile is smaller than its input window, the image is mirror-padded
    (reflect) so every window reads real-looking context around its tile, and the tiles
    are stitched. Tiles start at multiples of 2**depth (16), the period of the pooling
    grid, so the stitched result equals one run of the network on the whole mirror-padded
    image: tiling bounds memory without changing a single output pixel.

Windows of all images of a batch are processed `windows_per_call` at a time inside a
`lax.scan`, so device memory is bounded by that number of windows (plus the image and
the logit accumulator) whatever the image size. With a `Mesh`, each group of windows is
sharded on the mesh's 'data' axis; the group size is rounded up to a multiple of the
device count and padding windows are masked out.

Test-time augmentation averages softmax probabilities over views (every scale of
`config.eval.scales`, each also flipped left-right when `config.eval.flip`), as
mmsegmentation's `aug_test` does: probabilities are on a common scale across views,
logits of differently-resized inputs need not be. Images are resized bilinearly (half-pixel
centres, no antialiasing, like PyTorch's `F.interpolate`), and each view's logits are
resized back to the original size before the softmax.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from fcn_unet_jax import sharding
from fcn_unet_jax.models import layers, unet

MODES = ('whole', 'sliding')

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """What `probabilities` does; built from `config.eval` by `from_config`.

    Attributes:
      mode: 'whole' or 'sliding'.
      window_size: (height, width) of the network's input window in 'sliding' mode. For
        the VALID U-Net it must be a valid input size; its output tile is smaller.
      window_overlap: fraction of a window (of an output tile for the VALID U-Net) that
        neighbouring windows share, in [0, 1).
      flip: also infer on the left-right flipped image and average.
      scales: image scale factors whose predictions are averaged; (1.0,) = no rescaling.
      windows_per_call: most windows the network sees in one call (bounds memory).
    """

    mode: str = 'whole'
    window_size: tuple[int, int] | None = None
    window_overlap: float = 0.25
    flip: bool = False
    scales: tuple[float, ...] = (1.0,)
    windows_per_call: int = 8

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f'config.eval.mode must be one of {MODES}, got {self.mode!r}.')
        if self.window_size is None:
            if self.mode == 'sliding':
                raise ValueError(
                    "config.eval.mode='sliding' needs config.eval.window_size = (height, width)."
                )
        elif len(self.window_size) != 2 or not all(
            isinstance(s, int | np.integer) and s >= 1 for s in self.window_size
        ):
            raise ValueError(
                f'config.eval.window_size must be None or two positive ints (height, width), '
                f'got {self.window_size!r}.'
            )
        if not 0.0 <= self.window_overlap < 1.0:
            raise ValueError(
                f'config.eval.window_overlap must be in [0, 1), got {self.window_overlap!r}.'
            )
        if not self.scales or not all(s > 0 for s in self.scales):
            raise ValueError(
                f'config.eval.scales must be a non-empty tuple of positive factors, '
                f'got {self.scales!r}.'
            )
        if self.windows_per_call < 1:
            raise ValueError(f'windows_per_call must be >= 1, got {self.windows_per_call!r}.')

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> 'InferenceSettings':
        """Reads `config.eval` and takes `config.eval_batch_size` as `windows_per_call`.

        Args:
          config: the full experiment config.

        Returns:
          The validated settings.
        """
        e = config.eval
        return cls(
            mode=e.mode,
            window_size=None if e.window_size is None else tuple(e.window_size),
            window_overlap=float(e.window_overlap),
            flip=bool(e.flip),
            scales=tuple(float(s) for s in e.scales),
            # A window group is what the devices see per call, like an eval batch.
            windows_per_call=int(config.eval_batch_size),
        )


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How a model's output relates to its input, per spatial axis.

    Attributes:
      margin: input pixels consumed on each side (0 for SAME models, 92 for the VALID
        U-Net of depth 4: 572 -> 388).
      step: output tiles start at multiples of this, so that pooling grids line up.
      min_tile: smallest output size the model can produce.
    """

    margin: int = 0
    step: int = 1
    min_tile: int = 1

    def tile_at_least(self, size: int) -> int:
        """Smallest output tile the model can produce that is >= `size`."""
        return self.min_tile + self.step * math.ceil(max(size - self.min_tile, 0) / self.step)

    def tile_of_window(self, window: int) -> int:
        """Output tile of an input window side.

        Raises:
          ValueError: if the model cannot take the window; names the nearest valid sides.
        """
        tile = window - 2 * self.margin
        if tile >= self.min_tile and (tile - self.min_tile) % self.step == 0:
            return tile
        above = self.tile_at_least(tile)
        nearest = [t + 2 * self.margin for t in (above - self.step, above) if t >= self.min_tile]
        raise ValueError(
            f'config.eval.window_size side {window} is not an input side of this model; '
            f'nearest valid sides: {tuple(nearest)}.'
        )


def model_geometry(model: nn.Module) -> Geometry:
    """Returns the input -> output geometry of a model built by `models.build_model`."""
    if isinstance(model, unet.UNet) and model.padding == 'VALID':
        depth = unet.UNET_DEPTH
        smallest_input = unet.valid_unet_input_sizes(1, depth)[-1]
        min_tile = unet.unet_output_size(smallest_input, depth)
        return Geometry(margin=(smallest_input - min_tile) // 2, step=2**depth, min_tile=min_tile)
    return Geometry()


def _starts(extent: int, tile: int, stride: int) -> tuple[int, ...]:
    # mmsegmentation's grid: as few strides as cover `extent`, the last tile moved back so
    # that it ends at the border instead of running past it.
    count = max(extent - tile + stride - 1, 0) // stride + 1
    return tuple(min(k * stride, extent - tile) for k in range(count))


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """Where the windows of one image lie (identical for every image of a batch).

    Attributes:
      image: (height, width) of the image.
      tile: (height, width) of each window's output tile.
      window: (height, width) of each input window: tile + 2 * margin.
      extent: (height, width) covered by tiles, >= image; the rest is cropped away.
      margin: context pixels a window reads on each side of its tile.
      starts: (row starts, column starts) of the tiles, in output coordinates; a window
        starting at row r reads rows [r, r + window) of the padded image.
    """

    image: tuple[int, int]
    tile: tuple[int, int]
    window: tuple[int, int]
    extent: tuple[int, int]
    margin: int
    starts: tuple[tuple[int, ...], tuple[int, ...]]

    @property
    def windows_per_image(self) -> int:
        """Number of windows one image is cut into."""
        return len(self.starts[0]) * len(self.starts[1])

    def count_map(self) -> np.ndarray:
        """How many tiles cover each pixel of the extent, float32 [height, width]."""
        counts = np.zeros(self.extent, np.float32)
        for y in self.starts[0]:
            for x in self.starts[1]:
                counts[y : y + self.tile[0], x : x + self.tile[1]] += 1
        return counts

    def window_groups(
        self, batch_size: int, windows_per_call: int, num_devices: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """Splits the windows of a batch into equal groups, one network call each.

        Args:
          batch_size: images in the batch.
          windows_per_call: most windows per group (rounded up to a device multiple).
          num_devices: devices a group is sharded over.

        Returns:
          `index` int32 [calls, per_call, 3] of (image, row start, column start), and
          `valid` bool [calls, per_call], False for the padding windows that fill the last
          group (they repeat window 0 and are masked out).
        """
        index = [
            (b, y, x) for b in range(batch_size) for y in self.starts[0] for x in self.starts[1]
        ]
        per_call = min(windows_per_call, len(index))
        per_call = num_devices * math.ceil(per_call / num_devices)
        calls = math.ceil(len(index) / per_call)
        padding = calls * per_call - len(index)
        valid = np.array([True] * len(index) + [False] * padding)
        index = np.array(index + [index[0]] * padding, np.int32)
        return index.reshape(calls, per_call, 3), valid.reshape(calls, per_call)


def plan_tiles(
    image_size: tuple[int, int], settings: InferenceSettings, geometry: Geometry
) -> TilePlan:
    """Lays out the windows for an image of `image_size` (a static, host-side plan).

    Args:
      image_size: (height, width).
      settings: mode, window size and overlap.
      geometry: the model's `model_geometry`.

    Returns:
      The plan. In 'whole' mode one tile covers the image (for the VALID U-Net the
      smallest tile that does). In 'sliding' mode tiles are the windows' outputs; the
      extent is the image, or the tile if larger, rounded up so that for the VALID U-Net
      every tile starts at a multiple of `geometry.step`.
    """
    tile, extent, starts = [], [], []
    for axis, size in enumerate(image_size):
        if settings.mode == 'whole':
            t = geometry.tile_at_least(size)
            e, s = t, (0,)
        else:
            t = geometry.tile_of_window(settings.window_size[axis])
            e = t + geometry.step * math.ceil(max(size - t, 0) / geometry.step)
            stride = int(t * (1.0 - settings.window_overlap)) // geometry.step * geometry.step
            s = _starts(e, t, max(stride, geometry.step))
        tile.append(t)
        extent.append(e)
        starts.append(s)
    m = geometry.margin
    return TilePlan(
        image=tuple(image_size),
        tile=tuple(tile),
        window=(tile[0] + 2 * m, tile[1] + 2 * m),
        extent=tuple(extent),
        margin=m,
        starts=tuple(starts),
    )


def _data_devices(mesh: Mesh | None) -> int:
    return 1 if mesh is None else sharding.data_axis_size(mesh)


def main_logits(outputs: Array | Mapping[str, Array]) -> Array:
    """The prediction among a model's outputs.

    Args:
      outputs: what `model.apply` returns: logits, or `{'out': logits, 'aux': aux_logits}`
        for torchvision FCNs with an aux head (the aux head only adds a training loss).

    Returns:
      The logits of the main head.
    """
    return outputs['out'] if isinstance(outputs, Mapping) else outputs


def logits(
    model: nn.Module,
    variables: Any,
    images: Array,
    settings: InferenceSettings,
    mesh: Mesh | None = None,
) -> Array:
    """Single-view logits by whole-image or sliding-window (overlap-tile) inference.

    Traceable: call it inside `jax.jit` (the plan is static per image shape).

    Args:
      model: a module from `models.build_model`.
      variables: its variables (`params`, and `batch_stats` etc. where it has them).
      images: normalised float images [batch, height, width, channels].
      settings: mode, window size, overlap and `windows_per_call` (flip and scales are
        ignored here; see `probabilities`).
      mesh: shard each group of windows on its 'data' axis; None = no constraint.

    Returns:
      float32 logits [batch, height, width, classes], averaged where windows overlap.
    """
    batch, height, width, channels = images.shape
    geometry = model_geometry(model)
    plan = plan_tiles((height, width), settings, geometry)
    num_devices = _data_devices(mesh)
    index, valid = plan.window_groups(batch, settings.windows_per_call, num_devices)
    m = plan.margin
    pad = ((0, 0), (m, m + plan.extent[0] - height), (m, m + plan.extent[1] - width), (0, 0))
    # VALID U-Net: the paper's mirrored context. SAME models: zeros, what their own conv
    # padding sees beyond the image.
    padded = jnp.pad(images, pad, mode='reflect' if m else 'constant')
    (wh, ww), (th, tw) = plan.window, plan.tile

    def apply(windows: Array) -> Array:
        return main_logits(model.apply(variables, windows, train=False)).astype(jnp.float32)

    def extract(i: Array) -> Array:
        return jax.lax.dynamic_slice(padded, (i[0], i[1], i[2], 0), (1, wh, ww, channels))[0]

    per_call = index.shape[1]
    out_shape = jax.eval_shape(
        apply, jax.ShapeDtypeStruct((per_call, wh, ww, channels), padded.dtype)
    )
    if out_shape.shape[1:3] != (th, tw):
        raise ValueError(
            f'{type(model).__name__} maps a {(wh, ww)} window to {out_shape.shape[1:3]}, '
            f'expected the tile {(th, tw)}; its geometry is not known to inference.py.'
        )
    classes = out_shape.shape[-1]

    def call(total: Array, group: tuple[Array, Array]) -> tuple[Array, None]:
        group_index, group_valid = group
        windows = jax.vmap(extract)(group_index)
        if mesh is not None:
            windows = jax.lax.with_sharding_constraint(windows, sharding.batch_sharding(mesh))
        tiles = apply(windows)

        def add(k: int, total: Array) -> Array:
            b, y, x = group_index[k, 0], group_index[k, 1], group_index[k, 2]
            tile = jnp.where(group_valid[k], tiles[k], 0.0)[None]
            current = jax.lax.dynamic_slice(total, (b, y, x, 0), (1, th, tw, classes))
            return jax.lax.dynamic_update_slice(total, current + tile, (b, y, x, 0))

        return jax.lax.fori_loop(0, per_call, add, total), None

    total = jnp.zeros((batch, *plan.extent, classes), jnp.float32)
    total, _ = jax.lax.scan(call, total, (jnp.asarray(index), jnp.asarray(valid)))
    averaged = total / jnp.asarray(plan.count_map())[None, :, :, None]
    return averaged[:, :height, :width]


def probabilities(
    model: nn.Module,
    variables: Any,
    images: Array,
    settings: InferenceSettings,
    mesh: Mesh | None = None,
) -> Array:
    """Class probabilities averaged over the test-time views (scales x flips).

    Traceable: call it inside `jax.jit`.

    Args:
      model: a module from `models.build_model`.
      variables: its variables.
      images: normalised float images [batch, height, width, channels].
      settings: the full inference settings.
      mesh: shard each group of windows on its 'data' axis; None = no constraint.

    Returns:
      float32 probabilities [batch, height, width, classes], summing to 1 per pixel.
    """
    size = images.shape[1:3]
    total, views = 0.0, 0
    for scale in settings.scales:
        scaled_size = tuple(max(1, round(s * scale)) for s in size)
        scaled = images if scaled_size == size else layers.resize_bilinear(images, scaled_size)
        for flip in (False, True) if settings.flip else (False,):
            view = logits(model, variables, scaled[:, :, ::-1] if flip else scaled, settings, mesh)
            if flip:
                view = view[:, :, ::-1]
            if scaled_size != size:
                view = layers.resize_bilinear(view, size)
            total += jax.nn.softmax(view, axis=-1)
            views += 1
    return total / views


class Predictor:
    """Jitted inference with fixed model, variables and settings (the prediction CLI's core).

    Compiles once per input shape. With a mesh, variables and images are replicated over
    it and each group of windows is sharded on its 'data' axis (single-process meshes; a
    multi-process eval calls `probabilities` inside its own jitted step instead).
    """

    def __init__(
        self,
        model: nn.Module,
        variables: Any,
        settings: InferenceSettings,
        mesh: Mesh | None = None,
    ):
        """Builds the predictor.

        Args:
          model: a module from `models.build_model`.
          variables: its variables.
          settings: inference settings, e.g. `InferenceSettings.from_config(config)`.
          mesh: a `Mesh` with a 'data' axis, or None for the default device.
        """
        _data_devices(mesh)  # Fails now, not at the first call, for a mesh without 'data'.
        self.settings = settings
        self._replicated = None if mesh is None else sharding.replicated_sharding(mesh)
        self._variables = self._place(variables)
        fn = functools.partial(probabilities, model, settings=settings, mesh=mesh)
        self._probabilities = jax.jit(fn)
        self._predict = jax.jit(lambda v, x: jnp.argmax(fn(v, x), axis=-1).astype(jnp.int32))

    def _place(self, tree: Any) -> Any:
        return tree if self._replicated is None else jax.device_put(tree, self._replicated)

    def probabilities(self, images: np.ndarray | Array) -> Array:
        """float32 class probabilities [B, H, W, classes] of images [B, H, W, C]."""
        return self._probabilities(self._variables, self._place(jnp.asarray(images)))

    def predict(self, images: np.ndarray | Array) -> Array:
        """int32 class ids [B, H, W] of images [B, H, W, C]."""
        return self._predict(self._variables, self._place(jnp.asarray(images)))


def make_predict_fn(
    model: nn.Module, config: ml_collections.ConfigDict, mesh: Mesh | None = None
) -> Callable[[Any, Array], Array]:
    """Returns `fn(variables, images) -> probabilities` for `config.eval` (traceable).

    Args:
      model: a module from `models.build_model(config.model)`.
      config: the full experiment config (reads `eval` and `eval_batch_size`).
      mesh: shard window groups on its 'data' axis; None = no constraint.

    Returns:
      A pure function to call inside the caller's `jax.jit`.
    """
    settings = InferenceSettings.from_config(config)
    return functools.partial(probabilities, model, settings=settings, mesh=mesh)
