"""Upstream dialect translators: session.update shapes (GA nested / beta flat), event normalisation,
effective settings, URLs and headers."""
from __future__ import annotations

from gateway.client_protocol import SessionConfig
from gateway.config import NodeConfig
from gateway.upstream import BetaDialect, GaDialect, build_upstream_url, dialect_for

FULL = SessionConfig(
    voice="ash", instructions="Be brief.", turn_detection="server_vad", vad_threshold=0.5,
    vad_silence_duration_ms=500, vad_prefix_padding_ms=300, transcription_model="whisper-1", temperature=0.9,
    max_response_tokens=200, tools=[{"type": "function", "name": "get_weather"}], tool_choice="auto",
    input_audio_format="pcm16", output_audio_format="g711_alaw", modalities=["text", "audio"])


def test_ga_session_update_is_nested_with_type_and_no_temperature():
    event, ignored = GaDialect().session_update(FULL, "e1")
    assert event == {"type": "session.update", "event_id": "e1", "session": {
        "type": "realtime", "output_modalities": ["audio"], "instructions": "Be brief.",
        "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": 24000}, "transcription": {"model": "whisper-1"},
                      "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                         "silence_duration_ms": 500, "create_response": True,
                                         "interrupt_response": True}},
            "output": {"format": {"type": "audio/pcma"}, "voice": "ash"}},
        "tools": [{"type": "function", "name": "get_weather"}], "tool_choice": "auto", "max_output_tokens": 200}}
    assert ignored == ["temperature"]


def test_beta_session_update_is_flat():
    event, ignored = BetaDialect().session_update(FULL)
    assert event == {"type": "session.update", "session": {
        "modalities": ["text", "audio"], "instructions": "Be brief.", "voice": "ash",
        "input_audio_format": "pcm16", "output_audio_format": "g711_alaw",
        "input_audio_transcription": {"model": "whisper-1"},
        "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                           "silence_duration_ms": 500, "create_response": True, "interrupt_response": True},
        "tools": [{"type": "function", "name": "get_weather"}], "tool_choice": "auto", "temperature": 0.9,
        "max_response_output_tokens": 200}}
    assert ignored == []


def test_manual_turns_are_null_never_type_none():
    manual = SessionConfig(turn_detection="none", transcription_model="")
    ga, _ = GaDialect().session_update(manual)
    assert ga["session"]["audio"]["input"] == {"turn_detection": None, "transcription": None}
    beta, _ = BetaDialect().session_update(manual)
    assert beta["session"]["turn_detection"] is None and beta["session"]["input_audio_transcription"] is None


def test_semantic_vad_and_text_only_modalities():
    config = SessionConfig(turn_detection="semantic_vad", vad_eagerness="low", modalities=["text"])
    ga, _ = GaDialect().session_update(config)
    assert ga["session"]["output_modalities"] == ["text"]
    assert ga["session"]["audio"]["input"]["turn_detection"] == {
        "type": "semantic_vad", "eagerness": "low", "create_response": True, "interrupt_response": True}
    beta, _ = BetaDialect().session_update(SessionConfig(modalities=["audio"]))
    assert beta["session"]["modalities"] == ["text", "audio"]


def test_partial_update_carries_only_specified_fields():
    ga, _ = GaDialect().session_update(SessionConfig(instructions="x"))
    assert ga["session"] == {"type": "realtime", "instructions": "x"}
    beta, _ = BetaDialect().session_update(SessionConfig(instructions="x"))
    assert beta["session"] == {"instructions": "x"}


def test_beta_events_are_renamed_to_the_internal_model():
    beta = BetaDialect()
    pairs = {
        "response.audio.delta": "response.output_audio.delta",
        "response.audio.done": "response.output_audio.done",
        "response.audio_transcript.delta": "response.output_audio_transcript.delta",
        "response.audio_transcript.done": "response.output_audio_transcript.done",
        "response.text.delta": "response.output_text.delta",
        "response.text.done": "response.output_text.done",
        "conversation.item.created": "conversation.item.added",
        "response.done": "response.done",
        "input_audio_buffer.speech_started": "input_audio_buffer.speech_started",
    }
    for old, new in pairs.items():
        assert beta.normalize({"type": old, "x": 1}) == {"type": new, "x": 1}
    ga_event = {"type": "response.output_audio.delta", "delta": "AAAA"}
    assert GaDialect().normalize(dict(ga_event)) == ga_event


