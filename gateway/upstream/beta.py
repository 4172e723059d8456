"""The beta dialect (`OpenAI-Beta: realtime=v1`; Azure preview, older compatible servers): a flat
session object and the pre-GA event names, renamed here into the internal (GA) model."""
from __future__ import annotations

from typing import Any

from gateway.client_protocol import AUDIO_FORMATS, SessionConfig
from gateway.upstream.dialect import UpstreamDialect, as_object, as_text, turn_detection_mode, turn_detection_object

#: beta server event type -> internal (GA) event type
EVENT_NAMES = {
    "response.audio.delta": "response.output_audio.delta",
    "response.audio.done": "response.output_audio.done",
    "response.audio_transcript.delta": "response.output_audio_transcript.delta",
    "response.audio_transcript.done": "response.output_audio_transcript.done",
    "response.text.delta": "response.output_text.delta",
    "response.text.done": "response.output_text.done",
    "conversation.item.created": "conversation.item.added",
}


class BetaDialect(UpstreamDialect):
    name = "beta"
    headers = (("OpenAI-Beta", "realtime=v1"),)
    param_fields = (
        ("session.turn_detection.threshold", "vad_threshold"),
        ("session.turn_detection.silence_duration_ms", "vad_silence_duration_ms"),
        ("session.turn_detection.prefix_padding_ms", "vad_prefix_padding_ms"),
        ("session.turn_detection.eagerness", "vad_eagerness"),
        ("session.turn_detection", "turn_detection"),
        ("session.input_audio_transcription", "transcription_model"),
        ("session.input_audio_format", "input_audio_format"),
        ("session.output_audio_format", "output_audio_format"),
        ("session.voice", "voice"),
        ("session.instructions", "instructions"),
        ("session.modalities", "modalities"),
        ("session.tools", "tools"),
        ("session.tool_choice", "tool_choice"),
        ("session.temperature", "temperature"),
        ("session.max_response_output_tokens", "max_response_tokens"),
    )
    # the GA shape's nested audio settings and its names (beta's are flat)
    foreign_session_fields = ("audio", "output_modalities")

    def session_update(self, config: SessionConfig, event_id: str | None = None) -> tuple[dict[str, Any], list[str]]:
        session: dict[str, Any] = {}
        if config.modalities is not None:
            # beta needs "text" whenever audio is wanted (Azure rejects ["audio"] alone)
            session["modalities"] = ["text", "audio"] if "audio" in config.modalities else ["text"]
        if config.instructions is not None:
            session["instructions"] = config.instructions
        if config.voice is not None:
            session["voice"] = config.voice
        if config.input_audio_format is not None:
            session["input_audio_format"] = config.input_audio_format
        if config.output_audio_format is not None:
            session["output_audio_format"] = config.output_audio_format
        if config.transcription_model is not None:
            session["input_audio_transcription"] = (
                {"model": config.transcription_model} if config.transcription_model else None)
        if config.turn_detection is not None:
            session["turn_detection"] = turn_detection_object(config)
        if config.tools is not None:
            session["tools"] = config.tools
        if config.tool_choice is not None:
            session["tool_choice"] = config.tool_choice
        if config.temperature is not None:
            session["temperature"] = config.temperature
        if config.max_response_tokens is not None:
            session["max_response_output_tokens"] = config.max_response_tokens
        event: dict[str, Any] = {"type": "session.update", "session": session}
        if event_id is not None:
            event["event_id"] = event_id
        return event, []

    def normalize(self, event: dict[str, Any]) -> dict[str, Any]:
        renamed = EVENT_NAMES.get(event.get("type"))
        if renamed is not None:
            event["type"] = renamed
        return event

    def effective(self, session: dict[str, Any]) -> dict[str, Any]:
        readings = (
            ("model", "model", as_text),
            ("voice", "voice", as_text),
            ("turn_detection", "turn_detection", turn_detection_mode),
            ("input_audio_format", "input_audio_format", _format_name),
            ("output_audio_format", "output_audio_format", _format_name),
            ("input_transcription", "input_audio_transcription", lambda value: as_text(as_object(value).get("model"))),
        )
        return {name: read(session[key]) for name, key, read in readings if key in session}


def _format_name(value: Any) -> str | None:
    """A beta format name the gateway relays in (the client protocol's names), else None."""
    return value if value in AUDIO_FORMATS else None
