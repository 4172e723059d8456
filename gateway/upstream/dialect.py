"""`UpstreamDialect`: the contract of a translator between the internal model and one OpenAI shape.

The internal event model uses GA event names (`response.output_audio.delta`,
`conversation.item.added`, ...). A dialect translates:
- out: `session_update(config)` -> the `session.update` event for a dialect-neutral `SessionConfig`,
  plus the list of fields that dialect cannot carry (reported to the client as ignored);
- in: `normalize(event)` -> the event renamed into the internal model (in place; returns it);
  `effective(session)` -> the effective settings from a `session.created/updated` session object,
  in the client protocol's vocabulary; `config_field(param)` -> the `SessionConfig` field an
  upstream error's `param` (a dotted path into the session.update) names.
"""
from __future__ import annotations

from typing import Any

from gateway.client_protocol import SessionConfig


class UpstreamDialect:
    name: str = ""
    #: extra handshake headers that select this dialect
    headers: tuple[tuple[str, str], ...] = ()
    #: (param path prefix, SessionConfig field), the longer prefixes of a path first
    param_fields: tuple[tuple[str, str], ...] = ()
    #: top-level `session` fields only the other dialect has: the upstream speaks that one
    foreign_session_fields: tuple[str, ...] = ()

    def foreign_field(self, session: dict[str, Any]) -> str | None:
        """A field of the upstream's `session` object that only the other dialect's shape has
        (a node set to the wrong dialect), or None."""
        return next((name for name in self.foreign_session_fields if name in session), None)

    def config_field(self, param: Any) -> str | None:
        if isinstance(param, str):
            for prefix, name in self.param_fields:
                if param == prefix or param.startswith(prefix + ".") or param.startswith(prefix + "["):
                    return name
        return None

    def fields_set(self, session: Any) -> frozenset[str]:
        """The `SessionConfig` fields a client's own `session.update` sets (its `session` object,
        forwarded as-is): a turn_detection value replaces every VAD parameter with it."""
        found = set()
        for path, name in self.param_fields:
            node = {"session": session}
            for key in path.split("."):
                if type(node) is not dict or key not in node:
                    break
                node = node[key]
            else:
                found.add(name)
        if "turn_detection" in found:
            found.update(_VAD_FIELDS)
        return frozenset(found)

    def session_update(self, config: SessionConfig, event_id: str | None = None) -> tuple[dict[str, Any], list[str]]:
        raise NotImplementedError

    def normalize(self, event: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def effective(self, session: dict[str, Any]) -> dict[str, Any]:
        """The client-protocol fields the upstream's `session` object states (model, voice,
        turn_detection, formats, input_transcription): only those present in it, so a partial
        `session.updated` changes what it names and leaves the rest as they were."""
        raise NotImplementedError


_VAD_FIELDS = ("vad_threshold", "vad_silence_duration_ms", "vad_prefix_padding_ms", "vad_eagerness")


def turn_detection_object(config: SessionConfig) -> dict[str, Any] | None:
    """The upstream `turn_detection` value; `None` (JSON null) for manual turns — never
    `{"type":"none"}` (WaaV bug B6: the upstream rejects that whole update)."""
    mode = config.turn_detection
    if mode == "none":
        return None
    result: dict[str, Any] = {"type": mode}
    if mode == "server_vad":
        if config.vad_threshold is not None:
            result["threshold"] = config.vad_threshold
        if config.vad_prefix_padding_ms is not None:
            result["prefix_padding_ms"] = config.vad_prefix_padding_ms
        if config.vad_silence_duration_ms is not None:
            result["silence_duration_ms"] = config.vad_silence_duration_ms
    elif config.vad_eagerness is not None:
        result["eagerness"] = config.vad_eagerness
    result["create_response"] = True
    result["interrupt_response"] = True
    return result


def as_object(value: Any) -> dict:
    """An upstream event's object field, or {} when it is missing or not an object: events are
    read leniently (reference §10.17), a wrongly typed field is as good as an absent one."""
    return value if type(value) is dict else {}


def as_text(value: Any) -> str | None:
    """An upstream string field, or None when it is missing or not a string."""
    return value if type(value) is str else None


def turn_detection_mode(value: Any) -> str:
    """Client-protocol name of an upstream turn_detection value."""
    if value is None:
        return "none"
    if isinstance(value, dict) and value.get("type") in ("server_vad", "semantic_vad"):
        return value["type"]
    return "none"
