/* Compiled kernels for passuntil's built-in CPU sampler (loaded by cpu_kernel.py).
 *
 * decode_attention, one call per layer and decoding step: for every row (a sample) of every
 * segment (rows that share one prompt), rotate its new query and key (RoPE, rotated pairs side
 * by side), append key and value to the row's suffix cache, attend to the segment's shared
 * prompt prefix and to the row's own suffix in one softmax, and write the row's (H * d)
 * attention output. One pass instead of eager PyTorch's dozen kernels. Work item = (segment,
 * head): its prefix keys and values stay in L1 while blocks of RB rows are computed against
 * them as small matrix products held in registers. Needs d % 16 == 0 and the prefix length T
 * padded to a multiple of 16 (zero keys and values). The suffix caches are laid out per
 * (segment, head): the keys of all its rows for 4 positions (each row's block transposed), then
 * the next 4; the values one position at a time (see Args).
 *
 * rms_norm and silu_mul: the rest of a layer's element-wise work, one pass each. gather_rows:
 * the rows' moves when the sampler repacks its suffix caches. decode_step: a whole decoding step,
 * all of the above per layer with the matrix products in the BLAS sgemm PyTorch exports, split
 * by rows: one parallel region per step, each thread running every layer and the LM head for its
 * own rows (rows are independent within a step, so no barrier between layers).
 *
 * Written with GCC/Clang vector extensions (16 floats), so it compiles to AVX-512, AVX2 or NEON.
 * Each function splits its work over OpenMP threads; loaded after PyTorch, this library shares
 * PyTorch's libgomp (same soname) and so its thread pool.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  /* unaligned loads, stores */
typedef int32_t i16 __attribute__((vector_size(64)));
typedef float v4 __attribute__((vector_size(16)));
typedef float v4u __attribute__((vector_size(16), aligned(4)));

enum { RB = 8 };

typedef struct {
    const float *qkv;      /* (S*R, 3, H, d): the fused q|k|v projection, before RoPE */
    const float *cosv;     /* (S, d/2): cos and sin of each segment's position */
    const float *sinv;
    const float *kpT;      /* (P, H, d, T): prefix keys, transposed, RoPE applied */
    const float *vp;       /* (P, H, T, d): prefix values */
    const int64_t *seg_prefix; /* (S,): prefix of each segment */
    const int64_t *plen;   /* (P,): length of each prefix (<= T) */
    float *KsT;            /* (S, H, M/4, R, d, 4): suffix keys in blocks of 4 positions, each
                              block transposed; position `step` is written here */
    float *Vs;             /* (S, H, M, R, d): suffix values */
    float *out;            /* (S*R, H*d) */
    int64_t step, S, R, H, d, T, M;
    float scale;
} Args;

static inline v16 load(const float *p) { return *(const v16u *)p; }
static inline void store(float *p, v16 x) { *(v16u *)p = x; }
static inline v16 splat(float x) { return (v16){0} + x; }
static inline v16 select(i16 mask, v16 a, v16 b) { return (v16)((mask & (i16)a) | (~mask & (i16)b)); }

/* e^x for x <= 0 (e^x = 2^n e^r, |r| <= ln2/2, degree-6 Taylor: relative error < 2e-7); below
   -87 it is 0. */
static inline v16 exp_nonpos(v16 x) {
    const i16 tiny = x < splat(-87.0f);
    x = select(tiny, splat(-87.0f), x);
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
    return select(tiny, splat(0.0f), p * (v16)bits);
}

static inline float hsum(v16 x) { float s = 0; for (int i = 0; i < 16; i++) s += x[i]; return s; }
static inline float hmax(v16 x) { float m = x[0]; for (int i = 1; i < 16; i++) m = x[i] > m ? x[i] : m; return m; }

/* RoPE on one head's vector (pairs side by side), times `scale`. */
static inline void rotate(float *dst, const float *src, const float *cs, const float *sn, int64_t d, float scale) {
    for (int64_t i = 0; i < d / 2; i++) {
        dst[2 * i] = (src[2 * i] * cs[i] - src[2 * i + 1] * sn[i]) * scale;
        dst[2 * i + 1] = (src[2 * i + 1] * cs[i] + src[2 * i] * sn[i]) * scale;
    }
}

