"""Settings files, model card and Hub push of an NGC run.

Files written next to a trained model (``output_dir``):

* ``ngc_settings.json`` — the `EvictionConfig` fields (δ, ε, b, w, policy, protections...) at top level,
  plus ``interoception_rates`` / ``meta_token`` when set: exactly the keys `ngc_trl.evaluation.setup.read_ngc_settings`
  accepts, so ``ngc-eval --model output_dir`` decodes with the trained schedule.
* ``ngc_training.json`` — everything else about the run (curriculum, loss switches, base model, task),
  kept out of ``ngc_settings.json`` so that file stays a strict `EvictionConfig`.
* ``README.md`` — TRL's model card with an NGC section appended (`write_model_card`).

The same files serve both methods: a Breadcrumbs student (`ngc_trl.breadcrumbs.trainer`) writes its
`BeaconConfig` (``{"schedule": "beacons", "compression_ratio": c, "beacon_token_id": b}``) and gets its own
model-card section; `load_ngc_settings` reads either config back (older Breadcrumbs files included).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from ngc_trl.engine.config import BeaconConfig, EvictionConfig, schedule_config_from_dict

logger = logging.getLogger(__name__)

SETTINGS_FILE = "ngc_settings.json"
TRAINING_FILE = "ngc_training.json"
SETTINGS_EXTRAS = ("interoception_rates", "meta_token")  # keys eval.read_ngc_settings tolerates
CARD_MARKER = "<!-- ngc-settings -->"


# ----------------------------------------------------------------------------- settings
def write_ngc_settings(
    output_dir, eviction: EvictionConfig | BeaconConfig, extra: dict | None = None
) -> Path:
    """Write ``ngc_settings.json`` (and ``ngc_training.json`` when ``extra`` holds other keys).

    Parameters
    ----------
    output_dir : str or Path
        The model folder.
    eviction : EvictionConfig or BeaconConfig
        The decode schedule; its fields go at the top level.
    extra : dict, optional
        ``interoception_rates`` and ``meta_token`` (when not None) join ``ngc_settings.json``; every other
        key goes to ``ngc_training.json``.

    Returns
    -------
    Path
        The path of ``ngc_settings.json``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    settings = eviction.to_dict()
    for key in SETTINGS_EXTRAS:
        value = extra.pop(key, None)
        if value is not None:
            settings[key] = value
    path = out / SETTINGS_FILE
    path.write_text(json.dumps(settings, indent=2) + "\n")
    if extra:
        (out / TRAINING_FILE).write_text(json.dumps(extra, indent=2, default=str) + "\n")
    return path


def _read_settings(text: str, source: str) -> EvictionConfig | BeaconConfig:
    try:
        settings = json.loads(text)
        for key in SETTINGS_EXTRAS:
            settings.pop(key, None)
        return schedule_config_from_dict(settings)
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"invalid {SETTINGS_FILE} in {source}: {e}") from None


def load_ngc_settings(
    path_or_repo: str | os.PathLike, revision: str | None = None, token: str | None = None
) -> EvictionConfig | BeaconConfig:
    """The decode schedule a model was trained for: an `EvictionConfig` (NGC) or a `BeaconConfig` (Breadcrumbs).

    Parameters
    ----------
    path_or_repo : str or Path
        A local model/adapter folder, or a Hub repo id (``ngc_settings.json`` is fetched with
        `huggingface_hub.hf_hub_download`).
    revision, token : str, optional
        Hub revision and token (Hub only).

    Returns
    -------
    EvictionConfig or BeaconConfig

    Raises
    ------
    FileNotFoundError
        A local folder without ``ngc_settings.json``.
    ValueError
        The file holds unknown or invalid fields.
    """
    folder = Path(path_or_repo)
    if folder.is_dir():
        path = folder / SETTINGS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no NGC settings (was this model trained with ngc-train?)")
        return _read_settings(path.read_text(), str(folder))
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(str(path_or_repo), SETTINGS_FILE, revision=revision, token=token)
    return _read_settings(Path(path).read_text(), str(path_or_repo))


