"""The cohort worklist: a reader steps through a cohort's ``index.csv`` in 3D Slicer and rates each nodule's map.

A cohort run (``pipelines/explain.py --scans/--split/--scans-file``) writes this module's source, unchanged, as
``review_cohort.py`` into its output root (``Slicer --python-script OUT/review_cohort.py``). Inside Slicer it
shows the worklist as a table (Tables module, table *Cohort worklist*: rank, scan, nodule, p(malignancy), the
readers' malignancy, rating, comment) and a small panel: *Previous*/*Next* open the bundle of a nodule
(its ``.mrb``, the slice views on the nodule, its malignancy map as foreground), *Agree*/*Partly*/*Disagree* and
a comment record the reader's judgement of the map into ``ratings.csv`` beside the index (one row per nodule and
reader; rating again replaces it). :func:`summarise_ratings` (``python pipelines/explain.py --summarise-ratings
OUT``) counts the ratings overall, by the model's call, by the readers' label and by whether the two agree.

It imports only the standard library (and Slicer's ``slicer``/``qt`` inside the functions that need them), so the
same code runs in Slicer's Python and in the tests, which drive :func:`worklist_table` and :func:`rate` with
Slicer's own MRML classes (PyPI ``slicer-core``) without the GUI. Written for Slicer's Python (3.9 and later).
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

INDEX_FILE = "index.csv"
RATINGS_FILE = "ratings.csv"
SUMMARY_FILE = "ratings_summary.json"
REVIEW_COHORT_FILE = "review_cohort.py"
#: How the map fits the reader's own reading of the nodule.
RATINGS = ("agree", "partly", "disagree")
RATING_COLUMNS = ("scan_id", "nodule_id", "rating", "comment", "reader", "rated_at")
TABLE_NAME = "Cohort worklist"
TABLE_COLUMNS = ("rank", "scan_id", "nodule_id", "p_malignancy", "readers_malignancy", "rating", "comment")
#: p(malignancy) from which the model's call is "malignant".
MALIGNANT_CALL = 0.5


@dataclass(frozen=True)
class Rating:
    """One reader's judgement of one nodule's map."""

    scan_id: str
    nodule_id: str
    rating: str  # one of RATINGS
    comment: str = ""
    reader: str = ""
    rated_at: str = ""  # ISO 8601, UTC


def check_rating(value: str) -> str:
    """The rating in lower case; ValueError naming the valid ones otherwise."""
    rating = str(value).strip().lower()
    if rating not in RATINGS:
        raise ValueError(f"rating {value!r} is not one of {', '.join(RATINGS)}")
    return rating


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _read_csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def read_index(root: str) -> List[Dict[str, str]]:
    """The worklist: the index's nodule rows that have a bundle (no error), in the index's (review) order."""
    path = os.path.join(root, INDEX_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {INDEX_FILE} in {root}: run the cohort command first")
    return [row for row in _read_csv(path) if row.get("nodule_id") and not row.get("error")]


def read_ratings(root: str) -> Dict[Tuple[str, str, str], Rating]:
    """The ratings recorded so far, by (scan id, nodule id, reader); empty when there are none."""
    path = os.path.join(root, RATINGS_FILE)
    if not os.path.isfile(path):
        return {}
    ratings = {}
    for row in _read_csv(path):
        entry = Rating(**{column: row.get(column, "") or "" for column in RATING_COLUMNS})
        ratings[(entry.scan_id, entry.nodule_id, entry.reader)] = entry
    return ratings


def write_ratings(root: str, ratings: Iterable[Rating]) -> str:
    """Write ``ratings.csv`` (sorted by scan, nodule, reader) to a temporary file and rename it over the old one,
    so a crash never leaves half a file of a reader's work."""
    path = os.path.join(root, RATINGS_FILE)
    rows = sorted(ratings, key=lambda r: (r.scan_id, r.nodule_id, r.reader))
    handle, temporary = tempfile.mkstemp(prefix=".ratings.tmp-", suffix=".csv", dir=root)
    try:
        with os.fdopen(handle, "w", newline="", encoding="utf-8") as out:
            writer = csv.DictWriter(out, fieldnames=list(RATING_COLUMNS))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def record_rating(root: str, rating: Rating) -> str:
    """Add a rating to ``ratings.csv``, replacing the same reader's earlier rating of the nodule."""
    ratings = read_ratings(root)
    ratings[(rating.scan_id, rating.nodule_id, rating.reader)] = rating
    return write_ratings(root, ratings.values())


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# -- the worklist in the scene (Slicer's MRML table node) ----------------------------------------------------------


