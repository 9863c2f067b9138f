r"""Command line: download a pretrained original, check its published hash, convert it.

    python -m fcn_unet_jax.weights.download NAME [--dir=weights] [--url=MIRROR_URL]
    python -m fcn_unet_jax.weights.download --list

`NAME` is the checkpoint a config starts from: `vgg16_fcn` is what `configs/fcn_voc.py:32s`
names as `weights/vgg16_fcn`, `unet_resnet50_imagenet` what
`configs/folder_preset.py:unet_resnet50,...` names, and so on (`ORIGINALS`, or `--list`).
The original file (torchvision's, Keras Applications' or the one segmentation_models_pytorch
uses) is fetched from its official URL into `DIR/downloads/`, its hash is checked against
the published one, and `weights.convert_file` turns it into `DIR/NAME` for the model the
name is for, ready for `--config.init_from=DIR/NAME`.

Hashes: torchvision publishes the first hex digits of each file's SHA-256 in its file name
(`resnet50-0676ba61.pth`), as `torch.hub` checks them; Keras Applications publishes the MD5
of each `.h5` file in its source (`file_hash=` of `keras.applications`). Those are the
checks made here; no other hash is published for these files, so none is invented.

Nothing half-written is left behind: the download goes to a temporary file in
`DIR/downloads/` that is renamed only once its hash matches (and deleted when it does not),
and the conversion writes a temporary folder that is renamed to `DIR/NAME` when complete. An
original already in `DIR/downloads/` with the right hash is reused, and a `DIR/NAME` that
already holds a converted checkpoint is left as it is. `--url` fetches the same file from a
mirror (its hash is still checked).

torchvision's `.pth` files are torch pickles, so converting them needs torch (`pip install
torch`; the CPU build is enough); Keras' `.h5` files need only h5py. Without torch the
original is still downloaded and checked, and a rerun after installing torch converts it.

Errors (no network, a hash that does not match, an unknown name, torch missing) are one
`error: ...` line with exit status 1 (`--traceback` adds the traceback; see
`fcn_unet_jax.errors`).
"""

import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence

from absl import app, flags, logging

from fcn_unet_jax import errors
from fcn_unet_jax.weights.converted import convert_file, is_pretrained_checkpoint

FLAGS = flags.FLAGS

DOWNLOADS_SUBDIR = 'downloads'
_CHUNK = 1 << 20
_TIMEOUT_S = 60
_TORCHVISION = 'https://download.pytorch.org/models/'
_KERAS = 'https://storage.googleapis.com/tensorflow/keras-applications/'
# torch.hub's rule: the hex digits after the last '-' of the file name start its SHA-256.
_HASH_IN_NAME = re.compile(r'-([a-f0-9]{6,})\.')


@dataclasses.dataclass(frozen=True)
class Original:
    """A published weights file and the model it is converted for.

    Attributes:
      url: the official URL.
      model: the model (`models.MODELS`) the converted checkpoint initialises.
      md5: the MD5 the publisher gives (Keras Applications), or None.
      num_classes: the class count to convert for (None: the file's, or any for a backbone).
      note: what the file is, and anything the config needs to use it.
    """

    url: str
    model: str
    md5: str | None = None
    num_classes: int | None = None
    note: str = ''

    @property
    def file_name(self) -> str:
        """The file's name (the last part of its URL)."""
        return self.url.rstrip('/').rsplit('/', 1)[-1]

    @property
    def sha256_prefix(self) -> str | None:
        """The SHA-256 prefix in a torchvision file name, or None."""
        match = _HASH_IN_NAME.search(self.file_name)
        return match.group(1) if match else None


_VGG16 = _TORCHVISION + 'vgg16-397923af.pth'
_RESNET50 = _TORCHVISION + 'resnet50-0676ba61.pth'
_RESNET101 = _TORCHVISION + 'resnet101-63fe2227.pth'
_KERAS_VGG16 = _KERAS + 'vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5'
_KERAS_VGG16_NOTOP = _KERAS + 'vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5'
_KERAS_RESNET50_NOTOP = _KERAS + 'resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5'

