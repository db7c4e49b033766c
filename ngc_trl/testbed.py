"""The offline tiny testbed: SFT a tiny GQA Qwen2 on Countdown search traces, then measure its accuracy.

What: builds a local tokenizer (default :func:`ngc_trl.models.number_tokenizer`: one token per number and
trace word; ``--tokenizer char`` for one token per character) and a tiny Qwen2 with
grouped-query attention, generates SFT examples ``build_plain_prompt(nums, target)`` (prompt) +
``search_trace(...) + <eos>`` (completion) from the ``split="train"`` half of the generator, trains with
TRL's ``SFTTrainer`` (completion-only loss, CPU, wall-clock cap), saves a plain HF folder (model +
tokenizer) to ``--output_dir`` and evaluates greedy full-cache accuracy on held-out ``split="test"``
problems with our own decode loop (:func:`ngc_trl.engine.generation.generate_with_eviction`, ``policy="full"``).
The result goes to ``output_dir/testbed.json``.

Why: a base model that already searches, but whose traces are several eviction intervals long, lets the
NGC pipeline (rollouts with eviction, GRPO) be exercised end to end offline on a laptop CPU.

``--task stargraph`` trains the same model on path-star graphs (``stargraph.DISTRIBUTIONS["testbed"]``:
3 arms of 4 edges, labels 0-99) with arm-by-arm search traces (:func:`stargraph.search_trace`)
(``make stargraph_result``; not learned in the budget so far). ``--task linsys`` trains it on 2x2 linear
systems (``linsys.DISTRIBUTIONS["testbed"]``) with elimination traces that write every product and
difference as a two-operand step (:func:`linsys.solution_trace` with ``show_work=True``), the second task of
the Breadcrumbs testbed (``make linsys_result``; 82% in 14.5 min).

Restricted distribution (``countdown.DISTRIBUTIONS["testbed"]``, recorded in ``testbed.json["settings"]``):
3 numbers from 1-12, targets 10-60, a 1/4 hash split of the ~2,600 solvable instances held out. Traces are
an honest depth-first search in canonical move order (:func:`countdown.search_trace`), median ~200 tokens
(95th percentile ~470, longest ~555) with the number tokenizer, so a rollout meets 1-7 rounds of the tiny
recipes' δ = 64, and the 13-token prompt is shorter than δ, as in the paper's proportions.

What decides accuracy (measured, README): the trace format and how far the loss gets in the wall-clock
budget. Same budget, n = 384: 12.5-14.1% with the target only in the prompt, 24.0% with it restated on
every two-number line, 45.1% when the token right after each result also marks a hit (``" yes"`` against
``","``; batch 8, loss 0.016), 76.0% with batch 4 and eager attention (3105 steps, loss 0.007). At 45%
most failures were one wrong ``yes``/``no`` (a result compared with the target) or one wrong fact.

Beacon warm start (``--beacon_ratios 2,4,8,16 --init_from outputs/tiny-base``): the same traces, from the
saved base with the beacon token added, under the beacon mask (:mod:`ngc_trl.breadcrumbs.warm_start`), ``c`` drawn
per example; evaluated with beacons at each ``c`` (``testbed.json["by_compression_ratio"]``). It is the
student that ``recipes/tiny/breadcrumbs_countdown.yaml`` starts from.

Usage: ``ngc-testbed --output_dir outputs/tiny-base`` (3600 SFT steps by default, ~15 min on 2 cores; ``--eval_only``
re-evaluates a saved folder).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import (
    AutoModelForCausalLM,
    HfArgumentParser,
    Qwen2ForCausalLM,
    TrainerCallback,
)

from ngc_trl.models import TRACE_WORDS, char_tokenizer, load_tokenizer, number_tokenizer, tiny_qwen2_config
from ngc_trl.tasks import countdown, get_task, linsys, stargraph

# words of a task's traces and prompts that the number tokenizer keeps whole (Countdown's are TRACE_WORDS)
TASK_WORDS = {"linsys": ["solve", "eliminate", "with", "gives", "so", "rhs"]}
TASKS = ("countdown", "stargraph", "linsys")


@dataclass
class TestbedArgs:
    """Command-line settings of the testbed (``HfArgumentParser``)."""

    output_dir: str = field(default="outputs/tiny-base", metadata={"help": "where the HF folder goes"})
    task: str = field(
        default="countdown",
        metadata={
            "help": "'countdown' (search traces), 'stargraph' (arm-by-arm search; stargraph.DISTRIBUTIONS['testbed']) "
            "or 'linsys' (elimination with every step written out; linsys.DISTRIBUTIONS['testbed'])"
        },
    )
    num_train: int = field(
        default=30000, metadata={"help": "SFT examples (one epoch at most; time usually stops first)"}
    )
    num_test: int = field(default=384, metadata={"help": "held-out split='test' problems"})
    max_steps: int = field(
        default=3600,
        metadata={
            "help": "SFT optimizer steps; the learning rate's warmup + cosine runs over them, so the same command gives the "
            "same base on any machine (3600 batch-4 steps take ~15 min on 2 idle CPU cores). -1: the wall clock "
            "(--max_minutes) sets both the length and the schedule"
        },
    )
    max_minutes: float = field(
        default=30.0,
        metadata={
            "help": "wall-clock safety cap on SFT; with max_steps=-1 it is the budget the schedule runs over"
        },
    )
    seed: int = 0
    eval_only: bool = False
    tokenizer: str = field(
        default="number",
        metadata={
            "help": "'number' (one token per integer), 'number_sep' (also ' n' and '>n' tokens for n <= 99, so a StarGraph "
            "edge lookup is one induction step) or 'char'"
        },
    )
    number_init: str = field(
        default="digits",
        metadata={
            "help": "number tokenizer: 'digits' (a number's embedding starts as the sum of its digits' place-value "
            "embeddings) or 'random'"
        },
    )
    # Breadcrumbs student warm start (ngc_trl.breadcrumbs.warm_start): SFT --init_from under the beacon mask instead of a fresh base
    beacon_ratios: str = field(
        default="",
        metadata={
            "help": "comma-separated c values (e.g. '2,4,8,16'): warm-start a Breadcrumbs student from --init_from on the "
            "same traces under the beacon mask, c drawn per example; evaluated with beacons at each c"
        },
    )
    init_from: str = field(
        default="outputs/tiny-base", metadata={"help": "the base a beacon warm start starts from"}
    )
    beacon_token: str = "<|beacon|>"
    beacon_init: str = "mean"
    # model size
    num_layers: int = 4
    hidden: int = 160
    heads: int = 4
    kv_heads: int = 2
    # problem distribution and trace shape (Countdown; StarGraph uses stargraph.DISTRIBUTIONS["testbed"])
    count_min: int = 3
    count_max: int = 3
    num_min: int = 1
    num_max: int = 12
    target_min: int = 10
    target_max: int = 60
    test_buckets: int = 4
    max_trace_chars: int = 800
    shuffle_moves: bool = False
    # optimisation
    learning_rate: float = 1e-3
    batch_size: int = (
        4  # many small steps: batch 4 reached loss 0.007 / 76% where batch 8 reached 0.016 / 45%
    )
    warmup_ratio: float = 0.03  # of the step budget (of the wall-clock budget with max_steps=-1)
    max_length: int = 700
    attn_implementation: str = field(
        default="eager",
        metadata={
            "help": "attention kernel for SFT only (not saved): 'eager' is ~15% faster than 'sdpa' on 2 CPU cores "
            "at this size (bench: 0.28 s against 0.34 s per batch-8 step)"
        },
    )
    logging_steps: int = 50
    # evaluation
    max_new_tokens: int = 640
    eval_batch_size: int = 128
    num_threads: int = 2


def problem_kwargs(a: TestbedArgs) -> dict:
    """The generator ranges of the (restricted) testbed distribution of ``a.task``; the defaults equal the
    task's ``DISTRIBUTIONS["testbed"]``, which RL and evaluation read as ``"generated:testbed"``."""
    if a.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {a.task!r}")
    if a.task != "countdown":
        return get_task(a.task).distribution("generated:testbed")
    return dict(
        count_range=(a.count_min, a.count_max),
        num_range=(a.num_min, a.num_max),
        target_range=(a.target_min, a.target_max),
        test_buckets=a.test_buckets,
    )


