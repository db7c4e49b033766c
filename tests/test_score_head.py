"""The `score_head` policy (not in the paper): a learned head over present-state key features.

It is built from the model it is attached to; a head that reads one feature decodes exactly as that rule;
replay reproduces its rollout eviction log-probs and L_mem reaches the head and the keys; it saves and loads
beside the weights; NGCTrainer trains it in its own optimizer group and saves it; the warm-start CLI writes
a model folder ngc-eval loads with its head.
"""

import dataclasses
import json
import os

import pytest
import torch
from conftest import left_padded, tiny_qwen2
from datasets import Dataset
from safetensors import safe_open
from transformers import Qwen2ForCausalLM

from ngc_trl import EvictionConfig, NGCConfig, NGCTrainer, generate_with_eviction
from ngc_trl.engine.policy import EvictionPolicy
from ngc_trl.engine.replay import ReplayContext, replay_forward
from ngc_trl.models import char_tokenizer, tiny_qwen2_config
from ngc_trl.policies import POLICIES, get_policy
from ngc_trl.policies.score_head import (
    ScoreHead,
    attach_score_head,
    detach_score_head,
    feature_names,
    find_score_head,
    load_score_head,
    num_features,
    save_score_head,
)

CFG = EvictionConfig(policy="score_head", eviction_interval=8, block_size=2, score_window=3)
WINDOW = 3


def head_for(model, seed=0, scale=1.0) -> ScoreHead:
    c = model.config
    head = ScoreHead(
        c.num_hidden_layers, num_features(c.num_attention_heads, WINDOW, c.num_key_value_heads), WINDOW
    )
    with torch.no_grad():
        head.w.copy_(scale * torch.randn(head.w.shape, generator=torch.Generator().manual_seed(seed)))
    return attach_score_head(model, head)


class Newest(EvictionPolicy):
    """Keep the newest blocks (score = position)."""

    name = "newest_for_score_head_test"

    def token_scores(self, view):
        return view.pos.float()


def decode(model, cfg, ids, mask, policy=None, **kw):
    return generate_with_eviction(
        model, ids, mask, cfg, max_new_tokens=36, do_sample=False, eos_token_id=[], policy=policy, **kw
    )


def test_needs_an_attached_head_and_logits_as_they_are():
    model = tiny_qwen2(num_layers=2)
    with pytest.raises(ValueError, match="score_head"):
        get_policy(CFG)  # no model
    with pytest.raises(ValueError, match="score_head"):
        get_policy(CFG, model)  # a model without a head
    head_for(model)
    assert get_policy(CFG, model).head is find_score_head(model)
    with pytest.raises(ValueError, match="logit_transform"):
        get_policy(EvictionConfig(policy="score_head", logit_transform="relative"), model)
    assert POLICIES["score_head"].learned and POLICIES["score_head"].needs_model


def test_a_head_reading_one_feature_decodes_as_that_rule():
    """w = −1 on age / p: the head keeps the newest blocks, so greedy decoding equals the Newest rule, through
    ``get_policy(cfg, model)`` inside generate_with_eviction (no policy passed)."""
    model = tiny_qwen2(num_layers=2)
    c = model.config
    names = feature_names(c.num_attention_heads, WINDOW, c.num_key_value_heads)
    head = head_for(model)
    with torch.no_grad():
        head.w.zero_()
        head.w[:, names.index("age_frac")] = -1.0
    ids, mask = left_padded([5, 11, 8])
    POLICIES[Newest.name] = Newest
    try:
        with torch.no_grad():
            got = decode(model, CFG, ids, mask)
            want = decode(model, dataclasses.replace(CFG, policy=Newest.name), ids, mask)
    finally:
        POLICIES.pop(Newest.name)
    assert got.records.acted.any()
    assert torch.equal(got.sequences, want.sequences)
    assert torch.equal(got.records.kept, want.records.kept)


