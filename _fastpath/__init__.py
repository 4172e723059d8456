"""The audio hot path: one API, two implementations.

`_compiled` is the Cython extension built by `pip install`; `_pure` is its pure-Python twin with
the identical API and behaviour. The compiled one is used whenever it imports, unless
`GATEWAY_NO_EXTENSIONS=1` forces the pure one (debugging, or proving both behave the same).

`IMPLEMENTATION` names the one in use ("compiled" or "pure"). A silent fallback is the worst
performance bug there is, so tests assert which one is loaded, and a node says so as it starts
(`NO_EXTENSIONS`: the pure one was asked for; `COMPILED_IMPORT_ERROR`: why the compiled one
did not load when it was not).
"""
import os

from ._constants import CLIENT_BATCH_BYTES, DBFS_FLOOR, G711_TO_PCM16, HEADER_ROOM, MAX_APPEND_AUDIO_BYTES

NO_EXTENSIONS: bool = os.environ.get("GATEWAY_NO_EXTENSIONS", "") not in ("", "0")
COMPILED_IMPORT_ERROR: str | None = None

if NO_EXTENSIONS:
    from . import _pure as _impl
else:
    try:
        from . import _compiled as _impl
    except ImportError as exc:  # not built (a source tree without `pip install`), or built
        COMPILED_IMPORT_ERROR = str(exc)  # against another picows or Python
        from . import _pure as _impl

IMPLEMENTATION: str = "compiled" if _impl.__name__.endswith("_compiled") else "pure"

LevelMeter = _impl.LevelMeter
measure_level = _impl.measure_level
encode_append = _impl.encode_append
decode_audio_delta = _impl.decode_audio_delta
decode_transcript_delta = _impl.decode_transcript_delta
Coalescer = _impl.Coalescer
# the relay's per-frame path: a session's audio state and the two socket-leg listener bases
AudioPath = _impl.AudioPath
ClientLeg = _impl.ClientLeg
DirectReader = _impl.DirectReader
UpstreamLeg = _impl.UpstreamLeg
frame_header = _impl.frame_header
release_handshake = _impl.release_handshake

__all__ = [
    "CLIENT_BATCH_BYTES",
    "COMPILED_IMPORT_ERROR",
    "DBFS_FLOOR",
    "G711_TO_PCM16",
    "HEADER_ROOM",
    "IMPLEMENTATION",
    "MAX_APPEND_AUDIO_BYTES",
    "NO_EXTENSIONS",
    "LevelMeter",
    "measure_level",
    "encode_append",
    "decode_audio_delta",
    "decode_transcript_delta",
    "Coalescer",
    "AudioPath",
    "ClientLeg",
    "DirectReader",
    "UpstreamLeg",
    "frame_header",
    "release_handshake",
]
