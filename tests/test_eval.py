"""`ngc_trl.evaluation.run` / `.setup` / `.metrics`: pass@k, the paper's peak reduction, resume, reports, CLI validation."""

import itertools
import json
import warnings
from pathlib import Path

import pytest
from conftest import tiny_qwen2

import ngc_trl.evaluation.run as ev
import ngc_trl.evaluation.setup as es
from ngc_trl.engine.config import BeaconConfig, EvictionConfig
from ngc_trl.evaluation.metrics import combine, pareto_auc, pass_at_k, summarize
from ngc_trl.models import char_tokenizer

SMALL = EvictionConfig(eviction_interval=8, block_size=4, score_window=3)  # prompts (~30 tokens) cross δ


MATH_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "math"


pytestmark = pytest.mark.usefixtures("eval_one_thread")


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    return tiny_qwen2(vocab=len(tok))


@pytest.fixture(scope="module")
def problems(tok):
    return es.load_problems("countdown", tok, num_problems=4, seed=0, prompt_format="plain")


class CountingGenerate:
    """Wraps `generate_with_eviction`: counts calls and rows, optionally dies before call ``kill_at``."""

    def __init__(self, kill_at=None):
        self.calls, self.rows, self.kill_at = 0, 0, kill_at

    def __call__(self, model, input_ids, *args, **kwargs):
        if self.kill_at is not None and self.calls + 1 >= self.kill_at:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.rows += input_ids.shape[0]
        return GENERATE(model, input_ids, *args, **kwargs)


GENERATE = ev.generate_with_eviction


def _lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


# ----------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            direct = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(direct, abs=1e-12)
    with pytest.raises(ValueError, match="k="):
        pass_at_k(n, 0, n + 1)


def test_pass_at_k_large_n_is_stable():
    assert 0.0 < pass_at_k(1000, 1, 32) < 1.0
    assert pass_at_k(1000, 1, 32) == pytest.approx(32 / 1000)


