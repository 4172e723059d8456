"""How the gateway pairs the upstream's answers with its session.updates (SPEC §2.1-2.2): the
upstream answers updates in the order it got them, errors may leave `event_id` null, a client's
own session.update (forwarded as-is) gets answered in the same queue, and a session that never
gets its configuration answered fails within the connect timeout instead of hanging.

The upstream here is a scripted WebSocket server speaking the GA shapes of the reference, so
each test can make the upstream do exactly the unusual thing it is about."""
from __future__ import annotations

import asyncio

import pytest

from gateway.config import NodeConfig
from gateway.errors import CLOSE_INTERNAL_ERROR
from gateway.server import GatewayServer
from tests.relay_harness import SESSION, RelayClient, ScriptedUpstream, relay
from tests.support import run

def _node(url: str, connect_timeout_s: float = 5.0) -> NodeConfig:
    return NodeConfig(host="127.0.0.1", port=0, upstream="openai", api_key="test-key-scripted",
                      upstream_url=url, connect_timeout_s=connect_timeout_s)


def test_an_update_rejected_with_a_null_event_id_is_still_retried_without_its_field():
    async def script(upstream: ScriptedUpstream) -> None:
        first = await upstream.receive("session.update")
        assert first["session"]["audio"]["output"]["voice"] == "marin"
        await upstream.refuse(None, "Invalid value: 'marin'.")
        retry = await upstream.receive("session.update")  # the first update: the seed's default voice
        assert retry["session"]["audio"]["output"]["voice"] == "alloy"
        assert retry["session"]["instructions"] == "Be brief."
        await upstream.updated()

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "voice": "marin", "instructions": "Be brief."})
            ready = await client.wait("ready", timeout=5)
            error = await client.wait("error")
            await client.close()
            return ready, error

    ready, error = run(scenario(), timeout=20)
    assert error["code"] == "InvalidConfig" and error["param"] == "voice" and error["fatal"] is False
    assert "voice" in ready["ignored"]


def test_a_configuration_never_answered_fails_within_the_connect_timeout():
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")  # and never a word about it

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(_node(url, connect_timeout_s=1.0)) as gateway:
            client = await RelayClient.connect(gateway.url)
            started = asyncio.get_running_loop().time()
            error = await client.wait("error", timeout=5)
            await client.wait_closed(5)
            elapsed = asyncio.get_running_loop().time() - started
            await gateway.wait_empty(3)
            return error, client.close_code, client.of_type("ready"), elapsed

    error, close_code, ready, elapsed = run(scenario(), timeout=20)
    assert error["code"] == "ConnectionFailed" and error["fatal"] is True
    assert "did not answer the session configuration within 1 s" in error["message"]
    assert close_code == CLOSE_INTERNAL_ERROR and ready == [] and elapsed < 2.5


def test_a_clients_own_session_update_does_not_take_the_answer_to_the_gateways():
    """A raw session.update from the client, then a `config`: the upstream answers the raw one
    and rejects the gateway's voice by event_id. The rejection is still the gateway's to
    handle: the voice is reported ignored and the rest (instructions) is sent again."""
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()                                      # ready
        raw = await upstream.receive("session.update")
        ours = await upstream.receive("session.update")
        assert raw["event_id"] == "client_raw" and ours["event_id"].startswith("gw_update_")
        await upstream.updated()                                      # answers the raw one
        await upstream.send({"type": "error", "error": {
            "type": "invalid_request_error", "code": "cannot_update_voice", "param": "session.audio.output.voice",
            "message": "Cannot update a conversation's voice if assistant audio is present.",
            "event_id": ours["event_id"]}})
        retry = await upstream.receive("session.update")
        assert retry["session"] == {"type": "realtime", "instructions": "Be brief."}
        await upstream.updated()
        await upstream.send({"type": "response.created", "response": {"id": "resp_sentinel", "status": "in_progress"}})

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready", timeout=5)
            await client.send({"type": "session.update", "event_id": "client_raw",
                               "session": {"type": "realtime", "instructions": "raw"}})
            await client.send({"type": "config", "voice": "marin", "instructions": "Be brief."})
            error = await client.wait("error", timeout=5)
            await client.wait("response_started", timeout=5)  # the script ran to its end
            await client.close()
            return error

    error = run(scenario(), timeout=20)
    assert error["code"] == "InvalidConfig" and error["param"] == "voice", error
    assert "the rest of the config applies" in error["message"]


