"""Breadcrumbs Reasoning (Monea et al., arXiv 2510.13797): a student that compresses its cache into beacons.

* `beacons` — the beacon token, the layout of a sequence with its beacons, and the one-pass forward
  under the beacon mask (no TRL import).
* `trainer` — `BreadcrumbsConfig` and `BreadcrumbsTrainer`: joint RL (teacher) and distillation (student).
* `warm_start` — the beacon SFT the tiny testbed starts a student from.

Import the TRL-dependent names from their modules (or from `ngc_trl`): this package file loads nothing.
"""
