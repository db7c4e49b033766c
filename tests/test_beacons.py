"""Breadcrumbs beacons: decoding, the layout and its mask, the one-pass replay, and the beacon token."""

import pytest
import torch
from conftest import left_padded, tiny_qwen2
from transformers import Qwen2Config, Qwen2ForCausalLM

from ngc_trl import EvictionConfig, generate_with_eviction
from ngc_trl.breadcrumbs.beacons import (
    BEACON_TOKEN,
    add_beacon_token,
    beacon_forward,
    beacon_layout,
    beacon_logprobs,
)
from ngc_trl.engine.config import BeaconConfig, schedule_config_from_dict
from ngc_trl.engine.replay import NEVER
from ngc_trl.models import char_tokenizer, tiny_qwen2_config

BEACON = 95  # any id of the tiny model's vocabulary (random weights)
LENGTHS = (5, 11, 8, 3)


def crumbs(c, beacon=BEACON):
    return BeaconConfig(beacon_token_id=beacon, compression_ratio=c)


def rollout(model, c, n=36, seed=0, eos=None, lengths=LENGTHS, **kw):
    ids, mask = left_padded(list(lengths), seed=seed)
    out = generate_with_eviction(
        model,
        ids,
        mask,
        crumbs(c if isinstance(c, int) else 2),
        max_new_tokens=n,
        do_sample=True,
        generator=torch.Generator().manual_seed(seed),
        eos_token_id=eos,
        compression_ratio=None if isinstance(c, int) else c,
        **kw,
    )
    return ids, mask, out


def layout_of(ids, mask, out, c):
    return beacon_layout(ids, mask, out.sequences[:, ids.shape[1] :], out.completion_mask, c, BEACON)


# ----------------------------------------------------------------------------- (a) replay faithfulness
@pytest.mark.parametrize("c", [2, 3, 5, torch.tensor([2, 3, 5, 4])], ids=["c2", "c3", "c5", "per-row"])
def test_replay_reproduces_rollout_logprobs(model, c):
    _, _, free = rollout(model, c, eos=[])
    eos = int(free.sequences[1, -16])  # a token row 1 samples mid-way: rows end at different lengths
    ids, mask, out = rollout(model, c, eos=eos)
    n = out.completion_mask.sum(1)
    assert len(set(n.tolist())) > 1 and n.max() == 36  # some rows stop at EOS, one runs to max_new_tokens
    layout = layout_of(ids, mask, out, c)
    assert (layout.is_beacon.sum(1) > 0).any()
    logp = beacon_logprobs(model, layout)
    m = out.completion_mask
    assert (logp[m] - out.token_logprobs[m]).abs().max() <= 1e-5
    assert (logp[~m] == 0).all()
    # the beacons matter: a plain causal forward over the same tokens is off-policy
    plain = beacon_layout(ids, mask, out.sequences[:, ids.shape[1] :], m, 10**6, BEACON)
    assert (beacon_logprobs(model, plain)[m] - out.token_logprobs[m]).abs().max() > 1e-2


def test_logits_to_keep_returns_the_last_tokens(model):
    ids, mask, out = rollout(model, 3, n=20)
    layout = layout_of(ids, mask, out, 3)
    with torch.no_grad():
        full = beacon_forward(model, layout)
        last = beacon_forward(model, layout, logits_to_keep=7)
    assert full.shape == (4, 20, model.config.vocab_size) and last.shape == (4, 7, model.config.vocab_size)
    torch.testing.assert_close(last, full[:, -7:], atol=1e-5, rtol=1e-5)