def test_a_clients_own_rejected_update_is_answered_and_leaves_the_queue():
    """Refusals of the client's raw session.updates (with its event_id, and without one) are the
    client's errors, as the upstream sent them; they answer those updates, so the gateway's own
    `config` in between is still paired with its own answer and nothing is pinned on it."""
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()                                       # ready
        bad = await upstream.receive("session.update")
        await upstream.refuse(bad["event_id"], "Invalid value: 'nova'.")
        await upstream.receive("session.update")                       # the gateway's config
        await upstream.updated()
        await upstream.receive("session.update")                       # raw, no event_id
        await upstream.refuse(None, "Invalid value: 'nova'.")
        await upstream.send({"type": "response.created", "response": {"id": "resp_sentinel", "status": "in_progress"}})

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready", timeout=5)
            await client.send({"type": "session.update", "event_id": "cli_bad",
                               "session": {"type": "realtime", "audio": {"output": {"voice": "nova"}}}})
            await client.send({"type": "config", "voice": "ash", "instructions": "Be brief."})
            await client.send({"type": "session.update",
                               "session": {"type": "realtime", "audio": {"output": {"voice": "nova"}}}})
            await client.wait("response_started", timeout=5)   # the script ran to its end
            (session,) = gateway.sessions
            left = (list(session._updates_in_flight), list(session._pending_updates))
            await client.close()
            return client.of_type("error"), left

    errors, left = run(scenario(), timeout=20)
    assert [(e["code"], e["upstream"]["event_id"]) for e in errors] == [("UpstreamError", "cli_bad"),
                                                                        ("UpstreamError", None)]
    assert left == ([], [])


def test_a_refusal_in_the_early_2025_shape_still_asks_again_after_the_running_reply():
    """`conversation_already_has_active_response` came with code null and a shorter message from
    servers of early 2025 (reference §8): the gateway's own request lost a race all the same,
    and it asks again when the reply that won is done — no error for the client."""
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()
        ours = await upstream.receive("response.create")
        await upstream.send({"type": "response.created", "response": {"id": "resp_vad", "status": "in_progress"}})
        await upstream.refuse(ours["event_id"], "Conversation already has an active response", code=None, param=None)
        await upstream.send({"type": "response.done", "response": {"id": "resp_vad", "status": "completed"}})
        again = await upstream.receive("response.create")
        await upstream.send({"type": "response.created", "response": {"id": "resp_again", "status": "in_progress"}})
        await upstream.send({"type": "response.done", "response": {"id": "resp_again", "status": "completed"}})
        assert again["event_id"] == ours["event_id"] == "gw_response"

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready", timeout=5)
            await client.send({"type": "text", "text": "hello"})
            await client.wait("response_done", response_id="resp_again", timeout=5)
            await client.close()
            return client.of_type("error")

    assert run(scenario(), timeout=20) == []


def test_a_reply_done_without_ever_being_created_does_not_hold_back_the_next():
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()
        await upstream.receive("response.create")
        await upstream.send({"type": "response.done", "response": {"id": "resp_1", "status": "failed",
                                                                   "status_details": {"type": "failed"}}})
        await upstream.receive("response.create")   # the second text's: the test's point
        await upstream.send({"type": "response.created", "response": {"id": "resp_2", "status": "in_progress"}})
        await upstream.send({"type": "response.done", "response": {"id": "resp_2", "status": "completed"}})

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready", timeout=5)
            await client.send({"type": "text", "text": "one"})
            await client.wait("response_done", response_id="resp_1", timeout=5)
            await client.send({"type": "text", "text": "two"})
            await client.wait("response_done", response_id="resp_2", timeout=5)
            await client.close()

    run(scenario(), timeout=20)


