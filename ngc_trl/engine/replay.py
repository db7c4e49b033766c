"""The replay forward (paper §4.5, §A.3): one pass over prompt + completion that sees, in every layer,
exactly the cache the rollout saw, and recomputes every eviction action's log-probability with gradients.

With ``death_ℓ[j]`` the position of the round that evicted key ``j`` from layer ``ℓ`` (``+∞`` if never):

    visible_ℓ(q, j) = valid_j  and  pos_j ≤ pos_q  and  pos_q < death_ℓ[j]

(a key evicted at the round fired before feeding position ``p`` is seen by queries ``< p`` and hidden
from ``p`` on). A 1-D key mask is not enough: visibility is not monotone in the query position.

In the same pass, at each round ``r`` and layer ``ℓ`` the ``w`` queries before the round score the keys
alive at it (`ngc_trl.engine.decision.score_blocks`, the rollout's code) and the Plackett–Luce log-prob of the
recorded keep-sequence is taken: ``log π(σ)`` is on the autograd graph, so ``L_mem`` reaches every
parameter that shapes Q and K. CPU: dense boolean SDPA masks ``(B, 1, T, T)``. CUDA: FlexAttention with a
per-layer ``mask_mod`` over ``death`` (O(T) memory per layer, block-sparse since evictions come in blocks).
"""

from __future__ import annotations

import torch

from ngc_trl.engine.attention import masked_sdpa, no_mask, use_ngc_attention
from ngc_trl.engine.config import EvictionConfig
from ngc_trl.engine.decision import score_blocks
from ngc_trl.engine.policy import LayerView, get_policy
from ngc_trl.engine.records import EvictionRecords
from ngc_trl.engine.sampling import plackett_luce_entropy_proxy, plackett_luce_log_prob
from ngc_trl.engine.scoring import block_ids

NEVER = torch.iinfo(torch.long).max


def death_times(
    records: EvictionRecords, pos: torch.Tensor, valid: torch.Tensor, block_size: int
) -> torch.Tensor:
    """``(B, L, T)`` long: position of the round that evicted each slot from each layer (`NEVER` if kept).

    ``pos``/``valid``: ``(B, T)`` absolute positions and validity of the replayed sequence's slots.
    Rounds are replayed in order, re-cutting the alive keys into blocks exactly as the rollout did.
    """
    bsz, n_rounds, n_layers = records.acted.shape
    death = torch.full((bsz, n_layers, pos.shape[1]), NEVER, dtype=torch.long, device=pos.device)
    for r in range(n_rounds):
        p = records.positions[:, r]
        alive = (
            valid[:, None] & (pos[:, None] < p[:, None, None]) & (death == NEVER) & (p >= 0)[:, None, None]
        )
        bid = (torch.cumsum(alive.long(), -1) - 1) // block_size
        ev = records.evicted[:, r]  # (B, L, N) block ids, -1 padding
        n = int(records.n_blocks[:, r].max()) if records.n_blocks.numel() else 0  # ids are < n
        is_ev = torch.zeros(bsz, n_layers, n + 1, dtype=torch.bool, device=pos.device)
        is_ev.scatter_(-1, torch.where(ev >= 0, ev, n), True)  # padding lands in the dump column n
        hit = alive & is_ev.gather(-1, bid.clamp(min=0, max=n))
        death = torch.where(hit, p[:, None, None].expand_as(death), death)
    return death


