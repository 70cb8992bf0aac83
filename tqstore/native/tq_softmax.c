/* Row softmax for multi-token attention steps (prefill chunks) on the CPU.
 *
 * Why: MLX's CPU backend computes attention's exp with scalar expf, about 13 ns an element on
 * our 2-core VM: of a 227-token step over 2,241 tokens of SmolLM2 (30 layers), 2.1 s of 2.8 s
 * went to the softmax, while the two matmuls around it ran at BLAS speed (4 ms a layer each).
 * This does the softmax alone, vectorised; tqstore.paged.prefill_attention keeps the matmuls
 * in MLX.
 *
 * scores f32 (R, T), row-major, rewritten in place with the row's softmax weights. Row r is a
 * query at position T - L + (r % L) of a step of L queries (rows are (head, query) pairs,
 * queries fastest). Causal: row r attends keys [0, T - L + r % L]; the rest become 0 without
 * being read. Not causal: every key; -inf scores (a mask applied before) become 0.
 *
 * Deterministic: each row is computed by one thread in a fixed order (max, then exp, then a
 * sum over TQ_LANES lanes folded in a fixed order), whatever the thread count. Equal to MLX's
 * softmax within float32 rounding (exp_nonpositive: relative error below 3e-7), never
 * bitwise: callers compare with a tolerance.
 */
#include "tq_common.h"

typedef struct {
    float *scores;
    int rows, L, T, causal;
} softmax_args;

static void softmax_row(const softmax_args *a, int r) {
    float *s = a->scores + (size_t)r * a->T;
    const int n = a->causal ? a->T - a->L + r % a->L + 1 : a->T;
    float lane_max[TQ_LANES];
    for (int k = 0; k < TQ_LANES; ++k) lane_max[k] = -INFINITY;
    int j = 0;
    for (; j + TQ_LANES <= n; j += TQ_LANES)
        for (int k = 0; k < TQ_LANES; ++k) lane_max[k] = s[j + k] > lane_max[k] ? s[j + k] : lane_max[k];
    float m = -INFINITY;
    for (int k = 0; k < TQ_LANES; ++k) m = lane_max[k] > m ? lane_max[k] : m;
    for (; j < n; ++j) m = s[j] > m ? s[j] : m;
    if (isinf(m) && m < 0) { /* every key masked: MLX gives NaN; so do we, visibly */
        for (j = 0; j < a->T; ++j) s[j] = NAN;
        return;
    }
    /* x - m <= 0; a masked -inf gives exp_nonpositive(-inf) = 0 */
    for (j = 0; j < n; ++j) s[j] = exp_nonpositive(s[j] - m);
    float lane[TQ_LANES] = {0};
    for (j = 0; j + TQ_LANES <= n; j += TQ_LANES)
        for (int k = 0; k < TQ_LANES; ++k) lane[k] += s[j + k];
    float sum = 0.0f;
    for (int k = 0; k < TQ_LANES; ++k) sum += lane[k];
    for (; j < n; ++j) sum += s[j];
    const float inv = 1.0f / sum;
    for (j = 0; j < n; ++j) s[j] *= inv;
    for (j = n; j < a->T; ++j) s[j] = 0.0f;
}

static void softmax_unit(const void *args, int unit) { softmax_row((const softmax_args *)args, unit); }

/* Returns 0, or -1 for shapes it does not take (the caller then uses MLX's softmax). */
int tq_softmax_rows(float *scores, int rows, int L, int T, int causal, int threads) {
    if (rows <= 0 || L <= 0 || T <= 0 || (causal && L > T)) return -1;
    softmax_args a = {scores, rows, L, T, causal};
    tq_run_parallel(softmax_unit, &a, rows, threads);
    return 0;
}
