"""The audio fast path (SPEC §5): every test runs over both implementations.

`pure` is the reference (`_fastpath/_pure.py`); `compiled` is the Cython extension with its SIMD
kernels where the CPU has them; `compiled-scalar` forces its portable scalar kernels, so both
compiled code paths are covered on a machine with AVX2 (skipped where the CPU lacks it, since
then `compiled` already is the scalar path).
"""
from __future__ import annotations

import array
import asyncio
import base64
import json
import math
import os
import subprocess
import sys

import numpy as np
import orjson
import pytest

import _fastpath
import _fastpath._compiled as compiled
import _fastpath._pure as pure
from gateway.mock import audio as mock_audio
from tests import g711
from tests.raw_client import http_get
from tests.relay_harness import gateway_process

HEADER_ROOM = _fastpath.HEADER_ROOM
DBFS_FLOOR = _fastpath.DBFS_FLOOR
_SIMD = compiled._set_simd(True)


@pytest.fixture(
    params=[
        "pure",
        "compiled",
        pytest.param(
            "compiled-scalar",
            marks=pytest.mark.skipif(not _SIMD, reason="no SIMD kernels on this CPU"),
        ),
    ]
)
def fp(request):
    """The implementation under test (a module with the `_fastpath` API)."""
    if request.param == "pure":
        yield pure
        return
    compiled._set_simd(request.param == "compiled")
    try:
        yield compiled
    finally:
        compiled._set_simd(True)


def pcm16(samples) -> bytes:
    return np.asarray(samples, dtype="<i2").tobytes()


