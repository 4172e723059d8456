/* Byte kernels of `_fastpath._compiled`: base64 encode/decode with PCM16 level metering fused
 * into the same pass, plus a stand-alone metering kernel.
 *
 * Why C and not Cython: the AVX2 paths are written with intrinsics, which Cython cannot express
 * without wrapping every one. Everything that touches Python objects lives in _compiled.pyx;
 * nothing here allocates, raises, or needs the GIL.
 *
 * Two implementations of every kernel:
 *   - scalar (portable C; any CPU, any compiler);
 *   - AVX2 (x86-64 with GCC/Clang, selected at run time with __builtin_cpu_supports, so the
 *     extension still builds without -march flags and runs on CPUs without AVX2).
 * `fp_set_simd(0)` forces the scalar ones (tests run both, like pybase64's fixture).
 *
 * Metering contract (identical to _pure.LevelMeter.feed): samples are little-endian int16 pairs
 * starting at byte 0 of the chunk; a trailing odd byte is ignored. sum of squares is exact
 * (uint64; one call never sees 2^34 samples), peak is max |s| (|-32768| = 32768), clipped counts
 * |s| >= 32767. G.711 audio has its own kernel (`fp_meter_table`): one code per byte, expanded
 * through the caller's code -> PCM16 table, clipped at the caller's level; it is never fused
 * into the base64 passes, which stay PCM16-only.
 */
#ifndef FASTPATH_KERNELS_H
#define FASTPATH_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FP_HAVE_AVX2_BUILD 1
#include <immintrin.h>
#define FP_AVX2 __attribute__((target("avx2,popcnt")))
#else
#define FP_HAVE_AVX2_BUILD 0
#endif

enum { FP_CLIP_LEVEL = 32767 };
/* the level reported for digital silence (dBFS), as _pure.DBFS_FLOOR */
#define FP_DBFS_FLOOR (-100.0)
/* every integer up to 2**53 is exact as a double */
#define FP_EXACT_DOUBLE_MAX ((uint64_t)1 << 53)

typedef struct {
    uint64_t sum_squares;
    uint64_t peak;
    uint64_t clipped;
    uint64_t samples;
} fp_level;

static const char fp_alphabet[64] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* 12 bits of input -> 2 output characters, in memory order (endian-neutral via memcpy). */
static char fp_enc12[4096][2];
/* character -> 6-bit value, 0xFF when not in the alphabet ('=' included). */
static uint8_t fp_dec[256];
static int fp_simd_available = 0;
static int fp_simd_enabled = 0;

static void fp_init(void) {
    int i;
    for (i = 0; i < 4096; i++) {
        fp_enc12[i][0] = fp_alphabet[i >> 6];
        fp_enc12[i][1] = fp_alphabet[i & 63];
    }
    memset(fp_dec, 0xFF, sizeof(fp_dec));
    for (i = 0; i < 64; i++) {
        fp_dec[(unsigned char)fp_alphabet[i]] = (uint8_t)i;
    }
#if FP_HAVE_AVX2_BUILD
    __builtin_cpu_init();
    fp_simd_available = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
#endif
    fp_simd_enabled = fp_simd_available;
}

/* Enable/disable the SIMD kernels (disable = force scalar). Returns the setting now in force:
 * asking for SIMD on a CPU without it leaves the scalar kernels on. */
static int fp_set_simd(int enabled) {
    fp_simd_enabled = enabled && fp_simd_available;
    return fp_simd_enabled;
}

static inline void fp_level_sample(fp_level *lv, int32_t s) {
    uint64_t a = (uint64_t)(s < 0 ? -s : s);
    lv->sum_squares += (uint64_t)((int64_t)s * s);
    if (a > lv->peak) lv->peak = a;
    lv->clipped += (a >= FP_CLIP_LEVEL);
}

static inline int32_t fp_s16(const uint8_t *p) {
    return (int16_t)(uint16_t)(p[0] | (p[1] << 8));
}

/* ---------------------------------------------------------------------------------- scalar */

static void fp_meter_scalar(const uint8_t *p, size_t n, fp_level *lv) {
    size_t i, pairs = n >> 1;
    for (i = 0; i < pairs; i++) fp_level_sample(lv, fp_s16(p + 2 * i));
    lv->samples += pairs;
}

