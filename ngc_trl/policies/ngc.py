"""`ngc`: the model's own attention as the eviction scorer (NGC paper §4.2) — the learned policy.

``ψ_t = 1/(H·w) Σ_h Σ_q A[h, q, t]``: the ``w`` most recent post-RoPE queries of every head attend
(softmax, causal) over the layer's live keys; heads and queries are averaged, so one score per key is
shared by the whole layer (GQA: each query head against its KV head). Untrained, it is a heuristic
("SnapKV with w = 5, no pooling, layer-shared"); trained by NGC, it is the policy. All live keys are
scored, the window's own keys included (the paper says "prefix keys"; a documented choice).
"""

from __future__ import annotations

import torch

from ngc_trl.engine.policy import EvictionPolicy, LayerView
from ngc_trl.engine.scoring import head_query_mean


class NGCPolicy(EvictionPolicy):
    name = "ngc"
    learned = True

    @property
    def query_window(self) -> int:
        return self.cfg.score_window

    def token_scores(self, view: LayerView) -> torch.Tensor:
        probs, q_valid = view.window_probs(self.cfg.score_window)
        return head_query_mean(probs, q_valid)
