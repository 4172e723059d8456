"""Conversation flows the gateway runs on the client's behalf (SPEC §2.2-2.4): the replies it asks
for itself, function calls, a manual barge-in (`cancel_response`), and what an interrupted reply
leaves behind — end to end through a real node and the mock."""
from __future__ import annotations

import asyncio
import base64

import orjson
import pytest

from gateway.config import NodeConfig
from gateway.mock import MockOptions
from gateway.server import GatewayServer
from tests.relay_harness import (BYTES_PER_MS, TEST_KEY, RelayClient, ScriptedUpstream, frames, relay, silence,
                                 speech_like)
from tests.support import run

REALTIME = MockOptions(pacing="realtime", delta_ms=100, record=True)
WEATHER = [{"type": "function", "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def _finals(client: RelayClient, role: str = "assistant") -> list[dict]:
    return [e for e in client.of_type("transcript") if e["role"] == role and e["is_final"]]


def _no_errors(client: RelayClient) -> None:
    assert client.of_type("error") == [], client.of_type("error")


async def _speak(client: RelayClient, seconds: float, seed: int) -> None:
    for frame in frames(speech_like(seconds, seed=seed) + silence(0.5), 4800):
        await client.send_audio(frame)


async def _a_weather_call(client: RelayClient) -> dict:
    """Configure get_weather under server VAD, ask about the weather: the call, its reply done."""
    await client.send({"type": "config", "tools": WEATHER, "vad": {"silence_duration_ms": 300}})
    await client.wait("ready")
    await client.send({"type": "text", "text": "what is get_weather in Paris"})
    asking = await client.wait("response_started")
    call = await client.wait("function_call")
    await client.wait("response_done", response_id=asking["response_id"])
    return call


def test_a_function_result_sent_while_another_reply_runs_is_answered_after_it():
    """The user speaks before the app has answered a tool call: the echo of that turn is the
    active response when the result arrives. The upstream refuses a second response.create, so
    the gateway asks once the echo is done — and the result gets its reply."""
    async def scenario():
        async with relay(REALTIME) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            call = await _a_weather_call(client)
            await _speak(client, 1.2, seed=5)
            echo = await client.wait("response_started", timeout=5)
            await client.send({"type": "function_result", "call_id": call["call_id"], "output": '{"temp_c":18}'})
            done = await client.wait("response_done", response_id=echo["response_id"], timeout=6)
            assert done["status"] == "completed"
            after = await client.wait("response_started", timeout=5)
            final = await client.wait("transcript", role="assistant", is_final=True,
                                      response_id=after["response_id"], timeout=5)
            assert final["text"] == 'The get_weather function returned {"temp_c":18}'
            assert (await client.wait("response_done", response_id=after["response_id"]))["status"] == "completed"
            _no_errors(client)
            upstream = mock.sessions[0]
            assert [e["type"] for e in upstream.received if e["type"] != "input_audio_buffer.append"][-2:] == [
                "conversation.item.create", "response.create"]
    run(scenario(), timeout=40)


async def _barrier(client: RelayClient) -> None:
    """Returns once the upstream has handled everything the gateway sent before it: a raw event
    the mock refuses, in order, and whose error comes back."""
    await client.send({"type": "conversation.item.retrieve", "item_id": "item_barrier"})
    await client.wait("error", code="UpstreamError")


async def _answer_barrier(upstream: ScriptedUpstream, asked: list[dict]) -> None:
    """A scripted upstream's side of `_barrier`: the response.creates the gateway sent before it
    go into `asked`, then the barrier's refusal goes back."""
    barrier = await upstream.receive("conversation.item.retrieve")
    asked.extend(e for e in upstream.received if e["type"] == "response.create")
    await upstream.send({"type": "error", "error": {
        "type": "invalid_request_error", "code": "item_retrieve_invalid_item_id", "param": None,
        "message": "Error retrieving item: the item with id 'item_barrier' does not exist.",
        "event_id": barrier.get("event_id")}})


async def _text_barrier(client: RelayClient) -> None:
    """`_barrier` for a session whose earlier errors are under test: a text asking for no reply,
    whose refusal (`_answer_text_barrier`) is told apart by its message."""
    await client.send({"type": "text", "text": "barrier", "respond": False})
    await client.wait("error", message="text seen")


async def _answer_text_barrier(upstream: ScriptedUpstream) -> None:
    await upstream.receive("conversation.item.create")
    await upstream.send({"type": "error", "error": {"message": "text seen"}})


def _node(url: str) -> NodeConfig:
    return NodeConfig(host="127.0.0.1", port=0, upstream="openai", api_key=TEST_KEY, upstream_url=url)


def test_a_function_result_goes_up_after_the_audio_sent_before_it():
    """Found by a flow audit: `text`, `commit`, `create_response` and raw events keep the
    client's order (audio the coalescer holds goes up first); `function_result` did not, and its
    output and reply request overtook up to --coalesce-ms of the audio sent before it."""
    async def scenario():
        async with relay(MockOptions(record=True), coalesce_ms=200) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "tools": WEATHER, "turn_detection": "none"})
            await client.wait("ready")
            await client.send({"type": "text", "text": "what is get_weather in Paris"})
            call = await client.wait("function_call")
            await client.wait("response_done")
            upstream = mock.sessions[0]
            before = len(upstream.received)
            await client.send_audio(speech_like(0.1, seed=3))  # 100 ms: the 200 ms coalescer holds it
            await client.send({"type": "function_result", "call_id": call["call_id"], "output": "sunny"})
            await client.wait("response_started")
            await client.wait("response_done")
            await client.close()
            return [event["type"] for event in upstream.received[before:]]

    assert run(scenario(), timeout=20) == ["input_audio_buffer.append", "conversation.item.create", "response.create"]


