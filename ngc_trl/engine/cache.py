"""A ragged, per-layer evicting KV cache (`NGCCache`, a transformers `DynamicCache`).

Layout of one layer (`NGCLayer`), for a batch of ``B`` sequences:

* ``keys`` / ``values``: ``(B, S_cap, H_kv, D)`` storage. Row ``b`` holds its live entries in slots
  ``[0, lengths[b])``, **left-aligned and in temporal order**; slots beyond are scratch. This is the
  layout FlashAttention's ``flash_attn_with_kvcache(cache_seqlens=lengths)`` and
  ``varlen_attn(seqused_k=lengths)`` read directly, so decoding never repacks the cache. `update` returns
  ``(B, H_kv, S, D)`` views (``S = max(lengths)``) for the SDPA path.
* ``pos``: ``(B, S_cap)`` absolute position of each slot (RoPE is already applied to cached keys, so an
  evicted neighbour never requires re-rotation).
* ``queries``: the last ``W`` post-RoPE queries ``(B, H, W, D)`` with ``q_pos``/``q_valid`` ``(B, W)``,
  which the scoring rules read at a round.
* ``attention_sum``: ``(B, S_cap)`` attention accumulated over every step, only for policies that track it.

Eviction (`NGCCache.evict`) gathers the kept slots of every row into fresh, smaller tensors: memory is
really freed, layers diverge, and sequences of a batch stay ragged. Breadcrumbs beacon decoding instead
drops the contiguous window just before a new beacon in place (`NGCCache.drop_before_newest`): its
cache stays small, so its storage never grows past the peak.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class NGCLayer(DynamicLayer):
    """One layer of `NGCCache`. See the module docstring for the layout."""

    def __init__(self, query_window: int = 0, track_attention: bool = False, growth: int = 16):
        super().__init__()
        self.query_window = query_window
        self.track_attention = track_attention
        self.growth = max(1, growth)
        # all None until the prefill (`queries`/`q_pos`/`q_valid`: until the first push, and only with a
        # query window; `attention_sum`: only when tracking attention)
        self.lengths: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.queries: torch.Tensor | None = None
        self.q_pos: torch.Tensor | None = None
        self.q_valid: torch.Tensor | None = None
        self.attention_sum: torch.Tensor | None = None
        # host-side upper bound of max(lengths): decoding never waits on the device to size its tensors
        self.max_len = 0

    # ------------------------------------------------------------------ transformers API
    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, step_pos=None, step_valid=None, *args, **kwargs):
        """Write the new tokens' keys/values and return the live window as ``(B, H_kv, S, D)`` views.

        ``key_states (B, H_kv, q, D)``; ``step_pos``/``step_valid`` ``(B, q)``. The first call is the
        prefill (left padding allowed: valid tokens are packed to the left); later calls append their
        ``q`` columns in order (``q = 1``, or 2 for a Breadcrumbs beacon fed with the next token).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._prefill(key_states, value_states, step_pos, step_valid)
        else:
            for j in range(key_states.shape[2]):
                self._append(key_states[:, :, j], value_states[:, :, j], step_pos[:, j], step_valid[:, j])
        s = self.num_slots
        return self.keys[:, :s].transpose(1, 2), self.values[:, :s].transpose(1, 2)

    def get_seq_length(self) -> int:
        return self.max_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    # ------------------------------------------------------------------ storage
    @property
    def num_slots(self) -> int:
        """Slots any row may use: ``max(lengths)`` after prefill and eviction, then ``+1`` per decode step
        (an upper bound kept on the host; rows whose token was padding leave a scratch slot, masked)."""
        return self.max_len

    @property
    def live(self) -> torch.Tensor:
        """``(B, S)`` bool over the first ``num_slots`` slots."""
        assert self.lengths is not None, "NGCLayer.live before the prefill"
        return torch.arange(self.num_slots, device=self.device)[None] < self.lengths[:, None]

    def allocated_bytes(self) -> int:
        """Bytes of K and V storage actually allocated (capacity, not just live entries)."""
        if self.keys is None:
            return 0
        return 2 * self.keys.numel() * self.keys.element_size()

    def _prefill(self, k, v, pos, valid):
        # stable sort puts each row's valid tokens first, in order
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
        self.lengths = valid.sum(1)
        s = self.max_len = int(self.lengths.max())
        idx = order[:, :s]
        self.keys = _gather_slots(k.transpose(1, 2), idx).contiguous()
        self.values = _gather_slots(v.transpose(1, 2), idx).contiguous()
        self.pos = pos.gather(1, idx)
        if self.track_attention:
            self.attention_sum = torch.zeros(k.shape[0], s, device=k.device, dtype=torch.float32)

    def _reserve(self, needed: int):
        # set by the prefill
        assert self.keys is not None and self.values is not None and self.pos is not None
        cap = self.keys.shape[1]
        if needed <= cap:
            return
        extra = math.ceil((needed - cap) / self.growth) * self.growth
        b, _, h, d = self.keys.shape
        pad = self.keys.new_zeros(b, extra, h, d)
        self.keys = torch.cat([self.keys, pad], 1)
        self.values = torch.cat([self.values, pad], 1)
        self.pos = torch.cat([self.pos, self.pos.new_zeros(b, extra)], 1)
        if self.attention_sum is not None:
            self.attention_sum = torch.cat([self.attention_sum, self.attention_sum.new_zeros(b, extra)], 1)

    def _append(self, k, v, pos, valid):
        self._reserve(self.max_len + 1)
        rows = torch.arange(k.shape[0], device=k.device)
        slot = self.lengths
        self.keys[rows, slot] = k
        self.values[rows, slot] = v
        self.pos[rows, slot] = pos
        if self.attention_sum is not None:
            self.attention_sum[rows, slot] = 0.0
        self.lengths = self.lengths + valid.long()
        self.max_len += 1

    def push_queries(self, q: torch.Tensor, q_pos: torch.Tensor, q_valid: torch.Tensor):
        """Keep the last ``query_window`` queries: ``q (B, H, n, D)``, ``q_pos``/``q_valid`` ``(B, n)``.
        Invalid (padding / finished-row) queries are not pushed."""
        w = self.query_window
        if w == 0:
            return
        if self.queries is None:
            b, h, _, d = q.shape
            self.queries = q.new_zeros(b, h, w, d)
            self.q_pos = q_pos.new_zeros(b, w)
            self.q_valid = torch.zeros(b, w, dtype=torch.bool, device=q.device)
        assert self.q_pos is not None and self.q_valid is not None  # allocated together with `queries`
        if q.shape[2] == 1:  # decode: shift only the rows whose token is valid
            keep = q_valid[:, 0]
            shifted_q = torch.cat([self.queries[:, :, 1:], q], 2)
            self.queries = torch.where(keep[:, None, None, None], shifted_q, self.queries)
            self.q_pos = torch.where(keep[:, None], torch.cat([self.q_pos[:, 1:], q_pos], 1), self.q_pos)
            self.q_valid = torch.where(
                keep[:, None], torch.cat([self.q_valid[:, 1:], q_valid], 1), self.q_valid
            )
        else:  # prefill: left padding means the last w columns are the newest valid queries
            self.queries = torch.cat([self.queries, q], 2)[:, :, -w:]
            self.q_pos = torch.cat([self.q_pos, q_pos], 1)[:, -w:]
            self.q_valid = torch.cat([self.q_valid, q_valid], 1)[:, -w:]

    def keep(self, keep_slot: torch.Tensor):
        """Compact every row to the slots where ``keep_slot (B, S)`` is True (temporal order kept).
        The storage is re-allocated at the new ``max(lengths)``: evicted memory is released."""
        # set by the prefill
        assert self.keys is not None and self.values is not None and self.pos is not None
        new_len = keep_slot.sum(1)
        s = max(int(new_len.max()), 1)
        self.max_len = int(new_len.max())
        idx = torch.sort((~keep_slot).to(torch.int8), dim=1, stable=True).indices[:, :s]
        self.keys = _gather_slots(self.keys, idx).contiguous()
        self.values = _gather_slots(self.values, idx).contiguous()
        self.pos = self.pos.gather(1, idx)
        if self.attention_sum is not None:
            self.attention_sum = self.attention_sum.gather(1, idx)
        self.lengths = new_len

    def drop_before_newest(self, rows: torch.Tensor, count: torch.Tensor, max_len: int, newest: int = 1):
        """Evict the ``count[b]`` entries just before the ``newest`` newest ones, for each row where
        ``rows (B,)`` is True (Breadcrumbs: the window a beacon has just closed; ``newest=2`` when the beacon
        and the next token were fed together). ``count (B,)`` long. The newest entries move down into the
        freed slots: O(B·H·D), no re-allocation and no gather of the whole cache (the window is
        contiguous, so temporal order is kept). ``max_len``: ``max(lengths)`` afterwards, known on the
        host, so nothing waits on the device."""
        assert self.lengths is not None, "NGCLayer.drop_before_newest before the prefill"
        rows_i = torch.arange(self.lengths.shape[0], device=self.lengths.device)
        shift = count * rows.long()
        for j in range(newest, 0, -1):  # oldest of the newest first: a destination is never a pending source
            src = (self.lengths - j).clamp(min=0)
            dst = src - shift
            for name in ("keys", "values", "pos", "attention_sum"):
                t = getattr(self, name)
                if t is not None:
                    t[rows_i, dst] = t[rows_i, src]
        self.lengths = self.lengths - shift
        self.max_len = max_len


