"""The mock's audio behaviour: VAD timings and thresholds, the bit-exact echo (30 s), G.711,
and the stream echo used by the relay benchmarks."""
from __future__ import annotations

import asyncio
import base64
import math
import re
import time
from typing import Any

import numpy as np
import pytest

from gateway.mock import MockOptions, MockRealtimeServer
from gateway.mock.vad import EnergyVad, threshold_to_dbfs
from tests.support import run
from tests.test_mock_upstream import (AUDIO_LADDER, ID_PATTERN, RawClient, b64_audio, collapse,
                                      open_dialect, pcm_silence, pcm_tone, update)


def chirp_with_noise(ms: int, seed: int = 7) -> bytes:
    """Non-trivial audio: a 200→3000 Hz chirp at about -14 dBFS plus seeded white noise."""
    rate = 24000
    t = np.arange(ms * rate // 1000) / rate
    duration = ms / 1000
    phase = 2 * math.pi * (200 * t + (3000 - 200) * t * t / (2 * duration))
    noise = np.random.default_rng(seed).normal(0, 1500, t.size)
    return np.clip(np.round(6000 * np.sin(phase) + noise), -32768, 32767).astype("<i2").tobytes()


def noise(ms: int, dbfs: float, seed: int = 3) -> bytes:
    sigma = 32768 * 10 ** (dbfs / 20)
    samples = np.random.default_rng(seed).normal(0, sigma, ms * 24)
    return np.clip(np.round(samples), -32768, 32767).astype("<i2").tobytes()


# ---------------------------------------------------------------------------------------------
# VAD

def test_vad_timings_on_silence_tone_silence_within_one_frame() -> None:
    """1 s silence, 1 s tone, 1 s silence, streamed in 20 ms appends: the truth is onset 1000 ms,
    offset 2000 ms; with prefix 300 / silence 500 the mock must say 700 and 2500 (±20 ms)."""
    async def scenario() -> None:
        async with MockRealtimeServer() as server:
            client = await open_dialect(server, "ga")
            await update(client, "ga", turn_detection={
                "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                "silence_duration_ms": 500, "create_response": False})
            signal = pcm_silence(1000) + pcm_tone(1000, dbfs=-20) + pcm_silence(1000)
            await client.append(signal)
            events = await client.recv_until("conversation.item.done")
            types = [e["type"] for e in events]
            assert types == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                             "input_audio_buffer.committed", "conversation.item.added",
                             "conversation.item.done"]
            start, end = events[0]["audio_start_ms"], events[1]["audio_end_ms"]
            assert abs(start - 700) <= 20 and abs(end - 2500) <= 20
            item = server.sessions[0].conversation.get(events[2]["item_id"])
            assert bytes(item.audio) == signal[start * 48:end * 48]
            assert server.sessions[0].active_response is None  # create_response: false
    run(scenario(), timeout=10)


def test_vad_prefix_padding_clamped_at_buffer_start() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer() as server:
            client = await open_dialect(server, "ga")
            await client.append(pcm_silence(100) + pcm_tone(400) + pcm_silence(300))
            events = await client.recv_until("input_audio_buffer.speech_stopped")
            assert events[0]["audio_start_ms"] == 0  # 100 - 300 clamped
            assert events[1]["audio_end_ms"] == 700
    run(scenario(), timeout=10)


def test_vad_threshold_mapping() -> None:
    """threshold 0.5 (bar -45 dBFS): a -20 dBFS tone is speech; digital silence and -70 dBFS
    noise are not. threshold 0.9 (bar -9 dBFS): the -20 dBFS tone is not speech either."""
    assert threshold_to_dbfs(0.5) == -45.0

    def events_for(audio: bytes, threshold: float) -> list[str]:
        vad = EnergyVad("audio/pcm", threshold, 300, 200)
        found = []
        for start in range(0, len(audio), 960):
            found += [e.kind for e in vad.feed(audio[start:start + 960], 0)]
        return found

    speech_then_silence = pcm_tone(500, dbfs=-20) + pcm_silence(300)
    assert events_for(speech_then_silence, 0.5) == ["speech_started", "speech_stopped"]
    assert events_for(pcm_silence(2000), 0.5) == []
    assert events_for(noise(2000, -70), 0.5) == []
    assert events_for(noise(500, -20) + pcm_silence(300), 0.5) == ["speech_started", "speech_stopped"]
    assert events_for(speech_then_silence, 0.9) == []


def test_vad_odd_chunk_sizes_give_the_same_boundaries() -> None:
    signal = pcm_silence(1000) + pcm_tone(1000) + pcm_silence(1000)
    for chunk in (960, 4800, 1234, 77):
        vad = EnergyVad("audio/pcm", 0.5, 300, 500)
        found = []
        for start in range(0, len(signal), chunk):
            found += [(e.kind, e.ms) for e in vad.feed(signal[start:start + chunk], 0)]
        assert found == [("speech_started", 700), ("speech_stopped", 2500)], chunk


def test_semantic_vad_uses_eagerness_as_silence_duration() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer() as server:
            client = await open_dialect(server, "ga")
            await update(client, "ga", turn_detection={"type": "semantic_vad", "eagerness": "high"})
            await client.append(pcm_silence(400) + pcm_tone(600) + pcm_silence(400))
            events = await client.recv_until("input_audio_buffer.speech_stopped")
            assert events[0]["audio_start_ms"] == 100
            assert events[1]["audio_end_ms"] == 1000 + 250
    run(scenario(), timeout=10)


def test_interrupt_response_false_lets_the_response_finish() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(MockOptions(pacing="realtime", delta_ms=50)) as server:
            client = await open_dialect(server, "ga")
            await update(client, "ga", turn_detection={"type": "server_vad", "interrupt_response": False})
            await client.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hey"}]}})
            await client.recv_until("conversation.item.done")
            await client.send({"type": "response.create"})
            await client.recv_until("response.output_audio.delta")
            await client.append(pcm_tone(60))
            events = await client.recv_until("response.done")
            assert "input_audio_buffer.speech_started" in [e["type"] for e in events]
            assert events[-1]["response"]["status"] == "completed"
    run(scenario(), timeout=10)


def test_idle_timeout_fires_once_the_reply_has_played_and_the_wait_passed() -> None:
    """Time is the thing under test. server_vad `idle_timeout_ms` (reference §5.1, §5.3): the
    reply to "hi" (720 ms of audio, sent at once) would have played 0.72 s after its first
    delta; 5 s of no speech later comes `input_audio_buffer.timeout_triggered`, its
    audio_start_ms where the input timeline stood when playback ended, audio_end_ms where it
    stands now. Speech in the wait disarms it (a second session, which speaks at 1.5 s)."""
    async def reply_to_hi(client: RawClient, create_response: bool) -> float:
        await update(client, "ga", turn_detection={"type": "server_vad", "idle_timeout_ms": 5000,
                                                    "create_response": create_response})
        await client.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}})
        await client.recv_until("conversation.item.done")
        await client.send({"type": "response.create"})
        await client.recv_until("response.done")
        return time.monotonic()

    async def stays_silent(client: RawClient) -> None:
        done_at = await reply_to_hi(client, create_response=True)
        await client.append(pcm_silence(1000), chunk_bytes=4800)  # before playback ends
        await asyncio.sleep(1.5)
        await client.append(pcm_silence(2000), chunk_bytes=4800)  # during the wait
        triggered = await client.recv(timeout=8.0)
        assert 5.6 <= time.monotonic() - done_at <= 7.0
        assert set(triggered) == {"type", "event_id", "audio_start_ms", "audio_end_ms", "item_id"}
        assert triggered["type"] == "input_audio_buffer.timeout_triggered"
        assert (triggered["audio_start_ms"], triggered["audio_end_ms"]) == (1000, 3000)
        assert re.fullmatch(ID_PATTERN["item"], triggered["item_id"])

    async def speaks(client: RawClient) -> None:
        done_at = await reply_to_hi(client, create_response=False)
        await asyncio.sleep(1.5)
        await client.append(pcm_tone(400) + pcm_silence(400))
        events: list[dict[str, Any]] = []
        while (left := done_at + 6.2 - time.monotonic()) > 0:  # past when it would have fired
            try:
                events.append(await client.recv(timeout=left))
            except asyncio.TimeoutError:
                break
        assert [e["type"] for e in events] == [
            "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"]

    async def scenario() -> None:
        async with MockRealtimeServer() as server:
            silent, speaking = await open_dialect(server, "ga"), await open_dialect(server, "ga")
            await asyncio.gather(stays_silent(silent), speaks(speaking))
    run(scenario(), timeout=20)


