"""Benchmark: an NGC training step against a vanilla TRL `GRPOTrainer` step, same model, batch and lengths.

Two ratios, measured in one run:

* ``loss_phase``: the training forward + backward of one micro-batch (`_compute_loss(...).backward()`) on
  the *same* rollouts — NGC's replay forward (per-layer masks, eviction log-probs, L_mem) against TRL's
  plain forward. This is the paper's "replay costs about one vanilla forward" claim. Target ≤ 1.15x.
* ``step``: a whole `trainer.train()` step (rollout + scoring + update), NGC's evicting decode loop
  against TRL's `model.generate`.
* ``breadcrumbs``: `BreadcrumbsTrainer` (full-cache GRPO teacher + beacon student distilled on the same
  rollouts) against the vanilla step: ``loss_phase`` on the same batch (teacher loss + student forward,
  chunked vocabulary KL and both backwards; no target: the student is a second forward/backward) and
  ``step`` (plain ``model.generate`` rollouts in both; target ≤ 1.5x). ``--lora`` gives every trainer the
  same LoRA config (Breadcrumbs: two adapters); without it the student is a full copy.

Examples::

    python bench/train_step.py --out outputs/bench/train_step.json                      # CPU, tiny model
    python bench/train_step.py --model_shape r1-1.5b --device cuda --completion_len 1024 \\
        --eviction_interval 256 --out outputs/bench/train_step_r1.json                  # GPU, 1.5B shape
    python bench/train_step.py --model_shape r1-1.5b --device cuda --completion_len 1024 --lora \\
        --compression_ratio 8 --out outputs/bench/train_step_r1_lora.json               # Breadcrumbs as in its recipe

``--recipe`` instead runs a few real steps of a training recipe (the CLI's own code path, any
``--override value`` pairs after ``--``) and reports its throughput: rollouts/s, and each step split into
rollout decoding, the no-grad replay (old log-probs), the training replay forward, backward and the
rest (rewards, optimizer, logging). The first step is a warm-up and is not counted::

    python bench/train_step.py --recipe recipes/tiny/countdown_ngc.yaml --steps 3 \\
        --out outputs/bench/tiny_recipe.json -- --per_device_train_batch_size 64 --num_generations 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl import GRPOConfig, GRPOTrainer

from ngc_trl import BreadcrumbsConfig, BreadcrumbsTrainer, NGCConfig, NGCTrainer
from ngc_trl.models import char_tokenizer, tiny_qwen2_config


def build_model(shape: str, vocab: int, device: str, dtype):
    if shape == "r1-1.5b":
        cfg = Qwen2Config(
            vocab_size=max(vocab, 151936),
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=131072,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        )
    else:
        cfg = tiny_qwen2_config(vocab, num_layers=4, hidden=256, heads=8, kv_heads=2, initializer_range=0.2)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)


def never_stop_reward(completions, **kw):
    return [float(len(c) % 3) for c in completions]  # some group variance, no EOS pressure


def make_trainer(kind, a, tok, device, dtype):
    model = build_model(a.model_shape, len(tok), device, dtype)
    model.generation_config.eos_token_id = None  # every rollout runs to completion_len
    common = dict(
        output_dir="/tmp/ngc-bench",
        per_device_train_batch_size=a.batch_size,
        num_generations=a.num_generations,
        max_completion_length=a.completion_len,
        max_steps=a.steps + 1,
        learning_rate=1e-6,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=device == "cpu",
        bf16=dtype == torch.bfloat16,
        gradient_checkpointing=a.grad_ckpt,
        loss_type="dr_grpo",
        scale_rewards="none",
        seed=0,
    )
    ds = Dataset.from_dict({"prompt": ["nums 3 5 7 8 target 24\n" * (a.prompt_len // 24 + 1)][:1] * 64})
    if kind == "ngc":
        args = NGCConfig(
            **common,
            eviction_interval=a.eviction_interval,
            eviction_rate=a.eviction_rate,
            block_size=a.block_size,
        )
        cls = NGCTrainer
    elif kind == "breadcrumbs":
        args, cls = BreadcrumbsConfig(**common, compression_ratio=a.compression_ratio), BreadcrumbsTrainer
    else:
        args, cls = GRPOConfig(**common), GRPOTrainer
    peft = None
    if a.lora:
        from peft import LoraConfig

        peft = LoraConfig(
            r=64,
            lora_alpha=128,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
    return cls(
        model=model,
        reward_funcs=never_stop_reward,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=peft,
    )


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_loss_phase(trainer, batch, device, repeats):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    times, peak = [], None
    for _ in range(repeats + 1):
        trainer.model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t0 = time.perf_counter()
        trainer._compute_loss(trainer.model, batch).backward()
        sync(device)
        times.append(time.perf_counter() - t0)
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated()
    return statistics.median(times[1:]), peak


def time_steps(trainer, device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steps = [h["step_time"] for h in trainer.state.log_history if "step_time" in h][
        1:
    ]  # drop the warm-up step
    return statistics.median(steps), (torch.cuda.max_memory_allocated() if device == "cuda" else None)


class PhaseTimer:
    """Wall-clock seconds per phase of each optimizer step, by wrapping the trainer's own hooks."""

    def __init__(self):
        self.steps: list[dict] = []
        self.current: dict = {}

    def wrap(self, cls, name, phase):
        fn = getattr(cls, name)
        timer = self

        def timed(*args, **kwargs):
            key = phase(*args) if callable(phase) else phase
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timer.current[key] = timer.current.get(key, 0.0) + time.perf_counter() - t0

        setattr(cls, name, timed)
        return fn

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _Steps(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.current = {}
                timer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.current["step"] = time.perf_counter() - timer.t0
                timer.steps.append(timer.current)

        return _Steps()


def recipe_throughput(a, overrides: list[str]) -> dict:
    """Run ``a.steps + 1`` steps of ``a.recipe`` through `ngc_trl.train` and time each phase (first step dropped)."""
    import tempfile

    from accelerate import Accelerator
    from transformers import Trainer

    import ngc_trl.train as train_cli

    timer = PhaseTimer()
    rows = []
    originals = []
    cls = NGCTrainer
    originals.append((cls, "_generate_single_turn", timer.wrap(cls, "_generate_single_turn", "rollout")))
    replay = "_get_per_token_logps_and_entropies"
    originals.append(
        (
            cls,
            replay,
            timer.wrap(
                cls, replay, lambda *_: "replay_forward" if torch.is_grad_enabled() else "replay_no_grad"
            ),
        )
    )
    originals.append((Accelerator, "backward", timer.wrap(Accelerator, "backward", "backward")))
    gen = cls._generate_single_turn

    def counted(self, prompt_ids, *args, **kwargs):
        rows.append(len(prompt_ids))
        return gen(self, prompt_ids, *args, **kwargs)

    cls._generate_single_turn = counted
    trainer_init = Trainer.__init__

    def init_with_timer(
        self, *args, **kwargs
    ):  # the CLI builds the trainer itself: attach the step timer there
        trainer_init(self, *args, **kwargs)
        self.add_callback(timer.callback())

    Trainer.__init__ = init_with_timer
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train_cli.main(
                [
                    "--config",
                    a.recipe,
                    "--max_steps",
                    str(a.steps + 1),
                    "--output_dir",
                    tmp,
                    "--save_strategy",
                    "no",
                    "--eval_after_train",
                    "false",
                    "--report_to",
                    "none",
                    *overrides,
                ]
            )
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
        Trainer.__init__ = trainer_init
    measured = timer.steps[1:]
    phases = ["rollout", "replay_no_grad", "replay_forward", "backward"]
    total = sum(s["step"] for s in measured)
    per_step = {k: sum(s.get(k, 0.0) for s in measured) / len(measured) for k in phases + ["step"]}
    per_step["other"] = per_step["step"] - sum(per_step[k] for k in phases)
    rollouts_per_step = sum(rows) / len(timer.steps)
    return {
        "benchmark": "train_step_recipe",
        "command": " ".join(sys.argv),
        "recipe": a.recipe,
        "overrides": overrides,
        "machine": {
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpus": torch.get_num_threads(),
        },
        "steps_measured": len(measured),
        "rollouts_per_step": rollouts_per_step,
        "rollouts_per_s": rollouts_per_step * len(measured) / total,
        "rollouts_in_45_min": rollouts_per_step * len(measured) / total * 45 * 60,
        "seconds_per_step": per_step,
        "share": {k: per_step[k] / per_step["step"] for k in phases + ["other"]},
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default=None, help="time real steps of this training recipe instead")
    p.add_argument("--model_shape", choices=["tiny", "r1-1.5b"], default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--num_generations", type=int, default=4)
    p.add_argument("--prompt_len", type=int, default=48)
    p.add_argument("--completion_len", type=int, default=256)
    p.add_argument("--eviction_interval", type=int, default=64)
    p.add_argument("--eviction_rate", type=float, default=0.5)
    p.add_argument("--block_size", type=int, default=16)
    p.add_argument("--compression_ratio", type=int, default=8, help="Breadcrumbs c")
    p.add_argument("--lora", action="store_true", help="LoRA (r 64, all linear layers) for every trainer")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--grad_ckpt", action="store_true")
    p.add_argument("--out", default="outputs/bench/train_step.json")
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if a.recipe is not None:
        out = recipe_throughput(a, overrides)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2))
        print(json.dumps(out, indent=2))
        return
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    tok = char_tokenizer()
    ngc = make_trainer("ngc", a, tok, a.device, dtype)
    vanilla = make_trainer("vanilla", a, tok, a.device, dtype)
    crumbs = make_trainer(
        "breadcrumbs", a, char_tokenizer(), a.device, dtype
    )  # own tokenizer: gets the beacon

    # the same rollouts for both loss phases (NGC's, with their eviction records)
    torch.manual_seed(0)
    batch = ngc._generate_and_score_completions([{"prompt": ngc.train_dataset[0]["prompt"]}] * a.batch_size)
    plain = {k: v for k, v in batch.items() if not k.startswith("ngc_")}
    ngc_loss, ngc_loss_mem = time_loss_phase(ngc, batch, a.device, a.repeats)
    van_loss, van_loss_mem = time_loss_phase(vanilla, plain, a.device, a.repeats)
    bc_loss, bc_loss_mem = time_loss_phase(crumbs, plain, a.device, a.repeats)
    ngc_step, ngc_mem = time_steps(ngc, a.device)
    van_step, van_mem = time_steps(vanilla, a.device)
    bc_step, bc_mem = time_steps(crumbs, a.device)
    ratio = ngc_loss / van_loss
    out = {
        "benchmark": "train_step",
        "command": " ".join(sys.argv),
        "settings": vars(a),
        "machine": {
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpus": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
        },
        "loss_phase": {
            "ngc_s": ngc_loss,
            "vanilla_s": van_loss,
            "ratio": ratio,
            "target": 1.15,
            "meets_target": ratio <= 1.15,
            "ngc_peak_bytes": ngc_loss_mem,
            "vanilla_peak_bytes": van_loss_mem,
        },
        "step": {
            "ngc_s": ngc_step,
            "vanilla_s": van_step,
            "ratio": ngc_step / van_step,
            "ngc_peak_bytes": ngc_mem,
            "vanilla_peak_bytes": van_mem,
        },
        "rounds_per_rollout": float((batch["ngc_positions"] >= 0).sum(1).float().mean()),
        "breadcrumbs": {
            "compression_ratio": a.compression_ratio,
            "lora": a.lora,
            "loss_phase": {
                "breadcrumbs_s": bc_loss,
                "vanilla_s": van_loss,
                "ratio": bc_loss / van_loss,
                "breadcrumbs_peak_bytes": bc_loss_mem,
                "vanilla_peak_bytes": van_loss_mem,
            },
            "step": {
                "breadcrumbs_s": bc_step,
                "vanilla_s": van_step,
                "ratio": bc_step / van_step,
                "target": 1.5,
                "meets_target": bc_step / van_step <= 1.5,
                "breadcrumbs_peak_bytes": bc_mem,
                "vanilla_peak_bytes": van_mem,
            },
        },
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(
        json.dumps({k: out[k] for k in ("loss_phase", "step", "rounds_per_rollout", "breadcrumbs")}, indent=2)
    )


if __name__ == "__main__":
    main()
