"""Math: DAPO-Math-17k for training; AIME 2024/2025 and AMC 2023/2025 for evaluation.

Prompt and grading live here together, and :func:`math_reward` (RL) and evaluation both call
:func:`grade`.

* **Prompt.** DAPO's instruction by default (``style="dapo"``): solve step by step, last line
  ``Answer: $Answer``. It is the wording DAPO-Math-17k's own prompts carry, so training and evaluation
  prompts match. ``style="boxed"`` asks for ``\\boxed{}`` instead (the usual R1-Distill wording).
  :func:`extract_answer` reads both.
* **Grading.** Fast path in-process: integers (``70`` vs ``70.0``) and plain fractions/decimals against
  an integer gold are compared exactly. Everything else goes to math-verify in a **separate worker
  process** that is killed when it exceeds ``timeout_s``. math-verify's own ``signal.alarm``
  timeouts cannot stop sympy inside one long C-level big-integer operation (``\\boxed{10^{10^{10}}}``
  had not finished after 20 s under a 1 s alarm here), and they only work in the main thread; a process can
  always be killed. The worker starts on first use (~1-2 s, not counted in the timeout) and is
  restarted after a kill. POSIX only (``select`` on the worker's pipe).
* **Data.** Evaluation JSONL files ``{id, problem, answer, source}`` are read at run time from
  ``$NGC_MATH_DATA`` or ``<repo>/../shared/data/math`` (``aime24``, ``aime25``, ``amc23``). AMC 2025
  has no public problem+answer file: pass a Hub name or a local file via ``source=``.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

from ngc_trl.tasks.countdown import completion_text

DAPO_HUB_NAME = "BytedTsinghua-SIA/DAPO-Math-17k"
DAPO_FILE = "data/dapo-math-17k.parquet"
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of "
    "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
BOXED_SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
EVAL_SETS = ("aime24", "aime25", "amc23", "amc25")
MAX_ANSWER_CHARS = 1000
MAX_BOXED_TRIES = 20
WORKER_START_TIMEOUT_S = 120.0

_INT = re.compile(r"[+-]?\d+(?:\.0*)?")
_DECIMAL = re.compile(r"[+-]?\d*\.\d+|[+-]?\d+/\d+")
_FRAC = re.compile(r"(-?)\\d?frac\{(\d+)\}\{(\d+)\}")


# ----------------------------------------------------------------------------- prompts and parsing
def build_prompt(problem: str, style: str = "dapo") -> list[dict]:
    """One user message asking for ``problem``'s solution.

    Parameters
    ----------
    problem : str
    style : {"dapo", "boxed"}
        ``"dapo"``: DAPO-Math-17k's exact wording (final line ``Answer: $Answer``); ``"boxed"``:
        the problem followed by "Please reason step by step, and put your final answer within \\boxed{}."
    """
    if style == "dapo":
        return [{"role": "user", "content": DAPO_PREFIX + problem + DAPO_SUFFIX}]
    if style == "boxed":
        return [{"role": "user", "content": problem + BOXED_SUFFIX}]
    raise ValueError(f"style must be 'dapo' or 'boxed', got {style!r}")


def _boxed_content(text: str, open_at: int) -> str | None:
    """Balanced-brace content after ``text[open_at] == "{"``, scanning at most MAX_ANSWER_CHARS."""
    depth = 0
    stop = min(len(text), open_at + MAX_ANSWER_CHARS + 2)
    for i in range(open_at, stop):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer: the last ``\\boxed{...}`` with balanced braces, else the last ``Answer:`` line.

    Linear scans only (``rfind`` and a bounded brace counter); answers over 1,000 characters are
    ignored. An unbalanced (truncated) last box falls back to the previous one (up to 20 tried).
    Returns the stripped answer, without surrounding ``$`` or a trailing period, or ``None``.
    """
    if not isinstance(text, str):
        return None
    end = len(text)
    for _ in range(MAX_BOXED_TRIES):
        at = text.rfind("\\boxed", 0, end)
        if at < 0:
            break
        brace = at + len("\\boxed")
        while brace < len(text) and text[brace] == " ":
            brace += 1
        if brace < len(text) and text[brace] == "{":
            content = _boxed_content(text, brace)
            if content is not None and content.strip():
                return content.strip()
        end = at
    at = text.lower().rfind("answer:")
    if at >= 0:
        line = text[at + len("answer:") :].split("\n", 1)[0]
        if len(line) <= MAX_ANSWER_CHARS:
            line = line.strip().rstrip(".").strip().strip("$").strip()
            return line or None
    return None


