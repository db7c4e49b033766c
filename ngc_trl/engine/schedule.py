"""Decode schedules: *when* the cache changes during decoding, apart from *which* keys a score rule keeps.

`ngc_trl.engine.generation.generate_with_eviction` samples a token, then asks its schedule to feed it; a
schedule decides what is fed, hidden and dropped at that step:

* `FullCache` — feed every token, never touch the cache (the upper bound every method is compared with).
* `EvictionRounds` — NGC's δ / ε / b schedule: before feeding the token at absolute position ``p``, a row
  whose ``p`` is a multiple of ``δ`` (or that just finished a prompt of ``≥ δ`` tokens,
  `EvictionConfig.round_positions`) runs a round in every layer: the score rule (an `EvictionPolicy`)
  scores the live keys, blocks are kept (Gumbel-top-k when sampling, else top-k) and the layer is compacted.
  Each decision is recorded for the replay (`ngc_trl.engine.records`). With a meta-token it is forced as
  the last token before every round (paper §A.4).
* `BeaconWindows` — Breadcrumbs: once ``i > 0`` generated tokens have been fed with ``i mod c == 0`` and the
  next token ``t_{i+1}`` has been sampled (and will be fed), the beacon token is fed at the next position
  (forced; its logits unused; not part of the completion) and ``t_{i+1}`` right after it, in one forward in
  which ``t_{i+1}`` does not see the window the beacon closes; then the window's ``c`` entries are dropped
  from every layer. That equals feeding the beacon, dropping, then feeding ``t_{i+1}``, with one forward
  per token instead of ``1 + 1/c``; the window is held one token longer (peak entries one above that
  sequence's). Rows decode in lockstep, so beacons fire at the same step in every unfinished row (per-row
  ``c`` is allowed). Nothing is recorded: `ngc_trl.breadcrumbs.beacons.beacon_layout` rebuilds the beacons
  from the completion lengths alone.

A new schedule (e.g. a fixed cache budget instead of a fixed rate) is one subclass of `DecodeSchedule`:
override `feed` (and `force_token` / `mask_logits` if it forces or forbids tokens).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ngc_trl.engine.cache import NGCCache
from ngc_trl.engine.config import BeaconConfig, EvictionConfig
from ngc_trl.engine.decision import decide, score_blocks
from ngc_trl.engine.policy import EvictionPolicy, LayerView
from ngc_trl.engine.records import EvictionRecords, RecordBuilder
from ngc_trl.engine.scoring import block_ids


@dataclass
class DecodeState:
    """The decode loop's per-row state, shared with its schedule (``B`` rows, ``L`` layers).

    Attributes:
        cache: the batch's `NGCCache`.
        forward: ``forward(ids (B, n), pos (B, n), valid (B, n), hide=None, keep=1) -> logits`` runs the model
            on ``n`` new tokens per row (``hide``: per-token ``(lo, hi)`` key positions the token must not
            see) and returns the last ``keep`` positions' fp32 logits (``(B, V)`` when ``keep == 1``).
        prompt_len: ``(B,)`` long prompt lengths (padding excluded).
        n_fed: ``(B,)`` long entries fed so far = the absolute position of the next token (device).
        fed_host, plen_host: host mirrors of ``n_fed`` / ``prompt_len`` (the schedule needs no sync).
        finished, finished_host: ``(B,)`` bool rows that emitted EOS (device / host).
        step: the decode step (``step`` generated tokens are cached when `DecodeSchedule.feed` runs).
    """

    cache: NGCCache
    forward: Callable
    prompt_len: torch.Tensor
    n_fed: torch.Tensor
    fed_host: torch.Tensor
    plen_host: torch.Tensor
    finished: torch.Tensor
    finished_host: torch.Tensor
    step: int = 0


class DecodeSchedule:
    """Feed every token, change nothing: the full cache. Subclasses change the cache around the feed.

    Class attributes ``query_window`` / ``tracks_attention``: what the cache must keep for the score rule
    (recent queries; attention summed over every step), both off here. ``eviction_time``: seconds spent
    changing the cache, filled by subclasses. ``eviction_rate``: optional ``(B,)`` ε per row (each in
    ``[0, 1)``), recorded with the actions (zeros when None).
    """

    query_window: int = 0
    tracks_attention: bool = False

    def __init__(self, eviction_rate: torch.Tensor | None = None) -> None:
        if eviction_rate is not None and ((eviction_rate < 0) | (eviction_rate >= 1)).any():
            raise ValueError("eviction_rate: every per-sequence rate must be in [0, 1)")
        self.eviction_rate = eviction_rate
        self.eviction_time = 0.0

    def start(self, state: DecodeState) -> None:
        """Called once before the prefill, with the decode loop's state."""
        self.batch, self.n_layers = state.n_fed.shape[0], len(state.cache.layers)
        self.device = state.n_fed.device

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, V)`` logits with tokens the schedule forbids set to ``-inf`` (for sampling only)."""
        return logits

    def force_token(self, tok: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """``(B,)`` sampled tokens, with any token the schedule forces substituted."""
        return tok

    def feed(self, tok: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Feed the sampled ``tok (B,)`` (finished rows: padding, not counted); return the next ``(B, V)`` logits."""
        active = ~state.finished
        logits = state.forward(tok[:, None], state.n_fed[:, None], active[:, None])
        state.n_fed = state.n_fed + active.long()
        state.fed_host = state.fed_host + (~state.finished_host).long()
        return logits

    def uncounted_entries(self) -> torch.Tensor | int:
        """Entries fed per row that a full cache on the same completion would not hold (beacons)."""
        return 0

    def rates(self) -> torch.Tensor:
        """``(B,)`` fp32 ε per row on the decode device (zeros without a rate)."""
        if self.eviction_rate is None:
            return torch.zeros(self.batch, device=self.device)
        return self.eviction_rate.to(self.device).float()

    def records(self) -> EvictionRecords:
        """The eviction actions taken (none here)."""
        return RecordBuilder(self.batch, self.n_layers).build(self.rates(), self.device)


