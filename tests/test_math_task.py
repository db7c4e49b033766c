"""Math task: answer extraction, math-verify grading under a time bound, evaluation files, DAPO loading."""

import json
import os
import threading
import time
from pathlib import Path

import pytest

from ngc_trl.tasks.math import DAPO_PREFIX, DAPO_SUFFIX, TASK, default_data_dir, grade

ROOT = Path(__file__).resolve().parents[1]
# the AIME/AMC files (data/README.md): $NGC_MATH_DATA, the checkout's data/math once fetched, or the
# project's shared copy next to the checkout
MATH_DIR = next(
    (
        Path(d)
        for d in (
            os.environ.get("NGC_MATH_DATA"),
            ROOT / "data" / "math",
            ROOT.parent / "shared" / "data" / "math",
        )
        if d and (Path(d) / "aime24.jsonl").is_file()
    ),
    ROOT / "data" / "math",
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{3} then revised: \\boxed{5}", "5"),  # the last box
        ("\\boxed{7} and a truncated \\boxed{\\frac{1}{2}", "7"),  # unbalanced last box
        ("\\boxed {12}", "12"),
        ("work\nAnswer: 42\n", "42"),
        ("Answer: 1\nmore\nanswer: $17$.", "17"),  # the last Answer: line, $ and period removed
        ("Answer: \\boxed{9}", "9"),  # a box wins
        ("no final answer", None),
        ("\\boxed{}", None),
        ("\\boxed{" + "{" * 5000, None),  # unbalanced, bounded scan
    ],
)
def test_extract_answer(text, expected):
    assert TASK.extract_answer(text) == expected


def test_extract_answer_huge_input_is_fast():
    t0 = time.perf_counter()
    assert TASK.extract_answer("\\boxed{" * 30_000 + "x" * 100_000) is None
    assert TASK.extract_answer("x" * 100_000 + "\\boxed{204}") == "204"
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("70.0", "70"),
        ("70", "70"),
        ("\\dfrac{3}{4}", "3/4"),
        ("1,000", "1000"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("$204$", "204"),
    ],
)
def test_grade_equivalent_forms(pred, gold):
    assert grade(pred, gold)


@pytest.mark.parametrize(
    "pred, gold",
    [("71", "70"), ("\\frac{1}{3}", "0.5"), ("", "1"), (None, "1"), ("x" * 2000, "1"), ("\\sqrt{2}", "2")],
)
def test_grade_wrong(pred, gold):
    assert not grade(pred, gold)


def test_grade_hostile_input_is_time_bounded():
    t0 = time.perf_counter()
    assert not grade("10^{10^{10}}", "70", timeout_s=1.0)  # sympy would compute a 10**10-digit integer
    assert time.perf_counter() - t0 < 3.0
    assert grade("\\frac{7}{1}", "\\sqrt{49}")  # the worker restarts after the kill


def test_grade_from_a_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(grade("\\frac{\\pi}{2}", "\\pi/2")))
    thread.start()
    thread.join(30)
    assert results == [True]


def test_math_reward():
    completions = [[{"role": "assistant", "content": "... Answer: 204"}], "\\boxed{203}", "nothing"]
    assert TASK.reward_func.__name__ == "math_reward"
    assert TASK.reward_func(prompts=[None] * 3, completions=completions, answer=["204", "204", "204"]) == [
        1.0,
        0.0,
        0.0,
    ]


def test_build_prompt_styles():
    dapo = TASK.build_prompt({"problem": "What is 1+1?"})[0]["content"]
    assert dapo.startswith(DAPO_PREFIX) and dapo.endswith(DAPO_SUFFIX) and "What is 1+1?" in dapo
    assert TASK.build_prompt({"problem": "Q"}, style="boxed")[0]["content"].endswith("within \\boxed{}.")
    with pytest.raises(ValueError):
        TASK.build_prompt({"problem": "Q"}, style="nope")


