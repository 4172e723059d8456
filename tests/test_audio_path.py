"""The relay's per-frame audio path (`AudioPath`, `ClientLeg`, `UpstreamLeg` in `_fastpath`).

Unit level, on every implementation (compiled, pure): the outbound gate, the counters, the batch.
End to end, on the implementation the process loaded (the suite runs once per implementation):
in steady state the audio of both directions moves without one call into the session, the
session's counters still see every frame, and the bytes arrive exact — and in a normal install
the legs the relay's listeners are built on are the compiled ones.
"""
from __future__ import annotations

import os

import pytest

import _fastpath
import _fastpath._compiled as compiled
import _fastpath._pure as pure
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
    header = fp.binary_frame_header(size)
    assert header == pure.binary_frame_header(size)
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
    """After `ready`, client audio goes to the upstream and reply audio to the client without
    the session's Python: only the first reply delta of the turn passes through it (it times
    the reply latency and opens the gate). The counters still see every frame; bytes are exact."""
    calls = {"on_client_audio": 0, "_audio_out": 0}
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
            return done, bytes(client.audio), stats

    done, received, stats = run(scenario(), timeout=40)
    assert done["status"] == "completed"
    assert received == audio
    assert calls["on_client_audio"] == 0
    assert calls["_audio_out"] == 1
    assert (stats.c2u_audio_frames, stats.c2u_audio_bytes) == (len(chunks), len(audio))
    assert stats.u2c_audio_bytes == len(audio) and stats.u2c_audio_frames > 1
