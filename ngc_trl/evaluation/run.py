"""`make eval` / `ngc-eval`: accuracy against peak KV-cache compression, for NGC and every baseline.

Every (policy, rate) run decodes each problem ``num_samples`` times through `generate_with_eviction` under
the same schedule (δ, b, w and protections; evictions deterministic top-k), ``full`` once as the upper
bound. The paper evaluates the heuristic baselines on the model RL-trained with the full cache: pass that
model's folder as ``--model`` for them, and the NGC model's for ``ngc``.

    python -m ngc_trl.eval --model outputs/tiny-ngc --task countdown --policies full,ngc,keydiff \\
        --rates 0.25,0.5,0.75 --num_problems 256 --output_dir outputs/eval
    accelerate launch --num_processes 8 -m ngc_trl.eval --config eval.yaml   # data parallel

Outputs in ``--output_dir``: ``samples.jsonl`` (one line per completion, flushed per batch; a killed run
resumes from it), ``settings.json``, ``summary.json``, ``results.md`` and ``pareto.png``. Under several
processes each rank writes ``samples.rank{i}.jsonl``; rank 0 merges them into ``samples.jsonl``.
Metrics: `ngc_trl.evaluation.metrics`; the arguments and the loading of model and problems:
`ngc_trl.evaluation.setup`.

``oracle`` is an evaluation-only hindsight ceiling (`ngc_trl.policies.oracle`), not a method: each of its
batches teacher-forces the greedy full-cache completion of its prompts (the ``full`` run's, which then
runs first, when it is greedy and in this call; else decoded for the batch) to know which blocks the
rest of that completion attends to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch

from ngc_trl.engine.config import BeaconConfig, EvictionConfig
from ngc_trl.engine.generation import generate_with_eviction
from ngc_trl.evaluation.metrics import (
    BEACONS,
    FULL,
    markdown_table,
    merge_records,
    read_all_records,
    read_records,
    run_key,
    summarize,
    write_reports,
)
from ngc_trl.evaluation.setup import (
    MATH_TASKS,
    SETTINGS_FILE,
    EvalArguments,
    _prepare,
    _split,
    parse_compression_ratios,
    parse_policies,
    parse_rates,
    render_prompt,
)
from ngc_trl.policies import POLICIES
from ngc_trl.policies.oracle import oracle_for_batch

# settings that change what a sample is: a resumed run must match them
FINGERPRINT = (
    "model",
    "task",
    "data_source",
    "problems_file_sha256",
    "seed",
    "prompt_format",
    "prefill",
    "eviction",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "interoception",
    "forced_token_id",
)


def score_completion(
    task: str, text: str, problem: dict, timeout_s: float = 5.0
) -> tuple[float, bool, str | None]:
    """``(reward, correct, extracted answer)`` with the task's own verifier (the RL reward's, ``task.score``;
    math answers graded within ``timeout_s``)."""
    from ngc_trl.tasks import get_task

    scorer = get_task("math").with_timeout(timeout_s) if task in MATH_TASKS else get_task(task)
    reward = scorer.score(text, problem)
    return reward, reward == 1.0, scorer.extract_answer(text)


def _check_settings(output_dir: Path, settings: dict) -> None:
    path = output_dir / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in FINGERPRINT if old.get(k) != settings.get(k)]
        if diff:
            raise ValueError(
                f"{output_dir} holds a run with different settings ({', '.join(diff)}): "
                "use another --output_dir, or delete it to start over"
            )
    else:
        path.write_text(json.dumps(settings, indent=2))


# ----------------------------------------------------------------------------- the evaluation
class EvalRun(NamedTuple):
    """One evaluation run: a score rule at a rate ε (``full``: no rate), or Breadcrumbs at a ratio c."""

    policy: str
    rate: float | None
    compression_ratio: int | None
    config: EvictionConfig | BeaconConfig

    @property
    def key(self) -> tuple:
        return run_key(self.policy, self.rate, self.compression_ratio)


def split_schedules(
    eviction: EvictionConfig | BeaconConfig | None, beacon: BeaconConfig | None = None
) -> tuple[EvictionConfig, BeaconConfig | None]:
    """``(rounds, beacon)``: the δ/b/w/protections of the score-rule runs and the Breadcrumbs config, from an
    ``eviction`` that may itself be a `BeaconConfig` (a student's settings; its score-rule runs then use
    `EvictionConfig` defaults)."""
    if isinstance(eviction, BeaconConfig):
        if beacon is not None and beacon != eviction:
            raise ValueError("beacon: two different BeaconConfigs were given")
        return EvictionConfig(), eviction
    return eviction or EvictionConfig(), beacon


def plan_runs(
    policies,
    rates,
    eviction: EvictionConfig | BeaconConfig | None = None,
    compression_ratios="2,4,8,16,32",
    beacon: BeaconConfig | None = None,
) -> list[EvalRun]:
    """The runs: ``full`` once, every score-rule policy at every rate ε, all with ``eviction``'s δ/b/w and
    protections, and ``breadcrumbs`` at every ratio c (it needs the `BeaconConfig` a Breadcrumbs student's
    ``ngc_settings.json`` provides, as ``beacon`` or as ``eviction``). Validates every name, rate and ratio
    (errors name the argument)."""
    base, beacon = split_schedules(eviction, beacon)
    policies, rates = parse_policies(policies), parse_rates(rates)
    runs = []
    for p in policies:
        if p == BEACONS:
            if beacon is None:
                raise ValueError(
                    f"--policies {p}: the model has no beacon token; evaluate a Breadcrumbs student "
                    f"(its {SETTINGS_FILE} gives beacon_token_id)"
                )
            for c in parse_compression_ratios(compression_ratios):
                runs.append(EvalRun(p, None, c, dataclasses.replace(beacon, compression_ratio=c)))
            continue
        for r in [None] if p == FULL else rates:
            cfg = dataclasses.replace(base, policy=p, eviction_rate=0.0 if r is None else r)
            runs.append(EvalRun(p, r, None, cfg))
    return runs


def evaluate(
    model,
    tokenizer,
    problems,
    task: str,
    policies="full,ngc",
    rates="0.5",
    *,
    compression_ratios="2,4,8,16,32",
    eviction: EvictionConfig | BeaconConfig | None = None,
    beacon: BeaconConfig | None = None,
    num_samples: int = 1,
    k=None,
    max_new_tokens: int = 1024,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 16,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    interoception: bool = False,
    forced_token_id: int | None = None,
    grade_timeout_s: float = 5.0,
    settings: dict | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate ``model`` on ``problems`` for every (policy, rate); returns the summary (rank 0; ``{}`` on
    other ranks).

    Args:
        problems: dicts (or a `datasets.Dataset`) with ``prompt`` (text or chat messages), the task's fields
            (``nums``/``target`` or ``answer``) and optionally ``id``.
        task: a generated task (``"countdown"``, ``"linsys"``, ``"stargraph"``: its own verifier) or a math set
            (graded with `ngc_trl.tasks.math.grade`).
        policies, rates: names / ε, lists or comma-separated strings; ``full`` runs once.
        compression_ratios: the c of every ``breadcrumbs`` run (a list or comma-separated string).
        eviction: δ/b/w/protections shared by the score-rule runs (default `EvictionConfig()`), or a
            Breadcrumbs student's `BeaconConfig` (then they use the defaults).
        beacon: the student's `BeaconConfig` (its beacon token is never sampled in any run).
        k: pass@k values (default 1 and ``num_samples``). Greedy when ``temperature == 0``.
        output_dir: write ``samples.jsonl``, ``summary.json``, ``results.md``, ``pareto.png`` there and
            resume from what it holds; None keeps everything in memory.
        interoception: append each run's rate tag to the prompts. forced_token_id: the meta-token.
        settings: extra entries recorded with the results (model name...).
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    runs = plan_runs(policies, rates, eviction, compression_ratios, beacon)
    base, beacon = split_schedules(eviction, beacon)
    suppress = None if beacon is None else [beacon.beacon_token_id]
    ks = sorted(set(_split(k, int, "k"))) if k is not None else sorted({1, num_samples})
    if not ks or ks[0] < 1 or ks[-1] > num_samples:
        raise ValueError(f"--k={k!r}: every k must be in [1, num_samples={num_samples}]")
    do_sample = temperature > 0
    if not do_sample and num_samples > 1:
        raise ValueError(
            f"--num_samples={num_samples} with --temperature 0 (greedy) repeats one completion: "
            "set a temperature > 0"
        )
    problems = [
        {"id": str(p.get("id", i)), **{k_: v for k_, v in p.items() if k_ != "id"}}
        for i, p in enumerate(problems)
    ]
    if len({p["id"] for p in problems}) != len(problems):
        raise ValueError("problems: ids must be unique")
    device = next(model.parameters()).device
    # cpu=True: a gloo process group under torchrun on a CPU-only machine (accelerate's default finds none)
    state = PartialState(cpu=device.type == "cpu" and not torch.cuda.is_available())
    settings = {
        **(settings or {}),
        "task": task,
        "policies": list(dict.fromkeys(r.policy for r in runs)),
        "rates": parse_rates(rates),
        "compression_ratios": parse_compression_ratios(compression_ratios),
        "eviction": {
            **base.to_dict(),
            "policy": None,
            "eviction_rate": None,
            "compression_ratio": None,
            "beacon_token_id": None if beacon is None else beacon.beacon_token_id,
        },
        "num_problems": len(problems),
        "num_samples": num_samples,
        "k": ks,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "do_sample": do_sample,
        "sample_evictions": False,
        "seed": seed,
        "batch_size": batch_size,
        "interoception": interoception,
        "forced_token_id": forced_token_id,
        "num_processes": state.num_processes,
    }
    out_dir = Path(output_dir) if output_dir is not None else None
    done: dict[tuple, dict] = {}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        with state.main_process_first():
            _check_settings(out_dir, settings)
        done = read_all_records(out_dir)

    # ---- the work of this rank: (run, problem, sample) keys not done yet, batched within a run
    shard = problems[state.process_index :: state.num_processes]
    batches = []
    hindsight = any(getattr(POLICIES.get(r.policy), "hindsight", False) for r in runs)
    for run in sorted(runs, key=lambda r: not (hindsight and r.policy == FULL)):  # oracle: full first
        todo = [(p, j) for p in shard for j in range(num_samples) if (*run.key, p["id"], j) not in done]
        batches += [(run, todo[i : i + batch_size]) for i in range(0, len(todo), batch_size)]
    text_cfg = model.config.get_text_config()
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    entry_bytes = 2 * text_cfg.num_key_value_heads * head_dim * next(model.parameters()).element_size()
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = sorted(
        {
            *([eos] if isinstance(eos, int) else eos or []),
            *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []),
        }
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    if tokenizer.pad_token_id is None:  # the tokenizer call below needs one
        tokenizer.pad_token_id = pad
    fh = None
    if out_dir is not None:
        path = out_dir / (
            "samples.jsonl" if state.num_processes == 1 else f"samples.rank{state.process_index}.jsonl"
        )
        read_records(path, repair=True)
        fh = open(path, "a", encoding="utf-8")  # closed below
    new_records = []
    full_ids: dict[str, list[int]] = {}  # problem id -> greedy full-cache completion (the oracle's hindsight)
    bar = tqdm(
        total=sum(len(b[1]) for b in batches),
        desc="ngc-eval",
        disable=not (progress and state.is_main_process),
    )
    try:
        for run, items in batches:
            policy, rate, c, cfg = run
            tag_rate = (rate or 0.0) if interoception else None
            texts = [render_prompt(p["prompt"], tokenizer, tag_rate) for p, _ in items]
            enc = tokenizer(
                texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
            ).to(device)
            digest = hashlib.sha256(
                f"{seed}|{policy}|{rate if c is None else float(c)}|{items[0][0]['id']}|{items[0][1]}".encode()
            ).hexdigest()
            gen = torch.Generator(device=device).manual_seed(int(digest[:15], 16))
            oracle = None
            if getattr(POLICIES.get(policy), "hindsight", False):
                oracle, ids = oracle_for_batch(
                    model,
                    enc["input_ids"],
                    enc["attention_mask"],
                    cfg,
                    [full_ids.get(p["id"]) for p, _ in items],
                    max_new_tokens,
                    eos,
                    pad,
                )
                full_ids.update((p["id"], c) for (p, _), c in zip(items, ids))
            out = generate_with_eviction(
                model,
                enc["input_ids"],
                enc["attention_mask"],
                eviction=cfg,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature if do_sample else 1.0,
                top_p=top_p,
                top_k=top_k,
                sample_evictions=False,
                generator=gen,
                eos_token_id=eos,
                pad_token_id=pad,
                forced_token_id=None if c is not None else forced_token_id,
                policy=oracle,
                suppress_token_ids=suppress,
            )
            if policy == FULL and hindsight and not do_sample:
                full_ids.update((p["id"], c) for (p, _), c in zip(items, out.completion_ids))
            st = out.cache_stats
            comp_len = out.completion_mask.sum(1).tolist()
            n_rounds = (out.records.positions >= 0).sum(1).tolist()
            for i, ((prob, j), ids) in enumerate(zip(items, out.completion_ids)):
                text = tokenizer.decode(ids, skip_special_tokens=True)
                reward, correct, pred = score_completion(task, text, prob, grade_timeout_s)
                rec = {"policy": policy, "rate": rate}
                if c is not None:
                    rec["compression_ratio"] = c
                rec |= {
                    "problem_id": prob["id"],
                    "sample": j,
                    "reward": reward,
                    "correct": bool(correct),
                    "extracted_answer": pred,
                    "completion": text,
                    "prompt_tokens": int(enc["attention_mask"][i].sum()),
                    "completion_tokens": int(comp_len[i]),
                    "finished": bool(ids and ids[-1] in eos),
                    "rounds": int(n_rounds[i]),
                    "peak_total": int(st.peak_total[i]),
                    "peak_entries": st.peak_entries[i].tolist(),
                    "full_entries": int(st.full_entries[i]),
                    "compression_same_tokens": float(st.compression[i]),
                    "footprint": int(st.footprint[i].sum()),
                    "mean_entries": float(st.footprint[i].double().mean()) / max(1, int(comp_len[i])),
                    "peak_kv_bytes": int(st.peak_total[i]) * entry_bytes,
                    "prompt_kept": None if st.prompt_kept is None else float(st.prompt_kept[i]),
                }
                new_records.append(rec)
                if fh is not None:
                    fh.write(json.dumps(rec) + "\n")
            if fh is not None:
                fh.flush()
                os.fsync(fh.fileno())
            bar.update(len(items))
    finally:
        bar.close()
        if fh is not None:
            fh.close()

    # ---- merge (rank 0), summarise, write the reports
    state.wait_for_everyone()
    if out_dir is None:
        from accelerate.utils import gather_object

        records = gather_object(new_records) if state.num_processes > 1 else new_records
    if not state.is_main_process:
        return {}
    if out_dir is not None:
        records = merge_records(out_dir)
    wanted = {p["id"] for p in problems}
    records = [r for r in records if r["problem_id"] in wanted and r["sample"] < num_samples]
    rows = summarize(records, [r.key for r in runs], ks)
    sources = {r.get("compression_source") for r in rows if "compression_source" in r}
    summary = {
        "settings": settings,
        "compression_reference": "full_run"
        if sources == {"full_run"}
        else "same_tokens"
        if sources == {"same_tokens"}
        else "mixed",
        "results": rows,
    }
    if out_dir is not None:
        write_reports(out_dir, summary, f"{task} ({settings.get('model', 'model')})")
    return summary


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> dict:
    """Entry point of ``python -m ngc_trl.eval`` / ``ngc-eval``; setup errors exit with a one-line message."""
    from trl import TrlParser

    try:
        (args,) = TrlParser((EvalArguments,)).parse_args_and_config(argv)
        kwargs = _prepare(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"ngc-eval: error: {e}") from None
    summary = evaluate(**kwargs)
    if summary:
        print(markdown_table(summary["results"], summary["settings"]["k"]))
    return summary


if __name__ == "__main__":
    main()
