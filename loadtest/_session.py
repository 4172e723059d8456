"""One voice user's long-lived session with the gateway, on gevent (Locust's concurrency model).

A `VoiceSession` owns one `websocket-client` connection and two greenlets besides the user's own:

- the **receiver** reads every frame as it arrives, timestamps it, and updates the session's
  record: binary frames are appended to the current reply, JSON events (SPEC §2.3) update the
  speech-event, reply and error lists. Gateway `error` events are reported at once as failures
  named by their code. Nothing is buffered elsewhere, so a timestamp is the arrival time.
- the **microphone** (`Microphone`) sends audio in real time with drift correction.

The user's greenlet (the Locust task) drives turns: it queues speech on the microphone, sends
commands, and waits for conditions on the record (`wait_until`), with a deadline each.

Every byte the microphone sent is kept in `sent` (a `SentAudio` timeline) until the turn that
contains it has been checked, because with the echoing mock the reply to a server-VAD turn must be
exactly the slice [speech_started.audio_ms, speech_stopped.audio_ms) of that timeline.
"""
from __future__ import annotations

import socket
import time
from typing import Callable

import gevent
import orjson
import websocket
from gevent.event import Event

from loadtest._audio import BYTES_PER_MS
from loadtest._metrics import CONNECT_READY, ERROR, REPLY_COMPLETENESS, SESSION_LOST, VOICE, WS, MetricReporter
from loadtest._options import LoadSettings

clock = time.perf_counter

_BINARY = websocket.ABNF.OPCODE_BINARY
_TEXT = websocket.ABNF.OPCODE_TEXT
_CLOSE = websocket.ABNF.OPCODE_CLOSE


class SessionClosed(Exception):
    """The session is gone (closed by either side, or failed to open). Already reported."""


class TurnTimeout(Exception):
    """A condition a turn waited for did not happen before its deadline."""


class SentAudio:
    """The session's outgoing audio, addressable by byte offset on the input-audio timeline.

    Offset 0 is the first byte the session ever sent; `base` is the offset of `buffer[0]`. The
    turn logic discards what it has checked, and at most `MAX_KEPT_MS` is kept regardless, so a
    session that keeps failing its turns cannot grow without bound.
    """

    MAX_KEPT_MS = 60_000
    __slots__ = ("buffer", "base")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.base = 0

    @property
    def end(self) -> int:
        """Offset just past the last byte sent."""
        return self.base + len(self.buffer)

    def append(self, frame: bytes) -> None:
        self.buffer += frame
        excess = len(self.buffer) - self.MAX_KEPT_MS * BYTES_PER_MS
        if excess > 0:
            self.discard_before(self.base + excess)

    def slice(self, start: int, end: int) -> bytes | None:
        """Bytes [start, end) of the timeline, or None if any of them is no longer (or not yet) kept."""
        if start < self.base or end > self.end or start > end:
            return None
        return bytes(self.buffer[start - self.base:end - self.base])

    def discard_before(self, offset: int) -> None:
        """Forget every byte before `offset` (checked turns)."""
        count = min(offset - self.base, len(self.buffer))
        if count > 0:
            del self.buffer[:count]
            self.base += count


class Utterance:
    """One talk spurt queued on the microphone; times are `clock()` seconds, `start_offset` is
    the byte offset of its first byte on the session's input-audio timeline."""

    __slots__ = ("pcm", "start_offset", "first_sent_at", "last_sent_at", "max_lateness_ms", "done")

    def __init__(self, pcm: bytes) -> None:
        self.pcm = pcm
        self.start_offset: int | None = None
        self.first_sent_at: float | None = None
        self.last_sent_at: float | None = None
        self.max_lateness_ms = 0.0
        self.done = Event()