class FullCache(DecodeSchedule):
    """The full cache: no round ever fires (``EvictionConfig(policy="full")``)."""


class EvictionRounds(DecodeSchedule):
    """NGC's δ / ε / b schedule with a score rule (module docstring).

    Args:
        cfg: δ, b and the protections. policy: the score rule (its `EvictionPolicy.token_scores`).
        eviction_rate: ``(B,)`` fp32 ε per row, each in ``[0, 1)``.
        sample: Gumbel-top-k (training rollouts) or deterministic top-k.
        generator: the noise source. forced_token_id: the meta-token, or None.
        sampled_round: optional ``(B,)`` long (beyond the paper; only with ``sample``): row ``b`` draws
            Gumbel-top-k at its round ``sampled_round[b]`` (0-based) only and keeps the top-k at every other
            round (``-1``: top-k at every round).
    """

    def __init__(
        self,
        cfg: EvictionConfig,
        policy: EvictionPolicy,
        eviction_rate: torch.Tensor,
        sample: bool,
        generator: torch.Generator | None = None,
        forced_token_id: int | None = None,
        sampled_round: torch.Tensor | None = None,
    ) -> None:
        super().__init__(eviction_rate)
        if sampled_round is not None and not sample:
            raise ValueError(
                "sampled_round: only sampled rollouts (sample_evictions=True) pick a round to sample"
            )
        self.cfg, self.policy = cfg, policy
        self.sample, self.generator, self.forced_token_id = sample, generator, forced_token_id
        self.sampled_round = None if sampled_round is None else sampled_round.long().cpu()
        self.query_window, self.tracks_attention = policy.query_window, policy.tracks_attention

    def start(self, state: DecodeState) -> None:
        super().start(state)
        self.policy.check_batch(self.batch)
        self.builder = RecordBuilder(self.batch, self.n_layers)
        self.eps = self.rates()

    def force_token(self, tok: torch.Tensor, state: DecodeState) -> torch.Tensor:
        if self.forced_token_id is None:
            return tok
        # this token sits at position n_fed; force it when a round fires right after it
        due = (state.n_fed + 1) % self.cfg.eviction_interval == 0
        return torch.where(due, torch.full_like(tok, self.forced_token_id), tok)

    def feed(self, tok: torch.Tensor, state: DecodeState) -> torch.Tensor:
        delta = self.cfg.eviction_interval
        fed, plen = state.fed_host, state.plen_host
        due = ~state.finished_host & ((fed % delta == 0) | ((fed == plen) & (plen >= delta)))
        if bool(due.any()):
            t0 = time.perf_counter()
            rows = torch.nonzero(due).flatten().to(self.device)
            per_layer = self.round(state, rows, state.n_fed[rows])
            self.builder.add(rows, state.n_fed[rows], per_layer)
            self.eviction_time += time.perf_counter() - t0
        return super().feed(tok, state)

    def round(self, state: DecodeState, rows: torch.Tensor, round_pos: torch.Tensor) -> list:
        """One round for the rows ``rows (R,)`` in every layer; returns per-layer ``(decision, blocks,
        keep_block)``. ``round_pos (R,)``: absolute position of the round in each row."""
        cache, cfg = state.cache, self.cfg
        sample = self.sample
        if self.sampled_round is not None:  # this row's round index == its sampled round
            r_cpu = rows.cpu()
            sample = (self.builder.count[r_cpu] == self.sampled_round[r_cpu]).to(rows.device)
        per_layer = []
        for layer_idx, layer in enumerate(cache.layers):
            assert layer.keys is not None and layer.values is not None and layer.pos is not None  # prefilled
            s = layer.num_slots
            live = layer.live
            view = LayerView(
                keys=layer.keys[rows, :s].transpose(1, 2),
                values=layer.values[rows, :s].transpose(1, 2),
                pos=layer.pos[rows, :s],
                live=live[rows],
                bid=block_ids(live[rows], cfg.block_size),
                queries=None if layer.queries is None else layer.queries[rows],
                q_pos=None if layer.q_pos is None else layer.q_pos[rows],
                q_valid=None if layer.q_valid is None else layer.q_valid[rows],
                scale=cache.scale,
                prompt_len=state.prompt_len[rows],
                attention_sum=None if layer.attention_sum is None else layer.attention_sum[rows, :s],
                generator=self.generator,
                rows=rows,
                layer_idx=layer_idx,
                round_pos=round_pos,
            )
            blocks = score_blocks(self.policy, view, cfg)
            dec = decide(blocks, self.eps[rows], sample, self.generator)
            keep_slot = live.clone()
            keep_slot[rows] = dec.keep_block.gather(1, view.bid.clamp(min=0)) & view.live
            layer.keep(keep_slot)
            per_layer.append((dec, blocks, dec.keep_block))
        return per_layer

    def records(self) -> EvictionRecords:
        return self.builder.build(self.eps, self.device)


