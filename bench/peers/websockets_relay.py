"""Benchmark peer: a typical Python relay of the /realtime client protocol, written the way most
people write one — the `websockets` library for both legs, `json`, `base64`, asyncio, one task
per direction. It is a competent implementation (no per-frame logging, no needless copies beyond
what these libraries do), not a strawman: bench/relay.py compares our gateway against it.

Protocol subset (SPEC §2, the part the benchmark exercises):
  - on connect, open the upstream (`?model=` or the default model) with the API key from
    OPENAI_API_KEY, send a GA `session.update`, wait for `session.updated`, then send
    `{"type":"ready","session_id":...}` to the client;
  - client binary frame (PCM16 24 kHz) -> `input_audio_buffer.append` (base64);
  - client `config` -> `session.update` (voice, instructions, turn detection); `commit`,
    `create_response`, `cancel_response`, `clear_audio` -> the matching upstream events;
  - upstream `response.output_audio.delta` -> binary frame to the client;
    `response.output_audio_transcript.delta` -> `{"type":"transcript","role":"assistant",...}`;
    input transcription -> user transcripts; VAD events -> speech_started/stopped; `error` ->
    `{"type":"error",...}`.

    OPENAI_API_KEY=test-key-bench python bench/peers/websockets_relay.py --port 3021 \
        --upstream-url ws://127.0.0.1:3002/v1/realtime
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

DEFAULT_MODEL = "gpt-realtime"

SESSION_DEFAULTS = {
    "type": "realtime",
    "output_modalities": ["audio"],
    "audio": {
        "input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                               "silence_duration_ms": 500},
        },
        "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy"},
    },
}

SIMPLE_COMMANDS = {
    "commit": {"type": "input_audio_buffer.commit"},
    "create_response": {"type": "response.create"},
    "cancel_response": {"type": "response.cancel"},
    "clear_audio": {"type": "input_audio_buffer.clear"},
}


def session_from_config(config: dict) -> dict:
    """Map the client's `config` message onto a GA session.update payload."""
    session = {"type": "realtime"}
    if "instructions" in config:
        session["instructions"] = config["instructions"]
    audio: dict = {}
    if "voice" in config:
        audio["output"] = {"voice": config["voice"]}
    mode = config.get("turn_detection")
    if mode is not None:
        vad = config.get("vad") or {}
        if mode == "none":
            detection = None
        else:
            detection = {"type": mode}
            if mode == "server_vad":
                for key in ("threshold", "prefix_padding_ms", "silence_duration_ms"):
                    if key in vad:
                        detection[key] = vad[key]
        audio["input"] = {"turn_detection": detection}
    if audio:
        session["audio"] = audio
    return session


async def client_to_upstream(client, upstream) -> None:
    async for message in client:
        if isinstance(message, bytes):
            await upstream.send(json.dumps({
                "type": "input_audio_buffer.append",
                "audio": base64.b64encode(message).decode("ascii"),
            }))
            continue
        try:
            command = json.loads(message)
        except json.JSONDecodeError:
            await client.send(json.dumps({"type": "error", "code": "InvalidMessage", "message": "invalid JSON"}))
            continue
        kind = command.get("type")
        if kind == "config":
            await upstream.send(json.dumps({"type": "session.update", "session": session_from_config(command)}))
        elif kind in SIMPLE_COMMANDS:
            await upstream.send(json.dumps(SIMPLE_COMMANDS[kind]))
        elif kind == "text":
            await upstream.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": command.get("text", "")}]}}))
            if command.get("respond", True):
                await upstream.send(json.dumps({"type": "response.create"}))
        elif isinstance(kind, str) and "." in kind:
            await upstream.send(message)


async def upstream_to_client(upstream, client) -> None:
    async for message in upstream:
        event = json.loads(message)
        kind = event.get("type")
        if kind == "response.output_audio.delta":
            await client.send(base64.b64decode(event["delta"]))
        elif kind == "response.output_audio_transcript.delta":
            await client.send(json.dumps({
                "type": "transcript", "role": "assistant", "text": event.get("delta", ""),
                "is_final": False, "item_id": event.get("item_id"), "response_id": event.get("response_id"),
            }))
        elif kind == "conversation.item.input_audio_transcription.completed":
            await client.send(json.dumps({
                "type": "transcript", "role": "user", "text": event.get("transcript", ""),
                "is_final": True, "item_id": event.get("item_id"),
            }))
        elif kind == "input_audio_buffer.speech_started":
            await client.send(json.dumps({"type": "speech_started", "audio_ms": event.get("audio_start_ms")}))
        elif kind == "input_audio_buffer.speech_stopped":
            await client.send(json.dumps({"type": "speech_stopped", "audio_ms": event.get("audio_end_ms")}))
        elif kind == "error":
            error = event.get("error") or {}
            await client.send(json.dumps({"type": "error", "code": "UpstreamError",
                                          "message": error.get("message", ""), "fatal": False}))


async def relay(client, upstream_url: str, api_key: str) -> None:
    query = parse_qs(urlsplit(client.request.path).query)
    model = query.get("model", [DEFAULT_MODEL])[0]
    try:
        upstream = await connect(f"{upstream_url}?model={model}",
                                 additional_headers={"Authorization": f"Bearer {api_key}"},
                                 open_timeout=10)
    except (OSError, asyncio.TimeoutError, ConnectionClosed) as exc:
        await client.send(json.dumps({"type": "error", "code": "ConnectionFailed", "message": str(exc), "fatal": True}))
        await client.close(1011, "upstream connection failed")
        return
    async with upstream:
        await upstream.send(json.dumps({"type": "session.update", "session": SESSION_DEFAULTS}))
        session_id = None
        async for message in upstream:
            event = json.loads(message)
            if event.get("type") in ("session.created", "session.updated"):
                session_id = event["session"].get("id")
                if event["type"] == "session.updated":
                    break
            elif event.get("type") == "error":
                await client.send(json.dumps({"type": "error", "code": "UpstreamError",
                                              "message": event["error"].get("message", ""), "fatal": True}))
                await client.close(1011, "upstream error")
                return
        await client.send(json.dumps({"type": "ready", "session_id": session_id}))

        tasks = [asyncio.create_task(client_to_upstream(client, upstream)),
                 asyncio.create_task(upstream_to_client(upstream, client))]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() and not isinstance(task.exception(), ConnectionClosed):
                raise task.exception()
    await client.close()


async def main_async(host: str, port: int, upstream_url: str, api_key: str) -> None:
    async def handler(client):
        await relay(client, upstream_url, api_key)

    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(handler, host, port):
        print(f"websockets_relay listening on {host}:{port}", flush=True)
        await stop


def main() -> None:
    parser = argparse.ArgumentParser(description="typical websockets-library relay (benchmark peer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3021)
    parser.add_argument("--upstream-url", default="wss://api.openai.com/v1/realtime")
    args = parser.parse_args()
    api_key = os.environ.get("OPENAI_API_KEY")
    if not api_key:
        parser.error("OPENAI_API_KEY is not set")
    asyncio.run(main_async(args.host, args.port, args.upstream_url, api_key))


if __name__ == "__main__":
    main()
