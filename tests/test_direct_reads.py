"""Direct reads (`_fastpath.DirectReader`): in a normal install, once a session's audio flows,
the gateway reads both of its sockets itself (one epoll set for the loop) instead of through
uvloop's transports and picows, and gives a socket back to picows — unread bytes first, in
order — at anything it does not relay itself.

The end-to-end tests here run on both implementations (the pure twin never attaches a socket,
so they also pin down the behaviour the direct reads must reproduce): the client's byte stream
cut at arbitrary points, with pings and fragmented messages among the audio, arrives exact;
replies read directly keep their events in order; a close frame, an abrupt end of stream and
backpressure behave as through picows; `/metrics` shows what the reader relayed. Between two
writes the test waits until the gateway has read everything written (FIONREAD on the gateway's
side of the socket is 0), so the reader sees exactly the cuts the test chose.
"""
from __future__ import annotations

import array
import asyncio
import fcntl
import os
import re
import struct
import termios

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _fastpath
from gateway.mock import MockOptions
from gateway.server import GatewayServer
from tests.raw_client import RawClient, echo_turn, http_get, ready_client
from tests.relay_harness import relay, speech_like
from tests.support import run

COMPILED = _fastpath.IMPLEMENTATION == "compiled"
#: the longest a test waits, in loop iterations, for the gateway to read what was written
READ_WAIT_ITERATIONS = 20_000


def masked_frame(first_byte: int, payload: bytes, key: bytes = b"\x9a\x3c\x51\xe7") -> bytes:
    """A client frame (RFC 6455 §5.2): masked, with the shortest length encoding."""
    size = len(payload)
    if size < 126:
        header = bytes([first_byte, 0x80 | size])
    elif size < 65536:
        header = bytes([first_byte, 0x80 | 126]) + struct.pack("!H", size)
    else:
        header = bytes([first_byte, 0x80 | 127]) + struct.pack("!Q", size)
    masked = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return header + key + masked


def _unread_bytes(fd: int) -> int:
    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return count[0]


def _gateway_fd(gateway: GatewayServer) -> int:
    (session,) = gateway.sessions
    return session.client.underlying_transport.get_extra_info("socket").fileno()


async def write_read(client: RawClient, gateway_fd: int, data: bytes) -> None:
    """Write `data` on the client's socket as is, then wait until the gateway has read it all."""
    fd = client.transport.underlying_transport.get_extra_info("socket").fileno()
    view = memoryview(data)
    while view:
        written = os.write(fd, view)  # loopback: lands in the gateway's receive queue at once
        view = view[written:]
        for _ in range(READ_WAIT_ITERATIONS):
            if _unread_bytes(gateway_fd) == 0:
                break
            await asyncio.sleep(0)
        else:
            raise AssertionError(f"the gateway did not read {_unread_bytes(gateway_fd)} bytes")


def _legs(gateway: GatewayServer):
    (session,) = gateway.sessions
    return session.client_leg, session.upstream.listener


