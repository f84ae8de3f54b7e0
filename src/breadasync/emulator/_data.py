"""Deterministic rows for emulated jobs, in two data profiles.

Trajectory ``i`` of ``(repo, target)`` is a pure function of the names, the index, the job's
generation (0 for a target's first rollout, 1 for its first re-run...) and the few config
values that shape a row (model, temperature, trajectories per stimulus), so a test can
rebuild any row an export should contain without asking the server.

``realistic`` (the default) is the world as it is: explicit ``null``s, undocumented nested
fields on about 1 row in 7, rare ``tool_calls`` only after row 1,000, whole-number floats next
to fractional ones, 45-55 KB and empty responses, every JSON escape, U+2028, a BOM and emoji
beyond the BMP. Its rows are composed from pre-serialised pieces, so a page costs little more
than joining bytes. ``simple`` is the friendly profile of earlier versions, kept for tests and
benchmarks that say they want it.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import orjson

Dialect = Literal["docs", "spec"]
Profile = Literal["realistic", "simple"]
PROFILES: tuple[Profile, ...] = ("realistic", "simple")

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
    profile: Profile = "realistic"
    """Which data profile the rows follow (``realistic`` or the friendly ``simple``)."""


def stimulus_text(seed: int, stimulus_id: int, profile: Profile = "simple") -> str:
    """The text of stimulus ``stimulus_id`` of the target with ``seed``."""
    if profile == "realistic":
        return f"{_QUESTIONS[_realistic_question(seed, stimulus_id)]} (#{stimulus_id})"
    h = _splitmix(seed ^ (stimulus_id * 0x9E3779B1))
    return f"{_QUESTIONS[h % len(_QUESTIONS)]} (#{stimulus_id})"


def stimulus_row(
    repo: str, target: str, index: int, profile: Profile = "realistic"
) -> dict[str, Any]:
    """Row ``index`` of a stim job's output (both dialects use the spec's shape)."""
    text = stimulus_text(target_seed(repo, target), index, profile)
    return {"stimulus_id": index, "question": text}


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
    repo: str,
    target: str,
    index: int,
    shape: RowShape,
    dialect: Dialect = "docs",
    *,
    generation: int = 0,
) -> dict[str, Any]:
    """Trajectory ``index`` of ``(repo, target)``, exactly as the emulator serves it.

    ``generation`` is the job's: 0 for the target's first rollout, ``n`` for its n-th re-run.
    """
    return make_trajectory(target_seed(repo, target), index, shape, dialect, generation)


def generation_seed(seed: int, generation: int) -> int:
    """The seed of a target's rows in job generation ``generation`` (0 keeps ``seed``)."""
    return seed if generation == 0 else _splitmix(seed ^ (generation * 0xD1B54A32D192ED03))


def make_trajectory(
    seed: int, index: int, shape: RowShape, dialect: Dialect, generation: int = 0
) -> dict[str, Any]:
    """Like :func:`trajectory_row`, for a precomputed :func:`target_seed`."""
    if shape.profile == "realistic":
        row: dict[str, Any] = orjson.loads(
            realistic_rows(seed, index, index + 1, shape, dialect, generation)[0]
        )
        return row
    return _simple_row(seed, generation_seed(seed, generation), index, shape, dialect)


def page_bytes(
    seed: int, start: int, stop: int, shape: RowShape, dialect: Dialect, generation: int = 0
) -> bytes:
    """Rows ``start..stop-1`` as one JSON array, the bytes an output page carries."""
    if shape.profile == "realistic":
        return (
            b"[" + b",".join(realistic_rows(seed, start, stop, shape, dialect, generation)) + b"]"
        )
    rows_seed = generation_seed(seed, generation)
    return orjson.dumps(
        [_simple_row(seed, rows_seed, i, shape, dialect) for i in range(start, stop)]
    )


def _simple_row(
    seed: int, rows_seed: int, index: int, shape: RowShape, dialect: Dialect
) -> dict[str, Any]:
    h = _splitmix(rows_seed ^ index)
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


# --- the realistic profile -------------------------------------------------------------------

