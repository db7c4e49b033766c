"""Benchmark: can the ngc scorer *represent* a better eviction policy? Supervised cloning of the oracle.

NGC trains the scorer (the model's own attention of the last ``w`` queries) from the task reward, and on the
tiny testbed that signal is flat and noisy (`bench/gradient_noise.py`, `bench/logit_landscape.py`). This
diagnostic replaces the reward by a dense label to separate "RL cannot find it" from "the scorer cannot
express it": the hindsight `oracle` (evaluation-only: it keeps the blocks the rest of the full-cache
completion attends to most) decodes each training prompt greedily with top-k eviction, and the model is
trained to give the oracle's recorded actions a high Plackett–Luce log-probability *under the ngc scorer*:

    L = − mean over acted (rollout, round, layer) of  log π_ngc(σ_oracle | state)

computed by the trainer's own replay (`ngc_trl.engine.replay.ReplayContext`), so the gradient reaches the
same q/k projections L_mem trains. Not a method of this project and not in the paper (behaviour cloning of
a hindsight teacher, the "golden eviction" of ForesightKV); it only answers the capacity question. Every
``--eval_every`` steps the model is saved and `ngc-eval` runs full cache and ngc (top-k) on the validation
problems. Example::

    python bench/oracle_cloning.py --model outputs/tiny-base --steps 60 --batch_size 32 --lr 1e-4 \\
        --output_dir outputs/oracle-clone --out bench/results/oracle_cloning_tiny.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import torch


def load_training_problems(n: int, seed: int, validation_file: str) -> list[dict]:
    """``n`` Countdown problems of the tiny testbed's training distribution, none in ``validation_file``."""
    from ngc_trl.evaluation.learning_curve import load_validation_problems

    with open(validation_file, encoding="utf-8") as fh:
        val = [json.loads(line) for line in fh if line.strip()]
    return load_validation_problems(
        "countdown", "generated:testbed", n, seed, exclude=val, prompt_format="plain"
    )


def oracle_rollouts(model, tok, problems, cfg, max_new_tokens):
    """Greedy decodes of ``problems`` under the hindsight oracle's top-k evictions (at ``cfg``'s schedule).

    Returns ``(sequences (B, P + T), attention_mask (B, P + T), records, prompt_len (B,))``."""
    from ngc_trl.engine.generation import generate_with_eviction
    from ngc_trl.policies.oracle import oracle_for_batch

    enc = tok(
        [p["prompt"] for p in problems],
        return_tensors="pt",
        padding=True,
        padding_side="left",
        add_special_tokens=False,
    )
    eos, pad = tok.eos_token_id, tok.pad_token_id
    oracle_cfg = dataclasses.replace(cfg, policy="oracle")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        oracle, _ = oracle_for_batch(
            model,
            enc["input_ids"],
            enc["attention_mask"],
            oracle_cfg,
            [None] * len(problems),
            max_new_tokens,
            eos,
            pad,
        )
        out = generate_with_eviction(
            model,
            enc["input_ids"],
            enc["attention_mask"],
            eviction=oracle_cfg,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            policy=oracle,
        )
    model.train(was_training)
    am = torch.cat([enc["attention_mask"], out.completion_mask.long()], 1)  # left-padded, right-padded
    return out.sequences, am, out.records, enc["attention_mask"].sum(1)


def cloning_loss(
    model, sequences, attention_mask, records, prompt_len, cfg, token_weight: float = 0.0
) -> tuple[torch.Tensor, int]:
    """``− mean log π_ngc(σ)`` over the acted (rollout, round, layer) actions of ``records``, by the replay
    forward (with grad), plus ``token_weight`` × the mean NLL of the completion tokens in that forward (the
    model's own greedy tokens under the oracle's evictions: an anchor for the language model). Returns the
    loss and the number of actions."""
    from ngc_trl.engine.replay import ReplayContext, replay_forward

    ctx = ReplayContext(attention_mask, records, cfg, prompt_len=prompt_len, eviction_logps=True)
    # token log-probs (B, T - 1); the same forward fills ctx's eviction log-probs
    tok_lp = replay_forward(model, sequences, attention_mask, ctx)
    logp = ctx.eviction_logp(model.config.num_hidden_layers)
    acted = records.acted.to(logp.dtype)
    loss = -(logp * acted).sum() / acted.sum().clamp(min=1)
    if token_weight:
        width = int((attention_mask.argmax(1) + prompt_len).max())  # left-padded prompts end at this column
        mask = attention_mask[:, 1:].float()
        mask[:, : width - 1] = 0  # predictions of completion tokens only
        loss = loss + token_weight * (-(tok_lp * mask).sum() / mask.sum().clamp(min=1))
    return loss, int(acted.sum())


def clone_step(model, tok, problems, cfg, max_new_tokens, optimizer, token_weight: float = 0.0) -> dict:
    """One step: oracle rollouts of ``problems``, then one optimizer step on their cloning loss."""
    seq, am, records, plen = oracle_rollouts(model, tok, problems, cfg, max_new_tokens)
    model.train()
    loss, n = cloning_loss(model, seq, am, records, plen, cfg, token_weight)
    optimizer.zero_grad()
    loss.backward()
    gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    optimizer.step()
    return {
        "loss": loss.item(),
        "grad_norm": gnorm,
        "actions": n,
        "oracle_rollout_tokens": float((am.sum(1) - plen).float().mean()),
    }


