"""The walkthrough notebook runs top to bottom on a tiny trained checkpoint and shows what it promises."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"
KERNEL_NAME = "ctcdam-test"
CELL_TIMEOUT_S = 300


def pinned_kernel(kernel_dir: Path) -> KernelManager:
    """A kernel manager whose python3 kernel runs this interpreter (a user-level 'python3' spec could point elsewhere)."""
    spec_dir = kernel_dir / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "ctcdam test", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(kernel_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def outputs_of(notebook: nbformat.NotebookNode) -> dict[str, list]:
    """Code-cell outputs by cell id."""
    return {cell.id: cell.get("outputs", []) for cell in notebook.cells if cell.cell_type == "code"}


def stream_text(outputs: list) -> str:
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.get("name") == "stdout")


@pytest.fixture(scope="module")
def executed(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> nbformat.NotebookNode:
    """The notebook executed on the demo checkpoint, from notebooks/ (where Jupyter starts it)."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CTCDAM_CHECKPOINT", str(demo_checkpoint))  # the kernel inherits the environment at start
        client = NotebookClient(
            notebook,
            km=pinned_kernel(tmp_path_factory.mktemp("kernels")),
            timeout=CELL_TIMEOUT_S,
            resources={"metadata": {"path": str(NOTEBOOK.parent)}},
        )
        client.execute()  # raises CellExecutionError naming the failing cell
    return notebook


def test_committed_notebook_is_clean() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "the walkthrough has no code cells"
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "commit the notebook with outputs cleared"
    source = "\n".join(cell.source for cell in notebook.cells)
    assert not re.search(r"(?<![\w.])/(work|root|tmp|home)/", source), "the notebook hard-codes a machine path"


def test_walkthrough_runs_on_the_demo_checkpoint(executed: nbformat.NotebookNode, demo_checkpoint: Path) -> None:
    outputs = outputs_of(executed)
    record = torch.load(demo_checkpoint, map_location="cpu", weights_only=True)["ctcdam"]["data"]

    assert f"checkpoint: {demo_checkpoint}" in stream_text(outputs["checkpoint"])

    nodule_id = re.search(r"^nodule (\S+) ", stream_text(outputs["nodule"]), re.M).group(1)
    assert nodule_id in record["test_ids"] and nodule_id not in record["train_ids"]

    prediction = re.search(r"predicted malignancy probability: ([0-9.]+)", stream_text(outputs["predict"]))
    assert prediction is not None and 0.0 <= float(prediction.group(1)) <= 1.0
    table = "".join(o["data"].get("text/plain", "") for o in outputs["predict"] if o.output_type == "execute_result")
    for target in ("malignancy", "spiculation", "diameter", "radiologists"):
        assert target in table

    assert "(3, 3, " in stream_text(outputs["cdam"])  # three views x three targets

    # the concept's example count, recounted from the manifest's training rows
    concept = re.search(r"concept (\w+)>=(\d+): mean embedding of (\d+) training", stream_text(outputs["concept"]))
    assert concept is not None, stream_text(outputs["concept"])
    column = {"diameter": "diameter_mm"}.get(concept.group(1), concept.group(1))
    manifest = pd.read_csv(record["manifest"], dtype={"nodule_id": str})
    training = manifest[manifest["nodule_id"].isin(record["train_ids"])]
    assert int(concept.group(3)) == int((training[column] >= float(concept.group(2))).sum()) >= 1

    deletion = stream_text(outputs["deletion"])
    assert re.search(r"^CDAM: AUC\(MIF\) [-+0-9.]+, AUC\(LIF\) [-+0-9.]+, correctness [-+0-9.]+", deletion, re.M)
    assert re.search(r"^random: .*correctness [-+0-9.]+", deletion, re.M)

    figures = {cell_id for cell_id, cell_outputs in outputs.items()
               for o in cell_outputs if "image/png" in o.get("data", {})}
    assert figures == {"nodule", "cdam", "concept", "deletion"}