/* Meters n G.711 codes: each byte is expanded through `table` (code -> linear PCM16 value) and
 * counts as clipped at |s| >= clip_level (its law's largest magnitude). Scalar only: G.711 is
 * 8 kHz at one byte a sample, a sixth of PCM16's bytes, and only sessions in it come here. */
static void fp_meter_table(const uint8_t *p, size_t n, const int16_t *table, uint64_t clip_level,
                           fp_level *lv) {
    size_t i;
    for (i = 0; i < n; i++) {
        const int32_t s = table[p[i]];
        const uint64_t a = (uint64_t)(s < 0 ? -s : s);
        lv->sum_squares += (uint64_t)((int64_t)s * s);
        if (a > lv->peak) lv->peak = a;
        lv->clipped += (a >= clip_level);
    }
    lv->samples += n;
}

/* Encodes n bytes into 4*ceil(n/3) characters at dst; meters them when lv is not NULL. */
static size_t fp_encode_scalar(const uint8_t *src, size_t n, char *dst, fp_level *lv) {
    char *const start = dst;
    size_t i = 0;
    /* 6 bytes = 3 samples = 8 characters: the unit where bytes and samples line up. */
    for (; i + 6 <= n; i += 6) {
        const uint8_t *s = src + i;
        uint32_t a = ((uint32_t)s[0] << 16) | ((uint32_t)s[1] << 8) | s[2];
        uint32_t b = ((uint32_t)s[3] << 16) | ((uint32_t)s[4] << 8) | s[5];
        memcpy(dst, fp_enc12[a >> 12], 2);
        memcpy(dst + 2, fp_enc12[a & 0xFFF], 2);
        memcpy(dst + 4, fp_enc12[b >> 12], 2);
        memcpy(dst + 6, fp_enc12[b & 0xFFF], 2);
        dst += 8;
        if (lv) {
            fp_level_sample(lv, fp_s16(s));
            fp_level_sample(lv, fp_s16(s + 2));
            fp_level_sample(lv, fp_s16(s + 4));
        }
    }
    if (lv) {
        /* i is even here: the tail's whole samples are metered, an odd last byte is not. */
        lv->samples += i >> 1;
        fp_meter_scalar(src + i, n - i, lv);
    }
    for (; i + 3 <= n; i += 3) {
        uint32_t a = ((uint32_t)src[i] << 16) | ((uint32_t)src[i + 1] << 8) | src[i + 2];
        memcpy(dst, fp_enc12[a >> 12], 2);
        memcpy(dst + 2, fp_enc12[a & 0xFFF], 2);
        dst += 4;
    }
    if (n - i == 1) {
        uint32_t a = (uint32_t)src[i] << 16;
        dst[0] = fp_alphabet[a >> 18];
        dst[1] = fp_alphabet[(a >> 12) & 63];
        dst[2] = '=';
        dst[3] = '=';
        dst += 4;
    } else if (n - i == 2) {
        uint32_t a = ((uint32_t)src[i] << 16) | ((uint32_t)src[i + 1] << 8);
        dst[0] = fp_alphabet[a >> 18];
        dst[1] = fp_alphabet[(a >> 12) & 63];
        dst[2] = fp_alphabet[(a >> 6) & 63];
        dst[3] = '=';
        dst += 4;
    }
    return (size_t)(dst - start);
}

/* Decodes `groups` complete 4-character groups of alphabet characters (no '=') into 3*groups
 * bytes. Returns 0, or -1 at the first character outside the alphabet. */
static int fp_decode_groups_scalar(const char *src, size_t groups, uint8_t *dst) {
    size_t g;
    for (g = 0; g < groups; g++) {
        const unsigned char *s = (const unsigned char *)src + 4 * g;
        uint32_t a = fp_dec[s[0]], b = fp_dec[s[1]], c = fp_dec[s[2]], d = fp_dec[s[3]];
        uint32_t v;
        if ((a | b | c | d) & 0x80) return -1;
        v = (a << 18) | (b << 12) | (c << 6) | d;
        dst[3 * g] = (uint8_t)(v >> 16);
        dst[3 * g + 1] = (uint8_t)(v >> 8);
        dst[3 * g + 2] = (uint8_t)v;
    }
    return 0;
}

