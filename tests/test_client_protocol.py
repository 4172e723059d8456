"""The client protocol parser (both spellings, every error) and the error table."""
from __future__ import annotations

import json

import orjson
import pytest

from gateway import client_protocol as cp
from gateway.errors import (ERROR_TABLE, AuthenticationFailed, GatewayError, InvalidConfig, InvalidMessage,
                            RateLimitExceeded, SessionExpired, UpstreamError, from_upstream_error, scrub)


def parse(obj) -> object:
    return cp.parse_client_message(orjson.dumps(obj))


def config_of(obj) -> cp.ConfigCommand:
    command = parse({"type": "config", **obj})
    assert isinstance(command, cp.ConfigCommand)
    return command


# ---- message framing errors -------------------------------------------------------------------

@pytest.mark.parametrize("raw, param", [
    (b"{not json", None),
    (b'{"type":"text","text":"abc"', None),             # truncated JSON
    (b"\xff\xfe{}", None),                              # invalid UTF-8
    (b"[1,2,3]", None),                                 # not an object
    (b'{"text":"no type"}', "type"),
    (b'{"type":42}', "type"),
    (b'{"type":"dance"}', "type"),                      # unknown type
    (b'{"type":"text","text":5}', "text"),              # wrong field type
    (b'{"type":"text"}', "text"),                       # missing field
    (b'{"type":"text","text":"hi","respond":"yes"}', "respond"),
    (b'{"type":"function_result","call_id":7,"output":"x"}', "call_id"),
    (b'{"type":"function_result","call_id":"c1","output":5}', "output"),
    (b'{"type":"playback","played_ms":-1}', "played_ms"),
    (b'{"type":"playback","played_ms":"10"}', "played_ms"),
])
def test_bad_messages_raise_invalid_message(raw, param):
    with pytest.raises(InvalidMessage) as info:
        cp.parse_client_message(raw)
    assert info.value.param == param
    assert info.value.fatal is False
    assert info.value.to_event()["code"] == "InvalidMessage"


@pytest.mark.parametrize("message, command", [
    ({"type": "text", "text": "hi", "respnd": False}, cp.TextCommand("hi", True)),
    ({"type": "commit", "force": True}, cp.CommitCommand()),
    ({"type": "create_response", "instructions": "be brief"}, cp.CreateResponseCommand()),
    ({"type": "function_result", "call_id": "c1", "output": "{}", "name": "lookup"},
     cp.FunctionResultCommand("c1", "{}")),
    ({"type": "playback", "played_ms": 5, "item_id": "i1"}, cp.PlaybackCommand(5.0)),
])
def test_an_unknown_field_on_a_command_is_reported_and_the_command_applies(message, command):
    warnings: list[InvalidMessage] = []
    assert cp.parse_client_message(orjson.dumps(message), warnings.append) == command
    (unknown,) = set(message) - {"type", "text", "call_id", "output", "played_ms"}
    assert [(w.param, w.fatal) for w in warnings] == [(unknown, False)]
    assert f"unknown field '{unknown}' on '{message['type']}' (ignored)" == warnings[0].message


def test_a_command_reports_ten_unknown_fields_then_a_count():
    warnings: list[InvalidMessage] = []
    extra = {f"x{n}": n for n in range(cp.MAX_UNKNOWN_REPORTED + 5)}
    message = {"type": "clear_audio", "event_id": "e1", **extra}  # an event_id is no unknown field
    assert cp.parse_client_message(orjson.dumps(message), warnings.append) == cp.ClearAudioCommand()
    assert [w.param for w in warnings] == [f"x{n}" for n in range(cp.MAX_UNKNOWN_REPORTED)] + [None]
    assert warnings[-1].message == "5 more unknown fields on 'clear_audio' (ignored)"


def test_text_over_the_size_limit_is_rejected():
    with pytest.raises(InvalidMessage):
        parse({"type": "text", "text": "x" * (cp.MAX_TEXT_BYTES + 1)})


# ---- commands, both spellings -----------------------------------------------------------------