@pytest.mark.parametrize("turn_end", ["speech_stopped", "clear_audio", "vad_off", "vad_change", "audio_stops"])
def test_a_function_result_sent_while_the_user_speaks_waits_for_the_end_of_the_turn(turn_end):
    """Found by a client-protocol audit: the gateway asked for the result's reply while the user
    was still talking, so it talked over them, and their turn then got no reply at all (one was
    running when it ended). Now the request waits for the turn: the reply the upstream's VAD
    creates for it has seen the result and answers both. A turn no speech_stopped will end gets
    the request at once: one the client drops (`clear_audio`), turns VAD off or restarts it for
    (new VAD settings: found by a review, the reply hung), or stops sending audio in (the
    node's once-a-second sweep sees no new audio)."""
    speech = speech_like(1.2, seed=11)
    half = len(speech) // 2

    async def scenario():
        async with relay(MockOptions(record=True)) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            call = await _a_weather_call(client)
            for frame in frames(speech[:half], 4800):
                await client.send_audio(frame)
            await client.wait("speech_started")
            await client.send({"type": "function_result", "call_id": call["call_id"], "output": '{"temp_c":18}'})
            if turn_end == "speech_stopped":
                for frame in frames(speech[half:] + silence(0.5), 4800):
                    await client.send_audio(frame)
                await client.wait("speech_stopped")
            elif turn_end == "clear_audio":
                await client.send({"type": "clear_audio"})
            elif turn_end == "vad_off":
                await client.send({"type": "config", "turn_detection": "none"})
            elif turn_end == "vad_change":
                await client.send({"type": "config", "vad": {"threshold": 0.6}})
            reply = await client.wait("response_started")
            await client.wait("response_done", response_id=reply["response_id"])
            await _barrier(client)
            return client, mock.sessions[0]

    client, upstream = run(scenario(), timeout=30)
    types = [e["type"] for e in client.events if e["type"] != "level"]
    ended = types.index(turn_end if turn_end == "speech_stopped" else "speech_started")
    assert types.count("response_started") == 2                     # the call's, then ONE reply
    assert types.index("response_started", types.index("function_call")) > ended  # not over the user
    sent = [e["type"] for e in upstream.received if e["type"] != "input_audio_buffer.append"]
    result = sent.index("conversation.item.create", sent.index("response.create"))
    if turn_end == "speech_stopped":
        assert "response.create" not in sent[result:]  # the VAD's reply answered it
    elif turn_end == "audio_stops":
        assert sent[result:].count("response.create") == 1
    else:
        ended_by = "input_audio_buffer.clear" if turn_end == "clear_audio" else "session.update"
        assert sent[result:].index(ended_by) < sent[result:].index("response.create")
    assert [e["error"]["code"] for e in upstream.sent if e["type"] == "error"] == ["item_retrieve_invalid_item_id"]


def test_a_text_sent_before_a_barge_in_is_answered_by_the_reply_to_the_interrupting_turn():
    """Found by the same audit: a `text` sent while reply A played waited for A; the user then
    barged in, A was cut, and the gateway asked for the text's reply at once, over the user,
    whose turn then went unanswered. Now one reply, after the turn, answers both."""
    async def scenario():
        async with relay(REALTIME) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "vad": {"silence_duration_ms": 300}})
            await client.wait("ready")
            await client.send({"type": "text", "text": "tell me a long story"})
            first = await client.wait("response_started")
            await client.send({"type": "text", "text": "and a short one", "respond": True})
            await _speak(client, 1.2, seed=12)
            await client.wait("interrupted", response_id=first["response_id"])
            await client.wait("speech_stopped", timeout=5)
            reply = await client.wait("response_started", timeout=5)
            await client.wait("response_done", response_id=reply["response_id"], timeout=10)
            await _barrier(client)
            return client, mock.sessions[0]

    client, upstream = run(scenario(), timeout=40)
    types = [e["type"] for e in client.events if e["type"] != "level"]
    assert types.count("response_started") == 2
    assert types.index("response_started", types.index("interrupted")) > types.index("speech_stopped")
    assert len([e for e in upstream.received if e["type"] == "response.create"]) == 1  # the first text's


def test_a_second_text_turn_during_a_reply_gets_its_own_reply():
    async def scenario():
        async with relay(REALTIME) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            await client.wait("ready")
            await client.send({"type": "text", "text": "first question"})
            first = await client.wait("response_started")
            await client.send({"type": "text", "text": "second question"})
            await client.wait("response_done", response_id=first["response_id"], timeout=10)
            second = await client.wait("response_started", timeout=5)
            await client.wait("response_done", response_id=second["response_id"], timeout=10)
            assert [f["text"] for f in _finals(client)] == ["You said: first question", "You said: second question"]
            _no_errors(client)
    run(scenario(), timeout=40)


def test_a_reply_the_gateway_asked_for_that_loses_a_race_is_asked_for_again():
    """A response that started first (here the client's own `response.create`, forwarded as-is,
    standing in for server VAD) makes the upstream refuse the gateway's: the refusal is not the
    client's error, and the gateway asks again once that response is done."""
    async def scenario():
        async with relay(REALTIME) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            await client.wait("ready")
            await client.send({"type": "response.create"})   # upstream-shaped: goes up as it is
            await client.send({"type": "text", "text": "are you there"})
            first = await client.wait("response_started")
            await client.wait("response_done", response_id=first["response_id"], timeout=10)
            second = await client.wait("response_started", timeout=5)
            final = await client.wait("transcript", role="assistant", is_final=True,
                                      response_id=second["response_id"], timeout=10)
            assert final["text"] == "You said: are you there"
            _no_errors(client)
            refused = [e for e in mock.sessions[0].sent if e["type"] == "error"]
            assert [e["error"]["code"] for e in refused] == ["conversation_already_has_active_response"]
    run(scenario(), timeout=40)


def test_a_function_call_cut_off_by_cancel_is_not_sent_to_the_client():
    properties = {f"field_{i:03d}": {"type": "string"} for i in range(400)}  # long arguments
    tools = [{"type": "function", "name": "big_tool", "parameters": {"type": "object", "properties": properties}}]

    async def scenario():
        async with relay(MockOptions(record=True)) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none", "tools": tools})
            await client.wait("ready")
            upstream = mock.sessions[0]
            await client.send({"type": "text", "text": "run big_tool"})
            await upstream.wait_for_server_event("response.function_call_arguments.delta", timeout=5)
            await client.send({"type": "cancel_response"})
            assert (await client.wait("response_done", timeout=5))["status"] == "cancelled"
            cut = [e["item"] for e in upstream.sent if e["type"] == "response.output_item.done"]
            assert [item["status"] for item in cut] == ["incomplete"]
            # a later turn's reply comes after anything the cancelled one could still produce
            await client.send({"type": "text", "text": "never mind"})
            await client.wait("response_done", status="completed", timeout=5)
            assert client.of_type("function_call") == []
            # and a completed call still is
            await client.send({"type": "text", "text": "run big_tool"})
            call = await client.wait("function_call", timeout=10)
            assert set(orjson.loads(call["arguments"])) == set(properties)
    run(scenario(), timeout=40)


