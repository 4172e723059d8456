"""The mock OpenAI Realtime server: handshakes and the event sequences of reference §7.1–§7.7,
in both dialects, over real sockets with a plain `websockets` client.

Shared client helpers live here (`RawClient`, `dialect_options`, …); the other
tests/test_mock_*.py files import them.
"""
from __future__ import annotations

import asyncio
import base64
import math
import re
import socket
import subprocess
import sys
from typing import Any, Optional

import numpy as np
import orjson
import pytest
import websockets
from websockets.asyncio.client import connect

from gateway.mock import MockOptions, MockRealtimeServer
from gateway.mock.responses import spoken_tone
from tests.support import run

KEY = "test-key-1"
GA_PATH = "/v1/realtime?model=gpt-realtime"
BETA_HEADERS = {"OpenAI-Beta": "realtime=v1"}
DELTA_TYPES = {
    "response.output_audio.delta", "response.output_audio_transcript.delta",
    "response.output_text.delta", "response.function_call_arguments.delta",
    "response.audio.delta", "response.audio_transcript.delta", "response.text.delta",
}
ID_PATTERN = {"event": r"event_[0-9A-Za-z]{21}", "sess": r"sess_[0-9A-Za-z]{21}",
              "item": r"item_[0-9A-Za-z]{21}", "resp": r"resp_[0-9A-Za-z]{21}",
              "call": r"call_[0-9A-Za-z]{16}"}


# ---------------------------------------------------------------------------------------------
# helpers shared by the mock tests

