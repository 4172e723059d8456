"""The constants both implementations share, in a module that imports nothing.

`_compiled` imports them from here rather than from `_pure`, so a node running the compiled fast
path never loads numpy (and with it OpenBLAS, whose thread pool would make the process
multi-threaded: every socket syscall then takes the kernel's slower shared-file-table path).
"""

#: Bytes kept free in front of every encoded frame, so picows can write the WebSocket header
#: in place (`WSTransport.send_reuse_external_bytearray` needs at least 14).
HEADER_ROOM = 14
#: The level reported for digital silence.
DBFS_FLOOR = -100.0
#: A session's batch of client frames (relayed reply audio and transcript deltas) is written
#: when it reaches this many bytes, not only at the end of the socket read that produced it: a
#: read can hold a megabyte of a fast upstream's deltas (picows doubles its read buffer while
#: reads fill it), and a client that stopped reading must get no more than this past its
#: transport's high-water mark before the pause reaches the session and the queue takes over.
CLIENT_BATCH_BYTES = 32 * 1024
#: The most audio one `input_audio_buffer.append` carries (bytes, whole samples of either
#: width): a client frame larger than this goes up in several appends. OpenAI refuses an append
#: over 15 MiB of base64 (11.25 MiB of audio), and a multi-megabyte JSON event helps no one.
MAX_APPEND_AUDIO_BYTES = 1 << 20

#: The audio formats a `LevelMeter` reads (the client protocol's `input_audio_format` /
#: `output_audio_format`): PCM16 little-endian, or 8-bit G.711 (µ-law, A-law).
AUDIO_FORMATS = ("pcm16", "g711_ulaw", "g711_alaw")


def _ulaw_to_linear(code: int) -> int:
    """ITU-T G.711 µ-law expansion of one code to its linear 16-bit value (the classic
    reference decoder: 0xFF -> 0, 0x80 -> 32124, 0x00 -> -32124)."""
    code = ~code & 0xFF
    magnitude = (((code & 0x0F) << 3) + 0x84) << ((code >> 4) & 0x07)
    return 0x84 - magnitude if code & 0x80 else magnitude - 0x84


def _alaw_to_linear(code: int) -> int:
    """ITU-T G.711 A-law expansion of one code to its linear 16-bit value (the classic
    reference decoder: 0xD5 -> 8, 0x55 -> -8, 0xAA -> 32256, 0x2A -> -32256)."""
    code ^= 0x55
    segment = (code >> 4) & 0x07
    magnitude = ((code & 0x0F) << 4) + (8 if segment == 0 else 0x108)
    if segment > 1:
        magnitude <<= segment - 1
    return magnitude if code & 0x80 else -magnitude


#: G.711 code (0..255) -> linear PCM16 value, per law: how G.711 audio is metered. Both
#: implementations read these (the compiled one copies them into C arrays at import).
G711_TO_PCM16 = {
    "g711_ulaw": tuple(_ulaw_to_linear(code) for code in range(256)),
    "g711_alaw": tuple(_alaw_to_linear(code) for code in range(256)),
}
