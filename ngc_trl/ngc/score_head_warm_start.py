"""Scoring-head warm start: fit a `ScoreHead` to the hindsight oracle's decisions (not in the paper).

NGC trains its eviction policy from the task reward alone. The `score_head` policy
(`ngc_trl.policies.score_head`) is a separate head over present-state key features; starting it at zero
(uniform evictions) would leave RL to find, from a reward whose eviction gradient is mostly noise at CPU
budgets (bench/results/README.md §5), what a dense self-supervised label already says. As the Breadcrumbs
student is warm-started by distillation before joint RL (`ngc_trl.breadcrumbs.warm_start`), the head is
warm-started here by imitation of the `oracle`, which keeps the blocks the *rest* of the model's own
full-cache completion attends to most (no reward, no answer, no external model):

1. with the language model frozen, the oracle decodes training prompts greedily with top-k eviction; at every
   (rollout, round, layer) that evicts, every live key's features (`key_features`) are recorded with the
   oracle's block scores and its keep budget ``K`` (`collect`);
2. a per-layer head scores each key; block scores are block means, as for every policy; the head is fitted by
   the Plackett–Luce log-likelihood of the oracle's top-``K`` in its order (`fit`: full-batch Adam).

NGC (``eviction_policy: score_head``) then trains the head and the model from the reward. CLI:
``python -m ngc_trl.warm_start``.
"""

from __future__ import annotations

import dataclasses

import torch

from ngc_trl.engine.decision import num_kept
from ngc_trl.engine.policy import LayerView
from ngc_trl.engine.sampling import plackett_luce_log_prob
from ngc_trl.engine.scoring import head_query_mean, reduce_blocks
from ngc_trl.policies.oracle import OraclePolicy
from ngc_trl.policies.score_head import ScoreHead, key_features


@dataclasses.dataclass
class Decision:
    """One evicting (rollout, round, layer): ``feats (S, F)`` of its live keys in temporal order, ``bid (S,)``
    their block ids, ``oracle (N,)`` the oracle's block scores, ``ngc (N,)`` the ngc scorer's, ``k`` blocks kept."""

    layer: int
    feats: torch.Tensor
    bid: torch.Tensor
    oracle: torch.Tensor
    ngc: torch.Tensor
    k: int


class RecordingOracle(OraclePolicy):
    """The oracle's scores, unchanged, plus a `Decision` per evicting row appended to ``sink`` (no
    protections: the paper's protocol, every existing block a candidate)."""

    def __init__(self, cfg, hindsight, window: int, sink: list):
        super().__init__(cfg, hindsight)
        self.window, self.sink = window, sink

    @property
    def query_window(self) -> int:
        return max(self.window, self.cfg.score_window)  # the features' and the ngc score's queries

    def token_scores(self, view: LayerView) -> torch.Tensor:
        scores = super().token_scores(view)
        feats = key_features(view, self.window)
        probs, qv = view.window_probs(self.cfg.score_window)
        ngc = head_query_mean(probs, qv)
        n_blocks = (view.live.sum(-1) + self.cfg.block_size - 1) // self.cfg.block_size
        n_max = max(int(n_blocks.max()), 1)
        o_blocks, _, _ = reduce_blocks(scores, view.bid, n_max, self.cfg.block_reduction)
        ngc_blocks = reduce_blocks(ngc, view.bid, n_max, self.cfg.block_reduction)[0]
        rate = torch.full((len(n_blocks),), self.cfg.eviction_rate, dtype=torch.float64)
        ks = num_kept(n_blocks, rate)
        for i in range(len(n_blocks)):
            n, k = int(n_blocks[i]), int(ks[i])
            if k >= n:
                continue
            live = view.live[i]
            self.sink.append(
                Decision(
                    int(view.layer_idx),
                    feats[i, live].cpu(),
                    view.bid[i, live].cpu(),
                    o_blocks[i, :n].cpu(),
                    ngc_blocks[i, :n].cpu(),
                    k,
                )
            )
        return scores


