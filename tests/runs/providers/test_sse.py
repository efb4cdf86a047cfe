"""The SSE decoder: the same bytes give the same events however the network chunks them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runs.providers.sse import SSEDecoder, SSEEvent, SSEProtocolError

# Values never contain line breaks (they would be new lines); everything else goes, multi-byte UTF-8 included.
_value = st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]), max_size=12)
_name = st.text(
    alphabet=st.characters(blacklist_characters="\r\n:", blacklist_categories=["Cs"]), min_size=1, max_size=8
)


def decode(chunks: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.end())
    return events


def rechunk(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


@st.composite
def event_streams(draw):
    """(bytes, expected events) for a stream of events with comments, multi-line data, names and ids."""
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    expected: list[SSEEvent] = []
    lines: list[str] = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            lines.append(": " + draw(_value))  # keep-alive comment
        name = draw(st.one_of(st.none(), _name))
        if name is not None:
            lines.append(f"event: {name}")
        data = draw(st.lists(_value, min_size=1, max_size=3))
        lines += [f"data: {value}" for value in data]
        event_id = draw(st.one_of(st.none(), _name))
        if event_id is not None:
            lines.append(f"id: {event_id}")
        lines.append("")
        expected.append(SSEEvent(event=name or "message", data="\n".join(data), id=event_id))
    text = "".join(line + newline for line in lines)
    return text.encode(), expected


@settings(max_examples=300, deadline=None)
@given(stream=event_streams(), cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_rechunked_stream_decodes_to_the_same_events(stream, cuts):
    data, expected = stream
    whole = decode([data])
    assert [(e.event, e.data) for e in whole] == [(e.event, e.data) for e in expected]
    assert decode(rechunk(data, cuts)) == whole
    # One byte at a time: every CRLF and every multi-byte character is split.
    assert decode([data[i : i + 1] for i in range(len(data))]) == whole


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=200).map(lambda b: b.replace(b"\x00", b"")),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
)
def test_arbitrary_bytes_decode_identically_however_chunked(data, cuts):
    # Includes invalid UTF-8 and mixed CR / LF / CRLF line endings: the chunking must never matter.
    assert decode(rechunk(data, cuts)) == decode([data])


def test_crlf_split_across_chunks_is_one_line_break():
    events = decode([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"])
    assert events == [SSEEvent(event="message", data="a\nb")]


def test_utf8_character_split_across_chunks_is_kept_whole():
    encoded = 'data: {"text":"é☕😀"}\n\n'.encode()
    cut = encoded.index("😀".encode()) + 2  # inside the 4-byte emoji
    assert decode([encoded[:cut], encoded[cut:]]) == [SSEEvent(event="message", data='{"text":"é☕😀"}')]


def test_comments_fields_and_one_stripped_space():
    stream = b": keep-alive\nevent: ping\ndata:  two spaces\nretry: 1500\nunknown: x\n\n"
    assert decode([stream]) == [SSEEvent(event="ping", data=" two spaces", retry=1500)]


def test_blank_lines_without_data_dispatch_nothing():
    assert decode([b"\n\n: comment\n\n\n"]) == []


def test_cut_off_final_line_is_dropped_but_complete_lines_dispatch_at_end():
    assert decode([b'data: {"par']) == []
    assert decode([b"data: [DONE]\n"]) == [SSEEvent(event="message", data="[DONE]")]


def test_byte_order_mark_at_stream_start_is_ignored():
    assert decode(["\ufeffdata: x\n\n".encode()]) == [SSEEvent(event="message", data="x")]


def test_oversized_line_is_refused():
    decoder = SSEDecoder(max_line_bytes=64)
    with pytest.raises(SSEProtocolError):
        decoder.feed(b"data: " + b"x" * 100)
    decoder = SSEDecoder(max_line_bytes=64)
    for _ in range(8):
        decoder.feed(b"xxxxxxxx")  # 64 bytes of one unterminated line: still within the cap
    with pytest.raises(SSEProtocolError):
        decoder.feed(b"x")
