"""Two-process (gloo, CPU) runs of the tiny NGC and Breadcrumbs recipes (`torch.distributed.run`).

Checked per run (each rank writes a probe file, `tests/mp_worker.py`): both ranks use the same curriculum
rate at every step and the same interoception rate for every prompt group (a group's rollouts are split
across the ranks), the weights are identical on both ranks after the steps, the logged metrics are the mean
over both ranks, and a checkpoint resumes with the gated curriculum's position intact."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "mp_worker.py"
SMALL = {
    "max_completion_length": 32,
    "eviction_interval": 16,
    "block_size": 4,
    "per_device_train_batch_size": 2,
    "num_generations": 4,
    "num_train_problems": 8,
    "eval_after_train": False,
    "logging_steps": 1,
    "save_strategy": "no",
    "log_level": "warning",
    "max_steps": 2,
    "learning_rate": 5e-2,
}
NGC_ONLY = ("eviction_interval", "block_size")


def launch(tmp_path, recipe, name, tiny_base, **changes):
    """Run the recipe (with ``changes``; a None value drops the key) on 2 processes; the two probes."""
    cfg = yaml.safe_load((ROOT / "recipes" / "tiny" / recipe).read_text())
    small = {k: v for k, v in SMALL.items() if cfg.get("method") != "breadcrumbs" or k not in NGC_ONLY}
    cfg.update(small, model_name_or_path=str(tiny_base), output_dir=str(tmp_path / name))
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    probes = tmp_path / f"{name}-probes"
    probes.mkdir(exist_ok=True)
    for f in probes.glob("probe-*.json"):
        f.unlink()
    # torchrun (accelerate's own CPU multi-process launcher needs mpirun); accelerate picks gloo from the env
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port()),
        str(WORKER),
        "--config",
        str(path),
    ]
    env = {**os.environ, "NGC_PROBE_DIR": str(probes), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=str(ROOT))
    assert res.returncode == 0, res.stderr[-4000:]
    return [json.loads((probes / f"probe-{r}.json").read_text()) for r in (0, 1)]


def port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logged(probe, key):
    return {h["step"]: h[key] for h in probe["log_history"] if key in h}


def check_weights_and_metrics(p0, p1, key):
    assert p0["weights"] == p1["weights"]  # the same update on both ranks
    assert p0["global_step"] == p1["global_step"]
    if key is None:
        return
    # a logged value is the mean over both ranks of the local values
    for step, value in logged(p0, key).items():
        local = [s[key.split("/")[-1]] for p in (p0, p1) for s in p["local_stats"] if s["step"] == step - 1]
        assert len(local) == 2
        assert value == pytest.approx(sum(local) / 2, rel=1e-4)


def test_two_process_ngc_interoception_rates_agree_per_group(tmp_path, tiny_base):
    p0, p1 = launch(
        tmp_path,
        "countdown_ngc.yaml",
        "intero",
        tiny_base,
        curriculum_rates=None,
        interoception_rates=[0.25, 0.5, 0.75],
    )
    by_prompt = {}
    for rank, p in enumerate((p0, p1)):
        for r in p["rollouts"]:
            by_prompt.setdefault((r["step"], r["prompt"].split("<eviction_rate>")[0]), set()).add(
                (rank, r["rate"])
            )
    shared = [v for v in by_prompt.values() if {rank for rank, _ in v} == {0, 1}]
    assert shared  # some groups were split across the ranks
    for v in by_prompt.values():
        assert len({rate for _, rate in v}) == 1  # one rate per group, whichever rank generated it
    check_weights_and_metrics(p0, p1, "ngc/peak_compression")


def test_two_process_ngc_curriculum_and_resume(tmp_path, tiny_base):
    gated = dict(
        curriculum_rates=[0.1, 0.3, 0.5],
        curriculum_stage_steps=1,
        curriculum_gate=0.01,
        save_strategy="steps",
        save_steps=2,
    )
    p0, p1 = launch(tmp_path, "countdown_ngc.yaml", "gate", tiny_base, **gated)
    assert p0["rate_in_force"] == p1["rate_in_force"] and len(p0["rate_in_force"]) == 2
    check_weights_and_metrics(p0, p1, "ngc/eviction_rate")
    saved = json.loads((tmp_path / "gate" / "checkpoint-2" / "ngc_curriculum_gate.json").read_text())
    q0, q1 = launch(tmp_path, "countdown_ngc.yaml", "gate", tiny_base, **{**gated, "max_steps": 3})
    assert q0["gate_at_begin"] == q1["gate_at_begin"] == saved  # the stage clock and reference came back
    assert q0["global_step"] == 3 and list(q0["rate_in_force"]) == ["2"]
    assert q0["rate_in_force"] == q1["rate_in_force"]
    check_weights_and_metrics(q0, q1, None)


def test_two_process_breadcrumbs(tmp_path, tiny_base):
    p0, p1 = launch(
        tmp_path,
        "breadcrumbs_countdown.yaml",
        "bc",
        tiny_base,
        student_model_name_or_path=None,
        compression_ratio=4,
    )
    check_weights_and_metrics(p0, p1, None)
    for key in ("breadcrumbs/distill_loss", "breadcrumbs/kl_per_token"):
        assert logged(p0, key) == logged(p1, key) and logged(p0, key)  # gathered: the same on both ranks