RESULT_KEYS = ("policy", "pass@1", "pass@1_se", "peak_compression", "mean_prompt_kept", "truncated")


def evaluate(path: str, eval_args: list[str], policies: str = "full,ngc") -> list[dict]:
    """``ngc-eval`` of ``policies`` (default full and ngc, top-k) for the model saved at ``path``."""
    import tempfile

    from ngc_trl.evaluation.run import main as eval_main

    with tempfile.TemporaryDirectory() as tmp:
        s = eval_main(["--model", path, "--policies", policies, "--output_dir", tmp, *eval_args])
    return [{k: r.get(k) for k in RESULT_KEYS} for r in s["results"]]


def add_testbed_args(p: argparse.ArgumentParser) -> None:
    """The schedule and validation-split options shared with `bench/oracle_probe.py` (tiny recipe defaults)."""
    p.add_argument("--rate", type=float, default=0.5)
    p.add_argument("--eviction_interval", type=int, default=64)
    p.add_argument("--block_size", type=int, default=8)
    p.add_argument("--score_window", type=int, default=5)
    p.add_argument("--max_new_tokens", type=int, default=576)
    p.add_argument("--validation_file", default="data/testbed/countdown/validation.jsonl")
    p.add_argument("--eval_num_problems", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)


def check_testbed_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Fail early, naming the option, on an invalid value of `add_testbed_args`."""
    for name in ("eviction_interval", "block_size", "score_window", "max_new_tokens", "eval_num_problems"):
        if getattr(a, name) <= 0:
            p.error(f"--{name} must be > 0")
    if not 0 < a.rate < 1:
        p.error("--rate must be in (0, 1)")


def schedule_eval_args(a: argparse.Namespace, batch_size: int = 64) -> list[str]:
    """`ngc-eval` arguments for the schedule and decoding options of `add_testbed_args` (no problems)."""
    return [
        "--rates", str(a.rate), "--max_new_tokens", str(a.max_new_tokens), "--batch_size", str(batch_size),
        "--prompt_format", "plain", "--eviction_interval", str(a.eviction_interval),
        "--block_size", str(a.block_size), "--score_window", str(a.score_window),
    ]  # fmt: skip


def validation_eval_args(a: argparse.Namespace, batch_size: int = 64) -> list[str]:
    """`ngc-eval` arguments for the validation problems at the options of `add_testbed_args`."""
    problems = ["--problems_file", a.validation_file, "--num_problems", str(a.eval_num_problems)]
    return problems + schedule_eval_args(a, batch_size)


def machine() -> dict:
    """What the record was measured on."""
    return {"torch": torch.__version__, "platform": platform.platform(), "cpus": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval_every", type=int, default=20)
    p.add_argument(
        "--token_weight",
        type=float,
        default=0.0,
        help="weight of the completion-token NLL anchor (0: the cloning loss alone)",
    )
    add_testbed_args(p)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    for name in ("steps", "batch_size", "eval_every"):
        if getattr(a, name) <= 0:
            p.error(f"--{name} must be > 0")
    if a.token_weight < 0:
        p.error("--token_weight must be >= 0")
    check_testbed_args(p, a)

    from transformers import AutoModelForCausalLM

    from ngc_trl import EvictionConfig
    from ngc_trl.models import load_tokenizer

    torch.manual_seed(a.seed)
    tok = load_tokenizer(a.model)  # the testbed's word-level tokenizer (AutoTokenizer would re-class it)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    # the tiny recipes' logits (top-k order does not depend on them; the cloning loss does)
    cfg = EvictionConfig(
        eviction_interval=a.eviction_interval,
        eviction_rate=a.rate,
        block_size=a.block_size,
        score_window=a.score_window,
        policy="ngc",
        logit_transform="relative",
        logit_scale=2.0,
    )
    problems = load_training_problems(a.steps * a.batch_size, 1000 + a.seed, a.validation_file)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr, betas=(0.9, 0.95), eps=1e-15)
    eval_args = validation_eval_args(a)
    record = {
        "benchmark": "oracle_cloning",
        "command": " ".join(["python", "bench/oracle_cloning.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "settings": vars(a),
        "steps": [],
        "curve": [],
    }

    def checkpoint(step: int):
        path = os.path.join(a.output_dir, f"step-{step}")
        model.save_pretrained(path)
        tok.save_pretrained(path)
        record["curve"].append({"step": step, "results": evaluate(path, eval_args)})
        print(json.dumps(record["curve"][-1]), flush=True)
        if a.out:
            with open(a.out, "w") as fh:
                fh.write(json.dumps(record, indent=1) + "\n")

    start = time.perf_counter()
    checkpoint(0)
    for step in range(1, a.steps + 1):
        batch = problems[(step - 1) * a.batch_size : step * a.batch_size]
        log = clone_step(model, tok, batch, cfg, a.max_new_tokens, opt, a.token_weight)
        log |= {"step": step, "seconds": time.perf_counter() - start}
        record["steps"].append(log)
        print(json.dumps(log), flush=True)
        if step % a.eval_every == 0 or step == a.steps:
            checkpoint(step)
    return record


if __name__ == "__main__":
    main()