def test_commands_in_seed_and_waav_spellings():
    assert parse({"type": "text", "text": "hi"}) == cp.TextCommand("hi", True)
    assert parse({"type": "text", "text": "hi", "respond": False}) == cp.TextCommand("hi", False)
    assert isinstance(parse({"type": "commit"}), cp.CommitCommand)
    assert isinstance(parse({"type": "commit_audio"}), cp.CommitCommand)  # WaaV
    assert isinstance(parse({"type": "create_response"}), cp.CreateResponseCommand)
    assert isinstance(parse({"type": "cancel_response"}), cp.CancelResponseCommand)
    assert isinstance(parse({"type": "clear_audio"}), cp.ClearAudioCommand)
    assert parse({"type": "function_result", "call_id": "c1", "output": "ok"}) == cp.FunctionResultCommand("c1", "ok")
    assert parse({"type": "function_result", "call_id": "c1", "result": "ok"}) == cp.FunctionResultCommand("c1", "ok")
    assert parse({"type": "function_result", "call_id": "c1", "output": {"t": 18}}) == \
        cp.FunctionResultCommand("c1", '{"t":18}')
    assert parse({"type": "playback", "played_ms": 1234}) == cp.PlaybackCommand(1234.0)
    waav_update = parse({"type": "update_session", "voice": "ash"})
    assert isinstance(waav_update, cp.ConfigCommand) and waav_update.config.voice == "ash"


def test_openai_events_pass_through_untouched():
    event = {"type": "conversation.item.delete", "item_id": "item_1", "event_id": "e1"}
    command = parse(event)
    assert isinstance(command, cp.PassthroughCommand) and command.event == event


@pytest.mark.parametrize("event_id", ["gw_cancel", "gw_response", "gw_update_1", "gw_truncate_item_1", "gw_"])
def test_the_gateways_event_id_prefix_is_reserved(event_id):
    """The gateway tells the answers to its own upstream events apart by their event_id: a
    client's event with one of them would be mistaken for the gateway's (and its error lost)."""
    with pytest.raises(InvalidMessage) as raised:
        parse({"type": "response.cancel", "event_id": event_id})
    assert raised.value.param == "event_id" and "reserved" in str(raised.value)
    assert isinstance(parse({"type": "response.cancel", "event_id": "GW_cancel"}), cp.PassthroughCommand)


def test_the_gateways_item_id_prefix_is_reserved():
    """The gateway names the items it adds (a `text`, a function result) gw_item_N and counts one
    confirmed when the upstream adds an item of that id: a client's item of the same name would
    confirm the gateway's, or collide with it upstream."""
    with pytest.raises(InvalidMessage) as raised:
        parse({"type": "conversation.item.create", "item": {"id": "gw_item_1", "type": "message", "role": "user"}})
    assert raised.value.param == "item.id" and "reserved" in str(raised.value)
    for event in (
        {"type": "conversation.item.create", "item": {"id": "item_1", "type": "message", "role": "user"}},
        {"type": "conversation.item.create", "previous_item_id": "gw_item_1", "item": {"type": "message"}},
        {"type": "conversation.item.delete", "item_id": "gw_item_1"},  # the client may name the gateway's items
    ):
        assert parse(event) == cp.PassthroughCommand(event)


# ---- config: every field ----------------------------------------------------------------------