def numpy_level(samples) -> tuple[float, float, int]:
    """Independent reference: (rms dBFS, peak dBFS, clipped) of int16 samples."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        return DBFS_FLOOR, DBFS_FLOOR, 0
    rms = math.sqrt(float(np.mean(x * x)))
    peak = float(np.max(np.abs(x)))

    def dbfs(a):
        return DBFS_FLOOR if a == 0 else max(DBFS_FLOOR, 20 * math.log10(a / 32768.0))

    return dbfs(rms), dbfs(peak), int(np.count_nonzero(np.abs(x) >= 32767))


def append_json(pcm: bytes) -> bytes:
    """The append frame built the obvious stdlib way."""
    text = json.dumps(
        {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode("ascii")},
        separators=(",", ":"),
    )
    return text.encode("ascii")


def delta_frame(pcm: bytes, *, dialect="ga", item_id="item_C1", extra=None, order=None) -> bytes:
    fields = {
        "type": "response.output_audio.delta" if dialect == "ga" else "response.audio.delta",
        "event_id": "event_B9r",
        "response_id": "resp_A1",
        "item_id": item_id,
        "output_index": 0,
        "content_index": 0,
        "delta": base64.b64encode(pcm).decode("ascii"),
    }
    fields.update(extra or {})
    if order is not None:
        fields = {key: fields[key] for key in order}
    return orjson.dumps(fields)


def random_pcm(n_bytes: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()


# --------------------------------------------------------------------------- which one is loaded


def test_normal_install_loads_the_compiled_fast_path():
    if os.environ.get("GATEWAY_NO_EXTENSIONS", "") not in ("", "0"):
        pytest.skip("GATEWAY_NO_EXTENSIONS is set: the pure twin is expected")
    assert _fastpath.IMPLEMENTATION == "compiled"
    assert _fastpath.encode_append is compiled.encode_append
    assert _fastpath.decode_audio_delta is compiled.decode_audio_delta
    assert _fastpath.Coalescer is compiled.Coalescer
    assert _fastpath.LevelMeter is compiled.LevelMeter


def test_a_direct_reader_closes_only_the_epoll_descriptor_it_made():
    """A DirectReader whose __init__ never ran (or failed before its epoll set) owns no
    descriptor: releasing it must not close fd 0 (a zero-filled field), which in a server may
    be a live socket; and it cannot be initialised twice (the first set would leak)."""
    try:
        os.fstat(0)
        placeholder = None
    except OSError:  # stdin closed under this runner: the next descriptor opened is 0
        placeholder = os.open(os.devnull, os.O_RDONLY)
        assert placeholder == 0
    try:
        unused = compiled.DirectReader.__new__(compiled.DirectReader)
        del unused
        with pytest.raises(TypeError):
            compiled.DirectReader("not a loop", "not a number")
        os.fstat(0)  # still open
        import asyncio
        loop = asyncio.new_event_loop()
        try:
            reader = compiled.DirectReader(loop)
            with pytest.raises(RuntimeError, match="already initialised"):
                reader.__init__(loop)
            reader.close()
        finally:
            loop.close()
        os.fstat(0)
    finally:
        if placeholder is not None:
            os.close(placeholder)


def test_a_node_says_which_fast_path_it_runs():
    """A node started as an operator starts it names its fast path in its start-up log and in
    `/health`: the compiled one in a normal install, the pure one (asked for) under
    GATEWAY_NO_EXTENSIONS."""
    log: list[str] = []
    with gateway_process(log=log) as (_process, port):
        status, body = asyncio.run(http_get(port, "/health"))
    assert status == 200
    expected = "pure" if _fastpath.NO_EXTENSIONS else "compiled"
    assert orjson.loads(body)["fastpath"] == expected
    said = ("audio fast path: the pure-Python twin (GATEWAY_NO_EXTENSIONS is set)" if _fastpath.NO_EXTENSIONS
            else "audio fast path: compiled")
    assert any(said in line for line in log), log


def test_a_fallback_nobody_asked_for_is_a_warning_with_its_reason():
    """Found by a packaging audit: a node that could not load the compiled extension (started
    from a source tree, or built against another picows) ran the pure twin, at twice the CPU,
    without a trace. It now warns as it starts, quoting the import error."""
    code = ("import logging, sys; sys.modules['_fastpath._compiled'] = None; logging.basicConfig(); "
            "import _fastpath; from gateway.node import check_fastpath; check_fastpath(); "
            "print(_fastpath.IMPLEMENTATION, _fastpath.NO_EXTENSIONS)")
    env = {name: value for name, value in os.environ.items() if name != "GATEWAY_NO_EXTENSIONS"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["pure", "False"]
    assert result.stderr.startswith("WARNING:gateway.node:the compiled audio fast path did not load "
                                    "(import of _fastpath._compiled halted; None in sys.modules): "
                                    "running its pure-Python twin"), result.stderr


def test_no_extensions_switch_selects_the_pure_twin():
    env = dict(os.environ, GATEWAY_NO_EXTENSIONS="1")
    code = "import _fastpath; print(_fastpath.IMPLEMENTATION, _fastpath.encode_append.__module__)"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["pure", "_fastpath._pure"]


# -------------------------------------------------------------------------------------- metering


def test_silence_reads_the_floor(fp):
    meter = fp.LevelMeter()
    meter.feed(bytes(960))
    assert meter.samples == 480
    assert meter.read() == (DBFS_FLOOR, DBFS_FLOOR, 0, 480)
    assert meter.read() == (DBFS_FLOOR, DBFS_FLOOR, 0, 0)  # read() reset it


def test_full_scale_square_is_zero_dbfs_and_all_clipped(fp):
    square = [32767, -32768] * 240
    rms, peak, clipped = fp.measure_level(pcm16(square))
    assert rms == pytest.approx(0.0, abs=1e-3)
    assert peak == 0.0  # |-32768| is exactly full scale
    assert clipped == 480
    assert (rms, peak, clipped) == pytest.approx(numpy_level(square), abs=1e-12)


def test_full_scale_sine_is_minus_3_dbfs(fp):
    t = np.arange(24000)
    sine = np.round(32767 * np.sin(2 * np.pi * 1000 * t / 24000)).astype(np.int16)
    rms, peak, clipped = fp.measure_level(sine.tobytes())
    assert rms == pytest.approx(-3.0103, abs=0.01)
    assert peak == pytest.approx(20 * math.log10(32767 / 32768))
    assert (rms, peak, clipped) == pytest.approx(numpy_level(sine), abs=1e-9)


def test_clipped_counts_both_rails_and_nothing_below(fp):
    samples = [32767, -32768, -32767, 32766, -32766, 0, 12345, 32767]
    assert fp.measure_level(pcm16(samples))[2] == 4
    assert fp.measure_level(pcm16(samples))[2] == numpy_level(samples)[2]


def test_meter_ignores_the_odd_byte_and_accumulates_across_feeds(fp):
    samples = np.random.default_rng(7).integers(-32768, 32768, 1001).astype(np.int16)
    data = samples.tobytes()
    meter = fp.LevelMeter()
    meter.feed(data[:501])  # 250 samples, then half of one: not a sample
    meter.feed(memoryview(data)[500:])  # the caller carried that half: 751 samples
    rms, peak, clipped, count = meter.read()
    assert count == 250 + 751
    expected = numpy_level(samples)
    assert (rms, peak, clipped) == pytest.approx(expected, abs=1e-9)


def test_meter_is_bit_identical_to_the_twin(fp):
    for seed, size in ((1, 0), (2, 1), (3, 2), (4, 961), (5, 4800), (6, 48001)):
        data = random_pcm(size, seed)
        mine, reference = fp.LevelMeter(), pure.LevelMeter()
        for meter in (mine, reference):
            meter.feed(data)
            meter.feed(data[: size // 3])
        assert mine.read() == reference.read()


def test_meter_stays_exact_beyond_double_precision(fp):
    # 2**23 full-scale samples put the sum of squares past 2**53, where a naive
    # double division could round differently from Python's int / int.
    loud = np.full(1 << 23, -32768, dtype="<i2")
    loud[::3] = 32767
    loud[::7] = 12345
    data = loud.tobytes()
    mine, reference = fp.LevelMeter(), pure.LevelMeter()
    for meter in (mine, reference):
        meter.feed(data)
        meter.feed(data[:1234])
    assert mine.read() == reference.read()


def test_meter_accepts_any_contiguous_buffer_and_rejects_others(fp):
    samples = [1000, -2000, 3000]
    expected = fp.measure_level(pcm16(samples))
    assert fp.measure_level(bytearray(pcm16(samples))) == expected
    assert fp.measure_level(array.array("h", samples)) == expected
    assert fp.measure_level(np.array(samples, dtype=np.int16)) == expected
    with pytest.raises(TypeError):
        fp.measure_level("not bytes")
    with pytest.raises(TypeError):
        fp.measure_level(memoryview(pcm16(samples * 2))[::2])


# ------------------------------------------------------------------------------ G.711 metering


def g711_table(fp, law: str) -> tuple[int, ...]:
    """The code -> PCM16 table the implementation's G.711 meter expands through."""
    return compiled._g711_table(law) if fp is compiled else pure.G711_TO_PCM16[law]