def testbed_problems(a: TestbedArgs, n: int, seed: int, split: str) -> list[dict]:
    """``n`` generated instances of ``a.task``'s testbed distribution (the test split without repeats)."""
    extra = {"unique": True} if a.task == "countdown" and split == "test" else {}
    return get_task(a.task).generate(n, seed, split=split, **problem_kwargs(a), **extra)


def held_out_problems(a: TestbedArgs) -> list[dict]:
    """The ``num_test`` held-out (``split="test"``) problems the testbed scores its model on, drawn with seed
    ``seed + 10000`` (``data/testbed/<task>/base_test.jsonl`` for the defaults)."""
    return testbed_problems(a, a.num_test, a.seed + 10_000, "test")


def plain_prompt(a: TestbedArgs, p: dict) -> str:
    """The task's plain prompt of instance ``p`` (no chat template), ending in ``<think>``."""
    return get_task(a.task).build_plain_prompt(p)


def trace(a: TestbedArgs, p: dict, rng: random.Random | None) -> str | None:
    """The SFT completion of instance ``p``: a Countdown search trace (``None`` when longer than
    ``max_trace_chars``: the instance is skipped), a StarGraph forward search (:func:`stargraph.search_trace`)
    or a LinSys elimination in natural order with its arithmetic written out."""
    if a.task == "countdown":
        return countdown.search_trace(p["nums"], p["target"], rng, max_chars=a.max_trace_chars)
    if a.task == "linsys":
        return linsys.solution_trace(p, show_work=True)
    return stargraph.search_trace(p)


