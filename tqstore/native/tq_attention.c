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
/* Work is cut into units of (row, kv head, split), each row with its own block table, length and
 * splits. A unit's arithmetic depends only on its own row's arguments, and the splits of one
 * (row, head) are merged in split order afterwards, so a row's bits are the same whether it
 * runs alone or among others, and whatever the thread count. */
typedef struct {
    const float *queries; /* (B, Hq, Dk): rotated and scaled */
    const uint8_t *key_codes, *value_codes;
    const uint16_t *key_scales, *value_scales;
    const int32_t *const *tables; /* tables[b]: row b's block table, max_blocks[b] entries */
    const int32_t *max_blocks, *lens, *splits;
    const int *first_unit; /* row b's units are [first_unit[b], first_unit[b + 1]) */
    const float *key_codebook, *value_codebook;
    int B, Hq, Hkv, Dk, Dv, block_size, key_bits, value_bits;
    float *part_out; /* per unit: (G, Dv) unnormalised accumulators */
    float *part_m, *part_l; /* per unit: (G) running max and sum */
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
#define TQ_STRIPE 32 /* value lanes per pass of the accumulation (then 8 at a time) */
/* 8 floats as one value (GCC/Clang vector extension: lowered to whatever the target has). */
typedef float tq_v8 __attribute__((vector_size(32)));

/* One (row, kv head, split): blocks [first, last) of the row's table, online softmax per block
 * of tokens (scores of a block first, then its values). */
static void decode_unit(const decode_args *a, int unit) {
    int b = 0;
    while (unit >= a->first_unit[b + 1]) ++b;
    const int splits = a->splits[b], local = unit - a->first_unit[b];
    const int split = local % splits, h = local / splits;
    const int G = a->Hq / a->Hkv, Dk = a->Dk, Dv = a->Dv, bs = a->block_size;
    const int kbytes = Dk * a->key_bits / 8, vbytes = Dv * a->value_bits / 8;
    const int len = a->lens[b] < 0 ? 0 : a->lens[b];
    int nblocks = (len + bs - 1) / bs;
    if (nblocks > a->max_blocks[b]) nblocks = a->max_blocks[b];
    const int per = (nblocks + splits - 1) / splits;
    const int first = split * per, last = first + per < nblocks ? first + per : nblocks;
    const int32_t *table = a->tables[b];

    const size_t part = (size_t)unit * G;
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
        const int block = table[i];
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
        for (int t = 0; t < n; ++t) { /* the weights times the value scales, in place */
            const float vs = half_to_float(a->value_scales[base + t]);
            for (int g = 0; g < G; ++g) scores[g * bs + t] *= vs;
        }
        /* acc[g][j] += p[g][t] * row[t][j] over t in order, one running sum per element held
         * in registers for a stripe of TQ_STRIPE lanes (the order of the sums is that of a
         * loop over t outside: the same bits), instead of a load and a store of the whole
         * accumulator for every token. */
        for (int g = 0; g < G; ++g) {
            float *ag = acc + (size_t)g * Dv;
            const float *pg = scores + g * bs;
            int j = 0;
            for (; j + TQ_STRIPE <= Dv; j += TQ_STRIPE) {
                /* Four independent 8-lane sums: four dependency chains for the adds. */
                tq_v8 r0, r1, r2, r3;
                memcpy(&r0, ag + j, 32); memcpy(&r1, ag + j + 8, 32);
                memcpy(&r2, ag + j + 16, 32); memcpy(&r3, ag + j + 24, 32);
                for (int t = 0; t < n; ++t) {
                    const float *row = rows + (size_t)t * Dv + j;
                    const tq_v8 p = {pg[t], pg[t], pg[t], pg[t], pg[t], pg[t], pg[t], pg[t]};
                    tq_v8 x0, x1, x2, x3;
                    memcpy(&x0, row, 32); memcpy(&x1, row + 8, 32);
                    memcpy(&x2, row + 16, 32); memcpy(&x3, row + 24, 32);
                    r0 += p * x0; r1 += p * x1; r2 += p * x2; r3 += p * x3;
                }
                memcpy(ag + j, &r0, 32); memcpy(ag + j + 8, &r1, 32);
                memcpy(ag + j + 16, &r2, 32); memcpy(ag + j + 24, &r3, 32);
            }
            for (; j < Dv; j += 8) { /* the rest, 8 lanes at a time (Dv % 8 == 0) */
                tq_v8 r0;
                memcpy(&r0, ag + j, 32);
                for (int t = 0; t < n; ++t) {
                    const tq_v8 p = {pg[t], pg[t], pg[t], pg[t], pg[t], pg[t], pg[t], pg[t]};
                    tq_v8 x0;
                    memcpy(&x0, rows + (size_t)t * Dv + j, 32);
                    r0 += p * x0;
                }
                memcpy(ag + j, &r0, 32);
            }
        }
    }
}

static void decode_unit_any(const void *args, int unit) {
    decode_unit((const decode_args *)args, unit);
}