def test_seed_config_with_every_field():
    command = config_of({
        "provider": "openai", "model": "gpt-4o-realtime-preview", "voice": "alloy",
        "instructions": "You are a helpful assistant.", "turn_detection": "server_vad",
        "vad": {"enabled": True, "threshold": 0.6, "silence_duration_ms": 400, "prefix_padding_ms": 200},
        "input_transcription": {"enabled": True, "model": "gpt-4o-mini-transcribe"},
        "temperature": 0.8, "max_response_tokens": "inf", "tool_choice": "auto",
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
        "input_audio_format": "pcm16", "output_audio_format": "g711_ulaw", "modalities": ["text", "audio"],
        "levels": True,
    })
    assert command.errors == []
    c = command.config
    assert (c.model, c.voice, c.turn_detection) == ("gpt-4o-realtime-preview", "alloy", "server_vad")
    assert (c.vad_threshold, c.vad_silence_duration_ms, c.vad_prefix_padding_ms) == (0.6, 400, 200)
    assert c.transcription_model == "gpt-4o-mini-transcribe"
    assert (c.temperature, c.max_response_tokens, c.tool_choice) == (0.8, "inf", "auto")
    assert c.tools == [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    assert (c.input_audio_format, c.output_audio_format, c.modalities, c.levels) == \
        ("pcm16", "g711_ulaw", ["text", "audio"], True)


def test_waav_config_spellings():
    command = config_of({
        "turn_detection": {"mode": "server_vad", "threshold": 0.4, "silence_duration_ms": 300},
        "transcribe_input": True, "transcription_model": "gpt-4o-transcribe",
        "max_response_tokens": -1, "input_audio_format": "mulaw", "provider": "OpenAI",
        "tools": [{"type": "function", "function": {"name": "lookup", "description": "d",
                                                    "parameters": {"type": "object"}}}],
    })
    assert command.errors == [] and command.provider == "openai"
    c = command.config
    assert (c.turn_detection, c.vad_threshold, c.vad_silence_duration_ms) == ("server_vad", 0.4, 300)
    assert c.transcription_model == "gpt-4o-transcribe"
    assert c.max_response_tokens == "inf"            # negative means unlimited
    assert c.input_audio_format == "g711_ulaw"
    assert c.tools == [{"type": "function", "name": "lookup", "description": "d", "parameters": {"type": "object"}}]
    assert config_of({"turn_detection": {"mode": "manual"}}).config.turn_detection == "none"
    semantic = config_of({"turn_detection": {"mode": "semantic", "eagerness": "high"}}).config
    assert (semantic.turn_detection, semantic.vad_eagerness) == ("semantic_vad", "high")
    assert config_of({"transcribe_input": False}).config.transcription_model == ""


def test_transcription_and_vad_switches():
    assert config_of({"input_transcription": {"enabled": False}}).config.transcription_model == ""
    assert config_of({"input_transcription": {}}).config.transcription_model == "whisper-1"
    assert config_of({"turn_detection": "server_vad", "vad": {"enabled": False}}).config.turn_detection == "none"
    assert config_of({"turn_detection": "none"}).config.turn_detection == "none"


def test_values_of_an_unexpected_shape_are_errors_not_crashes():
    """Found by an adversarial audit: each of these raised inside the parser (a traceback in the
    log, no event for the client, the config's valid fields lost)."""
    deep: object = "leaf"
    for _ in range(300):  # orjson reads 1,024 levels but writes only 254
        deep = [deep]
    for name in ("output", "result"):
        payload = json.dumps({"type": "function_result", "call_id": "c1", name: deep}).encode()
        with pytest.raises(InvalidMessage) as caught:
            cp.parse_client_message(payload)
        assert caught.value.param == name
    for mode in (["server_vad"], {"a": 1}):
        for key in ("mode", "type"):
            command = config_of({"voice": "verse", "turn_detection": {key: mode}})
            assert [e.param for e in command.errors] == ["turn_detection.mode"]
            assert command.config.voice == "verse" and command.config.turn_detection is None


def test_a_function_result_without_its_output_names_the_documented_field():
    """`output` is the protocol's name (WaaV's `result` is accepted too): a result with neither
    is refused naming `output`, and one with only `result` names `result`."""
    for message, param in (({"call_id": "c1"}, "output"), ({"call_id": "c1", "output": 5}, "output"),
                           ({"call_id": "c1", "result": 5}, "result")):
        with pytest.raises(InvalidMessage) as caught:
            cp.parse_client_message(json.dumps({"type": "function_result", **message}).encode())
        assert caught.value.param == param and f"'{param}' must be a string" in str(caught.value)


def test_a_bad_sub_field_is_left_out_and_its_siblings_apply():
    """"That field is ignored, the rest applies" holds inside objects and lists too."""
    command = config_of({"vad": {"threshold": 2, "silence_duration_ms": 300}})
    assert [e.param for e in command.errors] == ["vad.threshold"]
    assert (command.config.vad_threshold, command.config.vad_silence_duration_ms) == (None, 300)
    command = config_of({"vad": {"enabled": False, "threshold": 7}})
    assert [e.param for e in command.errors] == ["vad.threshold"]
    assert command.config.turn_detection == "none"
    command = config_of({"turn_detection": {"mode": "manual", "threshold": 3}})   # WaaV
    assert [e.param for e in command.errors] == ["turn_detection.threshold"]
    assert command.config.turn_detection == "none"
    command = config_of({"turn_detection": {"mode": "server_vad", "threshold": 2, "prefix_padding_ms": 100}})
    assert [e.param for e in command.errors] == ["turn_detection.threshold"]
    assert (command.config.turn_detection, command.config.vad_prefix_padding_ms) == ("server_vad", 100)
    command = config_of({"tools": [{"name": "lookup"}, {"name": "bad name!"}, {"name": "book"}]})
    assert [e.param for e in command.errors] == ["tools[1].name"]
    assert [tool["name"] for tool in command.config.tools] == ["lookup", "book"]
    assert config_of({"tools": []}).config.tools == []                   # clears the tools


def test_one_config_cannot_turn_into_thousands_of_errors_or_tools():
    """An audit's `config` with 2,000,000 tools (a 4 MB message, under the size limit) held the
    node's loop for 17 s and sent one InvalidConfig per entry (100,001 events for 200 KB). More
    than MAX_TOOLS is refused whole; bad tools are reported ten by ten, the rest in one count."""
    from gateway.client_protocol import MAX_TOOLS, MAX_UNKNOWN_REPORTED
    command = config_of({"tools": [1] * 2_000_000, "voice": "ash"})
    assert [(e.param, e.message) for e in command.errors] == [
        ("tools", f"tools holds 2000000 definitions, at most {MAX_TOOLS} are accepted")]
    assert command.config.tools is None and command.config.voice == "ash"   # the rest applies
    command = config_of({"tools": [{"name": "ok"}] + [7] * (MAX_TOOLS - 1)})
    assert [e.param for e in command.errors] == [f"tools[{i}]" for i in range(1, MAX_UNKNOWN_REPORTED + 1)] + ["tools"]
    assert command.errors[-1].message == f"{MAX_TOOLS - 1 - MAX_UNKNOWN_REPORTED} more bad tools (ignored)"
    assert [tool["name"] for tool in command.config.tools] == ["ok"]


@pytest.mark.parametrize("field, value, param", [
    ("provider", "hume", "provider"),
    ("model", "", "model"),
    ("model", 5, "model"),
    ("voice", "nova", "voice"),
    ("voice", 3, "voice"),
    ("instructions", ["x"], "instructions"),
    ("instructions", "x" * (cp.MAX_INSTRUCTIONS_BYTES + 1), "instructions"),
    ("turn_detection", "push_to_talk", "turn_detection"),
    ("turn_detection", 3, "turn_detection"),
    ("turn_detection", {"mode": "sometimes"}, "turn_detection.mode"),
    ("vad", {"threshold": 1.5}, "vad.threshold"),
    ("vad", {"silence_duration_ms": -5}, "vad.silence_duration_ms"),
    ("vad", {"prefix_padding_ms": "300"}, "vad.prefix_padding_ms"),
    ("vad", {"enabled": "yes"}, "vad.enabled"),
    ("vad", [], "vad"),
    ("input_transcription", {"model": ""}, "input_transcription.model"),
    ("input_transcription", {"enabled": 1}, "input_transcription.enabled"),
    ("transcribe_input", "yes", "transcribe_input"),
    ("transcription_model", 1, "transcription_model"),
    ("temperature", 2.0, "temperature"),
    ("temperature", "hot", "temperature"),
    ("max_response_tokens", 0, "max_response_tokens"),
    ("max_response_tokens", 5000, "max_response_tokens"),
    ("max_response_tokens", "lots", "max_response_tokens"),
    ("tools", {"name": "x"}, "tools"),
    ("tools", [{"type": "function", "name": "bad name!"}], "tools[0].name"),
    ("tools", [{"type": "function", "name": "get_weather\n"}], "tools[0].name"),  # `$` took it
    ("tools", [{"type": "retrieval"}], "tools[0].type"),
    ("tools", [{"name": "ok", "parameters": "schema"}], "tools[0].parameters"),
    ("tool_choice", "sometimes", "tool_choice"),
    ("input_audio_format", "mp3", "input_audio_format"),
    ("output_audio_format", 16, "output_audio_format"),
    ("modalities", ["video"], "modalities"),
    ("modalities", [], "modalities"),
    ("levels", "on", "levels"),
    ("colour", "blue", "colour"),                       # unknown field
])
def test_invalid_config_field_is_reported_and_ignored_rest_applies(field, value, param):
    command = config_of({field: value, "instructions": "keep me"} if field != "instructions"
                        else {field: value, "voice": "ash"})
    assert [e.param for e in command.errors] == [param]
    error = command.errors[0]
    assert isinstance(error, InvalidConfig) and error.fatal is False
    assert error.to_event() == {"type": "error", "code": "InvalidConfig", "message": error.message,
                                "fatal": False, "param": param}
    assert getattr(command.config, field if hasattr(command.config, field) else "model", None) in (None,)
    if field != "instructions":
        assert command.config.instructions == "keep me"   # the rest applies
    else:
        assert command.config.voice == "ash"


def test_session_config_merge_keeps_unspecified_fields():
    base = cp.SessionConfig(voice="alloy", instructions="a", turn_detection="server_vad")
    merged = base.merged(cp.SessionConfig(instructions="b"))
    assert (merged.voice, merged.instructions, merged.turn_detection) == ("alloy", "b", "server_vad")
    assert merged.specified() == ["voice", "instructions", "turn_detection"]


# ---- gateway -> client events -----------------------------------------------------------------

def test_event_builders():
    assert orjson.loads(cp.transcript_event("user", "hi", True, "item_1")) == \
        {"type": "transcript", "role": "user", "text": "hi", "is_final": True, "item_id": "item_1"}
    assert orjson.loads(cp.speech_event("speech_started", 120, "item_2")) == \
        {"type": "speech_started", "audio_ms": 120, "item_id": "item_2"}
    assert orjson.loads(cp.interrupted_event("resp_1", 840)) == \
        {"type": "interrupted", "response_id": "resp_1", "played_ms": 840}
    assert orjson.loads(cp.function_call_event("call_1", "f", "{}")) == \
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}
    level = orjson.loads(cp.level_event((-20.0, -6.0, 0, 2400), (-100.0, -100.0, 0, 0)))
    assert level == {"type": "level", "input": {"rms_dbfs": -20.0, "peak_dbfs": -6.0, "clipped": 0},
                     "output": {"rms_dbfs": -100.0, "peak_dbfs": -100.0, "clipped": 0}}
    ready = orjson.loads(cp.ready_event("gw_1", "sess_1", {"model": "m", "voice": "alloy"}, ["voice"]))
    assert ready == {"type": "ready", "session_id": "gw_1", "upstream_session_id": "sess_1", "model": "m",
                     "voice": "alloy", "ignored": ["voice"]}