def build_tokenizer(kind: str, task: str = "countdown"):
    """The testbed tokenizer named by ``--tokenizer`` (fails early on an unknown name); the number tokenizers
    also keep ``task``'s :data:`TASK_WORDS` whole."""
    words = TRACE_WORDS + TASK_WORDS.get(task, [])
    if kind == "number":
        return number_tokenizer(words=words)
    if kind == "number_sep":
        return number_tokenizer(words=words, prefixes=" >", max_prefixed=99)
    if kind == "char":
        return char_tokenizer()
    raise ValueError(f"tokenizer must be 'number', 'number_sep' or 'char', got {kind!r}")


def init_number_embeddings(model, tok, scheme: str, seed: int = 0) -> None:
    """Initialise the embedding row of every number token of a :func:`number_tokenizer` vocabulary.

    ``"digits"``: row(n) = sum over the decimal places k of n of a random vector ``D[k, digit_k(n)]``
    (``N(0, initializer_range²)``, divided by sqrt(places)), plus a little noise, so that 84 and 87 start out
    close and arithmetic facts learned for some numbers transfer to others. The rows stay ordinary
    trainable parameters of a plain Qwen2 (tied to the output head), so the saved folder needs no custom
    code. A prefixed number token (``" 27"``, ``">64"``; ``--tokenizer number_sep``) gets
    ``(row(n) + P[prefix]) / sqrt(2)`` with one random vector per prefix character, plus the same noise.
    ``"random"``: the model's own initialisation (no change).
    """
    if scheme == "random":
        return
    if scheme != "digits":
        raise ValueError(f"number_init must be 'digits' or 'random', got {scheme!r}")
    vocab = tok.get_vocab()
    numbers = sorted(int(t) for t in vocab if t.isdigit() and str(int(t)) == t)
    if not numbers:
        return
    emb = model.get_input_embeddings().weight
    std = model.config.initializer_range
    g = torch.Generator().manual_seed(seed)
    places = len(str(numbers[-1]))
    table = torch.randn(places, 10, emb.shape[1], generator=g) * std
    prefixed = sorted(
        (t, t[0], int(t[1:]))
        for t in vocab
        if len(t) > 1 and not t[0].isdigit() and t[1:].isdigit() and str(int(t[1:])) == t[1:]
    )
    prefix_rows = {
        p: torch.randn(emb.shape[1], generator=g) * std for p in sorted({p for _, p, _ in prefixed})
    }

    def digits_row(n):
        digits = [int(d) for d in reversed(str(n))]
        return sum(table[k, d] for k, d in enumerate(digits)) / math.sqrt(len(digits))

    with torch.no_grad():
        for n in numbers:
            emb[vocab[str(n)]] = digits_row(n) + 0.25 * std * torch.randn(emb.shape[1], generator=g)
        for t, p, n in prefixed:
            emb[vocab[t]] = (digits_row(n) + prefix_rows[p]) / math.sqrt(2) + 0.25 * std * torch.randn(
                emb.shape[1], generator=g
            )


def sft_examples(a: TestbedArgs, eos: str) -> list[dict]:
    """Prompt/completion pairs: plain prompt, then a search trace that ends in a verifying answer and EOS."""
    rng = random.Random(a.seed + 1) if a.shuffle_moves else None
    out = []
    for p in testbed_problems(a, a.num_train, a.seed, "train"):
        completion = trace(a, p, rng)
        if completion is not None:
            out.append({"prompt": plain_prompt(a, p), "completion": completion + eos, **p})
    return out


