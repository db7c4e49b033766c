"""L_mem keeps its gradient under every gradient-checkpointing mode, with and without LoRA.

Reentrant checkpointing (which TRL forces for PEFT + DeepSpeed ZeRO-3) runs checkpointed layers under
``no_grad``; the eviction log-probs computed inside would not require grad and L_mem would silently be 0
unless they leave each layer as outputs of its checkpoint."""

import pytest
import torch
from conftest import tiny_qwen2
from peft import LoraConfig, get_peft_model
from test_replay import CFG, rollout
from test_trainer import make_trainer

from ngc_trl.engine.attention import enable_ngc_attention, no_mask
from ngc_trl.engine.replay import ReplayContext, route_eviction_logps_through_checkpoints

MODES = {"none": None, "non_reentrant": {"use_reentrant": False}, "reentrant": {"use_reentrant": True}}


def replay_grads(mode, lora, data):
    """Gradients of ``-Σ eviction log-probs + 0.1 · Σ token log-probs`` (both losses) on a fixed rollout."""
    model = tiny_qwen2(seed=1)
    if lora:
        torch.manual_seed(0)
        model = get_peft_model(
            model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
        )
    model.train()
    if MODES[mode] is not None:
        model.gradient_checkpointing_enable(MODES[mode])
        model.enable_input_require_grads()  # what TRL / peft do for a frozen embedding
    enable_ngc_attention(model)
    route_eviction_logps_through_checkpoints(model)
    route_eviction_logps_through_checkpoints(model)  # idempotent
    seqs, full_mask, records, prompt_len = data
    ctx = ReplayContext(full_mask.long(), records, CFG, prompt_len=prompt_len)
    out = model(
        input_ids=seqs,
        attention_mask=no_mask(model),
        position_ids=ctx.position_ids,
        ngc_replay=ctx,
        use_cache=False,
    )
    tok = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, seqs[:, 1:, None])[..., 0]
    ev = ctx.eviction_logp(3)
    assert ev.requires_grad, mode
    (-ev.sum() + 0.1 * tok[full_mask[:, 1:]].sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, ev.detach()


@pytest.mark.parametrize("lora", [False, True])
def test_eviction_logp_gradient_is_equal_under_every_checkpointing_mode(lora):
    _, mask, out, full_mask = rollout(tiny_qwen2(seed=1), seed=2)
    data = (out.sequences, full_mask, out.records, mask.sum(1))
    ref, ref_ev = replay_grads("none", lora, data)
    assert any(g.abs().sum() > 0 for n, g in ref.items() if "k_proj" in n)
    for mode in ("non_reentrant", "reentrant"):
        grads, ev = replay_grads(mode, lora, data)
        assert torch.equal(ev, ref_ev)
        assert grads.keys() == ref.keys()
        for n, g in grads.items():
            assert torch.allclose(g, ref[n], rtol=1e-5, atol=1e-6), (mode, n, (g - ref[n]).abs().max())


def test_trainer_eviction_loss_gradient_survives_reentrant_checkpointing_with_lora(tmp_path):
    """NGCTrainer with LoRA and ``use_reentrant=True``: the L_mem part of the gradient equals the one
    without checkpointing (same batch, same weights)."""
    batch, grads = None, {}
    for mode in ("none", "reentrant"):
        for coef in (0.0, 1.0):
            ckpt = (
                {}
                if mode == "none"
                else {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": MODES[mode]}
            )
            tr = make_trainer(tmp_path, eviction_loss_coef=coef, **ckpt)
            if mode != "none":  # what Trainer.train() does before the first step
                tr.model.activation_checkpointing_enable(activation_checkpointing_kwargs=MODES[mode])
                layer = tr.model.base_model.model.model.layers[0]
                assert (
                    layer.gradient_checkpointing
                    and layer._gradient_checkpointing_func.keywords["use_reentrant"]
                )
            if batch is None:
                torch.manual_seed(1)
                batch = tr._generate_and_score_completions([{"prompt": "abc 7\n"}] * 3)
                batch["advantages"] = torch.tensor([1.0, -0.5, -0.5])
            tr.model.train()
            tr.current_gradient_accumulation_steps = 1
            tr._compute_loss(tr.model, dict(batch)).backward()
            grads[mode, coef] = {
                n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None
            }
    for mode in ("none", "reentrant"):
        mem = {n: grads[mode, 1.0][n] - grads[mode, 0.0][n] for n in grads[mode, 1.0]}
        if mode == "none":
            ref = mem
            assert any(g.abs().max() > 1e-6 for n, g in mem.items() if "k_proj" in n)
        else:
            for n, g in mem.items():
                assert torch.allclose(g, ref[n], rtol=1e-4, atol=1e-6), (n, (g - ref[n]).abs().max())
