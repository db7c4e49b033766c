"""``python -m ngc_trl.splits --out data``: the fixed held-out splits the committed results use, as JSONL.

The results of the tiny testbed (``make testbed_result`` / ``stargraph_result`` / ``linsys_result``, the
learning-curve run, ``python -m ngc_trl.testbed``) are measured on generated problems that are never stored:
every run draws them again from ``"generated:testbed"`` with a fixed seed. This command writes those draws
to files, so they can be read without the code and any drift of a generator, a prompt or a split rule shows
as a changed file (``tests/test_splits.py`` regenerates them and compares bytes). For each generated task
``<task>`` (Countdown, LinSys, StarGraph), under ``--out``:

* ``testbed/<task>/test.jsonl``: the 256 problems of ``ngc-eval --task <task> --data_source
  generated:testbed --num_problems 256 --prompt_format plain`` (seed 0; `ngc_trl.evaluation.setup.load_problems`),
  ids ``<task>-<i>``: the testbed tables and the learning-curve run's final evaluation.
* ``testbed/<task>/validation.jsonl``: the 64 validation problems of the learning curve of a tiny NGC recipe
  (``--curve_every N``, default ``curve_num_problems`` 64, seed 0, the recipe's 512 training problems excluded;
  `ngc_trl.evaluation.learning_curve.load_validation_problems`), ids ``<task>-val-<i>``.
* ``testbed/<task>/base_test.jsonl``: the 384 held-out problems the testbed scores its SFT base on
  (``python -m ngc_trl.testbed --task <task>`` defaults; `ngc_trl.testbed.held_out_problems`), ids
  ``<task>-base-<i>`` (the testbed itself keeps no ids).
* ``SHA256SUMS``: the SHA-256 of every file above, paths relative to ``--out`` (``sha256sum -c SHA256SUMS``).

Rows are ``{"id", "prompt", <instance columns>}`` (the task's ``columns``), ``prompt`` the plain prompt the
results decode (``--prompt_format plain``), one compact JSON object per line in that key order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

GENERATED = ("countdown", "linsys", "stargraph")
SOURCE = "generated:testbed"
SEED = 0  # ngc-eval's and the tiny recipes' seed
TEST_PROBLEMS = 256  # the testbed evaluations' --num_problems (Makefile TB_N)
TRAIN_PROBLEMS = 512  # the tiny recipes' num_train_problems, excluded from the validation split
VALIDATION_PROBLEMS = 64  # ScriptArguments.curve_num_problems' default
SPLITS = ("test", "validation", "base_test")
SUMS_FILE = "SHA256SUMS"


def split_rows(task: str, split: str) -> list[dict]:
    """The rows of ``split`` (one of :data:`SPLITS`) of generated task ``task``, built by the code the results
    run (module docstring): ``[{"id", "prompt", <columns>}, ...]``."""
    from ngc_trl.tasks import get_task

    if task not in GENERATED:
        raise ValueError(f"task must be one of {', '.join(GENERATED)}, got {task!r}")
    generated = get_task(task)
    if split == "test":
        from ngc_trl.evaluation.setup import load_problems

        return load_problems(task, None, TEST_PROBLEMS, SEED, SOURCE, prompt_format="plain")
    if split == "validation":
        from ngc_trl.evaluation.learning_curve import load_validation_problems

        train = generated.load(SOURCE, n=TRAIN_PROBLEMS, seed=SEED, split="train", prompt_format="plain")
        return load_validation_problems(
            task, SOURCE, VALIDATION_PROBLEMS, SEED, exclude=train, prompt_format="plain"
        )
    if split == "base_test":
        from ngc_trl import testbed

        args = testbed.TestbedArgs(task=task)
        return [
            {"id": f"{task}-base-{i}", "prompt": testbed.plain_prompt(args, p), **generated.instance(p)}
            for i, p in enumerate(testbed.held_out_problems(args))
        ]
    raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def to_jsonl(rows: Sequence[dict]) -> bytes:
    """``rows`` as JSONL bytes: one compact ASCII JSON object per line, keys in row order, ``\\n``-terminated."""
    return "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows).encode("ascii")


def build() -> dict[str, bytes]:
    """Every file of the export by its path relative to ``--out``: the splits and ``SHA256SUMS``."""
    files = {
        f"testbed/{task}/{split}.jsonl": to_jsonl(split_rows(task, split))
        for task in GENERATED
        for split in SPLITS
    }
    sums = "".join(f"{hashlib.sha256(data).hexdigest()}  {path}\n" for path, data in sorted(files.items()))
    return {**files, SUMS_FILE: sums.encode("ascii")}


def export(out: str | Path) -> dict[str, bytes]:
    """Write :func:`build`'s files under ``out`` (folders created, files replaced) and return them."""
    files = build()
    for path, data in files.items():
        target = Path(out) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return files


def main(argv: Sequence[str] | None = None) -> dict[str, bytes]:
    """Entry point of ``python -m ngc_trl.splits`` (``make data``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument(
        "--out", default="data", help="folder to write testbed/<task>/*.jsonl and SHA256SUMS into"
    )
    args = ap.parse_args(argv)
    files = export(args.out)
    print(f"wrote {len(files)} files ({sum(map(len, files.values())):,} bytes) under {args.out}")
    return files


if __name__ == "__main__":
    main()
