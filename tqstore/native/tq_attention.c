/* Decode attention over TurboQuant pages, and one layer's whole decode step (tq_common.h). */
#include "tq_common.h"

/* ---- bit unpacking (tqstore.codec.packing): 8 indices of b bits in b bytes, LSB first ------- */
/* Dequantizing a row of packed indices into codebook values (scale applied by the caller).
 * Generic path: a constant width per case lets the compiler unroll the extraction; 4-bit rows
 * go through a byte table (two codebook values per code byte), 8-bit rows index directly.
 * AVX-512 VBMI path (where the compiler targets it, and dim % 64 == 0): 64 indices at a time,
 * spread into 8 qwords by one byte permute, cut out by one multishift, looked up 16 at a time
 * with two-table permutes (up to 128 codebook entries in 8 registers). */
typedef struct {
    int bits;
    const float *codebook;
    float byte_table[512]; /* bits == 4: entry b = (codebook[b & 15], codebook[b >> 4]) */
#if TQ_VBMI
    __m512 table[8]; /* the codebook zero-padded to 128 entries */
    __m512i spread; /* byte k of qword g <- chunk byte g * bits + k */
    __m512i shifts; /* byte e of each qword: e * bits */
#endif
} dequantizer;

static void dequantizer_init(dequantizer *d, const float *codebook, int bits) {
    d->bits = bits;
    d->codebook = codebook;
    if (bits == 4)
        for (int b = 0; b < 256; ++b) {
            d->byte_table[2 * b] = codebook[b & 15];
            d->byte_table[2 * b + 1] = codebook[b >> 4];
        }
#if TQ_VBMI
    float padded[128] = {0};
    memcpy(padded, codebook, sizeof(float) * (size_t)(bits < 8 ? 1 << bits : 128));
    for (int k = 0; k < 8; ++k) d->table[k] = _mm512_loadu_ps(padded + 16 * k);
    uint8_t spread[64], shifts[64];
    for (int g = 0; g < 8; ++g)
        for (int k = 0; k < 8; ++k) {
            const int src = g * bits + k;
            spread[g * 8 + k] = (uint8_t)(src < 64 ? src : 63);
            shifts[g * 8 + k] = (uint8_t)(k * bits);
        }
    d->spread = _mm512_loadu_si512(spread);
    d->shifts = _mm512_loadu_si512(shifts);
#endif
}

static inline __attribute__((always_inline)) void dequant_row_bits(
        const uint8_t *codes, int dim, const int bits, const dequantizer *d, float *row) {
    const float *codebook = d->codebook;
    if (bits == 8) {
        for (int j = 0; j < dim; ++j) row[j] = codebook[codes[j]];
        return;
    }
    if (bits == 4) {
        for (int i = 0; i < dim / 2; ++i) memcpy(row + 2 * i, d->byte_table + 2 * codes[i], 8);
        return;
    }
    const uint64_t mask = (1u << bits) - 1u;
    for (int g = 0; g < dim / 8; ++g) {
        uint64_t word = 0;
        memcpy(&word, codes + g * bits, (size_t)bits); /* little-endian hosts (build checks) */
        for (int e = 0; e < 8; ++e) row[g * 8 + e] = codebook[(word >> (e * bits)) & mask];
    }
}

#if TQ_VBMI
static inline __m512 lookup16(const dequantizer *d, __m512i i) {
    const int bits = d->bits;
    if (bits <= 4) return _mm512_permutexvar_ps(i, d->table[0]);
    __m512 lo = _mm512_permutex2var_ps(d->table[0], i, d->table[1]);
    if (bits == 5) return lo;
    __m512 hi = _mm512_permutex2var_ps(d->table[2], i, d->table[3]);
    lo = _mm512_mask_blend_ps(_mm512_test_epi32_mask(i, _mm512_set1_epi32(32)), lo, hi);
    if (bits == 6) return lo;
    __m512 lo2 = _mm512_permutex2var_ps(d->table[4], i, d->table[5]);
    __m512 hi2 = _mm512_permutex2var_ps(d->table[6], i, d->table[7]);
    hi2 = _mm512_mask_blend_ps(_mm512_test_epi32_mask(i, _mm512_set1_epi32(32)), lo2, hi2);
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(i, _mm512_set1_epi32(64)), lo, hi2);
}