def _gather_slots(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x (B, S, H, D)``, ``idx (B, S')`` -> ``(B, S', H, D)``."""
    return x.gather(1, idx[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3]))


class NGCCache(DynamicCache):
    """`DynamicCache` of `NGCLayer` s. The decode loop calls `set_step` before every forward so that
    `update` knows the absolute positions and validity of the tokens being written."""

    # every layer is an `NGCLayer` (built in `__init__`, never replaced); transformers types `Cache.layers`
    # as a list of its own layer classes, and a list is invariant
    layers: list[NGCLayer]  # type: ignore[assignment]
    # the attention softmax scale (``head_dim ** -0.5``), set by the decode loop before the prefill
    scale: float

    def __init__(
        self, num_layers: int, query_window: int = 0, track_attention: bool = False, growth: int = 16
    ):
        super(DynamicCache, self).__init__(
            layers=[NGCLayer(query_window, track_attention, growth) for _ in range(num_layers)]
        )
        self.step_pos: torch.Tensor | None = None
        self.step_valid: torch.Tensor | None = None
        self.step_hide: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_step(
        self, pos: torch.Tensor, valid: torch.Tensor, hide: tuple[torch.Tensor, torch.Tensor] | None = None
    ):
        """``pos``/``valid`` ``(B, q)`` of the tokens the next forward writes. ``hide = (lo, hi)``, each
        ``(B, q)``: query ``j`` of row ``b`` does not see the keys at positions ``lo[b, j] <= p < hi[b, j]``
        (Breadcrumbs: the token fed with a beacon must not see the window the beacon closes)."""
        self.step_pos, self.step_valid, self.step_hide = pos, valid, hide

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states, self.step_pos, self.step_valid)

    def drop_before_newest(self, rows: torch.Tensor, count: torch.Tensor, max_len: int, newest: int = 1):
        """`NGCLayer.drop_before_newest` in every layer (Breadcrumbs: layers never diverge)."""
        for layer in self.layers:
            layer.drop_before_newest(rows, count, max_len, newest)

    def lengths(self) -> torch.Tensor:
        """``(B, n_layers)`` live entries per sequence and layer."""
        # every layer is set by the prefill, which runs before the first call
        return torch.stack(cast("list[torch.Tensor]", [layer.lengths for layer in self.layers]), 1)

    def allocated_bytes(self) -> int:
        return sum(layer.allocated_bytes() for layer in self.layers)
