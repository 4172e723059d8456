"""An upstream that goes silent without a FIN or RST — a path that starts dropping packets, a
host that vanished — must end the session with a fatal ConnectionFailed, not leave it hanging
while TCP retransmits for ~15 minutes and the client streams into a full buffer.

Dropping packets needs a network of its own (tests/black_hole.py): each case runs in a child
process in a new network namespace, where the mock's port passes 8 bit/s once the session is
up. The node's liveness settings are shortened there (1.5 s instead of 20 s), so a case takes
seconds."""
from __future__ import annotations

import asyncio
import json
import socket

import pytest

from gateway import sockets
from tests.black_hole import black_hole, prepare_namespace, run_in_namespace
from tests.relay_harness import RelayClient, relay, speech_like
from tests.support import run


async def _scenario(mode: str) -> dict:
    audio = speech_like(0.2, seed=8)
    async with relay() as (gateway, mock):
        client = await RelayClient.connect(gateway.url)
        await client.wait("ready")
        await client.push_to_talk(audio)  # the path works before the silence
        await client.wait("response_done")
        echoed = bytes(client.audio)
        black_hole(int(mock.url.split(":")[2].split("/")[0]))
        loop = asyncio.get_running_loop()
        started = loop.time()
        talking = None
        if mode == "streaming":
            async def talk() -> None:  # a microphone going on into the silence, 20 ms frames, ≤ 15 s
                for _ in range(750):
                    await client.send_audio(audio[:960])
                    await asyncio.sleep(0.02)
            talking = asyncio.ensure_future(talk())
        error = await client.wait("error", timeout=15)
        elapsed = loop.time() - started
        await client.wait_closed()
        if talking is not None:
            talking.cancel()
        return {"echoed": echoed == audio, "error": error, "elapsed": elapsed, "close_code": client.close_code,
                "sessions_left": len(gateway.sessions)}


def _in_namespace(mode: str) -> None:
    """The child: liveness shortened; prints the scenario's result."""
    import uvloop
    prepare_namespace()
    sockets.UPSTREAM_ACK_TIMEOUT_S = 1.5
    sockets.KEEPALIVE_IDLE_S = 1
    sockets.KEEPALIVE_INTERVAL_S = 1
    print(json.dumps(uvloop.run(asyncio.wait_for(_scenario(mode), 30))))


def test_upstream_sockets_are_set_to_notice_a_dead_peer():
    """What the kernel is told on every upstream socket (the cases below show it acting on it)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sock = run(sockets.connect(*listener.getsockname()), timeout=10)
        with sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 20_000
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10


@pytest.mark.parametrize("mode", ["streaming", "idle"])
def test_an_upstream_that_goes_silent_ends_the_session_promptly(mode):
    """Streaming: what the client says goes unacknowledged (TCP_USER_TIMEOUT). Idle (between
    push-to-talk turns, nothing in flight): the keepalive probes go unanswered."""
    result = run_in_namespace("tests.test_dead_upstream", f"_in_namespace({mode!r})")
    assert result["echoed"]
    error = result["error"]
    assert (error["code"], error["fatal"]) == ("ConnectionFailed", True)
    assert error["message"] == "upstream connection lost (no close frame)"
    assert result["close_code"] == 1011 and result["sessions_left"] == 0
    # 1.5 s unacknowledged (+ 1 s idle before the first probe); never TCP's ~15 minutes
    assert 1.5 <= result["elapsed"] < 10