def test_hidden_states_project_to_the_same_logits(model):
    """`return_hidden` gives the final hidden states at the same slots; the output head maps them to the logits."""
    from ngc_trl.breadcrumbs.beacons import backbone_and_head

    ids, mask, out = rollout(model, 3, n=20)
    layout = layout_of(ids, mask, out, 3)
    with torch.no_grad():
        logits = beacon_forward(model, layout)
        hidden = beacon_forward(model, layout, return_hidden=True)
    assert hidden.shape == (4, 20, model.config.hidden_size)
    torch.testing.assert_close(backbone_and_head(model)[1](hidden), logits, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- (b) cache bound
@pytest.mark.parametrize("c", [2, 3, torch.tensor([2, 3, 5, 4])], ids=["c2", "c3", "per-row"])
def test_cache_never_exceeds_prompt_beacons_and_one_window(model, c):
    n = 30
    cs = (c if isinstance(c, torch.Tensor) else torch.full((4,), c)).tolist()
    seen = []
    hook = model.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append(kwargs["past_key_values"].lengths().clone()),
        with_kwargs=True,
    )
    try:
        ids, mask, out = rollout(model, c, n=n, eos=[])
    finally:
        hook.remove()
    plen = mask.sum(1).tolist()
    # the loop's schedule: step s feeds t_{s+1}, preceded in the same forward by a beacon in rows with
    # s % c == 0 (s > 0); the closed window is dropped after that forward
    live, want, fed = list(plen), [list(plen)], [[0] * 4]
    for s in range(n - 1):
        due = [s > 0 and s % cb == 0 for cb in cs]
        live = [x + 1 + d for x, d in zip(live, due)]
        want.append(list(live))
        fed.append([s + 1] * 4)
        live = [x - cb * d for x, cb, d in zip(live, cs, due)]
    got = torch.stack(seen)  # (forwards, B, L): one forward per generated token
    assert got.shape[0] == n
    assert (got == got[..., :1]).all()  # layers never diverge
    assert got[..., 0].tolist() == want
    # prompt + one beacon per closed window + the open window (+1: the token fed with a beacon)
    bound = torch.tensor(plen) + torch.tensor(fed) // torch.tensor(cs) + torch.tensor(cs) + 1
    assert (got[..., 0] <= bound).all()
    st = out.cache_stats
    assert st.peak_entries[:, 0].tolist() == [max(w[b] for w in want) for b in range(4)]
    assert st.full_entries.tolist() == [p + n - 1 for p in plen]  # beacons are not counted
    assert (st.compression > 1.2).all()


