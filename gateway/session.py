"""`RelaySession`: one client's conversation, relayed to one upstream session (SPEC §2.1–§2.4).

States: CONNECTING (upstream opening; client audio/commands buffered, bounded) -> READY (relaying)
-> CLOSED. `ready` goes out once `session.created` arrived and every `session.update` sent so far
has been answered (`session.updated`, or an error that the client receives as `InvalidConfig`).

Audio hot path (no dict, no str, no Python per frame): the session's `AudioPath` (compiled) and
the two socket legs built on it move audio without calling the session, while its gates are open:
- client binary frame -> `Coalescer.push` -> encoded `input_audio_buffer.append` (bytearray with
  `HEADER_ROOM` free bytes) -> `send_reuse_external_bytearray` upstream (gate: READY). Pending
  audio is flushed on commit / text / create_response / pass-through events and by a timer after
  `coalesce_ms` (`_on_audio_pending` arms it).
- upstream text frame -> `decode_audio_delta` -> `(item_id, pcm)` -> per-item byte counters ->
  client binary frame, batched per upstream read (gate: `outbound_item`, the current item while
  nothing needs the session for it); other audio -> `on_upstream_audio`; anything else ->
  `on_upstream_event` -> orjson -> `dialect.normalize` -> an event handler.
`_sync_path()` sets both gates from the session's state; every change of that state calls it.
Everything else for the client goes through `ClientOutbox` (gateway/outbox.py), which also
queues for a client that does not read and reports when --slow-client-policy applies.

Interruption: on `speech_started` (or `cancel_response`) while the client still has assistant
audio to play, `PlaybackTimeline.barge_in` (gateway/playback.py) decides the cut; the session
drops the cut replies' later audio, tells the client `interrupted {response_id, played_ms}` and
sends `conversation.item.truncate` for each cut item.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from typing import Any, Callable, Mapping

import orjson
from picows import WSCloseCode, WSTransport

from _fastpath import HEADER_ROOM, AudioPath, ClientLeg, Coalescer, LevelMeter
from gateway import client_protocol as cp
from gateway import read_buffers
from gateway.config import NodeConfig
from gateway.metrics import GatewayMetrics, SessionStats
from gateway.outbox import DROPPING, OVERFLOW, READING, STALLED, ClientOutbox
from gateway.playback import PlaybackTimeline
from gateway.recent import EMPTY, RECENT, added, remember
from gateway.errors import (BENIGN_UPSTREAM_CODES, CLOSE_MESSAGE_TOO_BIG, AuthenticationFailed, ClientUnresponsive,
                            ConnectionFailed, GatewayError, InvalidConfig, InvalidMessage, NotConnected,
                            SessionExpired, SlowClient, UpstreamError, from_upstream_error)
from gateway.sockets import peer_closed, unanswered_s
from gateway.upstream import MAX_UPSTREAM_MESSAGE_BYTES, UpstreamConnection, build_upstream_url, dialect_for
from gateway.upstream.dialect import as_object as _object, as_text

log = logging.getLogger("gateway.session")

CONNECTING, READY, CLOSED = "connecting", "ready", "closed"
#: commands (not audio) that may wait for `ready`; beyond this the client gets NotConnected
MAX_PRE_READY_COMMANDS = 256
#: seconds a closed client that is not reading gets to take its close frame before it is cut off
CLOSE_GRACE_S = 5.0
#: model changes before ready that re-open the upstream: each starts a TCP and TLS handshake
#: with the provider, so a client may not make the node open connections at will
MAX_REOPENS = 3
#: how long after `ready` a client's first message, a config naming another model, counts as
#: sent before the client saw `ready` (a round trip; later, SPEC §2.1: the model cannot change)
FIRST_CONFIG_GRACE_S = 1.0
#: fields `ready.ignored` lists at most (a client may send thousands of unknown ones)
MAX_IGNORED = 32
#: while the client is not read (a slow upstream), how often to ask the kernel whether it left
HANGUP_CHECK_S = 1.0
#: a reply a server error hit, and whose end never came, is over once the upstream has been
#: silent this long (a reply still being generated streams its deltas well within it)
FAILED_REPLY_SILENCE_S = 2.0
# the gateway's own upstream events, by event_id (a client's may not use the prefix)
_TRUNCATE_PREFIX = cp.RESERVED_EVENT_ID_PREFIX + "truncate_"
_UPDATE_PREFIX = cp.RESERVED_EVENT_ID_PREFIX + "update_"
_CLIENT_UPDATE_PREFIX = cp.RESERVED_EVENT_ID_PREFIX + "client_update_"  # a client's session.update it gave no id
_RESPONSE_EVENT_ID = cp.RESERVED_EVENT_ID_PREFIX + "response"  # a response.create the gateway decided on itself
_CANCEL_EVENT_ID = cp.RESERVED_EVENT_ID_PREFIX + "cancel"  # a response.cancel that came with a barge-in
_FAILED_CANCEL_EVENT_ID = cp.RESERVED_EVENT_ID_PREFIX + "cancel_failed"  # ...of a reply a server error left
_ITEM_PREFIX = cp.RESERVED_EVENT_ID_PREFIX + "item_"  # a text or function result the gateway adds: its
                                                       # event_id and its item id
#: truncate errors that only mean the item went first (a race, SPEC §2.4), not a wrong position
_TRUNCATE_RACES = frozenset({"item_truncate_invalid_item_id", "item_already_truncated"})
_NOTHING = cp.SessionConfig()  # no fallback: a field the upstream refuses is left out

#: how a session ended, for the sessions_total{outcome} metric, by the error that ended it
_OUTCOME_BY_CODE = {"AuthenticationFailed": "upstream_auth_failed", "ConnectionFailed": "upstream_failed",
                    "RateLimitExceeded": "upstream_failed",
                    "UpstreamError": "upstream_failed", "SessionExpired": "expired",
                    "IdleTimeout": "idle_timeout", "SlowClient": "slow_client",
                    "ClientUnresponsive": "client_unresponsive"}
_UPSTREAM_OUTCOMES = frozenset({"upstream_failed", "upstream_auth_failed", "expired"})
#: a user turn whose client audio stopped this long ago is over (a muted microphone): the
#: upstream's VAD, hearing nothing, would never end it
MUTED_TURN_S = 1.0
#: a reply waiting for its item's confirmation (one round trip, normally) is asked for anyway
#: after this long
ITEM_WAIT_S = 5.0
#: non-fatal errors logged per session (at INFO): a client sending thousands of bad messages
#: must not flood the log; every one is counted in gateway_errors_total
MAX_LOGGED_ERRORS = 20
#: (upstream URL, dialect) pairs whose dialect mismatch has been logged with its fix: one
#: ERROR per misconfiguration and process, not one per session
_DIALECT_MISMATCHES_LOGGED: set[tuple[str, str]] = set()


def _is_utf8(payload) -> bool:
    try:
        bytes(payload).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def seed_defaults(node: NodeConfig) -> cp.SessionConfig:
    """The seed document's defaults, applied under whatever the client asks for."""
    return cp.SessionConfig(voice=node.default_voice, instructions="", turn_detection="server_vad",
                            vad_threshold=0.5, vad_silence_duration_ms=500, vad_prefix_padding_ms=300,
                            transcription_model="whisper-1", input_audio_format="pcm16",
                            output_audio_format="pcm16")


class _ClientUpdate:
    """A client's own session.update in flight (forwarded as-is): its event_id (None if it gave
    none), the SessionConfig fields it sets, and what the retry of an older refused `config`
    left to it (`withheld`), sent after all should the upstream refuse this one too."""

    __slots__ = ("event_id", "fields", "withheld")

    def __init__(self, event_id: str | None, fields: frozenset[str]) -> None:
        self.event_id = event_id
        self.fields = fields
        self.withheld: cp.SessionConfig | None = None


class _UpstreamOwner:
    """Routes one upstream connection's callbacks to the session while it is the current one
    (a re-opened upstream leaves the old owner dead, so late events of the old one are ignored)."""

    __slots__ = ("session", "alive", "on_upstream_event", "on_upstream_audio", "on_upstream_read_end")

    def __init__(self, session: "RelaySession") -> None:
        self.session = session
        self.alive = True
        # While alive these ARE the session's handlers (one call per upstream event, not two);
        # `retire()` swaps in no-ops.
        self.on_upstream_event: Callable[[Any], None] = session.on_upstream_event
        self.on_upstream_audio: Callable[[str, bytes], None] = session.on_upstream_audio
        # never swapped: writing out what this read produced is right even once retired
        self.on_upstream_read_end: Callable[[], None] = session.flush_client_batch

    @property
    def session_id(self) -> str:  # for the upstream connection's own log lines
        return self.session.session_id

    def retire(self) -> None:
        """Ignore this upstream's events from now on (it was replaced or the session closed)."""
        self.alive = False
        self.on_upstream_event = _ignore_message
        self.on_upstream_audio = _ignore_audio

    def on_upstream_closed(self, code: int | None, reason: str, refused_with: int | None) -> None:
        if self.alive:
            self.session.on_upstream_closed(code, reason, refused_with)

    def on_upstream_paused(self) -> None:
        if self.alive:
            self.session.on_upstream_paused()

    def on_upstream_resumed(self) -> None:
        # also after retirement: a client paused for an old upstream must not stay paused
        self.session.on_upstream_resumed()


