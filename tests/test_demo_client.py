"""Done-means 5: `realtime-gateway client` against `realtime-gateway --upstream mock --port P`,
both as subprocesses; the reply WAV holds the echoed audio."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import wave

import numpy as np
import pytest

from gateway.demo_client import load_wav_pcm16
from tests.relay_harness import free_port, gateway_process, silence, speech_like


def _write_wav(path, pcm: bytes, rate: int = 24000, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm)


def _client(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "client", "--url", f"ws://127.0.0.1:{port}/realtime",
                           "--timeout", "30", *args], capture_output=True, text=True, timeout=60)


def test_demo_client_push_to_talk_and_server_vad(tmp_path):
    speech = speech_like(0.8, seed=31)
    wav_in = tmp_path / "in.wav"
    _write_wav(wav_in, silence(0.3) + speech)
    port = free_port()
    with gateway_process(port=port):
        manual = _client(port, "--wav", str(wav_in), "--out", str(tmp_path / "manual.wav"),
                         "--turn-detection", "none")
        assert manual.returncode == 0, manual.stdout + manual.stderr
        with wave.open(str(tmp_path / "manual.wav"), "rb") as reply:
            assert (reply.getframerate(), reply.getnchannels(), reply.getsampwidth()) == (24000, 1, 2)
            assert reply.readframes(reply.getnframes()) == silence(0.3) + speech   # the whole turn, echoed
        assert "ready: session gw_" in manual.stdout and "response done" in manual.stdout

        vad = _client(port, "--wav", str(wav_in), "--out", str(tmp_path / "vad.wav"), "--text", "and hello")
        assert vad.returncode == 0, vad.stdout + vad.stderr
        with wave.open(str(tmp_path / "vad.wav"), "rb") as reply:
            echoed = reply.readframes(reply.getnframes())
        assert echoed.find(speech[:9600]) >= 0                  # the spoken turn came back
        assert "[user] " in vad.stdout and "[assistant] " in vad.stdout
        assert vad.stdout.count("response done") == 2           # the audio turn and the text turn

        # a refused --voice: the conversation runs in the node's voice, but not as asked (exit 0 before)
        voiced = _client(port, "--demo-tone", "--voice", "no-such-voice", "--out", str(tmp_path / "voiced.wav"))
        assert voiced.returncode == 1, voiced.stdout + voiced.stderr
        assert "error InvalidConfig: " in voiced.stdout and "response done" in voiced.stdout
        assert voiced.stdout.splitlines()[-1] == "the gateway reported 1 error (above)"


def test_wav_conversion_to_24k_mono(tmp_path):
    t = np.arange(16000) / 16000
    tone = (8000 * np.sin(2 * np.pi * 440 * t)).astype("<i2")
    stereo = np.stack([tone, tone], axis=1).tobytes()
    path = tmp_path / "in16k.wav"
    _write_wav(path, stereo, rate=16000, channels=2)
    pcm = np.frombuffer(load_wav_pcm16(str(path)), dtype="<i2")
    assert pcm.size == 24000                                    # 1 s at 24 kHz
    spectrum = np.abs(np.fft.rfft(pcm.astype(float)))
    assert abs(int(np.argmax(spectrum)) - 440) <= 1             # same pitch after resampling
    same = tmp_path / "same.wav"
    _write_wav(same, tone.tobytes()[:4800], rate=24000)
    assert load_wav_pcm16(str(same)) == tone.tobytes()[:4800]   # already 24 kHz mono: bit-exact


def _speech_turns(stdout: str) -> list[tuple[int, int]]:
    """The (speech_started, speech_stopped) audio_ms pairs the client printed, in order."""
    events = {"speech_started": [], "speech_stopped": []}
    for line in stdout.splitlines():
        kind, _, fields = line.removeprefix("event: ").partition(" ")
        if line.startswith("event: ") and kind in events:
            events[kind].append(int(dict(field.split("=", 1) for field in fields.split())["audio_ms"]))
    return list(zip(events["speech_started"], events["speech_stopped"], strict=True))


def test_demo_client_with_server_vad_answers_every_utterance_of_the_file(tmp_path):
    # Two utterances 1.5 s apart: server VAD makes them two turns. The client must stream the whole
    # file and stay until both replies are done, not leave after the first one.
    first, second = speech_like(0.6, seed=41), speech_like(0.6, seed=42)
    spoken = silence(0.3) + first + silence(1.5) + second
    wav_in = tmp_path / "two.wav"
    _write_wav(wav_in, spoken)
    port = free_port()
    with gateway_process(port=port):
        result = _client(port, "--wav", str(wav_in), "--out", str(tmp_path / "reply.wav"))
    assert result.returncode == 0, result.stdout + result.stderr
    turns = _speech_turns(result.stdout)
    assert len(turns) == 2 and result.stdout.count("response done") == 2, result.stdout
    sent = spoken + silence(1.0)  # the client ends the file with a second of silence
    echoes = b"".join(sent[start * 48:stop * 48] for start, stop in turns)  # 48 bytes per ms
    for utterance, (start, stop) in zip((first, second), turns):  # each turn holds its whole utterance
        assert start * 48 <= sent.find(utterance) <= stop * 48 - len(utterance)
    with wave.open(str(tmp_path / "reply.wav"), "rb") as reply:
        assert reply.readframes(reply.getnframes()) == echoes      # both turns, echoed bit-exactly


def _write_raw_wav(path, format_tag: int, channels: int, rate: int, width: int, samples: bytes,
                   extensible: bool = False) -> None:
    """A WAV the stdlib `wave` module cannot write: float, or WAVE_FORMAT_EXTENSIBLE."""
    block_align = channels * width
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else format_tag, channels, rate, rate * block_align,
                      block_align, width * 8)
    if extensible:  # cbSize, valid bits, channel mask, sub-format GUID (starts with the format tag)
        fmt += struct.pack("<HHI", 22, width * 8, 0) + struct.pack("<H", format_tag) + bytes.fromhex(
            "000000001000800000aa00389b71")
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(samples)) + samples
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def test_float_and_extensible_wavs_are_converted(tmp_path):
    pcm = speech_like(0.2, seed=7)
    as_float = np.frombuffer(pcm, dtype="<i2").astype("<f4") / 32768
    _write_raw_wav(tmp_path / "f32.wav", 3, 1, 24000, 4, as_float.tobytes())
    assert load_wav_pcm16(str(tmp_path / "f32.wav")) == pcm                 # ±1.0 full scale: bit-exact
    stereo = np.repeat(as_float.astype("<f8"), 2)
    _write_raw_wav(tmp_path / "f64x2.wav", 3, 2, 24000, 8, stereo.tobytes(), extensible=True)
    assert load_wav_pcm16(str(tmp_path / "f64x2.wav")) == pcm
    _write_raw_wav(tmp_path / "pcm_ext.wav", 1, 1, 24000, 2, pcm, extensible=True)
    assert load_wav_pcm16(str(tmp_path / "pcm_ext.wav")) == pcm


def test_g711_wavs_are_decoded(tmp_path):
    """Telephony recordings are often µ-law or A-law WAVs (format tags 7 and 6): read as the
    node's meter reads those codes, not refused as "format tag 7"."""
    from _fastpath import G711_TO_PCM16
    codes = np.random.default_rng(11).integers(0, 256, 4800, dtype=np.uint8)
    for tag, table in ((7, "g711_ulaw"), (6, "g711_alaw")):
        linear = np.array(G711_TO_PCM16[table], dtype="<i2")[codes]
        _write_raw_wav(tmp_path / "g711.wav", tag, 1, 24000, 1, codes.tobytes())
        assert load_wav_pcm16(str(tmp_path / "g711.wav")) == linear.tobytes()
        _write_raw_wav(tmp_path / "g711_8k.wav", tag, 1, 8000, 1, codes.tobytes(), extensible=True)
        assert len(load_wav_pcm16(str(tmp_path / "g711_8k.wav"))) == 3 * 2 * len(codes)   # a phone's 8 kHz


