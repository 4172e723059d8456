"""One mock Realtime connection: the WebSocket listener and the session state machine.

Reference: /work/shared/reference/openai-realtime-protocol.md §3–§8. Events are produced in
GA form and renamed for the beta dialect on the way out (§6). Everything here runs on the event
loop thread; picows callbacks are synchronous, responses run as one asyncio task each.

Buffer lifetimes: a picows `WSFrame` dies when `on_ws_frame` returns, so frame payloads are
copied (`get_payload_as_bytes`) before anything keeps them.
"""
from __future__ import annotations

import asyncio
import binascii
import math
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Optional

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from .audio import BYTES_PER_MS, FORMAT_DESCRIPTION, EventIds, convert, new_id, random_alnum, rms_dbfs
from .conversation import Conversation, Item, find_call, render_item
from .errors import MockProtocolError, close_reason, error_object
from .responses import Response, ResponsePlanner, stream_response
from .schema import apply_update, bad_type, default_config, render_session, response_config
from .vad import SEMANTIC_EAGERNESS_SILENCE_MS, EnergyVad

if TYPE_CHECKING:
    from .server import MockRealtimeServer

log = logging.getLogger("gateway.mock")

# GA server event name -> beta name (reference §6); GA-only events are dropped in beta.
BETA_EVENT_NAMES = {
    "conversation.item.added": "conversation.item.created",
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
}
GA_ONLY_EVENTS = frozenset({"conversation.item.done"})
# events that carry an `obfuscation` padding string in GA (reference §5.3)
OBFUSCATED_EVENTS = frozenset({"response.output_text.delta", "response.output_audio_transcript.delta",
                               "conversation.item.input_audio_transcription.delta"})

CLIENT_EVENT_TYPES = (
    "session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
    "input_audio_buffer.clear", "conversation.item.create", "conversation.item.truncate",
    "conversation.item.delete", "conversation.item.retrieve", "response.create",
    "response.cancel", "transcription_session.update",
)
MAX_APPEND_BASE64_CHARS = 15 * 1024 * 1024  # 15 MiB per append (reference §9)
MIN_COMMIT_MS = 100


class HandshakeInfo:
    """What the upgrade request decided: dialect, model, and a fatal error to report (if any)."""

    __slots__ = ("dialect", "model", "path", "fatal_error", "fatal_fields", "key")

    def __init__(self, dialect: str, model: Optional[str], path: str, key: Optional[str],
                 fatal_error: Optional[str] = None, **fatal_fields: Any) -> None:
        self.dialect = dialect
        self.model = model
        self.path = path
        self.key = key
        self.fatal_error = fatal_error
        self.fatal_fields = fatal_fields


