"""`score_head`: a separate, learned scoring head over present-state key features (not in the paper).

The paper's scorer (`ngc`) is the uniform head-and-query mean of the attention the language model reads
with, so the only way to change what it keeps is to change that attention. On the tiny testbed that does not
work (bench/results/README.md §6–7): the RL gradient is mostly noise and moving the attention rewrites the
language model, while a *linear* function of features a decoder has at the round, fitted to the hindsight
oracle, keeps what the trace needs nearly as well as the oracle. This policy is that function as a method:

    s_t = w_ℓ · (φ_t − μ_ℓ) / σ_ℓ        (per layer ℓ; key t; φ from `key_features`)

Block scores are the block mean of ``s_t`` and are used directly as Plackett–Luce logits (so
``logit_transform`` must be ``"none"``). The head is an ``nn.Module`` attached to the model as
``model.ngc_score_head`` (`attach_score_head`): NGC's L_mem reaches its weights (and, through the attention
features, Q and K) in the replay forward, exactly as it reaches the ``ngc`` scorer. It is saved beside the
model as ``score_head.safetensors`` + ``score_head.json`` (`save_score_head` / `load_score_head`);
`ngc_trl.ngc.score_head_warm_start` fits it to the oracle before RL.
"""

from __future__ import annotations

import json
import math
import os

import torch

from ngc_trl.engine.policy import EvictionPolicy, LayerView
from ngc_trl.engine.scoring import head_query_mean

HEAD_WEIGHTS = "score_head.safetensors"
HEAD_CONFIG = "score_head.json"
ATTR = "ngc_score_head"


def key_features(view: LayerView, window: int) -> torch.Tensor:
    """``(R, S, F)`` present-state features of every slot of one layer at a round (0 on non-live slots).

    ``F = H·w + 1 + H + 2·H_kv + 5``: the attention of each head and each of the ``w`` window queries on the
    key (the ngc scorer averages exactly these), the log of their head-and-query mean and of each head's
    mean, the key and value norm per KV head, and five position features: in the prompt, age / ``p``,
    log(1 + age), among the 32 newest live keys, among the 8 oldest (``p``: the round's position, the token
    fed next; the last window query is at ``p − 1``). Differentiable in the keys, values and queries.
    """
    probs, qv = view.window_probs(window)  # (R, H, w, S)
    r, h, w, s = probs.shape
    attn = probs.permute(0, 3, 1, 2).reshape(r, s, h * w)
    mean = head_query_mean(probs, qv)  # (R, S)
    qw = qv.to(probs.dtype)[:, None, :, None]
    per_head = (probs * qw).sum(2) / qw.sum(2).clamp(min=1)  # (R, H, S)
    logs = torch.log(torch.cat([mean[:, None], per_head], 1) + 1e-6).transpose(1, 2)  # (R, S, 1 + H)
    knorm = view.keys.float().norm(dim=-1).transpose(1, 2)  # (R, S, H_kv)
    vnorm = view.values.float().norm(dim=-1).transpose(1, 2)
    live = view.live
    assert view.q_pos is not None
    p = (view.q_pos[:, -1:] + 1).float()
    age = (p - view.pos.float()).clamp(min=0)
    rank = torch.cumsum(live.long(), -1) - 1
    from_end = live.long().sum(-1, keepdim=True) - torch.cumsum(live.long(), -1)
    position = torch.stack(
        [
            (view.pos < view.prompt_len[:, None]).float(),
            age / p.clamp(min=1),
            torch.log1p(age),
            (from_end < 32).float(),
            (rank < 8).float(),
        ],
        -1,
    )
    f = torch.cat([attn, logs, knorm, vnorm, position], -1)
    return f.masked_fill(~live[..., None], 0.0)


def num_features(heads: int, window: int, kv_heads: int) -> int:
    """``F`` of `key_features`."""
    return heads * window + 1 + heads + 2 * kv_heads + 5


def feature_names(heads: int, window: int, kv_heads: int) -> list[str]:
    """Names of the ``F`` columns of `key_features`, in order."""
    return (
        [f"attn_h{h}_q{q}" for h in range(heads) for q in range(window)]
        + ["log_attn_mean"]
        + [f"log_attn_h{h}" for h in range(heads)]
        + [f"key_norm_kv{g}" for g in range(kv_heads)]
        + [f"value_norm_kv{g}" for g in range(kv_heads)]
        + ["in_prompt", "age_frac", "log1p_age", "newest32", "oldest8"]
    )


