"""The mock's error catalogue (reference §8): each error with its full wire shape
(type, code, message, param, event_id echo), and atomic rejection of `session.update`."""
from __future__ import annotations

import base64
from typing import Any, Optional

import pytest

from gateway.mock import MockOptions, MockRealtimeServer
from tests.support import run
from tests.test_mock_upstream import RawClient, dialect_options, open_dialect, pcm_tone

GA_VOICES = ("'alloy', 'ash', 'ballad', 'coral', 'echo', 'sage', 'shimmer', 'verse', "
             "'marin', 'cedar'")


def err(code: Optional[str], message: str, param: Optional[str], event_id: Optional[str],
        type_: str = "invalid_request_error") -> dict[str, Any]:
    return {"type": type_, "code": code, "message": message, "param": param, "event_id": event_id}


# (client event, the exact `error` object expected). Each event carries event_id "e<N>".
GA_CASES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"event_id": "e1"},
     err("invalid_event", "The 'type' field is missing.", None, "e1")),
    ({"type": "session.dance", "event_id": "e2"}, None),  # message checked separately
    ({"type": "session.update", "event_id": "e3", "session": {"type": "realtime", "foo": 1}},
     err("unknown_parameter", "Unknown parameter: 'session.foo'.", "session.foo", "e3")),
    ({"type": "session.update", "event_id": "e4",
      "session": {"type": "realtime", "audio": {"input": {"turn_detection": {
          "type": "server_vad", "bar": 2}}}}},
     err("unknown_parameter", "Unknown parameter: 'session.audio.input.turn_detection.bar'.",
         "session.audio.input.turn_detection.bar", "e4")),
    ({"type": "session.update", "event_id": "e5", "session": {"instructions": "hi"}},
     err("missing_required_parameter", "Missing required parameter: 'session.type'.",
         "session.type", "e5")),
    ({"type": "session.update", "event_id": "e6",
      "session": {"type": "realtime", "audio": {"output": {"voice": "nova"}}}},
     err("invalid_value", f"Invalid value: 'nova'. Supported values are: {GA_VOICES}.",
         "session.audio.output.voice", "e6")),
    ({"type": "session.update", "event_id": "e7",
      "session": {"type": "realtime", "audio": {"input": {"turn_detection": {
          "type": "server_vad", "threshold": 1.5}}}}},
     err("invalid_value", "Invalid 'session.audio.input.turn_detection.threshold': decimal above "
         "maximum value. Expected a value <= 1.0, but got 1.5 instead.",
         "session.audio.input.turn_detection.threshold", "e7")),
    ({"type": "session.update", "event_id": "e8", "session": {"type": "realtime", "temperature": 0.9}},
     err("unknown_parameter", "Unknown parameter: 'session.temperature'.", "session.temperature", "e8")),
    ({"type": "session.update", "event_id": "e9", "session": {"type": "realtime", "max_output_tokens": 0}},
     err("invalid_value", "Invalid 'session.max_output_tokens': integer below minimum value. "
         "Expected a value >= 1, but got 0 instead.", "session.max_output_tokens", "e9")),
    ({"type": "session.update", "event_id": "e10", "session": {"type": "realtime", "instructions": 5}},
     err("invalid_value", "Invalid type for 'session.instructions': expected a string, but got an "
         "integer instead.", "session.instructions", "e10")),
    ({"type": "session.update", "event_id": "e11", "session": {"type": "realtime", "model": "gpt-4o"}},
     err("invalid_value", "Cannot update a session's model. Connect a new session to use model "
         "'gpt-4o'.", "session.model", "e11")),
    ({"type": "session.update", "event_id": "e12", "session": {"type": "transcription"}},
     err(None, "Passing a transcription session update event to a realtime session is not allowed.",
         None, "e12")),
    ({"type": "input_audio_buffer.append", "event_id": "e13", "audio": "not base64!!"},
     err("invalid_value", "Invalid 'audio'. Expected base64-encoded audio bytes (mono PCM16 at 24kHz) "
         "but got an invalid value.", "audio.audio", "e13")),
    ({"type": "input_audio_buffer.commit", "event_id": "e14"},
     err("input_audio_buffer_commit_empty", "Error committing input audio buffer: buffer too small. "
         "Expected at least 100ms of audio, but buffer only has 0.00ms of audio.", None, "e14")),
    ({"type": "response.cancel", "event_id": "e15"},
     err("response_cancel_not_active", "Cancellation failed: no active response found", None, "e15")),
    ({"type": "conversation.item.truncate", "event_id": "e16", "item_id": "item_x",
      "content_index": 0, "audio_end_ms": 10},
     err("item_truncate_invalid_item_id", "Error truncating item: the item with id 'item_x' does "
         "not exist.", "item_id", "e16")),
    ({"type": "conversation.item.retrieve", "event_id": "e17", "item_id": "item_y"},
     err("item_retrieve_invalid_item_id", "Error retrieving item: the item with id 'item_y' does "
         "not exist.", "item_id", "e17")),
    ({"type": "conversation.item.delete", "event_id": "e18", "item_id": "item_z"},
     err("item_delete_invalid_item_id", "Error deleting item: the item with id 'item_z' does not "
         "exist.", "item_id", "e18")),
    ({"type": "conversation.item.create", "event_id": "e19",
      "item": {"type": "function_call_output", "call_id": "call_none", "output": "1"}},
     err("invalid_tool_call_id", "Tool call ID 'call_none' not found in conversation.",
         "item.call_id", "e19")),
    ({"type": "conversation.item.create", "event_id": "e20", "previous_item_id": "item_gone",
      "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}]}},
     err("invalid_value", "Error adding item: the previous item with id 'item_gone' does not exist.",
         "previous_item_id", "e20")),
    # found by a logging audit: an unhashable id was a mock traceback (an ERROR line) per event
    ({"type": "response.cancel", "event_id": "e21", "response_id": {}},
     err("invalid_value", "Invalid type for 'response_id': expected a string, but got an object instead.",
         "response_id", "e21")),
]


