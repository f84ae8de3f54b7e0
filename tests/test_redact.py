"""Hiding the API key in texts: whole copies, and copies an excerpt cut short."""

from __future__ import annotations

import pytest

from breadasync._redact import FRAGMENT, HIDDEN, Redactor

KEY = "sk-live-0123456789abcdefghijklmnopqrstuvwxyz"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"Bearer {KEY}.", f"Bearer {HIDDEN}."),
        (f"{KEY}{KEY}", HIDDEN),
        ("cut: " + KEY[: FRAGMENT + 5], "cut: " + HIDDEN + KEY[FRAGMENT : FRAGMENT + 5]),
        (KEY[-FRAGMENT - 3 :] + " was the tail", HIDDEN + KEY[-3:] + " was the tail"),
        ("the prefix sk-live- alone", "the prefix sk-live- alone"),
        ("only " + KEY[: FRAGMENT - 1], "only " + KEY[: FRAGMENT - 1]),
        ("nothing here", "nothing here"),
    ],
)
def test_copies_and_fragments_are_hidden(text: str, expected: str) -> None:
    redactor = Redactor(KEY)
    assert redactor.text(text) == expected
    assert redactor.bytes(text.encode()) == expected.encode()


def test_a_short_secret_is_hidden_only_whole() -> None:
    assert Redactor("abcd").text("xabcdx abc") == f"x{HIDDEN}x abc"


def test_an_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="nothing to redact"):
        Redactor("")
