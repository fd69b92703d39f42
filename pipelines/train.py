"""Train and test a nodule ViT (malignancy + 8 biomarkers) on one fold or all folds; a thin LightningCLI.

  python pipelines/train.py                                   # synthetic default, configs/demo.yaml
  python pipelines/train.py --config configs/lidc.yaml        # real LIDC (DINO ViT-S/8, head fine-tuning)
  python pipelines/train.py --data.fold all                   # every fold, pooled metrics
  python pipelines/train.py --model.finetune full --trainer.max_epochs 5 --run_name try1
  python pipelines/train.py --print_config                    # the resolved configuration
  python pipelines/train.py --trainer.devices 2 --trainer.strategy ddp   # DDP (SLURM: srun ... )

Outputs: outputs/train/<run>/ with best.ckpt, metrics.json, metrics.csv, predictions.csv, roc.png,
training_curves.png and config.yaml.
"""
from __future__ import annotations

from ctcdam.models.cli import main

if __name__ == "__main__":
    main()