def test_a_config_after_ready_is_answered_with_the_effective_values():
    """A `config` sent on open can cross a fast upstream's `ready` and then applies after it;
    the client learns what it got from `session_updated` (WaaV's name), sent once the upstream
    has confirmed the update, with the same fields as `ready`. A field the upstream cannot
    take gets its InvalidConfig first and is listed as ignored."""
    async def scenario():
        async with relay() as (gateway, _mock):
            client = await RelayClient.connect(gateway.url)
            ready = await client.wait("ready")
            assert ready["voice"] == "alloy" and client.of_type("session_updated") == []
            await client.send({"type": "config", "voice": "coral", "instructions": "Be brief."})
            first = await client.wait("session_updated")
            await client.send({"type": "config", "turn_detection": "none", "temperature": 0.7})
            refused = await client.wait("error", code="InvalidConfig")
            second = await client.wait("session_updated")
            await client.close()
            return client, ready, first, refused, second

    client, ready, first, refused, second = run(scenario(), timeout=20)
    fields = set(ready) - {"type", "session_id", "upstream_session_id", "_audio_before"}
    assert set(first) - {"type", "_audio_before"} == fields  # what `ready` carries, but for the ids
    assert (first["voice"], first["turn_detection"], first["model"]) == ("coral", ready["turn_detection"],
                                                                         ready["model"])
    assert first["ignored"] == []
    assert (second["voice"], second["turn_detection"]) == ("coral", "none")
    assert refused["param"] == "temperature" and second["ignored"] == ["temperature"]
    types = [event["type"] for event in client.events]
    assert types.index("error") < types.index("session_updated", types.index("session_updated") + 1)
    assert types.count("session_updated") == 2


def test_a_field_given_again_and_applied_is_no_longer_listed_as_ignored():
    """Found by a client-protocol audit: `ignored` only ever grew, so a voice refused once stayed
    listed after a later valid one was applied."""
    async def scenario():
        async with relay() as (gateway, _mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            # the seed's example voice: not a realtime voice
            await client.send({"type": "config", "voice": "nova", "instructions": "Be brief."})
            refused = await client.wait("session_updated")
            await client.send({"type": "config", "voice": "ash"})
            updated = await client.wait("session_updated")
            await client.close()
            return refused, updated

    refused, updated = run(scenario(), timeout=20)
    assert refused["ignored"] == ["voice"] and refused["voice"] == "alloy"
    assert updated["voice"] == "ash" and updated["ignored"] == []


@pytest.mark.parametrize("with_event_id", [True, False])
def test_a_voice_refusal_without_a_param_still_applies_the_rest(with_event_id):
    """Found by a protocol audit: the reference lists `cannot_update_voice` without a `param`.
    Such a refusal lost the whole `config` (the instructions sent with the voice were never
    applied); its code now names the field, and the rest is sent again (SPEC §2.2)."""
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()                                      # ready
        ours = await upstream.receive("session.update")
        await upstream.send({"type": "error", "error": {
            "type": "invalid_request_error", "code": "cannot_update_voice", "param": None,
            "message": "Cannot update a conversation's voice if assistant audio is present.",
            "event_id": ours["event_id"] if with_event_id else None}})
        retry = await upstream.receive("session.update")
        assert retry["session"] == {"type": "realtime", "instructions": "Be brief."}
        await upstream.updated()

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready", timeout=5)
            await client.send({"type": "config", "voice": "marin", "instructions": "Be brief."})
            error = await client.wait("error", timeout=5)
            updated = await client.wait("session_updated", timeout=5)  # the retry was answered
            (session,) = gateway.sessions
            left = (list(session._updates_in_flight), list(session._pending_updates))
            await client.close()
            return error, updated, left

    error, updated, left = run(scenario(), timeout=20)
    assert (error["code"], error["param"], error["fatal"]) == ("InvalidConfig", "voice", False)
    assert "the rest of the config applies" in error["message"]
    assert error["upstream"]["code"] == "cannot_update_voice"
    assert "voice" in updated["ignored"] and left == ([], [])


def test_a_refused_raw_update_without_ids_leaves_the_next_config_its_answer():
    """Found by a protocol audit: a client's raw transcription-shaped session.update, sent
    without an event_id, is refused with code, param and event_id all null (reference §8). The
    refusal was not seen as answering it, so the next `session.updated` was paired with the raw
    update, and the client's following `config` never got its `session_updated`."""
    async def scenario():
        async with relay() as (gateway, _mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "session.update", "session": {"type": "transcription"}})
            refused = await client.wait("error")
            await client.send({"type": "config", "instructions": "Be brief."})
            updated = await client.wait("session_updated")
            await client.close()
            return refused, updated

    refused, updated = run(scenario(), timeout=20)
    assert refused["code"] == "UpstreamError" and refused["upstream"]["event_id"] is None
    assert refused["message"].startswith("Passing a transcription session update")
    assert updated["ignored"] == []