def test_replay_reproduces_score_head_logprobs_and_lmem_reaches_head_and_keys():
    model = tiny_qwen2(num_layers=2, seed=3)
    head = head_for(model, seed=1, scale=2.0)
    ids, mask = left_padded([5, 11, 8], seed=1)
    with torch.no_grad():
        out = generate_with_eviction(
            model,
            ids,
            mask,
            CFG,
            max_new_tokens=36,
            do_sample=True,
            generator=torch.Generator().manual_seed(0),
            eos_token_id=[],
        )
    full = torch.cat([mask.bool(), out.completion_mask], 1).long()
    acted = out.records.acted
    assert acted.sum() > 3
    model.train()
    ctx = ReplayContext(full, out.records, CFG, prompt_len=mask.sum(1), model=model)
    logp = replay_forward(model, out.sequences, full, ctx)
    m = out.completion_mask
    assert (logp[:, ids.shape[1] - 1 :][m] - out.token_logprobs[m]).abs().max() < 1e-5
    ev = ctx.eviction_logp(model.config.num_hidden_layers)
    # fp32: the head's logits are O(10) (unit-variance weights on 22 raw features), the cache is compact in
    # the rollout and full-length here, so sums differ in the last bits; a wrong mask or feature is O(0.1)
    assert (ev[acted] - out.records.logp[acted]).abs().max() < 5e-5
    assert (ev[~acted] == 0).all()
    (-ev.sum()).backward()
    assert head.w.grad is not None and head.w.grad.abs().sum() > 0
    assert (
        model.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0
    )  # through the attention features
    model.eval()


def test_save_and_load_round_trip(tmp_path):
    model = tiny_qwen2(num_layers=2)
    head = head_for(model, seed=4)
    save_score_head(head, str(tmp_path))
    back = load_score_head(str(tmp_path))
    assert back.config() == head.config()
    for k, v in head.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    assert load_score_head(str(tmp_path / "nothing")) is None
    (tmp_path / "score_head.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed score head"):
        load_score_head(str(tmp_path))
    assert detach_score_head(model) is head and find_score_head(model) is None


def make_trainer(tmp_path, **overrides):
    tok = char_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_qwen2_config(len(tok), num_layers=2, hidden=64, initializer_range=0.2))
    head_for(model, seed=2)
    ds = Dataset.from_dict({"prompt": ["nums 3 5 7 target 9\n", "nums 1 2 target 3\n", "abc 7\n"] * 4})
    kw = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=3,
        num_generations=3,
        max_completion_length=24,
        eviction_interval=8,
        block_size=2,
        score_window=WINDOW,
        eviction_policy="score_head",
        learning_rate=1e-3,
        score_head_learning_rate=5e-2,
        max_steps=1,
        logging_steps=1,
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        seed=0,
    )
    kw.update(overrides)

    def reward(completions, **kw):
        return [float(c.count("7") + c.count("a")) for c in completions]

    return NGCTrainer(
        model=model, reward_funcs=reward, args=NGCConfig(**kw), train_dataset=ds, processing_class=tok
    )


def test_trainer_trains_the_head_in_its_own_group_and_saves_it_beside_the_weights(tmp_path):
    tr = make_trainer(tmp_path, max_steps=2)
    head = find_score_head(tr.model)
    before = head.w.detach().clone()
    tr.train()
    groups = [g for g in tr.optimizer.param_groups if any(p is head.w for p in g["params"])]
    assert (
        len(groups) == 1 and groups[0]["initial_lr"] == pytest.approx(5e-2) and len(groups[0]["params"]) == 1
    )
    others = [p for g in tr.optimizer.param_groups if g is not groups[0] for p in g["params"]]
    assert not any(p is head.w for p in others)
    assert not torch.equal(head.w.detach(), before)  # L_mem moved the head
    tr.save_model(str(tmp_path / "final"))
    saved = load_score_head(str(tmp_path / "final"))
    assert torch.equal(saved.w, head.w.detach().cpu())
    with safe_open(str(tmp_path / "final" / "model.safetensors"), "pt") as fh:
        assert not any("ngc_score_head" in k for k in fh.keys())  # the weights stay the base architecture's
    assert find_score_head(tr.model) is head  # attached again after saving


