"""The multi-task loss: BCE on the malignancy logit (masked where a nodule has no label) + Huber on standardised biomarkers."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def multitask_loss(
    outputs: torch.Tensor,
    label: torch.Tensor,
    biomarkers_z: torch.Tensor,
    malignancy_weight: float = 1.0,
    biomarker_weight: float = 1.0,
    huber_delta: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted loss of (B, 9) outputs; a task with weight 0 is off. Returns (total, {"bce", "huber"})."""
    zero = outputs.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) alive when a part is empty
    labelled = ~torch.isnan(label)
    bce = zero
    if malignancy_weight > 0 and bool(labelled.any()):
        bce = F.binary_cross_entropy_with_logits(outputs[labelled, 0], label[labelled].to(outputs.dtype))
    huber = zero
    if biomarker_weight > 0:
        huber = F.huber_loss(outputs[:, 1:], biomarkers_z.to(outputs.dtype), delta=huber_delta)
    return malignancy_weight * bce + biomarker_weight * huber, {"bce": bce.detach(), "huber": huber.detach()}
