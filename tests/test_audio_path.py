"""The relay's per-frame audio path (`AudioPath`, `ClientLeg`, `UpstreamLeg` in `_fastpath`).

Unit level, on every implementation (compiled, pure): the outbound gate, the counters, the batch.
End to end, on the implementation the process loaded (the suite runs once per implementation):
in steady state the audio of both directions moves without one call into the session, the
session's counters still see every frame, and the bytes arrive exact — and in a normal install
the legs the relay's listeners are built on are the compiled ones.
"""
from __future__ import annotations

import os

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import _fastpath
import _fastpath._compiled as compiled
import _fastpath._pure as pure
from gateway.client_protocol import transcript_event
from gateway.server import ClientListener
from gateway.session import RelaySession
from gateway.upstream.connection import UpstreamListener
from tests.relay_harness import RelayClient, frames, relay, speech_like
from tests.support import run


@pytest.fixture(params=["pure", "compiled"])
def fp(request):
    return pure if request.param == "pure" else compiled


@pytest.mark.parametrize("size", [0, 1, 125, 126, 4800, 65535, 65536, 1 << 20])
def test_binary_frame_header_is_rfc6455(fp, size):
    header = fp.frame_header(0x82, size)
    assert header == pure.frame_header(0x82, size)
    assert header[0] == 0x82  # FIN + binary, unmasked (server to client)
    if size < 126:
        assert header[1:] == bytes([size])
    elif size < 65536:
        assert header[1] == 126 and int.from_bytes(header[2:], "big") == size
    else:
        assert header[1] == 127 and int.from_bytes(header[2:], "big") == size


def _path(fp):
    pending = []
    path = fp.AudioPath(fp.Coalescer(960), lambda: pending.append(True))
    return path, pending


def test_upstream_audio_is_taken_only_for_the_open_item(fp):
    path, _ = _path(fp)
    assert path.upstream_audio("item_a", b"\x01\x02") is False  # gate closed: the session's
    path.outbound_item = "item_a"
    assert path.upstream_audio("item_b", b"\x01\x02") is False  # another item: the session's
    assert path.batch == [] and path.u2c_audio_frames == 0 and not path.batching
    assert path.upstream_audio("item_a", b"\x01\x02\x03\x04") is True
    assert path.upstream_audio("item_a", b"\x05\x06") is True
    assert path.batching
    assert path.batch == [b"\x82\x04", b"\x01\x02\x03\x04", b"\x82\x02", b"\x05\x06"]
    assert (path.item_generated, path.item_delivered) == (6, 6)
    assert (path.u2c_audio_frames, path.u2c_audio_bytes) == (2, 6)


def test_flush_batch_without_a_client_drops_the_batch_and_stops_batching(fp):
    path, _ = _path(fp)
    path.outbound_item = "item_a"
    path.upstream_audio("item_a", b"\x00\x00")
    path.flush_batch()
    assert path.batch == [] and not path.batching


def test_a_batch_is_written_once_it_reaches_client_batch_bytes_and_the_read_goes_on(fp):
    """A read of a fast upstream can hold hundreds of deltas: the path writes its batch every
    CLIENT_BATCH_BYTES (here: no client, so the write drops it) and keeps batching, so frames
    the session adds later in the same read still follow in order."""
    path, _ = _path(fp)
    path.outbound_item = "item_a"
    delta = bytes(4800)
    below = _fastpath.CLIENT_BATCH_BYTES // (4 + len(delta))
    for _ in range(below):
        assert path.upstream_audio("item_a", delta)
    assert len(path.batch) == 2 * below
    assert path.upstream_audio("item_a", delta)   # crosses the bound: written
    assert path.batch == [] and path.batching
    assert path.upstream_transcript("item_a", b'{"type":"transcript"}', 60)
    assert path.batch == [b"\x81\x15", b'{"type":"transcript"}']
    path.flush_batch()
    assert path.batch == [] and not path.batching


def test_client_audio_counts_and_reports_pending_samples(fp):
    """Without an upstream nothing is sent; the pending-samples hook fires on each change."""
    path, pending = _path(fp)
    path.client_audio(b"\x00" * 481)  # 240 whole samples + an odd byte pending
    assert (path.c2u_audio_frames, path.c2u_audio_bytes) == (1, 481)
    assert pending == [True]  # the session would arm its flush timer and set flush_armed
    path.flush_armed = True
    path.client_audio(b"\x00" * 479)  # 960 bytes: one append emitted, nothing left
    assert path.coalescer.pending_bytes == 0
    assert pending == [True, True]  # ... and cancel it now


