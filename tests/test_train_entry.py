"""The `ngc-train` entry point: recipes parse with the paper's values, bad configs fail before any model
is loaded, and one tiny training step runs end to end on CPU."""

import glob
import json
from pathlib import Path

import pytest

from ngc_trl.ngc.config import NGCConfig
from ngc_trl.train import main, make_parser, read_method

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(
    glob.glob(str(ROOT / "recipes" / "*.yaml")) + glob.glob(str(ROOT / "recipes" / "tiny" / "*.yaml"))
)
CPU = ["--bf16", "false", "--use_cpu", "true", "--report_to", "none"]  # the paper recipes ask for bf16 GPUs


def parse(path, *extra):
    argv = ["--config", str(path), *CPU, *extra]
    return make_parser(read_method(argv)).parse_args_and_config(args=argv)


def test_recipes_found():
    names = {Path(p).relative_to(ROOT / "recipes").as_posix() for p in RECIPES}
    assert {
        "countdown.yaml",
        "dapo_math.yaml",
        "countdown_interoception.yaml",
        "countdown_full_cache.yaml",
        "countdown_ablation_kv_dropout.yaml",
        "countdown_ablation_token_only.yaml",
        "tiny/countdown_ngc.yaml",
        "tiny/countdown_full_cache.yaml",
        "tiny/countdown_kv_dropout.yaml",
        "tiny/countdown_token_only.yaml",
        "breadcrumbs_countdown.yaml",
        "tiny/breadcrumbs_countdown.yaml",
        "tiny/breadcrumbs_stargraph.yaml",
    } <= names
    for name in ("ddp", "zero2", "zero3"):
        assert (ROOT / "recipes" / "accelerate_configs" / f"{name}.yaml").is_file()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: Path(p).name)
def test_recipe_parses(path):
    script_args, args, model_args = parse(path)
    assert args.loss_type == "dr_grpo" and args.scale_rewards == "none" and args.beta == 0.0
    assert args.num_iterations == 1
    assert model_args.model_name_or_path
    if isinstance(
        args, NGCConfig
    ):  # Breadcrumbs: the beacon id (hence its EvictionConfig) needs the tokenizer
        args.eviction_config()


def _global_prompts(args, num_gpus=8):
    completions = args.per_device_train_batch_size * num_gpus * args.gradient_accumulation_steps
    return completions // args.num_generations


