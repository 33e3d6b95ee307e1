/* Per-sample weight-gradient norms and their batch sum in one pass, never storing the
 * per-sample gradients (CPU).
 *
 * For a Linear layer on sequences, or a convolution read as im2col, sample i's weight gradient
 * is G_i = sum_t d_it x_it^T: d_it the output gradient at position t (O values), x_it the input
 * row (N values: the input features, or the (c, kh, kw) window of a convolution). Autograd's
 * batch weight gradient is sum_i G_i. This kernel computes, per sample, G_i in registers, block
 * by block (8 output rows x 32 input columns), and adds each finished block to the thread's
 * running sum S_k and its square to ||G_i||^2: the per-sample gradients never reach memory, so
 * the pass costs about what the batch weight gradient costs (same multiply-adds), where a
 * batched matmul writes b gradients out and reads them back twice (norm and sum).
 *
 * Threads split the samples; each writes its own S_k (the caller sums them). Built with
 * OpenMP and linked against libgomp by soname, so in a process that loaded torch first it
 * runs on torch's own OpenMP threads. Loaded through ctypes by adaptive/stats/native.py.
 */
#include <omp.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
#define LD(p) (*(const v16u *)(p))
#define ROWS 8

/* One block of G_i: rows o0..o0+rows-1 (rows <= ROWS) of d, columns n0..n0+16*nv-1 (nv in
 * {1, 2}) of the packed input xp (row stride np). Adds the block to S (or stores it, for the
 * thread's first sample) and its squares to *nacc. */
static inline void block(const float *d, ptrdiff_t d_st, ptrdiff_t d_so, const float *xp,
                         ptrdiff_t np, long t_len, int rows, int nv, float *s, ptrdiff_t s_so,
                         v16 *nacc, int first) {
    v16 a[ROWS][2];
    memset(a, 0, sizeof(a));
    if (rows == ROWS && nv == 2) {
        for (long t = 0; t < t_len; t++) {
            const float *xr = xp + t * np;
            const v16 x0 = LD(xr), x1 = LD(xr + 16);
            const float *dr = d + t * d_st;
            for (int r = 0; r < ROWS; r++) {
                const float dv = dr[r * d_so];
                a[r][0] += dv * x0;
                a[r][1] += dv * x1;
            }
        }
    } else {
        for (long t = 0; t < t_len; t++) {
            const float *xr = xp + t * np;
            const float *dr = d + t * d_st;
            for (int v = 0; v < nv; v++) {
                const v16 x0 = LD(xr + 16 * v);
                for (int r = 0; r < rows; r++) a[r][v] += dr[r * d_so] * x0;
            }
        }
    }
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < nv; v++) {
            float *sp = s + r * s_so + 16 * v;
            *(v16u *)sp = first ? a[r][v] : LD(sp) + a[r][v];
            *nacc += a[r][v] * a[r][v];
        }
}

/* geometry of the input, in elements:
 *   linear: {sb, st, sn}: x_i[t, n] = a[i*sb + t*st + n*sn]
 *   conv2d: {sb, sc, sh, sw, wo, kh, kw, stride_h, stride_w, dil_h, dil_w}: with t = (h, w)
 *           and n = (c, u, v), x_i[t, n] = a[i*sb + c*sc + (h*stride_h + u*dil_h)*sh
 *           + (w*stride_w + v*dil_w)*sw] (the input already padded) */
static void pack(int conv, const float *a, const long *g, const long *off, long i, long t_len,
                 long n, long np, float *xp) {
    if (!conv) {
        const float *ai = a + i * g[0];
        for (long t = 0; t < t_len; t++) {
            float *row = xp + t * np;
            const float *src = ai + t * g[1];
            if (g[2] == 1)
                memcpy(row, src, n * sizeof(float));
            else
                for (long k = 0; k < n; k++) row[k] = src[k * g[2]];
            memset(row + n, 0, (np - n) * sizeof(float));
        }
        return;
    }
    /* conv: off[k] is the offset of column k's input element from the window's corner, the
     * same for every position t, so each row is one indexed gather */
    const float *ai = a + i * g[0];
    const long sh = g[2], sw = g[3], wo = g[4], str_h = g[7], str_w = g[8];
    for (long t = 0; t < t_len; t++) {
        const long h = t / wo, w = t % wo;
        const float *src = ai + h * str_h * sh + w * str_w * sw;
        float *row = xp + t * np;
        for (long k = 0; k < n; k++) row[k] = src[off[k]];
        memset(row + n, 0, (np - n) * sizeof(float));
    }
}

/* For i in [0, b): G_i[o, k] = sum_t d[i*d_sb + t*d_st + o*d_so] * x_i[t, k] (x_i from pack);
 * norms[i] = ||G_i||^2; thread k of nt writes sum over its samples of G_i to
 * s[k*o_len*np : (k+1)*o_len*np] as an (o_len, np) row-major block (np = n rounded up to 16;
 * the pad columns are zero). scratch holds nt*t_len*np floats. Returns the threads used (0: out
 * of memory). */
int adaptive_psg(int conv, const float *d, ptrdiff_t d_sb, ptrdiff_t d_st, ptrdiff_t d_so,
                 const float *a, const long *geom, long b, long t_len, long o_len, long n,
                 float *s, int nt, float *norms, float *scratch) {
    const long np = (n + 15) / 16 * 16;
    if (nt > b) nt = (int)b;
    if (nt < 1) nt = 1;
    int used = nt;
    long *off = NULL;
    if (conv) {
        const long kh = geom[5], kw = geom[6], ch = n / (kh * kw);
        off = malloc(n * sizeof(long));
        if (off == NULL) return 0;
        long k = 0;
        for (long c = 0; c < ch; c++)
            for (long u = 0; u < kh; u++)
                for (long v = 0; v < kw; v++)
                    off[k++] = c * geom[1] + u * geom[9] * geom[2] + v * geom[10] * geom[3];
    }
#pragma omp parallel num_threads(nt)
    {
        const int k = omp_get_thread_num(), m = omp_get_num_threads();
#pragma omp single
        used = m;
        const long i0 = b * k / m, i1 = b * (k + 1) / m;
        float *xp = scratch + (ptrdiff_t)k * t_len * np;
        float *sk = s + (ptrdiff_t)k * o_len * np;
        for (long i = i0; i < i1; i++) {
            pack(conv, a, geom, off, i, t_len, n, np, xp);
            const float *di = d + i * d_sb;
            v16 nacc = {0};
            for (long o0 = 0; o0 < o_len; o0 += ROWS) {
                const int rows = o_len - o0 < ROWS ? (int)(o_len - o0) : ROWS;
                long c0 = 0;
                for (; c0 + 32 <= np; c0 += 32)
                    block(di + o0 * d_so, d_st, d_so, xp + c0, np, t_len, rows, 2,
                          sk + o0 * np + c0, np, &nacc, i == i0);
                if (c0 < np)
                    block(di + o0 * d_so, d_st, d_so, xp + c0, np, t_len, rows, 1,
                          sk + o0 * np + c0, np, &nacc, i == i0);
            }
            float total = 0.f;
            for (int q = 0; q < 16; q++) total += nacc[q];
            norms[i] = total;
        }
    }
    free(off);
    return used;
}
