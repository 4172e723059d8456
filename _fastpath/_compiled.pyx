# Compiled half of `_fastpath`; the pure twin `_pure.py` is the reference behaviour and carries
# the full docstrings. Directives are set in setup.py, in one place.
#
# Layout: the byte kernels (base64 both ways with PCM16 metering fused in, scalar + AVX2; G.711
# metering through a lookup table) are C in _kernels.h; this module owns the Python objects:
# buffers in and out, the JSON scanner of upstream audio and transcript deltas, LevelMeter and
# Coalescer, and the relay's per-frame path (AudioPath; the two picows listener bases, ClientLeg
# and UpstreamLeg; DirectReader, which reads their sockets itself once audio flows). Every input
# buffer is acquired with the buffer protocol (or read from picows' frame or the reader's buffer)
# and released or consumed before returning: nothing here keeps a reference to caller memory.
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_Check, PyByteArray_CheckExact
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.ref cimport PyObject
from cpython.unicode cimport PyUnicode_CheckExact, PyUnicode_DecodeASCII
from libc.math cimport log10, sqrt
from libc.stdint cimport int16_t, uint8_t, uint32_t, uint64_t
from libc.errno cimport EAGAIN, EINTR, errno
from libc.string cimport memchr, memcmp, memcpy, memmove, memset
from posix.unistd cimport close as close_fd
# picows' own declarations: the legs below subclass its listener and call its transports
# through their C vtables (no Python call per frame). The layout must match the installed
# picows exactly, which is why pyproject pins one picows version for the build and the run.
from picows.picows cimport WSFrame, WSListener, WSMsgType, WSTransport

import logging

from ._constants import AUDIO_FORMATS, CLIENT_BATCH_BYTES, DBFS_FLOOR, G711_TO_PCM16, HEADER_ROOM, MAX_APPEND_AUDIO_BYTES


cdef extern from "Python.h":
    # the same call, declared without `except -1`: failure is an answer here, not an error
    int _try_get_buffer "PyObject_GetBuffer"(object obj, Py_buffer* view, int flags)
    void PyErr_Clear()
    ctypedef struct PyByteArrayObject:
        Py_ssize_t ob_exports
    object PyByteArray_FromStringAndSize(const char* string, Py_ssize_t length)
    int PyByteArray_Resize(object bytearray, Py_ssize_t length) except -1
    bint PyMemoryView_Check(object obj)
    bint PyUnicode_IS_COMPACT_ASCII(object obj)
    void* PyUnicode_DATA(object obj)
    Py_ssize_t PyUnicode_GET_LENGTH(object obj)


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        int fd
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    enum:
        EPOLLIN
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)


cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int fd, void* buf, size_t size, int flags)


cdef extern from "_kernels.h" nogil:
    const double DBFS_FLOOR_C "FP_DBFS_FLOOR"
    const uint64_t EXACT_DOUBLE_MAX "FP_EXACT_DOUBLE_MAX"  # every integer up to it is exact
    ctypedef struct fp_level:
        uint64_t sum_squares
        uint64_t peak
        uint64_t clipped
        uint64_t samples
    void fp_init()
    int fp_set_simd(int enabled)
    void fp_meter(const uint8_t* p, size_t n, fp_level* lv)
    void fp_meter_table(const uint8_t* p, size_t n, const int16_t* table, uint64_t clip_level,
                        fp_level* lv)
    size_t fp_b64_encode(const uint8_t* src, size_t n, char* dst, fp_level* lv)
    size_t fp_b64_decoded_size(const char* src, size_t length)
    int fp_b64_decode(const char* src, size_t length, uint8_t* dst, fp_level* lv)


fp_init()

cdef enum:
    # bytes of `{"type":"input_audio_buffer.append","audio":"` and `"}`
    APPEND_PREFIX_LEN = 45
    APPEND_SUFFIX_LEN = 2
    # _constants.HEADER_ROOM, checked against it at import below
    HEADER_ROOM_C = 14

cdef Py_ssize_t _MAX_APPEND_AUDIO = MAX_APPEND_AUDIO_BYTES
cdef const char* APPEND_PREFIX = b'{"type":"input_audio_buffer.append","audio":"'
cdef const char* APPEND_SUFFIX = b'"}'
cdef const char* GA_DELTA_TYPE = b"response.output_audio.delta"
cdef const char* BETA_DELTA_TYPE = b"response.audio.delta"
cdef const char* GA_TRANSCRIPT_TYPE = b"response.output_audio_transcript.delta"
cdef const char* BETA_TRANSCRIPT_TYPE = b"response.audio_transcript.delta"

assert HEADER_ROOM == HEADER_ROOM_C and DBFS_FLOOR == DBFS_FLOOR_C
assert len(b'{"type":"input_audio_buffer.append","audio":"') == APPEND_PREFIX_LEN

# G.711 code -> linear PCM16, per law, as C arrays (the shared tables of _constants), and each
# law's clip level (its largest magnitude). A LevelMeter's `_law` indexes AUDIO_FORMATS: 0 is
# PCM16, 1 and 2 the laws, whose table is G711_TABLE[_law - 1].
cdef int16_t G711_TABLE[2][256]
cdef uint64_t G711_CLIP[2]
assert AUDIO_FORMATS == ("pcm16", "g711_ulaw", "g711_alaw")


def _load_g711_tables():
    cdef int law, code
    for law in range(2):
        table = G711_TO_PCM16[AUDIO_FORMATS[law + 1]]
        for code in range(256):
            G711_TABLE[law][code] = table[code]
        G711_CLIP[law] = max(abs(value) for value in table)


_load_g711_tables()


def _g711_table(audio_format):
    """Testing hook: the C table a G.711 meter expands `audio_format`'s codes through."""
    cdef int law = AUDIO_FORMATS.index(audio_format) - 1
    if law < 0:
        raise ValueError("not a G.711 format")
    return tuple([G711_TABLE[law][code] for code in range(256)])


def _set_simd(bint enabled):
    """Testing hook: enable (default when the CPU has AVX2) or disable the SIMD kernels.

    Returns whether SIMD kernels are now in use. Process-wide; not for production use.
    """
    return bool(fp_set_simd(enabled))


cdef int _get_pcm_buffer(object pcm, Py_buffer* view) except -1:
    """Acquire `pcm` as a contiguous byte buffer, failing as the pure twin's
    `memoryview(pcm).cast("B")` does for objects that are not C-contiguous buffers."""
    if _try_get_buffer(pcm, view, PyBUF_SIMPLE) == 0:
        return 0
    PyErr_Clear()
    # Re-raise with the pure twin's exception (TypeError/ValueError); if that somehow succeeds,
    # take the cast view's buffer, which is contiguous by construction.
    cast = memoryview(pcm).cast("B")
    PyObject_GetBuffer(cast, view, PyBUF_SIMPLE)
    return 0


cdef inline double _dbfs(double amplitude) noexcept nogil:
    cdef double level
    if amplitude <= 0.0:
        return DBFS_FLOOR_C
    level = 20.0 * log10(amplitude / 32768.0)
    return level if level > DBFS_FLOOR_C else DBFS_FLOOR_C


