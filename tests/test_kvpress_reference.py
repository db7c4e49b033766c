"""Optional: our per-token scores against kvpress 0.5.5's ``press.score(...)`` on identical tensors.

Skipped unless kvpress is installed (``pip install requests && pip install --no-deps kvpress==0.5.5
cachetools fire termcolor``: kvpress pins an older transformers, so its dependencies are installed by hand);
with ``NGC_REQUIRE_REFERENCES=1`` (CI) a missing or broken reference fails instead of skipping. Importing kvpress patches transformers' attention
functions globally, so the comparison runs in its own process (one subprocess for the whole module).

Setup: a real Qwen2 attention layer from a tiny random config (GQA: 4 query heads, 2 KV heads),
random hidden states for two rows of 40 and 29 tokens; post-RoPE keys and queries come from the
layer's own projections. kvpress scores each row on its own (it has no ragged batches); ours score
both rows at once, row 1 padded with garbage non-live slots, and must match kvpress on the live ones.

Compared (before our layer mean and block pooling where kvpress is per KV head):

* KNorm, KeyDiff: per-KV-head scores, all keys.
* SnapKV (w = 8 and 16): per-KV-head scores on the prefix keys; kvpress gives the window
  ``max + 1`` where we give ``+inf`` (both: always kept).
* TOVA: the head-averaged score on every key but the last (kvpress ``max + 1``, ours ``+inf``);
  kvpress copies it to every KV head.
* StreamingLLM: kvpress scores are 0/1 for one compression ratio, ours a ranking; compared through
  the kept *set* at token level (top ``int(N·(1 − r))``), which must be identical.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_RC = 77

SCRIPT = r"""
import json, sys
import torch
try:
    import kvpress
    from kvpress import KeyDiffPress, KnormPress, SnapKVPress, StreamingLLMPress, TOVAPress
except Exception as exc:  # missing import-time dependency (datasets, cachetools, fire, ...)
    print(f"kvpress import failed: {exc!r}")
    sys.exit(77)
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RotaryEmbedding, apply_rotary_pos_emb

from ngc_trl.engine.config import EvictionConfig
from ngc_trl.policies import LayerView, get_policy
from ngc_trl.policies.keydiff import keydiff_kv_head_scores
from ngc_trl.policies.knorm import knorm_kv_head_scores
from ngc_trl.policies.snapkv import snapkv_kv_head_scores
from ngc_trl.engine.scoring import block_ids

torch.manual_seed(0)
H, H_KV, HD, N, LENS = 4, 2, 16, 40, (40, 29)
cfg = Qwen2Config(hidden_size=64, num_attention_heads=H, num_key_value_heads=H_KV, head_dim=HD,
                  num_hidden_layers=1, intermediate_size=128, vocab_size=32)
module = Qwen2Attention(cfg, 0).eval()
torch.nn.init.normal_(module.q_proj.weight, std=0.3)
torch.nn.init.normal_(module.k_proj.weight, std=0.3)
rope = Qwen2RotaryEmbedding(cfg)
module.rotary_emb = rope
hidden = torch.randn(2, N, 64)
cos, sin = rope(hidden, torch.arange(N)[None].expand(2, N))
with torch.no_grad():
    q = module.q_proj(hidden).view(2, N, H, HD).transpose(1, 2)
    k = module.k_proj(hidden).view(2, N, H_KV, HD).transpose(1, 2)
    v = module.v_proj(hidden).view(2, N, H_KV, HD).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
live = torch.arange(N)[None] < torch.tensor(LENS)[:, None]
k = torch.where(live[:, None, :, None], k, 100 * torch.randn_like(k))  # garbage padding


def view_for(w):
    qs = torch.stack([q[r, :, L - w:L] for r, L in enumerate(LENS)])
    q_pos = torch.stack([torch.arange(L - w, L) for L in LENS])
    return LayerView(keys=k, values=v, pos=torch.arange(N).expand(2, N), live=live, bid=block_ids(live, 32),
                     queries=qs, q_pos=q_pos, q_valid=torch.ones(2, w, dtype=torch.bool),
                     scale=module.scaling, prompt_len=torch.zeros(2, dtype=torch.long))


def ref(press, r):
    L = LENS[r]
    with torch.no_grad():
        out = press.score(module, hidden[r:r + 1, :L], k[r:r + 1, :, :L], v[r:r + 1, :, :L], None,
                          {"position_embeddings": (cos[r:r + 1, :L], sin[r:r + 1, :L])})
    return out[0].double()


def err(a, b):
    return float((a.double() - b.double()).abs().max())


res = {"knorm": 0.0, "keydiff": 0.0, "snapkv": 0.0, "tova": 0.0, "streaming_llm": True, "window_kept": True}
view = view_for(16)
for r, L in enumerate(LENS):
    res["knorm"] = max(res["knorm"], err(knorm_kv_head_scores(k, live)[r, :, :L], ref(KnormPress(), r)))
    res["keydiff"] = max(res["keydiff"], err(keydiff_kv_head_scores(k, live)[r, :, :L], ref(KeyDiffPress(), r)))
    for w in (8, 16):
        theirs = ref(SnapKVPress(window_size=w), r)
        ours = snapkv_kv_head_scores(view_for(w), w)[r, :, :L]
        res["snapkv"] = max(res["snapkv"], err(ours[:, :-w], theirs[:, :-w]))
        res["window_kept"] &= bool(torch.isinf(ours[:, -w:]).all() and (theirs[:, -w:] > theirs[:, :-w].max()).all())
    theirs = ref(TOVAPress(), r)
    ours = get_policy(EvictionConfig(policy="tova")).token_scores(view_for(1))[r, :L]
    res["tova"] = max(res["tova"], err(ours[:-1], theirs[0, :-1]), err(theirs[0], theirs[1]))
    res["window_kept"] &= bool(torch.isinf(ours[-1])) and bool(theirs[0, -1] > theirs[0, :-1].max())
    ours = get_policy(EvictionConfig(policy="streaming_llm")).token_scores(view_for(1))[r, :L]
    for ratio in (0.25, 0.5, 0.7):
        n_kept = int(L * (1 - ratio))
        theirs = ref(StreamingLLMPress(compression_ratio=ratio), r)[0]
        kept_theirs = set(torch.nonzero(theirs == 1).flatten().tolist())
        kept_ours = set(torch.topk(ours, n_kept).indices.tolist())
        res["streaming_llm"] &= len(kept_theirs) == n_kept and kept_theirs == kept_ours
print("RESULT " + json.dumps(res))
"""


def skip_or_fail(reason: str):
    """Skip, or fail where the reference is required (``NGC_REQUIRE_REFERENCES=1``, as CI sets it)."""
    if os.environ.get("NGC_REQUIRE_REFERENCES") == "1":
        pytest.fail(f"the kvpress reference is required here: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def kvpress_results():
    if importlib.util.find_spec("kvpress") is None:
        skip_or_fail("kvpress not installed (optional reference: pip install --no-deps kvpress==0.5.5 ...)")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    if proc.returncode == SKIP_RC:
        skip_or_fail(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.mark.parametrize("name", ["knorm", "keydiff", "snapkv", "tova"])
def test_scores_match_kvpress(kvpress_results, name):
    assert kvpress_results[name] < 1e-5, kvpress_results


def test_streaming_llm_keeps_the_kvpress_set(kvpress_results):
    assert kvpress_results["streaming_llm"]


def test_protected_windows_are_kept_by_both(kvpress_results):
    assert kvpress_results["window_kept"]