class ReplayContext:
    """Passed to the model as ``ngc_replay=`` (reaches the ``"ngc"`` attention of every layer).

    Args:
        attention_mask: ``(B, T)`` validity of prompt + completion slots (left-padded prompts).
        records: the rollout's `EvictionRecords` for these rows, or None (plain causal forward).
        eviction: the rollout's `EvictionConfig` (block size, window, policy, protections).
        prompt_len: ``(B,)`` prompt lengths (needed only by prompt protection).
        replay_masks: apply the per-layer masks to attention (False = "targeted KV dropout" ablation:
            tokens see the full context although the rollout did not).
        eviction_logps: recompute eviction log-probs (needs ``policy.learned``-style window scores).
        backend: ``"dense"`` (SDPA + boolean masks), ``"flex"`` (FlexAttention), or ``"auto"``
            (flex on CUDA, dense elsewhere; FlexAttention has no CPU backward).
        death: a precomputed death tensor instead of ``records``: ``(B, T)`` shared by every layer
            (Breadcrumbs beacons, `ngc_trl.breadcrumbs.beacons`) or ``(B, L, T)``, long, in the same units as
            `death_times` (absolute position of the first query that no longer sees the slot, `NEVER`
            if none). With ``records`` too, it wins for the masks.
        model: the replayed model, for a score rule whose parameters live on it (`score_head`).
    """

    def __init__(
        self,
        attention_mask,
        records: EvictionRecords | None = None,
        eviction: EvictionConfig | None = None,
        prompt_len=None,
        replay_masks=True,
        eviction_logps=True,
        backend="auto",
        death=None,
        model=None,
    ):
        self.valid = attention_mask.bool()
        self.pos = (self.valid.long().cumsum(1) - 1).clamp(min=0)
        self.offset = self.valid.long().argmax(1)  # first valid slot = slot of position 0
        self.records = records if records is not None and records.positions.shape[1] > 0 else None
        self.cfg = eviction or EvictionConfig()
        self.policy = get_policy(self.cfg, model)
        self.prompt_len = prompt_len if prompt_len is not None else torch.zeros_like(self.offset)
        self.replay_masks = replay_masks
        self.eviction_logps = eviction_logps and self.records is not None
        if backend == "auto":
            backend = "flex" if self.valid.is_cuda else "dense"
        self.backend = backend
        if death is not None:
            self.death = death[:, None] if death.dim() == 2 else death  # (B, L or 1, T)
        elif self.records is not None:
            self.death = death_times(self.records, self.pos, self.valid, self.cfg.block_size)
        else:
            self.death = None
        self._evict_logp: dict[int, torch.Tensor] = {}
        self._entropy: dict[int, torch.Tensor] = {}
        self._written: list[
            int
        ] = []  # layers whose log-probs the current layer call wrote (checkpoint routing)

    @property
    def position_ids(self) -> torch.Tensor:
        """``(B, T)`` absolute positions, as in the rollout."""
        return self.pos

    def layer_death(self, layer_idx: int) -> torch.Tensor:
        """``(B, T)`` death positions of layer ``layer_idx`` (a shared death tensor serves every layer)."""
        return self.death[:, layer_idx if self.death.shape[1] > 1 else 0]

    def visible(self, layer_idx: int) -> torch.Tensor:
        """``(B, T, T)`` bool visibility of layer ``layer_idx``."""
        pos, valid = self.pos, self.valid
        vis = valid[:, None, :] & (pos[:, None, :] <= pos[:, :, None])
        if self.replay_masks and self.death is not None:
            vis = vis & (pos[:, :, None] < self.layer_death(layer_idx)[:, None, :])
        return vis

    def attend(self, module, query, key, value, scaling):
        """Attention of layer ``module.layer_idx`` under its replay mask, ``(B, T, H, D)``; also records
        the layer's eviction log-probs. Under gradient checkpointing (reentrant or not) the log-probs leave
        the checkpointed layer as extra outputs of its checkpoint (`route_eviction_logps_through_checkpoints`),
        so they keep their gradient."""
        layer = module.layer_idx
        if self.backend == "flex":
            out = self._flex(layer, query, key, value, scaling)
        else:
            out = masked_sdpa(query, key, value, self.visible(layer), scaling)
        if self.eviction_logps:
            self._evict_logp[layer], self._entropy[layer] = self._layer_eviction_logp(
                layer, query, key, value, scaling
            )
            self._written.append(layer)
        return out

    def _flex(self, layer, query, key, value, scaling):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        pos, valid = self.pos, self.valid
        death = (
            self.layer_death(layer).contiguous() if (self.replay_masks and self.death is not None) else None
        )

        def mask_mod(b, h, q, k):
            ok = valid[b, k] & (pos[b, k] <= pos[b, q])
            if death is not None:
                ok = ok & (pos[b, q] < death[b, k])
            return ok | (q == k)  # the diagonal keeps padding rows finite

        t = query.shape[2]
        bm = create_block_mask(mask_mod, query.shape[0], None, t, t, device=query.device)
        fn = flex_attention if not query.is_cuda else _compiled_flex()
        out = fn(query, key, value, block_mask=bm, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2)

    def _layer_eviction_logp(self, layer, query, key, value, scaling):
        """``(B, R)`` log π(σ) of every round of this layer (0 where no action), and the entropy of the
        first draw ``(B, R)`` (a diagnostic)."""
        rec, w = self.records, self.policy.query_window
        assert rec is not None  # eviction log-probs are only recomputed with records
        bsz, n_rounds = rec.positions.shape
        logps, ents = [], []
        arange_w = torch.arange(w, device=query.device)
        for r in range(n_rounds):
            p = rec.positions[:, r]
            has = p >= 0
            qp = p[:, None] - w + arange_w  # window positions p - w .. p - 1
            qv = has[:, None] & (qp >= 0)
            slot = (self.offset[:, None] + qp.clamp(min=0)).clamp(max=query.shape[2] - 1)
            q_w = query.gather(2, slot[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[3]))
            death = self.layer_death(layer)
            alive = self.valid & (self.pos < p[:, None]) & (death >= p[:, None]) & has[:, None]
            view = LayerView(
                keys=key,
                values=value,
                pos=self.pos,
                live=alive,
                bid=block_ids(alive, self.cfg.block_size),
                queries=q_w,
                q_pos=qp,
                q_valid=qv,
                scale=scaling,
                prompt_len=self.prompt_len,
                layer_idx=layer,
            )
            blocks = score_blocks(self.policy, view, self.cfg)
            kept = rec.kept[:, r, layer]
            idx = torch.arange(kept.shape[-1], device=kept.device)
            chosen = torch.where(idx < rec.n_sampled[:, r, layer, None], kept, torch.full_like(kept, -1))
            acted = rec.acted[:, r, layer]
            chosen = torch.where(acted[:, None], chosen, torch.full_like(chosen, -1))
            lp = plackett_luce_log_prob(blocks.logits, chosen, blocks.pool)
            logps.append(torch.where(acted, lp, torch.zeros_like(lp)))
            ents.append(
                torch.where(
                    acted,
                    plackett_luce_entropy_proxy(blocks.logits.detach(), blocks.pool),
                    torch.zeros_like(lp),
                )
            )
        return torch.stack(logps, 1), torch.stack(ents, 1)

    def eviction_logp(self, num_layers: int) -> torch.Tensor:
        """``(B, R, L)`` eviction log-probs recorded by the last forward (zeros for layers not seen)."""
        return self._stack(self._evict_logp, num_layers)

    def eviction_entropy(self, num_layers: int) -> torch.Tensor:
        """``(B, R, L)`` entropy of each action's first draw (a logged diagnostic)."""
        return self._stack(self._entropy, num_layers)

    def _stack(self, per_layer: dict, num_layers: int) -> torch.Tensor:
        assert self.records is not None, "no eviction log-probs: the replay has no records"
        zero = torch.zeros(self.records.positions.shape, device=self.valid.device)
        return torch.stack([per_layer.get(i, zero) for i in range(num_layers)], -1)