# ----------------------------------------------------------------------------- model card
def model_card_text(
    eviction: EvictionConfig | BeaconConfig,
    base_model: str | None = None,
    *,
    repo_id: str | None = None,
    curriculum: dict | None = None,
    interoception_rates=None,
    meta_token: str | None = None,
    task: str | None = None,
    is_adapter: bool = False,
) -> str:
    """The NGC section of the model card (markdown).

    Parameters
    ----------
    eviction : EvictionConfig
        δ, ε, b, w and the policy used in rollouts.
    base_model : str, optional
        The model fine-tuned.
    repo_id : str, optional
        Where the model lives (used in the snippet); default ``"path/to/this/model"``.
    curriculum : dict, optional
        ``{"rates": [...], "stage_steps": Δ, "alpha": α}``; None means a constant ε.
    interoception_rates : list of float, optional
        Rates written into prompts in training (budget-aware interoception).
    meta_token : str, optional
        The special token forced before every round.
    task : str, optional
        Training task (``countdown``/``math``).
    is_adapter : bool
        Whether the folder holds a PEFT adapter rather than full weights.

    A `BeaconConfig` (a Breadcrumbs student) gets its own section instead (`breadcrumbs_card_text`; only
    ``base_model``, ``repo_id``, ``task`` and ``is_adapter`` apply to it).
    """
    if isinstance(eviction, BeaconConfig):
        return breadcrumbs_card_text(eviction, base_model, repo_id=repo_id, task=task, is_adapter=is_adapter)
    e = eviction
    where = repo_id or "path/to/this/model"
    if curriculum and curriculum.get("rates"):
        cur = (
            f"ε levels {list(curriculum['rates'])}, {curriculum.get('stage_steps')} steps per stage, "
            f"α = {curriculum.get('alpha')} (Eq. 6)"
        )
    else:
        cur = "none (constant ε)"
    rows = [
        ("eviction interval δ", f"{e.eviction_interval} tokens (prompt included)"),
        ("eviction rate ε", f"{e.eviction_rate} of live blocks per round and layer"),
        ("block size b", e.block_size),
        ("score window w", e.score_window),
        ("policy", f"`{e.policy}`"),
        ("curriculum", cur),
        ("interoception", f"rates {list(interoception_rates)}" if interoception_rates else "off"),
        ("meta token", f"`{meta_token}`" if meta_token else "none"),
        (
            "protections",
            f"protect_prompt={e.protect_prompt}, num_sink={e.num_sink}, num_recent={e.num_recent}",
        ),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    load = (
        "from peft import AutoPeftModelForCausalLM\n"
        f'model = AutoPeftModelForCausalLM.from_pretrained("{where}").merge_and_unload()'
        if is_adapter
        else f'model = AutoModelForCausalLM.from_pretrained("{where}")'
    )
    tag = ""
    if interoception_rates:
        tag = (
            "\nTrained with budget-aware interoception: append `<eviction_rate>50%</eviction_rate>` (the rate "
            "you decode with) to the prompt, as `ngc_trl.ngc.trainer.add_rate_tag` does.\n"
        )
    forced = ""
    if meta_token:
        forced = f'\n    forced_token_id=tokenizer.convert_tokens_to_ids("{meta_token}"),'
    return f"""{CARD_MARKER}
## Neural Garbage Collection

This model was trained with [Neural Garbage Collection](https://arxiv.org/abs/2604.18002) (ngc-trl) to
evict its own KV cache while it reasons{f" ({task})" if task else ""}. Base model: `{base_model or "unknown"}`.

| setting | value |
|---|---|
{table}

The settings are stored in `{SETTINGS_FILE}` (read back with `ngc_trl.hub.load_ngc_settings`).

**Loading this {"adapter" if is_adapter else "model"} with plain `from_pretrained` and calling `generate()`
decodes WITHOUT eviction** (full KV cache). To decode with the learned eviction policy:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from ngc_trl import generate_with_eviction
from ngc_trl.hub import load_ngc_settings

{load}
tokenizer = AutoTokenizer.from_pretrained("{where}", padding_side="left")
eviction = load_ngc_settings("{where}")  # δ={e.eviction_interval}, ε={e.eviction_rate}, b={e.block_size}, w={e.score_window}
enc = tokenizer(["<your prompt>"], return_tensors="pt", padding=True)
out = generate_with_eviction(
    model, enc["input_ids"], enc["attention_mask"], eviction=eviction, max_new_tokens=1024,{forced}
)
print(tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True))
```
{tag}
Or evaluate: `ngc-eval --model {where} --task {task or "countdown"} --policies full,ngc --rates 0.5`.
"""


def breadcrumbs_card_text(
    eviction: BeaconConfig,
    base_model: str | None = None,
    *,
    repo_id: str | None = None,
    task: str | None = None,
    is_adapter: bool = False,
) -> str:
    """The Breadcrumbs section of a student's model card (markdown); see `model_card_text`."""
    e = eviction
    where = repo_id or "path/to/this/model"
    load = (
        "from peft import AutoPeftModelForCausalLM\n"
        f'model = AutoPeftModelForCausalLM.from_pretrained("{where}").merge_and_unload()'
        if is_adapter
        else f'model = AutoModelForCausalLM.from_pretrained("{where}")'
    )
    return f"""{CARD_MARKER}
## Breadcrumbs Reasoning (compression beacons)

This is the compressing *student* of a [Breadcrumbs Reasoning](https://arxiv.org/abs/2510.13797) run (ngc-trl),
distilled from a full-cache GRPO teacher on the teacher's own rollouts{f" ({task})" if task else ""}. Base model:
`{base_model or "unknown"}`. The teacher is in the `teacher/` subfolder.

| setting | value |
|---|---|
| compression ratio c | {e.compression_ratio} (one beacon after every c generated tokens) |
| beacon token id | {e.beacon_token_id} |

The settings are stored in `{SETTINGS_FILE}` (read back with `ngc_trl.hub.load_ngc_settings`).

**Loading this {"adapter" if is_adapter else "model"} with plain `from_pretrained` and calling `generate()`
decodes WITHOUT beacons** (full KV cache, which the student was not trained for). To decode with beacons:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from ngc_trl import generate_with_eviction
from ngc_trl.hub import load_ngc_settings

{load}
tokenizer = AutoTokenizer.from_pretrained("{where}", padding_side="left")
eviction = load_ngc_settings("{where}")  # BeaconConfig(c={e.compression_ratio})
enc = tokenizer(["<your prompt>"], return_tensors="pt", padding=True)
out = generate_with_eviction(model, enc["input_ids"], enc["attention_mask"], eviction=eviction, max_new_tokens=1024)
print(tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True))
```
"""


def write_model_card(
    output_dir, eviction: EvictionConfig | BeaconConfig, base_model: str | None = None, **kwargs
) -> Path:
    """Append (or replace) the NGC (or, for a `BeaconConfig`, Breadcrumbs) section of ``output_dir/README.md``.

    Call it after TRL's ``trainer.create_model_card`` (which rewrites README.md): the TRL card is kept
    and the NGC section goes after it. Keyword arguments go to `model_card_text`.
    """
    path = Path(output_dir) / "README.md"
    old = path.read_text() if path.is_file() else ""
    old = old.split(CARD_MARKER)[0].rstrip()
    section = model_card_text(eviction, base_model, **kwargs)
    path.write_text(f"{old}\n\n{section}" if old else section)
    return path


# ----------------------------------------------------------------------------- push
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{6,}")


def scrub_token(text: str, token: str | None = None) -> str:
    """``text`` with Hub tokens (``hf_...``, ``$HF_TOKEN``, ``token``) replaced by ``***``."""
    for secret in (token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        if secret:
            text = text.replace(secret, "***")
    return _TOKEN_RE.sub("***", text)


def safe_push(trainer, raise_on_error: bool = True, **kwargs) -> str | None:
    """``trainer.push_to_hub(**kwargs)``; on failure the local save is kept and a scrubbed error is reported.

    Parameters
    ----------
    trainer : transformers.Trainer
        A trainer whose ``output_dir`` already holds the saved model.
    raise_on_error : bool
        Raise a `RuntimeError` (without the original exception chained, so no token leaks through the
        traceback) instead of only logging it.
    **kwargs
        Passed to ``trainer.push_to_hub`` (``commit_message``, ``token``, ...).

    Returns
    -------
    str or None
        The commit URL/info as a string, or None when the push failed and ``raise_on_error`` is False.
    """
    try:
        return str(trainer.push_to_hub(**kwargs))
    except Exception as e:  # noqa: BLE001 - any Hub/network error
        where = getattr(getattr(trainer, "args", None), "output_dir", "output_dir")
        msg = scrub_token(
            f"push_to_hub failed ({type(e).__name__}: {e}); the model is saved locally in {where}",
            kwargs.get("token"),
        )
        logger.error(msg)
        if raise_on_error:
            raise RuntimeError(msg) from None
        return None
