"""Reading medical volumes (NIfTI, DICOM series), writing NIfTI label volumes, intensities.

`load_volume` reads a NIfTI file (`.nii`, `.nii.gz`) or a folder holding the files of one
DICOM series and returns a `Volume` whose `data` is in the closest canonical (RAS+) voxel
order: axis 0 runs towards the patient's Right, 1 towards Anterior, 2 towards Superior, as
nearly as the scan's orientation allows (oblique scans are permuted and flipped, never
resampled). So `data[:, :, k]` is an axial slice whichever way the file stores its voxels.
`affine` maps these canonical voxel indices to RAS+ millimetres (nibabel's convention).

DICOM series: slices are ordered by their position along the slice normal (the cross
product of the two `ImageOrientationPatient` direction cosines, dotted with
`ImagePositionPatient`), never by file name or `InstanceNumber`, which scanners and
anonymisers do not keep in spatial order. `RescaleSlope`/`RescaleIntercept` are applied
per slice (giving Hounsfield units for CT). The affine is built as nibabel's DICOM wrapper
builds it (rows, columns, slices; patient LPS) and then flipped to RAS+, which is the
space NIfTI affines live in.

`write_label_volume` writes labels (in the canonical order of a reference `Volume`) to a
NIfTI file in the reference's own voxel order, affine and header, so the file overlays the
reference image exactly in a viewer (ITK-SNAP, 3D Slicer) and in other tools that compare
voxel grids. DICOM SEG output is not supported: NIfTI labels open aligned with the DICOM
series in the same viewers.

`normalize_intensity` maps raw intensities (HU, MR signal) to a model-friendly range: a CT
window, per-volume percentile clipping + z-score (nnU-Net's per-case MRI z-score, made robust
to outliers by the clip), or nothing.

nibabel and pydicom are the `medical` extra (`pip install -e '.[medical]'`); they are
imported when a volume is first read or written, so the rest of the package works without.

Errors in the user's files and settings are `errors.UserError`s (ValueErrors) naming the
file or value; a missing extra is an `errors.MissingDependencyError` (an ImportError).
"""

import dataclasses
import os
import types
from typing import Any

import numpy as np

from fcn_unet_jax import errors

NIFTI_SUFFIXES = ('.nii.gz', '.nii')
INTENSITY_MODES = ('ct_window', 'percentile_zscore', 'none')
# Largest difference (in mm) between two affines' entries that still counts as the same
# voxel grid. Label tools often store affines in float32 (about 3e-5 mm at 500 mm), and
# real misregistrations are far larger than this.
AFFINE_TOLERANCE_MM = 1e-3
# Slice spacings of a DICOM series may differ by this fraction of their mean before the
# series counts as irregular (missing slices), which one affine cannot describe.
SLICE_SPACING_TOLERANCE = 0.01
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _nibabel() -> types.ModuleType:
    try:
        import nibabel
    except ImportError as error:
        raise errors.MissingDependencyError(
            "Reading medical volumes needs nibabel: pip install -e '.[medical]'."
        ) from error
    return nibabel


def _pydicom() -> types.ModuleType:
    try:
        import pydicom
    except ImportError as error:
        raise errors.MissingDependencyError(
            "Reading DICOM series needs pydicom: pip install -e '.[medical]'."
        ) from error
    return pydicom


@dataclasses.dataclass
class Volume:
    """A 3D volume in canonical (RAS+ closest) voxel order.

    Attributes:
      data: The voxels, shape (x, y, z): float32 for DICOM and for scaled or float NIfTI
        data, the stored integer type for unscaled integer NIfTI data (label files).
      affine: 4x4 map from `data`'s voxel indices to RAS+ millimetres.
      header: The `nibabel.Nifti1Header` of a NIfTI file, or for a DICOM series a dict
        summarising it (`SeriesInstanceUID`, `Modality`, `files` in slice order, ...).
      source: The file or folder it was read from.
      native_affine: The affine of the voxel order the source stores (before the
        canonical reordering); `write_label_volume` writes in that order.
    """

    data: np.ndarray
    affine: np.ndarray
    header: Any
    source: str
    native_affine: np.ndarray

    @property
    def axcodes(self) -> tuple[str, ...]:
        """The source's voxel axes as nibabel axis codes, e.g. `('L', 'P', 'S')`."""
        return _nibabel().aff2axcodes(self.native_affine)


def is_nifti(path: str) -> bool:
    """Whether `path` names a NIfTI file (by its suffix)."""
    return path.lower().endswith(NIFTI_SUFFIXES)


