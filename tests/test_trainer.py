"""NGCTrainer: one real training step with LoRA, old/ref eviction log-probs, curriculum, interoception,
ablation switches and config validation."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import Qwen2ForCausalLM

from ngc_trl import NGCConfig, NGCTrainer
from ngc_trl.models import char_tokenizer, tiny_qwen2_config
from ngc_trl.ngc.curriculum import curriculum_rate
from ngc_trl.ngc.interoception import add_rate_tag, rate_tag

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def seven_reward(completions, **kw):
    """A reward with non-zero group variance on a random model."""
    return [float(c.count("7") + c.count("a")) for c in completions]


def make_trainer(tmp_path, peft=True, **overrides):
    tok = char_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_qwen2_config(len(tok), num_layers=2, hidden=64, initializer_range=0.2))
    ds = Dataset.from_dict({"prompt": ["nums 3 5 7 target 9\n", "nums 1 2 target 3\n", "abc 7\n"] * 4})
    kw = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=3,
        num_generations=3,
        max_completion_length=24,
        eviction_interval=8,
        block_size=2,
        score_window=3,
        learning_rate=5e-2,
        max_steps=1,
        logging_steps=1,
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        seed=0,
    )
    kw.update(overrides)
    args = NGCConfig(**kw)
    return NGCTrainer(
        model=model,
        reward_funcs=seven_reward,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=LORA if peft else None,
    )


def test_one_step_with_lora_updates_adapter_only_and_logs_ngc_metrics(tmp_path):
    tr = make_trainer(tmp_path, max_steps=2)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    logs = {k for h in tr.state.log_history for k in h}
    for key in (
        "loss",
        "ngc/evict_loss",
        "ngc/evict_entropy",
        "ngc/peak_compression",
        "ngc/peak_entries",
        "ngc/mean_entries",
        "ngc/prompt_kept",
        "ngc/eviction_rate",
    ):
        assert key in logs, key
    changed = {n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_" in n and "q_proj" in n for n in changed)


def test_old_eviction_logps_come_from_the_policy_not_the_reference(tmp_path):
    """num_iterations=2 and beta>0: TRL runs an old-logp pass then a reference pass (adapter off). The old
    eviction log-probs must equal the rollout's (same weights), not the reference's."""
    tr = make_trainer(tmp_path, num_iterations=2, beta=0.04)
    # perturb the adapter so that policy and reference differ
    with torch.no_grad():
        for n, p in tr.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    seen = {}
    orig = NGCTrainer._compute_loss

    def spy(self, model, inputs):
        seen.update(inputs)
        return orig(self, model, inputs)

    NGCTrainer._compute_loss = spy
    try:
        tr.train()
    finally:
        NGCTrainer._compute_loss = orig
    acted = seen["ngc_acted"]
    assert acted.any()
    assert (seen["ngc_old_logp"][acted] - seen["ngc_logp"][acted]).abs().max() < 1e-4


def test_replay_masks_switch_changes_token_logps(tmp_path):
    tr = make_trainer(tmp_path)
    batch = tr._generate_and_score_completions([{"prompt": "nums 3 5 7 target 9\n"}] * 3)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    from ngc_trl.engine.records import EvictionRecords

    k = batch["completion_ids"].shape[1]
    scope = tr._open_scope(
        "loss", records=EvictionRecords.from_dict(batch), prompt_len=batch["ngc_prompt_len"]
    )
    with scope, torch.no_grad():
        masked, _, _ = tr._get_per_token_logps_and_entropies(tr.model, ids, am, k)
        tr.args.replay_masks = False
        full, _, _ = tr._get_per_token_logps_and_entropies(tr.model, ids, am, k)
    m = batch["completion_mask"].bool()
    assert (masked[m] - full[m]).abs().max() > 1e-3


def test_eviction_loss_coefficient_controls_the_gradient(tmp_path):
    grads = {}
    for coef in (0.0, 1.0):
        tr = make_trainer(tmp_path, eviction_loss_coef=coef, peft=False, max_steps=1)
        torch.manual_seed(1)
        batch = tr._generate_and_score_completions([{"prompt": "abc 7\n"}] * 3)
        batch["advantages"] = torch.tensor([1.0, -0.5, -0.5])  # non-zero group advantages
        tr.model.train()
        tr.current_gradient_accumulation_steps = 1  # set by Trainer.train() in a real run
        loss = tr._compute_loss(tr.model, batch)
        loss.backward()
        grads[coef] = tr.model.model.layers[0].self_attn.k_proj.weight.grad.clone()
    assert not torch.allclose(grads[0.0], grads[1.0])


def test_token_loss_coefficient_zero_trains_the_eviction_policy_alone(tmp_path):
    """token_loss_coef=0: the gradient is L_mem's alone: nothing reaches the final norm (it only serves the
    token loss), the keys still get one; with 1 the final norm gets the token loss's gradient."""
    grads = {}
    for coef in (0.0, 1.0):
        tr = make_trainer(tmp_path, token_loss_coef=coef, peft=False, max_steps=1)
        torch.manual_seed(1)
        batch = tr._generate_and_score_completions([{"prompt": "abc 7\n"}] * 3)
        batch["advantages"] = torch.tensor([1.0, -0.5, -0.5])
        tr.model.train()
        tr.current_gradient_accumulation_steps = 1
        tr._compute_loss(tr.model, batch).backward()
        head = tr.model.model.norm.weight.grad
        k = tr.model.model.layers[0].self_attn.k_proj.weight.grad
        grads[coef] = (0.0 if head is None else head.abs().max().item(), k.abs().max().item())
    assert grads[0.0][0] == 0.0 and grads[0.0][1] > 0
    assert grads[1.0][0] > 0


