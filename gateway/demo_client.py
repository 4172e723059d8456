"""The `client` command: a demo voice client for `/realtime`.

    realtime-gateway client --url ws://127.0.0.1:3001/realtime --wav in.wav --out reply.wav

Connects, sends `config`, waits for `ready`, streams the WAV in real time in 20 ms frames
(converted to 24 kHz mono PCM16 if needed; with server VAD a second of silence follows so the last
turn ends), prints transcripts and events, writes the reply audio to `--out`, and exits once the
whole file is sent and every reply is done (with server VAD: one per utterance the VAD detected)
— or `--timeout` seconds after the audio is sent, or without `ready` (exit code 1). `--demo-tone`
sends a generated tone instead of a WAV; `--text` sends a text turn; `--token` authenticates to a
node with client auth.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import mmap
import os
import ssl
import struct
import sys
import urllib.parse
import wave

import numpy as np
import orjson
import uvloop
from picows import WSCloseCode, WSError, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from _fastpath import G711_TO_PCM16

RATE = 24000
FRAME_MS = 20
FRAME_BYTES = RATE * 2 * FRAME_MS // 1000  # 960 bytes of PCM16 per 20 ms
_SPOKEN = object()  # queued by the streamer once the whole audio is sent
PUSH_TO_TALK_MIN_BYTES = RATE * 2 // 10  # the upstream commits no turn under 100 ms


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="ws://127.0.0.1:3001/realtime", help="gateway /realtime URL")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--wav", help="WAV file to speak (any rate/channels; integer PCM, float, µ-law or A-law; "
                                      "converted to 24 kHz mono PCM16)")
    source.add_argument("--demo-tone", action="store_true", help="speak a generated 1 s 440 Hz tone instead of a WAV")
    parser.add_argument("--text", help="also send this text as a user message (gets its own reply)")
    parser.add_argument("--out", default="reply.wav", help="where to write the reply audio (24 kHz mono WAV)")
    parser.add_argument("--turn-detection", choices=("server_vad", "semantic_vad", "none"), default="server_vad",
                        help="none = push-to-talk: the client commits and asks for the response itself")
    parser.add_argument("--voice", default=None, help="voice to ask for (default: the gateway's)")
    parser.add_argument("--token", default=os.environ.get("GATEWAY_CLIENT_TOKEN"),
                        help="client token (key or JWT) for a node with client auth, sent as "
                             "Authorization: Bearer (default: $GATEWAY_CLIENT_TOKEN)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="give up this many seconds after the audio is sent (it streams in real time), "
                             "or on `ready` if it takes this long")


class WavError(ValueError):
    """A file the demo client cannot speak: not a WAV, or an encoding it does not convert."""


_WAVE_PCM, _WAVE_FLOAT, _WAVE_ALAW, _WAVE_MULAW, _WAVE_EXTENSIBLE = 0x0001, 0x0003, 0x0006, 0x0007, 0xFFFE
#: the linear value of each G.711 code, as the node's meter reads them (telephony recordings)
_G711 = {_WAVE_ALAW: np.array(G711_TO_PCM16["g711_alaw"], dtype=np.float64),
         _WAVE_MULAW: np.array(G711_TO_PCM16["g711_ulaw"], dtype=np.float64)}
#: frames converted at a time: the conversion's memory is a block's, whatever the file's length
#: (a whole 30-minute 48 kHz stereo file as float64 samples would be ~2.8 GB)
_BLOCK_FRAMES = 1 << 16


def read_wav(path: str) -> tuple[int, int, int, int, memoryview]:
    """(encoding, channels, bytes per sample, rate, sample bytes) of a RIFF/WAVE file; encoding is
    `_WAVE_PCM`, `_WAVE_FLOAT`, `_WAVE_ALAW` or `_WAVE_MULAW`. The stdlib `wave` module reads
    integer PCM only: float WAVs (what many recorders and editors write), G.711 and
    WAVE_FORMAT_EXTENSIBLE ones are read here. The samples are a view of the file mapped, not read."""
    with open(path, "rb") as file:
        try:
            data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # an empty file, or one that cannot be mapped (a pipe)
            data = file.read()
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise WavError("not a WAV file (no RIFF/WAVE header)")
    fmt = samples = None
    offset = 12
    while offset + 8 <= len(data):
        chunk, size = data[offset:offset + 4], int.from_bytes(data[offset + 4:offset + 8], "little")
        if chunk == b"fmt ":
            fmt = data[offset + 8:offset + 8 + size]
        elif chunk == b"data" and samples is None:
            # a streamed WAV's size field may overshoot
            samples = memoryview(data)[offset + 8:offset + 8 + size]
        offset += 8 + size + (size & 1)  # chunks are padded to an even length
    if fmt is None or len(fmt) < 16 or samples is None:
        raise WavError("not a WAV file (no fmt or data chunk)")
    encoding, channels, rate, _, block_align, _ = struct.unpack_from("<HHIIHH", fmt)
    width = block_align // channels if channels else 0  # the container: 20-bit samples fill 3 bytes
    if encoding == _WAVE_EXTENSIBLE and len(fmt) >= 26:
        encoding = int.from_bytes(fmt[24:26], "little")  # the sub-format GUID starts with the format tag
    supported = {_WAVE_PCM: (1, 2, 3, 4), _WAVE_FLOAT: (4, 8), _WAVE_ALAW: (1,), _WAVE_MULAW: (1,)}
    if width not in supported.get(encoding, ()):
        raise WavError(f"unsupported WAV encoding (format tag {encoding}, {width * 8}-bit): the client "
                       "reads 8/16/24/32-bit integer PCM, 32/64-bit float and 8-bit A-law and µ-law")
    if not rate:
        raise WavError("invalid WAV header (0 Hz)")
    frame = channels * width
    return encoding, channels, width, rate, samples[:len(samples) // frame * frame]


def _decode(encoding: int, width: int, raw) -> np.ndarray:
    """Samples of `raw` (bytes-like) as float64 on PCM16's scale."""
    if encoding == _WAVE_FLOAT:  # full scale is ±1.0
        return np.nan_to_num(np.frombuffer(raw, dtype=f"<f{width}").astype(np.float64)) * 32768.0
    if encoding in _G711:
        return _G711[encoding][np.frombuffer(raw, dtype=np.uint8)]
    if width == 1:
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0) * 256.0
    if width == 2:
        return np.frombuffer(raw, dtype="<i2").astype(np.float64)
    if width == 3:
        bytes3 = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        ints = (bytes3[:, 0].astype(np.int32) | (bytes3[:, 1].astype(np.int32) << 8)
                | (bytes3[:, 2].astype(np.int32) << 16))
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        return ints.astype(np.float64) / 256.0
    return np.frombuffer(raw, dtype="<i4").astype(np.float64) / 65536.0