def test_both_sockets_of_a_flowing_session_are_read_directly():
    """Compiled: the first audio frame picows delivers moves the client socket to the reader,
    which relays the following ones; the first reply delta relayed without the session moves
    the upstream socket too. Control messages hand a socket back and audio takes it again; a
    second turn's echo is exact; the session's end drops both."""
    audio = speech_like(0.5, seed=3)
    block = 4800  # 100 ms: one stream-echo delta each

    async def scenario():
        async with relay(MockOptions(echo_mode="stream")) as (gateway, _mock):
            client = await ready_client(gateway.url)
            gateway_fd = _gateway_fd(gateway)
            client_leg, upstream_leg = _legs(gateway)
            seen = [(client_leg.reading_directly, upstream_leg.reading_directly, gateway.reader.attached)]
            for index in range(5):
                for offset in range(index * block, (index + 1) * block, 960):
                    await write_read(client, gateway_fd, masked_frame(0x82, audio[offset:offset + 960]))
                await client.wait_until(lambda: client.audio_bytes >= (index + 1) * block, 5, "the echo")
            seen.append((client_leg.reading_directly, upstream_leg.reading_directly, gateway.reader.attached))
            counts = (client_leg.direct_frames, upstream_leg.direct_frames)
            _status, exposition = await http_get(gateway.port, "/metrics")
            error_at = await client.sentinel()  # a text message: the client socket goes back
            seen.append((client_leg.reading_directly, upstream_leg.reading_directly, gateway.reader.attached))
            await client.close()
            await gateway.wait_empty(5)
            return seen, counts, client.errors()[:1], error_at, client.audio, gateway.reader.attached, exposition

    seen, counts, errors, error_at, echoed, attached_at_end, exposition = run(scenario(), timeout=30)
    # operators see it too: what the reader relayed so far, and what it reads now
    metrics = dict(re.findall(rb"^(gateway_direct_read_\w+) (\S+)$", exposition, re.M))
    assert float(metrics[b"gateway_direct_read_frames_total"]) == sum(counts)
    assert float(metrics[b"gateway_direct_read_sockets"]) == seen[1][2]
    assert echoed == audio
    assert seen[0] == (False, False, 0)  # nothing relayed yet: picows reads both
    assert len(errors) == 1 and error_at >= 0  # only the sentinel's error
    if COMPILED:
        assert seen[1:] == [(True, True, 2), (False, True, 1)]
        # 25 client frames: the first through picows; 5 deltas + 5 transcript deltas: the first
        # pair through the session and picows, the second through picows (it attaches)
        assert counts[0] == 24 and counts[1] >= 4
    else:
        assert seen[1:] == [(False, False, 0)] * 2 and counts == (0, 0)
    assert attached_at_end == 0


def test_replies_read_directly_keep_every_event_in_order():
    """Turn-based replies paced in real time: each reply's later deltas are read directly
    (compiled), and the events around them — response started, transcript deltas, the final
    transcript, response done — still reach the client in order, turn after turn, with the
    audio byte-exact."""
    turns = [speech_like(0.4, seed=11), speech_like(0.3, seed=12)]

    async def scenario():
        async with relay(MockOptions(pacing="realtime")) as (gateway, _mock):
            client = await ready_client(gateway.url, {"input_transcription": {"enabled": False}})
            _client_leg, upstream_leg = _legs(gateway)
            marks = []
            for audio in turns:
                await echo_turn(client, audio)
                marks.append(len(client.events))
            await client.close()
            return client.events, marks, upstream_leg.direct_frames

    events, marks, upstream_direct = run(scenario(), timeout=30)
    start = 0
    for mark in marks:
        turn = [e for e in events[start:mark] if e["type"] in ("response_started", "transcript", "response_done")]
        kinds = [e["type"] if e["type"] != "transcript" else ("final" if e["is_final"] else "delta") for e in turn]
        assert kinds[0] == "response_started" and kinds[-2:] == ["final", "response_done"]
        assert set(kinds[1:-2]) == {"delta"}
        assert "".join(e["text"] for e in turn[1:-2]) == turn[-2]["text"]
        assert len({e["response_id"] for e in turn}) == 1
        start = mark
    if COMPILED:
        assert upstream_direct > 0
    else:
        assert upstream_direct == 0


_AUDIO_SIZES = st.one_of(st.integers(0, 125), st.integers(126, 4000), st.sampled_from([65534, 65536, 70000]))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(_AUDIO_SIZES.map(lambda n: n & ~1), min_size=2, max_size=12),
       extras=st.lists(st.sampled_from(["none", "none", "ping", "fragmented"]), min_size=12, max_size=12),
       cuts=st.one_of(st.none(), st.lists(st.integers(1, 20000), min_size=1, max_size=30)),
       seed=st.integers(0, 1000), read_batch_ms=st.sampled_from([0, 2]))
