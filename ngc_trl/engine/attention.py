"""The ``"ngc"`` attention function: attention over a pruned, ragged, per-layer KV cache.

Registered with transformers' `AttentionInterface` under the name ``"ngc"`` and switched on only inside
`use_ngc_attention(model)` (no global patching: a reference model or a plain `generate` is untouched).
It dispatches on the extra model kwargs that reach every attention call:

* ``ngc_cache=NGCCache`` (rollout / evaluation decoding): keys are the layer's live entries; visibility is
  ``live_k and pos_k <= pos_q`` from absolute positions. CPU: SDPA with a per-layer boolean mask. CUDA
  decode (fp16/bf16): FlashAttention over the left-aligned cache without padding to the longest row —
  ``flash_attn_with_kvcache(cache_seqlens=lengths)`` when `flash_attn` is installed, else
  ``torch.nn.attention.varlen.varlen_attn(seqused_k=lengths)``.
* ``ngc_replay=ReplayContext`` (training forward): a different visibility mask per layer, built from the
  recorded evictions (`ngc_trl.engine.replay`), and the eviction log-probs recomputed from this layer's queries
  and keys so they carry gradients.
* neither: plain SDPA with the usual causal/padding mask (the function behaves like ``"sdpa"``).

Absolute ``position_ids`` must always be passed by the caller (`cumsum(mask) − 1`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ngc_trl.engine.scoring import window_attention

ATTN_NAME = "ngc"


def masked_sdpa(query, key, value, visible, scaling):
    """SDPA with a boolean visibility mask. ``query (B, H, q, D)``, ``key/value (B, H_kv, S, D)``,
    ``visible (B, q, S)`` or ``(B, 1, q, S)``. Rows with no visible key attend to everything (their output is
    never used; this keeps them finite on every backend). Returns ``(B, q, H, D)``."""
    if visible.dim() == 3:
        visible = visible[:, None]
    visible = visible | ~visible.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=visible, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2)


def _flash_decode(query, layer, scaling):
    """CUDA decode step over the left-aligned cache, no padding to the longest row. ``(B, H, 1, D) ->
    (B, 1, H, D)``. Returns None when no fused kernel applies (caller falls back to SDPA)."""
    b, h, _, d = query.shape
    seqlens = layer.lengths.to(torch.int32)
    try:
        from flash_attn import flash_attn_with_kvcache

        return flash_attn_with_kvcache(
            query.transpose(1, 2), layer.keys, layer.values, cache_seqlens=seqlens, softmax_scale=scaling
        )
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    cap = layer.keys.shape[1]
    cu_q = torch.arange(b + 1, device=query.device, dtype=torch.int32)
    cu_k = cu_q * cap
    out = varlen_attn(
        query[:, :, 0],
        layer.keys.view(b * cap, -1, d),
        layer.values.view(b * cap, -1, d),
        cu_q,
        cu_k,
        1,
        cap,
        scale=scaling,
        enable_gqa=True,
        seqused_k=seqlens,
    )
    return out.view(b, 1, h, d)


def _rollout_attention(module, query, key, value, cache, scaling):
    layer = cache.layers[module.layer_idx]
    q_pos, q_valid = cache.step_pos, cache.step_valid
    layer.push_queries(query, q_pos, q_valid)
    if (
        query.is_cuda
        and query.shape[2] == 1
        and query.dtype in (torch.float16, torch.bfloat16)
        and layer.attention_sum is None
    ):
        out = _flash_decode(query, layer, scaling)
        if out is not None:
            return out, None
    s = key.shape[2]
    visible = layer.live[:, None, :] & (layer.pos[:, None, :s] <= q_pos[:, :, None])
    if cache.step_hide is not None:  # Breadcrumbs: the token fed with a beacon skips the closed window
        lo, hi = cache.step_hide
        k_pos = layer.pos[:, None, :s]
        visible = visible & ~((k_pos >= lo[:, :, None]) & (k_pos < hi[:, :, None]))
    if layer.attention_sum is not None:  # H2O: attention of every valid query, summed, heads averaged
        probs = window_attention(query, key, visible & q_valid[:, :, None], scaling)
        layer.attention_sum[:, :s] += (probs.mean(1) * q_valid[:, :, None]).sum(1)
    return masked_sdpa(query, key, value, visible, scaling), None


def ngc_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention function registered as ``"ngc"``; see the module docstring. Returns ``((B, q, H, D), None)``."""
    cache = kwargs.get("ngc_cache")
    if cache is not None:
        return _rollout_attention(module, query, key, value, cache, scaling)
    replay = kwargs.get("ngc_replay")
    if replay is not None:
        return replay.attend(module, query, key, value, scaling), None
    kwargs.pop("ngc_cache", None), kwargs.pop("ngc_replay", None)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


AttentionInterface.register(ATTN_NAME, ngc_attention_forward)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _configs(model):
    """Every config object of ``model`` (PEFT wrappers, DDP, the base model) that names an attention."""
    seen, out = set(), []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
    return out


def enable_ngc_attention(model):
    """Switch ``model`` to the ``"ngc"`` attention for good. Without an NGC kwarg the function is plain
    SDPA, so this is safe for every other forward; trainers need it because gradient checkpointing
    recomputes layers during ``backward()``, after any context manager has exited."""
    for c in _configs(model):
        c._attn_implementation = ATTN_NAME


@contextlib.contextmanager
def use_ngc_attention(model):
    """Switch ``model`` to the ``"ngc"`` attention inside the block, and restore its own afterwards."""
    cfgs = _configs(model)
    saved = [c._attn_implementation for c in cfgs]
    try:
        for c in cfgs:
            c._attn_implementation = ATTN_NAME
        yield model
    finally:
        for c, s in zip(cfgs, saved):
            c._attn_implementation = s


def no_mask(model) -> dict:
    """The ``attention_mask`` to pass to a forward that builds its masks itself: one ``None`` per layer
    type (a dict bypasses transformers' mask creation, which assumes one shared cache length)."""
    while not hasattr(model, "config") and hasattr(model, "module"):  # DDP / DeepSpeed wrappers
        model = model.module
    types = set(getattr(model.config.get_text_config(), "layer_types", None) or ["full_attention"])
    return {t: None for t in types}
