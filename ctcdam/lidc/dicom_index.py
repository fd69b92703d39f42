"""Header-only index of the DICOM files of one LIDC patient folder, cached on disk.

Both TCIA layouts live under ``<root>/<patient_id>/``: the old ``<studyUID>/<seriesUID>/*.dcm`` and the
newer ``<date-desc>/<num-desc>/1-001.dcm``. The index walks the patient folder, reads the header of every
``.dcm`` file (any case) without its pixels, and groups the files by SeriesInstanceUID, so other series in
the same folder (localizers, CR/DX) are simply other keys. The headers are cached as JSON keyed by each
file's size and mtime: a rerun reads no header twice.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag

from ctcdam import io

#: Bump when SliceHeader changes: older caches are then ignored, never misread.
CACHE_VERSION = 3
#: Values longer than this are not read by the header pass (pydicom's defer_size): only their offset is kept.
_DEFER_BYTES = 4096
_PIXEL_DATA = Tag(0x7FE0, 0x0010)

#: The header tags the strict loader needs (name -> DICOM tag, for error messages).
HEADER_TAGS: dict[str, str] = {
    "StudyInstanceUID": "(0020,000D)",
    "SeriesInstanceUID": "(0020,000E)",
    "InstanceNumber": "(0020,0013)",
    "ImagePositionPatient": "(0020,0032)",
    "ImageOrientationPatient": "(0020,0037)",
    "PixelSpacing": "(0028,0030)",
    "Rows": "(0028,0010)",
    "Columns": "(0028,0011)",
    "RescaleIntercept": "(0028,1052)",
    "RescaleSlope": "(0028,1053)",
}


@dataclass(frozen=True)
class SliceHeader:
    """What the loader needs from one DICOM file; a tag absent from the file is None."""

    path: str  # relative to the patient folder
    sop_uid: str | None
    study_uid: str | None
    series_uid: str | None
    instance_number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    rows: int | None
    columns: int | None
    rescale_intercept: float | None
    rescale_slope: float | None
    # Where the pixel bytes are, so the loader can read uncompressed slices without parsing the header again.
    transfer_syntax: str | None = None
    bits_allocated: int | None = None
    pixel_representation: int | None = None
    samples_per_pixel: int | None = None
    pixel_offset: int | None = None
    pixel_length: int | None = None

    def missing_tags(self) -> list[str]:
        """Names (with tag numbers) of the loader's required tags absent from this file."""
        values = {
            "StudyInstanceUID": self.study_uid,
            "SeriesInstanceUID": self.series_uid,
            "InstanceNumber": self.instance_number,
            "ImagePositionPatient": self.position,
            "ImageOrientationPatient": self.orientation,
            "PixelSpacing": self.pixel_spacing,
            "Rows": self.rows,
            "Columns": self.columns,
            "RescaleIntercept": self.rescale_intercept,
            "RescaleSlope": self.rescale_slope,
        }
        return [f"{name} {HEADER_TAGS[name]}" for name, value in values.items() if value is None]


@dataclass(frozen=True)
class UnreadableFile:
    """A ``.dcm`` file whose header could not be parsed (truncated, not DICOM, ...)."""

    path: str  # relative to the patient folder
    error: str


@dataclass(frozen=True)
class PatientIndex:
    """All DICOM headers under ``<root>/<patient_id>``, grouped by SeriesInstanceUID."""

    patient_dir: Path
    series: dict[str, tuple[SliceHeader, ...]]
    unreadable: tuple[UnreadableFile, ...]

    def files_of(self, series_uid: str) -> tuple[SliceHeader, ...]:
        """The headers of one series (empty when the series is absent)."""
        return self.series.get(series_uid, ())


def is_dicom_name(name: str) -> bool:
    """A file the index considers: ``.dcm`` in any case, not hidden."""
    return name.lower().endswith(".dcm") and not name.startswith(".")