/* Segment s, head h, for the segment's rows [rlo, rhi) (in blocks of RB from rlo). */
static inline __attribute__((always_inline)) void run_item(const Args *a, int64_t s, int64_t h, int64_t rlo,
                                                           int64_t rhi, const int64_t nv) {
    const int64_t R = a->R, H = a->H, T = a->T, step = a->step, d = nv * 16;
    const int64_t p = a->seg_prefix[s], tp = a->plen[p], tb = (tp + 15) / 16 * 16;
    const int64_t width = tb + (step + 1 + 15) / 16 * 16;  /* scores: prefix blocks, then suffix */
    const float *KT = a->kpT + (p * H + h) * d * T, *V = a->vp + (p * H + h) * T * d;
    const float *cs = a->cosv + s * (d / 2), *sn = a->sinv + s * (d / 2);
    /* this item's suffix caches: every row's keys for 4 positions, then the next 4 (values: 1) */
    float *Kitem = a->KsT + (s * H + h) * ((a->M + 3) / 4) * R * d * 4, *Vitem = a->Vs + (s * H + h) * a->M * R * d;
    const int64_t kblock = R * d * 4, vpos = R * d;  /* floats per 4 key positions, per value position */
    float q[RB][d], sc[RB][width];
    for (int64_t r0 = rlo; r0 < rhi; r0 += RB) {
        int64_t rows[RB];  /* rows past rhi repeat the last row: same values, written twice */
        for (int b = 0; b < RB; b++) rows[b] = r0 + b < rhi ? r0 + b : rhi - 1;
        const float *KsT[RB], *Vrow[RB];  /* each row's own first (d, 4) key block and value */
        for (int b = 0; b < RB; b++) {
            const float *qs = a->qkv + (s * R + rows[b]) * 3 * H * d + h * d;
            float k[d], *kst = Kitem + rows[b] * d * 4;
            rotate(q[b], qs, cs, sn, d, a->scale);
            rotate(k, qs + H * d, cs, sn, d, 1.0f);
            for (int64_t j = 0; j < d; j++) kst[step / 4 * kblock + j * 4 + step % 4] = k[j];
            memcpy(Vitem + step * vpos + rows[b] * d, qs + 2 * H * d, d * sizeof(float));
            KsT[b] = kst;
            Vrow[b] = Vitem + rows[b] * d;
        }
        {  /* start the suffix reads now: they come from memory, and the prefix work below hides
              the wait. The block's rows are adjacent: one run of memory per position block. */
            const int64_t nb = r0 + RB <= rhi ? RB : rhi - r0;
            for (int64_t i = 0; i <= step; i += 4)
                for (int64_t j = 0; j < nb * d * 4; j += 16) __builtin_prefetch(KsT[0] + i / 4 * kblock + j, 0, 3);
            for (int64_t i = 0; i <= step; i++)
                for (int64_t j = 0; j < nb * d; j += 16) __builtin_prefetch(Vrow[0] + i * vpos + j, 0, 3);
        }
        /* prefix scores: (RB x d) . (d x 16 keys) per block, RB accumulators in registers */
        for (int64_t t = 0; t < tb; t += 16) {
            v16 acc[RB];
            for (int b = 0; b < RB; b++) acc[b] = splat(0.0f);
            for (int64_t j = 0; j < d; j++) {
                const v16 k = load(KT + j * T + t);
                for (int b = 0; b < RB; b++) acc[b] += q[b][j] * k;
            }
            for (int b = 0; b < RB; b++) store(&sc[b][t], acc[b]);
        }
        for (int64_t i = 0; i <= step; i += 4) {  /* each row's own suffix, 4 positions at a time;
                                                     RB independent sums in flight */
            v4 acc[RB];
            for (int b = 0; b < RB; b++) acc[b] = (v4){0};
            for (int64_t j = 0; j < d; j++)
                for (int b = 0; b < RB; b++) acc[b] += q[b][j] * *(const v4u *)(KsT[b] + i / 4 * kblock + j * 4);
            for (int b = 0; b < RB; b++) memcpy(&sc[b][tb + i], &acc[b], sizeof acc[b]);
        }
        for (int b = 0; b < RB; b++) {
            for (int64_t t = tp; t < tb; t++) sc[b][t] = -INFINITY;
            for (int64_t t = tb + step + 1; t < width; t++) sc[b][t] = -INFINITY;
        }
        /* softmax weights (unnormalised) and their sums */
        float inv[RB];
        for (int b = 0; b < RB; b++) {
            v16 m = load(sc[b]);
            for (int64_t t = 16; t < width; t += 16) { const v16 x = load(&sc[b][t]); m = select(x > m, x, m); }
            const float mx = hmax(m);
            v16 sum = splat(0.0f);
            for (int64_t t = 0; t < width; t += 16) {
                const v16 w = exp_nonpos(load(&sc[b][t]) - mx);
                store(&sc[b][t], w);
                sum += w;
            }
            inv[b] = 1.0f / hsum(sum);
        }
        /* outputs: weights . values, prefix (V rows past tp are zero) then suffix */
        for (int64_t v = 0; v < nv; v++) {
            v16 o[RB];
            for (int b = 0; b < RB; b++) o[b] = splat(0.0f);
            for (int64_t t = 0; t < tp; t++) {
                const v16 val = load(V + t * d + 16 * v);
                for (int b = 0; b < RB; b++) o[b] += sc[b][t] * val;
            }
            for (int64_t i = 0; i <= step; i++)
                for (int b = 0; b < RB; b++)
                    o[b] += sc[b][tb + i] * load(Vrow[b] + i * vpos + 16 * v);
            for (int b = 0; b < RB; b++) store(a->out + (s * R + rows[b]) * H * d + h * d + 16 * v, o[b] * inv[b]);
        }
    }
}

