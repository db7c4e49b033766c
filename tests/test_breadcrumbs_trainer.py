"""BreadcrumbsTrainer: a GRPO teacher + a beacon-compressing student distilled from its rollouts. One real
step with two LoRA adapters, the KL plumbing, gradient checkpointing with adapter switches, full
fine-tuning with saving, config validation and the recipes / entry point."""

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import AutoTokenizer, Qwen2ForCausalLM

from ngc_trl import BreadcrumbsConfig, BreadcrumbsTrainer
from ngc_trl.breadcrumbs.distillation import token_kl
from ngc_trl.breadcrumbs.trainer import TEACHER_SUBFOLDER
from ngc_trl.engine.config import BeaconConfig
from ngc_trl.hub import load_ngc_settings
from ngc_trl.models import char_tokenizer, tiny_qwen2_config
from ngc_trl.train import main, make_parser, read_method

ROOT = Path(__file__).resolve().parents[1]
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
PROMPTS = ["nums 3 5 7 target 9\n", "nums 1 2 target 3\n", "abc 7\n"]


def seven_reward(completions, **kw):
    """A reward with non-zero group variance on a random model."""
    return [float(c.count("7") + c.count("a")) for c in completions]


def tiny_model(tok):
    torch.manual_seed(0)
    return Qwen2ForCausalLM(tiny_qwen2_config(len(tok), num_layers=2, hidden=64, initializer_range=0.2))


def make_trainer(tmp_path, peft=True, **overrides):
    tok = char_tokenizer()
    kw = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=3,
        num_generations=3,
        max_completion_length=24,
        compression_ratio=4,
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
    return BreadcrumbsTrainer(
        model=tiny_model(tok),
        reward_funcs=seven_reward,
        args=BreadcrumbsConfig(**kw),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
        processing_class=tok,
        peft_config=LORA if peft else None,
    )


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(module, before):
    return {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}


def logged(trainer):
    return {k: v for h in trainer.state.log_history for k, v in h.items()}


def one_batch(trainer):
    """A scored batch of 3 rollouts with fixed non-zero advantages, ready for `_compute_loss`."""
    torch.manual_seed(1)
    batch = trainer._generate_and_score_completions([{"prompt": "abc 7\n"}] * 3)
    batch["advantages"] = torch.tensor([1.0, -0.5, -0.5])
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() in a real run
    return batch


# ----------------------------------------------------------------------------- LoRA: two adapters
def test_one_step_with_two_lora_adapters(tmp_path):
    tr = make_trainer(tmp_path)
    assert tr.model.active_adapters == ["teacher"] and set(tr.model.peft_config) == {"teacher", "student"}
    before = snapshot(tr.model)
    tr.train()
    logs = logged(tr)
    for key in (
        "loss",
        "breadcrumbs/grpo_loss",
        "breadcrumbs/distill_loss",
        "breadcrumbs/compression_ratio",
        "breadcrumbs/kl_per_token",
        "breadcrumbs/student_grad_norm",
    ):
        assert key in logs, key
    assert logs["breadcrumbs/distill_loss"] > 0 and logs["breadcrumbs/compression_ratio"] == 4
    assert logs["breadcrumbs/beacons"] == (24 - 2) // 4  # no EOS on a random model: every row has 24 tokens
    moved = changed(tr.model, before)
    assert moved and all("lora_" in n for n in moved)  # the base is frozen
    assert any(".teacher." in n for n in moved) and any(".student." in n for n in moved)
    in_opt = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    lora = [p for n, p in tr.model.named_parameters() if "lora_" in n]
    assert all(id(p) in in_opt and p.requires_grad for p in lora)  # both adapters, still trainable
    assert tr.model.active_adapters == ["teacher"]


def test_zero_distill_coef_freezes_the_student(tmp_path):
    tr = make_trainer(tmp_path, distill_loss_coef=0.0)
    before = snapshot(tr.model)
    tr.train()
    moved = changed(tr.model, before)
    assert any(".teacher." in n for n in moved) and not any(".student." in n for n in moved)
    assert logged(tr)["breadcrumbs/distill_loss"] > 0  # still measured