def pcm_tone(ms: int, dbfs: float = -20.0, hz: float = 440.0, rate: int = 24000) -> bytes:
    t = np.arange(ms * rate // 1000) / rate
    amplitude = 32767 * 10 ** (dbfs / 20)
    return np.round(amplitude * np.sin(2 * math.pi * hz * t)).astype("<i2").tobytes()


def pcm_silence(ms: int) -> bytes:
    return bytes(48 * ms)


class RawClient:
    """A plain websockets client speaking JSON events to the mock."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, server: MockRealtimeServer, path: str = GA_PATH, key: Optional[str] = KEY,
                   headers: Optional[dict[str, str]] = None,
                   subprotocols: Optional[list[str]] = None) -> "RawClient":
        all_headers = dict(headers or {})
        if key is not None:
            all_headers["Authorization"] = f"Bearer {key}"
        ws = await connect(f"ws://127.0.0.1:{server.port}{path}", additional_headers=all_headers,
                           subprotocols=subprotocols, max_size=None, compression=None,
                           open_timeout=5)
        return cls(ws)

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps(event).decode())

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        event = orjson.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.events.append(event)
        return event

    async def recv_until(self, type_: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Every event up to and including the first of `type_` (bounded by `timeout`)."""
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while True:
                event = await self.recv(timeout)
                got.append(event)
                if event["type"] == type_:
                    return got

    async def expect(self, type_: str, timeout: float = 5.0) -> dict[str, Any]:
        event = await self.recv(timeout)
        assert event["type"] == type_, event
        return event

    async def append(self, audio: bytes, chunk_bytes: int = 960) -> None:
        for start in range(0, len(audio), chunk_bytes):
            await self.send({"type": "input_audio_buffer.append",
                             "audio": base64.b64encode(audio[start:start + chunk_bytes]).decode()})

    async def closed(self, timeout: float = 5.0) -> tuple[Optional[int], str]:
        """Wait for the server to close; (close code or None if dropped without a frame, reason)."""
        async with asyncio.timeout(timeout):
            try:
                while True:
                    self.events.append(orjson.loads(await self.ws.recv()))
            except websockets.ConnectionClosed:
                pass
        frame = self.ws.protocol.close_rcvd
        return (frame.code, frame.reason) if frame is not None else (None, "")

    async def close(self) -> None:
        await self.ws.close()


def collapse(types: list[str]) -> list[str]:
    """Event types with each run of delta events replaced by one "<deltas>"."""
    out: list[str] = []
    for type_ in types:
        if type_ in DELTA_TYPES:
            if not out or out[-1] != "<deltas>":
                out.append("<deltas>")
        else:
            out.append(type_)
    return out


def dialect_options(dialect: str, **kwargs: Any) -> MockOptions:
    return MockOptions(beta="serve", **kwargs) if dialect == "beta" else MockOptions(**kwargs)


async def open_dialect(server: MockRealtimeServer, dialect: str) -> RawClient:
    client = await RawClient.open(server, headers=BETA_HEADERS if dialect == "beta" else None)
    await client.expect("session.created")
    return client


def session_patch(dialect: str, *, turn_detection: Any = "keep", transcription: Any = "keep",
                  tools: Optional[list[dict[str, Any]]] = None, text_only: bool = False,
                  voice: Optional[str] = None) -> dict[str, Any]:
    """A `session.update` `session` in the dialect's shape."""
    if dialect == "ga":
        session: dict[str, Any] = {"type": "realtime"}
        audio_in: dict[str, Any] = {}
        if turn_detection != "keep":
            audio_in["turn_detection"] = turn_detection
        if transcription != "keep":
            audio_in["transcription"] = transcription
        if audio_in:
            session["audio"] = {"input": audio_in}
        if voice:
            session.setdefault("audio", {})["output"] = {"voice": voice}
        if text_only:
            session["output_modalities"] = ["text"]
    else:
        session = {}
        if turn_detection != "keep":
            session["turn_detection"] = turn_detection
        if transcription != "keep":
            session["input_audio_transcription"] = transcription
        if voice:
            session["voice"] = voice
        if text_only:
            session["modalities"] = ["text"]
    if tools is not None:
        session["tools"] = tools
    return session


async def update(client: RawClient, dialect: str, **kwargs: Any) -> dict[str, Any]:
    await client.send({"type": "session.update", "session": session_patch(dialect, **kwargs)})
    return (await client.expect("session.updated"))["session"]


def b64_audio(events: list[dict[str, Any]]) -> bytes:
    return b"".join(base64.b64decode(e["delta"]) for e in events
                    if e["type"] in ("response.output_audio.delta", "response.audio.delta"))


GA_AUDIO_LADDER = [
    "response.created", "response.output_item.added", "conversation.item.added",
    "response.content_part.added", "<deltas>", "rate_limits.updated", "response.output_audio.done",
    "response.output_audio_transcript.done", "response.content_part.done",
    "response.output_item.done", "conversation.item.done", "response.done"]
BETA_AUDIO_LADDER = [
    "response.created", "response.output_item.added", "conversation.item.created",
    "response.content_part.added", "<deltas>", "rate_limits.updated", "response.audio.done",
    "response.audio_transcript.done", "response.content_part.done",
    "response.output_item.done", "response.done"]
AUDIO_LADDER = {"ga": GA_AUDIO_LADDER, "beta": BETA_AUDIO_LADDER}
USER_ITEM_EVENTS = {"ga": ["conversation.item.added", "conversation.item.done"],
                    "beta": ["conversation.item.created"]}
DIALECTS = ["ga", "beta"]


# ---------------------------------------------------------------------------------------------
# §2 handshakes

def test_ga_connect_session_created_defaults_and_ids() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer() as server:
            assert server.url == f"ws://127.0.0.1:{server.port}/v1/realtime"
            client = await RawClient.open(server)
            created = await client.expect("session.created")
            assert re.fullmatch(ID_PATTERN["event"], created["event_id"])
            session = created["session"]
            assert re.fullmatch(ID_PATTERN["sess"], session["id"])
            assert session["type"] == "realtime" and session["object"] == "realtime.session"
            assert session["model"] == "gpt-realtime"
            assert session["output_modalities"] == ["audio"]
            assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
            assert session["audio"]["input"]["turn_detection"] == {
                "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                "silence_duration_ms": 200, "idle_timeout_ms": None, "create_response": True,
                "interrupt_response": True}
            assert session["audio"]["output"]["voice"] == "alloy"
            assert session["max_output_tokens"] == "inf" and session["tools"] == []
            assert session["tool_choice"] == "auto" and session["truncation"] == "auto"
            assert "temperature" not in session
            mock_session = await server.wait_for_session(0)
            assert abs(session["expires_at"] - (mock_session.created_at + 3600)) <= 1
            assert mock_session.dialect == "ga" and mock_session.model == "gpt-realtime"
            await client.close()
            await mock_session.wait_closed(2)
            assert mock_session.closed
    run(scenario(), timeout=10)


def test_without_recording_closed_sessions_are_forgotten() -> None:
    """A long-running mock (the node's --upstream mock) must not keep finished conversations."""
    async def scenario() -> None:
        async with MockRealtimeServer(MockOptions(record=False)) as server:
            first = await RawClient.open(server)
            await first.expect("session.created")
            second = await RawClient.open(server)
            await second.expect("session.created")
            first_session = await server.wait_for_session(0)
            assert len(server.sessions) == 2
            await first.close()
            await first_session.wait_closed(2)
            assert server.sessions == list(server.open_sessions) and first_session not in server.sessions
            await second.close()
    run(scenario(), timeout=10)


def test_beta_header_served_with_flat_session_shape() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(MockOptions(beta="serve")) as server:
            client = await RawClient.open(server, path="/v1/realtime?model=gpt-4o-realtime-preview",
                                          headers=BETA_HEADERS)
            session = (await client.expect("session.created"))["session"]
            assert session["voice"] == "alloy" and session["input_audio_format"] == "pcm16"
            assert session["temperature"] == 0.8 and session["max_response_output_tokens"] == "inf"
            assert session["turn_detection"]["silence_duration_ms"] == 200
            assert "type" not in session and "audio" not in session
            assert server.sessions[0].dialect == "beta"
    run(scenario(), timeout=10)


def test_beta_rejected_by_default_with_4000() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer() as server:
            client = await RawClient.open(server, headers=BETA_HEADERS)
            error = await client.expect("error")
            assert error["error"] == {
                "type": "invalid_request_error", "code": "beta_api_shape_disabled",
                "message": "The Realtime Beta API is no longer supported. Please use "
                           "/v1/realtime for the GA API.", "param": None, "event_id": None}
            assert await client.closed() == (4000, "invalid_request_error.beta_api_shape_disabled")
    run(scenario(), timeout=10)


def test_beta_subprotocol_and_azure_preview_path_select_beta() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(MockOptions(beta="serve")) as server:
            browser = await RawClient.open(
                server, key=None,
                subprotocols=["realtime", f"openai-insecure-api-key.{KEY}", "openai-beta.realtime-v1"])
            assert browser.ws.subprotocol == "realtime"
            await browser.expect("session.created")
            ws = await connect(
                f"ws://127.0.0.1:{server.port}/openai/realtime?api-version=2024-10-01-preview"
                f"&deployment=my-rt", additional_headers={"api-key": KEY})
            azure = RawClient(ws)
            created = await azure.expect("session.created")
            assert created["session"]["model"] == "my-rt"
            ws_ga = await connect(f"ws://127.0.0.1:{server.port}/openai/v1/realtime?model=dep-ga",
                                  additional_headers={"api-key": KEY})
            azure_ga = RawClient(ws_ga)
            assert (await azure_ga.expect("session.created"))["session"]["type"] == "realtime"
            assert [s.dialect for s in server.sessions] == ["beta", "beta", "ga"]
            assert server.sessions[2].model == "dep-ga"
    run(scenario(), timeout=10)


@pytest.mark.parametrize("key", ["wrong-key", None])
def test_bad_or_missing_key_ws_error_then_close_3000(key: Optional[str]) -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(MockOptions(api_keys={KEY})) as server:
            client = await RawClient.open(server, key=key)
            error = (await client.expect("error"))["error"]
            if key is None:
                assert error["code"] is None
                assert error["message"] == "Missing bearer or basic authentication in header"
            else:
                assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
                assert "wrong-key" not in error["message"] and "wro" in error["message"]
            code, reason = await client.closed()
            assert code == 3000
            assert reason == ("invalid_request_error.invalid_api_key" if key else "invalid_request_error")
    run(scenario(), timeout=10)


def test_bad_key_http_401_mode_refuses_upgrade() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(MockOptions(api_keys={KEY}, bad_key="http_401")) as server:
            for key in ("wrong-key", None):
                with pytest.raises(websockets.InvalidStatus) as info:
                    await RawClient.open(server, key=key)
                assert info.value.response.status_code == 401
                body = orjson.loads(info.value.response.body)
                assert body["error"]["type"] == "invalid_request_error"
            assert server.sessions == []
            good = await RawClient.open(server, key=KEY)
            await good.expect("session.created")
    run(scenario(), timeout=10)


def test_unknown_path_404_and_health() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer() as server:
            with pytest.raises(websockets.InvalidStatus) as info:
                await RawClient.open(server, path="/v2/elsewhere?model=gpt-realtime")
            assert info.value.response.status_code == 404
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            response = await asyncio.wait_for(reader.read(1024), 5)
            assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"ok\n")
            writer.close()
    run(scenario(), timeout=10)