def worklist_table(scene: Any, root: str, reader: str = "") -> Any:
    """A ``vtkMRMLTableNode`` of the worklist (TABLE_COLUMNS, one row per nodule in review order) with this
    reader's ratings so far, added to ``scene`` (an earlier worklist table is replaced)."""
    import slicer

    for index in reversed(range(scene.GetNumberOfNodesByClass("vtkMRMLTableNode"))):
        node = scene.GetNthNodeByClass(index, "vtkMRMLTableNode")
        if node.GetName() == TABLE_NAME:
            scene.RemoveNode(node)
    table = slicer.vtkMRMLTableNode()
    table.SetName(TABLE_NAME)
    scene.AddNode(table)
    for name in TABLE_COLUMNS:
        table.AddColumn().SetName(name)
    ratings = read_ratings(root)
    for row in read_index(root):
        mine = ratings.get((row["scan_id"], row["nodule_id"], reader))
        values = {"rank": row.get("rank", ""), "scan_id": row["scan_id"], "nodule_id": row["nodule_id"],
                  "p_malignancy": row.get("pred_malignancy", ""), "readers_malignancy": row.get("readers_malignancy", ""),
                  "rating": mine.rating if mine else "", "comment": mine.comment if mine else ""}
        position = table.AddEmptyRow()
        for column, name in enumerate(TABLE_COLUMNS):
            table.SetCellText(position, column, values[name])
    return table


def _cell(table: Any, row: int, name: str) -> str:
    return table.GetCellText(row, table.GetColumnIndex(name))


def rate(table: Any, row: int, rating: str, root: str, comment: str = "", reader: str = "",
         rated_at: Optional[str] = None) -> Rating:
    """Record a rating of the worklist table's ``row``: into the table's cells and into ``ratings.csv``."""
    if not 0 <= row < table.GetNumberOfRows():
        raise IndexError(f"the worklist has no row {row} (it has {table.GetNumberOfRows()})")
    entry = Rating(scan_id=_cell(table, row, "scan_id"), nodule_id=_cell(table, row, "nodule_id"),
                   rating=check_rating(rating), comment=_one_line(comment), reader=_one_line(reader),
                   rated_at=rated_at or _now())
    table.SetCellText(row, table.GetColumnIndex("rating"), entry.rating)
    table.SetCellText(row, table.GetColumnIndex("comment"), entry.comment)
    record_rating(root, entry)
    return entry


def nodule_view(root: str, row: Dict[str, str]) -> Dict[str, Any]:
    """Where a worklist row's nodule is: its bundle's ``.mrb``, its centroid (LPS) and its malignancy map's scene name."""
    folder = os.path.join(root, row["scan_id"])
    with open(os.path.join(folder, "predictions.json"), encoding="utf-8") as handle:
        document = json.load(handle)
    nodule = next(n for n in document["nodules"] if n["nodule_id"] == row["nodule_id"])
    return {"mrb": os.path.join(root, row["bundle"]), "centroid_lps": nodule["centroid_lps"],
            "map_name": f"N{nodule['index']} CDAM malignancy"}


# -- the analysis of the ratings --------------------------------------------------------------------------------


