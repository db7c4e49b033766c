"""`snapkv`: pooled attention of an observation window of recent queries (Li et al., arXiv 2404.14469).

kvpress reference: `kvpress/presses/snapkv_press.py`. Per query head ``h``:
``a_h(j) = mean_{i<w} A_h[i, j]`` (softmax over all keys, window included, causal inside the window;
window columns then dropped), ``p_h = avg_pool1d(a_h, kernel 5, pad 2, stride 1, count_include_pad)``,
then the mean of ``p_h`` over the ``G`` query heads of each KV head; the window keys are always kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ngc_trl.engine.policy import EvictionPolicy, LayerView


def snapkv_kv_head_scores(view: LayerView, window: int, kernel_size: int = 5) -> torch.Tensor:
    """Per-KV-head SnapKV scores of one layer (kvpress ``SnapKVPress.score`` on ragged rows).

    Parameters
    ----------
    view : the layer's `LayerView`; needs ``window`` recent queries.
    window : ``w``, number of observation queries (the valid ones among the last ``w``).
    kernel_size : odd pooling width (kvpress: 5).

    Returns
    -------
    ``(R, H_kv, S)`` fp32: pooled scores on prefix keys, ``+inf`` on window keys (live keys at or after
    the oldest valid window query), 0 on non-live slots.

    Notes
    -----
    The prefix keys of each row are first compacted, in temporal order, to the front of a zero tensor,
    pooled there and scattered back: pooling runs over the true live sequence, non-live slots never
    leak in, and only the zero padding of ``count_include_pad`` shrinks the values at both ends
    (the right end being the last key before the window, as in kvpress).
    """
    probs, q_valid = view.window_probs(window)  # (R, H, w, S), (R, w)
    r, h, _, s = probs.shape
    h_kv = view.keys.shape[1]
    wq = q_valid.to(probs.dtype)
    attn = torch.einsum("rhqs,rq->rhs", probs, wq) / wq.sum(-1).clamp(min=1)[:, None, None]

    q_pos = view.q_pos[:, -window:]
    start = torch.where(q_valid, q_pos, torch.full_like(q_pos, torch.iinfo(q_pos.dtype).max)).amin(-1)
    in_window = view.live & (view.pos >= start[:, None])
    prefix = view.live & ~in_window

    order = torch.sort((~prefix).long(), dim=-1, stable=True).indices  # prefix slots first, in order
    compact = attn.gather(2, order[:, None].expand(r, h, s)) * prefix.gather(1, order)[:, None]
    pooled = F.avg_pool1d(compact, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=True)
    back = pooled.gather(2, torch.argsort(order, dim=-1)[:, None].expand(r, h, s))
    scores = back.view(r, h_kv, h // h_kv, s).mean(2).masked_fill(~prefix[:, None], 0.0)
    return scores.masked_fill(in_window[:, None], float("inf"))


class SnapKVPolicy(EvictionPolicy):
    """SnapKV under the NGC schedule: ``s_j = mean_{h_kv} snapkv_{h_kv}(j)``, window keys ``+inf``.

    Choices and caveats
    -------------------
    * Window ``w = cfg.window_size`` if set, else ``cfg.score_window`` (5): parity with NGC's own
      scorer, so SnapKV differs from "untrained NGC" only by pooling and window protection. kvpress's
      native window is 64 (set ``window_size=64``); it must stay well below δ, or the protected window
      eats the ``(1 − ε)`` budget.
    * ``head_reduce = layer_mean``: per-KV-head scores are averaged over KV heads (one ranking per
      layer, whole blocks evicted in every head); kvpress ranks each KV head separately.
    * Decode-time use: the window queries are the captured post-RoPE queries of the last ``w`` tokens
      (not recomputed from hidden states as kvpress's ``DecodingPress`` does).

    Returns ``(R, S)`` fp32.
    """

    name = "snapkv"
    kernel_size = 5

    @property
    def window(self) -> int:
        return self.cfg.window_size or self.cfg.score_window

    @property
    def query_window(self) -> int:
        return self.window

    def token_scores(self, view: LayerView) -> torch.Tensor:
        return snapkv_kv_head_scores(view, self.window, self.kernel_size).mean(dim=1)
