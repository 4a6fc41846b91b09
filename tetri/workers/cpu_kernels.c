/* fp32 CPU kernels for AVX2 + FMA, built and loaded by cpu_kernels.py.
 *
 * tetri_gemm_f32: y[M,N] = x[M,K] W^T (+ bias), over a weight packed into panels of
 * 24 output columns: panel p is [K][24] (columns 24p..24p+23, zero padded past N), so one
 * k step of a panel is three contiguous 8-float vectors.
 *
 * A register tile is 4 rows x 24 columns: 12 accumulators, 3 weight loads and 4 broadcasts
 * per 12 FMAs, with no spills. A panel (K * 96 bytes) stays in L2 while every 4-row tile
 * of x passes over it; OpenMP splits the panels across threads.
 *
 * tetri_decode_attn_f32: one query token per (row, head) over that row's first lens[row]
 * staged keys, read in place (see decode_stage.py), no mask. */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#define NR 24

static void store_rows(int rows, const __m256* acc, float* y, int64_t ldy, int ncols, const float* bias) {
    for (int r = 0; r < rows; r++) {
        float buf[NR];
        _mm256_storeu_ps(buf, acc[3 * r]);
        _mm256_storeu_ps(buf + 8, acc[3 * r + 1]);
        _mm256_storeu_ps(buf + 16, acc[3 * r + 2]);
        if (bias)
            for (int j = 0; j < ncols; j++) buf[j] += bias[j];
        memcpy(y + r * ldy, buf, (size_t)ncols * sizeof(float));
    }
}

#define FMA3(b, c0, c1, c2)              \
    c0 = _mm256_fmadd_ps(b, w0, c0);     \
    c1 = _mm256_fmadd_ps(b, w1, c1);     \
    c2 = _mm256_fmadd_ps(b, w2, c2)

#define LOAD3(wk)                                  \
    __m256 w0 = _mm256_loadu_ps(wk);               \
    __m256 w1 = _mm256_loadu_ps((wk) + 8);         \
    __m256 w2 = _mm256_loadu_ps((wk) + 16)

static void tile4(const float* x, int64_t ldx, int64_t K, const float* w, float* y, int64_t ldy, int ncols,
                  const float* bias) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00;
    __m256 c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;
    const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
    for (int64_t k = 0; k < K; k++) {
        LOAD3(w + k * NR);
        __m256 b = _mm256_broadcast_ss(x0 + k);
        FMA3(b, c00, c01, c02);
        b = _mm256_broadcast_ss(x1 + k);
        FMA3(b, c10, c11, c12);
        b = _mm256_broadcast_ss(x2 + k);
        FMA3(b, c20, c21, c22);
        b = _mm256_broadcast_ss(x3 + k);
        FMA3(b, c30, c31, c32);
    }
    const __m256 acc[12] = {c00, c01, c02, c10, c11, c12, c20, c21, c22, c30, c31, c32};
    store_rows(4, acc, y, ldy, ncols, bias);
}

static void tile1(const float* x, int64_t K, const float* w, float* y, int ncols, const float* bias) {
    __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0;
    for (int64_t k = 0; k < K; k++) {
        LOAD3(w + k * NR);
        __m256 b = _mm256_broadcast_ss(x + k);
        FMA3(b, c0, c1, c2);
    }
    const __m256 acc[3] = {c0, c1, c2};
    store_rows(1, acc, y, 0, ncols, bias);
}

void tetri_gemm_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const float* panels, int64_t N, float* y,
                    const float* bias) {
    int64_t num_panels = (N + NR - 1) / NR;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < num_panels; p++) {
        int ncols = (int)(N - p * NR < NR ? N - p * NR : NR);
        const float* w = panels + p * K * NR;
        const float* b = bias ? bias + p * NR : 0;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) tile4(x + m * ldx, ldx, K, w, y + m * N + p * NR, N, ncols, b);
        for (; m < M; m++) tile1(x + m * ldx, K, w, y + m * N + p * NR, ncols, b);
    }
}