class TimeLimit(TrainerCallback):
    """Stops training once ``max_minutes`` of wall clock have passed since ``on_train_begin``.

    ``fraction()`` (elapsed / budget) drives :func:`budget_cosine` when ``max_steps=-1``, so the learning rate completes its
    warmup + cosine within the wall-clock budget whatever the throughput (the CPUs are shared).
    """

    def __init__(self, max_minutes: float):
        self.max_s, self.t0, self.stopped_early = max_minutes * 60, None, False

    def fraction(self) -> float:
        return 0.0 if self.t0 is None else min((time.perf_counter() - self.t0) / self.max_s, 1.0)

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self.fraction() >= 1.0:
            control.should_training_stop = self.stopped_early = True
        return control


def budget_cosine(limit: TimeLimit, max_steps: int, warmup: float, floor: float = 0.05):
    """LR multiplier: linear warmup over the first ``warmup`` of the budget, then cosine to ``floor``. The budget
    is ``max_steps`` optimizer steps when it is > 0 (reproducible), else ``limit``'s wall-clock budget."""

    def factor(step: int) -> float:
        f = min(step / max_steps, 1.0) if max_steps > 0 else limit.fraction()
        if f < warmup:
            return max(f / warmup, 0.01)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (f - warmup) / (1 - warmup)))

    return factor


def beacon_ratios(a: TestbedArgs) -> list[int]:
    """``--beacon_ratios`` as a list of ints >= 2 (empty: train a base); fails early naming the field."""
    try:
        ratios = [int(x) for x in a.beacon_ratios.split(",") if x.strip()]
    except ValueError:
        ratios = [0]
    if any(c < 2 for c in ratios):
        raise ValueError(f"beacon_ratios={a.beacon_ratios!r}: comma-separated integers >= 2")
    return ratios