class BeaconWindows(DecodeSchedule):
    """Breadcrumbs beacon decoding (module docstring).

    Args:
        cfg: the `BeaconConfig` (beacon id, default ``c``).
        compression_ratio: optional ``(B,)`` ``c`` per row (each ``>= 2``), else ``cfg.compression_ratio``.
    """

    def __init__(self, cfg: BeaconConfig, compression_ratio: torch.Tensor | None = None) -> None:
        super().__init__()
        c = torch.as_tensor(compression_ratio if compression_ratio is not None else cfg.compression_ratio)
        if c.is_floating_point() or (c < 2).any():
            raise ValueError("compression_ratio: every per-sequence ratio must be an integer >= 2")
        self.cfg, self.c = cfg, c

    def start(self, state: DecodeState) -> None:
        super().start(state)
        self.c_host = self.c.expand(self.batch).long().cpu()
        self.c_dev = self.c_host.to(self.device)
        self.beacon = torch.tensor([self.cfg.beacon_token_id], device=self.device)
        self.n_beacons = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        self.live_host = state.plen_host.clone()  # host mirror of every layer's live entries

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        # the beacon is only ever forced (TRL's suppress_tokens); log-probs use the unmasked logits
        return logits.index_fill(1, self.beacon, float("-inf"))

    def feed(self, tok: torch.Tensor, state: DecodeState) -> torch.Tensor:
        step, fin = state.step, state.finished_host
        due = None if step == 0 else ~fin & (step % self.c_host == 0)
        if due is None or not bool(due.any()):
            self.live_host = self.live_host + (~fin).long()
            return super().feed(tok, state)
        # `step` generated tokens are cached and t_{step+1} comes next: the beacon and t_{step+1} in one
        # forward (t_{step+1} does not see the window), then the window is dropped
        n_fed, c = state.n_fed, self.c_dev
        active, due_dev = ~state.finished, due.to(self.device)
        first = torch.where(due_dev, torch.full_like(tok, self.cfg.beacon_token_id), tok)
        second_pos = torch.where(due_dev, n_fed + 1, n_fed)
        zero = torch.zeros_like(n_fed)
        hide_lo, hide_hi = torch.where(due_dev, n_fed - c, 0), torch.where(due_dev, n_fed, 0)
        both = state.forward(
            torch.stack([first, tok], 1),
            torch.stack([n_fed, second_pos], 1),
            torch.stack([active, due_dev], 1),
            hide=(torch.stack([zero, hide_lo], 1), torch.stack([zero, hide_hi], 1)),
            keep=2,
        )
        state.n_fed = n_fed + active.long() + due_dev.long()
        self.n_beacons = self.n_beacons + due_dev.long()
        state.fed_host = state.fed_host + (~fin).long() + due.long()
        self.live_host = self.live_host + (~fin).long() + due.long() - self.c_host * due.long()
        t0 = time.perf_counter()
        state.cache.drop_before_newest(due_dev, c, int(self.live_host.max()), newest=2)
        self.eviction_time += time.perf_counter() - t0
        return torch.where(due_dev[:, None], both[:, 1], both[:, 0])

    def uncounted_entries(self) -> torch.Tensor:
        return self.n_beacons


