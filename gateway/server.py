"""`GatewayServer`: the picows server of a node — `/realtime`, `/health`, `/ready`, `/metrics`.

`/realtime[?model=...]` upgrades to a WebSocket relayed by a `RelaySession`, after admission
(origin, auth, limits); `GET /health` answers 200 `{"status":"ok","sessions":N,"pid":P,...}`
(liveness), `GET /ready` 200, or 503 while draining or overloaded (readiness), `GET /metrics` the Prometheus exposition;
any other path is 404. HEAD, OPTIONS and HTTP/1.0 requests, which picows' parser refuses, are
answered by `gateway.http_probes` in front of it. The server keeps a registry of live sessions
(`sessions`); `drain()` ends them gracefully, `stop()` closes every one of them (1001) before
returning.
"""
from __future__ import annotations

import asyncio
import logging
import os
import ssl
import traceback
from urllib.parse import parse_qs, urlsplit

import orjson
from picows import WSAutoPingStrategy, WSCloseCode, WSFrame, WSMsgType, WSTransport
from picows.picows import WSProtocol, _validate_upgrade_request
from picows.common import WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener

from _fastpath import IMPLEMENTATION as FASTPATH, ClientLeg, DirectReader, release_handshake
from gateway import sockets, tls
from gateway.auth import (SHARED_LIMITS_FILE, AuthRefusal, AuthSettings, ClientAuthenticator, LimitRefusal,
                          OriginPolicy, Principal, Refusal, SessionLimiter, SharedSessionLimiter, Slot, client_ip,
                          limit_address, peer_ip)
from gateway.client_protocol import error_event, is_model_name
from gateway.config import ConfigError, NodeConfig
from gateway.errors import (CLOSE_GOING_AWAY, CLOSE_MESSAGE_TOO_BIG, IdleTimeout, InvalidMessage, Overloaded,
                            SessionExpired, keep_secret, scrub)
from gateway.framing import (FragmentOutOfOrder, MessageAssembler, MessageTooBig, PeerParserErrorsAtInfo, close_reply,
                             close_status)
from gateway.http_probes import RequestSniffer
from gateway.metrics import GatewayMetrics
from gateway.session import RelaySession
from gateway.upstream.trust import TrustStoreError, client_tls_context, reload_client_trust

log = logging.getLogger("gateway.server")
_PICOWS_LOG = PeerParserErrorsAtInfo(logging.getLogger("picows.server"), {})

#: a single client frame may exceed the message limit only by this much before picows itself
#: drops the connection; within it the gateway answers with a proper error and close 1009
_FRAME_SLACK_BYTES = 64 * 1024
_BINARY = WSMsgType.BINARY
_PING = WSMsgType.PING
_PONG = WSMsgType.PONG
#: picows' initial read buffer per client socket (it doubles on demand and never shrinks); the
#: default 16 KiB is mostly idle for 960-byte audio frames and dominated RSS per session
CLIENT_READ_BUFFER_INIT_BYTES = 4 * 1024
#: how long a connection may take to send its request (picows' handshake timer), and on a
#: --tls-cert node, before that, its TLS handshake (uvloop's default is 60 s): what an idle or
#: trickling peer can hold a socket for
HANDSHAKE_TIMEOUT_S = 10.0
#: the paths `plain_endpoint` serves (any other is 404)
PLAIN_PATHS = frozenset(("/health", "/ready", "/metrics", "/realtime"))
#: the longest interval between sweeps (metrics flush, idle, ping and duration checks)
SWEEP_INTERVAL_S = 1.0
#: how often the sweep updates the process_* metrics (a scrape updates them too): counting the
#: open files lists /proc/self/fd on Linux before 6.2, a few ms at thousands of sockets
PROCESS_SWEEP_S = 10.0
#: sweeps in a row that run --overload-lag-ms late before the node refuses new sessions
OVERLOAD_SWEEPS = 2


