/* The transformers backend's shared-prefix decoding attention (hf_attention.py) in one pass.
 *
 * One call per layer and decoding step: every query vector (row, query head) attends to its
 * row's prompt keys and values (stored once per prompt) and to the row's own generated keys and
 * values, in one softmax. In eager PyTorch the same step is a dozen kernels (the prompt part, a
 * batched product over every (row, head) pair of a 1 x d query by its d x s keys, the
 * log-sum-exp merge), most of them bound by per-call and per-batch overhead at the small sizes of
 * a decoding step.
 *
 * Work item = (kv head, block of up to RB query vectors of one prompt): the prompt's keys and
 * values for that head stay in L1 across the prompt's blocks, and a block's scores against 16
 * keys at a time are RB accumulators in registers. Keys are stored transposed (d x positions) so
 * that 16 positions are one vector; values position-major. Needs d and dv multiples of 16 and
 * the prompt and generated buffers padded to multiples of 16 positions (hf_attention.py checks).
 *
 * Written with GCC/Clang vector extensions (16 floats: AVX-512, AVX2 or NEON). Loaded after
 * PyTorch it shares PyTorch's libgomp and so its thread pool.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  /* unaligned loads, stores */
typedef int32_t i16 __attribute__((vector_size(64)));

enum { RB = 8 };

