"""Finding manually downloaded datasets in the manual dir, as archives or extracted folders.

A dataset root (for example `VOC2012/`, holding `ImageSets/`, `JPEGImages/`, ...) is looked
for in the manual dir up to three folders deep (so `VOC2012/`, `VOCdevkit/VOC2012/` and
`VOCtrainval_11-May-2012/VOCdevkit/VOC2012/` all work); failing that, the official archive
in the manual dir is extracted with tfds' download manager (into its `extract_dir`, once)
and the root is looked for inside it. Nothing is ever downloaded. Missing or wrong
archives are `errors.UserError`s naming the manual dir and the files.
"""

import dataclasses
import glob
import os

import tensorflow_datasets as tfds

from fcn_unet_jax import errors

_MAX_DEPTH = 3


@dataclasses.dataclass(frozen=True)
class Source:
    """One manually downloaded dataset.

    Attributes:
      archive: The official archive's file name, looked for in the manual dir.
      root: Path pattern of the dataset root inside the archive, e.g. `VOC2012` or
        `benchmark_RELEASE/dataset`.
      marker: A file or folder, relative to the root, that a complete root holds.
    """

    archive: str
    root: str
    marker: str


def find_extracted(folder: str, source: Source) -> str | None:
    """Returns the shallowest dataset root of `source` under `folder`, or None."""
    for depth in range(_MAX_DEPTH + 1):
        pattern = os.path.join(glob.escape(folder), *(['*'] * depth), source.root)
        for candidate in sorted(glob.glob(pattern)):
            if os.path.exists(os.path.join(candidate, source.marker)):
                return candidate
    return None


def locate(manual_dir: str, sources: list[Source], instructions: str) -> list[tuple[str, bool]]:
    """Finds each source in the manual dir, as an extracted root or else as its archive.

    Args:
      manual_dir: The manual dir.
      sources: The datasets a builder config needs.
      instructions: The builder's MANUAL_DOWNLOAD_INSTRUCTIONS, for the error message.

    Returns:
      One `(path, is_archive)` per source: the extracted root, or the archive's path.

    Raises:
      MissingArchivesError: some sources are absent (an AssertionError, the type tfds raises
        for an empty manual dir); the message names every missing archive and the manual dir.
    """
    found, missing = [], []
    for source in sources:
        root = find_extracted(manual_dir, source)
        archive = os.path.join(manual_dir, source.archive)
        if root is not None:
            found.append((root, False))
        elif os.path.isfile(archive):
            found.append((archive, True))
        else:
            missing.append(source.archive)
    if missing:
        raise missing_error(manual_dir, missing, instructions)
    return found


def extract(dl_manager: tfds.download.DownloadManager, archive: str, source: Source) -> str:
    """Extracts `archive` (once; tfds caches it) and returns the dataset root inside.

    Raises:
      ValueError: the archive does not hold the expected root (the message names it).
    """
    root = find_extracted(os.fspath(dl_manager.extract(archive)), source)
    if root is None:
        raise errors.UserError(f'{archive} holds no {source.root}/{source.marker}.')
    return root


def read_member(archive: str, suffix: str, dl_manager: tfds.download.DownloadManager) -> bytes:
    """Returns the content of the first member of `archive` whose path ends with `suffix`.

    Streams the archive instead of extracting it, for when one small file is needed.

    Raises:
      ValueError: no member matches (the message names the archive).
    """
    for path, member in dl_manager.iter_archive(archive):
        if path.replace(os.sep, '/').endswith(suffix):
            return member.read()
    raise errors.UserError(f'{archive} holds no file ending with {suffix}.')


class MissingArchivesError(errors.UserError, AssertionError):
    """Manually downloaded files are absent (an AssertionError, as tfds raises for them).

    Its text (`str`) holds the download instructions too, as tfds' own error does; entry
    points print them as the hint line.
    """

    def __str__(self) -> str:
        return f'{self.message}\n{self.hint}' if self.hint else self.message


def missing_error(manual_dir: str, missing: list[str], instructions: str) -> MissingArchivesError:
    """Returns the error for manually downloaded files that are absent.

    Its message names the manual dir and the archives; the hint is the download
    instructions, on one line.

    Args:
      manual_dir: The manual dir that was searched.
      missing: The archives that were not found there (nor their extracted folders).
      instructions: The builder's MANUAL_DOWNLOAD_INSTRUCTIONS.
    """
    return MissingArchivesError(
        f'Missing in the manual dir {manual_dir}: {", ".join(missing)} (the archive, or its '
        'extracted folder).',
        hint=' '.join(instructions.split()),
    )
