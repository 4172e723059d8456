"""The Locust load test (loadtest/): its building blocks, and a short real run against a node.

The headless run starts `python -m gateway --upstream mock` as a subprocess (as
`python -m loadtest.node` does) and runs `locust -f loadtest/` with 20 users for 15 s; it must
finish with zero failures and report every custom metric. Locust and the gevent-based session
run in subprocesses only: importing locust monkey-patches the process, which must not happen to
the pytest process (the rest of the suite runs on uvloop).
"""
from __future__ import annotations

import csv
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import gevent
import numpy as np
import pytest

from loadtest._audio import BYTES_PER_MS, MAX_INNER_PAUSE_MS, SAMPLE_RATE, generated_clip, load_clips
from loadtest._options import LoadSettings, endpoint_url
from loadtest import _session
from loadtest._session import Microphone, SentAudio, SessionClosed
from loadtest import node as loadtest_node
from loadtest.node import MockNode

REPO = Path(__file__).resolve().parent.parent

# Every custom metric a healthy mixed run must report, as (request_type, name) rows.
EXPECTED_METRICS = {
    ("WS", "connect → ready"),
    ("VOICE", "first audio after speech_stopped"),
    ("VOICE", "audio round trip"),
    ("VOICE", "audio round trip (push-to-talk)"),
    ("VOICE", "reply completeness"),
    ("VOICE", "reply completeness (interrupted)"),
    ("VOICE", "interrupted reaction"),
    ("VOICE", "mic lateness"),
    ("TEXT", "text round trip"),
    ("TEXT", "reply completeness"),
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A gateway node with the built-in mock upstream, in a subprocess, on a free port."""
    log_path = tmp_path_factory.mktemp("node") / "node.log"
    with open(log_path, "w") as log:
        mock_node = MockNode(free_port(), "127.0.0.1", ["--log-level", "WARNING"], log=log)
        try:
            mock_node.start()
        except RuntimeError as exc:
            pytest.fail(f"{exc}\n{log_path.read_text()[-3000:]}")
        try:
            yield mock_node
        finally:
            mock_node.stop()


# ---- the node it runs against --------------------------------------------------------------------

def test_loadtest_node_refuses_a_port_another_server_holds(node):
    """Another gateway answers /health on the port: `node ready` would send the load there."""
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.node", "--port", str(node.port)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result
    assert result.stdout == "", "no `node ready`"
    assert result.stderr.splitlines() == [
        f"error: port {node.port} on 127.0.0.1 is in use: another server already listens there"
    ]


def test_loadtest_node_prints_a_locust_command_that_runs_in_an_unactivated_venv(monkeypatch):
    """Found by a docs audit: `.venv/bin/python -m loadtest.node` printed a bare `locust`,
    which a shell without the venv activated does not find."""
    beside = os.path.join(os.path.dirname(sys.executable), "locust")
    assert os.path.exists(beside), "the test extra installs locust beside this interpreter"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.chdir(REPO)
    assert loadtest_node.locust_command() == os.path.relpath(beside)
    monkeypatch.setenv("PATH", os.path.dirname(beside) + ":/usr/bin:/bin")
    assert loadtest_node.locust_command() == "locust"


def test_loadtest_node_bad_flags_get_one_error_line_and_exit_code_2():
    """Its own (argparse's usage and error) and the node's (which explains itself in one line)."""
    bad_port = subprocess.run([sys.executable, "-m", "loadtest.node", "--port", "99999"],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad_port.returncode == 2
    assert bad_port.stderr.splitlines()[-1] == (
        "python -m loadtest.node: error: argument --port: must be a port number (1-65535), got '99999'")
    bad_node_flag = subprocess.run(
        [sys.executable, "-m", "loadtest.node", "--port", str(free_port()), "--", "--default-voice", "nova"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert bad_node_flag.returncode == 2
    assert (bad_node_flag.stdout, len(bad_node_flag.stderr.splitlines())) == ("", 1), bad_node_flag.stderr
    assert "--default-voice" in bad_node_flag.stderr and "Traceback" not in bad_node_flag.stderr


def test_a_node_is_up_only_when_its_own_health_answers(node, tmp_path, monkeypatch):
    """Another server takes the port between the check and the node's start: its /health answers
    200 with its own pid, which is neither the node's nor one of its workers'."""
    monkeypatch.setattr(loadtest_node, "port_in_use", lambda host, port: False, raising=False)
    with open(tmp_path / "node.log", "w") as log:
        impostor = MockNode(node.port, "127.0.0.1", ["--log-level", "WARNING"], log=log)
        try:
            with pytest.raises(RuntimeError) as refused:  # PortInUse, which `main` turns into exit code 2
                impostor.start()
        finally:
            impostor.stop()
    assert type(refused.value).__name__ == "PortInUse"
    assert str(refused.value) == (
        f"port {node.port} on 127.0.0.1 is in use: /health there is answered by pid {node.process.pid}, "
        f"not by the node (pid {impostor.process.pid})"
    )
    assert impostor.process.poll() is not None, "the node it started is stopped"


def test_a_node_with_workers_is_up_when_a_worker_answers(tmp_path):
    with open(tmp_path / "node.log", "w") as log, \
            MockNode(free_port(), "127.0.0.1", ["--workers", "2", "--log-level", "WARNING"], log=log) as workers:
        pid = loadtest_node.health_pid(workers.host, workers.port)
        assert pid != workers.process.pid and loadtest_node.parent_pid(pid) == workers.process.pid


# ---- the audio users speak ------------------------------------------------------------------

def _speech_windows(pcm: bytes) -> np.ndarray:
    """Per 10 ms window: is its RMS above -30 dBFS (clearly speech for an energy VAD)?"""
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    window = SAMPLE_RATE // 100
    frames = samples[: len(samples) // window * window].reshape(-1, window)
    rms_dbfs = 20 * np.log10(np.sqrt(np.mean(frames * frames, axis=1)) / 32768 + 1e-12)
    return rms_dbfs > -30.0


def test_generated_clips_are_deterministic_distinct_single_turn_utterances():
    clips = load_clips("generated")
    assert len(clips) == 4 and len(set(clips)) == 4
    assert generated_clip(20240501) == clips[0]  # same seed, same bytes
    for clip in clips:
        assert len(clip) % 2 == 0 and 1500 <= len(clip) / BYTES_PER_MS <= 2500
        speech = _speech_windows(clip)
        assert speech[:3].any() and speech[-3:].any(), "the clip starts and ends with voice"
        assert speech.mean() > 0.5, "mostly voiced"
        # No pause inside the clip reaches the VAD's 500 ms silence window: one clip, one turn.
        longest_pause = pause = 0
        for voiced in speech:
            pause = 0 if voiced else pause + 1
            longest_pause = max(longest_pause, pause)
        assert longest_pause * 10 <= MAX_INNER_PAUSE_MS + 40 < 500
        peak = np.abs(np.frombuffer(clip, dtype="<i2")).max()
        assert 0.2 * 32768 < peak < 32767, "loud enough for VAD, never clipped"


def test_a_wav_clip_must_be_pcm16_mono_24khz(tmp_path):
    import wave

    good, bad = tmp_path / "good.wav", tmp_path / "bad.wav"
    for path, rate in ((good, 24_000), (bad, 16_000)):
        with wave.open(str(path), "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(rate)
            wav.writeframes(generated_clip()[: rate // 5 * 2])
    assert load_clips(str(good)) == (generated_clip()[: 24_000 // 5 * 2],)
    with pytest.raises(ValueError, match="24000 Hz"):
        load_clips(str(bad))


def _write_wav(path: Path, pcm: bytes) -> str:
    import wave

    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(pcm)
    return str(path)


def _tone(ms: int) -> bytes:
    """A -20 dBFS 220 Hz tone: speech to the mock's VAD at threshold 0.5 (bar -45 dBFS)."""
    t = np.arange(ms * SAMPLE_RATE // 1000) / SAMPLE_RATE
    return np.rint(0.1 * 32767 * np.sqrt(2) * np.sin(2 * np.pi * 220 * t)).astype("<i2").tobytes()


def _silence(ms: int) -> bytes:
    return bytes(ms * BYTES_PER_MS)


def test_a_wav_clip_is_one_turn_for_the_vad_with_its_surrounding_silence_cut(tmp_path):
    """The server-VAD scenarios compare every reply with the one turn a clip makes; a WAV whose
    pause ends the turn inside it would fail every turn ("reply audio arrived before the end of
    the speech"), so it is refused at start; silence around the speech only pushes the end of the
    speech away from the end of the clip, where the round trip starts, so it is cut."""
    speech = _tone(300) + _silence(470) + _tone(200)  # the longest pause that may stay
    padded = _write_wav(tmp_path / "padded.wav", _silence(700) + speech + _silence(900))
    assert load_clips(padded) == (speech,)
    split = _write_wav(tmp_path / "split.wav", _tone(200) + _silence(600) + _tone(200))
    with pytest.raises(ValueError, match=r"split.wav: a pause of 600 ms at 0.20 s would end the VAD turn there"):
        load_clips(split)
    # 480 ms is a window short of the VAD's 500 on the clip's own grid, but the microphone may
    # lay the clip on the timeline's 10 ms grid anywhere: the pause may count a window longer.
    edge = _write_wav(tmp_path / "edge.wav", _tone(205) + _silence(480) + _tone(200))
    with pytest.raises(ValueError, match="keep its pauses under 480 ms"):
        load_clips(edge)
    with pytest.raises(ValueError, match=r"quiet.wav: no speech in it: no 10 ms above -45 dBFS"):
        load_clips(_write_wav(tmp_path / "quiet.wav", _silence(1000)))
    with pytest.raises(ValueError, match="speech shorter than 100 ms"):
        load_clips(_write_wav(tmp_path / "short.wav", _silence(500) + _tone(50) + _silence(500)))
    for clip in load_clips("generated"):  # the generated clips are built to pass as they are
        assert load_clips(_write_wav(tmp_path / "generated.wav", clip)) == (clip,)


# ---- options -----------------------------------------------------------------------------------

def test_gateway_url_defaults_from_the_locust_host():
    assert endpoint_url("ws://127.0.0.1:3001") == "ws://127.0.0.1:3001/realtime"
    assert endpoint_url("http://gw.example:3001/") == "ws://gw.example:3001/realtime"
    assert endpoint_url("https://gw.example") == "wss://gw.example/realtime"
    assert endpoint_url("10.0.0.5:3001") == "ws://10.0.0.5:3001/realtime"
    assert endpoint_url("ws://h:1/realtime?model=gpt-realtime") == "ws://h:1/realtime?model=gpt-realtime"
    with pytest.raises(ValueError):
        endpoint_url("ftp://h:1")


def test_settings_from_environment_and_token_placement(monkeypatch):
    monkeypatch.setenv("LOADTEST_TURNS", "7")
    monkeypatch.setenv("LOADTEST_CHUNK_MS", "40")
    monkeypatch.setenv("LOADTEST_TOKEN", "test-key-1")
    settings = LoadSettings.from_options(None, "ws://127.0.0.1:3999")
    assert (settings.turns, settings.chunk_ms, settings.url) == (7, 40, "ws://127.0.0.1:3999/realtime")
    assert settings.connect_headers() == ["Authorization: Bearer test-key-1"]
    assert settings.connect_url() == "ws://127.0.0.1:3999/realtime"
    monkeypatch.setenv("LOADTEST_TOKEN_IN", "query")
    settings = LoadSettings.from_options(None, "ws://127.0.0.1:3999")
    assert settings.connect_headers() == []
    assert settings.connect_url() == "ws://127.0.0.1:3999/realtime?token=test-key-1"
    monkeypatch.setenv("LOADTEST_CHUNK_MS", "2")
    with pytest.raises(ValueError, match="chunk-ms"):
        LoadSettings.from_options(None, None)


def test_bad_options_stop_locust_at_start_with_one_line(tmp_path):
    """Each value that cannot work is refused once, before any user runs (exit 2, no traceback),
    instead of failing every user or looking like gateway failures. Nothing listens on the port:
    a run that got as far as connecting would fail differently."""
    float_wav = tmp_path / "float.wav"  # IEEE float (format 3): the stdlib wave module refuses it
    fmt = struct.pack("<HHIIHH", 3, 1, 24_000, 96_000, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", 4800) + bytes(4800)
    float_wav.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    split_wav = _write_wav(tmp_path / "split.wav", _tone(200) + _silence(600) + _tone(200))
    cases = {
        ("--reply-timeout", "-1"): "--reply-timeout must be a positive number of seconds, got -1.0",
        ("--chunk-ms", "3"): "--chunk-ms must be within 5..1000, got 3",
        ("--clip", str(float_wav)): f"--clip {float_wav}: need a 16-bit mono 24000 Hz PCM WAV, cannot read this one "
                                    "(unknown format: 3)",
        ("--clip", str(tmp_path / "missing.wav")): f"--clip {tmp_path / 'missing.wav'}: No such file or directory",
        ("--clip", split_wav): f"--clip {split_wav}: a pause of 600 ms at 0.20 s would end the VAD turn there "
                               "(500 ms of silence ends a turn): one clip must be one turn; keep its pauses under 480 ms",
        ("--tags", "nonsense"): "no scenario matches the tags; scenario tags are vad, ptt, barge_in, text",
        (): "--turns must be 0 (never reconnect) or more, got -1",  # the environment twin: LOADTEST_TURNS=-1
    }
    host = f"ws://127.0.0.1:{free_port()}"
    runs = {
        args: subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", "loadtest/", "--headless", "-u", "1", "-r", "1", "-t", "5s",
             "--host", host, "--loglevel", "WARNING", *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "LOADTEST_TURNS": "5" if args else "-1"},
        )
        for args in cases
    }
    try:
        for args, expected in cases.items():
            stdout, stderr = runs[args].communicate(timeout=60)
            assert runs[args].returncode == 2, (args, stdout, stderr)
            assert stderr.splitlines() == [f"locust -f loadtest/: error: {expected}"], (args, stderr)
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
                run.wait()


# ---- the client's record of what it sent -----------------------------------------------------

def test_sent_audio_timeline_slices_by_offset_and_forgets_checked_audio():
    sent = SentAudio()
    sent.append(bytes(range(100)))
    sent.append(bytes(range(100, 200)))
    assert sent.slice(90, 110) == bytes(range(90, 110))
    sent.discard_before(150)
    assert (sent.base, sent.end) == (150, 200)
    assert sent.slice(140, 160) is None, "forgotten bytes are reported missing, not invented"
    assert sent.slice(150, 201) is None
    assert sent.slice(160, 170) == bytes(range(160, 170))
    sent.append(bytes(SentAudio.MAX_KEPT_MS * BYTES_PER_MS))
    assert sent.end - sent.base == SentAudio.MAX_KEPT_MS * BYTES_PER_MS, "bounded"


# ---- real-time pacing (time is what is under test here, so these tests use the clock) ---------

def _record_microphone(continuous: bool, chunk_ms: int, stall_at_frame: int | None):
    sends: list[tuple[float, int, bytes]] = []

    def send(frame: bytes) -> None:
        sends.append((time.perf_counter(), len(frame), frame))
        if stall_at_frame is not None and len(sends) == stall_at_frame:
            time.sleep(0.1)  # a blocking stall, as when the load generator is starved of CPU

    mic = Microphone(send, chunk_ms, continuous, on_utterance_done=lambda: None)
    return mic, sends


def test_microphone_paces_in_real_time_and_catches_up_after_a_stall():
    mic, sends = _record_microphone(continuous=False, chunk_ms=20, stall_at_frame=10)
    clip = (bytes(range(256)) * 200)[: BYTES_PER_MS * 1000]  # exactly 1000 ms
    mic.start()
    said_at = time.perf_counter()
    utterance = mic.say(clip)
    assert utterance.done.wait(3.0)
    mic.stop()
    assert b"".join(frame for _, _, frame in sends) == clip, "every byte, in order, nothing extra"
    assert [size for _, size, _ in sends] == [20 * BYTES_PER_MS] * 50
    # A frame leaves once its 20 ms have been "captured": the first at ~20 ms, never at once.
    assert 0.019 <= sends[0][0] - said_at <= 0.045
    # The 100 ms stall after frame 10 is absorbed: later frames follow at once until back on the
    # absolute schedule, so the last frame still goes out at ~1000 ms (the end of the speech), not
    # ~1100 ms, and that is when the utterance says its speech ended.
    assert 0.995 <= sends[-1][0] - said_at <= 1.08
    assert abs(utterance.last_sent_at - sends[-1][0]) < 0.002  # stamped just before the send
    assert sends[10][0] - sends[9][0] >= 0.09
    assert sends[11][0] - sends[10][0] < 0.015, "catching up, no sleep"
    assert 70.0 <= utterance.max_lateness_ms <= 150.0
    late = [(t - said_at) * 1000 - (k + 1) * 20 for k, (t, _, _) in enumerate(sends)]
    assert max(abs(x) for x in late[20:]) < 30.0, "back on schedule after the stall"
    assert min(late) > -1.0, "never ahead of the speech"


def test_speech_queued_while_the_microphone_waits_goes_out_in_the_frame_it_waits_for(monkeypatch):
    """A barge-in user talks `--barge-in-after-ms` into a reply, while the open microphone is
    capturing a frame of silence: the speech starts in that frame (sent when it is captured), not
    a frame later. Each frame leaves when its audio has been captured. Deterministic: the
    microphone runs on a simulated clock, its waits advance that clock, and the user speaks during
    the third wait."""
    now = [1000.0]
    sends: list[tuple[float, bytes]] = []
    chunk = 100 * BYTES_PER_MS
    speech = bytes(range(1, 201)) * (2 * chunk // 200)  # 200 ms, no silent frame in it
    spoken: list = []

    def send(frame: bytes) -> None:
        sends.append((now[0], frame))
        if len(sends) == 6:
            raise SessionClosed("enough")  # ends the microphone's loop, as a closed session does

    def sleep(seconds: float) -> None:
        if len(sends) == 2:  # capturing frame 2 ([+200, +300) ms): the user speaks at +230 ms
            now[0] += 0.03
            spoken.append((now[0], mic.say(speech)))
            seconds -= 0.03
        now[0] += seconds

    monkeypatch.setattr(_session, "clock", lambda: now[0])
    monkeypatch.setattr(_session.gevent, "sleep", sleep)
    mic = Microphone(send, 100, continuous=True, on_utterance_done=lambda: None)
    mic._run()
    silence = bytes(chunk)
    assert [frame for _, frame in sends] == [silence, silence, speech[:chunk], speech[chunk:], silence, silence]
    assert [round((at - 1000.0) * 1000) for at, _ in sends] == [100, 200, 300, 400, 500, 600], "on schedule"
    said_at, utterance = spoken[0]
    assert (utterance.first_sent_at, utterance.start_offset) == (sends[2][0], 2 * chunk)
    assert round((utterance.first_sent_at - said_at) * 1000) == 70, "the rest of the wait, not a frame more"
    assert utterance.last_sent_at == sends[3][0], "the speech ends when its last frame is captured and sent"


def test_open_microphone_streams_silence_push_to_talk_stays_quiet():
    speech = b"\x01\x02" * (BYTES_PER_MS * 40 // 2)  # 40 ms
    for continuous in (True, False):
        mic, sends = _record_microphone(continuous, chunk_ms=10, stall_at_frame=None)
        mic.start()
        first = mic.say(speech)
        assert first.done.wait(2.0)
        gevent.sleep(0.1)  # time under test: what the microphone does between talk spurts
        second = mic.say(speech)
        assert second.done.wait(2.0)
        mic.stop()
        frames = [frame for _, _, frame in sends]
        silence = [frame for frame in frames if frame == bytes(10 * BYTES_PER_MS)]
        assert b"".join(f for f in frames if f != bytes(10 * BYTES_PER_MS)) == speech * 2
        if continuous:
            assert 6 <= len(silence) <= 20, len(silence)  # ~100 ms of 10 ms silence frames
        else:
            assert silence == []


# ---- against a real node ------------------------------------------------------------------------

# a session of the load test outside Locust, its samples captured as [type, name, failure, size, ms]
_CAPTURING_SCRIPT = r"""
from gevent import monkey
monkey.patch_all()
import json, socket, sys
from loadtest._metrics import MetricReporter
from loadtest._options import LoadSettings
from loadtest._session import SessionClosed, VoiceSession

class Capture:
    def __init__(self):
        self.request = self
        self.samples = []
    def fire(self, request_type, name, response_time, response_length, exception, context):
        self.samples.append([request_type, name, None if exception is None else str(exception), response_length,
                             response_time])
"""

_ERROR_PATH_SCRIPT = _CAPTURING_SCRIPT + r"""
capture = Capture()
settings = LoadSettings.from_options(None, sys.argv[1])
# voice "nova" (the seed document's own example) is not a realtime voice: a non-fatal InvalidConfig.
session = VoiceSession(settings, MetricReporter(capture), {"type": "config", "voice": "nova"}, False)
session.open()
session.send_event({"type": "text", "text": "still there?"})
session.wait_until(lambda: session.replies and session.replies[0].done_at is not None, "reply")
session.close()
print(json.dumps({"samples": capture.samples, "reply_bytes": len(session.replies[0].audio)}))
"""


_REFUSED_CONNECT_SCRIPT = _CAPTURING_SCRIPT + r"""
with socket.socket() as closed:  # a port nothing listens on: refused at once
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
capture = Capture()
settings = LoadSettings.from_options(None, f"ws://127.0.0.1:{port}")
try:
    VoiceSession(settings, MetricReporter(capture), {"type": "config"}, False).open()
except SessionClosed:
    pass
print(json.dumps(capture.samples))
"""


def test_a_session_that_never_opens_is_a_failure_without_a_connect_time():
    """Found by a docs audit: a refused connection was reported with its elapsed time, so a
    node refusing every client (HTTP 401 in 2 ms) showed a fast "connect → ready" p50."""
    result = subprocess.run([sys.executable, "-c", _REFUSED_CONNECT_SCRIPT], cwd=REPO, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr[-3000:]
    (sample,) = json.loads(result.stdout.strip().splitlines()[-1])
    assert sample[:2] == ["WS", "connect → ready"] and sample[2].startswith("connect failed: ")
    assert sample[4] is None


_SILENT_NODE_SCRIPT = _CAPTURING_SCRIPT + r"""
import base64, hashlib, os
import gevent
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()

def serve():  # accepts the upgrade, reads the config, and never says `ready`
    conn, _ = server.accept()
    request = b""
    while b"\r\n\r\n" not in request:
        request += conn.recv(4096)
    key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    while conn.recv(4096):
        pass

gevent.spawn(serve)
os.environ["LOADTEST_REPLY_TIMEOUT"] = "0.5"
capture = Capture()
settings = LoadSettings.from_options(None, f"ws://127.0.0.1:{server.getsockname()[1]}")
try:
    VoiceSession(settings, MetricReporter(capture), {"type": "config"}, False).open()
except SessionClosed:
    pass
print(json.dumps(capture.samples))
"""


def test_a_session_whose_ready_never_comes_is_a_failure_without_a_connect_time():
    """The other way a session never opens: the node takes the upgrade and never says `ready`.
    The failure is reported when the reply timeout runs out, with no time: the timeout's
    length is no connect time."""
    result = subprocess.run([sys.executable, "-c", _SILENT_NODE_SCRIPT], cwd=REPO, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr[-3000:]
    (sample,) = json.loads(result.stdout.strip().splitlines()[-1])
    assert sample[:2] == ["WS", "connect → ready"] and "ready" in sample[2], sample
    assert sample[4] is None


def test_gateway_errors_are_reported_as_failures_named_by_their_code(node):
    result = subprocess.run(
        [sys.executable, "-c", _ERROR_PATH_SCRIPT, node.host_url],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    rows = report["samples"]
    errors = [row for row in rows if row[0] == "ERROR"]
    assert [row[1] for row in errors] == ["InvalidConfig"], rows
    assert errors[0][2], "the failure carries the gateway's message"
    connect = [row for row in rows if (row[0], row[1]) == ("WS", "connect → ready")]
    assert len(connect) == 1 and connect[0][2] is None, "non-fatal: the session still opened"
    assert connect[0][4] > 0, "an opened session's connect time is measured"
    assert report["reply_bytes"] > 0, "and it still answers"


def _read_stats(csv_prefix: Path) -> tuple[dict[tuple[str, str], dict], list[dict]]:
    with open(f"{csv_prefix}_stats.csv", newline="") as stats_file:
        stats = {(row["Type"], row["Name"]): row for row in csv.DictReader(stats_file)}
    with open(f"{csv_prefix}_failures.csv", newline="") as failures_file:
        failures = list(csv.DictReader(failures_file))
    return stats, failures


def test_headless_run_of_all_scenarios_has_no_failures_and_reports_every_metric(node, tmp_path):
    csv_prefix = tmp_path / "run"
    command = [
        sys.executable, "-m", "locust", "-f", "loadtest/", "--headless", "-u", "20", "-r", "20", "-t", "15s",
        "--host", node.host_url, "--csv", str(csv_prefix), "--only-summary", "--loglevel", "WARNING",
    ]
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=90)
    elapsed = time.monotonic() - started
    stats, failures = _read_stats(csv_prefix)
    context = f"failures: {failures}\nstderr: {result.stderr[-4000:]}"
    assert failures == [], context
    assert stats[("", "Aggregated")]["Failure Count"] == "0", context
    assert result.returncode == 0, context
    reported = {key for key, row in stats.items() if int(row["Request Count"]) > 0}
    assert EXPECTED_METRICS <= reported, f"missing: {EXPECTED_METRICS - reported}\n{context}"
    # Sanity of the figures themselves: sessions open, and each verified reply carried audio.
    assert int(stats[("WS", "connect → ready")]["Request Count"]) >= 20
    assert float(stats[("VOICE", "reply completeness")]["Average Content Size"]) > 1000 * BYTES_PER_MS
    assert float(stats[("VOICE", "interrupted reaction")]["Median Response Time"]) < 1000
    # The VAD round trip holds VAD turns only: each includes the 500 ms silence window the VAD
    # waits for (a push-to-talk sample, measured from `commit`, takes a few ms). Less than 500 only
    # by the lateness a loaded load generator catches up on after the speech's last frame.
    assert float(stats[("VOICE", "audio round trip")]["Min Response Time"]) >= 450, context
    assert elapsed < 60


def test_the_vad_round_trip_counts_from_the_end_of_the_speech_at_any_frame_size(node, tmp_path):
    """With 250 ms frames, a microphone that sent each frame at the start of its audio made the
    speech end a frame early on the client's clock: the VAD round trip read 300-460 ms, below
    the 500 ms of silence the VAD must hear before it answers. Sent when captured, no turn can
    read less than that window."""
    stats, failures = _run_against(node.url, "VadConversationUser", tmp_path / "run", seconds=10,
                                   options=("--chunk-ms", "250"))
    assert failures == []
    row = stats[("VOICE", "audio round trip")]
    assert int(row["Request Count"]) >= 2
    assert float(row["Min Response Time"]) >= 490, row


def test_a_barge_in_user_gives_its_interrupting_speech_the_time_it_takes_to_say(node, tmp_path):
    """The speech that interrupts a reply is a whole clip (1.5-2 s): waiting for its end with
    only --reply-timeout (1 s here) failed "mic lateness" on a healthy node and dropped the turn."""
    stats, failures = _run_against(node.url, "BargeInUser", tmp_path / "run", seconds=10,
                                   options=("--reply-timeout", "1"))
    assert failures == []
    assert int(stats[("VOICE", "interrupted reaction")]["Request Count"]) >= 2
    assert int(stats[("VOICE", "reply completeness")]["Request Count"]) >= 2, "the interrupting turn's reply"


# ---- against a broken relay: each fault must fail its own row, with a reason ---------------------

# A relay between the load test and the node that breaks one thing, chosen by the first segment
# of the URL path (ws://127.0.0.1:P/<fault>/realtime); it prints its port once it listens.
_FAULTY_RELAY_SCRIPT = r"""
import asyncio, json, sys
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

NODE = sys.argv[1]

async def relay(client):
    fault, _, path = client.request.path.lstrip("/").partition("/")
    async with connect(f"{NODE}/{path}", max_size=None, compression=None) as node:
        async def upstream():
            async for message in client:
                await node.send(message)

        async def downstream():
            held_audio = held_stop = None
            reply_heard = False
            async for message in node:
                if fault == "failed_replies":  # every response fails upstream: no audio, status failed
                    if isinstance(message, str):
                        event = json.loads(message)
                        if event["type"] == "response_done":
                            message = json.dumps({**event, "status": "failed"})
                        await client.send(message)
                    continue
                if isinstance(message, bytes):
                    if fault == "drop_last":  # each frame waits for the next: a reply's last one is lost
                        message, held_audio = held_audio, message
                    if message is not None:
                        await client.send(message)
                    if fault == "early_interrupted" and not reply_heard:  # nobody has barged in yet
                        reply_heard = True
                        await client.send(json.dumps({"type": "interrupted", "played_ms": 0}))
                    if held_stop is not None:  # late_speech_stopped: after the reply's first frame
                        await client.send(held_stop)
                        held_stop = None
                    continue
                kind = json.loads(message)["type"]
                if kind == "response_started":
                    reply_heard = False
                if fault == "drop_last" and kind in ("response_done", "interrupted"):
                    held_audio = None
                if fault == "late_speech_stopped" and kind == "speech_stopped":
                    held_stop = message
                    continue
                await client.send(message)

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()

async def main():
    async with serve(relay, "127.0.0.1", 0, max_size=None, compression=None) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.sleep(300)  # bounded life; the test kills it sooner

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def faulty_relay(node):
    """The relay's base URL (ws://127.0.0.1:P); append /<fault>/realtime."""
    relay = subprocess.Popen(
        [sys.executable, "-c", _FAULTY_RELAY_SCRIPT, node.host_url], cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        port = relay.stdout.readline().strip()
        assert port.isdigit(), "the relay did not start"
        yield f"ws://127.0.0.1:{port}"
    finally:
        relay.kill()
        relay.wait()


def _run_against(
    url: str, user_class: str, csv_prefix: Path, seconds: int = 8, options: tuple[str, ...] = (),
) -> tuple[dict, list[dict]]:
    command = [
        sys.executable, "-m", "locust", "-f", "loadtest/", "--headless", "-u", "2", "-r", "2", "-t", f"{seconds}s",
        "--gateway-url", url, "--csv", str(csv_prefix), "--only-summary", "--loglevel", "WARNING", *options,
        user_class,
    ]
    subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    return _read_stats(csv_prefix)


def _failure_reasons(failures: list[dict], request_type: str, name: str) -> list[str]:
    return [row["Error"] for row in failures if (row["Method"], row["Name"]) == (request_type, name)]


def test_reply_audio_before_speech_stopped_is_a_wrong_order_failure_not_zero_latency(faulty_relay, tmp_path):
    """The relay holds each speech_stopped back until the reply's first audio frame has passed."""
    stats, failures = _run_against(f"{faulty_relay}/late_speech_stopped/realtime", "VadConversationUser",
                                   tmp_path / "run")
    reasons = _failure_reasons(failures, "VOICE", "first audio after speech_stopped")
    assert reasons, f"failures: {failures}"
    assert all(reason.startswith("MetricFailure('wrong order: reply audio arrived ")
               and reason.endswith(" ms before speech_stopped')") for reason in reasons), reasons
    row = stats.get(("VOICE", "first audio after speech_stopped"))
    assert row["Request Count"] == row["Failure Count"], "no turn passed as a zero-latency sample"


def test_an_interrupted_reply_that_had_completed_must_be_whole(faulty_relay, tmp_path):
    """The node's mock generates a reply faster than real time, so `response_done` (completed)
    comes before the barge-in's `interrupted`: by then the client has the whole reply. The relay
    drops each reply's last frame; a prefix is not enough."""
    _stats, failures = _run_against(f"{faulty_relay}/drop_last/realtime", "BargeInUser", tmp_path / "run")
    reasons = _failure_reasons(failures, "VOICE", "reply completeness (interrupted)")
    assert reasons, f"failures: {failures}"
    assert all(reason.startswith("MetricFailure('interrupted after response_done (completed), yet the reply is "
                                 "not the whole turn: reply has ") for reason in reasons), reasons


def test_an_interrupted_before_the_overlapping_speech_is_a_wrong_order_failure(faulty_relay, tmp_path):
    """The relay tells the client `interrupted` as soon as a reply's first audio has passed,
    before the user has said anything over it: no reaction time can be measured from that."""
    stats, failures = _run_against(f"{faulty_relay}/early_interrupted/realtime", "BargeInUser", tmp_path / "run")
    reasons = _failure_reasons(failures, "VOICE", "interrupted reaction")
    assert reasons, f"failures: {failures}"
    assert all(reason.startswith("MetricFailure('wrong order: interrupted arrived ") for reason in reasons), reasons
    row = stats.get(("VOICE", "interrupted reaction"))
    assert row["Request Count"] == row["Failure Count"], "no barge-in passed as a reaction sample"


def test_text_replies_are_checked_against_the_mocks_reply_not_the_first_one_seen(faulty_relay, tmp_path):
    """Every reply loses its last frame, so all replies to a prompt agree with each other: only an
    absolute expectation (the mock's tone for the text) catches it, from the first reply on."""
    stats, failures = _run_against(f"{faulty_relay}/drop_last/realtime", "TextTurnUser", tmp_path / "run")
    reasons = _failure_reasons(failures, "TEXT", "reply completeness")
    assert reasons, f"failures: {failures}"
    prompts = ("What time is it in Lisbon?", "Spell the word gateway, please.",
               "Tell me a two sentence story about a lighthouse keeper.")
    assert any(f"not the mock's reply to '{prompts[0]}': reply has " in reason for reason in reasons), reasons
    assert all(any(f"not the mock's reply to '{prompt}': reply has " in reason for prompt in prompts)
               for reason in reasons), reasons
    row = stats[("TEXT", "reply completeness")]
    assert row["Request Count"] == row["Failure Count"], "no reply passed"


def test_a_reply_that_fails_without_audio_is_a_completeness_failure_at_once(faulty_relay, tmp_path):
    """A failed response (a rate limit, a server error) ends with `response_done` status failed
    and no audio. The user used to wait --reply-timeout (20 s) for audio that could not come and
    then report a timeout; in an 8 s run that is nothing at all. It is a completeness failure
    when the reply ends, and the round trip gets no sample."""
    stats, failures = _run_against(f"{faulty_relay}/failed_replies/realtime", "TextTurnUser", tmp_path / "run")
    reasons = _failure_reasons(failures, "TEXT", "reply completeness")
    assert reasons == ["MetricFailure(\"response status 'failed' with no audio\")"], failures
    row = stats[("TEXT", "reply completeness")]
    assert int(row["Failure Count"]) >= 4 and row["Request Count"] == row["Failure Count"], row
    assert ("TEXT", "text round trip") not in stats or stats[("TEXT", "text round trip")]["Request Count"] == "0"


_RESPONSE_TIMES_SCRIPT = """
import json
from locust.event import Events
from locust.stats import RequestStats
from loadtest._metrics import MetricReporter

events, stats = Events(), RequestStats()

def record(request_type, name, response_time, response_length, exception=None, **_kwargs):
    stats.log_request(request_type, name, response_time, response_length)  # as Locust's runner does
    if exception:
        stats.log_error(request_type, name, exception)

events.request.add_listener(record)
reporter = MetricReporter(events)
reporter.sample("VOICE", "audio round trip", 250.0)
reporter.failure("VOICE", "audio round trip", "no reply audio within 20 s")
reporter.failure("VOICE", "audio round trip", "wrong order: reply audio arrived 3 ms before the end")
reporter.failure("VOICE", "reply completeness", "reply has 900 of 960 bytes", 120.0, 900)
row, wrong = stats.get("audio round trip", "VOICE"), stats.get("reply completeness", "VOICE")
print(json.dumps([row.num_requests, row.num_failures, row.min_response_time, row.avg_response_time,
                  row.get_response_time_percentile(0.5), wrong.avg_response_time]))
"""


def test_failures_without_a_measured_duration_stay_out_of_the_response_times():
    """Locust counts every sample's response time into min, average and percentiles: a timeout
    or a wrong-order failure reported as 0 ms passed for the fastest reply of the run (an audit
    found every percentile 0 ms for turns that got no reply at all). Without a duration they are
    left out; a failure that has one (a reply that came, but wrong) keeps it. (In a subprocess:
    importing Locust monkey-patches the process for gevent.)"""
    result = subprocess.run([sys.executable, "-c", _RESPONSE_TIMES_SCRIPT], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [3, 2, 250, 250, 250, 120]


_GROUPING_SCRIPT = """
import json, logging
from locust.event import Events
from locust.stats import RequestStats
from loadtest._metrics import MetricReporter

logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")
events, stats = Events(), RequestStats()

def record(request_type, name, response_time, response_length, exception=None, **_kwargs):
    stats.log_request(request_type, name, response_time, response_length)
    if exception:
        stats.log_error(request_type, name, exception)

events.request.add_listener(record)
reporter = MetricReporter(events)
for got in (900, 912, 480, 0, 17):
    reporter.failure("VOICE", "reply completeness",
                     f"reply has {got} bytes, expected 960 (19 vs 20 ms); first difference at byte {got}", 12.5, got)
reporter.failure("ERROR", "ConnectionFailed", "upstream session sess_C9x2Lk01 closed after 1.5 s")
reporter.failure("ERROR", "ConnectionFailed", "upstream session sess_Zq81pPw7 closed after 12 s")
reporter.failure("VOICE", "interrupted reaction", "no interrupted (speech_started at [1200, 3400.5] ms)")
reporter.failure("VOICE", "interrupted reaction", "no interrupted (speech_started at [] ms)")
# another simulated user of the same run: its failures count, but its rows' three are logged
MetricReporter(events).failure("VOICE", "reply completeness", "reply has 1 bytes, expected 960 (0 vs 20 ms); "
                                                              "first difference at byte 1", 1.0, 1)
print(json.dumps(sorted([error.method, error.name, repr(error.error), error.occurrences]
                        for error in stats.errors.values())))
"""


def test_like_failures_share_a_row_and_the_first_few_are_logged_whole():
    """Locust keys its failures table by the exact reason: with byte counts, times and session
    ids in it, every failure was a row of its own (thousands in a long run with a broken relay,
    kept in memory and sent on by every worker). Numbers and ids are masked for the table; the
    first three of each row go to the log with their figures: three per run, not per simulated
    user (each has a reporter; an audit counted 60 lines for one row from 20 users)."""
    result = subprocess.run([sys.executable, "-c", _GROUPING_SCRIPT], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert rows == [
        ["ERROR", "ConnectionFailed", "MetricFailure('upstream session sess_… closed after N s')", 2],
        ["VOICE", "interrupted reaction", "MetricFailure('no interrupted (speech_started at […] ms)')", 2],
        ["VOICE", "reply completeness",
         "MetricFailure('reply has N bytes, expected N (N vs N ms); first difference at byte N')", 6],
    ], rows
    logged = [line for line in result.stderr.splitlines() if line.startswith("loadtest ")]
    assert logged == [
        "loadtest VOICE reply completeness failed: reply has 900 bytes, expected 960 (19 vs 20 ms); "
        "first difference at byte 900",
        "loadtest VOICE reply completeness failed: reply has 912 bytes, expected 960 (19 vs 20 ms); "
        "first difference at byte 912",
        "loadtest VOICE reply completeness failed: reply has 480 bytes, expected 960 (19 vs 20 ms); "
        "first difference at byte 480",
        "loadtest ERROR ConnectionFailed failed: upstream session sess_C9x2Lk01 closed after 1.5 s",
        "loadtest ERROR ConnectionFailed failed: upstream session sess_Zq81pPw7 closed after 12 s",
        "loadtest VOICE interrupted reaction failed: no interrupted (speech_started at [1200, 3400.5] ms)",
        "loadtest VOICE interrupted reaction failed: no interrupted (speech_started at [] ms)",
    ], result.stderr[-3000:]


def test_a_bad_value_from_the_web_ui_stops_the_run_with_one_line(node, tmp_path):
    """The web UI's "Custom parameters" arrive with its start button, after the start-up check:
    --chunk-ms 3 there used to start a run whose every user died with a traceback, the UI saying
    "running" with 0 users. Now the run stops at once, with one log line naming the option."""
    import urllib.parse
    import urllib.request

    port = free_port()
    log_path = tmp_path / "locust.log"
    with open(log_path, "w") as log:
        locust = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", "loadtest/", "--host", node.host_url, "--web-host", "127.0.0.1",
             "--web-port", str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def stats() -> dict | None:
        try:
            with urllib.request.urlopen(f"{base}/stats/requests", timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            return None

    try:
        deadline = time.monotonic() + 30
        while stats() is None:  # the web UI is up when it answers
            assert time.monotonic() < deadline and locust.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.1)
        form = {"user_count": "3", "spawn_rate": "3", "host": node.host_url, "chunk_ms": "3"}
        with urllib.request.urlopen(f"{base}/swarm", data=urllib.parse.urlencode(form).encode(), timeout=5) as answer:
            assert answer.status == 200
        deadline = time.monotonic() + 15
        while (state := stats()) is None or state["state"] != "stopped":
            assert time.monotonic() < deadline, (state, log_path.read_text()[-3000:])
            time.sleep(0.1)
    finally:
        locust.terminate()
        locust.wait(timeout=15)
    text = log_path.read_text()
    assert "locust -f loadtest/: --chunk-ms must be within 5..1000, got 3: run stopped" in text, text[-3000:]
    assert "Traceback" not in text and state["user_count"] == 0, text[-3000:]
