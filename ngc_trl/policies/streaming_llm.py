"""`streaming_llm`: attention sinks plus a recency window (Xiao et al., arXiv 2309.17453).

kvpress reference: `kvpress/presses/streaming_llm_press.py` (scores 1 for sinks and the newest tokens, 0 for
the ``n_pruned`` tokens right after the sinks). Block form used here (docs/method.md §7): the first
``n_sink`` live keys score ``+inf``, every other key scores its temporal rank among the live keys, so the
oldest non-sink blocks are evicted first (the prompt goes early).
"""

from __future__ import annotations

import torch

from ngc_trl.engine.policy import EvictionPolicy, LayerView


class StreamingLLMPolicy(EvictionPolicy):
    """Keep the first ``n_sink`` keys and the newest ones.

    Choices and caveats
    -------------------
    * ``n_sink = cfg.num_sink`` when it is > 0, else 4 (the paper's and kvpress's default).
      ``cfg.window_size`` is not used: the recent window is whatever the ``(1 − ε)`` budget leaves.
    * Block granularity: the block holding a sink is forced kept whole, so with ``b = 32`` the first
      32 live keys survive, not just 4.
    * No re-rotation: kept keys keep the RoPE of their original positions (kvpress without
      ``KeyRerotationPress``; the paper re-assigns positions inside its rolling cache).

    Returns ``(R, S)``: ``+inf`` on sinks, the live rank ``0, 1, …`` (float) elsewhere, 0 on non-live slots.
    """

    name = "streaming_llm"
    default_num_sink = 4

    @property
    def n_sink(self) -> int:
        return self.cfg.num_sink if self.cfg.num_sink > 0 else self.default_num_sink

    def token_scores(self, view: LayerView) -> torch.Tensor:
        rank = (torch.cumsum(view.live.long(), dim=-1) - 1).float()
        scores = torch.where(view.live, rank, torch.zeros_like(rank))
        sink = view.live & (rank < self.n_sink)
        return scores.masked_fill(sink, float("inf"))
