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
 * Exactness: float32 inputs are widened to float64 before subtracting, so the
 * differences and their products are exact and only the float64 additions
 * round (relative ~1e-16 per add, far under the 1e-4 the collector needs for
 * 1e-4 rad steps).
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

typedef struct {
    int64_t nlayers;
    const void *const *w;
    const void *const *w0;
    void *const *prev;
    const int64_t *numel;
    const int32_t *is64;
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
            if (j->is64[l])
                sweep_f64((const double *)j->w[l], (const double *)j->w0[l], (double *)j->prev[l], p, q,
                          j->refresh, s);
            else
                sweep_f32((const float *)j->w[l], (const float *)j->w0[l], (float *)j->prev[l], p, q,
                          j->refresh, s);
        }
        base += n;
    }
    return NULL;
}

/*
 * out: 4 x nlayers float64, row-major (rows: ||d0||^2, d0.w0, ||ds||^2, ds.w).
 * Returns 0, or -1 when memory or threads could not be had (out untouched
 * then; the caller falls back to its ATen path).
 */
int layrot_fused_report(int64_t nlayers, const void *const *w, const void *const *w0, void *const *prev,
                        const int64_t *numel, const int32_t *is64, int refresh, int nthreads, double *out) {
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
        jobs[t] = (job_t){nlayers, w, w0, prev, numel, is64, refresh, b, e, sums + (size_t)t * 4 * nlayers};
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
