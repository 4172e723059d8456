"""End to end over real sockets: test client <-> gateway <-> mock upstream (SPEC §2)."""
from __future__ import annotations

import asyncio
import base64

import orjson
import pytest

from _fastpath import DBFS_FLOOR, measure_level
from gateway.mock import MockOptions
from gateway.session import MAX_REOPENS
from tests.g711 import LAWS, g711_tone
from tests.relay_harness import BYTES_PER_MS, RelayClient, frames, relay, silence, speech_like
from tests.support import run


async def _http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_server_vad_turn_speech_events_transcripts_and_bit_exact_echo():
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            ready = await client.wait("ready")
            assert ready["model"] == "gpt-realtime" and ready["voice"] == "alloy"
            assert ready["turn_detection"] == "server_vad" and ready["input_audio_format"] == "pcm16"
            status, body = await _http_get(gateway.port, "/health")
            health = orjson.loads(body)
            assert status == 200 and health["status"] == "ok" and health["sessions"] == 1
            audio = silence(0.5) + speech_like(1.0, seed=1) + silence(1.0)
            for frame in frames(audio, 960):  # 20 ms frames
                await client.send_audio(frame)
            started = await client.wait("speech_started")
            stopped = await client.wait("speech_stopped")
            # onset 500 ms - prefix padding 300 ms; last speech 1500 ms + silence 500 ms (seed defaults)
            assert abs(started["audio_ms"] - 200) <= 20 and abs(stopped["audio_ms"] - 2000) <= 20
            user = await client.wait("transcript", role="user", is_final=True)
            assert user["text"] and user["item_id"] == started["item_id"]
            response = await client.wait("response_started")
            final = await client.wait("transcript", role="assistant", is_final=True)
            done = await client.wait("response_done", response_id=response["response_id"])
            assert done["status"] == "completed" and done["usage"]["output_tokens"] > 0
            partials = [e["text"] for e in client.of_type("transcript")
                        if e["role"] == "assistant" and not e["is_final"]]
            assert "".join(partials) == final["text"]        # partials carry only new text
            assert final["response_id"] == response["response_id"]
            turn = audio[started["audio_ms"] * BYTES_PER_MS:stopped["audio_ms"] * BYTES_PER_MS]
            assert bytes(client.audio) == turn                 # echoed bit-exactly, in order
            assert (await _http_get(gateway.port, "/nope"))[0] == 404
            await client.close()
            await gateway.wait_empty(3)
            await mock.sessions[0].wait_closed(3)
    run(scenario(), timeout=20)


def test_push_to_talk_with_odd_length_frames():
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            ready = await client.wait("ready")
            assert ready["turn_detection"] == "none"
            upstream = mock.sessions[0]
            update = await upstream.wait_for_client_event("session.update")
            assert update["session"]["audio"]["input"]["turn_detection"] is None   # null, not {"type":"none"}
            audio = speech_like(0.8, seed=2)
            await client.push_to_talk(audio, 777)  # odd sizes: the odd byte is carried, never dropped
            await client.wait("response_done")
            assert bytes(client.audio) == audio
            assert client.of_type("speech_started") == []
            assert [e["type"] for e in upstream.received].count("input_audio_buffer.commit") == 1
    run(scenario(), timeout=20)


def test_max_response_tokens_caps_the_reply_and_it_ends_incomplete():
    """The seed's `max_response_tokens` reaches the upstream as the session's max_output_tokens;
    the mock (≈20 tokens per second of audio) stops a 2 s echo after 450 ms (9 tokens: four
    100 ms deltas and half of the fifth). The client gets exactly those bytes, in order, then
    response_done "incomplete"; the next response, uncapped, is whole."""
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none", "max_response_tokens": 9})
            await client.wait("ready")
            upstream = mock.sessions[0]
            update = await upstream.wait_for_client_event("session.update")
            assert update["session"]["max_output_tokens"] == 9
            audio = speech_like(2.0, seed=5)
            await client.push_to_talk(audio)
            done = await client.wait("response_done")
            assert done["status"] == "incomplete"
            assert done["usage"]["output_tokens"] == 9
            assert bytes(client.audio) == audio[:450 * 48]
            # relayed in order: the upstream applies the update before the response.create
            await client.send({"type": "config", "max_response_tokens": "inf"})
            await client.send({"type": "create_response"})
            done = await client.wait("response_done")
            assert done["status"] == "completed"
            assert bytes(client.audio) == audio[:450 * 48] + audio
    run(scenario(), timeout=20)