async def _reply_playing(client: RelayClient, mock, text: str = "tell me a rather long story about the sea please",
                         audio_ms: int = 500) -> dict:
    await client.send({"type": "text", "text": text})
    response = await client.wait("response_started")
    await client.wait_audio(audio_ms * BYTES_PER_MS, timeout=5)
    return response


def test_cancel_response_while_a_reply_plays_interrupts_it_and_truncates_upstream():
    async def scenario():
        async with relay(REALTIME) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            await client.wait("ready")
            response = await _reply_playing(client, mock)
            await client.send({"type": "playback", "played_ms": 300})
            await client.send({"type": "cancel_response"})
            interrupted = await client.wait("interrupted", timeout=5)
            assert interrupted == {"type": "interrupted", "response_id": response["response_id"], "played_ms": 300,
                                   "_audio_before": interrupted["_audio_before"]}
            upstream = mock.sessions[0]
            truncate = await upstream.wait_for_client_event("conversation.item.truncate", timeout=5)
            assert truncate["audio_end_ms"] == 300 and truncate["content_index"] == 0
            assert (await upstream.wait_for_server_event("conversation.item.truncated", timeout=5))["audio_end_ms"] == 300
            order = [e["type"] for e in upstream.received if e["type"] in ("response.cancel", "conversation.item.truncate")]
            assert order == ["response.cancel", "conversation.item.truncate"]
            done = await client.wait("response_done", response_id=response["response_id"], timeout=5)
            assert done["status"] == "cancelled" and done["_audio_before"] == interrupted["_audio_before"]
            _no_errors(client)
    run(scenario(), timeout=30)


async def _a_reply_generated_in_full(client: RelayClient) -> tuple[dict, dict]:
    """Push-to-talk, a text whose reply (several seconds) the fast-pacing mock generates at
    once: its response_started and response_done, the client still playing it."""
    await client.send({"type": "config", "turn_detection": "none"})
    await client.wait("ready")
    await client.send({"type": "text", "text": "tell me a rather long story about the sea please"})
    started = await client.wait("response_started", timeout=5)
    done = await client.wait("response_done", timeout=5)
    return started, done


def test_cancel_response_over_a_reply_generated_in_full_is_a_barge_in_without_an_error():
    """Models generate faster than real time (reference §7.6), so a manual barge-in usually
    finds the reply done upstream: nothing runs to cancel there. The client gets
    `interrupted`, the upstream a truncate, and no cancel that could only be refused."""
    async def scenario():
        async with relay(MockOptions(record=True)) as (gateway, mock):  # fast pacing
            client = await RelayClient.connect(gateway.url)
            started, done = await _a_reply_generated_in_full(client)
            assert done["status"] == "completed" and done["_audio_before"] > 1000 * BYTES_PER_MS
            await client.send({"type": "playback", "played_ms": 300})
            await client.send({"type": "cancel_response"})
            interrupted = await client.wait("interrupted", timeout=5)
            assert interrupted["response_id"] == done["response_id"] and interrupted["played_ms"] == 300
            upstream = mock.sessions[0]
            assert (await upstream.wait_for_server_event("conversation.item.truncated", timeout=5))["audio_end_ms"] == 300
            # the upstream answers in order: once the next reply starts, an error would be here
            await client.send({"type": "text", "text": "and another one"})
            assert (await client.wait("response_started", timeout=5))["response_id"] != started["response_id"]
            assert [e for e in upstream.received if e["type"] == "response.cancel"] == []
            _no_errors(client)
    run(scenario(), timeout=30)


def test_cancel_response_over_a_played_reply_leaves_the_reply_asked_for_just_before_it():
    """Found by a flow audit: a client playing a reply generated in full sends a `text`, then
    `cancel_response` to stop the reply it hears. The cancel went up bare, so it cancelled the
    upstream's running reply: the one answering the text, which ended with no audio and no
    error, and was never asked for again. It now names the reply it cuts, and only while that
    one runs."""
    async def scenario():
        async with relay(MockOptions(record=True)) as (gateway, mock):  # fast pacing
            client = await RelayClient.connect(gateway.url)
            _, heard = await _a_reply_generated_in_full(client)
            await client.send({"type": "playback", "played_ms": 300})
            await client.send({"type": "text", "text": "new question"})
            await client.send({"type": "cancel_response"})
            interrupted = await client.wait("interrupted", timeout=5)
            answer = await client.wait("response_started", timeout=5)
            done = await client.wait("response_done", response_id=answer["response_id"], timeout=5)
            upstream = mock.sessions[0]
            cancels = [e for e in upstream.received if e["type"] == "response.cancel"]
            await client.close()
            return heard, interrupted, done, cancels

    heard, interrupted, done, cancels = run(scenario(), timeout=30)
    assert interrupted["response_id"] == heard["response_id"] and interrupted["played_ms"] == 300
    assert done["status"] == "completed" and done["response_id"] != heard["response_id"]
    assert cancels == []


def test_a_clients_event_with_the_gateways_event_id_prefix_is_refused_not_swallowed():
    """The gateway swallows "no active response" for its own tagged cancel (gw_cancel): a
    client's pass-through cancel with that id must get an error, not silence."""
    async def scenario():
        async with relay(MockOptions(record=True)) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "response.cancel", "event_id": "gw_cancel"})
            refused = await client.wait("error", timeout=5)
            assert (refused["code"], refused["param"], refused["fatal"]) == ("InvalidMessage", "event_id", False)
            await client.send({"type": "response.cancel", "event_id": "mine"})  # the client's own id: forwarded
            answered = await client.wait("error", timeout=5)
            assert answered["code"] == "UpstreamError" and answered["upstream"]["event_id"] == "mine"
            upstream = mock.sessions[0]
            assert [e.get("event_id") for e in upstream.received if e["type"] == "response.cancel"] == ["mine"]
    run(scenario(), timeout=20)