static inline void dequant_row_vbmi(const uint8_t *codes, int dim, const dequantizer *d,
                                    float *row) {
    const int bits = d->bits;
    const __m512i mask = _mm512_set1_epi8((char)((1 << bits) - 1));
    const __mmask64 load = bits == 8 ? ~(__mmask64)0 : (((__mmask64)1 << (8 * bits)) - 1);
    for (int c = 0; c < dim / 64; ++c) {
        const __m512i raw = _mm512_maskz_loadu_epi8(load, codes + (size_t)c * 8 * bits);
        const __m512i spread = _mm512_permutexvar_epi8(d->spread, raw);
        const __m512i idx = _mm512_and_si512(_mm512_multishift_epi64_epi8(d->shifts, spread), mask);
        for (int q = 0; q < 4; ++q) {
            const __m512i i = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(idx, q));
            _mm512_storeu_ps(row + c * 64 + q * 16, lookup16(d, i));
        }
    }
}
#endif

static void dequant_row(const uint8_t *codes, int dim, const dequantizer *d, float *row) {
#if TQ_VBMI
    if (dim % 64 == 0 && d->bits < 8) {
        dequant_row_vbmi(codes, dim, d, row);
        return;
    }
#endif
    switch (d->bits) {
        case 1: dequant_row_bits(codes, dim, 1, d, row); break;
        case 2: dequant_row_bits(codes, dim, 2, d, row); break;
        case 3: dequant_row_bits(codes, dim, 3, d, row); break;
        case 4: dequant_row_bits(codes, dim, 4, d, row); break;
        case 5: dequant_row_bits(codes, dim, 5, d, row); break;
        case 6: dequant_row_bits(codes, dim, 6, d, row); break;
        case 7: dequant_row_bits(codes, dim, 7, d, row); break;
        default: dequant_row_bits(codes, dim, 8, d, row); break;
    }
}

/* ---- decode attention ---------------------------------------------------------------------- */
typedef struct {
    const float *queries;
    const uint8_t *key_codes, *value_codes;
    const uint16_t *key_scales, *value_scales;
    const int32_t *tables, *lens;
    const float *key_codebook, *value_codebook;
    int B, Hq, Hkv, Dk, Dv, block_size, max_blocks, key_bits, value_bits, splits;
    float *part_out; /* (B, Hkv, splits, G, Dv) unnormalised accumulators */
    float *part_m, *part_l; /* (B, Hkv, splits, G) running max and sum */
    float *scratch; /* per unit: one block of dequantized rows */
} decode_args;

static inline float dot_lanes(const float *a, const float *b, int n) {
    float lane[TQ_LANES] = {0};
    for (int j = 0; j < n; j += TQ_LANES)
        for (int k = 0; k < TQ_LANES; ++k) lane[k] += a[j + k] * b[j + k];
    float s = 0.0f;
    for (int k = 0; k < TQ_LANES; ++k) s += lane[k];
    return s;
}

#define TQ_MAX_BLOCK 256

/* One (sequence, kv head, split): blocks [first, last) of the sequence's table, online softmax
 * per block of tokens (scores of a block first, then its values). */