def test_a_turn_the_upstream_cannot_transcribe_gets_an_empty_final_transcript_and_a_reason():
    """A turn of digital silence fails transcription (the mock does what the real ASR does):
    the client gets the turn's final user transcript, empty, and a non-fatal UpstreamError
    with the upstream's code; the turn is still answered."""
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            await client.wait("ready")
            await client.push_to_talk(silence(0.5))
            final = await client.wait("transcript", role="user", is_final=True)
            assert final["text"] == "" and final["item_id"]
            error = await client.wait("error")
            assert (error["code"], error["fatal"]) == ("UpstreamError", False)
            assert error["upstream"]["code"] == "audio_unintelligible"
            assert (await client.wait("response_done"))["status"] == "completed"
            assert bytes(client.audio) == silence(0.5)
    run(scenario(), timeout=20)


def test_a_user_transcript_that_lands_after_the_response_still_reaches_the_client():
    """The real server transcribes asynchronously: the user's transcript may arrive after the
    reply is done (the mock's transcription_delay_ms). It is relayed all the same, final, with
    the turn's text, after the response_done it followed upstream."""
    async def scenario():
        async with relay(MockOptions(transcription_delay_ms=300)) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            await client.wait("ready")
            audio = speech_like(0.5, seed=12)
            await client.push_to_talk(audio)
            done = await client.wait("response_done")
            final = await client.wait("transcript", role="user", is_final=True)
            assert final["text"] == "user audio turn 1: 500 ms" and final["item_id"]
            assert client.events.index(done) < client.events.index(final)
            assert bytes(client.audio) == audio
    run(scenario(), timeout=20)


def test_text_turns_and_respond_false():
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "text", "text": "remember this", "respond": False})
            await client.send({"type": "text", "text": "hello there"})
            done = await client.wait("response_done")
            assert done["status"] == "completed" and len(client.audio) > 0
            final = await client.wait("transcript", role="assistant", is_final=True)
            assert final["text"]
            upstream = mock.sessions[0]
            types = [e["type"] for e in upstream.received]
            assert types.count("conversation.item.create") == 2 and types.count("response.create") == 1
            texts = [e["item"]["content"][0]["text"] for e in upstream.received
                     if e["type"] == "conversation.item.create"]
            assert texts == ["remember this", "hello there"]
    run(scenario(), timeout=20)


def test_function_call_round_trip_one_response_create_after_results():
    async def scenario():
        async with relay(MockOptions(function_trigger="name_in_text")) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "tools": [
                {"type": "function", "function": {"name": "get_weather", "description": "weather",
                                                  "parameters": {"type": "object", "properties": {}}}}]})
            await client.wait("ready")
            await client.send({"type": "text", "text": "please call get_weather for Paris"})
            call = await client.wait("function_call")
            assert call["name"] == "get_weather" and orjson.loads(call["arguments"]) is not None
            first = await client.wait("response_done")
            assert first["status"] == "completed"
            await client.send({"type": "function_result", "call_id": call["call_id"], "output": '{"temp_c": 18}'})
            second = await client.wait("response_done")
            assert second["response_id"] != first["response_id"] and second["status"] == "completed"
            assert len(client.of_type("function_call")) == 1      # announced twice upstream, dispatched once
            upstream = mock.sessions[0]
            types = [e["type"] for e in upstream.received]
            assert types.count("response.create") == 2            # the text's, and ONE after the result
            output = [e for e in upstream.received if e["type"] == "conversation.item.create"][-1]
            assert output["item"] == {"id": output["event_id"], "type": "function_call_output",
                                      "call_id": call["call_id"], "output": '{"temp_c": 18}'}
            assert output["event_id"].startswith("gw_item_")  # the gateway names its items: see
            #                                                    test_conversation_flows' replies-while-speaking
            assert types.index("conversation.item.create", types.index("response.create") + 1) < len(types) - 1
    run(scenario(), timeout=20)