def test_a_barge_in_before_playback_started_truncates_at_zero():
    """`played_ms: 0` (the client's jitter buffer was still filling): the reply's audio exists
    upstream, so it is truncated to nothing — the model must not believe it was heard."""
    async def scenario():
        async with relay(REALTIME) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "vad": {"silence_duration_ms": 300}})
            await client.wait("ready")
            response = await _reply_playing(client, mock)
            await client.send({"type": "playback", "played_ms": 0})
            await _speak(client, 0.5, seed=8)
            assert (await client.wait("interrupted", timeout=5))["played_ms"] == 0
            upstream = mock.sessions[0]
            truncate = await upstream.wait_for_client_event("conversation.item.truncate", timeout=5)
            assert truncate["audio_end_ms"] == 0
            assert (await upstream.wait_for_server_event("conversation.item.truncated", timeout=5))["audio_end_ms"] == 0
            await client.wait("response_done", response_id=response["response_id"], timeout=5)
            item = upstream.conversation.items()[1]  # the user's text, then the reply
            assert item.id == truncate["item_id"] and item.role == "assistant" and len(item.audio) == 0
            _no_errors(client)
    run(scenario(), timeout=30)


def test_an_interrupted_reply_still_gets_its_final_transcript_flagged_interrupted():
    async def scenario():
        async with relay(REALTIME) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "vad": {"silence_duration_ms": 300}})
            await client.wait("ready")
            response = await _reply_playing(client, mock, audio_ms=1500)
            await _speak(client, 0.5, seed=8)
            interrupted = await client.wait("interrupted", timeout=5)
            final = await client.wait("transcript", role="assistant", is_final=True,
                                      response_id=response["response_id"], timeout=5)
            sent = [e["transcript"] for e in mock.sessions[0].sent
                    if e["type"] == "response.output_audio_transcript.done" and e["item_id"] == final["item_id"]]
            assert final["interrupted"] is True and [final["text"]] == sent
            partials = [e["text"] for e in client.of_type("transcript")
                        if e.get("response_id") == response["response_id"] and not e["is_final"]]
            assert final["text"].startswith("".join(partials))   # the partials were its beginning
            assert final["_audio_before"] == interrupted["_audio_before"]   # no audio after `interrupted`
            # finals of replies that were not interrupted carry no flag
            await client.wait("response_done", response_id=response["response_id"], timeout=5)
            echo = await client.wait("response_done", timeout=10)
            assert "interrupted" not in next(f for f in _finals(client) if f["response_id"] == echo["response_id"])
    run(scenario(), timeout=40)


def test_an_output_format_change_mid_reply_keeps_the_barge_in_position_in_the_reply_format():
    """The reply already playing stays PCM16 (the new format applies to later responses): its
    played position is counted in PCM16 bytes, so the truncate is right and succeeds."""
    async def scenario():
        async with relay(REALTIME) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "vad": {"silence_duration_ms": 300}})
            await client.wait("ready")
            await _speak(client, 1.5, seed=11)
            await client.wait("response_started", timeout=5)
            await client.wait_audio(500 * BYTES_PER_MS, timeout=5)
            await client.send({"type": "config", "output_audio_format": "g711_ulaw"})
            await _speak(client, 0.6, seed=12)
            interrupted = await client.wait("interrupted", timeout=5)
            received_ms = interrupted["_audio_before"] // BYTES_PER_MS
            assert 500 <= received_ms < 1500 and interrupted["played_ms"] == received_ms
            upstream = mock.sessions[0]
            assert (await upstream.wait_for_server_event("conversation.item.truncated", timeout=5))["audio_end_ms"] \
                == received_ms
            _no_errors(client)
    run(scenario(), timeout=40)


def test_a_reply_said_in_several_items_reaches_the_client_whole_and_in_order():
    """The mock's `reply_item_ms` splits a reply the way the real server splits long ones: the
    echo arrives bit-exact across the items, each item's transcript final in turn."""
    turn = speech_like(0.5, seed=21)

    async def scenario():
        async with relay(MockOptions(reply_item_ms=200)) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            await client.wait("ready")
            await client.push_to_talk(turn)
            response = await client.wait("response_started")
            await client.wait("response_done", response_id=response["response_id"], timeout=5)
            added = [e["item"]["id"] for e in mock.sessions[0].sent if e["type"] == "response.output_item.added"]
            return client, added

    client, added = run(scenario(), timeout=20)
    assert bytes(client.audio) == turn
    finals = _finals(client)
    assert [f["item_id"] for f in finals] == added and len(added) == 3   # 200 + 200 + 100 ms
    assert "".join(f["text"] for f in finals) == "echo of 500 ms"
    _no_errors(client)


def test_vad_enabled_true_turns_voice_activity_detection_back_on():
    """The seed's `vad.enabled` is a switch: off (push-to-talk), then on again (hands-free) must
    restore server VAD — it used to stay off, silently, for the rest of the session."""
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "config", "vad": {"enabled": False}})
            await client.send({"type": "config", "vad": {"enabled": True, "threshold": 0.5}})
            await _speak(client, 0.6, seed=41)
            await client.wait("speech_started")  # VAD heard the turn
            updates = [e for e in mock.sessions[0].received if e["type"] == "session.update"]
            assert updates[-2]["session"]["audio"]["input"]["turn_detection"] is None
            on = updates[-1]["session"]["audio"]["input"]["turn_detection"]
            assert on["type"] == "server_vad" and on["threshold"] == 0.5
            _no_errors(client)
            await client.close()
    run(scenario(), timeout=30)