def test_distill_loss_is_zero_when_student_equals_teacher_without_beacons(tmp_path):
    """c > completion length: no beacon, the beacon mask is the causal mask, and the student (a copy of the
    teacher adapter) reproduces the teacher's full-cache logits: the KL vanishes (up to fp32 rounding of two
    attention paths). With c = 4 it does not."""
    kls = {}
    for c in (64, 4):
        tr = make_trainer(tmp_path, compression_ratio=c)
        with torch.no_grad():  # non-trivial adapters, student == teacher
            params = dict(tr.model.named_parameters())
            for n, p in params.items():
                if ".teacher." in n and "lora_B" in n:
                    p.normal_(0, 0.3)
                    params[n.replace(".teacher.", ".student.")].copy_(p)
        batch = one_batch(tr)
        tr._compute_loss(tr.model, batch)
        m = tr._metrics["train"]
        kls[c] = (m["breadcrumbs/kl_per_token"][-1], m["breadcrumbs/beacons"][-1])
    assert kls[64][1] == 0 and abs(kls[64][0]) < 1e-6
    assert kls[4][1] > 0 and kls[4][0] > 1e-3


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputes_with_each_policys_adapter(tmp_path, reentrant):
    """Checkpointed layers are recomputed in backward(), after the switch back to the teacher adapter:
    without pinning the student's gradients would be computed with the teacher's weights."""
    grads = {}
    for gc in (False, True):
        kwargs = {"use_reentrant": reentrant} if gc else None
        tr = make_trainer(
            tmp_path,
            max_completion_length=16,
            gradient_checkpointing=gc,
            gradient_checkpointing_kwargs=kwargs,
        )
        with torch.no_grad():
            for n, p in tr.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
        batch = one_batch(tr)
        if gc:
            tr.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        tr._compute_loss(tr.model, batch).backward()
        grads[gc] = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    assert set(grads[True]) == set(grads[False]) and any(".student." in n for n in grads[True])
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, atol=1e-6, rtol=1e-5)


def test_lora_saves_the_student_on_top_and_resumes(tmp_path):
    tr = make_trainer(tmp_path, save_strategy="steps", save_steps=1)
    tr.train()
    out = tmp_path / "final"
    tr.save_model(str(out))
    assert (out / "adapter_model.safetensors").is_file() and (
        out / TEACHER_SUBFOLDER / "adapter_config.json"
    ).is_file()
    settings = load_ngc_settings(out)
    assert isinstance(settings, BeaconConfig)
    assert (settings.compression_ratio, settings.beacon_token_id) == (4, tr.beacon_token_id)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<|beacon|>") == tr.beacon_token_id
    base = tiny_model(char_tokenizer())
    base.resize_token_embeddings(len(tok))
    student = PeftModel.from_pretrained(base, out)  # the student adapter carries the grown embeddings
    trained = dict(tr.model.named_parameters())
    for n, p in student.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, trained[n.replace(".default.", ".student.")]), n
    assert torch.equal(student.get_input_embeddings().weight, tr.model.get_input_embeddings().weight)
    resumed = make_trainer(tmp_path)  # max_steps=1: loads checkpoint-1 and stops
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, trained[n]), n
    assert resumed.model.active_adapters == ["teacher"]


def test_lora_needs_beta_zero(tmp_path):
    with pytest.raises(ValueError, match="beta"):
        make_trainer(tmp_path, beta=0.04)


# ----------------------------------------------------------------------------- full fine-tuning
def test_full_finetuning_trains_and_saves_the_student(tmp_path):
    tr = make_trainer(tmp_path, peft=False, learning_rate=1e-2)
    teacher0, student0 = snapshot(tr.model), snapshot(tr.student_model)
    tr.train()
    assert changed(tr.model, teacher0) and changed(tr.student_model, student0)
    in_opt = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in tr.student_model.parameters())
    out = tmp_path / "final"
    tr.save_model(str(out))
    assert (out / "model.safetensors").is_file() and (out / TEACHER_SUBFOLDER / "model.safetensors").is_file()
    settings = load_ngc_settings(out)
    assert isinstance(settings, BeaconConfig) and settings.beacon_token_id == tr.beacon_token_id
    training = json.loads((out / "ngc_training.json").read_text())
    assert training["method"] == "breadcrumbs" and training["compression_ratios"] == [4]
    saved = Qwen2ForCausalLM.from_pretrained(out)
    for (n, a), b in zip(saved.state_dict().items(), tr.student_model.state_dict().values()):
        assert torch.equal(a, b), n


