"""Score rules of every eviction policy against hand-written reference formulas (CPU, small tensors).

The references loop over rows, heads, queries and live keys in plain Python/torch, so they share no
vectorised code with the policies. The views are ragged (rows of different live lengths, holes left by
earlier evictions, trailing non-live slots holding garbage) and GQA (4 query heads, 2 KV heads).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ngc_trl.engine.config import EvictionConfig
from ngc_trl.engine.scoring import block_ids, reduce_blocks
from ngc_trl.policies import POLICIES, LayerView, get_policy
from ngc_trl.policies.keydiff import keydiff_kv_head_scores
from ngc_trl.policies.knorm import knorm_kv_head_scores
from ngc_trl.policies.score_head import ScoreHead, attach_score_head, num_features
from ngc_trl.policies.snapkv import snapkv_kv_head_scores

INF = float("inf")
H, H_KV, D, S, W = 4, 2, 8, 24, 6
G = H // H_KV


def make_view(seed: int = 0, w: int = W, invalid_first_query: bool = False, block_size: int = 4) -> LayerView:
    """Row 0: 24 live slots. Row 1: 17 tokens seen, slots 3, 4 and 9 evicted (holes), the last 7 slots
    are non-live padding. Non-live keys are large garbage, which must not leak into any score."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, H_KV, S, D, generator=g)
    values = torch.randn(2, H_KV, S, D, generator=g)
    live = torch.ones(2, S, dtype=torch.bool)
    live[1, 17:] = False
    live[1, [3, 4, 9]] = False
    keys = torch.where(live[:, None, :, None], keys, 1e3 * torch.randn(2, H_KV, S, D, generator=g))
    pos = torch.arange(S).expand(2, S).clone()
    pos[1, 17:] = 0  # padding: positions are meaningless there
    n_tokens = torch.tensor([24, 17])
    q_pos = n_tokens[:, None] - w + torch.arange(w)[None]
    q_valid = torch.ones(2, w, dtype=torch.bool)
    if invalid_first_query:
        q_valid[1, 0] = False
    queries = torch.randn(2, H, w, D, generator=g)
    return LayerView(
        keys=keys,
        values=values,
        pos=pos,
        live=live,
        bid=block_ids(live, block_size),
        queries=queries,
        q_pos=q_pos,
        q_valid=q_valid,
        scale=1.0 / math.sqrt(D),
        prompt_len=torch.tensor([5, 5]),
        attention_sum=torch.rand(2, S, generator=g) * 3,
        generator=torch.Generator().manual_seed(seed + 100),
    )


# ----------------------------------------------------------------------------- hand references
def live_slots(view, r):
    return [j for j in range(S) if bool(view.live[r, j])]