@torch.no_grad()
def collect(model, tok, problems, cfg, window: int, max_new_tokens: int, batch_size: int) -> list[Decision]:
    """The oracle's evicting decisions (with features over ``window`` queries) on greedy top-k decodes of
    ``problems`` (dicts with a string ``prompt``) at ``cfg``'s schedule."""
    from ngc_trl.engine.generation import generate_with_eviction
    from ngc_trl.policies.oracle import oracle_for_batch

    oracle_cfg = dataclasses.replace(cfg, policy="oracle")
    sink: list[Decision] = []
    model.eval()
    for i in range(0, len(problems), batch_size):
        enc = tok(
            [p["prompt"] for p in problems[i : i + batch_size]],
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
        )
        device = next(model.parameters()).device
        ids, am = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        eos, pad = tok.eos_token_id, tok.pad_token_id
        oracle, _ = oracle_for_batch(model, ids, am, oracle_cfg, [None] * len(ids), max_new_tokens, eos, pad)
        rec = RecordingOracle(oracle_cfg, oracle.data, window, sink)
        generate_with_eviction(
            model,
            ids,
            am,
            eviction=oracle_cfg,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
            policy=rec,
        )
    return sink


def _batch(decisions: list[Decision]):
    """Pad one layer's decisions: feats ``(D, S, F)``, bid ``(D, S)`` (-1 pad), oracle order ``(D, N)``
    (the top-``K`` block ids by oracle score, descending, -1 pad), pool ``(D, N)``, k ``(D,)``."""
    d = len(decisions)
    s = max(x.feats.shape[0] for x in decisions)
    n = max(x.oracle.shape[0] for x in decisions)
    f = decisions[0].feats.shape[1]
    feats = torch.zeros(d, s, f)
    bid = torch.full((d, s), -1, dtype=torch.long)
    order = torch.full((d, n), -1, dtype=torch.long)
    pool = torch.zeros(d, n, dtype=torch.bool)
    for i, x in enumerate(decisions):
        feats[i, : x.feats.shape[0]] = x.feats
        bid[i, : x.bid.shape[0]] = x.bid
        order[i, : x.k] = torch.argsort(x.oracle, descending=True, stable=True)[: x.k]
        pool[i, : x.oracle.shape[0]] = True
    return feats, bid, order, pool, torch.tensor([x.k for x in decisions])


def block_scores(head: ScoreHead, layer: int, feats, bid, n: int) -> torch.Tensor:
    """The head's key scores reduced to block means, as every policy's are: ``(D, N)``."""
    return reduce_blocks(head(layer, feats), bid, n, "mean")[0]


def fit(
    decisions: list[Decision],
    n_layers: int,
    hidden: int,
    steps: int,
    lr: float,
    seed: int = 0,
    window: int = 5,
) -> ScoreHead:
    """Fit a `ScoreHead` (features over ``window`` queries, standardized by the live keys' statistics per
    layer) by the Plackett–Luce log-likelihood of the oracle's top-``K`` (full batch, Adam). Every layer
    needs at least one decision."""
    torch.manual_seed(seed)
    by_layer = []
    for layer in range(n_layers):
        mine = [x for x in decisions if x.layer == layer]
        if not mine:
            raise ValueError(f"score head warm start: no evicting decision in layer {layer} (more problems?)")
        by_layer.append(_batch(mine))
    stats = []
    for feats, bid, *_ in by_layer:
        live = feats[bid >= 0]
        stats.append((live.mean(0), live.std(0).clamp(min=1e-6)))
    mean, std = (torch.stack(x) for x in zip(*stats))
    head = ScoreHead(n_layers, by_layer[0][0].shape[-1], window, hidden, mean, std)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        loss = torch.zeros(())
        for layer, (feats, bid, order, pool, _) in enumerate(by_layer):
            logits = block_scores(head, layer, feats, bid, pool.shape[1])
            loss = loss - plackett_luce_log_prob(logits, order, pool).sum()
        loss = loss / len(decisions)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


@torch.no_grad()
def agreement(decisions: list[Decision], head: ScoreHead | None) -> float:
    """Mean ``|top-K(scores) ∩ top-K(oracle)| / K`` over ``decisions``; ``head=None``: the ngc scores."""
    total = 0.0
    for x in decisions:
        n = x.oracle.shape[0]
        if head is None:
            scores = x.ngc
        else:
            scores = block_scores(head, x.layer, x.feats[None], x.bid[None], n)[0]
        ours = set(torch.topk(scores, x.k).indices.tolist())
        theirs = set(torch.topk(x.oracle, x.k).indices.tolist())
        total += len(ours & theirs) / x.k
    return total / max(len(decisions), 1)