# ---- the error table ----------------------------------------------------------------------------

def test_error_table_covers_every_code_with_close_codes():
    assert set(ERROR_TABLE) == {"AuthenticationFailed", "NotConnected", "ConnectionFailed", "RateLimitExceeded",
                                "InvalidConfig", "InvalidMessage", "UpstreamError", "SessionExpired", "Overloaded",
                                "IdleTimeout", "SlowClient", "ClientUnresponsive"}
    for code, kind in ERROR_TABLE.items():
        assert 1000 <= kind.close_code <= 4999 and kind.close_reason
    assert AuthenticationFailed("x").fatal and SessionExpired("x").fatal
    assert not InvalidConfig("x").fatal and not RateLimitExceeded("x").fatal


def test_upstream_errors_map_to_codes_and_keep_details():
    rate = from_upstream_error({"type": "tokens", "code": "rate_limit_exceeded", "message": "Rate limit reached"})
    assert isinstance(rate, RateLimitExceeded) and not rate.fatal
    assert rate.to_event()["upstream"] == {"code": "rate_limit_exceeded", "type": "tokens", "param": None,
                                           "event_id": None}
    key = from_upstream_error({"type": "invalid_request_error", "code": "invalid_api_key", "message": "bad"})
    assert isinstance(key, AuthenticationFailed) and key.fatal
    expired = from_upstream_error({"code": "session_expired", "message": "Your session hit the maximum duration"})
    assert isinstance(expired, SessionExpired) and expired.fatal
    beta = from_upstream_error({"code": "beta_api_shape_disabled", "message": "no beta"})
    assert isinstance(beta, UpstreamError) and beta.fatal
    other = from_upstream_error({"code": "invalid_value", "param": "session.voice", "message": "m",
                                 "event_id": "e1", "type": "invalid_request_error"})
    assert isinstance(other, UpstreamError) and not other.fatal
    assert other.to_event()["upstream"]["param"] == "session.voice"


