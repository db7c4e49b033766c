"""bench/logit_landscape.py: its settings parser and the logit bias it adds to the decode loop."""

import pytest
import torch
from conftest import bench_module, left_padded

ll = bench_module("logit_landscape")


def test_settings_parse_and_fail_naming_the_setting():
    assert ll.parse_setting("0") == {}
    assert ll.parse_setting("prompt=2, newest=-1") == {"prompt": 2.0, "newest": -1.0}
    for bad in ("promt=2", "prompt", "prompt=inf"):
        with pytest.raises(ValueError, match="setting"):
            ll.parse_setting(bad)


def test_a_large_prompt_bias_keeps_the_whole_prompt_and_undo_restores(model):
    """With β_prompt = 50 every round keeps the prompt blocks (the ngc scorer alone does not); after the
    undo the decode loop is the plain policy again (same records as before)."""
    from ngc_trl import EvictionConfig, generate_with_eviction

    ids, mask = left_padded([4, 4, 4, 4], seed=2)  # 2 prompt blocks; every round keeps at least 4 blocks
    cfg = EvictionConfig(policy="ngc", eviction_rate=0.5, eviction_interval=16, block_size=2, score_window=3)
    kw = dict(max_new_tokens=60, eos_token_id=[])
    plain = generate_with_eviction(model, ids, mask, cfg, **kw)
    restore = ll.install_bias({"prompt": 50.0})
    try:
        biased = generate_with_eviction(model, ids, mask, cfg, **kw)
    finally:
        restore()
    again = generate_with_eviction(model, ids, mask, cfg, **kw)
    assert torch.equal(again.records.kept, plain.records.kept)
    assert biased.cache_stats.prompt_kept.min() > plain.cache_stats.prompt_kept.min()
    assert biased.cache_stats.prompt_kept.min() == pytest.approx(1.0)
