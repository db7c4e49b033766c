"""`keydiff`: evict the keys most similar to the mean key direction (Park et al., arXiv 2504.15364).

kvpress reference: `kvpress/presses/keydiff_press.py`: ``μ = mean_j k_j/‖k_j‖`` per KV head over the
cached keys, ``s_j = −cos(k_j, μ)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ngc_trl.engine.policy import EvictionPolicy, LayerView


def keydiff_kv_head_scores(keys: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Per-KV-head KeyDiff scores, with the anchor ``μ`` averaged over the live keys only.

    Parameters
    ----------
    keys : ``(R, H_kv, S, D)`` post-RoPE cached keys.
    live : ``(R, S)`` bool.

    Returns
    -------
    ``(R, H_kv, S)`` fp32 ``−cos(k_j, μ)``; 0 on non-live slots.
    """
    k = keys.float()
    m = live[:, None, :, None].float()
    n_live = m.sum(dim=2, keepdim=True).clamp(min=1)
    anchor = (F.normalize(k, p=2, dim=-1) * m).sum(dim=2, keepdim=True) / n_live
    scores = -F.cosine_similarity(k, anchor, dim=-1)
    return scores.masked_fill(~live[:, None], 0.0)


class KeyDiffPolicy(EvictionPolicy):
    """Keep distinctive keys: ``s_j = −mean_h cos(k_{h,j}, μ_h)``.

    Nothing is protected; ``head_reduce = layer_mean`` (mean over KV heads). Caveat: the paper scores
    the prompt block by block during prefill (kvpress ``BlockPress``); here μ is taken over all live
    keys of the layer at each round, as kvpress's ``KeyDiffPress`` does on its input.

    Returns ``(R, S)`` fp32.
    """

    name = "keydiff"

    def token_scores(self, view: LayerView) -> torch.Tensor:
        return keydiff_kv_head_scores(view.keys, view.live).mean(dim=1)