def test_a_long_recording_is_converted_a_block_at_a_time(tmp_path, monkeypatch):
    """A WAV was converted whole, as float64: a 3-minute 48 kHz stereo file took 344 MB, a
    30-minute one ~3 GB. Now the file is mapped and converted in blocks: the same samples, and
    memory beyond the result stays about a block's."""
    import tracemalloc

    import gateway.demo_client as demo_client
    seconds, rate = 30, 48000
    stereo = np.random.default_rng(12).integers(-20000, 20000, seconds * rate * 2, dtype=np.int16)
    _write_wav(tmp_path / "long.wav", stereo.tobytes(), rate=rate, channels=2)
    tracemalloc.start()
    try:
        whole = load_wav_pcm16(str(tmp_path / "long.wav"))
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(whole) == seconds * 24000 * 2
    assert peak < len(whole) + (8 << 20), peak   # converted whole: ~9 × the file, 50 MB here
    monkeypatch.setattr(demo_client, "_BLOCK_FRAMES", 4097)   # blocks that split every pair of samples
    assert load_wav_pcm16(str(tmp_path / "long.wav")) == whole


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_newcomer_mistakes_get_one_line_and_exit_2(tmp_path):
    port = free_port()  # nothing listens there
    missing = _one_line_error(_client(port, "--wav", str(tmp_path / "nope.wav")))
    assert missing == f"realtime-gateway client: cannot read --wav {tmp_path / 'nope.wav'}: No such file or directory"
    _write_raw_wav(tmp_path / "adpcm.wav", 2, 1, 24000, 1, bytes(100))  # format 2: compressed
    adpcm = _one_line_error(_client(port, "--wav", str(tmp_path / "adpcm.wav")))
    assert "unsupported WAV encoding (format tag 2" in adpcm and "float" in adpcm
    (tmp_path / "notes.wav").write_text("not audio")
    assert "not a WAV file" in _one_line_error(_client(port, "--wav", str(tmp_path / "notes.wav")))
    (tmp_path / "empty.wav").write_bytes(b"")  # a file that cannot be mapped
    assert "not a WAV file" in _one_line_error(_client(port, "--wav", str(tmp_path / "empty.wav")))
    nowhere = tmp_path / "no-such-dir" / "reply.wav"  # found before connecting, not after the talk
    assert _one_line_error(_client(port, "--demo-tone", "--out", str(nowhere))) == \
        f"realtime-gateway client: cannot write --out {nowhere}: no such directory {nowhere.parent}"
    assert _one_line_error(_client(port, "--demo-tone", "--out", str(tmp_path))).endswith("it is a directory")
    dangling = tmp_path / "dangling.wav"
    dangling.symlink_to(nowhere)  # written through: the target's missing folder counts
    assert _one_line_error(_client(port, "--demo-tone", "--out", str(dangling))).endswith(
        f"no such directory {nowhere.parent}")
    assert _one_line_error(_client(port, "--demo-tone", "--out", "")).endswith("an empty path")
    assert _one_line_error(_client(port, "--demo-tone", "--timeout", "nan")) == \
        "realtime-gateway client: --timeout must be a positive number of seconds, got nan"
    refused = _one_line_error(_client(port, "--demo-tone"))
    assert refused == f"realtime-gateway client: cannot connect to ws://127.0.0.1:{port}/realtime: Connection refused"
    with_token = subprocess.run([sys.executable, "-m", "gateway", "client", "--demo-tone", "--url",
                                 f"ws://127.0.0.1:{port}/realtime?token=s3cret-t0ken"],
                                capture_output=True, text=True, timeout=60)
    line = _one_line_error(with_token)
    assert "s3cret-t0ken" not in line and f"ws://127.0.0.1:{port}/realtime?token=***" in line


