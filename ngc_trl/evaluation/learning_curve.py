"""A learning curve during training: greedy accuracy under eviction on a fixed validation split.

`LearningCurveCallback` evaluates the model being trained before the first step of a fresh run (step 0:
the untrained control), every ``every`` optimizer steps and at the end of training, with
`ngc_trl.evaluation.run.evaluate`: greedy decoding, deterministic top-k eviction at the trainer's final rate
``eviction_rate`` with its δ/b/w/protections (policy ``ngc``, plus any other policies asked for; ``full``
runs at rate 0). Each evaluation is logged as trainer metrics (``eval/curve_accuracy``,
``eval/curve_peak_compression`` for ``ngc``; ``eval/curve_accuracy_<policy>`` ... for the others) and
merged into ``output_dir/learning_curve.json``::

    [{"step": 10, "policy": "ngc", "rate": 0.5, "accuracy": 0.25, "stderr": 0.05, "peak_compression": 1.9,
      "n": 64, ...}, ...]

The file is rewritten atomically after every evaluation (a crash loses nothing) and a resumed run keeps the
points already there (a point of the same step, policy and rate is replaced by the newer one).

Validation problems (`load_validation_problems`): generated tasks only. They come from the training
distribution's ``train`` hash split (so never from the held-out ``test`` split the final evaluation uses),
drawn with a dedicated seed (the training seed + `VALIDATION_SEED_OFFSET`), with every instance of the RL
training set and every repeat removed. The tasks are unchanged: the split is a filter on top of their
generators (``task.load``, ``task.instance_key``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

CURVE_FILE = "learning_curve.json"
VALIDATION_SEED_OFFSET = 7_919_001  # validation seed = training seed + this (train uses +0, test +1)


# ----------------------------------------------------------------------------- validation split
def instance_key(task: str, row: Mapping[str, Any]) -> tuple:
    """A hashable identity of a generated instance, invariant to the orders that do not change it (the
    numbers of a Countdown instance, the equations of a LinSys system, the edges of a StarGraph graph):
    the task's ``instance_key``."""
    from ngc_trl.tasks import GENERATED_TASKS, get_task

    if task not in GENERATED_TASKS:
        raise ValueError(f"instance_key: task {task!r} is not generated")
    return get_task(task).instance_key(row)


def load_validation_problems(
    task: str,
    source: str,
    n: int,
    seed: int,
    exclude: Iterable[Mapping[str, Any]] = (),
    *,
    prompt_format: str = "chat",
    prefill: bool = True,
    max_candidates: int | None = None,
) -> list[dict]:
    """``n`` validation problems ``{id: "<task>-val-<i>", prompt, <instance columns>}`` of a generated task.

    Drawn from the ``train`` hash split of ``source`` (``"generated"`` or ``"generated:<name>"``) with seed
    ``seed + VALIDATION_SEED_OFFSET``, skipping every instance of ``exclude`` (the RL training rows) and
    every repeat. Candidates are drawn in growing batches up to ``max_candidates`` (default ``max(64 n,
    20000)``); a distribution almost exhausted by the training set gives fewer problems (a warning) and
    none at all raises ``ValueError``.
    """
    from ngc_trl.tasks import GENERATED_TASKS, get_task

    if task not in GENERATED_TASKS:
        raise ValueError(
            f"validation problems: task {task!r} is not generated ({', '.join(GENERATED_TASKS)})"
        )
    if source != "generated" and not source.startswith("generated:"):
        raise ValueError(f"validation problems: source {source!r} is not 'generated' or 'generated:<name>'")
    if n <= 0:
        raise ValueError(f"validation problems: n={n} must be > 0")
    generated = get_task(task)
    banned = {generated.instance_key(row) for row in exclude}
    cap = max_candidates or max(64 * n, 20_000)
    draw, out = min(cap, max(4 * n, 64)), []
    while True:
        ds = generated.load(
            source,
            n=draw,
            seed=seed + VALIDATION_SEED_OFFSET,
            split="train",
            prompt_format=prompt_format,
            prefill=prefill,
        )
        seen, out = set(banned), []
        for row in ds:
            key = generated.instance_key(row)
            if key not in seen:
                seen.add(key)
                out.append(dict(row))
                if len(out) == n:
                    break
        if len(out) == n or draw >= cap:
            break
        draw = min(cap, 4 * draw)
    if not out:
        raise ValueError(f"validation problems: every {source} instance drawn is in the training set")
    if len(out) < n:
        warnings.warn(
            f"validation problems: only {len(out)} of {n} instances of {source} are outside the training set",
            stacklevel=2,
        )
    return [{"id": f"{task}-val-{i}", **row} for i, row in enumerate(out)]


