"""Every GRPOConfig option that touches completions, masks, batching, generation or the loss either works
with NGC and Breadcrumbs (one tiny training step each) or is refused when the config is built, naming it."""

import math

import pytest
import test_breadcrumbs_trainer as bc
import test_trainer as ngc
import torch

from ngc_trl import BreadcrumbsConfig, NGCConfig, NGCTrainer

# option -> the overrides of a working one- or two-step run
WORKING = {
    "mask_truncated_completions": dict(mask_truncated_completions=True),
    "num_iterations": dict(num_iterations=2),
    "steps_per_generation": dict(steps_per_generation=2, max_steps=2),
    "generation_batch_size": dict(generation_batch_size=6, max_steps=2),
    "top_entropy_quantile": dict(top_entropy_quantile=0.5),
    "importance_sampling_level": dict(importance_sampling_level="sequence", num_iterations=2),
    "delta": dict(delta=1.5, num_iterations=2),
    "loss_type=grpo": dict(loss_type="grpo"),
    "loss_type=bnpo": dict(loss_type="bnpo"),
    "loss_type=dapo": dict(loss_type="dapo"),
    "off_policy_mask_threshold": dict(off_policy_mask_threshold=0.5, num_iterations=2),
    "entropy_coef": dict(entropy_coef=0.01),
    "beta": dict(beta=0.04),
    # full fine-tuning: TRL's own cast fails for PEFT models with tied embeddings (it reads model.model.embed_tokens)
    "cast_lm_head_to_fp32": dict(cast_lm_head_to_fp32=True, peft=False),
}
BREADCRUMBS_EXTRA = {f"loss_type={t}": dict(loss_type=t) for t in ("cispo", "sapo")}

REFUSED = {
    "use_vllm": True,
    "use_transformers_paged": True,
    "generation_kwargs": {"no_repeat_ngram_size": 2},
    "min_p": 0.1,
    "repetition_penalty": 1.2,
    "cache_implementation": "static",
    "use_liger_kernel": True,
}
NGC_REFUSED = {**REFUSED, "loss_type": ["cispo", "sapo", "vespo", "luspo"]}


def check_step(trainer, key):
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(v) for v in losses)
    assert any(key in h for h in trainer.state.log_history), key


@pytest.mark.parametrize("name", list(WORKING))
def test_ngc_trains_with(tmp_path, name):
    tr = ngc.make_trainer(tmp_path, **WORKING[name])
    seen = []
    orig = tr._compute_loss

    def spy(model, inputs):
        seen.append({k: v for k, v in inputs.items() if k.startswith("ngc_") or k == "completion_mask"})
        return orig(model, inputs)

    tr._compute_loss = spy
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    check_step(tr, "ngc/evict_logp")
    if name == "mask_truncated_completions":  # the random model never ends a completion: every row is masked
        masked = [b["completion_mask"].sum(1) == 0 for b in seen]
        assert all(m.all() for m in masked)
        for b, m in zip(seen, masked):  # their actions are out of L_mem, like their tokens
            assert not b["ngc_acted"][m].any() and (b["ngc_positions"][m] == -1).all()
        return
    assert any(not torch.equal(p, before[n]) for n, p in tr.model.named_parameters() if n in before)
    assert any(b["ngc_acted"].any() for b in seen)  # eviction actions reached the loss


# beta > 0: Breadcrumbs with LoRA refuses it (tested there); full fine-tuning loads the reference by model name
@pytest.mark.parametrize("name", [n for n in {**WORKING, **BREADCRUMBS_EXTRA} if n != "beta"])
def test_breadcrumbs_trains_with(tmp_path, name):
    tr = bc.make_trainer(tmp_path, **{**WORKING, **BREADCRUMBS_EXTRA}[name])
    check_step(tr, "breadcrumbs/distill_loss")


@pytest.mark.parametrize(
    "name,value", [(n, v) for n, vs in NGC_REFUSED.items() for v in (vs if isinstance(vs, list) else [vs])]
)
def test_ngc_config_refuses(tmp_path, name, value):
    with pytest.raises(ValueError, match=f"NGCConfig.{name}"):
        NGCConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **{name: value})


@pytest.mark.parametrize("name", ["use_transformers_paged", "use_liger_kernel", "use_vllm"])
def test_breadcrumbs_config_refuses(tmp_path, name):
    with pytest.raises(ValueError, match=f"BreadcrumbsConfig.{name}"):
        BreadcrumbsConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **{name: REFUSED[name]})


def test_ngc_trainer_refuses_tools(tmp_path):
    def calculator(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: first.
            b: second.
        """
        return a + b

    with pytest.raises(ValueError, match="tools"):
        tok = ngc.char_tokenizer()
        model = ngc.Qwen2ForCausalLM(ngc.tiny_qwen2_config(len(tok), num_layers=2, hidden=64))
        NGCTrainer(
            model=model,
            reward_funcs=ngc.seven_reward,
            tools=[calculator],
            args=NGCConfig(
                output_dir=str(tmp_path),
                use_cpu=True,
                report_to="none",
                per_device_train_batch_size=3,
                num_generations=3,
                max_completion_length=8,
            ),
            train_dataset=ngc.Dataset.from_dict({"prompt": ["abc"] * 3}),
            processing_class=tok,
        )
