"""bench/oracle_cloning.py: the cloning loss is the ngc scorer's log-prob of the oracle's recorded actions,
and a few optimizer steps on fixed oracle rollouts raise it (the gradient reaches the scorer)."""

import torch
from conftest import bench_module
from transformers import Qwen2ForCausalLM

from ngc_trl import EvictionConfig
from ngc_trl.models import char_tokenizer, tiny_qwen2_config

oc = bench_module("oracle_cloning")


def test_cloning_steps_raise_the_ngc_log_prob_of_the_oracle_actions():
    tok = char_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_qwen2_config(len(tok), num_layers=2, hidden=64, initializer_range=0.2))
    cfg = EvictionConfig(
        eviction_interval=8,
        eviction_rate=0.5,
        block_size=2,
        score_window=3,
        policy="ngc",
        logit_transform="relative",
        logit_scale=2.0,
    )
    problems = [{"prompt": "nums 3 5 7 target 9\n"}, {"prompt": "abc 7\n"}]
    seq, am, records, plen = oc.oracle_rollouts(model, tok, problems, cfg, max_new_tokens=24)
    assert records.acted.any()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss, n = oc.cloning_loss(model, seq, am, records, plen, cfg)
        assert n == int(records.acted.sum()) and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert model.model.layers[0].self_attn.k_proj.weight.grad.abs().max() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    with torch.no_grad():
        plain, _ = oc.cloning_loss(model, seq, am, records, plen, cfg)
        anchored, _ = oc.cloning_loss(model, seq, am, records, plen, cfg, token_weight=1.0)
    assert anchored > plain  # plus the completion tokens' NLL (> 0)