def test_an_input_format_alone_sets_the_output_format_too():
    """The seed: "both input and output audio use the same format". A client (WaaV's among them)
    that names only `input_audio_format` gets its replies in it, not in PCM16."""
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "input_audio_format": "g711_ulaw"})
            ready = await client.wait("ready")
            assert (ready["input_audio_format"], ready["output_audio_format"]) == ("g711_ulaw", "g711_ulaw")
            await client.send({"type": "config", "input_audio_format": "pcm16"})  # and back: both again
            update = None
            while update is None or update["session"]["audio"]["input"]["format"]["type"] != "audio/pcm":
                update = await mock.sessions[0].wait_for_client_event("session.update", timeout=5)
            assert update["session"]["audio"]["output"]["format"]["type"] == "audio/pcm"
            await client.send({"type": "config", "output_audio_format": "pcm16"})  # named: its own
            await client.send({"type": "config", "input_audio_format": "g711_alaw"})
            update = None
            while update is None or "format" not in update["session"]["audio"].get("input", {}) \
                    or update["session"]["audio"]["input"]["format"]["type"] != "audio/pcma":
                update = await mock.sessions[0].wait_for_client_event("session.update", timeout=5)
            assert "output" not in update["session"]["audio"]
            _no_errors(client)
            await client.close()
    run(scenario(), timeout=30)


@pytest.mark.parametrize("confirmed_before_the_reply", [True, False])
def test_a_reply_created_before_the_result_was_confirmed_does_not_count_as_its_answer(confirmed_before_the_reply):
    """The upstream handles events in order, but its VAD may create the turn's reply before it
    has read the result the gateway sent just then: that reply has not seen it. The gateway
    names its items and counts a reply as the answer only when it was created after the
    upstream confirmed them; otherwise it asks once more when that reply is done."""
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()                                                  # ready
        await upstream.send({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}})
        await upstream.send({"type": "response.output_item.done", "response_id": "resp_1", "item": {
            "id": "item_call", "type": "function_call", "status": "completed", "call_id": "call_1",
            "name": "get_weather", "arguments": "{}"}})
        await upstream.send({"type": "response.done", "response": {"id": "resp_1", "status": "completed"}})
        await upstream.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": "item_u"})
        result = await upstream.receive("conversation.item.create")
        added = {"type": "conversation.item.added", "previous_item_id": "item_call", "item": result["item"]}
        if confirmed_before_the_reply:
            await upstream.send(added)
        await upstream.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 900, "item_id": "item_u"})
        await upstream.send({"type": "response.created", "response": {"id": "resp_2", "status": "in_progress"}})
        if not confirmed_before_the_reply:
            await upstream.send(added)
        await upstream.send({"type": "response.done", "response": {"id": "resp_2", "status": "completed"}})
        await _answer_barrier(upstream, asked)

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            call = await client.wait("function_call")
            await client.wait("speech_started")
            await client.send({"type": "function_result", "call_id": call["call_id"], "output": "{}"})
            await client.wait("response_done", response_id="resp_2")
            await _barrier(client)
            await client.close()

    asked: list[dict] = []
    run(scenario(), timeout=20)
    assert len(asked) == (0 if confirmed_before_the_reply else 1)


def test_a_request_refused_for_a_reply_that_saw_its_item_is_not_asked_again():
    """Found by a review: the client's `clear_audio` crossed the VAD's end of turn, so the
    gateway asked while the VAD's reply was being created; that reply had seen the text, the
    upstream refused ours (`conversation_already_has_active_response`), and the gateway asked
    again after it: two replies to one text."""
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()                                                  # ready
        await upstream.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": "item_u"})
        text = await upstream.receive("conversation.item.create")
        await upstream.send({"type": "conversation.item.added", "previous_item_id": None, "item": text["item"]})
        await upstream.receive("input_audio_buffer.clear")
        ours = await upstream.receive("response.create")   # asked while the VAD's reply was coming
        await upstream.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 900, "item_id": "item_u"})
        await upstream.send({"type": "response.created", "response": {"id": "resp_vad", "status": "in_progress"}})
        await upstream.send({"type": "error", "error": {
            "type": "invalid_request_error", "code": "conversation_already_has_active_response",
            "message": "Conversation already has an active response in progress: resp_vad.",
            "param": None, "event_id": ours["event_id"]}})
        await upstream.send({"type": "response.done", "response": {"id": "resp_vad", "status": "completed"}})
        await _answer_barrier(upstream, asked)

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.wait("speech_started")
            await client.send({"type": "text", "text": "and one more thing"})
            await client.send({"type": "clear_audio"})
            await client.wait("response_done", response_id="resp_vad")
            await _barrier(client)
            await client.close()
            return client.of_type("error")

    asked: list[dict] = []
    errors = run(scenario(), timeout=20)
    assert len(asked) == 1 and [e["upstream"]["code"] for e in errors] == ["item_retrieve_invalid_item_id"]



_SECOND_OF_AUDIO = base64.b64encode(bytes(48_000)).decode()


def test_a_cancel_over_a_reply_whose_id_is_unknown_sends_no_cancel_with_a_null_id():
    """Found by a review: a reply whose audio came without its item being announced has no
    known id; cancelling it while it played sent `response.cancel` with `response_id: null`."""
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()
        await upstream.send({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}})
        await upstream.send({"type": "response.output_audio.delta", "response_id": "resp_1", "item_id": "item_1",
                             "delta": _SECOND_OF_AUDIO})
        await upstream.send({"type": "response.done", "response": {"id": "resp_1", "status": "completed"}})
        await _answer_text_barrier(upstream)  # the text sent after the cancel

    async def scenario():
        upstream = ScriptedUpstream(script)
        async with upstream as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.wait("response_done")
            await client.send({"type": "cancel_response"})
            await client.wait("interrupted")
            await _text_barrier(client)
            await client.close()
            return upstream.received

    assert [event for event in run(scenario(), timeout=20) if event["type"] == "response.cancel"] == []