def test_a_newcomer_audit_s_mistakes_are_told_in_one_line_too(tmp_path):
    """Found by a newcomer audit: `--out` naming the `--wav` file overwrote the recording; a
    push-to-talk file under 100 ms was refused upstream and then answered with an unrelated
    reply; a wss:// URL to a ws:// node printed a 40-line logging traceback; a node with client
    auth said only "received 401", with no way to give a token; Ctrl-C printed a traceback."""
    port = free_port()
    recording = tmp_path / "mine.wav"
    _write_wav(recording, speech_like(0.5, seed=7))
    before = recording.read_bytes()
    assert _one_line_error(_client(port, "--wav", str(recording), "--out", str(recording))) == \
        f"realtime-gateway client: --out {recording} is the --wav file: the reply would overwrite it"
    assert recording.read_bytes() == before
    hardlink = tmp_path / "same-file.wav"
    os.link(recording, hardlink)
    assert _one_line_error(_client(port, "--wav", str(recording), "--out", str(hardlink))).endswith(
        "is the --wav file: the reply would overwrite it")
    assert recording.read_bytes() == before
    raw_token = "ab+cd/ef%2bgh0123456789"  # a raw '+', a lower-case escape: masked as given
    masked = _one_line_error(subprocess.run(
        [sys.executable, "-m", "gateway", "client", "--demo-tone", "--url",
         f"ws://127.0.0.1:{port}/realtime?token={raw_token}"], capture_output=True, text=True, timeout=60))
    assert masked.endswith(f"/realtime?token=***: Connection refused"), masked
    # found by a security audit: credentials in the URL were ignored, and shown as typed
    in_userinfo = _one_line_error(subprocess.run(
        [sys.executable, "-m", "gateway", "client", "--demo-tone", "--url",
         f"ws://user:s3cret-pa55word@127.0.0.1:{port}/realtime"], capture_output=True, text=True, timeout=60))
    assert in_userinfo == ("realtime-gateway client: --url names a user (user:password@host), which a node does "
                           "not read: give a client token with --token")
    short = tmp_path / "short.wav"
    _write_wav(short, speech_like(0.05, seed=8))
    assert _one_line_error(_client(port, "--wav", str(short), "--turn-detection", "none")) == \
        (f"realtime-gateway client: a push-to-talk turn needs at least 100 ms of audio; --wav {short} has 50 ms")

    key = "newcomer-key-0123456789"
    with gateway_process(port=port, env={"GATEWAY_API_KEYS": key}):
        tls = _one_line_error(subprocess.run(
            [sys.executable, "-m", "gateway", "client", "--url", f"wss://127.0.0.1:{port}/realtime", "--demo-tone",
             "--out", str(tmp_path / "r.wav")], capture_output=True, text=True, timeout=60))
        assert tls.endswith("the TLS handshake failed (a node started without --tls-cert serves ws://, not wss://)")
        assert _one_line_error(_client(port, "--demo-tone", "--out", str(tmp_path / "r.wav"))).endswith(
            "the node wants a client token: give --token (or $GATEWAY_CLIENT_TOKEN)")
        wrong = _one_line_error(_client(port, "--demo-tone", "--out", str(tmp_path / "r.wav"), "--token", "x" * 20))
        assert wrong.endswith("the node refused the client token (HTTP 401)") and "x" * 20 not in wrong
        in_query = _one_line_error(subprocess.run(
            [sys.executable, "-m", "gateway", "client", "--demo-tone", "--out", str(tmp_path / "r.wav"), "--url",
             f"ws://127.0.0.1:{port}/realtime?token={'y' * 20}"], capture_output=True, text=True, timeout=60))
        assert in_query.endswith("the node refused the client token (HTTP 401)") and "y" * 20 not in in_query
        given = _client(port, "--demo-tone", "--out", str(tmp_path / "r.wav"), "--token", key)
        assert given.returncode == 0 and "response done" in given.stdout, given.stdout + given.stderr

        long_file = tmp_path / "long.wav"
        _write_wav(long_file, speech_like(8.0, seed=9))
        client = subprocess.Popen([sys.executable, "-m", "gateway", "client", "--url", f"ws://127.0.0.1:{port}/realtime",
                                   "--wav", str(long_file), "--out", str(tmp_path / "cut.wav"), "--token", key],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert client.stdout.readline().startswith("ready: session gw_")  # streaming now
        client.send_signal(signal.SIGINT)
        _out, err = client.communicate(timeout=30)
    assert client.returncode == 130
    assert err == f"realtime-gateway client: interrupted; the reply so far is in {tmp_path / 'cut.wav'}\n"
    with wave.open(str(tmp_path / "cut.wav"), "rb") as reply:
        assert reply.getframerate() == 24000


def test_a_node_that_never_says_ready_is_given_up_on_after_timeout_not_the_file_s_length(tmp_path):
    """Review: with --timeout counted after the audio, the wait for `ready` took the file's
    length too (a 12 s file and --timeout 2 waited 15 s on a silent node, then said the audio
    had been sent). `ready` is waited for --timeout; the audio's time starts with it."""
    import asyncio
    import time

    import websockets

    long_file = tmp_path / "long.wav"
    _write_wav(long_file, silence(12.0))

    async def scenario():
        async def silent(ws):
            await ws.wait_closed()
        async with websockets.serve(silent, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            started = time.monotonic()
            client = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "client", "--url", f"ws://127.0.0.1:{port}/realtime",
                "--wav", str(long_file), "--out", str(tmp_path / "r.wav"), "--timeout", "1",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, _err = await asyncio.wait_for(client.communicate(), 30)
            return client.returncode, out.decode(), time.monotonic() - started

    returncode, out, elapsed = asyncio.run(scenario())
    assert returncode == 1 and out.splitlines()[-1] == "timed out after 1 s waiting for ready (--timeout)"
    assert elapsed < 8, elapsed  # the process's start, 1 s, the close: not the file's 12 s


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_write_that_fails_after_the_conversation_is_one_line_too():
    """/dev/full opens, then every write fails (a full disk): found only after the talk."""
    port = free_port()
    with gateway_process(port=port):
        result = _client(port, "--demo-tone", "--out", "/dev/full")
    assert result.returncode == 2 and "response done" in result.stdout, result.stdout + result.stderr
    assert result.stderr == "realtime-gateway client: cannot write --out /dev/full: No space left on device\n"