def test_ga_error_catalogue_wire_shapes() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer() as server:
            client = await open_dialect(server, "ga")
            config_before = server.sessions[0].config
            for event, expected in GA_CASES:
                await client.send(event)
                received = await client.expect("error")
                assert received["event_id"].startswith("event_")
                if expected is None:  # unknown type: the message lists the supported types
                    error = received["error"]
                    assert (error["code"], error["param"], error["event_id"]) == \
                        ("invalid_value", "type", "e2")
                    assert error["message"].startswith("Invalid value: 'session.dance'. Supported "
                                                       "values are: 'session.update', ")
                    assert "'response.cancel'" in error["message"]
                else:
                    assert received["error"] == expected, event
            # every rejected update left the session as it was (no session.updated was sent)
            assert server.sessions[0].config == config_before
            assert "session.updated" not in server.sessions[0].server_event_types()
    run(scenario(), timeout=10)


def test_session_update_is_atomic() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer() as server:
            client = await open_dialect(server, "ga")
            await client.send({"type": "session.update", "session": {
                "type": "realtime", "instructions": "new", "audio": {"output": {"voice": "nova"}}}})
            assert (await client.expect("error"))["error"]["param"] == "session.audio.output.voice"
            await client.send({"type": "session.update", "session": {
                "type": "realtime", "audio": {"output": {"speed": 1.2}}}})
            session = (await client.expect("session.updated"))["session"]
            assert session["instructions"].startswith("Your knowledge cutoff")  # not "new"
            assert session["audio"]["output"] == {"format": {"type": "audio/pcm", "rate": 24000},
                                                  "voice": "alloy", "speed": 1.2}
    run(scenario(), timeout=10)


