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
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Register blocking per target. setup.py builds this file once per instruction set (the macro
 * ADAPTIVE_TARGET_* with that set's -m flags); adaptive/stats/native.py loads the build the CPU
 * runs best. A vector vf holds VW floats, one machine register: 16 with AVX-512, 8 with AVX2, 4
 * with SSE2 or NEON. (A 64-byte vector type on AVX2 is lowered through the stack by GCC, and an
 * AVX-512 blocking spills there too: 3-10x slower than torch on AVX2.) The accumulators fill,
 * without overflowing, the register file (32 zmm; 16 ymm; 16 xmm; 32 NEON q):
 *   LIN_ROWS x LIN_NV  accumulators of the Linear block (rows of d x vectors of columns);
 *   CONV_OV x CONV_NR  accumulators of the convolution block (vectors of channels x columns);
 *   CONV_TAIL_NR       columns of the one-vector block for channels left after the main blocks.
 * Buffers are padded to 16 floats, a multiple of every VW. On AVX-512, 6 rows x 4 vectors beat
 * 8 x 2 by about 10% on a transformer's Linear shapes (Sapphire Rapids, 1 and 2 threads): 10
 * loads feed 24 multiply-adds instead of 16. */
#if defined(ADAPTIVE_TARGET_AVX512)
#define VW 16
#define LIN_ROWS 6
#define LIN_NV 4
#define CONV_OV 2
#define CONV_NR 8
#define CONV_TAIL_NR 16
#elif defined(ADAPTIVE_TARGET_AVX2)
#define VW 8
#define LIN_ROWS 6
#define LIN_NV 2
#define CONV_OV 2
#define CONV_NR 6
#define CONV_TAIL_NR 12
#elif defined(__aarch64__)
#define VW 4
#define LIN_ROWS 6
#define LIN_NV 4
#define CONV_OV 4
#define CONV_NR 6
#define CONV_TAIL_NR 24
#else /* SSE2, the x86-64 baseline, and any other target */
#define VW 4
#define LIN_ROWS 6
#define LIN_NV 2
#define CONV_OV 2
#define CONV_NR 6
#define CONV_TAIL_NR 12
#endif
#define ROWS LIN_ROWS

typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));
#define LD(p) (*(const vfu *)(p))
#define ST(p, v) (*(vfu *)(p) = (v))

static inline float hsum(vf v) {
    float total = 0.f;
    for (int r = 0; r < VW; r++) total += v[r];
    return total;
}

/* Which blocking this build has (native.py checks it against the build it asked for). */
int adaptive_psg_blocking(void) {
    return VW * 10000 + LIN_ROWS * 1000 + LIN_NV * 100 + CONV_OV * 10 + CONV_NR;
}

/* A sample with more positions than TILE is done a tile of positions at a time, the partial
 * G_i kept in a buffer: whole (all the thread's rows, where they take at most G_WHOLE floats)
 * with the tiles outermost, so that a tile's rows of x and d stay in cache while every block
 * uses them; else one row block's worth, the tiles inside the row blocks. (In one pass over all
 * positions per block, x and d stream from L2 or L3 once per block: at 1024 positions that
 * took 1.5-2x a matmul's time, against 1.0-1.2x at 64.) */
#define TILE 64
#define G_WHOLE (1L << 18)
#define TILE_FIRST 0
#define TILE_MID 1
#define TILE_LAST 2

/* The end of a block (see block_impl): the accumulators a go to g (a tile before the last),
 * or on to S, Q and *nacc. */