static void decode_unit(const decode_args *a, int unit) {
    const int split = unit % a->splits, bh = unit / a->splits;
    const int b = bh / a->Hkv, h = bh % a->Hkv;
    const int G = a->Hq / a->Hkv, Dk = a->Dk, Dv = a->Dv, bs = a->block_size;
    const int kbytes = Dk * a->key_bits / 8, vbytes = Dv * a->value_bits / 8;
    const int len = a->lens[b] < 0 ? 0 : a->lens[b];
    int nblocks = (len + bs - 1) / bs;
    if (nblocks > a->max_blocks) nblocks = a->max_blocks;
    const int per = (nblocks + a->splits - 1) / a->splits;
    const int first = split * per, last = first + per < nblocks ? first + per : nblocks;

    const size_t part = ((size_t)bh * a->splits + split) * G;
    float *acc = a->part_out + part * Dv, *mrun = a->part_m + part, *lrun = a->part_l + part;
    const float *q = a->queries + ((size_t)b * a->Hq + (size_t)h * G) * Dk;
    for (int g = 0; g < G; ++g) { mrun[g] = -INFINITY; lrun[g] = 0.0f; }
    memset(acc, 0, sizeof(float) * (size_t)G * Dv);

    float scores[TQ_MAX_GROUP * TQ_MAX_BLOCK] __attribute__((aligned(64)));
    float *rows = a->scratch + (size_t)unit * bs * (Dk > Dv ? Dk : Dv); /* this unit's rows */
    dequantizer keys, values;
    dequantizer_init(&keys, a->key_codebook, a->key_bits);
    dequantizer_init(&values, a->value_codebook, a->value_bits);
    for (int i = first; i < last; ++i) {
        const int block = a->tables[(size_t)b * a->max_blocks + i];
        const int n = len - i * bs < bs ? len - i * bs : bs;
        const size_t base = ((size_t)block * a->Hkv + h) * bs; /* (block, head, slot 0) */
        /* Dequantize the block's rows first, then use them: a row read back right after its
         * scalar stores would stall on store forwarding. */
        for (int t = 0; t < n; ++t)
            dequant_row(a->key_codes + (base + t) * kbytes, Dk, &keys, rows + (size_t)t * Dk);
        for (int t = 0; t < n; ++t) {
            const float ks = half_to_float(a->key_scales[base + t]);
            for (int g = 0; g < G; ++g)
                scores[g * bs + t] = dot_lanes(q + (size_t)g * Dk, rows + (size_t)t * Dk, Dk) * ks;
        }
        for (int g = 0; g < G; ++g) {
            float *sg = scores + g * bs;
            float mb = -INFINITY;
            for (int t = 0; t < n; ++t) mb = sg[t] > mb ? sg[t] : mb;
            const float mnew = mb > mrun[g] ? mb : mrun[g];
            const float corr = isinf(mrun[g]) ? 0.0f : exp_nonpositive(mrun[g] - mnew);
            float sum = 0.0f;
            for (int t = 0; t < n; ++t) sg[t] = exp_nonpositive(sg[t] - mnew);
            for (int t = 0; t < n; ++t) sum += sg[t];
            lrun[g] = lrun[g] * corr + sum;
            mrun[g] = mnew;
            if (corr != 1.0f) {
                float *ag = acc + (size_t)g * Dv;
                for (int j = 0; j < Dv; ++j) ag[j] *= corr;
            }
        }
        for (int t = 0; t < n; ++t)
            dequant_row(a->value_codes + (base + t) * vbytes, Dv, &values, rows + (size_t)t * Dv);
        for (int t = 0; t < n; ++t) {
            const float *row = rows + (size_t)t * Dv;
            const float vs = half_to_float(a->value_scales[base + t]);
            for (int g = 0; g < G; ++g) {
                const float p = scores[g * bs + t] * vs;
                float *ag = acc + (size_t)g * Dv;
                for (int j = 0; j < Dv; ++j) ag[j] += p * row[j];
            }
        }
    }
}

static void decode_unit_any(const void *args, int unit) {
    decode_unit((const decode_args *)args, unit);
}

/* Returns 0, or -1 for shapes this build does not take (the caller then uses the reference). */
int tq_decode_attention(const float *queries, const uint8_t *key_codes, const uint16_t *key_scales,
                        const uint8_t *value_codes, const uint16_t *value_scales,
                        const int32_t *tables, const int32_t *lens,
                        const float *key_codebook, const float *value_codebook,
                        int B, int Hq, int Hkv, int Dk, int Dv, int block_size, int max_blocks,
                        int key_bits, int value_bits, int splits, int threads,
                        float *out, float *lse) {
    if (B < 0 || Hkv <= 0 || Hq % Hkv || Hq / Hkv > TQ_MAX_GROUP || Dk > TQ_MAX_DIM ||
        Dv > TQ_MAX_DIM || Dk % TQ_LANES || Dv % 8 || block_size <= 0 ||
        block_size > TQ_MAX_BLOCK || splits <= 0 ||
        key_bits < 1 || key_bits > 8 || value_bits < 1 || value_bits > 8)
        return -1;
    const int G = Hq / Hkv;
    const size_t parts = (size_t)B * Hkv * splits * G;
    decode_args a = {queries, key_codes, value_codes, key_scales, value_scales, tables, lens,
                     key_codebook, value_codebook, B, Hq, Hkv, Dk, Dv, block_size, max_blocks,
                     key_bits, value_bits, splits, NULL, NULL, NULL, NULL};
    a.part_out = malloc(sizeof(float) * parts * Dv);
    a.scratch = malloc(sizeof(float) * (size_t)B * Hkv * splits * block_size * (Dk > Dv ? Dk : Dv));
    a.part_m = malloc(sizeof(float) * parts);
    a.part_l = malloc(sizeof(float) * parts);
    if (!a.part_out || !a.part_m || !a.part_l || !a.scratch) {
        free(a.part_out); free(a.part_m); free(a.part_l); free(a.scratch);
        return -2;
    }
    tq_run_parallel(decode_unit_any, &a, B * Hkv * splits, threads);
    /* Merge the splits of each (sequence, query head) in split order, then normalise. */
    for (int bh = 0; bh < B * Hkv; ++bh) {
        const int b = bh / Hkv, h = bh % Hkv;
        for (int g = 0; g < G; ++g) {
            float m = -INFINITY;
            for (int s = 0; s < splits; ++s) {
                const float ms = a.part_m[((size_t)bh * splits + s) * G + g];
                m = ms > m ? ms : m;
            }
            float *o = out + ((size_t)b * Hq + (size_t)h * G + g) * Dv;
            memset(o, 0, sizeof(float) * (size_t)Dv);
            float l = 0.0f;
            if (!isinf(m)) {
                for (int s = 0; s < splits; ++s) {
                    const size_t p = ((size_t)bh * splits + s) * G + g;
                    if (isinf(a.part_m[p])) continue;
                    const float w = expf(a.part_m[p] - m);
                    l += a.part_l[p] * w;
                    for (int j = 0; j < Dv; ++j) o[j] += a.part_out[p * Dv + j] * w;
                }
                for (int j = 0; j < Dv; ++j) o[j] /= l;
            }
            lse[(size_t)b * Hq + (size_t)h * G + g] = isinf(m) ? -INFINITY : m + logf(l);
        }
    }
    free(a.part_out); free(a.part_m); free(a.part_l); free(a.scratch);
    return 0;
}