def test_call_id_or_intent_transcription_instead_of_model() -> None:
    """§2.1: the query names a `model`, a `call_id` or `intent=transcription`. The mock has no
    WebRTC/SIP calls, so a call id is unknown: an empty 404 at the upgrade, as OpenAI answers.
    A transcription intent needs no model; the mock has no transcription sessions and serves a
    realtime one, where a transcription-shaped update gets OpenAI's error (§8)."""
    async def scenario() -> None:
        async with MockRealtimeServer() as server:
            with pytest.raises(websockets.InvalidStatus) as info:
                await RawClient.open(server, path="/v1/realtime?call_id=rtc_abc123")
            assert (info.value.response.status_code, bytes(info.value.response.body)) == (404, b"")
            client = await RawClient.open(server, path="/v1/realtime?intent=transcription")
            session = (await client.expect("session.created"))["session"]
            assert (session["type"], session["model"]) == ("realtime", None)
            await client.send({"type": "session.update", "event_id": "t",
                               "session": {"type": "transcription"}})
            assert (await client.expect("error"))["error"] == {
                "type": "invalid_request_error", "code": None, "param": None, "event_id": "t",
                "message": "Passing a transcription session update event to a realtime session "
                           "is not allowed."}
            with pytest.raises(websockets.InvalidStatus) as info:
                await RawClient.open(server, path="/v1/realtime?intent=other")
            assert info.value.response.status_code == 400
            assert orjson.loads(info.value.response.body)["error"]["param"] == "model"
            assert len(server.sessions) == 1
    run(scenario(), timeout=10)


# ---------------------------------------------------------------------------------------------
# §7.1 connect + session.update

@pytest.mark.parametrize("dialect", DIALECTS)
def test_session_update_returns_full_effective_session(dialect: str) -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(dialect_options(dialect)) as server:
            client = await open_dialect(server, dialect)
            await client.send({"type": "session.update", "event_id": "cli_1",
                               "session": session_patch(dialect, turn_detection=None, voice="echo")})
            updated = await client.expect("session.updated")
            session = updated["session"]
            assert "event_id" in updated and updated["event_id"] != "cli_1"
            if dialect == "ga":
                assert session["audio"]["input"]["turn_detection"] is None
                assert session["audio"]["output"]["voice"] == "echo"
                assert session["instructions"].startswith("Your knowledge cutoff")
                assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
            else:
                assert session["turn_detection"] is None and session["voice"] == "echo"
                assert session["output_audio_format"] == "pcm16" and session["temperature"] == 0.8
            mock = server.sessions[0]
            assert mock.config["audio"]["output"]["voice"] == "echo"
            assert [e["type"] for e in mock.received] == ["session.update"]
            assert mock.server_event_types() == ["session.created", "session.updated"]
    run(scenario(), timeout=10)


# ---------------------------------------------------------------------------------------------
# §7.2 text item + manual response

@pytest.mark.parametrize("dialect", DIALECTS)
def test_text_item_then_response_create(dialect: str) -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(dialect_options(dialect)) as server:
            client = await open_dialect(server, dialect)
            await client.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "hello there"}]}})
            events = [await client.recv() for _ in USER_ITEM_EVENTS[dialect]]
            assert [e["type"] for e in events] == USER_ITEM_EVENTS[dialect]
            user_item = events[0]["item"]
            assert user_item["status"] == "completed" and user_item["role"] == "user"
            assert events[0]["previous_item_id"] is None
            await client.send({"type": "response.create"})
            ladder = await client.recv_until("response.done")
            assert collapse([e["type"] for e in ladder]) == AUDIO_LADDER[dialect]
            created, done = ladder[0]["response"], ladder[-1]["response"]
            assert created["status"] == "in_progress" and created["output"] == [] and created["usage"] is None
            assert done["status"] == "completed" and done["status_details"] is None
            assert re.fullmatch(ID_PATTERN["resp"], done["id"])
            transcript_done = ladder[-5] if dialect == "ga" else ladder[-4]
            assert transcript_done["transcript"] == "You said: hello there"
            # a text turn is answered with a deterministic tone: 60 ms per transcript character
            audio = b64_audio(ladder)
            assert len(audio) == 48 * 60 * len("You said: hello there")
            assert audio == server.sessions[0].conversation.items()[1].audio
            part_added = ladder[3]["part"]
            assert part_added == {"type": "audio", "transcript": ""}
            final_item = done["output"][0]
            assert final_item["content"][0]["type"] == ("output_audio" if dialect == "ga" else "audio")
            assert final_item["content"][0]["transcript"] == "You said: hello there"
            assert done["usage"]["output_token_details"]["audio_tokens"] == len(audio) // 48 // 50
            # the added item comes right after output_item.added, in progress and empty
            assert ladder[2]["item"]["status"] == "in_progress" and ladder[2]["item"]["content"] == []
            assert ladder[2]["previous_item_id"] == user_item["id"]
    run(scenario(), timeout=10)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_text_modality_response(dialect: str) -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(dialect_options(dialect)) as server:
            client = await open_dialect(server, dialect)
            await update(client, dialect, text_only=True)
            await client.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}})
            await client.recv_until(USER_ITEM_EVENTS[dialect][-1])
            await client.send({"type": "response.create"})
            ladder = await client.recv_until("response.done")
            text = "response.output_text" if dialect == "ga" else "response.text"
            expected = ["response.created", "response.output_item.added", USER_ITEM_EVENTS[dialect][0],
                        "response.content_part.added", "<deltas>", "rate_limits.updated",
                        f"{text}.done", "response.content_part.done", "response.output_item.done"]
            expected += ["conversation.item.done"] if dialect == "ga" else []
            assert collapse([e["type"] for e in ladder]) == expected + ["response.done"]
            deltas = [e for e in ladder if e["type"] == f"{text}.delta"]
            assert "".join(d["delta"] for d in deltas) == "You said: hi"
            assert all(("obfuscation" in d) == (dialect == "ga") for d in deltas)
            assert ladder[3]["part"] == {"type": "text", "text": ""}
            content = ladder[-1]["response"]["output"][0]["content"][0]
            assert content == {"type": "output_text" if dialect == "ga" else "text", "text": "You said: hi"}
            assert b64_audio(ladder) == b""
    run(scenario(), timeout=10)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_response_create_voice_and_output_format_are_the_responses(dialect: str) -> None:
    """A response.create's own voice and output format (§4.2, §5.2) are that response's: shown
    in response.created and response.done (§4.5, §5.5), its audio spoken in that format (µ-law,
    8 bytes per ms; truncation counts in it too). The session keeps its own for the next one."""
    async def scenario() -> None:
        async with MockRealtimeServer(dialect_options(dialect)) as server:
            client = await open_dialect(server, dialect)
            await client.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}})
            await client.recv_until(USER_ITEM_EVENTS[dialect][-1])
            own = ({"audio": {"output": {"voice": "echo", "format": {"type": "audio/pcmu"}}}}
                   if dialect == "ga" else
                   {"voice": "echo", "output_audio_format": "g711_ulaw", "temperature": 0.7})
            await client.send({"type": "response.create", "response": own})
            ladder = await client.recv_until("response.done")
            assert collapse([e["type"] for e in ladder]) == AUDIO_LADDER[dialect]
            for shown in (ladder[0]["response"], ladder[-1]["response"]):
                if dialect == "ga":
                    assert shown["audio"] == {"output": {"format": {"type": "audio/pcmu"}, "voice": "echo"}}
                else:
                    assert (shown["voice"], shown["output_audio_format"], shown["temperature"]) == \
                        ("echo", "g711_ulaw", 0.7)
            # "You said: hi": 12 characters, 60 ms each, in µ-law
            assert b64_audio(ladder) == spoken_tone("You said: hi", "audio/pcmu", 440.0)
            assert len(b64_audio(ladder)) == 720 * 8
            item_id = ladder[-1]["response"]["output"][0]["id"]
            await client.send({"type": "conversation.item.truncate", "item_id": item_id,
                               "content_index": 0, "audio_end_ms": 720})
            assert (await client.expect("conversation.item.truncated"))["audio_end_ms"] == 720

            await client.send({"type": "response.create"})
            ladder = await client.recv_until("response.done")
            shown = ladder[-1]["response"]
            if dialect == "ga":
                assert shown["audio"] == {"output": {"format": {"type": "audio/pcm", "rate": 24000},
                                                     "voice": "alloy"}}
            else:
                assert (shown["voice"], shown["output_audio_format"], shown["temperature"]) == \
                    ("alloy", "pcm16", 0.8)
            assert b64_audio(ladder) == spoken_tone("You said: hi", "audio/pcm", 440.0)
    run(scenario(), timeout=10)


