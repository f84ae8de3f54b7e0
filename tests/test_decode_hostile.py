"""Hostile page bodies: each ends in a typed error naming the page, never a crash, and a
random stream of them never kills the decoding process by a signal."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from breadasync import ProtocolError
from breadasync._transport import decode_json
from breadasync.export._decode import DecodeLimits, read_page_json
from breadasync.export._reader import decode_page
from tests.decode_pages import page_body, realistic_row

HEAD = b'{"status":"complete","lines":10,"offset":0,"limit":10,"has_more":false,"output":'
DEEP = 100_000


def deep(kind: str) -> bytes:
    return (
        (b"[" * DEEP + b"]" * DEEP) if kind == "array" else (b'{"a":' * DEEP + b"1" + b"}" * DEEP)
    )


HOSTILE: dict[str, tuple[bytes, str]] = {
    "deep array, whole body": (deep("array"), "nested too deeply"),
    "deep object, whole body": (deep("object"), "nested too deeply"),
    "deep array in a row": (HEAD + b'[{"x":' + deep("array") + b"}]}", "nested too deeply"),
    "deep object in a documented field": (
        HEAD + b'[{"response":' + deep("object") + b"}]}",
        "nested too deeply",
    ),
    "deep array after the rows": (
        HEAD + b'[{"a":1}],"more":' + deep("array") + b"}",
        "nested too deeply",
    ),
    "70 levels in the second row": (
        HEAD + b'[{"a":1},{"x":' + b"[" * 70 + b"]" * 70 + b"}]}",
        "row at offset 1 is nested too deeply (over 64 levels)",
    ),
    "a million keys": (
        HEAD + b'[{"x":{' + b",".join(b'"k%d":1' % i for i in range(10**6)) + b"}}]}",
        "500,000 keys",
    ),
    "NaN": (HEAD + b'[{"reward":NaN}]}', "NaN or Infinity"),
    "-Infinity": (HEAD + b'[{"reward":-Infinity}]}', "NaN or Infinity"),
    "a lone high surrogate": (HEAD + b'[{"x":"\\ud800"}]}', "surrogate"),
    "a lone low surrogate": (HEAD + b'[{"x":"a\\udc00"}]}', "surrogate"),
    "a duplicate key in a row": (HEAD + b'[{"tokens":1,"tokens":2}]}', "a key appears twice"),
    "a duplicate key, nested": (HEAD + b'[{"u":{"a":1,"a":1}}]}', "a key appears twice"),
    "a duplicate envelope key": (HEAD + b'[],"offset":0}', "a key appears twice"),
    "a duplicate key, spaced": (HEAD + b'[{"a" : 1, "a" : 2}]}', "a key appears twice"),
    # One spaced copy alone leaves the separator count equal to the keys parsed.
    "a duplicate key, one copy spaced": (HEAD + b'[{"a" :1,"a":2}]}', "a key appears twice"),
    "a duplicate key, a newline before one colon": (
        HEAD + b'[{"a"\n:1,"a":2}]}',
        "a key appears twice",
    ),
    "a duplicate key hidden by an escaped quote": (
        HEAD + b'[{"a":1,"a":2,"s":"\\":"}]}',
        "a key appears twice",
    ),
    "a number beyond a double with a lone surrogate": (
        HEAD + b'[{"n":1' + b"0" * 400 + b',"s":"\\ud800"}]}',
        "surrogate",
    ),
    "a float beyond a double": (HEAD + b'[{"n":1e400}]}', "not JSON"),
    "an integer of 5000 digits": (HEAD + b'[{"n":1' + b"0" * 5000 + b"}]}", "refused"),
    "a BOM before the body": (b"\xef\xbb\xbf" + HEAD + b"[]}", "not JSON"),
    "truncated": (HEAD + b'[{"a":"b', "not JSON"),
    "negative lines": (HEAD.replace(b'"lines":10', b'"lines":-3') + b"[]}", "'lines' should not"),
    "negative offset": (HEAD.replace(b'"offset":0', b'"offset":-1') + b"[]}", "should not be neg"),
    "invalid UTF-8": (HEAD + b'[{"a":"\xff"}]}', "not JSON"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_body_is_a_typed_error_naming_the_page(name: str) -> None:
    body, text = HOSTILE[name]
    started = time.process_time()
    with pytest.raises(ProtocolError) as caught:
        decode_page(body, "GET", "/v1/repo/r/targets/t/rollout/output?offset=0", 200, 0, 10)
    spent = time.process_time() - started
    message = str(caught.value)
    assert text in message
    assert message.startswith("GET /v1/repo/r/targets/t/rollout/output?offset=0 -> 200: ")
    assert "\n" not in message
    print(f"{name}: {spent * 1000:.1f} ms CPU")


def test_the_limits_are_settings() -> None:
    rows = [realistic_row(i) for i in range(100)]
    body = page_body(rows, 0)
    decode_page(body, "GET", "/p", 200, 0, 100)
    with pytest.raises(ProtocolError, match="over the limit of 1,000"):
        decode_page(body, "GET", "/p", 200, 0, 100, limits=DecodeLimits(max_body_bytes=1000))
    with pytest.raises(ProtocolError, match="larger than 100 keys"):
        decode_page(body, "GET", "/p", 200, 0, 100, limits=DecodeLimits(max_values=100))
    nested = page_body([{"x": [[[["a"]]]]}], 0)
    with pytest.raises(ProtocolError, match=r"offset 0 is nested too deeply \(over 5 levels"):
        decode_page(nested, "GET", "/p", 200, 0, 1, limits=DecodeLimits(max_depth=5))
    with pytest.raises(ValueError, match="max_depth"):
        DecodeLimits(max_depth=10_000)


def test_a_huge_string_within_the_limits_is_kept() -> None:
    body = page_body([{"response": "é" * 5_000_000}], 0)
    batch = decode_page(body, "GET", "/p", 200, 0, 1).batch
    assert batch.column("response")[0].as_py() == "é" * 5_000_000


# --- random hostile bodies, decoded in a child process ---------------------------------------

CHILD = """
import sys
from breadasync import DataIntegrityError, ProtocolError
from breadasync.export._reader import decode_page
for path in sys.argv[1:]:
    body = open(path, "rb").read()
    try:
        decode_page(body, "GET", "/p", 200, 0, 1000)
        print("ok")
    except (ProtocolError, DataIntegrityError) as exc:
        print(type(exc).__name__)
