"""`oracle`: a hindsight ceiling for evaluation, not an eviction method.

The "golden eviction" idea of ForesightKV (arXiv 2602.03203): at a round at absolute position ``p``, each
layer keeps the blocks that the *rest* of the full-cache completion attends to most. No decoder can do
this (it reads the future), so ``oracle`` is an upper reference in accuracy-vs-compression plots, like
``full`` is for accuracy alone. It runs under the same δ / ε / b schedule, protections and deterministic
top-k as every other policy.

How it is fed
-------------
1. The greedy full-cache completion of each prompt (the ``full`` policy's run; `full_cache_completions`
   computes it when it is not known).
2. `future_attention` teacher-forces prompt + completion once through the model (plain causal, no
   eviction) and, for every layer ``ℓ`` and every round position ``p`` of the schedule, sums the softmax
   attention that the queries at positions ``q >= p`` pay to each key ``t``, averaged over the ``H``
   query heads (GQA: each KV head serves its group, as in `ngc_trl.engine.scoring.window_attention`):

       F_ℓ[t, p] = 1/H · Σ_{q >= p} Σ_h A_ℓ,h[q, t]

   Only the queries the full decode fed count: prompt tokens and every completion token but the last.
3. `OraclePolicy(cfg, hindsight)` is passed to `generate_with_eviction(policy=...)`; at a round it scores
   each live key by ``F_ℓ[pos, p]`` of its row (`LayerView.rows`, ``layer_idx``, ``round_pos``).

When the evicting decode leaves the recorded trajectory, positions still index it: the score of the key
at position ``t`` is the future attention the *full-cache* token at ``t`` received. A round that the
full-cache completion never reached (the evicting decode ran longer, so no recorded query lies at or
after ``p``) falls back to recency: score ``pos / p``, newest kept (documented fallback, StreamingLLM-like).

`oracle_for_batch` does steps 1–3 for one evaluation batch (`ngc_trl.evaluation.run`). In training there is no
hindsight: `generate_with_eviction` rejects ``EvictionConfig.policy='oracle'`` (``NGCConfig.eviction_policy``)
before the prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ngc_trl.engine.config import EvictionConfig
from ngc_trl.engine.policy import EvictionPolicy, LayerView
from ngc_trl.engine.scoring import window_attention

CHUNK_ELEMENTS = 1 << 25  # attention probabilities held at once by `future_attention` (fp32 elements)


@dataclass
class Hindsight:
    """Future attention of a batch's full-cache trajectories, at their round positions.

    Attributes:
        future: ``(B, L, R, T)`` fp32; ``future[b, ℓ, r, t] = F_ℓ[t, round_pos[b, r]]`` for row ``b``, layer
            ``ℓ``, key at absolute position ``t`` (0 for ``t`` at or beyond ``length[b]`` and padded rounds).
        round_pos: ``(B, R)`` long, the schedule's round positions ``p < length[b]`` of each row (those with
            at least one recorded future query), ascending; ``-1`` padding (``R >= 1``).
        length: ``(B,)`` long, tokens the full-cache decode fed (prompt + completion − 1): queries exist at
            positions ``0 .. length − 1``.
    """

    future: torch.Tensor
    round_pos: torch.Tensor
    length: torch.Tensor


class OraclePolicy(EvictionPolicy):
    """``s_t = F_ℓ[t, p]``: future attention mass of the full-cache completion (see the module docstring).

    An evaluation-only ceiling: ``hindsight`` (a `Hindsight` whose rows are the decoded batch's rows) is
    required, and the view must carry ``rows``, ``layer_idx`` and ``round_pos`` (`generate_with_eviction`
    fills them; the training replay does not). No native protection. Returns ``(R, S)`` fp32, 0 on
    non-live slots; rows whose round lies past their recorded trajectory score ``pos / p`` (recency).
    """

    name = "oracle"
    hindsight = True

    def __init__(self, cfg: EvictionConfig, hindsight: Hindsight | None = None):
        super().__init__(cfg)
        self.data = hindsight

    def check_batch(self, batch_size: int | None = None) -> None:
        if self.data is None:
            raise ValueError(
                "EvictionConfig.policy='oracle' (NGCConfig.eviction_policy in training) is an evaluation-only "
                "hindsight ceiling: it needs the full-cache completion's future attention, built per batch by "
                "ngc_trl.policies.oracle.oracle_for_batch (ngc_trl.evaluation.run does it); it cannot roll out in training"
            )
        if batch_size is not None and self.data.future.shape[0] != batch_size:
            raise ValueError(f"oracle: hindsight for {self.data.future.shape[0]} rows, batch of {batch_size}")

    def token_scores(self, view: LayerView) -> torch.Tensor:
        self.check_batch()
        if view.rows is None or view.layer_idx is None or view.round_pos is None:
            raise ValueError(
                "oracle: the view lacks rows / layer_idx / round_pos (only generate_with_eviction fills them)"
            )
        hs = self.data
        match = hs.round_pos[view.rows] == view.round_pos[:, None]  # (R, R_max)
        found = match.any(-1)
        r_idx = match.long().argmax(-1)
        fut = hs.future[view.rows, view.layer_idx, r_idx]  # (R, T)
        t = view.pos.clamp(0, fut.shape[-1] - 1)
        scores = fut.gather(1, t).float()
        recency = view.pos.float() / view.round_pos[:, None].clamp(min=1).float()
        scores = torch.where(found[:, None], scores, recency)
        return scores.masked_fill(~view.live, 0.0)


class _FutureMass:
    """Passed to the model as ``ngc_replay=`` (the ``"ngc"`` attention hands every layer's post-RoPE
    ``query (B, H, T, D)`` / ``key (B, H_kv, T, D)`` to `attend`): plain causal attention over absolute
    positions, as in the rollout, plus the future mass of this layer at every round position."""

    def __init__(self, pos, valid, round_pos, chunk_elements):
        self.pos, self.valid, self.round_pos, self.chunk_elements = pos, valid, round_pos, chunk_elements
        self.visible = (
            valid[:, None, :] & valid[:, :, None] & (pos[:, None, :] <= pos[:, :, None])
        )  # (B, T, T)
        self.per_layer: dict[int, torch.Tensor] = {}

    def attend(self, module, query, key, value, scaling):
        from ngc_trl.engine.attention import masked_sdpa

        pos, valid, visible = self.pos, self.valid, self.visible
        b, h, t, _ = query.shape
        rounds = (self.round_pos >= 0)[:, :, None]  # (B, R, 1)
        mass = torch.zeros(b, self.round_pos.shape[1], t, device=query.device)  # (B, R, T) by slot
        chunk = max(1, self.chunk_elements // max(1, b * h * t))
        for i in range(0, t, chunk):
            probs = window_attention(
                query[:, :, i : i + chunk], key, visible[:, i : i + chunk], scaling
            )  # (B, H, c, T)
            later = (
                rounds
                & valid[:, None, i : i + chunk]
                & (pos[:, None, i : i + chunk] >= self.round_pos[:, :, None])
            )
            mass += torch.einsum("brc,bct->brt", later.float(), probs.sum(1)) / h
        self.per_layer[module.layer_idx] = mass
        return masked_sdpa(query, key, value, visible, scaling)


@torch.no_grad()
def future_attention(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completions: list[list[int]],
    eviction: EvictionConfig,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Hindsight:
    """Teacher-force prompt + completion once and return its future attention at the round positions.

    Args:
        model: the evaluated causal LM (its attention must follow transformers' `AttentionInterface`).
        input_ids, attention_mask: ``(B, P)`` left-padded prompts, as given to `generate_with_eviction`.
        completions: ``B`` token lists, each the full-cache completion of its prompt (EOS included, as
            `EvictionOutput.completion_ids`); all but the last token are fed.
        eviction: the schedule (δ) whose round positions are recorded (`EvictionConfig.round_positions`).
        chunk_elements: attention probabilities computed at once (queries are processed in chunks).

    Returns:
        `Hindsight` on ``input_ids.device``. Positions are absolute (``cumsum(mask) − 1``).
    """
    from ngc_trl.engine.attention import no_mask, use_ngc_attention

    device = input_ids.device
    b = input_ids.shape[0]
    fed = [list(c[:-1]) for c in completions]
    width = max([len(c) for c in fed] + [0])
    comp = torch.zeros(b, width, dtype=input_ids.dtype, device=device)
    comp_valid = torch.zeros(b, width, dtype=torch.bool, device=device)
    for i, c in enumerate(fed):
        comp[i, : len(c)] = torch.tensor(c, dtype=input_ids.dtype)
        comp_valid[i, : len(c)] = True
    ids = torch.cat([input_ids, comp], 1)
    valid = torch.cat([attention_mask.bool(), comp_valid], 1)
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    length = valid.sum(1)
    prompt_len = attention_mask.bool().sum(1).tolist()
    rounds = [eviction.round_positions(int(p), int(p) + len(c)) for p, c in zip(prompt_len, completions)]
    round_pos = torch.full((b, max([len(r) for r in rounds] + [1])), -1, dtype=torch.long)
    for i, r in enumerate(rounds):
        round_pos[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    round_pos = round_pos.to(device)

    ctx = _FutureMass(pos, valid, round_pos, chunk_elements)
    with use_ngc_attention(model):
        model(
            input_ids=ids,
            attention_mask=no_mask(model),
            position_ids=pos,
            ngc_replay=ctx,
            use_cache=False,
            logits_to_keep=1,
        )
    n_layers = len(ctx.per_layer)
    by_slot = torch.stack([ctx.per_layer[i] for i in range(n_layers)], 1)  # (B, L, R, T) indexed by slot
    n_pos = int(length.max()) if b else 0
    offset = valid.long().argmax(1)  # slot of position 0 (prompts are left-padded, completions follow)
    t = torch.arange(n_pos, device=device)
    slot = (offset[:, None] + t[None]).clamp(max=ids.shape[1] - 1)  # (B, T)
    future = by_slot.gather(3, slot[:, None, None, :].expand(-1, n_layers, round_pos.shape[1], -1))
    future = future * (t[None] < length[:, None])[:, None, None, :]
    return Hindsight(future.contiguous(), round_pos, length)


@torch.no_grad()
def full_cache_completions(
    model,
    input_ids,
    attention_mask,
    known: list[list[int] | None],
    max_new_tokens: int,
    eos_token_id=None,
    pad_token_id=None,
) -> list[list[int]]:
    """``known`` with every ``None`` replaced by the greedy full-cache completion of that row's prompt
    (decoded together, in one `generate_with_eviction` call with ``policy='full'``)."""
    from ngc_trl.engine.generation import generate_with_eviction

    out = list(known)
    missing = [i for i, c in enumerate(out) if c is None]
    if missing:
        idx = torch.tensor(missing, device=input_ids.device)
        gen = generate_with_eviction(
            model,
            input_ids[idx],
            attention_mask[idx],
            eviction=EvictionConfig(policy="full"),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        for i, c in zip(missing, gen.completion_ids):
            out[i] = c
    return out


def oracle_for_batch(
    model,
    input_ids,
    attention_mask,
    eviction: EvictionConfig,
    known: list[list[int] | None],
    max_new_tokens: int,
    eos_token_id=None,
    pad_token_id=None,
) -> tuple[OraclePolicy, list[list[int]]]:
    """The `OraclePolicy` of one evaluation batch, and the full-cache completions it used.

    ``known``: per row, the greedy full-cache completion if already decoded (the ``full`` run), else None
    (decoded here). ``eviction``: the oracle run's config (its δ gives the recorded round positions).
    """
    completions = full_cache_completions(
        model, input_ids, attention_mask, known, max_new_tokens, eos_token_id, pad_token_id
    )
    hs = future_attention(model, input_ids, attention_mask, completions, eviction)
    return OraclePolicy(eviction, hs), completions
