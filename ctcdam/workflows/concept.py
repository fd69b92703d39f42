"""Concept queries ("spiculation>=4") over the training nodules of a checkpoint, and their concept vector."""
from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ctcdam.explain import concept_vector
from ctcdam.export.naming import concept_map_name
from ctcdam.manifest.schema import read_crop, read_manifest
from ctcdam.models.checkpoint import LoadedModel
from ctcdam.targets import BIOMARKER_COLUMNS, MALIGNANCY

_OPERATORS: dict[str, Callable[[object, object], object]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
    ">": operator.gt, "<": operator.lt, "=": operator.eq,
}
_QUERY = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|>|<|=)\s*(-?[0-9]+(?:\.[0-9]*)?)\s*$")
#: Query names that are targets map to the manifest column holding the radiologists' value.
QUERY_COLUMNS: dict[str, str] = {MALIGNANCY: "malignancy_median", **BIOMARKER_COLUMNS}


class ConceptError(ValueError):
    """A concept query that cannot be parsed or matches no training nodule."""


@dataclass(frozen=True)
class ConceptQuery:
    """``column operator value`` over manifest rows, e.g. spiculation >= 4."""

    text: str
    column: str
    operator: str
    value: float

    @property
    def map_name(self) -> str:
        """Name of the map this concept produces (safe as a Slicer file name)."""
        return concept_map_name(self.text)

    def matches(self, frame: pd.DataFrame) -> np.ndarray:
        """Boolean mask of the rows that satisfy the query (rows without a value never match)."""
        values = pd.to_numeric(frame[self.column], errors="coerce").astype(float).to_numpy()
        with np.errstate(invalid="ignore"):
            return np.asarray(_OPERATORS[self.operator](values, self.value), dtype=bool) & np.isfinite(values)


@dataclass(frozen=True)
class Concept:
    """A concept target: its query, the number of training nodules behind it, and the mean embedding."""

    query: ConceptQuery
    n_examples: int
    vector: torch.Tensor


def parse_query(text: str) -> ConceptQuery:
    """Parse ``name op number`` (op one of >= <= == != > < =); name is a target or a manifest column."""
    match = _QUERY.match(text)
    if match is None:
        raise ConceptError(
            f"concept query {text!r} is not of the form <attribute><op><number>, e.g. 'spiculation>=4' "
            "(op one of >=, <=, ==, !=, >, <)"
        )
    name, op, value = match.groups()
    return ConceptQuery(text=text.replace(" ", ""), column=QUERY_COLUMNS.get(name, name), operator=op, value=float(value))


def training_examples(loaded: LoadedModel, query: ConceptQuery) -> pd.DataFrame:
    """The training nodules of the checkpoint's split (manifest rows) that satisfy the query; ConceptError if none."""
    if not loaded.data.get("manifest"):
        raise ConceptError(f"checkpoint {loaded.path} records no training manifest (ctcdam.data.manifest); "
                           f"concept query {query.text!r} needs its training nodules")
    frame = read_manifest(loaded.data["manifest"])
    if query.column not in frame.columns:
        known = ", ".join(sorted(QUERY_COLUMNS))
        raise ConceptError(f"concept query {query.text!r}: the manifest has no column {query.column!r}; use one of {known}")
    training = frame[frame["nodule_id"].astype(str).isin({str(i) for i in loaded.data["train_ids"]})]
    chosen = training[query.matches(training)]
    if chosen.empty:
        values = pd.to_numeric(training[query.column], errors="coerce")
        raise ConceptError(
            f"concept query {query.text!r} matches none of the {len(training)} training nodules of checkpoint "
            f"{loaded.path} ({query.column} ranges {values.min():.3g} to {values.max():.3g} there)"
        )
    return chosen


def build_concept(loaded: LoadedModel, text: str) -> Concept:
    """Concept vector of a query: mean CLS embedding of the centre slices (every view) of its training nodules."""
    query = parse_query(text)
    examples = training_examples(loaded, query)
    images = torch.cat([loaded.view_inputs(read_crop(file)[0]) for file in examples["image_file"]])
    return Concept(query=query, n_examples=len(examples), vector=concept_vector(loaded.model, images))