def test_beta_dialect_errors() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(MockOptions(beta="serve")) as server:
            client = await open_dialect(server, "beta")
            cases = [
                ({"temperature": 1.5}, err(
                    "invalid_value", "Invalid 'session.temperature': decimal above maximum value. "
                    "Expected a value <= 1.2, but got 1.5 instead.", "session.temperature", "b1")),
                ({"output_modalities": ["audio"]}, err(
                    "unknown_parameter", "Unknown parameter: 'session.output_modalities'.",
                    "session.output_modalities", "b1")),
                ({"input_audio_transcription": {"enabled": True}}, err(
                    "unknown_parameter", "Unknown parameter: 'session.input_audio_transcription.enabled'.",
                    "session.input_audio_transcription.enabled", "b1")),
                ({"voice": "marin"}, err(
                    "invalid_value", "Invalid value: 'marin'. Supported values are: 'alloy', 'ash', "
                    "'ballad', 'coral', 'echo', 'sage', 'shimmer', 'verse'.", "session.voice", "b1")),
                ({"max_response_output_tokens": 5000}, err(
                    "invalid_value", "Invalid 'session.max_response_output_tokens': integer above "
                    "maximum value. Expected a value <= 4096, but got 5000 instead.",
                    "session.max_response_output_tokens", "b1")),
            ]
            for session, expected in cases:
                await client.send({"type": "session.update", "event_id": "b1", "session": session})
                assert (await client.expect("error"))["error"] == expected
            await client.send({"type": "session.update", "session": {"temperature": 1.1,
                                                                     "max_response_output_tokens": 300}})
            updated = (await client.expect("session.updated"))["session"]
            assert updated["temperature"] == 1.1 and updated["max_response_output_tokens"] == 300
    run(scenario(), timeout=10)


BETA_VOICES = "'alloy', 'ash', 'ballad', 'coral', 'echo', 'sage', 'shimmer', 'verse'"
AUDIO_ONLY = "Invalid modalities: ['audio']. Supported combinations are: ['text'] and ['audio', 'text']."

