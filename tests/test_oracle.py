"""`oracle`: the evaluation-only hindsight ceiling (`ngc_trl.policies.oracle`).

* hand-built future attention: the policy keeps exactly the blocks with the most future mass, through the
  shared `score_blocks` / `decide`; a round past the recorded trajectory falls back to recency;
* `future_attention` against a plain loop over eager attention probabilities (``output_attentions``) of a
  tiny random GQA model, row by row without padding;
* in `generate_with_eviction`, the first round keeps the top-k blocks of the teacher-forced F;
* without hindsight data the policy fails before any decoding, naming the config field;
* `ngc_trl.evaluation.run` with ``full,oracle``: rows written, the full run's completions reused, resume.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import left_padded, tiny_qwen2

import ngc_trl.engine.generation as generation
import ngc_trl.evaluation.run as ev
import ngc_trl.evaluation.setup as es
from ngc_trl.engine.config import EvictionConfig
from ngc_trl.engine.decision import decide, score_blocks
from ngc_trl.engine.generation import generate_with_eviction
from ngc_trl.engine.scoring import block_ids
from ngc_trl.models import char_tokenizer
from ngc_trl.policies import POLICIES, LayerView, get_policy
from ngc_trl.policies.oracle import Hindsight, OraclePolicy, future_attention

SMALL = EvictionConfig(eviction_interval=8, block_size=4, score_window=3)


pytestmark = pytest.mark.usefixtures("eval_one_thread")


# ----------------------------------------------------------------------------- the score rule, by hand
def _view(rows, round_pos, layer_idx, n_live, s=16, b=4):
    """Views whose live keys sit at positions 0..n_live-1 except a hole at position 5 (evicted earlier)."""
    r = len(rows)
    pos = torch.arange(s + 1)[None].expand(r, -1).clone()
    pos = torch.cat([pos[:, :5], pos[:, 6:]], 1)  # slot j holds position j (j < 5) or j + 1
    live = torch.arange(s)[None] < torch.tensor(n_live)[:, None]
    pos = torch.where(live, pos, torch.zeros_like(pos))
    return LayerView(
        keys=torch.zeros(r, 1, s, 2),
        values=torch.zeros(r, 1, s, 2),
        pos=pos,
        live=live,
        bid=block_ids(live, b),
        queries=None,
        q_pos=None,
        q_valid=None,
        scale=1.0,
        prompt_len=torch.zeros(r, dtype=torch.long),
        rows=torch.tensor(rows),
        layer_idx=layer_idx,
        round_pos=torch.tensor(round_pos),
    )


def test_keeps_the_blocks_with_most_future_attention():
    cfg = EvictionConfig(policy="oracle", eviction_interval=8, block_size=4, eviction_rate=0.5)
    n_layers, t = 2, 40
    future = torch.zeros(3, n_layers, 2, t)
    round_pos = torch.tensor([[16, 24], [17, -1], [8, -1]])
    # batch row 1, layer 1, round at 17 (its round index 0): keys at positions 6, 13 and 15 get the mass
    future[1, 1, 0, [6, 13, 15]] = torch.tensor([0.9, 0.5, 0.7])
    future[1, 1, 0, 1] = 0.05
    # batch row 0, layer 1, round at 24 (index 1): positions 0..3 (block 0) and 14 (block 3); 20 is not live
    future[0, 1, 1, [0, 1, 2, 3, 14, 20]] = torch.tensor([0.3, 0.3, 0.3, 0.3, 2.0, 9.0])
    future[0, 1, 0] = torch.rand(t)  # another round of the same row: must not be read
    future[:, 0] = torch.rand(3, 2, t)  # another layer: must not be read
    hs = Hindsight(future, round_pos, torch.tensor([30, 20, 10]))
    pol = OraclePolicy(cfg, hs)

    # rows 1 and 0 of the batch (in that order) evict at their rounds 17 and 24, in layer 1
    view = _view([1, 0], [17, 24], 1, [16, 16])
    scores = pol.token_scores(view)
    want = torch.zeros(2, 16)
    for i, row in enumerate((1, 0)):
        r_idx = 0 if row == 1 else 1
        for j in range(16):
            want[i, j] = future[row, 1, r_idx, int(view.pos[i, j])]
    torch.testing.assert_close(scores, want, rtol=0, atol=0)
    blocks = score_blocks(pol, view, cfg)
    dec = decide(blocks, torch.full((2,), 0.5), sample=False)
    # slots: block 0 = positions 0-3, block 1 = 4,6,7,8, block 2 = 9-12, block 3 = 13-16 -> keep 2 of 4
    assert dec.keep_block[0].tolist() == [False, True, False, True]  # row 1: position 6; 13 and 15
    assert dec.keep_block[1].tolist() == [True, False, False, True]  # row 0: positions 0-3; 14

    # a round the full-cache completion never reached (row 2 recorded only p = 8): recency keeps the newest
    late = _view([2], [32], 1, [16])
    scores = pol.token_scores(late)
    torch.testing.assert_close(scores[0], late.pos[0].float() / 32)
    dec = decide(score_blocks(pol, late, cfg), torch.full((1,), 0.5), sample=False)
    assert dec.keep_block[0].tolist() == [False, False, True, True]


def test_needs_its_hindsight_and_fails_before_decoding(model):
    assert POLICIES["oracle"] is OraclePolicy and OraclePolicy.hindsight
    assert not any(cls.hindsight for name, cls in POLICIES.items() if name != "oracle")
    cfg = EvictionConfig(policy="oracle", eviction_interval=8, block_size=4)
    pol = get_policy(cfg)
    with pytest.raises(ValueError, match="NGCConfig.eviction_policy"):
        pol.token_scores(_view([0], [8], 0, [8]))
    ids, mask = left_padded([12, 9])
    with pytest.raises(
        ValueError, match="evaluation-only"
    ):  # before the prefill: a training rollout stops here
        generate_with_eviction(model, ids, mask, eviction=cfg, max_new_tokens=4)
    hs = Hindsight(torch.zeros(1, 3, 1, 4), torch.full((1, 1), -1), torch.tensor([4]))
    with pytest.raises(ValueError, match="batch of 2"):
        generate_with_eviction(model, ids, mask, eviction=cfg, max_new_tokens=4, policy=OraclePolicy(cfg, hs))
    with pytest.raises(ValueError, match="view lacks"):
        view = _view([0], [8], 0, [8])
        view.rows = None
        OraclePolicy(cfg, hs).token_scores(view)
    with pytest.raises(ValueError, match="was given for"):
        generate_with_eviction(
            model, ids, mask, eviction=SMALL, max_new_tokens=4, policy=OraclePolicy(cfg, hs)
        )


# ----------------------------------------------------------------------------- F against eager attention
def _reference_future(eager, prompt, completion, rounds):
    """``(L, R, n)`` F by a plain loop over the eager attention of one unpadded row."""
    ids = torch.tensor([prompt + completion[:-1]])
    n = ids.shape[1]
    with torch.no_grad():
        att = eager(input_ids=ids, position_ids=torch.arange(n)[None], output_attentions=True).attentions
    out = torch.zeros(len(att), len(rounds), n, dtype=torch.float64)
    for layer, a in enumerate(att):
        a = a[0].double()  # (H, n, n)
        for r, p in enumerate(rounds):
            for q in range(p, n):
                for t in range(q + 1):
                    out[layer, r, t] += a[:, q, t].mean()
    return out


@pytest.mark.parametrize("chunk_elements", [1, 1 << 25])
def test_future_attention_matches_eager_probabilities(chunk_elements):
    model = tiny_qwen2()
    eager = tiny_qwen2()
    eager.set_attn_implementation("eager")
    cfg = EvictionConfig(eviction_interval=8, block_size=4)
    lengths = [11, 6, 9]
    ids, mask = left_padded(lengths, seed=3)
    g = torch.Generator().manual_seed(1)
    completions = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (14, 21, 1)]
    hs = future_attention(model, ids, mask, completions, cfg, chunk_elements=chunk_elements)
    assert hs.future.shape[:2] == (3, 3) and hs.future.dtype == torch.float32
    assert hs.length.tolist() == [p + len(c) - 1 for p, c in zip(lengths, completions)]
    for b, (n_prompt, comp) in enumerate(zip(lengths, completions)):
        rounds = cfg.round_positions(n_prompt, n_prompt + len(comp))
        got_rounds = hs.round_pos[b][hs.round_pos[b] >= 0].tolist()
        assert got_rounds == rounds
        if not rounds:
            assert (
                b == 2 and (hs.future[b] == 0).all()
            )  # a one-token completion: nothing fed after the prompt
            continue
        prompt = ids[b, mask[b].bool()].tolist()
        ref = _reference_future(eager, prompt, comp, rounds)
        n = ref.shape[-1]
        torch.testing.assert_close(hs.future[b, :, : len(rounds), :n].double(), ref, rtol=1e-5, atol=1e-6)
        assert (hs.future[b, :, :, n:] == 0).all() and (hs.future[b, :, len(rounds) :] == 0).all()
        # every query's probabilities sum to 1: the mass at p counts the n − p queries at or after p
        for r, p in enumerate(rounds):
            torch.testing.assert_close(
                hs.future[b, :, r].sum(-1).double(),
                torch.full((3,), float(n - p), dtype=torch.float64),
                rtol=1e-5,
                atol=1e-4,
            )


def test_first_round_in_decoding_keeps_top_k_of_the_teacher_forced_f(model):
    cfg = EvictionConfig(policy="oracle", eviction_interval=8, block_size=4, eviction_rate=0.5)
    ids, mask = left_padded([13, 6], seed=5)
    full = generate_with_eviction(model, ids, mask, eviction=EvictionConfig(policy="full"), max_new_tokens=20)
    hs = future_attention(model, ids, mask, full.completion_ids, cfg)
    out = generate_with_eviction(
        model, ids, mask, eviction=cfg, max_new_tokens=20, policy=OraclePolicy(cfg, hs)
    )
    rec = out.records
    for b in range(2):
        p = int(rec.positions[b, 0])
        assert p == int(hs.round_pos[b, 0])  # same prompt, same schedule: the first round is recorded
        n_blocks = math.ceil(p / 4)
        k = max(1, math.ceil(0.5 * n_blocks))
        for layer in range(3):
            f = hs.future[b, layer, 0, :p]
            means = torch.stack([f[i * 4 : (i + 1) * 4].mean() for i in range(n_blocks)])
            want = sorted(torch.topk(means, k).indices.tolist())
            kept = rec.kept[b, 0, layer]
            assert sorted(kept[kept >= 0].tolist()) == want


# ----------------------------------------------------------------------------- evaluation
@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_eval_full_then_oracle_reuses_completions_and_resumes(tok, tmp_path, monkeypatch):
    lm = tiny_qwen2(vocab=len(tok))
    problems = es.load_problems("countdown", tok, num_problems=3, seed=0, prompt_format="plain")
    calls = []
    real = generation.generate_with_eviction

    def counting(model, input_ids, *a, **kw):  # what the oracle decodes itself (full-cache completions)
        calls.append(input_ids.shape[0])
        return real(model, input_ids, *a, **kw)

    monkeypatch.setattr(generation, "generate_with_eviction", counting)
    kw = dict(eviction=SMALL, max_new_tokens=24, batch_size=2, progress=False)
    out = tmp_path / "both"
    summary = ev.evaluate(lm, tok, problems, "countdown", "oracle,full", "0.5", output_dir=out, **kw)
    assert calls == []  # full ran first, in this call: its completions are the hindsight
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted((r["policy"], r["problem_id"]) for r in lines) == sorted(
        (pol, p["id"]) for pol in ("full", "oracle") for p in problems
    )
    assert [r["policy"] for r in lines[:3]] == ["full"] * 3
    oracle = next(r for r in summary["results"] if r["policy"] == "oracle")
    assert oracle["rate"] == 0.5 and oracle["num_problems"] == 3
    assert all(r["rounds"] > 0 for r in lines if r["policy"] == "oracle")
    assert (
        ev.evaluate(lm, tok, problems, "countdown", "oracle,full", "0.5", output_dir=out, **kw)["results"]
        == summary["results"]
    )  # resumed: nothing left to do
    assert calls == [] and len((out / "samples.jsonl").read_text().splitlines()) == 6

    # without full in the list, the oracle decodes the full-cache completions itself (once per batch)
    alone = ev.evaluate(lm, tok, problems, "countdown", "oracle", "0.5", output_dir=tmp_path / "alone", **kw)
    assert calls == [2, 1]
    got = {
        r["problem_id"]: r["completion"]
        for r in map(json.loads, (tmp_path / "alone" / "samples.jsonl").read_text().splitlines())
    }
    assert got == {r["problem_id"]: r["completion"] for r in lines if r["policy"] == "oracle"}
    assert [r["policy"] for r in alone["results"]] == ["oracle"]


def test_training_config_refuses_the_oracle():
    from ngc_trl import NGCConfig

    with pytest.raises(ValueError, match="NGCConfig.eviction_policy='oracle'"):
        NGCConfig(
            output_dir="unused",
            eviction_policy="oracle",
            eviction_loss_coef=0.0,
            use_cpu=True,
            bf16=False,
            report_to="none",
        )