def _number(text: str) -> Optional[float]:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if value == value else None  # NaN is no value


def _readers_label(median: Optional[float]) -> str:
    if median is None:
        return "no readers' malignancy"
    return "malignant (median > 3)" if median > 3 else "benign (median < 3)" if median < 3 else "ambiguous (median = 3)"


def _model_call(probability: Optional[float]) -> str:
    if probability is None:
        return "no prediction"
    return f"malignant (p >= {MALIGNANT_CALL:g})" if probability >= MALIGNANT_CALL else f"benign (p < {MALIGNANT_CALL:g})"


def _agreement(probability: Optional[float], median: Optional[float]) -> str:
    if probability is None or median is None or median == 3:
        return "no readers' call"
    return "model agrees with readers" if (probability >= MALIGNANT_CALL) == (median > 3) else "model disagrees with readers"


def _counts(ratings: List[Rating]) -> Dict[str, Any]:
    counted = Counter(r.rating for r in ratings)
    total = len(ratings)
    return {"n": total, **{name: counted.get(name, 0) for name in RATINGS},
            "shares": {name: (counted.get(name, 0) / total if total else None) for name in RATINGS}}


def summarise_ratings(root: str) -> Dict[str, Any]:
    """Counts and shares of the ratings of ``root``'s worklist: overall, by the model's call, by the readers' label,
    and by whether the two agree; the comments of every "disagree". Written to ``ratings_summary.json`` too."""
    rows = {(row["scan_id"], row["nodule_id"]): row for row in read_index(root)}
    ratings = [r for r in read_ratings(root).values() if (r.scan_id, r.nodule_id) in rows]
    groups: Dict[str, Dict[str, List[Rating]]] = {"by_model_call": {}, "by_readers_label": {}, "by_agreement": {}}
    for entry in ratings:
        row = rows[(entry.scan_id, entry.nodule_id)]
        probability, median = _number(row.get("pred_malignancy", "")), _number(row.get("readers_malignancy", ""))
        groups["by_model_call"].setdefault(_model_call(probability), []).append(entry)
        groups["by_readers_label"].setdefault(_readers_label(median), []).append(entry)
        groups["by_agreement"].setdefault(_agreement(probability, median), []).append(entry)
    summary = {
        "nodules": len(rows),
        "rated_nodules": len({(r.scan_id, r.nodule_id) for r in ratings}),
        "readers": sorted({r.reader for r in ratings}),
        "ratings": _counts(ratings),
        **{name: {key: _counts(found) for key, found in sorted(group.items())} for name, group in groups.items()},
        "disagree_comments": [{"scan_id": r.scan_id, "nodule_id": r.nodule_id, "reader": r.reader, "comment": r.comment}
                              for r in sorted(ratings, key=lambda r: (r.scan_id, r.nodule_id, r.reader))
                              if r.rating == "disagree" and r.comment],
    }
    handle, temporary = tempfile.mkstemp(prefix=".summary.tmp-", suffix=".json", dir=root)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(summary, out, indent=1)
    os.replace(temporary, os.path.join(root, SUMMARY_FILE))
    return summary


def summary_text(summary: Dict[str, Any]) -> str:
    """The summary as a small table: ratings overall and per group (count and share)."""
    def line(label: str, counts: Dict[str, Any]) -> str:
        cells = "".join(f"{counts[name]:>6} {_share(counts['shares'][name]):>5}" for name in RATINGS)
        return f"{label:<34}{counts['n']:>5}{cells}"

    header = f"{'':<34}{'n':>5}" + "".join(f"{name:>12}" for name in RATINGS)
    lines = [f"{summary['rated_nodules']} of {summary['nodules']} nodules rated by "
             f"{len(summary['readers'])} reader(s)", header, line("all ratings", summary["ratings"])]
    for group in ("by_model_call", "by_readers_label", "by_agreement"):
        for label, counts in summary[group].items():
            lines.append(line(f"  {label}", counts))
    for entry in summary["disagree_comments"]:
        lines.append(f"disagree {entry['nodule_id']} ({entry['reader'] or 'reader'}): {entry['comment']}")
    return "\n".join(lines)


