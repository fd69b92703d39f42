"""The cohort worklist (review_cohort.py): ratings recorded through a real MRML table node, kept, replaced, summarised.

The worklist module is loaded from the ``review_cohort.py`` a cohort run writes (its own source), and driven with
3D Slicer's own MRML classes (PyPI ``slicer-core``) without the GUI.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from ctcdam.workflows import worklist
from ctcdam.workflows.explain_cohort import INDEX_COLUMNS, write_review_cohort
from tests.test_explain_pipeline import _cli_main

slicer = pytest.importorskip("slicer", reason="3D Slicer's libraries (slicer-core) are not installed")

#: (scan, nodule, p(malignancy), readers' malignancy median); the index lists them most suspicious first.
NODULES = [("LIDC-IDRI-0001", "LIDC-IDRI-0001-n1", 0.91, 4.5), ("LIDC-IDRI-0002", "LIDC-IDRI-0002-n2", 0.72, 2.0),
           ("LIDC-IDRI-0001", "LIDC-IDRI-0001-n2", 0.35, 1.5), ("LIDC-IDRI-0003", "LIDC-IDRI-0003-n1", 0.20, 3.0)]


def _index(root: Path) -> Path:
    rows = [{"rank": str(k), "scan_id": scan, "nodule_id": nodule, "nodule": nodule[-1], "labelled": "true",
             "pred_malignancy": f"{p:.6g}", "readers_malignancy": f"{median:g}", "bundle": f"{scan}/{scan}.mrb"}
            for k, (scan, nodule, p, median) in enumerate(NODULES, start=1)]
    rows.append({"scan_id": "LIDC-IDRI-0004", "error": "load: SeriesError: a slice is missing"})  # no bundle
    with open(root / worklist.INDEX_FILE, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(INDEX_COLUMNS), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return root


def _review(root: Path) -> ModuleType:
    """review_cohort.py as the cohort run writes it, loaded as a module."""
    path = write_review_cohort(root)
    spec = importlib.util.spec_from_file_location("review_cohort_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


def _ratings(root: Path) -> list[dict[str, str]]:
    with open(root / worklist.RATINGS_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


def test_ratings_go_through_the_table_node_into_ratings_csv_and_come_back(tmp_path):
    root = _index(tmp_path)
    review = _review(root)
    scene = slicer.vtkMRMLScene()
    table = review.worklist_table(scene, str(root), reader="dr-a")
    assert isinstance(table, slicer.vtkMRMLTableNode) and table.GetName() == worklist.TABLE_NAME
    assert table.GetNumberOfRows() == len(NODULES)  # the scan without a bundle is not on the worklist
    column = {name: table.GetColumnIndex(name) for name in worklist.TABLE_COLUMNS}
    assert [table.GetCellText(r, column["nodule_id"]) for r in range(4)] == [n for _, n, _, _ in NODULES]

    review.rate(table, 0, "Agree", str(root), comment="  spiculated\tedge ", reader="dr-a", rated_at="t1")
    review.rate(table, 2, "disagree", str(root), comment="the map sits on the vessel", reader="dr-a", rated_at="t2")
    assert table.GetCellText(0, column["rating"]) == "agree" and table.GetCellText(0, column["comment"]) == "spiculated edge"
    assert _ratings(root) == [
        {"scan_id": "LIDC-IDRI-0001", "nodule_id": "LIDC-IDRI-0001-n1", "rating": "agree", "comment": "spiculated edge",
         "reader": "dr-a", "rated_at": "t1"},
        {"scan_id": "LIDC-IDRI-0001", "nodule_id": "LIDC-IDRI-0001-n2", "rating": "disagree",
         "comment": "the map sits on the vessel", "reader": "dr-a", "rated_at": "t2"},
    ]
    # Rating again replaces the reader's rating; another reader's rating is a row of its own.
    review.rate(table, 0, "partly", str(root), reader="dr-a", rated_at="t3")
    other = review.worklist_table(slicer.vtkMRMLScene(), str(root), reader="dr-b")
    assert other.GetCellText(0, column["rating"]) == ""  # dr-b has rated nothing yet
    review.rate(other, 1, "agree", str(root), reader="dr-b", rated_at="t4")
    rows = {(r["nodule_id"], r["reader"]): r["rating"] for r in _ratings(root)}
    assert rows == {("LIDC-IDRI-0001-n1", "dr-a"): "partly", ("LIDC-IDRI-0001-n2", "dr-a"): "disagree",
                    ("LIDC-IDRI-0002-n2", "dr-b"): "agree"}
    # A new scene (the next Slicer session, or the scene after the next bundle was opened) shows what was recorded,
    # and the worklist table is replaced, not duplicated.
    reopened = review.worklist_table(scene, str(root), reader="dr-a")
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1
    assert [reopened.GetCellText(r, column["rating"]) for r in range(4)] == ["partly", "", "disagree", ""]
    assert not list(root.glob(".ratings.tmp-*"))


def test_a_rating_outside_the_scale_is_refused_and_nothing_is_written(tmp_path):
    root = _index(tmp_path)
    review = _review(root)
    table = review.worklist_table(slicer.vtkMRMLScene(), str(root))
    with pytest.raises(ValueError, match="is not one of agree, partly, disagree"):
        review.rate(table, 0, "maybe", str(root))
    with pytest.raises(IndexError, match="has no row 9"):
        review.rate(table, 9, "agree", str(root))
    assert table.GetCellText(0, table.GetColumnIndex("rating")) == ""
    assert not (root / worklist.RATINGS_FILE).exists()


def test_summary_counts_ratings_by_the_models_call_the_readers_label_and_their_agreement(tmp_path, capsys):
    root = _index(tmp_path)
    review = _review(root)
    table = review.worklist_table(slicer.vtkMRMLScene(), str(root), reader="dr-a")
    for row, rating in enumerate(("agree", "partly", "disagree", "agree")):
        review.rate(table, row, rating, str(root), comment="off target" if rating == "disagree" else "", reader="dr-a")
    summary = worklist.summarise_ratings(str(root))
    assert (summary["nodules"], summary["rated_nodules"], summary["readers"]) == (4, 4, ["dr-a"])
    assert {k: summary["ratings"][k] for k in worklist.RATINGS} == {"agree": 2, "partly": 1, "disagree": 1}
    assert summary["ratings"]["shares"]["agree"] == 0.5
    assert summary["by_model_call"]["malignant (p >= 0.5)"]["n"] == 2
    assert summary["by_readers_label"]["ambiguous (median = 3)"]["agree"] == 1
    # n1 (0.91 vs 4.5) and n2 of 0001 (0.35 vs 1.5) agree with the readers, 0002-n2 (0.72 vs 2) does not
    assert summary["by_agreement"]["model agrees with readers"]["n"] == 2
    assert summary["by_agreement"]["model disagrees with readers"]["partly"] == 1
    assert summary["disagree_comments"] == [{"scan_id": "LIDC-IDRI-0001", "nodule_id": "LIDC-IDRI-0001-n2",
                                             "reader": "dr-a", "comment": "off target"}]
    assert json.loads((root / worklist.SUMMARY_FILE).read_text()) == summary
    # the CLI's analysis step prints the same
    assert _cli_main()(["--summarise-ratings", str(root)]) == 0
    printed = capsys.readouterr().out
    assert "4 of 4 nodules rated by 1 reader(s)" in printed and "disagree LIDC-IDRI-0001-n2" in printed


def test_summarising_a_folder_without_an_index_is_one_sentence(tmp_path, capsys):
    assert _cli_main()(["--summarise-ratings", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no index.csv in" in err and len(err.strip().splitlines()) == 1