def test_greedy_rollout_tokens_sample_only_the_evictions(tmp_path):
    """greedy_rollout_tokens: with nothing evicted every rollout of a prompt is the greedy decode (one
    completion, whatever the seed); with eviction the group's rollouts differ only through the Gumbel-top-k
    draws, and they still carry eviction log-probs for L_mem. Needs token_loss_coef=0."""
    with pytest.raises(ValueError, match="greedy_rollout_tokens"):
        NGCConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, greedy_rollout_tokens=True)
    prompts = [{"prompt": "nums 3 5 7 target 9\n"}] * 3

    def completions(**kw):
        tr = make_trainer(tmp_path, peft=False, greedy_rollout_tokens=True, token_loss_coef=0.0, **kw)
        torch.manual_seed(3)
        batch = tr._generate_and_score_completions(prompts)
        return (
            tr,
            batch,
            [tuple(r[m.bool()].tolist()) for r, m in zip(batch["completion_ids"], batch["completion_mask"])],
        )

    _, _, no_evict = completions(eviction_interval=10_000)
    assert len(set(no_evict)) == 1  # greedy: no token randomness
    tr, batch, evicting = completions(eviction_interval=32, eviction_rate=0.75, max_completion_length=64)
    assert len(set(evicting)) > 1  # the evictions alone make the group differ
    first = int(batch["ngc_positions"][0, 0]) - batch["prompt_ids"].shape[1]
    assert first > 0 and len({c[:first] for c in evicting}) == 1  # identical up to the first round
    assert batch["ngc_acted"].any()
    batch["advantages"] = torch.tensor([1.0, -0.5, -0.5])
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    tr._compute_loss(tr.model, batch).backward()
    assert tr.model.model.layers[0].self_attn.k_proj.weight.grad.abs().max() > 0


def test_one_sampled_round_trains_on_that_round_only(tmp_path):
    """one_sampled_round: a prompt group shares one sampled round (its rollouts are identical before it);
    L_mem sees that round's actions only: with the round moved past every rollout's last round there is no
    eviction action left, so no gradient reaches the keys (token loss off)."""
    tr = make_trainer(
        tmp_path,
        peft=False,
        greedy_rollout_tokens=True,
        token_loss_coef=0.0,
        one_sampled_round=2,
        eviction_interval=16,
        eviction_rate=0.75,
        max_completion_length=64,
    )
    torch.manual_seed(5)
    batch = tr._generate_and_score_completions(
        [{"prompt": "nums 3 5 7 target 9\n"}] * 3 + [{"prompt": "abc 7\n"}] * 3
    )
    sr = batch["ngc_sampled_round"]
    assert sr.shape == (6,) and len(set(sr[:3].tolist())) == 1 and len(set(sr[3:].tolist())) == 1
    assert set(sr.tolist()) <= {0, 1}
    batch["advantages"] = torch.tensor([1.0, -0.5, -0.5, 0.5, 0.5, -1.0])
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    norms = []
    for rounds in (sr, torch.full_like(sr, 99)):
        tr.model.zero_grad()
        loss = tr._compute_loss(tr.model, {**batch, "ngc_sampled_round": rounds})
        if loss.requires_grad:
            loss.backward()
        g = tr.model.model.layers[0].self_attn.k_proj.weight.grad
        norms.append(0.0 if g is None else g.abs().max().item())
    assert norms[0] > 0 and norms[1] == 0.0
    with pytest.raises(ValueError, match="one_sampled_round"):
        NGCConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, one_sampled_round=-1)


def test_curriculum_eq6_values():
    rates, d = [0.1, 0.2, 0.3, 0.4, 0.5], 20
    assert curriculum_rate(0, rates, d) == pytest.approx(0.1)
    assert curriculum_rate(7, rates, d) == pytest.approx(0.1)  # s = 0.35 < 1 - alpha: hold
    assert curriculum_rate(14, rates, d) == pytest.approx(0.1 + (0.7 - 0.4) / 0.6 * 0.1)  # ramp
    assert curriculum_rate(20, rates, d) == pytest.approx(0.2)
    assert curriculum_rate(80, rates, d) == pytest.approx(0.5) and curriculum_rate(10_000, rates, d) == 0.5
    values = [curriculum_rate(t, rates, d) for t in range(120)]
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))  # monotone staircase