KNOWN_G711 = {
    # ITU-T G.711 reference expansions: entries of the classic decoders' tables (Sun's g711.c,
    # the former audioop's _st_ulaw2linear16 / _st_alaw2linear16)
    "g711_ulaw": {0xFF: 0, 0x80: 32124, 0x00: -32124, 0x01: -31100, 0x0F: -16764, 0x10: -15996,
                  0x70: -120, 0x7E: -8, 0x7F: 0, 0xFE: 8},
    "g711_alaw": {0xD5: 8, 0x55: -8, 0xAA: 32256, 0x2A: -32256, 0x00: -5504, 0x01: -5248,
                  0x02: -6016, 0x80: 5504},
}


@pytest.mark.parametrize("law", g711.LAWS)
def test_g711_tables_expand_to_the_reference_values(fp, law):
    table = g711_table(fp, law)
    assert len(table) == 256
    for code, value in KNOWN_G711[law].items():
        assert table[code] == value, hex(code)
    # the sign bit is the only difference between a code and its mirror; magnitudes grow
    # monotonically with the code's 7 magnitude bits (µ-law stores them inverted)
    assert all(table[code] == -table[code ^ 0x80] for code in range(256))
    if law == "g711_ulaw":
        positive = [table[0xFF - magnitude] for magnitude in range(128)]
    else:
        positive = [table[(0x80 | magnitude) ^ 0x55] for magnitude in range(128)]
    assert all(a < b for a, b in zip(positive, positive[1:]))
    assert max(map(abs, table)) == (32124 if law == "g711_ulaw" else 32256)
    # the same table as the mock upstream's, written independently (numpy, vectorised)
    mock_table = mock_audio._ulaw_table() if law == "g711_ulaw" else mock_audio._alaw_table()
    assert list(table) == mock_table.astype(int).tolist()
    assert table == pure.G711_TO_PCM16[law]  # compiled == pure


@pytest.mark.parametrize("law", g711.LAWS)
def test_the_test_encoder_inverts_the_tables(law):
    table = pure.G711_TO_PCM16[law]
    for code in range(256):
        if law == "g711_ulaw" and code == 0x7F:
            continue  # µ-law's negative zero: 0 encodes as 0xFF
        assert g711.ENCODERS[law](table[code]) == code, hex(code)


