"""`h2o`: Heavy-Hitter Oracle (Zhang et al., arXiv 2306.14048): accumulated attention plus a recent window.

No kvpress reference (its ``ObservedAttentionPress`` is prefill-only). Original: FMInference/H2O
``h2o_hf/utils_real_drop/modify_llama.py`` keeps ``recent_size`` newest tokens plus the top ``hh_size``
by accumulated attention, with ``heavy_ratio = recent_ratio``.
"""

from __future__ import annotations

import torch

from ngc_trl.engine.policy import EvictionPolicy, LayerView


class H2OPolicy(EvictionPolicy):
    """``s_j = Σ_t mean_h A_h[t, j]`` (``view.attention_sum``), the ``R`` newest live keys ``+inf``.

    Choices and caveats
    -------------------
    * ``R = cfg.window_size`` if set; otherwise half of the row's kept budget,
      ``R = floor((1 − cfg.eviction_rate) · n_live / 2)``: H2O's even heavy/recent split, at most half
      the budget in keys. Block granularity forces ``⌈R/b⌉`` blocks (one more if R straddles a block
      boundary), which can exceed ``K`` only on tiny caches (a few blocks). Uses ``cfg.eviction_rate``:
      an engine that evicts at another rate per row should set ``window_size``.
    * The engine accumulates ``attention_sum`` at *every* decoding step (``tracks_attention``), which
      needs attention probabilities (eager or a custom kernel); a missing sum is an error.
    * The sum is not normalised by age, so older keys are favoured, as in the original.

    Returns ``(R, S)`` fp32; 0 on non-live slots.
    """

    name = "h2o"
    tracks_attention = True

    def recent(self, n_live: torch.Tensor) -> torch.Tensor:
        if self.cfg.window_size:
            return torch.full_like(n_live, self.cfg.window_size)
        keep = round(1.0 - self.cfg.eviction_rate, 9)  # 1 - 0.7 = 0.30000000000000004
        return torch.floor(n_live.double() * keep / 2).long()

    def token_scores(self, view: LayerView) -> torch.Tensor:
        if view.attention_sum is None:
            raise ValueError("h2o needs view.attention_sum (the engine must track attention every step)")
        live = view.live.long()
        n_live = live.sum(-1)
        from_end = n_live[:, None] - torch.cumsum(live, -1)  # 0 on the newest live key
        scores = view.attention_sum.float().masked_fill(~view.live, 0.0)
        return scores.masked_fill(view.live & (from_end < self.recent(n_live)[:, None]), float("inf"))
