"""Properties of the audio fast path (issue 4, done-means 3), checked with hypothesis.

The compiled module must agree with the pure twin on everything, through both of its kernel
sets (SIMD where the CPU has it, and the portable scalar one), and its audio-delta decoder must
be exact where it answers and silent ("not handled") where it is unsure.
"""
from __future__ import annotations

import base64
import contextlib

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _fastpath._compiled as compiled
import _fastpath._pure as pure

HEADER_ROOM = pure.HEADER_ROOM
KERNELS = [True, False] if compiled._set_simd(True) else [False]

# Modest example counts: the whole file stays well under 20 s.
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

pcm_bytes = st.binary(min_size=0, max_size=3000)
formats = st.sampled_from(["pcm16", "g711_ulaw", "g711_alaw"])


@contextlib.contextmanager
def kernels(simd: bool):
    compiled._set_simd(simd)
    try:
        yield
    finally:
        compiled._set_simd(True)


def every_residue(data: bytes):
    """`data` trimmed by 0..5 bytes: every length mod 2 and mod 3 (mod 6) from one example."""
    return [data[: len(data) - k] for k in range(6) if len(data) >= k]


def wrap_as_delta(audio: str, item_id: str, dialect: str, order: list[int], extra: dict) -> bytes:
    fields = [
        ("type", "response.output_audio.delta" if dialect == "ga" else "response.audio.delta"),
        ("item_id", item_id),
        ("delta", audio),
        ("output_index", 0),
    ]
    fields = [fields[i] for i in order] + list(extra.items())
    return orjson.dumps(dict(fields))


simple_ids = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                            exclude_characters='"\\'), min_size=1, max_size=24)
extra_fields = st.dictionaries(
    st.sampled_from(["event_id", "response_id", "obfuscation", "content_index", "flag"]),
    st.one_of(simple_ids, st.integers(-10**6, 10**6), st.booleans(), st.none()),
    max_size=4,
)


@PROPERTY
@given(pcm_bytes, formats)
def test_encode_compiled_equals_pure_for_every_length(data, audio_format):
    for chunk in every_residue(data):
        reference_meter = pure.LevelMeter(audio_format)
        expected = pure.encode_append(chunk, reference_meter)
        expected_level = reference_meter.read()
        for simd in KERNELS:
            with kernels(simd):
                meter = compiled.LevelMeter(audio_format)
                assert compiled.encode_append(chunk, meter) == expected
                assert meter.read() == expected_level


@PROPERTY
@given(pcm_bytes, st.lists(st.integers(0, 3000), max_size=6), formats)
def test_meters_agree_bit_for_bit(data, cuts, audio_format):
    reference = pure.LevelMeter(audio_format)
    meters = {simd: compiled.LevelMeter(audio_format) for simd in KERNELS}
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for start, end in zip(bounds, bounds[1:]):
        reference.feed(data[start:end])
        for simd, meter in meters.items():
            with kernels(simd):
                meter.feed(data[start:end])
    expected = reference.read()
    for meter in meters.values():
        assert meter.read() == expected


@PROPERTY
@given(
    st.lists(st.binary(min_size=0, max_size=700), max_size=12),
    st.lists(st.booleans(), min_size=12, max_size=12),
    st.integers(1, 3000),
    st.sampled_from([1, 2]),
)
def test_coalescer_chunkings_agree_and_lose_nothing(chunks, flush_after, target, width):
    audio_format = "pcm16" if width == 2 else "g711_alaw"
    reference = pure.Coalescer(target, width, pure.LevelMeter(audio_format))
    coalescers = {simd: compiled.Coalescer(target, width, compiled.LevelMeter(audio_format)) for simd in KERNELS}
    emitted = []
    for chunk, flush in zip(chunks, flush_after):
        expected = reference.push(chunk)
        extra = reference.flush() if flush else None
        for simd, coalescer in coalescers.items():
            with kernels(simd):
                assert coalescer.push(chunk) == expected
                assert (coalescer.flush() if flush else None) == extra
                assert coalescer.pending_bytes == reference.pending_bytes
        emitted += [frame for frame in (expected, extra) if frame is not None]
    final = reference.flush()
    expected_level = reference.meter.read()
    for simd, coalescer in coalescers.items():
        with kernels(simd):
            assert coalescer.flush() == final
        assert coalescer.meter.read() == expected_level
    if final is not None:
        emitted.append(final)
    data = b"".join(chunks)
    audio = b"".join(base64.b64decode(orjson.loads(f[HEADER_ROOM:])["audio"]) for f in emitted)
    carried = len(data) % width
    assert audio == data[: len(data) - carried]
    assert reference.pending_bytes == carried