@pytest.mark.parametrize("law", g711.LAWS)
@pytest.mark.parametrize("peak_dbfs", [-50.0, -40.0, -20.0, -6.0, -1.0])
def test_a_g711_tone_meters_as_the_pcm16_tone_it_was_made_from(fp, law, peak_dbfs):
    encoded, source = g711.g711_tone(1.0, law, peak_dbfs)
    rms, peak, clipped = fp.measure_level(encoded, law)
    source_rms, source_peak, _ = fp.measure_level(source)
    assert source_rms == pytest.approx(peak_dbfs - 3.0103, abs=0.05)
    assert rms == pytest.approx(source_rms, abs=0.5)
    assert peak == pytest.approx(source_peak, abs=0.5)
    assert clipped == 0
    meter = fp.LevelMeter(law)
    meter.feed(encoded)
    assert meter.samples == len(encoded)  # one byte, one sample
    assert meter.read() == (rms, peak, clipped, len(encoded)) == (*pure.measure_level(encoded, law), 8000)


@pytest.mark.parametrize("law", g711.LAWS)
def test_g711_clipping_counts_the_codes_at_the_laws_largest_magnitude(fp, law):
    largest, next_largest = (32124, 31100) if law == "g711_ulaw" else (32256, 31232)
    encode = g711.ENCODERS[law]
    # an overdriven square saturates to the two largest codes; one step below is not clipped
    square = bytes([encode(32767), encode(-32768)] * 100)
    below = bytes([encode(next_largest), encode(-next_largest)] * 100)
    assert len(set(square + below)) == 4
    rms, peak, clipped = fp.measure_level(square + below, law)
    assert clipped == 200
    assert peak == pytest.approx(20 * math.log10(largest / 32768))
    assert fp.measure_level(below, law)[2] == 0
    assert fp.measure_level(square, law)[0] == pytest.approx(20 * math.log10(largest / 32768))
    # an overdriven sine clips only at its crests
    loud = g711.encode(g711.tone_samples(0.1, 3.0), law)
    rails = loud.count(encode(32767)) + loud.count(encode(-32768))
    assert 0 < rails < len(loud)
    assert fp.measure_level(loud, law)[2] == rails


@pytest.mark.parametrize("law", g711.LAWS)
def test_g711_audio_is_metered_on_every_path(fp, law):
    """What the session's meters see: the coalescer's appends (client audio) and decoded
    upstream deltas, besides `feed`; all in the meter's own format, compiled == pure."""
    encoded, _ = g711.g711_tone(0.5, law, -20.0)
    expected = (*pure.measure_level(encoded, law), len(encoded))
    meter = fp.LevelMeter(law)
    coalescer = fp.Coalescer(target_bytes=160, sample_width=1, meter=meter)
    for start in range(0, len(encoded), 333):
        coalescer.push(encoded[start:start + 333])
    coalescer.flush()
    assert meter.read() == expected
    assert audio_of(fp.encode_append(encoded, meter)) == encoded
    assert meter.read() == expected
    assert fp.decode_audio_delta(delta_frame(encoded), meter) == ("item_C1", encoded)
    assert meter.read() == expected
    assert fp.decode_audio_delta(delta_frame(b""), meter) == ("item_C1", b"")
    assert meter.read() == (DBFS_FLOOR, DBFS_FLOOR, 0, 0)


def test_meter_format_is_checked_and_can_change_between_feeds(fp):
    assert fp.LevelMeter().audio_format == "pcm16"
    for bad in ("opus", "G711_ULAW", None, 1):
        with pytest.raises(ValueError):
            fp.LevelMeter(bad)
    with pytest.raises(ValueError):
        fp.measure_level(b"\x00", "pcm24")
    meter = fp.LevelMeter("g711_alaw")
    assert meter.audio_format == "g711_alaw"
    with pytest.raises(ValueError):
        meter.audio_format = "pcm8"
    assert meter.audio_format == "g711_alaw"
    # what was accumulated stays: every format is metered on the same PCM16 scale
    samples = [1000, -2000, 3000]
    meter.audio_format = "pcm16"
    meter.feed(pcm16(samples))
    meter.audio_format = "g711_ulaw"
    meter.feed(bytes([0x80, 0x00]))
    rms, peak, clipped, count = meter.read()
    assert count == 5 and clipped == 2
    expected_rms, expected_peak, _ = numpy_level([*samples, 32124, -32124])
    assert (rms, peak) == pytest.approx((expected_rms, expected_peak), abs=1e-9)
    assert meter.read() == (DBFS_FLOOR, DBFS_FLOOR, 0, 0)


