"""What a session sends its client, and a client that does not read (SPEC §7: "slow clients are
bounded: queued audio limit, then a clear close").

Every message to the client goes out through `ClientOutbox`: written at once, added to the batch
of the upstream read being handled (one write per read, `AudioPath.batch`), or, while the client
is paused, queued. The queue is bounded by --max-client-queue-ms of the session's output audio
(`limit`, in bytes); past it --slow-client-policy applies: drop the oldest queued audio (events
are never dropped), or end the session. The outbox only reports which (`DROPPING`, `OVERFLOW`):
the session tells the client and ends the session, since both are the session's to decide.

A client is paused when picows says its socket's write buffer is over the high-water mark, or
when the server's sweep (`check_reading`) finds that it acknowledged nothing since the last look
while more than the bound waits for it in the kernel. picows alone pauses only once the kernel
stops taking writes, and the kernel's send buffer autotunes up to net.ipv4.tcp_wmem's maximum
(4 MiB, ~87 s of PCM16): a client that stopped reading would fall that far behind first.
"""
from __future__ import annotations

from collections import deque

from picows import WSMsgType, WSTransport

from _fastpath import frame_header
from gateway import sockets

#: what `send_*` reports: the first audio dropped since the client last read (tell it), or the
#: queue over its bound with no audio left to drop (the session must end)
DROPPING = "dropping"
OVERFLOW = "overflow"
#: what `check_reading` reports: the client stopped reading (it is paused now), or it reads again
STALLED = "stalled"
READING = "reading"

_BINARY = WSMsgType.BINARY
_TEXT = WSMsgType.TEXT
#: first byte of a server-to-client frame (FIN + opcode), RFC 6455 §5.2
_FIN_BINARY = 0x82
_FIN_TEXT = 0x81


class ClientOutbox:
    """One session's way to its client. `client` is set once the client socket is open."""

    # one per session, thousands at once: no per-instance dict
    __slots__ = ("client", "limit", "paused", "_path", "_stats", "_metrics", "_drop_oldest",
                 "_queue", "_queued_bytes", "_drop_told", "_stalled", "_acked", "_waiting", "_audio_seen")

    def __init__(self, path, stats, metrics, drop_oldest: bool, limit: int) -> None:
        self.client: WSTransport | None = None
        self._path = path  # the AudioPath: the batch of the current upstream read
        self._stats = stats  # u2c_buffered_bytes is the queue's size
        self._metrics = metrics  # drops are counted there (None in unit tests)
        self._drop_oldest = drop_oldest  # --slow-client-policy drop-oldest (else close)
        self.limit = limit  # the queue's bound in bytes (the session's output format sets it)
        self.paused = False
        # (message type, payload, is audio) waiting for a paused client; created on first use
        self._queue: deque | None = None
        self._queued_bytes = 0
        self._drop_told = False  # DROPPING was reported since the client last read
        # the sweep's watch (`check_reading`): at its last look, the bytes the client had
        # acknowledged, the bytes waiting for it in the kernel, the reply audio sent so far;
        # and whether the watch paused the client
        self._stalled = False
        self._acked = 0
        self._waiting = 0
        self._audio_seen = 0

    # ---- sending ------------------------------------------------------------------------------

    def send_event(self, data: bytes) -> str | None:
        return self._send(_TEXT, _FIN_TEXT, data, False)

    def send_audio(self, pcm) -> str | None:
        return self._send(_BINARY, _FIN_BINARY, pcm, True)

    def _send(self, msg_type: WSMsgType, first_byte: int, data, audio: bool) -> str | None:
        if self.paused:
            return self._enqueue(msg_type, data, audio)
        path = self._path
        if path.batching:
            batch = path.batch
            batch.append(frame_header(first_byte, len(data)))
            batch.append(data)
        else:
            self.client.send(msg_type, data)
        return None

    def flush_batch(self) -> None:
        """Write the frames batched during the current upstream read in one write (one writev
        of headers and payloads, no copy) and stop batching; a no-op when nothing is batched."""
        self._path.flush_batch()

    # ---- a paused client ----------------------------------------------------------------------

    def pause(self) -> None:
        """From now on, queue."""
        self.paused = True

    def resume(self) -> None:
        """The client reads again: the next drop is reported again. `flush` sends the queue."""
        self.paused = False
        self._drop_told = False

    def flush(self, force: bool = False) -> None:
        """Send what waited, in order, until the client pauses again (a send may pause it), or
        all of it with `force` (the session is closing: the last events go before the close)."""
        queue, client = self._queue, self.client
        if not queue or client is None:
            return
        while queue and (force or not self.paused):
            msg_type, data, _audio = queue.popleft()
            self._queued_bytes -= len(data)
            client.send(msg_type, data)
        self._stats.u2c_buffered_bytes = self._queued_bytes

    def clear(self) -> None:
        """Forget what is queued: it will never be sent (the session is ending)."""
        self._queue = None
        self._queued_bytes = self._stats.u2c_buffered_bytes = 0

    def _enqueue(self, msg_type: WSMsgType, data, audio: bool) -> str | None:
        if self._queue is None:
            self._queue = deque()
        self._queue.append((msg_type, data, audio))
        self._queued_bytes += len(data)
        if self._queued_bytes > self._stats.u2c_buffered_peak:  # (the sweep may never see it)
            self._stats.u2c_buffered_peak = self._queued_bytes
        verdict = None
        if self._queued_bytes > self.limit:
            if self._drop_oldest:
                self._drop_oldest_audio()
                if not self._drop_told:  # once until the client reads again
                    self._drop_told = True
                    verdict = DROPPING
            if self._queued_bytes > self.limit:
                self.clear()
                return OVERFLOW
        self._stats.u2c_buffered_bytes = self._queued_bytes
        return verdict

    def _drop_oldest_audio(self) -> None:
        kept: deque = deque()
        for entry in self._queue:
            if entry[2] and self._queued_bytes > self.limit:
                self._queued_bytes -= len(entry[1])
                if self._metrics is not None:
                    self._metrics.count_drop("slow_client", len(entry[1]))
            else:
                kept.append(entry)
        self._queue = kept

    # ---- the sweep's watch --------------------------------------------------------------------

    def check_reading(self, audio_sent: int) -> str | None:
        """Is the client still reading? `audio_sent` is the reply audio sent its way so far.
        A client that acknowledged nothing since the last look, with more than `limit` waiting
        for it in the kernel, has STALLED (the session pauses it); once it acknowledges again it
        is READING (the session resumes it). A healthy client behind a burst keeps
        acknowledging, however much waits. One TCP_INFO read, and none when nothing waited and
        nothing new went its way."""
        if not self._stalled and not self._waiting and audio_sent == self._audio_seen:
            return None
        self._audio_seen = audio_sent
        seen = sockets.delivery(self.client.underlying_transport.get_extra_info("socket"))
        if seen is None:
            return None
        acked, waiting = seen
        reading = acked != self._acked
        self._acked, self._waiting = acked, waiting
        if self._stalled:
            if reading:
                self._stalled = False
                return READING
            return None
        if not reading and waiting > self.limit and not self.paused:
            self._stalled = True
            return STALLED
        return None
