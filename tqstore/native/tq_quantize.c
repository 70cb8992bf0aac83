/* The TurboQuant quantizer, byte-identical to the codec (tq_common.h). */
#include "tq_common.h"

/* ---- quantize (byte-identical to TurboQuantCodec.quantize, power-of-two head_dim) ---------- */
#define TQ_QLANES 16 /* rows quantized together: every loop below runs across them */

/* codec.tree_sum_last over the first n entries of a[j][lane] (halves added pairwise, an odd
 * tail carried), for each lane independently: the same additions in the same order per row. */
static void tree_sum_lanes(float (*a)[TQ_QLANES], int n) {
    while (n > 1) {
        const int half = n / 2;
        for (int i = 0; i < half; ++i)
            for (int l = 0; l < TQ_QLANES; ++l) a[i][l] = a[i][l] + a[i + half][l];
        if (n % 2)
            for (int l = 0; l < TQ_QLANES; ++l) a[half][l] = a[2 * half][l];
        n = half + n % 2;
    }
}

typedef struct {
    const void *x;
    int x_is_half, tokens, heads, D, bits, norm_correction;
    long rows;
    const float *signs, *codebook, *midpoints;
    float rot_norm;
    uint8_t *codes;
    uint16_t *scales;
} quantize_args;

/* Rows per unit of a parallel call: many 16-row groups per unit, so that a thread's start-up
 * and its thread-local scratch lookup are paid once per unit, not per group. */
#define TQ_QUANTIZE_UNIT_ROWS 1024

/* Rows [begin, end) of a tq_quantize call: TQ_QLANES at a time, transposed (v[j][lane]), so
 * that each operation of the codec runs as one vector operation across rows; per row it is
 * still exactly the codec's sequence of float32 operations, so a row's bytes do not depend on
 * which thread ran it or on how many ran. begin is a multiple of TQ_QLANES. */
static void quantize_rows(const void *x, int x_is_half, long begin, long end, int tokens,
                          int heads, int D, int bits, int norm_correction, const float *signs,
                          const float *codebook, const float *midpoints, float rot_norm,
                          uint8_t *codes, uint16_t *scales) {
    /* tq_quantize checked these; said again here, they let the compiler know the ranges (the
       loops ran ~20% slower on one thread without them). */
    if (D <= 0 || D > TQ_MAX_DIM || (D & (D - 1)) || D % 8 || bits < 1 || bits > 8 ||
        tokens <= 0 || heads <= 0)
        return;
    const int row_bytes = D * bits / 8;
    static __thread float v[TQ_MAX_DIM][TQ_QLANES], t[TQ_MAX_DIM][TQ_QLANES];
    static __thread uint8_t idx[TQ_QLANES][TQ_MAX_DIM];
    float norm[TQ_QLANES], safe[TQ_QLANES], sign[TQ_MAX_DIM][TQ_QLANES];
    for (long r0 = begin; r0 < end; r0 += TQ_QLANES) {
        const int n = end - r0 < TQ_QLANES ? (int)(end - r0) : TQ_QLANES;
        for (int l = 0; l < TQ_QLANES; ++l) {
            const long r = r0 + (l < n ? l : 0); /* spare lanes redo row r0; never stored */
            const int head = (int)((r / tokens) % heads);
            for (int j = 0; j < D; ++j) {
                v[j][l] = x_is_half ? half_to_float(((const uint16_t *)x)[r * D + j])
                                    : ((const float *)x)[r * D + j];
                sign[j][l] = signs[(size_t)head * D + j];
            }
        }
        for (int j = 0; j < D; ++j)
            for (int l = 0; l < TQ_QLANES; ++l) t[j][l] = v[j][l] * v[j][l];
        tree_sum_lanes(t, D);
        for (int l = 0; l < TQ_QLANES; ++l) {
            norm[l] = sqrtf(t[0][l]);
            safe[l] = norm[l] > 0.0f ? norm[l] : 1.0f;
        }
        for (int j = 0; j < D; ++j)
            for (int l = 0; l < TQ_QLANES; ++l) v[j][l] = (v[j][l] / safe[l]) * sign[j][l];
        for (int h = 1; h < D; h <<= 1)
            for (int blk = 0; blk < D; blk += 2 * h)
                for (int i = 0; i < h; ++i)
                    for (int l = 0; l < TQ_QLANES; ++l) {
                        const float p = v[blk + i][l], q = v[blk + h + i][l];
                        v[blk + i][l] = p + q;
                        v[blk + h + i][l] = p - q;
                    }
        for (int j = 0; j < D; ++j) {
            int k[TQ_QLANES] = {0};
            float y[TQ_QLANES];
            for (int l = 0; l < TQ_QLANES; ++l) y[l] = v[j][l] * rot_norm;
            for (int level = bits - 1; level >= 0; --level)
                for (int l = 0; l < TQ_QLANES; ++l) {
                    const int cand = k[l] + (1 << level);
                    k[l] = y[l] > midpoints[cand - 1] ? cand : k[l];
                }
            for (int l = 0; l < TQ_QLANES; ++l) {
                idx[l][j] = (uint8_t)k[l];
                t[j][l] = codebook[k[l]] * codebook[k[l]];
            }
        }
        float scale[TQ_QLANES];
        for (int l = 0; l < TQ_QLANES; ++l) scale[l] = norm[l];
        if (norm_correction) {
            tree_sum_lanes(t, D);
            for (int l = 0; l < TQ_QLANES; ++l) scale[l] = norm[l] / sqrtf(t[0][l]);
        }
        for (int l = 0; l < n; ++l) {
            const long r = r0 + l;
            /* mx.minimum(scale, 65504): NaN propagates (as in MLX), all else is clamped. */
            const float sc = scale[l];
            scales[r] = float_to_half(sc != sc ? sc : (sc < 65504.0f ? sc : 65504.0f));
            uint8_t *out = codes + r * row_bytes;
            if (bits == 8) {
                memcpy(out, idx[l], (size_t)D);
                continue;
            }
            for (int g = 0; g < D / 8; ++g) {
                uint64_t word = 0;
                for (int e = 0; e < 8; ++e) word |= (uint64_t)idx[l][g * 8 + e] << (e * bits);
                for (int b = 0; b < bits; ++b) out[g * bits + b] = (uint8_t)((word >> (8 * b)) & 0xffu);
            }
        }
    }
}