def test_secrets_are_scrubbed_from_messages():
    error = GatewayError.__subclasses__()[0]("Incorrect API key provided: sk-proj-abcdef123456789. Bearer xyz123")
    assert "sk-proj" not in error.message and "xyz123" not in error.message
    assert scrub("api-key: abc123def") == "api-key: [redacted]"
    upstream = from_upstream_error({"code": "invalid_api_key", "message": "key sk-test1234567890 is wrong"})
    assert "sk-test" not in orjson.dumps(upstream.to_event()).decode()
    # OpenAI's own wording masks the key but keeps its last four characters: those go too
    openai = from_upstream_error({"code": "invalid_api_key", "message": (
        "Incorrect API key provided: sk-****************9876. You can find your API key at "
        "https://platform.openai.com/account/api-keys.")})
    assert openai.message == ("Incorrect API key provided: [redacted]. You can find your API key at "
                              "https://platform.openai.com/account/api-keys.")
    assert scrub("Incorrect API key provided: abcd****wxyz.") == "Incorrect API key provided: [redacted]"
    # ... and in any other wording, masked with dots (found by a security audit)
    assert scrub("The API key sk-****...9876 has been deactivated") == "The API key [redacted] has been deactivated"
    assert scrub("key sk-...9876 is over quota") == "key [redacted] is over quota"
    # a token ends where a delimiter begins: the text around it stays as it was
    assert scrub("Key X header [Bearer abc.def-123] is invalid") == "Key X header [Bearer [redacted]] is invalid"
    assert scrub("(api-key=abc123def); retry") == "(api-key=[redacted]); retry"
    # ... and no bracket or delimiter is a way around the pattern (found by two reviews: the
    # first fix stopped tokens at `;()[]{}<>` and missed these)
    for wrapped in ("Bearer <eyJhbGciOi.x.y>", "Bearer [eyJhbGciOi.x.y]", "Bearer (tok-123456)",
                    "api_key=(secret123456)", "api-key: {secret123456}", "Bearer ((tok123456))",
                    "Bearer [[tok123456]]", "Bearer tok;123456", "Bearer tok]123456 x"):
        assert "eyJ" not in scrub(wrapped) and "123456" not in scrub(wrapped), (wrapped, scrub(wrapped))
    # ... nor a token running into the next keyword, a quote, a colon, or no `Bearer` at all
    # (found by the third review: a bearer token swallowed `api-key:`, hiding its secret)
    for hidden in ("Authorization=Bearer abc123;api-key: S3CRETvalue42", "(Bearer abc)(api-key: S3CRETvalue42)",
                   "Bearer {abc}Bearer S3CRETvalue42", 'Bearer "S3CRETvalue42"', "Bearer: S3CRETvalue42",
                   "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.S3CRETvalue42 here", "x_sk-proj-S3CRETvalue42"):
        assert "S3CRET" not in scrub(hidden), (hidden, scrub(hidden))


