/* The compiled kernel (adaptive/stats/_kernels.c) against naive loops in double precision,
 * as a program of its own: tests/stats/test_stats_native_targets.py builds it with each
 * target's flags (and for 64-bit Arm with a cross compiler, run under qemu where present).
 * Prints one line per case and exits 0 when every relative error is below 1e-4. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int adaptive_psg_linear(const float *d, long d_sb, long d_st, long d_so, const float *a,
                        const long *geom, long b, long t_len, long o_len, long n, float *s,
                        float *q, float *bs, float *bq, int split, int nt, float *norms,
                        float *copies, float *scratch);
void adaptive_psg_linear_sizes(long b, long t_len, long o_len, long n, int coordinates, int bias,
                               int split, int nt, long *sizes);
int adaptive_psg_conv(const float *d, long d_sb, long d_so, long d_st, const float *a,
                      const long *geom, long b, long o_len, long n, float *s, float *q, int split,
                      int nt, float *norms, float *scratch);
void adaptive_psg_rownorm(const float *a, const float *d, long b, long t_len, long c, float eps,
                          int rms, int weight, int bias, int nt, float *norms, float *scratch);
void adaptive_psg_embedding(const int64_t *ids, const float *d, long b, long t_len, long c,
                            long padding, int nt, float *norms, int64_t *tokens, float *scratch);
int adaptive_psg_blocking(void);

static float rnd(void) { return (float)rand() / RAND_MAX - 0.5f; }

/* Linear: G_i[o, k] = sum_t d[i, t, o] a[i, t, k], beta_i[o] = sum_t d[i, t, o]; checks the
 * norms (with the bias), the sums and squares of G_i and of beta_i. */
/* reference loops, not vectorised: GCC 12 for aarch64 fails on them (internal compiler error
 * in vect_transform_reduction) */
__attribute__((optimize("no-tree-vectorize"))) static int check_linear(long b, long T, long O,
                                                                        long N, int split,
                                                                        int nt) {
    const long np = (N + 15) / 16 * 16;
    float *a = malloc(sizeof(float) * b * T * N), *d = malloc(sizeof(float) * b * T * O);
    for (long i = 0; i < b * T * N; i++) a[i] = rnd();
    for (long i = 0; i < b * T * O; i++) d[i] = rnd();
    long sizes[2];
    adaptive_psg_linear_sizes(b, T, O, N, 1, 1, split, nt, sizes);
    float *s = calloc(O * np, sizeof(float)), *q = calloc(O * np, sizeof(float));
    float *bs = calloc(O, sizeof(float)), *bq = calloc(O, sizeof(float));
    float *norms = calloc(b, sizeof(float));
    float *copies = calloc(sizes[0] + 1, sizeof(float)), *scratch = calloc(sizes[1], sizeof(float));
    double *S = calloc(O * N, sizeof(double)), *Q = calloc(O * N, sizeof(double));
    double *BS = calloc(O, sizeof(double)), *BQ = calloc(O, sizeof(double));
    const long geom[3] = {T * N, N, 1};
    adaptive_psg_linear(d, T * O, O, 1, a, geom, b, T, O, N, s, q, bs, bq, split, nt, norms, copies,
                        scratch);
    double err = 0, es = 0, eq = 0, eb = 0, smax = 0, qmax = 0, bmax = 0;
    for (long i = 0; i < b; i++) {
        double want = 0;
        for (long o = 0; o < O; o++) {
            double beta = 0;
            for (long t = 0; t < T; t++) beta += d[(i * T + t) * O + o];
            BS[o] += beta, BQ[o] += beta * beta, want += beta * beta;
            for (long k = 0; k < N; k++) {
                double g = 0;
                for (long t = 0; t < T; t++)
                    g += (double)d[(i * T + t) * O + o] * a[(i * T + t) * N + k];
                S[o * N + k] += g, Q[o * N + k] += g * g, want += g * g;
            }
        }
        err = fmax(err, fabs(norms[i] - want) / want);
    }
    for (long o = 0; o < O; o++) {
        for (long k = 0; k < N; k++) {
            smax = fmax(smax, fabs(S[o * N + k])), qmax = fmax(qmax, Q[o * N + k]);
            es = fmax(es, fabs(s[o * np + k] - S[o * N + k]));
            eq = fmax(eq, fabs(q[o * np + k] - Q[o * N + k]));
        }
        bmax = fmax(bmax, BQ[o]);
        eb = fmax(eb, fmax(fabs(bs[o] - BS[o]), fabs(bq[o] - BQ[o])));
    }
    err = fmax(err, fmax(es / smax, fmax(eq / qmax, eb / bmax)));
    printf("linear b%ld t%ld o%ld n%ld split%d threads%d: %.2e\n", b, T, O, N, split, nt, err);
    free(a), free(d), free(s), free(q), free(bs), free(bq), free(norms), free(copies);
    free(scratch), free(S), free(Q), free(BS), free(BQ);
    return err < 1e-4;
}

