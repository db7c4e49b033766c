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
Metrics: `ngc_trl.evaluation.metrics`.

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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from ngc_trl.engine.config import BeaconConfig, EvictionConfig, schedule_config_from_dict
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
from ngc_trl.policies import POLICIES
from ngc_trl.policies.oracle import oracle_for_batch

MATH_TASKS = ("amc23", "aime24", "aime25", "amc25", "math")
TASKS = ("countdown", "linsys", "stargraph", *MATH_TASKS)
SETTINGS_FILE = "ngc_settings.json"  # EvictionConfig fields written next to a trained model
# paper settings (docs/method.md §6): Countdown greedy with 1024 tokens; math T=0.6, top_p=0.95, 3850 tokens
# (LinSys and StarGraph take Countdown's)
TASK_DEFAULTS = {
    "countdown": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 1024},
    "math": {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 3850},
}
# settings that change what a sample is: a resumed run must match them
FINGERPRINT = (
    "model",
    "task",
    "data_source",
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
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _split(value, cast, name):
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        return [cast(str(x).strip()) for x in items if str(x).strip()]
    except ValueError:
        raise ValueError(f"--{name}={value!r}: expected a comma-separated list of {cast.__name__}") from None


def parse_policies(value) -> list[str]:
    policies = list(dict.fromkeys(_split(value, str, "policies")))
    valid = {*POLICIES, BEACONS}
    bad = [p for p in policies if p not in valid]
    if not policies or bad:
        raise ValueError(
            f"--policies: unknown policy {bad[0] if bad else value!r}; valid: {', '.join(sorted(valid))}"
        )
    return policies


def parse_compression_ratios(value) -> list[int]:
    ratios = list(dict.fromkeys(_split(value, int, "compression_ratios")))
    if not ratios or any(c < 2 for c in ratios):
        raise ValueError(f"--compression_ratios={value!r}: every Breadcrumbs ratio c must be an integer >= 2")
    return ratios


def parse_rates(value) -> list[float]:
    rates = list(dict.fromkeys(_split(value, float, "rates")))
    bad = [r for r in rates if not 0.0 <= r < 1.0]
    if not rates or bad:
        raise ValueError(f"--rates={value!r}: every eviction rate must be in [0, 1)")
    return rates


@dataclass
class EvalArguments:
    """Arguments of `ngc-eval` (all can come from a YAML file given with ``--config``)."""

    model: str = field(
        metadata={
            "help": "Model folder or Hub id; a PEFT adapter folder is merged into its base. "
            f"A {SETTINGS_FILE} in the folder sets δ/b/w (CLI flags win)."
        }
    )
    task: str = field(
        default="countdown", metadata={"help": f"One of {', '.join(TASKS)} ('math' needs --data_source)."}
    )
    policies: str = field(
        default="full,ngc",
        metadata={
            "help": "Comma-separated policies ('full' = upper bound; "
            "'oracle' = evaluation-only hindsight ceiling)."
        },
    )
    rates: str = field(default="0.5", metadata={"help": "Comma-separated eviction rates ε in [0, 1)."})
    compression_ratios: str = field(
        default="2,4,8,16,32",
        metadata={
            "help": "Comma-separated Breadcrumbs ratios c (policy 'breadcrumbs': a beacon every c tokens)."
        },
    )
    num_problems: int | None = field(
        default=None, metadata={"help": "First N problems (default: the whole set)."}
    )
    num_samples: int = field(default=1, metadata={"help": "Completions per problem (n of pass@k)."})
    k: str | None = field(
        default=None, metadata={"help": "Comma-separated k of pass@k (default: 1 and num_samples)."}
    )
    output_dir: str = field(
        default="outputs/eval", metadata={"help": "Where results go; a rerun resumes from it."}
    )
    eviction_interval: int | None = field(
        default=None, metadata={"help": "δ (default: model settings, else 256)."}
    )
    block_size: int | None = field(default=None, metadata={"help": "b (default: model settings, else 32)."})
    score_window: int | None = field(default=None, metadata={"help": "w (default: model settings, else 5)."})
    protect_prompt: bool | None = field(
        default=None, metadata={"help": "Never evict the prompt (default: settings)."}
    )
    num_sink: int | None = field(
        default=None, metadata={"help": "Protected first entries (default: settings)."}
    )
    num_recent: int | None = field(
        default=None, metadata={"help": "Protected newest entries (default: settings)."}
    )
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Completion budget (countdown 1024, math 3850)."}
    )
    temperature: float | None = field(
        default=None, metadata={"help": "0 = greedy (countdown default); math 0.6."}
    )
    top_p: float | None = field(
        default=None, metadata={"help": "Nucleus sampling (countdown 1.0, math 0.95)."}
    )
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off)."})
    batch_size: int = field(default=16, metadata={"help": "Sequences decoded together."})
    seed: int = field(default=0, metadata={"help": "Seed of the generated problems and of sampling."})
    device: str = field(
        default="auto", metadata={"help": "'auto' (this process's accelerator, else CPU), 'cpu', 'cuda:0'..."}
    )
    dtype: str = field(
        default="auto", metadata={"help": "auto|float32|bfloat16|float16 (auto: bf16 on GPU, fp32 on CPU)."}
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of aime24/aime25/amc23 .jsonl files (default: $NGC_MATH_DATA, else data/math)."
        },
    )
    data_source: str | None = field(
        default=None,
        metadata={
            "help": "Generated tasks: 'generated' or 'generated:testbed' "
            "(default: the model's training distribution from its "
            "ngc_training.json, else 'generated'); Countdown also "
            "a Hub name or file; math: a Hub name or file (amc25, math)."
        },
    )
    prompt_format: str = field(
        default="auto", metadata={"help": "auto|chat|plain (auto: chat iff the tokenizer has a template)."}
    )
    prefill: bool = field(
        default=True, metadata={"help": "Countdown chat prompts end with TinyZero's assistant prefill."}
    )
    interoception: bool | None = field(
        default=None,
        metadata={
            "help": "Tag prompts with the rate (default: on when the "
            "model settings list interoception_rates)."
        },
    )
    grade_timeout_s: float = field(
        default=5.0, metadata={"help": "Time bound of one math answer comparison."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to from_pretrained."})

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"--task={self.task!r}: valid tasks: {', '.join(TASKS)}")
        self.policies, self.rates = (
            ",".join(parse_policies(self.policies)),
            ",".join(map(str, parse_rates(self.rates))),
        )
        self.compression_ratios = ",".join(map(str, parse_compression_ratios(self.compression_ratios)))
        for name in ("num_samples", "batch_size", "num_problems", "max_new_tokens", "grade_timeout_s"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"--{name}={v}: must be positive")
        from ngc_trl.tasks import get_task

        try:
            if self.task in MATH_TASKS:  # an evaluation set read from --data_dir fails here when missing
                split = "test" if self.task == "math" else self.task
                get_task("math").check_source(self.data_source, split, data_dir=self.data_dir)
            else:
                get_task(self.task).check_source(self.data_source)
        except FileNotFoundError as e:
            raise ValueError(f"--data_dir: {e}") from None
        except ValueError as e:
            raise ValueError(f"--data_source: {e}") from None
        if self.prompt_format not in ("auto", "chat", "plain"):
            raise ValueError(f"--prompt_format={self.prompt_format!r}: must be auto, chat or plain")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype={self.dtype!r}: must be auto, float32, bfloat16 or float16")


# ----------------------------------------------------------------------------- model and data
def read_ngc_settings(folder: str | os.PathLike) -> dict:
    """The ``ngc_settings.json`` of a local model folder (validated as an `EvictionConfig` or a
    `BeaconConfig`, `schedule_config_from_dict`), or ``{}``.

    ``interoception_rates`` and ``meta_token`` keys, if present, are kept as extras for the prompt/decoder."""
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
        extras = {k: settings.pop(k) for k in ("interoception_rates", "meta_token") if k in settings}
        schedule_config_from_dict(settings)
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"--model: invalid {path}: {e}") from None
    return {**settings, **extras}