def test_countdown_recipe_has_paper_values():
    s, a, m = parse(ROOT / "recipes" / "countdown.yaml")
    assert m.model_name_or_path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert (a.eviction_interval, a.eviction_rate, a.block_size, a.score_window) == (256, 0.5, 32, 5)
    assert a.max_completion_length == 1024 and a.max_steps == 250
    assert a.num_generations == 16 and _global_prompts(a) == 32
    assert a.temperature == 0.9 and a.top_k == 50
    assert (a.adam_beta1, a.adam_beta2, a.adam_epsilon, a.max_grad_norm) == (0.9, 0.95, 1e-15, 1.0)
    assert a.lr_scheduler_type == "constant"
    assert a.curriculum_rates == [0.1, 0.2, 0.3, 0.4, 0.5] and a.curriculum_stage_steps == 20
    assert m.use_peft and set(m.lora_target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert a.push_to_hub and a.hub_model_id.endswith("DeepSeek-R1-Distill-Qwen-1.5B-NGC-Countdown")
    assert a.eviction_loss_coef == 1.0 and a.replay_masks and s.task == "countdown"


def test_dapo_recipe_has_paper_values():
    s, a, m = parse(ROOT / "recipes" / "dapo_math.yaml")
    assert s.task == "math"
    assert a.eviction_interval == 350 and a.max_completion_length == 1050 and a.max_steps == 469
    assert a.num_generations == 8 and _global_prompts(a) == 256
    assert a.temperature == 1.0 and a.top_k == 0
    assert (a.adam_beta1, a.adam_beta2, a.adam_epsilon, a.weight_decay) == (0.9, 0.999, 1e-8, 0.0)
    assert a.min_length_penalty and a.max_grad_norm == 1.0


def test_variant_recipes():
    _, a, _ = parse(ROOT / "recipes" / "countdown_ablation_kv_dropout.yaml")
    assert not a.replay_masks and a.eviction_loss_coef == 0
    _, a, _ = parse(ROOT / "recipes" / "countdown_ablation_token_only.yaml")
    assert a.replay_masks and a.eviction_loss_coef == 0
    _, a, _ = parse(ROOT / "recipes" / "countdown_full_cache.yaml")
    assert a.eviction_policy == "full" and a.eviction_loss_coef == 0 and a.curriculum_rates is None
    _, a, _ = parse(ROOT / "recipes" / "countdown_interoception.yaml")
    assert a.interoception_rates == [0.25, 0.5, 0.75] and a.curriculum_rates is None
    s, a, _ = parse(ROOT / "recipes" / "tiny" / "countdown_ngc.yaml")
    assert a.use_cpu and not a.bf16 and s.prompt_format == "plain"


def test_cli_overrides_yaml():
    s, a, _ = parse(ROOT / "recipes" / "countdown.yaml", "--eviction_rate", "0.6", "--task", "math")
    assert a.eviction_rate == 0.6 and s.task == "math"


def _yaml_with(tmp_path, extra: str) -> str:
    src = (ROOT / "recipes" / "tiny" / "countdown_ngc.yaml").read_text()
    path = tmp_path / "bad.yaml"
    path.write_text(src + "\n" + extra + "\n")
    return str(path)


def test_unknown_yaml_key_fails_before_model_load(tmp_path, no_model_load):
    with pytest.raises(ValueError, match="evicton_rate"):
        main(["--config", _yaml_with(tmp_path, "evicton_rate: 0.5")])


@pytest.mark.parametrize(
    "extra,field",
    [
        ("eviction_rate: 1.5", "eviction_rate"),
        ("block_size: 0", "block_size"),
        ("task: sudoku", "task"),
        ("prompt_format: xml", "prompt_format"),
        ("eval_rates: '2.0'", "eval_"),
        ("dataset_source: 'generated:nope'", "dataset_source"),
        ("curriculum_rates: [0.5, 0.1]", "curriculum_rates"),
    ],
)
def test_bad_value_fails_before_model_load(tmp_path, no_model_load, extra, field):
    with pytest.raises(ValueError, match=field):
        main(["--config", _yaml_with(tmp_path, extra)])


def test_one_training_step_end_to_end(tiny_base, tmp_path):
    out = tmp_path / "run"
    result = main(
        [
            "--config",
            str(ROOT / "recipes" / "tiny" / "countdown_ngc.yaml"),
            "--model_name_or_path",
            str(tiny_base),
            "--output_dir",
            str(out),
            "--max_steps",
            "1",
            "--max_completion_length",
            "48",
            "--eviction_interval",
            "32",
            "--block_size",
            "8",
            "--per_device_train_batch_size",
            "4",
            "--num_generations",
            "4",
            "--num_train_problems",
            "8",
            "--eval_after_train",
            "true",
            "--eval_num_problems",
            "2",
            "--save_strategy",
            "no",
            "--log_level",
            "warning",
        ]
    )
    assert result["output_dir"] == str(out)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    settings = json.loads((out / "ngc_settings.json").read_text())
    assert settings["eviction_interval"] == 32 and settings["block_size"] == 8 and settings["policy"] == "ngc"
    training = json.loads((out / "ngc_training.json").read_text())
    assert training["curriculum"]["rates"] == [0.1, 0.3, 0.5] and training["task"] == "countdown"
    card = (out / "README.md").read_text()
    assert "δ" in card and "WITHOUT eviction" in card and "generate_with_eviction" in card
    assert "TRL" in card  # TRL's own card is kept, the NGC section appended
    assert (out / "eval" / "summary.json").is_file()
    assert {r["policy"] for r in result["eval"]["results"]} == {"full", "ngc", "tova", "keydiff"}


@pytest.mark.parametrize("task", ["stargraph", "linsys"])
def test_generated_tasks_train_and_evaluate_by_name(tiny_base, tmp_path, task):
    """The entry point loads LinSys / StarGraph from the generator, rewards with their verifiers, and the
    final evaluation reads the held-out split of the same distribution."""
    out = tmp_path / task
    result = main(
        [
            "--config",
            str(ROOT / "recipes" / "tiny" / "countdown_ngc.yaml"),
            "--task",
            task,
            "--dataset_source",
            "generated",
            "--model_name_or_path",
            str(tiny_base),
            "--output_dir",
            str(out),
            "--max_steps",
            "1",
            "--max_completion_length",
            "16",
            "--per_device_train_batch_size",
            "4",
            "--num_generations",
            "4",
            "--num_train_problems",
            "8",
            "--eval_after_train",
            "true",
            "--eval_num_problems",
            "2",
            "--eval_policies",
            "full",
            "--save_strategy",
            "no",
            "--log_level",
            "warning",
        ]
    )
    assert json.loads((out / "ngc_training.json").read_text())["task"] == task
    assert [r["policy"] for r in result["eval"]["results"]] == ["full"]
    records = [json.loads(line) for line in (out / "eval" / "samples.jsonl").read_text().splitlines()]
    assert [r["problem_id"] for r in records] == [f"{task}-0", f"{task}-1"]
    with pytest.raises(ValueError, match="ScriptArguments.dataset_source"):
        parse(
            ROOT / "recipes" / "tiny" / "countdown_ngc.yaml",
            "--task",
            task,
            "--dataset_source",
            "generated:nope",
        )
