"""Embeddings of a frozen backbone, cached per image key, so head fine-tuning epochs need no backbone pass."""
from __future__ import annotations

from collections.abc import Callable

import torch


class EmbeddingCache:
    """Maps an integer image key (crop, view, slice, augmentation) to the frozen backbone's (D,) embedding.

    Keys < 0 mark images that do not repeat (continuous augmentation); they are always computed.
    """

    def __init__(self) -> None:
        self._store: dict[int, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def embed(self, keys: torch.Tensor, images: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Embeddings of `images` (B, ...) whose keys are (B,): cached rows are reused, the others computed once."""
        key_list = [int(k) for k in keys.reshape(-1).tolist()]
        todo = [i for i, k in enumerate(key_list) if k < 0 or k not in self._store]
        self.hits += len(key_list) - len(todo)
        self.misses += len(todo)
        fresh: dict[int, torch.Tensor] = {}
        if todo:
            computed = compute(images[todo]).detach()
            for row, i in enumerate(todo):
                fresh[i] = computed[row]
                if key_list[i] >= 0:
                    self._store[key_list[i]] = computed[row]
        return torch.stack([fresh[i] if i in fresh else self._store[k] for i, k in enumerate(key_list)])