# ----------------------------------------------------------------------------- the curve file
def read_curve(path: str | os.PathLike) -> list[dict]:
    """The points of a ``learning_curve.json`` (``[]`` if absent; a corrupt file raises ``ValueError``)."""
    path = Path(path)
    if not path.is_file():
        return []
    points = json.loads(path.read_text())
    if not isinstance(points, list):
        raise ValueError(f"{path}: not a list of points")
    return points


def merge_points(old: Sequence[dict], new: Sequence[dict]) -> list[dict]:
    """``old`` then ``new``, a new point replacing an old one of the same (step, policy, rate), sorted by
    step (stable)."""

    def key(p):
        return int(p["step"]), p["policy"], round(float(p["rate"]), 9)

    fresh = {key(p) for p in new}
    return sorted([p for p in old if key(p) not in fresh] + list(new), key=lambda p: int(p["step"]))


def write_curve(path: str | os.PathLike, points: Sequence[dict]) -> None:
    """Write ``points`` atomically (a temporary file renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(list(points), indent=1))
    os.replace(tmp, path)


def _finite(x) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


# ----------------------------------------------------------------------------- the callback
class LearningCurveCallback(TrainerCallback):
    """Evaluate the trained model on fixed validation problems every ``every`` optimizer steps and at the
    end of training (see the module docstring).

    Args:
        trainer: the `NGCTrainer` (any GRPO trainer with ``eviction``, an `EvictionConfig`): its model,
            tokenizer, accelerator, schedule (``trainer.eviction``), target rate (``args.eviction_rate``),
            meta token (``meta_token_id``) and interoception setting are used; nothing is imported from it.
        problems: validation problems (`load_validation_problems`).
        task: the task name (its verifier scores the completions).
        every: evaluate when ``global_step % every == 0`` (> 0).
        policies: comma list / list of policies; ``ngc`` and the heuristics run at the target rate,
            ``full`` at rate 0.
        max_new_tokens: completion budget (default: the trainer's ``max_completion_length``).
        batch_size: sequences decoded together (per process; `evaluate` shards problems over processes).
        output_dir: where ``learning_curve.json`` goes (default: ``trainer.args.output_dir``).

    Every process must run the callback (as the trainer does): the decoding is sharded and gathered.
    Under DeepSpeed ZeRO-3 keep ``ds3_gather_for_generation=True`` (the default): processes decode
    different numbers of batches, which sharded parameters would deadlock on.
    """

    def __init__(
        self,
        trainer,
        problems: Sequence[dict],
        task: str,
        every: int,
        policies="ngc",
        max_new_tokens: int | None = None,
        batch_size: int = 64,
        output_dir: str | None = None,
    ):
        from ngc_trl.evaluation.run import plan_runs
        from ngc_trl.evaluation.setup import parse_policies

        if every <= 0:
            raise ValueError(f"LearningCurveCallback: every={every} must be > 0")
        if not problems:
            raise ValueError("LearningCurveCallback: no validation problems")
        self.trainer, self.problems, self.task, self.every = trainer, list(problems), task, int(every)
        self.policies = ",".join(parse_policies(policies))
        self.rate = float(trainer.args.eviction_rate)
        self.eviction = trainer.eviction
        plan_runs(self.policies, [self.rate], self.eviction)  # validates the policies against the schedule
        self.max_new_tokens = int(max_new_tokens or trainer.args.max_completion_length)
        self.batch_size = int(batch_size)
        self.path = Path(output_dir or trainer.args.output_dir) / CURVE_FILE
        self.last_step = None  # global step of the latest evaluation

    # ---------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, **kwargs):
        """A fresh run (step 0) first evaluates the untrained model: the curve's control point."""
        if state.global_step == 0:
            self.evaluate(state)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.evaluate(state)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.last_step != state.global_step:
            self.evaluate(state)
        return control

    # ---------------------------------------------------------------- work
    def evaluate(self, state) -> list[dict]:
        """Evaluate now (on every process: `evaluate` shards the problems), log the points, merge them into
        the curve file (main process); returns the new points (the same on every process)."""
        from accelerate.utils import broadcast_object_list
        from transformers import Trainer
        from trl.models.utils import unwrap_model_for_generation

        from ngc_trl.evaluation.run import evaluate

        tr = self.trainer
        acc = tr.accelerator
        with (
            unwrap_model_for_generation(
                tr.model_wrapped,
                acc,
                gather_deepspeed3_params=tr.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=tr.args.gradient_checkpointing_kwargs,
            ) as model,
            torch.no_grad(),
        ):
            was_training = model.training
            model.eval()
            try:
                summary = evaluate(
                    model,
                    tr.processing_class,
                    self.problems,
                    self.task,
                    self.policies,
                    [self.rate],
                    eviction=self.eviction,
                    max_new_tokens=self.max_new_tokens,
                    temperature=0.0,
                    batch_size=self.batch_size,
                    seed=tr.args.seed,
                    output_dir=None,
                    interoception=getattr(tr.args, "interoception_rates", None) is not None,
                    forced_token_id=getattr(tr, "meta_token_id", None),
                    progress=False,
                )
            finally:
                model.train(was_training)
        points = [self._point(row, state.global_step) for row in summary.get("results", [])]
        if acc.num_processes > 1:
            box = [points]
            broadcast_object_list(box, from_process=0)
            points = box[0]
        if acc.is_main_process:
            write_curve(self.path, merge_points(read_curve(self.path), points))
        self.last_step = state.global_step
        logs = {}
        for p in points:
            suffix = "" if p["policy"] == "ngc" else f"_{p['policy']}"
            logs[f"eval/curve_accuracy{suffix}"] = p["accuracy"]
            if p["peak_compression"] is not None:
                logs[f"eval/curve_peak_compression{suffix}"] = p["peak_compression"]
        logger.info(
            f"learning curve at step {state.global_step}: "
            + ", ".join(f"{p['policy']}@{p['rate']:g} {p['accuracy']}" for p in points)
        )
        if logs:
            # transformers' log (TRL's would flush the step's pending train metrics); on_log clears
            # should_log, which the step's own log still needs
            should_log = tr.control.should_log
            Trainer.log(tr, logs)
            tr.control.should_log = should_log
        return points

    def _point(self, row: dict, step: int) -> dict:
        """A curve point from a `evaluate` summary row."""
        full = row["policy"] == "full"
        return {
            "step": int(step),
            "policy": row["policy"],
            "rate": 0.0 if full else float(row["rate"]),
            "accuracy": _finite(row.get("pass@1")),
            "stderr": _finite(row.get("pass@1_se")),
            "peak_compression": _finite(row.get("peak_compression")),
            "n": int(row.get("num_problems", 0)),
            "compression_source": row.get("compression_source"),
            "mean_completion_tokens": _finite(row.get("mean_completion_tokens")),
            "max_new_tokens": self.max_new_tokens,
        }


# ----------------------------------------------------------------------------- the plot
def plot_curves(
    runs: Sequence[tuple[str, str | os.PathLike]],
    out: str | os.PathLike,
    title: str = "",
    references: Sequence[tuple[str, float, float | None]] = (),
) -> Path:
    """One plot of validation accuracy under eviction vs optimizer step.

    ``runs``: ``(label, learning_curve.json)`` pairs; every (policy, rate) of a file is one line with
    ±1 standard-error bars (label ``"<label> · <policy>@<rate>"``). ``references``: ``(label, accuracy,
    stderr)`` drawn as horizontal lines (e.g. the untrained base at step 0). Writes a PNG; returns its path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, path in runs:
        lines: dict[tuple, list[dict]] = {}
        for p in read_curve(path):
            if p.get("accuracy") is not None:
                lines.setdefault((p["policy"], float(p["rate"])), []).append(p)
        for (policy, rate), pts in sorted(lines.items()):
            ax.errorbar(
                [p["step"] for p in pts],
                [100 * p["accuracy"] for p in pts],
                yerr=[100 * (p.get("stderr") or 0.0) for p in pts],
                marker="o",
                capsize=3,
                label=f"{label} · {policy}@{rate:g}",
            )
    for label, acc, se in references:
        ax.axhline(100 * acc, linestyle="--", linewidth=1, color="gray")
        if se:
            ax.axhspan(100 * (acc - se), 100 * (acc + se), color="gray", alpha=0.12)
        ax.annotate(
            label, (0, 100 * acc), textcoords="offset points", xytext=(2, 3), fontsize=8, color="dimgray"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation accuracy under eviction (%)")
    ax.set_title(title or "learning curve (greedy, top-k eviction)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m ngc_trl.evaluation.learning_curve --runs LABEL=PATH ... --out curve.png [--ref LABEL=ACC[±SE]]``."""
    import argparse

    p = argparse.ArgumentParser(
        description="Plot learning_curve.json files (accuracy under eviction vs step)."
    )
    p.add_argument("--runs", nargs="+", required=True, help="LABEL=path/to/learning_curve.json")
    p.add_argument(
        "--ref", nargs="*", default=[], help="LABEL=ACC or LABEL=ACC±SE (fractions), a horizontal line"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="")
    a = p.parse_args(argv)

    def pair(text, what):
        label, sep, value = text.partition("=")
        if not sep or not label or not value:
            raise SystemExit(f"--{what} {text!r}: expected LABEL=VALUE")
        return label, value

    runs = [pair(r, "runs") for r in a.runs]
    refs = []
    for r in a.ref:
        label, value = pair(r, "ref")
        acc, _, se = value.partition("±")
        try:
            refs.append((label, float(acc), float(se) if se else None))
        except ValueError:
            raise SystemExit(f"--ref {r!r}: ACC and SE must be numbers") from None
    return plot_curves(runs, a.out, a.title, refs)


if __name__ == "__main__":
    main()