def test_the_relay_listeners_are_built_on_the_loaded_legs():
    assert issubclass(ClientListener, _fastpath.ClientLeg)
    assert issubclass(UpstreamListener, _fastpath.UpstreamLeg)
    if os.environ.get("GATEWAY_NO_EXTENSIONS", "") in ("", "0"):
        # a normal install: picows calls straight into the compiled legs for every frame
        assert _fastpath.ClientLeg is compiled.ClientLeg
        assert _fastpath.UpstreamLeg is compiled.UpstreamLeg
        assert _fastpath.AudioPath is compiled.AudioPath


def test_steady_state_audio_never_calls_the_session(monkeypatch):
    """After `ready`, client audio goes to the upstream, and reply audio and transcript deltas
    to the client, without the session's Python: only the first reply delta of the turn passes
    through it (it times the reply latency and opens the gate). The counters still see every
    frame; bytes and transcripts are exact."""
    calls = {"on_client_audio": 0, "_audio_out": 0, "_on_assistant_delta": 0}
    for name in calls:
        original = getattr(RelaySession, name)

        def counting(self, *args, _original=original, _name=name):
            calls[_name] += 1
            return _original(self, *args)
        monkeypatch.setattr(RelaySession, name, counting)

    audio = speech_like(2.0, seed=7)
    chunks = frames(audio, 960)

    async def scenario():
        async with relay() as (gateway, _mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none",
                               "input_transcription": {"enabled": False}})
            await client.wait("ready", timeout=10)
            for chunk in chunks:
                await client.send_audio(chunk)
            await client.send({"type": "commit"})
            await client.send({"type": "create_response"})
            done = await client.wait("response_done", timeout=20)
            (session,) = gateway.sessions
            stats = session.stats
            await client.close()
            return done, bytes(client.audio), stats, client

    done, received, stats, client = run(scenario(), timeout=40)
    assert done["status"] == "completed"
    assert received == audio
    assert calls["on_client_audio"] == 0
    assert calls["_audio_out"] == 1
    assert calls["_on_assistant_delta"] == 0  # every transcript delta came after the first audio
    transcripts = client.of_type("transcript")
    deltas = [t["text"] for t in transcripts if not t["is_final"]]
    assert len(deltas) > 1 and transcripts[-1]["is_final"]
    assert "".join(deltas) == transcripts[-1]["text"]
    assert all(t["role"] == "assistant" and t["response_id"] == done["response_id"] for t in transcripts)
    assert (stats.c2u_audio_frames, stats.c2u_audio_bytes) == (len(chunks), len(audio))
    assert stats.u2c_audio_bytes == len(audio) and stats.u2c_audio_frames > 1


# ------------------------------------------------------------------- assistant transcript deltas

def _transcript_frame(delta: str, *, beta: bool = False, response_id: str | None = "resp_1") -> bytes:
    event = {"type": "response.audio_transcript.delta" if beta else "response.output_audio_transcript.delta",
             "event_id": "event_9", "item_id": "item_1", "output_index": 0, "content_index": 0,
             "delta": delta}
    if response_id is not None:
        event["response_id"] = response_id
    return orjson.dumps(event)


@pytest.mark.parametrize("beta", [False, True])
@pytest.mark.parametrize("response_id", ["resp_1", None])
def test_transcript_delta_becomes_the_sessions_exact_event(fp, beta, response_id):
    frame = _transcript_frame("Hello there, 'world'!", beta=beta, response_id=response_id)
    expected = transcript_event("assistant", "Hello there, 'world'!", False, "item_1", response_id)
    assert fp.decode_transcript_delta(frame) == ("item_1", expected)


def test_empty_transcript_delta_tells_the_client_nothing(fp):
    assert fp.decode_transcript_delta(_transcript_frame("")) == ("item_1", None)


@pytest.mark.parametrize("text", ['say "hi"', "caf\u00e9", "line\nbreak", "back\\slash", "\u4f60\u597d"])
def test_unusual_transcript_text_is_exact_or_left_to_the_parser(fp, text):
    """Escapes and non-ASCII: the compiled scanner declines (the session's JSON path handles it);
    the pure twin handles it; whatever is returned is the session's exact event."""
    result = fp.decode_transcript_delta(_transcript_frame(text))
    if fp is compiled:
        assert result is None
    else:
        assert result == ("item_1", transcript_event("assistant", text, False, "item_1", "resp_1"))


