/* Per-sample weight-gradient norms and their batch sum in one pass, never storing the
 * per-sample gradients (CPU).
 *
 * For a Linear layer on sequences, or a convolution, sample i's weight gradient is
 * G_i = sum_t d_it x_it^T: d_it the output gradient at position t (O values), x_it the input
 * row at t (N values: the input features, or the (c, kh, kw) window of a convolution).
 * Autograd's batch weight gradient is sum_i G_i. These kernels build each G_i block by block in
 * registers (a block accumulates over all positions t), add every finished block to the
 * thread's running sum S_k and its squares to ||G_i||^2. The per-sample gradients never reach
 * memory, so the pass costs about what the batch weight gradient costs (the same
 * multiply-adds), where a batched matmul writes b gradients out and reads them back twice
 * (norm and sum).
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
 * thread's first sample), its squares to *nacc and, where q is given, its elementwise squares
 * to Q (same layout as S). */
static inline void block(const float *d, ptrdiff_t d_st, ptrdiff_t d_so, const float *xp,
                         ptrdiff_t np, long t_len, int rows, int nv, float *s, float *q,
                         ptrdiff_t s_so, v16 *nacc, int first) {
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
            const v16 sq = a[r][v] * a[r][v];
            *(v16u *)sp = first ? a[r][v] : LD(sp) + a[r][v];
            *nacc += sq;
            if (q) {
                float *qp = q + r * s_so + 16 * v;
                *(v16u *)qp = first ? sq : LD(qp) + sq;
            }
        }
}

/* Sample i's input rows, x_i[t, k] = a[i*sb + t*st + k*sn] for g = {sb, st, sn}, copied to xp
 * as a (t_len, np) row-major block with zero pad columns. */
static void pack(const float *a, const long *g, long i, long t_len, long n, long np, float *xp) {
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
}

/* What the calling thread of an OpenMP team does: split == 0, samples [i0, i1) and every unit
 * (each thread keeps its own sums, of `block` floats, summed by the caller); split == 1, every
 * sample and units [u0, u1) (one shared sum, each thread writing its own rows of it, and
 * partial norms per thread, for a layer whose sums are too large to keep one per thread). */
typedef struct {
    int k;
    long i0, i1, u0, u1;
    float *s, *q, *norms;
} part;

static part my_part(int split, long b, long units, ptrdiff_t block, float *s, float *q,
                    float *norms) {
    const int k = omp_get_thread_num(), m = omp_get_num_threads();
    part p = {k, 0, b, 0, units, s, q, norms};
    if (split) {
        p.u0 = units * k / m, p.u1 = units * (k + 1) / m;
        p.norms = norms + (ptrdiff_t)k * b;
    } else {
        p.i0 = b * k / m, p.i1 = b * (k + 1) / m;
        p.s = s + k * block;
        p.q = q ? q + k * block : NULL;
    }
    return p;
}

/* Linear layers. For i in [0, b): G_i[o, k] = sum_t d[i*d_sb + t*d_st + o*d_so] x_i[t, k] with
 * x_i from pack (geom = {sb, st, sn}); np = n rounded up to 16.
 * split == 0: thread k writes the sum of its samples' G_i to s + k*o_len*np as an (o_len, np)
 *   row-major block (pad columns zero) and ||G_i||^2 to norms[i];
 * split == 1: threads share the rows (blocks of ROWS) of one (o_len, np) sum at s and write the
 *   part of ||G_i||^2 from their rows to norms[k*b + i].
 * Where q is not NULL, the sums of elementwise squares go to q likewise. scratch holds
 * nt*t_len*np floats. Returns the threads used. */
int adaptive_psg_linear(const float *d, ptrdiff_t d_sb, ptrdiff_t d_st, ptrdiff_t d_so,
                        const float *a, const long *geom, long b, long t_len, long o_len, long n,
                        float *s, float *q, int split, int nt, float *norms, float *scratch) {
    const long np = (n + 15) / 16 * 16, units = (o_len + ROWS - 1) / ROWS;
    if (!split && nt > b) nt = (int)b;
    if (nt < 1) nt = 1;
    int used = nt;
#pragma omp parallel num_threads(nt)
    {
#pragma omp single
        used = omp_get_num_threads();
        const part p = my_part(split, b, units, (ptrdiff_t)o_len * np, s, q, norms);
        const long i0 = p.i0, i1 = p.i1, u0 = p.u0, u1 = p.u1;
        float *sk = p.s, *qk = p.q, *nk = p.norms;
        float *xp = scratch + (ptrdiff_t)p.k * t_len * np;
        for (long i = i0; i < i1 && u1 > u0; i++) {
            pack(a, geom, i, t_len, n, np, xp);
            const float *di = d + i * d_sb;
            v16 nacc = {0};
            for (long o0 = u0 * ROWS; o0 < o_len && o0 < u1 * ROWS; o0 += ROWS) {
                const int rows = o_len - o0 < ROWS ? (int)(o_len - o0) : ROWS;
                long c0 = 0;
                for (; c0 + 32 <= np; c0 += 32)
                    block(di + o0 * d_so, d_st, d_so, xp + c0, np, t_len, rows, 2,
                          sk + o0 * np + c0, qk ? qk + o0 * np + c0 : NULL, np, &nacc,
                          i == i0);
                if (c0 < np)
                    block(di + o0 * d_so, d_st, d_so, xp + c0, np, t_len, rows, 1,
                          sk + o0 * np + c0, qk ? qk + o0 * np + c0 : NULL, np, &nacc,
                          i == i0);
            }
            float total = 0.f;
            for (int r = 0; r < 16; r++) total += nacc[r];
            nk[i] = total;
        }
        if (split && u1 <= u0)
            for (long i = 0; i < b; i++) nk[i] = 0.f;
    }
    return used;
}