def case_id(path: str) -> str:
    """Returns a volume's case id: its name without `.nii.gz` / `.nii` (folders: the name)."""
    name = os.path.basename(os.path.normpath(path))
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _canonical(data: np.ndarray, native_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorders `data` to the closest RAS+ voxel order; returns (data, its affine)."""
    orientations = _nibabel().orientations
    ornt = orientations.io_orientation(native_affine)
    canonical = orientations.apply_orientation(data, ornt)
    affine = native_affine @ orientations.inv_ornt_aff(ornt, data.shape)
    # apply_orientation returns views with negative strides; a copy keeps later slicing and
    # tf/PNG encoding cheap and lets callers write into the data.
    return np.ascontiguousarray(canonical), affine


def _load_nifti(path: str) -> Volume:
    nibabel = _nibabel()
    try:
        image = nibabel.load(path)
        # dataobj applies scl_slope/inter; unscaled integer data keeps its type (labels).
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises several unrelated types for bad files.
        raise errors.UserError(f'Cannot read NIfTI file {path}: {error}') from error
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise errors.UserError(f'{path} holds a {data.ndim}D array {data.shape}; expected 3D.')
    if not np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.float32)
    native_affine = np.asarray(image.affine, dtype=np.float64)
    data, affine = _canonical(data, native_affine)
    return Volume(data, affine, image.header, path, native_affine)


def _dicom_files(folder: str) -> list[str]:
    files = sorted(
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if not name.startswith('.') and os.path.isfile(os.path.join(folder, name))
    )
    if not files:
        raise errors.UserError(f'DICOM folder {folder} holds no files.')
    return files


def _read_dicom(path: str) -> Any:
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(path)
    except Exception as error:  # InvalidDicomError, OSError, and parser errors.
        raise errors.UserError(f'Cannot read DICOM file {path}: {error}') from error


def _float_list(dataset: Any, keyword: str, length: int, path: str) -> np.ndarray:
    value = dataset.get(keyword)
    if value is None or len(value) != length:
        raise errors.UserError(f'DICOM file {path} lacks {keyword} ({length} numbers).')
    return np.asarray([float(v) for v in value], dtype=np.float64)


def _slice_step(
    distances: list[float],
    positions: list[np.ndarray],
    first: Any,
    normal: np.ndarray,
    folder: str,
) -> np.ndarray:
    """Returns the LPS step from one slice to the next of a series sorted by `distances`.

    Raises:
      ValueError: two slices share a position, or the spacing is irregular.
    """
    if len(positions) == 1:
        thickness = first.get('SpacingBetweenSlices') or first.get('SliceThickness') or 1.0
        return normal * float(thickness)
    steps = np.diff(distances)
    if np.any(steps <= 1e-6 * max(1.0, np.abs(distances).max())):
        raise errors.UserError(f'DICOM folder {folder} holds two slices at the same position.')
    if np.ptp(steps) > SLICE_SPACING_TOLERANCE * steps.mean():
        raise errors.UserError(
            f'DICOM folder {folder} has irregular slice spacing ({steps.min():.4g} to '
            f'{steps.max():.4g} mm); missing slices?'
        )
    # The first-to-last step also describes stacks sheared by a gantry tilt.
    return (positions[-1] - positions[0]) / (len(positions) - 1)


def _load_dicom_series(folder: str) -> Volume:
    files = _dicom_files(folder)
    datasets = [_read_dicom(path) for path in files]
    series = sorted({str(d.get('SeriesInstanceUID', '<none>')) for d in datasets})
    if len(series) > 1:
        raise errors.UserError(
            f'DICOM folder {folder} holds {len(series)} series; put each in its own folder. '
            f'SeriesInstanceUIDs: {", ".join(series)}'
        )
    first, first_path = datasets[0], files[0]
    orientation = _float_list(first, 'ImageOrientationPatient', 6, first_path)
    spacing = _float_list(first, 'PixelSpacing', 2, first_path)
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    # nibabel's convention: data axes (row index, column index, slice); rows advance along
    # the column cosine. This normal completes a right-handed frame with them.
    normal = np.cross(column_cosine, row_cosine)
    slices = []
    for dataset, path in zip(datasets, files, strict=True):
        if 'PixelData' not in dataset:
            raise errors.UserError(f'DICOM file {path} has no pixel data.')
        if int(dataset.get('NumberOfFrames', 1) or 1) > 1:
            raise errors.UserError(f'DICOM file {path} is multi-frame, which is not supported.')
        if not np.allclose(
            _float_list(dataset, 'ImageOrientationPatient', 6, path), orientation, atol=1e-4
        ):
            raise errors.UserError(
                f'DICOM file {path} has another ImageOrientationPatient than {first_path}.'
            )
        position = _float_list(dataset, 'ImagePositionPatient', 3, path)
        slices.append((float(position @ normal), position, dataset, path))
    slices.sort(key=lambda item: item[0])
    arrays = []
    for _, _, dataset, path in slices:
        try:
            pixels = dataset.pixel_array
        except Exception as error:  # Missing codec plugins, truncated data, bad headers.
            raise errors.UserError(
                f'Cannot decode the pixel data of DICOM file {path}: {error}'
            ) from error
        if arrays and pixels.shape != arrays[0].shape:
            raise errors.UserError(
                f'DICOM file {path} is {pixels.shape} but {slices[0][3]} is '
                f'{arrays[0].shape} (rows, columns).'
            )
        slope = float(dataset.get('RescaleSlope', 1.0) or 1.0)
        intercept = float(dataset.get('RescaleIntercept', 0.0) or 0.0)
        arrays.append(pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    data = np.stack(arrays, axis=-1)
    slice_step = _slice_step(
        [item[0] for item in slices], [item[1] for item in slices], first, normal, folder
    )
    lps = np.eye(4)
    lps[:3, 0] = column_cosine * spacing[0]
    lps[:3, 1] = row_cosine * spacing[1]
    lps[:3, 2] = slice_step
    lps[:3, 3] = slices[0][1]
    native_affine = _LPS_TO_RAS @ lps
    header = {
        'SeriesInstanceUID': series[0],
        'Modality': str(first.get('Modality', '')),
        'SeriesDescription': str(first.get('SeriesDescription', '')),
        'PatientID': str(first.get('PatientID', '')),
        'files': [item[3] for item in slices],
    }
    data, affine = _canonical(data, native_affine)
    return Volume(data, affine, header, folder, native_affine)


def load_volume(path: str) -> Volume:
    """Reads a NIfTI file or a folder holding one DICOM series.

    Args:
      path: A `.nii` / `.nii.gz` file, or a folder whose (non-hidden) files are the DICOM
        files of one series, one slice each.

    Returns:
      The volume in canonical voxel order (see the module docstring).

    Raises:
      ValueError: the path is neither; a file cannot be read or has no pixel data; a DICOM
        folder holds several series (the message lists their SeriesInstanceUIDs), slices of
        different orientation or size, repeated positions or irregular spacing. Every
        message names the file or folder.
      ImportError: nibabel or pydicom is not installed.
    """
    if os.path.isdir(path):
        return _load_dicom_series(path)
    if is_nifti(path) and os.path.isfile(path):
        return _load_nifti(path)
    raise errors.UserError(f'{path} is neither a NIfTI file (.nii, .nii.gz) nor a DICOM folder.')


def check_aligned(image: Volume, label: Volume) -> None:
    """Checks that a label volume lies on its image's voxel grid.

    Both are compared in canonical order, so a label file that stores the same grid in
    another voxel order (say LPS where the image is RAS) is accepted.

    Raises:
      ValueError: the shapes or the affines (beyond `AFFINE_TOLERANCE_MM`) differ; the
        message names both sources with their shapes and axis codes.
    """
    if image.data.shape != label.data.shape:
        what = 'shape'
    else:
        difference = np.abs(image.affine - label.affine).max()
        if difference <= AFFINE_TOLERANCE_MM:
            return
        what = f'affine (off by up to {difference:.4g} mm)'
    raise errors.UserError(
        f'Label volume {label.source} (shape {label.data.shape}, axes '
        f'{"".join(label.axcodes)}) does not match the {what} of image volume '
        f'{image.source} (shape {image.data.shape}, axes {"".join(image.axcodes)}).'
    )


def write_label_volume(labels: np.ndarray, reference: Volume, path: str) -> None:
    """Writes a label volume aligned with `reference` as NIfTI.

    The labels are put back into the reference's own voxel order and written with its
    native affine; a NIfTI reference also lends its header (voxel units, qform/sform codes,
    descriptions), with the data type and scaling reset for labels.

    Args:
      labels: Integer class indices in `reference`'s canonical order (shape of
        `reference.data`).
      reference: The image volume the labels belong to.
      path: Output file, `.nii` or `.nii.gz`.

    Raises:
      ValueError: `labels` has another shape than the reference, holds non-integers or
        values that neither uint8 nor int16 can hold, or `path` is not a NIfTI name.
    """
    nibabel = _nibabel()
    labels = np.asarray(labels)
    if labels.shape != reference.data.shape:
        raise errors.UserError(
            f'Labels of shape {labels.shape} for {reference.source} of shape '
            f'{reference.data.shape}.'
        )
    if not is_nifti(path):
        raise errors.UserError(f'{path}: label volumes are written as NIfTI (.nii or .nii.gz).')
    if labels.size and not np.array_equal(labels, np.round(labels)):
        raise errors.UserError(f'Labels for {path} are not integers.')
    low, high = (labels.min(), labels.max()) if labels.size else (0, 0)
    if low >= 0 and high <= np.iinfo(np.uint8).max:
        dtype = np.uint8
    elif np.iinfo(np.int16).min <= low and high <= np.iinfo(np.int16).max:
        dtype = np.int16
    else:
        raise errors.UserError(f'Labels for {path} span [{low}, {high}], beyond int16.')
    orientations = nibabel.orientations
    ornt = orientations.io_orientation(reference.native_affine)
    back = orientations.ornt_transform(orientations.axcodes2ornt('RAS'), ornt)
    native = np.ascontiguousarray(orientations.apply_orientation(labels.astype(dtype), back))
    if isinstance(reference.header, nibabel.Nifti1Header):
        header = reference.header.copy()
        header.set_data_dtype(dtype)
        # An image's intensity scaling must not turn label indices into other numbers.
        header.set_slope_inter(1.0, 0.0)
        header['cal_min'], header['cal_max'] = 0, 0
        # The header's qform/sform already hold the native affine, so nibabel keeps them
        # bit for bit instead of re-deriving a quaternion.
        image = nibabel.Nifti1Image(native, reference.native_affine, header)
    else:
        image = nibabel.Nifti1Image(native, reference.native_affine)
        image.header.set_data_dtype(dtype)
        image.set_qform(reference.native_affine, code='scanner')
        image.set_sform(reference.native_affine, code='scanner')
        image.header.set_xyzt_units('mm')
    nibabel.save(image, path)


def normalize_intensity(data: np.ndarray, mode: str, **params: Any) -> np.ndarray:
    """Maps raw intensities to a normalised float32 volume.

    Args:
      data: Raw intensities (any shape), e.g. `Volume.data`.
      mode: 'ct_window': clip to the window `level` +- `width` / 2 (in HU, params `level`
        and `width`, default 40 / 400: a soft-tissue window) and map it to [0, 1].
        'percentile_zscore': clip to the volume's `percentiles` (default (0.5, 99.5)),
        then subtract the clipped volume's mean and divide by its std (nnU-Net's per-case
        z-score; the clip keeps a few bright outliers from squashing the rest). 'none':
        the raw values as float32.
      **params: The mode's parameters named above.

    Returns:
      float32 array of `data`'s shape.

    Raises:
      ValueError: an unknown mode or parameter, a non-positive window width, or
        percentiles outside 0 <= low < high <= 100.
    """
    allowed = {'ct_window': {'level', 'width'}, 'percentile_zscore': {'percentiles'}, 'none': set()}
    if mode not in allowed:
        raise errors.UserError(
            f'Unknown intensity mode {mode!r}; expected one of {INTENSITY_MODES}.'
        )
    unknown = set(params) - allowed[mode]
    if unknown:
        raise errors.UserError(f'Intensity mode {mode!r} takes no parameter(s) {sorted(unknown)}.')
    data = np.asarray(data, dtype=np.float32)
    if mode == 'ct_window':
        level, width = float(params.get('level', 40.0)), float(params.get('width', 400.0))
        if width <= 0:
            raise errors.UserError(f'CT window width must be positive, got {width}.')
        return np.clip((data - (level - width / 2)) / width, 0.0, 1.0).astype(np.float32)
    if mode == 'percentile_zscore':
        low, high = (float(p) for p in params.get('percentiles', (0.5, 99.5)))
        if not 0 <= low < high <= 100:
            raise errors.UserError(
                f'Percentiles must satisfy 0 <= low < high <= 100, got {low, high}.'
            )
        clipped = np.clip(data, *np.percentile(data, [low, high]))
        # nnU-Net's floor on the std: a constant volume maps to zeros, not NaNs.
        return ((clipped - clipped.mean()) / max(float(clipped.std()), 1e-8)).astype(np.float32)
    return data.copy()


def to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Quantises `values` in [low, high] linearly to uint8 [0, 255] (clipping outside).

    `values ~= low + (high - low) / 255 * result`. A zero-width range gives zeros.
    """
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.clip(np.round((values - low) * scale), 0, 255).astype(np.uint8)


def slice_image(data: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Returns slice `index` along canonical `axis` as an upright 2D image (rows, columns).

    With RAS+ data, the slice's second remaining axis (A for axial, S for coronal and
    sagittal slices) grows from the bottom row to the top row, so the front (axial) or the
    head (coronal, sagittal) is at the top; the first remaining axis (R for axial and
    coronal, A for sagittal) grows along the columns. `insert_slice` inverts this.
    """
    return np.flipud(np.take(data, index, axis=axis).T)


def insert_slice(volume: np.ndarray, axis: int, index: int, image: np.ndarray) -> None:
    """Writes a 2D image from `slice_image` back into `volume` (in place)."""
    target = [slice(None)] * volume.ndim
    target[axis] = index
    volume[tuple(target)] = np.flipud(image).T