def check_model_arg(model: str) -> Path | None:
    """The local folder of ``--model`` (None for a Hub id); ``ValueError`` if it is neither."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--model {model!r}: not a folder")
        return path
    if model.startswith((".", "/", "~")) or ".." in model or not _HUB_ID.fullmatch(model):
        raise ValueError(f"--model {model!r}: no such folder, and not a Hub id")
    if path.parent != Path(".") and path.parent.is_dir():
        raise ValueError(
            f"--model {model!r}: no such folder (read as a path since {path.parent}/ exists here)"
        )
    return None


def _is_hub_adapter(model: str) -> bool:
    """Whether Hub repo ``model`` is a PEFT adapter (the local HF cache first; fails fast when unreachable)."""
    from huggingface_hub import file_exists, try_to_load_from_cache

    for name, answer in (("adapter_config.json", True), ("config.json", False)):
        if isinstance(try_to_load_from_cache(model, name), str):
            return answer
    try:
        return file_exists(model, "adapter_config.json")
    except Exception as e:
        raise ValueError(
            f"--model {model!r}: not a local folder, and the Hub cannot tell what it is "
            f"({type(e).__name__}: {e})"
        ) from None


def load_model(model: str, device: str | torch.device, dtype: str = "auto", trust_remote_code: bool = False):
    """``(model, tokenizer)`` from a model folder/Hub id or a PEFT adapter (merged into its base)."""
    from transformers import AutoModelForCausalLM

    from ngc_trl.models import load_tokenizer

    folder = check_model_arg(model)
    dev = torch.device(device)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        torch_dtype = (
            torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        )
    kw = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    try:
        is_adapter = (
            (folder / "adapter_config.json").is_file() if folder is not None else _is_hub_adapter(model)
        )
        if is_adapter:
            from peft import PeftConfig, PeftModel

            base_id = PeftConfig.from_pretrained(model).base_model_name_or_path
            has_tok = folder is None or (folder / "tokenizer_config.json").is_file()
            tokenizer = load_tokenizer(model if has_tok else base_id, trust_remote_code=trust_remote_code)
            net = AutoModelForCausalLM.from_pretrained(base_id, **kw)
            if len(tokenizer) > net.get_input_embeddings().weight.shape[0]:  # e.g. an added meta-token
                net.resize_token_embeddings(len(tokenizer))
            net = PeftModel.from_pretrained(net, model).merge_and_unload()
        else:
            tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
            net = AutoModelForCausalLM.from_pretrained(model, **kw)
    except Exception as e:
        if isinstance(e, ValueError) and str(e).startswith("--model"):
            raise
        raise ValueError(f"--model {model!r}: could not load it ({type(e).__name__}: {e})") from e
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return net.to(dev).eval(), tokenizer


def load_problems(
    task: str,
    tokenizer=None,
    num_problems: int | None = None,
    seed: int = 0,
    data_source: str | None = None,
    data_dir: str | None = None,
    prompt_format: str = "auto",
    prefill: bool = True,
) -> list[dict]:
    """Evaluation problems as dicts ``{id, prompt, ...}`` (generated tasks: held-out ``test`` split, plus
    their instance columns, e.g. ``nums``/``target``; math: ``answer``). ``prompt`` is a string or chat
    messages."""
    from ngc_trl.tasks import get_task

    chat = prompt_format == "chat" or (prompt_format == "auto" and getattr(tokenizer, "chat_template", None))
    fmt = "chat" if chat else "plain"
    if task not in MATH_TASKS:
        ds = get_task(task).load(
            data_source or "generated",
            n=num_problems,
            seed=seed,
            split="test",
            prompt_format=fmt,
            prefill=prefill,
        )
        return [{"id": f"{task}-{i}", **row} for i, row in enumerate(ds)]
    if task == "math" and data_source is None:
        raise ValueError(
            "--task math: give the problems with --data_source (a .jsonl/.parquet file or Hub name)"
        )
    split = "test" if task == "math" else task  # an evaluation set; data_source then overrides its file
    ds = get_task("math").load(data_source, n=num_problems, split=split, prompt_format=fmt, data_dir=data_dir)
    return [dict(row) for row in ds]


def render_prompt(prompt, tokenizer, rate: float | None = None) -> str:
    """The text fed to the model: a chat prompt through the template (continuing a final assistant turn),
    optionally tagged with the eviction rate (budget-aware interoception)."""
    if rate is not None:
        from ngc_trl.ngc.interoception import add_rate_tag

        prompt = add_rate_tag(prompt, rate)
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None):
        cont = prompt[-1].get("role") == "assistant"
        return tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=not cont, continue_final_message=cont
        )
    return "\n".join(m["content"] for m in prompt)


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
def trained_data_source(folder: Path, task: str) -> str | None:
    """The generator distribution a model was trained on (``dataset_source`` of its ``ngc_training.json``,
    e.g. ``"generated:testbed"``) when it was trained on ``task`` from the generator, else ``None``: its
    held-out split is then the default evaluation set, so a tiny testbed model is not scored on the wider
    standard range by mistake."""
    from ngc_trl.hub import TRAINING_FILE
    from ngc_trl.tasks import GENERATED_TASKS

    path = Path(folder) / TRAINING_FILE
    if task not in GENERATED_TASKS or not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except ValueError:
        return None
    source = info.get("dataset_source") if isinstance(info, dict) and info.get("task") == task else None
    return source if isinstance(source, str) and source.startswith("generated:") else None


def _prepare(args: EvalArguments) -> dict:
    """Everything but the decoding: validation first (policies, rates, schedule), then model and data."""
    from accelerate import PartialState

    kind = "math" if args.task in MATH_TASKS else "countdown"
    gen = {
        key: getattr(args, key) if getattr(args, key) is not None else v
        for key, v in TASK_DEFAULTS[kind].items()
    }
    folder = check_model_arg(args.model)
    model_settings = read_ngc_settings(folder) if folder is not None else {}
    extras = {
        key: model_settings.pop(key) for key in ("interoception_rates", "meta_token") if key in model_settings
    }
    overrides = {
        key: getattr(args, key)
        for key in (
            "eviction_interval",
            "block_size",
            "score_window",
            "protect_prompt",
            "num_sink",
            "num_recent",
        )
        if getattr(args, key) is not None
    }
    try:
        trained = schedule_config_from_dict(model_settings) if model_settings else EvictionConfig()
        beacon = trained if isinstance(trained, BeaconConfig) else None
        base = dataclasses.replace(EvictionConfig() if beacon else trained, **overrides)
    except (ValueError, TypeError) as e:
        raise ValueError(f"eviction settings: {e}") from None
    # fails here, before any loading, on a bad name or rate
    plan_runs(args.policies, args.rates, base, args.compression_ratios, beacon)
    k = args.k
    if k is not None and any(x > args.num_samples or x < 1 for x in _split(k, int, "k")):
        raise ValueError(f"--k={k}: every k must be in [1, --num_samples={args.num_samples}]")
    if gen["temperature"] <= 0 and args.num_samples > 1:
        raise ValueError("--num_samples > 1 needs --temperature > 0 (greedy repeats one completion)")
    state = PartialState(cpu=not torch.cuda.is_available())
    device = state.device if args.device == "auto" else torch.device(args.device)
    model, tokenizer = load_model(args.model, device, args.dtype, args.trust_remote_code)
    forced = None
    if extras.get("meta_token"):
        forced = tokenizer.convert_tokens_to_ids(extras["meta_token"])
        if forced is None or forced == tokenizer.unk_token_id:
            raise ValueError(
                f"--model: meta_token {extras['meta_token']!r} of {SETTINGS_FILE} is not in the tokenizer"
            )
    if args.data_source is None and folder is not None:
        args.data_source = trained_data_source(folder, args.task)
    problems = load_problems(
        args.task,
        tokenizer,
        args.num_problems,
        args.seed,
        args.data_source,
        args.data_dir,
        args.prompt_format,
        args.prefill,
    )
    interoception = (
        args.interoception if args.interoception is not None else bool(extras.get("interoception_rates"))
    )
    settings = {
        "model": args.model,
        "data_source": args.data_source,
        "prompt_format": args.prompt_format,
        "prefill": args.prefill,
        "dtype": str(next(model.parameters()).dtype),
        "model_settings": model_settings,
    }
    return dict(
        model=model,
        tokenizer=tokenizer,
        problems=problems,
        task=args.task,
        policies=args.policies,
        rates=args.rates,
        compression_ratios=args.compression_ratios,
        eviction=base,
        beacon=beacon,
        num_samples=args.num_samples,
        k=k,
        **gen,
        top_k=args.top_k,
        batch_size=args.batch_size,
        seed=args.seed,
        output_dir=args.output_dir,
        interoception=interoception,
        forced_token_id=forced,
        grade_timeout_s=args.grade_timeout_s,
        settings=settings,
    )


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