# The names are the default `init_from` directories of configs/ (under weights/).
ORIGINALS: dict[str, Original] = {
    'vgg16_fcn': Original(
        _VGG16, 'fcn32s_vgg16', note='torchvision ImageNet VGG16 (configs/fcn_voc.py:32s)'
    ),
    'vgg16_fcn8s_atonce': Original(
        _VGG16, 'fcn8s_atonce_vgg16', note='torchvision ImageNet VGG16 (fcn_voc.py:8s_atonce)'
    ),
    'unet_vgg16_imagenet': Original(
        _VGG16,
        'unet_vgg16',
        note='torchvision ImageNet VGG16, also the "imagenet" vgg16 encoder of smp '
        '(folder_preset.py:unet_vgg16)',
    ),
    'fcn_resnet50_imagenet': Original(
        _RESNET50,
        'fcn_resnet50',
        note='torchvision ImageNet ResNet-50 (fcn_resnet_voc.py:50, folder_preset.py)',
    ),
    'fcn_resnet101_imagenet': Original(
        _RESNET101,
        'fcn_resnet101',
        note='torchvision ImageNet ResNet-101 (fcn_resnet_voc.py:101, folder_preset.py)',
    ),
    'unet_resnet50_imagenet': Original(
        _RESNET50,
        'unet_resnet50',
        note='torchvision ImageNet ResNet-50 (folder_preset.py:unet_resnet50)',
    ),
    'smp_unet_resnet50_imagenet': Original(
        _TORCHVISION + 'resnet50-19c8e357.pth',
        'unet_resnet50',
        note='the file of smp\'s resnet50 "imagenet" encoder (torchvision\'s first release)',
    ),
    'fcn_resnet50_coco': Original(
        _TORCHVISION + 'fcn_resnet50_coco-1167a1af.pth',
        'fcn_resnet50',
        note='torchvision FCN-ResNet50, COCO with the 21 VOC labels, aux head '
        '(--config.model.aux_head=True --config.model.num_classes=21)',
    ),
    'fcn_resnet101_coco': Original(
        _TORCHVISION + 'fcn_resnet101_coco-7ecb50ca.pth',
        'fcn_resnet101',
        note='torchvision FCN-ResNet101, COCO with the 21 VOC labels, aux head '
        '(--config.model.aux_head=True --config.model.num_classes=21)',
    ),
    'keras_vgg16_fcn': Original(
        _KERAS_VGG16,
        'fcn32s_vgg16',
        md5='64373286793e3c8b2b4e3219cbf3544b',
        note='Keras Applications VGG16 with its top (fc1/fc2 become fc6/fc7)',
    ),
    'keras_unet_vgg16_imagenet': Original(
        _KERAS_VGG16_NOTOP,
        'unet_vgg16',
        md5='6d6bbae143d832006294945121d1f1fc',
        note='Keras Applications VGG16 without top',
    ),
    'keras_fcn_resnet50_imagenet': Original(
        _KERAS_RESNET50_NOTOP,
        'fcn_resnet50',
        md5='4d473c1dd8becc155b73f8504c6f6626',
        note='Keras Applications ResNet50 without top, the Caffe-style ResNet '
        '(--config.model.resnet_variant=caffe)',
    ),
}


class HashMismatchError(errors.UserError):
    """A downloaded file is not the published one."""


def file_digests(path: str | os.PathLike[str]) -> dict[str, str]:
    """The hex SHA-256 and MD5 of a file, read in chunks."""
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, 'rb') as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            md5.update(chunk)
    return {'sha256': sha256.hexdigest(), 'md5': md5.hexdigest()}


def hash_problem(original: Original, digests: dict[str, str]) -> str | None:
    """What does not match the published hashes of `original`, or None when all match."""
    prefix = original.sha256_prefix
    if prefix and not digests['sha256'].startswith(prefix):
        return f'its SHA-256 is {digests["sha256"]}, the published one starts with {prefix}'
    if original.md5 and digests['md5'] != original.md5:
        return f'its MD5 is {digests["md5"]}, the published one is {original.md5}'
    return None


