"""`folder`: a user's own images and masks, read from a root folder.

Two layouts are accepted under the root:

* simple: `images/` (PNG, JPEG, BMP or TIFF) and `masks/` (PNG, BMP or TIFF), matched by
  file stem (`images/a.jpg` <-> `masks/a.png`). Every image needs a mask and vice versa.
  Optional split lists `splits/train.txt`, `splits/val.txt` (and `splits/test.txt`), one
  stem a line; when they exist, they define the splits and files not listed are left out.
* VOC-style: `JPEGImages/`, `SegmentationClass/` and optional
  `ImageSets/Segmentation/{train,val,test}.txt`. The examples are the masks (or the listed
  stems); images without a mask are fine there, since VOC's `JPEGImages/` also holds
  detection-only images.

Without split lists, a stem goes to `validation` when the first 8 bytes of its SHA-256,
read as a fraction of 2**64, fall below `val_fraction`: the split of a file never changes
when others are added. A split that the lists or `val_fraction` ask for and that gets no
example is an error naming the root and the split (with `val_fraction` 0 there is no
validation split at all); so is a root without any example.

Masks hold class indices: grayscale PNGs (mode `L`) give their values, palette PNGs (mode
`P`) their palette indices; 255 is the ignore label. An optional `classes.txt` at the root
names the classes, one a line (blank lines skipped): `name`, `name r g b` or
`name #rrggbb`; classes without a colour get the VOC colour of their index. Without it,
the class count is the largest label + 1 (logged), and classes are named `class_<i>`; the
build then logs every label value with its pixel count and warns about a label far above
the others (labels 0, 1, 2, 7: label 7 alone makes 8 classes), which is most likely a
stray value (`common.LabelCounts`). Grayscale images are converted to RGB, and an alpha
channel is dropped.

Preparation raises a `UserError` (a ValueError) that names the file for: an image without a
mask, a mask without an image, a mask whose size differs from its image's, a label outside
`[0, num_classes)` other than 255 (when `classes.txt` gives the class count), a file that
cannot be decoded, and a listed stem without files.

The root reaches tfds through a `FolderConfig` built at run time by `config_for_root`.
Its name is the root's base name plus a hash of the absolute root, `val_fraction` and
the name, size and mtime of every input file, so two roots never share a prepared copy in
a tfds data_dir, and changing the data gives a new copy instead of stale data.
"""