/* Items [begin, end) of the (segment, head) items, each for rows [rlo, rhi) of its segment. */
static void run_range(const Args *a, int64_t begin, int64_t end, int64_t rlo, int64_t rhi) {
    for (int64_t item = begin; item < end; item++) {
        if (a->d == 16) run_item(a, item / a->H, item % a->H, rlo, rhi, 1);  /* the bundled series' head size,
                                                                                  fully unrolled */
        else run_item(a, item / a->H, item % a->H, rlo, rhi, a->d / 16);
    }
}

/* The (segment, head) items split over `threads` threads. M: the suffix caches' positions. */
int decode_attention(const float *qkv, const float *cosv, const float *sinv, const float *kpT,
                     const float *vp, const int64_t *seg_prefix, const int64_t *plen, float *KsT,
                     float *Vs, float *out, int64_t step, int64_t S, int64_t R, int64_t H,
                     int64_t d, int64_t T, int64_t M, float scale, int64_t threads) {
    if (d % 16 != 0 || T % 16 != 0 || step >= M) return 1;
    const int64_t items = S * H;
    threads = threads < 1 ? 1 : threads > items ? items : threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < threads; i++) {
        const Args args = {qkv, cosv, sinv, kpT, vp, seg_prefix, plen, KsT, Vs, out, step, S, R, H, d, T, M, scale};
        run_range(&args, items * i / threads, items * (i + 1) / threads, 0, R);
    }
    return 0;
}

static inline void rms_row(const float *xi, float *oi, int64_t C, float eps) {
    v16 acc = splat(0.0f);
    int64_t j = 0;
    for (; j + 16 <= C; j += 16) { const v16 v = load(xi + j); acc += v * v; }
    float ss = hsum(acc);
    for (; j < C; j++) ss += xi[j] * xi[j];
    const float inv = 1.0f / sqrtf(ss / (float)C + eps);
    j = 0;
    for (; j + 16 <= C; j += 16) store(oi + j, load(xi + j) * inv);
    for (; j < C; j++) oi[j] = xi[j] * inv;
}

/* out[i] = x[i] / sqrt(mean(x[i]^2) + eps) for each of n rows of C floats (the norm's weight is
   folded into the matrix that follows it). */
int rms_norm(const float *x, float *out, int64_t n, int64_t C, float eps, int64_t threads) {
    threads = threads < 1 ? 1 : threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (n * C >= 16384)
    for (int64_t i = 0; i < n; i++) rms_row(x + i * C, out + i * C, C, eps);
    return 0;
}

/* SiLU(x) = x / (1 + e^-x), from e^-|x| so that the exponent is never positive. */
static inline v16 silu(v16 x) {
    const i16 neg = x < splat(0.0f);
    const v16 e = exp_nonpos(select(neg, x, -x));  /* e^-|x| */
    return x * select(neg, e, splat(1.0f)) / (1.0f + e);
}

