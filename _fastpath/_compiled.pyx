# Compiled half of `_fastpath`; the pure twin `_pure.py` defines the behaviour and the docstrings.
# Directives are set in setup.py, in one place.
from libc.math cimport log10, sqrt
from libc.stdint cimport int16_t, int64_t, uint64_t

from ._pure import DBFS_FLOOR, HEADER_ROOM

DEF CLIP_LEVEL = 32767

cdef inline double _dbfs(double amplitude) noexcept nogil:
    cdef double level
    if amplitude <= 0.0:
        return -100.0
    level = 20.0 * log10(amplitude / 32768.0)
    return level if level > -100.0 else -100.0


cdef class LevelMeter:
    """Accumulates the level of PCM16 audio fed to it, until `read()` takes and resets it."""
    cdef uint64_t _sum_squares
    cdef int64_t _peak
    cdef int64_t _clipped
    cdef int64_t _samples

    cdef inline void _feed_ptr(self, const unsigned char* data, Py_ssize_t size) noexcept nogil:
        cdef Py_ssize_t n = size >> 1
        cdef Py_ssize_t i
        cdef int64_t s
        cdef uint64_t acc = 0
        cdef int64_t peak = self._peak
        cdef int64_t clipped = 0
        for i in range(n):
            s = <int16_t>(data[2 * i] | (data[2 * i + 1] << 8))
            acc += <uint64_t>(s * s)
            if s < 0:
                s = -s
            if s > peak:
                peak = s
            if s >= CLIP_LEVEL:
                clipped += 1
        self._sum_squares += acc
        self._peak = peak
        self._clipped += clipped
        self._samples += n

    def feed(self, pcm):
        cdef const unsigned char[::1] view = memoryview(pcm).cast("B")
        if view.shape[0] > 1:
            self._feed_ptr(&view[0], view.shape[0])

    @property
    def samples(self):
        return self._samples

    def read(self):
        cdef double rms = 0.0
        if self._samples:
            rms = sqrt(<double>self._sum_squares / <double>self._samples)
        result = (_dbfs(rms), _dbfs(<double>self._peak), self._clipped, self._samples)
        self._sum_squares = 0
        self._peak = 0
        self._clipped = 0
        self._samples = 0
        return result


def measure_level(pcm):
    cdef LevelMeter meter = LevelMeter()
    meter.feed(pcm)
    rms_dbfs, peak_dbfs, clipped, _ = meter.read()
    return rms_dbfs, peak_dbfs, clipped


# Until the compiled codec lands, the codec entry points are the pure ones (issue: fast path).
from ._pure import encode_append, decode_audio_delta, Coalescer
