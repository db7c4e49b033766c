"""`random`: a control that keeps uniformly random blocks (no paper; the floor every scorer must beat)."""

from __future__ import annotations

import torch

from ngc_trl.engine.policy import EvictionPolicy, LayerView


class RandomPolicy(EvictionPolicy):
    """One ``U(0, 1)`` value per block, shared by its keys (via ``view.bid``), so the block mean is it.

    Drawn from ``view.generator`` (the global RNG when None), on the generator's device. It is a control,
    not a method: it uses no query, key or attention, and protects nothing.

    Returns ``(R, S)`` fp32; 0 on non-live slots.
    """

    name = "random"

    def token_scores(self, view: LayerView) -> torch.Tensor:
        r = view.bid.shape[0]
        n_blocks = int(view.bid.max().item()) + 1 if view.bid.numel() else 0
        gen = view.generator
        device = gen.device if gen is not None else view.bid.device
        u = torch.rand(r, max(n_blocks, 1), generator=gen, device=device).to(view.bid.device)
        scores = u.gather(1, view.bid.clamp(min=0))
        return scores.masked_fill(view.bid < 0, 0.0)