static inline void silu_row(const float *g, float *oi, int64_t F) {
    const float *u = g + F;
    int64_t j = 0;
    for (; j + 16 <= F; j += 16) store(oi + j, silu(load(g + j)) * load(u + j));
    for (; j < F; j++) oi[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
}

/* out[i, :] = SiLU(gu[i, :F]) * gu[i, F:] for each of n rows of the fused gate|up projection. */
int silu_mul(const float *gu, float *out, int64_t n, int64_t F, int64_t threads) {
    threads = threads < 1 ? 1 : threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (n * F >= 16384)
    for (int64_t i = 0; i < n; i++) silu_row(gu + i * 2 * F, out + i * F, F);
    return 0;
}


/* Repacking the suffix caches: dst (n/R, H, Mb, R, X) row i = src (S, H, Mb, R, X) row
   src_rows[i] (rows numbered segment-major; -1: a padding row, left as is), for the first
   `used` blocks. */
int gather_rows(const float *src, float *dst, const int64_t *src_rows, int64_t n, int64_t R, int64_t H,
                int64_t Mb, int64_t X, int64_t used, int64_t threads) {
    threads = threads < 1 ? 1 : threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; i++) {
        if (src_rows[i] < 0) continue;
        const int64_t so = src_rows[i] / R, ro = src_rows[i] % R, sn = i / R, rn = i % R;
        for (int64_t h = 0; h < H; h++)
            for (int64_t b = 0; b < used; b++)
                memcpy(dst + (((sn * H + h) * Mb + b) * R + rn) * X, src + (((so * H + h) * Mb + b) * R + ro) * X,
                       X * sizeof(float));
    }
    return 0;
}

/* A whole decoding step of a Llama-style model with SiLU gates, all layers and the LM head, in
   one call: what eager PyTorch does in ~60 calls per step, each with its own Python and dispatch
   overhead. Matrix products go to `gemm`, the BLAS sgemm (column-major, Fortran calling
   convention) that PyTorch's CPU wheel exports from MKL. Weights are (out, in) row-major, as
   PyTorch stores them; per layer w[4 * l + 0..3] = q|k|v (3C, C), o (C, C), gate|up (2F, C),
   down (C, F); ks[l], vs[l], kp[l], vp[l] that layer's caches (see decode_attention). x (n, C) is
   the residual stream, updated in place; the other buffers are scratch; logits (n, V). */
typedef void (*sgemm_t)(const char *, const char *, const int *, const int *, const int *, const float *,
                        const float *, const int *, const float *, const int *, const float *, float *, const int *);

/* y (n, N) = x (n, K) . w^T + beta * y, for w (N, K) row-major.
   The integer arguments live in zero-extended 64-bit slots: an LP64 BLAS reads their low 32 bits,
   which on a little-endian CPU are the value, and an ILP64 BLAS reads all 64, also the value, so
   the call is right under either integer width (cpu_kernel.py refuses big-endian machines and
   checks the result against torch.mm before first use: `gemm_check`). */
static void linear(sgemm_t gemm, const float *x, const float *w, float *y, int64_t n, int64_t N, int64_t K, float beta) {
    const int64_t m_ = N, n_ = n, k_ = K;
    const float one = 1.0f;
    gemm("T", "N", (const int *)&m_, (const int *)&n_, (const int *)&k_, &one, w, (const int *)&k_, x,
         (const int *)&k_, &beta, y, (const int *)&m_);
}

/* `linear` alone, for the load-time self-test of the BLAS behind `gemm_fn` (cpu_kernel.py). */
int gemm_check(void *gemm_fn, const float *x, const float *w, float *y, int64_t n, int64_t N, int64_t K, float beta) {
    if (n < 1 || N < 1 || K < 1 || N > INT32_MAX || n > INT32_MAX || K > INT32_MAX) return 1;
    linear((sgemm_t)gemm_fn, x, w, y, n, N, K, beta);
    return 0;
}


/* decode_step's arguments, shared by its threads. */
typedef struct {
    sgemm_t gemm;
    int64_t L;
    const int64_t *w, *kp, *vp, *ks, *vs;
    const float *head;
    float *x, *norm, *qkv, *att, *gu, *act, *logits;
    int64_t C, F, V;
    float eps;
    Args attention;  /* all but the four cache pointers, which are per layer */
} Step;