static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}

/* q, out: [rows, heads, D]. The keys of (row b, kv head g) start at k + b*row_stride +
 * g*head_stride, one D-float key after another; values likewise from v. Query head h reads
 * kv head h / group. D is a multiple of 8, at most 512. Softmax as SDPA computes it: max
 * subtracted, exp, normalized after the weighted sum of values. */
void tetri_decode_attn_f32(const float* q, const float* k, const float* v, int64_t row_stride,
                           int64_t head_stride, const int64_t* lens, float* out, int64_t rows, int64_t heads,
                           int64_t group, int64_t D, float scale) {
    int64_t longest = 1;
    for (int64_t b = 0; b < rows; b++)
        if (lens[b] > longest) longest = lens[b];
#pragma omp parallel
    {
        float* s = (float*)malloc(sizeof(float) * (size_t)longest);
        float acc[512];
#pragma omp for schedule(static)
        for (int64_t t = 0; t < rows * heads; t++) {
            int64_t b = t / heads, n = lens[b];
            int64_t kv = b * row_stride + (t % heads) / group * head_stride;
            const float *kp = k + kv, *vp = v + kv, *qp = q + t * D;
            float mx = -INFINITY;
            for (int64_t j = 0; j < n; j++) {
                const float* key = kp + j * D;
                __m256 a = _mm256_setzero_ps(), c = _mm256_setzero_ps();
                int64_t i = 0;
                for (; i + 16 <= D; i += 16) {
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(qp + i), _mm256_loadu_ps(key + i), a);
                    c = _mm256_fmadd_ps(_mm256_loadu_ps(qp + i + 8), _mm256_loadu_ps(key + i + 8), c);
                }
                if (i < D) a = _mm256_fmadd_ps(_mm256_loadu_ps(qp + i), _mm256_loadu_ps(key + i), a);
                float x = hsum(_mm256_add_ps(a, c)) * scale;
                s[j] = x;
                if (x > mx) mx = x;
            }
            float sum = 0.f;
            for (int64_t j = 0; j < n; j++) {
                s[j] = expf(s[j] - mx);
                sum += s[j];
            }
            if (D == 64) { /* the common head size: accumulators stay in registers */
                __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0, o4 = o0, o5 = o0, o6 = o0, o7 = o0;
                for (int64_t j = 0; j < n; j++) {
                    const float* val = vp + j * 64;
                    __m256 p = _mm256_set1_ps(s[j]);
                    o0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(val), o0);
                    o1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(val + 8), o1);
                    o2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(val + 16), o2);
                    o3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(val + 24), o3);
                    o4 = _mm256_fmadd_ps(p, _mm256_loadu_ps(val + 32), o4);
                    o5 = _mm256_fmadd_ps(p, _mm256_loadu_ps(val + 40), o5);
                    o6 = _mm256_fmadd_ps(p, _mm256_loadu_ps(val + 48), o6);
                    o7 = _mm256_fmadd_ps(p, _mm256_loadu_ps(val + 56), o7);
                }
                const __m256 o[8] = {o0, o1, o2, o3, o4, o5, o6, o7};
                for (int i = 0; i < 8; i++) _mm256_storeu_ps(acc + 8 * i, o[i]);
            } else {
                for (int64_t i = 0; i < D; i++) acc[i] = 0.f;
                for (int64_t j = 0; j < n; j++) {
                    const float* val = vp + j * D;
                    __m256 p = _mm256_set1_ps(s[j]);
                    for (int64_t i = 0; i < D; i += 8)
                        _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(val + i), _mm256_loadu_ps(acc + i)));
                }
            }
            float inv = 1.f / sum;
            for (int64_t i = 0; i < D; i++) out[t * D + i] = acc[i] * inv;
        }
        free(s);
    }
}