# (response.create `response`, the exact `error` object expected): the errors session.update
# gives for the same values, named under `response.` (reference §4.2, §5.2).
RESPONSE_CASES: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {
    "ga": [
        ({"audio": {"output": {"voice": "nova"}}},
         err("invalid_value", f"Invalid value: 'nova'. Supported values are: {GA_VOICES}.",
             "response.audio.output.voice", "r")),
        ({"audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}},
         err("invalid_value", "Invalid value: 16000. Supported values are: 24000.",
             "response.audio.output.format.rate", "r")),
        ({"audio": {"output": {"bogus": 1}}},
         err("unknown_parameter", "Unknown parameter: 'response.audio.output.bogus'.",
             "response.audio.output.bogus", "r")),
        ({"output_modalities": ["audio", "text"]},
         err("invalid_value", "Invalid value: ['audio', 'text']. Supported values are: ['audio'], "
             "['text'].", "response.output_modalities", "r")),
        ({"conversation": "bogus"},
         err("invalid_value", "Invalid value: 'bogus'. Supported values are: 'auto', 'none'.",
             "response.conversation", "r")),
        ({"tool_choice": "sometimes"},
         err("invalid_value", "Invalid value: 'sometimes'. Supported values are: 'auto', 'none', "
             "'required'.", "response.tool_choice", "r")),
        ({"instructions": 5},
         err("invalid_value", "Invalid type for 'response.instructions': expected a string, but "
             "got an integer instead.", "response.instructions", "r")),
        ({"tools": [{"type": "function", "name": "f", "strict": True}]},
         err("unknown_parameter", "Unknown parameter: 'response.tools[0].strict'.",
             "response.tools[0].strict", "r")),
        ({"temperature": 0.8},
         err("unknown_parameter", "Unknown parameter: 'response.temperature'.",
             "response.temperature", "r")),
        ("x", err("invalid_value", "Invalid type for 'response': expected an object, but got a "
                  "string instead.", "response", "r")),
    ],
    "beta": [
        ({"max_output_tokens": 50},  # the GA name; beta says max_response_output_tokens
         err("unknown_parameter", "Unknown parameter: 'response.max_output_tokens'.",
             "response.max_output_tokens", "r")),
        ({"voice": "marin"},
         err("invalid_value", f"Invalid value: 'marin'. Supported values are: {BETA_VOICES}.",
             "response.voice", "r")),
        ({"output_audio_format": "mp3"},
         err("invalid_value", "Invalid value: 'mp3'. Supported values are: 'pcm16', 'g711_ulaw', "
             "'g711_alaw'.", "response.output_audio_format", "r")),
        ({"temperature": 5},
         err("invalid_value", "Invalid 'response.temperature': decimal above maximum value. "
             "Expected a value <= 1.2, but got 5 instead.", "response.temperature", "r")),
        ({"modalities": ["audio"]}, err("invalid_value", AUDIO_ONLY, "response.modalities", "r")),
        ({"conversation": "bogus"},
         err("invalid_value", "Invalid value: 'bogus'. Supported values are: 'auto', 'none'.",
             "response.conversation", "r")),
    ],
}


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_response_create_parameters_get_the_errors_session_update_gives(dialect: str) -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(dialect_options(dialect)) as server:
            client = await open_dialect(server, dialect)
            for response, expected in RESPONSE_CASES[dialect]:
                await client.send({"type": "response.create", "event_id": "r", "response": response})
                assert (await client.expect("error"))["error"] == expected, response
            # no response started: the next reply is the one to the next request
            await client.send({"type": "input_audio_buffer.clear"})
            await client.expect("input_audio_buffer.cleared")
            assert "response.created" not in server.sessions[0].server_event_types()
    run(scenario(), timeout=10)


def test_beta_audio_only_modalities_are_refused() -> None:
    """The beta dialect speaks only together with text (reference §2.1, §4.1): `modalities`
    ["audio"] alone is refused by session.update and response.create; ["audio", "text"] is fine."""
    async def scenario() -> None:
        async with MockRealtimeServer(MockOptions(beta="serve")) as server:
            client = await open_dialect(server, "beta")
            await client.send({"type": "session.update", "event_id": "m",
                               "session": {"modalities": ["audio"], "instructions": "new"}})
            assert (await client.expect("error"))["error"] == err(
                "invalid_value", AUDIO_ONLY, "session.modalities", "m")
            await client.send({"type": "response.create", "event_id": "m",
                               "response": {"modalities": ["audio"]}})
            assert (await client.expect("error"))["error"] == err(
                "invalid_value", AUDIO_ONLY, "response.modalities", "m")
            await client.send({"type": "session.update", "session": {"modalities": ["audio", "text"]}})
            session = (await client.expect("session.updated"))["session"]
            assert session["modalities"] == ["audio", "text"]
            assert session["instructions"].startswith("Your knowledge cutoff")  # not "new"
    run(scenario(), timeout=10)


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_tracing_cannot_change_once_on(dialect: str) -> None:
    """`tracing` is immutable once on (reference §4.1): another value, "auto" or null is refused;
    sending the same value again is no change and accepted."""
    def tracing_update(tracing: Any) -> dict[str, Any]:
        return {"type": "realtime", "tracing": tracing} if dialect == "ga" else {"tracing": tracing}

    async def scenario() -> None:
        async with MockRealtimeServer(dialect_options(dialect)) as server:
            client = await open_dialect(server, dialect)
            await client.send({"type": "session.update", "session": tracing_update(None)})
            assert (await client.expect("session.updated"))["session"]["tracing"] is None
            on = {"workflow_name": "wf1", "group_id": "g1"}
            for _ in range(2):
                await client.send({"type": "session.update", "session": tracing_update(on)})
                assert (await client.expect("session.updated"))["session"]["tracing"] == on
            for other in ({"workflow_name": "wf2"}, "auto", None):
                await client.send({"type": "session.update", "event_id": "tr",
                                   "session": tracing_update(other)})
                assert (await client.expect("error"))["error"] == err(
                    "invalid_value", "Cannot update a session's tracing configuration once tracing "
                    "is enabled.", "session.tracing", "tr")
            assert server.sessions[0].config["tracing"] == on
    run(scenario(), timeout=10)


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_voice_locked_after_assistant_audio(dialect: str) -> None:
    async def scenario() -> None:
        options = MockOptions(beta="serve") if dialect == "beta" else MockOptions()
        async with MockRealtimeServer(options) as server:
            client = await open_dialect(server, dialect)
            voice_update = ({"type": "realtime", "audio": {"output": {"voice": "coral"}}}
                            if dialect == "ga" else {"voice": "coral"})
            await client.send({"type": "session.update", "session": voice_update})
            await client.expect("session.updated")  # no audio yet: allowed
            await client.send({"type": "response.create"})
            await client.recv_until("response.done")
            voice_update = ({"type": "realtime", "audio": {"output": {"voice": "sage"}}}
                            if dialect == "ga" else {"voice": "sage"})
            await client.send({"type": "session.update", "event_id": "v", "session": voice_update})
            param = "session.audio.output.voice" if dialect == "ga" else "session.voice"
            assert (await client.expect("error"))["error"] == err(
                "cannot_update_voice",
                "Cannot update a conversation's voice if assistant audio is present.", param, "v")
    run(scenario(), timeout=10)


def test_truncate_validations() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer() as server:
            client = await open_dialect(server, "ga")
            await client.send({"type": "conversation.item.create", "item": {
                "id": "item_user", "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "hi"}]}})
            await client.recv_until("conversation.item.done")
            # a field of the wrong type is an invalid value, not a missing one (found by an audit)
            for field, value, got in (("audio_end_ms", 100.0, "a decimal"), ("audio_end_ms", "100", "a string"),
                                      ("item_id", 7, "an integer")):
                await client.send({"type": "conversation.item.truncate", "event_id": "t", "item_id": "item_user",
                                   "content_index": 0, "audio_end_ms": 0, field: value})
                expected = "an integer" if field == "audio_end_ms" else "a string"
                assert (await client.expect("error"))["error"] == err(
                    "invalid_value", f"Invalid type for '{field}': expected {expected}, but got {got} instead.",
                    field, "t")
            await client.send({"type": "conversation.item.truncate", "event_id": "t", "item_id": "item_user"})
            assert (await client.expect("error"))["error"] == err(
                "missing_required_parameter", "Missing required parameter: 'audio_end_ms'.", "audio_end_ms", "t")
            only_audio = err(None, "Only model output audio messages can be truncated", None, "t")
            await client.send({"type": "conversation.item.truncate", "event_id": "t",
                               "item_id": "item_user", "content_index": 0, "audio_end_ms": 0})
            assert (await client.expect("error"))["error"] == only_audio
            # an assistant text message is not audio either
            await client.send({"type": "response.create", "response": {"output_modalities": ["text"]}})
            done = (await client.recv_until("response.done"))[-1]["response"]
            await client.send({"type": "conversation.item.truncate", "event_id": "t",
                               "item_id": done["output"][0]["id"], "content_index": 0, "audio_end_ms": 0})
            assert (await client.expect("error"))["error"] == only_audio
            # an assistant audio item: 60 ms per transcript char of "You said: hi" = 720 ms
            await client.send({"type": "response.create"})
            done = (await client.recv_until("response.done"))[-1]["response"]
            item_id = done["output"][0]["id"]
            await client.send({"type": "conversation.item.truncate", "event_id": "t",
                               "item_id": item_id, "content_index": 0, "audio_end_ms": 721})
            assert (await client.expect("error"))["error"] == err(
                None, "Audio content of 720ms is already shorter than 721ms", None, "t")
            await client.send({"type": "conversation.item.truncate", "item_id": item_id,
                               "content_index": 0, "audio_end_ms": 720})
            assert (await client.expect("conversation.item.truncated"))["audio_end_ms"] == 720
    run(scenario(), timeout=10)


def test_duplicate_item_id_and_bad_content() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer() as server:
            client = await open_dialect(server, "ga")
            item = {"id": "item_dup", "type": "message", "role": "user",
                    "content": [{"type": "input_text", "text": "a"}]}
            await client.send({"type": "conversation.item.create", "item": item})
            await client.recv_until("conversation.item.done")
            await client.send({"type": "conversation.item.create", "event_id": "d", "item": item})
            assert (await client.expect("error"))["error"] == err(
                "invalid_value", "Item with id 'item_dup' already exists.", "item.id", "d")
            await client.send({"type": "conversation.item.create", "event_id": "d", "item": {
                "type": "message", "role": "assistant",
                "content": [{"type": "output_audio", "audio": base64.b64encode(pcm_tone(100)).decode()}]}})
            assert (await client.expect("error"))["error"] == err(
                "invalid_value", "Invalid value: 'output_audio'. Supported values are: 'output_text'.",
                "item.content[0].type", "d")
            # an id that is not a string is a type error, not a server_error (a traceback, found
            # by an operations audit: a list is no dict key)
            await client.send({"type": "conversation.item.create", "event_id": "p", "previous_item_id": [1],
                               "item": {**item, "id": "item_new"}})
            assert (await client.expect("error"))["error"] == err(
                "invalid_value", "Invalid type for 'previous_item_id': expected a string, but got list instead.",
                "previous_item_id", "p")
    run(scenario(), timeout=10)


def test_invalid_json_is_reported_and_session_continues() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer() as server:
            client = await open_dialect(server, "ga")
            await client.ws.send("{not json")
            error = (await client.expect("error"))["error"]
            assert error["code"] == "invalid_event" and error["event_id"] is None
            await client.ws.send("[1, 2]")
            assert (await client.expect("error"))["error"]["code"] == "invalid_event"
            await client.send({"type": "input_audio_buffer.clear"})
            await client.expect("input_audio_buffer.cleared")
    run(scenario(), timeout=10)


def test_raw_client_sees_every_error_event_recorded() -> None:
    """The session's `sent` record holds exactly what the client received."""
    async def scenario() -> None:
        async with MockRealtimeServer() as server:
            client: RawClient = await open_dialect(server, "ga")
            await client.send({"type": "bogus"})
            await client.expect("error")
            mock = server.sessions[0]
            recorded = await mock.wait_for_server_event("error")
            assert recorded == client.events[-1]
            assert mock.sent == client.events
    run(scenario(), timeout=10)


def test_fragmented_messages_are_reassembled_and_bounded() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(MockOptions(max_message_bytes=64_000)) as server:
            client = await open_dialect(server, "ga")
            await client.send({"type": "session.update",
                               "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}}})
            await client.expect("session.updated")
            audio = pcm_tone(200)
            text = '{"type":"input_audio_buffer.append","audio":"%s"}' % base64.b64encode(audio).decode()
            await client.ws.send([text[i:i + 1000] for i in range(0, len(text), 1000)])  # fragments
            await client.send({"type": "input_audio_buffer.commit"})
            committed = await client.expect("input_audio_buffer.committed")
            assert bytes(server.sessions[0].conversation.get(committed["item_id"]).audio) == audio
            big = '{"type":"input_audio_buffer.append","audio":"%s"}' % ("A" * 80_000)
            await client.recv_until("conversation.item.done")
            await client.ws.send([big[i:i + 8000] for i in range(0, len(big), 8000)])
            error = (await client.expect("error"))["error"]
            assert error["message"] == "The event is larger than the maximum allowed size of 64000 bytes."
            assert (await client.closed())[0] == 1009
    run(scenario(), timeout=10)