def test_g711_meter_accepts_any_contiguous_buffer_and_rejects_others(fp):
    codes = bytes(range(256))
    expected = fp.measure_level(codes, "g711_ulaw")
    assert fp.measure_level(bytearray(codes), "g711_ulaw") == expected
    assert fp.measure_level(memoryview(codes), "g711_ulaw") == expected
    assert fp.measure_level(np.frombuffer(codes, dtype=np.uint8), "g711_ulaw") == expected
    with pytest.raises(TypeError):
        fp.measure_level("not bytes", "g711_ulaw")
    with pytest.raises(TypeError):
        fp.measure_level(memoryview(codes)[::2], "g711_ulaw")


# -------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("size", [*range(0, 40), 959, 960, 961, 4800, 48000, 48001])
def test_encode_append_is_the_exact_json_frame(fp, size):
    pcm = random_pcm(size, size)
    frame = fp.encode_append(pcm)
    assert type(frame) is bytearray
    assert frame[:HEADER_ROOM] == bytes(HEADER_ROOM)
    assert frame[HEADER_ROOM:] == append_json(pcm)
    assert orjson.loads(frame[HEADER_ROOM:])["audio"] == base64.b64encode(pcm).decode()


def test_encode_append_takes_any_buffer(fp):
    pcm = random_pcm(963, 3)
    expected = append_json(pcm)
    for source in (bytearray(pcm), memoryview(pcm), np.frombuffer(pcm, dtype=np.uint8)):
        assert fp.encode_append(source)[HEADER_ROOM:] == expected
    words = np.frombuffer(pcm[:962], dtype="<i2")
    assert fp.encode_append(words)[HEADER_ROOM:] == append_json(pcm[:962])
    assert fp.encode_append(memoryview(pcm)[5:900])[HEADER_ROOM:] == append_json(pcm[5:900])
    with pytest.raises(TypeError):
        fp.encode_append("text")
    with pytest.raises(TypeError):
        fp.encode_append(memoryview(pcm)[::2])


def test_encode_append_meters_the_same_samples(fp):
    pcm = random_pcm(4801, 11)
    meter = fp.LevelMeter()
    frame = fp.encode_append(pcm, meter)
    assert frame[HEADER_ROOM:] == append_json(pcm)
    rms, peak, clipped, samples = meter.read()
    assert samples == 2400
    assert (rms, peak, clipped) == fp.measure_level(pcm)
    assert (rms, peak, clipped) == pure.measure_level(pcm)


@pytest.mark.parametrize("rails", [(), (32767,), (-32768,), (32767, -32768, -32767, 32766)])
def test_encode_append_counts_clipping_wherever_it_is(fp, rails):
    """The SIMD encoder counts clipped samples only when its peak says there are some: quiet
    audio with a few samples on the rails, at the start, in the middle and at the end."""
    samples = np.full(2400, 1000, dtype="<i2")
    for offset, value in enumerate(rails):
        for position in (offset, 1200 + offset, 2399 - offset):
            samples[position] = value
    meter = fp.LevelMeter()
    fp.encode_append(samples.tobytes(), meter)
    assert meter.read()[:3] == pure.measure_level(samples.tobytes())
    assert pure.measure_level(samples.tobytes())[2] == 3 * sum(1 for v in rails if abs(v) >= 32767)


def test_encode_append_reuses_out(fp):
    out = bytearray(b"x" * 5000)
    big, small = random_pcm(2000, 1), random_pcm(10, 2)
    assert fp.encode_append(big, out=out) is out
    assert out[HEADER_ROOM:] == append_json(big)
    assert fp.encode_append(small, out=out) is out
    assert out == bytes(HEADER_ROOM) + append_json(small)
    # encoding a bytearray into itself reads it before overwriting it
    own = bytearray(small)
    assert fp.encode_append(own, out=own) is own
    assert own[HEADER_ROOM:] == append_json(small)


def test_encode_append_refuses_an_out_with_live_exports(fp):
    out = bytearray(HEADER_ROOM + len(append_json(b"ab")))  # even at the same size
    view = memoryview(out)
    with pytest.raises(BufferError):
        fp.encode_append(b"ab", out=out)
    view.release()
    assert fp.encode_append(b"ab", out=out)[HEADER_ROOM:] == append_json(b"ab")
    with pytest.raises(TypeError):
        fp.encode_append(b"ab", out=b"not a bytearray")


# -------------------------------------------------------------------------------------- decoding