# ---------------------------------------------------------------------------------------------
# §7.3 server-VAD audio turn

@pytest.mark.parametrize("dialect", DIALECTS)
def test_server_vad_turn_full_order_with_transcription(dialect: str) -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(dialect_options(dialect)) as server:
            client = await open_dialect(server, dialect)
            await update(client, dialect, transcription={"model": "gpt-4o-mini-transcribe"})
            turn = pcm_silence(500) + pcm_tone(800) + pcm_silence(400)
            await client.append(turn)
            events = await client.recv_until("response.done")
            types = collapse([e["type"] for e in events])
            transcription = (["<transcription deltas>"] +
                             ["conversation.item.input_audio_transcription.completed"])
            types = [t for t in types if t != "conversation.item.input_audio_transcription.delta"]
            head = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                    "input_audio_buffer.committed"] + USER_ITEM_EVENTS[dialect]
            assert types == head + transcription[1:] + AUDIO_LADDER[dialect]
            started, stopped, committed = events[0], events[1], events[2]
            assert started["audio_start_ms"] == 200 and stopped["audio_end_ms"] == 1500
            assert started["item_id"] == stopped["item_id"] == committed["item_id"]
            assert committed["previous_item_id"] is None
            deltas = [e for e in events if e["type"].endswith("input_audio_transcription.delta")]
            completed = next(e for e in events if e["type"].endswith("transcription.completed"))
            assert "".join(d["delta"] for d in deltas) == completed["transcript"] == \
                "user audio turn 1: 1300 ms"
            assert completed["usage"]["type"] == "tokens"
            # the echo: exactly the committed slice [200, 1500) ms of what was appended
            assert b64_audio(events) == turn[200 * 48:1500 * 48]
            audio_deltas = [e for e in events if e["type"].endswith("audio.delta")]
            assert [len(base64.b64decode(d["delta"])) for d in audio_deltas] == [4800] * 13
            done = events[-1]["response"]
            assert done["usage"]["input_token_details"]["audio_tokens"] == 13
            assert done["usage"]["output_token_details"]["audio_tokens"] == 26
    run(scenario(), timeout=10)


# ---------------------------------------------------------------------------------------------
# §7.4 manual turns