def test_a_turn_end_before_the_timed_replys_first_audio_passes_the_timing_to_the_next_reply():
    """Found by a review: the first reply created after a turn end is timed (to its first
    audio). A second text before that audio left the first reply timed from the second text
    (too short), and the reply answering the second text untimed. Now the latest turn end
    waits for a reply created after it."""
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()
        await upstream.receive("response.create")
        await upstream.send({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}})
        await upstream.receive("conversation.item.create")  # the second text: its turn end is marked
        await upstream.send({"type": "error", "error": {"message": "second text seen"}})
        await upstream.send({"type": "response.output_audio.delta", "response_id": "resp_1", "item_id": "item_1",
                             "delta": _SECOND_OF_AUDIO})
        await upstream.send({"type": "response.done", "response": {"id": "resp_1", "status": "completed"}})

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "text", "text": "one"})
            await client.wait("response_started")
            (session,) = gateway.sessions
            await client.send({"type": "text", "text": "two"})
            await client.wait("error", message="second text seen")
            await client.wait("response_done", response_id="resp_1")
            # resp_1 was not timed from the second text: that turn end waits for the next reply
            waiting = session._turn_end_at is not None and not session._timing_reply
            await client.close()
            return waiting

    assert run(scenario(), timeout=20)


def _not_active(cancel: dict) -> dict:
    """The upstream's answer to a response.cancel with nothing running (reference §8)."""
    return {"type": "error", "error": {
        "type": "invalid_request_error", "code": "response_cancel_not_active", "param": None,
        "message": "Cancellation failed: no active response found", "event_id": cancel.get("event_id")}}


_SERVER_ERROR = {"type": "error", "error": {
    "type": "server_error", "code": None, "param": None, "event_id": None,
    "message": "The server had an error while processing your request. Sorry about that!"}}


@pytest.mark.parametrize("error_names, answer", [("nothing", "not_active"), ("nothing", "done"),
                                                ("nothing", "silence"), ("nothing", "late_done"),
                                                ("its_request", "not_active")])
def test_a_reply_a_server_error_left_without_an_end_is_ended_and_the_next_reply_goes_up(monkeypatch, error_names,
                                                                                        answer):
    """Found by a protocol audit: a server error "fails the response" (reference §8), but when no
    response.done followed, the reply stayed running for good: the client never got its
    response_done, and a later `text` had its reply held back for the rest of the session.
    Once the upstream is quiet, the gateway cancels it, and the upstream's answer ends it:
    "no active response" (then the gateway tells the client `failed`), the reply's own
    response.done, or no answer at all. Only then does the held reply go up (a review found it
    sent right behind the cancel, refused while the upstream still held the reply, and never
    asked again). A server error naming the reply's own request (the gateway's response.create)
    is the reply's too (a second review). An end that comes after the gateway gave up waiting
    for it is no second `response_done`, and what was refused meanwhile goes up then (a third)."""
    import gateway.session
    monkeypatch.setattr(gateway.session, "FAILED_REPLY_SILENCE_S", 0.3)

    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()
        first = await upstream.receive("conversation.item.create")
        await upstream.send({"type": "conversation.item.added", "item": first["item"]})
        create = await upstream.receive("response.create")
        await upstream.send({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}})
        named = create["event_id"] if error_names == "its_request" else None
        await upstream.send({"type": "error", "error": {**_SERVER_ERROR["error"], "event_id": named}})  # no more
        second = await upstream.receive("conversation.item.create")
        await upstream.send({"type": "conversation.item.added", "item": second["item"]})
        cancel = await upstream.receive("response.cancel")
        if answer == "done":
            await upstream.send({"type": "response.done", "response": {"id": "resp_1", "status": "cancelled"}})
        elif answer == "not_active":
            await upstream.send(_not_active(cancel))
        elif answer == "late_done":  # still held, and stopped only after the gateway gave up waiting
            early = await upstream.receive("response.create")
            await upstream.send({"type": "error", "error": {
                "type": "invalid_request_error", "code": "conversation_already_has_active_response", "param": None,
                "message": "Conversation already has an active response in progress: resp_1.",
                "event_id": early.get("event_id")}})
            await upstream.send({"type": "response.done", "response": {"id": "resp_1", "status": "cancelled"}})
        await upstream.receive("response.create")
        await upstream.send({"type": "response.created", "response": {"id": "resp_2", "status": "in_progress"}})
        await upstream.send({"type": "response.done", "response": {"id": "resp_2", "status": "completed"}})

    async def scenario():
        upstream = ScriptedUpstream(script)
        async with upstream as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "text", "text": "hello"})
            await client.wait("error", code="UpstreamError")
            await client.send({"type": "text", "text": "are you there?"})
            await client.wait("response_done", response_id="resp_2", timeout=5)
            await client.close()
            return client.events, upstream.received

    events, received = run(scenario(), timeout=20)
    replies = [(e["type"], e["response_id"], e.get("status")) for e in events
               if e["type"] in ("response_started", "response_done")]
    first_end = "cancelled" if answer == "done" else "failed"
    assert replies == [("response_started", "resp_1", None), ("response_done", "resp_1", first_end),
                       ("response_started", "resp_2", None), ("response_done", "resp_2", "completed")]
    assert [e["upstream"]["type"] for e in events if e["type"] == "error"] == ["server_error"]
    sent = [(e["type"], e.get("response_id")) for e in received
            if e["type"] in ("response.cancel", "response.create")]
    creates_after_the_cancel = 2 if answer == "late_done" else 1
    assert sent == [("response.create", None), ("response.cancel", "resp_1")] + [("response.create", None)] * \
        creates_after_the_cancel


def test_a_reply_that_goes_on_streaming_after_a_server_error_is_not_ended(monkeypatch):
    """The other side of the test above: a server error about something else, while the reply
    goes on streaming for longer than the quiet time, leaves the reply to its own end."""
    import gateway.session
    monkeypatch.setattr(gateway.session, "FAILED_REPLY_SILENCE_S", 0.3)
    delta = base64.b64encode(bytes(4800)).decode()

    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()
        await upstream.receive("response.create")
        await upstream.send({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}})
        await upstream.send(_SERVER_ERROR)
        for _ in range(10):  # a second of deltas, one every 0.1 s: the model still generating
            await upstream.send({"type": "response.output_audio.delta", "response_id": "resp_1",
                                 "item_id": "item_1", "delta": delta})
            await asyncio.sleep(0.1)
        await upstream.send({"type": "response.done", "response": {"id": "resp_1", "status": "completed"}})
        await _answer_text_barrier(upstream)  # all the above reached the client

    async def scenario():
        upstream = ScriptedUpstream(script)
        async with upstream as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "create_response"})
            await client.wait("response_done", response_id="resp_1", timeout=5)
            await _text_barrier(client)
            await client.close()
            return client.events, bytes(client.audio), upstream.received

    events, audio, received = run(scenario(), timeout=20)
    assert [(e["response_id"], e["status"]) for e in events if e["type"] == "response_done"] == [("resp_1", "completed")]
    assert audio == bytes(48_000)
    assert [e for e in received if e["type"] == "response.cancel"] == []