/* The last group, which may be "xx==" or "xxx=". Writes 1..3 bytes; returns how many, or -1. */
static int fp_decode_last_group(const char *src, uint8_t *dst) {
    const unsigned char *s = (const unsigned char *)src;
    uint32_t a = fp_dec[s[0]], b = fp_dec[s[1]], c, d, v;
    if ((a | b) & 0x80) return -1;
    if (s[2] == '=') {
        if (s[3] != '=') return -1;
        dst[0] = (uint8_t)((a << 2) | (b >> 4));
        return 1;
    }
    c = fp_dec[s[2]];
    if (c & 0x80) return -1;
    if (s[3] == '=') {
        v = (a << 18) | (b << 12) | (c << 6);
        dst[0] = (uint8_t)(v >> 16);
        dst[1] = (uint8_t)(v >> 8);
        return 2;
    }
    d = fp_dec[s[3]];
    if (d & 0x80) return -1;
    v = (a << 18) | (b << 12) | (c << 6) | d;
    dst[0] = (uint8_t)(v >> 16);
    dst[1] = (uint8_t)(v >> 8);
    dst[2] = (uint8_t)v;
    return 3;
}

/* ------------------------------------------------------------------------------------ AVX2 */
#if FP_HAVE_AVX2_BUILD

typedef struct {
    __m256i sum_squares; /* 4 x uint64 */
    __m256i peak;        /* 16 x uint16 */
    __m256i clipped;     /* 8 x uint32 counts (2^31 blocks would be 48 GiB in one call) */
} fp_level_avx2;

FP_AVX2 static inline void fp_avx2_level_init(fp_level_avx2 *acc) {
    acc->sum_squares = _mm256_setzero_si256();
    acc->peak = _mm256_setzero_si256();
    acc->clipped = _mm256_setzero_si256();
}

/* Meters 16 int16 lanes; lanes holding no sample must be zero (they add nothing). Uses no
 * shuffle-port instructions, so it overlaps with the base64 shuffles it is fused with, and
 * adds one instruction per accumulator to each loop-carried chain. */
FP_AVX2 static inline void fp_avx2_level_add(fp_level_avx2 *acc, __m256i v) {
    /* s0*s0 + s1*s1 <= 2^31: exact as uint32 although madd calls it int32 */
    const __m256i squares = _mm256_madd_epi16(v, v);
    const __m256i magnitude = _mm256_abs_epi16(v); /* |-32768| = 0x8000, right as uint16 */
    /* |s| >= 32767 exactly when |s| + 1 (wrapping) has its top bit set: 0x8000 and 0x8001 */
    const __m256i at_clip = _mm256_srli_epi16(_mm256_add_epi16(magnitude, _mm256_set1_epi16(1)), 15);
    const __m256i pair_sums = _mm256_add_epi64(
        _mm256_and_si256(squares, _mm256_set1_epi64x(0xFFFFFFFF)), _mm256_srli_epi64(squares, 32));
    acc->sum_squares = _mm256_add_epi64(acc->sum_squares, pair_sums);
    acc->peak = _mm256_max_epu16(acc->peak, magnitude);
    acc->clipped = _mm256_add_epi32(acc->clipped, _mm256_madd_epi16(at_clip, _mm256_set1_epi16(1)));
}

/* The same without the clip count, for the fused loops: clipping is rare, so they count it
 * afterwards, only when the peak says some sample reached the rails (`fp_avx2_level_clips`). */
FP_AVX2 static inline void fp_avx2_level_add_unclipped(fp_level_avx2 *acc, __m256i v) {
    const __m256i squares = _mm256_madd_epi16(v, v);
    const __m256i pair_sums = _mm256_add_epi64(
        _mm256_and_si256(squares, _mm256_set1_epi64x(0xFFFFFFFF)), _mm256_srli_epi64(squares, 32));
    acc->sum_squares = _mm256_add_epi64(acc->sum_squares, pair_sums);
    acc->peak = _mm256_max_epu16(acc->peak, _mm256_abs_epi16(v));
}

/* Samples at or beyond the clip level in p[0..n) (n even), counted only if the accumulated
 * peak reached it: one extra pass, clip count only, over data still in L1. */