static inline v16 load(const float *p) { return *(const v16u *)p; }
static inline void store(float *p, v16 x) { *(v16u *)p = x; }
static inline v16 splat(float x) { return (v16){0} + x; }
static inline v16 vselect(i16 mask, v16 a, v16 b) { return (v16)((mask & (i16)a) | (~mask & (i16)b)); }
#ifdef __clang__
#define SHUF(x, ...) __builtin_shufflevector(x, x, __VA_ARGS__)
#else
#define SHUF(x, ...) __builtin_shuffle(x, (i16){__VA_ARGS__})
#endif
/* horizontal sum and max by halving (four shuffles, not fifteen lane extractions) */
static inline v16 fold(v16 x, int max) {
    v16 y = SHUF(x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    x = max ? vselect(y > x, y, x) : x + y;
    y = SHUF(x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    x = max ? vselect(y > x, y, x) : x + y;
    y = SHUF(x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    x = max ? vselect(y > x, y, x) : x + y;
    y = SHUF(x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return max ? vselect(y > x, y, x) : x + y;
}
static inline float hsum(v16 x) { return fold(x, 0)[0]; }
static inline float hmax(v16 x) { return fold(x, 1)[0]; }

/* e^x for x <= 0 (e^x = 2^n e^r, |r| <= ln2/2, degree-6 Taylor: relative error < 2e-7); below
   -87 (and -inf) it is e^-87 (~1.6e-38: a masked position's weight, below any sum's rounding). */
static inline v16 exp_nonpos(v16 x) {
    x = vselect(x < splat(-87.0f), splat(-87.0f), x);
    const v16 magic = splat(12582912.0f);  /* 1.5 * 2^23: adding it rounds to an integer */
    const v16 n = (x * 1.44269504f + magic) - magic;
    const v16 r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    v16 p = splat(0.0013888889f);
    p = p * r + 0.008333334f;
    p = p * r + 0.041666668f;
    p = p * r + 0.16666667f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const i16 bits = (__builtin_convertvector(n, i16) + 127) << 23;
    return p * (v16)bits;
}

static const i16 LANES = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

/* the lanes of positions t .. t+15 at or past `end` set to -inf */
static inline v16 cut(v16 x, int64_t t, int64_t end) {
    if (t + 16 <= end) return x;
    return vselect(LANES + (int32_t)t < (i16){0} + (int32_t)end, x, splat(-INFINITY));
}

typedef struct {
    const float *q;        /* query vector (row b, head k) at q + b * q_row + k * q_head, d floats */
    const float *kpT;      /* (P, Hkv, d, T): prompt keys, transposed, zero past each prompt */
    const float *vp;       /* (P, Hkv, T, dv): prompt values */
    const int64_t *plen;   /* (P,): each prompt's length (<= T) */
    const int64_t *src;    /* (B,): each row's prompt */
    const float *ksT;      /* (B, Hkv, C/16, d, 16): each row's generated keys, in blocks of 16
                              positions, each block transposed; L written */
    const float *vs;       /* (B, Hkv, C, dv): each row's generated values */
    float *out;            /* (B, H, dv) */
    int64_t q_row, q_head, B, H, Hkv, d, dv, T, C, L;
    float scale;
} Args;

/* One block: query vectors j0 .. j1-1 (j = row * g + i: query head h * g + i) of kv head h;
   d and dv given as constants where they are 16 (the loops then unroll fully). */
static inline __attribute__((always_inline)) void run_block(const Args *a, int64_t h, int64_t j0, int64_t j1,
                                                            float *sc, float *qv, const int64_t d, const int64_t dv) {
    const int64_t g = a->H / a->Hkv, T = a->T, C = a->C, L = a->L;
    const int64_t p = a->src[j0 / g], tp = a->plen[p], tb = (tp + 15) / 16 * 16, lb = (L + 15) / 16 * 16;
    const int64_t width = tb + lb, nb = j1 - j0;
    const float *KT = a->kpT + (p * a->Hkv + h) * d * T, *V = a->vp + (p * a->Hkv + h) * T * dv;
    int64_t row[RB], head[RB];
    const float *KS[RB], *VS[RB];
    for (int b = 0; b < RB; b++) {  /* vectors past nb repeat the last: computed, not written */
        const int64_t j = b < nb ? j0 + b : j1 - 1;
        row[b] = j / g;
        head[b] = h * g + j % g;
        const float *qs = a->q + row[b] * a->q_row + head[b] * a->q_head;
        for (int64_t k = 0; k < d; k++) qv[b * d + k] = qs[k] * a->scale;
        KS[b] = a->ksT + (row[b] * a->Hkv + h) * d * C;
        VS[b] = a->vs + (row[b] * a->Hkv + h) * C * dv;
    }
    /* start the reads of the rows' own keys and values (from memory: the decode's largest
       traffic) now, so that the prompt part below hides their wait */
    for (int b = 0; b < (int)nb; b++) {
        if (b > 0 && KS[b] == KS[b - 1]) continue;  /* grouped query heads: the same row */
        for (int64_t i = 0; i < lb * d; i += 16) __builtin_prefetch(KS[b] + i, 0, 3);
        for (int64_t i = 0; i < L * dv; i += 16) __builtin_prefetch(VS[b] + i, 0, 3);
    }
    v16 m[RB];  /* each vector's running maximum score */
    for (int b = 0; b < RB; b++) m[b] = splat(-INFINITY);
    for (int64_t t = 0; t < tb; t += 16) {  /* prompt scores: (RB x d) . (d x 16 keys) */
        v16 acc[RB];
        for (int b = 0; b < RB; b++) acc[b] = splat(0.0f);
        for (int64_t k = 0; k < d; k++) {
            const v16 key = load(KT + k * T + t);
            for (int b = 0; b < RB; b++) acc[b] += qv[b * d + k] * key;
        }
        for (int b = 0; b < RB; b++) {
            acc[b] = cut(acc[b], t, tp);
            store(sc + b * width + t, acc[b]);
            m[b] = vselect(acc[b] > m[b], acc[b], m[b]);
        }
    }
    for (int64_t t = 0; t < lb; t += 16) {  /* each vector's own row's generated keys */
        v16 acc[RB];
        for (int b = 0; b < RB; b++) acc[b] = splat(0.0f);
        for (int64_t k = 0; k < d; k++)
            for (int b = 0; b < RB; b++) acc[b] += qv[b * d + k] * load(KS[b] + t * d + k * 16);
        for (int b = 0; b < RB; b++) {
            acc[b] = cut(acc[b], t, L);
            store(sc + b * width + tb + t, acc[b]);
            m[b] = vselect(acc[b] > m[b], acc[b], m[b]);
        }
    }
    float inv[RB];
    for (int b = 0; b < RB; b++) {  /* softmax weights (unnormalised) and their sums */
        float *s = sc + b * width;
        const v16 mx = splat(hmax(m[b]));
        v16 sum = splat(0.0f);
        for (int64_t t = 0; t < width; t += 16) {
            const v16 w = exp_nonpos(load(s + t) - mx);
            store(s + t, w);
            sum += w;
        }
        inv[b] = 1.0f / hsum(sum);
    }
    for (int64_t v = 0; v < dv; v += 16) {  /* weights . values: the prompt's, then the row's own */
        v16 o[RB];
        for (int b = 0; b < RB; b++) o[b] = splat(0.0f);
        for (int64_t t = 0; t < tp; t++) {
            const v16 val = load(V + t * dv + v);
            for (int b = 0; b < RB; b++) o[b] += sc[b * width + t] * val;
        }
        for (int64_t t = 0; t < L; t++)
            for (int b = 0; b < RB; b++) o[b] += sc[b * width + tb + t] * load(VS[b] + t * dv + v);
        for (int b = 0; b < nb; b++) store(a->out + (row[b] * a->H + head[b]) * dv + v, o[b] * inv[b]);
    }
}

/* Writes the step's key and value of every (row, kv head) at position L - 1 of the generated
   buffers: k at k + b * k_row + h * k_head, d floats; v likewise. */
static void write_new(const float *k, int64_t k_row, int64_t k_head, const float *v, int64_t v_row,
                      int64_t v_head, float *ksT, float *vs, int64_t b, int64_t Hkv, int64_t d, int64_t dv,
                      int64_t C, int64_t L) {
    for (int64_t h = 0; h < Hkv; h++) {
        const float *kn = k + b * k_row + h * k_head, *vn = v + b * v_row + h * v_head;
        float *kd = ksT + (b * Hkv + h) * d * C + (L - 1) / 16 * 16 * d + (L - 1) % 16;
        float *vd = vs + ((b * Hkv + h) * C + (L - 1)) * dv;
        for (int64_t j = 0; j < d; j++) kd[j * 16] = kn[j];
        for (int64_t j = 0; j < dv; j++) vd[j] = vn[j];
    }
}

/* Returns 0, or 1 for sizes it does not take (d or dv not a multiple of 16, T or C not a
   multiple of 16, L past C, H not a multiple of Hkv), 2 if out of memory. The new key and value
   (k, v: see write_new) are written first, then every query vector attends. */
int shared_prefix_attention(const float *q, int64_t q_row, int64_t q_head, const float *k, int64_t k_row,
                            int64_t k_head, const float *v, int64_t v_row, int64_t v_head, const float *kpT,
                            const float *vp, const int64_t *plen, const int64_t *src, float *ksT, float *vs,
                            float *out, int64_t B, int64_t H, int64_t Hkv, int64_t d, int64_t dv, int64_t T,
                            int64_t C, int64_t L, float scale, int64_t threads) {
    if (d % 16 || dv % 16 || T % 16 || C % 16 || L < 1 || L > C || Hkv < 1 || H % Hkv || B < 1) return 1;
    const int64_t g = H / Hkv, n = B * g;
    /* blocks of up to RB query vectors, cut where the prompt changes */
    int64_t *starts = malloc((n + 1) * sizeof *starts);
    if (!starts) return 2;
    int64_t blocks = 0;
    for (int64_t j = 0; j < n;) {
        int64_t e = j + 1;
        while (e < n && e - j < RB && src[e / g] == src[j / g]) e++;
        starts[blocks++] = j;
        j = e;
    }
    starts[blocks] = n;
    const Args args = {q, kpT, vp, plen, src, ksT, vs, out, q_row, q_head, B, H, Hkv, d, dv, T, C, L, scale};
    const int64_t items = Hkv * blocks;
    threads = threads < 1 ? 1 : threads > items ? items : threads;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) write_new(k, k_row, k_head, v, v_row, v_head, ksT, vs, b, Hkv, d, dv, C, L);
        float *sc = malloc((size_t)RB * (T + C) * sizeof(float)), *qv = malloc((size_t)RB * d * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {  /* head-major: a prompt's blocks together */
            if (!sc || !qv) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            const int64_t h = item / blocks, j0 = starts[item % blocks], j1 = starts[item % blocks + 1];
            if (d == 16 && dv == 16) run_block(&args, h, j0, j1, sc, qv, 16, 16);
            else run_block(&args, h, j0, j1, sc, qv, d, dv);
        }
        free(sc);
        free(qv);
    }
    free(starts);
    return failed ? 2 : 0;
}

/* Rows leaving the batch, in place: row i of buf becomes row keep[i] (keep strictly increasing,
   so a row is moved before anything overwrites it), each row Hkv runs of `used` floats at
   `stride` floats apart (a row's filled positions of each kv head). No new buffer: its pages
   would be faulted in again, and a copy reads and writes them all. */
int compact_rows(float *buf, const int64_t *keep, int64_t n, int64_t Hkv, int64_t stride, int64_t used) {
    for (int64_t i = 0; i < n; i++)
        if (keep[i] < i || (i > 0 && keep[i] <= keep[i - 1])) return 1;
    for (int64_t i = 0; i < n; i++) {
        if (keep[i] == i) continue;
        for (int64_t h = 0; h < Hkv; h++)
            memmove(buf + (i * Hkv + h) * stride, buf + (keep[i] * Hkv + h) * stride, used * sizeof(float));
    }
    return 0;
}