cdef class LevelMeter:
    """Accumulates the level of audio fed to it, until `read()` takes and resets it.

    Same contract as the pure twin: `audio_format` ("pcm16" by default, or a G.711 law; settable
    between feeds) says how `feed` reads its bytes. PCM16 is metered by the kernels, fused into
    the base64 passes where the meter is handed to them; G.711 codes are expanded through a
    table in a pass of their own. Results are bit-identical to the pure twin's: the sums are
    exact integers and `read()` divides them the way Python divides ints whenever a double could
    not hold them exactly.
    """
    cdef uint64_t _sum_squares_lo
    cdef uint64_t _sum_squares_hi  # carries out of the low word: sum = hi * 2**64 + lo
    cdef uint64_t _peak
    cdef uint64_t _clipped
    cdef uint64_t _samples
    cdef int _law  # index into AUDIO_FORMATS: 0 PCM16 (the only one fused into base64 passes)

    def __init__(self, audio_format="pcm16"):
        self.audio_format = audio_format

    @property
    def audio_format(self):
        return AUDIO_FORMATS[self._law]

    @audio_format.setter
    def audio_format(self, audio_format):
        if audio_format not in AUDIO_FORMATS:
            raise ValueError(f"audio_format must be one of {', '.join(AUDIO_FORMATS)}")
        self._law = AUDIO_FORMATS.index(audio_format)

    cdef inline void _add(self, const fp_level* lv) noexcept nogil:
        cdef uint64_t before = self._sum_squares_lo
        self._sum_squares_lo += lv.sum_squares
        if self._sum_squares_lo < before:
            self._sum_squares_hi += 1
        if lv.peak > self._peak:
            self._peak = lv.peak
        self._clipped += lv.clipped
        self._samples += lv.samples

    cdef inline void _feed_ptr(self, const uint8_t* data, Py_ssize_t size) noexcept nogil:
        cdef fp_level lv
        memset(&lv, 0, sizeof(lv))
        if self._law == 0:
            fp_meter(data, <size_t>size, &lv)
        else:
            fp_meter_table(data, <size_t>size, G711_TABLE[self._law - 1], G711_CLIP[self._law - 1], &lv)
        self._add(&lv)

    def feed(self, pcm):
        cdef Py_buffer view
        _get_pcm_buffer(pcm, &view)
        self._feed_ptr(<const uint8_t*>view.buf, view.len)
        PyBuffer_Release(&view)

    @property
    def samples(self):
        """Samples fed since the last `read()`."""
        return self._samples

    def read(self):
        """Return `(rms_dbfs, peak_dbfs, clipped, samples)` since the last read, and reset."""
        cdef double mean_square
        cdef double rms = 0.0
        if self._samples:
            if self._sum_squares_hi == 0 and self._sum_squares_lo <= EXACT_DOUBLE_MAX \
                    and self._samples <= EXACT_DOUBLE_MAX:
                # both exact as doubles, so one rounding, as in Python's int / int
                mean_square = <double>self._sum_squares_lo / <double>self._samples
            else:
                mean_square = ((<object>self._sum_squares_hi << 64) + self._sum_squares_lo) \
                    / <object>self._samples
            rms = sqrt(mean_square)
        result = (_dbfs(rms), _dbfs(<double>self._peak), self._clipped, self._samples)
        self._sum_squares_lo = 0
        self._sum_squares_hi = 0
        self._peak = 0
        self._clipped = 0
        self._samples = 0
        return result


def measure_level(pcm, audio_format="pcm16"):
    """One-shot level of a chunk of `audio_format` audio: `(rms_dbfs, peak_dbfs, clipped)`."""
    cdef LevelMeter meter = LevelMeter(audio_format)
    meter.feed(pcm)
    rms_dbfs, peak_dbfs, clipped, _ = meter.read()
    return rms_dbfs, peak_dbfs, clipped


cdef inline Py_ssize_t _append_size(Py_ssize_t pcm_bytes) noexcept nogil:
    return HEADER_ROOM_C + APPEND_PREFIX_LEN + (pcm_bytes + 2) // 3 * 4 + APPEND_SUFFIX_LEN


cdef inline void _write_append(char* frame, const uint8_t* pcm, Py_ssize_t size,
                               LevelMeter meter) noexcept:
    """Fill a frame of `_append_size(size)` bytes: zeroed header room, then the JSON text."""
    cdef fp_level lv
    cdef char* pos = frame + HEADER_ROOM_C
    memset(frame, 0, HEADER_ROOM_C)
    memcpy(pos, APPEND_PREFIX, APPEND_PREFIX_LEN)
    pos += APPEND_PREFIX_LEN
    if meter is None:
        pos += fp_b64_encode(pcm, <size_t>size, pos, NULL)
    else:
        memset(&lv, 0, sizeof(lv))
        pos += fp_b64_encode(pcm, <size_t>size, pos, &lv)
        meter._add(&lv)
    memcpy(pos, APPEND_SUFFIX, APPEND_SUFFIX_LEN)


cdef object _new_append(const uint8_t* pcm, Py_ssize_t size, LevelMeter meter):
    cdef object frame = PyByteArray_FromStringAndSize(NULL, _append_size(size))
    _write_append(PyByteArray_AS_STRING(frame), pcm, size, meter)
    return frame


cdef object _encode_into(object scratch, const uint8_t* pcm, Py_ssize_t size, LevelMeter meter):
    """The append frame of `pcm`, written into `scratch` (a bytearray, returned) or a new one."""
    if scratch is None:
        return _new_append(pcm, size, meter)
    PyByteArray_Resize(scratch, _append_size(size))
    _write_append(PyByteArray_AS_STRING(scratch), pcm, size, meter)
    return scratch


def encode_append(pcm, meter=None, out=None):
    """Encode PCM bytes as a complete `input_audio_buffer.append` JSON frame, in one pass.

    Same contract as the pure twin: returns a bytearray whose first HEADER_ROOM bytes are free
    (zeroed) and whose remainder is exactly the JSON text; `out` (a bytearray with no live
    exports) is resized, filled and returned instead of a new one; `meter`, when given, is fed the
    same audio — a compiled PCM16 LevelMeter in the encoding pass itself, anything else (a G.711
    meter included) by its `feed(pcm)` first. `pcm` is any C-contiguous buffer, read only during
    the call.
    """
    cdef Py_buffer view
    cdef LevelMeter fused = None
    cdef Py_ssize_t size
    if meter is not None:
        if type(meter) is LevelMeter and (<LevelMeter>meter)._law == 0:
            fused = <LevelMeter>meter
        else:
            meter.feed(pcm)
    if out is not None and out is pcm:
        pcm = bytes(pcm)  # encoding a bytearray into itself: read a snapshot, as the twin does
    _get_pcm_buffer(pcm, &view)
    try:
        if out is None:
            return _new_append(<const uint8_t*>view.buf, view.len, fused)
        if not PyByteArray_Check(out):
            if fused is not None:
                fused._feed_ptr(<const uint8_t*>view.buf, view.len)
            raise TypeError(f"out must be a bytearray, not {type(out).__name__}")
        if (<PyByteArrayObject*>out).ob_exports > 0:
            # the twin's `del out[:]` refuses here even when the size would not change
            if fused is not None:
                fused._feed_ptr(<const uint8_t*>view.buf, view.len)
            raise BufferError("Existing exports of data: object cannot be re-sized")
        PyByteArray_Resize(out, _append_size(view.len))
        _write_append(PyByteArray_AS_STRING(out), <const uint8_t*>view.buf, view.len, fused)
        return out
    finally:
        PyBuffer_Release(&view)