/* ---- one decode step of one layer: query rotation, pages, un-rotation, merge with the tail --
 * The whole of PagedLayerCache.attend on the CPU in one call (the contract of
 * tqstore.metal.reference.decode_epilogue_reference around the paged attention):
 *   q = scale * queries (B, Hq, Dk), q_rot[h] = q[h] @ query_rotation[h / G]  (R_K^T rows)
 *   (o, lse) = attention over the pages of q_rot; o = o @ output_rotation[h / G]  (R_V)
 *   with a tail of n fp16 tokens (B, Hkv, n, D): s_t = q . (k_t - key_center), the two softmax
 *   pieces merged: m = max(max_t s_t, lse), out = (e^(lse-m) o + sum_t e^(s_t-m) v_t) /
 *   (e^(lse-m) + sum_t e^(s_t-m)).  out f32 (B, Hq, Dv).
 * Equal to the composition within float32 rounding (compared with a tolerance, as above). */
int tq_decode_step(const float *queries, float scale, const float *query_rotation,
                   const uint8_t *key_codes, const uint16_t *key_scales,
                   const uint8_t *value_codes, const uint16_t *value_scales,
                   const int32_t *tables, const int32_t *lens,
                   const float *key_codebook, const float *value_codebook,
                   const uint16_t *tail_keys, const uint16_t *tail_values, int tail_len,
                   const float *key_center, const float *output_rotation,
                   int B, int Hq, int Hkv, int Dk, int Dv, int block_size, int max_blocks,
                   int key_bits, int value_bits, int splits, int threads, float *out) {
    if (B <= 0 || Hkv <= 0 || Hq % Hkv || tail_len < 0) return -1;
    const int G = Hq / Hkv;
    float *q = malloc(sizeof(float) * (size_t)B * Hq * Dk);
    float *q_rot = malloc(sizeof(float) * (size_t)B * Hq * Dk);
    float *pages = malloc(sizeof(float) * (size_t)B * Hq * Dv);
    float *lse = malloc(sizeof(float) * (size_t)B * Hq);
    int rc = -2;
    if (!q || !q_rot || !pages || !lse) goto done;
    for (size_t i = 0; i < (size_t)B * Hq * Dk; ++i) q[i] = queries[i] * scale;
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < Hq; ++h) {
            const float *qi = q + ((size_t)b * Hq + h) * Dk, *R = query_rotation + (size_t)(h / G) * Dk * Dk;
            float *qo = q_rot + ((size_t)b * Hq + h) * Dk;
            for (int j = 0; j < Dk; ++j) qo[j] = 0.0f;
            for (int i = 0; i < Dk; ++i)
                for (int j = 0; j < Dk; ++j) qo[j] += qi[i] * R[(size_t)i * Dk + j];
        }
    rc = tq_decode_attention(q_rot, key_codes, key_scales, value_codes, value_scales, tables, lens,
                             key_codebook, value_codebook, B, Hq, Hkv, Dk, Dv, block_size,
                             max_blocks, key_bits, value_bits, splits, threads, pages, lse);
    if (rc != 0) goto done;
    float key[TQ_MAX_DIM], value[TQ_MAX_DIM], o[TQ_MAX_DIM];
    float *s = malloc(sizeof(float) * (size_t)(tail_len > 0 ? tail_len : 1));
    if (!s) { rc = -2; goto done; }
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < Hq; ++h) {
            const int kv = h / G;
            const float *po = pages + ((size_t)b * Hq + h) * Dv, *R = output_rotation + (size_t)kv * Dv * Dv;
            for (int j = 0; j < Dv; ++j) o[j] = 0.0f;
            for (int i = 0; i < Dv; ++i)
                for (int j = 0; j < Dv; ++j) o[j] += po[i] * R[(size_t)i * Dv + j];
            float *dst = out + ((size_t)b * Hq + h) * Dv;
            const float l = lse[(size_t)b * Hq + h];
            if (tail_len == 0) {
                memcpy(dst, o, sizeof(float) * (size_t)Dv);
                continue;
            }
            const float *qi = q + ((size_t)b * Hq + h) * Dk;
            const size_t base = ((size_t)b * Hkv + kv) * tail_len;
            float m = l;
            for (int t = 0; t < tail_len; ++t) {
                for (int j = 0; j < Dk; ++j)
                    key[j] = half_to_float(tail_keys[(base + t) * Dk + j]) - key_center[(size_t)kv * Dk + j];
                s[t] = dot_lanes(qi, key, Dk);
                m = s[t] > m ? s[t] : m;
            }
            const float w = isinf(l) ? 0.0f : expf(l - m);
            float denom = w;
            for (int j = 0; j < Dv; ++j) dst[j] = w * o[j];
            for (int t = 0; t < tail_len; ++t) {
                const float p = expf(s[t] - m);
                denom += p;
                for (int j = 0; j < Dv; ++j) value[j] = half_to_float(tail_values[(base + t) * Dv + j]);
                for (int j = 0; j < Dv; ++j) dst[j] += p * value[j];
            }
            for (int j = 0; j < Dv; ++j) dst[j] /= denom;
        }
    free(s);