def _rec(policy, rate, pid, peak, correct=True, sample=0, same=2.0):
    return {
        "policy": policy,
        "rate": rate,
        "problem_id": pid,
        "sample": sample,
        "correct": correct,
        "peak_total": peak,
        "peak_entries": [peak // 2, peak - peak // 2],
        "compression_same_tokens": same,
        "mean_entries": 1.0,
        "footprint": 10,
        "completion_tokens": 5,
        "prompt_tokens": 3,
        "rounds": 1,
        "finished": True,
    }


def test_peak_compression_is_a_mean_of_per_prompt_ratios():
    recs = [
        _rec("full", None, "a", 100),
        _rec("full", None, "b", 200),
        _rec("ngc", 0.5, "a", 50, correct=False),
        _rec("ngc", 0.5, "b", 25),
    ]
    full, ngc = summarize(recs, [("full", None), ("ngc", 0.5)], [1])
    assert full["peak_compression"] == 1.0 and full["compression_source"] == "full_run"
    assert ngc["peak_compression"] == pytest.approx((2 + 8) / 2)  # not 300 / 75 = 4
    assert ngc["compression_source"] == "full_run"
    assert ngc["pass@1"] == 0.5 and ngc["pass@1_se"] == pytest.approx(0.5)
    # no full-cache run: fall back to the same-tokens ratio, and say so
    (row,) = summarize(recs[2:], [("ngc", 0.5)], [1])
    assert row["compression_source"] == "same_tokens" and row["peak_compression"] == 2.0


def _row(policy, comp, acc):
    return {"policy": policy, "rate": None, "pass@1": acc, "peak_compression": comp}


def test_pareto_auc_by_hand():
    rows = [_row("full", 1.0, 0.8), _row("a", 2.0, 0.6), _row("a", 4.0, 0.2), _row("b", 2.0, 0.8)]
    auc = pareto_auc(rows)
    assert auc["max_compression"] == 4.0  # shared axis: log2 range [0, 2]
    # a: trapezoids (0.8 + 0.6) / 2 over [0, 1] and (0.6 + 0.2) / 2 over [1, 2], divided by 2
    assert auc["auc"]["a"] == pytest.approx((0.7 + 0.4) / 2)
    # b: measured to 2x only, 0 beyond: (0.8 + 0.8) / 2 over [0, 1], divided by 2
    assert auc["auc"]["b"] == pytest.approx(0.4)
    assert "full" not in auc["auc"]
    # a fixed range cuts a segment in its middle: up to sqrt(8)x = log2 1.5
    cut = pareto_auc(rows, max_compression=2**1.5)["auc"]["a"]
    assert cut == pytest.approx((0.7 + 0.5 * (0.6 + 0.4) / 2) / 1.5)
    # a method's own uncompressed accuracy as its anchor: a student at 0% everywhere scores 0
    own = pareto_auc(rows + [_row("s", 2.0, 0.0)], anchors={"s": 0.0, "a": 0.6})["auc"]
    assert own["s"] == 0.0 and own["a"] == pytest.approx((0.6 + 0.4) / 2) and own["b"] == pytest.approx(0.4)


def test_common_range_auc_by_hand():
    from ngc_trl.evaluation.metrics import common_range_auc

    rows = [
        _row("full", 1.0, 0.8),
        _row("a", 2.0, 0.6),
        _row("a", 8.0, 0.2),
        _row("b", 1.5, 0.1),
        _row("b", 2.0, 0.9),
        _row("b", 4.0, 0.5),
        _row("one", 3.0, 1.0),
    ]
    out = common_range_auc(rows)
    # range: the largest first run (2x) to the smallest last run (4x); "one" has no curve
    assert out["range"] == pytest.approx([2.0, 4.0]) and set(out["auc"]) == {"a", "b"}
    # a is linear in log2 from 0.6 at 1 to 0.2 at 3: 0.4 at 2, mean over [1, 2] = 0.5; b: (0.9 + 0.5) / 2
    assert out["auc"]["a"] == pytest.approx(0.5) and out["auc"]["b"] == pytest.approx(0.7)
    # the anchored AUC would rank them the other way round: b is cut at 4x of 8x
    anchored = pareto_auc(rows)["auc"]
    assert anchored["a"] > anchored["b"]
    # disjoint ranges: no common AUC
    assert common_range_auc(
        [_row("a", 1.5, 0.5), _row("a", 2.0, 0.5), _row("b", 3.0, 0.1), _row("b", 4.0, 0.1)]
    ) == {"range": None, "auc": {}}


def test_combine_anchors_each_label_at_its_own_models_full_cache(tmp_path):
    def folder(name, rows):
        stats = dict(
            compression_source="full_run",
            **{"pass@1_se": 0.0},
            mean_peak_entries_per_layer=1.0,
            max_peak_entries_per_layer=1,
            mean_entries_per_layer=1.0,
            mean_completion_tokens=1.0,
            truncated=0.0,
            num_problems=1,
            num_completions=1,
        )
        rows = [{**stats, **r} for r in rows]
        (tmp_path / name).mkdir()
        summary = {"settings": {"task": "countdown", "k": [1], "model": name}, "results": rows}
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
        return str(tmp_path / name)

    base = folder("base", [_row("full", 1.0, 0.8), dict(_row("tova", 2.0, 0.4), rate=0.5)])
    c4 = folder("c4", [_row("full", 1.0, 0.0), dict(_row("breadcrumbs", 2.0, 0.0), rate=4)])
    c8 = folder("c8", [_row("full", 1.0, 0.5), dict(_row("breadcrumbs", 4.0, 0.5), rate=8)])
    auc = combine([base, f"{c8}=bc", f"{c4}=bc"], tmp_path / "all")["auc"]["auc"]
    assert auc["tova"] == pytest.approx((0.8 + 0.4) / 2 / 2)  # anchored at the first folder's full
    # bc starts at the c4 student's own full (0.0, its least-compressed run), not at 0.8
    assert auc["bc"] == pytest.approx(((0.0 + 0.0) / 2 + (0.0 + 0.5) / 2) / 2)
    # a relabelled Breadcrumbs run keeps its "c=" setting; the tova row its "ε="
    table = (tmp_path / "all" / "results.md").read_text()
    assert "| bc | c=4 |" in table and "| tova | ε=0.50 |" in table and "| bc | ε=" not in table


# ----------------------------------------------------------------------------- evaluate(): reports, resume
def test_reports_for_two_policies_two_rates(lm, tok, problems, tmp_path):
    out = tmp_path / "eval"
    summary = ev.evaluate(
        lm,
        tok,
        problems,
        "countdown",
        "full,keydiff",
        "0.25,0.5",
        eviction=SMALL,
        max_new_tokens=16,
        batch_size=3,
        output_dir=out,
        progress=False,
    )
    rows = {(r["policy"], r["rate"]): r for r in summary["results"]}
    assert set(rows) == {("full", None), ("keydiff", 0.25), ("keydiff", 0.5)}
    assert rows[("full", None)]["peak_compression"] == 1.0
    assert rows[("full", None)]["mean_prompt_kept"] == 1.0  # nothing is evicted without rounds
    # unprotected rounds drop some prompt entries, the more the higher the rate
    assert rows[("keydiff", 0.5)]["mean_prompt_kept"] < 1.0
    assert rows[("keydiff", 0.5)]["mean_prompt_kept"] <= rows[("keydiff", 0.25)]["mean_prompt_kept"]
    for rate in (0.25, 0.5):
        r = rows[("keydiff", rate)]
        assert r["compression_source"] == "full_run" and r["peak_compression"] > 1.0
        assert r["num_problems"] == 4 and r["mean_rounds"] >= 1
        assert r["mean_peak_entries_per_layer"] < rows[("full", None)]["mean_peak_entries_per_layer"]
        assert 0.0 <= r["pass@1"] <= 1.0
    assert (
        rows[("keydiff", 0.5)]["mean_entries_per_layer"] < rows[("keydiff", 0.25)]["mean_entries_per_layer"]
    )
    saved = json.loads((out / "summary.json").read_text())
    assert saved["results"] == summary["results"]
    assert saved["settings"]["eviction"]["eviction_interval"] == 8 and saved["settings"]["rates"] == [
        0.25,
        0.5,
    ]
    assert saved["compression_reference"] == "full_run"
    table = (out / "results.md").read_text()
    assert (
        "| keydiff | ε=0.25 |" in table
        and "| keydiff | ε=0.50 |" in table
        and "| full | — | 1.00× |" in table
    )
    assert "| keydiff |" in table.split("Area under")[1]  # the AUC table
    assert set(saved["auc"]["auc"]) == {"keydiff"}
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recs = _lines(out / "samples.jsonl")
    assert len(recs) == 3 * 4
    r = recs[-1]
    assert r["policy"] == "keydiff" and len(r["peak_entries"]) == lm.config.num_hidden_layers
    assert r["full_entries"] == r["prompt_tokens"] + r["completion_tokens"] - 1
    assert isinstance(r["completion"], str) and r["reward"] in (0.0, 1.0)


def test_killed_run_resumes_without_loss_or_duplicates(lm, tok, problems, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    kw = dict(
        eviction=SMALL,
        max_new_tokens=12,
        batch_size=3,
        num_samples=2,
        temperature=0.8,
        top_p=0.95,
        output_dir=out,
        progress=False,
    )
    args = (lm, tok, problems, "countdown", "ngc,keydiff", "0.25,0.5")
    expected = {
        (p, r, q["id"], j) for p in ("ngc", "keydiff") for r in (0.25, 0.5) for q in problems for j in (0, 1)
    }

    killer = CountingGenerate(kill_at=5)  # 4 batches land (3 + 3 + 2 + 3 rows), the 5th call dies
    monkeypatch.setattr(ev, "generate_with_eviction", killer)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(*args, **kw)
    path = out / "samples.jsonl"
    first = _lines(path)
    assert len(first) == 11
    # the kill also tore the last line in half
    text = path.read_text().splitlines(keepends=True)
    path.write_text("".join(text[:-1]) + text[-1][: len(text[-1]) // 2])
    kept = first[:-1]

    counter = CountingGenerate()
    monkeypatch.setattr(ev, "generate_with_eviction", counter)
    with pytest.warns(UserWarning, match="unreadable"):
        summary = ev.evaluate(*args, **kw)
    assert counter.rows == len(expected) - len(kept)  # only the missing samples were generated
    final = _lines(path)
    keys = [(r["policy"], r["rate"], r["problem_id"], r["sample"]) for r in final]
    assert len(keys) == len(set(keys)) and set(keys) == expected
    assert final[: len(kept)] == kept  # finished samples untouched
    assert all(r["num_completions"] == 8 and r["pass@2"] is not None for r in summary["results"])
    assert {r["compression_source"] for r in summary["results"]} == {"same_tokens"}  # no full run

    again = CountingGenerate()
    monkeypatch.setattr(ev, "generate_with_eviction", again)
    assert ev.evaluate(*args, **kw)["results"] == summary["results"] and again.calls == 0
    with pytest.raises(ValueError, match="different settings"):  # a resumed run must not mix settings
        ev.evaluate(*args, **{**kw, "max_new_tokens": 13})


def test_prompts_chat_prefill_and_rate_tag(tok):
    from ngc_trl.tasks import get_task
    from ngc_trl.tasks.base import PREFILL

    prompt = get_task("countdown").build_prompt({"nums": [1, 2, 3], "target": 6}, prefill=True)
    text = es.render_prompt(prompt, tok)
    assert text.endswith(PREFILL) and tok.eos_token not in text  # the assistant turn is continued
    tagged = es.render_prompt(prompt, tok, rate=0.5)
    assert "<eviction_rate>50%</eviction_rate>" in tagged and tagged.endswith(PREFILL)


@pytest.mark.skipif(not MATH_DIR.is_dir(), reason="no shared math data")
def test_math_set_is_graded(lm, tok, monkeypatch):
    monkeypatch.setenv("NGC_MATH_DATA", str(MATH_DIR))
    probs = es.load_problems("amc23", tok, num_problems=2)
    assert {"id", "prompt", "answer"} <= set(probs[0])
    s = ev.evaluate(
        lm,
        tok,
        probs,
        "amc23",
        "full",
        "0.5",
        eviction=SMALL,
        max_new_tokens=4,
        temperature=0.6,
        top_p=0.95,
        progress=False,
    )
    (row,) = s["results"]
    assert row["num_completions"] == 2 and row["pass@1"] == 0.0 and s["settings"]["do_sample"]


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def model_dir(lm, tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-ngc")
    lm.save_pretrained(d)
    tok.save_pretrained(d)
    (d / es.SETTINGS_FILE).write_text(json.dumps(SMALL.to_dict()))
    return d


def _no_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("work started before validation")

    monkeypatch.setattr(ev, "generate_with_eviction", boom)
    return boom


def test_cli_bad_arguments_fail_before_any_work(model_dir, tmp_path, monkeypatch):
    boom = _no_work(monkeypatch)
    base = ["--task", "countdown", "--num_problems", "2", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=r"--model .*missing.*no such folder"):
        ev.main(["--model", str(tmp_path / "missing"), *base])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"--model .*could not load"):
        ev.main(["--model", str(tmp_path / "empty"), *base])
    monkeypatch.setattr(es, "load_model", boom)
    with pytest.raises(SystemExit, match=r"--policies: unknown policy 'bogus'; valid: .*keydiff"):
        ev.main(["--model", str(model_dir), "--policies", "full,bogus", *base])
    with pytest.raises(SystemExit, match=r"--rates"):
        ev.main(["--model", str(model_dir), "--rates", "0.5,1.0", *base])
    with pytest.raises(SystemExit, match=r"block_size"):
        ev.main(["--model", str(model_dir), "--block_size", "0", *base])
    with pytest.raises(SystemExit, match=r"--task"):
        ev.main(["--model", str(model_dir), "--task", "gsm8k"])
    with pytest.raises(SystemExit, match=r"--num_samples.*--temperature"):  # countdown is greedy by default
        ev.main(["--model", str(model_dir), "--num_samples", "4", *base])
    with pytest.raises(SystemExit, match=r"--k"):
        ev.main(
            ["--model", str(model_dir), "--num_samples", "4", "--temperature", "0.7", "--k", "1,8", *base]
        )
    assert not (tmp_path / "o").exists()


def test_cli_warns_when_a_model_without_a_schedule_is_evicted_at_the_defaults(lm, tok, tmp_path, monkeypatch):
    """A model folder with no ngc_settings.json (an SFT base) falls back to EvictionConfig's δ/b: say so, unless
    the command line gives them or nothing is evicted."""
    bare = tmp_path / "base"
    lm.save_pretrained(bare)
    tok.save_pretrained(bare)
    boom = _no_work(monkeypatch)
    monkeypatch.setattr(es, "load_model", boom)  # the warning comes before any loading
    argv = [
        "--task",
        "countdown",
        "--model",
        str(bare),
        "--num_problems",
        "2",
        "--output_dir",
        str(tmp_path / "o"),
    ]
    with pytest.warns(UserWarning, match=r"no ngc_settings.json.*eviction_interval=256, block_size=32"):
        with pytest.raises(AssertionError, match="before validation"):
            ev.main([*argv, "--policies", "full,ngc"])
    with pytest.warns(UserWarning, match=r"default block_size=32 \("):  # only the field still unset
        with pytest.raises(AssertionError):
            ev.main([*argv, "--policies", "full,ngc", "--eviction_interval", "64"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for extra in (
            ["--policies", "full"],
            ["--policies", "ngc", "--eviction_interval", "64", "--block_size", "8"],
        ):
            with pytest.raises(AssertionError):
                ev.main([*argv, *extra])


def test_cli_problems_file_evaluates_those_problems_and_refuses_bad_rows(model_dir, tmp_path, monkeypatch):
    rows = [
        {"id": "v-0", "prompt": "nums 3 5 7 target 15\n", "nums": [3, 5, 7], "target": 15},
        {"id": "v-1", "prompt": "nums 2 4 6 target 8\n", "nums": [2, 4, 6], "target": 8},
        {"id": "v-2", "prompt": "nums 1 2 3 target 6\n", "nums": [1, 2, 3], "target": 6},
    ]
    good = tmp_path / "val.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--task", "countdown", "--model", str(model_dir), "--policies", "full", "--max_new_tokens", "6"]
    argv += ["--prompt_format", "plain", "--device", "cpu", "--problems_file", str(good)]
    s = ev.main([*argv, "--num_problems", "2", "--output_dir", str(tmp_path / "o")])
    assert [r["problem_id"] for r in _lines(tmp_path / "o" / "samples.jsonl")] == ["v-0", "v-1"]
    assert s["settings"]["problems_file_sha256"] and s["results"][0]["num_problems"] == 2
    assert es.read_problems_file(good, "countdown")[2] == rows[2]

    _no_work(monkeypatch)
    bad = {
        "'prompt' must be": {"nums": [1, 2], "target": 3},
        "not a countdown instance": {"prompt": "x", "nums": [1, 2]},
        "not JSON": "{nums",
        "unique": {"id": "v-0", "prompt": "x", "nums": [1], "target": 1},
    }
    for match, row in bad.items():
        f = tmp_path / "bad.jsonl"
        line = row if isinstance(row, str) else json.dumps(row)
        f.write_text(json.dumps(rows[0]) + "\n" + line + "\n")
        with pytest.raises(SystemExit, match=rf"line 2: .*{match}"):
            ev.main([*argv[:-1], str(f), "--output_dir", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="--problems_file.*no such file"):
        ev.main([*argv[:-1], str(tmp_path / "missing.jsonl")])
    with pytest.raises(SystemExit, match="--problems_file.*not both"):
        ev.main([*argv, "--data_source", "generated"])


def test_cli_reads_model_settings_and_loads_peft_adapters(model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    argv = [
        "--task",
        "countdown",
        "--policies",
        "full,ngc",
        "--rates",
        "0.5",
        "--num_problems",
        "2",
        "--max_new_tokens",
        "10",
        "--prompt_format",
        "plain",
        "--batch_size",
        "2",
        "--device",
        "cpu",
    ]
    s = ev.main(["--model", str(model_dir), "--output_dir", str(tmp_path / "base"), *argv])
    assert (
        s["settings"]["eviction"]["eviction_interval"] == 8 and s["settings"]["eviction"]["block_size"] == 4
    )
    assert s["settings"]["temperature"] == 0.0 and s["settings"]["k"] == [1]
    s2 = ev.main(
        ["--model", str(model_dir), "--output_dir", str(tmp_path / "cli"), "--block_size", "2", *argv]
    )
    assert (
        s2["settings"]["eviction"]["block_size"] == 2 and s2["settings"]["eviction"]["eviction_interval"] == 8
    )

    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )  # B = 0: merged == base
    adapter = tmp_path / "adapter"
    peft.save_pretrained(adapter)
    (adapter / es.SETTINGS_FILE).write_text((model_dir / es.SETTINGS_FILE).read_text())
    s3 = ev.main(["--model", str(adapter), "--output_dir", str(tmp_path / "adapter_eval"), *argv])
    done = [
        [r["completion"] for r in _lines(tmp_path / d / "samples.jsonl")] for d in ("base", "adapter_eval")
    ]
    assert done[0] == done[1] and s3["results"][0]["num_completions"] == 2


# ----------------------------------------------------------------------------- Breadcrumbs on the same axis
def test_breadcrumbs_student_at_several_c_beside_heuristics(tok, problems, tmp_path):
    from ngc_trl.breadcrumbs.beacons import add_beacon_token

    student_tok = char_tokenizer()
    student = tiny_qwen2(vocab=len(student_tok))
    beacon = add_beacon_token(student_tok, student)
    with pytest.raises(ValueError, match="--policies breadcrumbs: the model has no beacon token"):
        ev.plan_runs("full,breadcrumbs", "0.5", SMALL)
    with pytest.raises(ValueError, match="--compression_ratios"):
        ev.plan_runs("breadcrumbs", "0.5", BeaconConfig(beacon_token_id=beacon), "4,1")
    cfg = EvictionConfig(eviction_interval=8, block_size=4, score_window=3)
    out = tmp_path / "bc"
    summary = ev.evaluate(
        student,
        student_tok,
        problems,
        "countdown",
        "full,breadcrumbs,streaming_llm",
        "0.5",
        compression_ratios="2,4",
        eviction=cfg,
        beacon=BeaconConfig(beacon_token_id=beacon),
        max_new_tokens=24,
        batch_size=4,
        output_dir=out,
        progress=False,
    )
    rows = {(r["policy"], r["rate"], r.get("compression_ratio")): r for r in summary["results"]}
    assert set(rows) == {
        ("full", None, None),
        ("breadcrumbs", None, 2),
        ("breadcrumbs", None, 4),
        ("streaming_llm", 0.5, None),
    }
    full, c2, c4 = rows[("full", None, None)], rows[("breadcrumbs", None, 2)], rows[("breadcrumbs", None, 4)]
    assert c2["peak_compression"] > 1.0 and c4["peak_compression"] > 1.0
    assert (
        max(c2["mean_peak_entries_per_layer"], c4["mean_peak_entries_per_layer"])
        < full["mean_peak_entries_per_layer"]
    )
    recs = _lines(out / "samples.jsonl")
    for r in recs:  # peak ≈ prompt + one beacon per closed window + the open window (docs/method.md §8)
        if r["policy"] == "breadcrumbs":
            assert r["rate"] is None  # the ratio has its own field
            c, n = r["compression_ratio"], r["completion_tokens"]
            assert max(r["peak_entries"]) <= r["prompt_tokens"] + n // c + c + 1
    table = (out / "results.md").read_text()
    assert "| breadcrumbs | c=2 |" in table and "| breadcrumbs | c=4 |" in table
    saved = json.loads((out / "summary.json").read_text())
    assert set(saved["auc"]["auc"]) == {"breadcrumbs", "streaming_llm"}
    assert saved["settings"]["compression_ratios"] == [2, 4]

    # a second model's folder (here: the heuristics on another model) on one axis with the student
    base_out = tmp_path / "base"
    ev.evaluate(
        tiny_qwen2(vocab=len(tok)),
        tok,
        problems,
        "countdown",
        "full,tova",
        "0.5",
        eviction=SMALL,
        max_new_tokens=24,
        batch_size=4,
        output_dir=base_out,
        progress=False,
    )
    both = combine([str(base_out), f"{out}=student"], tmp_path / "all")
    names = [r["policy"] for r in both["results"]]
    assert (
        names[:2] == ["full", "tova"] and "student (full cache, bc)" in names and names.count("student") == 3
    )
    assert set(both["auc"]["auc"]) == {"tova", "student"}
    assert (tmp_path / "all" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "student (full cache, bc)" in (tmp_path / "all" / "results.md").read_text()
    with pytest.raises(ValueError, match="does not exist"):
        combine([str(tmp_path / "nope")], tmp_path / "x")


def test_default_data_source_is_the_models_training_distribution(tmp_path):
    from ngc_trl.evaluation.setup import trained_data_source

    (tmp_path / "ngc_training.json").write_text(
        json.dumps({"task": "countdown", "dataset_source": "generated:testbed"})
    )
    assert trained_data_source(tmp_path, "countdown") == "generated:testbed"
    assert trained_data_source(tmp_path, "stargraph") is None  # trained on another task
    assert trained_data_source(tmp_path, "aime25") is None
    (tmp_path / "ngc_training.json").write_text(
        json.dumps({"task": "countdown", "dataset_source": "my/hub-set"})
    )
    assert trained_data_source(tmp_path, "countdown") is None  # only generator distributions are carried over
    (tmp_path / "ngc_training.json").write_text("{not json")
    assert trained_data_source(tmp_path, "countdown") is None
    assert trained_data_source(tmp_path / "missing", "countdown") is None