# ---------------------------------------------------------------------------------------------
# the echo

def test_bit_exact_echo_of_30_seconds() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer() as server:
            client = await open_dialect(server, "ga")
            speech = chirp_with_noise(30_000)
            signal = pcm_silence(500) + speech + pcm_silence(400)
            await client.append(signal, chunk_bytes=4800)
            events = await client.recv_until("response.done", timeout=20)
            started = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")
            stopped = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")
            assert (started["audio_start_ms"], stopped["audio_end_ms"]) == (200, 30_700)
            echoed = b64_audio(events)
            assert len(echoed) == 30_500 * 48
            assert echoed == signal[200 * 48:30_700 * 48]
            assert speech in echoed
            assert sum(e["type"] == "response.output_audio.delta" for e in events) == 305
            done = events[-1]["response"]
            assert done["output"][0]["content"][0]["transcript"] == "echo of 30500 ms"
            assert done["usage"]["output_token_details"]["audio_tokens"] == 610
    run(scenario(), timeout=30)


@pytest.mark.parametrize("beta_name,ga_type", [("g711_ulaw", "audio/pcmu"), ("g711_alaw", "audio/pcma")])
def test_g711_turn_echo_and_8_bytes_per_ms(beta_name: str, ga_type: str) -> None:
    async def scenario() -> None:
        async with MockRealtimeServer() as server:
            client = await open_dialect(server, "ga")
            await client.send({"type": "session.update", "session": {"type": "realtime", "audio": {
                "input": {"format": {"type": ga_type}}, "output": {"format": {"type": ga_type}}}}})
            session = (await client.expect("session.updated"))["session"]
            assert session["audio"]["input"]["format"] == {"type": ga_type}
            from gateway.mock.audio import tone
            silence = bytes([0xFF if ga_type == "audio/pcmu" else 0xD5]) * 8 * 500
            signal = silence + tone(700, ga_type, 300.0, -15.0) + silence
            await client.append(signal, chunk_bytes=160)
            events = await client.recv_until("response.done")
            started = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")
            stopped = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")
            assert (started["audio_start_ms"], stopped["audio_end_ms"]) == (200, 1400)
            assert b64_audio(events) == signal[200 * 8:1400 * 8]
            deltas = [e for e in events if e["type"] == "response.output_audio.delta"]
            assert len(base64.b64decode(deltas[0]["delta"])) == 800  # 100 ms at 8 bytes/ms
    run(scenario(), timeout=10)


