"""L_mem: the eviction policy-gradient term of NGC's loss (paper Eq. 4–5, docs/method.md §5.1).

Every eviction action (one per rollout, round and layer) is scored with the rollout's group advantage,
exactly like its tokens::

    L_mem = Σ_i  Σ_ℓ  mean_{rounds r of rollout i}  −min(ρ_irℓ Â_i, clip(ρ_irℓ, 1 − ε_low, 1 + ε_high) Â_i)
            / normalizer

with ``ρ = exp(new − old)`` the ratio of the action's Plackett–Luce log-prob under the current policy to
its log-prob when it was taken. On-policy (``old == new.detach()``) the ratio is 1 and the gradient is the
paper's ``−(1/|T_i|) Σ_t ∇log π(σ_t) Â_i``. The normalizer is Dr. GRPO's ``B · max_completion_length``
(the constant TRL divides the token sum by), so that a coefficient of 1 keeps the paper's relative weight of
L_mem and L_token. A pure function of tensors: the trainer feeds it the replay's log-probs.
"""

from __future__ import annotations

import torch


def eviction_policy_loss(
    new_logp: torch.Tensor,
    old_logp: torch.Tensor,
    acted: torch.Tensor,
    advantages: torch.Tensor,
    normalizer: float,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    sequence_level: bool = False,
) -> torch.Tensor:
    """L_mem for one batch (a scalar with the graph of ``new_logp``).

    Args:
        new_logp: ``(B, R, L)`` log-prob of each recorded action under the current policy (with grad).
        old_logp: ``(B, R, L)`` its log-prob under the policy that took it (no grad).
        acted: ``(B, R, L)`` bool, the action exists (round ``r`` fired in rollout ``b`` and layer ``l`` evicted).
        advantages: ``(B,)`` group advantages of the rollouts.
        normalizer: the divisor of the summed loss (the trainer passes ``B · max_completion_length``).
        epsilon_low, epsilon_high: the PPO clip range (TRL's ``epsilon`` / ``epsilon_high``).
        delta: TRL's two-sided clip: the unclipped ratio is capped at ``delta`` (None: off).
        sequence_level: GSPO (``importance_sampling_level="sequence"``): one ratio per rollout, the
            exponentiated mean log-ratio over all its actions.
    """
    m = acted.to(new_logp.dtype)
    log_ratio = new_logp - old_logp
    if sequence_level:
        per_seq = (log_ratio * m).sum((1, 2)) / m.sum((1, 2)).clamp(min=1)
        log_ratio = per_seq[:, None, None].expand_as(new_logp)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        ratio = ratio.clamp(max=delta)
    adv = advantages.to(new_logp.dtype)[:, None, None]
    per_action = -torch.min(ratio * adv, clipped * adv) * m  # (B, R, L)
    per_rollout = (per_action.sum(1) / m.sum(1).clamp(min=1)).sum(-1)  # mean over rounds, sum over layers
    return per_rollout.sum() / normalizer