FP_AVX2 static void fp_avx2_level_clips(fp_level_avx2 *acc, const uint8_t *p, size_t n) {
    uint16_t peaks[16];
    uint16_t peak = 0;
    size_t i = 0;
    int k;
    _mm256_storeu_si256((__m256i *)peaks, acc->peak);
    for (k = 0; k < 16; k++) {
        if (peaks[k] > peak) peak = peaks[k];
    }
    if (peak < 32767) return;
    for (; i + 32 <= n; i += 32) {
        const __m256i magnitude = _mm256_abs_epi16(_mm256_loadu_si256((const __m256i *)(p + i)));
        const __m256i at_clip = _mm256_srli_epi16(_mm256_add_epi16(magnitude, _mm256_set1_epi16(1)), 15);
        acc->clipped = _mm256_add_epi32(acc->clipped, _mm256_madd_epi16(at_clip, _mm256_set1_epi16(1)));
    }
    for (; i + 2 <= n; i += 2) {
        const int32_t s = fp_s16(p + i);
        if ((s < 0 ? -s : s) >= FP_CLIP_LEVEL) {
            acc->clipped = _mm256_add_epi32(acc->clipped, _mm256_setr_epi32(1, 0, 0, 0, 0, 0, 0, 0));
        }
    }
}

FP_AVX2 static inline void fp_avx2_level_finish(fp_level_avx2 *acc, fp_level *lv, size_t samples) {
    uint64_t sums[4];
    uint16_t peaks[16];
    uint32_t clips[8];
    int i;
    _mm256_storeu_si256((__m256i *)sums, acc->sum_squares);
    _mm256_storeu_si256((__m256i *)peaks, acc->peak);
    lv->sum_squares += sums[0] + sums[1] + sums[2] + sums[3];
    for (i = 0; i < 16; i++) {
        if (peaks[i] > lv->peak) lv->peak = peaks[i];
    }
    _mm256_storeu_si256((__m256i *)clips, acc->clipped);
    for (i = 0; i < 8; i++) lv->clipped += clips[i];
    lv->samples += samples;
}

FP_AVX2 static void fp_meter_avx2(const uint8_t *p, size_t n, fp_level *lv) {
    fp_level_avx2 acc;
    size_t i = 0;
    fp_avx2_level_init(&acc);
    for (; i + 32 <= n; i += 32) {
        fp_avx2_level_add(&acc, _mm256_loadu_si256((const __m256i *)(p + i)));
    }
    fp_avx2_level_finish(&acc, lv, i >> 1);
    fp_meter_scalar(p + i, n - i, lv);
}

/* Muła's encoder (github.com/WojciechMula/base64simd, AVX2 form from Lemire's fastbase64).
 * A block is 24 input bytes: the lower lane holds them at bytes 4..15 (loaded from 4 bytes
 * before the block, which saves a lane insert), the upper lane at bytes 0..11; each lane turns
 * its 12 bytes into 16 characters. */
FP_AVX2 static inline __m256i fp_avx2_enc_reshuffle(__m256i in) {
    const __m256i shuffled = _mm256_shuffle_epi8(in, _mm256_setr_epi8(
        5, 4, 6, 5, 8, 7, 9, 8, 11, 10, 12, 11, 14, 13, 15, 14,
        1, 0, 2, 1, 4, 3, 5, 4, 7, 6, 8, 7, 10, 9, 11, 10));
    const __m256i t0 = _mm256_and_si256(shuffled, _mm256_set1_epi32(0x0fc0fc00));
    const __m256i t1 = _mm256_mulhi_epu16(t0, _mm256_set1_epi32(0x04000040));
    const __m256i t2 = _mm256_and_si256(shuffled, _mm256_set1_epi32(0x003f03f0));
    const __m256i t3 = _mm256_mullo_epi16(t2, _mm256_set1_epi32(0x01000010));
    return _mm256_or_si256(t1, t3);
}

FP_AVX2 static inline __m256i fp_avx2_enc_translate(__m256i in) {
    const __m256i lut = _mm256_setr_epi8(
        65, 71, -4, -4, -4, -4, -4, -4, -4, -4, -4, -4, -19, -16, 0, 0,
        65, 71, -4, -4, -4, -4, -4, -4, -4, -4, -4, -4, -19, -16, 0, 0);
    __m256i indices = _mm256_subs_epu8(in, _mm256_set1_epi8(51));
    __m256i mask = _mm256_cmpgt_epi8(in, _mm256_set1_epi8(25));
    indices = _mm256_sub_epi8(indices, mask);
    return _mm256_add_epi8(in, _mm256_shuffle_epi8(lut, indices));
}