class RelaySession:
    # thousands live at once: no per-instance dict (~1 KB each)
    __slots__ = ("_answered_calls", "_awaiting_results", "_connect_started", "_output_named", "_ready_at",
                 "_vad_mode",
                 "_calls_dispatched",
                 "_client_reading_paused", "_coalesce_s", "_connect_task",
                 "_created_timer", "_ended_by_gateway", "_failed_reply_timer", "_failed_reply", "_flush_timer", "_hangup_timer",
                 "_level_timer",
                 "_pre_ready_overflowed", "_owner", "_pending_updates", "_updates_in_flight",
                 "_pre_ready", "_pre_ready_audio_bytes", "_pre_ready_commands", "_pre_ready_command_bytes",
                 "_reopens", "_errors_logged", "_reply_after_item", "_reply_after_item_at", "_reply_rates", "_response_asked",
                 "_response_calls", "_response_wanted", "_user_speaking", "_items_unconfirmed", "_spelling",
                 "_item_counter", "_turn_frames_seen", "_audio_seen_at", "_active_saw_items",
                 "_turn_end", "_timing_reply", "_update_counter",
                 "active_at", "active_response_id", "activity_seen", "client", "client_leg", "client_read_seen",
                 "close_code", "created", "dialect", "effective", "heard_at", "heard_mark", "heard_seen", "ignored",
                 "input_format", "input_meter", "levels", "loop", "metrics", "node", "on_closed", "outcome",
                 "outbox", "output_bytes_per_ms", "path", "ping_sent_at", "playback", "requested", "session_id",
                 "started_at", "state", "stats", "upstream", "upstream_model", "upstream_read_seen",
                 "upstream_session_id", "upstream_url", "warned")

    def __init__(self, node: NodeConfig, upstream_url: str, model: str | None,
                 on_closed: Callable[["RelaySession"], None] | None = None,
                 metrics: GatewayMetrics | None = None) -> None:
        self.node = node
        # traffic figures as plain ints (the hot path only adds); the server flushes them into
        # `metrics` periodically and at the end
        self.metrics = metrics
        self.stats = metrics.session_opened() if metrics is not None else SessionStats()
        self.outcome: str | None = None
        self.started_at = asyncio.get_running_loop().time()
        # kept by the server's sweep: traffic seen at its last look, when it last changed, and
        # whether the max-duration warning went out
        self.activity_seen = 0
        self.active_at = self.started_at
        self.warned = False
        # kept by `check_client_alive`: frames heard from the client at its last look, where its
        # read buffer was filled to while none were (None: not looked at), when either last
        # changed, and when the unanswered ping went out (0.0: none is)
        self.heard_seen = 0
        self.heard_mark: int | None = None
        self.heard_at = self.started_at
        self.ping_sent_at = 0.0
        # kept by `release_read_buffers`: bytes each leg had received at its last release
        self.client_read_seen = self.upstream_read_seen = 0
        self._turn_end: float | None = None  # for time-to-first-reply-audio (`_turn_end_at`)
        self._timing_reply = False  # the running reply started after `_turn_end`: its first audio is timed
        self._client_reading_paused = False  # while the upstream does not keep up
        self.upstream_url = upstream_url
        self.session_id = "gw_" + uuid.uuid4().hex[:20]
        self.dialect = dialect_for(node.upstream_dialect)
        self.state = CONNECTING
        self.on_closed = on_closed
        self.loop = asyncio.get_running_loop()
        self.client: WSTransport | None = None
        self.client_leg: ClientLeg | None = None
        self.close_code: int | None = None

        # upstream lifecycle
        self.upstream: UpstreamConnection | None = None
        self._owner: _UpstreamOwner | None = None
        self.upstream_model = model or node.default_model
        self.upstream_session_id: str | None = None
        self.created = False
        # session.updates not answered yet, in the order sent: event_id -> (what it asked for,
        # what a field the upstream refuses falls back to: the seed's defaults for the first)
        self._pending_updates: dict[str, tuple[cp.SessionConfig, cp.SessionConfig]] = {}
        # every session.update sent and not answered yet, in order: ours by event_id, a
        # client's (forwarded as-is) as a _ClientUpdate — the upstream answers them in that
        # order, so a `session.updated` answers the first, whoever sent it
        self._updates_in_flight: list[str | _ClientUpdate] = []
        self._update_counter = 0
        self._connect_task: asyncio.Task | None = None
        self._connect_started = 0.0  # loop time the latest upstream connect began
        self._created_timer: asyncio.TimerHandle | None = None

        # configuration: what the client asked for (merged), what the upstream confirmed
        self.requested = cp.SessionConfig()
        self._vad_mode = "server_vad"  # the turn detection `vad.enabled: true` turns back on
        self._output_named = False  # the client set output_audio_format itself (else it follows the input)
        self._ready_at = 0.0  # loop time `ready` went out
        self.effective: dict[str, Any] = {}
        self.ignored: dict[str, None] = {}  # an ordered set, at most MAX_IGNORED
        self._spelling: dict[str, str] = {}  # field -> the client's latest name for it (cp.ConfigCommand.spelled)

        # client -> upstream audio
        self.input_format = "pcm16"
        self.output_bytes_per_ms = cp.BYTES_PER_MS["pcm16"]
        # response -> bytes per ms of its audio: the output format when it was created (a
        # `config` changing it applies to later replies); None while no reply runs
        self._reply_rates: dict[str, int] | None = None
        self._errors_logged = 0  # non-fatal ones, up to MAX_LOGGED_ERRORS
        # the meters always run, fused into the fast path's passes (about 1 % of the relay's CPU):
        # /metrics has every session's levels; `levels` is whether the client gets `level` events
        self.levels = False
        self.input_meter = LevelMeter(self.input_format)
        self._coalesce_s = node.coalesce_ms / 1000.0
        self._flush_timer: asyncio.TimerHandle | None = None
        # the audio hot path of both directions (its gates stay closed until READY)
        self.path = AudioPath(self._new_coalescer(), self._on_audio_pending)
        self.path.output_meter = LevelMeter("pcm16")
        self.stats.path = self.path  # the path keeps the counters of what it moves
        # everything to the client goes through the outbox: at once, in the batch of the current
        # upstream read (one write per read, as a byte proxy would do), or queued while the
        # client does not read (bounded by --max-client-queue-ms, then --slow-client-policy)
        self.outbox = ClientOutbox(self.path, self.stats, metrics, node.slow_client_policy == "drop-oldest",
                                   self._client_queue_limit())
        self._level_timer: asyncio.TimerHandle | None = None
        # audio (bytes) and commands that arrived before `ready`, in order; created on first use
        # (an empty deque is ~600 B per session, and most clients wait for `ready`)
        self._pre_ready: deque | None = None
        self._pre_ready_audio_bytes = 0
        self._pre_ready_commands = 0
        self._pre_ready_command_bytes = 0
        # once pre-ready audio was dropped, all of it is until `ready`: what goes up is the
        # unbroken start of what the client sent, never audio with a hole where a frame was
        self._pre_ready_overflowed = False
        self._reopens = 0
        self._hangup_timer: asyncio.TimerHandle | None = None

        # upstream -> client audio: what the client is playing, for barge-in
        self.active_response_id: str | None = None
        self.playback = PlaybackTimeline(self.path)

        # function calls
        self._calls_dispatched: Mapping[str, None] = EMPTY
        self._response_calls: dict[str, set[str]] = {}
        self._answered_calls: Mapping[str, None] = EMPTY
        self._awaiting_results: dict[str, set[str]] = {}
        # the replies the gateway asks for itself (after a text turn, after the last function
        # result): one of ours sent and not started yet / one more wanted once the active is done
        self._response_asked = False
        self._response_wanted = False
        # between the upstream's speech_started and the end of that turn: a reply asked for now
        # would talk over the user, and the turn's own reply would then never come
        self._user_speaking = False
        # ids of the items the gateway added (texts, function results) the upstream has not
        # confirmed yet: a reply created before their confirmation may not have seen them
        self._items_unconfirmed: Mapping[str, None] = EMPTY
        self._item_counter = 0
        # the reply to a `text` waits for the upstream to confirm this item (the latest text's):
        # see `_maybe_ready`
        self._reply_after_item: str | None = None
        self._reply_after_item_at = 0.0  # loop time the reply began to wait for that item
        self._turn_frames_seen = 0  # client audio frames at the last sweep (`check_user_turn`)
        self._audio_seen_at = 0.0  # loop time of the sweep that last saw them grow
        # the active reply was created after the upstream confirmed the gateway's items: it
        # answers every reply the gateway wanted, one refused for it included
        self._active_saw_items = False
        # a server error hit the active reply: this watches for its end (`_watch_failed_reply`),
        # and the reply the gateway asked the upstream to cancel then
        self._failed_reply_timer: asyncio.TimerHandle | None = None
        self._failed_reply: str | None = None
        self._ended_by_gateway: str | None = None  # ...whose cancel went unanswered: its late end is no news

    @property
    def coalescer(self) -> Coalescer:
        return self.path.coalescer

    @coalescer.setter
    def coalescer(self, coalescer: Coalescer) -> None:
        self.path.coalescer = coalescer

    @property
    def output_meter(self) -> LevelMeter:
        return self.path.output_meter

    @property
    def _turn_end_at(self) -> float | None:
        return self._turn_end

    @_turn_end_at.setter
    def _turn_end_at(self, when: float | None) -> None:
        # timed is the first audio of the first reply created after it: a reply still running
        # (whose audio would read ~0) is not the answer, nor one without audio (a function call)
        self._turn_end = when
        if self._timing_reply:
            # timed, or a new turn end before its first audio: that reply no longer answers the
            # latest turn end, the next one created does
            self._timing_reply = False
            self._sync_path()

    def _time_this_reply(self, timed: bool) -> None:
        """A conversation reply starts (True) or ends (False): while one started after a turn
        end runs, its audio goes through `_audio_out`, which times the first of it."""
        timed = timed and self._turn_end is not None
        if timed != self._timing_reply:
            self._timing_reply = timed
            self._sync_path()

    def _sync_path(self) -> None:
        """Open or close the audio path's gates from the session's state. Client audio goes the
        fast way while READY; upstream audio only for the current item, and only while nothing
        needs the session for it (not interrupted, client reading, no reply latency to time)."""
        path = self.path
        upstream = self.upstream
        # the inbound gate: client audio goes the fast way while the path has an upstream
        path.upstream = upstream.transport if self.state is READY and upstream is not None else None
        item = self.playback.item
        if item is None or self.state is CLOSED or self.client is None or self.outbox.paused \
                or self._timing_reply or item in self.playback.interrupted_items:
            item = None
        path.outbound_item = item

    # ---- lifecycle ----------------------------------------------------------------------------

    def attach(self, client: WSTransport, leg: ClientLeg | None = None, principal: str = "anonymous",
               address: str | None = None) -> None:
        """The client socket is open: open the upstream at once (pre-opening hides its handshake).
        `leg` is the socket's listener, which may read the socket itself (see `ClientLeg`);
        `principal` names the client's key or token subject for the log, never the secret;
        `address` is the client's (the per-IP limits'), for the log."""
        self.client = client
        self.client_leg = leg
        self.path.client = client
        self.outbox.client = client
        log.info("session %s: client %s from %s connected, opening upstream (model=%s, dialect=%s)",
                 self.session_id, principal, address or "an unknown address", self.upstream_model, self.dialect.name)
        self._open_upstream()

    def _open_upstream(self) -> None:
        if self._owner is not None:
            self._owner.retire()
        if self.upstream is not None:
            self.upstream.close()  # never leave a previous upstream running (WaaV bug B2)
            self.on_upstream_resumed()  # its backpressure on the client ends with it
            if self.metrics is not None:
                self.metrics.upstream_closed(self.stats)
        if self._connect_task is not None:
            self._connect_task.cancel()
        self.created = False
        self.upstream_session_id = None
        self._user_speaking = False  # a new upstream has heard nothing yet
        self._items_unconfirmed = EMPTY
        self._reply_after_item = None  # (its reply goes with the old upstream's conversation)
        self._pending_updates.clear()
        self._updates_in_flight.clear()
        self._owner = _UpstreamOwner(self)
        self.upstream = UpstreamConnection(self._owner, self.path)
        self._sync_path()
        self._connect_task = self.loop.create_task(self._connect(self.upstream, self._owner))

    async def _connect(self, upstream: UpstreamConnection, owner: _UpstreamOwner) -> None:
        try:
            await self._open(upstream, owner)
        finally:
            # a finished task keeps its coroutine and frame alive: drop ours (unless replaced)
            if self._connect_task is asyncio.current_task():
                self._connect_task = None

    async def _open(self, upstream: UpstreamConnection, owner: _UpstreamOwner) -> None:
        url = build_upstream_url(self.upstream_url, self.upstream_model)
        headers = list(self.node.auth_headers) + list(self.dialect.headers)
        started = self._connect_started = self.loop.time()
        try:
            await upstream.connect(url, headers, self.node.connect_timeout_s, self.node.upstream_proxy)
        except GatewayError as error:
            if owner.alive:
                self.fail(error)
            return
        if not owner.alive or self.state == CLOSED:
            upstream.close()
            return
        if self.metrics is not None:
            self.metrics.upstream_opened(self.stats, upstream.tls_resumed)
        remaining = max(0.05, self.node.connect_timeout_s - (self.loop.time() - started))
        self._created_timer = self.loop.call_later(remaining, self._created_timeout, owner)

    def _created_timeout(self, owner: _UpstreamOwner) -> None:
        """The connect timeout covers the whole way to `ready`: an upstream that never answers
        the configuration must not leave the client waiting for ever."""
        if not owner.alive or self.state != CONNECTING:
            return
        if not self.created:
            self.fail(ConnectionFailed(f"upstream sent no session.created within {self.node.connect_timeout_s:g} s"))
        else:
            self.fail(ConnectionFailed(f"upstream did not answer the session configuration within "
                                       f"{self.node.connect_timeout_s:g} s"))

    def fail(self, error: GatewayError, outcome: str | None = None) -> None:
        """Report `error`; if fatal, close the client with its code and the upstream (`outcome`
        names how the session ended, for metrics; by default derived from the error code)."""
        if self.state == CLOSED:
            return
        if error.fatal or self._errors_logged < MAX_LOGGED_ERRORS:
            # what ends a session is always logged, WARNING unless the client brought it about;
            # a client's run of refused messages is not (each is counted in the metrics)
            log.log(logging.WARNING if error.fatal and not error.by_client else logging.INFO, "session %s: %s %s",
                    self.session_id, error.code, error.message)
            if not error.fatal:
                self._errors_logged += 1
                if self._errors_logged == MAX_LOGGED_ERRORS:
                    log.info("session %s: %d errors logged; its further ones are counted in "
                             "gateway_errors_total, not logged", self.session_id, MAX_LOGGED_ERRORS)
        if self.metrics is not None:
            self.metrics.count_error(error.code)
        self._send_client(cp.error_event(error))
        if error.fatal:
            self.close(error.close_code, error.close_reason, outcome or _OUTCOME_BY_CODE.get(error.code, "error"))

    def close(self, code: int, reason: str, outcome: str = "other") -> None:
        """Close the client with `code`/`reason` and the upstream; idempotent."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self.close_code = code
        self.outcome = outcome
        # every end gets its line (a drain deadline or max duration reaches here without an error)
        log.info("session %s: closed by the gateway (%s, code %d: %s)", self.session_id, outcome, code, reason)
        client = self.client
        if client is not None and not client.is_disconnected:
            # the last events go before the close frame (at most one of the two holds any: the
            # queue fills only while the client is paused, the batch only while it is not)
            self.outbox.flush_batch()
            self.outbox.flush(force=True)
            client.send_close(WSCloseCode(code), reason.encode())
            client.disconnect()
            if self.outbox.paused:
                # a client that does not read would keep its socket (and buffer) until TCP gives
                # up: give it a moment to take the close frame, then cut it off
                self.loop.call_later(CLOSE_GRACE_S, client.disconnect, False)
        self._teardown()

    def notify_closing(self, reason: str, seconds_left: float) -> None:
        """Tell the client the gateway will end this session (drain, max duration)."""
        self._send_client(cp.encode({"type": "closing", "reason": reason,
                                     "seconds_left": round(max(0.0, seconds_left), 1)}))

    @property
    def client_paused(self) -> bool:
        """The client does not read: its socket's buffers are full (picows paused writing)."""
        return self.outbox.paused

    @property
    def waiting_on_upstream(self) -> bool:
        """The upstream session is still opening: the client waits for `ready`, and no idle time
        runs (the connect timeout bounds the wait). An upstream that stops reading later does
        not stop the idle clock: a hung upstream must not pin the session until its maximum
        duration."""
        return self.state is CONNECTING

    def on_client_close_frame(self, status: int | None) -> None:
        """The client ended the session with a close frame: a normal close (1000, 1001 or no
        status) is a completed session; a drop without one, or another code, is not."""
        if self.state != CLOSED and status in (None, 1000, 1001):
            self.outcome = "completed"

    def on_client_failed(self, code: int, reason: str) -> None:
        """picows failed the client connection itself, before the gateway saw the frame: one
        announcing more than --max-message-bytes + 64 KiB (1009), or a malformed one (1002).
        No event could go first (the close frame is out); the session ends as an error, not as
        a client that left."""
        if self.state is CLOSED or self.outcome == "error":  # (reported already)
            return
        log.info("session %s: the client's frame was refused (close %d: %s)", self.session_id, code, reason)
        self.close_code = code
        self.outcome = "error"

    def on_client_closed(self) -> None:
        """The client went away: close the upstream, nothing stays half-open."""
        if self.state != CLOSED:
            self.state = CLOSED
            self.outcome = self.outcome or "client_disconnected"
            log.info("session %s: client closed (%s)", self.session_id, self.outcome)
        self._teardown()

    def _teardown(self) -> None:
        for timer in (self._flush_timer, self._level_timer, self._created_timer, self._hangup_timer,
                      self._failed_reply_timer):
            if timer is not None:
                timer.cancel()
        self._flush_timer = self._level_timer = self._created_timer = self._hangup_timer = None
        self._failed_reply_timer = None
        self._sync_path()
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
        if self._owner is not None:
            self._owner.retire()
        if self.upstream is not None:
            self.upstream.close()
        # client audio that never went up is lost with the session (unless the client ended it:
        # then it wanted nothing more), and must show as lost
        unsent = self._pre_ready_audio_bytes + self.coalescer.pending_bytes
        if unsent and self.metrics is not None and not self.stats.closed \
                and self.outcome not in ("completed", "client_disconnected"):
            self.metrics.count_drop("upstream_closed" if self.outcome in _UPSTREAM_OUTCOMES else "other", unsent)
        self._pre_ready_audio_bytes = self.stats.c2u_buffered_bytes = 0
        self._pre_ready = None
        self.outbox.clear()
        if self.metrics is not None:
            self.metrics.session_closed(self.stats, self.outcome or "other")
        if self.on_closed is not None:
            callback, self.on_closed = self.on_closed, None
            callback(self)

    def on_upstream_closed(self, code: int | None, reason: str, refused_with: int | None) -> None:
        if self.state == CLOSED:
            return
        if refused_with is not None:
            what = (f"it sent a message over {MAX_UPSTREAM_MESSAGE_BYTES // (1024 * 1024)} MiB"
                    if refused_with == CLOSE_MESSAGE_TOO_BIG else "it broke the WebSocket protocol")
            error: GatewayError = ConnectionFailed(f"the gateway closed the upstream connection: {what} "
                                                   f"(close code {refused_with})")
        elif reason and "invalid_api_key" in reason:
            error = AuthenticationFailed("upstream rejected the API key",
                                                       upstream={"code": "invalid_api_key"})
        elif reason and "session_expired" in reason:
            error = SessionExpired("upstream session expired", upstream={"code": "session_expired"})
        else:
            how = f"close code {code}" if code is not None else "no close frame"
            if reason:  # the upstream's own words (`clean` scrubs anything key-like)
                how += f": {reason}"
            error = ConnectionFailed(f"upstream closed before the session was ready ({how})" if self.state == CONNECTING
                                     else f"upstream connection lost ({how})")
        self.fail(error)

    # ---- client -> gateway --------------------------------------------------------------------

    def on_client_audio(self, payload) -> None:
        """A complete client binary message; `payload` is only valid during this call."""
        stats = self.stats
        stats.c2u_audio_frames += 1
        stats.c2u_audio_bytes += len(payload)
        if self.state is READY:
            self._audio_in(payload)
        elif self.state is CONNECTING:
            if not payload:
                return  # nothing to relay, and a queue entry each: a million of them cost 7 MiB
            limit = self.node.pre_ready_buffer_ms * cp.BYTES_PER_MS[self.input_format]
            if self._pre_ready_overflowed or self._pre_ready_audio_bytes + len(payload) > limit:
                if self.metrics is not None:
                    self.metrics.count_drop("pre_ready_overflow", len(payload))
                if not self._pre_ready_overflowed:
                    self._pre_ready_overflowed = True
                    self.fail(NotConnected(f"the session is not ready yet and its pre-ready buffer "
                                           f"({self.node.pre_ready_buffer_ms} ms of audio) is full: "
                                           "audio from here until `ready` is dropped; wait for `ready`"))
                return
            self._pre_ready_audio_bytes += len(payload)
            stats.c2u_buffered_bytes = self._pre_ready_audio_bytes
            if self._pre_ready_audio_bytes > stats.c2u_buffered_peak:  # (the sweep may never see it)
                stats.c2u_buffered_peak = self._pre_ready_audio_bytes
            # held audio is read in the input format `ready` reports, not the one in force when
            # it came: a telephony client streams G.711 from its first frame and sends the
            # config that says so a moment later (configs run at once; `ready` waits for them;
            # one that crosses `ready` comes too late for the audio held)
            self._queue_pre_ready(bytes(payload))

    def _audio_in(self, payload) -> None:
        """Coalesce client audio on the session's own path (audio that waited for `ready`, or
        arrived while the path's gate was closed): what `AudioPath.client_audio` does."""
        coalescer = self.coalescer
        frame = coalescer.push(payload)
        while frame is not None:  # more than one only for a frame over MAX_APPEND_AUDIO_BYTES
            self.upstream.send_frame(frame, HEADER_ROOM)
            frame = coalescer.push(b"")
        if (coalescer.pending_bytes >= coalescer.sample_width) != self.path.flush_armed:
            self._on_audio_pending()

    def _on_audio_pending(self) -> None:
        """The flush timer runs only while whole samples are pending, so no audio waits longer
        than `coalesce_ms` and a chunk that fills up on time is never split by a timer armed for
        it (that would double the appends). Called by the path when that changes."""
        coalescer = self.coalescer
        if coalescer.pending_bytes >= coalescer.sample_width:
            if self._flush_timer is None:
                self._flush_timer = self.loop.call_later(self._coalesce_s, self._flush_on_timer)
        elif self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        self.path.flush_armed = self._flush_timer is not None

    def _flush_on_timer(self) -> None:
        self._flush_timer = None
        self._flush_audio()

    def _flush_audio(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        self.path.flush_armed = False
        frame = self.coalescer.flush()
        while frame is not None:  # more than one only for audio over MAX_APPEND_AUDIO_BYTES
            if self.upstream is not None:
                self.upstream.send_frame(frame, HEADER_ROOM)
            frame = self.coalescer.flush()

    def on_client_text(self, payload) -> None:
        if self.state is CLOSED:
            return
        self.stats.c2u_json_frames += 1
        self.stats.c2u_json_bytes += len(payload)
        try:
            command = cp.parse_client_message(payload, self.fail)
        except InvalidMessage as error:
            self.fail(error)
            return
        if self.state is READY or type(command) is cp.ConfigCommand:
            self._run_command(command)
        elif self._pre_ready_commands >= MAX_PRE_READY_COMMANDS:
            self.fail(NotConnected("too many commands before `ready`; this one was dropped"))
        elif self._pre_ready_command_bytes + len(payload) > self.node.max_message_bytes:
            # a forwarded OpenAI event may carry megabytes (an append's audio, an image): held
            # commands are bounded as one largest message, so one always fits
            self.fail(NotConnected(f"commands waiting for `ready` may hold {self.node.max_message_bytes} "
                                   "bytes in all; this one was dropped"))
        else:
            self._pre_ready_commands += 1
            self._pre_ready_command_bytes += len(payload)
            self._queue_pre_ready(command)

    def _queue_pre_ready(self, item) -> None:
        if self._pre_ready is None:
            self._pre_ready = deque()
        self._pre_ready.append(item)

    def _run_command(self, command) -> None:
        _COMMAND_HANDLERS[type(command)](self, command)

    def _send_upstream(self, event: dict[str, Any], unsendable: type[GatewayError] = InvalidMessage,
                       param: str | None = None) -> bool:
        """Send one event upstream; False (and an `unsendable` error naming `param` to the client)
        when it cannot be serialised — orjson parses JSON nested deeper than it writes (254 levels)."""
        try:
            data = orjson.dumps(event)
        except orjson.JSONEncodeError as exc:
            self.fail(unsendable(f"cannot send {event.get('type')!r} upstream: {exc} (JSON nested too "
                                 "deeply)", param=param))
            return False
        if self.upstream is not None:
            self.upstream.send_json_bytes(data)
        return True

    def _cmd_config(self, command: cp.ConfigCommand) -> None:
        update = command.config
        if update.output_audio_format is not None:
            self._output_named = True
        elif update.input_audio_format is not None and not self._output_named:
            # "both input and output audio use the same format" (the seed; WaaV too) until the
            # client names an output format of its own
            update.output_audio_format = update.input_audio_format
        for name in update.specified():
            # given again, and valid: applied, unless what follows finds it ignored once more
            # (under whichever name it was listed: a client may mix the spellings)
            for param in (self._client_param(name), cp.CLIENT_PARAMS.get(name, name), command.spelled.get(name)):
                self.ignored.pop(param, None)
            if name in command.spelled:
                self._spelling[name] = command.spelled[name]
        for error in command.errors:
            self._note_ignored(error.param)
            self.fail(error)
        reopen = update.model is not None and update.model != self.upstream_model
        # the client's very first message, a config sent on open, can arrive just after `ready`
        # when the upstream opened faster than the client's round trip: it was sent before the
        # client saw `ready`, and re-opens as one before it would (a new `ready` follows)
        first_message = self.stats.c2u_json_frames == 1 and self.stats.c2u_audio_frames == 0 \
            and (self.state is not READY or self.loop.time() - self._ready_at <= FIRST_CONFIG_GRACE_S)
        if reopen and ((self.state is READY and not first_message) or self._reopens >= MAX_REOPENS):
            self.fail(InvalidConfig("the model cannot change after `ready` (open a new session)"
                                    if self.state is READY else
                                    f"the model changed more than {MAX_REOPENS} times before `ready`; "
                                    f"the session keeps {self.upstream_model}", param="model"))
            self._note_ignored("model")
            reopen = False
        if not reopen:
            update.model = None
        if update.turn_detection not in (None, "none"):
            self._vad_mode = update.turn_detection
        elif command.vad_on and update.turn_detection is None and self.requested.turn_detection == "none":
            update.turn_detection = self._vad_mode  # vad.enabled: true after false: back to the mode it had
        # what the gateway itself does with the config applies on either path below
        if update.levels is not None:
            self._set_levels(update.levels)
        if update.input_audio_format is not None:
            self._use_input_format(update.input_audio_format)
        if update.output_audio_format is not None:
            self._use_output_format(update.output_audio_format)
        self.requested = self.requested.merged(update)
        self._note_inapplicable_vad(update)
        if reopen:
            log.info("session %s: client asked for model %s, re-opening upstream", self.session_id,
                     update.model)
            self.upstream_model = update.model
            self._reopens += 1
            self.state = CONNECTING  # if it was READY: the new upstream gets its own `ready`
            self._open_upstream()  # its session.update carries all of `requested`
        elif self.created:
            self._send_session_update(self._upstream_part(update))
        if update.turn_detection is not None or update.has_vad_params() or update.input_audio_format is not None:
            # VAD off, or restarted (new settings, a new format): no speech_stopped ends this turn
            self._user_turn_ended()

    def _note_inapplicable_vad(self, update: cp.SessionConfig) -> None:
        """VAD parameters the current mode does not take (a threshold under semantic VAD, an
        eagerness under server VAD) are kept for a later switch, and listed as ignored."""
        mode = self.requested.turn_detection or "server_vad"
        names = {"semantic_vad": ("vad_threshold", "vad_silence_duration_ms", "vad_prefix_padding_ms"),
                 "server_vad": ("vad_eagerness",)}.get(mode, ())
        for name in names:
            if getattr(update, name) is not None:
                param = self._client_param(name)
                self._note_ignored(param, f"{param} does not apply to {mode}: kept for a change of "
                                          "turn detection, ignored for now")

    def _use_input_format(self, audio_format: str) -> None:
        """Coalesce (and meter) the client's audio in `audio_format` from now on."""
        if audio_format != self.input_format:
            self._flush_audio()  # metered in the old format, like the rest of the meter's sums
            if self.coalescer.pending_bytes:  # half a PCM16 sample has no place in the new format
                self.fail(InvalidMessage("the audio before the format change ended on half a sample (an odd "
                                         "number of PCM16 bytes): the odd byte was dropped"))
            self.input_format = audio_format
            self.input_meter.audio_format = audio_format
            self.coalescer = self._new_coalescer()

    def _use_output_format(self, audio_format: str) -> None:
        """Reply audio is `audio_format` from now on: barge-in arithmetic and the meter follow."""
        self.output_bytes_per_ms = cp.BYTES_PER_MS[audio_format]
        self.output_meter.audio_format = audio_format
        self.outbox.limit = self._client_queue_limit()

    def _upstream_part(self, update: cp.SessionConfig) -> cp.SessionConfig:
        """What of `update` goes upstream: a turn_detection object replaces the whole upstream value,
        so whenever turn detection or a VAD parameter changes, send the full merged VAD settings."""
        part = update.merged(cp.SessionConfig())
        part.model = None
        part.levels = None
        if update.turn_detection is not None or update.has_vad_params():
            merged = seed_defaults(self.node).merged(self.requested)
            for name in ("turn_detection", "vad_threshold", "vad_silence_duration_ms",
                         "vad_prefix_padding_ms", "vad_eagerness"):
                setattr(part, name, getattr(merged, name))
        return part

    def _send_session_update(self, config: cp.SessionConfig, fallback: cp.SessionConfig = _NOTHING) -> None:
        if not config.specified():
            return
        self._update_counter += 1
        event_id = f"{_UPDATE_PREFIX}{self._update_counter}"
        event, ignored = self.dialect.session_update(config, event_id)
        for name in ignored:
            self._note_ignored(name, f"{name} is not supported by the upstream ({self.node.upstream_dialect} "
                                     "dialect): ignored")
        if not set(event["session"]) - {"type"}:
            return  # nothing left to send
        self._pending_updates[event_id] = (config, fallback)
        self._expect_update_answer(event_id)
        # only tools carry client JSON deep enough to be unsendable (their parameter schemas)
        if not self._send_upstream(event, InvalidConfig, "tools"):  # never sent: nothing to await
            del self._pending_updates[event_id]
            self._updates_in_flight.pop()
            self._note_ignored("tools")

    def _expect_update_answer(self, entry: str | _ClientUpdate) -> None:
        self._updates_in_flight.append(entry)
        if len(self._updates_in_flight) > RECENT:  # an upstream that answers none: forget the oldest
            forgotten = self._updates_in_flight.pop(0)
            if type(forgotten) is str:
                self._pending_updates.pop(forgotten, None)

    def _client_param(self, name: str) -> str | None:
        """SessionConfig field `name` as the client last wrote it (WaaV's `transcription_model`
        or the seed's `input_transcription.model`), for `param` of errors and `ignored`."""
        return self._spelling.get(name) or cp.CLIENT_PARAMS.get(name)

    def _note_ignored(self, name: str | None, why: str | None = None) -> None:
        """Field `name` is not applied. Until `ready` it is listed in `ready.ignored`; after it,
        a field no error has named yet (`why` given) gets its own non-fatal InvalidConfig: nothing
        the client asked for is dropped without a word."""
        if name and len(self.ignored) < MAX_IGNORED:
            self.ignored[name] = None
        if why is not None and self.state is READY:
            self.fail(InvalidConfig(why, param=name))

    def _cmd_text(self, command: cp.TextCommand, after_its_item: bool = False) -> None:
        self._flush_audio()
        item_id = self._add_item({"type": "message", "role": "user",
                                  "content": [{"type": "input_text", "text": command.text}]})
        if not command.respond:
            return
        self._turn_end_at = self.loop.time()
        self._ask_for_response_after(item_id, after_its_item)

    def _ask_for_response_after(self, item_id: str | None, after_its_item: bool = False) -> None:
        """Ask for the reply to the user item `item_id` just added (a text, the last function
        result). With the microphone live under VAD the audio just sent may be speech the
        upstream has not reported yet: the reply is asked for once the item is confirmed, by
        when that audio is heard (the upstream takes events in order), or waits for the turn.
        One reply, once the latest such item is confirmed."""
        after_its_item = after_its_item or (self._vad_on() and self._audio_flowing())
        if item_id is not None and (after_its_item or self._reply_after_item is not None):
            self._reply_after_item = item_id
            self._reply_after_item_at = self.loop.time()
        else:
            self._ask_for_response()

    def _vad_on(self) -> bool:
        """The upstream's VAD may be on: as it last said, or as the client has asked since."""
        return self.effective.get("turn_detection") != "none" or self.requested.turn_detection not in (None, "none")

    def _cmd_commit(self, command) -> None:
        self._turn_end_at = self.loop.time()
        self._flush_audio()
        self._send_upstream({"type": "input_audio_buffer.commit"})
        self._report_half_sample()
        self._user_turn_ended()

    def _cmd_create_response(self, command) -> None:
        self._turn_end_at = self.loop.time()
        self._flush_audio()
        self._send_upstream({"type": "response.create"})

    def _cmd_cancel_response(self, command) -> None:
        # a manual barge-in: the upstream is told how much of the reply was heard, as after
        # speech_started (reference §7.6: cancel, then truncate)
        self._interrupt_if_playing(cancel=True)

    def _cmd_clear_audio(self, command) -> None:
        # what the coalescer holds goes up first, to be cleared there: dropping it here would
        # put the upstream's audio_ms timeline behind the client's
        self._flush_audio()
        self._send_upstream({"type": "input_audio_buffer.clear"})
        self._user_turn_ended()

    def _cmd_function_result(self, command: cp.FunctionResultCommand) -> None:
        self._flush_audio()
        item_id = self._add_item({"type": "function_call_output", "call_id": command.call_id,
                                  "output": command.output})
        self._answered_calls = added(self._answered_calls, command.call_id)
        for response_id, waiting in list(self._awaiting_results.items()):
            waiting.discard(command.call_id)
            if not waiting:
                del self._awaiting_results[response_id]
                self._ask_for_response_after(item_id)  # once, after the last result

    def _add_item(self, item: dict) -> str | None:
        """Add a user item upstream; its id (None if it could not be sent)."""
        self._item_counter += 1
        item_id = f"{_ITEM_PREFIX}{self._item_counter}"  # the reference lets a client name its items
        event = {"type": "conversation.item.create", "event_id": item_id, "item": {"id": item_id, **item}}
        if not self._send_upstream(event):
            return None
        self._items_unconfirmed = added(self._items_unconfirmed, item_id)
        return item_id

    def _ask_for_response(self) -> None:
        """A reply the gateway decides to ask for. The upstream runs one response at a time and
        refuses another (`conversation_already_has_active_response`), and a refused request is
        gone: while a response runs, or one of ours has not started yet, the request waits and
        goes up when that response is done. One request answers everything that waited.
        (A client's own `create_response` goes up at once: WaaV clients send one after `text`,
        and a second reply to one question would be worse than the error they get.)
        While the user speaks, it waits too: the reply to their turn answers it (below)."""
        if self.active_response_id is not None or self._response_asked or self._user_speaking:
            self._response_wanted = True
            return
        self._response_asked = True
        self._send_upstream({"type": "response.create", "event_id": _RESPONSE_EVENT_ID})

    def _cmd_playback(self, command: cp.PlaybackCommand) -> None:
        self.playback.report(command.played_ms, command.response_id, self.loop.time())

    def _cmd_passthrough(self, command: cp.PassthroughCommand) -> None:
        self._flush_audio()  # keep the client's order: audio sent before this event goes first
        kind = command.event.get("type")
        if kind == "session.update" and command.event.get("event_id") is None:
            # tagged, so that the upstream's refusal names it (it echoes the event_id, and leaves
            # it null for an event that had none: then a refusal without a `session.*` param could
            # not be told from any other error, and the update would stay "in flight" for good,
            # every later answer matched one update early); the client sees its null again
            self._update_counter += 1
            command.event["event_id"] = f"{_CLIENT_UPDATE_PREFIX}{self._update_counter}"
        if self._send_upstream(command.event) and kind == "session.update":
            client_event_id = command.event.get("event_id")
            session = _object(command.event.get("session"))  # either dialect's shape
            self._expect_update_answer(_ClientUpdate(client_event_id if type(client_event_id) is str else None,
                                                     self.dialect.fields_set(session)))
            if "output_audio_format" in session or "format" in _object(_object(session.get("audio")).get("output")):
                self._output_named = True  # the client named it: an input format no longer moves it
        if kind == "input_audio_buffer.commit":
            self._report_half_sample()
        if kind in _TURN_ENDING_EVENTS:
            self._user_turn_ended()

    # ---- upstream -> gateway -------------------------------------------------------------------

    def on_upstream_audio(self, item_id: str, pcm: bytes) -> None:
        """A decoded upstream audio delta the path did not take (not the open item)."""
        self.path.batching = True
        self._audio_out(item_id, pcm)

    def on_upstream_event(self, payload) -> None:
        """A complete upstream text message that is not a (fast-decodable) audio delta; `payload`
        is only valid during this call. What it produces for the client is batched until
        `flush_client_batch` (the end of the read)."""
        self.path.batching = True
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            if not _is_utf8(payload):  # RFC 6455 §8.1: that fails the connection, not one lost event
                log.warning("session %s: upstream sent a text message that is not UTF-8", self.session_id)
                if self.upstream is not None:
                    self.upstream.fail_invalid_text()
                return
            event = None
            log.warning("session %s: upstream sent a frame that is not JSON", self.session_id)
        handler = kind = None
        # an event whose type is not a string (an array, an object) is no event we know
        if type(event) is dict and type(event.get("type")) is str:
            self.dialect.normalize(event)
            kind = event["type"]
            handler = _EVENT_HANDLERS.get(kind)
        if handler is not RelaySession._on_audio_delta_slow:  # that one counts as audio
            self.stats.u2c_json_frames += 1
            self.stats.u2c_json_bytes += len(payload)
        if kind in _ANSWERS_TO_CLIENT_REQUESTS:
            self._send_client(bytes(payload))  # as the upstream sent it: the client asked in its words
        elif handler is not None:
            try:
                handler(self, event)
            except (AttributeError, TypeError, KeyError, IndexError, ValueError) as exc:
                # a field of a shape no handler expects: one event is lost, not the session (WaaV
                # B9). Neither payload nor exception text is logged: either may hold the user's words.
                log.warning("session %s: upstream %s event not understood (%s); ignored",
                            self.session_id, kind, type(exc).__name__)
                log.debug("session %s: the %s event's failure", self.session_id, kind, exc_info=True)
                self.fail(UpstreamError(f"the upstream sent a {kind} event the gateway could not read; "
                                        "it was ignored", fatal=False))

    def _audio_out(self, item_id: str, pcm) -> None:
        playback = self.playback
        if item_id != playback.item:
            rates = self._reply_rates
            rate = self.output_bytes_per_ms if rates is None else rates.get(
                playback.item_response.get(item_id, self.active_response_id), self.output_bytes_per_ms)
            playback.start_item(item_id, self.loop.time(), rate)
            self._sync_path()
        path = self.path
        size = len(pcm)
        path.item_generated += size
        stats = self.stats  # received to relay, whether it is relayed or dropped (as every drop)
        stats.u2c_audio_frames += 1
        stats.u2c_audio_bytes += size
        if item_id in playback.interrupted_items:  # the user barged in: this reply is not played
            if self.metrics is not None:
                self.metrics.count_drop("interrupted", size)
            return
        path.item_delivered += size
        # the timed reply's first audio: not that of an out-of-band reply running beside it
        if self._timing_reply and playback.item_response.get(item_id, self.active_response_id) == self.active_response_id:
            if self.metrics is not None:
                self.metrics.observe_first_audio(self.loop.time() - self._turn_end_at)
            self._turn_end_at = None
        if self.client is not None and self.state is not CLOSED:
            self._slow_client(self.outbox.send_audio(pcm))

    def _on_audio_delta_slow(self, event: dict) -> None:
        """An audio delta the fast path declined (unusual encoding): same semantics, slower."""
        import base64
        import binascii
        try:
            pcm = base64.b64decode(event.get("delta") or "", validate=True)
        except (binascii.Error, ValueError):
            log.warning("session %s: upstream audio delta with invalid base64 dropped", self.session_id)
            return
        item_id = event.get("item_id")
        if isinstance(item_id, str):
            self.output_meter.feed(pcm)
            self._audio_out(item_id, pcm)

    def _on_session_created(self, event: dict) -> None:
        session = _object(event.get("session"))
        foreign = self.dialect.foreign_field(session)
        if foreign is not None:
            self._wrong_dialect(f"its session has `{foreign}`")
            return
        if self.metrics is not None and not self.created:
            self.metrics.observe_upstream_connect(self.loop.time() - self._connect_started)
        self.created = True
        self.upstream_session_id = session.get("id")
        self.effective = self.dialect.effective(session)
        # one update: the seed's defaults under everything the client asked for so far
        defaults = seed_defaults(self.node)
        initial = defaults.merged(self.requested)
        initial.model = None
        initial.levels = None
        self._send_session_update(initial, fallback=defaults)
        self._maybe_ready()

    def _wrong_dialect(self, evidence: str, upstream: dict | None = None) -> None:
        """The node is set to the other dialect than its upstream speaks (an Azure preview URL
        left on ga, a beta node in front of today's OpenAI): its updates would be refused or
        half-read and its events go unread. The operator's setting to fix, said plainly, rather
        than a session that looks ready and is not, or an upstream error that names no setting."""
        other = "ga" if self.dialect.name == "beta" else "beta"
        # the fix is said once per upstream and setting: every later session fails alike, and
        # its own warning line is enough (a busy misconfigured node would repeat it per session)
        if (self.upstream_url, self.dialect.name) not in _DIALECT_MISMATCHES_LOGGED:
            _DIALECT_MISMATCHES_LOGGED.add((self.upstream_url, self.dialect.name))
            log.error("session %s: the upstream speaks the %s dialect (%s), the node is set to %s: start it "
                      "with --upstream-dialect %s", self.session_id, other, evidence, self.dialect.name, other)
        self.fail(ConnectionFailed(f"the upstream speaks the {other} dialect, not the {self.dialect.name} "
                                   f"dialect this gateway is set to (--upstream-dialect)", upstream=upstream))

    def _on_session_updated(self, event: dict) -> None:
        answered = None
        if self._updates_in_flight:  # the upstream answers updates in the order it received them
            answered = self._updates_in_flight.pop(0)
            if type(answered) is str:
                self._pending_updates.pop(answered, None)
        stated = self.dialect.effective(_object(event.get("session")))
        self.effective = {**self.effective, **stated}  # a partial answer leaves the rest as it was
        if not self._updates_in_flight:
            # the audio formats are what the upstream says they are, once no later update is on
            # its way: a client's raw update may have changed them behind the gateway's back, or
            # the upstream kept another than asked; the gateway relays, cuts and meters in them
            for name in ("input_audio_format", "output_audio_format"):
                if stated.get(name):
                    self._follow_upstream(name)
        if self.state is READY and answered is not None:
            # the answer to a client's `config` or raw session.update after `ready` (one sent on
            # open may cross a fast upstream's `ready`): the effective values it left, as `ready`
            # reported them
            self._send_client(cp.session_updated_event(self._client_effective(), list(self.ignored)))
        self._maybe_ready()

    def _maybe_ready(self) -> None:
        if self.state is not CONNECTING or not self.created or self._pending_updates:
            return
        self.state = READY
        self._ready_at = self.loop.time()
        if self._created_timer is not None:
            self._created_timer.cancel()
            self._created_timer = None
        self._sync_path()
        effective = self._client_effective()
        self._send_client(cp.ready_event(self.session_id, self.upstream_session_id, effective, list(self.ignored)))
        log.info("session %s: ready (model=%s voice=%s turn_detection=%s)", self.session_id,
                 effective["model"], effective.get("voice"), effective.get("turn_detection"))
        queued, self._pre_ready = self._pre_ready or (), None
        self._pre_ready_audio_bytes = self._pre_ready_commands = self._pre_ready_command_bytes = 0
        self.stats.c2u_buffered_bytes = 0
        vad = self.effective.get("turn_detection") != "none"
        held_audio = False
        for item in queued:  # in the order the client sent them
            if self.state is not READY:
                break
            if type(item) is bytes:
                held_audio = True
                self._audio_in(item)
            elif held_audio and vad and type(item) is cp.TextCommand:
                # the audio held before it goes up in the same moment: the upstream's VAD has not
                # said whether the user is speaking yet, and a reply asked for now could talk
                # over them. Its item's confirmation comes after that audio is heard (the upstream
                # takes events in order): the reply is asked for then, or waits for the turn.
                self._cmd_text(item, after_its_item=True)
            else:
                self._run_command(item)

    def _client_effective(self) -> dict[str, Any]:
        """The fields of `ready` and `session_updated`: what the upstream has stated, null for
        what it never has."""
        effective = {name: self.effective.get(name) for name in _READY_FIELDS}
        effective["model"] = effective["model"] or self.upstream_model
        return effective

    def _on_error(self, event: dict) -> None:
        error = _error_object(event.get("error"))
        code = error.get("code")
        if code == "beta_api_shape_disabled" and self.dialect.name == "beta":
            self._wrong_dialect("it refuses the beta shape: beta_api_shape_disabled", _details(error))
            return
        event_id = error.get("event_id") or ""
        # a server error that names no request (or the gateway's own request of the running
        # reply) may be the running reply's; one naming another request is that request's
        reply_failed = error.get("type") == "server_error" and not _about_session_update(error) and (
            not event_id or (event_id == _RESPONSE_EVENT_ID and not self._response_asked))
        if not event_id and str(error.get("message") or "").startswith(_TRANSCRIPTION_UPDATE_REFUSAL):
            # the gateway never sends one: it answers the oldest of the client's own updates
            # (if it was a session.update; a transcription_session.update is not tracked)
            client_update = next((entry for entry in self._updates_in_flight if type(entry) is not str), None)
            if client_update is not None:
                self._client_update_refused(client_update)
        elif not event_id and self._updates_in_flight and (
                (self.state is CONNECTING and error.get("type") in (None, "invalid_request_error")) or _about_session_update(error)):
            # the server leaves event_id null at times (reference §3.2): before `ready` only
            # our updates have gone up, so a request refused then refused one of them (a server
            # error, or any other type, is no refusal), and after it an error about the session answers an
            # update — the oldest unanswered one (a client's own goes on to the client as any error)
            oldest = self._updates_in_flight[0]
            if type(oldest) is str:
                event_id = oldest
            else:
                self._client_update_refused(oldest)
        elif event_id and (own := next((entry for entry in self._updates_in_flight
                                        if type(entry) is _ClientUpdate and entry.event_id == event_id), None)):
            self._client_update_refused(own)
            if event_id.startswith(_CLIENT_UPDATE_PREFIX):
                error["event_id"], event_id = None, ""  # the client's update had none (see `_cmd_passthrough`)
        rejected = self._pending_updates.pop(event_id, None)
        if rejected is not None:
            self._updates_in_flight.remove(event_id)
            self._config_rejected(*rejected, error)
            self._maybe_ready()
            return
        if event_id.startswith(_TRUNCATE_PREFIX):
            if code in _TRUNCATE_RACES:
                log.info("session %s: truncate race ignored (%s)", self.session_id, code)
                return
            # not a race: the position was wrong, and the upstream keeps audio nobody heard
            log.warning("session %s: truncate refused: %s", self.session_id, error.get("message"))
            self.fail(UpstreamError(f"the upstream refused to truncate the interrupted reply: "
                                    f"{error.get('message')}", upstream=_details(error), fatal=False))
            return
        if event_id.startswith(_ITEM_PREFIX):
            self._item_settled(event_id)  # refused (an unknown call_id, say): the client hears why below
        elif not event_id and self._reply_after_item is not None and _about_an_item(error):
            # a refusal of an item that names no event may be that of the item the reply waits
            # for (the upstream leaves event_id null at times): the reply is asked for rather
            # than never. Any other error naming nothing (a server error, a client's refused
            # event) says nothing about the audio before the item: the reply waits on.
            self._item_settled(self._reply_after_item)
        if event_id == _FAILED_CANCEL_EVENT_ID:
            self._failed_reply_cancel_refused()
            if code == "response_cancel_not_active":
                return
        if event_id == _CANCEL_EVENT_ID and code == "response_cancel_not_active":
            log.info("session %s: the cancelled reply had ended upstream already", self.session_id)
            return
        if event_id == _RESPONSE_EVENT_ID or (not event_id and self._response_asked and _active_response_refusal(error)):
            self._response_asked = False
            if _active_response_refusal(error):
                # one started first (server VAD): ask after it, unless it has seen our items
                self._response_wanted = not (self.active_response_id is not None and self._active_saw_items)
                return
        mapped = from_upstream_error(error)
        if code in BENIGN_UPSTREAM_CODES:
            mapped.fatal = False
        self.fail(mapped)
        if reply_failed and self.active_response_id is not None and self.state is not CLOSED:
            self._watch_failed_reply(self.active_response_id)

    def _watch_failed_reply(self, response_id: str, frames_seen: int = -1) -> None:
        """A server error "fails the response" (reference §8), and its failed response.done
        normally follows. Without one, the reply would stay running for good, and every reply
        the gateway asks for after it (a `text`, a function result) would wait on it. So once the
        upstream has gone quiet (FAILED_REPLY_SILENCE_S without a frame) while that reply is
        still the active one, the gateway cancels it. The upstream's answer ends it: its
        response.done (it still held the reply), or "no active response" (it did not:
        `_failed_reply_cancel_refused`), or no answer within FAILED_REPLY_SILENCE_S again. Nothing
        is asked for before that, which would be refused while the upstream still holds the reply."""
        if self._failed_reply_timer is not None:
            self._failed_reply_timer.cancel()
        self._failed_reply_timer = None
        if self.state is CLOSED or self.active_response_id != response_id:
            return  # ended, or another reply runs
        stats = self.stats
        frames = stats.u2c_audio_frames + stats.u2c_json_frames
        if frames != frames_seen:  # the upstream still talks: look again later
            self._failed_reply_timer = self.loop.call_later(FAILED_REPLY_SILENCE_S, self._watch_failed_reply,
                                                            response_id, frames)
            return
        log.warning("session %s: response %s had a server error and no end; cancelling it", self.session_id,
                    response_id)
        self._failed_reply = response_id
        self._send_upstream({"type": "response.cancel", "event_id": _FAILED_CANCEL_EVENT_ID, "response_id": response_id})
        # an upstream that answers nothing, not even that, has dropped the reply all the same
        self._failed_reply_timer = self.loop.call_later(FAILED_REPLY_SILENCE_S, self._failed_reply_cancel_refused,
                                                        False)

    def _failed_reply_cancel_refused(self, answered: bool = True) -> None:
        """The upstream refused to cancel the reply a server error left ("no active response",
        or any other refusal), or did not answer at all: it holds it no more, or cannot say. The
        gateway ends it for the
        client (`response_done`, status `failed`; the server error was told already), and what
        waited for it goes up."""
        response_id, self._failed_reply = self._failed_reply, None
        if self._failed_reply_timer is not None:
            self._failed_reply_timer.cancel()
            self._failed_reply_timer = None
        if response_id is not None and response_id == self.active_response_id and self.state is not CLOSED:
            if not answered:  # the upstream may still end it later: that end is not the client's news
                self._ended_by_gateway = response_id
            self._on_response_done({"response": {"id": response_id, "status": "failed"}}, failure_reported=True)

    def _config_rejected(self, part: cp.SessionConfig, fallback: cp.SessionConfig, error: dict) -> None:
        """The upstream refused a whole session.update (it validates atomically). When the
        error's `param` names one field, that field is ignored (or falls back to the seed's
        default, in the first update) and the rest is sent again (SPEC §2.2: the rest applies);
        else the update is lost. The client is told either way."""
        name = self.dialect.config_field(error.get("param")) or _FIELD_BY_UPDATE_CODE.get(error.get("code"))
        param = self._client_param(name) if name is not None else None
        # what a later update, still on its way, sets is the client's newer word: the retry must
        # not send the older value after it, nor the gateway fall back from it meanwhile (a
        # `config` of the client's is applied when sent; its raw session.update only once the
        # upstream says so: the gateway falls back from a refused format meanwhile)
        newer = {field for entry in self._updates_in_flight if type(entry) is str and entry in self._pending_updates
                 for field in self._pending_updates[entry][0].specified()}
        raw_newer = {field: entry for entry in self._updates_in_flight if type(entry) is _ClientUpdate
                     for field in entry.fields}  # the last of them to set each field
        rest = None
        if name is not None and getattr(part, name) is not None:
            rest = part.merged(cp.SessionConfig())
            default = getattr(fallback, name)
            if name in newer:
                setattr(rest, name, None)
            elif default is not None and default != getattr(part, name):
                setattr(rest, name, default)  # the first update: the seed's default instead
                setattr(self.requested, name, None)
            else:
                setattr(rest, name, None)
                self._follow_upstream(name)
            for field in newer:
                setattr(rest, field, None)
            for field, update in raw_newer.items():
                if field not in newer and getattr(rest, field) is not None:
                    # left to the raw update; sent after all if the upstream refuses that one
                    update.withheld = update.withheld or cp.SessionConfig()
                    setattr(update.withheld, field, getattr(rest, field))
                    setattr(rest, field, None)
        if name not in newer:  # else it is not ignored: the newer value goes on
            self._note_ignored(param or str(error.get("param") or "session"))
        if rest is not None and rest.specified():
            self.fail(InvalidConfig(f"upstream rejected {param}: {error.get('message')} (ignored; the rest "
                                    f"of the config applies)", param=param, upstream=_details(error)))
            self._send_session_update(rest)
        else:
            self.fail(InvalidConfig(f"upstream rejected the configuration: {error.get('message')}",
                                    param=param or error.get("param"), upstream=_details(error)))

    def _client_update_refused(self, update: _ClientUpdate) -> None:
        """The upstream refused a client's own session.update (it goes on to the client as any
        error): what an older `config`'s retry left to it goes up now."""
        self._updates_in_flight.remove(update)
        if update.withheld is not None:
            self._send_session_update(update.withheld)

    def _follow_upstream(self, name: str) -> None:
        """A field the upstream refused: what the gateway does itself goes back to the upstream's
        value (the formats it relays in), and it is no longer asked for."""
        effective = self.effective
        if name == "output_audio_format":
            self._use_output_format(effective.get(name) or "pcm16")
        elif name == "input_audio_format":
            self._use_input_format(effective.get(name) or "pcm16")
        setattr(self.requested, name, effective.get(name) if name in _EFFECTIVE_FIELDS else None)

    def _on_speech_started(self, event: dict) -> None:
        self._user_speaking = True
        self._send_client(cp.speech_event("speech_started", _ms(event.get("audio_start_ms")),
                                          as_text(event.get("item_id"))))
        self._interrupt_if_playing()

    def _on_speech_stopped(self, event: dict) -> None:
        # the upstream's VAD creates the turn's reply (create_response is always on), and that
        # reply answers what waited meanwhile (`_on_response_created`)
        self._user_speaking = False
        self._turn_end_at = self.loop.time()
        self._send_client(cp.speech_event("speech_stopped", _ms(event.get("audio_end_ms")), as_text(event.get("item_id"))))

    def check_user_turn(self) -> None:
        """Called by the node's sweep (once a second; more often with short timeouts). The
        upstream's VAD ends a turn only on audio it hears: a client whose audio stopped mid-turn
        (a muted microphone) would hold a reply that waits for the turn forever, so a turn
        whose audio stopped about MUTED_TURN_S ago is over. Counted in time, not in sweeps: a
        sweep every 0.25 s ended turns between a client's 400 ms frames. A reply that has waited
        ITEM_WAIT_S for its item's confirmation is asked for here too."""
        frames = self.stats.c2u_audio_frames
        now = self.loop.time()
        if frames != self._turn_frames_seen:
            self._turn_frames_seen = frames
            self._audio_seen_at = now
        elif self._user_speaking and now - self._audio_seen_at >= MUTED_TURN_S * 0.9:  # (timers fire a hair early)
            self._user_turn_ended()
        if self._reply_after_item is not None and now - self._reply_after_item_at >= ITEM_WAIT_S:
            # neither its confirmation nor a refusal naming it came (an error naming nothing
            # took its place, say): the reply is asked for late rather than never
            self._item_settled(self._reply_after_item)

    def _audio_flowing(self) -> bool:
        """Client audio came since the last sweep, or the sweep that last saw it come was under
        MUTED_TURN_S ago: a microphone that is live."""
        return (self.stats.c2u_audio_frames != self._turn_frames_seen
                or self.loop.time() - self._audio_seen_at < MUTED_TURN_S)

    def _user_turn_ended(self) -> None:
        """The client ended or dropped the turn itself (commit, clear_audio, turn detection
        off): no VAD reply is coming, so a reply that waited for the user goes up now."""
        if not self._user_speaking:
            return
        self._user_speaking = False
        if self._response_wanted and self.active_response_id is None and not self._response_asked:
            self._response_wanted = False
            self._ask_for_response()

    def _interrupt_if_playing(self, cancel: bool = False) -> None:
        """Barge-in: cut what the client is playing, if anything (`PlaybackTimeline.barge_in`).
        With `cancel` (the client's `cancel_response`), a response.cancel goes first: over
        nothing playing, the client's cancel of the running reply, as it asked. Over a reply
        being played, a cancel of that reply by its id, and only while it runs: it is usually
        generated in full already (models run faster than real time), and a bare cancel would
        hit the next reply instead, the one a `text` or `function_result` just asked for. Its
        id is tagged: "no active response" (it ended meanwhile) is the expected race, not news
        for the client."""
        cut = self.playback.barge_in(self.loop.time(), self.active_response_id)
        if cancel:
            if cut is None and self.active_response_id is None:
                # the client knows of no running reply: one the gateway asked for may be starting
                # (its `text`'s), and a cancel with no id cancels it; with nothing running the
                # client hears so (response_cancel_not_active)
                self._send_upstream({"type": "response.cancel"})
            elif cut is None:
                # the reply the client knows of, by its id: ended meanwhile (its response.done on
                # the way), it is no news, and no later reply is cancelled in its place
                self._send_upstream({"type": "response.cancel", "event_id": _CANCEL_EVENT_ID,
                                     "response_id": self.active_response_id})
            elif self.active_response_id is not None and \
                    any(response_id == self.active_response_id for response_id, _ in cut.interrupted):
                self._send_upstream({"type": "response.cancel", "event_id": _CANCEL_EVENT_ID,
                                     "response_id": self.active_response_id})
        if cut is None:
            return
        self._sync_path()
        log.info("session %s: barge-in, response %s interrupted at %d ms", self.session_id, *cut.interrupted[0])
        for response_id, played_ms in cut.interrupted:
            self._send_client(cp.interrupted_event(response_id, played_ms))
        for item_id, end_ms in cut.truncates:
            self._send_upstream({"type": "conversation.item.truncate", "event_id": f"{_TRUNCATE_PREFIX}{item_id}",
                                 "item_id": item_id, "content_index": 0, "audio_end_ms": end_ms})

    def _on_user_transcript_delta(self, event: dict) -> None:
        delta = event.get("delta")
        if isinstance(delta, str) and delta:
            self._send_client(cp.transcript_event("user", delta, False, as_text(event.get("item_id"))))

    def _on_user_transcript_done(self, event: dict) -> None:
        text = event.get("transcript")
        if isinstance(text, str):
            self._send_client(cp.transcript_event("user", text, True, as_text(event.get("item_id"))))

    def _on_user_transcript_failed(self, event: dict) -> None:
        """The upstream could not transcribe a user turn: the client still gets the turn's final
        (empty) transcript, so nothing waits for one, and the reason as a non-fatal error."""
        self._send_client(cp.transcript_event("user", "", True, as_text(event.get("item_id"))))
        error = _error_object(event.get("error"))
        self.fail(UpstreamError(f"input transcription failed: {error.get('message') or 'no reason given'}",
                                upstream=_details(error), fatal=False))

    def _on_assistant_delta(self, event: dict) -> None:
        item_id = as_text(event.get("item_id"))
        delta = event.get("delta")
        if item_id in self.playback.interrupted_items or not isinstance(delta, str) or not delta:
            return
        self._send_client(cp.transcript_event("assistant", delta, False, item_id, as_text(event.get("response_id"))))

    def _on_assistant_done(self, event: dict) -> None:
        item_id = as_text(event.get("item_id"))
        text = event.get("transcript", event.get("text"))
        if not isinstance(text, str):
            return
        # an interrupted item's final still comes, so captions are closed: the whole text the
        # model generated, flagged (its later partials were not sent, and not all of it was heard)
        self._send_client(cp.transcript_event("assistant", text, True, item_id, as_text(event.get("response_id")),
                                              interrupted=item_id in self.playback.interrupted_items))

    def _on_response_created(self, event: dict) -> None:
        response = _object(event.get("response"))
        response_id = as_text(response.get("id"))
        if response_id is not None:
            # its audio is in the format it was created with (its own, or the session's then),
            # whatever a session.updated says while it plays
            stated = self.dialect.effective(response).get("output_audio_format")
            if self._reply_rates is None:
                self._reply_rates = {}
            remember(self._reply_rates, response_id,
                     cp.BYTES_PER_MS[stated] if stated is not None else self.output_bytes_per_ms)
        if _out_of_band(response):
            # a client's `conversation:"none"` request: it runs beside the conversation's reply,
            # which stays the active one (barge-in, cancel, the next response.create)
            self._send_client(cp.response_started_event(response_id, out_of_band=True))
            return
        self.active_response_id = response_id
        self._response_asked = False  # ours, or one that came first (then ours is refused)
        self._time_this_reply(True)
        self._active_saw_items = not self._items_unconfirmed
        if self._active_saw_items:
            # the upstream handles events in order: a reply created after every item the gateway
            # added was confirmed has seen them all, and answers what waited for one
            self._response_wanted = False
        # its response_done comes in any case: the client gets the pair, ids null if unreadable
        self._send_client(cp.response_started_event(response_id))

    def _on_item_added(self, event: dict) -> None:
        item_id = _object(event.get("item")).get("id")
        if self._items_unconfirmed and isinstance(item_id, str):
            self._item_settled(item_id)

    def _item_settled(self, item_id: str) -> None:
        if item_id in self._items_unconfirmed:
            del self._items_unconfirmed[item_id]  # type: ignore[attr-defined]
        if item_id == self._reply_after_item:  # the upstream has heard what came before it
            self._reply_after_item = None
            self._ask_for_response()

    def _on_output_item_added(self, event: dict) -> None:
        item = _object(event.get("item"))
        response_id = event.get("response_id")
        item_id = item.get("id")
        if isinstance(item_id, str) and isinstance(response_id, str) and self.playback.note_item(item_id, response_id):
            self._sync_path()

    def _on_output_item_done(self, event: dict) -> None:
        item = _object(event.get("item"))
        if item.get("type") == "function_call" and item.get("status") == "completed":
            self._dispatch_call(item.get("call_id"), item.get("name"), item.get("arguments"),
                                event.get("response_id"))

    def _dispatch_call(self, call_id, name, arguments, response_id) -> None:
        """Tell the client about a tool call once, when its item is done and `completed`: a call cut
        off by a cancel or a barge-in (`incomplete`, its arguments unfinished JSON; its
        `function_call_arguments.done` still comes) is not for the client to run."""
        if not isinstance(call_id, str) or call_id in self._calls_dispatched:
            return
        self._calls_dispatched = added(self._calls_dispatched, call_id)
        if isinstance(response_id, str):
            calls = self._response_calls.get(response_id)
            if calls is None:
                calls = set()
                remember(self._response_calls, response_id, calls)
            calls.add(call_id)
        self._send_client(cp.function_call_event(call_id, as_text(name), arguments if isinstance(arguments, str) else ""))

    def _on_response_done(self, event: dict, failure_reported: bool = False) -> None:
        response = _object(event.get("response"))
        response_id = as_text(response.get("id"))
        if self._reply_rates is not None:
            self._reply_rates.pop(response_id, None)
            if not self._reply_rates:
                self._reply_rates = None
        status = as_text(response.get("status"))
        out_of_band = _out_of_band(response)
        if response_id is not None and response_id == self._ended_by_gateway and not failure_reported:
            # the upstream's late end of a reply the gateway ended (the client had its
            # response_done): a request refused meanwhile, as the upstream still held it, goes up now
            self._ended_by_gateway = None
            if self._response_wanted and self.active_response_id is None and not self._response_asked:
                self._response_wanted = False
                self._ask_for_response()
            return
        if not out_of_band:
            self._failed_reply = None
            if self._failed_reply_timer is not None:
                self._failed_reply_timer.cancel()
                self._failed_reply_timer = None
            # the conversation runs one reply at a time: this is its end, whatever id it gives
            # (one it cannot read must not leave the gateway waiting for it for good); and if
            # ours never announced itself (a conforming upstream sends response.created first)
            # it is over all the same, and must not hold back every later request
            self.active_response_id = None
            self._response_asked = False
        usage = response.get("usage")
        self._send_client(cp.response_done_event(response_id, status, usage if type(usage) is dict else None,
                                                 out_of_band))
        if status == "failed" and not failure_reported:
            # fatal or not by the upstream code, as when it comes as an `error` event: a rate
            # limit or a server error fails one response, an account problem (insufficient_quota)
            # every one after it
            self.fail(from_upstream_error(_error_object(_object(response.get("status_details")).get("error"))))
            if self.state is CLOSED:
                return
        if out_of_band:
            return  # what waits for the conversation's reply to end waits on
        self._time_this_reply(False)  # no audio (a function call, a failure): the next reply's is timed
        ask, self._response_wanted = self._response_wanted, False
        calls = self._response_calls.pop(response_id, None) if isinstance(response_id, str) else None
        if calls:
            waiting = calls - self._answered_calls.keys()
            if waiting:
                remember(self._awaiting_results, response_id, waiting)
            else:  # every result arrived before the response finished
                ask = True
        if ask:
            self._ask_for_response()

    # ---- levels -------------------------------------------------------------------------------

    def _report_half_sample(self) -> None:
        """A commit while the coalescer holds the odd byte of PCM16: the turn ended on half a
        sample. The byte is carried on, as SPEC §2.2 has it (a stream split at an odd byte around
        a commit stays aligned), so the next turn starts with it: the client is told, since a
        turn that really ended mid-sample shifts every later sample by a byte."""
        if self.coalescer.pending_bytes:
            self.fail(InvalidMessage("the committed audio ended on half a sample (an odd number of PCM16 "
                                     "bytes): the odd byte is carried into the next audio, as every odd byte "
                                     "is; send whole samples, or every later sample is shifted by a byte"))

    def _new_coalescer(self) -> Coalescer:
        sample_width = 2 if self.input_format == "pcm16" else 1
        target = max(sample_width, self.node.coalesce_ms * cp.BYTES_PER_MS[self.input_format])
        return Coalescer(target, sample_width, self.input_meter)

    def _set_levels(self, enabled: bool) -> None:
        """The client's `level` events on or off. Each meter reads its direction's format (G.711
        codes are expanded to PCM16 values); `_cmd_config` keeps them in step with the formats."""
        if enabled == self.levels:
            return
        self.levels = enabled
        if self._level_timer is not None:
            self._level_timer.cancel()
            self._level_timer = None
        if enabled:
            self._level_timer = self.loop.call_later(self.node.level_interval_ms / 1000.0, self._level_tick)

    def _level_tick(self) -> None:
        if self.state is CLOSED or not self.levels:
            return
        input_level, output_level = self._read_levels()
        if input_level[3] or output_level[3]:
            self._send_client(cp.level_event(input_level, output_level))
        self._level_timer = self.loop.call_later(self.node.level_interval_ms / 1000.0, self._level_tick)

    def observe_levels(self) -> None:
        """The server's sweep: the levels since its last look go to /metrics, unless the client's
        `level` events read the meters (then each event's levels do)."""
        if not self.levels and self.state is READY:
            self._read_levels()

    def _read_levels(self) -> tuple[tuple, tuple]:
        """Take (and reset) both meters' readings; what they metered goes to the metrics."""
        input_level = self.input_meter.read()
        output_level = self.output_meter.read()
        if self.metrics is not None:
            if input_level[3]:
                self.metrics.observe_level("input", input_level[0])
            if output_level[3]:
                self.metrics.observe_level("output", output_level[0])
        return input_level, output_level

    # ---- helpers ------------------------------------------------------------------------------

    def _send_client(self, data: bytes) -> None:
        client = self.client
        if client is not None and not client.is_disconnected and self.state is not CLOSED:
            self._slow_client(self.outbox.send_event(data))

    def flush_client_batch(self) -> None:
        """The end of an upstream read: its client frames go out in one write."""
        self.outbox.flush_batch()

    # ---- an upstream that does not read ---------------------------------------------------------

    def on_upstream_paused(self) -> None:
        """The upstream leg's write buffer is past its high-water mark: stop reading the client,
        so its audio waits in its own socket (TCP backpressure) instead of growing our buffer.
        Nothing is dropped; the client sees its sends slow down."""
        client = self.client
        if client is not None and not client.is_disconnected:
            if self.client_leg is not None:
                self.client_leg.hold_reads()
            client.underlying_transport.pause_reading()
            self._client_reading_paused = True
            if self._hangup_timer is None:
                self._hangup_timer = self.loop.call_later(HANGUP_CHECK_S, self._check_client_hangup)

    def on_upstream_resumed(self) -> None:
        client = self.client
        if self._client_reading_paused and client is not None and not client.is_disconnected:
            if self.client_leg is not None:
                self.client_leg.release_reads()
            client.underlying_transport.resume_reading()
        self._client_reading_paused = False
        if self._hangup_timer is not None:
            self._hangup_timer.cancel()
            self._hangup_timer = None

    def _check_client_hangup(self) -> None:
        """While the client is not read, its close frame and FIN wait unread behind its audio,
        so its leaving would only be seen once the upstream catches up. Ask the kernel instead."""
        self._hangup_timer = None
        client = self.client
        if not self._client_reading_paused or self.state is CLOSED or client is None or client.is_disconnected:
            return
        if peer_closed(client.underlying_transport.get_extra_info("socket")):
            log.info("session %s: the client left while it was not being read", self.session_id)
            client.disconnect(False)  # -> on_client_closed: the upstream is closed too
            return
        self._hangup_timer = self.loop.call_later(HANGUP_CHECK_S, self._check_client_hangup)

    # ---- memory after a burst (gateway/read_buffers.py) --------------------------------------------

    def release_read_buffers(self) -> None:
        """The server's sweep: a leg that received more than a burst since the last release may
        have grown its read buffer (a big message, a backlog read at once); give back its free
        pages, so the session's memory returns to its small steady size."""
        stats = self.stats
        received = stats.c2u_audio_bytes + stats.c2u_json_bytes
        if received - self.client_read_seen >= read_buffers.BURST_BYTES:
            self.client_read_seen = received
            read_buffers.release(self.client)
        received = stats.u2c_audio_bytes + stats.u2c_json_bytes
        if received - self.upstream_read_seen >= read_buffers.BURST_BYTES:
            self.upstream_read_seen = received
            if self.upstream is not None:
                read_buffers.release(self.upstream.transport)

    # ---- a client that vanished ------------------------------------------------------------------

    def check_client_alive(self, now: float, interval_s: float, timeout_s: float) -> None:
        """The server's sweep (--client-ping-interval-s): ping a client that has sent nothing,
        not a frame nor a piece of one, for `interval_s`; if it then sends nothing, not even the
        pong, for `timeout_s`, it is gone without closing (a dropped network, a sleeping laptop).
        TCP cannot tell while neither side sends, and a ghost session would hold its key's
        session slot until the idle timeout. A client that is not read (the upstream does not
        keep up) or does not read (its writes are paused) can neither see a ping nor answer it;
        its TCP stack still answers while it lives, so it is gone once that answers nothing for
        `timeout_s` (`sockets.unanswered_s`)."""
        client = self.client
        if self.state is CLOSED or client is None or client.is_disconnected:
            return
        stats = self.stats
        heard = stats.c2u_audio_frames + stats.c2u_json_frames + stats.c2u_other_frames
        if self._client_reading_paused or self.outbox.paused:
            silent_s = unanswered_s(client.underlying_transport.get_extra_info("socket"))
            if silent_s >= timeout_s:
                self.fail(ClientUnresponsive(f"the client's network acknowledged nothing for "
                                             f"{round(silent_s, 1):g} s while it was not reading"))
                return
            heard = -1  # never a count: the ping clock starts again once it reads and is read
        if heard != self.heard_seen or heard == -1:
            self.heard_seen, self.heard_mark = heard, None
            self._heard(now)
            return
        last_mark, self.heard_mark = self.heard_mark, read_buffers.read_mark(client)
        if last_mark is not None and last_mark != self.heard_mark:
            # no whole frame, but a piece of one: a big message on a slow link can take longer
            # than a ping timeout, and the pong can only follow it
            self._heard(now)
            return
        if self.ping_sent_at:
            if now - self.ping_sent_at >= timeout_s:
                self.fail(ClientUnresponsive(f"the client answered no ping for {timeout_s:g} s, after "
                                             f"{round(now - self.heard_at, 1):g} s without a frame"))
        elif now - self.heard_at >= interval_s:
            client.send_ping()
            self.ping_sent_at = now

    def _heard(self, now: float) -> None:
        self.heard_at = now
        self.ping_sent_at = 0.0

    # ---- a client that does not read (gateway/outbox.py) ------------------------------------------

    def check_client_reading(self) -> None:
        """The server's sweep: pause a client that stopped reading while the kernel still took
        our writes, resume it once it reads again (`ClientOutbox.check_reading`)."""
        client = self.client
        if self.state is not READY or client is None or client.is_disconnected:
            return
        verdict = self.outbox.check_reading(self.stats.u2c_audio_bytes)
        if verdict is STALLED:
            log.info("session %s: the client stopped reading (more than %d bytes waiting in the kernel)",
                     self.session_id, self.outbox.limit)
            self.on_client_paused()
            if self.node.slow_client_policy == "close":
                self._close_slow_client()
        elif verdict is READING:
            self.on_client_resumed()

    def on_client_paused(self) -> None:
        """The client socket's write buffer is over its high-water mark: queue from now on."""
        self.outbox.pause()
        self._sync_path()

    def on_client_resumed(self) -> None:
        """The client is reading again: send what waited, in order, until it pauses again."""
        self.outbox.resume()
        self._sync_path()
        self.outbox.flush()

    def _slow_client(self, verdict: str | None) -> None:
        """Apply --slow-client-policy to what queueing for a paused client reported."""
        if verdict is DROPPING:  # once until the client reads again; queued, in order
            self.fail(SlowClient(f"the client is not reading fast enough: reply audio more "
                                 f"than {self.node.max_client_queue_ms} ms behind is dropped", fatal=False))
        elif verdict is OVERFLOW:
            self._close_slow_client()

    def _client_queue_limit(self) -> int:
        """--max-client-queue-ms as bytes of the session's output audio."""
        return self.node.max_client_queue_ms * self.output_bytes_per_ms

    def _close_slow_client(self) -> None:
        """The session ends: what is queued will never be played, only the error and the close
        frame are still offered to the client."""
        self.outbox.clear()
        self.fail(SlowClient(f"the client did not read its audio: more than "
                             f"{self.node.max_client_queue_ms} ms behind"))


# Dispatch tables, shared by every session (per-session dicts of bound methods cost ~2.5 KB each):
# the functions take the session as their first argument.
_EVENT_HANDLERS: dict[str, Callable[[RelaySession, dict], None]] = {
    "session.created": RelaySession._on_session_created,
    "session.updated": RelaySession._on_session_updated,
    "error": RelaySession._on_error,
    "input_audio_buffer.speech_started": RelaySession._on_speech_started,
    "input_audio_buffer.speech_stopped": RelaySession._on_speech_stopped,
    "conversation.item.input_audio_transcription.delta": RelaySession._on_user_transcript_delta,
    "conversation.item.input_audio_transcription.completed": RelaySession._on_user_transcript_done,
    "conversation.item.input_audio_transcription.failed": RelaySession._on_user_transcript_failed,
    "response.created": RelaySession._on_response_created,
    "conversation.item.added": RelaySession._on_item_added,
    "response.done": RelaySession._on_response_done,
    "response.output_item.added": RelaySession._on_output_item_added,
    "response.output_item.done": RelaySession._on_output_item_done,
    "response.output_audio_transcript.delta": RelaySession._on_assistant_delta,
    "response.output_text.delta": RelaySession._on_assistant_delta,
    "response.output_audio_transcript.done": RelaySession._on_assistant_done,
    "response.output_text.done": RelaySession._on_assistant_done,
    "response.output_audio.delta": RelaySession._on_audio_delta_slow,
}
_COMMAND_HANDLERS: dict[type, Callable[[RelaySession, Any], None]] = {
    cp.ConfigCommand: RelaySession._cmd_config,
    cp.TextCommand: RelaySession._cmd_text,
    cp.CommitCommand: RelaySession._cmd_commit,
    cp.CreateResponseCommand: RelaySession._cmd_create_response,
    cp.CancelResponseCommand: RelaySession._cmd_cancel_response,
    cp.ClearAudioCommand: RelaySession._cmd_clear_audio,
    cp.FunctionResultCommand: RelaySession._cmd_function_result,
    cp.PlaybackCommand: RelaySession._cmd_playback,
    cp.PassthroughCommand: RelaySession._cmd_passthrough,
}


#: what `ready` and `session_updated` report, in this order (UpstreamDialect.effective's names)
_READY_FIELDS = ("model", "voice", "turn_detection", "input_audio_format", "output_audio_format",
                 "input_transcription")
#: SessionConfig fields the upstream's session object reports back (UpstreamDialect.effective)
#: a client's raw events that end the user's turn, or may restart the upstream's VAD mid-turn
_TURN_ENDING_EVENTS = frozenset({"input_audio_buffer.commit", "input_audio_buffer.clear", "session.update"})
#: upstream answers to requests only a client sends (forwarded as-is), which go back to it as-is:
#: the escape hatch would be one-way otherwise (the gateway never retrieves or deletes items)
_ANSWERS_TO_CLIENT_REQUESTS = frozenset({"conversation.item.retrieved", "conversation.item.deleted"})
#: refusals of a session.update that may name no `param` (reference §8), by the field they are about
_FIELD_BY_UPDATE_CODE = {"cannot_update_voice": "voice"}
#: reference §8: code and param null, this wire text
_TRANSCRIPTION_UPDATE_REFUSAL = "Passing a transcription session update event to a realtime session"


def _about_an_item(error: dict) -> bool:
    """Whether an upstream error refuses a conversation item, when its event_id does not say."""
    return error.get("type") == "invalid_request_error" and str(error.get("param") or "").startswith("item")


def _about_session_update(error: dict) -> bool:
    """Whether an upstream error refuses a session.update, when its event_id does not say."""
    return str(error.get("param") or "").startswith("session") or error.get("code") in _FIELD_BY_UPDATE_CODE


_EFFECTIVE_FIELDS = frozenset({"voice", "turn_detection", "input_audio_format", "output_audio_format"})


def _out_of_band(response: dict) -> bool:
    """A response outside the conversation (`response.create` with `conversation:"none"`): its
    `conversation_id` is null, where the conversation's replies name theirs."""
    return "conversation_id" in response and response["conversation_id"] is None


def _active_response_refusal(error: dict) -> bool:
    """The upstream refused a response.create because one is running: the code, or, from
    servers of early 2025, no code and the message (reference §8)."""
    return error.get("code") == "conversation_already_has_active_response" or (
        not error.get("code") and str(error.get("message") or "").startswith("Conversation already has an active response"))


def _ignore_message(payload) -> None:
    """A retired upstream's events go nowhere."""


def _ignore_audio(item_id: str, pcm: bytes) -> None:
    """Nor does its audio."""


#: the fields of an upstream error object that are strings by the protocol
_ERROR_STRING_FIELDS = ("code", "type", "param", "event_id", "message")


def _error_object(value: Any) -> dict:
    """An upstream error object with its string fields as strings or absent; a bare string is
    taken for the message."""
    if type(value) is str:
        return {"message": value}
    error = _object(value)
    if any(type(error.get(name)) not in (str, type(None)) for name in _ERROR_STRING_FIELDS):
        error = {name: value for name, value in error.items()
                 if name not in _ERROR_STRING_FIELDS or type(value) is str}
    return error


#: the largest millisecond count the client gets (2**53: exact in every JSON reader)
_MAX_MS = 1 << 53


def _ms(value: Any) -> int:
    """An upstream millisecond position: a whole number from 0 to _MAX_MS (0 when unreadable)."""
    if type(value) is float:
        value = int(value) if value == value and abs(value) < _MAX_MS else 0  # nan, inf, 1e300
    return min(max(value, 0), _MAX_MS) if type(value) is int else 0


def _details(error: dict) -> dict:
    return {"code": error.get("code"), "type": error.get("type"), "param": error.get("param"),
            "event_id": error.get("event_id")}