def test_two_calls_in_one_response_get_one_response_create_after_both_results():
    """A response that calls two tools (two output items, as OpenAI may send): the client gets
    both calls, and the gateway asks for the next response once, after the second result."""
    def tool(name: str) -> dict:
        return {"type": "function", "name": name, "parameters": {"type": "object", "properties": {}}}

    async def scenario():
        async with relay(MockOptions(function_trigger="name_in_text")) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "tools": [tool("get_weather"), tool("get_time")]})
            await client.wait("ready")
            await client.send({"type": "text", "text": "call get_time, then get_weather"})
            calls = [await client.wait("function_call"), await client.wait("function_call")]
            assert [c["name"] for c in calls] == ["get_time", "get_weather"]
            first = await client.wait("response_done")
            upstream = mock.sessions[0]
            await client.send({"type": "function_result", "call_id": calls[0]["call_id"], "output": "12:00"})
            await client.send({"type": "function_result", "call_id": calls[1]["call_id"], "output": "sunny"})
            second = await client.wait("response_done")
            assert second["response_id"] != first["response_id"] and second["status"] == "completed"
            types = [e["type"] for e in upstream.received]
            assert types.count("response.create") == 2            # the text's, and ONE after both results
            last_output = max(i for i, t in enumerate(types) if t == "conversation.item.create")
            assert types.index("response.create", types.index("response.create") + 1) > last_output
    run(scenario(), timeout=20)


def test_config_before_ready_is_acked_first_and_after_ready_is_a_partial_update():
    async def scenario():
        async with relay(MockOptions(handshake_delay_s=0.2)) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "voice": "ash", "instructions": "Be brief.",
                               "temperature": 0.8, "vad": {"silence_duration_ms": 300}})
            ready = await client.wait("ready")
            assert ready["voice"] == "ash" and ready["ignored"] == ["temperature"]   # GA has no temperature
            upstream = mock.sessions[0]
            first = await upstream.wait_for_client_event("session.update")
            assert first["session"]["instructions"] == "Be brief."
            assert first["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 300
            assert "temperature" not in first["session"]
            await client.send({"type": "config", "instructions": "Be verbose."})
            second = await upstream.wait_for_client_event("session.update")
            assert second["session"] == {"type": "realtime", "instructions": "Be verbose."}
            await upstream.wait_for_server_event("session.updated")
            await client.send({"type": "config", "model": "gpt-realtime-mini"})
            error = await client.wait("error")
            assert error["code"] == "InvalidConfig" and error["param"] == "model" and not error["fatal"]
            assert len(mock.sessions) == 1
    run(scenario(), timeout=20)


def test_a_first_config_naming_another_model_just_after_ready_reopens_the_upstream():
    """A client sends `config` (with a model) on open, as both seed examples do; when the
    upstream opens faster than the client's round trip, `ready` for the default model goes out
    before that config arrives. It used to be refused ("the model cannot change after ready"):
    the seed's TypeScript example failed 4 runs in 5 against the built-in mock. The client's
    first message re-opens like a config before `ready`, and a second `ready` names the model."""
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            first = await client.wait("ready")          # the race, made certain: ready first
            assert first["model"] == "gpt-realtime"
            await client.send({"type": "config", "model": "gpt-4o-realtime-preview", "voice": "ash"})
            second = await client.wait("ready")
            assert (second["model"], second["voice"]) == ("gpt-4o-realtime-preview", "ash")
            assert client.of_type("error") == []
            await mock.sessions[0].wait_closed(3)       # the first upstream is not leaked
            await client.send({"type": "text", "text": "hello"})
            assert (await client.wait("response_done"))["status"] == "completed"
            # from now on the conversation has started: a model change is refused as before
            await client.send({"type": "config", "model": "gpt-realtime"})
            error = await client.wait("error")
            assert error["code"] == "InvalidConfig" and error["param"] == "model"
            await client.close()
    run(scenario(), timeout=20)


def test_a_first_config_naming_another_model_long_after_ready_is_refused(monkeypatch):
    """The re-open is for a config sent before the client saw `ready`: past a round trip
    (FIRST_CONFIG_GRACE_S, here none at all) a client that waited for `ready` and then asks for
    another model gets InvalidConfig (SPEC §2.1), and keeps its working session."""
    from gateway import session as session_module
    monkeypatch.setattr(session_module, "FIRST_CONFIG_GRACE_S", -1.0)

    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "config", "model": "gpt-4o-realtime-preview"})
            error = await client.wait("error")
            assert error["code"] == "InvalidConfig" and error["param"] == "model"
            assert len(mock.sessions) == 1 and client.of_type("ready")[1:] == []
            await client.close()
    run(scenario(), timeout=20)


