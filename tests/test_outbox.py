"""ClientOutbox (gateway/outbox.py): how messages reach the client, and the slow-client policy,
on fakes the test controls: no sockets, no clock. End to end, the same policies are exercised by
tests/test_faults.py against a client that really stops reading."""
from __future__ import annotations

from picows import WSMsgType

from gateway import outbox as outbox_module
from gateway.outbox import DROPPING, OVERFLOW, READING, STALLED, ClientOutbox

LIMIT = 1000  # bytes of reply audio a paused client may have queued


class FakePath:
    """The AudioPath's batch of the current upstream read."""

    def __init__(self) -> None:
        self.batching = False
        self.batch: list = []
        self.flushed: list[list] = []

    def flush_batch(self) -> None:
        if self.batch:
            self.flushed.append(self.batch)
        self.batch = []
        self.batching = False


class FakeStats:
    u2c_buffered_bytes = 0
    u2c_buffered_peak = 0


class FakeMetrics:
    def __init__(self) -> None:
        self.drops: list[tuple[str, int]] = []

    def count_drop(self, reason: str, size: int) -> None:
        self.drops.append((reason, size))


class FakeClient:
    """A client transport that records what is sent; `on_send` may pause the outbox again."""

    def __init__(self) -> None:
        self.sent: list[tuple[WSMsgType, bytes]] = []
        self.on_send = None
        self.underlying_transport = self

    def send(self, msg_type, data) -> None:
        self.sent.append((msg_type, bytes(data)))
        if self.on_send is not None:
            self.on_send()

    def get_extra_info(self, name):
        assert name == "socket"
        return "the client socket"


def make(policy: str = "drop-oldest"):
    path, stats, metrics, client = FakePath(), FakeStats(), FakeMetrics(), FakeClient()
    box = ClientOutbox(path, stats, metrics, policy == "drop-oldest", LIMIT)
    box.client = client
    return box, path, stats, metrics, client


def audio(n: int, fill: int) -> bytes:
    return bytes([fill]) * n


def test_a_reading_client_gets_each_message_at_once_with_its_type() -> None:
    box, path, stats, _metrics, client = make()
    assert box.send_event(b'{"type":"ready"}') is None
    assert box.send_audio(audio(10, 1)) is None
    assert client.sent == [(WSMsgType.TEXT, b'{"type":"ready"}'), (WSMsgType.BINARY, audio(10, 1))]
    assert stats.u2c_buffered_bytes == 0


def test_during_an_upstream_read_frames_join_its_batch_with_their_headers() -> None:
    box, path, _stats, _metrics, client = make()
    path.batching = True
    box.send_audio(audio(200, 2))
    box.send_event(b"{}")
    assert client.sent == []  # nothing written until the read ends
    box.flush_batch()
    # RFC 6455 §5.2: FIN + opcode, then the length (126 + 16 bits past 125)
    assert path.flushed == [[b"\x82\x7e\x00\xc8", audio(200, 2), b"\x81\x02", b"{}"]]


def test_a_paused_client_gets_everything_in_order_when_it_reads_again() -> None:
    box, _path, stats, _metrics, client = make()
    box.pause()
    box.send_audio(audio(300, 1))
    box.send_event(b"e1")
    box.send_audio(audio(300, 2))
    assert client.sent == []
    assert stats.u2c_buffered_bytes == 602
    box.resume()
    box.flush()
    assert client.sent == [(WSMsgType.BINARY, audio(300, 1)), (WSMsgType.TEXT, b"e1"),
                           (WSMsgType.BINARY, audio(300, 2))]
    assert stats.u2c_buffered_bytes == 0
    # the session's peak, kept as the queue grew: a queue gone before the next sweep counts too
    assert stats.u2c_buffered_peak == 602


def test_drop_oldest_drops_the_oldest_audio_keeps_every_event_and_reports_once() -> None:
    box, _path, stats, metrics, client = make("drop-oldest")
    box.pause()
    verdicts = [box.send_audio(audio(400, 1)), box.send_event(b"e1"), box.send_audio(audio(400, 2)),
                box.send_audio(audio(400, 3)), box.send_audio(audio(400, 4))]
    assert verdicts == [None, None, None, DROPPING, None]  # told once while the client does not read
    assert metrics.drops == [("slow_client", 400), ("slow_client", 400)]
    assert stats.u2c_buffered_bytes == 802 <= LIMIT
    box.resume()
    box.flush()
    assert client.sent == [(WSMsgType.TEXT, b"e1"), (WSMsgType.BINARY, audio(400, 3)),
                           (WSMsgType.BINARY, audio(400, 4))]
    # reading again, then behind again: told again
    box.pause()
    assert [box.send_audio(audio(600, 5)), box.send_audio(audio(600, 6))] == [None, DROPPING]


