"""The mock's out-of-band responses (reference §3.4, §4.2, §5.2): `response.create` with
`response.conversation:"none"` runs beside the default conversation's response, writes nothing
to the conversation, and shows `conversation_id: null`; `response.input` gives any response its
own context (items, references to conversation items, or nothing at all); `response.cancel`
picks a response by id, and barge-in stops only the conversation's own.

Over real sockets with a plain `websockets` client, in both dialects where the shapes differ.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest

from gateway.mock import MockRealtimeServer
from gateway.mock.responses import spoken_tone
from tests.support import run
from tests.test_mock_upstream import (AUDIO_LADDER, DIALECTS, USER_ITEM_EVENTS, WEATHER_TOOL, RawClient,
                                      b64_audio, collapse, dialect_options, open_dialect, pcm_tone,
                                      update)

# an out-of-band response says everything a response says, minus the conversation's events
OUT_OF_BAND_LADDER = {dialect: [t for t in ladder if not t.startswith("conversation.item.")]
                      for dialect, ladder in AUDIO_LADDER.items()}
# the same ladder seen per response id (rate_limits.updated names no response)
PER_RESPONSE_LADDER = {dialect: [t for t in ladder if t != "rate_limits.updated"]
                       for dialect, ladder in OUT_OF_BAND_LADDER.items()}
TEXT_PER_RESPONSE_LADDER = {
    dialect: ["response.created", "response.output_item.added", "response.content_part.added", "<deltas>",
              f"{text}.done", "response.content_part.done", "response.output_item.done", "response.done"]
    for dialect, text in (("ga", "response.output_text"), ("beta", "response.text"))}
OUT_OF_BAND = {"conversation": "none"}


def text_only(dialect: str) -> dict[str, Any]:
    """`response.create` members asking for a text-only reply, in the dialect's names."""
    return {"output_modalities": ["text"]} if dialect == "ga" else {"modalities": ["text"]}


def transcript_of(done: dict[str, Any]) -> str:
    content = done["response"]["output"][0]["content"][0]
    return content.get("transcript", content.get("text"))


def response_id_of(event: dict[str, Any]) -> Any:
    if event["type"] in ("response.created", "response.done"):
        return event["response"]["id"]
    return event.get("response_id")