def test_config_naming_another_model_before_ready_reopens_the_upstream():
    async def scenario():
        async with relay(MockOptions(handshake_delay_s=0.2)) as (gateway, mock):
            client = await RelayClient.connect(gateway.url + "?model=gpt-realtime")
            await client.send({"type": "config", "model": "gpt-4o-realtime-preview", "instructions": "x"})
            ready = await client.wait("ready")
            assert ready["model"] == "gpt-4o-realtime-preview"
            current = [s for s in mock.sessions if s.model == "gpt-4o-realtime-preview"]
            assert len(current) == 1 and not current[0].closed
            # the first upstream (if its handshake got that far) is closed, not leaked (WaaV B2)
            for old in mock.sessions:
                if old is not current[0]:
                    assert old.model == "gpt-realtime"
                    await old.wait_closed(3)
            await client.close()
            await gateway.wait_empty(3)
            for session in mock.sessions:
                await session.wait_closed(3)
            update = await current[0].wait_for_client_event("session.update")
            assert update["session"]["instructions"] == "x"
    run(scenario(), timeout=20)


async def _next_level(client: RelayClient, side: str) -> dict:
    """The next `level` event that metered some audio on `side` ("input" or "output")."""
    while True:
        level = await client.wait("level", timeout=3)
        if level[side]["rms_dbfs"] > DBFS_FLOOR:
            return level


@pytest.mark.parametrize("law", LAWS)
@pytest.mark.parametrize("formats_later", [False, True], ids=["one_config", "formats_after_levels"])
def test_g711_levels_in_both_directions(law: str, formats_later: bool):
    """A G.711 session's levels are those of the linear audio its codes stand for: the caller's
    turn is metered while it is sent, and the echoed reply (the same codes) on the way back,
    both within 0.5 dB of the PCM16 tone the codes were made from. With `formats_after_levels`
    the meters exist (as PCM16) before the formats change and must follow them."""
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            formats = {"input_audio_format": law, "output_audio_format": law}
            if formats_later:
                await client.send({"type": "config", "levels": True, "turn_detection": "none"})
                await client.send({"type": "config", **formats})
            else:
                await client.send({"type": "config", "levels": True, "turn_detection": "none", **formats})
            ready = await client.wait("ready")
            assert (ready["input_audio_format"], ready["output_audio_format"]) == (law, law)
            turn, source = g711_tone(1.0, law, peak_dbfs=-20.0)
            rms, peak, _ = measure_level(source)
            for frame in frames(turn, 160):  # 20 ms frames at 8 kHz
                await client.send_audio(frame)
            heard = await _next_level(client, "input")  # while the caller talks, before the commit
            assert heard["input"]["rms_dbfs"] == pytest.approx(rms, abs=0.5)
            assert heard["input"]["peak_dbfs"] == pytest.approx(peak, abs=0.5)
            assert heard["input"]["clipped"] == 0
            await client.send({"type": "commit"})
            await client.send({"type": "create_response"})
            await client.wait("response_done")
            assert bytes(client.audio) == turn  # the mock echoes the turn's codes bit-exactly
            await _next_level(client, "output")
            levels = client.of_type("level")
            for side in ("input", "output"):
                metered = [level[side] for level in levels if level[side]["rms_dbfs"] > DBFS_FLOOR]
                assert metered, side
                for level in metered:  # a steady tone: every report, not only the first, is right
                    assert level["rms_dbfs"] == pytest.approx(rms, abs=0.5), (side, level)
                    assert level["peak_dbfs"] == pytest.approx(peak, abs=0.5), (side, level)
                    assert level["clipped"] == 0, (side, level)
    run(scenario(), timeout=20)