def test_any_cut_of_the_client_stream_arrives_exact(sizes, extras, cuts, seed, read_batch_ms):
    """Audio frames of every length encoding, with pings and fragmented audio messages among
    them, written as one byte stream cut at arbitrary points (mid-header, mid-mask,
    mid-payload) or, with `cuts` None, one message per write: the echo is the audio, byte for
    byte, and every ping got its pong. Written message by message, every audio frame that
    follows another plain one is relayed by the reader (compiled): a ping or a fragmented
    message hands the socket back, and the next frame picows delivers takes it again (as does a
    frame longer than the reader's 64 KiB read). Paced reads (`--read-batch-ms 2`) change when
    the reader reads, never what it relays."""
    pcm = speech_like(sum(sizes) / 48000 + 0.01, seed=seed)
    lead, tail = pcm[:960], speech_like(0.1, seed=seed + 1)
    messages, audio, pings, offset = [], bytearray(), 0, 0
    for size, extra in zip(sizes, extras):
        chunk = pcm[offset:offset + size]
        offset += size
        if extra == "fragmented" and size >= 4:
            half = size // 2 & ~1
            messages.append(("fragmented", masked_frame(0x02, chunk[:half]) + masked_frame(0x80, chunk[half:])))
        else:
            messages.append(("audio", masked_frame(0x82, chunk)))
        audio += chunk
        if extra == "ping":
            messages.append(("ping", masked_frame(0x89, b"p%d" % pings)))
            pings += 1
    stream = b"".join(data for _kind, data in messages)
    kinds = ["audio"] + [kind for kind, _data in messages]
    # the reader takes one recv of at most 64 KiB: a longer frame goes to picows whole
    follows_audio = sum(1 for before, (kind, data) in zip(kinds, messages)
                        if before == kind == "audio" and len(data) <= 65536)

    async def scenario():
        async with relay(read_batch_ms=read_batch_ms) as (gateway, _mock):
            client = await ready_client(gateway.url)
            gateway_fd = _gateway_fd(gateway)
            # one plain audio frame first, so the reader (compiled) owns the socket from the start
            await write_read(client, gateway_fd, masked_frame(0x82, lead))
            if cuts is None:
                for _kind, data in messages:
                    await write_read(client, gateway_fd, data)
            else:
                position = 0
                for cut in cuts:
                    await write_read(client, gateway_fd, stream[position:position + cut])
                    position += cut
                await write_read(client, gateway_fd, stream[position:])
            direct_frames = _legs(gateway)[0].direct_frames
            # 100 ms more: the upstream commits no less (whatever the stream held)
            await write_read(client, gateway_fd, masked_frame(0x82, tail))
            client.send_json({"type": "commit"})
            client.send_json({"type": "create_response"})
            done = await client.wait("response_done", timeout=10)
            await client.wait_until(lambda: len(client.pongs) >= pings, 5, "the pongs")
            await client.close()
            return done, client.audio, client.pongs, client.errors(), direct_frames

    done, echoed, pongs, errors, direct_frames = run(scenario(), timeout=60)
    assert errors == [] and done["status"] == "completed"
    assert echoed == lead + bytes(audio) + tail
    assert pongs == [b"p%d" % i for i in range(pings)]
    if not COMPILED:
        assert direct_frames == 0
    elif cuts is None:
        assert direct_frames == follows_audio


