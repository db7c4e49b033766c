"""One rank of `tests/test_multiprocess.py`: runs `ngc_trl.train.main` with probes attached to the trainer.

Launched by ``python -m torch.distributed.run --nproc_per_node 2 tests/mp_worker.py <train.py arguments>``. Each rank
writes ``$NGC_PROBE_DIR/probe-<rank>.json``: the rate of every rollout it generated (with its prompt and step),
the rate in force at every step, its local cache statistics, the gated curriculum's state at train begin, a
hash of its weights after training and its ``log_history``."""

import hashlib
import json
import os
import sys

import torch
from transformers import TrainerCallback

import ngc_trl.train as train


def weights_hash(*modules) -> str:
    h = hashlib.sha256()
    for module in modules:
        for name, p in sorted(module.named_parameters()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


class Probe(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer
        self.rec = {"rollouts": [], "rate_in_force": {}, "local_stats": [], "gate_at_begin": None}
        if hasattr(trainer, "_generate"):
            self._spy_generate()

    def _spy_generate(self):
        tr, rec = self.trainer, self.rec
        if not hasattr(tr, "_open_scope"):  # the Breadcrumbs trainer samples no rates
            return
        orig_generate, orig_log = tr._generate, getattr(tr, "_log_cache_stats", None)

        def generate(prompts):
            out = orig_generate(prompts)
            step = tr.state.global_step
            for p, r in zip(prompts, tr._scope.row_rates.tolist()):
                rec["rollouts"].append({"step": step, "prompt": str(p), "rate": r})
            return out

        def log_cache_stats(out, rates):
            rec["local_stats"].append(
                {
                    "step": tr.state.global_step,
                    "eviction_rate": float(rates.float().mean()),
                    "peak_compression": float(out.cache_stats.compression.float().mean()),
                }
            )
            return orig_log(out, rates)

        tr._generate = generate
        if orig_log is not None:
            tr._log_cache_stats = log_cache_stats

    def on_train_begin(self, args, state, control, **kw):
        gate = getattr(self.trainer, "curriculum_gate", None)
        if gate is not None:
            self.rec["gate_at_begin"] = gate.state_dict()

    def on_step_begin(self, args, state, control, **kw):
        if hasattr(self.trainer, "rate_in_force"):
            self.rec["rate_in_force"][state.global_step] = self.trainer.rate_in_force()

    def on_train_end(self, args, state, control, **kw):
        tr = self.trainer
        modules = [tr.accelerator.unwrap_model(tr.model)]
        if getattr(tr, "student_model", None) is not None:
            modules.append(tr.student_model)
        self.rec["weights"] = weights_hash(*modules)
        self.rec["log_history"] = state.log_history
        self.rec["global_step"] = state.global_step
        rank = tr.accelerator.process_index
        with open(os.path.join(os.environ["NGC_PROBE_DIR"], f"probe-{rank}.json"), "w") as f:
            json.dump(self.rec, f)


def attach(setup):
    def wrapped(*args, **kwargs):
        trainer, *rest = setup(*args, **kwargs)
        trainer.add_callback(Probe(trainer))
        return (trainer, *rest)

    return wrapped


if __name__ == "__main__":
    torch.set_num_threads(1)
    train._ngc_setup = attach(train._ngc_setup)
    train._breadcrumbs_setup = attach(train._breadcrumbs_setup)
    train.main(sys.argv[1:])