def test_a_refused_transcription_session_update_is_not_pinned_on_the_gateways_update():
    """Found by a review: the refusal of a client's raw `transcription_session.update` (not a
    session.update, so not tracked) was paired with the gateway's update for the client's next
    `config`. The client got InvalidConfig for a config the upstream applied, no
    `session_updated`, and "session" in `ignored` for good. Only a client sends those."""
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "transcription_session.update",
                               "session": {"input_audio_transcription": {"model": "whisper-1"}}})
            await client.send({"type": "config", "instructions": "Be brief."})
            updated = await client.wait("session_updated")
            await client.close()
            return client.of_type("error"), updated, mock.sessions[0].config["instructions"]

    errors, updated, instructions = run(scenario(), timeout=20)
    assert [(e["code"], e["message"][:45]) for e in errors] == [
        ("UpstreamError", "Passing a transcription session update event ")]
    assert updated["ignored"] == [] and instructions == "Be brief."


def test_an_output_format_that_follows_the_input_is_not_left_listed_as_ignored():
    """Found by a review: the output format follows the input one until the client names its own.
    When the upstream refused the output format that followed, and a later input format brought
    one it took, `ignored` still listed output_audio_format: only fields the client gave again
    were taken off the list."""
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()                                      # ready
        ulaw = await upstream.receive("session.update")
        assert ulaw["session"]["audio"]["output"]["format"] == {"type": "audio/pcmu"}
        await upstream.refuse(ulaw["event_id"], "Invalid value: 'audio/pcmu'.", param="session.audio.output.format")
        retry = await upstream.receive("session.update")  # the input format alone
        assert "output" not in retry["session"]["audio"]
        await upstream.updated()
        pcm = await upstream.receive("session.update")
        assert pcm["session"]["audio"]["output"]["format"]["type"] == "audio/pcm"
        await upstream.updated()

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready", timeout=5)
            await client.send({"type": "config", "input_audio_format": "g711_ulaw"})
            error = await client.wait("error", timeout=5)
            refused = await client.wait("session_updated", timeout=5)
            await client.send({"type": "config", "input_audio_format": "pcm16"})
            updated = await client.wait("session_updated", timeout=5)
            await client.close()
            return error, refused, updated

    error, refused, updated = run(scenario(), timeout=20)
    assert (error["code"], error["param"]) == ("InvalidConfig", "output_audio_format")
    assert refused["ignored"] == ["output_audio_format"]
    assert updated["ignored"] == []


def test_a_raw_session_update_the_upstream_applied_is_answered_with_session_updated():
    """Found by a flow audit: a client's raw session.update was forwarded and applied, but only
    a refusal reached the client; the upstream's session.updated was kept from it, so it could
    not tell the update had applied, nor what the session now is."""
    async def scenario():
        async with relay() as (gateway, _mock):
            client = await RelayClient.connect(gateway.url)
            ready = await client.wait("ready")
            await client.send({"type": "session.update", "event_id": "mine",
                               "session": {"type": "realtime", "audio": {"output": {"voice": "ash"}}}})
            updated = await client.wait("session_updated")
            # a raw update of the output format: the gateway relays (and cuts replies) in it
            await client.send({"type": "session.update", "session": {
                "type": "realtime", "audio": {"output": {"format": {"type": "audio/pcmu"}}}}})
            pcmu = await client.wait("session_updated")
            (session,) = gateway.sessions
            bytes_per_ms = session.output_bytes_per_ms
            await client.close()
            return ready, updated, pcmu, bytes_per_ms

    ready, updated, pcmu, bytes_per_ms = run(scenario(), timeout=20)
    assert ready["voice"] == "alloy" and updated["voice"] == "ash" and updated["ignored"] == []
    assert pcmu["output_audio_format"] == "g711_ulaw" and pcmu["input_audio_format"] == "pcm16"
    assert bytes_per_ms == 8