import dataclasses
import hashlib
import math
import os
import re
from collections.abc import Mapping

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from fcn_unet_jax import errors
from fcn_unet_jax.data.builders import common

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
MASK_SUFFIXES = ('.png', '.bmp', '.tif', '.tiff')
_SPLIT_LISTS = {'train': 'train.txt', 'validation': 'val.txt', 'test': 'test.txt'}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the files of one root live.

    Attributes:
      image_dir: Folder of the images.
      mask_dir: Folder of the masks.
      split_dir: Folder that may hold the split lists.
      masks_define_examples: VOC-style: images without a mask are skipped, not an error.
    """

    image_dir: str
    mask_dir: str
    split_dir: str
    masks_define_examples: bool


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
    """A root folder and how to split it; build with `config_for_root`.

    Attributes:
      root: Absolute path of the root folder.
      val_fraction: Fraction of stems sent to `validation` when no split lists exist.
    """

    root: str = ''
    val_fraction: float = 0.1


def find_layout(root: str) -> Layout:
    """Returns the layout of `root`.

    Raises:
      MissingInputError: `root` holds neither `images/` + `masks/` nor `JPEGImages/` +
        `SegmentationClass/` (a FileNotFoundError).
    """
    if os.path.isdir(os.path.join(root, 'images')) and os.path.isdir(os.path.join(root, 'masks')):
        return Layout(
            os.path.join(root, 'images'),
            os.path.join(root, 'masks'),
            os.path.join(root, 'splits'),
            masks_define_examples=False,
        )
    voc = [os.path.join(root, name) for name in ('JPEGImages', 'SegmentationClass')]
    if all(os.path.isdir(path) for path in voc):
        return Layout(
            voc[0],
            voc[1],
            os.path.join(root, 'ImageSets', 'Segmentation'),
            masks_define_examples=True,
        )
    what = 'does not exist' if not os.path.isdir(root) else 'holds no images/ and masks/'
    raise errors.MissingInputError(
        f'The folder dataset root {root} {what}; it must hold images/ and masks/, or '
        'JPEGImages/ and SegmentationClass/.',
        hint='set --config.dataset.folder_root to the folder that holds them',
    )


def _files_by_stem(folder: str, suffixes: tuple[str, ...]) -> dict[str, str]:
    """Maps stem -> path for the files in `folder` with one of `suffixes` (not hidden)."""
    files = {}
    for name in sorted(os.listdir(folder)):
        stem, suffix = os.path.splitext(name)
        if name.startswith('.') or suffix.lower() not in suffixes:
            continue
        path = os.path.join(folder, name)
        if stem in files:
            raise errors.UserError(f'Two files with the stem {stem!r}: {files[stem]} and {path}.')
        files[stem] = path
    return files


def _input_files(root: str) -> list[str]:
    """Returns every file that preparation reads under `root`, sorted."""
    layout = find_layout(root)
    paths = list(_files_by_stem(layout.image_dir, IMAGE_SUFFIXES).values())
    paths += _files_by_stem(layout.mask_dir, MASK_SUFFIXES).values()
    paths += [os.path.join(layout.split_dir, name) for name in _SPLIT_LISTS.values()]
    paths.append(os.path.join(root, 'classes.txt'))
    return sorted(path for path in paths if os.path.isfile(path))


def config_for_root(root: str, val_fraction: float = 0.1) -> FolderConfig:
    """Returns the FolderConfig for `root`, named after the root and its content.

    Args:
      root: The user's root folder (see the module docstring for the layouts).
      val_fraction: Fraction of stems sent to `validation` when no split lists exist.

    Returns:
      A config whose name is `<sanitised base name>_<12 hex digits>`, the digits hashing
      the absolute root, `val_fraction` and the name, size and mtime of each input file.
    """
    root = os.path.abspath(os.path.expanduser(root))
    digest = hashlib.sha256(f'{root}\n{val_fraction!r}\n'.encode())
    for path in _input_files(root):
        stat = os.stat(path)
        digest.update(
            f'{os.path.relpath(path, root)}\t{stat.st_size}\t{stat.st_mtime_ns}\n'.encode()
        )
    base = re.sub(r'[^a-z0-9_]+', '_', os.path.basename(root).lower()).strip('_') or 'root'
    return FolderConfig(
        name=f'{base}_{digest.hexdigest()[:12]}',
        description=f'Images and masks under {root}.',
        root=root,
        val_fraction=val_fraction,
    )


def parse_classes(path: str) -> tuple[list[str], list[list[int]]]:
    """Reads a `classes.txt`: one class a line, `name`, `name r g b` or `name #rrggbb`.

    Args:
      path: The file.

    Returns:
      `(class_names, palette)`; classes without a colour get the VOC colour of their index.

    Raises:
      ValueError: a colour is malformed (the message names the file and line).
    """
    names, palette = [], []
    with open(path, encoding='utf-8') as f:
        lines = [(number, line.strip()) for number, line in enumerate(f, 1) if line.strip()]
    default = common.voc_palette(len(lines))
    for index, (number, line) in enumerate(lines):
        tokens = line.split()
        colour = default[index]
        if len(tokens) >= 2 and tokens[-1].startswith('#'):
            if not re.fullmatch(r'#[0-9a-fA-F]{6}', tokens[-1]):
                raise errors.UserError(f'{path}:{number}: bad colour {tokens[-1]!r}; use #rrggbb.')
            colour = [int(tokens[-1][i : i + 2], 16) for i in (1, 3, 5)]
            tokens = tokens[:-1]
        elif len(tokens) >= 4 and all(t.isdigit() for t in tokens[-3:]):
            colour = [int(t) for t in tokens[-3:]]
            if max(colour) > 255:
                raise errors.UserError(f'{path}:{number}: colour values must be in [0, 255].')
            tokens = tokens[:-3]
        names.append(' '.join(tokens))
        palette.append(colour)
    return names, palette


def _read_list(path: str) -> list[str]:
    with open(path, encoding='utf-8') as f:
        return [line.split()[0] for line in f if line.strip()]


def stem_fraction(stem: str) -> float:
    """Maps a stem to [0, 1) with SHA-256, so a stem's split does not depend on others."""
    return int.from_bytes(hashlib.sha256(stem.encode()).digest()[:8], 'big') / 2**64


