"""The engine: an evicting decode loop and its exact replay, with no TRL import.

Layers below everything else in the package (it imports only torch and transformers):

* `config` — `EvictionConfig`: the δ / ε / b schedule, the score rule's name and its knobs.
* `cache`, `attention` — the per-layer, per-row KV cache that compacts in place, and the attention hook
  that reads it (and the replay's per-layer masks).
* `scoring`, `sampling`, `decision` — block scores, Gumbel-top-k with its exact Plackett–Luce log-prob,
  and one round's keep decision.
* `policy` — the score-rule interface (`EvictionPolicy`, `LayerView`) and the registry the concrete rules
  of `ngc_trl.policies` add themselves to.
* `records`, `generation`, `replay` — what a rollout recorded, the decode loop that records it, and the
  one-pass training forward that reproduces it on the autograd graph.
* `special_tokens` — the meta-token and beacon rows of the embedding table.
"""