def test_a_field_listed_under_one_spelling_leaves_the_list_when_applied_under_another():
    """Found by a review: `ignored` was cleared under the client's latest spelling only, so a
    threshold refused as `vad.threshold` stayed listed after `turn_detection.threshold` applied."""
    async def scenario():
        async with relay() as (gateway, _mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": {"mode": "server_vad", "threshold": 0.5}})
            await client.wait("ready")
            await client.send({"type": "config", "vad": {"threshold": 2}})
            refused = await client.wait("error")
            await client.send({"type": "config", "turn_detection": {"mode": "server_vad", "threshold": 0.6}})
            updated = await client.wait("session_updated")
            await client.close()
            return refused, updated

    refused, updated = run(scenario(), timeout=20)
    assert refused["param"] == "vad.threshold" and updated["ignored"] == []


def test_an_output_format_named_by_a_raw_update_does_not_follow_a_later_input_format():
    """Found by a review: the output format follows the input one until the client names its
    own; naming it in a raw session.update did not count, so a later `input_audio_format` moved
    the output format the client had set."""
    async def scenario():
        async with relay() as (gateway, _mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "session.update", "session": {
                "type": "realtime", "audio": {"output": {"format": {"type": "audio/pcmu"}}}}})
            await client.wait("session_updated")
            await client.send({"type": "config", "input_audio_format": "g711_alaw"})
            updated = await client.wait("session_updated")
            await client.close()
            return updated

    updated = run(scenario(), timeout=20)
    assert (updated["input_audio_format"], updated["output_audio_format"]) == ("g711_alaw", "g711_ulaw")


def test_a_refused_update_does_not_undo_a_newer_one_still_on_its_way():
    """Found by a review: the retry of a refused update (its other fields, SPEC §2.2) went up
    after the client's newer update and set the older values again (instructions "A" after
    "B"); and a refused input format made the gateway fall back to the upstream's while the
    newer format was still on its way. What a newer update sets is left to it."""
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()                                       # ready
        older = await upstream.receive("session.update")               # voice ash, instructions A
        newer = await upstream.receive("session.update")               # instructions B
        assert newer["session"] == {"type": "realtime", "instructions": "B"}
        await upstream.send({"type": "error", "error": {
            "type": "invalid_request_error", "code": "cannot_update_voice", "param": None,
            "message": "Cannot update a conversation's voice if assistant audio is present.",
            "event_id": older["event_id"]}})
        await upstream.updated()                                       # the newer one applied
        formats = await upstream.receive("session.update")             # input alaw (nothing else sent between)
        assert formats["session"]["audio"]["input"]["format"] == {"type": "audio/pcma"}
        ulaw = await upstream.receive("session.update")
        await upstream.refuse(formats["event_id"], "Invalid value: 'audio/pcma'.", param="session.audio.input.format")
        await upstream.receive("conversation.item.create")
        pcmu = {"type": "audio/pcmu"}
        await upstream.send({"type": "session.updated", "session": {**SESSION, "audio": {
            "input": {**SESSION["audio"]["input"], "format": pcmu}, "output": {**SESSION["audio"]["output"], "format": pcmu}}}})
        await upstream.receive("session.update")                       # the client's last config
        await upstream.send({"type": "error", "error": {"message": f"last {ulaw['session']['audio']['input']}"}})

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready", timeout=5)
            (session,) = gateway.sessions
            await client.send({"type": "config", "voice": "ash", "instructions": "A"})
            await client.send({"type": "config", "instructions": "B"})
            await client.wait("error", timeout=5)                       # the voice refused
            await client.wait("session_updated", timeout=5)
            await client.send({"type": "config", "input_audio_format": "g711_alaw"})
            await client.send({"type": "config", "input_audio_format": "g711_ulaw"})
            refused = await client.wait("error", timeout=5)
            format_meanwhile = session.input_format
            await client.send({"type": "text", "text": "read", "respond": False})  # the newer one may be answered now
            await client.send({"type": "config", "instructions": "C"})
            last = await client.wait("error", timeout=5)
            updated = client.of_type("session_updated")[-1]
            await client.close()
            return refused, format_meanwhile, last, updated

    refused, format_meanwhile, last, updated = run(scenario(), timeout=20)
    assert refused["param"] == "input_audio_format" and format_meanwhile == "g711_ulaw"
    assert updated["input_audio_format"] == "g711_ulaw" and updated["ignored"] == ["voice"]
    assert last["message"] == "last {'format': {'type': 'audio/pcmu'}}"


