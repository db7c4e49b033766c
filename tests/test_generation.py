"""The evicting decode loop: equivalence to `generate` without eviction, schedule bounds, records."""

import pytest
import torch
from conftest import left_padded

from ngc_trl import EvictionConfig, generate_with_eviction
from ngc_trl.engine.cache import NGCLayer
from ngc_trl.engine.decision import num_kept

SMALL = dict(eviction_interval=8, block_size=2, score_window=3)


def hf_greedy(model, ids, mask, n, eos):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )
    return out


@pytest.mark.parametrize("policy,rate", [("full", 0.5), ("ngc", 0.0), ("knorm", 0.0)])
def test_no_eviction_is_token_identical_to_generate(model, policy, rate):
    ids, mask = left_padded([5, 11, 8, 3])
    want = hf_greedy(model, ids, mask, 40, eos=None)
    out = generate_with_eviction(
        model,
        ids,
        mask,
        EvictionConfig(policy=policy, eviction_rate=rate, **SMALL),
        max_new_tokens=40,
        eos_token_id=[],
    )
    assert torch.equal(out.sequences, want)
    assert out.records.acted.sum() == 0


def test_stops_per_sequence_at_eos_like_generate(model):
    ids, mask = left_padded([6, 10, 4], seed=3)
    free = generate_with_eviction(
        model, ids, mask, EvictionConfig(policy="full"), max_new_tokens=30, eos_token_id=[]
    )
    gen = free.sequences[:, ids.shape[1] :]
    eos = int(gen[0, 5])  # a token the first row emits: use it as EOS so rows stop at different steps
    want = hf_greedy(model, ids, mask, 30, eos=eos)
    out = generate_with_eviction(
        model, ids, mask, EvictionConfig(policy="full"), max_new_tokens=30, eos_token_id=eos, pad_token_id=0
    )
    assert torch.equal(out.sequences, want[:, : out.sequences.shape[1]])
    lengths = out.completion_mask.sum(1)
    assert lengths[0] == 6 and len(set(lengths.tolist())) > 1


