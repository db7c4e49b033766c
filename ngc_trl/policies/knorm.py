"""`knorm`: evict the keys with the largest L2 norm (Devoto et al., arXiv 2406.11430).

kvpress reference: `kvpress/presses/knorm_press.py` (``-‖k‖₂`` per KV head, in fp32 or wider).
"""

from __future__ import annotations

import torch

from ngc_trl.engine.policy import EvictionPolicy, LayerView


def knorm_kv_head_scores(keys: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Per-KV-head KNorm scores.

    Parameters
    ----------
    keys : ``(R, H_kv, S, D)`` cached keys (post-RoPE; the norm is RoPE-invariant).
    live : ``(R, S)`` bool.

    Returns
    -------
    ``(R, H_kv, S)`` ``-‖k_j‖₂`` accumulated in at least fp32; 0 on non-live slots.
    """
    dtype = torch.promote_types(keys.dtype, torch.float32)
    scores = -torch.linalg.vector_norm(keys, dim=-1, dtype=dtype)
    return scores.masked_fill(~live[:, None], 0.0)


class KNormPolicy(EvictionPolicy):
    """Keep low-norm keys: ``s_j = −mean_h ‖k_{h,j}‖₂``.

    Nothing is protected. ``head_reduce = layer_mean``: the per-KV-head scores are averaged over KV
    heads so every head evicts the same blocks. Caveat: the original (alessiodevoto/l2compress) keeps
    the ``ceil(keep_ratio·N)`` lowest-norm keys per head, starts after ``prune_after`` tokens and skips
    the first layers; none of that is reproduced here (same δ/ε/b schedule as every method).

    Returns ``(R, S)`` fp32.
    """

    name = "knorm"

    def token_scores(self, view: LayerView) -> torch.Tensor:
        return knorm_kv_head_scores(view.keys, view.live).float().mean(dim=1)
