"""Deterministic rows for emulated jobs.

Trajectory ``i`` of ``(repo, target)`` is a pure function of the names, the index and the
few config values that shape a row (model, temperature, trajectories per stimulus), so a test
can rebuild any row an export should contain without asking the server. Rows carry the
awkwardness real rollouts have: long responses, newlines, quotes, non-ASCII and emoji, and on
some rows fields no document names (``messages``, ``reward``, ``finish_reason``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

Dialect = Literal["docs", "spec"]

_MASK64 = (1 << 64) - 1

_QUESTIONS = (
    "Write a function to reverse a string",
    "Implement binary search over a sorted list",
    "Explain the difference between a process and a thread",
    "Create a linked list class with insert and delete",
    "Résumé: summarise the plot of « Les Misérables » in three sentences",
    'What does the "GIL" mean for CPU-bound Python code?',
    "Translate 'good morning' into Japanese (おはようございます) and explain the politeness level",
    "Write a SQL query that finds duplicate e-mail addresses",
    "Why is the sky blue? Answer for a five-year-old 🌈",
    "Prove that the square root of 2 is irrational",
    "Refactor this loop:\n\nfor i in range(len(xs)):\n    print(xs[i])",
    "Write a haiku about distributed systems",
    "Explain backpressure in streaming pipelines",
    "Describe the tab\tcharacter and the backslash \\ in JSON strings",
    "Compare Parquet and CSV for analytics workloads",
    "Как работает сборщик мусора в Python?",
)

_FRAGMENTS = (
    "Sure! Here is a straightforward solution.\n\n",
    "```python\ndef reverse_string(s: str) -> str:\n    return s[::-1]\n```\n",
    "The key insight is that each step halves the search space, so the running time is "
    "O(log n) rather than O(n). ",
    'As the saying goes, "premature optimisation is the root of all evil" — measure first. ',
    "Naïve approaches often work: café, façade, jalapeño, Straße, smörgåsbord. ",
    "日本語の説明：このアルゴリズムは安定しています。",  # noqa: RUF001 (real CJK punctuation)
    "Let's think step by step 🤔. First, we define the invariant; second, we check it holds. ",
    "Edge cases: the empty string '', a single character, and strings with combining marks "
    "(e\u0301). ",
    "SELECT email, COUNT(*) FROM users GROUP BY email HAVING COUNT(*) > 1;\n",
    "In summary:\n- correctness first\n- then clarity\n- then speed\n",
    "Backslashes \\ and tabs \t and carriage returns \r\n survive a JSON round trip. ",
    "🚀✨ Done! Let me know if you want a version with type hints or tests. ",
    "Remember that floating point numbers like 0.1 + 0.2 are not exactly 0.3. ",
    "Quote: «Le cœur a ses raisons que la raison ne connaît point.» ",
    "Ответ: используйте генераторы, чтобы не держать всё в памяти. ",
    "A proof by contradiction: assume p/q in lowest terms, square both sides, and show both "
    "p and q are even. ",
)

_FINISH_REASONS = ("stop", "length", "stop", "stop", "tool_calls")


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def target_seed(repo: str, target: str) -> int:
    """A stable 64-bit seed for one (repo, target), independent of Python's hash seed."""
    digest = hashlib.blake2b(f"{repo}\x00{target}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass(frozen=True, slots=True)
class RowShape:
    """The config values that shape a target's rows."""

    model: str | None = None
    temperature: float = 1.0
    num_traj_per_stimulus: int = 1
    max_tokens: int = 1024
    odd_types: bool = False
    """Now and then put a value of an unexpected type in a documented field."""


def stimulus_text(seed: int, stimulus_id: int) -> str:
    """The text of stimulus ``stimulus_id`` of the target with ``seed``."""
    h = _splitmix(seed ^ (stimulus_id * 0x9E3779B1))
    return f"{_QUESTIONS[h % len(_QUESTIONS)]} (#{stimulus_id})"


def stimulus_row(repo: str, target: str, index: int) -> dict[str, Any]:
    """Row ``index`` of a stim job's output (both dialects use the spec's shape)."""
    return {"stimulus_id": index, "question": stimulus_text(target_seed(repo, target), index)}


def _compose(h: int, long: bool) -> str:
    n = 6 + (h >> 8) % 9
    text = "".join(_FRAGMENTS[(h >> (4 * k)) % len(_FRAGMENTS)] for k in range(n))
    if long:
        # A few rows are tens of KB, like a model that rambled until max_tokens.
        repeat = 20 + (h >> 20) % 40
        text = (text * repeat)[: 1000 * repeat]
    return text


# Responses come from fixed pools built once, so serving a cold page costs little more than
# building its dicts; which response a row gets is still a pure function of its hash.
_RESPONSES = tuple(_compose(_splitmix(k), long=False) for k in range(4096))
_LONG_RESPONSES = tuple(_compose(_splitmix(k + 1_000_003), long=True) for k in range(64))


def _response(h: int, long: bool) -> str:
    if long:
        return _LONG_RESPONSES[(h >> 24) % len(_LONG_RESPONSES)]
    return _RESPONSES[(h >> 9) % len(_RESPONSES)]


def trajectory_row(
    repo: str, target: str, index: int, shape: RowShape, dialect: Dialect = "docs"
) -> dict[str, Any]:
    """Trajectory ``index`` of ``(repo, target)``, exactly as the emulator serves it."""
    return make_trajectory(target_seed(repo, target), index, shape, dialect)


def make_trajectory(seed: int, index: int, shape: RowShape, dialect: Dialect) -> dict[str, Any]:
    """Like :func:`trajectory_row`, for a precomputed :func:`target_seed` (the hot path)."""
    h = _splitmix(seed ^ index)
    per = max(1, shape.num_traj_per_stimulus)
    stimulus_id, trajectory_id = divmod(index, per)
    response = _response(h, long=h % 500 == 7)
    tokens = max(1, len(response) // 4)
    row: dict[str, Any]
    if dialect == "docs":
        row = {
            "stimulus": stimulus_text(seed, stimulus_id),
            "response": response,
            "model": shape.model,
            "temperature": shape.temperature,
            "tokens": tokens,
        }
    else:
        row = {
            "stimulus_id": stimulus_id,
            "trajectory_id": trajectory_id,
            "response": response,
            "tokens": tokens,
        }
    if h % 7 == 1:
        row["finish_reason"] = (
            "length" if tokens >= shape.max_tokens else _FINISH_REASONS[(h >> 12) % 5]
        )
    if h % 11 == 2:
        row["reward"] = round(((h >> 16) % 20001) / 10000 - 1.0, 4)
    if h % 13 == 3:
        row["messages"] = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": stimulus_text(seed, stimulus_id)},
            {"role": "assistant", "content": response[:200]},
        ]
    if shape.odd_types and h % 97 == 5:
        # A service that changed a field's type between versions: the export must keep it.
        row["tokens"] = str(tokens)
    return row
