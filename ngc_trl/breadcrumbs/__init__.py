"""Breadcrumbs Reasoning (Monea et al., arXiv 2510.13797): a student that compresses its cache into beacons.

* `beacons` — the beacon token, the layout of a sequence with its beacons, and the one-pass forward
  under the beacon mask (no TRL import).
* `config` — `BreadcrumbsConfig`: TRL's `GRPOConfig` plus the Breadcrumbs fields, validated.
* `distillation` — the token-level KL to the teacher and the distillation loss, pure functions (no TRL import).
* `trainer` — `BreadcrumbsTrainer`: joint RL (teacher) and distillation (student), a thin `GRPOTrainer`
  subclass (LoRA adapter pinning, optimizer, save / resume).
* `warm_start` — the beacon SFT the tiny testbed starts a student from.

Import the TRL-dependent names from their modules (or from `ngc_trl`): this package file loads nothing.
"""