@pytest.mark.parametrize("frame", [
    b'{"type":"response.output_audio_transcript.done","item_id":"item_1","transcript":"Hi"}',
    b'{"type":"conversation.item.input_audio_transcription.delta","item_id":"item_1","delta":"Hi"}',
    b'{"type":"response.output_text.delta","item_id":"item_1","delta":"Hi"}',
    b'{"type":"response.output_audio_transcript.delta","item_id":"item_1","delta":"Hi","response_id":7}',
    b'{"type":"response.output_audio_transcript.delta","item_id":"item_1","delta":"Hi","response_id":null}',
    b'{"type":"response.output_audio_transcript.delta","item_id":"item_1","delta":"Hi"',
    b'{"type":"response.output_audio_transcript.delta","delta":"Hi"}',
    b'{"type":["response.output_audio_transcript.delta"],"item_id":"item_1","delta":"Hi"}',
    b'{"type":{"a":1},"item_id":"item_1","delta":"Hi"}',
    b'["response.output_audio_transcript.delta"]',
])
def test_transcript_decoder_leaves_everything_else_alone(fp, frame):
    assert fp.decode_transcript_delta(frame) is None


def test_audio_decoder_does_not_take_transcript_deltas(fp):
    assert fp.decode_audio_delta(_transcript_frame("QUFB")) is None


def test_upstream_transcript_is_taken_only_for_the_open_item(fp):
    path, _ = _path(fp)
    event = transcript_event("assistant", "Hi", False, "item_a", None)
    assert path.upstream_transcript("item_a", event, 120) is False
    path.outbound_item = "item_a"
    assert path.upstream_transcript("item_b", event, 120) is False
    assert path.upstream_transcript("item_a", None, 100) is True  # empty delta: counted, no event
    assert path.batch == [] and not path.batching
    assert path.upstream_transcript("item_a", event, 120) is True
    assert path.batch == [bytes([0x81, len(event)]), event] and path.batching
    assert (path.u2c_json_frames, path.u2c_json_bytes) == (2, 220)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=0x2FF), max_size=40),
       item=st.from_regex(r"[A-Za-z0-9_]{1,24}", fullmatch=True))
def test_compiled_transcript_decoder_agrees_with_the_twin(text, item):
    frame = orjson.dumps({"type": "response.output_audio_transcript.delta", "item_id": item,
                          "response_id": "resp_x", "delta": text})
    expected = pure.decode_transcript_delta(frame)
    assert expected == (item, transcript_event("assistant", text, False, item, "resp_x") if text else None)
    got = compiled.decode_transcript_delta(frame)
    assert got is None or got == expected
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        assert got == expected  # simple text is always handled


@settings(max_examples=300, deadline=None)
@given(position=st.integers(0, 200), byte=st.integers(0, 255), cut=st.booleans())
def test_compiled_transcript_decoder_never_accepts_what_the_parser_rejects(position, byte, cut):
    """One byte changed (or the frame cut there): whatever the compiled decoder still takes is
    valid JSON and exactly what the twin makes of it."""
    frame = bytearray(_transcript_frame("Hello there"))
    position %= len(frame)
    if cut:
        del frame[position:]
    else:
        frame[position] = byte
    got = compiled.decode_transcript_delta(bytes(frame))
    if got is not None:
        orjson.loads(bytes(frame))  # raises if it is not JSON
        assert got == pure.decode_transcript_delta(bytes(frame))


def test_handshakes_are_released_once_the_session_is_up():
    """picows keeps each socket's upgrade request and response for the connection's life; the
    gateway drops them once admitted / connected (the upstream request holds the API key). Only
    the compiled fast path can (the attributes are read-only from Python)."""
    async def scenario():
        async with relay() as (gateway, _mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready", timeout=10)
            (session,) = gateway.sessions
            legs = (session.client, session.upstream.transport)
            held = [(leg.request is not None, leg.response is not None) for leg in legs]
            await client.close()
            return held

    held = run(scenario(), timeout=20)
    if _fastpath.IMPLEMENTATION == "compiled":
        assert held == [(False, False), (False, False)]
    else:
        assert held == [(True, True), (True, True)]
