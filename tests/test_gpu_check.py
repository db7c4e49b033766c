"""`bench/gpu_check.py` (its sections: `bench/gpu_sections.py`): the CPU dry run writes every section of the GPU
report, and the CPU-testable pieces of the GPU path (argument checks, the budget, the contiguous death tensor
of the FlexAttention mask) hold."""

import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import left_padded, tiny_qwen2

from ngc_trl import EvictionConfig, generate_with_eviction
from ngc_trl.engine.replay import ReplayContext, replay_forward

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402
import gpu_sections  # noqa: E402

SECTIONS = ("replay_parity", "decode", "train_step", "fixed_budget")


@pytest.fixture
def keep_threads():
    """`gpu_check.main` sets one intra-op thread in a CPU dry run; restore the session's."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "x.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--dry_run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["dry_run"] is True and r["errors"] == [] and "--dry_run" in r["command"]
    assert r["machine"]["torch"] == torch.__version__
    for name in SECTIONS:
        sec = r[name]
        assert sec["status"] == "ok", (name, sec.get("error"), sec.get("traceback"))
        assert (
            "error" not in sec
            and sec["command"] == r["command"]
            and sec["machine"]["torch"] == torch.__version__
        )

    par = r["replay_parity"]
    for dt in ("fp32", "bf16"):
        diffs = par[dt]["max_abs_diff"]
        for k in (
            "forward_token_logp_all",
            "forward_eviction_logp",
            "backward_grad_abs",
            "backward_grad_rel",
            "flex_vs_rollout_token_logp",
            "flex_vs_rollout_eviction_logp",
            "dense_vs_rollout_eviction_logp",
        ):
            assert diffs[k] >= 0 and k in par[dt]["tolerance"]
        assert par[dt]["backward_backend"] == {"dense": "dense", "flex": "dense"}  # no flex backward on CPU
        assert par[dt]["actions"] > 0 and par[dt]["rows_with_actions"] == 2
    # the fp32 checks are exact-math checks of the replay (uncompiled flex forward vs dense on CPU)
    assert par["fp32"]["max_abs_diff"]["forward_token_logp_all"] <= 1e-4
    assert par["targets"]["fp32_eviction_logp_le_1e-4"] and par["targets"]["fp32_flex_vs_rollout_le_1e-4"]

    dec = r["decode"]
    assert dec["skipped"] == []
    cells = {(x["policy"], x["length"]) for x in dec["rows"]}
    assert cells == {(p, n) for p in ("full", "ngc", "tova") for n in (32, 48, 64)}
    for row in dec["rows"]:
        for k in (
            "tokens_per_s",
            "tokens_per_s_ratio",
            "peak_kv_bytes",
            "peak_kv_bytes_ratio",
            "eviction_share",
            "cuda_peak_delta_bytes",
            "expected_bytes_ratio",
        ):
            assert k in row
        assert row["rounds"] > 0 if row["policy"] != "full" else row["rounds"] == 0
        assert row["peak_kv_bytes_ratio"] < 1 if row["policy"] != "full" else row["peak_kv_bytes_ratio"] == 1
    assert set(dec["summary"]) == {"32", "48", "64"} and "tokens_per_s_ratio" in dec["summary"]["64"]["ngc"]
    assert set(dec["targets"]) >= {
        "eviction_share_le_5pct",
        "ngc_tokens_per_s_ge_1x_full_at_shortest",
        "ngc_tokens_per_s_ge_1.5x_full_at_longest",
    }

    ts = r["train_step"]
    for k in ("ngc_s", "vanilla_s", "ratio", "ngc_peak_bytes", "vanilla_peak_bytes"):
        assert k in ts["loss_phase"] and k in ts["step"]
    assert ts["rounds_per_rollout"] > 0
    assert isinstance(ts["targets"]["ngc_loss_phase_le_1.15x_vanilla"], bool)
    assert isinstance(ts["targets"]["ngc_step_le_1.15x_vanilla"], bool)

    fb = r["fixed_budget"]
    assert fb["reused_decode_cells"] and fb["budget_bytes"] > 0
    assert fb["sequences_fit"]["full"] == 2 and fb["sequences_fit"]["ngc"] >= 2
    assert fb["ngc_at_fit"]["batch"] == fb["sequences_fit"]["ngc"] and fb["ngc_at_fit"]["fits_budget"]
    assert fb["tokens_per_s_ratio"] > 0 and set(fb["targets"]) == {"sequences_ge_2x", "tokens_per_s_ge_1.8x"}

    assert {k.split(".")[0] for k in r["targets"]} == set(SECTIONS)
    assert all(isinstance(v, bool) for v in r["targets"].values())


def test_budget_skips_cells_that_do_not_fit(tmp_path, keep_threads):
    out = tmp_path / "b.json"
    r = gpu_check.main(
        ["--dry_run", "--sections", "decode,fixed_budget", "--budget_s", "0.01", "--out", str(out)]
    )
    assert json.loads(out.read_text())["decode"]["rows"] == r["decode"]["rows"]
    assert r["replay_parity"]["status"] == "not_selected" and r["errors"] == []
    assert [(x["policy"], x["length"]) for x in r["decode"]["rows"]] == [
        ("full", 32)
    ]  # nothing predicted yet
    assert len(r["decode"]["skipped"]) == 8 and all(s["predicted_s"] > 0 for s in r["decode"]["skipped"])
    assert r["decode"]["targets"]["ngc_tokens_per_s_ge_1x_full_at_shortest"] is None
    assert "skipped" in r["fixed_budget"] and r["fixed_budget"]["targets"]["sequences_ge_2x"] is None


def test_a_failing_section_is_recorded_and_the_next_runs(tmp_path, monkeypatch, keep_threads):
    def boom(run, res):
        res["partial"] = 1
        raise RuntimeError("CUDA out of memory (simulated)")

    def fine(run, res):
        res["targets"] = {"x": True, "lengths": {"shortest": 1}}

    monkeypatch.setitem(gpu_check.RUNNERS, "replay_parity", boom)
    monkeypatch.setitem(gpu_check.RUNNERS, "decode", fine)
    out = tmp_path / "e.json"
    gpu_check.main(["--dry_run", "--sections", "replay_parity,decode", "--out", str(out)])
    r = json.loads(out.read_text())
    bad = r["replay_parity"]
    assert bad["status"] == "error" and bad["partial"] == 1 and "simulated" in bad["error"]
    assert "RuntimeError" in bad["traceback"] and r["errors"] == ["replay_parity"]
    assert r["decode"]["status"] == "ok" and r["targets"] == {"decode.x": True}
    assert r["train_step"]["status"] == "not_selected"


def test_predict_and_tolerance():
    rate = {"full": (0.01, 1024)}
    assert gpu_sections.predict_s({}, "ngc", 1024) is None
    assert gpu_sections.predict_s(rate, "full", 1024, warmup=320) == pytest.approx(0.01 * 1344)
    assert gpu_sections.predict_s(rate, "ngc", 2048) == pytest.approx(0.01 * 2048 * 1.3)  # longer: x1.3
    assert gpu_sections.tolerance(0.0) == 1e-6 and gpu_sections.tolerance(3e-5) == 1e-4
    assert gpu_sections.tolerance(0.2) is None and gpu_sections.tolerance(float("nan")) is None


def test_head_dim_check():
    assert gpu_check.check_head_dim(gpu_sections.PARITY_MODEL, "parity") == 64
    assert gpu_check.check_head_dim(gpu_check.decode_bench.SHAPES["r1-1.5b"][0], "r1") == 128
    assert gpu_check.check_head_dim(gpu_check.decode_bench.SHAPES["tiny"][0], "tiny") == 32
    assert gpu_check.check_head_dim({"hidden_size": 256, "num_attention_heads": 4}, "x") == 64
    for hd in (8, 72, 512):
        with pytest.raises(ValueError, match="head_dim"):
            gpu_check.check_head_dim({"hidden_size": 1024, "num_attention_heads": 4, "head_dim": hd}, "x")


@pytest.mark.parametrize(
    "argv",
    [
        ["--dry_run", "--sections", "decode,bogus"],
        ["--dry_run", "--batch_size", "0"],
        ["--dry_run", "--fixed_batch", "0"],
        ["--dry_run", "--lengths", "1"],  # prompt 16, δ 16: no round before the last token
        ["--dry_run", "--lengths", "32,x"],
        ["--dry_run", "--heuristic", "ngc"],
        ["--dry_run", "--device", "tpu"],
        ["--dry_run", "--budget_s", "0"],
        ["--device", "cpu"],  # the real check runs on CUDA only
    ],
)
def test_bad_arguments_are_rejected(argv):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(argv)


def test_arguments_resolve_per_run():
    a = gpu_check.parse_args(["--dry_run"])
    d = a.cfg["decode"]
    assert (
        a.device == "cpu" and d["lengths"] == [32, 48, 64] and d["batch_size"] == 2 and d["shape"] == "tiny"
    )
    a = gpu_check.parse_args(["--dry_run", "--lengths", "40,20", "--batch_size", "3", "--sections", "decode"])
    assert (
        a.cfg["decode"]["lengths"] == [40, 20]
        and a.cfg["decode"]["fixed_batch"] == 3
        and a.sections == ["decode"]
    )
    assert (
        gpu_check.REAL["decode"]["lengths"] == [1024, 4096, 8192]
        and gpu_check.REAL["decode"]["batch_size"] == 32
    )
    # the real run's schedule (prompt 64, δ 256) rejects a length without a round
    cfg = copy.deepcopy(gpu_check.REAL)
    cfg["decode"].update(lengths=[100], fixed_batch=32)
    ns = SimpleNamespace(
        sections=["decode"], heuristic="tova", device="cpu", dry_run=True, budget_s=1.0, max_fixed_batch=8
    )
    with pytest.raises(ValueError, match="no eviction round"):
        gpu_check.validate(ns, cfg)
    cfg["decode"]["lengths"] = [1024, 8192]
    gpu_check.validate(ns, cfg)


def test_flex_mask_reads_a_contiguous_death_tensor(monkeypatch):
    """`torch.compile` of FlexAttention fails on the strided per-layer view of the ``(B, L, T)`` death tensor:
    the mask_mod must close over a contiguous copy."""
    import torch.nn.attention.flex_attention as fa

    model = tiny_qwen2()
    cfg = EvictionConfig(policy="ngc", eviction_interval=8, block_size=2, score_window=3)
    ids, mask = left_padded([5, 11], seed=0)
    out = generate_with_eviction(
        model,
        ids,
        mask,
        cfg,
        max_new_tokens=20,
        do_sample=True,
        generator=torch.Generator().manual_seed(0),
        eos_token_id=[],
    )
    full_mask = torch.cat([mask.bool(), out.completion_mask], 1).long()
    ctx = ReplayContext(full_mask, out.records, cfg, prompt_len=mask.sum(1), backend="flex")
    assert not ctx.layer_death(1).is_contiguous()  # the strided view the mask must not capture
    seen, real = [], fa.create_block_mask

    def capture(mask_mod, *args, **kwargs):
        free = dict(zip(mask_mod.__code__.co_freevars, (c.cell_contents for c in mask_mod.__closure__)))
        seen.append(free["death"])
        return real(mask_mod, *args, **kwargs)

    monkeypatch.setattr(fa, "create_block_mask", capture)
    with torch.no_grad():
        replay_forward(model, out.sequences, full_mask, ctx)
    assert len(seen) == model.config.num_hidden_layers
    for layer, death in enumerate(seen):
        assert death.is_contiguous() and torch.equal(death, ctx.layer_death(layer))
