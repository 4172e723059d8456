"""Type stub of the compiled `_fastpath`; contracts are documented in `_fastpath/_pure.py`."""
from typing import Callable

from picows import WSFrame, WSListener, WSTransport
from typing_extensions import Buffer

DBFS_FLOOR: float
HEADER_ROOM: int

class LevelMeter:
    def __init__(self) -> None: ...
    def feed(self, pcm: Buffer) -> None: ...
    @property
    def samples(self) -> int: ...
    def read(self) -> tuple[float, float, int, int]: ...

def measure_level(pcm: Buffer) -> tuple[float, float, int]: ...
def encode_append(
    pcm: Buffer, meter: LevelMeter | None = None, out: bytearray | None = None
) -> bytearray: ...
def decode_audio_delta(
    payload: bytes | bytearray | memoryview | str, meter: LevelMeter | None = None
) -> tuple[str, bytes] | None: ...

def decode_transcript_delta(
    payload: bytes | bytearray | memoryview | str,
) -> tuple[str, bytes | None] | None: ...

class Coalescer:
    meter: LevelMeter | None
    def __init__(
        self, target_bytes: int, sample_width: int = 2, meter: LevelMeter | None = None
    ) -> None: ...
    @property
    def target_bytes(self) -> int: ...
    @target_bytes.setter
    def target_bytes(self, value: int) -> None: ...
    @property
    def sample_width(self) -> int: ...
    @property
    def pending_bytes(self) -> int: ...
    def push(self, data: Buffer) -> bytearray | None: ...
    def flush(self) -> bytearray | None: ...
    def discard(self) -> int: ...

def _set_simd(enabled: bool) -> bool:
    """Testing hook: force the scalar kernels (False) or the AVX2 ones where the CPU has them."""

def frame_header(first_byte: int, size: int) -> bytes: ...
def release_handshake(transport: WSTransport) -> None: ...

class AudioPath:
    coalescer: Coalescer
    upstream: WSTransport | None
    flush_armed: bool
    on_pending: Callable[[], None]
    outbound_item: str | None
    item_generated: int
    item_delivered: int
    output_meter: LevelMeter | None
    client: WSTransport | None
    batch: list[bytes]
    batching: bool
    c2u_audio_frames: int
    c2u_audio_bytes: int
    u2c_audio_frames: int
    u2c_audio_bytes: int
    u2c_json_frames: int
    u2c_json_bytes: int
    def __init__(self, coalescer: Coalescer, on_pending: Callable[[], None]) -> None: ...
    def client_audio(self, pcm: Buffer) -> None: ...
    def upstream_audio(self, item_id: str, pcm: bytes) -> bool: ...
    def upstream_transcript(self, item_id: str, event: bytes | None, message_bytes: int) -> bool: ...
    def flush_batch(self) -> None: ...

class ClientLeg(WSListener):
    path: AudioPath | None
    assembling: bool
    max_audio_bytes: int
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None: ...

class UpstreamLeg(WSListener):
    path: AudioPath | None
    assembling: bool
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None: ...