static inline __attribute__((always_inline)) void finish(vf a[ROWS][LIN_NV], int rows, int nv,
                                                         float *s, float *q, ptrdiff_t s_so,
                                                         vf *nacc, int first, float *g,
                                                         int phase) {
    if (g) { /* one tile of positions: the block's sums over the tiles so far wait in g */
#pragma GCC unroll 16
        for (int r = 0; r < rows; r++)
#pragma GCC unroll 8
            for (int v = 0; v < nv; v++) {
                float *gp = g + r * s_so + VW * v;
                if (phase == TILE_LAST)
                    a[r][v] += LD(gp);
                else
                    ST(gp, phase == TILE_FIRST ? a[r][v] : LD(gp) + a[r][v]);
            }
        if (phase != TILE_LAST) return;
    }
    /* four partial sums of squares, not one: one chain of dependent adds would stall */
    vf part[4] = {{0}, {0}, {0}, {0}};
#pragma GCC unroll 16
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 8
        for (int v = 0; v < nv; v++) {
            float *sp = s + r * s_so + VW * v;
            const vf sq = a[r][v] * a[r][v];
            ST(sp, first ? a[r][v] : LD(sp) + a[r][v]);
            part[(r * LIN_NV + v) & 3] += sq;
            if (q) {
                float *qp = q + r * s_so + VW * v;
                ST(qp, first ? sq : LD(qp) + sq);
            }
        }
    *nacc += (part[0] + part[1]) + (part[2] + part[3]);
}

/* One block of G_i: rows o0..o0+rows-1 (rows <= ROWS) of d, columns n0..n0+VW*nv-1
 * (1 <= nv <= LIN_NV) of the packed input xp (row stride np), over t_len positions. Adds the
 * block to S (or stores it, for the thread's first sample), its squares to *nacc and, where q
 * is given, its elementwise squares to Q (same layout as S). Where g is given (same layout
 * too), the positions are one tile, phase TILE_FIRST, TILE_MID or TILE_LAST: the block goes to
 * g, and only the last tile's, with g added, on to S, Q and *nacc. */
static inline __attribute__((always_inline)) void
block_impl(const float *d, ptrdiff_t d_st, ptrdiff_t d_so, const float *xp, ptrdiff_t np,
           long t_len, int rows, int nv, float *s, float *q, ptrdiff_t s_so, vf *nacc, int first,
           float *g, int phase) {
    vf a[ROWS][LIN_NV];
    memset(a, 0, sizeof(a));
    for (long t = 0; t < t_len; t++) {
        const float *xr = xp + t * np;
        vf x[LIN_NV];
#pragma GCC unroll 8
        for (int v = 0; v < nv; v++) x[v] = LD(xr + VW * v);
        const float *dr = d + t * d_st;
#pragma GCC unroll 16
        for (int r = 0; r < rows; r++) {
            const float dv = dr[r * d_so];
#pragma GCC unroll 8
            for (int v = 0; v < nv; v++) a[r][v] += dv * x[v];
        }
    }
    finish(a, rows, nv, s, q, s_so, nacc, first, g, phase);
}

/* block_impl with rows and nv as constants wherever nv == LIN_NV: each such block's loops are
 * unrolled and its accumulators stay in registers. With run-time bounds they go on the stack,
 * which cost 10-13% of the kernel's time at 64 positions (AVX2 build), and the rows left over
 * at the end of a layer (o_len not a multiple of ROWS) ran at a fraction of the speed. */
static inline __attribute__((always_inline)) void
block_fixed(const float *d, ptrdiff_t d_st, ptrdiff_t d_so, const float *xp, ptrdiff_t np,
            long t_len, int rows, int nv, float *s, float *q, ptrdiff_t s_so, vf *nacc,
            int first, float *g, int phase) {
    _Static_assert(ROWS == 6, "block_fixed has a case for each row count up to ROWS");
#define BLOCK_ROWS(R) \
    block_impl(d, d_st, d_so, xp, np, t_len, R, LIN_NV, s, q, s_so, nacc, first, g, phase)
    if (nv == LIN_NV) switch (rows) {
        case ROWS: BLOCK_ROWS(ROWS); return;
        case 1: BLOCK_ROWS(1); return;
        case 2: BLOCK_ROWS(2); return;
        case 3: BLOCK_ROWS(3); return;
        case 4: BLOCK_ROWS(4); return;
        case 5: BLOCK_ROWS(5); return;
        }
#undef BLOCK_ROWS
    block_impl(d, d_st, d_so, xp, np, t_len, rows, nv, s, q, s_so, nacc, first, g, phase);
}

/* The block over all of a sample's positions (g constant NULL: no tile code), and over one
 * tile of them. */
