"""The replay forward reproduces the rollout: token log-probs, eviction log-probs, and gradients."""

import pytest
import torch
from conftest import left_padded, tiny_qwen2

from ngc_trl import EvictionConfig, generate_with_eviction
from ngc_trl.engine.replay import NEVER, ReplayContext, death_times, replay_forward

CFG = EvictionConfig(policy="ngc", eviction_interval=8, block_size=2, score_window=3)


def rollout(model, cfg=CFG, lengths=(5, 11, 8), n=36, seed=0, eos=None, **kw):
    ids, mask = left_padded(list(lengths), seed=seed)
    out = generate_with_eviction(
        model,
        ids,
        mask,
        cfg,
        max_new_tokens=n,
        do_sample=True,
        temperature=1.0,
        generator=torch.Generator().manual_seed(seed),
        eos_token_id=eos,
        **kw,
    )
    full_mask = torch.cat([mask.bool(), out.completion_mask], 1)
    return ids, mask, out, full_mask


def pick_eos(model):
    """A token that the sampled rollouts emit mid-way, so sequences end at different lengths."""
    _, _, out, _ = rollout(model, eos=[])
    return int(out.sequences[1, -20])


@pytest.mark.parametrize(
    "cfg",
    [
        CFG,
        EvictionConfig(
            policy="ngc",
            eviction_interval=8,
            block_size=3,
            score_window=4,
            eviction_rate=0.6,
            logit_scale=20.0,
        ),
        # the tiny recipes' sharper logits (score / mean candidate score, x2) and the log transform
        EvictionConfig(
            policy="ngc",
            eviction_interval=8,
            block_size=3,
            score_window=4,
            eviction_rate=0.6,
            logit_transform="relative",
            logit_scale=2.0,
        ),
        EvictionConfig(
            policy="ngc",
            eviction_interval=8,
            block_size=3,
            score_window=4,
            eviction_rate=0.6,
            logit_transform="log",
        ),
    ],
    ids=["raw", "scale20", "relative2", "log"],
)
def test_replay_reproduces_token_and_eviction_logprobs(model, cfg):
    ids, mask, out, full_mask = rollout(model, cfg, eos=pick_eos(model))
    lengths = out.completion_mask.sum(1)
    assert len(set(lengths.tolist())) > 1  # sequences end at different lengths
    assert (out.records.acted.sum((1, 2)) > 0).all()  # and every one evicted
    ctx = ReplayContext(full_mask.long(), out.records, cfg, prompt_len=mask.sum(1))
    logp = replay_forward(model, out.sequences, full_mask.long(), ctx)
    p = ids.shape[1]
    tok = logp[:, p - 1 :]
    m = out.completion_mask
    assert (tok[m] - out.token_logprobs[m]).abs().max() < 1e-5
    ev = ctx.eviction_logp(model.config.num_hidden_layers)
    acted = out.records.acted
    assert (ev[acted] - out.records.logp[acted]).abs().max() < 1e-5
    assert (ev[~acted] == 0).all()


def test_without_replay_masks_tokens_differ(model):
    _, mask, out, full_mask = rollout(model)
    ctx = ReplayContext(full_mask.long(), out.records, CFG, replay_masks=False)
    logp = replay_forward(model, out.sequences, full_mask.long(), ctx)
    p = mask.shape[1]
    m = out.completion_mask
    assert (logp[:, p - 1 :][m] - out.token_logprobs[m]).abs().max() > 1e-2  # full context = off-policy
    # a record-free context is the plain causal forward
    plain = replay_forward(model, out.sequences, full_mask.long(), ReplayContext(full_mask.long()))
    assert torch.allclose(plain, logp, atol=1e-5)


def test_visibility_is_not_monotone_and_matches_death_times(model):
    _, _, out, full_mask = rollout(model)
    ctx = ReplayContext(full_mask.long(), out.records, CFG)
    death = death_times(out.records, ctx.pos, ctx.valid, CFG.block_size)
    b, layer = 0, 0
    j = int(torch.nonzero(death[b, layer] != NEVER)[0])
    d = int(death[b, layer, j])
    vis = ctx.visible(layer)[b]
    qslot = lambda p: int(ctx.offset[b]) + p  # noqa: E731
    assert vis[qslot(d - 1), j] and not vis[qslot(d), j]  # seen before its round, hidden after
    assert vis[j, j]


def test_eviction_loss_reaches_attention_projections():
    model = tiny_qwen2(seed=1)
    _, mask, out, full_mask = rollout(model, seed=2)
    model.train()
    ctx = ReplayContext(full_mask.long(), out.records, CFG, prompt_len=mask.sum(1))
    replay_forward(model, out.sequences, full_mask.long(), ctx)
    loss = -ctx.eviction_logp(model.config.num_hidden_layers).sum()
    loss.backward()
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.grad.abs().sum() > 0 and attn.k_proj.weight.grad.abs().sum() > 0
    model.zero_grad()
    # coefficient 0: nothing flows
    ctx = ReplayContext(full_mask.long(), out.records, CFG, prompt_len=mask.sum(1))
    replay_forward(model, out.sequences, full_mask.long(), ctx)
    (0.0 * ctx.eviction_logp(model.config.num_hidden_layers).sum()).backward()
    assert attn.q_proj.weight.grad is None or attn.q_proj.weight.grad.abs().sum() == 0
    model.eval()


def test_flex_backend_matches_dense_forward(model):
    _, _, out, full_mask = rollout(model, n=20)
    dense = ReplayContext(full_mask.long(), out.records, CFG, backend="dense")
    flex = ReplayContext(full_mask.long(), out.records, CFG, backend="flex")
    with torch.no_grad():
        a = replay_forward(model, out.sequences, full_mask.long(), dense)
        b = replay_forward(model, out.sequences, full_mask.long(), flex)
    m = full_mask[:, 1:] & full_mask[:, :-1]  # predictions made from real tokens
    assert (a[m] - b[m]).abs().max() < 1e-4


def test_no_mask_reads_the_config_through_ddp_style_wrappers(model):
    """Breadcrumbs' full-fine-tuning student is called through its DDP wrapper (no ``.config``)."""
    from ngc_trl.engine.attention import no_mask

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert no_mask(Wrapper(Wrapper(model))) == no_mask(model) == {"full_attention": None}