def test_config_checks_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="score_head_learning_rate"):
        NGCConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", score_head_learning_rate=1e-2)
    with pytest.raises(ValueError, match="score_head_learning_rate"):
        NGCConfig(
            output_dir=str(tmp_path),
            use_cpu=True,
            report_to="none",
            eviction_policy="score_head",
            score_head_learning_rate=0.0,
        )
    tok = char_tokenizer()
    model = Qwen2ForCausalLM(tiny_qwen2_config(len(tok), num_layers=2, hidden=64))
    with pytest.raises(ValueError, match="no scoring head"):
        NGCTrainer(
            model=model,
            reward_funcs=lambda completions, **kw: [0.0] * len(completions),
            args=NGCConfig(
                output_dir=str(tmp_path),
                use_cpu=True,
                report_to="none",
                eviction_policy="score_head",
                per_device_train_batch_size=2,
                num_generations=2,
            ),
            train_dataset=Dataset.from_dict({"prompt": ["abc 7\n"] * 2}),
            processing_class=tok,
        )


def test_eval_loading_attaches_the_saved_head(tmp_path):
    from ngc_trl.evaluation.setup import load_model

    tok = char_tokenizer()
    model = Qwen2ForCausalLM(tiny_qwen2_config(len(tok), num_layers=2, hidden=64))
    head = head_for(model, seed=5)
    detach_score_head(model)
    model.save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    save_score_head(head, str(tmp_path))
    net, _ = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert torch.equal(find_score_head(net).w, head.w)
    assert json.loads((tmp_path / "score_head.json").read_text())["window"] == WINDOW
    assert os.path.isfile(tmp_path / "score_head.safetensors")


def test_warm_start_cli_writes_a_model_folder_with_its_head(tmp_path):
    from ngc_trl import warm_start
    from ngc_trl.evaluation.setup import load_model
    from ngc_trl.hub import load_ngc_settings

    tok = char_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_qwen2_config(len(tok), num_layers=2, hidden=64, initializer_range=0.2))
    base, out = tmp_path / "base", tmp_path / "out"
    model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    args = ["--model", str(base), "--output_dir", str(out), "--num_problems", "4", "--max_new_tokens", "24"]
    args += ["--eviction_interval", "16", "--block_size", "4", "--score_window", "3", "--fit_steps", "5"]
    record = warm_start.main([*args, "--exclude_file", ""])
    assert record["decisions"] > 0 and 0 <= record["agreement_with_oracle"]["score_head"] <= 1
    settings = load_ngc_settings(str(out))
    assert settings.policy == "score_head" and settings.block_size == 4 and settings.logit_transform == "none"
    net, _ = load_model(str(out), device="cpu", dtype="float32")
    head = find_score_head(net)
    assert head is not None and head.window == 3 and head.w.abs().sum() > 0  # fitted, not the zero init
    for k, v in model.state_dict().items():  # the language model is copied unchanged
        assert torch.equal(net.state_dict()[k], v)


@pytest.mark.parametrize(
    "bad",
    [
        ["--eviction_rate", "0"],
        ["--num_problems", "0"],
        ["--hidden", "-1"],
        ["--lr", "0"],
        ["--fit_steps", "0"],
    ],
)
def test_warm_start_cli_rejects_invalid_options_naming_them(tmp_path, bad, capsys):
    from ngc_trl import warm_start

    with pytest.raises(SystemExit):
        warm_start.main(
            ["--model", str(tmp_path), "--output_dir", str(tmp_path / "o"), "--exclude_file", "", *bad]
        )
    assert bad[0] in capsys.readouterr().err