FP_AVX2 static size_t fp_encode_avx2(const uint8_t *src, size_t n, char *dst, fp_level *lv) {
    /* the block's bytes: 4..15 of the lower lane, 0..11 of the upper (see above) */
    const __m256i block_bytes = _mm256_setr_epi32(0, -1, -1, -1, -1, -1, -1, 0);
    fp_level_avx2 acc;
    size_t i = 0;
    char *out = dst;
    __m256i in;
    fp_avx2_level_init(&acc);
    if (n < 28) return fp_encode_scalar(src, n, dst, lv);
    /* nothing may be read before src: build the first block's lower lane by shifting */
    in = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_slli_si128(_mm_loadu_si128((const __m128i *)src), 4)),
        _mm_loadu_si128((const __m128i *)(src + 12)), 1);
    /* 24 bytes -> 32 characters per step; the upper lane reads src[i+12 .. i+27] */
    if (lv) {
        for (;;) {
            _mm256_storeu_si256((__m256i *)out, fp_avx2_enc_translate(fp_avx2_enc_reshuffle(in)));
            /* i is a multiple of 24 and lane offsets are even: the lanes kept are whole samples */
            fp_avx2_level_add_unclipped(&acc, _mm256_and_si256(in, block_bytes));
            out += 32;
            i += 24;
            if (i + 28 > n) break;
            in = _mm256_loadu_si256((const __m256i *)(src + i - 4));
        }
        fp_avx2_level_clips(&acc, src, i);
        fp_avx2_level_finish(&acc, lv, i >> 1);
    } else {
        for (;;) {
            _mm256_storeu_si256((__m256i *)out, fp_avx2_enc_translate(fp_avx2_enc_reshuffle(in)));
            out += 32;
            i += 24;
            if (i + 28 > n) break;
            in = _mm256_loadu_si256((const __m256i *)(src + i - 4));
        }
    }
    return (size_t)(out - dst) + fp_encode_scalar(src + i, n - i, out, lv);
}

/* Muła/Lemire decoder with aqrit's validation: 32 characters -> 24 bytes per step. Returns the
 * number of characters consumed (a multiple of 32); stops early before any invalid character,
 * leaving it to the scalar code to find and reject. */