def test_decode_ga_delta(fp):
    pcm = random_pcm(4800, 21)
    assert fp.decode_audio_delta(delta_frame(pcm)) == ("item_C1", pcm)


def test_decode_beta_delta(fp):
    pcm = random_pcm(960, 22)
    assert fp.decode_audio_delta(delta_frame(pcm, dialect="beta", item_id="item_9")) == (
        "item_9",
        pcm,
    )


@pytest.mark.parametrize(
    "order",
    [
        ["delta", "item_id", "type"],
        ["item_id", "delta", "event_id", "type", "response_id"],
        ["delta", "content_index", "type", "output_index", "item_id", "event_id"],
    ],
)
def test_decode_in_any_key_order(fp, order):
    pcm = random_pcm(1000, 23)
    assert fp.decode_audio_delta(delta_frame(pcm, order=order)) == ("item_C1", pcm)


def test_decode_ga_delta_with_obfuscation_and_scalars(fp):
    pcm = random_pcm(962, 24)
    extra = {"obfuscation": "aZ3x", "flag": True, "none": None, "off": False, "x": -1.5e-3}
    assert fp.decode_audio_delta(delta_frame(pcm, extra=extra)) == ("item_C1", pcm)


def test_decode_plain_json_whitespace(fp):
    frame = b' \r\n{ "type" :\t"response.audio.delta" ,\n"item_id": "i1", "delta" : "AAEC" }\n '
    assert fp.decode_audio_delta(frame) == ("i1", b"\x00\x01\x02")


def test_decode_takes_every_payload_type_orjson_takes(fp):
    pcm = random_pcm(300, 25)
    frame = delta_frame(pcm)
    for payload in (frame, bytearray(frame), memoryview(frame), frame.decode("ascii")):
        assert fp.decode_audio_delta(payload) == ("item_C1", pcm)
    assert fp.decode_audio_delta(array.array("b", frame)) is None  # orjson refuses it too
    assert fp.decode_audio_delta(memoryview(frame + frame)[::2]) is None  # not contiguous
    assert fp.decode_audio_delta(12345) is None


def test_decode_empty_delta(fp):
    assert fp.decode_audio_delta(delta_frame(b"")) == ("item_C1", b"")


@pytest.mark.parametrize(
    "frame",
    [
        # a backslash escape in each string the decoder reads
        rb'{"type":"response.audio.delt\u0061","item_id":"i","delta":"AAAA"}',
        rb'{"type":"response.audio.delta","item_id":"i\/1","delta":"AAAA"}',
        rb'{"type":"response.audio.delta","item_id":"i","delta":"AA\/A"}',
        rb'{"type":"response.audio.delta","item_id":"i","event_id":"e\"x","delta":"AAAA"}',
        rb'{"t\u0079pe":"response.audio.delta","type":"response.audio.delta","item_id":"i","delta":"AAAA"}',
        # non-ASCII in a field it skips
        '{"type":"response.audio.delta","item_id":"i","note":"h\u00e9","delta":"AAAA"}'.encode(),
        # nested values it would have to skip
        b'{"type":"response.audio.delta","item_id":"i","meta":{"a":1},"delta":"AAAA"}',
        b'{"type":"response.audio.delta","item_id":"i","list":[1,2],"delta":"AAAA"}',
    ],
)
def test_decode_is_conservative_on_escapes_and_nesting(fp, frame):
    """Valid JSON the scanner does not handle: the compiled path says "not handled" (the caller
    then parses with orjson); whatever anyone returns equals the JSON parser's reading."""
    expected = pure.decode_audio_delta(frame)
    result = fp.decode_audio_delta(frame)
    assert result in (None, expected)
    if fp is compiled:
        assert result is None


@pytest.mark.parametrize(
    "frame",
    [
        b'{"type":"response.output_audio_transcript.delta","item_id":"i","delta":"AAAA"}',
        b'{"type":"response.output_text.delta","item_id":"i","delta":"QUFB"}',
        b'{"type":"response.function_call_arguments.delta","item_id":"i","delta":"AAAA"}',
        b'{"type":"session.created","session":{"id":"sess_1"}}',
        b'{"type":"error","error":{"type":"invalid_request_error","code":"x"}}',
        b'{"item_id":"i","delta":"AAAA"}',
        b'{"type":"response.audio.delta","delta":"AAAA"}',
        b'{"type":"response.audio.delta","item_id":"i"}',
        b'{"type":"response.audio.delta","item_id":7,"delta":"AAAA"}',
        b'{"type":"response.audio.delta","item_id":"i","delta":null}',
        b'{"type":["response.audio.delta"],"item_id":"i","delta":"AAAA"}',
        b'[{"type":"response.audio.delta","item_id":"i","delta":"AAAA"}]',
        b"{}",
        b"",
    ],
)
def test_decode_leaves_other_events_alone(fp, frame):
    assert fp.decode_audio_delta(frame) is None