def test_error_messages_quoting_client_values_are_clipped():
    """A client's megabyte value must not come back as a megabyte error message."""
    with pytest.raises(InvalidMessage) as raised:
        cp.parse_client_message(orjson.dumps({"type": "x" * 1_000_000}))
    event = orjson.loads(cp.error_event(raised.value))
    assert event["code"] == "InvalidMessage" and len(event["message"]) < 600


def test_a_huge_message_is_scrubbed_only_where_it_is_kept(monkeypatch):
    """Found by a bad-input audit: messages were scrubbed whole, then clipped, and one pattern
    backtracked quadratically over a run of spaces: `{"type": "api key" + 60,000 spaces}` held
    the worker's event loop (every session on it) for 19.6 s. Only the kept part, and a margin
    no key outgrows, is scrubbed now; the pattern is linear."""
    from gateway import errors

    scrubbed: list[int] = []
    real_scrub = errors.scrub
    monkeypatch.setattr(errors, "scrub", lambda text: scrubbed.append(len(text)) or real_scrub(text))
    message = "api key" + " " * 1_000_000 + ": secret"
    error = InvalidMessage(message)
    assert max(scrubbed) <= errors.MAX_MESSAGE_CHARS + 512
    assert error.message.endswith(f"... ({len(message) - errors.MAX_MESSAGE_CHARS} more characters)")
    key = "sk-proj-" + "k" * 160  # across the clip: scrubbed whole before the cut
    assert "kkkk" not in InvalidMessage("x" * 450 + " " + key + " " + "y" * 10_000).message
    # a long token replaced early shortens the text: what stood past the clip must not slide in
    # (found by the third review: 15 hex digits of a known key came through)
    monkeypatch.setattr(errors, "_known_secrets", ("0123456789abcdef0123456789abcdef",))  # an Azure key
    shifted = ("x" * 150 + " Bearer " + "t" * 700 + " " + "y" * 120 + " api=0123456789abcdef0123456789abcdef "
               + "z" * 3000)
    assert "0123456789" not in InvalidMessage(shifted).message
    # the pattern alone, on what a short message may hold: no run of spaces makes it slow
    assert real_scrub("api key" + " " * 100_000 + "x") == "api key" + " " * 100_000 + "x"