# ----------------------------------------------------------------------------- (c) c > generation
@pytest.mark.parametrize("c", [29, 100])
@pytest.mark.parametrize("sample", [False, True])
def test_ratio_beyond_generation_is_identical_to_full(model, c, sample):
    ids, mask = left_padded(list(LENGTHS), seed=3)
    kw = dict(max_new_tokens=30, eos_token_id=[], do_sample=sample)
    # both suppress the beacon id (a beacon is only ever forced)
    full = generate_with_eviction(
        model,
        ids,
        mask,
        EvictionConfig(policy="full"),
        generator=torch.Generator().manual_seed(1),
        suppress_token_ids=[BEACON],
        **kw,
    )
    bc = generate_with_eviction(model, ids, mask, crumbs(c), generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(full.sequences, bc.sequences)
    assert torch.equal(full.token_logprobs, bc.token_logprobs)
    assert bc.cache_stats.compression.tolist() == [1.0] * 4
    # one token less and a beacon fires just before the last fed token: outputs change
    short = generate_with_eviction(
        model, ids, mask, crumbs(28), generator=torch.Generator().manual_seed(1), **kw
    )
    assert not torch.equal(full.token_logprobs[:, -1], short.token_logprobs[:, -1])


# ----------------------------------------------------------------------------- (d) layout vs definition
def brute_force(prompt, completion, c):
    """Tokens, beacon flags and visibility of one row, built item by item from the definition."""
    items = [("p", tok, None) for tok in prompt]  # (kind, id, window)
    n, window = len(completion), 0  # a window is what the rollout cached since the last beacon
    for i, tok in enumerate(completion, start=1):
        items.append(("t", tok, window))
        if (
            i % c == 0 and i + 1 < n
        ):  # a beacon closes the window, only if t_{i+1} is fed (not the last token)
            items.append(("b", BEACON, window))
            window += 1
    vis = torch.zeros(len(items), len(items), dtype=torch.bool)
    for q, (kq, _, wq) in enumerate(items):
        for j, (kj, _, wj) in enumerate(items[: q + 1]):
            if kj == "p":
                vis[q, j] = True
            elif kj == "b":
                vis[q, j] = wj < wq or j == q if kq != "p" else False
            elif kq in ("t", "b"):
                vis[q, j] = wj == wq  # same window: earlier tokens (a beacon sees its whole window)
    return [tok for _, tok, _ in items], [k == "b" for k, _, _ in items], vis


def test_layout_matches_brute_force_mask():
    c = torch.tensor([2, 3, 4, 2, 5, 3, 2])
    n = [0, 1, 3, 4, 12, 13, 5]  # no completion, one token, c+0/1/2 edges, long rows
    p_len = [4, 2, 5, 3, 1, 6, 3]
    g = torch.Generator().manual_seed(0)
    p, t = max(p_len), max(n)
    pids, pmask = torch.zeros(len(n), p, dtype=torch.long), torch.zeros(len(n), p, dtype=torch.long)
    cids, cmask = torch.zeros(len(n), t, dtype=torch.long), torch.zeros(len(n), t, dtype=torch.bool)
    for b in range(len(n)):
        pids[b, p - p_len[b] :] = torch.randint(3, 90, (p_len[b],), generator=g)
        pmask[b, p - p_len[b] :] = 1
        cids[b, : n[b]] = torch.randint(3, 90, (n[b],), generator=g)
        cmask[b, : n[b]] = True
    lay = beacon_layout(pids, pmask, cids, cmask, c, BEACON)
    vis = lay.visible()
    for b in range(len(n)):
        toks, is_b, want = brute_force(pids[b, p - p_len[b] :].tolist(), cids[b, : n[b]].tolist(), int(c[b]))
        slots = torch.nonzero(lay.attention_mask[b]).flatten()
        assert slots.tolist() == list(range(p - p_len[b], p - p_len[b] + len(toks)))  # contiguous valid run
        assert lay.input_ids[b, slots].tolist() == toks and lay.is_beacon[b, slots].tolist() == is_b
        assert lay.position_ids[b, slots].tolist() == list(range(len(toks)))
        assert torch.equal(vis[b][slots][:, slots], want)
        assert not vis[b][:, lay.attention_mask[b] == 0].any()
        assert (lay.death[b, lay.is_beacon[b]] == NEVER).all()
        # completion_index: the slot of the token before t (the last prompt slot for t = 0), never a beacon
        comp = [s for s, bb in zip(slots.tolist()[p_len[b] :], is_b[p_len[b] :]) if not bb]
        prev = ([p - 1] + comp[:-1])[: n[b]]
        assert lay.completion_index[b, : n[b]].tolist() == prev
        assert not lay.is_beacon[b, lay.completion_index[b]].any()


def test_layout_rejects_bad_ratio():
    ids, mask = left_padded([3, 2])
    with pytest.raises(ValueError, match="compression_ratio"):
        beacon_layout(ids, mask, ids, mask.bool(), torch.tensor([2, 1]), BEACON)


# ----------------------------------------------------------------------------- (e) config validation
@pytest.mark.parametrize(
    "field,value",
    [
        ("compression_ratio", 0),
        ("compression_ratio", 1),
        ("compression_ratio", 2.5),
        ("compression_ratio", True),
        ("beacon_token_id", None),
        ("beacon_token_id", -1),
        ("beacon_token_id", "7"),
    ],
)
def test_breadcrumbs_config_errors_name_the_field(field, value):
    kw = dict(compression_ratio=4, beacon_token_id=7)
    with pytest.raises(ValueError, match=field):
        BeaconConfig(**{**kw, field: value})


def test_breadcrumbs_config_round_trip_and_engine_checks(model):
    cfg = crumbs(8, beacon=3)
    assert schedule_config_from_dict(cfg.to_dict()) == cfg
    # a settings file written when Breadcrumbs shared EvictionConfig reads back as the same BeaconConfig
    legacy = {
        **EvictionConfig().to_dict(),
        "policy": "breadcrumbs",
        "compression_ratio": 8,
        "beacon_token_id": 3,
    }
    assert schedule_config_from_dict(legacy) == cfg
    # ... and an NGC one with the then-neutral beacon fields as its EvictionConfig
    ngc = EvictionConfig(eviction_interval=64, block_size=8)
    assert (
        schedule_config_from_dict({**ngc.to_dict(), "compression_ratio": 0, "beacon_token_id": None}) == ngc
    )
    with pytest.raises(ValueError, match="compression_ratio"):
        schedule_config_from_dict({**ngc.to_dict(), "compression_ratio": 4})
    with pytest.raises(ValueError, match="unknown fields"):
        schedule_config_from_dict({**cfg.to_dict(), "eviction_rate": 0.5})
    assert not hasattr(EvictionConfig(), "compression_ratio")  # the eviction schedule has no beacon fields
    ids, mask = left_padded([3, 4])
    with pytest.raises(ValueError, match="compression_ratio"):
        generate_with_eviction(model, ids, mask, crumbs(2), compression_ratio=torch.tensor([2, 1]))
    with pytest.raises(ValueError, match="compression_ratio"):  # beacons need a BeaconConfig
        generate_with_eviction(model, ids, mask, EvictionConfig(), compression_ratio=torch.tensor([2, 2]))


# ----------------------------------------------------------------------------- (f) gradients
def test_gradients_reach_parameters_and_the_beacon_embedding():
    model = tiny_qwen2(seed=1)
    ids, mask, out = rollout(model, 3, n=24, seed=2)
    layout = layout_of(ids, mask, out, 3)
    model.train()
    (-beacon_logprobs(model, layout).sum()).backward()
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.grad.abs().sum() > 0 and attn.k_proj.weight.grad.abs().sum() > 0
    assert model.model.embed_tokens.weight.grad[BEACON].abs().sum() > 0  # later tokens read the beacons
    model.zero_grad()
    model.eval()


def test_peft_model_replays_and_trains_lora():
    from peft import LoraConfig, get_peft_model

    base = tiny_qwen2(seed=1)
    ids, mask, out = rollout(base, 2, n=20, seed=4)
    layout = layout_of(ids, mask, out, 2)
    with torch.no_grad():
        want = beacon_logprobs(base, layout)
    peft = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # B = 0: same function
    peft.train()
    logp = beacon_logprobs(peft, layout)
    assert (logp - want).abs().max() < 1e-5
    (-logp.sum()).backward()
    lora = [p for n_, p in peft.named_parameters() if "lora_B" in n_]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


# ----------------------------------------------------------------------------- (g) beacon token
def test_add_beacon_token_mean_init_and_idempotent():
    tok = char_tokenizer()
    model = Qwen2ForCausalLM(tiny_qwen2_config(len(tok), num_layers=1, hidden=32, heads=2, kv_heads=1))
    old = model.get_input_embeddings().weight.detach().clone()
    bid = add_beacon_token(tok, model)
    emb = model.get_input_embeddings().weight
    assert bid == len(tok) - 1 and emb.shape[0] == len(tok) and model.get_output_embeddings().weight is emb
    assert tok(BEACON_TOKEN + "1", add_special_tokens=False)["input_ids"][0] == bid  # kept whole
    torch.testing.assert_close(emb[bid], old.mean(0))
    torch.testing.assert_close(emb[:bid], old)
    with torch.no_grad():
        emb[bid] += 1.0
    row = emb[bid].detach().clone()
    assert add_beacon_token(tok, model) == bid and add_beacon_token(tok) == bid
    assert (
        len(tok) == bid + 1
        and emb.shape[0] == bid + 1
        and torch.equal(model.get_input_embeddings().weight[bid], row)
    )


def test_add_beacon_token_eos_and_random_init_untied_head():
    tok = char_tokenizer()
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg)
    bid = add_beacon_token(tok, model, token="<|b|>", init="eos")
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert torch.equal(emb[bid], emb[tok.eos_token_id]) and torch.equal(head[bid], head[tok.eos_token_id])
    torch.manual_seed(0)
    rid = add_beacon_token(tok, model, token="<|r|>", init="random")
    emb = model.get_input_embeddings().weight
    assert rid == bid + 1 and torch.isfinite(emb[rid]).all()
    ref = emb[:bid].std()
    assert 0.5 * ref < emb[rid].std() < 2 * ref and not torch.allclose(emb[rid], emb[:bid].mean(0), atol=1e-3)
    with pytest.raises(ValueError, match="init"):
        add_beacon_token(tok, model, token="<|x|>", init="zeros")