_REAL_FRAGMENTS = (
    "Sure! Here is a straightforward solution.\n\n",
    "```python\ndef reverse_string(s: str) -> str:\n    return s[::-1]\n```\n",
    "Windows line endings\r\nare kept\r\nas they came.\r\n",
    "Columns:\tname\tage\tcity\n\tAda\t36\tLondon\n",
    'She said "it works" and then \\"escaped\\" it again. ',
    "A path: C:\\Users\\ada\\notes.txt and a regex \\d+\\s*. ",
    "The two characters backslash and n (\\n) are not a newline. ",
    "Line\u2028separator and paragraph\u2029separator inside one string. ",
    "\ufeffA byte order mark opened this paragraph. ",
    "日本語の説明：このアルゴリズムは安定しています。",  # noqa: RUF001 (real CJK punctuation)
    "Ответ: используйте генераторы, чтобы не держать всё в памяти. ",
    "مرحبا بالعالم، هذا نص عربي من اليمين إلى اليسار. ",
    "हिन्दी में उत्तर: यह एल्गोरिथ्म स्थिर है। ",
    "한국어 설명: 이 함수는 문자열을 뒤집습니다. ",
    "Family 👨\u200d👩\u200d👧\u200d👦, flags 🇯🇵🇫🇷🏳\ufe0f\u200d🌈, skin tones 👍🏽👋🏿. ",
    "Let's think step by step 🤔. First, we define the invariant; second, we check it holds. ",
    "Edge cases: the empty string '', a single character, and combining marks (e\u0301). ",
    "SELECT email, COUNT(*) FROM users GROUP BY email HAVING COUNT(*) > 1;\n",
    "In summary:\n- correctness first\n- then clarity\n- then speed\n",
    "Terminal colours leak in: \x1b[31mred\x1b[0m, a form feed \f and a backspace \b. ",
    "🚀✨ Done! Let me know if you want a version with type hints or tests. ",
    "Remember that floating point numbers like 0.1 + 0.2 are not exactly 0.3. ",
    "Quote: «Le cœur a ses raisons que la raison ne connaît point.» ",
    "The key insight is that each step halves the search space: O(log n), not O(n). ",
    'JSON inside text: {"a": [1, 2, {"b": null}]} should stay a string. ',
    "Mathematical symbols: ∀x ∈ ℝ, x² ≥ 0; 𝔼[X] = μ; 𝒪(n log n). ",  # noqa: RUF001
)
_ROLES_SYSTEM = "You are a helpful assistant."
_FINISH = ("stop", "stop", "stop", "length", "content_filter", None)
_TOOL_NAMES = ("search_web", "run_python", "read_file", "get_weather")
_POOL = 4096
_BIG_POOL = 16
_SMALL_POOL = 8


def _text(h: int, low: int, high: int) -> str:
    n = low + h % (high - low + 1)
    return "".join(_REAL_FRAGMENTS[_splitmix(h + k) % len(_REAL_FRAGMENTS)] for k in range(n))


def _big_text(h: int) -> str:
    target = 45_000 + h % 10_000
    parts: list[str] = []
    size = 0
    k = 0
    while size < target:
        piece = _REAL_FRAGMENTS[_splitmix(h + k) % len(_REAL_FRAGMENTS)]
        k += 1
        if size + len(piece.encode()) > 55_000:
            continue
        parts.append(piece)
        size += len(piece.encode())
    return "".join(parts)


def _extras(h: int, response: str, tokens: int, with_tools: bool) -> dict[str, Any]:
    """Undocumented fields, as a newer service version adds them."""
    out: dict[str, Any] = {}
    choice = (h >> 4) % 8
    if choice in (0, 1, 4, 6):
        out["messages"] = [
            {"role": "system", "content": _ROLES_SYSTEM},
            {"role": "user", "content": _QUESTIONS[(h >> 8) % len(_QUESTIONS)]},
            {"role": "assistant", "content": response[:160]},
        ]
    if choice in (1, 2, 5, 6):
        prompt = 12 + (h >> 12) % 400
        out["usage"] = {
            "prompt_tokens": prompt,
            "completion_tokens": tokens,
            "total_tokens": prompt + tokens,
        }
    if choice in (0, 2, 3, 6, 7):
        out["finish_reason"] = _FINISH[(h >> 16) % len(_FINISH)]
    if choice in (3, 4, 5, 6, 7):
        # A quarter of the rows that carry a reward say null; some rewards are whole numbers.
        r = (h >> 20) % 8
        out["reward"] = (
            None
            if r < 2
            else (0.0, 1.0, -1.0)[r - 2]
            if r < 5
            else round(((h >> 24) % 2001) / 1000 - 1, 3)
        )
    if with_tools:
        out["finish_reason"] = "tool_calls"
        out["tool_calls"] = [
            {
                "id": f"call_{(h >> (8 * k)) & 0xFFFFFF:06x}",
                "type": "function",
                "function": {
                    "name": _TOOL_NAMES[(h >> (3 * k)) % len(_TOOL_NAMES)],
                    "arguments": {"query": response[:40], "limit": 1 + k, "strict": k % 2 == 0},
                },
            }
            for k in range(1 + (h >> 30) % 3)
        ]
    return out


def _entry(h: int, response: str, shape: RowShape, dialect: Dialect, *, rare: str) -> bytes:
    """One pool entry: a row's serialised fields after its stimulus fields, without braces."""
    tokens = len(response) // 4
    row: dict[str, Any] = {"response": response}
    if dialect == "docs":
        t = (h >> 40) % 10
        row["model"] = shape.model
        # Mostly the config's temperature; some rows were sampled greedily or hot, so
        # whole-number floats (0.0, 1.0) sit next to fractional ones in one column.
        row["temperature"] = (
            0.0 if t == 0 else 1.0 if t == 1 else 0.7 if t == 2 else shape.temperature
        )
    row["tokens"] = str(tokens) if shape.odd_types and h % 97 == 5 else tokens
    if rare == "tools" or h % 7 == 0:
        row.update(_extras(h >> 3, response, tokens, rare == "tools"))
    return orjson.dumps(row)[1:-1]