/* Convolution without padding: checks the per-sample norms. */
static int check_conv(long b, long C, long O, long H, long W, long kh, long kw, long st, int nt) {
    const long ho = (H - kh) / st + 1, wo = (W - kw) / st + 1, T = ho * wo, n = C * kh * kw;
    const long opad = (O + 15) / 16 * 16, npad = (n + 15) / 16 * 16;
    float *a = malloc(sizeof(float) * b * C * H * W), *d = malloc(sizeof(float) * b * O * T);
    for (long i = 0; i < b * C * H * W; i++) a[i] = rnd();
    for (long i = 0; i < b * O * T; i++) d[i] = rnd();
    float *s = calloc(nt * npad * opad, sizeof(float)), *norms = calloc(b, sizeof(float));
    float *scratch = calloc(nt * T * opad, sizeof(float));
    const long geom[12] = {C * H * W, H * W, W, 1, wo, kh, kw, st, st, 1, 1, ho};
    adaptive_psg_conv(d, O * T, T, 1, a, geom, b, O, n, s, NULL, 0, nt, norms, scratch);
    double err = 0;
    for (long i = 0; i < b; i++) {
        double want = 0;
        for (long o = 0; o < O; o++)
            for (long c = 0; c < C; c++)
                for (long u = 0; u < kh; u++)
                    for (long v = 0; v < kw; v++) {
                        double g = 0;
                        for (long y = 0; y < ho; y++)
                            for (long x = 0; x < wo; x++)
                                g += (double)d[(i * O + o) * T + y * wo + x] *
                                     a[((i * C + c) * H + y * st + u) * W + x * st + v];
                        want += g * g;
                    }
        err = fmax(err, fabs(norms[i] - want) / want);
    }
    printf("conv b%ld c%ld o%ld %ldx%ld k%ldx%ld s%ld threads%d: %.2e\n", b, C, O, H, W, kh, kw,
           st, nt, err);
    free(a), free(d), free(s), free(norms), free(scratch);
    return err < 1e-4;
}

/* LayerNorm (rms 0) or RMSNorm: ||sum_t d_it x^_it||^2 + ||sum_t d_it||^2 per sample. */
static int check_rownorm(long b, long T, long C, int rms, int nt) {
    float *a = malloc(sizeof(float) * b * T * C), *d = malloc(sizeof(float) * b * T * C);
    for (long i = 0; i < b * T * C; i++) a[i] = 2 * rnd() + 0.3f, d[i] = rnd();
    float *norms = calloc(b, sizeof(float)), *scratch = calloc(nt * 2 * C, sizeof(float));
    double *w = calloc(C, sizeof(double)), *be = calloc(C, sizeof(double)), err = 0;
    adaptive_psg_rownorm(a, d, b, T, C, 1e-5f, rms, 1, 1, nt, norms, scratch);
    for (long i = 0; i < b; i++) {
        for (long k = 0; k < C; k++) w[k] = be[k] = 0;
        for (long t = 0; t < T; t++) {
            const float *x = a + (i * T + t) * C, *g = d + (i * T + t) * C;
            double m = 0, v = 0;
            for (long k = 0; k < C; k++) m += rms ? 0 : x[k] / (double)C;
            for (long k = 0; k < C; k++) v += (x[k] - m) * (x[k] - m) / C;
            for (long k = 0; k < C; k++) w[k] += g[k] * (x[k] - m) / sqrt(v + 1e-5), be[k] += g[k];
        }
        double want = 0;
        for (long k = 0; k < C; k++) want += w[k] * w[k] + be[k] * be[k];
        err = fmax(err, fabs(norms[i] - want) / want);
    }
    printf("rownorm b%ld t%ld c%ld rms%d threads%d: %.2e\n", b, T, C, rms, nt, err);
    free(a), free(d), free(norms), free(scratch), free(w), free(be);
    return err < 1e-4;
}

/* Embedding over a vocabulary of V ids, id 0 the padding: sum_v ||sum_{t: id_t = v} d_t||^2. */
static int check_embedding(long b, long T, long C, long V, int nt) {
    int64_t *ids = malloc(sizeof(int64_t) * b * T), *tokens = malloc(sizeof(int64_t) * nt * 2 * T);
    float *d = malloc(sizeof(float) * b * T * C), *norms = calloc(b, sizeof(float));
    float *scratch = calloc(nt * C, sizeof(float));
    for (long i = 0; i < b * T; i++) ids[i] = rand() % V;
    for (long i = 0; i < b * T * C; i++) d[i] = rnd();
    adaptive_psg_embedding(ids, d, b, T, C, 0, nt, norms, tokens, scratch);
    double err = 0;
    for (long i = 0; i < b; i++) {
        double want = 0;
        for (long v = 1; v < V; v++)
            for (long k = 0; k < C; k++) {
                double r = 0;
                for (long t = 0; t < T; t++) r += ids[i * T + t] == v ? d[(i * T + t) * C + k] : 0;
                want += r * r;
            }
        err = fmax(err, fabs(norms[i] - want) / want);
    }
    printf("embedding b%ld t%ld c%ld v%ld threads%d: %.2e\n", b, T, C, V, nt, err);
    free(ids), free(tokens), free(d), free(norms), free(scratch);
    return err < 1e-4;
}

int main(void) {
    printf("blocking %d\n", adaptive_psg_blocking());
    int ok = 1;
    ok &= check_linear(5, 7, 13, 37, 0, 2);
    ok &= check_linear(4, 9, 50, 70, 1, 2);
    ok &= check_linear(3, 1, 8, 16, 0, 1);
    ok &= check_linear(3, 150, 13, 37, 0, 2); /* three tiles of positions */
    ok &= check_linear(2, 70, 50, 70, 1, 2);  /* two tiles, threads sharing the rows */
    ok &= check_conv(3, 3, 20, 9, 10, 3, 2, 2, 2);
    ok &= check_conv(2, 5, 40, 6, 6, 1, 1, 1, 1);
    ok &= check_rownorm(3, 5, 37, 0, 2);
    ok &= check_rownorm(2, 4, 64, 1, 1);
    ok &= check_embedding(3, 30, 21, 6, 2);
    puts(ok ? "ok" : "FAILED");
    return !ok;
}