def test_effective_settings_from_session_objects():
    ga_session = {"model": "gpt-realtime", "audio": {
        "input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None,
                  "transcription": {"model": "whisper-1"}},
        "output": {"format": {"type": "audio/pcmu"}, "voice": "marin"}}}
    assert GaDialect().effective(ga_session) == {
        "model": "gpt-realtime", "voice": "marin", "turn_detection": "none", "input_audio_format": "pcm16",
        "output_audio_format": "g711_ulaw", "input_transcription": "whisper-1"}
    beta_session = {"model": "gpt-4o-realtime-preview", "voice": "alloy", "input_audio_format": "pcm16",
                    "output_audio_format": "pcm16", "turn_detection": {"type": "server_vad"},
                    "input_audio_transcription": None}
    assert BetaDialect().effective(beta_session) == {
        "model": "gpt-4o-realtime-preview", "voice": "alloy", "turn_detection": "server_vad",
        "input_audio_format": "pcm16", "output_audio_format": "pcm16", "input_transcription": None}


def test_urls_and_headers():
    assert build_upstream_url("wss://api.openai.com/v1/realtime", "gpt-realtime") == \
        "wss://api.openai.com/v1/realtime?model=gpt-realtime"
    azure = "wss://r.openai.azure.com/openai/realtime?api-version=2024-10-01-preview&deployment=d1"
    assert build_upstream_url(azure, "gpt-realtime") == azure
    assert build_upstream_url("ws://h/v1/realtime?x=1", "m") == "ws://h/v1/realtime?x=1&model=m"
    assert dialect_for("beta").headers == (("OpenAI-Beta", "realtime=v1"),)
    assert dialect_for("ga").headers == ()
    assert NodeConfig(upstream="openai", api_key="test-key-1").auth_headers == \
        [("Authorization", "Bearer test-key-1")]
    assert NodeConfig(upstream="azure", api_key="test-key-1").auth_headers == [("api-key", "test-key-1")]
    assert "test-key-1" not in repr(NodeConfig(api_key="test-key-1"))


def test_an_upstream_error_param_names_the_config_field_it_refuses():
    """The session leaves out exactly the field an atomic rejection names (session._config_rejected)."""
    ga, beta = GaDialect(), BetaDialect()
    assert ga.config_field("session.audio.output.voice") == "voice"
    assert ga.config_field("session.audio.input.transcription.model") == "transcription_model"
    assert ga.config_field("session.audio.input.turn_detection.threshold") == "vad_threshold"
    assert ga.config_field("session.audio.input.turn_detection.type") == "turn_detection"
    assert ga.config_field("session.tools[0].parameters") == "tools"
    assert ga.config_field("session.max_output_tokens") == "max_response_tokens"
    assert beta.config_field("session.voice") == "voice"
    assert beta.config_field("session.input_audio_transcription.model") == "transcription_model"
    assert beta.config_field("session.turn_detection.silence_duration_ms") == "vad_silence_duration_ms"
    assert beta.config_field("session.temperature") == "temperature"
    for dialect in (ga, beta):
        assert dialect.config_field("session") is None and dialect.config_field(None) is None
        assert dialect.config_field("session.voiceover") is None   # a prefix of a name is not a match