# ------------------------------------------------------- upstream audio / transcript delta scanner

cdef enum DeltaKind:
    NOT_A_DELTA = 0
    AUDIO_DELTA = 1
    TRANSCRIPT_DELTA = 2


cdef struct DeltaFields:
    int kind
    const char* item_id
    Py_ssize_t item_id_len
    const char* delta
    Py_ssize_t delta_len
    const char* response_id  # NULL when absent
    Py_ssize_t response_id_len
    bint response_id_not_string  # present but a number or literal: only audio ignores that


cdef enum Key:
    KEY_OTHER = 0
    KEY_TYPE = 1
    KEY_ITEM_ID = 2
    KEY_DELTA = 4
    KEY_RESPONSE_ID = 8


cdef inline bint _is_ws(unsigned char c) noexcept nogil:
    return c == b' ' or c == b'\t' or c == b'\n' or c == b'\r'


cdef inline const char* _skip_ws(const char* p, const char* end) noexcept nogil:
    while p < end and _is_ws(p[0]):
        p += 1
    return p


cdef inline const char* _simple_string_end(const char* p, const char* end) noexcept nogil:
    """`p` is just past an opening quote: return the closing quote, or NULL if the string has
    an escape, a control character, non-ASCII, or no end. ("Simple": bytes == its str.)"""
    cdef unsigned char c
    while p < end:
        c = <unsigned char>p[0]
        if c == b'"':
            return p
        if c < 0x20 or c >= 0x7F or c == b'\\':
            return NULL
        p += 1
    return NULL


cdef inline const char* _digits(const char* p, const char* end, int most) noexcept nogil:
    """Skip 1..most ASCII digits; NULL if there are none or more than `most`."""
    cdef const char* start = p
    while p < end and b'0' <= p[0] <= b'9':
        p += 1
    if p == start or p - start > most:
        return NULL
    return p


cdef inline const char* _simple_number_end(const char* p, const char* end) noexcept nogil:
    """A JSON number short enough that every parser agrees on it (<= 15 digits each side, an
    exponent of at most 2 digits, so never infinity): return its end, else NULL."""
    if p < end and p[0] == b'-':
        p += 1
    if p < end and p[0] == b'0':
        p += 1
    else:
        if p >= end or not (b'1' <= p[0] <= b'9'):
            return NULL
        p = _digits(p, end, 15)
        if p == NULL:
            return NULL
    if p < end and p[0] == b'.':
        p = _digits(p + 1, end, 15)
        if p == NULL:
            return NULL
    if p < end and (p[0] == b'e' or p[0] == b'E'):
        p += 1
        if p < end and (p[0] == b'+' or p[0] == b'-'):
            p += 1
        p = _digits(p, end, 2)
    return p


cdef inline const char* _literal_end(const char* p, const char* end) noexcept nogil:
    """true / false / null: return the end, else NULL."""
    cdef Py_ssize_t left = end - p
    if left >= 4 and (memcmp(p, b"true", 4) == 0 or memcmp(p, b"null", 4) == 0):
        return p + 4
    if left >= 5 and memcmp(p, b"false", 5) == 0:
        return p + 5
    return NULL


cdef inline bint _is_key(const char* key, Py_ssize_t length, const char* name,
                         Py_ssize_t name_length) noexcept nogil:
    return length == name_length and memcmp(key, name, name_length) == 0


cdef bint _scan_delta(const char* p, const char* end, DeltaFields* fields) noexcept nogil:
    """Validate a whole frame as one flat JSON object and find its delta fields.

    True only if the frame is exactly: optional whitespace, an object whose keys are simple
    strings and whose values are simple strings, short numbers or literals, optional whitespace;
    with exactly one "type" equal to an audio-delta or audio-transcript-delta name (`kind`),
    one simple string "item_id", one string "delta" and at most one "response_id" (noted if it
    is not a string). The delta's characters are checked by the caller: the strict base64 decoder for
    audio (only the alphabet and '='), `_simple_string_end` for text. Anything else: False.
    """
    cdef const char* key
    cdef const char* value
    cdef const char* value_end
    cdef Py_ssize_t key_len, value_len
    cdef int seen = 0
    cdef int which
    p = _skip_ws(p, end)
    if p >= end or p[0] != b'{':
        return False
    p = _skip_ws(p + 1, end)
    if p < end and p[0] == b'}':
        return False  # {} has no type
    while True:
        if p >= end or p[0] != b'"':
            return False
        key = p + 1
        p = _simple_string_end(key, end)
        if p == NULL:
            return False
        key_len = p - key
        p = _skip_ws(p + 1, end)
        if p >= end or p[0] != b':':
            return False
        p = _skip_ws(p + 1, end)
        if p >= end:
            return False
        which = KEY_OTHER
        if _is_key(key, key_len, b"type", 4):
            which = KEY_TYPE
        elif _is_key(key, key_len, b"item_id", 7):
            which = KEY_ITEM_ID
        elif _is_key(key, key_len, b"delta", 5):
            which = KEY_DELTA
        elif _is_key(key, key_len, b"response_id", 11):
            which = KEY_RESPONSE_ID
        if which & seen:
            return False  # duplicate: the JSON parser would keep the last one; leave it to it
        seen |= which
        if p[0] == b'"':
            value = p + 1
            if which == KEY_DELTA:
                # the first quote ends it unless the string has an escape, and then the value
                # holds a backslash, which both delta checks reject (base64 and simple text)
                value_end = <const char*>memchr(value, b'"', end - value)
            else:
                value_end = _simple_string_end(value, end)
            if value_end == NULL:
                return False
            value_len = value_end - value
            if which == KEY_TYPE:
                # most upstream events stop here: not a delta this scanner handles
                if _is_key(value, value_len, GA_DELTA_TYPE, 27) or _is_key(value, value_len, BETA_DELTA_TYPE, 20):
                    fields.kind = AUDIO_DELTA
                elif (_is_key(value, value_len, GA_TRANSCRIPT_TYPE, 38)
                        or _is_key(value, value_len, BETA_TRANSCRIPT_TYPE, 31)):
                    fields.kind = TRANSCRIPT_DELTA
                else:
                    return False
            elif which == KEY_ITEM_ID:
                fields.item_id = value
                fields.item_id_len = value_len
            elif which == KEY_DELTA:
                fields.delta = value
                fields.delta_len = value_len
            elif which == KEY_RESPONSE_ID:
                fields.response_id = value
                fields.response_id_len = value_len
            p = value_end + 1
        elif which != KEY_OTHER and which != KEY_RESPONSE_ID:
            return False  # type/item_id/delta that is not a string
        elif p[0] == b'-' or b'0' <= p[0] <= b'9':
            if which == KEY_RESPONSE_ID:
                fields.response_id_not_string = True
            p = _simple_number_end(p, end)
            if p == NULL:
                return False
        else:
            if which == KEY_RESPONSE_ID:
                fields.response_id_not_string = True
            p = _literal_end(p, end)  # objects and arrays end up here too: not handled
            if p == NULL:
                return False
        p = _skip_ws(p, end)
        if p >= end:
            return False
        if p[0] == b',':
            p = _skip_ws(p + 1, end)
            continue
        if p[0] == b'}':
            break
        return False
    p = _skip_ws(p + 1, end)
    return p == end and (seen & (KEY_TYPE | KEY_ITEM_ID | KEY_DELTA)) == (KEY_TYPE | KEY_ITEM_ID | KEY_DELTA)


