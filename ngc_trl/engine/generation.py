"""`generate_with_eviction`: the evicting decode loop, for rollouts and evaluation alike.

For a left-padded batch, prefill once, then decode one token per step. Before feeding the token at
absolute position ``p`` (prompt included, padding excluded), a sequence runs an eviction round when ``p``
is a multiple of ``δ`` (or right after a prompt of ``≥ δ`` tokens, see `EvictionConfig.round_positions`):
in every layer the policy scores the live keys, blocks are kept (Gumbel-top-k when
``sample_evictions``, else top-k) and the layer is compacted. Each decision is recorded so that the
training forward can replay it exactly (`ngc_trl.engine.records.EvictionRecords`).

``policy="breadcrumbs"`` (method.md §8) runs no round. Once ``i > 0`` generated tokens have been fed with
``i mod c == 0`` and the next token ``t_{i+1}`` has been sampled (and will be fed: generation goes on),
the beacon token is fed at the next position (forced; its logits are unused; it is not part of the
completion) and ``t_{i+1}`` right after it, in one forward in which ``t_{i+1}`` does not see the window
the beacon closes; then the window's ``c`` entries are dropped from every layer. The result equals
feeding the beacon, dropping, then feeding ``t_{i+1}``, with one forward per token instead of
``1 + 1/c``; the window is held one token longer (peak entries one above that sequence's). Rows decode
in lockstep, so beacons fire at the same step in every unfinished row (per-row ``c`` is allowed).
Nothing is recorded: `ngc_trl.breadcrumbs.beacons.beacon_layout` rebuilds the beacons from the completion lengths
alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ngc_trl.engine.attention import no_mask, use_ngc_attention
from ngc_trl.engine.cache import NGCCache
from ngc_trl.engine.config import EvictionConfig
from ngc_trl.engine.decision import decide, score_blocks
from ngc_trl.engine.policy import EvictionPolicy, LayerView, get_policy
from ngc_trl.engine.records import EvictionRecords, RecordBuilder
from ngc_trl.engine.scoring import block_ids


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


def _eviction_round(cache, rows, policy, cfg, eps, prompt_len, sample, generator, round_pos=None):
    """Run one round for the sequences ``rows`` (long ``(R,)``) in every layer; return per-layer decisions.
    ``round_pos (R,)``: absolute position of the round in each row (handed to the policy's view)."""
    per_layer = []
    for layer_idx, layer in enumerate(cache.layers):
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
            prompt_len=prompt_len[rows],
            attention_sum=None if layer.attention_sum is None else layer.attention_sum[rows, :s],
            generator=generator,
            rows=rows,
            layer_idx=layer_idx,
            round_pos=round_pos,
        )
        blocks = score_blocks(policy, view, cfg)
        dec = decide(blocks, eps[rows], sample, generator)
        keep_slot = live.clone()
        keep_slot[rows] = dec.keep_block.gather(1, view.bid.clamp(min=0)) & view.live
        layer.keep(keep_slot)
        per_layer.append((dec, blocks, dec.keep_block))
    return per_layer