def test_a_cancel_of_a_reply_that_ended_meanwhile_names_it_and_is_no_news():
    """Found by a protocol audit: over nothing playing (a reply without audio yet, or a text
    reply), `cancel_response` went up with no id. When the reply had just ended upstream, the
    client got the upstream's "no active response" as an error, and a reply started meanwhile
    would have been cancelled in its place. The cancel now names the reply the client knows of."""
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()
        await upstream.receive("response.create")
        await upstream.send({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}})
        cancel = await upstream.receive("response.cancel")
        # the reply had ended before the cancel arrived: its done, then the cancel's refusal
        await upstream.send({"type": "response.done", "response": {"id": "resp_1", "status": "completed"}})
        await upstream.send(_not_active(cancel))
        await _answer_text_barrier(upstream)

    async def scenario():
        upstream = ScriptedUpstream(script)
        async with upstream as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "create_response"})
            await client.wait("response_started")
            await client.send({"type": "cancel_response"})
            await _text_barrier(client)
            await client.close()
            return client.events, upstream.received

    events, received = run(scenario(), timeout=20)
    assert [e["message"] for e in events if e["type"] == "error"] == ["text seen"]  # the barrier's alone
    assert [(e["response_id"], e["status"]) for e in events if e["type"] == "response_done"] == [("resp_1", "completed")]
    assert [e.get("response_id") for e in received if e["type"] == "response.cancel"] == ["resp_1"]


def test_a_server_error_naming_another_request_leaves_a_quiet_reply_alone(monkeypatch):
    """Found by a review: a server error that names a request of its own (here the client's
    `conversation.item.retrieve`) is that request's, not the reply's. A reply quiet for longer
    than the watch's time (a server-side tool call) was cancelled and reported failed."""
    import gateway.session
    monkeypatch.setattr(gateway.session, "FAILED_REPLY_SILENCE_S", 0.2)
    quiet_over = asyncio.Event()

    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()
        await upstream.receive("response.create")
        await upstream.send({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}})
        retrieve = await upstream.receive("conversation.item.retrieve")
        await upstream.send({"type": "error", "error": {**_SERVER_ERROR["error"], "event_id": retrieve["event_id"]}})
        await quiet_over.wait()  # the reply says nothing for a while: four times the watch's time
        await upstream.send({"type": "response.done", "response": {"id": "resp_1", "status": "completed"}})

    async def scenario():
        upstream = ScriptedUpstream(script)
        async with upstream as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "create_response"})
            await client.wait("response_started")
            await client.send({"type": "conversation.item.retrieve", "item_id": "item_1", "event_id": "mine"})
            await client.wait("error", code="UpstreamError")
            asyncio.get_running_loop().call_later(0.8, quiet_over.set)
            await client.wait("response_done", timeout=5)
            await client.close()
            return client.events, upstream.received

    events, received = run(scenario(), timeout=20)
    assert [(e["response_id"], e["status"]) for e in events if e["type"] == "response_done"] == [("resp_1", "completed")]
    assert [e for e in received if e["type"] == "response.cancel"] == []


@pytest.mark.parametrize("when, turn_detection", [
    ("before_ready", "server_vad"), ("before_ready", "none"), ("after_ready", "server_vad"), ("after_ready", "none"),
    ("vad_just_asked_for", "server_vad")])
def test_a_text_right_behind_speech_does_not_talk_over_the_user(when, turn_detection):
    """Found by a chaos audit: speech and a `text` sent before `ready` went up together once it
    came, and the text's reply was asked for before the upstream's VAD had heard the speech: it
    played in full while the user was still talking, and their turn got a second reply. Under
    VAD the held text's reply now waits for its item's confirmation, which comes after the
    speech before it is heard: the turn's reply answers both. A later chaos run found the same
    after `ready`, for a text right behind live audio: its reply waits for its item too, also
    when the client has just asked for VAD and the upstream has not confirmed it yet (a
    review). Push-to-talk (and a text-only client, no audio flowing) is unchanged: the text's
    reply is asked for at once."""
    speech = speech_like(1.5, seed=1)

    async def scenario():
        # the upstream's 0.3 s handshake holds everything the client sends first before `ready`
        async with relay(MockOptions(handshake_delay_s=0.3 if when == "before_ready" else 0.0)) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config",
                               "turn_detection": "none" if when == "vad_just_asked_for" else turn_detection})
            if when != "before_ready":
                await client.wait("ready", timeout=5)
            if when == "vad_just_asked_for":  # not confirmed yet when the text comes
                await client.send({"type": "config", "turn_detection": turn_detection})
            await client.send_audio(speech[:24_000])
            await client.send({"type": "text", "text": "hello"})    # right behind it
            for frame in frames(speech[24_000:] + silence(1.0), 4800):
                await client.send_audio(frame)
            if when == "before_ready":
                await client.wait("ready", timeout=5)
            await client.wait("response_done", timeout=10)
            if turn_detection == "none":
                await client.send({"type": "clear_audio"})
            await _barrier(client)  # any second reply would have started by now
            await client.close()
            return [e["type"] for e in client.events]

    order = run(scenario(), timeout=30)
    assert order.count("response_started") == 1, order
    if turn_detection == "server_vad":
        assert order.index("speech_stopped") < order.index("response_started"), order


def test_a_function_result_right_behind_speech_does_not_talk_over_the_user():
    """A review of the text fix: the last `function_result` asks for a reply as a `text` does,
    and had the same race: right behind live audio, its reply started inside the user's turn.
    It waits for the result's item to be confirmed too."""
    speech = speech_like(1.5, seed=1)

    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            call = await _a_weather_call(client)
            await client.send_audio(speech[:24_000])
            await client.send({"type": "function_result", "call_id": call["call_id"], "output": '{"temp_c":18}'})
            for frame in frames(speech[24_000:] + silence(1.0), 4800):
                await client.send_audio(frame)
            await client.wait("speech_stopped", timeout=5)
            await client.wait("response_done", timeout=10)
            await _barrier(client)
            await client.close()
            return [e["type"] for e in client.events if e["type"] != "level"]

    order = run(scenario(), timeout=30)
    after_call = order[order.index("function_call"):]
    assert after_call.count("response_started") == 1, order
    assert after_call.index("speech_stopped") < after_call.index("response_started"), order