def test_a_model_reopen_before_ready_keeps_the_rest_of_the_config():
    """Both seed examples name a model other than the default, so their config takes the re-open
    path: the formats and levels in it must still apply to the gateway's own audio handling. A
    4801-byte µ-law turn (1-byte samples: nothing to carry) comes back whole, and levels flow."""
    async def scenario():
        async with relay(MockOptions(handshake_delay_s=0.2)) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "model": "gpt-4o-realtime-preview", "turn_detection": "none",
                               "input_audio_format": "g711_ulaw", "output_audio_format": "g711_ulaw",
                               "levels": True})
            ready = await client.wait("ready")
            assert (ready["model"], ready["input_audio_format"]) == ("gpt-4o-realtime-preview", "g711_ulaw")
            turn = bytes((i * 37 + 11) % 256 for i in range(4801))
            await client.push_to_talk(turn, 333)
            await client.wait("response_done")
            assert bytes(client.audio) == turn
            await client.wait("level", timeout=2)
    run(scenario(), timeout=20)


def test_the_first_session_update_carries_the_seeds_default_instructions():
    """The seed's default `instructions` is "" (not the upstream's own default persona)."""
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            first = await mock.sessions[0].wait_for_client_event("session.update")
            assert first["session"]["instructions"] == ""
    run(scenario(), timeout=20)


def test_clear_audio_sends_what_the_coalescer_held_before_the_clear():
    """Audio the gateway holds (here up to 100 ms) goes upstream ahead of the clear, so the
    upstream's input timeline (its audio_ms) stays the client's; the clear still drops it."""
    async def scenario():
        async with relay(coalesce_ms=100) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            await client.wait("ready")
            held = speech_like(0.06, seed=8)
            for frame in frames(held, 20 * BYTES_PER_MS):
                await client.send_audio(frame)
            await client.send({"type": "clear_audio"})
            turn = speech_like(0.3, seed=9)
            await client.push_to_talk(turn, 20 * BYTES_PER_MS)
            await client.wait("response_done")
            assert bytes(client.audio) == turn
            received = mock.sessions[0].received
            types = [e["type"] for e in received]
            before_clear = received[:types.index("input_audio_buffer.clear")]
            appended = b"".join(base64.b64decode(e["audio"]) for e in before_clear
                                if e["type"] == "input_audio_buffer.append")
            assert appended == held
    run(scenario(), timeout=20)


def test_model_changes_before_ready_reopen_the_upstream_a_bounded_number_of_times():
    """Each re-open starts a handshake with the provider: a client changing the model again and
    again before ready gets InvalidConfig past MAX_REOPENS, not an upstream connection each."""
    async def scenario():
        async with relay(MockOptions(handshake_delay_s=0.3)) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            models = [f"gpt-realtime-{n}" for n in range(MAX_REOPENS + 3)]
            for model in models:
                await client.send({"type": "config", "model": model})
            ready = await client.wait("ready")
            assert ready["model"] == models[MAX_REOPENS - 1]
            refused = [e for e in client.of_type("error") if e.get("param") == "model"]
            assert len(refused) == 3 and not any(e["fatal"] for e in refused)
            assert len(mock.sessions) <= MAX_REOPENS + 1   # the first, then one per re-open at most
    run(scenario(), timeout=20)


def test_audio_and_commands_before_ready_arrive_intact_and_in_order():
    async def scenario():
        async with relay(MockOptions(handshake_delay_s=0.3)) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            audio = speech_like(0.6, seed=3)
            await client.push_to_talk(audio, 1001)
            await client.wait("ready")
            await client.wait("response_done")
            assert client.events[0]["type"] == "ready"          # nothing was answered before ready
            assert bytes(client.audio) == audio
    run(scenario(), timeout=20)


def test_audio_before_ready_is_read_in_the_format_configured_by_ready():
    """A telephony client streams mu-law from its first frame and sends its config a moment
    later: the frames held before `ready` are its mu-law, not PCM16 the config arrived too late
    for. They go up once the upstream reads mu-law, and come back (echoed) bit-exact."""
    async def scenario():
        async with relay(MockOptions(handshake_delay_s=0.3)) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            turn, _ = g711_tone(0.5, "g711_ulaw", peak_dbfs=-20.0)
            early, late = turn[:1600], turn[1600:]  # 200 ms before the config, the rest after
            for frame in frames(early, 160):
                await client.send_audio(frame)
            await client.send({"type": "config", "turn_detection": "none",
                               "input_audio_format": "g711_ulaw", "output_audio_format": "g711_ulaw"})
            await client.push_to_talk(late, 160)
            ready = await client.wait("ready")
            assert ready["input_audio_format"] == "g711_ulaw"
            await client.wait("response_done")
            assert client.events[0]["type"] == "ready"
            assert bytes(client.audio) == turn
            assert not client.of_type("error")
    run(scenario(), timeout=20)