def test_the_timeline_goes_on_in_milliseconds_across_an_input_format_change() -> None:
    """Found by a protocol audit: positions were kept in bytes of the current format, so after
    2 s of PCM16 and a switch to G.711 the mock counted that 2 s as 12 s (speech at 12,700 ms).
    The timeline is in audio time (reference §3.3): the turn starts at 2 s + 1 s - 300 ms."""
    async def scenario() -> None:
        async with MockRealtimeServer() as server:
            client = await open_dialect(server, "ga")
            await client.append(pcm_silence(2000))
            await client.send({"type": "session.update", "session": {"type": "realtime", "audio": {
                "input": {"format": {"type": "audio/pcmu"}}}}})
            await client.expect("session.updated")
            from gateway.mock.audio import tone
            silence = b"\xff" * 8 * 1000
            await client.append(silence + tone(500, "audio/pcmu", 300.0, -15.0) + silence, chunk_bytes=160)
            events = await client.recv_until("input_audio_buffer.speech_stopped")
            started = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")
            assert abs(started["audio_start_ms"] - 2700) <= 20
            assert abs(events[-1]["audio_end_ms"] - 3700) <= 20  # tone end 3500 + the default 200 ms silence
    run(scenario(), timeout=10)


def test_converted_audio_keeps_its_duration_and_its_sound() -> None:
    from gateway.mock.audio import convert, rms_dbfs, tone
    pcm = tone(300, "audio/pcm", 440.0, -12.0)
    for fmt in ("audio/pcmu", "audio/pcma"):
        g711 = convert(pcm, "audio/pcm", fmt)
        back = convert(g711, fmt, "audio/pcm")
        assert (len(g711), len(back)) == (300 * 8, 300 * 48)
        assert abs(rms_dbfs(g711, fmt) - rms_dbfs(pcm, "audio/pcm")) < 0.5
        assert abs(rms_dbfs(back, "audio/pcm") - rms_dbfs(pcm, "audio/pcm")) < 0.5
    assert convert(pcm, "audio/pcm", "audio/pcm") is pcm


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_stream_echo_mode(dialect: str) -> None:
    async def scenario() -> None:
        options = MockOptions(echo_mode="stream", delta_ms=100,
                              beta="serve" if dialect == "beta" else "reject")
        async with MockRealtimeServer(options) as server:
            client = await open_dialect(server, dialect)
            audio = chirp_with_noise(1030)  # speech, but stream mode has no VAD
            rng = np.random.default_rng(5)
            position = 0
            while position < len(audio):
                size = int(rng.integers(1, 3000))
                await client.send({"type": "input_audio_buffer.append",
                                   "audio": base64.b64encode(audio[position:position + size]).decode()})
                position += size
            audio_type = "response.output_audio.delta" if dialect == "ga" else "response.audio.delta"
            received = []
            while sum(e["type"] == audio_type for e in received) < 10:
                received.append(await client.recv())
            await client.send({"type": "input_audio_buffer.commit"})
            received += await client.recv_until("response.done")
            types = [e["type"] for e in received]
            assert "input_audio_buffer.speech_started" not in types
            assert collapse(types) == AUDIO_LADDER[dialect]
            deltas = [base64.b64decode(e["delta"]) for e in received if e["type"] == audio_type]
            assert [len(d) for d in deltas] == [4800] * 10 + [30 * 48]
            assert b"".join(deltas) == audio
            pairs = [t for t in types if t.endswith(".delta")]
            assert pairs[:2] == [audio_type, audio_type.replace("audio.delta", "audio_transcript.delta")]
            done = received[-1]["response"]
            assert done["status"] == "completed"
            assert done["output"][0]["content"][0]["transcript"] == "[100 ms] " * 11
            # the next append opens a new response
            await client.send({"type": "input_audio_buffer.append",
                               "audio": base64.b64encode(audio[:9600]).decode()})
            again = await client.recv_until(audio_type)
            assert again[0]["type"] == "response.created" and again[0]["response"]["id"] != done["id"]
    run(scenario(), timeout=10)


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_transcription_whisper_duration_usage_and_failure_on_silence(dialect: str) -> None:
    async def scenario() -> None:
        options = MockOptions(beta="serve") if dialect == "beta" else MockOptions()
        async with MockRealtimeServer(options) as server:
            client = await open_dialect(server, dialect)
            await update(client, dialect, turn_detection=None, transcription={"model": "whisper-1"})
            await client.append(pcm_tone(300))
            await client.send({"type": "input_audio_buffer.commit"})
            events = await client.recv_until("conversation.item.input_audio_transcription.completed")
            assert not any(e["type"].endswith("transcription.delta") for e in events)  # whisper: no deltas
            assert events[-1]["transcript"] == "user audio turn 1: 300 ms"
            assert events[-1]["usage"] == {"type": "duration", "seconds": 0.3}
            await client.append(pcm_silence(200))
            await client.send({"type": "input_audio_buffer.commit"})
            events = await client.recv_until("conversation.item.input_audio_transcription.failed")
            assert events[-1]["error"] == {"type": "transcription_error", "code": "audio_unintelligible",
                                           "message": "The audio could not be transcribed.", "param": None}
            assert events[-1]["item_id"] == events[0]["item_id"]
    run(scenario(), timeout=10)


