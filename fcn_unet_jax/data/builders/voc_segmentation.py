"""`voc_segmentation`: PASCAL VOC 2012 segmentation, alone or with SBD's extra labels.

Configs (21 classes, 255 = VOC's object boundaries and "void", kept as the ignore label):

* `voc2012`: `train` 1,464 / `validation` 1,449, the VOC2012 `ImageSets/Segmentation`
  lists, labels from the palette PNGs in `SegmentationClass/` (palette index = class).
* `sbd_fcn`: the FCN paper's split. `train` = SBD's `train.txt` (8,498), images from SBD's
  `img/`, labels `GTcls.Segmentation` of SBD's `cls/<id>.mat`. `validation` = seg11valid
  (736 on the official archives): the VOC2011 segmentation val images that are not in SBD
  train. FCN ships this list as `data/pascal/seg11valid.txt`; we derive it from the
  archives as `sorted((VOC2012 seg val & VOC2011 seg val) - SBD train)`. VOC2011's val is a
  subset of VOC2012's (VOC keeps its split assignments across years), so the intersection
  changes nothing on the real data; it guarantees that every validation image has a
  VOC2012 PNG label, which is what we use (FCN read the VOC2011 copies of the same
  annotations). Only the list `ImageSets/Segmentation/val.txt` is read from VOC2011.
* `train_aug`: the common augmented set. `train` = (SBD train | SBD val | VOC2012 seg
  train) - VOC2012 seg val (10,582 on the official archives), labels from the VOC2012 PNG
  for ids in VOC2012 seg train, else from SBD's `.mat` (with the matching image).
  `validation` = VOC2012 seg val (1,449).

Archives (in the manual dir; their extracted folders are accepted too, see `manual`):
`VOCtrainval_11-May-2012.tar` (`VOCdevkit/VOC2012/...`), `benchmark.tgz`
(`benchmark_RELEASE/dataset/{cls,img,train.txt,val.txt}`) and, for `sbd_fcn`,
`VOCtrainval_25-May-2011.tar` (`.../VOCdevkit/VOC2011/...`, streamed for its val list).
"""

import dataclasses
import os

import numpy as np
import scipy.io
import tensorflow_datasets as tfds
from absl import logging

from fcn_unet_jax import errors
from fcn_unet_jax.data.builders import common, manual

CLASS_NAMES = (
    'background',
    'aeroplane',
    'bicycle',
    'bird',
    'boat',
    'bottle',
    'bus',
    'car',
    'cat',
    'chair',
    'cow',
    'diningtable',
    'dog',
    'horse',
    'motorbike',
    'person',
    'pottedplant',
    'sheep',
    'sofa',
    'train',
    'tvmonitor',
)
VOC2012 = manual.Source('VOCtrainval_11-May-2012.tar', 'VOC2012', 'ImageSets/Segmentation/val.txt')
VOC2011 = manual.Source('VOCtrainval_25-May-2011.tar', 'VOC2011', 'ImageSets/Segmentation/val.txt')
SBD = manual.Source('benchmark.tgz', 'benchmark_RELEASE/dataset', 'train.txt')

_INSTRUCTIONS = """\
Put the official archives (or their extracted folders) in the manual dir, which is
`config.dataset.manual_dir` (default: `<data_dir>/downloads/manual`):
  voc2012:   VOCtrainval_11-May-2012.tar  (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/)
  sbd_fcn:   benchmark.tgz  (SBD, http://home.bharathh.info/pubs/codes/SBD/download.html),
             VOCtrainval_11-May-2012.tar and VOCtrainval_25-May-2011.tar
             (http://host.robots.ox.ac.uk/pascal/VOC/voc2011/; only its segmentation val
             list is read)
  train_aug: benchmark.tgz and VOCtrainval_11-May-2012.tar
Extracted folders may sit up to three levels below the manual dir, e.g.
`VOCdevkit/VOC2012/` or `benchmark_RELEASE/dataset/`.
"""


@dataclasses.dataclass(eq=False)
class VocSegmentationConfig(tfds.core.BuilderConfig):
    """Which archives a config needs.

    Attributes:
      sources: The manually downloaded datasets the config reads.
    """

    sources: tuple[manual.Source, ...] = ()


def read_ids(data: bytes) -> list[str]:
    """Parses an image-id list (one id a line, as in VOC's ImageSets and SBD)."""
    return [line.split()[0] for line in data.decode().splitlines() if line.strip()]


def seg11valid_ids(
    voc2012_val: list[str], voc2011_val: list[str], sbd_train: list[str]
) -> list[str]:
    """Returns FCN's seg11valid: VOC2011 seg val images with VOC2012 labels, not in SBD train."""
    return sorted((set(voc2012_val) & set(voc2011_val)) - set(sbd_train))


def train_aug_ids(
    sbd_train: list[str], sbd_val: list[str], voc_train: list[str], voc_val: list[str]
) -> list[str]:
    """Returns the augmented train set: SBD train + val + VOC2012 train, minus VOC2012 val."""
    return sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))


