"""Barge-in (SPEC §2.4): stop forwarding, `interrupted`, truncate at the played position, clamped."""
from __future__ import annotations

import asyncio

from gateway.mock import MockOptions
from tests.relay_harness import BYTES_PER_MS, RelayClient, frames, relay, silence, speech_like
from tests.support import run

REALTIME = MockOptions(pacing="realtime", delta_ms=100)


async def _start_long_reply(client: RelayClient) -> dict:
    """A 1.5 s user turn (fast), so a ~1.8 s reply plays in real time; returns response_started."""
    await client.send({"type": "config", "vad": {"silence_duration_ms": 300}})
    await client.wait("ready")
    for frame in frames(silence(0.3) + speech_like(1.5, seed=11) + silence(0.4), 4800):
        await client.send_audio(frame)
    return await client.wait("response_started")


def test_barge_in_truncates_at_the_audio_the_client_received():
    async def scenario():
        async with relay(REALTIME) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            response = await _start_long_reply(client)
            await client.wait_audio(3 * 100 * BYTES_PER_MS, timeout=3)   # a few deltas have played
            for frame in frames(speech_like(0.4, seed=12), 4800):      # the user talks over it
                await client.send_audio(frame)
            interrupted = await client.wait("interrupted", timeout=3)
            assert interrupted["response_id"] == response["response_id"]
            received_ms = interrupted["_audio_before"] // BYTES_PER_MS
            assert 300 <= received_ms < 1800
            assert interrupted["played_ms"] == received_ms
            upstream = mock.sessions[0]
            truncate = await upstream.wait_for_client_event("conversation.item.truncate", timeout=3)
            assert truncate["audio_end_ms"] == received_ms and truncate["content_index"] == 0
            truncated = await upstream.wait_for_server_event("conversation.item.truncated", timeout=3)
            assert truncated["audio_end_ms"] == received_ms
            done = await client.wait("response_done", response_id=response["response_id"], timeout=3)
            assert done["status"] == "cancelled"
            # nothing of the interrupted response was forwarded after `interrupted`
            assert done["_audio_before"] == interrupted["_audio_before"]
            assert not any(e["type"] == "error" and e.get("fatal") for e in client.events)
    run(scenario(), timeout=20)


def test_playback_report_sets_the_truncation_point():
    async def scenario():
        async with relay(REALTIME) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await _start_long_reply(client)
            await client.wait_audio(3 * 100 * BYTES_PER_MS, timeout=3)
            await client.send({"type": "playback", "played_ms": 150})
            for frame in frames(speech_like(0.4, seed=13), 4800):
                await client.send_audio(frame)
            interrupted = await client.wait("interrupted", timeout=3)
            assert interrupted["played_ms"] == 150
            truncate = await mock.sessions[0].wait_for_client_event("conversation.item.truncate", timeout=3)
            assert truncate["audio_end_ms"] == 150
    run(scenario(), timeout=20)


def test_cancel_race_is_reported_but_never_fatal():
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "cancel_response"})     # nothing is active: a benign race
            error = await client.wait("error")
            assert error["code"] == "UpstreamError" and error["fatal"] is False
            assert error["upstream"]["code"] == "response_cancel_not_active"
            await client.send({"type": "text", "text": "still here?"})
            assert (await client.wait("response_done"))["status"] == "completed"
    run(scenario(), timeout=20)


def _reply_items(mock, response_id: str) -> list:
    """The reply's assistant items in the mock's conversation, in order."""
    upstream = mock.sessions[0]
    ids = [e["item"]["id"] for e in upstream.sent
           if e["type"] == "response.output_item.added" and e["response_id"] == response_id]
    items = {item.id: item for item in upstream.conversation.items()}
    return [items[item_id] for item_id in ids]


