"""Codec micro-benchmark: the audio fast path against its peers (SPEC §8, issue 4 done-means 1).

    .venv/bin/python bench/codec.py [--reps 31] [--batch-ms 2]

For PCM16 chunks of 20 ms (960 B), 100 ms (4,800 B) and 1 s (48,000 B) at 24 kHz it measures,
side by side in one run:
  encode  PCM -> complete `input_audio_buffer.append` JSON frame
  decode  `response.output_audio.delta` JSON frame -> (item_id, PCM)
for the compiled `_fastpath`, its pure-Python twin, stdlib `base64`+`json`, and the best
pure-Python composition `pybase64`+`orjson`; plus the Coalescer's steady-state cost per 20 ms
push. Every candidate is timed in batches of ~`--batch-ms`, the candidates interleaved batch by
batch (so drift in CPU clock or noise hits all of them alike), and the median batch is reported
in µs per operation. Ratios are "candidate time / compiled time" (higher = compiled faster).
Runtime is bounded (about 20-30 s with the defaults). This is a program, not a test.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402
import pybase64  # noqa: E402

import _fastpath._compiled as compiled  # noqa: E402
import _fastpath._pure as pure  # noqa: E402

HEADER_ROOM = pure.HEADER_ROOM
SIZES = [("20 ms", 960), ("100 ms", 4_800), ("1 s", 48_000)]
AUDIO_DELTA_TYPES = frozenset(("response.output_audio.delta", "response.audio.delta"))
# Done-means 1 of issue 4: (candidate, sizes, minimum ratio over compiled)
TARGETS = [
    ("encode", "pybase64+orjson", (960, 4_800), 1.5),
    ("encode", "stdlib base64+json", (960, 4_800), 10.0),
    ("decode", "orjson+pybase64", (960, 4_800), 2.0),
]


def encode_candidates(pcm: bytes):
    meter = compiled.LevelMeter()

    def stdlib():
        return json.dumps(
            {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode("ascii")},
            separators=(",", ":"),
        ).encode()

    def fastest_python():
        return orjson.dumps(
            {"type": "input_audio_buffer.append", "audio": pybase64.b64encode_as_string(pcm)}
        )

    return {
        "compiled": lambda: compiled.encode_append(pcm),
        "compiled + fused meter": lambda: compiled.encode_append(pcm, meter),
        "pure twin": lambda: pure.encode_append(pcm),
        "stdlib base64+json": stdlib,
        "pybase64+orjson": fastest_python,
    }


def decode_candidates(frame: bytes):
    meter = compiled.LevelMeter()

    # The peers do the same job: recognise the event, take item_id, decode strict base64.
    def stdlib():
        event = json.loads(frame)
        if event.get("type") in AUDIO_DELTA_TYPES:
            return event["item_id"], base64.b64decode(event["delta"], validate=True)
        return None

    def fastest_python():
        event = orjson.loads(frame)
        if event.get("type") in AUDIO_DELTA_TYPES:
            return event["item_id"], pybase64.b64decode(event["delta"], validate=True)
        return None

    return {
        "compiled": lambda: compiled.decode_audio_delta(frame),
        "compiled + fused meter": lambda: compiled.decode_audio_delta(frame, meter),
        "pure twin": lambda: pure.decode_audio_delta(frame),
        "json+base64 (stdlib)": stdlib,
        "orjson+pybase64": fastest_python,
    }


def coalescer_candidates(frames: list[bytes], target: int):
    def steady(module):
        coalescer = module.Coalescer(target, 2, module.LevelMeter())
        position = [0]

        def push():
            frame = frames[position[0]]
            position[0] = (position[0] + 1) % len(frames)
            return coalescer.push(frame)

        return push

    return {"compiled": steady(compiled), "pure twin": steady(pure)}


def calibrate(fn, batch_s: float) -> int:
    """Calls per batch so one batch takes about batch_s."""
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= batch_s / 4 or number >= 1 << 20:
            return max(1, int(number * batch_s / max(elapsed, 1e-9)))
        number *= 4


def measure(candidates: dict, reps: int, batch_s: float) -> dict[str, float]:
    """Median µs per call of each candidate, batches interleaved round-robin."""
    numbers = {name: calibrate(fn, batch_s) for name, fn in candidates.items()}
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for rep in range(reps):
        # rotate the order each round so no candidate always runs right after the same one
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            fn, number = candidates[name], numbers[name]
            start = time.perf_counter_ns()
            for _ in range(number):
                fn()
            samples[name].append((time.perf_counter_ns() - start) / number / 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def check_equivalence(pcm: bytes, frame: bytes) -> None:
    """Never benchmark something that gives a different answer."""
    expected = encode_candidates(pcm)["stdlib base64+json"]()
    for name, fn in encode_candidates(pcm).items():
        result = fn()
        body = result[HEADER_ROOM:] if isinstance(result, bytearray) else result
        assert orjson.loads(body) == orjson.loads(expected), name
    for name, fn in decode_candidates(frame).items():
        assert fn() == ("item_C1", pcm), name


def table(title: str, sizes: list[str], results: dict[str, dict[str, float]]) -> str:
    names = list(next(iter(results.values())))
    lines = [f"{title}", "| implementation | " + " | ".join(
        f"{s} µs | {s} ×" for s in sizes) + " |", "|---|" + "---:|---:|" * len(sizes)]
    for name in names:
        cells = []
        for size in sizes:
            value, base = results[size][name], results[size]["compiled"]
            cells += [f"{value:,.3f}" if value < 100 else f"{value:,.1f}", f"{value / base:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=31, help="interleaved batches per candidate")
    parser.add_argument("--batch-ms", type=float, default=2.0, help="target duration of a batch")
    args = parser.parse_args()
    batch_s = args.batch_ms / 1000

    simd = compiled._set_simd(True)
    print(f"python {platform.python_version()} on {platform.machine()}, "
          f"{os.cpu_count()} CPUs; compiled kernels: {'AVX2' if simd else 'scalar'}; "
          f"median of {args.reps} interleaved batches of ~{args.batch_ms:g} ms")
    started = time.perf_counter()
    encode_results, decode_results = {}, {}
    for label, size in SIZES:
        pcm = os.urandom(size)
        frame = orjson.dumps({
            "type": "response.output_audio.delta", "event_id": "event_CzcQ7kWq1h9bW3pD",
            "response_id": "resp_CzcQ6yP1t0", "item_id": "item_C1", "output_index": 0,
            "content_index": 0, "delta": base64.b64encode(pcm).decode("ascii"),
        })
        check_equivalence(pcm, frame)
        encode_results[label] = measure(encode_candidates(pcm), args.reps, batch_s)
        decode_results[label] = measure(decode_candidates(frame), args.reps, batch_s)
    labels = [label for label, _ in SIZES]
    print()
    print(table("encode: PCM -> input_audio_buffer.append frame (× = time / compiled)",
                labels, encode_results))
    print()
    print(table("decode: response.output_audio.delta frame -> (item_id, PCM) (× = time / compiled)",
                labels, decode_results))

    frames = [os.urandom(960) for _ in range(50)]
    coalescer_results = {
        f"target {target} B": measure(coalescer_candidates(frames, target), args.reps, batch_s)
        for target in (960, 4_800)
    }
    print()
    print("Coalescer: steady state, 20 ms (960 B) pushes, metered; µs per push (emits every "
          "push at target 960 B, every 5th at 4,800 B)")
    print("| implementation | " + " | ".join(f"{t} µs" for t in coalescer_results) + " |")
    print("|---|" + "---:|" * len(coalescer_results))
    for name in ("compiled", "pure twin"):
        print(f"| {name} | " + " | ".join(
            f"{r[name]:.3f}" for r in coalescer_results.values()) + " |")

    print()
    ok = True
    size_labels = {size: label for label, size in SIZES}
    for kind, peer, sizes, minimum in TARGETS:
        results = encode_results if kind == "encode" else decode_results
        for size in sizes:
            label = size_labels[size]
            ratio = results[label][peer] / results[label]["compiled"]
            metered = results[label][peer] / results[label]["compiled + fused meter"]
            passed = ratio >= minimum and metered >= minimum
            ok &= passed
            print(f"target: {kind} {label}: compiled {ratio:.2f}× (with fused meter {metered:.2f}×) "
                  f"faster than {peer}, need >= {minimum:g}×: {'PASS' if passed else 'MISS'}")
    print(f"\n(total {time.perf_counter() - started:.1f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
