#ifndef TQ_COMMON_H
#define TQ_COMMON_H
/* tqstore's CPU kernels (tq_attention.c, tq_quantize.c, tq_softmax.c; this header: what they
 * share): decode attention over TurboQuant pages, the TurboQuant quantizer, and the row softmax
 * of multi-token attention steps.
 *
 * Loaded through ctypes by tqstore/native/cpu_kernels.py (built at first use by build.py).
 * They compute the same functions as the pure-MLX reference (tqstore/metal/reference.py) and
 * the codec (tqstore/codec/turboquant.py), which stay the oracle:
 *
 * - tq_quantize is BYTE-IDENTICAL to TurboQuantCodec.quantize for power-of-two head dims:
 *   the codec is a fixed sequence of float32 elementwise ops and fixed-order tree sums, each
 *   rounded on its own, and this does the very same operations in the very same order. The
 *   build compiles with -ffp-contract=off (no fused multiply-adds) and without fast-math, so
 *   every +, -, *, / and sqrtf is one correctly rounded IEEE operation.
 * - tq_decode_attention equals the reference within float32 rounding (it sums in another
 *   order than MLX's matmuls): callers compare with a tolerance, never bitwise. Its own result
 *   is deterministic (a fixed order for given shapes, whatever the thread count: each
 *   (sequence, kv head, split) is computed by one thread, and splits merge in index order).
 *
 * Memory layout (what tqstore.paged.arenas allocates; all row-major, contiguous):
 *   queries f32 (B, Hq, Dk), rotated and pre-scaled; key_codes u8 (NB, Hkv, bs, Dk*kbits/8);
 *   key_scales f16 (NB, Hkv, bs); value_codes u8 (NB, Hkv, bs, Dv*vbits/8); value_scales f16;
 *   tables i32 (B, max_blocks); lens i32 (B); codebooks f32 (2^bits).
 *   out f32 (B, Hq, Dv) in value-rotated space; lse f32 (B, Hq), natural log, -inf if empty.
 */
#include <math.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#include <immintrin.h>
#define TQ_VBMI 1
#else
#define TQ_VBMI 0
#endif
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TQ_MAX_DIM 256
#define TQ_MAX_GROUP 64
#define TQ_LANES 8

/* ---- float16 <-> float32, exact (round to nearest even on the way down) -------------------- */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            uint32_t m = mant;
            do { ++e; m <<= 1; } while ((m & 0x400u) == 0);
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((m & 0x3ffu) << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) /* inf or NaN (NaN stays a quiet NaN) */
        return sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u | ((absx >> 13) & 0x3ffu) : 0);
    if (absx >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
        return sign | 0x7c00u;
    if (absx < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
        if (absx < 0x33000000u) return sign; /* < 2^-25 rounds to zero (ties to even: 0) */
        /* value = m * 2^(e - 150); in half-subnormal units of 2^-24 that is m >> (126 - e) */
        const uint32_t e = absx >> 23, m = (absx & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126 - e;
        uint32_t q = m >> shift;
        const uint32_t r = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (r > halfway || (r == halfway && (q & 1u))) ++q;
        return sign | (uint16_t)q;
    }
    uint32_t h = ((absx >> 13) - ((127 - 15) << 10)); /* exponent rebias, mantissa truncated */
    const uint32_t r = absx & 0x1fffu;
    if (r > 0x1000u || (r == 0x1000u && (h & 1u))) ++h;
    return sign | (uint16_t)h;
}

/* exp(x) for x <= 0 (softmax weights), vectorisable: 2^n * p(f) with a degree-6 polynomial
 * on f in [-0.5, 0.5] ln 2; relative error below 3e-7 (the callers compare with a tolerance).
 * Below -87 (and -inf) it returns 0. n is rounded with the 1.5 * 2^23 trick rather than
 * floorf: GCC left the floorf form scalar in the softmax's loop (4 ns an element), and this
 * form vectorises. */
static inline float exp_nonpositive(float x) {
    const float xc = x < -87.0f ? -87.0f : x; /* NaN stays NaN */
    const float t = xc * 1.44269504088896341f;
    const float n = (t + 12582912.0f) - 12582912.0f; /* round to nearest: |t| < 2^22 */
    const float f = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    float p = 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23; /* n >= -126: a normal power */
    float scale;
    memcpy(&scale, &bits, 4);
    return x < -87.0f ? 0.0f : p * scale;
}

/* ---- work splitting ------------------------------------------------------------------------ */
/* Runs fn(args, u) for units [0, count) on up to `threads` threads (the caller's included), in
 * fixed contiguous slices. Which thread runs a unit never changes a unit's result: callers
 * make each unit's work independent of the others. */
typedef void (*tq_unit_fn)(const void *args, int unit);

typedef struct {
    tq_unit_fn fn;
    const void *args;
    int begin, end;
} tq_slice;

static inline void *tq_slice_worker(void *p) {
    const tq_slice *s = (const tq_slice *)p;
    for (int u = s->begin; u < s->end; ++u) s->fn(s->args, u);
    return NULL;
}

static inline void tq_run_parallel(tq_unit_fn fn, const void *args, int count, int threads) {
    if (threads > count) threads = count;
    if (threads > 64) threads = 64;
    if (threads <= 1) {
        for (int u = 0; u < count; ++u) fn(args, u);
        return;
    }
    pthread_t tid[64];
    tq_slice slice[64];
    int started = 0;
    for (int k = 0; k < threads; ++k) {
        slice[k].fn = fn;
        slice[k].args = args;
        slice[k].begin = (int)((long)count * k / threads);
        slice[k].end = (int)((long)count * (k + 1) / threads);
    }
    for (int k = 1; k < threads; ++k)
        if (pthread_create(&tid[k], NULL, tq_slice_worker, &slice[k]) == 0) started = k; else break;
    tq_slice_worker(&slice[0]);
    for (int k = 1; k <= started; ++k) pthread_join(tid[k], NULL);
    for (int k = started + 1; k < threads; ++k) tq_slice_worker(&slice[k]); /* threads refused */
}

#endif /* TQ_COMMON_H */