@functools.lru_cache(maxsize=16)
def _pools(shape: RowShape, dialect: Dialect) -> tuple[tuple[bytes, ...], ...]:
    normal = tuple(
        _entry(_splitmix(k), _text(_splitmix(k), 3, 12), shape, dialect, rare="")
        for k in range(_POOL)
    )
    big = tuple(
        _entry(_splitmix(k + 7_000_001), _big_text(_splitmix(k)), shape, dialect, rare="")
        for k in range(_BIG_POOL)
    )
    empty = tuple(
        _entry(_splitmix(k + 9_000_001), "", shape, dialect, rare="") for k in range(_SMALL_POOL)
    )
    tools = tuple(
        _entry(_splitmix(k + 11_000_001), _text(_splitmix(k), 1, 3), shape, dialect, rare="tools")
        for k in range(_SMALL_POOL)
    )
    return normal, big, empty, tools


_QUESTION_JSON = tuple(orjson.dumps(q)[:-1] for q in _QUESTIONS)
_STIMULUS_PREFIX = tuple(b'{"stimulus":' + q + b" (#" for q in _QUESTION_JSON)
_SEQ = 1 << 16
_SEQ_MASK = _SEQ - 1
_QUESTION_OF = tuple(_splitmix(k + 13_000_003) % len(_QUESTIONS) for k in range(_SEQ))
"""The question of a stimulus: ``_QUESTION_OF[(stimulus_id + offset(seed)) % 65536]``."""


def _offset(seed: int) -> int:
    return _splitmix(seed) & _SEQ_MASK


def _realistic_question(seed: int, stimulus_id: int) -> int:
    return _QUESTION_OF[(stimulus_id + _offset(seed)) & _SEQ_MASK]


@functools.lru_cache(maxsize=16)
def _sequence(shape: RowShape, dialect: Dialect) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """65,536 row bodies in a fixed random order, and the same with the rare ``tool_calls``
    rows replaced (for the first page, where they never appear). A target's rows walk this
    sequence from an offset of its own (and of its job's generation), so building a page is
    a lookup and a format per row."""
    normal, big, empty, tools = _pools(shape, dialect)
    sequence: list[bytes] = []
    first_page: list[bytes] = []
    for k in range(_SEQ):
        h = _splitmix(k + 17_000_003)
        rare = (h >> 20) % 7000
        plain = normal[(h >> 8) % _POOL]
        if rare < 14:  # 1 row in 500: a 45-55 KB response
            entry = big[(h >> 8) % _BIG_POOL]
        elif rare < 21:  # 1 in 1,000: an empty one
            entry = empty[(h >> 8) % _SMALL_POOL]
        elif rare < 26:  # 1 in 1,400: tool calls
            entry = tools[(h >> 8) % _SMALL_POOL]
        else:
            entry = plain
        sequence.append(entry)
        first_page.append(plain if rare >= 21 and rare < 26 else entry)
    return tuple(sequence), tuple(first_page)


def realistic_rows(
    seed: int, start: int, stop: int, shape: RowShape, dialect: Dialect, generation: int
) -> list[bytes]:
    """Serialised rows ``start..stop-1`` of the realistic profile (the emulator's hot path:
    a lookup and a format per row)."""
    sequence, first_page = _sequence(shape, dialect)
    stimuli = _offset(seed)
    # A re-run walks the sequence from elsewhere: different rows at every offset.
    rows = (stimuli + generation * 0x9E37) & _SEQ_MASK
    per = max(1, shape.num_traj_per_stimulus)
    out: list[bytes] = []
    if start < 1000:
        # tool_calls never appear on the first page: a schema inferred from it misses them.
        cut = min(stop, 1000)
        out += _walk(first_page, start, cut, rows, stimuli, per, dialect)
        start = cut
    if start < stop:
        out += _walk(sequence, start, stop, rows, stimuli, per, dialect)
    return out


def _walk(
    sequence: tuple[bytes, ...],
    start: int,
    stop: int,
    rows: int,
    stimuli: int,
    per: int,
    dialect: Dialect,
) -> list[bytes]:
    mask = _SEQ_MASK
    if dialect == "docs":
        prefix = _STIMULUS_PREFIX
        question = _QUESTION_OF
        if per == 1:
            return [
                b'%b%d)",%b}'
                % (prefix[question[(i + stimuli) & mask]], i, sequence[(i + rows) & mask])
                for i in range(start, stop)
            ]
        return [
            b'%b%d)",%b}'
            % (prefix[question[(i // per + stimuli) & mask]], i // per, sequence[(i + rows) & mask])
            for i in range(start, stop)
        ]
    return [
        b'{"stimulus_id":%d,"trajectory_id":%d,%b}'
        % (i // per, i % per, sequence[(i + rows) & mask])
        for i in range(start, stop)
    ]