/* Convolutions, without an im2col copy. Vectors run along the output channels o, and every
 * input element x_i[t, n] (n = (c, u, v)) is broadcast from the input itself: a sample's input
 * is small enough to stay in cache, so only the output gradient is repacked, to dt (t, o) with
 * o contiguous (T·O values per sample against the T·C·kh·kw of an im2col copy). A block holds
 * OV vectors of 16 channels by NR columns n in registers over all positions t. */
#define CONV_BLOCK(NAME, OV, NR)                                                                 \
    static void NAME(const float *dt, long opad, long ho, long wo, const float *ai, long step_h, \
                     long step_w, const long *off, int nr, float *s, float *q, v16 *nacc,     \
                     int first) {                                                                \
        v16 acc[OV][NR];                                                                         \
        memset(acc, 0, sizeof(acc));                                                             \
        long o[NR];                                                                              \
        for (int j = 0; j < NR; j++) o[j] = off[j < nr ? j : nr - 1];                            \
        const float *drow = dt;                                                                  \
        for (long h = 0; h < ho; h++) {                                                          \
            const float *bh = ai + h * step_h;                                                   \
            for (long w = 0; w < wo; w++, drow += opad) {                                        \
                const float *bt = bh + w * step_w;                                               \
                v16 dv[OV];                                                                      \
                for (int v = 0; v < OV; v++) dv[v] = LD(drow + 16 * v);                          \
                for (int j = 0; j < NR; j++) {                                                   \
                    const float xs = bt[o[j]];                                                   \
                    for (int v = 0; v < OV; v++) acc[v][j] += dv[v] * xs;                        \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        for (int j = 0; j < nr; j++)                                                             \
            for (int v = 0; v < OV; v++) {                                                       \
                float *sp = s + j * opad + 16 * v;                                               \
                const v16 sq = acc[v][j] * acc[v][j];                                            \
                *(v16u *)sp = first ? acc[v][j] : LD(sp) + acc[v][j];                            \
                *nacc += sq;                                                                     \
                if (q) {                                                                         \
                    float *qp = q + j * opad + 16 * v;                                           \
                    *(v16u *)qp = first ? sq : LD(qp) + sq;                                      \
                }                                                                                \
            }                                                                                    \
    }
CONV_BLOCK(conv_block_2x8, 2, 8)
CONV_BLOCK(conv_block_1x16, 1, 16)

typedef int v16i __attribute__((vector_size(64)));

/* v[r][c] <- v[c][r]: four rounds of two-vector shuffles, round s pairing rows r and r + s */
static inline void transpose16(v16 v[16]) {
    static const v16i lo[4] = {
        {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
        {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
        {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
        {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}};
    static const v16i hi[4] = {
        {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
        {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
        {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
        {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}};
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++) {
        const int step = 8 >> k;
#pragma GCC unroll 16
        for (int r = 0; r < 16; r++) {
            if (r & step) continue;
            const v16 a = v[r], b = v[r + step];
            v[r] = __builtin_shuffle(a, b, lo[k]);
            v[r + step] = __builtin_shuffle(a, b, hi[k]);
        }
    }
}

/* dt[t*opad + o] = d[o*d_so + t*d_st]: one sample's output gradient with the channels
 * contiguous. Positions contiguous (d_st == 1): 16×16 tiles transposed in registers; otherwise
 * 16 channels at a time with the positions inner, so 16 read streams and one written cache
 * line per position stay in L1 (a channel-outer loop thrashes it). */
static void repack_channels_last(const float *d, ptrdiff_t d_so, ptrdiff_t d_st, long o_len,
                                 long t_len, float *dt, long opad) {
    for (long o0 = 0; o0 < o_len; o0 += 16) {
        const long oe = o_len - o0 < 16 ? o_len - o0 : 16;
        long t0 = 0;
        if (d_st == 1 && oe == 16)
            for (; t0 + 16 <= t_len; t0 += 16) {
                v16 v[16];
#pragma GCC unroll 16
                for (int o = 0; o < 16; o++) v[o] = LD(d + (o0 + o) * d_so + t0);
                transpose16(v);
#pragma GCC unroll 16
                for (int t = 0; t < 16; t++) *(v16u *)(dt + (t0 + t) * opad + o0) = v[t];
            }
        for (long t = t0; t < t_len; t++) {
            float *row = dt + t * opad + o0;
            const float *src = d + o0 * d_so + t * d_st;
            for (long o = 0; o < oe; o++) row[o] = src[o * d_so];
        }
    }
}

/* For i in [0, b): G_i[o, n] = sum_t d[i*d_sb + o*d_so + t*d_st] x_i[t, n], with t = (h, w),
 * n = (c, u, v) and x_i[t, n] = a[i*sb + c*sc + (h*stride_h + u*dil_h)*sh
 * + (w*stride_w + v*dil_w)*sw] from the padded input a, for geom = {sb, sc, sh, sw, wo, kh, kw,
 * stride_h, stride_w, dil_h, dil_w, ho}; npad = n and opad = o_len rounded up to 16. The sums
 * are transposed, (npad, opad) row-major, only [:n, :o_len] meaningful.
 * split == 0: thread k writes the sum of its samples' G_i at s + k*npad*opad and ||G_i||^2 to
 *   norms[i];
 * split == 1: threads share the columns n (blocks of 16) of one sum at s and write the part of
 *   ||G_i||^2 from their columns to norms[k*b + i].
 * Where q is not NULL, the sums of elementwise squares go to q likewise. scratch holds
 * nt*t_len*opad floats. Returns the threads used (0: out of memory). */
int adaptive_psg_conv(const float *d, ptrdiff_t d_sb, ptrdiff_t d_so, ptrdiff_t d_st,
                      const float *a, const long *geom, long b, long o_len, long n, float *s,
                      float *q, int split, int nt, float *norms, float *scratch) {
    const long wo = geom[4], kh = geom[5], kw = geom[6];
    const long t_len = geom[11] * wo, ho = geom[11];
    const long opad = (o_len + 15) / 16 * 16, npad = (n + 15) / 16 * 16, units = npad / 16;
    const long step_h = geom[7] * geom[2], step_w = geom[8] * geom[3];
    if (!split && nt > b) nt = (int)b;
    if (nt < 1) nt = 1;
    long *off = malloc(npad * sizeof(long));
    if (off == NULL) return 0;
    {
        const long ch = n / (kh * kw);
        long k = 0;
        for (long c = 0; c < ch; c++)
            for (long u = 0; u < kh; u++)
                for (long v = 0; v < kw; v++)
                    off[k++] = c * geom[1] + u * geom[9] * geom[2] + v * geom[10] * geom[3];
    }
    int used = nt;
#pragma omp parallel num_threads(nt)
    {
#pragma omp single
        used = omp_get_num_threads();
        const part p = my_part(split, b, units, (ptrdiff_t)npad * opad, s, q, norms);
        const long i0 = p.i0, i1 = p.i1, u0 = p.u0, u1 = p.u1;
        float *sk = p.s, *qk = p.q, *nk = p.norms;
        const long n_lo = u0 * 16, n_hi = u1 * 16 < n ? u1 * 16 : n;
        float *dt = scratch + (ptrdiff_t)p.k * t_len * opad;
        memset(dt, 0, t_len * opad * sizeof(float)); /* pad channels stay zero */
        for (long i = i0; i < i1 && n_hi > n_lo; i++) {
            const float *di = d + i * d_sb;
            repack_channels_last(di, d_so, d_st, o_len, t_len, dt, opad);
            const float *ai = a + i * geom[0];
            v16 nacc = {0};
            long o0 = 0;
            for (; o0 + 32 <= opad; o0 += 32)
                for (long n0 = n_lo; n0 < n_hi; n0 += 8)
                    conv_block_2x8(dt + o0, opad, ho, wo, ai, step_h, step_w, off + n0,
                                   n_hi - n0 < 8 ? (int)(n_hi - n0) : 8, sk + n0 * opad + o0,
                                   qk ? qk + n0 * opad + o0 : NULL, &nacc, i == i0);
            if (o0 < opad)
                for (long n0 = n_lo; n0 < n_hi; n0 += 16)
                    conv_block_1x16(dt + o0, opad, ho, wo, ai, step_h, step_w, off + n0,
                                    n_hi - n0 < 16 ? (int)(n_hi - n0) : 16, sk + n0 * opad + o0,
                                    qk ? qk + n0 * opad + o0 : NULL, &nacc, i == i0);
            float total = 0.f;
            for (int r = 0; r < 16; r++) total += nacc[r];
            nk[i] = total;
        }
        if (split && n_hi <= n_lo)
            for (long i = 0; i < b; i++) nk[i] = 0.f;
    }
    free(off);
    return used;
}
