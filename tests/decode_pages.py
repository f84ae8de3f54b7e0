"""Realistic output pages for the decoder's tests and benchmark (issue 10, item 1).

Rows are a pure function of their index: explicit ``null``s, nested ``messages`` /
``usage`` / ``finish_reason`` / ``reward`` on about one row in seven, rare ``tool_calls``
first seen after row 1,000, whole-number floats next to fractional ones, a 45-55 KB
response on about one row in 500 and an empty one on about one in 1,000, and text with
every JSON escape, U+2028, a BOM, non-Latin scripts and emoji beyond the BMP.
"""

from __future__ import annotations

from typing import Any

import orjson

TEXTS = (
    'Line one\nline two\r\nA "quoted" word, a back\\slash, a tab\there, a literal \\n.',
    "Unicode line separator \u2028 and paragraph \u2029 inside, a BOM \ufeff too.",
    "Многоязычный текст: 日本語のテキスト, 中文文本, العربية, हिन्दी, ελληνικά.",
    "Emoji: 👩\u200d👩\u200d👧\u200d👦 family, 🇫🇷 flag, 👍🏽 thumbs, 🧑\u200d💻 coder, 𝄞.",
    "Control characters \x00 \x01 \x1f and a slash / and </script>.",
    "Plain English answer with numbers 1, 2.5 and the word null in it.",
)


def _mix(index: int) -> int:
    z = (index * 0x9E3779B97F4A7C15 + 0x632BE59BD9B14E5B) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def _response(h: int) -> str:
    if h % 1000 == 3:
        return ""
    text = TEXTS[h % len(TEXTS)]
    if h % 500 == 7:
        size = 45_000 + (h >> 20) % 10_000
        return (text * (size // len(text) + 1))[:size]
    return text * (1 + (h >> 8) % 4)


def realistic_row(index: int, dialect: str = "docs") -> dict[str, Any]:
    """Row ``index`` of a realistic rollout output."""
    h = _mix(index)
    response = _response(h)
    row: dict[str, Any]
    if dialect == "docs":
        row = {
            "stimulus": TEXTS[(h >> 4) % len(TEXTS)][:40],
            "response": response,
            "model": "Qwen/Qwen3-32B",
            "temperature": (0.0, 1.0, 0.7, 0.35)[(h >> 6) % 4],
            "tokens": len(response) // 4,
        }
    else:
        row = {
            "stimulus_id": index // 3,
            "trajectory_id": index % 3,
            "response": response,
            "tokens": len(response) // 4 if h % 50 else None,
        }
    if h % 7 == 1:
        row["finish_reason"] = ("stop", "length", None)[(h >> 10) % 3]
        row["reward"] = None if (h >> 12) % 4 == 0 else ((h >> 14) % 2001) / 1000 - 1.0
        row["usage"] = {"prompt_tokens": (h >> 16) % 900, "completion_tokens": len(response)}
        row["messages"] = [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": TEXTS[(h >> 18) % len(TEXTS)]},
            {"role": "assistant", "content": response[:120] or None},
        ]
    if index > 1000 and h % 1400 == 9:
        row["tool_calls"] = [
            {
                "id": f"call_{index}",
                "type": "function",
                "function": {"name": "search", "arguments": '{"q": "x", "n": 3}'},
            }
        ]
    return row


def page_body(
    rows: list[dict[str, Any]], offset: int, *, lines: int = 10**7, limit: int = 1000
) -> bytes:
    """The service's answer for ``rows`` at ``offset``."""
    return orjson.dumps(
        {
            "status": "complete",
            "lines": lines,
            "offset": offset,
            "limit": limit,
            "has_more": offset + len(rows) < lines,
            "output": rows,
        }
    )


def realistic_page(offset: int, count: int = 1000, dialect: str = "docs") -> bytes:
    """A realistic page of ``count`` rows at ``offset``."""
    return page_body([realistic_row(i, dialect) for i in range(offset, offset + count)], offset)