def route_eviction_logps_through_checkpoints(model) -> None:
    """Make the eviction log-probs of every gradient-checkpointed layer outputs of its checkpoint.

    A checkpointed layer call returns only the hidden states; the log-probs it computes inside are side
    outputs. Non-reentrant checkpointing keeps their graph, but reentrant checkpointing (``use_reentrant=True``,
    which TRL forces for PEFT + ZeRO-3) runs the layer under ``no_grad``: they would not require grad and
    ``L_mem`` would be silently 0. Wrapping each layer's ``_gradient_checkpointing_func`` so that the layer
    function returns ``(hidden, *log-probs)`` gives them the checkpoint's ``grad_fn`` in every mode: backward
    recomputes the layer and back-propagates their gradient with the hidden states'. Idempotent; call it after
    ``gradient_checkpointing_enable`` (the trainer calls it before every replay). Layers without a checkpoint
    function, forwards without an ``ngc_replay`` context and no-grad forwards are untouched.
    """
    for module in model.modules():
        fn = getattr(module, "_gradient_checkpointing_func", None)
        if fn is not None and not getattr(fn, "_ngc_routed", False):
            module._gradient_checkpointing_func = _routed_checkpoint(fn)


def _routed_checkpoint(checkpoint_fn):
    def run(function, *args, **kwargs):
        ctx = getattr(function, "keywords", {}).get("ngc_replay")
        if not isinstance(ctx, ReplayContext) or not ctx.eviction_logps or not torch.is_grad_enabled():
            return checkpoint_fn(function, *args, **kwargs)
        layers, shape = [], {}

        def layer_with_logps(*a):  # runs in the forward and again in backward's recomputation
            ctx._written = []
            out = function(*a)
            layers[:] = ctx._written
            shape["tuple"] = isinstance(out, tuple)
            logps = tuple(ctx._evict_logp.pop(i) for i in layers)  # the checkpoint's outputs replace them
            return (*out, *logps) if shape["tuple"] else (out, *logps)

        res = checkpoint_fn(layer_with_logps, *args, **kwargs)
        n = len(layers)
        outs = res[: len(res) - n]
        for i, lp in zip(layers, res[len(res) - n :]):
            ctx._evict_logp[i] = lp
        return tuple(outs) if shape["tuple"] else outs[0]

    run._ngc_routed = True
    return run


_COMPILED = None


def _compiled_flex():
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED = torch.compile(flex_attention, dynamic=True)
    return _COMPILED


def replay_forward(model, input_ids, attention_mask, ctx: ReplayContext, temperature: float = 1.0):
    """Token log-probs ``(B, T − 1)`` of ``input_ids[:, 1:]`` under the replay masks (fp32, logits /
    temperature), for tests and tools; the trainer uses TRL's fused head instead."""
    with use_ngc_attention(model):
        out = model(
            input_ids=input_ids,
            attention_mask=no_mask(model),
            position_ids=ctx.position_ids,
            ngc_replay=ctx,
            use_cache=False,
        )
    logp = torch.log_softmax(out.logits[:, :-1].float() / temperature, -1)
    return logp.gather(-1, input_ids[:, 1:, None])[..., 0]