@pytest.mark.parametrize("dialect", DIALECTS)
def test_manual_commit_then_response(dialect: str) -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(dialect_options(dialect, delta_ms=40)) as server:
            client = await open_dialect(server, dialect)
            await update(client, dialect, turn_detection=None)
            turn = pcm_tone(250)
            await client.append(turn)
            await client.send({"type": "input_audio_buffer.commit"})
            events = await client.recv_until(USER_ITEM_EVENTS[dialect][-1])
            assert [e["type"] for e in events] == ["input_audio_buffer.committed"] + USER_ITEM_EVENTS[dialect]
            item = events[1]["item"]
            assert item["content"] == [{"type": "input_audio", "transcript": None}]
            await client.send({"type": "response.create"})
            ladder = await client.recv_until("response.done")
            assert collapse([e["type"] for e in ladder]) == AUDIO_LADDER[dialect]
            assert b64_audio(ladder) == turn
            sizes = [len(base64.b64decode(e["delta"])) for e in ladder if e["type"].endswith("audio.delta")]
            assert sizes == [1920] * 6 + [480]  # 40 ms deltas, the last one shorter
            mock = server.sessions[0]
            assert "input_audio_buffer.speech_started" not in mock.server_event_types()
            await client.send({"type": "input_audio_buffer.append",
                               "audio": base64.b64encode(pcm_tone(50)).decode()})
            await client.send({"type": "input_audio_buffer.commit", "event_id": "c1"})
            error = (await client.expect("error"))["error"]
            assert error["message"] == ("Error committing input audio buffer: buffer too small. "
                                        "Expected at least 100ms of audio, but buffer only has "
                                        "50.00ms of audio.")
            await client.send({"type": "input_audio_buffer.clear"})
            await client.expect("input_audio_buffer.cleared")
            await client.send({"type": "input_audio_buffer.commit", "event_id": "c2"})
            error = (await client.expect("error"))["error"]
            assert error["code"] == "input_audio_buffer_commit_empty" and error["event_id"] == "c2"
            assert error["message"].endswith("but buffer only has 0.00ms of audio.")
    run(scenario(), timeout=10)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_max_output_tokens_cuts_the_reply_inside_a_delta(dialect: str) -> None:
    """A 2 s echo under a 9-token cap: 100 ms deltas cost 2 tokens each, the transcript's first
    word ("echo ", 2 tokens) rides on the fifth delta; so four whole deltas (8 tokens), then
    50 ms of the fifth and no text, message and response "incomplete" (max_output_tokens). The
    response's own cap overrides the session's; a bad one is an error naming it."""
    async def scenario() -> None:
        async with MockRealtimeServer(dialect_options(dialect, delta_ms=100)) as server:
            client = await open_dialect(server, dialect)
            cap_key = "max_output_tokens" if dialect == "ga" else "max_response_output_tokens"
            patch = session_patch(dialect, turn_detection=None)
            patch[cap_key] = 9
            await client.send({"type": "session.update", "session": patch})
            assert (await client.expect("session.updated"))["session"][cap_key] == 9
            turn = pcm_tone(2000)
            await client.append(turn)
            await client.send({"type": "input_audio_buffer.commit"})
            await client.recv_until(USER_ITEM_EVENTS[dialect][-1])
            await client.send({"type": "response.create"})
            ladder = await client.recv_until("response.done")
            assert collapse([e["type"] for e in ladder]) == AUDIO_LADDER[dialect]
            assert b64_audio(ladder) == turn[:450 * 48]
            assert not [e for e in ladder if "transcript.delta" in e["type"]]
            done = ladder[-1]["response"]
            assert done["status"] == "incomplete"
            assert done["status_details"] == {"type": "incomplete", "reason": "max_output_tokens"}
            assert done["output"][0]["status"] == "incomplete"
            assert done["usage"]["output_tokens"] == 9
            assert done["usage"]["output_token_details"] == {"text_tokens": 0, "audio_tokens": 9}

            await client.send({"type": "response.create", "response": {cap_key: "inf"}})
            ladder = await client.recv_until("response.done")
            done = ladder[-1]["response"]
            assert done["status"] == "completed" and done["max_output_tokens"] == "inf"
            assert b64_audio(ladder) == turn

            await client.send({"type": "response.create", "response": {cap_key: 0}})
            error = (await client.expect("error"))["error"]
            assert error["param"] == f"response.{cap_key}"
    run(scenario(), timeout=10)


# ---------------------------------------------------------------------------------------------
# §7.5 function calling

WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]}}


@pytest.mark.parametrize("dialect", DIALECTS)
def test_function_call_flow(dialect: str) -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(dialect_options(dialect)) as server:
            client = await open_dialect(server, dialect)
            await update(client, dialect, tools=[WEATHER_TOOL])
            await client.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "please get_weather for me"}]}})
            await client.recv_until(USER_ITEM_EVENTS[dialect][-1])
            await client.send({"type": "response.create"})
            ladder = await client.recv_until("response.done")
            expected = ["response.created", "response.output_item.added", USER_ITEM_EVENTS[dialect][0],
                        "<deltas>", "rate_limits.updated", "response.function_call_arguments.done",
                        "response.output_item.done"]
            expected += ["conversation.item.done"] if dialect == "ga" else []
            assert collapse([e["type"] for e in ladder]) == expected + ["response.done"]
            added = ladder[1]["item"]
            assert added["type"] == "function_call" and added["arguments"] == "" and added["status"] == "in_progress"
            assert re.fullmatch(ID_PATTERN["call"], added["call_id"])
            deltas = [e for e in ladder if e["type"] == "response.function_call_arguments.delta"]
            arguments = "".join(d["delta"] for d in deltas)
            assert orjson.loads(arguments) == {"city": "city 1"} and len(deltas) > 1
            assert all(d["call_id"] == added["call_id"] for d in deltas)
            args_done = next(e for e in ladder if e["type"] == "response.function_call_arguments.done")
            assert args_done["arguments"] == arguments
            final = ladder[-1]["response"]
            assert final["status"] == "completed"
            assert final["output"][0]["status"] == "completed" and final["output"][0]["arguments"] == arguments
            # the arguments are text the model wrote: they count as output text tokens
            assert final["usage"]["output_token_details"]["text_tokens"] == len(arguments) // 4 + 1
            # a wrong call id is refused, the right one accepted, then the answer is spoken
            await client.send({"type": "conversation.item.create", "event_id": "bad", "item": {
                "type": "function_call_output", "call_id": "call_nope", "output": "{}"}})
            error = (await client.expect("error"))["error"]
            assert error["code"] == "invalid_tool_call_id" and error["event_id"] == "bad"
            assert error["message"] == "Tool call ID 'call_nope' not found in conversation."
            await client.send({"type": "conversation.item.create", "item": {
                "type": "function_call_output", "call_id": added["call_id"], "output": '{"temp_c":18}'}})
            await client.recv_until(USER_ITEM_EVENTS[dialect][-1])
            await client.send({"type": "response.create"})
            spoken = await client.recv_until("response.done")
            assert collapse([e["type"] for e in spoken]) == AUDIO_LADDER[dialect]
            transcript = spoken[-1]["response"]["output"][0]["content"][0]["transcript"]
            assert transcript == 'The get_weather function returned {"temp_c":18}'
    run(scenario(), timeout=10)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_response_create_tools_and_tool_choice_are_the_responses(dialect: str) -> None:
    """A response.create's own `tools` and `tool_choice` (§4.2, §5.2) replace the session's for
    that response: "required" calls a tool the session does not have; "none", or `tools` [],
    never calls one, even when the text names a session tool; then the session's apply again."""
    async def say(client: RawClient, text: str) -> None:
        await client.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
        await client.recv_until(USER_ITEM_EVENTS[dialect][-1])

    async def output_of(client: RawClient, own: Optional[dict[str, Any]]) -> list[tuple[str, Any]]:
        await client.send({"type": "response.create", **({"response": own} if own else {})})
        done = (await client.recv_until("response.done"))[-1]["response"]
        assert done["status"] == "completed"
        return [(item["type"], item.get("name")) for item in done["output"]]

    async def scenario() -> None:
        async with MockRealtimeServer(dialect_options(dialect)) as server:
            client = await open_dialect(server, dialect)
            await say(client, "hello")
            assert await output_of(client, {"tools": [WEATHER_TOOL], "tool_choice": "required"}) == \
                [("function_call", "get_weather")]
            assert await output_of(client, None) == [("message", None)]  # the session has none
            await update(client, dialect, tools=[WEATHER_TOOL])
            await say(client, "please get_weather for me")
            assert await output_of(client, {"tool_choice": "none"}) == [("message", None)]
            assert await output_of(client, {"tools": []}) == [("message", None)]
            assert await output_of(client, None) == [("function_call", "get_weather")]
    run(scenario(), timeout=10)