# ----------------------------------------------------------------------------- grading
def _clean(s: str) -> str:
    s = s.strip().rstrip(".").strip().strip("$").strip()
    if s.startswith("\\boxed{") and s.endswith("}"):
        s = s[len("\\boxed{") : -1]
    return s.replace(" ", "").replace("\\!", "").replace("\\,", "")


def _exact(s: str) -> Fraction | None:
    """Exact value of an integer, decimal, ``p/q`` or ``\\frac{p}{q}`` string, else ``None``."""
    if len(s) > 50:
        return None
    if _INT.fullmatch(s) or _DECIMAL.fullmatch(s):
        return Fraction(s)
    m = _FRAC.fullmatch(s)
    if m and int(m.group(3)) != 0:
        return Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) else 1)
    return None


_WORKER_CODE = r"""
import json, sys
try:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
except Exception:
    pass
from math_verify import parse, verify
sys.stdout.write("ready\n"); sys.stdout.flush()
for line in sys.stdin:
    ok = False
    try:
        job = json.loads(line)
        gold = parse("$" + job["gold"] + "$", parsing_timeout=None)
        pred = parse("\\boxed{" + job["pred"] + "}", parsing_timeout=None)
        ok = bool(verify(gold, pred, timeout_seconds=None))
    except BaseException:
        ok = False
    sys.stdout.write("1\n" if ok else "0\n"); sys.stdout.flush()
"""


class _VerifyWorker:
    """One math-verify subprocess behind a lock; killed and restarted on a timeout."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.owner = os.getpid()
        self.lock = threading.Lock()
        atexit.register(self.close)

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-c", _WORKER_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        if self._readline(WORKER_START_TIMEOUT_S) != "ready":
            self.close()
            raise RuntimeError("the math-verify worker did not start (is math-verify installed?)")

    def _readline(self, timeout_s: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        return self.proc.stdout.readline().strip() if ready else None

    def close(self) -> None:
        if self.proc is not None and self.owner == os.getpid():
            self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                stream.close()
            self.proc = None

    def __call__(self, pred: str, gold: str, timeout_s: float) -> bool:
        with self.lock:
            if self.owner != os.getpid():  # forked (e.g. a DataLoader worker): the pipes are the parent's
                self.proc, self.owner = None, os.getpid()
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            try:
                self.proc.stdin.write(json.dumps({"pred": pred, "gold": gold}) + "\n")
                self.proc.stdin.flush()
                reply = self._readline(timeout_s)
            except (BrokenPipeError, OSError):
                reply = None
            if reply is None or reply == "":
                self.close()  # hung or died: kill it, the next call starts a fresh one
                return False
            return reply == "1"


_worker = _VerifyWorker()


def grade(pred: str | None, gold: str, timeout_s: float = 5.0) -> bool:
    """Whether the extracted answer ``pred`` is equivalent to ``gold``.

    Parameters
    ----------
    pred : str or None
        An extracted answer (see :func:`extract_answer`); ``None`` or over 1,000 characters is wrong.
    gold : str
        The reference answer (LaTeX or plain).
    timeout_s : float
        Wall-clock bound on the math-verify comparison; a timeout counts as wrong.

    Notes
    -----
    Integer golds against integer/decimal/fraction predictions are decided exactly in-process
    (``"70.0"`` equals ``"70"``, ``"\\frac{1}{2}"`` does not equal ``"1"``); other pairs go to
    math-verify (``parse`` gold as ``$gold$``, pred as ``\\boxed{pred}``) in the worker process.
    """
    if pred is None or not isinstance(pred, str) or len(pred) > MAX_ANSWER_CHARS:
        return False
    p, g = _clean(pred), _clean(str(gold))
    if not p:
        return False
    if p == g:
        return True
    pv, gv = _exact(p), _exact(g)
    if pv is not None and gv is not None:
        return pv == gv
    return _worker(pred, str(gold), timeout_s)


def math_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """TRL reward function: 1.0 when the completion's final answer grades equal to ``answer``, else 0.0."""
    return [float(grade(extract_answer(completion_text(c)), str(a))) for c, a in zip(completions, answer)]


reward_func = math_reward


