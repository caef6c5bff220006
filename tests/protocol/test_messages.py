"""Decoding, classification and framing; fuzzed with hypothesis."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nkservice.errors import ApiError, ErrorCode
from nkservice.protocol.framing import FragmentAssembler, LineFramer, MessageTooLarge
from nkservice.protocol.messages import Ack, BadMessage, Request, Response, decode
from nkservice.protocol.names import SEED_NAMES, canonical


def test_classification_order() -> None:
    both = decode(b'{"class":"a","cmd":"b","tid":1,"result":"ok"}')
    assert isinstance(both, Request)
    response = decode(b'{"result":"ok","tid":1,"ack":3}')
    assert isinstance(response, Response) and response.ok
    assert decode(b'{"ack":"x"}') == Ack("x")
    assert decode(b'{"result":"error","tid":"t"}') == Response("t", False, None)


@pytest.mark.parametrize(("raw", "error"), [
    (b'{"class":"a","cmd":"b","tid":123456789012345678901234567890}', ErrorCode.invalid_message),
    (b'{"class":"a","cmd":"b","tid":"\\ud800"}', ErrorCode.invalid_json),
    (b"[" * 100_000, ErrorCode.invalid_json),
])
def test_what_could_not_be_echoed_is_refused(raw: bytes, error: ErrorCode) -> None:
    with pytest.raises(BadMessage) as refused:
        decode(raw)
    assert refused.value.error is error


def test_error_round_trip() -> None:
    error = ApiError.from_wire({"code": 100030, "error": "Unauthorized: banned"})
    assert error.error is ErrorCode.unauthorized and error.text == "Unauthorized: banned"
    custom = ApiError.from_wire({"code": 4242, "error": "Room is full"})
    assert custom.to_wire() == {"code": 4242, "error": "Room is full"}
    assert ApiError(ErrorCode.unauthorized, "banned").text == "Unauthorized: banned"
    assert ApiError(ErrorCode.unknown_class, "x").text == "Unknown class 'x'"


json_values = st.recursive(
    # Valid JSON only: no NaN or infinities, no lone surrogates (see the test above).
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"])),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["class", "cmd", "tid", "result", "ack", "data",
                                       "subclass", "x"]), children, max_size=6),
    max_leaves=12,
)


@given(json_values)
def test_any_json_is_a_message_or_a_clear_error(value: Any) -> None:
    try:
        message = decode(json.dumps(value).encode())
    except BadMessage as bad:
        assert bad.error is ErrorCode.invalid_message
        assert bad.tid is None or isinstance(bad.tid, int | str)
    else:
        assert isinstance(message, Request | Response | Ack)


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_fail_cleanly(raw: bytes) -> None:
    try:
        decode(raw)
    except BadMessage as bad:
        assert bad.error in (ErrorCode.invalid_json, ErrorCode.invalid_message)


def test_line_framer() -> None:
    framer = LineFramer(max_size=10)
    assert framer.feed(b'{"a":1}\r\n\n  \n{"b"') == [b'{"a":1}']
    assert framer.feed(b":2}\n") == [b'{"b":2}']
    with pytest.raises(MessageTooLarge):
        framer.feed(b"x" * 11)
    with pytest.raises(MessageTooLarge):
        LineFramer(max_size=3).feed(b"abcd\n")


@given(st.lists(st.binary(min_size=1, max_size=30).map(lambda b: b.replace(b"\n", b"")),
                max_size=8), st.integers(min_value=1, max_value=17))
def test_line_framer_splits_anywhere(lines: list[bytes], chunk: int) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    framer = LineFramer(max_size=100)
    got: list[bytes] = []
    for start in range(0, len(stream), chunk):
        got.extend(framer.feed(stream[start:start + chunk]))
    expected = [line.removesuffix(b"\r") for line in lines]
    assert got == [line for line in expected if line and not line.isspace()]


def test_fragment_assembler() -> None:
    fragments = FragmentAssembler(max_size=6)
    fragments.start(b"ab", is_text=True)
    fragments.add(b"cd")
    assert fragments.in_progress and fragments.finish() == b"abcd" and fragments.is_text
    fragments.start(b"abcd", is_text=False)
    with pytest.raises(MessageTooLarge):
        fragments.add(b"efg")
    assert not fragments.in_progress


def test_every_seed_name_maps_to_a_subclass_form() -> None:
    for seed, (subclass, cmd) in SEED_NAMES.items():
        assert canonical(None, seed) == (subclass, cmd)
        assert canonical(subclass, cmd) == (subclass, cmd)
    assert canonical("event", "send_event") == ("event", "send")
    assert canonical(None, "nope") is None
