"""Where does a known-cause model veto on calcium? CDAM's gradient x activation read at every block (not in make test).

For the test nodules of a known-cause checkpoint (``python pipelines/evaluate.py --benchmark known-cause``), the
central slice of each view is scored at ``blocks[l].norm1`` for every block l (``ctcdam.evaluate.layerwise``):
the share of negative malignancy relevance on the calcified foci (nodules with calcification), the share of
positive relevance on the spicules (nodules with spicules), and the CLS token's share of |S| (relevance already
gathered into the CLS token, which CDAM does not show). The last block's row is CDAM itself.

    python scripts/veto_by_layer.py outputs/known-cause/train/fold1-depth4-e60/best.ckpt --max-nodules 40
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

from ctcdam.evaluate.inputs import load_nodules, test_fold_rows
from ctcdam.evaluate.layerwise import SITES, layer_table
from ctcdam.explain import vit
from ctcdam.models.checkpoint import load_for_inference
from ctcdam.targets import MALIGNANCY, target_index


def main(argv: list[str] | None = None) -> int:
    """Print (and with --json write) the per-block shares for one checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--max-nodules", type=int, default=None)
    parser.add_argument("--csv", type=Path, default=None, help="write the per-image table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    loaded = load_for_inference(args.checkpoint)
    model, input_config = loaded.model, loaded.input_config
    grid = vit.grid_size(model, (input_config.img_size, input_config.img_size))
    nodules, _ = load_nodules(test_fold_rows(loaded, args.max_nodules), ("axial", "coronal", "sagittal"),
                              input_config, grid, dilation_mm=1.0)
    tables = [layer_table(model, nodules, input_config, MALIGNANCY, target_index(MALIGNANCY), site) for site in SITES]
    table = pd.concat(tables, ignore_index=True)
    if args.csv:
        table.to_csv(args.csv, index=False)
    # per nodule first (mean over its views), then over nodules, as the evaluation's tables do
    per_nodule = table.groupby(["site", "nodule_id", "block"]).mean(numeric_only=True).reset_index()
    calcified = per_nodule.groupby(["site", "nodule_id"])["counter_evidence_share"].transform(lambda s: s.notna().any())
    per_nodule["calcified"] = calcified
    summary: dict = {}
    for (site, block), rows in per_nodule.groupby(["site", "block"]):
        summary.setdefault(site, {})[int(block)] = {
            "counter_evidence_share": float(rows["counter_evidence_share"].mean()),
            "negative_on_rest_of_nodule": float(rows["negative_on_rest_of_nodule"].mean()),
            "evidence_share": float(rows["evidence_share"].mean()),
            "cls_share_calcified": float(rows.loc[rows["calcified"], "cls_share"].mean()),
            "cls_share_other": float(rows.loc[~rows["calcified"], "cls_share"].mean()),
        }
    n_calcified = int(per_nodule.loc[per_nodule["calcified"], "nodule_id"].nunique())
    print(f"{args.checkpoint}: {len(nodules)} nodules ({n_calcified} with calcification); block l = gradient x "
          f"activation at blocks[l].norm1 (norm1; the last block's is CDAM) or at the block's input (residual)")
    print(f"{'site':>8} {'block':>5} {'counter_ev':>10} {'neg_rest_nod':>12} {'evidence':>9} {'cls_calc':>9} {'cls_other':>10}")
    for site, blocks in summary.items():
        for block, row in blocks.items():
            print(f"{site:>8} {block:>5} {row['counter_evidence_share']:>10.3f} {row['negative_on_rest_of_nodule']:>12.3f} "
                  f"{row['evidence_share']:>9.3f} {row['cls_share_calcified']:>9.3f} {row['cls_share_other']:>10.3f}")
    print(json.dumps({"checkpoint": str(args.checkpoint), "nodules": len(nodules), "sites": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
