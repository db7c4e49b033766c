"""Neural Garbage Collection: token and eviction actions of one policy, trained together by Dr. GRPO.

* `config` — `NGCConfig`: TRL's `GRPOConfig` plus the eviction schedule, curriculum and interoception.
* `curriculum` — the Eq. 6 staircase over the eviction rate (and the reward-gated switch).
* `interoception` — the eviction-rate tag appended to prompts.
* `loss` — L_mem, the eviction policy-gradient term (paper Eq. 4–5).
* `trainer` — `NGCTrainer`, a thin subclass of TRL's `GRPOTrainer` (rollouts with eviction, replay, L_mem).

Import the TRL-dependent names from their modules (or from `ngc_trl`): this package file loads nothing.
"""