class Microphone:
    """Sends a session's audio in real time, `chunk_ms` per frame.

    A frame is sent when its audio has been captured, as a real microphone's is: frame k of a
    stream goes out at t0 + (bytes up to and including it)/48 ms, so the last frame of a talk spurt
    leaves when the speech ends (the round trips are measured from there). The schedule is
    absolute, so sleep jitter never accumulates; a frame sent late is followed by the next ones
    without sleeping until the stream is back on schedule. If it falls more than
    `MAX_CATCH_UP_MS` behind (the load generator is overloaded), the schedule restarts from now
    instead of bursting: no audio is dropped, and the lateness is recorded on the utterance
    (metric "mic lateness").

    `continuous=True` is an open microphone: between talk spurts it streams digital silence, as
    a browser or phone client does; server VAD needs that trailing silence to end a turn.
    `continuous=False` is push-to-talk: nothing is sent between spurts.
    """

    MAX_CATCH_UP_MS = 200.0

    def __init__(
        self, send_frame: Callable[[bytes], None], chunk_ms: int, continuous: bool,
        on_utterance_done: Callable[[], None],
    ) -> None:
        self._send_frame = send_frame
        self._on_utterance_done = on_utterance_done
        self._chunk_bytes = chunk_ms * BYTES_PER_MS
        self._silence = bytes(self._chunk_bytes)
        self._continuous = continuous
        self._queue: list[Utterance] = []
        self._queued = Event()
        self._greenlet: gevent.Greenlet | None = None
        self.bytes_sent = 0  # = the session's input-audio timeline: the microphone is its only writer

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None

    def say(self, pcm: bytes) -> Utterance:
        """Queue `pcm` to be spoken after whatever is queued; returns at once."""
        utterance = Utterance(pcm)
        self._queue.append(utterance)
        self._queued.set()
        return utterance

    def _run(self) -> None:
        try:
            self._stream()
        except SessionClosed:
            pass  # the session reports how it ended; its waiters see `closed`

    def _stream(self) -> None:
        # `due`: when the next frame's audio begins on the wall clock; None = no stream in progress.
        # A frame goes out when its audio has been captured, at `due` + its duration, as a real
        # microphone's does: it cannot send speech before the user has said it.
        due: float | None = None
        current: Utterance | None = None
        position = 0
        while True:
            if current is None and not self._queue and not self._continuous:
                due = None  # push-to-talk: the button is up; the next spurt starts a new schedule
                self._queued.clear()
                self._queued.wait()
                continue
            now = clock()
            if due is None:
                due = now
            if current is None and self._queue:
                current, position = self._queue.pop(0), 0
            length = min(self._chunk_bytes, len(current.pcm) - position) if current is not None else self._chunk_bytes
            send_at = due + length / BYTES_PER_MS / 1000.0
            if now < send_at:
                gevent.sleep(send_at - now)
                now = clock()
            # Speech queued while a frame of silence was being captured goes out in that frame,
            # not one frame later: the user started speaking during it.
            if current is None and self._queue:
                current, position = self._queue.pop(0), 0
            frame = current.pcm[position:position + self._chunk_bytes] if current is not None else self._silence
            lateness_ms = max(0.0, (now - send_at) * 1000.0)
            self._send_frame(frame)
            if current is not None and current.first_sent_at is None:
                current.first_sent_at = now
                current.start_offset = self.bytes_sent
            self.bytes_sent += len(frame)
            due += len(frame) / BYTES_PER_MS / 1000.0
            if lateness_ms > self.MAX_CATCH_UP_MS:
                due = now  # too far behind to catch up: restart the schedule from this frame
            if current is not None:
                current.max_lateness_ms = max(current.max_lateness_ms, lateness_ms)
                position += len(frame)
                if position >= len(current.pcm):
                    current.last_sent_at = now  # the end of the speech: its last audio was just captured
                    current.done.set()
                    current = None
                    self._on_utterance_done()


class Reply:
    """One response as the client saw it; times are `clock()` seconds of arrival."""

    __slots__ = (
        "response_id", "started_at", "first_audio_at", "last_audio_at", "audio", "done_at", "status",
        "interrupted", "interrupted_at", "status_when_interrupted",
    )

    def __init__(self, response_id: str | None, started_at: float) -> None:
        self.response_id = response_id
        self.started_at = started_at
        self.first_audio_at: float | None = None
        self.last_audio_at: float | None = None
        self.audio = bytearray()
        self.done_at: float | None = None
        self.status: str | None = None
        self.interrupted: dict | None = None  # the `interrupted` event, if the user barged in
        self.interrupted_at: float | None = None
        # the response_done status that came before `interrupted`; None: the reply was still generating
        self.status_when_interrupted: str | None = None


