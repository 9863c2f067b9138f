"""`cityscapes_trainids`: Cityscapes fine annotations mapped to the 19 evaluation classes.

tfds' own `cityscapes` builder does not serve here: it fixes the image shape to
1024 x 2048, names its features `image_left` / `segmentation_label` and yields the raw
`gtFine_labelIds` (34 ids), so its data would need a second mapping pass and its shape
check rules out small test data. This builder reads the same archives itself and maps ids
to train ids while preparing.

Splits: `train` 2,975 / `validation` 500 on the official data (`leftImg8bit/<split>/<city>/
<city>_<seq>_<frame>_leftImg8bit.png` with `gtFine/<split>/<city>/..._gtFine_labelIds.png`).
The test split is left out: its public labels are empty. Archives in the manual dir:
`leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip`, or their extracted folders
(`leftImg8bit/`, `gtFine/`).

Labels: `ID_TO_TRAIN_ID` is cityscapesScripts' `labels.py` table; ids whose trainId is 255
or -1 (license plate, id -1, which never appears in the PNGs) become the ignore label 255,
as does any value outside 0..33.
"""

import os
import re

import numpy as np
import tensorflow_datasets as tfds

from fcn_unet_jax import errors
from fcn_unet_jax.data.builders import common, manual

# (id, trainId) from cityscapesScripts/helpers/labels.py, ids -1..33.
ID_TO_TRAIN_ID = {
    -1: -1,  # license plate
    0: 255,  # unlabeled
    1: 255,  # ego vehicle
    2: 255,  # rectification border
    3: 255,  # out of roi
    4: 255,  # static
    5: 255,  # dynamic
    6: 255,  # ground
    7: 0,  # road
    8: 1,  # sidewalk
    9: 255,  # parking
    10: 255,  # rail track
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    14: 255,  # guard rail
    15: 255,  # bridge
    16: 255,  # tunnel
    17: 5,  # pole
    18: 255,  # polegroup
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    29: 255,  # caravan
    30: 255,  # trailer
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}
CLASS_NAMES = (
    'road',
    'sidewalk',
    'building',
    'wall',
    'fence',
    'pole',
    'traffic light',
    'traffic sign',
    'vegetation',
    'terrain',
    'sky',
    'person',
    'rider',
    'car',
    'truck',
    'bus',
    'train',
    'motorcycle',
    'bicycle',
)
PALETTE = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)
IMAGES = manual.Source('leftImg8bit_trainvaltest.zip', 'leftImg8bit', 'train')
LABELS = manual.Source('gtFine_trainvaltest.zip', 'gtFine', 'train')
_IMAGE_NAME = re.compile(r'(.+)_leftImg8bit\.png')


def train_id_lut() -> np.ndarray:
    """Returns a (256,) uint8 table mapping a labelIds value to its train id (255 = ignore)."""
    lut = np.full(256, common.IGNORE_LABEL, dtype=np.uint8)
    for label_id, train_id in ID_TO_TRAIN_ID.items():
        if label_id >= 0 and 0 <= train_id < common.IGNORE_LABEL:
            lut[label_id] = train_id
    return lut


def to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Maps a `gtFine_labelIds` array (uint8) to train ids with 255 for ignored pixels."""
    return train_id_lut()[label_ids]


class CityscapesTrainids(tfds.core.GeneratorBasedBuilder):
    """Cityscapes fine annotations as 19 train ids (see the module docstring)."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Register at https://www.cityscapes-dataset.com/login/, download
    leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip and put them (or their
    extracted folders leftImg8bit/ and gtFine/) in the manual dir, which is
    `config.dataset.manual_dir` (default: `<data_dir>/downloads/manual`).
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=common.features(),
            supervised_keys=('image', 'segmentation_mask'),
            homepage='https://www.cityscapes-dataset.com',
            metadata=common.metadata(CLASS_NAMES, PALETTE),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        sources = [IMAGES, LABELS]
        located = manual.locate(
            os.fspath(dl_manager.manual_dir), sources, self.MANUAL_DOWNLOAD_INSTRUCTIONS
        )
        images, labels = (
            manual.extract(dl_manager, path, source) if is_archive else path
            for source, (path, is_archive) in zip(sources, located, strict=True)
        )
        return {
            split: self._generate_examples(
                os.path.join(images, folder), os.path.join(labels, folder)
            )
            for split, folder in (('train', 'train'), ('validation', 'val'))
        }

    def _generate_examples(self, image_dir: str, label_dir: str):
        for city in sorted(os.listdir(image_dir)):
            for name in sorted(os.listdir(os.path.join(image_dir, city))):
                match = _IMAGE_NAME.fullmatch(name)
                if not match:
                    continue
                image_id = match.group(1)
                image_path = os.path.join(image_dir, city, name)
                label_path = os.path.join(label_dir, city, f'{image_id}_gtFine_labelIds.png')
                if not os.path.isfile(label_path):
                    raise errors.UserError(f'{image_path} has no label file {label_path}.')
                with open(image_path, 'rb') as f:
                    image, size = common.load_image(f.read(), image_path)
                with open(label_path, 'rb') as f:
                    label_ids = common.read_index_mask(f.read(), label_path)
                if label_ids.shape != size:
                    raise errors.UserError(f'{label_path} is {label_ids.shape}, its image {size}.')
                yield image_id, common.example(image, to_train_ids(label_ids), image_id)