# ----------------------------------------------------------------------------- datasets
def default_data_dir() -> Path:
    """``$NGC_MATH_DATA`` if set, else ``<repo>/../shared/data/math``."""
    env = os.environ.get("NGC_MATH_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data" / "math"


def _read_file(path: str | Path):
    import datasets

    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(Path(path).suffix.lower())
    if builder is None:
        raise ValueError(f"unsupported file type {path!s}: use .jsonl, .json or .parquet")
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def _dapo_problem(content: str) -> str:
    if content.startswith(DAPO_PREFIX):
        content = content[len(DAPO_PREFIX) :]
    if content.endswith(DAPO_SUFFIX):
        content = content[: -len(DAPO_SUFFIX)]
    return content


def _dedupe_dapo(ds):
    """Keep the first row of each distinct prompt text (1.79M rows -> 17,398 on the Hub file)."""
    seen, keep = set(), []
    prompts = ds.select_columns(["prompt"])
    for start in range(0, len(ds), 50_000):
        batch = prompts[start : start + 50_000]["prompt"]
        for offset, prompt in enumerate(batch):
            key = hash(completion_text(prompt) if isinstance(prompt, list) else str(prompt))
            if key not in seen:
                seen.add(key)
                keep.append(start + offset)
    return ds.select(keep)


def _load_dapo(ds, style: str):
    ds = _dedupe_dapo(ds)

    def convert(row, idx):
        content = completion_text(row["prompt"]) if isinstance(row["prompt"], list) else str(row["prompt"])
        extra = row.get("extra_info") or {}
        return {
            "prompt": build_prompt(_dapo_problem(content), style),
            "answer": str(row["reward_model"]["ground_truth"]),
            "id": f"dapo-{extra.get('index', idx)}",
        }

    return ds.map(convert, with_indices=True, remove_columns=ds.column_names)


def _load_eval(ds, name: str, style: str):
    cols = set(ds.column_names)
    problem = next((c for c in ("problem", "question") if c in cols), None)
    answer = next((c for c in ("answer", "gold", "ground_truth") if c in cols), None)
    if problem is None or answer is None:
        raise ValueError(f"{name}: need a problem/question and an answer column, found {sorted(cols)}")

    def convert(row, idx):
        rid = row.get("id")
        return {
            "prompt": build_prompt(str(row[problem]), style),
            "answer": str(row[answer]),
            "id": str(rid) if rid is not None else f"{name}-{idx}",
        }

    return ds.map(convert, with_indices=True, remove_columns=ds.column_names)


def load_math(
    name: str,
    data_dir: str | Path | None = None,
    *,
    source: str | None = None,
    style: str = "dapo",
    n: int | None = None,
):
    """A math dataset with columns ``prompt`` (chat messages), ``answer`` (str), ``id`` (str).

    Parameters
    ----------
    name : str
        ``"dapo"`` (training; deduplicated on prompt text), ``"aime24"``, ``"aime25"``, ``"amc23"``,
        ``"amc25"``, or a path to a ``.jsonl``/``.json``/``.parquet`` file (DAPO schema with
        ``reward_model``, or ``{problem, answer[, id]}``).
    data_dir : str or Path, optional
        Directory of ``<name>.jsonl`` evaluation files; default :func:`default_data_dir`.
    source : str, optional
        Override where ``name`` is read from: a local file or a Hub dataset name (split ``train``).
        The default for ``"dapo"`` is ``DAPO_HUB_NAME``/``DAPO_FILE``. ``"amc25"`` needs this or an
        ``amc25.jsonl`` in ``data_dir``.
    style : {"dapo", "boxed"}
        Prompt wording (:func:`build_prompt`).
    n : int, optional
        Keep the first ``n`` rows (after deduplication).
    """
    import datasets

    path = source if source is not None else name
    if Path(path).suffix.lower() in (".jsonl", ".json", ".parquet"):
        if not Path(path).exists():
            raise FileNotFoundError(path)
        ds = _read_file(path)
    elif source is not None:
        ds = datasets.load_dataset(source, split="train")
    elif name in ("dapo", "dapo-math-17k", DAPO_HUB_NAME):
        ds = datasets.load_dataset(DAPO_HUB_NAME, data_files=DAPO_FILE, split="train")
    elif name in EVAL_SETS:
        file = Path(data_dir) if data_dir is not None else default_data_dir()
        file = file / f"{name}.jsonl"
        if not file.exists():
            hint = (
                " AMC 2025 has no public problem+answer file: pass source=<Hub dataset name or local "
                "file with problem/answer columns>."
                if name == "amc25"
                else " Set NGC_MATH_DATA or data_dir to the folder with aime24/aime25/amc23 .jsonl files."
            )
            raise FileNotFoundError(f"{file} not found.{hint}")
        ds = _read_file(file)
    else:
        raise ValueError(f"unknown math set {name!r}: use 'dapo', one of {EVAL_SETS}, or a file path")
    ds = (
        _load_dapo(ds, style) if "reward_model" in ds.column_names else _load_eval(ds, Path(name).stem, style)
    )
    ds = ds.select_columns(["prompt", "answer", "id"])
    return ds.select(range(min(n, len(ds)))) if n is not None else ds
