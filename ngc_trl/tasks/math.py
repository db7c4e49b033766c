"""Math: DAPO-Math-17k for training; AIME 2024/2025 and AMC 2023/2025 for evaluation.

The task class :class:`Math` (:data:`TASK`) holds the prompt, the answer parser and the grader; the RL
reward (``TASK.reward_func``, logged as ``math_reward``) and evaluation both call ``TASK.score``.

* **Prompt.** DAPO's instruction by default (``style="dapo"``): solve step by step, last line
  ``Answer: $Answer``. It is the wording DAPO-Math-17k's own prompts carry, so training and evaluation
  prompts match. ``style="boxed"`` asks for ``\\boxed{}`` instead (the usual R1-Distill wording).
  :meth:`Math.extract_answer` reads both.
* **Grading.** Fast path in-process: integers (``70`` vs ``70.0``) and plain fractions/decimals against
  an integer gold are compared exactly. Everything else goes to math-verify in a **separate worker
  process** that is killed when it exceeds ``timeout_s``. math-verify's own ``signal.alarm``
  timeouts cannot stop sympy inside one long C-level big-integer operation (``\\boxed{10^{10^{10}}}``
  had not finished after 20 s under a 1 s alarm here), and they only work in the main thread; a process can
  always be killed. The worker starts on first use (~1-2 s, not counted in the timeout) and is
  restarted after a kill. POSIX only (``select`` on the worker's pipe).
* **Data.** Evaluation JSONL files ``{id, problem, answer, source}`` are read at run time from
  ``data_dir``: ``$NGC_MATH_DATA`` if set, else ``data/math`` under the current directory (the
  repository's ``data/math/`` when run from the checkout; ``aime24``, ``aime25``, ``amc23``; how to fetch
  them: ``data/README.md``). The repository ships no copy. AMC 2025 has no public problem+answer file:
  pass a Hub name or a local file via ``source=``.
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
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

from ngc_trl.tasks.base import PROMPT_FORMATS, Task, completion_text

DAPO_HUB_NAME = "BytedTsinghua-SIA/DAPO-Math-17k"
DAPO_FILE = "data/dapo-math-17k.parquet"
DAPO_NAMES = ("dapo", "dapo-math-17k", DAPO_HUB_NAME)
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of "
    "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
BOXED_SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
EVAL_SETS = ("aime24", "aime25", "amc23", "amc25")
DEFAULT_DATA_DIR = Path("data", "math")  # relative to the current directory
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
MAX_ANSWER_CHARS = 1000
MAX_BOXED_TRIES = 20
WORKER_START_TIMEOUT_S = 120.0

_INT = re.compile(r"[+-]?\d+(?:\.0*)?")
_DECIMAL = re.compile(r"[+-]?\d*\.\d+|[+-]?\d+/\d+")
_FRAC = re.compile(r"(-?)\\d?frac\{(\d+)\}\{(\d+)\}")


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
        An extracted answer (see :meth:`Math.extract_answer`); ``None`` or over 1,000 characters is wrong.
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


# ----------------------------------------------------------------------------- datasets
def default_data_dir() -> Path:
    """``$NGC_MATH_DATA`` if set, else :data:`DEFAULT_DATA_DIR` (``data/math`` under the current
    directory)."""
    env = os.environ.get("NGC_MATH_DATA")
    return Path(env) if env else DEFAULT_DATA_DIR


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


# ----------------------------------------------------------------------------- the task
class Math(Task):
    """Math (module docstring): rows ``{"prompt", "answer": str, "id": str}``; the final answer is the last
    ``\\boxed{}`` or ``Answer:`` line, graded against ``row["answer"]`` within ``timeout_s`` seconds.

    Parameters
    ----------
    timeout_s : float
        Wall-clock bound of one math-verify comparison (:func:`grade`); a timeout counts as wrong.
    """

    name = "math"
    columns = ("answer",)

    def __init__(self, timeout_s: float = 5.0) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s}: must be > 0")
        self.timeout_s = float(timeout_s)

    def with_timeout(self, timeout_s: float) -> Math:
        """The same task grading with another time bound."""
        return Math(timeout_s)

    # ------------------------------------------------------------------ prompt and parser
    def build_prompt(self, row: Mapping[str, Any], *, style: str = "dapo") -> list[dict]:
        """One user message asking for the solution of ``row["problem"]``.

        Parameters
        ----------
        row : mapping
            Holds ``problem`` (str).
        style : {"dapo", "boxed"}
            ``"dapo"``: DAPO-Math-17k's exact wording (final line ``Answer: $Answer``); ``"boxed"``:
            the problem followed by "Please reason step by step, and put your final answer within \\boxed{}."
        """
        problem = row["problem"]
        if style == "dapo":
            return [{"role": "user", "content": DAPO_PREFIX + problem + DAPO_SUFFIX}]
        if style == "boxed":
            return [{"role": "user", "content": problem + BOXED_SUFFIX}]
        raise ValueError(f"style must be 'dapo' or 'boxed', got {style!r}")

    def extract_answer(self, text: str) -> str | None:
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

    def verify(self, answer: str, row: Mapping[str, Any]) -> bool:
        """Whether ``answer`` grades equal to ``row["answer"]`` (:func:`grade`, within ``timeout_s``)."""
        return grade(answer, str(row["answer"]), self.timeout_s)

    # ------------------------------------------------------------------ data
    def _locate(self, source: str | None, split: str) -> tuple[str, str | None]:
        """``(set name, source override)`` of what :meth:`load` reads for ``source`` and ``split``."""
        if split not in ("train", "test", *EVAL_SETS):
            raise ValueError(f"split must be 'train', 'test' or one of {', '.join(EVAL_SETS)}, got {split!r}")
        if split == "train":
            return "dapo", None if source in (None, "generated") else source
        if split == "test":
            if source is None:
                raise ValueError(
                    f"split 'test' needs a source: one of {', '.join(EVAL_SETS)} or a .jsonl/.json/.parquet file"
                )
            return source, None
        return split, source

    def eval_file(self, name: str, data_dir: str | Path | None = None) -> Path:
        """The file ``<data_dir>/<name>.jsonl`` of an evaluation set (``data_dir`` default:
        :func:`default_data_dir`); ``FileNotFoundError`` saying how to get it when it is missing."""
        folder = Path(data_dir) if data_dir is not None else default_data_dir()
        file = folder / f"{name}.jsonl"
        if not file.exists():
            hint = (
                " AMC 2025 has no public problem+answer file: pass source=<Hub dataset name or local "
                "file with problem/answer columns>."
                if name == "amc25"
                else f" Fetch the evaluation sets into {DEFAULT_DATA_DIR}/ (see data/README.md), or set "
                "data_dir (NGC_MATH_DATA) to a folder with aime24/aime25/amc23 .jsonl files."
            )
            raise FileNotFoundError(f"data_dir {folder}: {file.name} not found.{hint}")
        return file

    def check_source(
        self, source: str | None, split: str = "train", data_dir: str | Path | None = None
    ) -> None:
        """Fail early on what :meth:`load` would fail on: ``ValueError`` for an unknown set name or a
        missing local ``source`` file, ``FileNotFoundError`` (:meth:`eval_file`) for an evaluation set
        missing from ``data_dir``. ``None`` passes for ``"train"`` (the default DAPO source) and ``"test"``
        (nothing named yet)."""
        if source is None and split in ("train", "test"):
            return
        name, override = self._locate(source, split)
        path = override if override is not None else name
        if Path(path).suffix.lower() in FILE_SUFFIXES:
            if not Path(path).exists():
                raise ValueError(f"{path}: no such file")
        elif override is None and name not in DAPO_NAMES:
            if name not in EVAL_SETS:
                raise ValueError(f"unknown math set {name!r}: use 'dapo', one of {EVAL_SETS}, or a file path")
            self.eval_file(name, data_dir)

    def load(
        self,
        source: str | None = None,
        n: int | None = None,
        *,
        split: str = "train",
        prompt_format: str = "chat",
        data_dir: str | Path | None = None,
        style: str = "dapo",
    ):
        """A math split as a ``datasets.Dataset`` with columns ``prompt``, ``answer`` (str), ``id`` (str).

        Parameters
        ----------
        source : str, optional
            Where the split is read from: a local ``.jsonl``/``.json``/``.parquet`` file (DAPO schema with
            ``reward_model``, or ``{problem, answer[, id]}``) or a Hub dataset name (split ``train``).
            ``"train"``: default (``None`` or ``"generated"``) ``DAPO_HUB_NAME``/``DAPO_FILE``; an
            evaluation set: default ``<data_dir>/<split>.jsonl``; ``"test"``: required, one of
            :data:`EVAL_SETS`, ``"dapo"`` or a file.
        n : int, optional
            Keep the first ``n`` rows (after deduplication).
        split : str
            ``"train"`` (DAPO-Math-17k, deduplicated on prompt text), one of :data:`EVAL_SETS` (``"amc25"``
            needs ``source`` or an ``amc25.jsonl`` in ``data_dir``), or ``"test"`` (the set ``source`` names).
        prompt_format : {"chat", "plain"}
            ``prompt`` as chat messages, or their contents joined by newlines (tokenizers without a template).
        data_dir : str or Path, optional
            Directory of ``<name>.jsonl`` evaluation files; default :func:`default_data_dir`.
        style : {"dapo", "boxed"}
            Prompt wording (:meth:`build_prompt`).
        """
        import datasets

        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be 'chat' or 'plain', got {prompt_format!r}")
        name, source = self._locate(source, split)
        path = source if source is not None else name
        if Path(path).suffix.lower() in FILE_SUFFIXES:
            if not Path(path).exists():
                raise FileNotFoundError(path)
            ds = _read_file(path)
        elif source is not None:
            ds = datasets.load_dataset(source, split="train")
        elif name in DAPO_NAMES:
            ds = datasets.load_dataset(DAPO_HUB_NAME, data_files=DAPO_FILE, split="train")
        elif name in EVAL_SETS:
            ds = _read_file(self.eval_file(name, data_dir))
        else:
            raise ValueError(f"unknown math set {name!r}: use 'dapo', one of {EVAL_SETS}, or a file path")
        if "reward_model" in ds.column_names:
            ds = self._from_dapo(ds, style)
        else:
            ds = self._from_eval(ds, Path(name).stem, style)
        ds = ds.select_columns(["prompt", "answer", "id"])
        if n is not None:
            ds = ds.select(range(min(n, len(ds))))
        if prompt_format == "plain":
            ds = ds.map(lambda row: {"prompt": "\n".join(m["content"] for m in row["prompt"])})
        return ds

    def _from_dapo(self, ds, style: str):
        """DAPO-schema rows (``prompt`` chat list, ``reward_model.ground_truth``), deduplicated, re-prompted."""
        ds = _dedupe_dapo(ds)

        def convert(row, idx):
            prompt = row["prompt"]
            content = completion_text(prompt) if isinstance(prompt, list) else str(prompt)
            extra = row.get("extra_info") or {}
            return {
                "prompt": self.build_prompt({"problem": _dapo_problem(content)}, style=style),
                "answer": str(row["reward_model"]["ground_truth"]),
                "id": f"dapo-{extra.get('index', idx)}",
            }

        return ds.map(convert, with_indices=True, remove_columns=ds.column_names)

    def _from_eval(self, ds, name: str, style: str):
        """``{problem|question, answer|gold|ground_truth[, id]}`` rows; ids ``<name>-<row>`` when absent."""
        cols = set(ds.column_names)
        problem = next((c for c in ("problem", "question") if c in cols), None)
        answer = next((c for c in ("answer", "gold", "ground_truth") if c in cols), None)
        if problem is None or answer is None:
            raise ValueError(f"{name}: need a problem/question and an answer column, found {sorted(cols)}")

        def convert(row, idx):
            rid = row.get("id")
            return {
                "prompt": self.build_prompt({"problem": str(row[problem])}, style=style),
                "answer": str(row[answer]),
                "id": str(rid) if rid is not None else f"{name}-{idx}",
            }

        return ds.map(convert, with_indices=True, remove_columns=ds.column_names)


TASK = Math()