async def _ready_then_a_config_and_a_raw_update(upstream: ScriptedUpstream) -> tuple[dict, dict]:
    """The scripted upstream's side up to a `config`'s update and the client's raw one after it."""
    await upstream.receive("session.update")
    await upstream.updated()                                           # ready
    return await upstream.receive("session.update"), await upstream.receive("session.update")


async def _errors_until_seen(client: RelayClient) -> None:
    """The client's errors up to the scripted upstream's marker: all the gateway sent before it."""
    while "seen" not in (await client.wait("error", timeout=5))["message"]:
        pass


def _sessions_sent(upstream: ScriptedUpstream) -> list[dict]:
    return [event["session"] for event in upstream.received if event["type"] == "session.update"]


@pytest.mark.parametrize("raw_session", [{"instructions": "B"}, {"audio": {"input": {"turn_detection": None}}}],
                         ids=["instructions", "turn_detection"])
def test_a_refused_update_does_not_undo_a_newer_raw_update_still_on_its_way(raw_session: dict):
    """A client's own session.update, forwarded as-is, is as newer as its `config`s: the retry
    of an older refused update must not set what the raw one sets (instructions "A" after "B";
    server VAD back on after the raw update turned it off)."""
    async def script(upstream: ScriptedUpstream) -> None:
        older, _raw = await _ready_then_a_config_and_a_raw_update(upstream)  # voice ash, instructions A, VAD
        await upstream.refuse(older["event_id"], "Cannot update a conversation's voice.",
                              code="cannot_update_voice", param=None)
        await upstream.updated()                                       # the raw one applied
        await upstream.receive("conversation.item.create")             # the client's next word
        await upstream.send({"type": "error", "error": {"message": "seen"}})

    upstream = ScriptedUpstream(script)

    async def scenario():
        async with upstream as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready", timeout=5)
            await client.send({"type": "config", "voice": "ash", "instructions": "A", "vad": {"threshold": 0.7}})
            await client.send({"type": "session.update", "session": {"type": "realtime", **raw_session}})
            await client.wait("session_updated", timeout=5)
            await client.send({"type": "text", "text": "read", "respond": False})
            await _errors_until_seen(client)
            await client.close()

    run(scenario(), timeout=20)
    updates = _sessions_sent(upstream)
    retries = updates[3:]  # after the first, the refused one and the raw one
    assert all(set(raw_session) & set(retry) == set() for retry in retries), retries


@pytest.mark.parametrize("refusal_id", ["its_event_id", "null"])
def test_a_refused_raw_update_gives_back_what_an_older_configs_retry_left_to_it(refusal_id: str):
    """Found by a review: a raw session.update counted as newer even when the upstream refused it
    too. The gateway then stayed on the config's refused input format (relaying G.711 arithmetic
    to a PCM16 upstream) and lost the config's other fields the raw one named, while telling
    the client "the rest of the config applies". A client's raw update counts only once the
    upstream takes it: the refused format falls back at once, and what the retry left to the raw
    update goes up when that is refused."""
    async def script(upstream: ScriptedUpstream) -> None:
        # alaw both ways and instructions A; then pcmu out, instructions B and a bogus field
        older, raw = await _ready_then_a_config_and_a_raw_update(upstream)
        await upstream.refuse(older["event_id"], "Invalid value: 'audio/pcma'.", param="session.audio.input.format")
        await upstream.receive("session.update")                       # the retry: what is left
        await upstream.refuse(raw["event_id"] if refusal_id == "its_event_id" else None,  # (the oldest in flight)
                              "Unknown parameter: 'session.bogus'.", code="unknown_parameter", param="session.bogus")
        await upstream.receive("session.update")                       # what the retry left to it
        await upstream.send({"type": "error", "error": {"message": "seen"}})

    upstream = ScriptedUpstream(script)

    async def scenario():
        async with upstream as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready", timeout=5)
            (session,) = gateway.sessions
            await client.send({"type": "config", "input_audio_format": "g711_alaw",
                               "output_audio_format": "g711_alaw", "instructions": "A", "voice": "ash"})
            await client.send({"type": "session.update", "event_id": "raw1", "session": {
                "type": "realtime", "bogus": 1, "instructions": "B",
                "audio": {"output": {"format": {"type": "audio/pcmu"}}}}})
            refused = await client.wait("error", timeout=5)
            format_after_refusal = session.input_format
            await _errors_until_seen(client)
            await client.close()
            return refused, format_after_refusal

    refused, format_after_refusal = run(scenario(), timeout=20)
    assert refused["param"] == "input_audio_format" and format_after_refusal == "pcm16"
    updates = _sessions_sent(upstream)
    retry, given_back = updates[3], updates[4]
    assert "instructions" not in retry and "format" not in retry.get("audio", {}).get("output", {})
    assert given_back["instructions"] == "A"
    assert given_back["audio"]["output"]["format"] == {"type": "audio/pcma"}