FP_AVX2 static size_t fp_decode_avx2_blocks(const char *src, size_t len, uint8_t *dst,
                                            fp_level *lv) {
    const __m256i lut_lo = _mm256_setr_epi8(
        0x15, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x13, 0x1A, 0x1B, 0x1B, 0x1B, 0x1A,
        0x15, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x13, 0x1A, 0x1B, 0x1B, 0x1B, 0x1A);
    const __m256i lut_hi = _mm256_setr_epi8(
        0x10, 0x10, 0x01, 0x02, 0x04, 0x08, 0x04, 0x08, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10,
        0x10, 0x10, 0x01, 0x02, 0x04, 0x08, 0x04, 0x08, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10);
    const __m256i lut_roll = _mm256_setr_epi8(
        0, 16, 19, 4, -65, -65, -71, -71, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 16, 19, 4, -65, -65, -71, -71, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m256i mask_2f = _mm256_set1_epi8(0x2f);
    const __m256i pack_shuffle = _mm256_setr_epi8(
        2, 1, 0, 6, 5, 4, 10, 9, 8, 14, 13, 12, -1, -1, -1, -1,
        2, 1, 0, 6, 5, 4, 10, 9, 8, 14, 13, 12, -1, -1, -1, -1);
    const __m256i pack_lanes = _mm256_setr_epi32(0, 1, 2, 4, 5, 6, 7, 7);
    const __m256i decoded_bytes = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
    fp_level_avx2 acc;
    size_t i = 0;
    uint8_t *out = dst;
    fp_avx2_level_init(&acc);
    for (; i + 32 <= len; i += 32) {
        __m256i str = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i hi_nibbles = _mm256_and_si256(_mm256_srli_epi32(str, 4), mask_2f);
        __m256i lo_nibbles = _mm256_and_si256(str, mask_2f);
        __m256i lo = _mm256_shuffle_epi8(lut_lo, lo_nibbles);
        __m256i hi = _mm256_shuffle_epi8(lut_hi, hi_nibbles);
        __m256i eq_2f = _mm256_cmpeq_epi8(str, mask_2f);
        __m256i roll, merged, packed;
        if (!_mm256_testz_si256(lo, hi)) break;
        roll = _mm256_shuffle_epi8(lut_roll, _mm256_add_epi8(eq_2f, hi_nibbles));
        str = _mm256_add_epi8(str, roll); /* now 6-bit values */
        merged = _mm256_maddubs_epi16(str, _mm256_set1_epi32(0x01400140));
        merged = _mm256_madd_epi16(merged, _mm256_set1_epi32(0x00011000));
        packed = _mm256_shuffle_epi8(merged, pack_shuffle);
        packed = _mm256_permutevar8x32_epi32(packed, pack_lanes);
        /* exactly 24 bytes stored: dst never has slack past the decoded length */
        _mm_storeu_si128((__m128i *)out, _mm256_castsi256_si128(packed));
        _mm_storel_epi64((__m128i *)(out + 16), _mm256_extracti128_si256(packed, 1));
        out += 24;
        if (lv) fp_avx2_level_add(&acc, _mm256_and_si256(packed, decoded_bytes));
    }
    if (lv) fp_avx2_level_finish(&acc, lv, (size_t)(out - dst) >> 1);
    return i;
}
#endif /* FP_HAVE_AVX2_BUILD */

/* ---------------------------------------------------------------------------------- public */

static void fp_meter(const uint8_t *p, size_t n, fp_level *lv) {
#if FP_HAVE_AVX2_BUILD
    if (fp_simd_enabled) {
        fp_meter_avx2(p, n, lv);
        return;
    }
#endif
    fp_meter_scalar(p, n, lv);
}

/* Writes the standard padded base64 of src[0..n) (4*ceil(n/3) characters) at dst and, when lv is
 * not NULL, meters the same bytes as PCM16 in the same pass. Returns the characters written. */
static size_t fp_b64_encode(const uint8_t *src, size_t n, char *dst, fp_level *lv) {
#if FP_HAVE_AVX2_BUILD
    if (fp_simd_enabled) return fp_encode_avx2(src, n, dst, lv);
#endif
    return fp_encode_scalar(src, n, dst, lv);
}

/* Decoded size of a strict base64 text of len characters (len % 4 == 0, len > 0 checked by the
 * caller), from its padding. */
static inline size_t fp_b64_decoded_size(const char *src, size_t len) {
    size_t pad = (src[len - 1] == '=') + (src[len - 2] == '=');
    return len / 4 * 3 - pad;
}

/* Decodes strict base64 as binascii.a2b_base64(strict_mode=True) accepts it: len % 4 == 0,
 * alphabet characters only, '=' only as "xx==" / "xxx=" in the last group. dst must hold exactly
 * fp_b64_decoded_size() bytes (nothing is written past them). Meters the decoded PCM into lv
 * (when not NULL). Returns 0, or -1 if the text is not strict base64 (lv then holds partial
 * counts: the caller meters into a scratch fp_level and commits it only on success). */
static int fp_b64_decode(const char *src, size_t len, uint8_t *dst, fp_level *lv) {
    size_t done = 0, body, tail_groups;
    uint8_t *out = dst;
    int last;
    if (len == 0) return 0;
    if (len % 4 != 0) return -1;
    body = len - 4; /* every group but the last has no padding */
#if FP_HAVE_AVX2_BUILD
    if (fp_simd_enabled) {
        done = fp_decode_avx2_blocks(src, body, dst, lv);
        out = dst + done / 4 * 3;
    }
#endif
    tail_groups = (body - done) / 4;
    if (fp_decode_groups_scalar(src + done, tail_groups, out) != 0) return -1;
    out += tail_groups * 3;
    last = fp_decode_last_group(src + body, out);
    if (last < 0) return -1;
    out += last;
    /* the SIMD blocks metered their own bytes in-register; the scalar rest (a multiple of 24
     * bytes in, so sample-aligned) is metered here, while still in L1 */
    if (lv) fp_meter_scalar(dst + done / 4 * 3, (size_t)(out - dst) - done / 4 * 3, lv);
    return 0;
}

#endif /* FASTPATH_KERNELS_H */