def test_a_text_naming_two_tools_gets_two_calls_in_one_response() -> None:
    """As OpenAI may: one response, two function-call items (output_index 0 and 1), in the order
    the tools were named, each with its own call id."""
    time_tool = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}

    async def scenario() -> None:
        async with MockRealtimeServer() as server:
            client = await open_dialect(server, "ga")
            await update(client, "ga", tools=[WEATHER_TOOL, time_tool])
            await client.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "get_time first, then get_weather"}]}})
            await client.recv_until("conversation.item.done")
            await client.send({"type": "response.create"})
            ladder = await client.recv_until("response.done")
            added = [e for e in ladder if e["type"] == "response.output_item.added"]
            assert [(e["output_index"], e["item"]["name"]) for e in added] == [(0, "get_time"), (1, "get_weather")]
            output = ladder[-1]["response"]["output"]
            assert [item["name"] for item in output] == ["get_time", "get_weather"]
            assert len({item["call_id"] for item in output}) == 2
    run(scenario(), timeout=10)


def test_function_call_every_nth_audio_turn() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(MockOptions(function_every_n_audio_turns=2)) as server:
            client = await open_dialect(server, "ga")
            await update(client, "ga", tools=[WEATHER_TOOL])
            kinds = []
            for _ in range(2):
                await client.append(pcm_silence(100) + pcm_tone(300) + pcm_silence(300))
                done = (await client.recv_until("response.done"))[-1]["response"]
                kinds.append(done["output"][0]["type"])
            assert kinds == ["message", "function_call"]
    run(scenario(), timeout=10)


# ---------------------------------------------------------------------------------------------
# §7.6 barge-in and cancel

@pytest.mark.parametrize("dialect", DIALECTS)
def test_barge_in_cancels_with_turn_detected_then_truncate(dialect: str) -> None:
    async def scenario() -> None:
        options = dialect_options(dialect, pacing="realtime", delta_ms=50)
        async with MockRealtimeServer(options) as server:
            client = await open_dialect(server, dialect)
            await client.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "tell me a long story please"}]}})
            await client.recv_until(USER_ITEM_EVENTS[dialect][-1])
            await client.send({"type": "response.create"})
            audio_type = "response.output_audio.delta" if dialect == "ga" else "response.audio.delta"
            received: list[dict[str, Any]] = []
            while sum(e["type"] == audio_type for e in received) < 4:
                received.append(await client.recv())
            # the user talks over the reply
            await client.append(pcm_tone(100))
            rest = await client.recv_until("response.done")
            types = [e["type"] for e in rest]
            start = types.index("input_audio_buffer.speech_started")
            closing = collapse(types[start + 1:])
            if dialect == "ga":
                assert closing == ["response.output_audio.done", "response.output_audio_transcript.done",
                                   "response.content_part.done", "response.output_item.done",
                                   "conversation.item.done", "response.done"]
            else:
                assert closing == ["response.audio.done", "response.audio_transcript.done",
                                   "response.content_part.done", "response.output_item.done",
                                   "response.done"]
            done = rest[-1]["response"]
            assert done["status"] == "cancelled"
            assert done["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
            streamed = received + rest[:start]
            heard = b64_audio(streamed)
            full_ms = 60 * len("You said: tell me a long story please")
            assert 0 < len(heard) < full_ms * 48
            transcript = "".join(e["delta"] for e in streamed if e["type"].endswith("transcript.delta"))
            item = done["output"][0]
            assert item["status"] == "incomplete" and item["content"][0]["transcript"] == transcript
            assert "You said: tell me a long story please".startswith(transcript)
            # truncate: validated against the audio actually generated for that item
            heard_ms = len(heard) // 48
            await client.send({"type": "conversation.item.truncate", "event_id": "t1",
                               "item_id": item["id"], "content_index": 0, "audio_end_ms": heard_ms + 500})
            error = (await client.recv_until("error"))[-1]["error"]
            assert error["message"] == f"Audio content of {heard_ms}ms is already shorter than {heard_ms + 500}ms"
            assert error["event_id"] == "t1"
            await client.send({"type": "conversation.item.truncate", "item_id": item["id"],
                               "content_index": 0, "audio_end_ms": heard_ms - 20})
            truncated = (await client.recv_until("conversation.item.truncated"))[-1]
            assert truncated["audio_end_ms"] == heard_ms - 20 and truncated["item_id"] == item["id"]
            mock = server.sessions[0]
            sent = await mock.wait_for_client_event("conversation.item.truncate")
            assert sent["audio_end_ms"] == heard_ms + 500
            assert len(mock.conversation.get(item["id"]).audio) == (heard_ms - 20) * 48
    run(scenario(), timeout=15)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_client_cancel_and_cancel_not_active(dialect: str) -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(dialect_options(dialect, pacing="realtime")) as server:
            client = await open_dialect(server, dialect)
            await update(client, dialect, turn_detection=None)
            await client.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "x" * 40}]}})
            await client.recv_until(USER_ITEM_EVENTS[dialect][-1])
            await client.send({"type": "response.create"})
            created = await client.expect("response.created")
            await client.send({"type": "response.create", "event_id": "second"})
            error = (await client.recv_until("error"))[-1]["error"]
            assert error == {
                "type": "invalid_request_error", "code": "conversation_already_has_active_response",
                "message": f"Conversation already has an active response in progress: "
                           f"{created['response']['id']}. Wait until the response is finished "
                           f"before creating a new one.", "param": None, "event_id": "second"}
            await client.send({"type": "response.cancel"})
            rest = await client.recv_until("response.done")
            done = rest[-1]["response"]
            assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
            assert sum(e["type"] == "response.created" for e in client.events) == 1
            await client.send({"type": "response.cancel", "event_id": "late"})
            error = (await client.expect("error"))["error"]
            assert error["code"] == "response_cancel_not_active" and error["event_id"] == "late"
            assert error["message"] == "Cancellation failed: no active response found"
    run(scenario(), timeout=10)


# ---------------------------------------------------------------------------------------------
# §7.7 failure inside a response