def test_odd_upstream_events_are_ignored_and_an_audio_delta_counts_once():
    """Through a live session: an event whose `type` is not a string (an array, an object) or
    whose format object's type is not one is ignored in both dialects, not an exception in the
    upstream listener; an audio delta the compiled decoder declines (an escaped `\\/` in its
    base64: valid JSON) reaches the client and counts as one audio frame, not also as a JSON
    frame — the same figures as the pure twin, whose decoder takes it."""
    import base64

    import _fastpath
    from gateway.mock import MockOptions
    from tests.relay_harness import RelayClient, relay
    from tests.support import run

    assert GaDialect().effective({"audio": {"output": {"format": {"type": ["audio/pcm"]}}}})["output_audio_format"] \
        is None
    declined = b'{"type":"response.output_audio.delta","item_id":"item_X","delta":"AQ\\/D","response_id":"r"}'

    async def scenario(dialect: str):
        async with relay(MockOptions(beta="serve"), upstream_dialect=dialect) as (gateway, _mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            (session,) = gateway.sessions
            stats = session.stats
            for odd in (b'{"type":["response.output_audio_transcript.delta"],"item_id":"i","delta":"x"}',
                        b'{"type":{"a":1}}', b'["session.created"]', b'not json'):
                session.on_upstream_event(odd)
            session.flush_client_batch()
            json_frames = stats.u2c_json_frames
            before = (stats.u2c_audio_frames, stats.u2c_audio_bytes)
            decoded = _fastpath.decode_audio_delta(declined)
            if decoded is None:
                session.on_upstream_event(declined)  # what the upstream leg does with "not handled"
            else:
                session.on_upstream_audio(*decoded)
            session.flush_client_batch()
            await client.wait_audio(3)
            after = (stats.u2c_audio_frames, stats.u2c_audio_bytes)
            return json_frames, stats.u2c_json_frames, before, after, bytes(client.audio), client.of_type("error")

    for dialect in ("ga", "beta"):
        json_frames, json_after, before, after, audio, errors = run(scenario(dialect), timeout=20)
        assert json_frames >= 4 and json_after == json_frames  # the declined delta is not JSON traffic
        assert (after[0] - before[0], after[1] - before[1]) == (1, 3)
        assert audio == base64.b64decode("AQ/D")
        assert errors == []



def test_a_node_set_to_the_other_dialect_says_so_instead_of_half_working():
    """An Azure preview URL (beta names) on a node left at `ga`, or a `beta` node in front of a GA
    upstream: the upstream's first `session` object has the other shape. Before, the session went
    `ready` with null settings and a refused `session.type` (a ga node), and transcripts, tool
    calls and the reply's end went unread; now the client gets a fatal `ConnectionFailed` naming
    the setting, and no `ready`."""
    import asyncio

    from gateway.mock import MockOptions, MockRealtimeServer
    from gateway.server import GatewayServer
    from tests.relay_harness import TEST_KEY, RelayClient, ScriptedUpstream
    from tests.support import run

    async def hello(gateway):
        client = await RelayClient.connect(gateway.url)
        error = await client.wait("error")
        await asyncio.wait_for(client.closed.wait(), 5)
        return error, client.of_type("ready"), client.close_code

    def node(url: str, dialect: str) -> NodeConfig:
        return NodeConfig(host="127.0.0.1", port=0, upstream="azure", upstream_url=url, api_key=TEST_KEY,
                          upstream_dialect=dialect, connect_timeout_s=3.0)

    async def azure_preview_on_a_ga_node():
        mock = MockRealtimeServer(MockOptions(beta="serve", api_keys={TEST_KEY}))
        await mock.start(host="127.0.0.1", port=0)
        preview = mock.url.replace("/v1/realtime", "/openai/realtime?api-version=2024-10-01-preview&deployment=d1")
        try:
            async with GatewayServer(node(preview, "ga")) as gateway:
                return await hello(gateway)
        finally:
            await mock.stop()

    async def beta_node_before_a_ga_upstream():
        async def script(upstream):
            pass  # the session.created alone tells
        async with ScriptedUpstream(script) as url, GatewayServer(node(url, "beta")) as gateway:
            return await hello(gateway)

    for scenario, spoken, node_dialect in ((azure_preview_on_a_ga_node, "beta", "ga"),
                                           (beta_node_before_a_ga_upstream, "ga", "beta")):
        error, ready, close_code = run(scenario(), timeout=20)
        assert error["code"] == "ConnectionFailed" and error["fatal"] is True
        assert error["message"] == (f"the upstream speaks the {spoken} dialect, not the {node_dialect} dialect "
                                    f"this gateway is set to (--upstream-dialect)")
        assert ready == [] and close_code == 1011


def test_the_dialect_fix_is_logged_once_per_node_not_per_session(caplog, monkeypatch):
    """A misconfigured node fails every session: each failure has its own warning line, and the
    ERROR naming the setting to change comes once (it came with every session, two lines each)."""
    import asyncio
    import logging

    from gateway import session
    monkeypatch.setattr(session, "_DIALECT_MISMATCHES_LOGGED", set())  # another test's mock had this port, say

    from gateway.mock import MockOptions, MockRealtimeServer
    from gateway.server import GatewayServer
    from tests.relay_harness import TEST_KEY, RelayClient
    from tests.support import run

    async def two_sessions():
        mock = MockRealtimeServer(MockOptions(beta="serve", api_keys={TEST_KEY}))
        await mock.start(host="127.0.0.1", port=0)
        preview = mock.url.replace("/v1/realtime", "/openai/realtime?api-version=2024-10-01-preview&deployment=d1")
        node = NodeConfig(host="127.0.0.1", port=0, upstream="azure", upstream_url=preview, api_key=TEST_KEY,
                          upstream_dialect="ga", connect_timeout_s=3.0)
        codes = []
        try:
            async with GatewayServer(node) as gateway:
                for _ in range(2):
                    client = await RelayClient.connect(gateway.url)
                    codes.append((await client.wait("error"))["code"])
                    await asyncio.wait_for(client.closed.wait(), 5)
        finally:
            await mock.stop()
        return codes

    with caplog.at_level(logging.INFO, logger="gateway.session"):
        assert run(two_sessions(), timeout=20) == ["ConnectionFailed", "ConnectionFailed"]
    fixes = [r for r in caplog.records if r.levelno == logging.ERROR]
    failures = [r for r in caplog.records if r.levelno == logging.WARNING and "ConnectionFailed" in r.getMessage()]
    assert len(fixes) == 1 and fixes[0].getMessage().endswith("start it with --upstream-dialect beta")
    assert len(failures) == 2