def load_wav_pcm16(path: str) -> bytes | bytearray:
    """Read a WAV and return 24 kHz mono PCM16 LE bytes (mixing channels, resampling linearly).
    WavError for a file it cannot convert; OSError when the file cannot be read. The file is
    converted a block at a time: memory beyond the result stays a block's."""
    encoding, channels, width, rate, raw = read_wav(path)
    if encoding == _WAVE_PCM and width == 2 and channels == 1 and rate == RATE:
        return bytes(raw)  # already the wire format: bit-exact
    frame = channels * width
    frames = len(raw) // frame

    def mono(first: int, stop: int) -> np.ndarray:
        """Frames [first, stop) as float64 samples, channels mixed."""
        samples = _decode(encoding, width, raw[first * frame:stop * frame])
        return samples.reshape(-1, channels).mean(axis=1) if channels > 1 else samples

    pcm = bytearray()
    if rate == RATE:
        for first in range(0, frames, _BLOCK_FRAMES):
            pcm += _pcm16(mono(first, min(frames, first + _BLOCK_FRAMES)))
    elif frames:
        count = int(round(frames * RATE / rate))
        for start in range(0, count, _BLOCK_FRAMES):
            # each output sample interpolates between the two input frames around its position
            positions = np.arange(start, min(count, start + _BLOCK_FRAMES)) * (rate / RATE)
            first = min(int(positions[0]), frames - 1)
            stop = min(frames, int(positions[-1]) + 2)
            pcm += _pcm16(np.interp(positions, np.arange(first, stop), mono(first, stop)))
    return pcm


