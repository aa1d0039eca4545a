/*
 * The watch hook's report pass for CPU tensors, fused: one sweep over every
 * layer that reads w(t), w(0) and w(t-1) once and writes w(t-1) once, and
 * accumulates, per layer, in float64:
 *
 *     ||d0||^2,  d0 . w(0),  ||ds||^2,  ds . w(t)      d0 = w - w(0), ds = w - w(t-1)
 *
 * Built from ATen ops the same pass costs ~2x an SGD(momentum) step: each op
 * is its own sweep, and the sweeps after the first come from L3 at best. Here
 * the four sums ride on one stream of loads, so the pass is bound by memory
 * bandwidth like the optimizer step itself.
 *
 * Exactness: every input (float32, bfloat16, float16) is widened to float64
 * *before* subtracting, so the differences and their products are exact (a
 * difference of two bfloat16 / float16 values needs at most ~50 bits) and only
 * the float64 additions round (relative ~1e-16 per add). Subtracting in the
 * parameter's own dtype instead rounds each difference to 8 (bfloat16) or 11
 * (float16) bits: 1e-4 relative errors on rotations and step angles.
 * The widening happens in registers, 8 elements at a time: it costs no memory,
 * and w(0), w(t-1) stay in the parameter's dtype (an exact copy of it).
 *
 * Plain C with no Python or torch headers: loaded with ctypes (which drops the
 * GIL during the call), so it builds with any C compiler and no torch at build
 * time. Work is split across `nthreads` POSIX threads by element ranges of the
 * concatenated layers; each thread keeps its own partial sums.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef double v4d __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));

/* Element types of a layer (the `kind` table). 0 and 1 keep the meaning of the
 * first version's `is64` flag. */
enum { LAYROT_F32 = 0, LAYROT_F64 = 1, LAYROT_BF16 = 2, LAYROT_F16 = 3 };

/* The calling convention's version: the Python side refuses a kernel built
 * from an older source (a stale in-place build would read bfloat16 layers as
 * float64). Bump on any change of layrot_fused_report's arguments or meaning. */
#define LAYROT_FUSED_ABI 2
int layrot_fused_abi(void) { return LAYROT_FUSED_ABI; }

typedef struct {
    int64_t nlayers;
    const void *const *w;
    const void *const *w0;
    void *const *prev;
    const int64_t *numel;
    const int32_t *kind; /* LAYROT_F32, LAYROT_F64, LAYROT_BF16, LAYROT_F16 per layer */
    int refresh;
    int64_t begin, end;  /* element range of the concatenated layers */
    double *sums;        /* 4 * nlayers, this thread's partial sums */
} job_t;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LAYROT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LAYROT_CLONES
#endif

/* Unaligned loads as macros: inline functions returning 32-byte vectors would
 * trip GCC's psABI warning in the default (SSE2) clone. */
#define LOAD4F(dst, p) do { v4f x_; memcpy(&x_, (p), sizeof x_); (dst) = __builtin_convertvector(x_, v4d); } while (0)
#define LOAD4D(dst, p) memcpy(&(dst), (p), sizeof(v4d))

/* 8 bfloat16 -> 8 float32, exactly: a bfloat16 is the top half of a float32. */
#define CONV8_BF16(dst, p)                                         \
    do {                                                           \
        v8h h_;                                                    \
        memcpy(&h_, (p), sizeof h_);                               \
        v8u u_ = __builtin_convertvector(h_, v8u) << 16;           \
        memcpy((dst), &u_, sizeof u_);                             \
    } while (0)

/* 8 float16 -> 8 float32, exactly, in integer lanes (no F16C needed, so the
 * default clone vectorizes too): normal numbers get their exponent rebiased
 * (127 - 15 = 112), subnormals are m * 2^-24 (exact: m < 2^10), Inf/NaN keep
 * their payload under an all-ones exponent. */
#define CONV8_F16(dst, p)                                                          \
    do {                                                                           \
        v8h h_;                                                                    \
        memcpy(&h_, (p), sizeof h_);                                               \
        v8u x_ = __builtin_convertvector(h_, v8u);                                 \
        v8u em_ = x_ & 0x7fffu, sign_ = (x_ & 0x8000u) << 16;                      \
        v8u normal_ = (em_ << 13) + 0x38000000u;                                   \
        v8u special_ = (em_ << 13) | 0x7f800000u;                                  \
        v8f subf_ = __builtin_convertvector((v8i)em_, v8f) * 0x1p-24f;             \
        v8u sub_;                                                                  \
        memcpy(&sub_, &subf_, sizeof sub_);                                        \
        v8u big_ = (v8u)(em_ >= 0x7c00u), small_ = (v8u)(em_ < 0x0400u);           \
        v8u r_ = (big_ & special_) | (~big_ & ((small_ & sub_) | (~small_ & normal_))); \
        r_ |= sign_;                                                               \
        memcpy((dst), &r_, sizeof r_);                                             \
    } while (0)

