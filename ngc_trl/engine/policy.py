"""The eviction-policy interface (one small class with one score rule) and the registry of policies by name.

A policy turns what a layer holds at a round (a `LayerView`) into a per-key keep score ``(B, S)``:
higher means keep, ``+inf`` marks a key the method itself protects (StreamingLLM's sinks, SnapKV's
window, TOVA's last token). Everything else — protections from the config, block reduction, top-k or
Gumbel-top-k, compaction, records — is shared (`ngc_trl.engine.cache`), so every policy runs under the same
δ / ε / b schedule and peak cache is matched across methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ngc_trl.engine.config import EvictionConfig
from ngc_trl.engine.scoring import window_attention


@dataclass
class LayerView:
    """What one layer holds at a round, for the rows that evict now.

    Attributes:
        keys, values: ``(R, H_kv, S, D)`` post-RoPE cache (slot order is temporal among live slots).
        pos: ``(R, S)`` long absolute positions.  live: ``(R, S)`` bool.
        bid: ``(R, S)`` long block id of each live slot (``-1`` elsewhere).
        queries: ``(R, H, W, D)`` post-RoPE queries of the ``W`` most recent tokens (``W`` =
            `EvictionPolicy.query_window`), oldest first.  q_pos / q_valid: ``(R, W)``.
        scale: ``1/√d_h``.  attention_sum: ``(R, S)`` accumulated attention (H2O) or None.
        prompt_len: ``(R,)`` long.  generator: noise source for stochastic policies.
        layer_idx: the layer (filled by the decode loop and the replay forward; per-layer rules such as
            `score_head` read it).
        rows: ``(R,)`` long indices of these rows in the decoded batch; round_pos: ``(R,)`` long absolute
            position ``p`` of the round (the token fed next). Filled by `ngc_trl.engine.generation`; None
            elsewhere (the replay forward). Only policies that read per-row data of the batch need them
            (`oracle`).
    """

    keys: torch.Tensor
    values: torch.Tensor
    pos: torch.Tensor
    live: torch.Tensor
    bid: torch.Tensor
    queries: torch.Tensor | None
    q_pos: torch.Tensor | None
    q_valid: torch.Tensor | None
    scale: float
    prompt_len: torch.Tensor
    attention_sum: torch.Tensor | None = None
    generator: torch.Generator | None = None
    rows: torch.Tensor | None = None
    layer_idx: int | None = None
    round_pos: torch.Tensor | None = None

    def window_probs(self, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention ``(R, H, w, S)`` (fp32) of the ``w`` most recent queries over live keys, causal,
        and the validity ``(R, w)`` of those queries."""
        assert self.queries is not None and self.q_pos is not None and self.q_valid is not None, (
            "window_probs needs the recent queries (a policy with a query window)"
        )
        q, qp, qv = self.queries[:, :, -w:], self.q_pos[:, -w:], self.q_valid[:, -w:]
        visible = self.live[:, None, :] & (self.pos[:, None, :] <= qp[:, :, None]) & qv[:, :, None]
        return window_attention(q, self.keys, visible, self.scale), qv


class EvictionPolicy:
    """Base class. Subclasses set `name` and implement `token_scores`.

    Class attributes:
        name: registry key.
        evicts: False for a rule that keeps everything (``full``): it decodes under the round-free
            `ngc_trl.engine.schedule.FullCache` schedule.
        tracks_attention: True if the policy needs attention summed over *every* decoding step (H2O).
        learned: True for the policy trained by NGC (its scores carry the eviction gradient in replay).
        hindsight: True for an evaluation-only ceiling that reads the future of a full-cache completion
            (`oracle`): it is built per batch with that data and cannot roll out in training.
        needs_model: True for a rule whose parameters live on the model (`score_head`): `get_policy` builds
            it with `from_model` (``generate_with_eviction`` and the replay pass their model).
    """

    name: ClassVar[str] = ""
    evicts: ClassVar[bool] = True
    tracks_attention: ClassVar[bool] = False
    learned: ClassVar[bool] = False
    hindsight: ClassVar[bool] = False
    needs_model: ClassVar[bool] = False

    def __init__(self, cfg: EvictionConfig):
        self.cfg = cfg

    @property
    def query_window(self) -> int:
        """How many recent queries the cache must keep for this policy (0: none)."""
        return 0

    @classmethod
    def from_model(cls, cfg: EvictionConfig, model) -> EvictionPolicy:
        """The rule for ``model`` (only `needs_model` rules read it)."""
        return cls(cfg)

    def check_batch(self, batch_size: int) -> None:
        """Raise ``ValueError`` if this policy cannot decode a batch of ``batch_size`` rows (called by
        `ngc_trl.engine.generation.generate_with_eviction` before the prefill; every score rule can)."""

    def token_scores(self, view: LayerView) -> torch.Tensor:
        """``(R, S)`` keep score per slot (higher keeps; ``+inf`` protects). Non-live slots are ignored."""
        raise NotImplementedError


POLICIES: dict[str, type[EvictionPolicy]] = {}
"""Score rules by name. Filled by `ngc_trl.policies` (imported with the package), so the engine never
imports a concrete rule: add one with `register_policy`."""


def register_policy(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
    """Add ``cls`` to `POLICIES` under ``cls.name``; a name taken by another class fails."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}.name: a registered policy needs a name")
    if POLICIES.get(cls.name, cls) is not cls:
        raise ValueError(f"policy name {cls.name!r} is already registered")
    POLICIES[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    """Every valid ``EvictionConfig.policy`` name, sorted."""
    return sorted(POLICIES)


def get_policy(cfg, model=None) -> EvictionPolicy:
    """The policy instance for ``cfg.policy`` (built from ``model`` if the rule `needs_model`); unknown names
    fail with the list of valid ones."""
    cls = POLICIES.get(cfg.policy)
    if cls is None:
        raise ValueError(f"unknown eviction policy {cfg.policy!r}; valid: {', '.join(policy_names())}")
    return cls.from_model(cfg, model) if cls.needs_model else cls(cfg)