def test_decode_rejects_truncated_frames(fp):
    frame = delta_frame(random_pcm(96, 26))
    for cut in range(len(frame)):
        assert fp.decode_audio_delta(frame[:cut]) is None, cut
    assert fp.decode_audio_delta(frame + b"x") is None
    assert fp.decode_audio_delta(frame + b"}") is None
    assert fp.decode_audio_delta(frame + b",") is None


@pytest.mark.parametrize(
    "delta",
    ["Q", "QQ", "QQ=", "QUF", "QUFBQ", "QUF*", "QU FB", "=QUF", "QQ==QQ==", "QQQ==", "Q===", "QUFB\n"],
)
def test_decode_rejects_invalid_base64(fp, delta):
    frame = b'{"type":"response.audio.delta","item_id":"i","delta":"%s"}' % delta.encode()
    assert fp.decode_audio_delta(frame) is None


def test_decode_rejects_an_invalid_character_anywhere(fp):
    good = base64.b64encode(random_pcm(600, 27))  # 800 characters: SIMD blocks and scalar tail
    for position in (0, 1, 31, 32, 33, 400, 767, 768, 795, 799):
        for bad in (b"*", b"-", b"_", b"=", b"\x00", b"\xff", b" "):
            delta = good[:position] + bad + good[position + 1 :]
            frame = b'{"type":"response.audio.delta","item_id":"i","delta":"' + delta + b'"}'
            expected = pure.decode_audio_delta(frame)
            assert fp.decode_audio_delta(frame) == expected, (position, bad)
            if bad != b"=":
                assert expected is None


def test_decode_rejects_duplicate_fields(fp):
    frame = b'{"type":"response.audio.delta","item_id":"a","item_id":"b","delta":"AAAA"}'
    assert fp.decode_audio_delta(frame) in (None, ("b", b"\x00\x00\x00"))
    if fp is compiled:
        assert fp.decode_audio_delta(frame) is None


def test_decode_meters_only_what_it_returns(fp):
    pcm = random_pcm(4802, 28)
    meter = fp.LevelMeter()
    assert fp.decode_audio_delta(delta_frame(pcm), meter) == ("item_C1", pcm)
    assert meter.read() == (*fp.measure_level(pcm), 2401)
    broken = delta_frame(pcm)[:-3] + b'*"}'  # invalid base64 at the very end
    assert fp.decode_audio_delta(broken, meter) is None
    assert meter.read()[3] == 0


# ------------------------------------------------------------------------------------- coalescing


def audio_of(frame) -> bytes:
    return base64.b64decode(orjson.loads(frame[HEADER_ROOM:])["audio"])


def test_coalescer_merges_frames_up_to_the_target(fp):
    coalescer = fp.Coalescer(target_bytes=4800)
    chunks = [random_pcm(960, seed) for seed in range(10)]
    frames = [coalescer.push(chunk) for chunk in chunks]
    assert [frame is not None for frame in frames] == [False] * 4 + [True] + [False] * 4 + [True]
    assert audio_of(frames[4]) == b"".join(chunks[:5])
    assert audio_of(frames[9]) == b"".join(chunks[5:])
    assert frames[4] == fp.encode_append(b"".join(chunks[:5]))
    assert coalescer.pending_bytes == 0
    assert coalescer.flush() is None


def test_coalescer_carries_the_odd_byte(fp):
    coalescer = fp.Coalescer(target_bytes=960)
    first, second = random_pcm(961, 1), random_pcm(959, 2)
    frame = coalescer.push(first)
    assert audio_of(frame) == first[:960]
    assert coalescer.pending_bytes == 1
    frame = coalescer.push(second)
    assert audio_of(frame) == first[960:] + second
    assert coalescer.pending_bytes == 0
    assert coalescer.push(b"\x01") is None
    assert coalescer.flush() is None  # half a sample is never sent
    assert coalescer.pending_bytes == 1


