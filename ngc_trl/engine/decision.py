"""One eviction decision: score a layer's live keys, cut them into blocks, choose the keep-set.

`score_blocks` is shared by the rollout (`ngc_trl.engine.generation`, on the compact cache) and the replay
forward (`ngc_trl.engine.replay`, on the full sequence with grad), which is what makes the replayed eviction
log-probabilities equal the rollout's. `decide` draws the action (Gumbel-top-k or top-k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ngc_trl.engine.config import EvictionConfig
from ngc_trl.engine.policy import EvictionPolicy, LayerView
from ngc_trl.engine.sampling import plackett_luce_log_prob, rank_blocks
from ngc_trl.engine.scoring import block_logits, protection_mask, reduce_blocks


@dataclass
class BlockInputs:
    """Per-row block view of one layer at a round. All ``(R, N)`` except ``n_blocks (R,)``."""

    logits: torch.Tensor  # Plackett–Luce logits (may carry grad)
    pool: torch.Tensor  # blocks the action samples from (exist, not forced)
    forced: torch.Tensor  # blocks kept by a protection
    exists: torch.Tensor  # blocks with at least one live key
    n_blocks: torch.Tensor  # N per row


def score_blocks(policy: EvictionPolicy, view: LayerView, cfg: EvictionConfig) -> BlockInputs:
    """Per-key policy scores + config protections -> block logits, pool and forced blocks."""
    scores = policy.token_scores(view)
    prot = protection_mask(view.pos, view.live, view.prompt_len, cfg)
    scores = scores.masked_fill(prot, float("inf"))
    n_blocks = (view.live.sum(-1) + cfg.block_size - 1) // cfg.block_size
    n_max = max(int(n_blocks.max()), 1) if n_blocks.numel() else 1
    bs, forced, exists = reduce_blocks(scores, view.bid, n_max, cfg.block_reduction)
    pool = exists & ~forced
    return BlockInputs(block_logits(bs, cfg, pool), pool, forced & exists, exists, n_blocks)


def num_kept(n_blocks: torch.Tensor, eviction_rate: torch.Tensor) -> torch.Tensor:
    """``K = max(1, ceil((1 − ε)·N))`` per row (``0`` where ``N = 0``); rounding noise below 1e-9 ignored."""
    raw = (1.0 - eviction_rate.double()) * n_blocks.double()
    k = torch.ceil(torch.round(raw * 1e9) / 1e9).long().clamp(min=1)
    return torch.where(n_blocks > 0, torch.minimum(k, n_blocks), torch.zeros_like(k))


@dataclass
class Decision:
    """The action of one layer at one round, for ``R`` rows.

    ``chosen (R, N)``: sampled block ids in sampled order, ``-1`` after the last; ``keep_block (R, N)``
    bool (chosen or forced); ``logp (R,)`` Plackett–Luce log-prob of ``chosen`` (0 where nothing is
    evicted); ``acted (R,)`` bool: at least one block evicted.
    """

    chosen: torch.Tensor
    keep_block: torch.Tensor
    logp: torch.Tensor
    acted: torch.Tensor


def decide(
    blocks: BlockInputs,
    eviction_rate: torch.Tensor,
    sample: bool | torch.Tensor,
    generator: torch.Generator | None = None,
) -> Decision:
    """Keep ``K`` blocks per row: all forced ones plus ``K − |forced|`` drawn from the pool.

    ``eviction_rate (R,)``: ε per row (rates may differ per prompt, e.g. interoception). ``sample``:
    Gumbel-top-k for every row, or top-k, or an ``(R,)`` bool choosing per row.
    """
    k = torch.maximum(num_kept(blocks.n_blocks, eviction_rate), blocks.forced.sum(-1))
    n_sample = (k - blocks.forced.sum(-1)).clamp(min=0)
    acted = k < blocks.n_blocks
    order = rank_blocks(blocks.logits.detach(), blocks.pool, sample, generator)
    slot = torch.arange(order.shape[-1], device=order.device)
    chosen = torch.where((slot < n_sample[:, None]) & acted[:, None], order, torch.full_like(order, -1))
    n = order.shape[-1]
    picked = torch.zeros(order.shape[0], n + 1, dtype=torch.bool, device=order.device)
    picked.scatter_(1, torch.where(chosen >= 0, chosen, n), True)  # padding lands in a dump column
    keep_block = blocks.forced | picked[:, :n] | (~acted[:, None] & blocks.exists)
    logp = plackett_luce_log_prob(blocks.logits, chosen, blocks.pool)
    return Decision(chosen, keep_block, torch.where(acted, logp, torch.zeros_like(logp)), acted)