class MockSession(WSListener):
    """One connection to the mock. Public, read-only for tests:

    - `dialect` ("ga" | "beta"), `model`, `id` (`sess_…`), `config` (effective session,
      GA-shaped), `conversation`;
    - `active_response`: the default conversation's response in progress (at most one, §3.4);
      `responses_in_progress`: every response in progress by id, out-of-band ones included;
    - `received`: every client event as parsed, in order; `sent`: every server event sent,
      in order (both only when `MockOptions.record`);
    - `closed`, `await wait_closed(timeout)`, `await wait_for_client_event(type_, timeout)`,
      `await wait_for_server_event(type_, timeout)` (each returns the first event of that type
      not returned before, waiting for it if needed; raises asyncio.TimeoutError). With
      `record=False` nothing is kept, and the waits only see events arriving while they wait.
    """

    def __init__(self, server: "MockRealtimeServer", info: HandshakeInfo) -> None:
        super().__init__()
        self.server = server
        self.options = server.options
        self.dialect = info.dialect
        self.model = info.model
        self.path = info.path
        self._info = info
        self.id = new_id("sess_")
        self.created_at = time.time()
        self.max_s = self.options.session_max_s if self.options.session_max_s is not None \
            else (1800.0 if self.dialect == "beta" else 3600.0)
        self.config: dict[str, Any] = default_config(self.model, self.id, int(self.created_at + self.max_s))
        self.conversation = Conversation(new_id("conv_"))
        self.received: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []
        self.closed = False
        self.events_sent = 0
        self.voice_locked = False
        self.audio_turns = 0
        self.responses_created = 0

        self.transport: Optional[WSTransport] = None
        self._ids = EventIds()
        self._obfuscation_length = 0
        self._loop = asyncio.get_running_loop()
        self._closed_future: asyncio.Future[None] = self._loop.create_future()
        self._by_type: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        self._returned: dict[tuple[str, str], int] = defaultdict(int)
        self._waiters: dict[tuple[str, str], list[asyncio.Future[dict[str, Any]]]] = defaultdict(list)
        self._timers: list[asyncio.TimerHandle] = []
        self._fragments: Optional[bytearray] = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._reading_paused = False

        # input audio buffer on the session timeline (positions in bytes of the input format)
        self._timeline_bytes = 0
        self._buffer = bytearray()
        self._buffer_start = 0
        self._vad: Optional[EnergyVad] = None
        self._speech_item_id: Optional[str] = None
        self._speech_start_ms = 0
        self._configure_vad()
        # server_vad idle_timeout_ms: loop time the last response's audio would have finished
        # playing (None: nothing to wait for), and the pending timer
        self._playback_end: Optional[float] = None
        self._idle_timer: Optional[asyncio.TimerHandle] = None

        self.active_response: Optional[Response] = None
        self.responses_in_progress: dict[str, Response] = {}
        self._planner = ResponsePlanner(self)
        self._stream_echo: Optional["StreamEcho"] = None

    # ------------------------------------------------------------------------------------------
    # public test helpers

    async def wait_for_client_event(self, type_: str, timeout: float = 5.0) -> dict[str, Any]:
        return await self._wait(("c", type_), timeout)

    async def wait_for_server_event(self, type_: str, timeout: float = 5.0) -> dict[str, Any]:
        return await self._wait(("s", type_), timeout)

    async def wait_closed(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(asyncio.shield(self._closed_future), timeout)

    def server_event_types(self) -> list[str]:
        """Types of every server event sent so far, in order."""
        return [event["type"] for event in self.sent]

    @property
    def input_format(self) -> str:
        return self.config["audio"]["input"]["format"]["type"]

    @property
    def output_format(self) -> str:
        return self.config["audio"]["output"]["format"]["type"]

    async def _wait(self, key: tuple[str, str], timeout: float) -> dict[str, Any]:
        events = self._by_type.get(key, ())
        index = self._returned[key]
        if index < len(events):
            self._returned[key] = index + 1
            return events[index]
        future: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._waiters[key].append(future)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            if future in self._waiters[key]:
                self._waiters[key].remove(future)

    def _note(self, direction: str, event: dict[str, Any]) -> None:
        """Record an event and hand it to the first live waiter for its type."""
        key = (direction, event.get("type") if isinstance(event.get("type"), str) else "")
        if self.options.record:
            (self.received if direction == "c" else self.sent).append(event)
            self._by_type[key].append(event)
        waiters = self._waiters.get(key)
        while waiters:
            future = waiters.pop(0)
            if not future.done():
                future.set_result(event)
                if self.options.record:
                    self._returned[key] += 1
                return

    # ------------------------------------------------------------------------------------------
    # picows callbacks

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.server._register(self)
        info = self._info
        if info.fatal_error is not None:
            # bad key / beta shape: 101 was sent; report as an error event, then close
            self.send_event("error", error=error_object(info.fatal_error, **info.fatal_fields))
            code = 4000 if info.fatal_error == "beta_api_shape_disabled" else 3000
            self.close(code, close_reason(info.fatal_error))
            return
        opts = self.options
        if opts.close_after_s is not None:
            self._timers.append(self._loop.call_later(opts.close_after_s, self.drop_connection))
        self._timers.append(self._loop.call_later(self.max_s, self._expire))
        self.send_event("session.created", session=render_session(self.config, self.dialect))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        for timer in self._timers:
            timer.cancel()
        self._disarm_idle_timeout()
        for response in self.responses_in_progress.values():
            response.abandon()
        self.responses_in_progress.clear()
        self.active_response = None
        if not self._closed_future.done():
            self._closed_future.set_result(None)
        self.server._unregister(self)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:
                code = frame.get_close_code()
                transport.send_close(WSCloseCode.OK if code == WSCloseCode.NO_INFO else code)
            transport.disconnect()
            return
        if msg_type in (WSMsgType.PING, WSMsgType.PONG):
            return
        if msg_type == WSMsgType.CONTINUATION:
            if self._fragments is None:
                return
            self._fragments += frame.get_payload_as_memoryview()
            if len(self._fragments) > self.options.max_message_bytes:
                self._message_too_big()
                return
            if not frame.fin:
                return
            payload = bytes(self._fragments)
            self._fragments = None
        elif not frame.fin:
            self._fragments = bytearray(frame.get_payload_as_memoryview())
            return
        else:
            payload = frame.get_payload_as_bytes()
        self._on_message(payload)
        if self.options.slow_read_s > 0 and not self._reading_paused and not self.closed:
            self._reading_paused = True
            transport.underlying_transport.pause_reading()
            self._loop.call_later(self.options.slow_read_s, self._resume_reading)

    def _resume_reading(self) -> None:
        self._reading_paused = False
        if not self.closed and self.transport is not None:
            self.transport.underlying_transport.resume_reading()

    def _message_too_big(self) -> None:
        self._fragments = None
        self.send_error("message_too_big", limit=self.options.max_message_bytes)
        self.close(WSCloseCode.MESSAGE_TOO_BIG, b"message too big")

    # ------------------------------------------------------------------------------------------
    # sending

    def send_event(self, type_: str, **fields: Any) -> Optional[dict[str, Any]]:
        """Send one server event (GA name; renamed or dropped for beta). Returns it, or None
        when the dialect has no such event or the connection is gone."""
        if self.closed or self.transport is None:
            return None
        if self.dialect == "beta":
            if type_ in GA_ONLY_EVENTS:
                return None
            type_ = BETA_EVENT_NAMES.get(type_, type_)
        elif type_ in OBFUSCATED_EVENTS:
            # random-length padding, as the real server sends (clients must ignore it)
            self._obfuscation_length = self._obfuscation_length % 15 + 1
            fields["obfuscation"] = random_alnum(self._obfuscation_length)
        event = {"type": type_, "event_id": self._ids.next(), **fields}
        self.send_encoded(orjson.dumps(event), event)
        return event

    def send_encoded(self, payload: bytes, event: Optional[dict[str, Any]]) -> None:
        """Put one pre-encoded server event on the wire; `event` is its dict for the records
        (may be None when recording is off)."""
        transport = self.transport
        if self.closed or transport is None:
            return
        transport.send(WSMsgType.TEXT, payload)
        self.events_sent += 1
        if event is not None:
            self._note("s", event)
        limit = self.options.close_after_events
        if limit is not None and self.events_sent >= limit:
            self.drop_connection()

    @property
    def event_ids(self) -> EventIds:
        """The session's event-id generator (StreamEcho builds frames with it directly)."""
        return self._ids

    def send_error(self, name: str, param: Optional[str] = None,
                   client_event_id: Optional[str] = None, **fields: Any) -> None:
        self.send_event("error", error=error_object(name, param, client_event_id, **fields))

    async def writable(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        if not self._writable.is_set():
            await self._writable.wait()

    def close(self, code: int | WSCloseCode, reason: bytes) -> None:
        """Send a close frame with `code` (any int, incl. 3000/4000) and disconnect."""
        if self.transport is None or self.closed:
            return
        self.transport.send_close(WSCloseCode(code) if isinstance(code, int) else code, reason)
        self.transport.disconnect()
        self.closed = True

    def drop_connection(self) -> None:
        """Fault injection: end the connection (abruptly unless `close_with_frame`)."""
        if self.transport is None or self.closed:
            return
        if self.options.close_with_frame:
            self.close(WSCloseCode.INTERNAL_ERROR, b"mock fault injection")
        else:
            self.transport.disconnect(graceful=False)
            self.closed = True

    def _expire(self) -> None:
        minutes = self.max_s / 60.0
        shown = int(minutes) if minutes == int(minutes) else f"{minutes:g}"
        self.send_error("session_expired", minutes=shown)
        self.close(WSCloseCode.GOING_AWAY, close_reason("session_expired"))

    # ------------------------------------------------------------------------------------------
    # client events

    def _on_message(self, payload: bytes) -> None:
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            self.send_error("invalid_json", detail=str(exc))
            return
        if not isinstance(event, dict):
            self.send_error("invalid_json", detail="expected a JSON object")
            return
        self._note("c", event)
        client_event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        type_ = event.get("type")
        if type_ is None:
            self.send_error("invalid_event_missing_type", client_event_id=client_event_id)
            return
        handler = self._HANDLERS.get(type_) if isinstance(type_, str) else None
        if handler is None:
            self.send_error("unknown_event_type", "type", client_event_id, value=str(type_),
                            supported=", ".join(f"'{t}'" for t in CLIENT_EVENT_TYPES))
            return
        try:
            handler(self, event)
        except MockProtocolError as error:
            self.send_error(error.name, error.param, client_event_id, **error.fields)
        except Exception as exc:  # a mock bug must not look like a protocol close to the peer
            log.exception("mock session %s: %s failed", self.id, type_)
            self.send_error("internal_error", None, client_event_id, detail=type(exc).__name__)

    def _on_session_update(self, event: dict[str, Any]) -> None:
        if "session" not in event:
            raise MockProtocolError("missing_required_parameter", "session")
        old_input = self.config["audio"]["input"]
        old_vad, old_format = old_input["turn_detection"], old_input["format"]
        self.config = apply_update(self.config, event["session"], self.dialect, self.voice_locked)
        new_input = self.config["audio"]["input"]
        if new_input["format"] != old_format:
            self._rebase_input(old_format["type"], new_input["format"]["type"])
        if new_input["turn_detection"] != old_vad or new_input["format"] != old_format:
            self._configure_vad()
            self._arm_idle_timeout()
        self.send_event("session.updated", session=render_session(self.config, self.dialect))

    def _on_transcription_session_update(self, event: dict[str, Any]) -> None:
        raise MockProtocolError("transcription_update_on_realtime", None)

    def _decode_audio(self, audio: Any, param: str, invalid_param: Optional[str] = None) -> bytes:
        """The bytes of base64 `audio`; errors name `param` (`invalid_param`, when given, for
        audio that is not base64)."""
        invalid = MockProtocolError("invalid_audio", invalid_param or param,
                                    format_desc=FORMAT_DESCRIPTION[self.input_format])
        if not isinstance(audio, str):
            raise invalid
        if len(audio) > MAX_APPEND_BASE64_CHARS:
            raise MockProtocolError("append_too_large", param, limit=MAX_APPEND_BASE64_CHARS,
                                    length=len(audio))
        try:
            return binascii.a2b_base64(audio, strict_mode=True)
        except (binascii.Error, ValueError):
            raise invalid from None

    def _on_append(self, event: dict[str, Any]) -> None:
        # OpenAI names the bad-audio param `audio.audio` (reference §8)
        audio = self._decode_audio(event.get("audio"), "audio", invalid_param="audio.audio")
        if not audio:
            return
        if self.options.echo_mode == "stream":
            if self._stream_echo is None:
                self._stream_echo = StreamEcho(self)
            self._stream_echo.feed(audio)
            return
        self._buffer += audio
        self._timeline_bytes += len(audio)
        if self._vad is None:
            return
        bytes_per_ms = BYTES_PER_MS[self.input_format]
        for vad_event in self._vad.feed(audio, self._buffer_start // bytes_per_ms):
            if vad_event.kind == "speech_started":
                self._on_speech_started(vad_event.ms)
            else:
                self._on_speech_stopped(vad_event.ms)
        if not self._vad.in_speech:
            # Outside speech only the prefix padding can still become part of a turn: keep
            # that (plus a window of slack) and let the rest go, so silence costs no memory.
            keep = (self._vad.prefix_padding_ms + 20) * bytes_per_ms
            excess = len(self._buffer) - keep
            if excess > 0:
                del self._buffer[:excess]
                self._buffer_start += excess

    def _on_speech_started(self, audio_start_ms: int) -> None:
        self._disarm_idle_timeout()
        self._speech_item_id = new_id("item_")
        self._speech_start_ms = audio_start_ms
        self.send_event("input_audio_buffer.speech_started", audio_start_ms=audio_start_ms,
                        item_id=self._speech_item_id)
        detection = self.config["audio"]["input"]["turn_detection"]
        response = self.active_response
        if response is not None and detection and detection.get("interrupt_response", True):
            response.cancel("turn_detected")

    def _on_speech_stopped(self, audio_end_ms: int) -> None:
        item_id = self._speech_item_id or new_id("item_")
        self._speech_item_id = None
        self.send_event("input_audio_buffer.speech_stopped", audio_end_ms=audio_end_ms,
                        item_id=item_id)
        bytes_per_ms = BYTES_PER_MS[self.input_format]
        start = self._speech_start_ms * bytes_per_ms - self._buffer_start
        end = audio_end_ms * bytes_per_ms - self._buffer_start
        turn_audio = bytes(self._buffer[max(start, 0):end])
        del self._buffer[:end]
        self._buffer_start += end
        self._commit_audio_item(item_id, turn_audio)
        detection = self.config["audio"]["input"]["turn_detection"] or {}
        if detection.get("create_response", True) and self.active_response is None:
            self.start_response(self.config)

    def _on_commit(self, event: dict[str, Any]) -> None:
        if self._stream_echo is not None:
            self._stream_echo.finish("completed")
            self._stream_echo = None
            return
        bytes_per_ms = BYTES_PER_MS[self.input_format]
        if len(self._buffer) < MIN_COMMIT_MS * bytes_per_ms:
            raise MockProtocolError("input_audio_buffer_commit_empty", None,
                                    ms=len(self._buffer) / bytes_per_ms)
        turn_audio = bytes(self._buffer)
        self._buffer_start += len(self._buffer)
        self._buffer.clear()
        if self._vad is not None:
            self._vad.reset()
        item_id = self._speech_item_id or new_id("item_")
        self._speech_item_id = None
        self._commit_audio_item(item_id, turn_audio)

    def _on_clear(self, event: dict[str, Any]) -> None:
        if self._stream_echo is not None:
            self._stream_echo.finish("completed")
            self._stream_echo = None
        self._buffer_start += len(self._buffer)
        self._buffer.clear()
        if self._vad is not None:
            self._vad.reset()
        self._speech_item_id = None
        self.send_event("input_audio_buffer.cleared")

    def _commit_audio_item(self, item_id: str, audio: bytes) -> None:
        """committed → item added/done → input transcription (if configured)."""
        self.audio_turns += 1
        item = Item(item_id, "message", role="user",
                    content=[{"type": "input_audio", "transcript": None}],
                    audio=audio, audio_format=self.input_format)
        previous = self.conversation.add(item)
        self.send_event("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
        self.announce_item(item, previous)
        transcription = self.config["audio"]["input"]["transcription"]
        if transcription is not None:
            # heard now (the conversation may let go of the audio before a late transcript)
            duration_ms = len(audio) // BYTES_PER_MS[self.input_format]
            silent = rms_dbfs(audio, self.input_format) == -math.inf
            delay_s = self.options.transcription_delay_ms / 1000.0
            if delay_s > 0:  # lands mid-response or after it, as the real one may
                asyncio.get_running_loop().call_later(delay_s, self._transcribe, item, transcription,
                                                      self.audio_turns, duration_ms, silent)
            else:
                self._transcribe(item, transcription, self.audio_turns, duration_ms, silent)

    def _transcribe(self, item: Item, transcription: dict[str, Any], turn: int, duration_ms: int,
                    silent: bool) -> None:
        """Deterministic input transcription; a turn of pure digital silence fails the way the
        real ASR does (`…input_audio_transcription.failed`, audio_unintelligible)."""
        if silent:
            self.send_event("conversation.item.input_audio_transcription.failed",
                            item_id=item.id, content_index=0,
                            error={"type": "transcription_error", "code": "audio_unintelligible",
                                   "message": "The audio could not be transcribed.", "param": None})
            return
        transcript = f"user audio turn {turn}: {duration_ms} ms"
        model = transcription.get("model", "whisper-1")
        if model.startswith("gpt-4o-"):
            words = transcript.split(" ")
            for index, word in enumerate(words):
                piece = word if index == len(words) - 1 else word + " "
                self.send_event("conversation.item.input_audio_transcription.delta",
                                item_id=item.id, content_index=0, delta=piece)
            audio_tokens = max(1, duration_ms // 100)
            text_tokens = max(1, len(transcript) // 4)
            usage: dict[str, Any] = {
                "type": "tokens", "input_tokens": audio_tokens, "output_tokens": text_tokens,
                "total_tokens": audio_tokens + text_tokens,
                "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens}}
        else:
            usage = {"type": "duration", "seconds": round(duration_ms / 1000.0, 3)}
        item.content[0]["transcript"] = transcript
        self.send_event("conversation.item.input_audio_transcription.completed",
                        item_id=item.id, content_index=0, transcript=transcript, usage=usage)

    def announce_item(self, item: Item, previous_item_id: Optional[str]) -> None:
        """conversation.item.added + .done (GA) / conversation.item.created (beta)."""
        rendered = render_item(item, self.dialect)
        self.send_event("conversation.item.added", previous_item_id=previous_item_id, item=rendered)
        self.send_event("conversation.item.done", previous_item_id=previous_item_id, item=rendered)

    def _on_item_create(self, event: dict[str, Any]) -> None:
        previous_item_id = event.get("previous_item_id")
        if previous_item_id is not None and not isinstance(previous_item_id, str):
            raise MockProtocolError("invalid_type", "previous_item_id", expected="a string",
                                    got=type(previous_item_id).__name__)
        if previous_item_id is not None and previous_item_id != "root" \
                and previous_item_id not in self.conversation:
            raise MockProtocolError("previous_item_not_found", "previous_item_id",
                                    item_id=previous_item_id)
        item = self._item_from_client(event.get("item"))
        previous = self.conversation.add(item, previous_item_id)
        self.announce_item(item, previous)

    def _item_from_client(self, raw: Any, param: str = "item",
                          context: Optional[list[Item]] = None) -> Item:
        """The item a client's JSON describes: conversation.item.create's `item`, new to the
        conversation (an id of its own, a function output answering a call in it); or, with
        `context` (the items before it), one of a response.create's `input` items, which never
        joins the conversation (any id; a function output answers a call in `context`).
        Errors name `param` and the paths under it."""
        if raw is None:
            raise MockProtocolError("missing_required_parameter", param)
        if not isinstance(raw, dict):
            raise MockProtocolError("invalid_type", param, expected="an object", got=type(raw).__name__)
        item_id = raw.get("id")
        if item_id is not None:
            if not isinstance(item_id, str):
                raise MockProtocolError("invalid_type", f"{param}.id", expected="a string",
                                        got=type(item_id).__name__)
            if context is None and item_id in self.conversation:
                raise MockProtocolError("duplicate_item_id", f"{param}.id", item_id=item_id)
        item_id = item_id or new_id("item_")
        type_ = raw.get("type", "message")
        allowed = {"message": {"id", "type", "object", "status", "role", "content"},
                   "function_call": {"id", "type", "object", "status", "call_id", "name", "arguments"},
                   "function_call_output": {"id", "type", "object", "status", "call_id", "output"}}
        if type_ not in allowed:
            raise MockProtocolError("invalid_enum", f"{param}.type", value=f"'{type_}'",
                                    supported="'message', 'function_call', 'function_call_output'")
        for key in raw:
            if key not in allowed[type_]:
                raise MockProtocolError("unknown_parameter", f"{param}.{key}")
        if type_ == "function_call_output":
            call_id, output = raw.get("call_id"), raw.get("output")
            if not isinstance(call_id, str):
                raise MockProtocolError("missing_required_parameter", f"{param}.call_id")
            if not isinstance(output, str):
                raise MockProtocolError("missing_required_parameter", f"{param}.output")
            if find_call(self.conversation.items() if context is None else context, call_id) is None:
                raise MockProtocolError("invalid_tool_call_id", f"{param}.call_id", call_id=call_id)
            return Item(item_id, type_, call_id=call_id, output=output)
        if type_ == "function_call":
            for key in ("call_id", "name"):
                if not isinstance(raw.get(key), str):
                    raise MockProtocolError("missing_required_parameter", f"{param}.{key}")
            return Item(item_id, type_, call_id=raw["call_id"], name=raw["name"],
                        arguments=str(raw.get("arguments", "")))
        role = raw.get("role")
        if role not in ("user", "assistant", "system"):
            raise MockProtocolError("invalid_enum", f"{param}.role", value=f"'{role}'",
                                    supported="'user', 'assistant', 'system'")
        content = raw.get("content")
        if not isinstance(content, list):
            raise MockProtocolError("missing_required_parameter", f"{param}.content")
        text_type = "output_text" if self.dialect == "ga" else "text"
        allowed_parts = {"user": ("input_text", "input_audio", "input_image"),
                         "system": ("input_text",), "assistant": (text_type,)}[role]
        parts: list[dict[str, Any]] = []
        audio = b""
        for index, part in enumerate(content):
            part_param = f"{param}.content[{index}]"
            if not isinstance(part, dict) or part.get("type") not in allowed_parts:
                got = part.get("type") if isinstance(part, dict) else part
                raise MockProtocolError("invalid_enum", f"{part_param}.type", value=f"'{got}'",
                                        supported=", ".join(f"'{p}'" for p in allowed_parts))
            part_type = part["type"]
            if part_type in ("input_text", text_type):
                if not isinstance(part.get("text"), str):
                    raise MockProtocolError("missing_required_parameter", f"{part_param}.text")
                parts.append({"type": "output_text" if part_type == text_type else part_type,
                              "text": part["text"]})
            elif part_type == "input_audio":
                audio += self._decode_audio(part.get("audio"), f"{part_param}.audio")
                parts.append({"type": "input_audio", "transcript": part.get("transcript")})
            else:
                parts.append({"type": "input_image", "image_url": part.get("image_url"),
                              "detail": part.get("detail", "auto")})
        return Item(item_id, "message", role=role, content=parts, audio=audio,
                    audio_format=self.input_format)

    def _on_item_truncate(self, event: dict[str, Any]) -> None:
        item_id = event.get("item_id")
        audio_end_ms = event.get("audio_end_ms")
        # absent: missing; present with the wrong type: invalid_value (reference §8)
        if item_id is None:
            raise MockProtocolError("missing_required_parameter", "item_id")
        if not isinstance(item_id, str):
            raise bad_type("item_id", "a string", item_id)
        if audio_end_ms is None:
            raise MockProtocolError("missing_required_parameter", "audio_end_ms")
        if isinstance(audio_end_ms, bool) or not isinstance(audio_end_ms, int):
            raise bad_type("audio_end_ms", "an integer", audio_end_ms)
        if audio_end_ms < 0:
            raise MockProtocolError("value_below_min", "audio_end_ms", kind="integer", limit=0,
                                    value=audio_end_ms)
        item = self.conversation.get(item_id)
        if item is None:
            raise MockProtocolError("item_truncate_invalid_item_id", "item_id", item_id=item_id)
        if not item.is_assistant_audio or not item.audio_bytes:
            raise MockProtocolError("truncate_not_audio", None)
        bytes_per_ms = BYTES_PER_MS[item.audio_format]
        have_ms = item.audio_bytes // bytes_per_ms
        if audio_end_ms > have_ms:
            raise MockProtocolError("truncate_too_long", None, have_ms=have_ms, want_ms=audio_end_ms)
        item.truncate_audio(audio_end_ms * bytes_per_ms)
        for part in item.content:
            if part["type"] == "output_audio":
                part["transcript"] = ""  # the server drops the transcript of a truncated item
        self.send_event("conversation.item.truncated", item_id=item_id,
                        content_index=event.get("content_index", 0), audio_end_ms=audio_end_ms)

    def _on_item_delete(self, event: dict[str, Any]) -> None:
        item_id = event.get("item_id")
        if not isinstance(item_id, str) or item_id not in self.conversation:
            raise MockProtocolError("item_delete_invalid_item_id", "item_id", item_id=item_id)
        self.conversation.delete(item_id)
        self.send_event("conversation.item.deleted", item_id=item_id)

    def _on_item_retrieve(self, event: dict[str, Any]) -> None:
        item_id = event.get("item_id")
        item = self.conversation.get(item_id) if isinstance(item_id, str) else None
        if item is None:
            raise MockProtocolError("item_retrieve_invalid_item_id", "item_id", item_id=item_id)
        self.send_event("conversation.item.retrieved",
                        item=render_item(item, self.dialect, with_audio=True))

    def _on_response_create(self, event: dict[str, Any]) -> None:
        params = event.get("response")
        config = response_config(self.config, {} if params is None else params, self.dialect)
        input_items = self._response_input(config["input"]) if "input" in config else None
        if config.get("conversation") != "none":
            # only one response writes to the default conversation at a time; out-of-band
            # ones run beside it (reference §3.4)
            if self.active_response is not None:
                raise MockProtocolError("conversation_already_has_active_response", None,
                                        response_id=self.active_response.id)
            if self._stream_echo is not None:
                raise MockProtocolError("conversation_already_has_active_response", None,
                                        response_id=self._stream_echo.response_id)
        self.start_response(config, input_items)

    def _response_input(self, raw_items: list[Any]) -> list[Item]:
        """A response.create's `input` as the items the response answers (§4.2, §5.2): items
        shaped as conversation.item.create's, and `item_reference`s to conversation items."""
        items: list[Item] = []
        for index, raw in enumerate(raw_items):
            param = f"response.input[{index}]"
            if isinstance(raw, dict) and raw.get("type") == "item_reference":
                for key in raw:
                    if key not in ("type", "id"):
                        raise MockProtocolError("unknown_parameter", f"{param}.{key}")
                item_id = raw.get("id")
                if not isinstance(item_id, str):
                    raise MockProtocolError("missing_required_parameter", f"{param}.id")
                item = self.conversation.get(item_id)
                if item is None:
                    raise MockProtocolError("item_reference_not_found", f"{param}.id", item_id=item_id)
                items.append(item)
            else:
                items.append(self._item_from_client(raw, param, context=items))
        return items

    def _on_response_cancel(self, event: dict[str, Any]) -> None:
        """Cancel the response `response_id` names, or without one the default conversation's
        (PY-GA `response_cancel_event`)."""
        wanted = event.get("response_id")
        if wanted is not None and not isinstance(wanted, str):
            raise bad_type("response_id", "a string", wanted)
        if self._stream_echo is not None and self.active_response is None and \
                (wanted is None or wanted == self._stream_echo.response_id):
            self._stream_echo.finish("cancelled")
            self._stream_echo = None
            return
        response = self.active_response if wanted is None else self.responses_in_progress.get(wanted)
        if response is None:
            raise MockProtocolError("response_cancel_not_active", None)
        response.cancel("client_cancelled")

    def start_response(self, config: dict[str, Any], input_items: Optional[list[Item]] = None) -> None:
        """Start a response running on `config` (the session's, or a response.create's own),
        answering `input_items` (its own `input`, resolved) or, when None, the conversation."""
        self.responses_created += 1
        response = self._planner.plan(config, input_items)
        self.responses_in_progress[response.id] = response
        if response.conversation is not None:
            # barge-in and the idle timeout follow the conversation's own responses only
            self._disarm_idle_timeout()
            self.active_response = response
        response.start()

    def response_finished(self, response: Response) -> None:
        self.responses_in_progress.pop(response.id, None)
        if response.conversation is not None:
            if self.active_response is response:
                self.active_response = None
            self._playback_end = response.playback_end()
            self._arm_idle_timeout()

    def _arm_idle_timeout(self) -> None:
        """server_vad with `idle_timeout_ms` (reference §5.1, §5.3): once the last response's
        audio would have finished playing, `input_audio_buffer.timeout_triggered` after that
        long without speech. Armed when a response ends or turn detection changes; speech or
        a new response disarms it; it fires once per response. Only the default
        conversation's responses count: out-of-band ones are not the conversation's turns."""
        self._disarm_idle_timeout()
        detection = self.config["audio"]["input"]["turn_detection"]
        if (self._playback_end is None or self.active_response is not None or self._vad is None
                or self._vad.in_speech or detection is None or detection["type"] != "server_vad"
                or detection["idle_timeout_ms"] is None):
            return
        self._idle_timer = self._loop.call_at(self._playback_end, self._start_idle_wait,
                                              detection["idle_timeout_ms"])

    def _disarm_idle_timeout(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _start_idle_wait(self, idle_timeout_ms: int) -> None:
        """The reply has played: the silent segment starts here on the input timeline."""
        self._idle_timer = self._loop.call_later(idle_timeout_ms / 1000.0, self._idle_timeout_triggered,
                                                 self._timeline_ms())

    def _idle_timeout_triggered(self, audio_start_ms: int) -> None:
        self._idle_timer = None
        self._playback_end = None
        self.send_event("input_audio_buffer.timeout_triggered", audio_start_ms=audio_start_ms,
                        audio_end_ms=self._timeline_ms(), item_id=new_id("item_"))

    def _rebase_input(self, old: str, new: str) -> None:
        """The input format changed: positions are kept in bytes of the input format, so the
        timeline and the uncommitted buffer move to the new one, with the same durations: the
        milliseconds reported go on from where they were (reference §3.3)."""
        self._buffer = bytearray(convert(bytes(self._buffer), old, new))
        self._timeline_bytes = self._timeline_bytes // BYTES_PER_MS[old] * BYTES_PER_MS[new]
        self._buffer_start = self._timeline_bytes - len(self._buffer)

    def _timeline_ms(self) -> int:
        """Milliseconds of input audio appended in this session so far (reference §3.3)."""
        return self._timeline_bytes // BYTES_PER_MS[self.input_format]

    def _configure_vad(self) -> None:
        detection = self.config["audio"]["input"]["turn_detection"]
        if detection is None or self.options.echo_mode == "stream":
            self._vad = None
            return
        if detection["type"] == "semantic_vad":
            threshold, prefix = 0.5, 300
            silence = SEMANTIC_EAGERNESS_SILENCE_MS[detection.get("eagerness", "auto")]
        else:
            threshold = detection["threshold"]
            prefix = detection["prefix_padding_ms"]
            silence = detection["silence_duration_ms"]
        self._vad = EnergyVad(self.input_format, threshold, prefix, silence,
                              start_ms=self._timeline_ms())

    _HANDLERS = {
        "session.update": _on_session_update,
        "transcription_session.update": _on_transcription_session_update,
        "input_audio_buffer.append": _on_append,
        "input_audio_buffer.commit": _on_commit,
        "input_audio_buffer.clear": _on_clear,
        "conversation.item.create": _on_item_create,
        "conversation.item.truncate": _on_item_truncate,
        "conversation.item.delete": _on_item_delete,
        "conversation.item.retrieve": _on_item_retrieve,
        "response.create": _on_response_create,
        "response.cancel": _on_response_cancel,
    }


class StreamEcho:
    """`echo_mode="stream"`: one long-lived response that echoes appended audio as it arrives.

    Whenever at least `delta_ms` of appended audio is pending, exactly those bytes go out as
    one audio delta (plus one transcript delta). Delta frames are assembled from pre-encoded
    byte strings (no dict, no JSON encoder) unless the session records events.
    """

    __slots__ = ("session", "response_id", "item_id", "_pending", "_delta_bytes", "_audio_prefix",
                 "_audio_suffix", "_transcript_prefix", "_transcript_suffix", "deltas_sent",
                 "bytes_sent", "_ids", "_record", "_piece", "_response")

    def __init__(self, session: MockSession) -> None:
        self.session = session
        self._response = stream_response(session)
        self.response_id = self._response.id
        self.item_id = self._response.stream_item.id
        self._pending = bytearray()
        self._delta_bytes = session.options.delta_ms * BYTES_PER_MS[session.output_format]
        self._piece = f"[{session.options.delta_ms} ms] "
        self.deltas_sent = 0
        self.bytes_sent = 0
        self._ids = session.event_ids
        self._record = session.options.record
        audio_type = "response.output_audio.delta" if session.dialect == "ga" else "response.audio.delta"
        transcript_type = ("response.output_audio_transcript.delta" if session.dialect == "ga"
                           else "response.audio_transcript.delta")
        common = (f'"response_id":"{self.response_id}","item_id":"{self.item_id}",'
                  f'"output_index":0,"content_index":0')
        self._audio_prefix = (f'{{"type":"{audio_type}","event_id":"').encode()
        self._audio_suffix = (f'",{common},"delta":"').encode()
        self._transcript_prefix = f'{{"type":"{transcript_type}","event_id":"'.encode()
        obfuscation = f',"obfuscation":"{random_alnum(8)}"' if session.dialect == "ga" else ""
        self._transcript_suffix = f'",{common},"delta":"{self._piece}"{obfuscation}}}'.encode()

    def feed(self, audio: bytes) -> None:
        pending = self._pending
        pending += audio
        delta_bytes = self._delta_bytes
        while len(pending) >= delta_bytes:
            self._send_delta(bytes(pending[:delta_bytes]))
            del pending[:delta_bytes]

    def _send_delta(self, chunk: bytes) -> None:
        session = self.session
        ids = self._ids
        encoded = binascii.b2a_base64(chunk, newline=False)
        audio_frame = self._audio_prefix + ids.next().encode() + self._audio_suffix + encoded + b'"}'
        transcript_frame = self._transcript_prefix + ids.next().encode() + self._transcript_suffix
        session.send_encoded(audio_frame, orjson.loads(audio_frame) if self._record else None)
        session.send_encoded(transcript_frame,
                             orjson.loads(transcript_frame) if self._record else None)
        self.deltas_sent += 1
        self.bytes_sent += len(chunk)
        self._response.stream_progress(len(chunk))
        if not session.voice_locked:
            session.voice_locked = True

    def finish(self, status: str) -> None:
        """Flush what is pending (as one shorter delta) and close the response."""
        if self._pending and status == "completed":
            self._send_delta(bytes(self._pending))
        self._pending.clear()
        self._response.finish_stream(status, self._piece * self.deltas_sent)
