"""Attention scores over the cache and their reduction to blocks (paper §4.2).

Shared by the rollout (on the compacted cache, no grad) and the replay forward (on the full sequence
with an "alive at this round" mask, with grad), so both compute bit-for-bit the same formulas.
"""

from __future__ import annotations

import torch

from ngc_trl.engine.config import EvictionConfig


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, H_kv, S, D) -> (B, H_kv·groups, S, D)``: each KV head serves ``groups`` query heads (GQA)."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def window_attention(q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention of the window queries over the cached keys, in fp32.

    Args:
        q: ``(B, H, w, D)`` post-RoPE queries of the ``w`` most recent tokens.
        k: ``(B, H_kv, S, D)`` post-RoPE cached keys (GQA: ``H`` is a multiple of ``H_kv``).
        visible: ``(B, w, S)`` bool, key ``j`` visible to query ``i`` (live and causal).
        scale: ``1/√d_h``.

    Returns:
        ``(B, H, w, S)`` probabilities; rows without any visible key are all zero.
    """
    groups = q.shape[1] // k.shape[1]
    logits = torch.matmul(q.float(), repeat_kv(k.float(), groups).transpose(-1, -2)) * scale
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def head_query_mean(probs: torch.Tensor, q_valid: torch.Tensor) -> torch.Tensor:
    """``ψ_t = 1/(H·w) Σ_h Σ_q A[h, q, t]`` over valid queries: ``(B, H, w, S), (B, w) -> (B, S)``."""
    w = q_valid.to(probs.dtype)
    summed = torch.einsum("bhqs,bq->bs", probs, w)
    return summed / (w.sum(-1, keepdim=True).clamp(min=1) * probs.shape[1])


def block_ids(live: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cut the live keys of every row, in temporal (slot) order, into blocks of ``block_size``.

    ``live (B, S)`` bool ``->`` ``(B, S)`` long block id, ``-1`` on non-live slots. Storage order must be
    temporal among live slots (it is, in the cache and in the replay sequence).
    """
    rank = torch.cumsum(live.long(), dim=-1) - 1
    return torch.where(live, rank // block_size, torch.full_like(rank, -1))


def reduce_blocks(scores: torch.Tensor, bid: torch.Tensor, num_blocks: int, reduction: str):
    """Per-key scores to block scores.

    Args:
        scores: ``(B, S)`` per-key keep scores; ``+inf`` marks a protected key.
        bid: ``(B, S)`` block id per slot, ``-1`` for non-live slots.
        num_blocks: ``N_max``, number of block columns in the output.
        reduction: ``mean`` (paper: masked mean over valid keys), ``max`` or ``sum``.

    Returns:
        ``block_scores (B, N_max)`` (finite; protected blocks get their finite keys' value, or 0),
        ``forced (B, N_max)`` bool: the block holds a protected key,
        ``exists (B, N_max)`` bool: the block has at least one live key.
    """
    b = scores.shape[0]
    col = torch.where(bid >= 0, bid, torch.full_like(bid, num_blocks))  # dump column for non-live slots
    inf = torch.isinf(scores) & (scores > 0)
    finite = torch.where(inf, torch.zeros_like(scores), scores).float()
    counts = torch.zeros(b, num_blocks + 1, device=scores.device).scatter_add_(
        1, col, torch.ones_like(finite)
    )
    forced = torch.zeros(b, num_blocks + 1, device=scores.device).scatter_add_(1, col, inf.float()) > 0
    if reduction == "max":
        init = torch.full((b, num_blocks + 1), float("-inf"), device=scores.device)
        out = init.scatter_reduce(1, col, finite, reduce="amax", include_self=True)
        out = torch.where(torch.isinf(out), torch.zeros_like(out), out)
    else:
        out = torch.zeros(b, num_blocks + 1, device=scores.device, dtype=finite.dtype).scatter_add(
            1, col, finite
        )
        if reduction == "mean":
            out = out / counts.clamp(min=1)
    return out[:, :num_blocks], forced[:, :num_blocks], counts[:, :num_blocks] > 0


def block_logits(
    block_scores: torch.Tensor, cfg: EvictionConfig, pool: torch.Tensor | None = None
) -> torch.Tensor:
    """Block scores ``(R, N)`` to Plackett–Luce logits ``(R, N)``; ``logit_scale`` multiplies the result.

    * ``"none"`` (paper, Eq. 2): the raw block mean. Attention means are ``≤ 1/b``, so with Gumbel(0, 1) noise
      the training-time draw is close to uniform.
    * ``"log"``: ``log(max(score, 1e-30))`` (not in the paper).
    * ``"relative"``: ``score / mean_{i ∈ pool} score_i`` (not in the paper): each block's score relative to the
      average candidate block of its row (``pool (R, N)`` bool, the blocks the action samples from). For the
      ``ngc`` scorer this is the block's attention mass times the number of blocks: 1 for a block that gets
      its fair share, scale-free in the cache length and the block size, so the policy's sharpness does not
      shrink as the cache grows.
    """
    x = block_scores.float()
    if cfg.logit_transform == "log":
        x = torch.log(x.clamp(min=1e-30))
    elif cfg.logit_transform == "relative":
        if pool is None:
            raise ValueError("block_logits: logit_transform='relative' needs the pool of candidate blocks")
        m = pool.to(x.dtype)
        mean = (x * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
        x = x / mean.clamp(min=1e-30)
    return x * cfg.logit_scale


def protection_mask(pos, live, prompt_len, cfg: EvictionConfig) -> torch.Tensor:
    """``(B, S)`` bool: keys the *config* protects (prompt, first ``num_sink`` live, newest ``num_recent``).

    ``pos (B, S)`` absolute positions, ``live (B, S)`` bool, ``prompt_len (B,)`` long.
    """
    prot = torch.zeros_like(live)
    if cfg.protect_prompt:
        prot |= pos < prompt_len[:, None]
    if cfg.num_sink:
        rank = torch.cumsum(live.long(), -1) - 1
        prot |= rank < cfg.num_sink
    if cfg.num_recent:
        rank_from_end = live.long().sum(-1, keepdim=True) - torch.cumsum(live.long(), -1)
        prot |= rank_from_end < cfg.num_recent
    return prot & live