def simulate_lengths(prompt_len, n_fed, rounds, block_size):
    """Per-layer live-entry counts implied by the records: (peak, final) per layer."""
    n_layers = len(rounds[0]["layers"]) if rounds else 0
    peaks, finals = [], []
    for layer in range(n_layers):
        t, fed, peak = prompt_len, prompt_len, prompt_len
        for r in rounds:
            t += r["position"] - fed
            fed = r["position"]
            peak = max(peak, t)
            n = -(-t // block_size)
            sizes = [block_size] * (n - 1) + [t - (n - 1) * block_size]
            kept = r["layers"][layer]["kept"]
            assert sorted(kept + r["layers"][layer]["evicted"]) == list(range(n))
            t = sum(sizes[k] for k in kept)
        t += n_fed - fed
        peaks.append(max(peak, t))
        finals.append(t)
    return peaks, finals


@pytest.mark.parametrize("rate,n_new", [(0.5, 40), (0.75, 40), (0.5, 160)])
def test_every_round_keeps_the_scheduled_blocks_and_peak_matches(model, rate, n_new):
    cfg = EvictionConfig(policy="ngc", eviction_rate=rate, **SMALL)
    ids, mask = left_padded([5, 12, 9], seed=1)
    out = generate_with_eviction(
        model,
        ids,
        mask,
        cfg,
        max_new_tokens=n_new,
        eos_token_id=[],
        do_sample=True,
        generator=torch.Generator().manual_seed(0),
    )
    rec, stats = out.records, out.cache_stats
    # K = ceil((1 - eps) N) kept in every (round, layer)
    valid = rec.positions >= 0
    k = num_kept(rec.n_blocks, torch.full_like(rec.n_blocks, rate, dtype=torch.float))
    n_kept = (rec.kept >= 0).sum(-1)
    assert torch.equal(n_kept[valid], k[valid])
    for i, p in enumerate(mask.sum(1).tolist()):
        rounds = rec.rounds(i)
        assert [r["position"] for r in rounds] == cfg.round_positions(p, p + n_new)
        peaks, _ = simulate_lengths(p, int(stats.full_entries[i]), rounds, cfg.block_size)
        assert stats.peak_entries[i].tolist() == peaks
        # bound: before a round the cache holds at most (kept after last round) + delta entries
        bound = (1 - rate) * (cfg.eviction_interval / rate) + cfg.eviction_interval + 2 * cfg.block_size
        assert max(peaks) <= bound
    assert (stats.compression > 1.2).all()


def test_layers_and_sequences_evict_differently(model):
    ids, mask = left_padded([7, 7], seed=2)
    out = generate_with_eviction(
        model,
        ids,
        mask,
        EvictionConfig(policy="ngc", **SMALL),
        max_new_tokens=30,
        do_sample=True,
        generator=torch.Generator().manual_seed(1),
        eos_token_id=[],
    )
    r0, r1 = out.records.rounds(0), out.records.rounds(1)
    assert any(len({tuple(lay["evicted"]) for lay in r["layers"]}) > 1 for r in r0)  # layers diverge
    assert any(a["layers"][0]["evicted"] != b["layers"][0]["evicted"] for a, b in zip(r0, r1))  # rows diverge


def test_eviction_changes_outputs_and_frees_memory(model):
    ids, mask = left_padded([6, 9], seed=4)
    full = generate_with_eviction(
        model,
        ids,
        mask,
        EvictionConfig(policy="full", **SMALL),
        max_new_tokens=48,
        eos_token_id=[],
        cache_growth=1,
    )
    ngc = generate_with_eviction(
        model,
        ids,
        mask,
        EvictionConfig(policy="ngc", **SMALL),
        max_new_tokens=48,
        eos_token_id=[],
        cache_growth=1,
    )
    assert not torch.equal(full.sequences, ngc.sequences)
    assert ngc.cache_stats.peak_bytes < 0.6 * full.cache_stats.peak_bytes
    assert full.cache_stats.compression.tolist() == [1.0, 1.0]


def test_layer_compaction_shrinks_storage_and_keeps_temporal_order():
    layer = NGCLayer(query_window=2)
    k = torch.randn(2, 2, 6, 4)
    pos = torch.tensor([[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])
    valid = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    keys, _ = layer.update(k, k.clone(), pos, valid)
    assert keys.shape == (2, 2, 6, 4) and layer.lengths.tolist() == [4, 6]
    assert torch.equal(keys[0, :, :4], k[0, :, 2:])  # left padding packed away
    keep = torch.tensor([[True, False, True, False, False, False], [False, True, True, False, True, False]])
    layer.keep(keep)
    assert layer.keys.shape[1] == 3 and layer.lengths.tolist() == [2, 3]
    assert layer.pos[0, :2].tolist() == [0, 2] and layer.pos[1].tolist() == [1, 2, 4]
    assert torch.equal(layer.keys[1].transpose(0, 1), k[1][:, [1, 2, 4]])


def test_prompt_longer_than_interval_evicts_after_prefill(model):
    ids, mask = left_padded([13, 4], seed=5)
    out = generate_with_eviction(
        model, ids, mask, EvictionConfig(policy="ngc", **SMALL), max_new_tokens=20, eos_token_id=[]
    )
    assert [r["position"] for r in out.records.rounds(0)] == [
        13,
        16,
        24,
    ]  # 33 tokens: the last one is never fed
    assert [r["position"] for r in out.records.rounds(1)] == [8, 16]


def test_meta_token_is_forced_before_every_round(model):
    ids, mask = left_padded([5, 10], seed=6)
    out = generate_with_eviction(
        model,
        ids,
        mask,
        EvictionConfig(policy="ngc", **SMALL),
        max_new_tokens=30,
        eos_token_id=[],
        forced_token_id=95,
    )
    for i, p in enumerate(mask.sum(1).tolist()):
        gen = out.sequences[i, ids.shape[1] :]
        for r in out.records.rounds(i):
            assert int(gen[r["position"] - 1 - p]) == 95


def test_same_generator_seed_reproduces_rollout(model):
    ids, mask = left_padded([5, 8], seed=7)
    kw = dict(max_new_tokens=25, do_sample=True, temperature=0.9, top_p=0.95, top_k=20, eos_token_id=[])
    a = generate_with_eviction(
        model,
        ids,
        mask,
        EvictionConfig(policy="ngc", **SMALL),
        generator=torch.Generator().manual_seed(3),
        **kw,
    )
    b = generate_with_eviction(
        model,
        ids,
        mask,
        EvictionConfig(policy="ngc", **SMALL),
        generator=torch.Generator().manual_seed(3),
        **kw,
    )
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.records.kept, b.records.kept)


def test_per_sequence_rates(model):
    ids, mask = left_padded([6, 6], seed=8)
    out = generate_with_eviction(
        model,
        ids,
        mask,
        EvictionConfig(policy="ngc", **SMALL),
        max_new_tokens=30,
        eos_token_id=[],
        eviction_rate=torch.tensor([0.0, 0.75]),
    )
    assert out.records.acted[0].sum() == 0 and out.records.acted[1].sum() > 0
    with pytest.raises(ValueError, match="eviction_rate"):
        generate_with_eviction(model, ids, mask, EvictionConfig(), eviction_rate=torch.tensor([0.5, 1.0]))


def test_sampled_round_samples_one_round_and_takes_the_top_k_elsewhere(model):
    """``sampled_round``: a row samples its evictions at that round only. Greedy tokens, the same prompt
    in every row: row 0 (-1) is the deterministic top-k rollout; row r+1 follows it exactly up to its round
    r (the same kept sets at every earlier round), where it draws (seeds disagree)."""
    ids, mask = left_padded([6])
    ids, mask = ids.repeat(4, 1), mask.repeat(4, 1)
    cfg = EvictionConfig(policy="ngc", eviction_rate=0.5, logit_transform="relative", **SMALL)
    kw = dict(max_new_tokens=40, eos_token_id=[], sample_evictions=True)
    topk = generate_with_eviction(model, ids, mask, cfg, max_new_tokens=40, eos_token_id=[])
    rounds = torch.tensor([-1, 0, 1, 2])
    outs = [
        generate_with_eviction(
            model, ids, mask, cfg, generator=torch.Generator().manual_seed(s), sampled_round=rounds, **kw
        )
        for s in range(6)
    ]
    for out in outs:
        rec = out.records
        assert torch.equal(out.sequences[0], topk.sequences[0]) and torch.equal(
            rec.kept[0], topk.records.kept[0]
        )
        for row in (1, 2, 3):
            r = int(rounds[row])
            assert torch.equal(rec.kept[row, :r], topk.records.kept[0, :r])  # top-k before its round
    # the sampled round differs between seeds (it is a draw), the rounds before it never do
    assert len({tuple(o.records.kept[1, 0].flatten().tolist()) for o in outs}) > 1
    assert len({tuple(o.records.kept[2, 0].flatten().tolist()) for o in outs}) == 1
    with pytest.raises(ValueError, match="sampled_round"):
        generate_with_eviction(model, ids, mask, cfg, max_new_tokens=4, sampled_round=rounds)