class ClientListener(ClientLeg):
    """picows listener for one client socket: admits it, reassembles messages, hands them to
    its session. The session is created only in `on_ws_connected`: picows answers an invalid
    upgrade itself and then calls neither `on_ws_connected` nor `on_ws_disconnected`, so
    anything taken earlier (a session, a limiter slot) would leak.

    Hot path (the `ClientLeg` base, compiled): a whole binary frame within the message limit goes
    through the session's `AudioPath` while the session is ready; everything else — and audio
    before `ready` — arrives in `on_frame`."""

    __slots__ = ("server", "principal", "model", "session", "slot", "assembler", "_on_audio", "_pong")

    def __init__(self, server: "GatewayServer", principal: Principal, model: str | None) -> None:
        super().__init__()
        self.server = server
        self.principal = principal
        self.model = model
        self.session: RelaySession | None = None
        self.slot: Slot | None = None
        self.max_audio_bytes = server.config.max_message_bytes
        self.assembler = MessageAssembler(server.config.max_message_bytes)
        self._on_audio = _ignore
        self._pong: bytes | None = None  # the latest ping's payload, while the client does not read

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.server._admit(self, transport)

    def on_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.rsv1 | frame.rsv2 | frame.rsv3:
            # no extension is ever negotiated (RFC 6455 §5.2: fail the connection); compressed
            # bytes must not be played as PCM
            transport.send_close(WSCloseCode.PROTOCOL_ERROR, b"reserved bits set without an extension")
            transport.disconnect()
            return
        if frame.msg_type is _PONG:
            if self.session is not None:  # an answer to the liveness ping, or a heartbeat of its own
                self.session.stats.c2u_other_frames += 1
            return
        if frame.msg_type is _PING:
            if self.session is not None:
                self.session.stats.c2u_other_frames += 1
            # answered here, not by picows' auto-pong, whose pongs ignore backpressure: a client
            # that pings and never reads grew the node's memory without bound. While it does not
            # read, only its latest ping is answered, once it reads again (RFC 6455 §5.5.3)
            if self.session is not None and self.session.client_paused:
                self._pong = frame.get_payload_as_bytes()
            else:
                transport.send_pong(frame.get_payload_as_bytes())
            return
        if frame.msg_type is _BINARY and frame.fin and not self.assembling \
                and frame.payload_size <= self.max_audio_bytes:
            # a whole audio frame while the session's audio path is closed (not ready yet)
            try:
                self._on_audio(frame.get_payload_as_memoryview())
            except Exception:  # a bug must not take the socket down silently: log, report, go on
                log.exception("error handling client audio")
            return
        if frame.msg_type is WSMsgType.CLOSE:
            status = close_status(frame)
            if self.session is not None:
                self.session.on_client_close_frame(status)
            transport.send_close(close_reply(status))  # its code echoed, or 1002 for one it may not send
            transport.disconnect()
            return
        session = self.session
        if session is None:  # refused at admission; the socket is closing
            return
        try:
            message = self.assembler.feed(frame)
        except MessageTooBig as exc:
            handshake = transport.close_handshake
            if handshake is None or handshake.sent is None:
                session.fail(InvalidMessage(str(exc), fatal=True, close_code=CLOSE_MESSAGE_TOO_BIG))
            else:  # picows refused the frame from its header and closed (1009) before its payload
                # came in: no event can follow that close
                session.on_client_failed(handshake.sent.code, handshake.sent.reason)
            return
        except FragmentOutOfOrder as exc:
            session.fail(InvalidMessage(str(exc)))
            return
        finally:
            # while a fragmented message is assembled, no frame may bypass the assembler
            self.assembling = self.assembler.partial is not None
        if message is None:  # a fragment: the client is there
            session.stats.c2u_other_frames += 1
            return
        msg_type, payload = message
        try:
            if msg_type is WSMsgType.BINARY:
                session.on_client_audio(payload)
            else:
                session.on_client_text(payload)
        except Exception:  # a bug must not take the socket down silently: log, report, go on
            log.exception("session %s: error handling a client message", session.session_id)
            session.fail(InvalidMessage("the gateway could not handle this message (logged as a gateway bug)"))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.forget_reads()
        if self.session is not None:
            handshake = transport.close_handshake
            if handshake is not None and handshake.sent is not None and handshake.recv is None:
                # a close frame nobody asked for and the session did not send (it would be
                # CLOSED, see on_client_failed): picows' frame parser refused a client frame
                self.session.on_client_failed(handshake.sent.code, handshake.sent.reason)
            self.session.on_client_closed()
        if self.slot is not None:
            self.slot.release()

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.on_client_paused()

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.on_client_resumed()
            if self._pong is not None and self.session.client is not None:
                self.session.client.send_pong(self._pong)
                self._pong = None


