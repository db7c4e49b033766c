"""Evaluation helpers: pass@k, the paper's peak KV-cache reduction, the ``samples.jsonl`` store, the reports.

Records are the per-sample dicts `ngc_trl.evaluation.run` writes to ``samples.jsonl`` (keys ``policy``, ``rate``,
``problem_id``, ``sample``, ``correct``, ``peak_total``, ``peak_entries``, ``compression_same_tokens``, ...;
a Breadcrumbs run has ``rate`` None and its ``compression_ratio`` c). A run is ``(policy, rate, c)``.

Peak KV-cache reduction (paper §5.1): the mean over prompts of the per-prompt ratio
``peak(p_i, c_i^full, no eviction) / peak(p_i, c_i^method)``, where each run keeps its own completion
length and the full-cache run is the ``full`` policy on the same problem (and the same model). With
``n > 1`` samples per problem the full-cache peak of a problem is the mean over its ``full`` samples, and
the ratio is averaged over the method's samples, then over problems. When the evaluation has no ``full``
run, the fallback is each sample's own "same tokens, no eviction" ratio (``CacheStats.compression``);
``compression_source`` says which one a row uses.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

FULL = "full"
BEACONS = "breadcrumbs"  # the evaluation name of Breadcrumbs beacon decoding (a `BeaconConfig`)


def setting_label(rate: float | None, compression_ratio: int | None = None) -> str:
    """How a run's knob reads in tables: ``ε=0.50`` for a score rule, ``c=8`` for Breadcrumbs, ``—`` for full."""
    if compression_ratio is not None:
        return f"c={int(compression_ratio)}"
    return "—" if rate is None else f"ε={rate:.2f}"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) from ``n`` samples of which ``c`` are correct.

    ``1 - C(n - c, k) / C(n, k)``, computed as ``1 - prod_{i = n-c+1}^{n} (1 - k / i)`` (no big binomials).
    """
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass_at_k: k={k} needs at least k samples per problem, got n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def standard_error(xs: Sequence[float]) -> float | None:
    """Standard error of the mean (sample std with ``ddof=1`` over ``sqrt(n)``); 0 for one value."""
    n = len(xs)
    if n == 0:
        return None
    if n == 1:
        return 0.0
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def run_key(
    policy: str, rate: float | None, compression_ratio: int | None = None
) -> tuple[str, float | None, int | None]:
    """``(policy, rate, c)`` of a run: the ``full`` run has no rate, a Breadcrumbs run a ratio c instead."""
    rate = None if policy == FULL or rate is None else round(float(rate), 6)
    return (policy, rate, None if compression_ratio is None else int(compression_ratio))


def record_run(r: dict) -> tuple[str, float | None, int | None]:
    """The run key of a record or summary row."""
    return run_key(r["policy"], r["rate"], r.get("compression_ratio"))


def _by_problem(records: Iterable[dict]) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for r in records:
        out[r["problem_id"]].append(r)
    return out


def summarize(records: Iterable[dict], runs: Sequence[tuple], ks: Sequence[int]) -> list[dict]:
    """One row of metrics per run, in the order of ``runs``.

    Args:
        records: per-sample records (any order; those of runs not in ``runs`` are ignored).
        runs: ``(policy, rate)`` or ``(policy, rate, c)`` (``rate`` None for ``full`` and Breadcrumbs).
        ks: the k of pass@k; a k larger than the fewest samples of a problem is skipped (``None``).
    """
    groups = defaultdict(list)
    for r in records:
        groups[record_run(r)].append(r)
    full_peak = {
        pid: mean(x["peak_total"] for x in rs)
        for pid, rs in _by_problem(groups.get((FULL, None, None), [])).items()
    }
    rows = []
    for run in runs:
        policy, rate, c = (*run, None)[:3]
        recs = groups.get(run_key(policy, rate, c), [])
        probs = _by_problem(recs)
        row = {"policy": policy, "rate": None if policy == FULL else rate}
        if c is not None:
            row["compression_ratio"] = int(c)
        row.update(num_problems=len(probs), num_completions=len(recs))
        if not recs:
            rows.append(row)
            continue
        n_min = min(len(rs) for rs in probs.values())
        per_problem = [sum(bool(x["correct"]) for x in rs) / len(rs) for rs in probs.values()]
        row["pass@1"] = mean(per_problem)
        row["pass@1_se"] = standard_error(per_problem)
        for k in ks:
            if k == 1:
                continue
            row[f"pass@{k}"] = (
                mean(pass_at_k(len(rs), sum(bool(x["correct"]) for x in rs), k) for rs in probs.values())
                if k <= n_min
                else None
            )
        # the paper's peak reduction: per problem, full-cache peak / this method's peak (mean of ratios)
        paired = [pid for pid in probs if pid in full_peak]
        if full_peak and len(paired) == len(probs):
            ratios = [mean(full_peak[pid] / max(1, x["peak_total"]) for x in probs[pid]) for pid in paired]
            row["peak_compression"], row["compression_source"] = mean(ratios), "full_run"
        else:
            row["peak_compression"] = mean(x["compression_same_tokens"] for x in recs)
            row["compression_source"] = "same_tokens"
        row["compression_same_tokens"] = mean(x["compression_same_tokens"] for x in recs)
        row["mean_peak_entries_per_layer"] = mean(mean(x["peak_entries"]) for x in recs)
        row["max_peak_entries_per_layer"] = max(max(x["peak_entries"]) for x in recs)
        row["mean_peak_total"] = mean(x["peak_total"] for x in recs)
        row["mean_entries_per_layer"] = mean(x["mean_entries"] for x in recs)
        row["mean_footprint"] = mean(x["footprint"] for x in recs)
        row["mean_peak_kv_bytes"] = mean(x.get("peak_kv_bytes", 0) for x in recs)
        row["mean_completion_tokens"] = mean(x["completion_tokens"] for x in recs)
        row["mean_prompt_tokens"] = mean(x["prompt_tokens"] for x in recs)
        row["mean_rounds"] = mean(x["rounds"] for x in recs)
        row["truncated"] = mean(float(not x["finished"]) for x in recs)
        kept = [x.get("prompt_kept") for x in recs]
        if all(v is not None for v in kept):  # records written before it was logged lack it
            row["mean_prompt_kept"] = mean(kept)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- samples.jsonl
def record_key(r: dict) -> tuple:
    return (*record_run(r), str(r["problem_id"]), int(r["sample"]))


def _upgrade(rec: dict) -> dict:
    """An older Breadcrumbs record kept its ratio c in ``rate``: move it to ``compression_ratio``."""
    if rec.get("policy") == BEACONS and "compression_ratio" not in rec and rec.get("rate") is not None:
        rec = {**rec, "rate": None, "compression_ratio": int(rec["rate"])}
    return rec


def read_records(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Valid records of a JSONL file, skipping blank, truncated or corrupt lines. With ``repair``, rewrite
    the file with only those lines (atomically) so that appending to it stays valid JSONL."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    records, lines = [], []
    for line in raw.splitlines():
        try:
            rec = _upgrade(json.loads(line))
            record_key(rec)
        except (ValueError, KeyError, TypeError):
            continue
        records.append(rec)
        lines.append(line)
    clean = b"".join(x + b"\n" for x in lines)
    if repair and clean != raw:
        dropped = sum(bool(x.strip()) for x in raw.splitlines()) - len(lines)
        if dropped:
            warnings.warn(
                f"{path}: dropped {dropped} unreadable line(s) (a run killed mid-write)", stacklevel=2
            )
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(clean)
        os.replace(tmp, path)
    return records


def read_all_records(output_dir: str | os.PathLike) -> dict[tuple, dict]:
    """Every record under ``output_dir`` (``samples.jsonl`` and any per-rank files), first one per key."""
    done = {}
    for path in [Path(output_dir) / "samples.jsonl", *sorted(Path(output_dir).glob("samples.rank*.jsonl"))]:
        for rec in read_records(path):
            done.setdefault(record_key(rec), rec)
    return done


def merge_records(output_dir: str | os.PathLike) -> list[dict]:
    """Every record under ``output_dir``; per-rank files are folded into ``samples.jsonl`` (atomically) and
    removed."""
    output_dir = Path(output_dir)
    records = list(read_all_records(output_dir).values())
    rank_files = sorted(output_dir.glob("samples.rank*.jsonl"))
    if rank_files:
        tmp = output_dir / "samples.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, output_dir / "samples.jsonl")
        for f in rank_files:
            f.unlink()
    return records


# ----------------------------------------------------------------------------- reports
def _fmt(x, spec=".1f", scale=1.0, none="—"):
    return none if x is None else format(x * scale, spec)


def markdown_table(rows: Sequence[dict], ks: Sequence[int]) -> str:
    """The results as a Markdown table (accuracies in %)."""
    extra_k = [k for k in ks if k != 1]
    head = (
        ["policy", "setting", "peak compression", "pass@1 (%)"]
        + [f"pass@{k} (%)" for k in extra_k]
        + [
            "mean peak entries / layer",
            "max peak entries / layer",
            "mean entries / layer",
            "completion tokens",
            "truncated (%)",
            "problems",
            "completions",
        ]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "pass@1" not in r:
            cells = (
                [r["policy"], setting_label(r["rate"], r.get("compression_ratio")), "—", "—"]
                + ["—"] * len(extra_k)
                + ["—"] * 5
                + ["0", "0"]
            )
        else:
            comp = (
                _fmt(r["peak_compression"], ".2f")
                + "×"
                + ("" if r["compression_source"] == "full_run" else "*")
            )
            cells = [
                r["policy"],
                setting_label(r["rate"], r.get("compression_ratio")),
                comp,
                f"{_fmt(r['pass@1'], scale=100)} ± {_fmt(r['pass@1_se'], scale=100)}",
            ]
            cells += [_fmt(r.get(f"pass@{k}"), scale=100) for k in extra_k]
            cells += [
                _fmt(r["mean_peak_entries_per_layer"]),
                str(r["max_peak_entries_per_layer"]),
                _fmt(r["mean_entries_per_layer"]),
                _fmt(r["mean_completion_tokens"]),
                _fmt(r["truncated"], scale=100),
                str(r["num_problems"]),
                str(r["num_completions"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "\nPeak compression: mean over problems of (full-cache peak / method peak), each run with its own "
        "completion length. `*`: no `full` run, so the ratio is against a full cache on the same tokens. "
        "`±`: standard error of pass@1 across problems.\n"
    )
    return "\n".join(lines) + "\n" + note


def pareto_auc(
    rows: Sequence[dict], max_compression: float | None = None, anchors: dict[str, float] | None = None
) -> dict:
    """Area under the accuracy–compression curve of every method, on one shared axis.

    Each method's curve is its pass@1 (in [0, 1]) against ``log2(peak compression)``, linearly
    interpolated between its runs and anchored at ``(1x, full-cache pass@1)``: ``anchors[policy]`` when
    given (the uncompressed accuracy of the method's own model, see `combine`), else the ``full`` row of
    ``rows``, else the method's least-compressed run; beyond the method's most-compressed
    run it counts 0 (no measurement, no credit). The area over ``[1x, max_compression]`` (default: the
    largest compression of any row) is divided by ``log2(max_compression)``, so it reads as the mean
    accuracy over the log-compression range: the full cache alone would score 0, a method that keeps
    full accuracy at every compression up to the maximum would score the full-cache accuracy.

    Returns:
        ``{"max_compression": X, "auc": {policy: value}}`` (``full`` itself is left out).
    """
    done = [r for r in rows if "pass@1" in r and r.get("peak_compression")]
    by_policy = defaultdict(list)
    for r in done:
        by_policy[r["policy"]].append(r)
    full = by_policy.pop(FULL, [])
    top = max_compression or max([1.0, *(r["peak_compression"] for rs in by_policy.values() for r in rs)])
    span = math.log2(top)
    out = {}
    for policy, rs in by_policy.items():
        pts = sorted((math.log2(max(r["peak_compression"], 1.0)), r["pass@1"]) for r in rs)
        anchor = (anchors or {}).get(policy, full[0]["pass@1"] if full else pts[0][1])
        pts = [(0.0, anchor)] + [p for p in pts if p[0] > 0.0]
        area = 0.0
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            lo, hi = min(x0, span), min(x1, span)
            if hi > lo:  # trapezoid of the part inside [0, span]
                y_hi = y0 + (y1 - y0) * (hi - x0) / (x1 - x0)
                area += (hi - lo) * (y0 + y_hi) / 2
        out[policy] = area / span if span > 0 else None
    return {"max_compression": top, "auc": out}


def common_range_auc(rows: Sequence[dict]) -> dict:
    """Mean pass@1 of every method over the compression range that *every* method measured, with no anchor.

    `pareto_auc` anchors each curve at 1x, so a method whose first run is at 2x is credited with the straight
    line from its model's full-cache accuracy, and one measured only to 2.5x gets 0 beyond. Here the range is
    ``[lo, hi]`` with ``lo`` the largest least-compressed run and ``hi`` the smallest most-compressed run over
    the methods with at least two runs; each curve is interpolated linearly in ``log2(compression)`` between
    its own measured points only, and its area is divided by ``log2(hi / lo)``.

    Returns:
        ``{"range": [lo, hi], "auc": {policy: value}}``; ``auc`` is empty (and ``range`` ``None``) when the
        methods' ranges do not overlap. Methods with one run (no curve) are left out.
    """
    by_policy = defaultdict(list)
    for r in rows:
        if "pass@1" in r and r.get("peak_compression") and r["policy"] != FULL:
            by_policy[r["policy"]].append((math.log2(max(r["peak_compression"], 1.0)), r["pass@1"]))
    curves = {p: sorted(pts) for p, pts in by_policy.items() if len({x for x, _ in pts}) >= 2}
    if not curves:
        return {"range": None, "auc": {}}
    lo = max(pts[0][0] for pts in curves.values())
    hi = min(pts[-1][0] for pts in curves.values())
    if hi <= lo:
        return {"range": None, "auc": {}}

    out = {}
    for policy, pts in curves.items():
        xs = np.array(sorted({lo, hi, *(x for x, _ in pts if lo < x < hi)}))
        ys = np.interp(
            xs, [x for x, _ in pts], [y for _, y in pts]
        )  # piecewise linear between measured points
        out[policy] = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2)) / (hi - lo)
    return {"range": [2**lo, 2**hi], "auc": out}


def plot_pareto(rows: Sequence[dict], path: str, title: str = "") -> None:
    """pass@1 against peak compression, one line per policy, ``full`` as a dashed horizontal line (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    done = [r for r in rows if "pass@1" in r]
    by_policy = defaultdict(list)
    for r in done:
        by_policy[r["policy"]].append(r)
    for r in by_policy.pop(FULL, []):
        ax.axhline(100 * r["pass@1"], color="k", linestyle="--", label="full cache")
    from matplotlib import colormaps

    colors = colormaps["tab20" if len(by_policy) > 10 else "tab10"]
    for i, (policy, rs) in enumerate(by_policy.items()):
        rs = sorted(rs, key=lambda r: r["peak_compression"])
        ax.errorbar(
            [r["peak_compression"] for r in rs],
            [100 * r["pass@1"] for r in rs],
            yerr=[100 * (r["pass@1_se"] or 0.0) for r in rs],
            marker="os^Dv"[i % 5],
            capsize=3,
            color=colors(i),
            label=policy,
        )
    top = min(100.0, 1.1 * max([5.0, *(100 * (r["pass@1"] + (r["pass@1_se"] or 0)) for r in done)]))
    ax.set_ylim(-0.03 * top, top)
    ax.set_xlim(0.95, 1.05 * max([1.0, *(r["peak_compression"] for r in done)]) + 0.05)
    ax.set_xlabel("peak KV-cache compression (×)")
    ax.set_ylabel("pass@1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def auc_table(auc: dict) -> str:
    """The `pareto_auc` result as a Markdown table (in %), best first."""
    lines = [
        f"\nArea under the accuracy–compression curve, 1×–{auc['max_compression']:.2f}× on a log axis "
        "(mean pass@1 over the range; 0 beyond a method's most compressed run):\n",
        "| method | AUC (%) |",
        "|---|---|",
    ]
    for policy, v in sorted(auc["auc"].items(), key=lambda kv: -(kv[1] or 0)):
        lines.append(f"| {policy} | {_fmt(v, scale=100)} |")
    common = auc.get("common_range")
    if common and common["range"]:
        lo, hi = common["range"]
        lines += [
            f"\nThe same, over {lo:.2f}×–{hi:.2f}× only (the range every method with ≥ 2 runs measured; no 1× "
            "anchor, interpolated between measured points):\n",
            "| method | AUC (%) |",
            "|---|---|",
        ]
        lines += [
            f"| {p} | {_fmt(v, scale=100)} |" for p, v in sorted(common["auc"].items(), key=lambda kv: -kv[1])
        ]
    return "\n".join(lines) + "\n"


def write_reports(output_dir: str | os.PathLike, summary: dict, title: str = "") -> None:
    """``summary.json``, ``results.md`` and ``pareto.png`` from `ngc_trl.evaluation.run.evaluate`'s summary (the AUC
    of every method is added to it as ``summary["auc"]``)."""
    output_dir, s = Path(output_dir), summary["settings"]
    summary["auc"] = dict(pareto_auc(summary["results"]), common_range=common_range_auc(summary["results"]))
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    ev = s["eviction"]
    sampling = f"T={s['temperature']}, top_p={s['top_p']}, top_k={s['top_k']}" if s["do_sample"] else "greedy"
    head = (
        f"# {s['task']}: accuracy vs peak KV-cache compression\n\nmodel `{s.get('model', '?')}`, "
        f"{s['num_problems']} problems × {s['num_samples']} samples, δ={ev['eviction_interval']}, "
        f"b={ev['block_size']}, w={ev['score_window']}, max_new_tokens={s['max_new_tokens']}, {sampling}\n\n"
    )
    (output_dir / "results.md").write_text(
        head + markdown_table(summary["results"], s["k"]) + auc_table(summary["auc"])
    )
    plot_pareto(summary["results"], str(output_dir / "pareto.png"), title=title)


# ----------------------------------------------------------------------------- several evaluations on one axis
def combine(runs: Sequence[str], output_dir: str | os.PathLike, title: str = "") -> dict:
    """Put several `ngc_trl.evaluation.run` output folders on one accuracy–compression axis (table, plot, AUC).

    The paper compares methods that need different models: the heuristics run on the full-cache-trained
    model, NGC on the NGC model, a Breadcrumbs student on itself. Evaluate each model into its own folder,
    then combine them.

    Args:
        runs: ``"DIR"`` or ``"DIR=LABEL"``. The first folder's rows are kept as they are (its ``full`` row is
            the upper bound of the plot and the AUC anchor). In a labelled folder every non-``full`` row is
            renamed ``LABEL`` (one curve per label, e.g. ``outputs/eval-kvd=kv_dropout``) and its ``full``
            row becomes a table-only ``LABEL (full cache)`` reference. Each row keeps the peak compression
            computed in its own folder (against that model's own ``full`` run when it has one), and a
            label's AUC curve starts at its own model's full-cache accuracy (the folder of its
            least-compressed run), not the first folder's: a student that fails at every ratio scores 0.
        output_dir: where ``summary.json``, ``results.md`` and ``pareto.png`` go.
    """
    rows, sources, first_settings = [], [], None
    own_full: dict[
        str, tuple[float, float]
    ] = {}  # label -> (least compression of its runs, its model's full pass@1)
    for i, spec in enumerate(runs):
        folder, _, label = str(spec).partition("=")
        path = Path(folder) / "summary.json"
        if not path.is_file():
            raise ValueError(
                f"--runs: {path} does not exist (run ngc_trl.evaluation.run into {folder} first)"
            )
        summary = json.loads(path.read_text())
        first_settings = first_settings or summary["settings"]
        sources.append({"dir": folder, "label": label or None, "model": summary["settings"].get("model")})
        for r in summary["results"]:
            r = dict(_upgrade(r), source=folder, scorer=r["policy"])  # the policy it ran with
            if label:
                if r["policy"] == FULL:
                    r["policy"], r["reference"] = f"{label} (full cache, {Path(folder).name})", True
                else:
                    r["policy"] = label
            elif i > 0 and r["policy"] == FULL:
                r["policy"], r["reference"] = f"full cache ({summary['settings'].get('model')})", True
            rows.append(r)
        fulls = [r["pass@1"] for r in summary["results"] if r["policy"] == FULL and "pass@1" in r]
        least = min(
            (
                r["peak_compression"]
                for r in summary["results"]
                if r["policy"] != FULL and r.get("peak_compression")
            ),
            default=None,
        )
        if label and fulls and least is not None and least < own_full.get(label, (float("inf"),))[0]:
            own_full[label] = (least, fulls[0])
    curves = [r for r in rows if not r.get("reference")]
    anchors = {label: acc for label, (_, acc) in own_full.items()}
    out = {
        "settings": {**first_settings, "combined_from": sources},
        "results": rows,
        "auc": dict(pareto_auc(curves, anchors=anchors), common_range=common_range_auc(curves)),
    }
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "summary.json").write_text(json.dumps(out, indent=2))
    ks = first_settings["k"]
    head = f"# {first_settings['task']}: accuracy vs peak KV-cache compression\n\n" + "".join(
        f"- `{s['dir']}`{' as ' + s['label'] if s['label'] else ''}: model `{s['model']}`\n" for s in sources
    )
    (output_dir / "results.md").write_text(head + "\n" + markdown_table(rows, ks) + auc_table(out["auc"]))
    plot_pareto(curves, str(output_dir / "pareto.png"), title=title or first_settings["task"])
    return out


def main(argv: list[str] | None = None) -> dict:
    """``python -m ngc_trl.metrics --runs DIR[=LABEL] ... --output_dir OUT``: see `combine`."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m ngc_trl.metrics", description=combine.__doc__.splitlines()[0]
    )
    ap.add_argument("--runs", nargs="+", required=True, help="eval output folders, DIR or DIR=LABEL")
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--title", default="")
    a = ap.parse_args(argv)
    try:
        out = combine(a.runs, a.output_dir, a.title)
    except ValueError as e:
        raise SystemExit(f"ngc_trl.evaluation.metrics: error: {e}") from None
    print((Path(a.output_dir) / "results.md").read_text())
    return out


if __name__ == "__main__":
    main()