def test_a_config_records_the_name_each_nested_or_aliased_field_came_by():
    """Errors and `ignored` name a field as the client wrote it (see test_relay_errors): the
    parser records the spelling that set each value, and only that one."""
    assert config_of({"transcription_model": "m", "turn_detection": {"mode": "server_vad", "threshold": 0.4}}).spelled \
        == {"transcription_model": "transcription_model", "vad_threshold": "turn_detection.threshold"}
    assert config_of({"vad": {"threshold": 0.4}}).spelled == {"vad_threshold": "vad.threshold"}
    # transcribe_input: true only turns on what input_transcription named: the model keeps its name
    both = config_of({"input_transcription": {"model": "m"}, "transcribe_input": True})
    assert both.config.transcription_model == "m"
    assert both.spelled == {"transcription_model": "input_transcription.model"}
    assert config_of({"transcribe_input": True}).spelled == {"transcription_model": "transcribe_input"}


def test_a_call_id_and_a_tool_choice_name_are_bounded_like_every_other_client_string():
    """Found by a bad-input audit: `function_result.call_id` had no limit, and the session keeps
    the last 256 it answered: 256 results with 10 MiB call ids held 2.5 GiB for one session.
    `tool_choice.name` took any string (200 KB, empty) where a tool's own name may not."""
    with pytest.raises(InvalidMessage) as raised:
        parse({"type": "function_result", "call_id": "c" * (cp.MAX_CALL_ID_BYTES + 1), "output": "x"})
    assert raised.value.param == "call_id" and f"larger than {cp.MAX_CALL_ID_BYTES} bytes" in str(raised.value)
    assert parse({"type": "function_result", "call_id": "call_" + "c" * 200, "output": "x"}).call_id.startswith("call_")
    for name in ("x" * 65, "", "no spaces", "get_weather\n"):
        command = config_of({"tool_choice": {"type": "function", "name": name}})
        assert command.config.tool_choice is None
        assert [(error.param, error.message) for error in command.errors] == [
            ("tool_choice.name", "tool_choice.name must match ^[a-zA-Z0-9_-]{1,64}$")]
    assert config_of({"tool_choice": {"type": "function", "name": "get_weather"}}).config.tool_choice == {
        "type": "function", "name": "get_weather"}