static int shapes_ok(int Hq, int Hkv, int Dk, int Dv, int block_size, int key_bits,
                     int value_bits) {
    return Hkv > 0 && Hq % Hkv == 0 && Hq / Hkv <= TQ_MAX_GROUP && Dk <= TQ_MAX_DIM &&
           Dv <= TQ_MAX_DIM && Dk % TQ_LANES == 0 && Dv % 8 == 0 && block_size > 0 &&
           block_size <= TQ_MAX_BLOCK && key_bits >= 1 && key_bits <= 8 && value_bits >= 1 &&
           value_bits <= 8;
}

/* The units of a (filled in but for the buffers and first_unit) on up to `threads` threads,
 * then each (row, query head)'s splits merged in split order: out (B, Hq, Dv), lse (B, Hq).
 * Returns 0, -2 when out of memory. */
static int attend_rows(decode_args *a, int threads, float *out, float *lse) {
    const int B = a->B, Hq = a->Hq, Hkv = a->Hkv, Dv = a->Dv, G = Hq / Hkv;
    int *first_unit = malloc(sizeof(int) * (size_t)(B + 1));
    if (!first_unit) return -2;
    first_unit[0] = 0;
    for (int b = 0; b < B; ++b) first_unit[b + 1] = first_unit[b] + Hkv * a->splits[b];
    const int units = first_unit[B];
    const size_t parts = (size_t)units * G;
    a->first_unit = first_unit;
    a->part_out = malloc(sizeof(float) * parts * Dv);
    a->scratch = malloc(sizeof(float) * (size_t)units * a->block_size *
                        (a->Dk > Dv ? a->Dk : Dv));
    a->part_m = malloc(sizeof(float) * parts);
    a->part_l = malloc(sizeof(float) * parts);
    int rc = -2;
    if (a->part_out && a->part_m && a->part_l && a->scratch) {
        tq_run_parallel(decode_unit_any, a, units, threads);
        for (int b = 0; b < B; ++b)
            for (int h = 0; h < Hkv; ++h)
                for (int g = 0; g < G; ++g) {
                    const int splits = a->splits[b];
                    const size_t p0 = (size_t)(first_unit[b] + h * splits) * G + g;
                    float m = -INFINITY;
                    for (int s = 0; s < splits; ++s) {
                        const float ms = a->part_m[p0 + (size_t)s * G];
                        m = ms > m ? ms : m;
                    }
                    float *o = out + ((size_t)b * Hq + (size_t)h * G + g) * Dv;
                    memset(o, 0, sizeof(float) * (size_t)Dv);
                    float l = 0.0f;
                    if (!isinf(m)) {
                        for (int s = 0; s < splits; ++s) {
                            const size_t p = p0 + (size_t)s * G;
                            if (isinf(a->part_m[p])) continue;
                            const float w = expf(a->part_m[p] - m);
                            l += a->part_l[p] * w;
                            for (int j = 0; j < Dv; ++j) o[j] += a->part_out[p * Dv + j] * w;
                        }
                        for (int j = 0; j < Dv; ++j) o[j] /= l;
                    }
                    lse[(size_t)b * Hq + (size_t)h * G + g] = isinf(m) ? -INFINITY : m + logf(l);
                }
        rc = 0;
    }
    free(a->part_out); free(a->part_m); free(a->part_l); free(a->scratch); free(first_unit);
    return rc;
}

/* Returns 0, or -1 for shapes this build does not take (the caller then uses the reference). */
int tq_decode_attention(const float *queries, const uint8_t *key_codes, const uint16_t *key_scales,
                        const uint8_t *value_codes, const uint16_t *value_scales,
                        const int32_t *tables, const int32_t *lens,
                        const float *key_codebook, const float *value_codebook,
                        int B, int Hq, int Hkv, int Dk, int Dv, int block_size, int max_blocks,
                        int key_bits, int value_bits, int splits, int threads,
                        float *out, float *lse) {
    if (B < 0 || splits <= 0 || !shapes_ok(Hq, Hkv, Dk, Dv, block_size, key_bits, value_bits))
        return -1;
    if (B == 0) return 0;
    const int32_t **row_tables = malloc(sizeof(*row_tables) * (size_t)B);
    int32_t *per_row = malloc(sizeof(int32_t) * 2 * (size_t)B);
    int rc = -2;
    if (row_tables && per_row) {
        for (int b = 0; b < B; ++b) {
            row_tables[b] = tables + (size_t)b * max_blocks;
            per_row[b] = max_blocks;
            per_row[B + b] = splits;
        }
        decode_args a = {queries, key_codes, value_codes, key_scales, value_scales, row_tables,
                         per_row, lens, per_row + B, NULL, key_codebook, value_codebook, B, Hq,
                         Hkv, Dk, Dv, block_size, key_bits, value_bits, NULL, NULL, NULL, NULL};
        rc = attend_rows(&a, threads, out, lse);
    }
    free(row_tables); free(per_row);
    return rc;
}