@pytest.mark.parametrize("name, rows", [("aime24", 30), ("aime25", 30), ("amc23", 40)])
def test_shared_eval_sets_grade_against_themselves(name, rows, monkeypatch):
    monkeypatch.setenv("NGC_MATH_DATA", str(MATH_DIR))
    assert (default_data_dir() / f"{name}.jsonl").exists()
    ds = TASK.load(split=name)
    assert len(ds) == rows and ds.column_names == ["prompt", "answer", "id"]
    assert len(set(ds["id"])) == rows and all(i.startswith(name) for i in ds["id"])
    for row in ds:
        assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].startswith(DAPO_PREFIX)
        assert TASK.extract_answer(f"... so \\boxed{{{row['answer']}}}") == row["answer"]
        assert grade(TASK.extract_answer(f"\\boxed{{{row['answer']}}}"), row["answer"])
        assert TASK.score(f"\\boxed{{{row['answer']}}}", row) == 1.0


def test_data_dir_env_and_amc25_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NGC_MATH_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="AMC 2025"):
        TASK.load(split="amc25")
    (tmp_path / "amc25.jsonl").write_text('{"id": "amc25-1", "problem": "P", "answer": "5", "source": "x"}\n')
    ds = TASK.load(split="amc25")
    assert ds[0]["id"] == "amc25-1" and ds[0]["answer"] == "5"
    with pytest.raises(ValueError):
        TASK.load("gsm8k", split="test")
    with pytest.raises(ValueError, match="split"):
        TASK.load(split="gsm8k")


def test_default_data_dir_is_data_math_and_missing_files_fail_early_naming_the_field(tmp_path, monkeypatch):
    from ngc_trl.evaluation.setup import EvalArguments
    from ngc_trl.train import make_parser

    monkeypatch.delenv("NGC_MATH_DATA", raising=False)
    assert default_data_dir() == Path("data") / "math"  # relative to the current directory
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"data_dir data/math: aime24.jsonl not found.*data/README.md"
    ):
        TASK.load(split="aime24")
    with pytest.raises(ValueError, match=r"^--data_dir: data_dir data/math: aime25.jsonl not found"):
        EvalArguments(model="m", task="aime25")
    with pytest.raises(ValueError, match=r"^--grade_timeout_s=0: must be positive"):  # not at the first grade
        EvalArguments(model="m", task="countdown", grade_timeout_s=0)
    with pytest.raises(ValueError, match=r"^--data_dir: data_dir elsewhere: amc23.jsonl not found"):
        EvalArguments(model="m", task="math", data_source="amc23", data_dir="elsewhere")
    recipe = str(ROOT / "recipes" / "dapo_math.yaml")
    argv = ["--config", recipe, "--bf16", "false", "--use_cpu", "true", "--eval_data_source", "aime25"]
    with pytest.raises(
        ValueError, match=r"^ScriptArguments.eval_data_source: data_dir data/math: aime25.jsonl"
    ):
        make_parser().parse_args_and_config(args=argv)
    (tmp_path / "data" / "math").mkdir(parents=True)
    line = {"id": "aime25-I-1", "problem": "P", "answer": "70", "source": "x"}
    (tmp_path / "data" / "math" / "aime25.jsonl").write_text(json.dumps(line) + "\n")
    assert EvalArguments(model="m", task="aime25").data_dir is None
    assert make_parser().parse_args_and_config(args=argv)[0].eval_data_source == "aime25"
    assert TASK.load(split="aime25")["id"] == ["aime25-I-1"]


def test_load_dapo_fixture_dedupes(tmp_path):
    import datasets

    rows = []
    for i, (problem, answer) in enumerate([("P1", "1"), ("P2", "2"), ("P1", "1"), ("P3", "3"), ("P2", "2")]):
        rows.append(
            {
                "data_source": "math_dapo",
                "prompt": [{"role": "user", "content": DAPO_PREFIX + problem + DAPO_SUFFIX}],
                "ability": "MATH",
                "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
                "extra_info": {"index": f"uuid-{i}"},
            }
        )
    path = tmp_path / "dapo-math-17k.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    ds = TASK.load(str(path), split="train")
    assert (
        len(ds) == 3
        and ds["answer"] == ["1", "2", "3"]
        and ds["id"] == ["dapo-uuid-0", "dapo-uuid-1", "dapo-uuid-3"]
    )
    assert ds[0]["prompt"] == [{"role": "user", "content": DAPO_PREFIX + "P1" + DAPO_SUFFIX}]
    boxed = TASK.load(str(path), split="test", style="boxed", n=2)
    assert len(boxed) == 2 and boxed[1]["prompt"][0]["content"].startswith("P2\n\nPlease reason")