# ----------------------------------------------------------------------------- pieces
def test_token_kl_matches_the_definition_in_chunks():
    torch.manual_seed(0)
    b, t, h, v = 2, 5, 8, 11
    head = torch.nn.Linear(h, v, bias=False)
    hidden = torch.randn(b, t, h)
    s = torch.randn(b, t, v, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        lt = torch.log_softmax(head(hidden), -1)
    ls = torch.log_softmax(s, -1)
    fwd = (lt.exp() * (lt - ls)).sum(-1) * mask
    rev = (ls.exp() * (ls - lt)).sum(-1) * mask
    (g_ref,) = torch.autograd.grad(fwd.sum(), s)
    for chunk in (1, 3, 100):
        got = token_kl(s, hidden, head, mask, "forward", chunk)
        torch.testing.assert_close(got, fwd)
        (g,) = torch.autograd.grad(got.sum(), s)
        torch.testing.assert_close(g, g_ref)
        torch.testing.assert_close(token_kl(s, hidden, head, mask, "reverse", chunk), rev)
    same = token_kl(head(hidden).detach(), hidden, head, torch.ones(b, t))
    assert torch.equal(same, torch.zeros(b, t))  # identical distributions: exactly zero
    assert head.weight.grad is None  # the teacher side carries no gradient


def test_token_kl_from_student_hidden_states_equals_the_logits_path():
    """The student side projected inside the chunks: same KL and same gradients (to the hidden states
    and the head) as from full logits."""
    torch.manual_seed(0)
    b, t, h, v = 2, 5, 8, 11
    t_head, s_head = torch.nn.Linear(h, v, bias=False), torch.nn.Linear(h, v, bias=False)
    teacher = torch.randn(b, t, h)
    hs = torch.randn(b, t, h, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    for direction in ("forward", "reverse"):
        ref = token_kl(s_head(hs), teacher, t_head, mask, direction, 100)
        g_ref = torch.autograd.grad(ref.sum(), [hs, s_head.weight])
        for chunk in (1, 3, 100):
            got = token_kl(hs, teacher, t_head, mask, direction, chunk, student_head=s_head)
            torch.testing.assert_close(got, ref)
            for a, r in zip(torch.autograd.grad(got.sum(), [hs, s_head.weight]), g_ref):
                torch.testing.assert_close(a, r)


def test_compression_ratio_drawn_per_rollout(tmp_path):
    tr = make_trainer(tmp_path, compression_ratio=[2, 8])
    assert tr.args.compression_ratio == [2, 8] and tr.eviction_config().compression_ratio == 2
    c = tr._draw_ratios(64, "cpu")
    assert c.shape == (64,) and set(c.tolist()) == {2, 8}
    assert torch.equal(c, tr._draw_ratios(64, "cpu"))  # reproducible within a step
    batch = one_batch(tr)
    tr._compute_loss(tr.model, batch)
    assert 2 <= tr._metrics["train"]["breadcrumbs/compression_ratio"][-1] <= 8


@pytest.mark.parametrize("peft", [True, False])
def test_student_learning_rate_gets_its_own_groups(tmp_path, peft):
    tr = make_trainer(tmp_path, peft=peft, student_learning_rate=0.5, lr_scheduler_type="constant")
    tr.train()
    student = {id(p) for p in tr._student_params}
    groups = tr.optimizer.param_groups
    assert {id(p) for g in groups if g["lr"] == 0.5 for p in g["params"]} == student
    assert all(g["lr"] == 5e-2 for g in groups if not any(id(p) in student for p in g["params"]))
    assert sum(len(g["params"]) for g in groups) == len(
        {id(p) for g in groups for p in g["params"]}
    )  # no duplicates


@pytest.mark.parametrize(
    "field,value",
    [
        ("compression_ratio", 1),
        ("compression_ratio", [4, 1]),
        ("compression_ratio", []),
        ("distill_loss_coef", -1.0),
        ("distill_loss_coef", float("nan")),
        ("kl_direction", "sideways"),
        ("beacon_init", "zeros"),
        ("beacon_token", ""),
        ("distill_chunk_size", 0),
        ("teacher_adapter_name", "a.b"),
        ("student_adapter_name", "teacher"),
        ("student_learning_rate", 0.0),
        ("student_learning_rate", float("inf")),
        ("student_model_name_or_path", " "),
    ],
)
def test_invalid_config_names_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"BreadcrumbsConfig.{field}"):
        BreadcrumbsConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **{field: value})