def decode_audio_delta(payload, meter=None):
    """Decode an upstream text frame if it is an output-audio delta of either dialect.

    Same contract as the pure twin: `(item_id, pcm)` or None ("not handled": the caller parses
    the frame with orjson). Conservative: None for anything beyond a flat object of simple
    values (escapes, non-ASCII, nesting, duplicate keys, long numbers, non-strict base64).
    `payload` (bytes, bytearray, memoryview or ASCII str, as orjson takes) is read only during
    the call — a picows frame may be passed directly. The PCM is decoded straight from it into
    the new bytes object, and metered in the same pass when `meter` is a compiled PCM16
    LevelMeter (a G.711 one meters the decoded codes in a pass of its own, other meters get
    `feed(pcm)`); the meter is only touched when the result is not None.
    """
    cdef Py_buffer view
    if PyBytes_CheckExact(payload) or PyByteArray_CheckExact(payload) or PyMemoryView_Check(payload):
        if _try_get_buffer(payload, &view, PyBUF_SIMPLE) != 0:
            PyErr_Clear()
            return None  # e.g. a non-contiguous memoryview, which orjson rejects too
        try:
            return _decode_delta(<const char*>view.buf, view.len, meter)
        finally:
            PyBuffer_Release(&view)
    elif PyUnicode_CheckExact(payload) and PyUnicode_IS_COMPACT_ASCII(payload):
        return _decode_delta(<const char*>PyUnicode_DATA(payload), PyUnicode_GET_LENGTH(payload), meter)
    return None  # orjson takes no other type; a non-ASCII str is left to it


cdef object _decode_delta(const char* data, Py_ssize_t length, object meter):
    """`decode_audio_delta` on raw memory: `(item_id, pcm)` or None."""
    cdef DeltaFields fields
    memset(&fields, 0, sizeof(fields))
    if not _scan_delta(data, data + length, &fields) or fields.kind != AUDIO_DELTA:
        return None
    return _audio_of(&fields, meter)


cdef object _audio_of(const DeltaFields* fields, object meter):
    """`(item_id, pcm)` of a scanned audio delta, or None if its base64 is not strict."""
    cdef fp_level lv
    cdef size_t pcm_len
    cdef object pcm
    # levels off (no meter): one type check, as ever; a PCM16 meter is fed in the decoding pass
    cdef bint fused = type(meter) is LevelMeter and (<LevelMeter>meter)._law == 0
    if fields.delta_len == 0:
        pcm = b""
    else:
        if fields.delta_len % 4 != 0:
            return None
        pcm_len = fp_b64_decoded_size(fields.delta, <size_t>fields.delta_len)
        pcm = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>pcm_len)
        memset(&lv, 0, sizeof(lv))
        if fp_b64_decode(fields.delta, <size_t>fields.delta_len,
                         <uint8_t*>PyBytes_AS_STRING(pcm), &lv if fused else NULL) != 0:
            return None
        if fused:
            (<LevelMeter>meter)._add(&lv)
    item_id = PyUnicode_DecodeASCII(fields.item_id, fields.item_id_len, NULL)
    if meter is not None and not fused:
        if type(meter) is LevelMeter:  # G.711: its own pass over the codes
            (<LevelMeter>meter)._feed_ptr(<const uint8_t*>PyBytes_AS_STRING(pcm), len(<bytes>pcm))
        else:
            meter.feed(pcm)
    return item_id, pcm