@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("failure", ["rate_limit_exceeded", "server_error"])
def test_failed_response_done(dialect: str, failure: str) -> None:
    async def scenario() -> None:
        options = dialect_options(dialect, fail_responses=failure, fail_every_n=2)
        async with MockRealtimeServer(options) as server:
            client = await open_dialect(server, dialect)
            statuses = []
            for _ in range(2):
                await client.send({"type": "response.create"})
                ladder = await client.recv_until("response.done")
                statuses.append(ladder[-1]["response"]["status"])
            assert statuses == ["completed", "failed"]
            assert [e["type"] for e in ladder] == ["response.created", "response.done"]
            done = ladder[-1]["response"]
            error = done["status_details"]["error"]
            assert done["status_details"]["type"] == "failed" and done["output"] == []
            assert done["usage"]["total_tokens"] == 0
            if failure == "rate_limit_exceeded":
                assert error["code"] == "rate_limit_exceeded" and error["type"] == "tokens"
                assert error["message"].startswith("Rate limit reached for gpt-realtime")
            else:
                assert error["type"] == "server_error" and error["code"] is None
                assert server.sessions[0].id in error["message"]
    run(scenario(), timeout=10)


# ---------------------------------------------------------------------------------------------
# conversation item management

@pytest.mark.parametrize("dialect", DIALECTS)
def test_item_placement_retrieve_delete(dialect: str) -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(dialect_options(dialect)) as server:
            client = await open_dialect(server, dialect)
            last = USER_ITEM_EVENTS[dialect][-1]

            async def create(item: dict[str, Any], previous: Optional[str] = None) -> dict[str, Any]:
                event: dict[str, Any] = {"type": "conversation.item.create", "item": item}
                if previous is not None:
                    event["previous_item_id"] = previous
                await client.send(event)
                return (await client.recv_until(last))[0]

            first = await create({"id": "item_a", "type": "message", "role": "user",
                                  "content": [{"type": "input_text", "text": "a"}]})
            assert first["previous_item_id"] is None
            second = await create({"id": "item_b", "type": "message", "role": "system",
                                   "content": [{"type": "input_text", "text": "b"}]}, previous="root")
            assert second["previous_item_id"] is None
            audio = pcm_tone(120)
            third = await create({"id": "item_c", "type": "message", "role": "user", "content": [
                {"type": "input_audio", "audio": base64.b64encode(audio).decode()}]}, previous="item_b")
            assert third["previous_item_id"] == "item_b"
            assert "audio" not in third["item"]["content"][0]
            assert [i.id for i in server.sessions[0].conversation.items()] == ["item_b", "item_c", "item_a"]
            await client.send({"type": "conversation.item.retrieve", "item_id": "item_c"})
            retrieved = (await client.expect("conversation.item.retrieved"))["item"]
            assert base64.b64decode(retrieved["content"][0]["audio"]) == audio
            if dialect == "beta":
                assert retrieved["object"] == "realtime.item"
            await client.send({"type": "conversation.item.delete", "item_id": "item_a"})
            assert (await client.expect("conversation.item.deleted"))["item_id"] == "item_a"
            assert [i.id for i in server.sessions[0].conversation.items()] == ["item_b", "item_c"]
            # the response answers the newest input: the client-supplied audio, echoed
            await client.send({"type": "response.create", "response": {"metadata": {"k": "v"}}})
            ladder = await client.recv_until("response.done")
            assert b64_audio(ladder) == audio
            assert ladder[-1]["response"]["metadata"] == {"k": "v"}
    run(scenario(), timeout=10)


def test_a_long_conversation_keeps_only_its_newest_audio_in_memory() -> None:
    """Found by a long-conversation audit: the mock kept every turn's audio and its echo (1,500
    turns: 7 MB; an hour's talk ~170 MB each way per session). Now it keeps the newest
    KEPT_AUDIO_BYTES, and an older item keeps its length: usage still counts it, it truncates
    and refuses a too-long truncate as before; only a retrieve returns it without audio."""
    from gateway.mock.conversation import KEPT_AUDIO_BYTES

    turn_ms, turns = 8000, 6  # 384 KB a turn, as much again for its echo: 4.6 MB in all

    async def scenario() -> None:
        async with MockRealtimeServer(MockOptions(delta_ms=1000)) as server:
            client = await open_dialect(server, "ga")
            await update(client, "ga", turn_detection=None)
            turns_audio = [pcm_tone(turn_ms, hz=300 + 100 * index) for index in range(turns)]
            replies = []
            for audio in turns_audio:
                await client.send({"type": "conversation.item.create", "item": {
                    "type": "message", "role": "user",
                    "content": [{"type": "input_audio", "audio": base64.b64encode(audio).decode()}]}})
                await client.send({"type": "response.create"})
                ladder = await client.recv_until("response.done", timeout=10)
                assert b64_audio(ladder) == audio  # the echo, whole: the newest audio is kept
                replies.append(ladder[-1]["response"])
            items = server.sessions[0].conversation.items()
            # (the last reply's audio came after its item: it counts from the next one on)
            assert sum(len(item.audio) for item in items[:-1]) <= KEPT_AUDIO_BYTES
            assert [item.audio_bytes for item in items] == [turn_ms * 48] * (2 * turns)
            # usage: every user turn of the context, forgotten or not (10 tokens a second)
            details = replies[-1]["usage"]["input_token_details"]
            assert details["audio_tokens"] == turns * turn_ms // 100
            first_user, first_reply = items[0], items[1]
            assert not first_reply.audio  # let go of
            await client.send({"type": "conversation.item.truncate", "item_id": first_reply.id,
                               "content_index": 0, "audio_end_ms": turn_ms + 1, "event_id": "t1"})
            error = (await client.expect("error"))["error"]
            assert error["message"] == f"Audio content of {turn_ms}ms is already shorter than {turn_ms + 1}ms"
            await client.send({"type": "conversation.item.truncate", "item_id": first_reply.id,
                               "content_index": 0, "audio_end_ms": 1500})
            assert (await client.expect("conversation.item.truncated"))["audio_end_ms"] == 1500
            assert first_reply.audio_bytes == 1500 * 48
            await client.send({"type": "conversation.item.retrieve", "item_id": first_user.id})
            retrieved = (await client.expect("conversation.item.retrieved"))["item"]
            assert retrieved["id"] == first_user.id and "audio" not in retrieved["content"][0]
    run(scenario(), timeout=30)


