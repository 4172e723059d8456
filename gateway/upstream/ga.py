"""The GA dialect (current OpenAI): nested `session.audio.input/output`, `type:"realtime"` on every
update, no `temperature`, GA event names (already the internal model)."""
from __future__ import annotations

from typing import Any

from gateway.client_protocol import SessionConfig
from gateway.upstream.dialect import UpstreamDialect, as_object, as_text, turn_detection_mode, turn_detection_object

_FORMATS = {"pcm16": {"type": "audio/pcm", "rate": 24000}, "g711_ulaw": {"type": "audio/pcmu"},
            "g711_alaw": {"type": "audio/pcma"}}
_FORMAT_NAMES = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}


def _format_name(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else None
    return _FORMAT_NAMES.get(kind) if isinstance(kind, str) else None


class GaDialect(UpstreamDialect):
    name = "ga"
    headers = ()
    param_fields = (
        ("session.audio.input.turn_detection.threshold", "vad_threshold"),
        ("session.audio.input.turn_detection.silence_duration_ms", "vad_silence_duration_ms"),
        ("session.audio.input.turn_detection.prefix_padding_ms", "vad_prefix_padding_ms"),
        ("session.audio.input.turn_detection.eagerness", "vad_eagerness"),
        ("session.audio.input.turn_detection", "turn_detection"),
        ("session.audio.input.transcription", "transcription_model"),
        ("session.audio.input.format", "input_audio_format"),
        ("session.audio.output.format", "output_audio_format"),
        ("session.audio.output.voice", "voice"),
        ("session.instructions", "instructions"),
        ("session.output_modalities", "modalities"),
        ("session.tools", "tools"),
        ("session.tool_choice", "tool_choice"),
        ("session.max_output_tokens", "max_response_tokens"),
    )
    # the beta shape's flat audio settings (GA nests them under `audio`)
    foreign_session_fields = ("input_audio_format", "output_audio_format", "turn_detection", "modalities")

    def session_update(self, config: SessionConfig, event_id: str | None = None) -> tuple[dict[str, Any], list[str]]:
        session: dict[str, Any] = {"type": "realtime"}
        ignored: list[str] = []
        audio_in: dict[str, Any] = {}
        audio_out: dict[str, Any] = {}
        if config.modalities is not None:
            session["output_modalities"] = ["audio"] if "audio" in config.modalities else ["text"]
        if config.instructions is not None:
            session["instructions"] = config.instructions
        if config.input_audio_format is not None:
            audio_in["format"] = dict(_FORMATS[config.input_audio_format])
        if config.transcription_model is not None:
            audio_in["transcription"] = {"model": config.transcription_model} if config.transcription_model else None
        if config.turn_detection is not None:
            audio_in["turn_detection"] = turn_detection_object(config)
        if config.output_audio_format is not None:
            audio_out["format"] = dict(_FORMATS[config.output_audio_format])
        if config.voice is not None:
            audio_out["voice"] = config.voice
        if audio_in or audio_out:
            session["audio"] = {}
            if audio_in:
                session["audio"]["input"] = audio_in
            if audio_out:
                session["audio"]["output"] = audio_out
        if config.tools is not None:
            session["tools"] = config.tools
        if config.tool_choice is not None:
            session["tool_choice"] = config.tool_choice
        if config.max_response_tokens is not None:
            session["max_output_tokens"] = config.max_response_tokens
        if config.temperature is not None:
            ignored.append("temperature")  # GA has no temperature; the upstream would reject the update
        event: dict[str, Any] = {"type": "session.update", "session": session}
        if event_id is not None:
            event["event_id"] = event_id
        return event, ignored

    def normalize(self, event: dict[str, Any]) -> dict[str, Any]:
        return event

    def effective(self, session: dict[str, Any]) -> dict[str, Any]:
        audio = as_object(session.get("audio"))
        audio_in = as_object(audio.get("input"))
        audio_out = as_object(audio.get("output"))
        readings = (
            ("model", session, "model", as_text),
            ("voice", audio_out, "voice", as_text),
            ("turn_detection", audio_in, "turn_detection", turn_detection_mode),
            ("input_audio_format", audio_in, "format", _format_name),
            ("output_audio_format", audio_out, "format", _format_name),
            ("input_transcription", audio_in, "transcription", lambda value: as_text(as_object(value).get("model"))),
        )
        return {name: read(part[key]) for name, part, key, read in readings if key in part}