def test_beta_dialect_end_to_end():
    async def scenario():
        async with relay(MockOptions(beta="serve"), upstream_dialect="beta") as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "temperature": 0.9, "voice": "verse"})
            ready = await client.wait("ready")
            assert ready["voice"] == "verse" and ready["ignored"] == []
            upstream = mock.sessions[0]
            assert upstream.dialect == "beta"
            update = await upstream.wait_for_client_event("session.update")
            assert update["session"]["temperature"] == 0.9 and update["session"]["voice"] == "verse"
            audio = silence(0.4) + speech_like(0.8, seed=4) + silence(0.8)
            for frame in frames(audio, 960):
                await client.send_audio(frame)
            started = await client.wait("speech_started")
            stopped = await client.wait("speech_stopped")
            await client.wait("transcript", role="user", is_final=True)
            await client.wait("transcript", role="assistant", is_final=True)
            await client.wait("response_done")
            assert bytes(client.audio) == audio[started["audio_ms"] * 48:stopped["audio_ms"] * 48]
    run(scenario(), timeout=20)


def test_waav_spellings():
    async def scenario():
        async with relay(MockOptions(function_trigger="name_in_text")) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": {"mode": "manual"}, "transcribe_input": True,
                               "transcription_model": "gpt-4o-transcribe", "max_response_tokens": -1,
                               "tools": [{"type": "function", "function": {"name": "lookup"}}]})
            ready = await client.wait("ready")
            assert ready["turn_detection"] == "none" and ready["input_transcription"] == "gpt-4o-transcribe"
            upstream = mock.sessions[0]
            update = await upstream.wait_for_client_event("session.update")
            assert update["session"]["max_output_tokens"] == "inf"
            assert update["session"]["tools"] == [{"type": "function", "name": "lookup"}]
            audio = speech_like(0.5, seed=5)
            await client.send_audio(audio)
            await client.send({"type": "commit_audio"})
            await client.send({"type": "create_response"})
            await client.wait("response_done")
            assert bytes(client.audio) == audio
            partial = await client.wait("transcript", role="user", is_final=False)
            final = await client.wait("transcript", role="user", is_final=True)
            assert final["text"].startswith(partial["text"])
            await client.send({"type": "update_session", "instructions": "new"})
            assert (await upstream.wait_for_client_event("session.update"))["session"]["instructions"] == "new"
            await client.send({"type": "text", "text": "use lookup now"})
            call = await client.wait("function_call")
            await client.wait("response_done")
            await client.send({"type": "function_result", "call_id": call["call_id"], "result": "found"})
            await client.wait("response_done")
            created = [e for e in upstream.received if e["type"] == "conversation.item.create"]
            assert created[-1]["item"]["output"] == "found"
    run(scenario(), timeout=20)