class ScoreHead(torch.nn.Module):
    """Per-layer key scorer on standardized features: linear (``hidden = 0``) or one hidden SiLU layer.

    Buffers ``mean``, ``std`` ``(L, F)`` standardize the features; parameters ``w (L, F)`` (linear) or
    ``w1 (L, F, hidden)``, ``b1 (L, hidden)``, ``w2 (L, hidden)``. Zero-initialized output weights, so a
    fresh head scores every key 0 (a uniform policy). ``window``: the query window of `key_features`.
    """

    def __init__(self, n_layers: int, n_features: int, window: int, hidden: int = 0, mean=None, std=None):
        super().__init__()
        self.n_layers, self.n_features, self.window, self.hidden = n_layers, n_features, window, hidden
        self.register_buffer("mean", torch.zeros(n_layers, n_features) if mean is None else mean.float())
        self.register_buffer("std", torch.ones(n_layers, n_features) if std is None else std.float())
        if hidden:
            self.w1 = torch.nn.Parameter(torch.randn(n_layers, n_features, hidden) / math.sqrt(n_features))
            self.b1 = torch.nn.Parameter(torch.zeros(n_layers, hidden))
            self.w2 = torch.nn.Parameter(torch.zeros(n_layers, hidden))
        else:
            self.w = torch.nn.Parameter(torch.zeros(n_layers, n_features))

    def config(self) -> dict:
        return {
            "n_layers": self.n_layers,
            "n_features": self.n_features,
            "window": self.window,
            "hidden": self.hidden,
        }

    def forward(self, layer: int, feats: torch.Tensor) -> torch.Tensor:
        """``feats (..., F)`` of layer ``layer`` -> ``(...)`` key scores (fp32)."""
        x = (feats.float() - self.mean[layer]) / self.std[layer]
        if self.hidden:
            return torch.nn.functional.silu(x @ self.w1[layer] + self.b1[layer]) @ self.w2[layer]
        return x @ self.w[layer]


def _base(model):
    """The `PreTrainedModel` under DDP / accelerate / PEFT wrappers (the module the head is attached to)."""
    for _ in range(8):  # wrappers nest a few levels at most
        if isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        else:
            break
    return model


def find_score_head(model) -> ScoreHead | None:
    """The head attached to ``model`` (through DDP / PEFT wrappers), or None."""
    head = getattr(_base(model), ATTR, None)
    return head if isinstance(head, ScoreHead) else None


def attach_score_head(model, head: ScoreHead) -> ScoreHead:
    """Register ``head`` as ``model.ngc_score_head`` (a submodule: its parameters train, move and are wrapped
    with the model), on the model's device. Returns it."""
    base = _base(model)
    try:
        device = next(base.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    setattr(base, ATTR, head.to(device))
    return head


def detach_score_head(model) -> ScoreHead | None:
    """Remove and return the attached head (e.g. around ``save_pretrained``, whose weights file must stay the
    base architecture's), or None."""
    base = _base(model)
    head = find_score_head(base)
    if head is not None:
        delattr(base, ATTR)
    return head


def save_score_head(head: ScoreHead, folder: str) -> None:
    """Write ``score_head.safetensors`` (weights and feature statistics) and ``score_head.json`` to ``folder``."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, os.path.join(folder, HEAD_WEIGHTS))
    with open(os.path.join(folder, HEAD_CONFIG), "w") as fh:
        json.dump(head.config(), fh, indent=1)


def load_score_head(folder: str) -> ScoreHead | None:
    """The head saved in ``folder`` by `save_score_head`, or None if it has none. A malformed file fails
    naming it."""
    cfg_path, w_path = os.path.join(folder, HEAD_CONFIG), os.path.join(folder, HEAD_WEIGHTS)
    if not os.path.isfile(cfg_path):
        return None
    from safetensors.torch import load_file

    try:
        with open(cfg_path) as fh:
            cfg = json.load(fh)
        head = ScoreHead(
            int(cfg["n_layers"]), int(cfg["n_features"]), int(cfg["window"]), int(cfg.get("hidden", 0))
        )
        head.load_state_dict(load_file(w_path))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{folder}: malformed score head ({HEAD_CONFIG} / {HEAD_WEIGHTS}): {e}") from e
    return head


def attach_saved_score_head(model, folder) -> bool:
    """Attach the head saved in ``folder`` (if any) to ``model``; True if one was attached."""
    if folder is None or not os.path.isdir(str(folder)):
        return False
    head = load_score_head(str(folder))
    if head is None:
        return False
    attach_score_head(model, head)
    return True


class ScoreHeadPolicy(EvictionPolicy):
    """``s_t = head_ℓ(key_features(t))``: the model's attached `ScoreHead` as the score rule (learned).

    Built from the model (`from_model`): ``get_policy(cfg, model)``. Its query window is the head's.
    """

    name = "score_head"
    learned = True
    needs_model = True

    def __init__(self, cfg, head: ScoreHead | None = None):
        super().__init__(cfg)
        if cfg.logit_transform != "none":
            raise ValueError(
                f"EvictionConfig.logit_transform={cfg.logit_transform!r}: the score_head policy's scores are "
                "already logits (they may be negative); use 'none'"
            )
        self.head = head

    @classmethod
    def from_model(cls, cfg, model) -> ScoreHeadPolicy:
        head = find_score_head(model) if model is not None else None
        if head is None:
            raise ValueError(
                "eviction policy 'score_head' needs a model with a scoring head attached "
                f"(model.{ATTR}; a model folder with {HEAD_CONFIG}, e.g. from "
                "`python -m ngc_trl.warm_start`)"
            )
        return cls(cfg, head)

    @property
    def query_window(self) -> int:
        return self.head.window if self.head is not None else self.cfg.score_window

    def token_scores(self, view: LayerView) -> torch.Tensor:
        if self.head is None or view.layer_idx is None:
            raise ValueError(
                "score_head: needs an attached head (from_model) and views that name their layer"
            )
        scores = self.head(int(view.layer_idx), key_features(view, self.head.window))
        return scores.masked_fill(~view.live, 0.0)
