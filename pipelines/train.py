"""Train and test a nodule ViT (malignancy + 8 biomarkers) on one fold or all folds; a thin LightningCLI.

  python pipelines/train.py                                   # synthetic default, the shipped configs/demo.yaml
  python pipelines/train.py --config configs/lidc.yaml        # real LIDC (DINO ViT-S/8, head fine-tuning)
  python pipelines/train.py --data.fold all                   # every fold, pooled metrics
  python pipelines/train.py --run try1 --ckpt_path last       # continue a killed run

The run lives in ctcdam.workflows.train (examples and outputs: --help).
"""
from __future__ import annotations


from ctcdam.cli.common import exit_process
from ctcdam.workflows.train import cli_main

if __name__ == "__main__":
    exit_process(cli_main())
