"""Eviction actions: Gumbel-top-k sampling of the keep-set and its exact Plackett–Luce log-probability.

Adding i.i.d. Gumbel(0, 1) noise to logits and sorting is exactly sequential sampling without
replacement (Kool et al., 2019, "Stochastic Beams and Where to Find Them"). The action of a round is the
ordered keep-sequence ``σ`` (decreasing perturbed value); its probability is Plackett–Luce:

    log p(σ | s) = Σ_j [ s_{σ_j} − logsumexp_{t ∈ pool \\ {σ_1..σ_{j−1}}} s_t ]          (paper Eq. 3)

All functions broadcast over leading dimensions, so one call serves every (sequence, layer) of a round.
"""

from __future__ import annotations

import torch


def gumbel_noise(
    shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32
) -> torch.Tensor:
    """i.i.d. Gumbel(0, 1) noise of ``shape``, drawn from ``generator`` (fp32 for the small-probability tail)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    u = u.clamp_(min=torch.finfo(torch.float32).tiny, max=1.0 - torch.finfo(torch.float32).eps)
    return (-torch.log(-torch.log(u))).to(dtype)


def rank_blocks(
    logits: torch.Tensor,
    pool: torch.Tensor,
    sample: bool | torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Order the blocks of every row for a keep decision.

    Args:
        logits: ``(..., N)`` block logits.
        pool: ``(..., N)`` bool, blocks that may be chosen (valid and not forced).
        sample: add Gumbel noise (training rollouts) or not (deterministic top-k, evaluation); a bool
            tensor of the leading shape ``(...)`` decides per row.
        generator: source of the noise.

    Returns:
        ``(..., N)`` long: block ids sorted by decreasing (perturbed) logit, pool members first; the
        first ``K`` entries are the Gumbel-top-k sample ``σ`` in sampled order. Ties keep the earlier block.
    """
    values = logits.float()
    if isinstance(sample, torch.Tensor):
        if bool(sample.any()):
            noise = gumbel_noise(values.shape, generator, values.device)
            values = values + noise * sample.to(values.device)[..., None].to(values.dtype)
    elif sample:
        values = values + gumbel_noise(values.shape, generator, values.device)
    values = values.masked_fill(~pool, float("-inf"))
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


def plackett_luce_log_prob(logits: torch.Tensor, order: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Exact log-probability of drawing the blocks ``order`` (in that order) without replacement.

    Args:
        logits: ``(..., N)`` block logits (may carry gradients).
        order: ``(..., K)`` long, the sampled ids, ``-1`` padding after the last one. Ids must be in ``pool``.
        pool: ``(..., N)`` bool, the items the draw was made from.

    Returns:
        ``(...)`` fp32 log-probability; ``0`` for an empty action. Computed with a reverse cumulative
        logsumexp over the chosen items plus one logsumexp over the pool items that were not chosen, so no
        probability mass is ever subtracted (stable for any logit scale).
    """
    logits = logits.float()
    chosen = order >= 0
    idx = order.clamp(min=0)
    s = torch.gather(logits, -1, idx).masked_fill(~chosen, float("-inf"))  # (..., K)
    n = logits.shape[-1]
    dump = torch.where(chosen, order, torch.full_like(order, n))  # padding lands in a dump column
    was_chosen = torch.zeros(*pool.shape[:-1], n + 1, dtype=torch.bool, device=pool.device)
    was_chosen = was_chosen.scatter(-1, dump, True)[..., :n] & pool
    rest = torch.logsumexp(logits.masked_fill(~pool | was_chosen, float("-inf")), dim=-1, keepdim=True)
    # denominators: D_j = log( Σ_{i ≥ j} exp(s_i) + Σ_rest exp(s_t) )
    tail = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)
    denom = torch.logaddexp(tail, rest.expand_as(tail))
    terms = torch.where(chosen, s - denom, torch.zeros_like(s))
    return terms.sum(-1)


def plackett_luce_entropy_proxy(logits: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Entropy of the first draw's categorical distribution over ``pool`` (a cheap, logged diagnostic of how
    peaked the eviction policy is; ``log N`` means uniform). ``(..., N) -> (...)``."""
    logp = torch.log_softmax(logits.float().masked_fill(~pool, float("-inf")), dim=-1)
    p = logp.exp()
    return -(p * logp.masked_fill(~pool, 0.0)).sum(-1)