def empty_split_error(
    what: str,
    split: str,
    fractions: Mapping[str, float],
    val_fraction: float,
    field: str,
    lists: str,
    unit: str,
) -> errors.UserError:
    """The error for a hash split (`stem_fraction` < `val_fraction`) that gets no example.

    Args:
      what: the dataset and root, e.g. 'folder /data/cells'.
      split: 'train' or 'validation', the empty one.
      fractions: `stem_fraction` of every stem (or case).
      val_fraction: the fraction that left `split` empty.
      field: the config field of the fraction, e.g. 'config.dataset.folder_val_fraction'.
      lists: the split lists that would define the splits instead.
      unit: what is split, e.g. 'image' or 'case'.

    Returns:
      A UserError whose hint is a fraction that fixes it, or the split lists.
    """
    count = f'{len(fractions)} {unit}(s)'
    message = f'{what}: split {split!r} would have no {unit}: {field}={val_fraction} of {count}.'
    if len(fractions) < 2:
        return errors.UserError(
            message,
            hint=f'one {unit} cannot make two splits: add {unit}s, or set --{field}=0 for no '
            'validation split',
        )
    if split == 'validation':
        # The stem with the smallest fraction goes to validation once the fraction is above it.
        fix = f'--{field}={math.floor(min(fractions.values()) * 100 + 1) / 100:.2f} or more'
    else:
        fix = f'--{field}={math.floor(max(fractions.values()) * 100) / 100:.2f} or less'
    return errors.UserError(
        message, hint=f'add {lists}, or set {fix} so that each split gets at least one {unit}'
    )


def plan_splits(root: str, val_fraction: float) -> dict[str, list[tuple[str, str, str]]]:
    """Matches images with masks and assigns them to splits.

    Args:
      root: The root folder.
      val_fraction: Fraction of stems sent to `validation` when no split lists exist.

    Returns:
      split name -> sorted list of `(stem, image path, mask path)`; without split lists and
      with `val_fraction` 0 there is no `validation`.

    Raises:
      UserError: no examples at all, unmatched files, a list naming a stem without files, an
        empty list, only some of the train/val lists present (the message names the files),
        or a split that would be empty (the hint gives the fix).
    """
    layout = find_layout(root)
    images = _files_by_stem(layout.image_dir, IMAGE_SUFFIXES)
    masks = _files_by_stem(layout.mask_dir, MASK_SUFFIXES)
    unmatched = [masks[s] for s in masks if s not in images]
    if not layout.masks_define_examples:
        unmatched = [images[s] for s in images if s not in masks] + unmatched
    if unmatched:
        listing = ', '.join(unmatched[:10]) + (' ...' if len(unmatched) > 10 else '')
        raise errors.UserError(
            f'{len(unmatched)} file(s) without a matching image or mask (same stem in '
            f'{layout.image_dir} and {layout.mask_dir}): {listing}'
        )
    if not masks:
        raise errors.UserError(
            f'folder {root} has no examples: {layout.mask_dir} holds no mask '
            f'({", ".join(MASK_SUFFIXES)}).',
            hint='put each image in the image folder and its mask, with the same stem, in the '
            'mask folder',
        )
    lists = {
        split: os.path.join(layout.split_dir, name)
        for split, name in _SPLIT_LISTS.items()
        if os.path.isfile(os.path.join(layout.split_dir, name))
    }
    if lists:
        if not {'train', 'validation'} <= lists.keys():
            raise errors.UserError(
                f'Split lists in {layout.split_dir} need both train.txt and val.txt; found '
                f'{", ".join(sorted(os.path.basename(p) for p in lists.values()))}.'
            )
        stems = {}
        for split, path in lists.items():
            stems[split] = _read_list(path)
            if not stems[split]:
                raise errors.UserError(
                    f'folder {root}: split {split!r} has no examples: {path} lists no stem.',
                    hint='list one image stem a line',
                )
            for stem in stems[split]:
                if stem not in masks or stem not in images:
                    missing = 'a mask' if stem in images else 'an image'
                    raise errors.UserError(f'{path} lists {stem!r}, which has no {missing}.')
    else:
        fractions = {stem: stem_fraction(stem) for stem in masks}
        stems = {'train': [s for s in masks if fractions[s] >= val_fraction]}
        if val_fraction > 0:  # 0 asks for no validation split.
            stems['validation'] = [s for s in masks if fractions[s] < val_fraction]
        for split, split_stems in stems.items():
            if not split_stems:
                raise empty_split_error(
                    f'folder {root}',
                    split,
                    fractions,
                    val_fraction,
                    'config.dataset.folder_val_fraction',
                    f'{layout.split_dir}/train.txt and val.txt',
                    'image',
                )
    return {
        split: [(s, images[s], masks[s]) for s in sorted(set(split_stems))]
        for split, split_stems in stems.items()
    }


