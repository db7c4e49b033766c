"""`tova`: Token Omission Via Attention (Oren et al., arXiv 2401.06104).

kvpress reference: `kvpress/presses/tova_press.py`: the last query's attention, averaged over all query
heads, one score shared by the layer; the last token is forced kept.
"""

from __future__ import annotations

import torch

from ngc_trl.engine.policy import EvictionPolicy, LayerView


class TOVAPolicy(EvictionPolicy):
    """``s_j = mean_h A_h[last, j]`` over all ``H`` query heads; the newest live key is ``+inf``.

    Choices and caveats
    -------------------
    * ``w = 1`` (the newest token's query; ``cfg.window_size`` is ignored) and ``layer_mean``.
    * The last token is forced kept, as in kvpress (the original TOVA forces nothing, and evicts one
      token per decoding step rather than blocks every δ tokens).

    Returns ``(R, S)`` fp32; 0 on non-live slots (and everywhere but the last key when the last
    query is invalid).
    """

    name = "tova"

    @property
    def query_window(self) -> int:
        return 1

    def token_scores(self, view: LayerView) -> torch.Tensor:
        probs, _ = view.window_probs(1)  # (R, H, 1, S)
        scores = probs[:, :, -1].mean(dim=1).masked_fill(~view.live, 0.0)
        newest = view.live & (torch.cumsum(view.live.long(), -1) == view.live.long().sum(-1, keepdim=True))
        return scores.masked_fill(newest, float("inf"))