def _dicom_files(patient_dir: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(patient_dir):
        dirnames.sort()
        for name in sorted(filenames):
            if is_dicom_name(name):
                yield Path(dirpath) / name


def _optional(get: Callable[[str], Any], keyword: str, convert):
    value = get(keyword)
    if value is None or value == "":
        return None
    return convert(value)


def _floats(value) -> tuple[float, ...]:
    return tuple(float(v) for v in value)


def _slice_header(rel: str, get: Callable[[str], Any], transfer_syntax: str | None, pixel_offset: int | None,
                  pixel_length: int | None) -> SliceHeader:
    """The header of one file from ``get(keyword)``: pydicom's value of a tag, None when absent."""
    return SliceHeader(
        path=rel,
        sop_uid=_optional(get, "SOPInstanceUID", lambda v: str(v).strip()),
        study_uid=_optional(get, "StudyInstanceUID", lambda v: str(v).strip()),
        series_uid=_optional(get, "SeriesInstanceUID", lambda v: str(v).strip()),
        instance_number=_optional(get, "InstanceNumber", int),
        position=_optional(get, "ImagePositionPatient", _floats),
        orientation=_optional(get, "ImageOrientationPatient", _floats),
        pixel_spacing=_optional(get, "PixelSpacing", _floats),
        rows=_optional(get, "Rows", int),
        columns=_optional(get, "Columns", int),
        rescale_intercept=_optional(get, "RescaleIntercept", float),
        rescale_slope=_optional(get, "RescaleSlope", float),
        transfer_syntax=transfer_syntax,
        bits_allocated=_optional(get, "BitsAllocated", int),
        pixel_representation=_optional(get, "PixelRepresentation", int),
        samples_per_pixel=_optional(get, "SamplesPerPixel", int),
        pixel_offset=pixel_offset,
        pixel_length=pixel_length,
    )


def read_slice_header(path: Path, patient_dir: Path) -> SliceHeader:
    """Read one file's header (large values such as the pixels are skipped, not read); raises for unreadable files."""
    rel = path.relative_to(patient_dir).as_posix()
    # pydicom reads every header (~0.6 ms a file here): a hand-written element walker was 4x faster but would be a
    # second DICOM parser to keep exact on hostile files, for ~16 ms on a 33-slice series.
    ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    pixel_data = ds.get_item(_PIXEL_DATA, keep_deferred=True) if _PIXEL_DATA in ds else None
    pixel_offset = getattr(pixel_data, "value_tell", None) if pixel_data is not None and pixel_data.value is None else None
    return _slice_header(
        rel, ds.get, str(ds.file_meta.get("TransferSyntaxUID", "")) or None, pixel_offset,
        int(pixel_data.length) if pixel_offset is not None else None,
    )


def _header_fields(header: SliceHeader) -> dict:
    # A shallow dataclasses.asdict (its fields are plain values and tuples): asdict's deep copy of every tuple
    # cost more than parsing the header on a full-length series.
    return {field.name: getattr(header, field.name) for field in fields(header)}


def _file_key(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _load_cache(cache_file: Path | None, patient_dir: Path) -> dict:
    if cache_file is None or not cache_file.is_file():
        return {}
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}  # a damaged cache is rebuilt, never trusted
    if cached.get("version") != CACHE_VERSION or cached.get("patient_dir") != str(patient_dir):
        return {}
    return cached.get("files", {})


def _tuple_fields(header: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in header.items()}


def index_patient(root: Path, patient_id: str, cache_dir: Path | None = None) -> PatientIndex:
    """Index ``<root>/<patient_id>`` (both TCIA layouts); reuses and refreshes ``<cache_dir>/<patient_id>.json``."""
    patient_dir = Path(root).resolve() / patient_id
    if not patient_dir.is_dir():
        raise FileNotFoundError(f"no folder {patient_dir} for {patient_id} under the LIDC root {root}")
    cache_file = Path(cache_dir) / f"{patient_id}.json" if cache_dir is not None else None
    cached = _load_cache(cache_file, patient_dir)
    entries: dict[str, dict] = {}
    read: dict[str, SliceHeader] = {}  # the headers read now, used as they are (the cached ones are rebuilt below)
    changed = False
    for path in _dicom_files(patient_dir):
        rel = path.relative_to(patient_dir).as_posix()
        key = _file_key(path)
        entry = cached.get(rel)
        if entry is None or entry.get("key") != key:
            changed = True
            try:
                read[rel] = read_slice_header(path, patient_dir)
                entry = {"key": key, "header": _header_fields(read[rel])}
            except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as error:
                entry = {"key": key, "error": f"{type(error).__name__}: {error}"}
        entries[rel] = entry
    changed = changed or set(entries) != set(cached)
    if cache_file is not None and changed:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        payload = {"version": CACHE_VERSION, "patient_dir": str(patient_dir), "files": entries}
        io.write_text(cache_file, json.dumps(payload))
    series: dict[str, list[SliceHeader]] = {}
    unreadable: list[UnreadableFile] = []
    for rel, entry in entries.items():
        if "error" in entry:
            unreadable.append(UnreadableFile(rel, entry["error"]))
            continue
        header = read[rel] if rel in read else SliceHeader(**_tuple_fields(entry["header"]))
        series.setdefault(header.series_uid or "", []).append(header)
    return PatientIndex(
        patient_dir=patient_dir,
        series={uid: tuple(headers) for uid, headers in series.items()},
        unreadable=tuple(unreadable),
    )


def patient_folders(root: Path) -> list[str]:
    """Names of the sub-folders of a LIDC root (candidate patient ids), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"LIDC root {root} is not a folder")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