def test_a_reply_waiting_for_its_item_is_asked_for_when_no_confirmation_comes(monkeypatch):
    """A review of the text fix: the reply to a text behind live audio waits for the text's
    item; an error naming no event and not about an item (a server error) in place of the
    confirmation left it waiting for good. After ITEM_WAIT_S it is asked for anyway."""
    from gateway import session as session_module
    monkeypatch.setattr(session_module, "ITEM_WAIT_S", 0.5)

    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()
        await upstream.receive("conversation.item.create")
        await upstream.send({"type": "error", "error": {"type": "server_error", "code": None, "param": None,
                                                        "event_id": None, "message": "try again"}})
        await upstream.receive("response.create")
        await upstream.send({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}})
        await upstream.send({"type": "response.done", "response": {"id": "resp_1", "status": "completed"}})

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send_audio(silence(0.2))                   # a live microphone, VAD on
            await client.send({"type": "text", "text": "hello"})
            await client.wait("error", message="try again")
            done = await client.wait("response_done", timeout=5)
            await client.close()
            return done

    assert run(scenario(), timeout=20)["response_id"] == "resp_1"


def test_a_turn_ends_for_a_muted_microphone_after_a_second_however_often_the_node_sweeps():
    """Found by a chaos run: a turn whose audio stopped ended at the first sweep that saw no new
    audio, and short timeouts sweep more often (--idle-timeout-s 1: every 0.25 s). A client
    streaming 400 ms frames in real time had its turn ended between frames, and the reply a
    `text` had been holding talked over it. The rule is the README's: its audio stopped for
    about a second. (The 400 ms pacing is the scenario.)"""
    speech = speech_like(2.0, seed=4)
    chunk = int(0.4 * 48_000)

    async def scenario():
        async with relay(idle_timeout_s=1.0) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "server_vad"})
            await client.wait("ready", timeout=5)
            await client.send_audio(speech[:chunk])
            await client.wait("speech_started")
            await client.send({"type": "text", "text": "hello"})    # its reply waits for the turn
            for offset in range(chunk, len(speech), chunk):
                await asyncio.sleep(0.4)                            # one 400 ms frame every 400 ms
                await client.send_audio(speech[offset:offset + chunk])
            for frame in frames(silence(1.0), chunk):
                await client.send_audio(frame)
            await client.wait("response_done", timeout=10)
            await client.close()
            return [e["type"] for e in client.events]

    order = run(scenario(), timeout=30)
    assert order.count("response_started") == 1, order
    assert order.index("speech_stopped") < order.index("response_started"), order


def test_a_held_texts_reply_is_asked_for_when_its_item_is_refused_by_an_error_naming_nothing():
    """Found by a review of the test above's fix: the held text's reply waited for its item's
    confirmation or an error naming the item. An item's refusal naming no event (the upstream
    leaves event_id null at times) released neither, and the reply was never asked for."""
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()
        await upstream.receive("conversation.item.create")
        await upstream.send({"type": "error", "error": {"type": "invalid_request_error", "code": "invalid_value",
                                                        "param": "item.content[0].text", "event_id": None,
                                                        "message": "item refused"}})
        await upstream.receive("response.create")
        await upstream.send({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}})
        await upstream.send({"type": "response.done", "response": {"id": "resp_1", "status": "completed"}})

    async def scenario():
        async with ScriptedUpstream(script, created_after_s=0.3) as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.send_audio(silence(0.2))                   # held: before `ready`
            await client.send({"type": "text", "text": "hello"})    # held behind it, VAD on
            ready = await client.wait("ready")
            await client.wait("error", message="item refused")
            done = await client.wait("response_done", timeout=5)
            await client.close()
            return ready, done

    ready, done = run(scenario(), timeout=20)
    assert ready["turn_detection"] == "server_vad" and done["response_id"] == "resp_1"


@pytest.mark.parametrize("refused", ["client_event", "server_error"])
def test_an_error_naming_nothing_does_not_release_a_held_texts_reply_early(refused):
    """Found by a third review: any error naming no event released the held text's reply, so
    a client's refused raw event (or a transient server error) before the speech let the reply
    go up while the user was speaking, the talk-over the wait is for. Only an item's refusal does."""
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()                                  # `ready`: the held queue goes up
        if refused == "client_event":
            await upstream.receive("conversation.item.delete")
            await upstream.send({"type": "error", "error": {
                "type": "invalid_request_error", "code": "item_delete_invalid_item_id", "param": None,
                "event_id": None, "message": "Error deleting item: the item with id 'nope' does not exist."}})
        else:
            await upstream.send(_SERVER_ERROR)
        await upstream.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": "user_1"})
        item = await upstream.receive("conversation.item.create")
        await upstream.send({"type": "conversation.item.added", "item": item["item"]})
        retrieve = await upstream.receive("conversation.item.retrieve")  # all the gateway sent by now
        await upstream.send({"type": "error", "error": {"type": "invalid_request_error", "message": "seen",
                                                        "event_id": retrieve.get("event_id")}})

    async def scenario():
        upstream = ScriptedUpstream(script, created_after_s=0.3)
        async with upstream as url, GatewayServer(_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            if refused == "client_event":
                await client.send({"type": "conversation.item.delete", "item_id": "nope"})
            await client.send_audio(speech_like(0.5, seed=1))      # held: before `ready`
            await client.send({"type": "text", "text": "hello"})   # held behind it, VAD on
            await client.wait("speech_started", timeout=5)
            await client.send({"type": "conversation.item.retrieve", "item_id": "item_x", "event_id": "mine"})
            await client.wait("error", message="seen")
            await client.close()
            return upstream.received

    assert [e for e in run(scenario(), timeout=20) if e["type"] == "response.create"] == []
