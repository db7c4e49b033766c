"""bench/oracle_probe.py: recording does not change the oracle's decode, the features hold the ngc score,
the fit recovers a score rule that is a function of the features, and the fitted probe decodes as that rule."""

import contextlib
import dataclasses

import torch
from conftest import bench_module
from transformers import Qwen2ForCausalLM

from ngc_trl import EvictionConfig
from ngc_trl.engine.generation import generate_with_eviction
from ngc_trl.engine.policy import EvictionPolicy
from ngc_trl.engine.scoring import head_query_mean
from ngc_trl.models import char_tokenizer, tiny_qwen2_config
from ngc_trl.policies import POLICIES
from ngc_trl.policies.oracle import oracle_for_batch

op = bench_module("oracle_probe")

PROMPTS = ["nums 3 5 7 target 9\n", "abc 7\n", "nums 1 2 target 3\n", "xyz 42 1\n"]
AGE = -4  # column of age / p among the five position features


def setup():
    tok = char_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_qwen2_config(len(tok), num_layers=2, hidden=64, initializer_range=0.2))
    model.eval()
    cfg = EvictionConfig(eviction_interval=8, eviction_rate=0.5, block_size=2, score_window=3, policy="ngc")
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return tok, model, cfg, enc["input_ids"], enc["attention_mask"]


@contextlib.contextmanager
def registered(*classes):
    """Score rules known to the registry for the duration (the test's own and the bench's ``probe``)."""
    for cls in classes:
        POLICIES[cls.name] = cls
    try:
        yield
    finally:
        for cls in classes:
            POLICIES.pop(cls.name, None)


def decode(model, tok, ids, am, cfg, policy):
    """Greedy decode under ``policy`` (the config names it, as `generate_with_eviction` requires)."""
    return generate_with_eviction(
        model,
        ids,
        am,
        eviction=dataclasses.replace(cfg, policy=policy.name),
        max_new_tokens=32,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        policy=policy,
    )


class Newest(EvictionPolicy):
    """Keep the newest blocks (score = position): a rule that is a linear function of a probe feature."""

    name = "newest_for_test"

    def token_scores(self, view):
        return view.pos.float()


def test_recording_oracle_decodes_as_the_oracle_and_its_features_hold_the_ngc_score():
    tok, model, cfg, ids, am = setup()
    ocfg = dataclasses.replace(cfg, policy="oracle")
    with torch.no_grad():
        oracle, _ = oracle_for_batch(
            model, ids, am, ocfg, [None] * len(ids), 32, tok.eos_token_id, tok.pad_token_id
        )
        plain = decode(model, tok, ids, am, ocfg, oracle)
        sink = []
        recorded = decode(
            model, tok, ids, am, ocfg, op.RecordingOracle(ocfg, oracle.data, cfg.score_window, sink)
        )
    assert torch.equal(plain.sequences, recorded.sequences)
    assert sink and {d.layer for d in sink} == {0, 1}
    h, w = model.config.num_attention_heads, cfg.score_window
    names = op.feature_names(h, w, model.config.num_key_value_heads)
    assert names[AGE] == "age_frac"
    for d in sink:
        assert d.feats.shape == (d.bid.shape[0], len(names))
        assert 1 <= d.k < d.oracle.shape[0] == int(d.bid.max()) + 1
        # with every window query valid, the mean of the per-head, per-query attention is the ngc score
        ngc_keys = d.feats[:, : h * w].mean(-1)
        blocks = torch.zeros(d.oracle.shape[0]).index_add_(0, d.bid, ngc_keys)
        blocks /= torch.bincount(d.bid, minlength=d.oracle.shape[0]).float()
        assert torch.allclose(blocks, d.ngc, atol=1e-6)


def test_key_features_are_zero_off_the_live_slots():
    tok, model, cfg, ids, am = setup()
    seen = []

    class Spy(Newest):
        name = "spy_for_test"

        @property
        def query_window(self):
            return cfg.score_window

        def token_scores(self, view):
            f = op.key_features(view, cfg.score_window)
            seen.append((f, view.live))
            probs, qv = view.window_probs(cfg.score_window)
            ngc = head_query_mean(probs, qv)
            log_ngc = f[..., model.config.num_attention_heads * cfg.score_window]  # first of the log columns
            live = view.live
            assert torch.allclose(torch.exp(log_ngc[live]) - 1e-6, ngc[live], atol=1e-5)
            return super().token_scores(view)

    with torch.no_grad(), registered(Spy):
        decode(model, tok, ids, am, cfg, Spy(cfg))
    assert seen
    for f, live in seen:
        assert (f[~live] == 0).all() and torch.isfinite(f).all()


def test_fit_recovers_a_feature_rule_and_the_probe_decodes_as_that_rule():
    tok, model, cfg, ids, am = setup()
    decisions = op.collect(model, tok, [{"prompt": p} for p in PROMPTS], cfg, cfg.score_window, 32, 4)
    # replace the oracle's labels by a rule the linear head can express: keep the newest blocks
    for d in decisions:
        n = d.oracle.shape[0]
        age = (
            torch.zeros(n).index_add_(0, d.bid, d.feats[:, AGE]) / torch.bincount(d.bid, minlength=n).float()
        )
        d.oracle = -age
    head = op.fit(decisions, 2, 0, steps=200, lr=5e-2)
    assert op.agreement(decisions, head) > 0.99
    assert op.agreement(decisions, None) < 0.9  # the ngc scores are not that rule
    probe_cls = op.probe_policy("probe_for_test", head)
    with torch.no_grad(), registered(Newest, probe_cls):
        probe = decode(model, tok, ids, am, cfg, probe_cls(cfg))
        newest = decode(model, tok, ids, am, cfg, Newest(cfg))
    assert probe.records.acted.any()
    assert torch.equal(probe.sequences, newest.sequences)


def test_invalid_options_fail_before_any_work(capsys):
    import pytest

    for bad in (["--rate", "1.5"], ["--hidden", "0,x"], ["--hidden", "-1"], ["--fit_steps", "0"]):
        with pytest.raises(SystemExit):
            op.main(["--model", "no-such-model", *bad])
        assert bad[0] in capsys.readouterr().err