def _share(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


# -- inside Slicer ---------------------------------------------------------------------------------------------


def _root_folder() -> str:
    """The cohort's output root: the folder given on Slicer's command line, else this script's folder."""
    if len(sys.argv) > 1 and os.path.isdir(sys.argv[-1]):
        return os.path.abspath(sys.argv[-1])
    if "__file__" in globals():
        return os.path.dirname(os.path.abspath(__file__))
    return os.getcwd()


def open_nodule(root: str, row: Dict[str, str], reader: str = "", load: bool = True) -> Any:
    """Slicer only: open the row's bundle (replacing the scene; ``load=False``: it is open already), centre the views
    on the nodule with its malignancy map as foreground, and put the worklist table back; returns the table."""
    import slicer

    where = nodule_view(root, row)
    if load:
        slicer.util.loadScene(where["mrb"], {"clear": True})
    x, y, z = where["centroid_lps"]
    slicer.modules.markups.logic().JumpSlicesToLocation(-x, -y, z, True)  # LPS -> RAS
    maps = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode") if n.GetName() == where["map_name"]]
    if maps:
        slicer.util.setSliceViewerLayers(foreground=maps[0], foregroundOpacity=0.5)
    table = worklist_table(slicer.mrmlScene, root, reader)
    selection = slicer.app.applicationLogic().GetSelectionNode()
    selection.SetActiveTableID(table.GetID())
    slicer.app.applicationLogic().PropagateTableSelection()
    return table


def main() -> None:
    """Slicer only: the worklist panel (previous/next nodule, agree/partly/disagree, comment, reader's name)."""
    import qt
    import slicer

    root = _root_folder()
    rows = read_index(root)
    if not rows:
        slicer.util.errorDisplay(f"{os.path.join(root, INDEX_FILE)} lists no explained nodule")
        return
    panel = qt.QWidget()
    panel.setWindowTitle(f"CDAM worklist: {root}")
    layout = qt.QFormLayout(panel)
    reader = qt.QLineEdit(os.environ.get("USER", ""))
    where = qt.QLabel()
    comment = qt.QLineEdit()
    layout.addRow("reader", reader)
    layout.addRow("nodule", where)
    layout.addRow("comment", comment)
    buttons = qt.QHBoxLayout()
    layout.addRow(buttons)
    state = {"row": 0, "table": None, "scan": None}

    def show(row: int) -> None:
        state["row"] = max(0, min(row, len(rows) - 1))
        current = rows[state["row"]]
        # the next nodule of the same scan is in the open bundle already
        state["table"] = open_nodule(root, current, reader.text, load=current["scan_id"] != state["scan"])
        state["scan"] = current["scan_id"]
        where.setText(f"{state['row'] + 1}/{len(rows)}: {current['nodule_id']}  p(malignancy) "
                      f"{current.get('pred_malignancy', '')}  readers {current.get('readers_malignancy', '')}")
        comment.setText(_cell(state["table"], state["row"], "comment"))

    def rated(value: str) -> None:
        rate(state["table"], state["row"], value, root, comment.text, reader.text)
        show(state["row"] + 1)

    for label, action in (("Previous", lambda: show(state["row"] - 1)), ("Next", lambda: show(state["row"] + 1))):
        button = qt.QPushButton(label)
        button.connect("clicked()", action)
        buttons.addWidget(button)
    for value in RATINGS:
        button = qt.QPushButton(value.capitalize())
        button.connect("clicked()", lambda value=value: rated(value))
        buttons.addWidget(button)
    panel.show()
    slicer.cohortWorklistPanel = panel  # keeps the panel alive after this script returns
    show(0)


if __name__ == "__main__":
    main()