def _ignore(_payload) -> None:
    pass


class GatewayServer:
    """A node's listening socket. `await start()` returns the bound port.

    Admission, in order: path; draining (503); Origin allow-list (403); client auth (401); session
    limits (503 global / 429 per key or per IP) — all answered at the HTTP upgrade, before any
    upstream is opened. A periodic sweep flushes per-session traffic into the metrics and enforces
    the idle timeout, the client pings and the maximum session duration.
    """

    def __init__(self, config: NodeConfig, upstream_url: str | None = None,
                 metrics: GatewayMetrics | None = None, shared_dir: str | None = None) -> None:
        self.config = config
        keep_secret(config.api_key)  # whatever an upstream says about it, it is not repeated
        self.upstream_url = upstream_url or config.upstream_url
        if not self.upstream_url:
            raise ValueError("GatewayServer needs an upstream URL")
        self.metrics = metrics or GatewayMetrics()
        self._auth_settings = AuthSettings(
            api_keys_file=config.api_keys_file, api_keys=config.client_api_keys, jwt_secret=config.jwt_secret,
            jwt_audience=config.jwt_audience, jwt_issuer=config.jwt_issuer, jwt_leeway_s=config.jwt_leeway_s,
            jwt_max_sessions_claim=config.jwt_max_sessions_claim,
            max_sessions_per_key=config.max_sessions_per_key or None)
        self.authenticator = ClientAuthenticator.from_settings(self._auth_settings)
        self.origins = OriginPolicy(config.allowed_origins) if config.allowed_origins else None
        # one of several workers: the node's limits are counted across all of them
        limits = (config.max_sessions or None, config.max_sessions_per_ip or None)
        self.limiter = SharedSessionLimiter(os.path.join(shared_dir, SHARED_LIMITS_FILE), *limits) \
            if shared_dir else SessionLimiter(*limits)
        self.sessions: set[RelaySession] = set()
        self.draining = False
        # the event loop runs --overload-lag-ms late or more: /ready 503, upgrades refused
        self.overloaded = False
        self._sweep_due = 0.0  # loop time the next sweep is due: how late it runs is the loop's lag
        self._levels_due = 0.0  # loop time the sessions' levels go to /metrics again: once a second
        self._process_due = 0.0  # loop time the sweep updates the process_* metrics again
        self._late_sweeps = 0  # in a row, --overload-lag-ms late or more
        self.loop_lag_s = 0.0  # how late the latest sweep ran
        self._servers: list[asyncio.Server] = []
        self.reader: DirectReader | None = None
        self.tls: ssl.SSLContext | None = None  # --tls-cert: the listener's, reloaded in place
        self._sweeper: asyncio.TimerHandle | None = None
        self.port: int | None = None
        self._empty = asyncio.Event()
        self._empty.set()

    async def start(self, host: str | None = None, port: int | None = None, reuse_port: bool = False) -> int:
        if urlsplit(self.upstream_url).scheme == "wss":
            client_tls_context()  # made now rather than in the first session's connect (~15 ms)
        if self.config.tls_cert and self.tls is None:
            self.tls = tls.server_context(self.config.tls_cert, self.config.tls_key)
        if self.config.direct_reads == "on":
            self.reader = DirectReader(asyncio.get_running_loop(), self.config.read_batch_ms / 1000.0)
        listening = sockets.listening_sockets(self.config.host if host is None else host,
                                              self.config.port if port is None else port, reuse_port)
        loop = asyncio.get_running_loop()
        for sock in listening:
            self._servers.append(await loop.create_server(
                self._connection_protocol, sock=sock, ssl=self.tls,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S if self.tls else None,
                backlog=sockets.LISTEN_BACKLOG))  # create_server listens again, with 100 unless told
        self.port = listening[0].getsockname()[1]
        self._schedule_sweep()
        return self.port

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.port}/realtime"

    # ---- HTTP routing and admission ------------------------------------------------------------

    def _connection_protocol(self) -> RequestSniffer:
        # picows.ws_create_server's protocol, made as it makes it (picows is pinned exactly), behind
        # the sniffer that answers the probes picows' parser refuses
        websocket = WSProtocol(
            None, None, False, self._route, _PICOWS_LOG, True,
            HANDSHAKE_TIMEOUT_S,  # also ends a connection that never sends its request
            False, 20, 20, WSAutoPingStrategy.PING_WHEN_IDLE,  # no auto pings: the sweep pings clients
            False,  # no auto pongs: ClientListener answers pings, holding them while the client does not read
            self.config.max_message_bytes + _FRAME_SLACK_BYTES, None, CLIENT_READ_BUFFER_INIT_BYTES)
        return RequestSniffer(websocket, self.plain_endpoint, PLAIN_PATHS, self._unreadable_request)

    def _unreadable_request(self) -> None:
        self._refused("other", None)

    def _route(self, request: WSUpgradeRequest):
        try:
            return self._route_request(request)
        except Exception:  # a bug of ours: picows would answer 500 quoting the exception, log nothing
            log.error("routing a request failed: %s", scrub(traceback.format_exc()))
            return self._refused("other", _plain_response((500, b"internal error\n", "text/plain")))

    def _route_request(self, request: WSUpgradeRequest):
        try:
            parts = urlsplit(request.path.decode("latin-1"))
        except ValueError:  # e.g. `//[x/realtime`: an unclosed IPv6 host in the request target
            return self._refused("other", _plain_response((400, b"malformed request target\n", "text/plain")))
        path = parts.path
        if path == "/realtime":
            version = request.headers.get("Sec-WebSocket-Version")
            if version is not None and version.strip() != "13":
                # RFC 6455 §4.2.2: a version the server does not speak is refused with the one it does
                return WSUpgradeResponseWithListener(WSUpgradeResponse.create_error_response(
                    426, b"WebSocket version 13 only", extra_headers={"Sec-WebSocket-Version": "13"}), None)
            _upgrade_alone(request.headers)
            try:  # picows' own check, which follows admission: a refusal counted and logged as any
                _validate_upgrade_request(request)
            except RuntimeError as exc:
                return self._refused("other", _plain_response((400, str(exc).encode(), "text/plain")))
            return self._admit_upgrade(request, parts.query)
        return _plain_response(self.plain_endpoint(path, request.headers.get("Accept")))

    def plain_endpoint(self, path: str, accept: str | None) -> tuple[int, bytes, str]:  # serves PLAIN_PATHS
        """A GET of a plain HTTP endpoint: status, body, content type. picows' handshake and the
        sniffer (HEAD, HTTP/1.0) both answer from here."""
        if path == "/health":
            return _json(200, {"status": "ok", "sessions": len(self.sessions), "pid": os.getpid(),
                               "draining": self.draining, "overloaded": self.overloaded,
                               "fastpath": FASTPATH})
        if path == "/ready":
            ready = not (self.draining or self.overloaded)
            return _json(200 if ready else 503, {"ready": ready, "draining": self.draining,
                                                 "overloaded": self.overloaded})
        if path == "/metrics":
            self._observe_reader()
            self.metrics.observe_process()
            body, content_type = self.metrics.render(accept)
            return 200, body, content_type
        if path == "/realtime":  # reached only by a request picows' parser would refuse
            return _json(400, {"error": "/realtime is a WebSocket endpoint: open it with an HTTP/1.1 GET upgrade"})
        return _json(404, {"error": "not found"})

    def _refused(self, reason: str, response, principal: str | None = None):
        """Count and log a refused upgrade: the reason, and for a limit the key or token subject
        (and address) it counted against, for auth what was wrong (never the credentials it
        carried)."""
        self.metrics.count_refusal(reason)
        if principal is None:
            log.info("upgrade refused: %s", reason)
        else:
            log.info("upgrade refused: %s (%s)", reason, principal)
        return response

    def _admit_upgrade(self, request: WSUpgradeRequest, query: str):
        if self.draining:
            return self._refused("draining", Refusal(
                503, "Draining", "the gateway is shutting down; connect to another node",
                (("Retry-After", "1"),)).to_response())
        if self.overloaded:
            return self._refused("overloaded", Refusal(
                503, "Overloaded", "the gateway is overloaded (it cannot keep up with its sessions); retry "
                "later or connect to another node", (("Retry-After", "1"),)).to_response())
        if self.origins is not None and not self.origins.check(request):
            return self._refused("origin", OriginPolicy.refusal.to_response())
        principal = self.authenticator.authenticate(request)
        if isinstance(principal, AuthRefusal):  # its reason is a fixed text, never the credential
            return self._refused("auth", principal.to_response(), principal.reason)
        refusal = self.limiter.check(principal.limit_key, None, key_limit=principal.max_sessions)
        if refusal is not None:  # per-IP is checked at connect, where the address is known
            return self._refused(refusal.scope, refusal.to_response(), principal.limit_key)
        models = parse_qs(query).get("model")
        if models and not is_model_name(models[0]):
            return self._refused("other", _plain_response(_json(400, {"error": "invalid model name in ?model="})))
        listener = ClientListener(self, principal, models[0] if models else None)
        if principal.subprotocol:  # browsers: echo the non-secret protocol name, never the token
            return WSUpgradeResponseWithListener(WSUpgradeResponse.create_101_response(
                extra_headers={"Sec-WebSocket-Protocol": principal.subprotocol}), listener)
        return listener

    def _admit(self, listener: ClientListener, transport: WSTransport) -> None:
        """The WebSocket is open: take a limiter slot, create and start the session."""
        principal = listener.principal
        ip = client_ip(peer_ip(transport), transport.request.headers, self.config.trusted_proxies)
        slot = self.limiter.acquire(principal.limit_key, limit_address(ip), key_limit=principal.max_sessions)
        if isinstance(slot, LimitRefusal):  # lost a race since the upgrade, or per-IP
            self._refused(slot.scope, None, f"{principal.limit_key} from {ip}")
            error = Overloaded(slot.reason)
            self.metrics.count_error(error.code)
            transport.send(WSMsgType.TEXT, error_event(error))
            transport.send_close(WSCloseCode(error.close_code), error.close_reason.encode())
            transport.disconnect()
            return
        listener.slot = slot
        release_handshake(transport)  # admitted: its upgrade request is not needed any more
        session = RelaySession(self.config, self.upstream_url, listener.model, on_closed=self._forget,
                               metrics=self.metrics)
        listener.session = session
        listener._on_audio = session.on_client_audio
        listener.path = session.path
        session.path.reader = self.reader
        self.sessions.add(session)
        self._empty.clear()
        session.attach(transport, listener, principal.limit_key, ip)

    def _forget(self, session: RelaySession) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self._empty.set()

    def reload(self) -> None:
        """SIGHUP: the client keys file, the TLS certificate and the CAs a wss:// upstream is
        verified with, each on its own."""
        self.reload_keys()
        self.reload_tls()
        self.reload_upstream_trust()

    def reload_upstream_trust(self) -> None:
        if urlsplit(self.upstream_url).scheme != "wss":
            return
        try:
            held = reload_client_trust()
        except TrustStoreError as exc:
            log.error("upstream trust store not reloaded: %s", exc)
            return
        log.info("reloaded the upstream trust store: %s", held)

    def reload_tls(self) -> None:
        """Put --tls-cert / --tls-key in service again (a renewed certificate): new connections
        get it, live ones keep theirs. A pair that cannot be used keeps the one in service."""
        if self.tls is None:
            return
        try:
            tls.reload(self.tls, self.config.tls_cert, self.config.tls_key)
        except tls.TLSFilesError as exc:
            log.error("TLS certificate not reloaded, keeping the one in service: %s", exc)
            return
        log.info("reloaded the TLS certificate from %s", self.config.tls_cert)

    def reload_keys(self) -> None:
        """SIGHUP: read --api-keys-file again; new upgrades are admitted with its keys, sessions
        already admitted go on. A file that cannot be used (unreadable, empty, a bad entry) keeps
        the keys in use; either way one log line says what happened (never quoting a key)."""
        if not self.config.api_keys_file:
            log.info("SIGHUP: no --api-keys-file to reload; client keys unchanged")
            return
        try:
            authenticator = ClientAuthenticator.from_settings(self._auth_settings)
        except ConfigError as exc:  # its message names the file and line, never the key
            log.error("client keys not reloaded, keeping the %d in use: %s", self.authenticator.key_count, exc)
            return
        self.authenticator = authenticator  # one assignment: an upgrade sees the old or the new keys
        log.info("reloaded %d client keys", authenticator.key_count)

    # ---- the sweep: metrics flush, idle timeout, client pings, maximum duration --------------

    def _sweep_interval(self) -> float:
        limits = [SWEEP_INTERVAL_S]
        if self.config.idle_timeout_s:
            limits.append(self.config.idle_timeout_s / 4)
        if self.config.max_session_s:
            limits.append(self.config.max_session_s / 8)
        if self.config.client_ping_interval_s:
            limits.append(min(self.config.client_ping_interval_s, self.config.client_ping_timeout_s) / 4)
        return max(0.05, min(limits))

    def _schedule_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self._sweep_interval()
        self._sweep_due = loop.time() + interval
        self._sweeper = loop.call_later(interval, self._sweep)

    def _observe_lag(self, now: float) -> None:
        """How late this sweep runs is how far behind the event loop is: every frame of every
        session waits that long. Two sweeps in a row --overload-lag-ms late or more (one can be
        a single long task: a 10 MiB message, a collection) and the node says it is full
        (/ready 503, upgrades 503 Overloaded) until a sweep runs on time again; admitted
        sessions go on."""
        lag = self.loop_lag_s = max(0.0, now - self._sweep_due)
        self.metrics.loop_lag.set(lag)
        limit_ms = self.config.overload_lag_ms
        self._late_sweeps = self._late_sweeps + 1 if limit_ms and lag * 1000.0 >= limit_ms else 0
        overloaded = self._late_sweeps >= OVERLOAD_SWEEPS
        if overloaded != self.overloaded:
            self.overloaded = overloaded
            if overloaded:
                log.warning("overloaded: the event loop runs %.0f ms late with %d sessions; refusing new "
                            "sessions until it catches up", lag * 1000.0, len(self.sessions))
            else:
                log.warning("no longer overloaded (%d sessions): admitting new sessions", len(self.sessions))

    def _observe_reader(self) -> None:
        if self.reader is not None:
            self.metrics.observe_reader(self.reader.frames, self.reader.attached)

    def _sweep(self) -> None:
        now = asyncio.get_running_loop().time()
        config = self.config
        self._observe_lag(now)
        self._observe_reader()
        # short timeouts sweep more often, but a level is a second's reading whatever they are
        # (half a sweep early is on time: the loop's timers may fire a hair before they are due)
        levels = now >= self._levels_due
        if levels:
            self._levels_due = now + SWEEP_INTERVAL_S - self._sweep_interval() / 2
        if now >= self._process_due:  # a worker's figures, between scrapes served by another worker
            self._process_due = now + PROCESS_SWEEP_S
            self.metrics.observe_process()
        for session in list(self.sessions):
            stats = session.stats
            self.metrics.flush(stats)
            if levels:
                session.observe_levels()
            session.check_client_reading()
            session.check_user_turn()
            session.release_read_buffers()
            activity = (stats.c2u_audio_frames + stats.c2u_json_frames + stats.u2c_audio_frames
                        + stats.u2c_json_frames)
            if activity != session.activity_seen or session.waiting_on_upstream:
                session.activity_seen = activity
                session.active_at = now
            elif config.idle_timeout_s and now - session.active_at >= config.idle_timeout_s:
                session.fail(IdleTimeout(f"no traffic in either direction for {config.idle_timeout_s:g} s"))
                continue
            if config.client_ping_interval_s:
                session.check_client_alive(now, config.client_ping_interval_s, config.client_ping_timeout_s)
            if config.max_session_s:
                age = now - session.started_at
                if age >= config.max_session_s:
                    session.fail(SessionExpired(f"the session reached this gateway's maximum duration "
                                                f"of {config.max_session_s:g} s"), outcome="max_duration")
                elif age >= config.max_session_s - config.session_warning_s and not session.warned:
                    session.warned = True
                    session.notify_closing("max_duration", config.max_session_s - age)
        self._schedule_sweep()

    # ---- shutdown ------------------------------------------------------------------------------

    async def wait_empty(self, timeout: float) -> None:
        """Wait until no session is registered (tests prove nothing stays open)."""
        await asyncio.wait_for(self._empty.wait(), timeout)

    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop admitting (`/ready` answers 503, upgrades get 503), tell every client `closing`,
        let sessions finish for up to `timeout_s` (default --drain-timeout-s), then close the
        rest with 1001. Returns as soon as the last session has ended."""
        timeout_s = self.config.drain_timeout_s if timeout_s is None else timeout_s
        self.draining = True
        log.info("draining: %d session(s), up to %g s", len(self.sessions), timeout_s)
        for session in list(self.sessions):
            session.notify_closing("draining", timeout_s)
        try:
            await asyncio.wait_for(self._empty.wait(), timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            for session in list(self.sessions):
                session.close(CLOSE_GOING_AWAY, "gateway shutting down", "drained")

    async def stop(self) -> None:
        """Stop listening, close every session (1001 going away), wait for them to finish."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for server in self._servers:
            server.close()
        for session in list(self.sessions):
            session.close(CLOSE_GOING_AWAY, "gateway shutting down", "drained")
        for server in self._servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 2.0)
            except (asyncio.TimeoutError, TimeoutError):
                pass
        self._servers = []
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    async def __aenter__(self) -> "GatewayServer":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


def _json(status: int, body: dict) -> tuple[int, bytes, str]:
    return status, orjson.dumps(body), "application/json"


def _upgrade_alone(headers) -> None:
    """RFC 6455 §4.2.1 asks that `Connection` *include* the `Upgrade` token, and browsers send
    more than it (Firefox: `keep-alive, Upgrade`); picows takes the header's value whole and
    refuses anything but `upgrade` alone. A request naming the token gets it alone."""
    if any(token.strip().lower() == "upgrade" for value in headers.getall("Connection", ())
           for token in value.split(",")):
        headers["Connection"] = "upgrade"


def _plain_response(answer: tuple[int, bytes, str]) -> WSUpgradeResponseWithListener:
    status, body, content_type = answer
    headers = {"Content-Type": content_type}
    if status < 400:
        return WSUpgradeResponseWithListener(WSUpgradeResponse.create_ok_response(body, extra_headers=headers), None)
    return WSUpgradeResponseWithListener(WSUpgradeResponse.create_error_response(status, body, extra_headers=headers), None)


__all__ = ["GatewayServer", "ClientListener", "WSCloseCode"]
