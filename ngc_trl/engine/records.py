"""`EvictionRecords`: every eviction action of a decoded batch, as padded tensors the replay reads back.

The decode loop (`ngc_trl.engine.generation`) adds one round at a time to a `RecordBuilder`; the replay
(`ngc_trl.engine.replay`) rebuilds every layer's visibility and recomputes each action's log-prob from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EvictionRecords:
    """Every eviction action of a batch, as padded tensors with first dim ``B`` (so TRL's shuffle/split
    keep them aligned with the completions). ``R`` = most rounds of any sequence, ``L`` = layers,
    ``N`` = most blocks of any decision.

    Attributes:
        positions: ``(B, R)`` long, absolute position at which round ``r`` fired (``-1``: no round).
        acted: ``(B, R, L)`` bool, the layer evicted at least one block (an action exists).
        kept: ``(B, R, L, N)`` long, kept block ids: the ``n_sampled`` sampled ones first, in sampled
            order, then the forced (protected) ones ascending; ``-1`` padding.
        n_sampled: ``(B, R, L)`` long.
        evicted: ``(B, R, L, N)`` long, evicted block ids ascending, ``-1`` padding.
        n_blocks: ``(B, R, L)`` long, live blocks before the round.
        logp: ``(B, R, L)`` fp32, log-prob of the action under the rollout policy (0 where not ``acted``).
        eviction_rate: ``(B,)`` fp32, ε in force for each sequence.
    Block ids index the layer's live keys in temporal order, cut into blocks of ``b`` at that round.
    """

    positions: torch.Tensor
    acted: torch.Tensor
    kept: torch.Tensor
    n_sampled: torch.Tensor
    evicted: torch.Tensor
    n_blocks: torch.Tensor
    logp: torch.Tensor
    eviction_rate: torch.Tensor

    def select(self, rows) -> EvictionRecords:
        """The records of ``rows`` (a slice or index tensor)."""
        return EvictionRecords(**{k: v[rows] for k, v in self.__dict__.items()})

    def cleared(self, rows: torch.Tensor) -> EvictionRecords:
        """A copy with no action for the rows where ``rows (B,)`` is True (no round, nothing evicted): what a
        rollout whose completion is masked out of the loss (``mask_truncated_completions``) replays as."""
        r = rows.to(self.positions.device)

        def fill(t, v):
            return torch.where(r.view(-1, *([1] * (t.dim() - 1))), torch.full_like(t, v), t)

        return EvictionRecords(
            positions=fill(self.positions, -1),
            acted=fill(self.acted, False),
            kept=fill(self.kept, -1),
            n_sampled=fill(self.n_sampled, 0),
            evicted=fill(self.evicted, -1),
            n_blocks=fill(self.n_blocks, 0),
            logp=fill(self.logp, 0.0),
            eviction_rate=self.eviction_rate,
        )

    def as_dict(self, prefix: str = "ngc_") -> dict[str, torch.Tensor]:
        return {prefix + k: v for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict, prefix: str = "ngc_") -> EvictionRecords:
        return cls(**{k: d[prefix + k] for k in cls.__dataclass_fields__})

    def rounds(self, i: int) -> list[dict]:
        """Sequence ``i``'s rounds as plain lists: ``[{position, layers: [{kept, evicted, logp}]}]``."""
        out = []
        for r in range(self.positions.shape[1]):
            if self.positions[i, r] < 0:
                break
            layers = []
            for layer in range(self.acted.shape[2]):
                kept, ev = self.kept[i, r, layer], self.evicted[i, r, layer]
                layers.append(
                    {
                        "kept": kept[kept >= 0].tolist(),
                        "evicted": ev[ev >= 0].tolist(),
                        "n_sampled": int(self.n_sampled[i, r, layer]),
                        "logp": float(self.logp[i, r, layer]),
                    }
                )
            out.append({"position": int(self.positions[i, r]), "layers": layers})
        return out


def _pack_left(x: torch.Tensor) -> torch.Tensor:
    """Move the non-negative entries of every row of ``x (..., M)`` to the front, order kept; ``-1`` after."""
    order = torch.sort((x < 0).to(torch.int8), dim=-1, stable=True).indices
    return x.gather(-1, order)


class RecordBuilder:
    """Collects decisions round by round (one device-to-host copy per round, no per-row Python work on
    device tensors) and pads them into `EvictionRecords`."""

    def __init__(self, batch, n_layers):
        self.batch, self.n_layers = batch, n_layers
        self.events = []  # (rows, round index per row, positions, kept, n_sampled, evicted, n_blocks, logp, acted)
        self.count = torch.zeros(batch, dtype=torch.long)

    def add(self, rows, position, per_layer):
        kept, evicted, n_sampled, n_blocks, logp, acted = [], [], [], [], [], []
        for dec, blocks, keep_block in per_layer:
            n = keep_block.shape[1]
            ids = torch.arange(n, device=keep_block.device).expand_as(keep_block)
            forced = torch.where(blocks.forced, ids, torch.full_like(ids, -1))
            kept.append(_pack_left(torch.cat([dec.chosen, forced], 1)))
            evicted.append(torch.where(~keep_block & blocks.exists, ids, torch.full_like(ids, -1)))
            n_sampled.append((dec.chosen >= 0).sum(1))
            n_blocks.append(blocks.n_blocks)
            logp.append(dec.logp.float())
            acted.append(dec.acted)
        width = max(k.shape[1] for k in kept)
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1)  # noqa: E731
        ev = torch.stack([pad(_pack_left(e)) for e in evicted], 1)
        host = [
            t.cpu()
            for t in (
                rows,
                position,
                torch.stack([pad(k) for k in kept], 1),
                torch.stack(n_sampled, 1),
                ev,
                torch.stack(n_blocks, 1),
                torch.stack(logp, 1),
                torch.stack(acted, 1),
            )
        ]
        rows_c = host[0]
        self.events.append((rows_c, self.count[rows_c].clone(), *host[1:]))
        self.count[rows_c] += 1

    def build(self, eviction_rate, device) -> EvictionRecords:
        b, n_l = self.batch, self.n_layers
        r = int(self.count.max()) if self.events else 0
        n = max(
            [max(int((e[3] >= 0).sum(-1).max()), int((e[5] >= 0).sum(-1).max())) for e in self.events] + [1]
        )
        positions = torch.full((b, r), -1, dtype=torch.long)
        acted = torch.zeros(b, r, n_l, dtype=torch.bool)
        kept = torch.full((b, r, n_l, n), -1, dtype=torch.long)
        evicted = torch.full((b, r, n_l, n), -1, dtype=torch.long)
        n_sampled = torch.zeros(b, r, n_l, dtype=torch.long)
        n_blocks = torch.zeros(b, r, n_l, dtype=torch.long)
        logp = torch.zeros(b, r, n_l)
        for rows, ri, pos, kp, ns, ev, nb, lp, a in self.events:
            positions[rows, ri] = pos
            fit = lambda t: torch.nn.functional.pad(t, (0, max(0, n - t.shape[-1])), value=-1)[..., :n]  # noqa: E731
            kept[rows, ri] = fit(kp)
            evicted[rows, ri] = fit(ev)
            n_sampled[rows, ri], n_blocks[rows, ri], logp[rows, ri], acted[rows, ri] = ns, nb, lp, a
        return EvictionRecords(
            positions=positions.to(device),
            acted=acted.to(device),
            kept=kept.to(device),
            n_sampled=n_sampled.to(device),
            evicted=evicted.to(device),
            n_blocks=n_blocks.to(device),
            logp=logp.to(device),
            eviction_rate=eviction_rate.float().to(device),
        )
