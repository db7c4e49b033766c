"""What `ngc_trl.evaluation.run.evaluate` is handed: arguments, model and problems.

* `EvalArguments`: the arguments of ``ngc-eval`` (all can come from a YAML file), with the parsers of its
  comma-separated lists (`parse_policies`, `parse_rates`, `parse_compression_ratios`).
* The model: `check_model_arg` (a local folder or a Hub id), `load_model` (a PEFT adapter is merged into its
  base) and `read_ngc_settings` (the δ/b/w of the ``ngc_settings.json`` written next to a trained model).
* The problems: `load_problems` (held-out generated splits or a math set), by default from the distribution
  the model was trained on (`trained_data_source`), and `render_prompt`, the text the model is fed.
* `_prepare`: parsed arguments to `evaluate`'s keyword arguments, every setting validated before any loading.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ngc_trl.engine.config import BeaconConfig, EvictionConfig, schedule_config_from_dict
from ngc_trl.evaluation.metrics import BEACONS, FULL
from ngc_trl.policies import POLICIES
from ngc_trl.policies.score_head import attach_saved_score_head

MATH_TASKS = ("amc23", "aime24", "aime25", "amc25", "math")
TASKS = ("countdown", "linsys", "stargraph", *MATH_TASKS)
SETTINGS_FILE = "ngc_settings.json"  # EvictionConfig fields written next to a trained model
# paper settings (docs/method.md §6): Countdown greedy with 1024 tokens; math T=0.6, top_p=0.95, 3850 tokens
# (LinSys and StarGraph take Countdown's)
TASK_DEFAULTS = {
    "countdown": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 1024},
    "math": {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 3850},
}
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
    problems_file: str | None = field(
        default=None,
        metadata={
            "help": "Generated tasks: a JSONL of fixed problems {id, prompt, <instance columns>} to evaluate "
            "instead of the generated test split, e.g. data/testbed/countdown/validation.jsonl to choose "
            "settings on the validation split (make data writes the testbed's)."
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
        if self.problems_file is not None:
            if self.task in MATH_TASKS:
                raise ValueError(
                    f"--problems_file: for generated tasks only (math sets: --data_source), got --task={self.task}"
                )
            if self.data_source is not None:
                raise ValueError("--problems_file: give it or --data_source, not both")
            if not Path(self.problems_file).is_file():
                raise ValueError(f"--problems_file={self.problems_file!r}: no such file")
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
    net = net.to(dev).eval()
    attach_saved_score_head(net, folder)  # a `score_head` policy's head, saved beside the weights
    return net, tokenizer


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


# ----------------------------------------------------------------------------- CLI
MAX_PROBLEM_LINE_BYTES = 1 << 20  # one problem's JSON line; longer lines are refused, not parsed
MAX_PROBLEMS = 1_000_000


def read_problems_file(path: str | os.PathLike, task: str, num_problems: int | None = None) -> list[dict]:
    """The problems of a JSONL file ``{"id": str, "prompt": str | messages, <task columns>}`` (the rows
    `ngc_trl.splits` writes), the first ``num_problems`` of them, for generated task ``task``.

    The file is untrusted: every line is bounded (`MAX_PROBLEM_LINE_BYTES`, `MAX_PROBLEMS` lines), parsed as
    JSON (never evaluated) and checked, so a bad row fails here naming its line: an object with a ``prompt``
    string or message list, the task's instance columns (`Task.instance`, which also normalises their types),
    and unique ids (default ``<task>-file-<line index>``).
    """
    from ngc_trl.tasks import get_task

    generated = get_task(task)
    rows: list[dict] = []
    ids: set[str] = set()
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if num_problems is not None and len(rows) >= num_problems:
                break
            where = f"--problems_file {path}, line {lineno}"
            if len(raw) > MAX_PROBLEM_LINE_BYTES:
                raise ValueError(f"{where}: longer than {MAX_PROBLEM_LINE_BYTES} bytes")
            if not raw.strip():
                continue
            if len(rows) >= MAX_PROBLEMS:
                raise ValueError(f"{where}: more than {MAX_PROBLEMS} problems")
            try:
                row = json.loads(raw)
            except ValueError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: not a JSON object")
            prompt = row.get("prompt")
            chat = isinstance(prompt, list) and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt
            )
            if not (isinstance(prompt, str) or chat):
                raise ValueError(f"{where}: 'prompt' must be a string or a list of chat messages")
            try:
                instance = generated.instance(row)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(
                    f"{where}: not a {task} instance (columns {generated.columns}): {e!r}"
                ) from None
            pid = row.get("id", f"{task}-file-{len(rows)}")
            if not isinstance(pid, str) or pid in ids:
                raise ValueError(f"{where}: 'id' must be a string unique in the file, got {pid!r}")
            ids.add(pid)
            rows.append({"id": pid, "prompt": prompt, **instance})
    if not rows:
        raise ValueError(f"--problems_file {path}: no problems")
    return rows


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

    from ngc_trl.evaluation.run import plan_runs  # here: run imports this module

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
    runs = plan_runs(args.policies, args.rates, base, args.compression_ratios, beacon)
    unset = [f for f in ("eviction_interval", "block_size") if f not in overrides]
    if not model_settings and unset and any(r.policy not in (FULL, BEACONS) for r in runs):
        # a model that was not NGC-trained here (an SFT base, a Hub model) carries no schedule: say which one
        # the eviction runs use, so a tiny model is not silently evaluated at the paper-scale δ/b
        warnings.warn(
            f"--model has no {SETTINGS_FILE}: eviction runs use the default "
            + ", ".join(f"{f}={getattr(base, f)}" for f in unset)
            + " (pass --eviction_interval/--block_size to match the model's training schedule)",
            stacklevel=2,
        )
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
    if args.problems_file is not None:
        problems = read_problems_file(args.problems_file, args.task, args.num_problems)
    else:
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
        "problems_file": args.problems_file,
        "problems_file_sha256": None
        if args.problems_file is None
        else hashlib.sha256(Path(args.problems_file).read_bytes()).hexdigest(),
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