def test_drop_oldest_ends_the_session_when_only_events_are_left_over_the_bound() -> None:
    box, _path, stats, metrics, _client = make("drop-oldest")
    box.pause()
    assert box.send_event(b"x" * 600) is None
    assert box.send_event(b"y" * 600) is OVERFLOW  # events are never dropped
    assert metrics.drops == []
    assert stats.u2c_buffered_bytes == 0  # what was queued will never be sent


def test_close_policy_ends_the_session_past_the_bound_and_forgets_the_queue() -> None:
    box, _path, stats, metrics, client = make("close")
    box.pause()
    assert box.send_audio(audio(1000, 1)) is None  # at the bound, not past it
    assert box.send_audio(audio(1, 2)) is OVERFLOW
    assert stats.u2c_buffered_bytes == 0 and metrics.drops == []
    box.flush(force=True)
    assert client.sent == []


def test_a_flush_stops_when_a_send_pauses_the_client_again_unless_forced() -> None:
    box, _path, stats, _metrics, client = make()
    box.pause()
    for fill in range(3):
        box.send_audio(audio(100, fill))
    box.resume()
    client.on_send = box.pause  # the kernel stops taking writes after the first
    box.flush()
    assert [data[0] for _type, data in client.sent] == [0]
    assert stats.u2c_buffered_bytes == 200
    box.flush(force=True)  # closing: the rest goes before the close frame
    assert [data[0] for _type, data in client.sent] == [0, 1, 2]
    assert stats.u2c_buffered_bytes == 0


class Kernel:
    """What TCP_INFO says about the client socket: acknowledged bytes, bytes not sent yet."""

    def __init__(self, monkeypatch) -> None:
        self.acked = 0
        self.waiting = 0
        self.reads = 0
        monkeypatch.setattr(outbox_module.sockets, "delivery", self.delivery)

    def delivery(self, sock):
        assert sock == "the client socket"
        self.reads += 1
        return self.acked, self.waiting


def test_the_watch_costs_no_syscall_while_nothing_went_the_clients_way(monkeypatch) -> None:
    kernel = Kernel(monkeypatch)
    box, *_ = make()
    for _ in range(5):
        assert box.check_reading(audio_sent=0) is None
    assert kernel.reads == 0


def test_a_client_that_acknowledges_nothing_with_more_than_the_bound_waiting_has_stalled(monkeypatch) -> None:
    kernel = Kernel(monkeypatch)
    box, *_ = make()
    kernel.acked, kernel.waiting = 5000, 2000
    assert box.check_reading(audio_sent=7000) is None  # first look: it acknowledged since "0"
    kernel.waiting = 4000
    assert box.check_reading(audio_sent=9000) is STALLED
    box.pause()  # the session pauses it
    assert box.check_reading(audio_sent=9000) is None  # still not reading
    kernel.acked = 6000
    assert box.check_reading(audio_sent=9000) is READING
    assert box.check_reading(audio_sent=9000) is None


def test_a_client_that_still_acknowledges_is_left_alone_however_much_waits(monkeypatch) -> None:
    kernel = Kernel(monkeypatch)
    box, *_ = make()
    kernel.acked, kernel.waiting = 1000, 3000
    box.check_reading(audio_sent=4000)
    kernel.acked, kernel.waiting = 2000, 50_000  # a burst generated faster than real time
    assert box.check_reading(audio_sent=60_000) is None


def test_a_client_with_no_more_than_the_bound_waiting_is_left_alone(monkeypatch) -> None:
    kernel = Kernel(monkeypatch)
    box, *_ = make()
    kernel.acked, kernel.waiting = 1000, LIMIT
    box.check_reading(audio_sent=4000)
    assert box.check_reading(audio_sent=5000) is None  # nothing acknowledged, but within the bound


def test_a_client_picows_already_paused_is_not_reported_again(monkeypatch) -> None:
    kernel = Kernel(monkeypatch)
    box, *_ = make()
    kernel.acked, kernel.waiting = 1000, 5000
    box.check_reading(audio_sent=6000)
    box.pause()  # picows: the kernel stopped taking writes
    assert box.check_reading(audio_sent=6000) is None
