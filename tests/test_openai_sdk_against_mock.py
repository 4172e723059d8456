"""The official `openai` SDK's realtime client against the mock (issue 2, done-means 2).

If OpenAI's own client connects, updates the session, streams audio and gets transcription, the
full response ladder and the echoed audio back, all parsed into its typed models (not its
fallback), then the mock speaks what real clients expect.
"""
from __future__ import annotations

import base64
import typing
from typing import Any

from openai import AsyncOpenAI
from openai.types.realtime import RealtimeServerEvent

from gateway.mock import MockOptions, MockRealtimeServer
from tests.support import run
from tests.test_mock_upstream import GA_AUDIO_LADDER, collapse, pcm_silence, pcm_tone


def _server_event_classes() -> dict[str, type]:
    """Event type string -> the SDK model class of the `RealtimeServerEvent` union that
    declares it. (The SDK parses without validation and falls back to an arbitrary union member
    for types it does not know, so "parsed into the right class" is checked by this map.)"""
    union = typing.get_args(RealtimeServerEvent)[0]  # Annotated[Union[...], discriminator]
    classes: dict[str, type] = {}
    for cls in typing.get_args(union):
        for literal in typing.get_args(cls.model_fields["type"].annotation):
            classes[literal] = cls
    return classes


def test_openai_sdk_connects_streams_and_gets_echo() -> None:
    known_classes = _server_event_classes()
    assert len(known_classes) > 30

    async def scenario() -> None:
        async with MockRealtimeServer(MockOptions(api_keys={"test-key-1"})) as server:
            client = AsyncOpenAI(api_key="test-key-1", base_url=f"http://127.0.0.1:{server.port}/v1")
            async with client.realtime.connect(model="gpt-realtime") as connection:
                first = await connection.recv()
                assert type(first).__name__ == "SessionCreatedEvent"
                await connection.session.update(session={
                    "type": "realtime",
                    "instructions": "Echo me.",
                    "audio": {"input": {"transcription": {"model": "gpt-4o-mini-transcribe"}}},
                })
                updated = await connection.recv()
                assert updated.type == "session.updated"
                assert updated.session.audio.input.transcription.model == "gpt-4o-mini-transcribe"
                assert updated.session.instructions == "Echo me."

                signal = pcm_silence(600) + pcm_tone(1200, dbfs=-18) + pcm_silence(500)
                for start in range(0, len(signal), 960):  # 20 ms appends, like a real client
                    await connection.input_audio_buffer.append(
                        audio=base64.b64encode(signal[start:start + 960]).decode())

                events: list[Any] = []
                while True:
                    event = await connection.recv()
                    events.append(event)
                    assert type(event) is known_classes.get(event.type), (event.type, type(event).__name__)
                    if event.type == "response.done":
                        break
                    assert len(events) < 500
                types = [event.type for event in events]

                # VAD turn (§7.3): prefix padding 300 ms, silence 200 ms
                assert types[:3] == ["input_audio_buffer.speech_started",
                                     "input_audio_buffer.speech_stopped",
                                     "input_audio_buffer.committed"]
                assert events[0].audio_start_ms == 300 and events[1].audio_end_ms == 2000
                user_item_id = events[2].item_id
                transcripts = [e for e in events
                               if e.type == "conversation.item.input_audio_transcription.completed"]
                assert len(transcripts) == 1 and transcripts[0].item_id == user_item_id
                assert transcripts[0].transcript == "user audio turn 1: 1700 ms"
                response_part = types[types.index("response.created"):]
                assert collapse(response_part) == GA_AUDIO_LADDER
                echoed = b"".join(base64.b64decode(e.delta) for e in events
                                  if e.type == "response.output_audio.delta")
                assert echoed == signal[300 * 48:2000 * 48]
                done = events[-1].response
                assert done.status == "completed"
                assert done.output[0].content[0].transcript == "echo of 1700 ms"
                assert done.usage.output_token_details.audio_tokens == 34
                assert server.sessions[0].received[0]["session"]["instructions"] == "Echo me."
    run(scenario(), timeout=20)
