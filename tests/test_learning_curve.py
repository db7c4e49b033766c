"""The learning-curve callback: a tiny NGC run with ``curve_every=1`` (and a gated curriculum) writes
``learning_curve.json`` with a point per step and policy, a resumed run appends to it, and the validation
problems are disjoint from the training problems and from the test split."""

import json
from pathlib import Path

import pytest

from ngc_trl.evaluation.learning_curve import (
    CURVE_FILE,
    instance_key,
    load_validation_problems,
    merge_points,
    read_curve,
    write_curve,
)
from ngc_trl.tasks import countdown, get_task, linsys, stargraph
from ngc_trl.train import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "tiny" / "countdown_ngc.yaml")


def tiny_run(tiny_base, out, max_steps, *extra):
    return main(
        [
            "--config",
            RECIPE,
            "--model_name_or_path",
            str(tiny_base),
            "--output_dir",
            str(out),
            "--max_steps",
            str(max_steps),
            "--max_completion_length",
            "12",
            "--eviction_interval",
            "16",
            "--block_size",
            "4",
            "--per_device_train_batch_size",
            "4",
            "--num_generations",
            "4",
            "--num_train_problems",
            "8",
            "--eval_after_train",
            "false",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            "--curve_every",
            "1",
            "--curve_num_problems",
            "3",
            "--curve_policies",
            "ngc,full",
            "--curve_batch_size",
            "3",
            "--curriculum_gate",
            "0.5",
            "--log_level",
            "warning",
            *extra,
        ]
    )


def test_tiny_run_writes_the_curve_and_a_resumed_run_appends(tiny_base, tmp_path):
    out = tmp_path / "run"
    tiny_run(tiny_base, out, 2)
    points = json.loads((out / CURVE_FILE).read_text())
    assert sorted((p["step"], p["policy"]) for p in points) == [
        (0, "full"),
        (0, "ngc"),
        (1, "full"),
        (1, "ngc"),
        (2, "full"),
        (2, "ngc"),
    ]  # step 0: untrained
    for p in points:
        assert 0.0 <= p["accuracy"] <= 1.0 and p["n"] == 3 and p["stderr"] is not None
        assert p["rate"] == (
            0.0 if p["policy"] == "full" else 0.5
        )  # the final eviction_rate, not the curriculum's
        assert p["peak_compression"] >= 1.0 - 1e-9
    assert (out / "checkpoint-2" / "ngc_curriculum_gate.json").is_file()  # the gated curriculum, end to end
    assert json.loads((out / "ngc_training.json").read_text())["curriculum"]["gate"] == 0.5
    # the metric is in the trainer's log history too
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "eval/curve_accuracy" in h]
    assert [h["step"] for h in logged] == [0, 1, 2] and all("eval/curve_accuracy_full" in h for h in logged)
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2]  # the steps' own logs are kept

    tiny_run(tiny_base, out, 3)  # resumes from checkpoint-2 (the entry point finds it)
    again = json.loads((out / CURVE_FILE).read_text())
    assert [(p["step"], p["policy"]) for p in again[:6]] == [(p["step"], p["policy"]) for p in points]
    assert sorted((p["step"], p["policy"]) for p in again[6:]) == [(3, "full"), (3, "ngc")]  # no new step 0


def test_curve_file_merge_replaces_same_point_and_keeps_others(tmp_path):
    path = tmp_path / CURVE_FILE
    a = [
        {"step": 1, "policy": "ngc", "rate": 0.5, "accuracy": 0.1},
        {"step": 2, "policy": "ngc", "rate": 0.5, "accuracy": 0.2},
    ]
    write_curve(path, a)
    b = [
        {"step": 2, "policy": "ngc", "rate": 0.5, "accuracy": 0.3},
        {"step": 2, "policy": "full", "rate": 0.0, "accuracy": 0.4},
    ]
    write_curve(path, merge_points(read_curve(path), b))
    got = read_curve(path)
    assert [(p["step"], p["policy"], p["accuracy"]) for p in got] == [
        (1, "ngc", 0.1),
        (2, "ngc", 0.3),
        (2, "full", 0.4),
    ]
    assert not (tmp_path / (CURVE_FILE + ".tmp")).exists()