def download(original: Original, directory: str, *, url: str | None = None) -> str:
    """Fetches `original` into `directory` (reused when already there), hash checked.

    The bytes go to a temporary file beside the destination, renamed when the hash
    matches, so an interrupted or damaged download never takes the file's name.

    Args:
      original: what to fetch and how to check it.
      directory: where the file goes (created when missing).
      url: fetch from here instead of `original.url` (a mirror); the hash is still checked.

    Returns:
      The path of the checked file.

    Raises:
      HashMismatchError: the downloaded bytes are not the published file (nothing is kept).
      UserError: the URL cannot be fetched.
    """
    path = os.path.join(directory, original.file_name)
    if os.path.isfile(path) and hash_problem(original, file_digests(path)) is None:
        logging.info('Using %s, already downloaded (hash checked).', path)
        return path
    os.makedirs(directory, exist_ok=True)
    source = url or original.url
    logging.info('Downloading %s to %s.', source, path)
    descriptor, partial = tempfile.mkstemp(prefix=f'.{original.file_name}.', dir=directory)
    try:
        with os.fdopen(descriptor, 'wb') as out:
            try:
                with urllib.request.urlopen(source, timeout=_TIMEOUT_S) as response:
                    shutil.copyfileobj(response, out, _CHUNK)
            except (urllib.error.URLError, OSError, ValueError) as error:
                reason = getattr(error, 'reason', None) or error
                raise errors.UserError(
                    f'Cannot download {source}: {reason}.',
                    hint=f'download it by other means into {directory}/ and run the command '
                    'again (the file is checked and converted), or pass --url=MIRROR',
                ) from error
        problem = hash_problem(original, file_digests(partial))
        if problem:
            raise HashMismatchError(
                f'{source} is not the published {original.file_name}: {problem}; nothing was kept.',
                hint='try again (a cut connection or a proxy page gives such a file)',
            )
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def fetch_and_convert(
    name: str,
    original: Original,
    directory: str,
    *,
    url: str | None = None,
) -> str:
    """Downloads `original` (see `download`) and converts it into `directory/name`.

    The conversion (`weights.convert_file`) writes a temporary folder in `directory` that
    is renamed to `directory/name` once complete.

    Args:
      name: the converted checkpoint's folder name.
      original: the file and the model it is for.
      directory: the weights folder: originals go to its `downloads/`.
      url: a mirror of `original.url`.

    Returns:
      The converted checkpoint's directory (for `--config.init_from`).

    Raises:
      UserError: the output exists but is not a converted checkpoint, or a download error.
      WeightImportError: the file does not fit the model.
    """
    output = os.path.join(directory, name)
    if is_pretrained_checkpoint(output):
        logging.info('%s already holds a converted checkpoint; nothing to do.', output)
        return output
    if os.path.exists(output):
        raise errors.UserError(
            f'{output} exists and is not a converted checkpoint; it is left as it is.',
            hint='move it away, or pass another --dir',
        )
    path = download(original, os.path.join(directory, DOWNLOADS_SUBDIR), url=url)
    # Renamed into place when complete; os.mkdir keeps the user's umask (mkdtemp's is 0700).
    staging = os.path.join(directory, f'.{name}.{uuid.uuid4().hex[:8]}')
    os.mkdir(staging)
    try:
        convert_file(path, original.model, staging, num_classes=original.num_classes)
        os.replace(staging, output)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    return output


def listing() -> str:
    """One line per name: the name, the model it initialises and what the file is."""
    width = max(len(name) for name in ORIGINALS)
    return '\n'.join(
        f'{name:<{width}}  {o.model:<20} {o.note}' for name, o in sorted(ORIGINALS.items())
    )


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines the program's flags (when run as a program, or in a test's own FlagValues)."""
    fv = {'flag_values': flag_values}
    flags.DEFINE_string(
        'dir', 'weights', 'Weights folder: originals go to DIR/downloads, NAME to DIR/NAME.', **fv
    )
    flags.DEFINE_string(
        'url', None, 'Fetch the file from this mirror URL (hash still checked).', **fv
    )
    flags.DEFINE_bool('list', False, 'List the names and exit.', **fv)


def main(argv: Sequence[str], flag_values: flags.FlagValues = FLAGS) -> None:
    """Downloads and converts the one NAME on the command line (`--list`: prints the names).

    Args:
      argv: the program name and NAME.
      flag_values: the parsed flags (`define_flags`).
    """
    if flag_values.list:
        print(listing())
        return
    if len(argv) != 2:
        raise errors.UserError(
            f'Give one NAME, got {list(argv[1:]) or "none"}.',
            hint=f'one of {", ".join(sorted(ORIGINALS))} (--list says what each is)',
        )
    name = argv[1]
    if name not in ORIGINALS:
        raise errors.UserError(
            f'Unknown weights name {name!r}.',
            hint=f'one of {", ".join(sorted(ORIGINALS))} (--list says what each is)',
        )
    output = fetch_and_convert(name, ORIGINALS[name], flag_values.dir, url=flag_values.url)
    print(f'Wrote {output}; start training from it with --config.init_from={output}')


if __name__ == '__main__':
    from fcn_unet_jax.weights.convert import INPUT_ERRORS  # The converter's input errors.

    define_flags()
    app.run(errors.guard(main, user_errors=INPUT_ERRORS), flags_parser=errors.parse_flags)
