"""`full`: never evicts. The upper bound every method is compared against (peak = whole sequence)."""

from __future__ import annotations

import torch

from ngc_trl.engine.policy import EvictionPolicy, LayerView


class FullCachePolicy(EvictionPolicy):
    name = "full"
    evicts = False

    def token_scores(self, view: LayerView) -> torch.Tensor:
        return torch.full(view.pos.shape, float("inf"), device=view.pos.device)