def test_trainer_rate_follows_global_step(tmp_path):
    tr = make_trainer(tmp_path, curriculum_rates=[0.1, 0.5], curriculum_stage_steps=10)
    tr.state.global_step = 0
    assert tr.rate_in_force() == pytest.approx(0.1)
    tr.state.global_step = 10  # a resumed run at step 10 continues at the same rate
    assert tr.rate_in_force() == pytest.approx(0.5)


def test_interoception_tags_prompts_per_group(tmp_path):
    assert rate_tag(0.5) == "<eviction_rate>50%</eviction_rate>"
    assert add_rate_tag("x\n", 0.25).endswith("x\n<eviction_rate>25%</eviction_rate>")
    chat = add_rate_tag([{"role": "user", "content": "q"}], 0.75)
    assert chat[0]["content"] == "q\n<eviction_rate>75%</eviction_rate>"
    tr = make_trainer(tmp_path, interoception_rates=[0.25, 0.75])
    batch = tr._generate_and_score_completions(
        [{"prompt": "abc 7\n"}] * 3 + [{"prompt": "nums 1 2 target 3\n"}] * 3
    )
    texts = tr.processing_class.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
    tags = [t[t.index("<eviction_rate>") :] for t in texts]
    assert len(set(tags[:3])) == 1 and len(set(tags[3:])) == 1  # one rate per group
    assert set(batch["ngc_eviction_rate"].tolist()) <= {0.25, 0.75}


@pytest.mark.parametrize(
    "field,value",
    [
        ("eviction_interval", 0),
        ("eviction_rate", 1.5),
        ("eviction_loss_coef", -1.0),
        ("token_loss_coef", -1.0),
        ("replay_backend", "x"),
        ("curriculum_rates", [0.5, 0.2]),
        ("curriculum_alpha", 0.0),
        ("interoception_rates", [1.2]),
        ("eviction_policy", "snapkv"),
    ],
)
def test_invalid_config_names_the_field(tmp_path, field, value):
    with pytest.raises(
        ValueError,
        match=field.replace("eviction_", "") if field.startswith("eviction_i") else field.split("_")[-1],
    ):
        NGCConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **{field: value})


def test_defaults_are_dr_grpo_and_the_paper_schedule(tmp_path):
    a = NGCConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    assert (a.loss_type, a.scale_rewards) == ("dr_grpo", "none")
    assert (a.eviction_interval, a.eviction_rate, a.block_size, a.score_window) == (256, 0.5, 32, 5)
    assert not a.protect_prompt and a.num_sink == 0 and a.eviction_logit_scale == 1.0


def test_length_sorted_replay_chunks_are_exact(tmp_path):
    """The replay forward in length-sorted, trimmed chunks gives the same token and eviction log-probs (and
    the same gradient) as one forward over the padded micro-batch."""
    from ngc_trl.engine.records import EvictionRecords
    from ngc_trl.ngc.trainer import replay_chunks

    am = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]])
    chunks = list(replay_chunks(am, max_rows=2, max_tokens=0))
    assert [c[0].tolist() for c in chunks] == [[2, 0], [1]] and [c[1] for c in chunks] == [4, 6]
    assert [c[0].tolist() for c in replay_chunks(am, 3, max_tokens=8)] == [[2, 0], [1]]

    tr = make_trainer(tmp_path, peft=False, max_completion_length=40)
    batch = tr._generate_and_score_completions(
        [{"prompt": "nums 3 5 7 target 9\n"}, {"prompt": "abc 7\n"}] * 3
    )
    lens = batch["completion_mask"].sum(1)
    assert lens.min() < lens.max()  # ragged, so trimming matters
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    records = EvictionRecords.from_dict(batch)
    assert records.acted.any()
    outs = []
    for budget in (0, 64):
        tr.args.replay_chunk_tokens = budget
        tr.model.zero_grad()
        with tr._open_scope("loss", records=records, prompt_len=batch["ngc_prompt_len"]) as scope:
            lp, ent, _ = tr._get_per_token_logps_and_entropies(
                tr.model, ids, am, batch["completion_ids"].shape[1], compute_entropy=True
            )
        ev = scope.evict_logp
        ((lp * batch["completion_mask"]).sum() + ev.sum()).backward()
        grad = tr.model.model.layers[0].self_attn.q_proj.weight.grad.clone()
        outs.append((lp * batch["completion_mask"], ent * batch["completion_mask"], ev, grad))
    # fp32 summation order differs between chunk shapes: compare to the tensor's scale (the gradient's entries
    # reach ~17 here, where 1e-5 absolute is below float noise; a wrong mask moves values by >> 1e-3)
    for name, a, b in zip(("token logp", "entropy", "eviction logp", "grad"), *outs):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item()), (name, (a - b).abs().max())
