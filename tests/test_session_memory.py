"""A long conversation keeps a bounded footprint: the session remembers the last RECENT items,
responses and calls for interruption and function-call bookkeeping, never all of them."""
from __future__ import annotations

from gateway.config import NodeConfig
from gateway.recent import RECENT
from gateway.session import RelaySession
from tests.support import run

ROUNDS = 3 * RECENT


def _session() -> RelaySession:
    """A session that never attaches a client: its handlers are driven directly (it needs the
    running loop, hence the scenarios below are coroutines)."""
    node = NodeConfig(host="127.0.0.1", port=0, upstream="openai", upstream_url="ws://127.0.0.1:9/v1/realtime",
                      api_key="test-key-1")
    return RelaySession(node, node.upstream_url, None)


def test_bookkeeping_keeps_only_the_most_recent_entries():
    async def scenario():
        session = _session()
        for n in range(ROUNDS):
            response_id, item_id, call_id = f"resp_{n}", f"item_{n}", f"call_{n}"
            session._on_output_item_added({"response_id": response_id, "item": {
                "id": item_id, "type": "function_call", "call_id": call_id, "name": "lookup"}})
            session._audio_out(item_id, b"\0\0")
            session._dispatch_call(call_id, "lookup", "{}", response_id)
        playback = session.playback
        for owner, name in ((playback, "item_response"), (playback, "_finished"), (playback, "_playing"),
                            (session, "_response_calls"), (session, "_calls_dispatched")):
            remembered = getattr(owner, name)
            assert len(remembered) <= RECENT, (name, len(remembered))
        last = ROUNDS - 1
        assert playback.item_response[f"item_{last}"] == f"resp_{last}"  # the recent ones stay
        assert f"call_{last}" in session._calls_dispatched and "call_0" not in session._calls_dispatched
        assert f"item_{last - 1}" in playback._finished and "item_0" not in playback._finished

    run(scenario(), timeout=20)


def test_interruption_marks_stay_bounded_and_recent():
    async def scenario():
        session = _session()
        for n in range(ROUNDS):
            session._on_output_item_added({"response_id": f"resp_{n}", "item": {"id": f"item_{n}"}})
            session._audio_out(f"item_{n}", bytes(4800))  # 100 ms delivered and being played
            session.active_response_id = f"resp_{n}"
            session._interrupt_if_playing()
        interrupted_items, interrupted_responses = session.playback.interrupted_items, session.playback.interrupted_responses
        assert len(interrupted_items) <= RECENT and len(interrupted_responses) <= RECENT
        last = ROUNDS - 1
        assert f"item_{last}" in interrupted_items and f"resp_{last}" in interrupted_responses
        assert "item_0" not in interrupted_items

    run(scenario(), timeout=20)