class SpeechEvent:
    """A `speech_started` / `speech_stopped` event: `audio_ms` on the input timeline, arrival time."""

    __slots__ = ("audio_ms", "at")

    def __init__(self, audio_ms: int, at: float) -> None:
        self.audio_ms = audio_ms
        self.at = at


class VoiceSession:
    """A WebSocket session with the gateway: connect, `config`, `ready`, then turns.

    `config` is the `config` message to send right after connecting (the seed examples' order);
    `continuous_mic` selects the microphone mode (see `Microphone`).
    """

    def __init__(
        self, settings: LoadSettings, reporter: MetricReporter, config: dict, continuous_mic: bool
    ) -> None:
        self.settings = settings
        self.reporter = reporter
        self._config = config
        self._ws: websocket.WebSocket | None = None
        self._receiver: gevent.Greenlet | None = None
        self._changed = Event()
        self._closing = False
        self.mic = Microphone(self._send_audio, settings.chunk_ms, continuous_mic, self._wake)
        self.sent = SentAudio()
        self.opened_at = 0.0
        self.ready: dict | None = None
        self.closed = False
        self.close_reason = ""
        self.fatal_error: dict | None = None
        self.speech_started: list[SpeechEvent] = []
        self.speech_stopped: list[SpeechEvent] = []
        self.replies: list[Reply] = []
        self._replies_by_id: dict[str, Reply] = {}
        self._current_reply: Reply | None = None
        self._stray_audio_reported = False  # once per gap between responses
        self.turns_done = 0

    # ---- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Connect, send `config`, wait for `ready`; report "connect → ready" (sample or failure).

        Raises SessionClosed (already reported) when that fails.
        """
        settings = self.settings
        self.opened_at = started = clock()
        try:
            self._ws = websocket.create_connection(
                settings.connect_url(),
                timeout=settings.reply_timeout_s,
                header=settings.connect_headers(),
                skip_utf8_validation=True,
                enable_multithread=True,  # the microphone and the user's greenlet both send
                sockopt=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
            )
        except Exception as exc:  # refused, handshake rejected (401/503), timeout
            self.closed = True
            self.close_reason = f"connect failed: {type(exc).__name__}: {exc}"
            # no connect time: a refusal in 2 ms would pass for a fast one (so would a timeout)
            self.reporter.failure(WS, CONNECT_READY, self.close_reason)
            raise SessionClosed(self.close_reason) from None
        self._ws.settimeout(None)  # the receiver blocks in recv; deadlines live in wait_until
        self._receiver = gevent.spawn(self._receive_loop)
        self.send_event(self._config)
        try:
            self.wait_until(lambda: self.ready is not None, "ready")
        except (TurnTimeout, SessionClosed) as exc:
            reason = self._describe_end(exc)
            self.reporter.failure(WS, CONNECT_READY, reason)
            self.close()
            raise SessionClosed(reason) from None
        self.reporter.sample(WS, CONNECT_READY, (clock() - started) * 1000)
        self.mic.start()

    def close(self) -> None:
        """Close from the client side (normal closure); idempotent; never reports a failure."""
        self._closing = True
        self.mic.stop()
        ws = self._ws
        if ws is not None and not self.closed:
            try:
                ws.send_close(websocket.STATUS_NORMAL, b"load test user done")
            except Exception:  # the socket may already be gone; closing is best effort
                pass
        if ws is not None:
            ws.shutdown()
        if self._receiver is not None:
            self._receiver.kill(block=False)
        self.closed = True
        self._wake()

    # ---- sending ---------------------------------------------------------------------------

    def send_event(self, event: dict) -> None:
        """Send one JSON control message; raises SessionClosed if the socket is gone."""
        self._send(orjson.dumps(event), _TEXT)

    def _send_audio(self, frame: bytes) -> None:
        self.sent.append(frame)
        self._send(frame, _BINARY)

    def _send(self, payload: bytes, opcode: int) -> None:
        if self.closed or self._ws is None:
            raise SessionClosed(self.close_reason or "session closed")
        try:
            self._ws.send(payload, opcode)
        except Exception as exc:
            self._on_closed(f"send failed: {type(exc).__name__}: {exc}")
            raise SessionClosed(self.close_reason) from None

    # ---- waiting ---------------------------------------------------------------------------

    def wait_until(self, condition: Callable[[], bool], what: str, timeout_s: float | None = None) -> None:
        """Block this greenlet until `condition()` holds (re-checked on every received event).

        Raises TurnTimeout("no <what> within N s") at the deadline, SessionClosed if the session
        ends first.
        """
        timeout_s = self.settings.reply_timeout_s if timeout_s is None else timeout_s
        deadline = clock() + timeout_s
        while not condition():
            if self.closed:
                raise SessionClosed(self.close_reason)
            remaining = deadline - clock()
            if remaining <= 0:
                raise TurnTimeout(f"no {what} within {timeout_s:g} s")
            self._changed.wait(remaining)

    def _wake(self) -> None:
        # One Event per wake-up: waiters hold the old one, which is set; new waits use the new one.
        changed, self._changed = self._changed, Event()
        changed.set()

    def _describe_end(self, exc: Exception) -> str:
        if self.fatal_error is not None:
            return f"fatal {self.fatal_error.get('code')}: {self.fatal_error.get('message', '')}"[:300]
        return str(exc) or self.close_reason

    # ---- receiving -------------------------------------------------------------------------

    def _receive_loop(self) -> None:
        ws = self._ws
        assert ws is not None
        try:
            while True:
                opcode, data = ws.recv_data()
                now = clock()
                if opcode == _BINARY:
                    self._on_audio(data, now)
                elif opcode == _TEXT:
                    self._on_event(orjson.loads(data), now)
                elif opcode == _CLOSE:
                    code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
                    reason = data[2:].decode("utf-8", "replace")
                    self._on_closed(f"closed by the gateway: {code} {reason}".rstrip())
                    return
        except Exception as exc:  # connection reset / socket closed by close()
            self._on_closed(f"connection lost: {type(exc).__name__}: {exc}")

    def _on_closed(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        if not self._closing and self.fatal_error is None:
            self.reporter.failure(WS, SESSION_LOST, reason, (clock() - self.opened_at) * 1000)
        self._wake()

    def _on_audio(self, pcm: bytes, now: float) -> None:
        reply = self._current_reply
        if reply is None:
            # Audio after response_done / interrupted, or before response_started: the relay
            # broke the response framing (e.g. kept forwarding an interrupted response).
            if not self._stray_audio_reported:
                self._stray_audio_reported = True
                self.reporter.failure(
                    VOICE, REPLY_COMPLETENESS, f"{len(pcm)} bytes of audio arrived outside any response",
                )
            return
        reply.audio += pcm
        reply.last_audio_at = now
        if reply.first_audio_at is None:
            reply.first_audio_at = now
            self._wake()  # only the first frame of a reply is something a turn waits for

    def _on_event(self, event: dict, now: float) -> None:
        kind = event.get("type")
        if kind == "response_started":
            reply = Reply(event.get("response_id"), now)
            self.replies.append(reply)
            if reply.response_id:
                self._replies_by_id[reply.response_id] = reply
            self._current_reply = reply
            self._stray_audio_reported = False
        elif kind == "response_done":
            reply = self._replies_by_id.get(event.get("response_id")) or self._current_reply
            if reply is not None:
                reply.done_at = now
                reply.status = event.get("status")
                if reply is self._current_reply:
                    self._current_reply = None
        elif kind == "speech_started":
            self.speech_started.append(SpeechEvent(int(event.get("audio_ms", -1)), now))
        elif kind == "speech_stopped":
            self.speech_stopped.append(SpeechEvent(int(event.get("audio_ms", -1)), now))
        elif kind == "interrupted":
            reply = self._replies_by_id.get(event.get("response_id")) or self._current_reply
            if reply is not None:
                reply.interrupted = event
                reply.interrupted_at = now
                reply.status_when_interrupted = reply.status
                if reply is self._current_reply:
                    self._current_reply = None  # the gateway drops the rest of its audio
        elif kind == "ready":
            self.ready = event
        elif kind == "error":
            code = str(event.get("code") or "unknown")
            self.reporter.failure(ERROR, code, str(event.get("message", ""))[:300])
            if event.get("fatal"):
                self.fatal_error = event
        else:
            return  # transcripts, levels, function calls: not measured; no wake-up needed
        self._wake()
