#ifndef TQ_COMMON_H
#define TQ_COMMON_H
/* tqstore's CPU kernels (tq_attention.c, tq_quantize.c; this header: what both share): decode
 * attention over TurboQuant pages and the TurboQuant quantizer.
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

#endif /* TQ_COMMON_H */