def decode_transcript_delta(payload):
    """An upstream assistant audio-transcript delta as the client's `transcript` event.

    Same contract as the pure twin: `(item_id, event)` or None ("not handled"). Conservative:
    only a flat object of simple values whose delta is simple text (no escape, printable
    ASCII) is handled; the event is then byte for byte what the session's Python would send.
    """
    cdef Py_buffer view
    if PyBytes_CheckExact(payload) or PyByteArray_CheckExact(payload) or PyMemoryView_Check(payload):
        if _try_get_buffer(payload, &view, PyBUF_SIMPLE) != 0:
            PyErr_Clear()
            return None
        try:
            return _decode_transcript(<const char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
    elif PyUnicode_CheckExact(payload) and PyUnicode_IS_COMPACT_ASCII(payload):
        return _decode_transcript(<const char*>PyUnicode_DATA(payload), PyUnicode_GET_LENGTH(payload))
    return None


cdef object _decode_transcript(const char* data, Py_ssize_t length):
    cdef DeltaFields fields
    memset(&fields, 0, sizeof(fields))
    if not _scan_delta(data, data + length, &fields) or fields.kind != TRANSCRIPT_DELTA:
        return None
    return _transcript_of(&fields)


cdef const char* TRANSCRIPT_HEAD = b'{"type":"transcript","role":"assistant","text":"'
cdef const char* TRANSCRIPT_ITEM = b'","is_final":false,"item_id":"'
cdef const char* TRANSCRIPT_RESPONSE = b'","response_id":"'
cdef enum:
    TRANSCRIPT_HEAD_LEN = 48
    TRANSCRIPT_ITEM_LEN = 30
    TRANSCRIPT_RESPONSE_LEN = 17


cdef object _transcript_of(const DeltaFields* fields):
    """`(item_id, event)` of a scanned transcript delta (event None for an empty delta: the
    client is told nothing), or None if the delta is not simple text."""
    cdef Py_ssize_t size
    cdef char* out
    cdef object event = None
    if _simple_string_end(fields.delta, fields.delta + fields.delta_len + 1) != fields.delta + fields.delta_len:
        return None  # an escape, a control character or non-ASCII: the JSON parser's job
    if fields.response_id_not_string:
        return None
    if fields.delta_len:
        # the layout orjson.dumps gives the session's event dict (keys in insertion order)
        size = TRANSCRIPT_HEAD_LEN + fields.delta_len + TRANSCRIPT_ITEM_LEN + fields.item_id_len + 2
        if fields.response_id != NULL:
            size += TRANSCRIPT_RESPONSE_LEN + fields.response_id_len
        event = PyBytes_FromStringAndSize(NULL, size)
        out = PyBytes_AS_STRING(event)
        memcpy(out, TRANSCRIPT_HEAD, TRANSCRIPT_HEAD_LEN)
        out += TRANSCRIPT_HEAD_LEN
        memcpy(out, fields.delta, fields.delta_len)
        out += fields.delta_len
        memcpy(out, TRANSCRIPT_ITEM, TRANSCRIPT_ITEM_LEN)
        out += TRANSCRIPT_ITEM_LEN
        memcpy(out, fields.item_id, fields.item_id_len)
        out += fields.item_id_len
        if fields.response_id != NULL:
            memcpy(out, TRANSCRIPT_RESPONSE, TRANSCRIPT_RESPONSE_LEN)
            out += TRANSCRIPT_RESPONSE_LEN
            memcpy(out, fields.response_id, fields.response_id_len)
            out += fields.response_id_len
        out[0] = b'"'
        out[1] = b'}'
    return PyUnicode_DecodeASCII(fields.item_id, fields.item_id_len, NULL), event


# ------------------------------------------------------------------------------------ Coalescer

cdef class Coalescer:
    """Merges small client audio frames into fewer, larger `input_audio_buffer.append` frames.

    Same contract as the pure twin (see its docstring). Pending audio lives in one growable
    buffer owned by the object (no allocation per push once it has grown to its working size);
    a push that arrives with nothing pending and reaches the target is encoded straight from
    the caller's buffer. Each emitted frame is a new bytearray the caller owns (it may be sent
    with picows' zero-copy send and kept until the send is done).
    """
    cdef Py_ssize_t _target_bytes
    cdef int _sample_width
    cdef public object meter
    cdef char* _buf
    cdef Py_ssize_t _len
    cdef Py_ssize_t _cap

    def __init__(self, target_bytes, sample_width=2, meter=None):
        if target_bytes < 1:
            raise ValueError("target_bytes must be >= 1")
        if sample_width not in (1, 2):
            raise ValueError("sample_width must be 1 (G.711) or 2 (PCM16)")
        self._target_bytes = target_bytes
        self._sample_width = sample_width
        self.meter = meter
        self._len = 0

    def __dealloc__(self):
        PyMem_Free(self._buf)

    @property
    def target_bytes(self):
        """Bytes of whole samples that make `push` emit a frame; settable (>= 1), takes effect
        at the next push."""
        return self._target_bytes

    @target_bytes.setter
    def target_bytes(self, value):
        if value < 1:
            raise ValueError("target_bytes must be >= 1")
        self._target_bytes = value

    @property
    def sample_width(self):
        """Bytes per sample: 2 (PCM16) or 1 (G.711). Read-only."""
        return self._sample_width

    @property
    def pending_bytes(self):
        return self._len

    cdef int _reserve(self, Py_ssize_t needed) except -1:
        cdef Py_ssize_t cap
        cdef char* grown
        if needed <= self._cap:
            return 0
        cap = max(needed, 2 * self._cap, 4096)
        grown = <char*>PyMem_Realloc(self._buf, cap)
        if grown == NULL:
            raise MemoryError()
        self._buf = grown
        self._cap = cap
        return 0

    cdef inline LevelMeter _fused_meter(self):
        """The meter, if it is fed in the encoding pass (a compiled PCM16 LevelMeter)."""
        if type(self.meter) is LevelMeter and (<LevelMeter>self.meter)._law == 0:
            return <LevelMeter>self.meter
        return None

    cdef inline bint _python_meter(self):
        return self.meter is not None and type(self.meter) is not LevelMeter

    cdef object _emit_to_python_meter(self, Py_ssize_t whole, object scratch):
        """`_emit` of the first `whole` pending bytes for a meter that is Python code (a twin's,
        a test's): it is free to push into this coalescer, so, as in the pure twin, the bytes
        leave the buffer before it runs, and the frame is encoded from the copy it was fed."""
        cdef bytes chunk = PyBytes_FromStringAndSize(<const char*>self._buf, whole)
        self._len -= whole
        memmove(self._buf, self._buf + whole, self._len)
        self.meter.feed(chunk)
        return _encode_into(scratch, <const uint8_t*>PyBytes_AS_STRING(chunk), whole, None)

    cdef object _emit(self, const uint8_t* data, Py_ssize_t whole, object scratch):
        """The frame of `whole` bytes at `data`; the meter, a compiled one, is fed them."""
        cdef LevelMeter fused = self._fused_meter()
        if fused is None and self.meter is not None:  # G.711: its own pass over the codes
            (<LevelMeter>self.meter)._feed_ptr(data, whole)
        return _encode_into(scratch, data, whole, fused)

    def push(self, data):
        """Append audio; return an encoded frame once >= target_bytes of whole samples are
        pending, else None. A trailing partial sample is carried to the next push."""
        cdef Py_buffer view
        _get_pcm_buffer(data, &view)
        try:
            return self._push(<const char*>view.buf, view.len, None)
        finally:
            PyBuffer_Release(&view)

    cdef object _push(self, const char* data, Py_ssize_t size, object scratch):
        """`push`; with a `scratch` bytearray the frame is written into it (and it is returned),
        valid until the next use of that scratch, instead of into a new bytearray."""
        cdef Py_ssize_t total = self._len + size
        cdef Py_ssize_t whole = total - total % self._sample_width
        cdef Py_ssize_t rest
        cdef object frame
        if whole < self._target_bytes or self._python_meter():
            self._reserve(total)
            memcpy(self._buf + self._len, data, size)
            self._len = total
            if whole < self._target_bytes:
                return None
            return self._emit_to_python_meter(min(whole, _MAX_APPEND_AUDIO), scratch)
        whole = min(whole, _MAX_APPEND_AUDIO)
        if self._len == 0:
            # nothing pending: encode from the caller's buffer, keep only the partial sample
            frame = self._emit(<const uint8_t*>data, whole, scratch)
            rest = size - whole
            if rest:
                self._reserve(rest)
                memcpy(self._buf, data + whole, rest)
            self._len = rest
            return frame
        self._reserve(total)
        memcpy(self._buf + self._len, data, size)
        self._len = total
        frame = self._emit(<const uint8_t*>self._buf, whole, scratch)
        self._len = total - whole
        memmove(self._buf, self._buf + whole, self._len)
        return frame

    def flush(self):
        """Encode whatever whole samples are pending (None if there are none)."""
        cdef Py_ssize_t whole = self._len - self._len % self._sample_width
        cdef object frame
        if whole == 0:
            return None
        whole = min(whole, _MAX_APPEND_AUDIO)
        if self._python_meter():
            return self._emit_to_python_meter(whole, None)
        frame = self._emit(<const uint8_t*>self._buf, whole, None)
        self._len -= whole
        memmove(self._buf, self._buf + whole, self._len)
        return frame


# ------------------------------------------------------------- the relay's per-frame path

log = logging.getLogger("gateway.fastpath")


cdef object _frame_header(unsigned char first_byte, Py_ssize_t size):
    """RFC 6455 header of an unmasked frame (server to client): `first_byte` = FIN + opcode."""
    cdef unsigned char header[10]
    cdef int length, i
    header[0] = first_byte
    if size < 126:
        header[1] = <unsigned char>size
        length = 2
    elif size < 65536:
        header[1] = 126
        header[2] = <unsigned char>(size >> 8)
        header[3] = <unsigned char>(size & 0xFF)
        length = 4
    else:
        header[1] = 127
        for i in range(8):
            header[2 + i] = <unsigned char>((<uint64_t>size >> (8 * (7 - i))) & 0xFF)
        length = 10
    return PyBytes_FromStringAndSize(<const char*>header, length)


def frame_header(first_byte, size):
    """Header of an unmasked (server-to-client) WebSocket frame (contract: the pure twin)."""
    if size < 0:
        raise ValueError("size must be >= 0")
    return _frame_header(first_byte, size)


cdef bytearray _APPEND_SCRATCH = bytearray(4096)


cdef class AudioPath:
    """One session's audio, both directions, moved without calling the session (contract: the
    pure twin). Fields are C-typed; the session reads and sets them as attributes."""
    cdef public Coalescer coalescer
    cdef public WSTransport upstream
    cdef public bint flush_armed
    cdef public object on_pending
    cdef public object outbound_item
    cdef public long long item_generated
    cdef public long long item_delivered
    cdef public object output_meter
    cdef public WSTransport client
    cdef public list batch
    cdef Py_ssize_t batch_bytes  # what this path appended to `batch` since the last flush
    cdef public bint batching
    cdef public long long c2u_audio_frames
    cdef public long long c2u_audio_bytes
    cdef public long long u2c_audio_frames
    cdef public long long u2c_audio_bytes
    cdef public long long u2c_json_frames
    cdef public long long u2c_json_bytes
    cdef public DirectReader reader

    def __init__(self, Coalescer coalescer, on_pending):
        self.coalescer = coalescer
        self.on_pending = on_pending
        self.batch = []

    def client_audio(self, pcm):
        """A client binary frame (read only during the call), while `upstream` is set."""
        cdef Py_buffer view
        _get_pcm_buffer(pcm, &view)
        try:
            self._client_audio(<const char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef int _client_audio(self, const char* data, Py_ssize_t size) except -1:
        cdef Coalescer coalescer = self.coalescer
        cdef WSTransport upstream
        self.c2u_audio_frames += 1
        self.c2u_audio_bytes += size
        # the frame is sent (or copied by the transport) before this returns: one scratch
        # buffer serves every session's appends, warm in cache, no allocation per append
        frame = coalescer._push(data, size, _APPEND_SCRATCH)
        while frame is not None:  # more than one only for a frame over MAX_APPEND_AUDIO_BYTES
            upstream = self.upstream
            if upstream is not None and not upstream.is_disconnected and not upstream.is_close_frame_sent:
                upstream.send_reuse_external_bytearray(WSMsgType.TEXT, frame, HEADER_ROOM_C)
            frame = coalescer._push(data, 0, _APPEND_SCRATCH)
        if (coalescer._len >= coalescer._sample_width) != self.flush_armed:
            self.on_pending()
        return 0

    def upstream_audio(self, str item_id, bytes pcm):
        """Take decoded upstream audio if it belongs to `outbound_item`; False: not taken."""
        return self._upstream_audio(item_id, pcm)

    cdef bint _upstream_audio(self, object item_id, bytes pcm) except -1:
        cdef Py_ssize_t size
        if self.outbound_item is None or item_id != self.outbound_item:
            return False
        size = len(pcm)
        self.item_generated += size
        self.item_delivered += size
        self.u2c_audio_frames += 1
        self.u2c_audio_bytes += size
        self._batch_frame(_frame_header(0x82, size), pcm)
        return True

    def upstream_transcript(self, str item_id, event, Py_ssize_t message_bytes):
        """Take a transcript delta's client event if it belongs to `outbound_item`."""
        return self._upstream_transcript(item_id, event, message_bytes)

    cdef bint _upstream_transcript(self, object item_id, object event, Py_ssize_t message_bytes) except -1:
        if self.outbound_item is None or item_id != self.outbound_item:
            return False
        self.u2c_json_frames += 1
        self.u2c_json_bytes += message_bytes
        if event is not None:
            self._batch_frame(_frame_header(0x81, len(<bytes>event)), event)
        return True

    cdef int _batch_frame(self, bytes header, bytes payload) except -1:
        self.batching = True
        self.batch.append(header)
        self.batch.append(payload)
        self.batch_bytes += len(header) + len(payload)
        if self.batch_bytes >= CLIENT_BATCH_BYTES:
            self.flush_batch()
            self.batching = True  # the read goes on: its end flushes the rest
        return 0

    cpdef flush_batch(self):
        """Write the batched client frames in one write and stop batching (see the twin)."""
        cdef WSTransport client
        self.batching = False
        self.batch_bytes = 0
        if self.batch:
            client = self.client
            if client is not None and not client.is_disconnected and not client.is_close_frame_sent:
                client.underlying_transport.writelines(self.batch)
            del self.batch[:]


cdef enum:
    # one recv per ready socket; a client frame larger than what is left goes to picows whole
    DIRECT_READ_BYTES = 65536
    DIRECT_EVENTS = 64
    DIRECT_ROUNDS = 16    # epoll batches per wake-up at most (1,024 sockets)


cdef inline void _unmask(uint8_t* data, Py_ssize_t size, const uint8_t* key) noexcept nogil:
    cdef uint8_t key8[8]
    cdef uint64_t key64, word
    cdef Py_ssize_t i = 0
    memcpy(key8, key, 4)
    memcpy(key8 + 4, key, 4)
    memcpy(&key64, key8, 8)
    while i + 8 <= size:
        memcpy(&word, data + i, 8)
        word ^= key64
        memcpy(data + i, &word, 8)
        i += 8
    while i < size:
        data[i] ^= key[i & 3]
        i += 1


cdef class DirectReader:
    """Reads the attached sockets of one event loop itself (contract: the pure twin).

    One epoll set, watched by the loop as a single reader: each wake-up drains the ready
    sockets with one `recv` each into one shared buffer, and each leg relays the whole frames
    it recognises in C. Through uvloop and picows a read costs two Python-level calls, a
    memoryview and a frame object besides the syscall.

    With a batch interval, a wake-up that found work takes the set off the loop and the next
    read happens one interval later, by timer: under load the process wakes once per interval
    for everything that arrived meanwhile, instead of once per few frames (each sleep and wake
    is a context switch, the larger part of the cost of a small batch). A tick that finds
    nothing puts the set back on the loop, so an idle node still answers the first byte at once.
    """
    cdef int _epfd
    cdef dict _legs          # fd -> attached DirectLeg: the strong references
    cdef PyObject** _by_fd   # fd -> the same legs, borrowed: no int object or dict probe per read
    cdef int _by_fd_size
    cdef char* _buf
    cdef object _loop
    cdef object _tick        # the bound `poll`, made once
    cdef double _interval_s  # 0: read on every wake-up
    cdef bint _on_loop       # the set is watched by the loop (else a timer is due)
    cdef object _timer
    cdef readonly long long frames  # relayed by the legs from this reader's reads, ever

    def __cinit__(self):
        self._epfd = -1  # not 0 (Cython zero-fills): __dealloc__ must never close a descriptor it does not own

    def __init__(self, loop, double batch_interval_s=0.0):
        if self._epfd >= 0 or self._buf != NULL:
            raise RuntimeError("DirectReader is already initialised")
        self._epfd = epoll_create1(EPOLL_CLOEXEC)
        if self._epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self._legs = {}
        self._buf = <char*>PyMem_Realloc(NULL, DIRECT_READ_BYTES)
        if self._buf == NULL:
            raise MemoryError()
        self._loop = loop
        self._interval_s = batch_interval_s
        self._tick = self.poll
        loop.add_reader(self._epfd, self._tick)
        self._on_loop = True

    def __dealloc__(self):
        PyMem_Free(self._buf)
        PyMem_Free(self._by_fd)
        if self._epfd >= 0:
            close_fd(self._epfd)

    @property
    def attached(self):
        """How many sockets are read here now."""
        return len(self._legs)

    @property
    def batch_interval_s(self):
        return self._interval_s

    @property
    def paced(self):
        """The next read waits for the interval's timer (the set is off the loop)."""
        return not self._on_loop

    def close(self):
        """Stop: every attached socket goes back to its transport."""
        cdef DirectLeg leg
        for leg in list(self._legs.values()):
            leg._detach(not leg.reads_held)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._epfd >= 0:
            if self._on_loop:
                self._loop.remove_reader(self._epfd)
            close_fd(self._epfd)
            self._epfd = -1

    def poll(self):
        cdef epoll_event events[DIRECT_EVENTS]
        cdef int count, i, fd, rounds = 0, found = 0
        cdef DirectLeg leg
        self._timer = None
        if self._epfd < 0:
            return
        try:
            while True:
                count = epoll_wait(self._epfd, events, DIRECT_EVENTS, 0)
                found += count
                for i in range(count):
                    fd = events[i].data.fd
                    # looked up per event: a leg read earlier in this batch may have let another go
                    if fd < self._by_fd_size and self._by_fd[fd] != NULL:
                        leg = <DirectLeg>self._by_fd[fd]  # a new reference for the call
                        self.frames += leg._read(self._buf, DIRECT_READ_BYTES)
                rounds += 1
                # a full batch may leave more ready; bounded, so other loop work is not starved
                if count < DIRECT_EVENTS or rounds == DIRECT_ROUNDS:
                    break
        finally:
            # also after an error in a leg: the set must never be left without a way back
            if self._interval_s > 0 and self._epfd >= 0:
                self._next_read(found > 0)

    cdef _next_read(self, bint busy):
        if busy:
            if self._on_loop:
                self._loop.remove_reader(self._epfd)
                self._on_loop = False
            self._timer = self._loop.call_later(self._interval_s, self._tick)
        elif not self._on_loop:
            self._loop.add_reader(self._epfd, self._tick)
            self._on_loop = True

    cdef bint _add(self, int fd, DirectLeg leg) except -1:
        cdef epoll_event event
        cdef PyObject** grown
        cdef int size
        if self._epfd < 0 or fd < 0:
            return False
        if fd >= self._by_fd_size:
            size = max(fd + 1, 2 * self._by_fd_size, 256)
            grown = <PyObject**>PyMem_Realloc(self._by_fd, size * sizeof(PyObject*))
            if grown == NULL:
                raise MemoryError()
            memset(grown + self._by_fd_size, 0, (size - self._by_fd_size) * sizeof(PyObject*))
            self._by_fd = grown
            self._by_fd_size = size
        memset(&event, 0, sizeof(event))
        event.events = EPOLLIN
        event.data.fd = fd
        if epoll_ctl(self._epfd, EPOLL_CTL_ADD, fd, &event) != 0:
            return False
        self._legs[fd] = leg
        self._by_fd[fd] = <PyObject*>leg
        return True

    cdef void _remove(self, int fd, DirectLeg leg) noexcept:
        # the socket may already be closed (the kernel then dropped it from the set itself) and
        # its number even reused by a newer leg: only the leg that owns the entry removes it
        if fd < self._by_fd_size and self._by_fd[fd] == <PyObject*>leg:
            self._by_fd[fd] = NULL
            del self._legs[fd]
            if self._epfd >= 0:
                epoll_ctl(self._epfd, EPOLL_CTL_DEL, fd, NULL)


cdef inline Py_ssize_t _whole_frame(const uint8_t* head, Py_ssize_t available, uint8_t first_byte,
                                    bint masked, Py_ssize_t* payload_size) noexcept nogil:
    """Header size of the whole frame at `head` if it starts with `first_byte`, is masked as
    asked and is complete within `available` (its payload size in `payload_size`); else 0."""
    cdef Py_ssize_t header = 2, size
    if available < 2 or head[0] != first_byte or (head[1] >> 7) != masked:
        return 0
    size = head[1] & 0x7F
    if size == 126:
        if available < 4:
            return 0
        size = (<Py_ssize_t>head[2] << 8) | head[3]
        if size < 126:  # not the shortest form (RFC 6455 §5.2): picows fails it, so must we
            return 0
        header = 4
    elif size == 127:
        # nothing the legs relay needs more than 31 bits of length
        if available < 10 or head[2] or head[3] or head[4] or head[5] or head[6] & 0x80:
            return 0
        size = ((<Py_ssize_t>head[6] << 24) | (<Py_ssize_t>head[7] << 16)
                | (<Py_ssize_t>head[8] << 8) | head[9])
        if size < 65536:
            return 0
        header = 10
    if masked:
        header += 4
    if available - header < size:
        return 0
    payload_size[0] = size
    return header


cdef class DirectLeg(WSListener):
    """A picows listener whose socket can be read by a `DirectReader` instead of its transport
    (contract: the pure twin). `_frame` (per leg) relays one whole frame from the
    reader's buffer or declines it; the first frame declined, end of stream and a session's
    `hold_reads` give the socket back to the transport, the unread bytes handed to picows in
    order, and the leg attaches again after the next frame picows delivers that it could have
    taken itself and that left picows' buffer empty. `path` is the session's `AudioPath` (None:
    every frame goes to the subclass through picows)."""
    cdef public AudioPath path
    cdef public bint assembling      # the subclass sets it while a fragmented message is built
    cdef public bint reads_held
    cdef readonly long long direct_frames
    cdef int _fd
    cdef bint _handing_back  # picows is being fed the unread rest: it may end in a partial frame
    cdef WSTransport _transport
    cdef DirectReader _reader

    def __init__(self):
        self.path = None
        self.assembling = False
        self.reads_held = False
        self.direct_frames = 0
        self._fd = -1

    @property
    def reading_directly(self):
        return self._fd >= 0

    cpdef hold_reads(self):
        """Backpressure: the socket goes back to its transport (whose reading the caller
        pauses) and stays there until `release_reads`."""
        self.reads_held = True
        if self._fd >= 0:
            self._detach(False)

    cpdef release_reads(self):
        self.reads_held = False

    cpdef forget_reads(self):
        """The socket is gone: drop it from the reader (no transport call)."""
        if self._fd >= 0:
            self._reader._remove(self._fd, self)
            self._fd = -1
        self._transport = None
        self._reader = None

    cdef inline int _maybe_attach(self, DirectReader reader, WSTransport transport, WSFrame frame) except -1:
        cdef int fd
        # while a hand-back feeds picows piece by piece, a frame that ends a piece leaves
        # tail_size 0 although a later piece may start a frame picows must finish itself
        if reader is None or self._fd >= 0 or frame.tail_size != 0 or self.reads_held or self._handing_back \
                or transport.is_secure or transport.is_disconnected or transport.is_close_frame_sent:
            return 0
        fd = transport._socket
        if reader._add(fd, self):
            self._fd = fd
            self._transport = transport
            self._reader = reader
            transport.underlying_transport.pause_reading()
        return 0

    cdef int _detach(self, bint resume) except -1:
        cdef WSTransport transport = self._transport
        if self._fd >= 0:
            self._reader._remove(self._fd, self)
            self._fd = -1
        if resume and transport is not None and not transport.is_disconnected:
            transport.underlying_transport.resume_reading()
        return 0

    cdef Py_ssize_t _frame(self, char* data, Py_ssize_t available) except -1:
        return 0

    cdef int _read_end(self) except -1:
        return 0

    cdef Py_ssize_t _read(self, char* buf, Py_ssize_t capacity) except -1:
        """One recv, the whole frames in it relayed, the rest handed back; returns how many
        frames were relayed."""
        cdef Py_ssize_t received = recv(self._fd, buf, capacity, 0)
        cdef Py_ssize_t pos = 0, used, relayed = 0
        if received < 0:
            if errno == EAGAIN or errno == EINTR:  # EWOULDBLOCK is EAGAIN on Linux
                return 0
            received = 0  # an error: the transport reads again and reports it (or end of stream)
        try:
            while pos < received:
                used = self._frame(buf + pos, received - pos)
                if used == 0:
                    break
                pos += used
                relayed += 1
                if self._fd < 0:  # the frame's consequences took the socket back (closed or held)
                    break
        except Exception:
            # what picows does when a listener raises (disconnect_on_exception): the stream
            # can no longer be trusted to be in step with the session, so nothing more of it
            # is delivered
            log.exception("error relaying a frame read directly: closing the socket")
            self._detach(False)
            if self._transport is not None:
                self._transport.disconnect()
            return relayed
        finally:
            self.direct_frames += relayed
            self._read_end()
        if pos < received or received == 0 or self._fd < 0:
            self._hand_back(buf + pos, received - pos)
        return relayed

    cdef int _hand_back(self, char* data, Py_ssize_t size) except -1:
        """Give the socket back to its transport, and `data` (the unread rest) to picows."""
        cdef WSTransport transport = self._transport
        cdef Py_buffer view
        cdef Py_ssize_t take
        self._detach(not self.reads_held)
        if size == 0 or transport is None or transport.is_disconnected:
            return 0
        protocol = transport.underlying_transport.get_protocol()
        self._handing_back = True
        try:
            while size > 0:
                PyObject_GetBuffer(protocol.get_buffer(-1), &view, PyBUF_SIMPLE)
                take = min(size, view.len)
                if take <= 0:  # picows keeps free room after every update; never spin if it did not
                    PyBuffer_Release(&view)
                    raise RuntimeError("picows offered no read buffer")
                memcpy(view.buf, data, take)
                PyBuffer_Release(&view)
                protocol.buffer_updated(take)
                data += take
                size -= take
        finally:
            self._handing_back = False
        return 0


cdef class ClientLeg(DirectLeg):
    """Base of the client socket's listener (contract: the pure twin). picows calls
    `on_ws_frame` through its C vtable: an audio frame is relayed without running Python, and
    once one leaves picows' buffer empty the socket is read by the path's `reader`, if any."""
    cdef public Py_ssize_t max_audio_bytes

    def __init__(self):
        DirectLeg.__init__(self)
        self.max_audio_bytes = 0

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef AudioPath path = self.path
        if path is not None and path.upstream is not None and frame.msg_type == WSMsgType.BINARY and frame.fin \
                and not (frame.rsv1 | frame.rsv2 | frame.rsv3) and not self.assembling \
                and frame.payload_size <= self.max_audio_bytes:
            try:
                path._client_audio(frame.payload_ptr, frame.payload_size)
            except Exception:  # a bug must not take the socket down silently: log it, go on
                log.exception("error relaying client audio")
            self._maybe_attach(path.reader, transport, frame)
        else:
            self.on_frame(transport, frame)

    cdef Py_ssize_t _frame(self, char* data, Py_ssize_t available) except -1:
        """Relay one whole, masked, unfragmented binary frame within the limits; 0: decline."""
        cdef Py_ssize_t header, size
        cdef AudioPath path = self.path
        header = _whole_frame(<const uint8_t*>data, available, 0x82, True, &size)
        if header == 0 or size > self.max_audio_bytes or self.assembling or path is None or path.upstream is None:
            return 0
        _unmask(<uint8_t*>data + header, size, <const uint8_t*>data + header - 4)
        try:
            path._client_audio(data + header, size)
        except Exception:  # a bug must not take the socket down silently: log it, go on
            log.exception("error relaying client audio")
        return header + size


cdef class UpstreamLeg(DirectLeg):
    """Base of the upstream socket's listener (contract: the pure twin). Audio deltas for the
    open item are decoded and batched for the client without running Python; while the path
    has a `reader` and the socket is plain TCP, the reader reads it."""

    cdef int _relay(self, AudioPath path, const char* payload, Py_ssize_t size) except -1:
        """Relay a delta for the open item: 1 taken, -2 a delta for another item (given to
        `on_audio`), 0 anything else (the caller hands it on)."""
        cdef DeltaFields fields
        cdef object taken
        memset(&fields, 0, sizeof(fields))
        if not _scan_delta(payload, payload + size, &fields):
            return 0
        if fields.kind == AUDIO_DELTA:
            taken = _audio_of(&fields, path.output_meter)
            if taken is None:
                return 0
            if not path._upstream_audio((<tuple>taken)[0], (<tuple>taken)[1]):
                self.on_audio((<tuple>taken)[0], (<tuple>taken)[1])
            return 1
        taken = _transcript_of(&fields)
        if taken is None or not path._upstream_transcript((<tuple>taken)[0], (<tuple>taken)[1], size):
            return 0
        return 1

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef AudioPath path = self.path
        try:
            if frame.msg_type == WSMsgType.TEXT and frame.fin and not (frame.rsv1 | frame.rsv2 | frame.rsv3) \
                    and not self.assembling:
                if transport.is_close_frame_sent:
                    pass  # the connection is closing: nothing behind a close of ours is relayed
                elif path is not None and self._relay(path, frame.payload_ptr, frame.payload_size):
                    self._maybe_attach(path.reader, transport, frame)
                else:
                    self.on_event(frame.get_payload_as_memoryview())
            else:
                self.on_other_frame(transport, frame)
        finally:
            if frame.last_in_buffer:
                if path is not None:
                    path.flush_batch()
                else:
                    self.on_read_end()

    cdef Py_ssize_t _frame(self, char* data, Py_ssize_t available) except -1:
        """Relay one whole, unmasked, unfragmented text frame that is a delta for the path;
        0: decline (picows delivers it, and every other event, to the session)."""
        cdef Py_ssize_t header, size
        cdef AudioPath path = self.path
        header = _whole_frame(<const uint8_t*>data, available, 0x81, False, &size)
        if header == 0 or self.assembling or path is None or not self._relay(path, data + header, size):
            return 0
        return header + size

    cdef int _read_end(self) except -1:
        if self.path is not None:
            self.path.flush_batch()
        return 0


def release_handshake(WSTransport transport):
    """Drop the transport's upgrade request and response (contract: the pure twin)."""
    transport.request = None
    transport.response = None