def test_passthrough_levels_and_fragmented_messages():
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            # a config split over three WebSocket frames is reassembled
            parts = ['{"type":"config",', '"levels":true,"turn_detection":', '"none"}']
            await client.ws.send(iter(parts))
            await client.wait("ready")
            audio = speech_like(0.5, seed=6)
            await client.send_audio(audio)
            level = await client.wait("level", timeout=3)
            assert -30 < level["input"]["rms_dbfs"] < 0 and level["input"]["peak_dbfs"] <= 0
            await client.send({"type": "input_audio_buffer.commit", "event_id": "mine_1"})
            upstream = mock.sessions[0]
            commit = await upstream.wait_for_client_event("input_audio_buffer.commit")
            assert commit == {"type": "input_audio_buffer.commit", "event_id": "mine_1"}
            await upstream.wait_for_server_event("input_audio_buffer.committed")
            await client.send({"type": "response.create"})
            await client.wait("response_done")
            assert bytes(client.audio) == audio
            level = await client.wait("level", timeout=3)
            assert level["output"]["rms_dbfs"] > -100 or any(
                e["output"]["rms_dbfs"] > -100 for e in client.of_type("level"))
    run(scenario(), timeout=20)


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_forwarded_retrieve_and_delete_get_the_upstreams_answers_as_they_came(dialect: str):
    """Found by a client-protocol audit: a forwarded `conversation.item.retrieve` got no answer
    (only its failure came back, as an error), so the escape hatch could ask but never hear.
    The answers to the requests only a client sends go back to it verbatim, in its dialect."""
    message = {"id": "item_mine", "type": "message", "role": "user",
               "content": [{"type": "input_text", "text": "remember this"}]}

    async def scenario():
        options = MockOptions(beta="serve" if dialect == "beta" else "reject")
        async with relay(options, upstream_dialect=dialect) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            await client.wait("ready")
            await client.send({"type": "conversation.item.create", "item": message})
            await client.send({"type": "conversation.item.retrieve", "event_id": "ask_1", "item_id": "item_mine"})
            retrieved = await client.wait("conversation.item.retrieved")
            await client.send({"type": "conversation.item.delete", "item_id": "item_mine"})
            deleted = await client.wait("conversation.item.deleted")
            await client.send({"type": "conversation.item.retrieve", "item_id": "item_mine"})
            gone = await client.wait("error")
            sent = [e for e in mock.sessions[0].sent if e["type"] in ("conversation.item.retrieved",
                                                                      "conversation.item.deleted")]
            await client.close()
            return retrieved, deleted, gone, sent

    retrieved, deleted, gone, sent = run(scenario(), timeout=20)
    for event in (retrieved, deleted):
        del event["_audio_before"]
    assert [retrieved, deleted] == sent  # verbatim
    assert retrieved["item"]["id"] == "item_mine" and retrieved["item"]["content"][0]["text"] == "remember this"
    assert deleted["item_id"] == "item_mine"
    assert gone["code"] == "UpstreamError" and gone["upstream"]["code"] == "item_retrieve_invalid_item_id"


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_an_out_of_band_reply_runs_beside_the_conversations_and_is_marked(dialect: str):
    """A client forwards `response.create` with `conversation:"none"` (a side question, text
    only) while the conversation's spoken reply is still streaming. The two run side by side:
    the side reply's `response_started`/`response_done` say `out_of_band: true` and its text
    comes as transcripts naming its response; the conversation's reply stays the active one, its
    audio echoed exactly, and the gateway asks for nothing of its own."""
    audio = speech_like(0.8, seed=21)
    text_only = {"output_modalities": ["text"]} if dialect == "ga" else {"modalities": ["text"]}

    async def scenario():
        options = MockOptions(pacing="realtime", beta="serve" if dialect == "beta" else "reject")
        async with relay(options, upstream_dialect=dialect) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            await client.wait("ready")
            await client.push_to_talk(audio)
            spoken = await client.wait("response_started")
            await client.send({"type": "response.create", "response": {
                "conversation": "none", "metadata": {"purpose": "classify"}, **text_only,
                "input": [{"type": "message", "role": "user",
                           "content": [{"type": "input_text", "text": "Is this a question?"}]}]}})
            side = await client.wait("response_started", out_of_band=True)
            side_done = await client.wait("response_done", response_id=side["response_id"])
            assert gateway_session(gateway).active_response_id == spoken["response_id"]
            spoken_done = await client.wait("response_done", response_id=spoken["response_id"])
            creates = [e for e in mock.sessions[0].received if e["type"] == "response.create"]
            return client, spoken, side, side_done, spoken_done, creates

    client, spoken, side, side_done, spoken_done, creates = run(scenario(), timeout=20)
    assert "out_of_band" not in spoken and "out_of_band" not in spoken_done
    assert side["response_id"] != spoken["response_id"]
    assert side_done["out_of_band"] is True and side_done["status"] == spoken_done["status"] == "completed"
    assert client.events.index(side_done) < client.events.index(spoken_done)  # truly side by side
    assert bytes(client.audio) == audio  # the side reply is text: the spoken one's audio is untouched
    side_text = [e for e in client.of_type("transcript") if e.get("response_id") == side["response_id"]]
    assert side_text and side_text[-1]["is_final"] and side_text[-1]["role"] == "assistant"
    assert len(creates) == 2 and "response" not in creates[0] and creates[1]["response"]["conversation"] == "none"
    assert client.of_type("error") == []


def gateway_session(gateway):
    (session,) = gateway.sessions
    return session