def test_barge_in_over_a_reply_in_several_items_cuts_the_item_being_played():
    """The real server splits long replies into several message items (reference §7.3). The
    played position counts from the reply's start across its items: the item it falls in is
    truncated there, earlier ones are kept whole — what the user heard is what the model keeps."""
    async def scenario():
        async with relay(MockOptions(pacing="realtime", delta_ms=100, reply_item_ms=500)) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "vad": {"silence_duration_ms": 300}})
            await client.wait("ready")
            await client.send({"type": "text", "text": "tell me a story"})  # 1.5 s: three items
            response = await client.wait("response_started")
            await client.wait_audio(700 * BYTES_PER_MS, timeout=5)       # into the second item
            for frame in frames(speech_like(0.4, seed=12), 4800):
                await client.send_audio(frame)
            interrupted = await client.wait("interrupted", timeout=5)
            await client.wait("response_done", response_id=response["response_id"], timeout=5)
            upstream = mock.sessions[0]
            await upstream.wait_for_server_event("conversation.item.truncated", timeout=5)
            return interrupted, _reply_items(mock, response["response_id"]), upstream.received

    interrupted, items, received = run(scenario(), timeout=30)
    heard_ms = interrupted["_audio_before"] // BYTES_PER_MS
    assert 700 <= heard_ms < 1500 and interrupted["played_ms"] == heard_ms
    kept = [len(item.audio) // BYTES_PER_MS for item in items]
    assert kept[0] == 500 and sum(kept) == heard_ms, kept
    truncates = [(e["item_id"], e["audio_end_ms"]) for e in received if e["type"] == "conversation.item.truncate"]
    cut = heard_ms // 500 if heard_ms % 500 else heard_ms // 500 - 1   # the item the position falls in
    assert truncates == [(items[cut].id, heard_ms - 500 * cut)]


def test_barge_in_after_a_reply_in_several_items_truncates_from_the_played_position_on():
    """A reply generated faster than it plays, the client reports 650 ms played: the first item
    stays, the second is cut at 150 ms, the third (all of it unheard) at 0."""
    async def scenario():
        async with relay(MockOptions(reply_item_ms=500)) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "vad": {"silence_duration_ms": 300}})
            await client.wait("ready")
            await client.send({"type": "text", "text": "tell me a story"})
            response = await client.wait("response_started")
            await client.wait("response_done", response_id=response["response_id"], timeout=5)
            await client.send({"type": "playback", "played_ms": 650})
            for frame in frames(speech_like(0.4, seed=12), 4800):
                await client.send_audio(frame)
            interrupted = await client.wait("interrupted", timeout=5)
            upstream = mock.sessions[0]
            for _ in range(2):
                await upstream.wait_for_server_event("conversation.item.truncated", timeout=5)
            return interrupted, _reply_items(mock, response["response_id"]), upstream.received, client

    interrupted, items, received, client = run(scenario(), timeout=30)
    assert interrupted["played_ms"] == 650
    assert [len(item.audio) // BYTES_PER_MS for item in items] == [500, 150, 0]
    truncates = [(e["item_id"], e["audio_end_ms"]) for e in received if e["type"] == "conversation.item.truncate"]
    assert truncates == [(items[1].id, 150), (items[2].id, 0)]
    assert not any(e["type"] == "error" for e in client.events)


def test_barge_in_while_an_earlier_reply_still_plays_cuts_it_and_drops_the_next():
    """Reply A is generated in a flash and plays for seconds; reply B (the answer to a second
    text) arrives right after and queues behind it at the client. The user talks while A is
    still playing: A is cut at the played position (here the client's report of 400 ms into A,
    sent as B arrives), B is cut at 0, and each is told `interrupted`."""
    async def scenario():
        async with relay(MockOptions()) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "vad": {"silence_duration_ms": 300}})
            await client.wait("ready")
            await client.send({"type": "text", "text": "tell me a long story about the sea and the ships"})
            first = await client.wait("response_started")
            await client.wait("response_done", response_id=first["response_id"])
            await client.send({"type": "text", "text": "and another one"})
            second = await client.wait("response_started")
            await client.wait("response_done", response_id=second["response_id"])
            await client.send({"type": "playback", "played_ms": 400})   # 400 ms into A, by the clock
            for frame in frames(speech_like(0.4, seed=12), 4800):
                await client.send_audio(frame)
            told = [await client.wait("interrupted", timeout=5) for _ in range(2)]
            upstream = mock.sessions[0]
            for _ in range(2):
                await upstream.wait_for_server_event("conversation.item.truncated", timeout=5)
            return first, second, told, _reply_items(mock, first["response_id"]), \
                _reply_items(mock, second["response_id"]), upstream.received

    first, second, told, a_items, b_items, received = run(scenario(), timeout=30)
    assert [(e["response_id"], e["played_ms"]) for e in told] == [(first["response_id"], 400),
                                                                 (second["response_id"], 0)]
    assert [len(item.audio) // BYTES_PER_MS for item in a_items + b_items] == [400, 0]
    truncates = [(e["item_id"], e["audio_end_ms"]) for e in received if e["type"] == "conversation.item.truncate"]
    assert truncates == [(a_items[0].id, 400), (b_items[0].id, 0)]


def test_a_playback_report_older_than_the_rest_of_the_reply_is_no_barge_in():
    """A client reporting its position every so often: its last report came before the reply
    ended, and the reply has played out since. The next turn is no barge-in — nothing heard
    is cut."""
    async def scenario():
        async with relay(REALTIME) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "vad": {"silence_duration_ms": 300}})
            await client.wait("ready")
            await client.send({"type": "text", "text": "hello there"})   # a 1.26 s reply
            response = await client.wait("response_started")
            await client.wait_audio(600 * BYTES_PER_MS, timeout=5)
            await client.send({"type": "playback", "played_ms": 600})
            done = await client.wait("response_done", response_id=response["response_id"], timeout=5)
            # the scenario's own time: the client plays out the last of the reply, unreported
            await asyncio.sleep(0.8)
            for frame in frames(speech_like(0.4, seed=12) + silence(0.5), 4800):
                await client.send_audio(frame)
            echo = await client.wait("response_started", timeout=5)   # the user's turn is answered
            return done, echo, client, mock.sessions[0], _reply_items(mock, response["response_id"])

    done, echo, client, upstream, items = run(scenario(), timeout=30)
    assert client.of_type("interrupted") == []
    assert not any(e["type"] == "conversation.item.truncate" for e in upstream.received)
    assert len(items[0].audio) // BYTES_PER_MS == done["_audio_before"] // BYTES_PER_MS == 1260