@pytest.mark.parametrize(
    "task,source,module",
    [
        ("countdown", "generated:testbed", countdown),
        ("countdown", "generated", countdown),
        ("linsys", "generated", linsys),
        ("stargraph", "generated", stargraph),
    ],
)
def test_validation_problems_avoid_training_and_test_splits(task, source, module):
    train = get_task(task).load(source, n=512, seed=0, split="train", prompt_format="plain")  # as ngc-train
    val = load_validation_problems(task, source, 64, seed=0, exclude=train, prompt_format="plain")
    assert len(val) == 64 and len({p["id"] for p in val}) == 64
    keys = [instance_key(task, p) for p in val]
    assert len(set(keys)) == 64  # no repeats
    assert not set(keys) & {instance_key(task, r) for r in train}
    test = get_task(task).load(source, n=128, seed=0, split="test", prompt_format="plain")  # as ngc-eval
    assert not set(keys) & {instance_key(task, r) for r in test}
    columns = {
        "countdown": ("nums", "target"),
        "linsys": ("coeffs", "rhs"),
        "stargraph": ("edges", "source", "goal"),
    }
    buckets = module.DISTRIBUTIONS[source.partition(":")[2] or "standard"].get("test_buckets")
    for p in val:  # the hash split itself: never a test instance, whatever the seeds
        args = [p[c] for c in columns[task]]
        split = module._split_of(*args, buckets) if buckets else module._split_of(*args)
        assert split == "train"
    assert val == load_validation_problems(task, source, 64, seed=0, exclude=train, prompt_format="plain")


def test_validation_problems_of_an_exhausted_distribution():
    """Candidates capped at 60 of which the first 50 distinct ones are excluded: fewer problems, a warning."""
    everything = load_validation_problems("countdown", "generated:testbed", 50, seed=3)
    with pytest.warns(UserWarning, match="only"):
        fewer = load_validation_problems(
            "countdown", "generated:testbed", 50, seed=3, exclude=everything, max_candidates=60
        )
    assert 0 < len(fewer) < 50
    assert not {instance_key("countdown", p) for p in fewer} & {
        instance_key("countdown", p) for p in everything
    }
    with pytest.raises(ValueError, match="not 'generated'"):
        load_validation_problems("countdown", "Jiayi-Pan/Countdown-Tasks-3to4", 4, seed=0)


def _yaml_with(tmp_path, extra: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(Path(RECIPE).read_text() + "\n" + extra + "\n")
    return str(path)


@pytest.mark.parametrize(
    "extra,field",
    [
        ("curve_every: -1", "curve_every"),
        ("curve_num_problems: 0", "curve_num_problems"),
        ("curve_batch_size: 0", "curve_batch_size"),
        ("curve_max_new_tokens: 0", "curve_max_new_tokens"),
        ("curve_policies: nope", "curve_policies"),
        ("curve_policies: breadcrumbs", "curve_policies"),
        ("curve_every: 5\ntask: math\ndataset_source: generated", "curve_every"),
        ("curve_every: 5\ndataset_source: data.jsonl", "curve_every"),
    ],
)
def test_bad_curve_value_fails_before_model_load(tmp_path, no_model_load, extra, field):
    with pytest.raises(ValueError, match=f"ScriptArguments.{field}"):
        main(["--config", _yaml_with(tmp_path, extra)])


def test_plot_curves_writes_a_png_and_the_cli_checks_its_arguments(tmp_path):
    from ngc_trl.evaluation.learning_curve import main as curve_main
    from ngc_trl.evaluation.learning_curve import write_curve

    pts = [
        {"step": s, "policy": "ngc", "rate": 0.5, "accuracy": a, "stderr": 0.05}
        for s, a in ((8, 0.2), (16, 0.3))
    ]
    write_curve(tmp_path / "c.json", pts + [{"step": 16, "policy": "full", "rate": 0.0, "accuracy": None}])
    out = curve_main(
        ["--runs", f"NGC={tmp_path / 'c.json'}", "--ref", "base=0.25±0.03", "--out", str(tmp_path / "p.png")]
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for bad in (["--runs", "nolabel"], ["--runs", f"a={tmp_path / 'c.json'}", "--ref", "b=x"]):
        with pytest.raises(SystemExit):
            curve_main([*bad, "--out", str(tmp_path / "q.png")])
