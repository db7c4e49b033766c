"""data/: the committed held-out splits regenerate byte for byte, their checksums hold, and they are drawn
with the settings the tiny recipes and ngc-eval use."""

import hashlib
import json
from pathlib import Path

import pytest

from ngc_trl import splits
from ngc_trl.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def _sums(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        digest, path = line.split("  ", 1)
        out[path] = digest
    return out


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    files = splits.main(["--out", str(out)])
    return out, files


def test_committed_splits_regenerate_byte_for_byte(regenerated):
    out, files = regenerated
    committed = {p.relative_to(DATA).as_posix() for p in (DATA / "testbed").rglob("*") if p.is_file()}
    assert committed | {splits.SUMS_FILE} == set(files)  # no file missing, none left over
    for path, data in files.items():
        assert (out / path).read_bytes() == data
        assert (DATA / path).read_bytes() == data, f"data/{path} drifted from `make data`"


def test_committed_checksums_hold():
    sums = _sums((DATA / splits.SUMS_FILE).read_text())
    assert len(sums) == len(splits.GENERATED) * len(splits.SPLITS)
    for path, digest in sums.items():
        assert hashlib.sha256((DATA / path).read_bytes()).hexdigest() == digest, path


@pytest.mark.parametrize("task", splits.GENERATED)
def test_split_files_are_what_the_loaders_give(task):
    rows = {
        s: [json.loads(line) for line in (DATA / "testbed" / task / f"{s}.jsonl").open()]
        for s in splits.SPLITS
    }
    sizes = {s: len(r) for s, r in rows.items()}
    assert sizes == {"test": 256, "validation": 64, "base_test": 384}
    generated = get_task(task)
    keys = {s: {generated.instance_key(r) for r in rs} for s, rs in rows.items()}
    # distinct instances: Countdown's held-out draws have no repeat by construction, the validation split
    # drops repeats, LinSys's small 2x2 range repeats a few systems in its test draws (data/README.md)
    distinct = {"test": 252, "validation": 64, "base_test": 379} if task == "linsys" else sizes
    assert {s: len(k) for s, k in keys.items()} == distinct
    assert not keys["validation"] & keys["test"] and not keys["validation"] & keys["base_test"]
    for split, prefix in (
        ("test", f"{task}-"),
        ("validation", f"{task}-val-"),
        ("base_test", f"{task}-base-"),
    ):
        assert [r["id"] for r in rows[split]] == [f"{prefix}{i}" for i in range(sizes[split])]
        for row in rows[split]:
            assert list(row) == ["id", "prompt", *generated.columns]
            assert row["prompt"] == generated.build_plain_prompt(row)
    head = generated.load(splits.SOURCE, n=3, seed=0, split="test", prompt_format="plain").to_list()
    assert [{k: v for k, v in r.items() if k != "id"} for r in rows["test"][:3]] == head


def test_splits_use_the_recipes_and_eval_defaults():
    """The constants of the export are the settings the results ran with."""
    from ngc_trl.evaluation.setup import EvalArguments
    from ngc_trl.train import ScriptArguments, make_parser

    assert EvalArguments(model="m").seed == splits.SEED
    assert ScriptArguments.__dataclass_fields__["curve_num_problems"].default == splits.VALIDATION_PROBLEMS
    for recipe in ("countdown_ngc.yaml", "linsys_ngc.yaml"):
        argv = ["--config", str(ROOT / "recipes" / "tiny" / recipe)]
        script, training, _ = make_parser().parse_args_and_config(args=argv)
        assert (script.dataset_source, script.num_train_problems, script.prompt_format, training.seed) == (
            splits.SOURCE,
            splits.TRAIN_PROBLEMS,
            "plain",
            splits.SEED,
        )


def test_split_rows_refuses_unknown_names():
    with pytest.raises(ValueError, match="task must be one of"):
        splits.split_rows("math", "test")
    with pytest.raises(ValueError, match="split must be one of"):
        splits.split_rows("countdown", "train")