/* Sums over [lo, hi) of one float32 layer into s[0..3]. */
LAYROT_CLONES
static void sweep_f32(const float *w, const float *a, float *b, int64_t lo, int64_t hi, int refresh,
                      double *s) {
    v4d s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, t0 = {0}, t1 = {0}, t2 = {0}, t3 = {0};
    int64_t i = lo;
    for (; i + 8 <= hi; i += 8) {
        v4d x, y, xa, ya, xb, yb;
        LOAD4F(x, w + i); LOAD4F(y, w + i + 4);
        LOAD4F(xa, a + i); LOAD4F(ya, a + i + 4);
        LOAD4F(xb, b + i); LOAD4F(yb, b + i + 4);
        v4d d = x - xa, e = y - ya;        /* d0 */
        v4d f = x - xb, g = y - yb;        /* ds */
        s0 += d * d; t0 += e * e;
        s1 += d * xa; t1 += e * ya;
        s2 += f * f; t2 += g * g;
        s3 += f * x; t3 += g * y;
        if (refresh) memcpy(b + i, w + i, 8 * sizeof(float));
    }
    s0 += t0; s1 += t1; s2 += t2; s3 += t3;
    double r0 = s0[0] + s0[1] + s0[2] + s0[3], r1 = s1[0] + s1[1] + s1[2] + s1[3];
    double r2 = s2[0] + s2[1] + s2[2] + s2[3], r3 = s3[0] + s3[1] + s3[2] + s3[3];
    for (; i < hi; ++i) {
        double x = w[i], d = x - (double)a[i], f = x - (double)b[i];
        r0 += d * d; r1 += d * (double)a[i]; r2 += f * f; r3 += f * x;
        if (refresh) b[i] = w[i];
    }
    s[0] += r0; s[1] += r1; s[2] += r2; s[3] += r3;
}

/* The same for a float64 layer (no widening; differences round once). */
LAYROT_CLONES
static void sweep_f64(const double *w, const double *a, double *b, int64_t lo, int64_t hi, int refresh,
                      double *s) {
    v4d s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int64_t i = lo;
    for (; i + 4 <= hi; i += 4) {
        v4d x, xa, xb;
        LOAD4D(x, w + i); LOAD4D(xa, a + i); LOAD4D(xb, b + i);
        v4d d = x - xa, f = x - xb;
        s0 += d * d; s1 += d * xa; s2 += f * f; s3 += f * x;
        if (refresh) memcpy(b + i, w + i, 4 * sizeof(double));
    }
    double r0 = s0[0] + s0[1] + s0[2] + s0[3], r1 = s1[0] + s1[1] + s1[2] + s1[3];
    double r2 = s2[0] + s2[1] + s2[2] + s2[3], r3 = s3[0] + s3[1] + s3[2] + s3[3];
    for (; i < hi; ++i) {
        double x = w[i], d = x - a[i], f = x - b[i];
        r0 += d * d; r1 += d * a[i]; r2 += f * f; r3 += f * x;
        if (refresh) b[i] = w[i];
    }
    s[0] += r0; s[1] += r1; s[2] += r2; s[3] += r3;
}

/* The same for a 16-bit layer (bfloat16 or float16): each group of 8 elements
 * is widened to float32 (exact) and on to float64 before any arithmetic. The
 * tail (< 8 elements) goes through the same conversion, zero-padded. */
#define DEFINE_SWEEP16(NAME, CONV8)                                                                   \
    LAYROT_CLONES                                                                                     \
    static void NAME(const uint16_t *w, const uint16_t *a, uint16_t *b, int64_t lo, int64_t hi,      \
                     int refresh, double *s) {                                                        \
        v4d s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, t0 = {0}, t1 = {0}, t2 = {0}, t3 = {0};           \
        for (int64_t i = lo; i < hi; i += 8) {                                                        \
            float fw[8], fa[8], fb[8];                                                                \
            int64_t n = hi - i < 8 ? hi - i : 8;                                                      \
            if (n == 8) {                                                                             \
                CONV8(fw, w + i); CONV8(fa, a + i); CONV8(fb, b + i);                                 \
            } else {                                                                                  \
                uint16_t pw[8] = {0}, pa[8] = {0}, pb[8] = {0};                                       \
                memcpy(pw, w + i, (size_t)n * 2); memcpy(pa, a + i, (size_t)n * 2);                   \
                memcpy(pb, b + i, (size_t)n * 2);                                                     \
                CONV8(fw, pw); CONV8(fa, pa); CONV8(fb, pb);                                          \
            }                                                                                         \
            v4d x, y, xa, ya, xb, yb;                                                                 \
            LOAD4F(x, fw); LOAD4F(y, fw + 4);                                                         \
            LOAD4F(xa, fa); LOAD4F(ya, fa + 4);                                                       \
            LOAD4F(xb, fb); LOAD4F(yb, fb + 4);                                                       \
            v4d d = x - xa, e = y - ya; /* d0, exact in float64 */                                    \
            v4d f = x - xb, g = y - yb; /* ds */                                                      \
            s0 += d * d; t0 += e * e;                                                                 \
            s1 += d * xa; t1 += e * ya;                                                               \
            s2 += f * f; t2 += g * g;                                                                 \
            s3 += f * x; t3 += g * y;                                                                 \
            if (refresh) memcpy(b + i, w + i, (size_t)n * 2);                                         \
        }                                                                                             \
        s0 += t0; s1 += t1; s2 += t2; s3 += t3;                                                       \
        s[0] += s0[0] + s0[1] + s0[2] + s0[3]; s[1] += s1[0] + s1[1] + s1[2] + s1[3];                 \
        s[2] += s2[0] + s2[1] + s2[2] + s2[3]; s[3] += s3[0] + s3[1] + s3[2] + s3[3];                 \
    }