async def _until(condition, timeout_s: float, what: str) -> None:
    """Wait, bounded, for a condition that a timer of the gateway's makes true."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


def test_paced_reads_wait_for_the_tick_under_load_and_not_when_idle():
    """`--read-batch-ms`: once a read found work, the reader reads again only when the interval
    is over — a frame written meanwhile stays in the kernel's queue until the tick — and a tick
    that finds nothing hands the set back to the loop, so the next frame is read at once. The
    echo is the audio, exact. (A long interval, so that "not yet" cannot be a scheduling
    accident; the pure twin reads through picows and is never paced.)"""
    frames = [speech_like(0.02, seed=20 + i) for i in range(5)]   # one 100 ms echo block

    async def scenario():
        async with relay(MockOptions(echo_mode="stream"), read_batch_ms=800) as (gateway, _mock):
            client = await ready_client(gateway.url)
            gateway_fd = _gateway_fd(gateway)
            reader = gateway.reader
            seen = {"interval": reader.batch_interval_s}
            await write_read(client, gateway_fd, masked_frame(0x82, frames[0]))  # picows; attaches
            await write_read(client, gateway_fd, masked_frame(0x82, frames[1]))  # the reader: work
            seen["paced after work"] = reader.paced
            client_fd = client.transport.underlying_transport.get_extra_info("socket").fileno()
            os.write(client_fd, masked_frame(0x82, frames[2]))
            for _ in range(200):
                await asyncio.sleep(0)
            seen["unread before the tick"] = _unread_bytes(gateway_fd)
            await _until(lambda: _unread_bytes(gateway_fd) == 0, 5, "the tick's read")
            await _until(lambda: not reader.paced, 5, "the idle tick")   # the next tick: nothing
            # read at once (write_read gives up long before an 800 ms tick) ...
            await write_read(client, gateway_fd, masked_frame(0x82, frames[3]))
            # ... and that was work again: the next frame waits for its tick
            os.write(client_fd, masked_frame(0x82, frames[4]))
            await _until(lambda: _unread_bytes(gateway_fd) == 0, 5, "the tick's read")
            await client.wait_until(lambda: client.audio_bytes >= 4800, 5, "the echo")
            seen["direct"] = _legs(gateway)[0].direct_frames
            await client.close()
            return seen, client.audio

    seen, echoed = run(scenario(), timeout=30)
    assert echoed == b"".join(frames)
    assert seen["interval"] == 0.8
    if COMPILED:
        assert seen["paced after work"] is True
        assert seen["unread before the tick"] == len(masked_frame(0x82, frames[2]))
        assert seen["direct"] == 4
    else:
        assert seen["paced after work"] is False and seen["unread before the tick"] == 0


@pytest.mark.parametrize("ending", ["close_frame", "end_of_stream"])
def test_a_session_read_directly_ends_like_any_other(ending):
    """A close frame is answered with the same code; an abrupt end of stream ends the session;
    either way the reader lets go of the socket and nothing stays registered."""
    async def scenario():
        async with relay() as (gateway, _mock):
            client = await ready_client(gateway.url)
            gateway_fd = _gateway_fd(gateway)
            await write_read(client, gateway_fd, masked_frame(0x82, speech_like(0.02, seed=1)))
            client_leg, _upstream_leg = _legs(gateway)
            attached = client_leg.reading_directly
            if ending == "close_frame":
                await write_read(client, gateway_fd, masked_frame(0x88, struct.pack("!H", 1000)))
                await client.wait_closed()
            else:
                client.transport.disconnect(graceful=False)
            await gateway.wait_empty(5)
            return attached, client.close_code, gateway.reader.attached

    attached, close_code, left = run(scenario(), timeout=20)
    assert attached is COMPILED
    if ending == "close_frame":
        assert close_code == 1000
    assert left == 0


def test_a_hand_back_ending_in_a_partial_frame_leaves_the_socket_with_picows():
    """A ping hands the socket back with the rest of one read: 4,000 small audio frames and the
    start of a frame F. picows takes that rest in pieces no bigger than its free buffer (4 KiB
    at first), and a small frame ends every piece exactly: the socket must not move back to the
    reader before picows has F whole, or the reader would parse F's payload — here crafted to
    read as a complete frame from byte 50 on — as a frame of its own."""
    lead, tail = speech_like(0.02, seed=1), speech_like(0.02, seed=2)
    small = [bytes([i & 0xFF, i >> 8 & 0xFF]) for i in range(4000)]
    key = b"\x11\x22\x33\x44"
    on_the_wire = bytes((i * 13 + 7) & 0xFF for i in range(50)) + b"\x82\x84\x00\x00\x00\x00PHAN" + bytes(140)
    f_payload = bytes(b ^ key[i & 3] for i, b in enumerate(on_the_wire))
    f_frame = masked_frame(0x82, f_payload, key=key)
    first_write = (masked_frame(0x89, b"pi") + b"".join(masked_frame(0x82, pcm) for pcm in small)
                   + f_frame[:8 + 50])
    assert len(first_write) < 65536  # one recv of the reader

    async def scenario():
        async with relay(read_batch_ms=0) as (gateway, _mock):
            client = await ready_client(gateway.url)
            gateway_fd = _gateway_fd(gateway)
            await write_read(client, gateway_fd, masked_frame(0x82, lead))
            await write_read(client, gateway_fd, first_write)
            held_by_picows = not _legs(gateway)[0].reading_directly
            await write_read(client, gateway_fd, f_frame[8 + 50:])
            await write_read(client, gateway_fd, masked_frame(0x82, tail))
            client.send_json({"type": "commit"})
            client.send_json({"type": "create_response"})
            done = await client.wait("response_done", timeout=10)
            await client.close()
            return held_by_picows, done, client.audio, client.errors()

    held_by_picows, done, echoed, errors = run(scenario(), timeout=30)
    assert errors == [] and done["status"] == "completed"
    assert echoed == lead + b"".join(small) + f_payload + tail
    assert held_by_picows


@pytest.mark.parametrize("form", [16, 64])
def test_a_length_in_a_longer_form_than_needed_fails_the_connection_as_through_picows(form):
    """RFC 6455 §5.2: the shortest length encoding only. picows fails the connection (1002) on
    a 16-byte payload written with the 16- or 64-bit length form; the reader must decline it
    (and hand it to picows) rather than relay it."""
    payload = bytes(range(2, 18))
    key = b"\x9a\x3c\x51\xe7"
    length = struct.pack("!H", len(payload)) if form == 16 else struct.pack("!Q", len(payload))
    frame = bytes([0x82, 0x80 | (126 if form == 16 else 127)]) + length + key + bytes(
        b ^ key[i & 3] for i, b in enumerate(payload))

    async def scenario():
        async with relay(read_batch_ms=0) as (gateway, _mock):
            client = await ready_client(gateway.url)
            gateway_fd = _gateway_fd(gateway)
            await write_read(client, gateway_fd, masked_frame(0x82, speech_like(0.02, seed=1)))
            (session,) = gateway.sessions
            before = session.path.c2u_audio_bytes
            await write_read(client, gateway_fd, frame)
            await client.wait_closed()
            return session.path.c2u_audio_bytes - before, client.close_code

    relayed, close_code = run(scenario(), timeout=20)
    assert (relayed, close_code) == (0, 1002)


def test_backpressure_takes_the_socket_back_and_stops_reading():
    """While the upstream does not take our writes the session holds the client's reads: the
    socket is the transport's again, paused, and stays so; resumed, the audio flows again."""
    audio = speech_like(0.2, seed=5)

    async def scenario():
        async with relay() as (gateway, _mock):
            client = await ready_client(gateway.url)
            gateway_fd = _gateway_fd(gateway)
            await write_read(client, gateway_fd, masked_frame(0x82, audio[:960]))
            (session,) = gateway.sessions
            client_leg = session.client_leg
            attached = client_leg.reading_directly
            session.on_upstream_paused()
            held = (client_leg.reading_directly, client_leg.reads_held,
                    session.client.underlying_transport.is_reading(), gateway.reader.attached)
            session.on_upstream_resumed()
            resumed = (client_leg.reads_held, session.client.underlying_transport.is_reading())
            for offset in range(960, len(audio), 960):
                await write_read(client, gateway_fd, masked_frame(0x82, audio[offset:offset + 960]))
            again = client_leg.reading_directly
            client.send_json({"type": "commit"})
            client.send_json({"type": "create_response"})
            await client.wait("response_done")
            await client.close()
            return attached, held, resumed, again, client.audio

    attached, held, resumed, again, echoed = run(scenario(), timeout=20)
    assert attached is COMPILED and again is COMPILED
    assert held[:3] == (False, True, False)
    assert resumed == (False, True)
    assert echoed == audio


def test_direct_reads_off_leaves_every_read_to_picows():
    """`--direct-reads off`: no reader; the same audio flows, exact, through picows alone."""
    audio = speech_like(0.3, seed=9)

    async def scenario():
        async with relay(direct_reads="off") as (gateway, _mock):
            client = await ready_client(gateway.url)
            gateway_fd = _gateway_fd(gateway)
            for offset in range(0, len(audio), 960):
                await write_read(client, gateway_fd, masked_frame(0x82, audio[offset:offset + 960]))
            client_leg, _upstream_leg = _legs(gateway)
            client.send_json({"type": "commit"})
            client.send_json({"type": "create_response"})
            await client.wait("response_done")
            await client.close()
            return gateway.reader, client_leg.direct_frames, client.audio

    reader, direct_frames, echoed = run(scenario(), timeout=20)
    assert reader is None and direct_frames == 0
    assert echoed == audio