/* Rows [lo, hi) through every layer and the LM head, on the calling thread alone (except that
   outside a parallel region the BLAS may use its own threads). The row range starts at a block of
   RB rows of its segment, and within each segment it covers whole blocks, or runs to the end. */
static void step_rows(const Step *st, int64_t lo, int64_t hi) {
    const int64_t C = st->C, F = st->F, R = st->attention.R, H = st->attention.H, n = hi - lo;
    if (n <= 0) return;
    float *x = st->x + lo * C, *norm = st->norm + lo * C, *qkv = st->qkv + lo * 3 * C, *att = st->att + lo * C;
    float *gu = st->gu + lo * 2 * F, *act = st->act + lo * F;
    for (int64_t l = 0; l < st->L; l++) {
        const float *const *w = (const float *const *)(st->w + 4 * l);
        for (int64_t i = 0; i < n; i++) rms_row(x + i * C, norm + i * C, C, st->eps);
        linear(st->gemm, norm, w[0], qkv, n, 3 * C, C, 0.0f);
        Args a = st->attention;
        a.kpT = (const float *)st->kp[l];
        a.vp = (const float *)st->vp[l];
        a.KsT = (float *)st->ks[l];
        a.Vs = (float *)st->vs[l];
        for (int64_t s = lo / R; s * R < hi; s++) {
            const int64_t rlo = (lo > s * R ? lo : s * R) - s * R, rhi = (hi < (s + 1) * R ? hi : (s + 1) * R) - s * R;
            run_range(&a, s * H, (s + 1) * H, rlo, rhi);
        }
        linear(st->gemm, att, w[1], x, n, C, C, 1.0f);
        for (int64_t i = 0; i < n; i++) rms_row(x + i * C, norm + i * C, C, st->eps);
        linear(st->gemm, norm, w[2], gu, n, 2 * F, C, 0.0f);
        for (int64_t i = 0; i < n; i++) silu_row(gu + i * 2 * F, act + i * F, F);
        linear(st->gemm, act, w[3], x, n, C, F, 1.0f);
    }
    for (int64_t i = 0; i < n; i++) rms_row(x + i * C, norm + i * C, C, st->eps);
    linear(st->gemm, norm, st->head, st->logits + lo * st->V, n, st->V, C, 0.0f);
}

/* The first row of block u, the blocks numbered segment-major (ceil(R / RB) per segment). */
static inline int64_t block_start(int64_t u, int64_t R) {
    const int64_t per = (R + RB - 1) / RB;
    return u / per * R + u % per * RB;
}

/* The block at which part t of `parts` starts: the block boundary nearest to row n * t / parts,
   so that the parts hold about equal numbers of rows (the last part ends at block `blocks`). */
static int64_t split_block(int64_t t, int64_t parts, int64_t blocks, int64_t R, int64_t n) {
    const int64_t target = n * t / parts;
    int64_t u = 0;
    while (u < blocks && block_start(u + 1, R) <= target) u++;
    if (u < blocks && block_start(u + 1, R) - target < target - block_start(u, R)) u++;
    return t >= parts ? blocks : u;
}

int decode_step(void *gemm_fn, int64_t L, const int64_t *w, const float *head, float *x, float *norm, float *qkv,
                float *att, float *gu, float *act, float *logits, int64_t n, int64_t C, int64_t F, int64_t V, float eps,
                const float *cosv, const float *sinv, const int64_t *kp, const int64_t *vp, const int64_t *seg_prefix,
                const int64_t *plen, const int64_t *ks, const int64_t *vs, int64_t step, int64_t S, int64_t R,
                int64_t H, int64_t d, int64_t T, int64_t M, float scale, int64_t threads) {
    if (S * R != n || H * d != C || n > INT32_MAX || 3 * C > INT32_MAX || 2 * F > INT32_MAX || V > INT32_MAX) return 1;
    if (d % 16 != 0 || T % 16 != 0 || step >= M) return 1;
    const Step st = {(sgemm_t)gemm_fn, L, w, kp, vp, ks, vs, head, x, norm, qkv, att, gu, act, logits, C, F, V, eps,
                     {qkv, cosv, sinv, NULL, NULL, seg_prefix, plen, NULL, NULL, att, step, S, R, H, d, T, M, scale}};
    const int64_t blocks = S * ((R + RB - 1) / RB);
    threads = threads < 1 ? 1 : threads > blocks ? blocks : threads;
    if (threads == 1) {  /* the whole batch on this thread; the BLAS threads as it is set to */
        step_rows(&st, 0, n);
        return 0;
    }
    /* one parallel region for the whole step: thread t runs its rows through every layer. Inside
       the region the BLAS (MKL, GNU OpenMP) runs each product on the calling thread. */
#pragma omp parallel num_threads(threads)
    {
        const int64_t t = omp_get_thread_num(), parts = omp_get_num_threads();
        step_rows(&st, block_start(split_block(t, parts, blocks, R, n), R),
                  block_start(split_block(t + 1, parts, blocks, R, n), R));
    }
    return 0;
}