def test_a_partial_session_updated_changes_only_what_it_states():
    """Found by a review: the upstream's session object was read whole, an absent
    turn_detection as "none": a `session.updated` stating only the voice made
    `session_updated` report VAD off and null formats, and the gateway could then fall back to
    PCM16 while the upstream used G.711."""
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()                                        # ready: server VAD, PCM16
        await upstream.receive("session.update")
        await upstream.send({"type": "session.updated", "session": {"type": "realtime",
                                                                    "audio": {"output": {"voice": "ash"}}}})

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready", timeout=5)
            await client.send({"type": "config", "voice": "ash", "input_audio_format": "g711_ulaw"})
            updated = await client.wait("session_updated", timeout=5)
            (session,) = gateway.sessions
            relayed = session.input_format
            await client.close()
            return updated, relayed

    updated, relayed = run(scenario(), timeout=20)
    assert (updated["voice"], updated["turn_detection"]) == ("ash", "server_vad")
    assert updated["input_audio_format"] == "pcm16"  # the last the upstream stated
    assert relayed == "g711_ulaw"  # what the client sends, until the upstream says otherwise


def test_a_raw_update_without_an_event_id_is_told_apart_when_the_upstream_refuses_it():
    """Found by a protocol audit: a client's raw session.update without an event_id, refused by
    an error that names no `session.*` param, could not be told from any other error (the
    upstream echoes the event_id, null for an event that had none). It stayed "in flight" for
    good: a later config's retry waited on it (its instructions never went up), and every later
    session.updated was paired one update early (a raw switch to G.711 was never followed). The
    gateway now gives such an update an id of its own; the client sees the refusal with none."""
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()                                       # ready
        raw = await upstream.receive("session.update")
        await upstream.refuse(raw["event_id"], "Invalid session configuration.", param=None)
        config = await upstream.receive("session.update")
        await upstream.refuse(config["event_id"], "Cannot update a conversation's voice if assistant audio is present.",
                              code="cannot_update_voice", param="session.audio.output.voice")
        await upstream.receive("session.update")                       # the rest of the config
        await upstream.updated()
        await upstream.receive("session.update")                       # raw: the output in G.711
        pcmu = {**SESSION, "audio": {**SESSION["audio"], "output": {**SESSION["audio"]["output"],
                                                                    "format": {"type": "audio/pcmu"}}}}
        await upstream.send({"type": "session.updated", "session": pcmu})

    upstream = ScriptedUpstream(script)

    async def scenario():
        async with upstream as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready", timeout=5)
            await client.send({"type": "session.update", "session": {"type": "realtime", "instructions": "raw"}})
            refused = await client.wait("error", timeout=5)
            await client.send({"type": "config", "voice": "cedar", "instructions": "Be brief."})
            voice = await client.wait("error", timeout=5)
            await client.wait("session_updated", timeout=5)            # the rest applied
            await client.send({"type": "session.update", "session": {
                "type": "realtime", "audio": {"output": {"format": {"type": "audio/pcmu"}}}}})
            pcmu = await client.wait("session_updated", timeout=5)
            (session,) = gateway.sessions
            state = session.output_bytes_per_ms, list(session._updates_in_flight)
            await client.close()
            return refused, voice, pcmu, state

    refused, voice, pcmu, (bytes_per_ms, in_flight) = run(scenario(), timeout=20)
    raw = upstream.received[1]
    assert raw["type"] == "session.update" and raw["event_id"].startswith("gw_client_update_")
    assert refused["code"] == "UpstreamError" and refused["upstream"]["event_id"] is None
    assert voice["param"] == "voice" and "the rest of the config applies" in voice["message"]
    assert _sessions_sent(upstream)[3] == {"type": "realtime", "instructions": "Be brief."}
    assert pcmu["output_audio_format"] == "g711_ulaw" and bytes_per_ms == 8 and in_flight == []