@PROPERTY
@given(
    pcm_bytes,
    simple_ids,
    st.sampled_from(["ga", "beta"]),
    st.permutations([0, 1, 2, 3]),
    extra_fields,
    formats,
)
def test_decode_of_encode_round_trips(data, item_id, dialect, order, extra, audio_format):
    for chunk in every_residue(data):
        audio = orjson.loads(compiled.encode_append(chunk)[HEADER_ROOM:])["audio"]
        frame = wrap_as_delta(audio, item_id, dialect, order, extra)
        reference_meter = pure.LevelMeter(audio_format)
        assert pure.decode_audio_delta(frame, reference_meter) == (item_id, chunk)
        expected_level = reference_meter.read()
        for simd in KERNELS:
            with kernels(simd):
                meter = compiled.LevelMeter(audio_format)
                assert compiled.decode_audio_delta(frame, meter) == (item_id, chunk)
                assert meter.read() == expected_level


def orjson_accepts(frame: bytes) -> bool:
    try:
        orjson.loads(frame)
    except orjson.JSONDecodeError:
        return False
    return True


mutation = st.tuples(
    st.sampled_from(["flip", "truncate", "insert", "delete", "replace"]),
    st.integers(0, 10**6),
    st.integers(0, 255),
)


@PROPERTY
@given(
    st.binary(min_size=0, max_size=200),
    simple_ids,
    st.sampled_from(["ga", "beta"]),
    st.permutations([0, 1, 2, 3]),
    extra_fields,
    st.lists(mutation, min_size=1, max_size=3),
)
def test_decoder_never_accepts_what_the_json_parser_rejects(data, item_id, dialect, order, extra,
                                                            mutations):
    frame = bytearray(wrap_as_delta(base64.b64encode(data).decode(), item_id, dialect, order, extra))
    for kind, position, value in mutations:
        at = position % (len(frame) + 1)
        if kind == "flip" and at < len(frame):
            frame[at] ^= 1 << (value % 8)
        elif kind == "truncate":
            del frame[at:]
        elif kind == "insert":
            frame[at:at] = bytes([value])
        elif kind == "delete":
            del frame[at:at + 1]
        elif kind == "replace" and at < len(frame):
            frame[at] = b'"\\{}[],:= \x00\xc3A0/+'[value % 15]
    frame = bytes(frame)
    expected = pure.decode_audio_delta(frame)
    for simd in KERNELS:
        with kernels(simd):
            result = compiled.decode_audio_delta(frame)
        if result is not None:
            assert orjson_accepts(frame)
            assert result == expected


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
event_types = st.sampled_from([
    "response.output_audio_transcript.delta", "response.output_text.delta", "response.done",
    "response.audio_transcript.delta", "session.created", "error", "input_audio_buffer.append",
    "response.output_audio.done", "response.audio.done", "response.output_audio.delta ",
    "Response.audio.delta", "response.output_audio.delta", "response.audio.delta",
]) | st.text(max_size=30)


@PROPERTY
@given(
    event_types,
    st.dictionaries(
        st.sampled_from(["item_id", "delta", "event_id", "response_id", "output_index", "x"])
        | st.text(max_size=10),
        json_values | st.sampled_from(["AAAA", "QUJD", "", "QQ==", "item_1"]),
        max_size=6,
    ),
    st.booleans(),
)
def test_decoder_never_misreads_another_event(event_type, fields, type_first):
    event = {"type": event_type, **fields} if type_first else {**fields, "type": event_type}
    frame = orjson.dumps(event)
    expected = pure.decode_audio_delta(frame)
    for simd in KERNELS:
        with kernels(simd):
            result = compiled.decode_audio_delta(frame)
        assert result is None or result == expected
        if event_type not in ("response.output_audio.delta", "response.audio.delta"):
            assert result is None