/* sample_tokens: one token per row from softmax(logits / temperature), drawn with the row's
 * counter-based uniform at this step (seeding.step_uniforms, the same SplitMix64 hash), for rows
 * without top-k, top-p or greedy decoding (the sampler's PyTorch path does those). The token is
 * the first whose cumulative weight exceeds u times the total: the total and the running sum
 * add the same chunk sums (16 weights each) in double, then the crossing chunk is walked token by
 * token, so a token of zero weight is never drawn. One pass for the maximum, one for the total,
 * one that stops at the token; no buffer (any vocabulary size). */
static inline uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* e^(x/t - m) of the 16 logits at p (the last chunk padded with weight 0) */
static inline v16 weights16(const float *p, int64_t left, float t, float m) {
    if (left >= 16) return exp_nonpos(load(p) / t - m);
    v16 x = splat(-INFINITY);
    for (int64_t i = 0; i < left; i++) x[i] = p[i] / t;
    return exp_nonpos(x - m);
}

/* a chunk's 16 weights summed pairwise in float (a tree, not a chain: chunks overlap in the
   pipeline), in double: the unit of both the total and the running sum, so that they agree */
static inline double chunk_sum(v16 e) {
    e += __builtin_shufflevector(e, e, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    e += __builtin_shufflevector(e, e, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
    e += __builtin_shufflevector(e, e, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
    return (double)e[0] + (double)e[1];
}

static int64_t sample_row(const float *l, int64_t V, float t, double u) {
    v16 mx = splat(-INFINITY);
    int64_t v = 0;
    for (; v + 16 <= V; v += 16) mx = select(load(l + v) > mx, load(l + v), mx);
    float m = hmax(mx);
    for (; v < V; v++) m = l[v] > m ? l[v] : m;
    m /= t;  /* = the largest l[v] / t: division by t > 0 keeps the order, rounding included */
    double total = 0.0;
    for (v = 0; v < V; v += 16) total += chunk_sum(weights16(l + v, V - v, t, m));
    const double target = u * total;
    double cum = 0.0;
    int64_t last = 0;
    for (v = 0; v < V; v += 16) {
        const v16 e = weights16(l + v, V - v, t, m);
        const double s = chunk_sum(e);
        if (cum + s <= target) {  /* the token lies further on */
            cum += s;
            for (int i = 0; i < 16 && v + i < V; i++) last = e[i] > 0.0f ? v + i : last;
            continue;
        }
        for (int i = 0; i < 16 && v + i < V; i++) {  /* it lies in this chunk */
            if (e[i] <= 0.0f) continue;
            cum += (double)e[i];
            last = v + i;
            if (cum > target) return last;
        }
        return last;  /* the chunk's lanes summed below its tree sum: its last token of weight > 0 */
    }
    return last;  /* u * total rounded up to the total */
}

int sample_tokens(const float *logits, int64_t B, int64_t V, int64_t ld, const float *temperature,
                  const uint64_t *keys, int64_t step, int64_t *tokens, int64_t threads) {
    if (V < 1 || ld < V) return 1;
    const uint64_t salt = (uint64_t)step * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
#pragma omp parallel for schedule(static) num_threads(threads) if (B * V >= 16384)
    for (int64_t r = 0; r < B; r++) {
        const double u = (double)(splitmix64(keys[r] ^ salt) >> 11) * (1.0 / 9007199254740992.0);
        tokens[r] = sample_row(logits + r * ld, V, temperature[r], u);
    }
    return 0;
}