def test_beacon_is_never_sampled_but_logprobs_stay_full_vocabulary(model):
    """The beacon is masked for sampling under beacon decoding and wherever it is suppressed (a student's
    full-cache runs): it is only ever forced."""
    ids, mask = left_padded(list(LENGTHS), seed=3)
    kw = dict(max_new_tokens=20, eos_token_id=[])
    plain = generate_with_eviction(model, ids, mask, eviction=EvictionConfig(policy="full"), **kw)
    gen = plain.sequences[:, ids.shape[1] :]
    favourite = torch.bincount(gen.flatten()).argmax().item()  # the model's commonest token
    assert (gen == favourite).sum() >= 4
    for cfg, extra in ((EvictionConfig(policy="full"), [favourite]), (crumbs(3, favourite), None)):
        out = generate_with_eviction(model, ids, mask, eviction=cfg, suppress_token_ids=extra, **kw)
        assert not (out.sequences[:, ids.shape[1] :] == favourite).any()
    out = generate_with_eviction(
        model, ids, mask, eviction=EvictionConfig(policy="full"), suppress_token_ids=[favourite], **kw
    )
    comp = out.sequences[:, ids.shape[1] :]
    layout = beacon_layout(ids, mask, comp, out.completion_mask, 10**6, favourite)  # no beacon fires
    ref = beacon_logprobs(model, layout)
    m = out.completion_mask
    torch.testing.assert_close(ref * m, out.token_logprobs * m, atol=1e-5, rtol=0)