def test_realtime_pacing_spaces_deltas_by_their_duration() -> None:
    """Time is the thing under test: 100 ms deltas of a 1 s reply arrive ~100 ms apart."""
    async def scenario() -> None:
        async with MockRealtimeServer(MockOptions(pacing="realtime", delta_ms=100)) as server:
            client = await open_dialect(server, "ga")
            await update(client, "ga", turn_detection=None)
            await client.append(pcm_tone(1000))
            await client.send({"type": "input_audio_buffer.commit"})
            await client.send({"type": "response.create"})
            arrivals = []
            while True:
                event = await client.recv()
                if event["type"] == "response.output_audio.delta":
                    arrivals.append(time.monotonic())
                if event["type"] == "response.done":
                    break
            assert len(arrivals) == 10
            gaps = np.diff(arrivals)
            assert 0.8 <= arrivals[-1] - arrivals[0] <= 1.5  # 9 gaps of 100 ms
            assert 0.08 <= float(np.median(gaps)) <= 0.13
    run(scenario(), timeout=10)


def test_stream_echo_cancel_and_single_active_response() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(MockOptions(echo_mode="stream", delta_ms=20)) as server:
            client = await open_dialect(server, "ga")
            audio = chirp_with_noise(50)
            await client.append(audio, chunk_bytes=960)
            first = await client.recv_until("response.output_audio.delta")
            await client.send({"type": "response.create", "event_id": "rc"})
            error = (await client.recv_until("error"))[-1]["error"]
            assert error["code"] == "conversation_already_has_active_response"
            assert first[0]["response"]["id"] in error["message"] and error["event_id"] == "rc"
            await client.send({"type": "response.cancel"})
            rest = await client.recv_until("response.done")
            done = rest[-1]["response"]
            assert done["status"] == "cancelled"
            assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
            assert done["output"][0]["status"] == "incomplete"
            echoed = b64_audio(client.events)
            assert echoed == audio[:len(echoed)] and len(echoed) == 2 * 960  # pending 10 ms dropped
    run(scenario(), timeout=10)