static inline void block(const float *d, ptrdiff_t d_st, ptrdiff_t d_so, const float *xp,
                         ptrdiff_t np, long t_len, int rows, int nv, float *s, float *q,
                         ptrdiff_t s_so, vf *nacc, int first) {
    block_fixed(d, d_st, d_so, xp, np, t_len, rows, nv, s, q, s_so, nacc, first, NULL, TILE_LAST);
}

static void block_tile(const float *d, ptrdiff_t d_st, ptrdiff_t d_so, const float *xp,
                       ptrdiff_t np, long t_len, int rows, int nv, float *s, float *q,
                       ptrdiff_t s_so, vf *nacc, int first, float *g, int phase) {
    block_fixed(d, d_st, d_so, xp, np, t_len, rows, nv, s, q, s_so, nacc, first, g, phase);
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

/* Sample i's bias gradient on rows [o0, o1), beta_i[o] = sum_t d_it[o], into bi[0..o1-o0);
 * adds it to bs (stored for the thread's first sample), its squares to bq (where given) and
 * returns ||beta_i||^2 over those rows. */
static float bias_rows(const float *di, ptrdiff_t d_st, ptrdiff_t d_so, long t_len, long o0,
                       long o1, float *bi, float *bs, float *bq, int first) {
    const long w = o1 - o0;
    memset(bi, 0, w * sizeof(float));
    for (long t = 0; t < t_len; t++) {
        const float *dr = di + t * d_st + o0 * d_so;
        if (d_so == 1)
            for (long o = 0; o < w; o++) bi[o] += dr[o];
        else
            for (long o = 0; o < w; o++) bi[o] += dr[o * d_so];
    }
    float total = 0.f;
    for (long o = 0; o < w; o++) {
        const float v = bi[o], sq = v * v;
        total += sq;
        bs[o0 + o] = first ? v : bs[o0 + o] + v;
        if (bq) bq[o0 + o] = first ? sq : bq[o0 + o] + sq;
    }
    return total;
}

/* Floats of a thread's buffer for the tiles of positions: none for one tile; else the
 * thread's sums whole, up to G_WHOLE floats, and at least one row block's. */
static long tile_buffer(long t_len, long o_len, long np) {
    if (t_len <= TILE) return 0;
    const long whole = o_len * np < G_WHOLE ? o_len * np : G_WHOLE;
    return whole > ROWS * np ? whole : ROWS * np;
}

/* Sample i's blocks on rows [o_lo, o_hi), a tile of positions at a time (see TILE): the tiles
 * outermost where those rows of G_i fit the buffer g (gl floats) whole, else inside each row
 * block. */
static void tiled(const float *di, ptrdiff_t d_st, ptrdiff_t d_so, const float *xp, long np,
                  long t_len, long o_lo, long o_hi, long o_len, float *sk, float *qk, vf *nacc,
                  int first, float *g, long gl) {
    const int whole = (o_hi - o_lo) * np <= gl;
    const long o_span = whole ? o_hi - o_lo : ROWS;
    for (long ob = o_lo; ob < o_hi; ob += o_span) {
        const long o_end = ob + o_span < o_hi ? ob + o_span : o_hi;
        for (long t0 = 0; t0 < t_len; t0 += TILE) {
            const long tl = t_len - t0 < TILE ? t_len - t0 : TILE;
            const int phase = t0 == 0 ? TILE_FIRST : t0 + tl < t_len ? TILE_MID : TILE_LAST;
            for (long o0 = ob; o0 < o_end; o0 += ROWS) {
                const int rows = o_len - o0 < ROWS ? (int)(o_len - o0) : ROWS;
                float *gb = g + (whole ? (o0 - o_lo) * np : 0);
                for (long c0 = 0; c0 < np; c0 += VW * LIN_NV) {
                    const int nv = np - c0 >= VW * LIN_NV ? LIN_NV : (int)((np - c0) / VW);
                    block_tile(di + t0 * d_st + o0 * d_so, d_st, d_so, xp + t0 * np + c0, np,
                               tl, rows, nv, sk + o0 * np + c0, qk ? qk + o0 * np + c0 : NULL,
                               np, nacc, first, gb + c0, phase);
                }
            }
        }
    }
}

/* Floats of the two buffers adaptive_psg_linear needs besides its outputs, written to sizes:
 * sizes[0] the thread copies of the sums (and the per-thread partial norms of split == 1),
 * sizes[1] the scratch (each thread's packed input rows and bias row). */
void adaptive_psg_linear_sizes(long b, long t_len, long o_len, long n, int coordinates, int bias,
                               int split, int nt, long *sizes) {
    const long np = (n + 15) / 16 * 16, op = (o_len + 15) / 16 * 16;
    const long copy = (o_len * np + (bias ? op : 0)) * (coordinates ? 2 : 1);
    sizes[0] = split ? (long)nt * b : (long)(nt - 1) * copy;
    sizes[1] = (long)nt * (t_len * np + op + tile_buffer(t_len, o_len, np));
}

/* Linear layers. For i in [0, b): G_i[o, k] = sum_t d[i*d_sb + t*d_st + o*d_so] x_i[t, k] with
 * x_i from pack (geom = {sb, st, sn}); np = n rounded up to 16. Writes
 *   s (o_len, np) row-major: sum_i G_i (pad columns zero); q (or NULL): sum_i G_i^2;
 *   bs (o_len, or NULL for no bias): sum_i beta_i, beta_i[o] = sum_t d_it[o] the per-sample bias
 *     gradient; bq (or NULL): sum_i beta_i^2;
 *   norms[i] = ||G_i||^2 (+ ||beta_i||^2 with a bias).
 * split == 0: threads split the samples; thread 0 accumulates in the outputs, thread k > 0 in
 *   its own copy in `copies`, added to the outputs by rows after a barrier;
 * split == 1: threads share the rows (blocks of ROWS) of the outputs and keep partial norms per
 *   thread in `copies`, summed after a barrier (a layer whose sums are too large to copy).
 * copies and scratch hold the floats adaptive_psg_linear_sizes gives. Returns the threads used. */
int adaptive_psg_linear(const float *d, ptrdiff_t d_sb, ptrdiff_t d_st, ptrdiff_t d_so,
                        const float *a, const long *geom, long b, long t_len, long o_len, long n,
                        float *s, float *q, float *bs, float *bq, int split, int nt, float *norms,
                        float *copies, float *scratch) {
    const long np = (n + 15) / 16 * 16, op = (o_len + 15) / 16 * 16;
    const long units = (o_len + ROWS - 1) / ROWS, sum_len = o_len * np;
    const long copy = (sum_len + (bs ? op : 0)) * (q ? 2 : 1);
    if (!split && nt > b) nt = (int)b;
    if (nt < 1) nt = 1;
    int used = nt;
#pragma omp parallel num_threads(nt)
    {
        const int k = omp_get_thread_num(), m = omp_get_num_threads();
#pragma omp single
        used = m;
        long i0 = 0, i1 = b, u0 = 0, u1 = units;
        float *sk = s, *qk = q, *bsk = bs, *bqk = bq, *nk = norms;
        if (split) {
            u0 = units * k / m, u1 = units * (k + 1) / m;
            nk = copies + (ptrdiff_t)k * b;
        } else {
            i0 = b * k / m, i1 = b * (k + 1) / m;
            if (k > 0) { /* copy layout: s, q, bs, bq */
                float *c = copies + (ptrdiff_t)(k - 1) * copy;
                sk = c, c += sum_len;
                if (q) qk = c, c += sum_len;
                if (bs) bsk = c, c += op;
                if (bq) bqk = c;
            }
        }
        const long o_lo = u0 * ROWS < o_len ? u0 * ROWS : o_len;
        const long o_hi = u1 * ROWS < o_len ? u1 * ROWS : o_len;
        const long gl = tile_buffer(t_len, o_len, np);
        float *xp = scratch + (ptrdiff_t)k * (t_len * np + op + gl), *bi = xp + t_len * np;
        float *g = gl ? bi + op : NULL;
        for (long i = i0; i < i1 && o_hi > o_lo; i++) {
            pack(a, geom, i, t_len, n, np, xp);
            const float *di = d + i * d_sb;
            vf nacc = {0};
            if (!g) /* one tile: each block over all positions */
                for (long o0 = o_lo; o0 < o_hi; o0 += ROWS) {
                    const int rows = o_len - o0 < ROWS ? (int)(o_len - o0) : ROWS;
                    for (long c0 = 0; c0 < np; c0 += VW * LIN_NV) {
                        const int nv = np - c0 >= VW * LIN_NV ? LIN_NV : (int)((np - c0) / VW);
                        block(di + o0 * d_so, d_st, d_so, xp + c0, np, t_len, rows, nv,
                              sk + o0 * np + c0, qk ? qk + o0 * np + c0 : NULL, np, &nacc,
                              i == i0);
                    }
                }
            else
                tiled(di, d_st, d_so, xp, np, t_len, o_lo, o_hi, o_len, sk, qk, &nacc, i == i0,
                      g, gl);
            float total = hsum(nacc);
            if (bs) total += bias_rows(di, d_st, d_so, t_len, o_lo, o_hi, bi, bsk, bqk, i == i0);
            nk[i] = total;
        }
        if (split && o_hi <= o_lo)
            for (long i = 0; i < b; i++) nk[i] = 0.f;
#pragma omp barrier
        if (split) { /* each thread sums the partial norms of its share of the samples */
            for (long i = b * k / m; i < b * (k + 1) / m; i++) {
                float total = 0.f;
                for (int j = 0; j < m; j++) total += copies[(ptrdiff_t)j * b + i];
                norms[i] = total;
            }
        } else if (m > 1) { /* each thread adds the copies' rows [r0, r1) to the outputs */
            const long r0 = o_len * k / m, r1 = o_len * (k + 1) / m;
            for (int j = 1; j < m; j++) {
                const float *c = copies + (ptrdiff_t)(j - 1) * copy;
                for (long e = r0 * np; e < r1 * np; e++) s[e] += c[e];
                c += sum_len;
                if (q) {
                    for (long e = r0 * np; e < r1 * np; e++) q[e] += c[e];
                    c += sum_len;
                }
                if (bs) {
                    for (long e = r0; e < r1; e++) bs[e] += c[e];
                    c += op;
                }
                if (bq)
                    for (long e = r0; e < r1; e++) bq[e] += c[e];
            }
        }
    }
    return used;
}

/* Convolutions, without an im2col copy. Vectors run along the output channels o, and every
 * input element x_i[t, n] (n = (c, u, v)) is broadcast from the input itself: a sample's input
 * is small enough to stay in cache, so only the output gradient is repacked, to dt (t, o) with
 * o contiguous (T·O values per sample against the T·C·kh·kw of an im2col copy). A block holds
 * OV vectors of VW channels by NR columns n in registers over all positions t. */
#define CONV_BLOCK(NAME, OV, NR)                                                                 \
    static void NAME(const float *dt, long opad, long ho, long wo, const float *ai, long step_h, \
                     long step_w, const long *off, int nr, float *s, float *q, vf *nacc,      \
                     int first) {                                                                \
        vf acc[OV][NR];                                                                          \
        memset(acc, 0, sizeof(acc));                                                             \
        long o[NR];                                                                              \
        for (int j = 0; j < NR; j++) o[j] = off[j < nr ? j : nr - 1];                            \
        const float *drow = dt;                                                                  \
        for (long h = 0; h < ho; h++) {                                                          \
            const float *bh = ai + h * step_h;                                                   \
            for (long w = 0; w < wo; w++, drow += opad) {                                        \
                const float *bt = bh + w * step_w;                                               \
                vf dv[OV];                                                                       \
                for (int v = 0; v < OV; v++) dv[v] = LD(drow + VW * v);                          \
                for (int j = 0; j < NR; j++) {                                                   \
                    const float xs = bt[o[j]];                                                   \
                    for (int v = 0; v < OV; v++) acc[v][j] += dv[v] * xs;                        \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        for (int j = 0; j < nr; j++)                                                             \
            for (int v = 0; v < OV; v++) {                                                       \
                float *sp = s + j * opad + VW * v;                                               \
                const vf sq = acc[v][j] * acc[v][j];                                             \
                ST(sp, first ? acc[v][j] : LD(sp) + acc[v][j]);                                  \
                *nacc += sq;                                                                     \
                if (q) {                                                                         \
                    float *qp = q + j * opad + VW * v;                                           \
                    ST(qp, first ? sq : LD(qp) + sq);                                            \
                }                                                                                \
            }                                                                                    \
    }
CONV_BLOCK(conv_block_main, CONV_OV, CONV_NR)
CONV_BLOCK(conv_block_tail, 1, CONV_TAIL_NR)

#if VW == 16
typedef float v16 __attribute__((vector_size(64)));
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
#endif

/* dt[t*opad + o] = d[o*d_so + t*d_st]: one sample's output gradient with the channels
 * contiguous. Positions contiguous (d_st == 1): 16×16 tiles transposed in registers; otherwise
 * 16 channels at a time with the positions inner, so 16 read streams and one written cache
 * line per position stay in L1 (a channel-outer loop thrashes it). */
static void repack_channels_last(const float *d, ptrdiff_t d_so, ptrdiff_t d_st, long o_len,
                                 long t_len, float *dt, long opad) {
    for (long o0 = 0; o0 < o_len; o0 += 16) {
        const long oe = o_len - o0 < 16 ? o_len - o0 : 16;
        long t0 = 0;
#if VW == 16
        if (d_st == 1 && oe == 16)
            for (; t0 + 16 <= t_len; t0 += 16) {
                v16 v[16];
#pragma GCC unroll 16
                for (int o = 0; o < 16; o++) v[o] = LD(d + (o0 + o) * d_so + t0);
                transpose16(v);
#pragma GCC unroll 16
                for (int t = 0; t < 16; t++) ST(dt + (t0 + t) * opad + o0, v[t]);
            }
#endif
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
            vf nacc = {0};
            long o0 = 0;
            for (; o0 + VW * CONV_OV <= opad; o0 += VW * CONV_OV)
                for (long n0 = n_lo; n0 < n_hi; n0 += CONV_NR)
                    conv_block_main(dt + o0, opad, ho, wo, ai, step_h, step_w, off + n0,
                                    n_hi - n0 < CONV_NR ? (int)(n_hi - n0) : CONV_NR,
                                    sk + n0 * opad + o0, qk ? qk + n0 * opad + o0 : NULL, &nacc,
                                    i == i0);
            for (; o0 < opad; o0 += VW)
                for (long n0 = n_lo; n0 < n_hi; n0 += CONV_TAIL_NR)
                    conv_block_tail(dt + o0, opad, ho, wo, ai, step_h, step_w, off + n0,
                                    n_hi - n0 < CONV_TAIL_NR ? (int)(n_hi - n0) : CONV_TAIL_NR,
                                    sk + n0 * opad + o0, qk ? qk + n0 * opad + o0 : NULL, &nacc,
                                    i == i0);
            nk[i] = hsum(nacc);
        }
        if (split && n_hi <= n_lo)
            for (long i = 0; i < b; i++) nk[i] = 0.f;
    }
    free(off);
    return used;
}

/* ---------------------------------------------------------------- layers with small parameters
 * Per-sample squared gradient norms of normalisation layers and embeddings, in one pass over
 * the operands (torch needs several passes and, for an embedding, a T x T Gram matrix).
 * Threads split the samples. */

/* sum_k x[k] and sum_k (x[k] - m)^2, in vector-wide partial sums (a scalar loop would not
 * vectorise: the compiler keeps the order of float additions) */
static inline float row_sum(const float *x, long c) {
    vf acc = {0};
    long k = 0;
    for (; k + VW <= c; k += VW) acc += LD(x + k);
    float total = hsum(acc);
    for (; k < c; k++) total += x[k];
    return total;
}

static inline float row_ssd(const float *x, float m, long c) {
    vf acc = {0};
    long k = 0;
    for (; k + VW <= c; k += VW) {
        const vf z = LD(x + k) - m;
        acc += z * z;
    }
    float total = hsum(acc);
    for (; k < c; k++) total += (x[k] - m) * (x[k] - m);
    return total;
}

/* LayerNorm (rms == 0) or RMSNorm (rms == 1) over the last c values of each row: a and d are
 * contiguous (b, t_len, c), x^ = (x - mean) / sqrt(var + eps) (rms: x / sqrt(mean(x^2) + eps)).
 * Sample i's weight gradient is w_i = sum_t d_it * x^_it (elementwise), its bias gradient
 * beta_i = sum_t d_it; norms[i] = ||w_i||^2 (with weight) + ||beta_i||^2 (with bias).
 * scratch: nt * 2 * c floats. */
void adaptive_psg_rownorm(const float *a, const float *d, long b, long t_len, long c, float eps,
                          int rms, int weight, int bias, int nt, float *norms, float *scratch) {
    if (nt > b) nt = (int)b;
    if (nt < 1) nt = 1;
#pragma omp parallel num_threads(nt)
    {
        float *w = scratch + (ptrdiff_t)omp_get_thread_num() * 2 * c, *be = w + c;
#pragma omp for schedule(static)
        for (long i = 0; i < b; i++) {
            memset(w, 0, 2 * c * sizeof(float));
            for (long t = 0; t < t_len; t++) {
                const float *x = a + (i * t_len + t) * c, *g = d + (i * t_len + t) * c;
                if (weight) {
                    const float m = rms ? 0.f : row_sum(x, c) / c;
                    const float r = 1.f / sqrtf(row_ssd(x, m, c) / c + eps);
                    for (long k = 0; k < c; k++) w[k] += g[k] * ((x[k] - m) * r);
                }
                if (bias)
                    for (long k = 0; k < c; k++) be[k] += g[k];
            }
            norms[i] = (weight ? row_ssd(w, 0.f, c) : 0.f) + (bias ? row_ssd(be, 0.f, c) : 0.f);
        }
    }
}

typedef struct { /* int64_t: torch's ids, whatever the platform's long */
    int64_t id, t;
} token;

static int by_id(const void *x, const void *y) {
    const token *p = x, *q = y;
    if (p->id != q->id) return p->id < q->id ? -1 : 1;
    return (p->t > q->t) - (p->t < q->t);
}

/* Embedding: sample i's gradient at row v is sum_{t: ids_it = v} d_it, so
 * norms[i] = sum_v ||sum_{t: ids_it = v} d_it||^2: the positions are sorted by id and each
 * run of equal ids summed (tokens equal to padding >= 0 get no gradient). ids (b, t_len) and
 * d (b, t_len, c) contiguous. tokens: nt * t_len pairs; scratch: nt * c floats. */
void adaptive_psg_embedding(const int64_t *ids, const float *d, long b, long t_len, long c,
                            long padding, int nt, float *norms, token *tokens, float *scratch) {
    if (nt > b) nt = (int)b;
    if (nt < 1) nt = 1;
#pragma omp parallel num_threads(nt)
    {
        const int k = omp_get_thread_num();
        token *tok = tokens + (ptrdiff_t)k * t_len;
        float *acc = scratch + (ptrdiff_t)k * c;
#pragma omp for schedule(static)
        for (long i = 0; i < b; i++) {
            for (long t = 0; t < t_len; t++) tok[t] = (token){ids[i * t_len + t], t};
            qsort(tok, t_len, sizeof(token), by_id);
            float total = 0.f;
            for (long s = 0; s < t_len;) {
                long e = s + 1;
                while (e < t_len && tok[e].id == tok[s].id) e++;
                if (tok[s].id != padding) {
                    memcpy(acc, d + (i * t_len + tok[s].t) * c, c * sizeof(float));
                    for (long u = s + 1; u < e; u++) {
                        const float *g = d + (i * t_len + tok[u].t) * c;
                        for (long j = 0; j < c; j++) acc[j] += g[j];
                    }
                    total += row_ssd(acc, 0.f, c);
                }
                s = e;
            }
            norms[i] = total;
        }
    }
}