def train(a: TestbedArgs) -> dict:
    """SFT a fresh tiny model (or, with ``beacon_ratios``, a beacon student from ``init_from``) and save it
    and the tokenizer to ``a.output_dir``; returns training stats."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(a.seed)
    trainer_cls, extra = SFTTrainer, {}
    if beacon_ratios(a):
        from ngc_trl.breadcrumbs.beacons import add_beacon_token
        from ngc_trl.breadcrumbs.warm_start import BeaconSFTTrainer

        model = AutoModelForCausalLM.from_pretrained(a.init_from, dtype=torch.float32)
        tok = load_tokenizer(a.init_from)
        extra = {
            "beacon_token_id": add_beacon_token(tok, model, a.beacon_token, a.beacon_init),
            "compression_ratios": beacon_ratios(a),
        }
        trainer_cls = BeaconSFTTrainer
    else:
        tok = build_tokenizer(a.tokenizer, a.task)
        model = Qwen2ForCausalLM(
            tiny_qwen2_config(len(tok), a.num_layers, a.hidden, a.heads, a.kv_heads, max_positions=1024)
        )
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = (
            tok.eos_token_id,
            tok.pad_token_id,
        )
        model.set_attn_implementation(a.attn_implementation)
        if a.tokenizer.startswith("number"):
            init_number_embeddings(model, tok, a.number_init, a.seed)
    rows = sft_examples(a, tok.eos_token)
    ds = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    cfg = SFTConfig(
        output_dir=os.path.join(a.output_dir, "_trainer"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        packing=False,
        completion_only_loss=True,
        max_length=a.max_length,
        per_device_train_batch_size=a.batch_size,
        num_train_epochs=1,
        max_steps=a.max_steps,
        learning_rate=a.learning_rate,
        logging_steps=a.logging_steps,
        save_strategy="no",
        train_sampling_strategy="group_by_length",
        report_to=[],
        seed=a.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    limit = TimeLimit(a.max_minutes)
    opt = torch.optim.AdamW(model.parameters(), lr=a.learning_rate, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, budget_cosine(limit, a.max_steps, a.warmup_ratio))
    trainer = trainer_cls(
        model=model,
        args=cfg,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[limit],
        optimizers=(opt, sched),
        **extra,
    )
    t0 = time.perf_counter()
    trainer.train()
    minutes = (time.perf_counter() - t0) / 60
    steps = trainer.state.global_step
    seen = rows[: steps * a.batch_size]  # the trainer shuffles: same count, so the token total is ≈
    tokens = sum(len(tok(r["prompt"] + r["completion"])["input_ids"]) for r in seen)
    losses = [(h["step"], round(h["loss"], 4)) for h in trainer.state.log_history if "loss" in h]
    shutil.rmtree(cfg.output_dir, ignore_errors=True)  # no checkpoints are saved; keep the folder plain
    model.set_attn_implementation("sdpa")
    model.save_pretrained(a.output_dir)
    tok.save_pretrained(a.output_dir)
    if extra:  # ngc-eval and generate_with_eviction decode the student with beacons
        from ngc_trl.hub import write_ngc_settings

        write_ngc_settings(
            a.output_dir,
            beacon_eviction(a, extra["beacon_token_id"], extra["compression_ratios"][0]),
            {
                "method": "breadcrumbs",
                "warm_start": "beacon_sft",
                "init_from": a.init_from,
                "task": a.task,
                "dataset_source": "generated:testbed",
                "compression_ratios": extra["compression_ratios"],
                "beacon_token": a.beacon_token,
                "beacon_init": a.beacon_init,
            },
        )
    return {
        "sft_minutes": round(minutes, 2),
        "steps": steps,
        "examples_seen": len(seen),
        "tokens_seen": tokens,
        "train_tokens_per_s": round(tokens / max(minutes * 60, 1e-9)),
        "stopped_by_time_limit": limit.stopped_early,
        "final_loss": losses[-1][1] if losses else None,
        "loss_curve": losses[:: max(1, len(losses) // 20)],
        "num_params": sum(p.numel() for p in model.parameters()),
    }


def beacon_eviction(a: TestbedArgs, beacon_token_id: int, c: int):
    """Beacon decoding (`BeaconConfig`) with one beacon every ``c`` tokens."""
    from ngc_trl.engine.config import BeaconConfig

    return BeaconConfig(beacon_token_id=beacon_token_id, compression_ratio=c)


@torch.no_grad()
def evaluate(a: TestbedArgs, model, tok, eviction=None) -> dict:
    """Greedy accuracy on ``num_test`` held-out (``split="test"``) problems, batched, decoding with
    ``eviction`` (default: full cache)."""
    from ngc_trl.engine.config import EvictionConfig
    from ngc_trl.engine.generation import generate_with_eviction

    eviction = eviction or EvictionConfig(policy="full")
    model.eval()
    probs = held_out_problems(a)
    correct, lengths, t0 = [], [], time.perf_counter()
    for i in range(0, len(probs), a.eval_batch_size):
        batch = probs[i : i + a.eval_batch_size]
        enc = tok([plain_prompt(a, p) for p in batch], return_tensors="pt", padding=True, padding_side="left")
        out = generate_with_eviction(
            model,
            enc["input_ids"],
            enc["attention_mask"],
            eviction=eviction,
            max_new_tokens=a.max_new_tokens,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        for p, ids in zip(batch, out.completion_ids):
            correct.append(get_task(a.task).score(tok.decode(ids, skip_special_tokens=True), p))
            lengths.append(len(ids))
    n = len(correct)
    acc = sum(correct) / n
    return {
        "accuracy": acc,
        "stderr": math.sqrt(acc * (1 - acc) / n),
        "n": n,
        "mean_completion_tokens": sum(lengths) / n,
        "eval_seconds": round(time.perf_counter() - t0, 1),
    }


def run(a: TestbedArgs) -> dict:
    """Train (unless ``eval_only``), evaluate, write and return ``testbed.json``."""
    beacon_ratios(a)  # fail before any work
    torch.set_num_threads(a.num_threads)
    os.makedirs(a.output_dir, exist_ok=True)
    path = os.path.join(a.output_dir, "testbed.json")
    result = {}
    if a.eval_only and os.path.exists(path):
        with open(path) as f:
            result = {k: v for k, v in json.load(f).items() if k not in ("accuracy", "stderr", "n")}
    if not a.eval_only:
        result["train"] = train(a)
    model = AutoModelForCausalLM.from_pretrained(a.output_dir, dtype=torch.float32)
    tok = load_tokenizer(a.output_dir)
    if beacon_ratios(
        a
    ):  # the student decodes with beacons: one accuracy per c, the first c's at the top level
        beacon_id = tok.convert_tokens_to_ids(a.beacon_token)
        by_c = {c: evaluate(a, model, tok, beacon_eviction(a, beacon_id, c)) for c in beacon_ratios(a)}
        result["by_compression_ratio"] = {str(c): r for c, r in by_c.items()}
        result.update(by_c[beacon_ratios(a)[0]])
    else:
        result.update(evaluate(a, model, tok))
    cfg = model.config
    result["model"] = {
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "vocab": cfg.vocab_size,
        "params": sum(p.numel() for p in model.parameters()),
    }
    policy = "breadcrumbs" if beacon_ratios(a) else "full"
    result["settings"] = asdict(a) | {
        "distribution": problem_kwargs(a),
        "eval_policy": policy,
        "greedy": True,
    }
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict:
    """Console entry point ``ngc-testbed``."""
    (a,) = HfArgumentParser(TestbedArgs).parse_args_into_dataclasses(args=argv)
    return run(a)


if __name__ == "__main__":
    main()