class Folder(tfds.core.GeneratorBasedBuilder):
    """A user's images and masks (see the module docstring); needs a `FolderConfig`."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    _label_counts: common.LabelCounts | None = None  # Set while preparing.

    def _class_file(self) -> str:
        return os.path.join(self._root(), 'classes.txt')

    def _root(self) -> str:
        config = self.builder_config
        if not isinstance(config, FolderConfig):
            raise errors.UserError(
                'The folder dataset needs its root: build it with '
                'fcn_unet_jax.data.builders.get_builder (config.dataset.folder_root) or '
                'Folder(config=folder.config_for_root(root)).'
            )
        return config.root

    def _info(self) -> tfds.core.DatasetInfo:
        if os.path.isfile(self._class_file()):
            metadata = common.metadata(*parse_classes(self._class_file()))
        else:
            # Filled in while preparing (largest label + 1) and read back from the prepared
            # copy afterwards.
            metadata = common.metadata([], [])
        return self.dataset_info_from_configs(
            description=__doc__,
            features=common.features(),
            supervised_keys=('image', 'segmentation_mask'),
            metadata=metadata,
        )

    def _download_and_prepare(self, dl_manager, download_config=None) -> None:
        self._label_counts = common.LabelCounts()
        super()._download_and_prepare(dl_manager, download_config)
        if not os.path.isfile(self._class_file()):  # The masks alone define the classes.
            self._label_counts.report(f'folder {self._root()}')

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # The data is the user's folder; nothing to download.
        plan = plan_splits(self._root(), self.builder_config.val_fraction)
        num_classes = None
        if os.path.isfile(self._class_file()):
            num_classes = len(parse_classes(self._class_file())[0])
        return {split: self._generate_examples(items, num_classes) for split, items in plan.items()}

    def _generate_examples(self, items: list, num_classes: int | None):
        for stem, image_path, mask_path in items:
            with open(image_path, 'rb') as f:
                image, image_size = common.load_image(f.read(), image_path)
            with open(mask_path, 'rb') as f:
                mask = common.read_index_mask(f.read(), mask_path)
            if mask.shape != image_size:
                raise errors.UserError(
                    f'Mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its '
                    f'image {image_path} is {image_size[1]}x{image_size[0]}.'
                )
            labels = np.unique(mask[mask != common.IGNORE_LABEL])
            if num_classes is not None:
                bad = labels[labels >= num_classes]
                if bad.size:
                    raise errors.UserError(
                        f'Mask {mask_path} holds label(s) {bad.tolist()} outside '
                        f'[0, {num_classes}) (classes.txt) that are not the ignore label 255.'
                    )
            elif labels.size and labels[-1] >= len(self.info.metadata['class_names']):
                self._grow_classes(int(labels[-1]) + 1, mask_path)
            if self._label_counts is not None:
                self._label_counts.add(mask)
            yield stem, common.example(image, mask, stem)

    def _grow_classes(self, num_classes: int, mask_path: str) -> None:
        """Raises the inferred class count; the metadata is saved when preparation ends."""
        logging.info(
            'folder %s: no classes.txt; %s holds label %d, so %d classes are assumed.',
            self._root(),
            mask_path,
            num_classes - 1,
            num_classes,
        )
        self.info.metadata['class_names'] = [f'class_{i}' for i in range(num_classes)]
        self.info.metadata['palette'] = common.voc_palette(num_classes)