def test_coalescer_flush_sends_whole_samples_pending(fp):
    coalescer = fp.Coalescer(target_bytes=4800)
    data = random_pcm(1001, 3)
    assert coalescer.push(data) is None
    assert audio_of(coalescer.flush()) == data[:1000]
    assert coalescer.pending_bytes == 1
    assert coalescer.push(b"\x02\x03") is None
    assert audio_of(coalescer.flush()) == data[1000:] + b"\x02"
    assert coalescer.pending_bytes == 1


@pytest.mark.parametrize("width", [2, 1])
def test_coalescer_sends_a_huge_frame_in_appends_of_bounded_size(fp, width):
    """One 2.5 MiB client frame is three appends, not one 3.3 MiB JSON event (WaaV bug B19; a
    frame past 11.25 MiB would be over OpenAI's 15 MiB append limit and lost): push returns
    them one by one while the target is pending, flush the rest."""
    coalescer = fp.Coalescer(960 * width // 2, sample_width=width)
    audio = bytes(range(256)) * (10 * 1024) + b"\x07" * 3   # 2.5 MiB + 3 bytes
    chunks = []
    frame = coalescer.push(audio)
    while frame is not None:
        chunks.append(audio_of(frame))
        frame = coalescer.push(b"")
    frame = coalescer.flush()
    while frame is not None:
        chunks.append(audio_of(frame))
        frame = coalescer.flush()
    assert all(len(chunk) <= fp.MAX_APPEND_AUDIO_BYTES for chunk in chunks) and len(chunks) == 3
    assert b"".join(chunks) == audio[:len(audio) - len(audio) % width]
    assert coalescer.pending_bytes == len(audio) % width


def test_coalescer_target_is_settable_and_validated(fp):
    coalescer = fp.Coalescer(target_bytes=4800)
    assert coalescer.push(random_pcm(960, 6)) is None
    coalescer.target_bytes = 1920
    assert coalescer.target_bytes == 1920
    assert len(audio_of(coalescer.push(random_pcm(960, 7)))) == 1920
    with pytest.raises(ValueError):
        coalescer.target_bytes = 0
    with pytest.raises(ValueError):
        fp.Coalescer(target_bytes=0)
    with pytest.raises(ValueError):
        fp.Coalescer(target_bytes=960, sample_width=3)
    with pytest.raises(AttributeError):
        coalescer.sample_width = 1


def test_coalescer_g711_has_no_carry_and_meters_every_code(fp):
    meter = fp.LevelMeter("g711_ulaw")
    coalescer = fp.Coalescer(target_bytes=160, sample_width=1, meter=meter)
    assert coalescer.sample_width == 1
    data = random_pcm(161, 8)
    assert audio_of(coalescer.push(data)) == data
    assert coalescer.pending_bytes == 0
    assert meter.read() == (*pure.measure_level(data, "g711_ulaw"), 161)


@pytest.mark.parametrize("flushing", [False, True], ids=["push", "flush"])
def test_a_meter_that_pushes_into_its_coalescer_never_gets_freed_memory_sent(fp, flushing):
    """Found by a fuzzing audit: a meter other than the compiled one is Python code, and one
    that pushed into the coalescer it meters moved its buffer mid-frame; the compiled twin then
    encoded the freed memory (heap pointers, in a frame bound upstream). The frame carries the
    audio the meter was fed."""
    class Reentrant:
        fed: list[bytes] = []

        def feed(self, pcm) -> None:
            self.fed.append(bytes(pcm))
            if len(self.fed) == 1:
                coalescer.push(b"\x55" * 1_000_000)  # grows (moves) the pending buffer

    coalescer = fp.Coalescer(100, 2, Reentrant())
    assert coalescer.push(b"\x11" * 10) is None
    frame = coalescer.flush() if flushing else coalescer.push(b"\x22" * 200)
    expected = b"\x11" * 10 if flushing else b"\x11" * 10 + b"\x22" * 200
    assert audio_of(frame) == Reentrant.fed[0] == expected


def test_coalescer_meters_exactly_the_emitted_samples(fp):
    meter = fp.LevelMeter()
    coalescer = fp.Coalescer(target_bytes=960, meter=meter)
    data = random_pcm(2001, 9)
    emitted = b""
    for start in range(0, 2001, 320):
        frame = coalescer.push(data[start : start + 320])
        emitted += audio_of(frame) if frame is not None else b""
    assert meter.read() == (*fp.measure_level(emitted), len(emitted) // 2)
    assert emitted == data[: len(emitted)]
