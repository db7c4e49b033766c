"""Evaluation: accuracy against peak-KV-cache compression, per sample, resumable.

* `run` — the evaluation loop behind ``python -m ngc_trl.eval`` (the runs, one JSONL log per (policy, rate)
  that resumes, the summary).
* `setup` — what the loop is handed: ``ngc-eval``'s arguments, the model (folder, Hub id or PEFT adapter, and
  its ``ngc_settings.json``), the problems and their prompts.
* `metrics` — accuracy with standard errors, compression, the report tables and the Pareto plot.
* `learning_curve` — the training callback that scores a validation split every k steps, and its plot.
* `experiment` — one runner for the testbed pipelines, driven by a spec per task (``recipes/testbed/*.yaml``).
"""