def attn_row(view, r, h, i):
    """{slot: prob} of window query i of head h over its visible live keys (softmax over a 1-D list)."""
    if not bool(view.q_valid[r, i]):
        return {}
    qp = int(view.q_pos[r, i])
    slots = [j for j in live_slots(view, r) if int(view.pos[r, j]) <= qp]
    q = view.queries[r, h, i].double()
    logits = torch.stack([(q * view.keys[r, h // G, j].double()).sum() * view.scale for j in slots])
    return dict(zip(slots, torch.softmax(logits, 0).tolist()))


def expected_snapkv_kv(view, w, kernel=5):
    """(R, H_kv, S) SnapKV per KV head, as kvpress: mean over window queries, drop window, pool, group mean."""
    out = torch.zeros(2, H_KV, S, dtype=torch.float64)
    for r in range(2):
        qs = [i for i in range(view.queries.shape[2] - w, view.queries.shape[2]) if bool(view.q_valid[r, i])]
        start = min(int(view.q_pos[r, i]) for i in qs)
        prefix = [j for j in live_slots(view, r) if int(view.pos[r, j]) < start]
        for j in live_slots(view, r):
            if j not in prefix:
                out[r, :, j] = INF
        for h in range(H):
            a = dict.fromkeys(prefix, 0.0)
            for i in qs:
                for j, p in attn_row(view, r, h, i).items():
                    if j in a:
                        a[j] += p / len(qs)
            x = [a[j] for j in prefix]
            for t, j in enumerate(prefix):
                window = [x[u] for u in range(t - kernel // 2, t + kernel // 2 + 1) if 0 <= u < len(x)]
                out[r, h // G, j] += sum(window) / kernel / G
    return out


def expected_knorm_kv(view):
    out = torch.zeros(2, H_KV, S, dtype=torch.float64)
    for r in range(2):
        for h in range(H_KV):
            for j in live_slots(view, r):
                out[r, h, j] = -math.sqrt(sum(float(x) ** 2 for x in view.keys[r, h, j]))
    return out


def expected_keydiff_kv(view):
    out = torch.zeros(2, H_KV, S, dtype=torch.float64)
    for r in range(2):
        slots = live_slots(view, r)
        for h in range(H_KV):
            ks = [view.keys[r, h, j].double() for j in slots]
            mu = sum(k / k.norm() for k in ks) / len(ks)
            for j, k in zip(slots, ks):
                out[r, h, j] = -float(k @ mu) / float(k.norm() * mu.norm())
    return out


def assert_scores(got, want, atol=1e-5):
    """Same shape, same +inf pattern, close finite values, no NaN."""
    got, want = got.double(), want.double()
    assert got.shape == want.shape
    assert not torch.isnan(got).any()
    assert torch.equal(torch.isinf(got), torch.isinf(want)), (torch.isinf(got), torch.isinf(want))
    fin = ~torch.isinf(want)
    torch.testing.assert_close(got[fin], want[fin], atol=atol, rtol=1e-5)


def policy(name, **kw):
    return get_policy(EvictionConfig(policy=name, **kw))


# ----------------------------------------------------------------------------- registry
def model_with_head(n_layers: int = 1, window: int = 5, seed: int = 0) -> torch.nn.Module:
    """A stand-in model carrying a random linear `ScoreHead` (what ``get_policy(cfg, model)`` reads for
    ``score_head``)."""
    head = ScoreHead(n_layers, num_features(H, window, H_KV), window)
    with torch.no_grad():
        head.w.copy_(torch.randn(head.w.shape, generator=torch.Generator().manual_seed(seed)))
    model = torch.nn.Linear(1, 1)
    attach_score_head(model, head)
    return model


def build(name: str, **fields):
    """``get_policy`` for ``name``; a rule that reads the model gets `model_with_head`."""
    cfg = EvictionConfig(policy=name, **fields)
    return get_policy(cfg, model_with_head() if POLICIES[name].needs_model else None)


def test_every_name_resolves():
    for name, cls in POLICIES.items():
        pol = build(name)
        assert type(pol) is cls and pol.name == name
    assert {"streaming_llm", "snapkv", "knorm", "keydiff", "h2o", "tova", "random"} <= set(POLICIES)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="snapkv") as err:
        get_policy(SimpleNamespace(policy="nope"))
    for name in POLICIES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="keydiff"):
        EvictionConfig(policy="nope")


def test_query_windows_and_flags():
    assert policy("snapkv").query_window == 5
    assert policy("snapkv", score_window=3).query_window == 3
    assert policy("snapkv", window_size=64).query_window == 64
    assert policy("tova").query_window == 1
    for name in ("streaming_llm", "knorm", "keydiff", "h2o", "random"):
        assert policy(name).query_window == 0
    assert POLICIES["h2o"].tracks_attention
    assert not any(POLICIES[n].tracks_attention for n in POLICIES if n != "h2o")


# ----------------------------------------------------------------------------- score rules
def test_streaming_llm():
    view = make_view()
    for kw, n_sink in (({}, 4), ({"num_sink": 2}, 2)):
        want = torch.zeros(2, S, dtype=torch.float64)
        for r in range(2):
            for rank, j in enumerate(live_slots(view, r)):
                want[r, j] = INF if rank < n_sink else rank
        assert_scores(policy("streaming_llm", **kw).token_scores(view), want)


@pytest.mark.parametrize("invalid_first_query", [False, True])
@pytest.mark.parametrize("w", [3, 6])
def test_snapkv(w, invalid_first_query):
    view = make_view(seed=1, w=W, invalid_first_query=invalid_first_query)
    want_kv = expected_snapkv_kv(view, w)
    assert_scores(snapkv_kv_head_scores(view, w), want_kv)
    got = policy("snapkv", score_window=w).token_scores(view)
    assert_scores(got, want_kv.mean(1))
    # protected exactly on the window keys: the live keys at or after the oldest valid window query
    n_window = (w, w - int(invalid_first_query and w == W))  # query 0 is the invalid one
    for r in range(2):
        assert [j for j in range(S) if torch.isinf(got[r, j])] == live_slots(view, r)[-n_window[r] :]
    # window_size overrides score_window
    assert_scores(policy("snapkv", score_window=2, window_size=w).token_scores(view), want_kv.mean(1))


def test_snapkv_ignores_non_live_slots():
    """Pooling runs over the live sequence: moving the garbage around changes nothing."""
    view = make_view(seed=2)
    other = make_view(seed=2)
    other.keys = torch.where(other.live[:, None, :, None], other.keys, -other.keys * 7)
    pol = policy("snapkv", score_window=4)
    torch.testing.assert_close(pol.token_scores(view), pol.token_scores(other))


def test_knorm():
    view = make_view(seed=3)
    assert_scores(knorm_kv_head_scores(view.keys, view.live), expected_knorm_kv(view))
    got = policy("knorm").token_scores(view)
    assert got.dtype == torch.float32
    assert_scores(got, expected_knorm_kv(view).mean(1))
    half = policy("knorm").token_scores(LayerView(**{**vars(view), "keys": view.keys.bfloat16()}))
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


def test_keydiff():
    view = make_view(seed=4)
    assert_scores(keydiff_kv_head_scores(view.keys, view.live), expected_keydiff_kv(view))
    assert_scores(policy("keydiff").token_scores(view), expected_keydiff_kv(view).mean(1))


def test_h2o():
    view = make_view(seed=5)
    cases = (({}, None), ({"eviction_rate": 0.75}, None), ({"window_size": 3}, 3))
    for kw, fixed in cases:
        eps = kw.get("eviction_rate", 0.5)
        want = torch.zeros(2, S, dtype=torch.float64)
        for r in range(2):
            slots = live_slots(view, r)
            recent = fixed if fixed is not None else math.floor((1 - eps) * len(slots) / 2)
            for k, j in enumerate(slots):
                want[r, j] = INF if k >= len(slots) - recent else float(view.attention_sum[r, j])
        assert_scores(policy("h2o", **kw).token_scores(view), want)
    # default split on row 0 (24 live keys, ε = 0.5): R = 6
    assert int(torch.isinf(policy("h2o").token_scores(view)[0]).sum()) == 6
    view.attention_sum = None
    with pytest.raises(ValueError, match="attention_sum"):
        policy("h2o").token_scores(view)


def test_tova():
    view = make_view(seed=6)
    want = torch.zeros(2, S, dtype=torch.float64)
    for r in range(2):
        for h in range(H):
            for j, p in attn_row(view, r, h, W - 1).items():
                want[r, j] += p / H
        want[r, live_slots(view, r)[-1]] = INF
    assert_scores(policy("tova").token_scores(view), want)


def test_random():
    view = make_view(seed=7, block_size=4)
    got = policy("random").token_scores(view)
    n_blocks = int(view.bid.max()) + 1
    draw = torch.rand(2, n_blocks, generator=torch.Generator().manual_seed(107))
    want = torch.zeros(2, S, dtype=torch.float64)
    for r in range(2):
        for j in live_slots(view, r):
            want[r, j] = float(draw[r, int(view.bid[r, j])])
    assert_scores(got, want, atol=0)
    assert ((got >= 0) & (got < 1)).all()
    view.generator = None  # global RNG
    torch.manual_seed(0)
    a = policy("random").token_scores(view)
    torch.manual_seed(0)
    torch.testing.assert_close(a, policy("random").token_scores(view))


@pytest.mark.parametrize(
    "name", sorted(n for n in POLICIES if not POLICIES[n].hindsight)
)  # oracle: test_oracle.py
def test_scores_are_well_formed(name):
    """(R, S), no NaN; +inf only on live slots and only for methods with native protections; the
    engine's block reduction of them is finite."""
    view = make_view(seed=8)
    view.layer_idx = 0
    pol = build(name, block_size=4)
    if pol.query_window:
        assert pol.query_window <= W
    scores = pol.token_scores(view)
    assert scores.shape == (2, S) and not torch.isnan(scores).any()
    assert not (torch.isinf(scores) & (scores < 0)).any()
    protected = torch.isinf(scores) & view.live
    if name in ("knorm", "keydiff", "random", "ngc"):
        assert not protected.any()
    if name != "full":
        assert torch.isfinite(scores[view.live & ~protected]).all()
    block, forced, exists = reduce_blocks(scores, view.bid, int(view.bid.max()) + 1, "mean")
    assert torch.isfinite(block).all()