def make_schedule(
    config: EvictionConfig | BeaconConfig,
    batch: int,
    device: torch.device,
    *,
    policy: EvictionPolicy | None = None,
    eviction_rate: torch.Tensor | None = None,
    sample_evictions: bool = False,
    generator: torch.Generator | None = None,
    forced_token_id: int | None = None,
    compression_ratio: torch.Tensor | None = None,
    sampled_round: torch.Tensor | None = None,
) -> DecodeSchedule:
    """The schedule a config describes: `BeaconWindows` for a `BeaconConfig`; for an `EvictionConfig`,
    `FullCache` when its score rule never evicts (``full``), else `EvictionRounds` with that rule
    (``policy``, default ``get_policy(config)``) at ``eviction_rate (B,)`` (default ``config.eviction_rate``)."""
    from ngc_trl.engine.policy import get_policy

    if isinstance(config, BeaconConfig):
        if (
            policy is not None
            or eviction_rate is not None
            or forced_token_id is not None
            or sampled_round is not None
        ):
            raise ValueError(
                "a BeaconConfig decodes without a score rule, eviction rate, meta-token or sampled round"
            )
        return BeaconWindows(config, compression_ratio)
    if compression_ratio is not None:
        raise ValueError("compression_ratio: only a BeaconConfig (Breadcrumbs) decodes with beacons")
    if policy is None:
        policy = get_policy(config)
    elif policy.name != config.policy:
        raise ValueError(
            f"policy: a {policy.name!r} policy was given for EvictionConfig.policy={config.policy!r}"
        )
    eps = eviction_rate if eviction_rate is not None else torch.full((batch,), config.eviction_rate)
    eps = eps.to(device).float()
    if not policy.evicts:
        policy.check_batch(batch)
        return FullCache(eps)
    return EvictionRounds(config, policy, eps, sample_evictions, generator, forced_token_id, sampled_round)