/* ---- one decode step of one layer for B sequences of a batch --------------------------------
 * The whole of PagedLayerCache.attend on the CPU in one call (the contract of
 * tqstore.metal.reference.decode_epilogue_reference around the paged attention), per row:
 *   q = scale * queries (Hq, Dk), q_rot[h] = q[h] @ query_rotation[h / G]  (R_K^T rows)
 *   (o, lse) = attention over the pages of q_rot; o = o @ output_rotation[h / G]  (R_V)
 *   with a tail of n fp16 tokens (1, Hkv, n, D): s_t = q . (k_t - key_center), the two softmax
 *   pieces merged: m = max(max_t s_t, lse), out = (e^(lse-m) o + sum_t e^(s_t-m) v_t) /
 *   (e^(lse-m) + sum_t e^(s_t-m)).  out f32 (B, Hq, Dv).
 * Each row is its own sequence: its own block table (num_blocks[b] entries), committed length,
 * fp16 tail (tail_lens[b] tokens; NULL when 0) and splits. Every row's pages are attended in
 * one parallel run (units of every row: see decode_args), and a row's bits are those of the
 * row alone (the serving engine's batches rest on it). Equal to the composition within float32
 * rounding (compared with a tolerance by the first-use self-check). */
static void epilogue_row(const float *q, const float *pages, const float *lse,
                         const uint16_t *tail_keys, const uint16_t *tail_values, int tail_len,
                         const float *key_center, const float *output_rotation, int Hq, int Hkv,
                         int Dk, int Dv, float *s, float *out) {
    const int G = Hq / Hkv;
    float key[TQ_MAX_DIM], value[TQ_MAX_DIM], o[TQ_MAX_DIM];
    for (int h = 0; h < Hq; ++h) {
        const int kv = h / G;
        const float *po = pages + (size_t)h * Dv, *R = output_rotation + (size_t)kv * Dv * Dv;
        for (int j = 0; j < Dv; ++j) o[j] = 0.0f;
        for (int i = 0; i < Dv; ++i)
            for (int j = 0; j < Dv; ++j) o[j] += po[i] * R[(size_t)i * Dv + j];
        float *dst = out + (size_t)h * Dv;
        const float l = lse[h];
        if (tail_len == 0) {
            memcpy(dst, o, sizeof(float) * (size_t)Dv);
            continue;
        }
        const float *qi = q + (size_t)h * Dk;
        const size_t base = (size_t)kv * tail_len;
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
}

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
    if (B <= 0 || !shapes_ok(Hq, Hkv, Dk, Dv, block_size, key_bits, value_bits)) return -1;
    int longest_tail = 1;
    for (int b = 0; b < B; ++b) {
        if (tail_lens[b] < 0 || splits[b] <= 0) return -1;
        longest_tail = tail_lens[b] > longest_tail ? tail_lens[b] : longest_tail;
    }
    const int G = Hq / Hkv;
    const size_t qn = (size_t)B * Hq * Dk;
    float *q = malloc(sizeof(float) * qn), *q_rot = malloc(sizeof(float) * qn);
    float *pages = malloc(sizeof(float) * (size_t)B * Hq * Dv);
    float *lse = malloc(sizeof(float) * (size_t)B * Hq);
    float *s = malloc(sizeof(float) * (size_t)longest_tail);
    int rc = -2;
    if (!q || !q_rot || !pages || !lse || !s) goto done;
    for (size_t i = 0; i < qn; ++i) q[i] = queries[i] * scale;
    for (int bh = 0; bh < B * Hq; ++bh) {
        const int h = bh % Hq;
        const float *qi = q + (size_t)bh * Dk, *R = query_rotation + (size_t)(h / G) * Dk * Dk;
        float *qo = q_rot + (size_t)bh * Dk;
        for (int j = 0; j < Dk; ++j) qo[j] = 0.0f;
        for (int i = 0; i < Dk; ++i)
            for (int j = 0; j < Dk; ++j) qo[j] += qi[i] * R[(size_t)i * Dk + j];
    }
    decode_args a = {q_rot, key_codes, value_codes, key_scales, value_scales, tables, num_blocks,
                     lens, splits, NULL, key_codebook, value_codebook, B, Hq, Hkv, Dk, Dv,
                     block_size, key_bits, value_bits, NULL, NULL, NULL, NULL};
    rc = attend_rows(&a, threads, pages, lse);
    if (rc != 0) goto done;
    for (int b = 0; b < B; ++b)
        epilogue_row(q + (size_t)b * Hq * Dk, pages + (size_t)b * Hq * Dv, lse + (size_t)b * Hq,
                     tail_keys[b], tail_values[b], tail_lens[b], key_center, output_rotation, Hq,
                     Hkv, Dk, Dv, s, out + (size_t)b * Hq * Dv);
done:
    free(q); free(q_rot); free(pages); free(lse); free(s);
    return rc;
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