def test_a_reply_created_before_an_output_format_change_is_measured_in_its_own_format():
    """Found by a logging audit: a `config` changing the output format while a reply was being
    made (PCM16 to µ-law, right after `create_response`) had that reply's bytes counted at the
    new format's 8 bytes per ms: a client that had played all of it was still taken to be
    playing, so a `cancel_response` sent it `interrupted` and asked the upstream to truncate
    past the item's end (refused, logged as a WARNING). A reply keeps the format it was
    created with."""
    async def scenario():
        async with relay(REALTIME) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            await client.wait("ready")
            await client.send_audio(speech_like(1.0, seed=21))
            await client.send({"type": "commit"})
            await client.send({"type": "create_response"})
            await client.send({"type": "config", "output_audio_format": "g711_ulaw"})  # while it is made
            response = await client.wait("response_started")
            await client.wait("session_updated")
            await client.wait("response_done", response_id=response["response_id"], timeout=5)
            reply_ms = len(client.audio) // BYTES_PER_MS  # PCM16: the format it was created with
            await client.send({"type": "playback", "played_ms": reply_ms})  # all of it played
            await client.send({"type": "cancel_response"})
            await client.send({"type": "config", "instructions": "be brief"})
            await client.wait("session_updated")  # the gateway has handled the cancel before it
            return reply_ms, client, mock.sessions[0]

    reply_ms, client, upstream = run(scenario(), timeout=20)
    assert reply_ms == 1000
    assert client.of_type("interrupted") == []
    # nothing was playing: the client's cancel went up as asked, and the upstream had nothing to cancel
    assert [(e["code"], e["upstream"]["code"]) for e in client.of_type("error")] == \
        [("UpstreamError", "response_cancel_not_active")]
    assert not any(e["type"] == "conversation.item.truncate" for e in upstream.received)