done:
    free(q); free(q_rot); free(pages); free(lse);
    return rc;
}


/* ---- one decode step of one layer for B sequences of a batch --------------------------------
 * Each row is its own sequence: its own block table (num_blocks[b] entries), committed length,
 * fp16 tail (tail_lens[b] tokens, (1, Hkv, n, D); NULL when 0) and splits. Row b is exactly
 * tq_decode_step with B = 1 on that row's arguments, so a batched step's bits equal the
 * sequence's own step alone (the serving engine's batches rest on it); what the batch saves is
 * one foreign call and one input evaluation per row. */
int tq_decode_step_rows(const float *queries, float scale, const float *query_rotation,
                        const uint8_t *key_codes, const uint16_t *key_scales,
                        const uint8_t *value_codes, const uint16_t *value_scales,
                        const int32_t *const *tables, const int32_t *num_blocks,
                        const int32_t *lens, const float *key_codebook,
                        const float *value_codebook, const uint16_t *const *tail_keys,
                        const uint16_t *const *tail_values, const int32_t *tail_lens,
                        const int32_t *splits, const float *key_center,
                        const float *output_rotation, int B, int Hq, int Hkv, int Dk, int Dv,
                        int block_size, int key_bits, int value_bits, int threads, float *out) {
    if (B <= 0) return -1;
    for (int b = 0; b < B; ++b) {
        const int rc = tq_decode_step(
            queries + (size_t)b * Hq * Dk, scale, query_rotation, key_codes, key_scales,
            value_codes, value_scales, tables[b], lens + b, key_codebook, value_codebook,
            tail_keys[b], tail_values[b], tail_lens[b], key_center, output_rotation, 1, Hq, Hkv,
            Dk, Dv, block_size, num_blocks[b], key_bits, value_bits, splits[b], threads,
            out + (size_t)b * Hq * Dv);
        if (rc != 0) return rc;
    }
    return 0;
}

/* ---- dequantization of gathered rows ------------------------------------------------------- */
/* rows x (codes, f16 scale) -> out f32 (rows, dim) = codebook[index] * scale, in the rotated
 * space: TurboQuantCodec.dequantize_rotated for MSE codes, bit for bit (one float32 product
 * per element, as MLX's take-then-multiply). For multi-token steps over pages, which gather a
 * whole context per layer. Returns 0, or -1 for shapes this build does not take. */
int tq_dequantize_rows(const uint8_t *codes, const uint16_t *scales, const float *codebook,
                       int bits, int dim, long rows, float *out) {
    if (bits < 1 || bits > 8 || dim <= 0 || dim % 8 || dim > TQ_MAX_DIM || rows < 0) return -1;
    dequantizer d;
    dequantizer_init(&d, codebook, bits);
    const int row_bytes = dim * bits / 8;
    for (long r = 0; r < rows; ++r) {
        float *o = out + r * dim;
        dequant_row(codes + r * row_bytes, dim, &d, o);
        const float s = half_to_float(scales[r]);
        for (int j = 0; j < dim; ++j) o[j] *= s;
    }
    return 0;
}