def test_the_audio_kept_includes_the_turn_being_answered_and_a_reply_still_streaming() -> None:
    """Review of the bound above: with the newest items' audio kept by order alone, a 12 s turn
    answered in 2 s items lost its audio to its own reply (its late transcription failed, a
    second reply did not echo it), and a reply item that streamed while big items arrived lost
    its first second (a valid truncate refused, retrieve gave the tail as the whole). The turn
    a reply answers (by the conversation's order, not the newest added) and a reply still
    streaming keep theirs; a late transcript is heard at the commit."""
    async def scenario() -> None:
        options = MockOptions(reply_item_ms=2000, transcription_delay_ms=300)
        async with MockRealtimeServer(options) as server:
            client = await open_dialect(server, "ga")
            await update(client, "ga", turn_detection=None, transcription={"model": "whisper-1"})
            turn = pcm_tone(12000, hz=300)  # 576 KB, and as much in its six reply items
            await client.append(turn, chunk_bytes=48000)
            await client.send({"type": "input_audio_buffer.commit"})
            await client.send({"type": "response.create"})
            first = await client.recv_until("response.done", timeout=10)
            late = await client.recv_until("conversation.item.input_audio_transcription.completed")
            assert late[-1]["transcript"] == "user audio turn 1: 12000 ms"
            await client.send({"type": "response.create"})
            second = await client.recv_until("response.done", timeout=10)
            assert b64_audio(first) == b64_audio(second) == turn

        async with MockRealtimeServer(MockOptions(pacing="realtime")) as server:
            client = await open_dialect(server, "ga")
            await update(client, "ga", turn_detection=None)
            turn = pcm_tone(1500, hz=350)
            await client.append(turn, chunk_bytes=48000)
            await client.send({"type": "input_audio_buffer.commit"})
            await client.send({"type": "response.create"})
            streamed = await client.recv_until("response.output_audio.delta")
            reply_id = streamed[-1]["item_id"]
            for hz in (500, 600):  # 1.2 MB of newer audio while the reply streams
                await client.send({"type": "conversation.item.create", "item": {
                    "type": "message", "role": "user", "content": [
                        {"type": "input_audio", "audio": base64.b64encode(pcm_tone(12500, hz=hz)).decode()}]}})
            streamed += await client.recv_until("response.done", timeout=10)
            assert b64_audio(streamed) == turn
            await client.send({"type": "conversation.item.retrieve", "item_id": reply_id})
            retrieved = await client.recv_until("conversation.item.retrieved")
            assert base64.b64decode(retrieved[-1]["item"]["content"][0]["audio"]) == turn

        # a second review: the newest added turn is not always the one answered (one inserted at
        # the root is newer, and answers nothing)
        async with MockRealtimeServer(MockOptions()) as server:
            client = await open_dialect(server, "ga")
            await update(client, "ga", turn_detection=None)
            turn = pcm_tone(15000, hz=300)
            await client.append(turn, chunk_bytes=48000)
            await client.send({"type": "input_audio_buffer.commit"})
            await client.recv_until("input_audio_buffer.committed")
            await client.send({"type": "conversation.item.create", "previous_item_id": "root", "item": {
                "type": "message", "role": "user", "content": [
                    {"type": "input_audio", "audio": base64.b64encode(pcm_tone(8000, hz=500)).decode()}]}})
            await client.recv_until("conversation.item.added")
            await client.send({"type": "response.create"})
            assert b64_audio(await client.recv_until("response.done", timeout=15)) == turn
    run(scenario(), timeout=30)


# ---------------------------------------------------------------------------------------------
# standalone: `realtime-gateway mock`

@pytest.mark.parametrize("launcher", [("gateway", "mock"), ("gateway.mock",)], ids=["gateway-mock", "gateway.mock"])
def test_standalone_cli_serves_and_stops_on_sigterm(launcher) -> None:
    """`python -m gateway mock` (the console script's command) and `python -m gateway.mock`."""
    import os
    import signal
    import subprocess
    import sys

    process = subprocess.Popen(
        [sys.executable, "-m", *launcher, "--host", "127.0.0.1", "--port", "0",
         "--api-key", KEY, "--beta", "serve", "--delta-ms", "50"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # printed once listening
        match = re.search(r"ws://127\.0\.0\.1:(\d+)/v1/realtime", line)
        assert match, line
        port = int(match.group(1))

        async def scenario() -> None:
            ws = await connect(f"ws://127.0.0.1:{port}{GA_PATH}",
                               additional_headers={"Authorization": f"Bearer {KEY}", **BETA_HEADERS})
            client = RawClient(ws)
            await client.expect("session.created")
            await client.send({"type": "response.create"})
            ladder = await client.recv_until("response.done")
            assert "response.audio.delta" in [e["type"] for e in ladder]  # beta served
            sizes = [len(base64.b64decode(e["delta"])) for e in ladder
                     if e["type"] == "response.audio.delta"]
            # "Hello, how can I help?" = 22 chars = 1320 ms of tone in 50 ms deltas (--delta-ms)
            assert sizes == [2400] * 26 + [960]
            process.send_signal(signal.SIGTERM)
            assert (await client.closed())[0] == 1001
        run(scenario(), timeout=10)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def test_the_standalone_mock_refuses_values_that_cannot_work_with_one_line():
    """Found by an operations audit: `mock --port 99999` listened on 34463 (the port wrapped),
    a port in use or a host that does not resolve ended in a traceback, and nonsense delays
    (-1 s, nan) started a mock that would misbehave. Each is now one line and exit code 2, as
    the node does, naming the flag."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = {
            ("--port", "99999"): "--port must be 0-65535, got 99999",
            ("--port", str(port)): f"cannot listen on 127.0.0.1:{port}: Address already in use",
            ("--handshake-delay-s", "-1"): "--handshake-delay-s must be a number of seconds >= 0",
            ("--session-max-s", "nan"): "--session-max-s must be a number of seconds > 0",
            ("--close-after-s", "0"): "--close-after-s must be a number of seconds > 0",
            ("--close-after-events", "0"): "--close-after-events must be >= 1",
            ("--text-tone-hz", "20000"): "--text-tone-hz must be above 0 and below 12000",
            ("--delta-ms", "0"): "--delta-ms must be > 0",
        }
        runs = {args: subprocess.Popen([sys.executable, "-m", "gateway", "mock", "--host", "127.0.0.1", *args],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for args in cases}
        try:
            for args, complaint in cases.items():
                stdout, stderr = runs[args].communicate(timeout=30)
                assert (runs[args].returncode, stdout, stderr) == (2, "", f"realtime-gateway mock: {complaint}\n")
        finally:
            for process in runs.values():
                if process.poll() is None:
                    process.kill()
                    process.wait()