@torch.no_grad()
def generate_with_eviction(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    eviction: EvictionConfig | None = None,
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
) -> EvictionOutput:
    """Decode with a cache pruned every ``δ`` tokens, independently per layer and per sequence.

    Args:
        model: a causal LM whose attention modules follow transformers' `AttentionInterface` (Qwen2,
            Llama, ...), possibly wrapped by PEFT.
        input_ids, attention_mask: ``(B, P)`` left-padded prompts.
        eviction: the schedule and policy (default `EvictionConfig()`, the paper's Countdown settings).
            A set ``beacon_token_id`` is never sampled, whatever the policy: its logit is masked for
            sampling only, and the returned log-probs stay over the full vocabulary (what the replay
            recomputes; TRL's ``suppress_tokens`` rollouts behave the same).
        max_new_tokens, do_sample, temperature, top_p, top_k: token sampling (greedy when not ``do_sample``).
        sample_evictions: Gumbel-top-k (training rollouts) or deterministic top-k; default ``do_sample``.
        generator: one RNG for tokens and evictions (reproducible rollouts).
        eos_token_id, pad_token_id: default to the model's generation config.
        eviction_rate: optional ``(B,)`` ε per sequence (curriculum / interoception), else ``eviction.eviction_rate``.
        forced_token_id: the meta-token (paper §A.4): forced as the last token before every round.
        cache_growth: slots added when a layer's storage is full (amortises re-allocation).
        compression_ratio: optional ``(B,)`` Breadcrumbs ``c`` per sequence (each ``>= 2``), else
            ``eviction.compression_ratio``; ignored by other policies.
        policy: a prebuilt policy for ``eviction.policy`` (default ``get_policy(eviction)``); the
            evaluation-only ``oracle`` is built per batch with its hindsight data (`ngc_trl.policies.oracle`).

    Returns:
        `EvictionOutput`.
    """
    cfg = eviction or EvictionConfig()
    if policy is None:
        policy = get_policy(cfg)
    elif policy.name != cfg.policy:
        raise ValueError(
            f"policy: a {policy.name!r} policy was given for EvictionConfig.policy={cfg.policy!r}"
        )
    policy.check_batch(input_ids.shape[0])
    sample_evictions = do_sample if sample_evictions is None else sample_evictions
    device = input_ids.device
    bsz, plen = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.bool()
    gen_cfg = getattr(model, "generation_config", None)
    eos = eos_token_id if eos_token_id is not None else getattr(gen_cfg, "eos_token_id", None)
    eos = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)), device=device)
    pad = pad_token_id if pad_token_id is not None else getattr(gen_cfg, "pad_token_id", None)
    pad = pad if pad is not None else (int(eos[0]) if len(eos) else 0)
    eps = (
        (eviction_rate if eviction_rate is not None else torch.full((bsz,), cfg.eviction_rate))
        .to(device)
        .float()
    )
    if ((eps < 0) | (eps >= 1)).any():
        raise ValueError("eviction_rate: every per-sequence rate must be in [0, 1)")
    c_host = (
        None  # Breadcrumbs: (B,) compression ratio per sequence, on the host (the schedule needs no sync)
    )
    if policy.beacons:
        c_host = torch.as_tensor(
            compression_ratio if compression_ratio is not None else cfg.compression_ratio
        )
        c_host = c_host.expand(bsz).long().cpu()
        if (c_host < 2).any():
            raise ValueError("compression_ratio: every per-sequence ratio must be an integer >= 2")
        c_dev = c_host.to(device)

    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers = text_cfg.num_hidden_layers
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    cache = NGCCache(n_layers, policy.query_window, policy.tracks_attention, cache_growth)
    cache.scale = head_dim**-0.5
    records = RecordBuilder(bsz, n_layers)
    prompt_len = mask.sum(1)
    delta = cfg.eviction_interval
    evicting = policy.evicts

    peak = torch.zeros(bsz, n_layers, dtype=torch.long, device=device)
    peak_total = torch.zeros(bsz, dtype=torch.long, device=device)
    footprint = torch.zeros(bsz, n_layers, dtype=torch.long, device=device)
    peak_bytes = 0
    tokens, logps = [], []
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    n_fed = prompt_len.clone()  # == absolute position of the next token
    plen_host, fed_host = (
        prompt_len.cpu(),
        prompt_len.cpu().clone(),
    )  # host mirrors: the schedule needs no sync
    finished_host = torch.zeros(bsz, dtype=torch.bool)
    evict_time = 0.0
    n_beacons = torch.zeros(bsz, dtype=torch.long, device=device)
    live_host = plen_host.clone()  # Breadcrumbs: host mirror of every layer's live entries

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

    beacon_idx = None if cfg.beacon_token_id is None else torch.tensor([cfg.beacon_token_id], device=device)
    with use_ngc_attention(model):
        pos0 = (mask.long().cumsum(1) - 1).clamp(min=0)
        logits = forward(input_ids, pos0, mask)
        for step in range(max_new_tokens):
            # the beacon is only ever forced (TRL's suppress_tokens); log-probs below use the unmasked logits
            allowed = logits if beacon_idx is None else logits.index_fill(1, beacon_idx, float("-inf"))
            tok = sample_next(allowed, do_sample, temperature, top_k, top_p, generator)
            if forced_token_id is not None and evicting:
                # this token sits at position n_fed; force it when a round fires right after it
                tok = torch.where((n_fed + 1) % delta == 0, torch.full_like(tok, forced_token_id), tok)
            logp = torch.log_softmax(logits / (temperature if do_sample else 1.0), -1).gather(
                1, tok[:, None]
            )[:, 0]
            tok = torch.where(finished, torch.full_like(tok, pad), tok)
            tokens.append(tok)
            logps.append(torch.where(finished, torch.zeros_like(logp), logp))
            if len(eos):
                finished = finished | torch.isin(tok, eos)
                finished_host = finished.cpu()  # the one device-to-host sync of a decode step
            if step == max_new_tokens - 1 or bool(finished_host.all()):
                break
            active = ~finished
            if evicting:
                due = ~finished_host & (
                    (fed_host % delta == 0) | ((fed_host == plen_host) & (plen_host >= delta))
                )
                if bool(due.any()):
                    t0 = time.perf_counter()
                    rows = torch.nonzero(due).flatten().to(device)
                    per_layer = _eviction_round(
                        cache, rows, policy, cfg, eps, prompt_len, sample_evictions, generator, n_fed[rows]
                    )
                    records.add(rows, n_fed[rows], per_layer)
                    evict_time += time.perf_counter() - t0
            # Breadcrumbs: `step` generated tokens are cached and t_{step+1} comes next; where a window
            # closes, the beacon and t_{step+1} are fed in one forward (t_{step+1} does not see the window),
            # then the window is dropped: one forward per token, like the full cache
            due = None if c_host is None or step == 0 else ~finished_host & (step % c_host == 0)
            if due is not None and bool(due.any()):
                due_dev = due.to(device)
                first = torch.where(due_dev, torch.full_like(tok, cfg.beacon_token_id), tok)
                second_pos = torch.where(due_dev, n_fed + 1, n_fed)
                hide_lo = torch.where(due_dev, n_fed - c_dev, 0)
                hide_hi = torch.where(due_dev, n_fed, 0)
                zero = torch.zeros_like(n_fed)
                both = forward(
                    torch.stack([first, tok], 1),
                    torch.stack([n_fed, second_pos], 1),
                    torch.stack([active, due_dev], 1),
                    hide=(torch.stack([zero, hide_lo], 1), torch.stack([zero, hide_hi], 1)),
                    keep=2,
                )
                logits = torch.where(due_dev[:, None], both[:, 1], both[:, 0])
                n_fed = n_fed + active.long() + due_dev.long()
                n_beacons = n_beacons + due_dev.long()
                fed_host = fed_host + (~finished_host).long() + due.long()
                live_host = live_host + (~finished_host).long() + due.long() - c_host * due.long()
                t0 = time.perf_counter()
                cache.drop_before_newest(due_dev, c_dev, int(live_host.max()), newest=2)
                evict_time += time.perf_counter() - t0
            else:
                logits = forward(tok[:, None], n_fed[:, None], active[:, None])
                n_fed = n_fed + active.long()
                fed_host = fed_host + (~finished_host).long()
                live_host = live_host + (~finished_host).long()

    gen = torch.stack(tokens, 1) if tokens else input_ids.new_zeros(bsz, 0)
    comp_mask = torch.ones_like(gen, dtype=torch.bool)
    if len(eos) and gen.shape[1]:
        is_eos = torch.isin(gen, eos)
        after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        comp_mask = ~after
    kept_prompt = torch.stack(
        [
            ((layer.pos[:, : layer.num_slots] < prompt_len[:, None]) & layer.live).sum(1)
            for layer in cache.layers
        ],
        1,
    )
    stats = CacheStats(
        peak,
        peak_total,
        n_fed - n_beacons,
        footprint,
        peak_bytes,
        kept_prompt.float().mean(1) / prompt_len.clamp(min=1).float(),
    )
    return EvictionOutput(
        sequences=torch.cat([input_ids, gen], 1),
        completion_mask=comp_mask,
        token_logprobs=torch.stack(logps, 1) if logps else torch.zeros(bsz, 0, device=device),
        records=records.build(eps, device),
        cache_stats=stats,
        eviction_time=evict_time,
    )
