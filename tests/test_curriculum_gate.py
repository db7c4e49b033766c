"""The reward-gated curriculum (`NGCConfig.curriculum_gate`, beyond the paper): the stage clock advances
while the reward keeps up and holds when it falls below the gate, Eq. 6 is untouched without a gate, the
config rejects bad values naming the field, and the gate's state survives a checkpoint."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import Qwen2ForCausalLM

from ngc_trl import NGCConfig, NGCTrainer
from ngc_trl.models import char_tokenizer, tiny_qwen2_config
from ngc_trl.ngc.curriculum import GatedCurriculum, curriculum_rate
from ngc_trl.ngc.trainer import GATE_FILE

RATES, STAGE, ALPHA = [0.0, 0.2, 0.4], 4, 0.5  # steps 0-2 at ε_0 = 0, then a ramp; ε_K = 0.4 from step 8


def run(gate: GatedCurriculum, rewards, start=0):
    """Feed one reward per optimizer step (a rollout batch per step); returns the rates in force."""
    rates = []
    for t, r in enumerate(rewards, start):
        rates.append(gate.rate(t))
        gate.update(t, r)
    return rates


def test_gate_advances_while_reward_is_above_and_holds_below():
    gate = GatedCurriculum(RATES, STAGE, ALPHA, gate=0.8)  # reference: EMA of the rewards at ε_0 = 0
    rates = run(gate, [1.0, 1.0, 1.0, 0.9, 0.9, 0.3, 0.3, 0.3, 0.85, 0.85])
    eq6 = [curriculum_rate(t, RATES, STAGE, ALPHA) for t in range(10)]
    assert rates[:6] == pytest.approx(eq6[:6])  # calibration (steps 0-2), then 0.9 >= 0.8 × 1.0: advance
    assert gate.reference_reward() == pytest.approx(1.0)
    # step 5's batch (clock 5) scores 0.3 < 0.8: the clock holds at 5 through steps 6 and 7 (also below)
    assert rates[5] == rates[6] == rates[7] == rates[8] == pytest.approx(eq6[5])
    assert gate.effective_step(9) == 6  # clock 5 held over steps 5-8, then one step of advance
    # step 8's batch passes again: the clock resumes from where it held
    assert rates[9] == pytest.approx(eq6[6]) and gate.effective_step(10) == 7
    assert gate.rate(10) == pytest.approx(eq6[7]) and (gate.passed, gate.held) == (7, 3)
    assert all(a <= b + 1e-12 for a, b in zip(rates, rates[1:]))  # never goes back


def test_fixed_reference_gates_every_level_and_nan_holds():
    gate = GatedCurriculum([0.1, 0.5], 2, 1.0, gate=0.5, reference=0.6)
    assert gate.update(0, 0.29) is False and gate.rate(5) == pytest.approx(0.1)  # 0.29 < 0.3: hold at ε_0
    assert gate.update(5, 0.3) is True  # 0.3 >= 0.5 × 0.6
    assert gate.effective_step(6) == 1 and gate.rate(6) == pytest.approx(
        curriculum_rate(1, [0.1, 0.5], 2, 1.0)
    )
    assert gate.update(6, float("nan")) is False and gate.effective_step(100) == 1
    with pytest.raises(ValueError, match="before the last update"):
        gate.update(3, 1.0)


def test_zero_reference_passes_everything_and_passing_gate_is_eq6():
    """A reward of 0 at ε_0 gives a reference of 0: the gate lets every batch through (documented), and a
    gate that never closes reproduces Eq. 6 step for step."""
    gate = GatedCurriculum(RATES, STAGE, ALPHA, gate=1.0)
    rates = run(gate, [0.0] * 3 + [0.0] * 20)
    assert rates == pytest.approx([curriculum_rate(t, RATES, STAGE, ALPHA) for t in range(23)])


def test_state_round_trips_through_json():
    a = GatedCurriculum(RATES, STAGE, ALPHA, gate=0.8, ema=0.5)
    run(a, [1.0, 0.5, 0.8, 0.9, 0.1, 0.2])
    b = GatedCurriculum(RATES, STAGE, ALPHA, gate=0.8, ema=0.5)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.state_dict() == a.state_dict() and b.reference_reward() == pytest.approx(a.reference_reward())
    more = [0.9, 0.95, 0.1, 0.9, 0.9]
    assert run(a, more, start=6) == run(b, more, start=6)


BASE = dict(
    per_device_train_batch_size=3,
    num_generations=3,
    max_completion_length=12,
    eviction_interval=8,
    block_size=2,
    score_window=3,
    learning_rate=1e-3,
    logging_steps=1,
    report_to="none",
    bf16=False,
    use_cpu=True,
    seed=0,
)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(curriculum_rates=[0.1, 0.5], curriculum_gate=0.0), "curriculum_gate"),
        (dict(curriculum_rates=[0.1, 0.5], curriculum_gate=1.5), "curriculum_gate"),
        (dict(curriculum_gate=0.8), "curriculum_gate"),  # no staircase to gate
        (dict(curriculum_rates=[0.1, 0.5], curriculum_gate_reference=0.5), "curriculum_gate_reference"),
        (
            dict(curriculum_rates=[0.1, 0.5], curriculum_gate=0.8, curriculum_gate_reference=0.0),
            "curriculum_gate_reference",
        ),
        (
            dict(curriculum_rates=[0.1, 0.5], curriculum_gate=0.8, curriculum_gate_reference=float("inf")),
            "curriculum_gate_reference",
        ),
        (dict(curriculum_gate_ema=1.0), "curriculum_gate_ema"),
        (dict(curriculum_gate_ema=-0.1), "curriculum_gate_ema"),
    ],
)
def test_config_rejects_bad_gate_values_naming_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=f"NGCConfig.{field}"):
        NGCConfig(output_dir=str(tmp_path), **BASE, **kwargs)


def test_gate_fields_parse_from_the_command_line():
    from pathlib import Path

    from ngc_trl.train import make_parser

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "countdown_ngc.yaml"
    argv = [
        "--config",
        str(recipe),
        "--report_to",
        "none",
        "--curriculum_gate",
        "0.8",
        "--curriculum_gate_reference",
        "0.6",
        "--curriculum_gate_ema",
        "0.5",
    ]
    _, args, _ = make_parser().parse_args_and_config(args=argv)
    assert (args.curriculum_gate, args.curriculum_gate_reference, args.curriculum_gate_ema) == (0.8, 0.6, 0.5)
    _, args, _ = make_parser().parse_args_and_config(args=argv[:4])
    assert args.curriculum_gate is None and args.curriculum_gate_reference is None  # default: Eq. 6


def zero_reward(completions, **kw):
    return [0.0 for _ in completions]


def make_trainer(tmp_path, reward=zero_reward, **overrides):
    tok = char_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_qwen2_config(len(tok), num_layers=2, hidden=32, initializer_range=0.2))
    ds = Dataset.from_dict({"prompt": ["nums 3 5 7 target 9\n", "nums 1 2 target 3\n", "abc 7\n"] * 4})
    args = NGCConfig(output_dir=str(tmp_path), **{**BASE, "save_strategy": "no", "max_steps": 1, **overrides})
    return NGCTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok)


def test_without_gate_the_trainer_rate_is_eq6_at_every_step(tmp_path):
    tr = make_trainer(tmp_path, curriculum_rates=[0.1, 0.3, 0.5], curriculum_stage_steps=5)
    assert tr.curriculum_gate is None
    for t in range(40):
        tr.state.global_step = t
        assert tr.rate_in_force() == curriculum_rate(t, [0.1, 0.3, 0.5], 5, 0.6)
        tr.curriculum_after_rollout(0.0)  # no gate: the reward changes nothing
        assert tr.rate_in_force(t) == curriculum_rate(t, [0.1, 0.3, 0.5], 5, 0.6)
    assert tr._metrics["train"]["ngc/curriculum_stage_step"] == [float(t) for t in range(40)]


def test_gated_training_holds_and_the_gate_survives_a_checkpoint(tmp_path):
    """Reward 0 < 0.5 × reference 1: the clock never moves, every rollout runs at ε_0 (Eq. 6 would be at
    0.5 from step 1), and a run resumed from checkpoint-2 continues the gate's count."""
    gated = dict(
        curriculum_rates=[0.1, 0.5],
        curriculum_stage_steps=1,
        curriculum_gate=0.5,
        curriculum_gate_reference=1.0,
        save_strategy="steps",
        save_steps=2,
    )
    tr = make_trainer(tmp_path, max_steps=2, **gated)
    tr.train()
    logs = [h for h in tr.state.log_history if "ngc/eviction_rate" in h]
    assert [h["ngc/eviction_rate"] for h in logs] == pytest.approx([0.1, 0.1])
    assert [h["ngc/curriculum_stage_step"] for h in logs] == [0.0, 0.0]
    assert [h["ngc/curriculum_gate_pass"] for h in logs] == [0.0, 0.0]
    assert tr.rate_in_force() == pytest.approx(0.1) and tr.curriculum_gate.held == 2
    saved = json.loads((tmp_path / "checkpoint-2" / GATE_FILE).read_text())
    assert saved["held"] == 2 and saved["stage_step"] == 0 and saved["advancing"] is False

    tr2 = make_trainer(tmp_path, max_steps=3, **gated)
    tr2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert tr2.state.global_step == 3
    assert tr2.curriculum_gate.held == 3 and tr2.curriculum_gate.effective_step(3) == 0  # restored, then held


def test_gate_hooks_keep_their_trl_signature():
    """The gate's hooks override TRL / transformers private methods: fail loudly if they change."""
    import inspect

    from trl import GRPOTrainer

    expected = {
        "_prepare_inputs": ["self", "generation_batch"],
        "_save_checkpoint": ["self", "model", "trial"],
        "_load_optimizer_and_scheduler": ["self", "checkpoint"],
    }
    for name, params in expected.items():
        assert list(inspect.signature(getattr(GRPOTrainer, name)).parameters) == params, name