def _pcm16(samples: np.ndarray) -> bytes:
    return np.clip(np.round(samples), -32768, 32767).astype("<i2").tobytes()


def demo_tone() -> bytes:
    """0.3 s silence, 1 s of 440 Hz at -12 dBFS."""
    t = np.arange(RATE) / RATE
    tone = (0.25 * 32767 * np.sin(2 * np.pi * 440 * t)).astype("<i2")
    return np.zeros(int(0.3 * RATE), dtype="<i2").tobytes() + tone.tobytes()


class OutputFailed(Exception):
    """The reply could not be written to --out (the message says why)."""


def write_wav(path: str, pcm: bytes) -> None:
    # the file is opened here, not by `wave`: a Wave_write whose open failed complains again,
    # in a traceback of its own, when it is collected
    try:
        with open(path, "wb") as handle, wave.open(handle, "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(RATE)
            wav.writeframes(pcm)
    except OSError as exc:  # a write error names no file: this one does
        raise OutputFailed(f"cannot write --out {path}: {exc.strerror or exc}") from None


class ConnectFailed(Exception):
    """The gateway could not be reached: refused, unknown host, handshake refused, or timed out.
    The message names the URL, its `token` query value (a client token) masked."""

    def __init__(self, url: str, cause: BaseException, token: str | None = None) -> None:
        parts = urllib.parse.urlsplit(url)
        pieces = parts.query.split("&") if parts.query else []
        # each query piece, and its value when it is a token (a client token: masked)
        secrets = [piece.partition("=")[2] if urllib.parse.unquote_plus(piece.partition("=")[0]) == "token"
                   else None for piece in pieces]
        raw = [value for value in secrets if value]
        tokens = raw + [urllib.parse.unquote_plus(value) for value in raw] + ([token] if token else [])
        # the URL as given, each token value masked (rebuilt: a value's raw spelling may differ
        # from any re-encoding of it)
        shown = urllib.parse.urlunsplit(parts._replace(query="&".join(
            piece if secret is None else piece.partition("=")[0] + "=***" for piece, secret in zip(pieces, secrets))))
        status = getattr(getattr(cause, "response", None), "status", None)
        if isinstance(cause, TimeoutError):
            reason = "timed out"
        elif status == 401:
            reason = ("the node refused the client token (HTTP 401)" if tokens
                      else "the node wants a client token: give --token (or $GATEWAY_CLIENT_TOKEN)")
        elif parts.scheme == "wss" and isinstance(cause, (ssl.SSLError, ConnectionResetError)):
            reason = "the TLS handshake failed (a node started without --tls-cert serves ws://, not wss://)"
        elif isinstance(cause, OSError) and cause.errno:  # "Connection refused", not uvloop's
            # "Connect call failed (...)"; a resolver error (negative errno) has its own text
            reason = os.strerror(cause.errno) if cause.errno > 0 else cause.strerror
        else:
            reason = str(cause) or type(cause).__name__
        for secret in filter(None, tokens):  # a library's message may quote the request
            reason = reason.replace(secret, "***").replace(urllib.parse.quote(secret, safe=""), "***")
        super().__init__(f"cannot connect to {shown}: {reason}")


class _Listener(WSListener):
    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.close_info: tuple[int, str] | None = None

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.TEXT:
            self.queue.put_nowait(orjson.loads(frame.get_payload_as_bytes()))
        elif frame.msg_type is WSMsgType.BINARY:
            self.queue.put_nowait(frame.get_payload_as_bytes())
        elif frame.msg_type is WSMsgType.CLOSE:
            self.close_info = (int(frame.get_close_code().value), frame.get_close_reason())
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.queue.put_nowait(None)


async def converse(url: str, audio: bytes | bytearray | None, text: str | None, out: str, turn_detection: str,
                   voice: str | None, timeout: float, echo=print, token: str | None = None,
                   written: list[str] | None = None) -> int:
    """Run one demo conversation. Returns the exit code: 0 when every reply finished and the
    gateway reported no error, else 1.

    Push-to-talk: one reply for the audio. Server VAD: one reply per turn the VAD detects (a
    recording may hold several utterances), so the client streams the whole file and leaves once
    it is sent, every detected turn's reply is done and no reply is running. `--text` is sent when
    the audio's replies are done (one reply at a time). ConnectFailed when `url` cannot be reached.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        # uvloop's transports, as the node's: aiofastnet's TLS one fails to log its own handshake
        # errors (a 40-line "Logging error" for a wss:// URL to a ws:// node)
        transport, listener = await asyncio.wait_for(
            ws_connect(_Listener, url, extra_headers=headers, use_aiofastnet=False), timeout)
    except (OSError, WSError, TimeoutError) as exc:
        raise ConnectFailed(url, exc, token) from None
    reply = bytearray()
    vad = audio is not None and turn_detection != "none"
    ready = streaming = text_sent = False
    turns_started = turns_stopped = started = done = errors = 0
    config: dict = {"type": "config", "turn_detection": turn_detection}
    if voice:
        config["voice"] = voice
    transport.send(WSMsgType.TEXT, orjson.dumps(config))
    streamer: asyncio.Task | None = None
    # the audio streams in real time (plus a second of silence under VAD) once `ready` comes:
    # `timeout` bounds the wait for `ready`, then the wait once the audio is sent
    speaking_s = len(audio or b"") / (RATE * 2) + (1.0 if vad else 0.0)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout) as deadline:
            while True:
                message = await listener.queue.get()
                if message is None:
                    code = listener.close_info
                    echo(f"connection closed {code or ''}".strip())
                    return 1
                if message is _SPOKEN:
                    streaming = False
                elif isinstance(message, bytes):
                    reply += message
                    continue
                else:
                    kind = message.get("type")
                    if kind == "ready":
                        ready = True
                        deadline.reschedule(loop.time() + speaking_s + timeout)
                        echo(f"ready: session {message.get('session_id')} model={message.get('model')} "
                             f"voice={message.get('voice')} turn_detection={message.get('turn_detection')}")
                        if audio:
                            streaming = True
                            streamer = asyncio.create_task(_speak(transport, audio, turn_detection, listener.queue))
                    elif kind == "transcript":
                        if message.get("is_final"):
                            echo(f"[{message.get('role')}] {message.get('text')}")
                    elif kind == "response_done":
                        done += 1
                        echo(f"response done: {message.get('response_id')} ({message.get('status')})")
                    elif kind == "error":
                        echo(f"error {message.get('code')}: {message.get('message')}")
                        if message.get("fatal"):
                            return 1
                        errors += 1  # the session goes on, but something asked for was not done
                    else:
                        if kind == "speech_started":
                            turns_started += 1
                        elif kind == "speech_stopped":
                            turns_stopped += 1
                        elif kind == "response_started":
                            started += 1
                        echo(f"event: {kind} " + " ".join(f"{k}={v}" for k, v in message.items() if k != "type"))
                if not ready or streaming or started > done or turns_started > turns_stopped:
                    continue  # still speaking, a reply is running, or a turn has not ended yet
                # every reply asked for so far: one per VAD turn (or the push-to-talk turn), and the text's
                asked = (turns_stopped if vad else 1 if audio else 0) + (1 if text_sent else 0)
                if done < asked:
                    continue
                if text and not text_sent:  # the audio's replies are done: now the text turn
                    _send_text(transport, text)
                    text_sent = True
                    continue
                break
    except TimeoutError:
        echo(f"timed out {timeout:g} s after the audio was sent (--timeout)" if ready
             else f"timed out after {timeout:g} s waiting for ready (--timeout)")
        return 1
    finally:
        if streamer is not None:
            streamer.cancel()
        transport.send_close(WSCloseCode.OK)  # the session ends normally, whatever the file does
        transport.disconnect()
        write_wav(out, bytes(reply))
        if written is not None:
            written.append(out)
    echo(f"wrote {len(reply)} bytes ({len(reply) / (RATE * 2):.2f} s) of reply audio to {out}")
    if vad and turns_stopped == 0:
        echo("no speech detected in the audio (server VAD): nothing was answered")
        return 1
    if errors:  # a refused --voice, say: the conversation ran, but not as asked
        echo(f"the gateway reported {errors} error{'s' if errors > 1 else ''} (above)")
        return 1
    return 0


def _send_text(transport: WSTransport, text: str) -> None:
    transport.send(WSMsgType.TEXT, orjson.dumps({"type": "text", "text": text}))


async def _speak(transport: WSTransport, audio: bytes | bytearray, turn_detection: str, queue: asyncio.Queue) -> None:
    """Stream the audio in real time (20 ms frames), end the turn, then queue `_SPOKEN`."""
    loop = asyncio.get_running_loop()
    if audio:
        # a second of silence after it so server VAD ends the turn (sent as zeros, not appended:
        # that would copy a long recording whole)
        total = len(audio) + (RATE * 2 if turn_detection != "none" else 0)
        start = loop.time()
        for index, offset in enumerate(range(0, total, FRAME_BYTES)):
            frame = audio[offset:offset + FRAME_BYTES]
            silence = min(FRAME_BYTES, total - offset) - len(frame)
            transport.send(WSMsgType.BINARY, frame + bytes(silence) if silence else frame)
            # pace against the clock, not by accumulating sleeps, so the stream stays real time
            delay = start + (index + 1) * FRAME_MS / 1000 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        if turn_detection == "none":
            transport.send(WSMsgType.TEXT, b'{"type":"commit"}')
            transport.send(WSMsgType.TEXT, b'{"type":"create_response"}')
    queue.put_nowait(_SPOKEN)


def run(args: argparse.Namespace) -> int:
    if not 0.0 < args.timeout < math.inf:  # also nan
        return _usage_error(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    if "@" in urllib.parse.urlsplit(args.url).netloc:  # not quoted: it may hold a secret
        return _usage_error("--url names a user (user:password@host), which a node does not read: "
                            "give a client token with --token")
    if args.wav:
        try:
            audio = load_wav_pcm16(args.wav)
        except OSError as exc:
            return _usage_error(f"cannot read --wav {args.wav}: {exc.strerror or exc}")
        except WavError as exc:
            return _usage_error(f"cannot use --wav {args.wav}: {exc}")
    elif args.demo_tone:
        audio = demo_tone()
    else:
        audio = None
    if audio is None and not args.text:
        return _usage_error("give --wav, --demo-tone or --text")
    if audio is not None and args.turn_detection == "none" and len(audio) < PUSH_TO_TALK_MIN_BYTES:
        # the upstream refuses to commit less, and the reply asked for would answer nothing
        return _usage_error(f"a push-to-talk turn needs at least 100 ms of audio; --wav {args.wav} has "
                            f"{len(audio) // (RATE * 2 // 1000)} ms")
    unwritable = _cannot_write(args.out)
    if unwritable:  # found now, not after the whole conversation
        return _usage_error(f"cannot write --out {args.out}: {unwritable}")
    if args.wav and os.path.exists(args.out) and os.path.samefile(args.out, args.wav):  # a link too
        return _usage_error(f"--out {args.out} is the --wav file: the reply would overwrite it")
    written: list[str] = []
    try:
        return uvloop.run(converse(args.url, audio, args.text, args.out, args.turn_detection, args.voice,
                                   args.timeout, echo=lambda line: print(line, flush=True), token=args.token,
                                   written=written))
    except (ConnectFailed, OutputFailed) as exc:  # OutputFailed: --out failed after all (a full disk)
        return _usage_error(str(exc))
    except KeyboardInterrupt:  # Ctrl-C: once connected, the reply so far is written (`converse`'s finally)
        print("realtime-gateway client: interrupted" + (f"; the reply so far is in {args.out}" if written else ""),
              file=sys.stderr)
        return 130


def _cannot_write(path: str) -> str | None:
    """Why the reply cannot be written to `path`, or None (it is not created or changed here)."""
    if not path:
        return "an empty path"
    path = os.path.realpath(path)  # a symbolic link is written through: its target's folder counts
    if os.path.isdir(path):
        return "it is a directory"
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        return f"no such directory {folder}"
    if not os.access(path if os.path.exists(path) else folder, os.W_OK):
        return "permission denied"
    return None


def _usage_error(message: str) -> int:
    """One line on stderr, exit code 2: what a newcomer's mistake gets instead of a traceback."""
    print(f"realtime-gateway client: {message}", file=sys.stderr)
    return 2
