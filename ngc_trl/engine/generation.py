"""`generate_with_eviction`: the decode loop, for rollouts and evaluation alike.

For a left-padded batch, prefill once, then decode one token per step. What happens to the cache between
steps is the schedule's business (`ngc_trl.engine.schedule`): `EvictionRounds` (NGC's δ / ε / b rounds,
each decision recorded for the replay), `BeaconWindows` (Breadcrumbs) or `FullCache`. The loop samples
tokens, keeps the per-row bookkeeping and accounts the cache (`CacheStats`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from ngc_trl.engine.attention import no_mask, use_ngc_attention
from ngc_trl.engine.cache import NGCCache
from ngc_trl.engine.config import BeaconConfig, EvictionConfig
from ngc_trl.engine.policy import EvictionPolicy, get_policy
from ngc_trl.engine.records import EvictionRecords
from ngc_trl.engine.schedule import DecodeSchedule, DecodeState, make_schedule


@dataclass
class CacheStats:
    """KV-cache accounting of one `generate_with_eviction` call.

    ``peak_entries (B, L)``: most live entries each layer held for each sequence; ``peak_total (B,)``: most
    entries summed over layers at any step; ``full_entries (B,)``: entries a full cache would peak at
    (prompt and generated tokens fed, per layer; Breadcrumbs beacons are not counted, so the ratio compares
    with the same completion under ``policy="full"``); ``footprint (B, L)``: live entries summed over decode steps;
    ``peak_bytes``: most K+V bytes allocated at once for the whole batch (capacity, all layers);
    ``prompt_kept (B,)``: share of prompt entries still cached at the end, averaged over layers.
    """

    peak_entries: torch.Tensor
    peak_total: torch.Tensor
    full_entries: torch.Tensor
    footprint: torch.Tensor
    peak_bytes: int
    prompt_kept: torch.Tensor | None = None

    @property
    def compression(self) -> torch.Tensor:
        """``(B,)`` peak-cache reduction of each sequence vs a full cache on the same tokens."""
        n_layers = self.peak_entries.shape[1]
        return self.full_entries.double() * n_layers / self.peak_total.double().clamp(min=1)


@dataclass
class EvictionOutput:
    """``sequences (B, P + T)``: prompts (as given, left-padded) + completions (``pad`` after EOS);
    ``completion_mask (B, T)`` bool (EOS included); ``token_logprobs (B, T)`` fp32 log-probs of the sampled
    tokens under ``logits / temperature`` (0 on padding); ``records``; ``cache_stats``; ``eviction_time``
    seconds spent in eviction rounds (Breadcrumbs: in window drops, beacon forwards excluded)."""

    sequences: torch.Tensor
    completion_mask: torch.Tensor
    token_logprobs: torch.Tensor
    records: EvictionRecords
    cache_stats: CacheStats
    eviction_time: float = 0.0

    @property
    def completion_ids(self) -> list[list[int]]:
        t = self.completion_mask.shape[1]
        return [row[-t:][m].tolist() for row, m in zip(self.sequences, self.completion_mask)]


def sample_next(logits, do_sample, temperature, top_k, top_p, generator):
    """Next token ``(B,)`` from ``logits (B, V)`` (fp32): greedy, or sampling with temperature/top-k/top-p."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, idx, drop), float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate_with_eviction(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    eviction: EvictionConfig | BeaconConfig | None = None,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    sample_evictions: bool | None = None,
    generator: torch.Generator | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    eviction_rate: torch.Tensor | None = None,
    forced_token_id: int | None = None,
    cache_growth: int = 16,
    compression_ratio: torch.Tensor | None = None,
    policy: EvictionPolicy | None = None,
    schedule: DecodeSchedule | None = None,
    suppress_token_ids: list[int] | None = None,
    sampled_round: torch.Tensor | None = None,
) -> EvictionOutput:
    """Decode with the cache managed by a schedule, independently per layer and per sequence.

    Args:
        model: a causal LM whose attention modules follow transformers' `AttentionInterface` (Qwen2,
            Llama, ...), possibly wrapped by PEFT.
        input_ids, attention_mask: ``(B, P)`` left-padded prompts.
        eviction: the schedule's config: an `EvictionConfig` (δ/ε/b rounds with its score rule; default
            `EvictionConfig()`, the paper's Countdown settings) or a `BeaconConfig` (Breadcrumbs; its beacon
            token is never sampled: its logit is masked for sampling only, and the returned log-probs stay
            over the full vocabulary, as TRL's ``suppress_tokens`` rollouts do).
        max_new_tokens, do_sample, temperature, top_p, top_k: token sampling (greedy when not ``do_sample``).
        sample_evictions: Gumbel-top-k (training rollouts) or deterministic top-k; default ``do_sample``.
        generator: one RNG for tokens and evictions (reproducible rollouts).
        eos_token_id, pad_token_id: default to the model's generation config.
        eviction_rate: optional ``(B,)`` ε per sequence (curriculum / interoception), else ``eviction.eviction_rate``.
        forced_token_id: the meta-token (paper §A.4): forced as the last token before every round.
        cache_growth: slots added when a layer's storage is full (amortises re-allocation).
        compression_ratio: optional ``(B,)`` Breadcrumbs ``c`` per sequence (each ``>= 2``), else
            ``eviction.compression_ratio`` (a `BeaconConfig` only).
        policy: a prebuilt score rule for ``eviction.policy`` (default ``get_policy(eviction, model)``); the
            evaluation-only ``oracle`` is built per batch with its hindsight data (`ngc_trl.policies.oracle`).
        schedule: a prebuilt `DecodeSchedule` instead of the one ``eviction`` describes (then the rate,
            ratio, policy and meta-token arguments must be left unset).
        suppress_token_ids: tokens never sampled (masked for sampling only, like TRL's ``suppress_tokens``;
            e.g. a Breadcrumbs student's beacon when it decodes with a full cache).
        sampled_round: optional ``(B,)`` long, with ``sample_evictions`` (beyond the paper): row ``b`` samples
            its evictions at round ``sampled_round[b]`` only and takes the top-k at every other round.

    Returns:
        `EvictionOutput`.
    """
    cfg = eviction or EvictionConfig()
    device = input_ids.device
    bsz, plen = input_ids.shape
    sample_evictions = do_sample if sample_evictions is None else sample_evictions
    if schedule is None:
        if policy is None and isinstance(cfg, EvictionConfig):
            policy = get_policy(cfg, model)  # a rule with parameters on the model reads them here
        schedule = make_schedule(
            cfg,
            bsz,
            device,
            policy=policy,
            eviction_rate=eviction_rate,
            sample_evictions=sample_evictions,
            generator=generator,
            forced_token_id=forced_token_id,
            compression_ratio=compression_ratio,
            sampled_round=sampled_round,
        )
    elif any(
        x is not None for x in (eviction_rate, compression_ratio, policy, forced_token_id, sampled_round)
    ):
        raise ValueError(
            "schedule: a prebuilt schedule takes no "
            "eviction_rate/compression_ratio/policy/forced_token_id/sampled_round"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.bool()
    gen_cfg = getattr(model, "generation_config", None)
    eos = eos_token_id if eos_token_id is not None else getattr(gen_cfg, "eos_token_id", None)
    eos = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)), device=device)
    pad = pad_token_id if pad_token_id is not None else getattr(gen_cfg, "pad_token_id", None)
    pad = pad if pad is not None else (int(eos[0]) if len(eos) else 0)

    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers = text_cfg.num_hidden_layers
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    cache = NGCCache(n_layers, schedule.query_window, schedule.tracks_attention, cache_growth)
    cache.scale = head_dim**-0.5
    prompt_len = mask.sum(1)
    suppress = torch.tensor(sorted(set(suppress_token_ids or [])), dtype=torch.long, device=device)

    peak = torch.zeros(bsz, n_layers, dtype=torch.long, device=device)
    peak_total = torch.zeros(bsz, dtype=torch.long, device=device)
    footprint = torch.zeros(bsz, n_layers, dtype=torch.long, device=device)
    peak_bytes = 0
    tokens, logps = [], []

    def forward(ids, pos, valid, hide=None, keep=1):
        nonlocal peak, peak_total, footprint, peak_bytes
        cache.set_step(pos, valid, hide)
        out = model(
            input_ids=ids,
            position_ids=pos,
            attention_mask=no_mask(model),
            past_key_values=cache,
            use_cache=True,
            ngc_cache=cache,
            logits_to_keep=keep,
        )
        lens = cache.lengths()
        active = (valid.any(1))[:, None]
        peak = torch.maximum(peak, lens)
        peak_total = torch.maximum(peak_total, lens.sum(1))
        footprint += lens * active
        peak_bytes = max(peak_bytes, cache.allocated_bytes())
        return out.logits[:, -keep:].float() if keep > 1 else out.logits[:, -1].float()

    state = DecodeState(
        cache=cache,
        forward=forward,
        prompt_len=prompt_len,
        n_fed=prompt_len.clone(),  # == absolute position of the next token
        fed_host=prompt_len.cpu().clone(),  # host mirrors: the schedule needs no sync
        plen_host=prompt_len.cpu(),
        finished=torch.zeros(bsz, dtype=torch.bool, device=device),
        finished_host=torch.zeros(bsz, dtype=torch.bool),
    )
    schedule.start(state)
    with use_ngc_attention(model):
        pos0 = (mask.long().cumsum(1) - 1).clamp(min=0)
        logits = forward(input_ids, pos0, mask)
        for step in range(max_new_tokens):
            state.step = step
            allowed = schedule.mask_logits(logits)
            if len(suppress):
                allowed = allowed.index_fill(1, suppress, float("-inf"))
            tok = sample_next(allowed, do_sample, temperature, top_k, top_p, generator)
            tok = schedule.force_token(tok, state)
            logp = torch.log_softmax(logits / (temperature if do_sample else 1.0), -1).gather(
                1, tok[:, None]
            )[:, 0]
            finished = state.finished
            tok = torch.where(finished, torch.full_like(tok, pad), tok)
            tokens.append(tok)
            logps.append(torch.where(finished, torch.zeros_like(logp), logp))
            if len(eos):
                state.finished = finished | torch.isin(tok, eos)
                state.finished_host = state.finished.cpu()  # the one device-to-host sync of a decode step
            if step == max_new_tokens - 1 or bool(state.finished_host.all()):
                break
            logits = schedule.feed(tok, state)

    gen = torch.stack(tokens, 1) if tokens else input_ids.new_zeros(bsz, 0)
    comp_mask = torch.ones_like(gen, dtype=torch.bool)
    if len(eos) and gen.shape[1]:
        is_eos = torch.isin(gen, eos)
        after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        comp_mask = ~after
    kept_prompt = torch.stack(
        [
            ((cast(torch.Tensor, layer.pos)[:, : layer.num_slots] < prompt_len[:, None]) & layer.live).sum(1)
            for layer in cache.layers
        ],
        1,
    )
    stats = CacheStats(
        peak,
        peak_total,
        state.n_fed - schedule.uncounted_entries(),
        footprint,
        peak_bytes,
        kept_prompt.float().mean(1) / prompt_len.clamp(min=1).float(),
    )
    return EvictionOutput(
        sequences=torch.cat([input_ids, gen], 1),
        completion_mask=comp_mask,
        token_logprobs=torch.stack(logps, 1) if logps else torch.zeros(bsz, 0, device=device),
        records=schedule.records(),
        cache_stats=stats,
        eviction_time=schedule.eviction_time,
    )