def read_sbd_mask(path: str) -> np.ndarray:
    """Returns `GTcls.Segmentation` of an SBD `cls/*.mat` file as uint8 (H, W).

    Raises:
      ValueError: the file cannot be read or has no `GTcls.Segmentation` (names the file).
    """
    try:
        gt = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)['GTcls']
        return np.asarray(gt.Segmentation, dtype=np.uint8)
    except (OSError, ValueError, KeyError, AttributeError) as error:
        raise errors.UserError(f'Cannot read GTcls.Segmentation from {path}: {error}') from error


def _read_file(path: str) -> bytes:
    with open(path, 'rb') as f:
        return f.read()


class VocSegmentation(tfds.core.GeneratorBasedBuilder):
    """PASCAL VOC 2012 segmentation with optional SBD labels (see the module docstring)."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
    BUILDER_CONFIGS = [
        VocSegmentationConfig(
            name='voc2012',
            description='VOC2012 segmentation: train 1,464 / validation 1,449.',
            sources=(VOC2012,),
        ),
        VocSegmentationConfig(
            name='sbd_fcn',
            description='FCN split: SBD train 8,498 / seg11valid 736.',
            sources=(SBD, VOC2012, VOC2011),
        ),
        VocSegmentationConfig(
            name='train_aug',
            description='SBD + VOC2012 train minus VOC2012 val: 10,582 / validation 1,449.',
            sources=(SBD, VOC2012),
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=common.features(),
            supervised_keys=('image', 'segmentation_mask'),
            homepage='http://host.robots.ox.ac.uk/pascal/VOC/voc2012/',
            metadata=common.metadata(CLASS_NAMES, common.voc_palette(len(CLASS_NAMES))),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        sources = self.builder_config.sources
        located = dict(
            zip(
                sources,
                manual.locate(os.fspath(dl_manager.manual_dir), list(sources), _INSTRUCTIONS),
                strict=True,
            )
        )
        roots = {
            source: manual.extract(dl_manager, path, source) if is_archive else path
            for source, (path, is_archive) in located.items()
            if source != VOC2011  # Only one list is needed from VOC2011: streamed below.
        }
        voc = roots[VOC2012]
        voc_lists = os.path.join(voc, 'ImageSets', 'Segmentation')
        voc_train = read_ids(_read_file(os.path.join(voc_lists, 'train.txt')))
        voc_val = read_ids(_read_file(os.path.join(voc_lists, 'val.txt')))

        def from_voc(ids: list[str]) -> list[tuple[str, str, str]]:
            return [
                (
                    i,
                    os.path.join(voc, 'JPEGImages', f'{i}.jpg'),
                    os.path.join(voc, 'SegmentationClass', f'{i}.png'),
                )
                for i in ids
            ]

        if self.builder_config.name == 'voc2012':
            return {
                'train': self._generate_examples(from_voc(voc_train)),
                'validation': self._generate_examples(from_voc(voc_val)),
            }

        sbd = roots[SBD]
        sbd_train = read_ids(_read_file(os.path.join(sbd, 'train.txt')))

        def from_sbd(ids: list[str]) -> list[tuple[str, str, str]]:
            return [
                (i, os.path.join(sbd, 'img', f'{i}.jpg'), os.path.join(sbd, 'cls', f'{i}.mat'))
                for i in ids
            ]

        if self.builder_config.name == 'sbd_fcn':
            path, is_archive = located[VOC2011]
            if is_archive:
                member = f'{VOC2011.root}/{VOC2011.marker}'
                voc2011_val = read_ids(manual.read_member(path, member, dl_manager))
            else:
                voc2011_val = read_ids(_read_file(os.path.join(path, VOC2011.marker)))
            valid = seg11valid_ids(voc_val, voc2011_val, sbd_train)
            logging.info('seg11valid: %d images (736 on the official archives).', len(valid))
            return {
                'train': self._generate_examples(from_sbd(sorted(sbd_train))),
                'validation': self._generate_examples(from_voc(valid)),
            }

        sbd_val = read_ids(_read_file(os.path.join(sbd, 'val.txt')))
        train = train_aug_ids(sbd_train, sbd_val, voc_train, voc_val)
        voc_labelled = set(voc_train)
        items = [from_voc([i])[0] if i in voc_labelled else from_sbd([i])[0] for i in train]
        logging.info('train_aug: %d images (10,582 on the official archives).', len(items))
        return {
            'train': self._generate_examples(items),
            'validation': self._generate_examples(from_voc(voc_val)),
        }

    def _generate_examples(self, items: list[tuple[str, str, str]]):
        for image_id, image_path, mask_path in items:
            image, size = common.load_image(_read_file(image_path), image_path)
            if mask_path.endswith('.mat'):
                mask = read_sbd_mask(mask_path)
            else:
                mask = common.read_index_mask(_read_file(mask_path), mask_path)
            if mask.shape != size:
                raise errors.UserError(
                    f'{mask_path} is {mask.shape}, its image {image_path} {size}.'
                )
            yield image_id, common.example(image, mask, image_id)