DEFINE_SWEEP16(sweep_bf16, CONV8_BF16)
DEFINE_SWEEP16(sweep_f16, CONV8_F16)

/* Pieces of at most this many elements: each piece's sums are added into the
 * layer's total, which bounds the float64 accumulation error growth. */
#define PIECE (1 << 16)

static void *run_job(void *arg) {
    job_t *j = (job_t *)arg;
    int64_t base = 0;
    for (int64_t l = 0; l < j->nlayers && base < j->end; ++l) {
        int64_t n = j->numel[l];
        int64_t lo = j->begin > base ? j->begin - base : 0;
        int64_t hi = j->end - base < n ? j->end - base : n;
        for (int64_t p = lo; p < hi; p += PIECE) {
            int64_t q = p + PIECE < hi ? p + PIECE : hi;
            double *s = j->sums + 4 * l;
            switch (j->kind[l]) {
            case LAYROT_F64:
                sweep_f64((const double *)j->w[l], (const double *)j->w0[l], (double *)j->prev[l], p, q,
                          j->refresh, s);
                break;
            case LAYROT_BF16:
                sweep_bf16((const uint16_t *)j->w[l], (const uint16_t *)j->w0[l], (uint16_t *)j->prev[l], p, q,
                           j->refresh, s);
                break;
            case LAYROT_F16:
                sweep_f16((const uint16_t *)j->w[l], (const uint16_t *)j->w0[l], (uint16_t *)j->prev[l], p, q,
                          j->refresh, s);
                break;
            default:
                sweep_f32((const float *)j->w[l], (const float *)j->w0[l], (float *)j->prev[l], p, q,
                          j->refresh, s);
            }
        }
        base += n;
    }
    return NULL;
}

/*
 * kind: each layer's element type (LAYROT_F32, LAYROT_F64, LAYROT_BF16, LAYROT_F16); w, w0 and
 * prev of a layer share it.
 * out: 4 x nlayers float64, row-major (rows: ||d0||^2, d0.w0, ||ds||^2, ds.w).
 * Returns 0, or -1 when memory or threads could not be had (out untouched
 * then; the caller falls back to its ATen path).
 */
int layrot_fused_report(int64_t nlayers, const void *const *w, const void *const *w0, void *const *prev,
                        const int64_t *numel, const int32_t *kind, int refresh, int nthreads, double *out) {
    int64_t total = 0;
    for (int64_t l = 0; l < nlayers; ++l) total += numel[l];
    if (nthreads < 1) nthreads = 1;
    /* Threads only pay off on enough work: ~64k elements each at least. */
    if (total / nthreads < (1 << 16)) nthreads = (int)(total >> 16) > 1 ? (int)(total >> 16) : 1;
    if (nthreads > 64) nthreads = 64;
    job_t jobs[64];
    pthread_t tids[64];
    double *sums = calloc((size_t)nthreads * 4 * (size_t)(nlayers > 0 ? nlayers : 1), sizeof(double));
    if (!sums) return -1;
    for (int t = 0; t < nthreads; ++t) {
        /* Ranges aligned to 16 elements keep every thread's vector loop whole. */
        int64_t b = (total * t / nthreads) & ~(int64_t)15, e = (total * (t + 1) / nthreads) & ~(int64_t)15;
        if (t == nthreads - 1) e = total;
        jobs[t] = (job_t){nlayers, w, w0, prev, numel, kind, refresh, b, e, sums + (size_t)t * 4 * nlayers};
    }
    int started = 0, failed = 0;
    for (int t = 1; t < nthreads; ++t) {
        if (pthread_create(&tids[t], NULL, run_job, &jobs[t]) != 0) {
            failed = 1;
            break;
        }
        started = t;
    }
    if (failed) {
        /* Do the ranges of threads that did not start on this thread. */
        for (int t = started + 1; t < nthreads; ++t) run_job(&jobs[t]);
    }
    run_job(&jobs[0]);
    for (int t = 1; t <= started; ++t) pthread_join(tids[t], NULL);
    for (int64_t l = 0; l < nlayers; ++l)
        for (int k = 0; k < 4; ++k) {
            double acc = 0.0;
            for (int t = 0; t < nthreads; ++t) acc += sums[(size_t)t * 4 * nlayers + 4 * l + k];
            out[k * nlayers + l] = acc;
        }
    free(sums);
    return 0;
}