def ladders_by_response(events: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Each response's event types in order (deltas collapsed), keyed by response id."""
    types: dict[str, list[str]] = defaultdict(list)
    for event in events:
        response_id = response_id_of(event)
        if response_id is not None:
            types[response_id].append(event["type"])
    return {response_id: collapse(seen) for response_id, seen in types.items()}


def positions(events: list[dict[str, Any]], response_id: str) -> list[int]:
    return [index for index, event in enumerate(events) if response_id_of(event) == response_id]


async def say(client: RawClient, dialect: str, text: str, item_id: str | None = None) -> str:
    """A user text item at the end of the conversation; returns its id."""
    item: dict[str, Any] = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    if item_id is not None:
        item["id"] = item_id
    await client.send({"type": "conversation.item.create", "item": item})
    return (await client.recv_until(USER_ITEM_EVENTS[dialect][-1]))[0]["item"]["id"]


async def until_done(client: RawClient, count: int, timeout: float = 8.0) -> list[dict[str, Any]]:
    """Every event until `count` response.done events have arrived."""
    events: list[dict[str, Any]] = []
    while sum(event["type"] == "response.done" for event in events) < count:
        events += await client.recv_until("response.done", timeout)
    return events


@pytest.mark.parametrize("dialect", DIALECTS)
def test_out_of_band_response_streams_its_ladder_but_adds_no_items(dialect: str) -> None:
    """No conversation.item.added/.done (GA) or .created (beta) for its items, which cannot be
    retrieved, truncated or deleted afterwards; conversation_id null; metadata echoed. Without
    `input` it answers the conversation, as OpenAI's does."""
    async def scenario() -> None:
        async with MockRealtimeServer(dialect_options(dialect)) as server:
            client = await open_dialect(server, dialect)
            user_item = await say(client, dialect, "hello there")
            await client.send({"type": "response.create",
                               "response": {**OUT_OF_BAND, "metadata": {"topic": "check"}}})
            ladder = await client.recv_until("response.done")
            assert collapse([e["type"] for e in ladder]) == OUT_OF_BAND_LADDER[dialect]
            created, done = ladder[0]["response"], ladder[-1]["response"]
            assert created["conversation_id"] is None and done["conversation_id"] is None
            assert created["metadata"] == done["metadata"] == {"topic": "check"}
            assert {response_id_of(e) for e in ladder if e["type"] != "rate_limits.updated"} == {created["id"]}
            assert done["status"] == "completed" and transcript_of(ladder[-1]) == "You said: hello there"
            assert b64_audio(ladder) == spoken_tone("You said: hello there", "audio/pcm", 440.0)
            item_id = done["output"][0]["id"]
            mock = server.sessions[0]
            assert [item.id for item in mock.conversation.items()] == [user_item]

            for event, code, verb in (
                    ({"type": "conversation.item.retrieve"}, "item_retrieve_invalid_item_id", "retrieving"),
                    ({"type": "conversation.item.truncate", "content_index": 0, "audio_end_ms": 100},
                     "item_truncate_invalid_item_id", "truncating"),
                    ({"type": "conversation.item.delete"}, "item_delete_invalid_item_id", "deleting")):
                await client.send({**event, "event_id": "e1", "item_id": item_id})
                assert (await client.expect("error"))["error"] == {
                    "type": "invalid_request_error", "code": code, "param": "item_id", "event_id": "e1",
                    "message": f"Error {verb} item: the item with id '{item_id}' does not exist."}

            # the conversation's next response follows the user's item directly
            await client.send({"type": "response.create"})
            ladder = await client.recv_until("response.done")
            assert collapse([e["type"] for e in ladder]) == AUDIO_LADDER[dialect]
            assert ladder[2]["previous_item_id"] == user_item
            assert ladder[-1]["response"]["conversation_id"] == mock.conversation.id
            assert ladder[-1]["response"]["metadata"] is None
    run(scenario(), timeout=10)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_out_of_band_responses_run_beside_the_conversations_own(dialect: str) -> None:
    """Only one response may write to the default conversation at a time (§3.4): the
    conversation's response starts while an out-of-band one runs, a second out-of-band one
    joins them, and a second default one is still refused. All three complete, the two spoken
    ones interleaved, each event carrying its own response id."""
    async def scenario() -> None:
        async with MockRealtimeServer(dialect_options(dialect, pacing="realtime", delta_ms=50)) as server:
            client = await open_dialect(server, dialect)
            await update(client, dialect, turn_detection=None)
            await say(client, dialect, "hi there")
            await client.send({"type": "response.create", "response": OUT_OF_BAND})
            aside = (await client.expect("response.created"))["response"]["id"]
            await client.send({"type": "response.create", "event_id": "d1"})
            own = (await client.recv_until("response.created"))[-1]["response"]
            assert own["conversation_id"] == server.sessions[0].conversation.id
            await client.send({"type": "response.create", "response": {**OUT_OF_BAND, **text_only(dialect)}})
            await client.send({"type": "response.create", "event_id": "d2"})
            events = await until_done(client, 3)
            errors = [e["error"] for e in events if e["type"] == "error"]
            assert errors == [{
                "type": "invalid_request_error", "code": "conversation_already_has_active_response",
                "message": f"Conversation already has an active response in progress: {own['id']}. "
                           f"Wait until the response is finished before creating a new one.",
                "param": None, "event_id": "d2"}]
            created = [e["response"]["id"] for e in events if e["type"] == "response.created"]
            assert len(created) == 1
            text_aside = created[0]
            ladders = ladders_by_response(client.events)
            assert ladders == {aside: PER_RESPONSE_LADDER[dialect], own["id"]: PER_RESPONSE_LADDER[dialect],
                               text_aside: TEXT_PER_RESPONSE_LADDER[dialect]}
            done = {e["response"]["id"]: e["response"] for e in events if e["type"] == "response.done"}
            assert {rid: r["status"] for rid, r in done.items()} == dict.fromkeys(ladders, "completed")
            assert {rid: r["conversation_id"] for rid, r in done.items()} == {
                aside: None, text_aside: None, own["id"]: server.sessions[0].conversation.id}
            # the two spoken ones really ran at the same time
            aside_at, own_at = positions(client.events, aside), positions(client.events, own["id"])
            assert own_at[0] < aside_at[-1] and aside_at[0] < own_at[-1]
            # only the conversation's own reply became a conversation item
            announced = {e["item"]["id"] for e in client.events if e["type"].startswith("conversation.item.")}
            own_item = done[own["id"]]["output"][0]["id"]
            items = [item.id for item in server.sessions[0].conversation.items()]
            assert announced == set(items) and items[-1] == own_item and len(items) == 2
    run(scenario(), timeout=10)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_response_input_replaces_the_conversation_as_context(dialect: str) -> None:
    """`input` (§4.2, §5.2): references to conversation items and items of its own, which are
    never added to the conversation; `[]` is no context at all. It works for the conversation's
    own responses too (their output is still added). An unknown reference is refused."""
    async def scenario() -> None:
        async with MockRealtimeServer(dialect_options(dialect)) as server:
            client = await open_dialect(server, dialect)
            await say(client, dialect, "the first question", item_id="item_first")
            await say(client, dialect, "the second question", item_id="item_second")
            mock = server.sessions[0]

            async def answer(response: dict[str, Any]) -> list[dict[str, Any]]:
                await client.send({"type": "response.create", "response": response})
                return await client.recv_until("response.done")

            ladder = await answer({**OUT_OF_BAND, "input": [{"type": "item_reference", "id": "item_first"}]})
            assert transcript_of(ladder[-1]) == "You said: the first question"
            inline = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "inline"}]}
            ladder = await answer({**OUT_OF_BAND, "input": [{"type": "item_reference", "id": "item_second"},
                                                            inline]})
            assert transcript_of(ladder[-1]) == "You said: inline"
            assert collapse([e["type"] for e in ladder]) == OUT_OF_BAND_LADDER[dialect]
            ladder = await answer({**OUT_OF_BAND, "input": []})
            assert transcript_of(ladder[-1]) == "Hello, how can I help?"
            assert [item.id for item in mock.conversation.items()] == ["item_first", "item_second"]

            ladder = await answer({"input": [{"type": "item_reference", "id": "item_first"}]})
            assert collapse([e["type"] for e in ladder]) == AUDIO_LADDER[dialect]
            assert transcript_of(ladder[-1]) == "You said: the first question"
            assert ladder[2]["previous_item_id"] == "item_second"
            assert len(mock.conversation) == 3

            await client.send({"type": "response.create", "event_id": "r1", "response": {
                **OUT_OF_BAND, "input": [inline, {"type": "item_reference", "id": "item_gone"}]}})
            assert (await client.expect("error"))["error"] == {
                "type": "invalid_request_error", "code": "invalid_value", "param": "response.input[1].id",
                "event_id": "r1", "message": "Item with id 'item_gone' not found."}
            await client.send({"type": "response.create", "event_id": "r2", "response": {
                **OUT_OF_BAND, "input": [{"type": "message", "role": "user", "content": "words"}]}})
            error = (await client.expect("error"))["error"]
            assert (error["code"], error["param"], error["event_id"]) == \
                ("missing_required_parameter", "response.input[0].content", "r2")
    run(scenario(), timeout=10)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_cancel_by_response_id(dialect: str) -> None:
    """`response.cancel` with `response_id` cancels that response; without one, the default
    conversation's (reference §5.2, PY-GA `response_cancel_event`); with none of those in
    progress it is `response_cancel_not_active`."""
    async def scenario() -> None:
        async with MockRealtimeServer(dialect_options(dialect, pacing="realtime", delta_ms=50)) as server:
            client = await open_dialect(server, dialect)
            await update(client, dialect, turn_detection=None)
            await say(client, dialect, "please tell me a story")
            ids = []
            for response in (OUT_OF_BAND, None, OUT_OF_BAND):
                await client.send({"type": "response.create", **({"response": response} if response else {})})
                ids.append((await client.recv_until("response.created"))[-1]["response"]["id"])
            first_aside, own, second_aside = ids
            await client.send({"type": "response.cancel", "response_id": first_aside})
            done = (await client.recv_until("response.done"))[-1]["response"]
            assert (done["id"], done["status"]) == (first_aside, "cancelled")
            assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
            await client.send({"type": "response.cancel"})
            done = (await client.recv_until("response.done"))[-1]["response"]
            assert (done["id"], done["status"]) == (own, "cancelled")
            for event_id, cancel in (("again", {"response_id": first_aside}), ("default", {})):
                await client.send({"type": "response.cancel", "event_id": event_id, **cancel})
                error = (await client.recv_until("error"))[-1]["error"]
                assert (error["code"], error["event_id"]) == ("response_cancel_not_active", event_id)
            done = (await client.recv_until("response.done"))[-1]["response"]
            assert (done["id"], done["status"]) == (second_aside, "completed")
            assert transcript_of({"response": done}) == "You said: please tell me a story"
    run(scenario(), timeout=15)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_barge_in_interrupts_only_the_conversations_response(dialect: str) -> None:
    """speech_started cancels the default conversation's response (turn_detected); an
    out-of-band one speaking at the same time carries on to completion."""
    async def scenario() -> None:
        async with MockRealtimeServer(dialect_options(dialect, pacing="realtime", delta_ms=50)) as server:
            client = await open_dialect(server, dialect)
            await say(client, dialect, "tell me a long story please")
            await client.send({"type": "response.create"})
            own = (await client.expect("response.created"))["response"]["id"]
            await client.send({"type": "response.create", "response": OUT_OF_BAND})
            aside = (await client.recv_until("response.created"))[-1]["response"]["id"]
            audio_type = "response.output_audio.delta" if dialect == "ga" else "response.audio.delta"
            while sum(e["type"] == audio_type and e["response_id"] == aside for e in client.events) < 4:
                await client.recv()
            await client.append(pcm_tone(100))
            events = await until_done(client, 2)
            assert "input_audio_buffer.speech_started" in [e["type"] for e in events]
            done = {e["response"]["id"]: e["response"] for e in events if e["type"] == "response.done"}
            assert done[own]["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
            assert done[aside]["status"] == "completed"
            assert transcript_of({"response": done[aside]}) == "You said: tell me a long story please"
    run(scenario(), timeout=15)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_out_of_band_tools_modalities_and_token_cap_are_its_own(dialect: str) -> None:
    """A response's own tools, tool choice, modalities and max output tokens work out of band
    as in the conversation: a function call no one can answer in the conversation (its call
    is not there), answered instead in the next out-of-band response's `input`; a text reply
    cut by its token cap."""
    async def scenario() -> None:
        async with MockRealtimeServer(dialect_options(dialect)) as server:
            client = await open_dialect(server, dialect)
            await say(client, dialect, "hello")
            await client.send({"type": "response.create", "response": {
                **OUT_OF_BAND, "tools": [WEATHER_TOOL], "tool_choice": "required"}})
            ladder = await client.recv_until("response.done")
            assert not [e for e in ladder if e["type"].startswith("conversation.")]
            call = ladder[-1]["response"]["output"][0]
            assert (call["type"], call["name"], call["status"]) == ("function_call", "get_weather", "completed")
            await client.send({"type": "conversation.item.create", "event_id": "out", "item": {
                "type": "function_call_output", "call_id": call["call_id"], "output": "{}"}})
            error = (await client.expect("error"))["error"]
            assert (error["code"], error["event_id"]) == ("invalid_tool_call_id", "out")

            result = {"type": "function_call_output", "call_id": call["call_id"], "output": '{"temp_c":18}'}
            await client.send({"type": "response.create", "response": {
                **OUT_OF_BAND, **text_only(dialect), "input": [call, result]}})
            ladder = await client.recv_until("response.done")
            assert collapse([e["type"] for e in ladder if e["type"] != "rate_limits.updated"]) == \
                TEXT_PER_RESPONSE_LADDER[dialect]
            assert transcript_of(ladder[-1]) == 'The get_weather function returned {"temp_c":18}'
            await client.send({"type": "response.create", "event_id": "orphan", "response": {
                **OUT_OF_BAND, "input": [result]}})
            error = (await client.expect("error"))["error"]
            assert (error["code"], error["param"]) == ("invalid_tool_call_id", "response.input[0].call_id")

            cap_key = "max_output_tokens" if dialect == "ga" else "max_response_output_tokens"
            await client.send({"type": "response.create", "response": {
                **OUT_OF_BAND, **text_only(dialect), cap_key: 3}})
            ladder = await client.recv_until("response.done")
            done = ladder[-1]["response"]
            assert done["status_details"] == {"type": "incomplete", "reason": "max_output_tokens"}
            assert transcript_of(ladder[-1]) == "You said: "  # 3 tokens: "You " and "said: "
            assert not [e for e in ladder if e["type"].startswith("conversation.")]
            assert len(server.sessions[0].conversation) == 1
    run(scenario(), timeout=10)
