"""The client protocol of `/realtime`: client JSON -> typed commands, and gateway -> client events.

One parser accepts both spellings: the seed/SPEC one (`turn_detection:"server_vad"`,
`vad:{...}`, `input_transcription:{enabled,model}`, `commit`) and WaaV's (`turn_detection:{mode}`,
`transcribe_input`, `transcription_model`, `commit_audio`, `update_session`,
`function_result.result`, nested `tools[].function`, negative `max_response_tokens`).

`parse_client_message(text)` returns a command object or raises `InvalidMessage`. A `config` never
raises for a bad field value: each bad field becomes an `InvalidConfig` in `ConfigCommand.errors`,
is left out of the resulting `SessionConfig`, and the rest applies. The other commands' unknown
fields go to `warn`, one non-fatal `InvalidMessage` each, and the command applies: a misspelt
optional field (`"respnd": false`) is not silently a different request.

Gateway -> client events are built here too (`ready_event`, `transcript_event`, ...) and returned
as JSON bytes (orjson).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import orjson

from gateway.errors import InvalidConfig, InvalidMessage

VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
TURN_DETECTION_MODES = ("server_vad", "semantic_vad", "none")
AUDIO_FORMATS = ("pcm16", "g711_ulaw", "g711_alaw")
EAGERNESS = ("low", "medium", "high", "auto")
TOOL_CHOICES = ("auto", "none", "required")
MODALITIES = ("text", "audio")
#: bytes of audio per millisecond, per wire format (PCM16 24 kHz mono; G.711 8 kHz)
BYTES_PER_MS = {"pcm16": 48, "g711_ulaw": 8, "g711_alaw": 8}

MAX_INSTRUCTIONS_BYTES = 100 * 1024
MAX_TEXT_BYTES = 50 * 1024
MAX_FUNCTION_OUTPUT_BYTES = 100 * 1024
#: OpenAI's call ids are ~30 characters; the session remembers the last ones it answered
MAX_CALL_ID_BYTES = 256
#: unknown `config` fields (and bad tools) reported one by one; the rest of them in one count
MAX_UNKNOWN_REPORTED = 10
#: function definitions in one `config` (OpenAI's function-calling limit elsewhere): a longer
#: list is refused whole, before any of it is read
MAX_TOOLS = 128

_FORMAT_ALIASES = {"pcm16": "pcm16", "pcm": "pcm16", "linear16": "pcm16", "g711_ulaw": "g711_ulaw",
                   "ulaw": "g711_ulaw", "mulaw": "g711_ulaw", "g711_alaw": "g711_alaw", "alaw": "g711_alaw"}
_WAAV_TURN_MODES = {"server_vad": "server_vad", "semantic": "semantic_vad", "semantic_vad": "semantic_vad",
                    "manual": "none", "none": "none"}
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # whole names only: `fullmatch` (`$` would take "x\n")


@dataclass(slots=True)
class SessionConfig:
    """Dialect-neutral session settings. `None` means "not specified" (leave as is).

    `transcription_model` is `""` when the client turned input transcription off. `levels` is a
    gateway-only setting (the client's `level` events) and never goes upstream.
    """

    model: str | None = None
    voice: str | None = None
    instructions: str | None = None
    turn_detection: str | None = None          # server_vad | semantic_vad | none
    vad_threshold: float | None = None         # 0..1
    vad_silence_duration_ms: int | None = None
    vad_prefix_padding_ms: int | None = None
    vad_eagerness: str | None = None
    transcription_model: str | None = None
    temperature: float | None = None
    max_response_tokens: int | str | None = None  # 1..4096 or "inf"
    tools: list[dict[str, Any]] | None = None   # flat Realtime shape {type,name,description?,parameters?}
    tool_choice: str | dict[str, Any] | None = None
    input_audio_format: str | None = None
    output_audio_format: str | None = None
    modalities: list[str] | None = None
    levels: bool | None = None

    def merged(self, update: "SessionConfig") -> "SessionConfig":
        """A copy of self with every field `update` specifies replaced."""
        result = SessionConfig()
        for f in fields(self):
            new = getattr(update, f.name)
            setattr(result, f.name, getattr(self, f.name) if new is None else new)
        return result

    def specified(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def has_vad_params(self) -> bool:
        return any(v is not None for v in (self.vad_threshold, self.vad_silence_duration_ms,
                                           self.vad_prefix_padding_ms, self.vad_eagerness))


#: SessionConfig field -> the client's name for it (in `param` of errors and in `ignored`)
CLIENT_PARAMS = {
    "model": "model", "voice": "voice", "instructions": "instructions", "turn_detection": "turn_detection",
    "vad_threshold": "vad.threshold", "vad_silence_duration_ms": "vad.silence_duration_ms",
    "vad_prefix_padding_ms": "vad.prefix_padding_ms", "vad_eagerness": "vad.eagerness",
    "transcription_model": "input_transcription.model", "temperature": "temperature",
    "max_response_tokens": "max_response_tokens", "tools": "tools", "tool_choice": "tool_choice",
    "input_audio_format": "input_audio_format", "output_audio_format": "output_audio_format",
    "modalities": "modalities",
}


# ---- commands (client -> gateway) -------------------------------------------------------------

@dataclass(slots=True)
class ConfigCommand:
    """`config` or WaaV's `update_session`: `config` has only valid fields; `errors` the rest."""

    config: SessionConfig
    errors: list[InvalidConfig] = field(default_factory=list)
    provider: str | None = None
    #: `vad.enabled: true` without a turn_detection: VAD back on, in the mode the session had
    vad_on: bool = False
    #: SessionConfig field -> the name the client gave it by, where that may differ from
    #: CLIENT_PARAMS' (WaaV's `transcription_model`, `turn_detection.threshold`): errors and
    #: `ignored` name a field as the client wrote it
    spelled: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class TextCommand:
    text: str
    respond: bool = True


@dataclass(slots=True)
class CommitCommand:
    pass


@dataclass(slots=True)
class CreateResponseCommand:
    pass


@dataclass(slots=True)
class CancelResponseCommand:
    pass


@dataclass(slots=True)
class ClearAudioCommand:
    pass


@dataclass(slots=True)
class FunctionResultCommand:
    call_id: str
    output: str


@dataclass(slots=True)
class PlaybackCommand:
    """The client has played `played_ms` of a reply's audio: the one `response_id` names, else
    the one it is playing now."""

    played_ms: float
    response_id: str | None = None


#: event_ids of upstream events the gateway sends itself start with this (see gateway/session.py)
RESERVED_EVENT_ID_PREFIX = "gw_"


@dataclass(slots=True)
class PassthroughCommand:
    """A raw OpenAI client event (its type contains a '.'), forwarded upstream as-is."""

    event: dict[str, Any]


Command = (ConfigCommand | TextCommand | CommitCommand | CreateResponseCommand | CancelResponseCommand
           | ClearAudioCommand | FunctionResultCommand | PlaybackCommand | PassthroughCommand)


def parse_client_message(payload: bytes | bytearray | memoryview | str,
                         warn: Callable[[InvalidMessage], None] | None = None) -> Command:
    """Parse one complete client text message. Raises `InvalidMessage` (non-fatal) on bad input;
    a command's unknown fields, once it parses, go to `warn` (see the module docstring)."""
    try:
        message = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage(f"message is not valid JSON (UTF-8): {exc}") from None
    if type(message) is not dict:
        raise InvalidMessage("message must be a JSON object with a 'type' field")
    kind = message.get("type")
    if not isinstance(kind, str):
        raise InvalidMessage("message has no string 'type' field", param="type")
    if "." in kind:
        event_id = message.get("event_id")
        if type(event_id) is str and event_id.startswith(RESERVED_EVENT_ID_PREFIX):
            # the gateway tags its own events so it can tell their answers apart (a refused
            # cancel of a finished reply, a truncate race, its own response.create): a client's
            # event must not be mistaken for one, nor its error swallowed
            raise InvalidMessage(f"event_id {_shown(event_id)}: the prefix {RESERVED_EVENT_ID_PREFIX!r} is "
                                 "reserved for the gateway's own events", param="event_id")
        item = message.get("item")
        item_id = item.get("id") if kind == "conversation.item.create" and type(item) is dict else None
        if type(item_id) is str and item_id.startswith(RESERVED_EVENT_ID_PREFIX):
            # the items the gateway adds (texts, function results) are named so: a client's item
            # of the same name would confirm the gateway's, or make the upstream refuse it
            raise InvalidMessage(f"item.id {_shown(item_id)}: the prefix {RESERVED_EVENT_ID_PREFIX!r} is "
                                 "reserved for the items the gateway adds", param="item.id")
        return PassthroughCommand(message)
    parser = _PARSERS.get(kind)
    if parser is None:
        raise InvalidMessage(f"unknown message type {_shown(kind)}", param="type")
    command = parser(message)
    known = _COMMAND_FIELDS.get(kind)
    if known is not None and warn is not None and len(message) > 1:
        unknown = [name for name in message if name not in known]
        for name in unknown[:MAX_UNKNOWN_REPORTED]:
            warn(InvalidMessage(f"unknown field {_shown(name)} on {kind!r} (ignored)", param=name))
        if len(unknown) > MAX_UNKNOWN_REPORTED:  # as for `config`: not thousands of errors
            warn(InvalidMessage(f"{len(unknown) - MAX_UNKNOWN_REPORTED} more unknown fields on {kind!r} (ignored)"))
    return command


def _string(message: dict, name: str, *, limit: int | None = None, required: bool = True) -> str | None:
    value = message.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise InvalidMessage(f"'{name}' must be a string", param=name)
    if limit is not None and len(value.encode()) > limit:
        raise InvalidMessage(f"'{name}' is larger than {limit} bytes", param=name)
    return value


def _parse_text(message: dict) -> TextCommand:
    text = _string(message, "text", limit=MAX_TEXT_BYTES)
    respond = message.get("respond", True)
    if not isinstance(respond, bool):
        raise InvalidMessage("'respond' must be a boolean", param="respond")
    return TextCommand(text, respond)


def _parse_function_result(message: dict) -> FunctionResultCommand:
    call_id = _string(message, "call_id", limit=MAX_CALL_ID_BYTES)
    name = "result" if "result" in message and "output" not in message else "output"  # WaaV: `result`
    output = message.get(name)
    if isinstance(output, (dict, list)):
        output = _json_text(output, name)
    if not isinstance(output, str):
        raise InvalidMessage(f"'{name}' must be a string (or a JSON object)", param=name)
    if len(output.encode()) > MAX_FUNCTION_OUTPUT_BYTES:
        raise InvalidMessage(f"'{name}' is larger than {MAX_FUNCTION_OUTPUT_BYTES} bytes", param=name)
    return FunctionResultCommand(call_id, output)


def _json_text(value: Any, param: str) -> str:
    """`value` as JSON text, or InvalidMessage: orjson reads 1,024 levels of nesting but writes
    only 254, so what a client sent is not always what can be sent on."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        raise InvalidMessage(f"'{param}' is nested too deeply to forward", param=param) from None


def _parse_playback(message: dict) -> PlaybackCommand:
    played = message.get("played_ms")
    if type(played) not in (int, float) or played < 0:
        raise InvalidMessage("'played_ms' must be a non-negative number", param="played_ms")
    response_id = message.get("response_id")
    if response_id is not None and type(response_id) is not str:
        raise InvalidMessage("'response_id' must be a string", param="response_id")
    return PlaybackCommand(float(played), response_id)


def _parse_config(message: dict) -> ConfigCommand:
    return parse_config(message)


_PARSERS = {
    "config": _parse_config,
    "update_session": _parse_config,
    "text": _parse_text,
    "commit": lambda m: CommitCommand(),
    "commit_audio": lambda m: CommitCommand(),
    "create_response": lambda m: CreateResponseCommand(),
    "cancel_response": lambda m: CancelResponseCommand(),
    "clear_audio": lambda m: ClearAudioCommand(),
    "function_result": _parse_function_result,
    "playback": _parse_playback,
}

#: the fields each command other than `config` reads (`config` reports its own unknown fields)
_COMMAND_FIELDS: dict[str, frozenset[str]] = {
    kind: frozenset(("type", "event_id", *names)) for kind, names in (
        ("text", ("text", "respond")), ("commit", ()), ("commit_audio", ()), ("create_response", ()),
        ("cancel_response", ()), ("clear_audio", ()), ("function_result", ("call_id", "output", "result")),
        ("playback", ("played_ms", "response_id")))}


# ---- config validation ------------------------------------------------------------------------

class _Bad(Exception):
    def __init__(self, param: str, message: str):
        self.param = param
        self.message = message


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def is_model_name(value: Any) -> bool:
    """A model name a client may ask for (config.model or ?model=): it goes into logs and
    upstream URLs, so no control characters and a sane length."""
    return isinstance(value, str) and 0 < len(value) <= 128 and value.isprintable()


def _is_int(value: Any) -> bool:
    return type(value) is int or (type(value) is float and value.is_integer())


def parse_config(message: dict[str, Any]) -> ConfigCommand:
    """Validate every field of a `config` (SPEC §2.2, both spellings); bad fields -> `errors`."""
    config = SessionConfig()
    errors: list[InvalidConfig] = []
    spelled: dict[str, str] = {}
    provider = None
    vad_on = False

    def field_(param: str, check) -> None:
        try:
            check()
        except _Bad as bad:
            errors.append(InvalidConfig(bad.message, param=bad.param))

    def check_provider() -> None:
        nonlocal provider
        value = message["provider"]
        # WaaV compares provider names case-insensitively ("OpenAI" works there)
        if not isinstance(value, str) or value.lower() != "openai":
            raise _Bad("provider", f"provider must be 'openai' (got {_shown(value)})")
        provider = "openai"

    def check_model() -> None:
        value = message["model"]
        if not is_model_name(value):
            raise _Bad("model", "model must be a non-empty model name")
        config.model = value

    def check_voice() -> None:
        value = message["voice"]
        if value not in VOICES:
            raise _Bad("voice", f"voice {_shown(value)} is not a realtime voice (one of {', '.join(VOICES)}); "
                                "the session keeps its current voice")
        config.voice = value

    def check_instructions() -> None:
        value = message["instructions"]
        if not isinstance(value, str):
            raise _Bad("instructions", "instructions must be a string")
        if len(value.encode()) > MAX_INSTRUCTIONS_BYTES:
            raise _Bad("instructions", f"instructions are larger than {MAX_INSTRUCTIONS_BYTES} bytes")
        config.instructions = value

    def check_turn_detection() -> None:
        value = message["turn_detection"]
        if isinstance(value, str):
            if value not in TURN_DETECTION_MODES:
                raise _Bad("turn_detection", f"turn_detection must be one of {', '.join(TURN_DETECTION_MODES)}")
            config.turn_detection = value
        elif value is None:
            config.turn_detection = "none"
        elif isinstance(value, dict):  # WaaV: {mode, threshold?, silence_duration_ms?, prefix_padding_ms?, eagerness?}
            named = value.get("mode", value.get("type"))
            mode = _WAAV_TURN_MODES.get(named) if isinstance(named, str) else None
            _vad_params(value, "turn_detection", config, errors, spelled)
            if mode is None:
                raise _Bad("turn_detection.mode", "turn_detection.mode must be server_vad, semantic or manual")
            config.turn_detection = mode
        else:
            raise _Bad("turn_detection", "turn_detection must be a string or an object")

    def check_vad() -> None:
        value = message["vad"]
        if not isinstance(value, dict):
            raise _Bad("vad", "vad must be an object")
        _vad_params(value, "vad", config, errors, spelled)
        enabled = value.get("enabled", True)
        if not isinstance(enabled, bool):
            raise _Bad("vad.enabled", "vad.enabled must be a boolean")
        if not enabled:
            config.turn_detection = "none"
        elif "enabled" in value and "turn_detection" not in message:
            nonlocal vad_on
            vad_on = True

    def check_input_transcription() -> None:
        value = message["input_transcription"]
        if not isinstance(value, dict):
            raise _Bad("input_transcription", "input_transcription must be an object")
        enabled = value.get("enabled", True)
        if not isinstance(enabled, bool):
            raise _Bad("input_transcription.enabled", "input_transcription.enabled must be a boolean")
        model = value.get("model", "whisper-1")
        if not isinstance(model, str) or not model:
            raise _Bad("input_transcription.model", "input_transcription.model must be a non-empty string")
        config.transcription_model = model if enabled else ""
        spelled["transcription_model"] = "input_transcription.model"

    def check_transcribe_input() -> None:  # WaaV
        value = message["transcribe_input"]
        if not isinstance(value, bool):
            raise _Bad("transcribe_input", "transcribe_input must be a boolean")
        if not value:
            config.transcription_model = ""
            spelled["transcription_model"] = "transcribe_input"
        elif config.transcription_model is None:
            config.transcription_model = "whisper-1"
            spelled["transcription_model"] = "transcribe_input"

    def check_transcription_model() -> None:  # WaaV
        value = message["transcription_model"]
        if not isinstance(value, str) or not value:
            raise _Bad("transcription_model", "transcription_model must be a non-empty string")
        if config.transcription_model != "":
            config.transcription_model = value
            spelled["transcription_model"] = "transcription_model"

    def check_temperature() -> None:
        value = message["temperature"]
        if not _is_number(value) or not 0.6 <= value <= 1.2:
            raise _Bad("temperature", "temperature must be a number from 0.6 to 1.2")
        config.temperature = float(value)

    def check_max_tokens() -> None:
        value = message["max_response_tokens"]
        if value == "inf":
            config.max_response_tokens = "inf"
        elif _is_int(value) and not isinstance(value, bool):
            value = int(value)
            if value < 0:  # WaaV: negative means unlimited
                config.max_response_tokens = "inf"
            elif 1 <= value <= 4096:
                config.max_response_tokens = value
            else:
                raise _Bad("max_response_tokens", "max_response_tokens must be 1..4096 or \"inf\"")
        else:
            raise _Bad("max_response_tokens", "max_response_tokens must be an integer or \"inf\"")

    def check_tools() -> None:
        value = message["tools"]
        if not isinstance(value, list):
            raise _Bad("tools", "tools must be a list of function definitions")
        if len(value) > MAX_TOOLS:
            raise _Bad("tools", f"tools holds {len(value)} definitions, at most {MAX_TOOLS} are accepted")
        tools: list[dict[str, Any]] = []
        bad = 0
        for index, tool in enumerate(value):  # a bad tool is left out, the others apply
            try:
                tools.append(_tool(index, tool))
            except _Bad as refused:
                bad += 1
                if bad <= MAX_UNKNOWN_REPORTED:
                    errors.append(InvalidConfig(refused.message, param=refused.param))
        if bad > MAX_UNKNOWN_REPORTED:
            errors.append(InvalidConfig(f"{bad - MAX_UNKNOWN_REPORTED} more bad tools (ignored)", param="tools"))
        if tools or not value:  # `[]` clears the tools; a list of only bad ones changes nothing
            config.tools = tools

    def check_tool_choice() -> None:
        value = message["tool_choice"]
        if value in TOOL_CHOICES:
            config.tool_choice = value
        elif isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
            if not _TOOL_NAME.fullmatch(value["name"]):  # a tool's name, as tools[i].name must be
                raise _Bad("tool_choice.name", "tool_choice.name must match ^[a-zA-Z0-9_-]{1,64}$")
            config.tool_choice = {"type": "function", "name": value["name"]}
        else:
            raise _Bad("tool_choice", "tool_choice must be auto, none, required or {type:function,name}")

    def check_format(name: str):
        def check() -> None:
            value = message[name]
            canonical = _FORMAT_ALIASES.get(value) if isinstance(value, str) else None
            if canonical is None:
                raise _Bad(name, f"{name} must be one of {', '.join(AUDIO_FORMATS)}")
            setattr(config, name, canonical)
        return check

    def check_modalities() -> None:
        value = message["modalities"]
        if (not isinstance(value, list) or not value or any(m not in MODALITIES for m in value)
                or len(set(value)) != len(value)):
            raise _Bad("modalities", "modalities must be a non-empty list of 'text' and/or 'audio'")
        config.modalities = list(value)

    def check_levels() -> None:
        value = message["levels"]
        if not isinstance(value, bool):
            raise _Bad("levels", "levels must be a boolean")
        config.levels = value

    checks = {
        "provider": check_provider, "model": check_model, "voice": check_voice,
        "instructions": check_instructions, "turn_detection": check_turn_detection, "vad": check_vad,
        "input_transcription": check_input_transcription, "transcribe_input": check_transcribe_input,
        "transcription_model": check_transcription_model, "temperature": check_temperature,
        "max_response_tokens": check_max_tokens, "tools": check_tools, "tool_choice": check_tool_choice,
        "input_audio_format": check_format("input_audio_format"),
        "output_audio_format": check_format("output_audio_format"),
        "modalities": check_modalities, "levels": check_levels,
    }
    # `vad` after `turn_detection` so `vad.enabled:false` wins; WaaV transcription keys after the seed's.
    order = ["provider", "model", "voice", "instructions", "turn_detection", "vad", "input_transcription",
             "transcribe_input", "transcription_model", "temperature", "max_response_tokens", "tools",
             "tool_choice", "input_audio_format", "output_audio_format", "modalities", "levels"]
    for name in order:
        if name in message:
            field_(name, checks[name])
    unknown = [name for name in message if name not in checks and name not in ("type", "event_id")]
    for name in unknown[:MAX_UNKNOWN_REPORTED]:
        errors.append(InvalidConfig(f"unknown config field {_shown(name)} (ignored)", param=name))
    if len(unknown) > MAX_UNKNOWN_REPORTED:  # one message must not turn into thousands of errors
        errors.append(InvalidConfig(f"{len(unknown) - MAX_UNKNOWN_REPORTED} more unknown config fields (ignored)"))
    return ConfigCommand(config, errors, provider, vad_on, spelled)


def _shown(value: Any) -> str:
    """A client's value for an error message: a string quoted (clipped), anything else by its
    JSON type only — never repr() of untrusted data (10,000 nested arrays overflow it)."""
    if isinstance(value, str):
        return repr(value if len(value) <= 64 else value[:64] + "…")
    return {dict: "an object", list: "an array", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _vad_params(value: dict, prefix: str, config: SessionConfig, errors: list[InvalidConfig],
                spelled: dict[str, str]) -> None:
    """The VAD parameters in `value` (`prefix`.key), each on its own: a bad one is reported and
    left out, the others apply."""
    def bad(key: str, message: str) -> None:
        errors.append(InvalidConfig(f"{prefix}.{key} {message}", param=f"{prefix}.{key}"))

    def apply(key: str, name: str, setting: Any) -> None:
        setattr(config, name, setting)
        spelled[name] = f"{prefix}.{key}"

    threshold = value.get("threshold")
    if threshold is not None:
        if _is_number(threshold) and 0.0 <= threshold <= 1.0:
            apply("threshold", "vad_threshold", float(threshold))
        else:
            bad("threshold", "must be a number from 0 to 1")
    for key, name in (("silence_duration_ms", "vad_silence_duration_ms"),
                      ("prefix_padding_ms", "vad_prefix_padding_ms")):
        ms = value.get(key)
        if ms is None:
            continue
        if _is_int(ms) and not isinstance(ms, bool) and 0 <= ms <= 10_000:
            apply(key, name, int(ms))
        else:
            bad(key, "must be an integer from 0 to 10000")
    eagerness = value.get("eagerness")
    if eagerness is not None:
        if eagerness in EAGERNESS:
            apply("eagerness", "vad_eagerness", eagerness)
        else:
            bad("eagerness", f"must be one of {', '.join(EAGERNESS)}")


def _tool(index: int, tool: Any) -> dict[str, Any]:
    """One tool in the flat Realtime shape; accepts Chat-Completions nesting (`function:{...}`)."""
    param = f"tools[{index}]"
    if not isinstance(tool, dict):
        raise _Bad(param, f"{param} must be an object")
    if tool.get("type", "function") != "function":
        raise _Bad(f"{param}.type", f"{param}.type must be 'function'")
    body = tool.get("function", tool)
    if not isinstance(body, dict):
        raise _Bad(f"{param}.function", f"{param}.function must be an object")
    name = body.get("name")
    if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
        raise _Bad(f"{param}.name", f"{param}.name must match ^[a-zA-Z0-9_-]{{1,64}}$")
    flat: dict[str, Any] = {"type": "function", "name": name}
    description = body.get("description")
    if description is not None:
        if not isinstance(description, str):
            raise _Bad(f"{param}.description", f"{param}.description must be a string")
        flat["description"] = description
    parameters = body.get("parameters")
    if parameters is not None:
        if not isinstance(parameters, dict):
            raise _Bad(f"{param}.parameters", f"{param}.parameters must be a JSON Schema object")
        try:
            _json_text(parameters, f"{param}.parameters")  # else the whole session.update could not be sent
        except InvalidMessage as exc:
            raise _Bad(f"{param}.parameters", exc.message) from None
        flat["parameters"] = parameters
    return flat


# ---- events (gateway -> client) ---------------------------------------------------------------

def encode(event: dict[str, Any]) -> bytes:
    return orjson.dumps(event)


def ready_event(session_id: str, upstream_session_id: str | None, effective: dict[str, Any],
                ignored: list[str]) -> bytes:
    """`ready`: the effective configuration as the upstream confirmed it, plus ignored fields."""
    event = {"type": "ready", "session_id": session_id, "upstream_session_id": upstream_session_id}
    event.update(effective)
    event["ignored"] = ignored
    return orjson.dumps(event)


def session_updated_event(effective: dict[str, Any], ignored: list[str]) -> bytes:
    """`session_updated`: a `config` after `ready` is applied; the effective configuration as
    the upstream confirmed it, as in `ready` (WaaV's name for it, which carries nothing)."""
    event: dict[str, Any] = {"type": "session_updated"}
    event.update(effective)
    event["ignored"] = ignored
    return orjson.dumps(event)


def transcript_event(role: str, text: str, is_final: bool, item_id: str | None,
                     response_id: str | None = None, interrupted: bool = False) -> bytes:
    event = {"type": "transcript", "role": role, "text": text, "is_final": is_final, "item_id": item_id}
    if response_id is not None:
        event["response_id"] = response_id
    if interrupted:
        event["interrupted"] = True
    return orjson.dumps(event)


def speech_event(kind: str, audio_ms: int, item_id: str | None) -> bytes:
    return orjson.dumps({"type": kind, "audio_ms": audio_ms, "item_id": item_id})


def response_started_event(response_id: str | None, out_of_band: bool = False) -> bytes:
    event = {"type": "response_started", "response_id": response_id}
    if out_of_band:  # a forwarded `conversation:"none"` response.create's
        event["out_of_band"] = True
    return orjson.dumps(event)


def response_done_event(response_id: str | None, status: str | None, usage: Any, out_of_band: bool = False) -> bytes:
    event = {"type": "response_done", "response_id": response_id, "status": status, "usage": usage}
    if out_of_band:
        event["out_of_band"] = True
    return orjson.dumps(event)


def interrupted_event(response_id: str | None, played_ms: int) -> bytes:
    return orjson.dumps({"type": "interrupted", "response_id": response_id, "played_ms": played_ms})


def function_call_event(call_id: str, name: str | None, arguments: str) -> bytes:
    return orjson.dumps({"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments})


def level_event(input_level: tuple, output_level: tuple) -> bytes:
    def side(level: tuple) -> dict[str, Any]:
        rms, peak, clipped, _samples = level
        return {"rms_dbfs": round(rms, 2), "peak_dbfs": round(peak, 2), "clipped": clipped}
    return orjson.dumps({"type": "level", "input": side(input_level), "output": side(output_level)})


def error_event(error) -> bytes:
    return orjson.dumps(error.to_event())