"""

ATOMS = st.sampled_from(
    [
        *(b"null", b"1", b"-0.0", b"1e999", b"NaN", b"-Infinity", b'"\\ud800"', b'"\\udfff"'),
        *(b'""', b"18446744073709551616" * 3, b'"\\u0000"', b"true", b"\xff", b"{", b"]"),
        b'"a":',
    ]
)


@st.composite
def hostile_bodies(draw: st.DrawFn) -> bytes:
    depth = draw(st.sampled_from([1, 50, 1100, 20_000, 100_000]))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"k":', b"}"), (b'[{"a":', b"}]")]))
    inner = opener * depth + draw(ATOMS) + closer * draw(st.integers(0, depth))
    keys = b",".join(b'"d":%d' % i for i in range(draw(st.integers(0, 3))))
    row = b'{"x":' + inner + (b"," + keys if keys else b"") + b"}"
    body = HEAD + b"[" + row + b"]}"
    cut = draw(st.integers(0, len(body)))
    return body if draw(st.booleans()) else body[:cut]


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(hostile_bodies(), min_size=10, max_size=10))
def test_random_hostile_bodies_never_kill_the_decoder(
    tmp_path_factory: pytest.TempPathFactory, bodies: list[bytes]
) -> None:
    folder = tmp_path_factory.mktemp("hostile")
    paths = []
    for i, body in enumerate(bodies):
        path = folder / f"{i}.json"
        path.write_bytes(body)
        paths.append(str(path))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *paths],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    outcomes = done.stdout.split()
    assert len(outcomes) == len(bodies)
    assert set(outcomes) <= {"ok", "ProtocolError", "DataIntegrityError"}


@pytest.mark.parametrize(
    ("body", "retryable"),
    [
        (HEAD + b'[{"a":"cut sh', True),
        (b"<html><body>Maintenance. NaN Infinity.</body></html>", True),
        (b"", True),
        (HEAD + b"[]}trailing", True),
        (HEAD + b'[{"a":NaN}]}', False),
        # After characters of several bytes: orjson counts characters, not bytes.
        (HEAD + '[{"é😀":"é😀", "a":NaN}]}'.encode(), False),
        (HEAD + b'[{"a":-Infinity}]}', False),
        (HEAD + b'[{"a":"\\ud800"}]}', False),
        (b"\xef\xbb\xbf" + HEAD + b"[]}", False),
        (HEAD + b'[{"a":1e999}]}', False),
        # Cut inside a character of several bytes: another try may bring it whole; bytes
        # that are not UTF-8 within a whole body are the server's, the same on every try.
        (HEAD + '[{"a":"स्थिर'.encode()[:-1], True),
        (HEAD + b'[{"a":"caf\xe9"}]}', False),
        (HEAD + b'[{"a":"\xed\xa0\x80"}]}', False),
        # Past a number beyond a double, Python's parser reads on: a text that ends too soon
        # or runs on may be mended, a control character or a bad escape may not.
        (HEAD + b'[{"n":1' + b"0" * 400 + b',"a":"cut sh', True),
        (HEAD + b'[{"n":1' + b"0" * 400 + b',"a":[1,', True),
        (HEAD + b'[{"n":1' + b"0" * 400 + b"}]}trailing", True),
        # (not in the last 8 characters, where a token cut in two is refused)
        (HEAD + b'[{"n":1' + b"0" * 400 + b',"a":"x\x01","b":"more text"}]}', False),
        (HEAD + b'[{"n":1' + b"0" * 400 + b',"a":"\\x","b":"more text"}]}', False),
        (HEAD + b'[{"n":1' + b"0" * 400 + b',"a":"caf\xe9"}]}', False),
        (HEAD + b'[{"n":1' + b"0" * 400 + b',"a":NaN}]}', False),
        (HEAD + b'[{"n":1' + b"0" * 5000 + b"}]}", False),
    ],
    ids=[
        *("cut-short", "html", "empty", "trailing", "nan", "nan-after-emoji", "-infinity"),
        *("surrogate", "bom", "1e999", "cut-in-a-character", "latin-1", "utf-8-surrogate"),
        *("big-int-cut-short", "big-int-cut-in-a-list", "big-int-trailing"),
        *("big-int-control-character", "big-int-bad-escape", "big-int-latin-1"),
        *("big-int-nan", "big-int-5000-digits"),
    ],
)
def test_only_a_text_that_is_not_json_at_all_may_be_retried(body: bytes, retryable: bool) -> None:
    """A GET is tried again for a body cut short or replaced (an error page, even one that
    says NaN); JSON the client refuses is refused at once, on both decode paths."""
    with pytest.raises(ProtocolError) as page:
        read_page_json(body, method="GET", path="/p", status=200, offset=0)
    with pytest.raises(ProtocolError) as answer:
        decode_json(body, method="GET", path="/p", status=200)
    with pytest.raises(ProtocolError) as posted:
        decode_json(body, method="POST", path="/p", status=200)
    assert (page.value.retryable, answer.value.retryable) == (retryable, retryable)
    assert not posted.value.retryable


CUT_PAGE = page_body(
    [{**realistic_row(i), "note": "स्थिर है। 😀 é", "n": "BIG" if i == 3 else i} for i in range(8)],
    0,
).replace(b'"BIG"', b"1" + b"0" * 400)


def test_a_page_cut_anywhere_may_be_retried() -> None:
    """A body cut short at any byte (every one of them: a random few missed a number cut
    after its point), inside a character of several bytes or after a number beyond a
    double included, is a text another try may mend, on both decode paths."""
    refused = []
    for cut in range(len(CUT_PAGE)):
        body = CUT_PAGE[:cut]
        with pytest.raises(ProtocolError) as page:
            read_page_json(body, method="GET", path="/p", status=200, offset=0)
        with pytest.raises(ProtocolError) as answer:
            decode_json(body, method="GET", path="/p", status=200)
        if not (page.value.retryable and answer.value.retryable):
            refused.append((cut, str(page.value)[:120], str(answer.value)[:120]))
    assert refused == []


def test_a_number_beyond_a_double_does_not_let_a_lone_surrogate_through() -> None:
    """orjson stops at ``1e400``-sized integers, so what follows is checked by Python."""
    body = b'{"big": 1' + b"0" * 400 + b', "s": "\\ud800"}'
    with pytest.raises(ProtocolError, match="not JSON"):
        decode_json(body, method="GET", path="/p", status=200)
    assert decode_json(body.replace(b"\\ud800", b"ok"), method="GET", path="/p", status=200) == {
        "big": 10**400,
        "s": "ok",
    }