static void quantize_unit(const void *p, int unit) {
    const quantize_args *a = (const quantize_args *)p;
    const long begin = (long)unit * TQ_QUANTIZE_UNIT_ROWS;
    const long end = begin + TQ_QUANTIZE_UNIT_ROWS;
    quantize_rows(a->x, a->x_is_half, begin, end < a->rows ? end : a->rows, a->tokens, a->heads,
                  a->D, a->bits, a->norm_correction, a->signs, a->codebook, a->midpoints,
                  a->rot_norm, a->codes, a->scales);
}

/* x f32 or f16 (x_is_half) (rows, D) with row r belonging to head (r / tokens) % heads; signs f32 (heads, D);
 * codebook f32 (2^bits); midpoints f32 (2^bits - 1); rot_norm = float32(1/sqrt(D)).
 * codes u8 (rows, D*bits/8), scales f16 (rows); on up to `threads` threads (the bytes never
 * depend on it). Returns 0, or -1 for shapes it does not take. */
int tq_quantize(const void *x, int x_is_half, long rows, int tokens, int heads, int D, int bits,
                int norm_correction, const float *signs, const float *codebook,
                const float *midpoints, float rot_norm, uint8_t *codes, uint16_t *scales,
                int threads) {
    if (D <= 0 || D > TQ_MAX_DIM || (D & (D - 1)) || D % 8 || bits < 1 || bits > 8 ||
        tokens <= 0 || heads <= 0)
        return -1;
    const quantize_args args = {x, x_is_half, tokens, heads, D, bits, norm_correction, rows,
                                signs, codebook, midpoints, rot_norm, codes, scales};
    const long units = (rows + TQ_QUANTIZE_UNIT_ROWS - 1) / TQ_QUANTIZE_UNIT_ROWS;
    if (units > 0x7fffffffL) return -1;
    if (threads <= 1) { /* one pass, as before the split */
        quantize_rows(x, x_is_half, 0, rows, tokens, heads, D, bits, norm_correction, signs,
                      codebook, midpoints, rot_norm, codes, scales);
        return 0;
    }
    tq_run_parallel(quantize_unit, &args, (int)units, threads);
    return 0;
}