def test_student_init_none_from_the_command_line(tmp_path):
    a = BreadcrumbsConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, student_model_name_or_path="None"
    )
    assert a.student_model_name_or_path is None


def test_defaults_are_dr_grpo(tmp_path):
    a = BreadcrumbsConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    assert (a.loss_type, a.scale_rewards, a.compression_ratio, a.distill_loss_coef, a.kl_direction) == (
        "dr_grpo",
        "none",
        8,
        1.0,
        "forward",
    )


# ----------------------------------------------------------------------------- recipes and entry point
CPU = ["--bf16", "false", "--use_cpu", "true", "--report_to", "none"]


def parse(path, *extra):
    argv = ["--config", str(path), *CPU, *extra]
    return make_parser(read_method(argv)).parse_args_and_config(args=argv)


def test_breadcrumbs_recipe_values():
    s, a, m = parse(ROOT / "recipes" / "breadcrumbs_countdown.yaml")
    assert isinstance(a, BreadcrumbsConfig) and s.method == "breadcrumbs" and s.task == "countdown"
    assert m.model_name_or_path == "Qwen/Qwen2.5-1.5B-Instruct" and m.use_peft
    assert (a.compression_ratio, a.distill_loss_coef, a.kl_direction, a.beacon_init) == (
        8,
        1.0,
        "forward",
        "mean",
    )
    assert (a.loss_type, a.scale_rewards, a.beta, a.num_iterations) == ("dr_grpo", "none", 0.0, 1)
    assert a.num_generations == 16 and a.max_completion_length == 1024
    _, a, _ = parse(ROOT / "recipes" / "breadcrumbs_countdown.yaml", "--compression_ratio", "2", "4")
    assert a.compression_ratio == [2, 4]
    _, a, _ = parse(ROOT / "recipes" / "breadcrumbs_countdown.yaml", "--compression_ratio", "16")
    assert a.compression_ratio == 16


def _yaml_with(tmp_path, extra: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(
        (ROOT / "recipes" / "tiny" / "breadcrumbs_countdown.yaml").read_text() + "\n" + extra + "\n"
    )
    return str(path)


@pytest.mark.parametrize(
    "extra,match",
    [
        ("compresion_ratio: 4", "compresion_ratio"),
        ("compression_ratio: 1", "compression_ratio"),
        ("kl_direction: up", "kl_direction"),
        ("method: ngcx", "method"),
        ("eviction_rate: 0.5", "eviction_rate"),
    ],
)  # an NGC-only key
def test_bad_breadcrumbs_recipe_fails_before_model_load(tmp_path, no_model_load, extra, match):
    with pytest.raises(ValueError, match=match):
        main(["--config", _yaml_with(tmp_path, extra)])


def _warm_start(base, folder):
    """What `ngc-testbed --beacon_ratios` saves, untrained: the base with the beacon added."""
    from ngc_trl.breadcrumbs.beacons import add_beacon_token
    from ngc_trl.models import load_tokenizer

    model, tok = Qwen2ForCausalLM.from_pretrained(base), load_tokenizer(base)
    add_beacon_token(tok, model)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_tiny_breadcrumbs_recipe_runs_one_step(tiny_base, tmp_path):
    out = tmp_path / "run"
    warm = _warm_start(tiny_base, tmp_path / "warm")
    result = main(
        [
            "--config",
            str(ROOT / "recipes" / "tiny" / "breadcrumbs_countdown.yaml"),
            "--model_name_or_path",
            str(tiny_base),
            "--student_model_name_or_path",
            str(warm),
            "--output_dir",
            str(out),
            "--max_steps",
            "1",
            "--max_completion_length",
            "32",
            "--per_device_train_batch_size",
            "4",
            "--num_generations",
            "4",
            "--num_train_problems",
            "4",
            "--save_strategy",
            "no",
            "--log_level",
            "warning",
        ]
    )
    assert result["output_dir"] == str(out)
    assert (out / "model.safetensors").is_file() and (out / TEACHER_SUBFOLDER / "model.safetensors").is_file()
    settings = load_ngc_settings(out)
    assert isinstance(settings, BeaconConfig) and settings.compression_ratio == 8
    training = json.loads((out / "ngc_training.json").read_text())
    assert training["method"] == "breadcrumbs" and training["base_model"] == str(tiny_base)
    assert training["student_init"] == str(warm)
    card = (out / "README.md").read_text()
    assert "Breadcrumbs" in card and "WITHOUT beacons" in card and "TRL" in card
