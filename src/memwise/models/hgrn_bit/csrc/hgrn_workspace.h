/* The buffers of fused HGRN-Bit steps of B rows (hgrn_ws_t), and how a step hands its rows to the
 * products of the kernel library (activation slots, jobs, work stealing). */
#ifndef MEMWISE_HGRN_WORKSPACE_H
#define MEMWISE_HGRN_WORKSPACE_H

#include "step_workspace.h"

/* Activation slots of a step: three with K = H (i, f, g; gate_proj and lm_head reuse the first),
 * one with K = D (o_proj), one with K = I (down_proj).  A slot always holds rows of one K, so the
 * padding of its rows stays zero from allocation on. */
enum { SLOT_I = 0, SLOT_F = 1, SLOT_G = 2, SLOT_O = 3, SLOT_DOWN = 4, N_SLOTS = 5 };

typedef struct {
    int isa, layout, level, nthreads;
    int64_t B, H, D, I, mtiles;
    int64_t nb[N_SLOTS];
    size_t qs[N_SLOTS];
    int8_t *q[N_SLOTS];
    int32_t *sumq[N_SLOTS];
    float *rs[N_SLOTS];
    int8_t *act_tiles[N_SLOTS];
    uint8_t *unpacked;
    float *h, *fi, *ff, *fg, *o, *y, *u, *e1, *e2;
    float *hs;  /* per thread, H floats: normalized rows when threads share a row's work */
    /* When threads share rows: per thread, [N_SLOTS][B] sums of the q it quantized (sum_part)
     * and the whole rows' sums it gathered for its products (sum_mine), sum_stride apart. */
    int32_t *sum_part, *sum_mine;
    int64_t sum_stride;
    int *barrier; /* spin_barrier's count; its generation and sleepers a line further */
    int64_t *claims; /* run_jobs: per set (2) and thread, the next chunk of its tiles to claim,
                        each counter on a line of its own */
    int64_t ew; /* floats per row of e1 / e2 */
    void *mem;
} hgrn_ws_t;

static void hgrn_ws_free(hgrn_ws_t *w) {
    if (w) free(w->mem);
    free(w);
}

static hgrn_ws_t *hgrn_ws_make(int isa, int64_t B, int64_t H, int64_t D, int64_t I, int nthreads) {
    hgrn_ws_t *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    w->isa = (isa == ISA_AMX && B < AMX_MIN_ROWS) ? ISA_AVX512VNNI : isa;
    /* AMX products take K in the AVX-512 path's order (see run_amx). */
    w->layout = w->isa == ISA_AMX ? ISA_AVX512VNNI : w->isa;
    w->level = vec_level_of(isa);
    w->nthreads = nthreads < 1 ? 1 : nthreads;
    w->B = B, w->H = H, w->D = D, w->I = I;
    w->mtiles = (B + 15) / 16;
    const int64_t ks[N_SLOTS] = {H, H, H, D, I};
    int64_t nb_max = 0;
    for (int s = 0; s < N_SLOTS; ++s) {
        w->nb[s] = (ks[s] + BLOCK - 1) / BLOCK;
        w->qs[s] = qrow_bytes(w->layout, w->nb[s]);
        if (w->nb[s] > nb_max) nb_max = w->nb[s];
    }
    w->ew = D > I ? D : I;
    step_pieces_t pieces = {0};
    for (int s = 0; s < N_SLOTS; ++s) {
        pieces_add(&pieces, w->qs[s] * (size_t)B);
        pieces_add(&pieces, sizeof(int32_t) * (size_t)B);
        pieces_add(&pieces, sizeof(float) * (size_t)B);
        pieces_add(&pieces, uses_panels(w->isa, B) ? act_tiles_bytes(B, w->nb[s]) : 0);
    }
    pieces_add(&pieces, uses_panels(w->isa, B) ? (size_t)w->nthreads * unpacked_bytes(nb_max) : 0);
    const int64_t widths[] = {H, D, D, D, D, 2 * I, I, w->ew, w->ew};
    for (int k = 0; k < 9; ++k) pieces_add(&pieces, sizeof(float) * (size_t)(B * widths[k]));
    pieces_add(&pieces, sizeof(float) * (size_t)(w->nthreads * H));
    w->sum_stride = (N_SLOTS * B + 15) / 16 * 16; /* a thread's sums on lines of their own */
    pieces_add(&pieces, sizeof(int32_t) * (size_t)(w->nthreads * w->sum_stride));
    pieces_add(&pieces, sizeof(int32_t) * (size_t)(w->nthreads * w->sum_stride));
    pieces_add(&pieces, STEP_BARRIER_BYTES);
    pieces_add(&pieces, (size_t)(2 * w->nthreads) * 64);
    w->mem = pieces_alloc(&pieces);
    if (!w->mem) {
        free(w);
        return NULL;
    }
    for (int s = 0; s < N_SLOTS; ++s) {
        w->q[s] = pieces_take(&pieces);
        w->sumq[s] = pieces_take(&pieces);
        w->rs[s] = pieces_take(&pieces);
        w->act_tiles[s] = pieces_take(&pieces);
    }
    w->unpacked = pieces_take(&pieces);
    w->h = pieces_take(&pieces);
    w->fi = pieces_take(&pieces);
    w->ff = pieces_take(&pieces);
    w->fg = pieces_take(&pieces);
    w->o = pieces_take(&pieces);
    w->y = pieces_take(&pieces);
    w->u = pieces_take(&pieces);
    w->e1 = pieces_take(&pieces);
    w->e2 = pieces_take(&pieces);
    w->hs = pieces_take(&pieces);
    w->sum_part = pieces_take(&pieces);
    w->sum_mine = pieces_take(&pieces);
    w->barrier = pieces_take(&pieces);
    w->claims = pieces_take(&pieces);
    return w;
}

/* Asks for the floats [p, p + n) in L2, a request per line.  Between two products the step's
 * float work reads gains and states that the streaming weights have pushed out of every cache;
 * each thread asks for the next phase's vectors as soon as its share of a product is done, so
 * they arrive while it waits for the other threads. */
static inline void prefetch_floats(const float *p, int64_t n) {
#if MW_X86
    const char *c = (const char *)p;
    for (int64_t o = 0; o < n * (int64_t)sizeof(float); o += 64) _mm_prefetch(c + o, _MM_HINT_T1);
#else
    (void)p, (void)n;
#endif
}

/* Rows of the batch handled by thread id of nt. */
static inline void my_rows(int64_t B, int id, int nt, int64_t *b0, int64_t *b1) {
    *b0 = B * id / nt;
    *b1 = B * (id + 1) / nt;
}

/* Quantizes one row x (r given) into slot s at row b, with rescale m. */
static inline void put_row(const hgrn_ws_t *w, int s, int64_t b, const float *x, float r,
                           const float *gain, int64_t K, float m) {
    float sc;
    int8_t *dst = w->q[s] + (size_t)b * w->qs[s];
    w->sumq[s][b] = quantize_row_lv(w->level, x, r, gain, K, w->layout, 0, dst, &sc);
    w->rs[s][b] = m / sc;
}

/* Threads sharing rows: thread id quantizes its part [k0, k1) of row b (r given) into slot s.
 * Each thread computes the whole row's amax itself, so the only wait is the barrier before the
 * product, after which gather_sums adds up the parts' sums. */
static inline void put_row_part(const hgrn_ws_t *w, int s, int64_t b, const float *x, float r,
                                const float *gain, int64_t K, float m, int id, int nt) {
    int64_t k0, k1;
    my_span(K, id, nt, &k0, &k1);
    const float amax = row_amax_lv(w->level, x, r, gain, K);
    float sc;
    int8_t *dst = w->q[s] + (size_t)b * w->qs[s];
    w->sum_part[id * w->sum_stride + s * w->B + b] =
        k0 < k1 ? quantize_span_lv(w->level, x, r, gain, amax, w->layout, 0, dst, &sc, k0, k1) : 0;
    /* Every thread computes the same s; one stores the rescale. */
    if (id == 0) {
        if (k0 >= k1) quantize_span_lv(w->level, x, r, gain, amax, w->layout, 0, dst, &sc, 0, 0);
        w->rs[s][b] = m / sc;
    }
}

/* The sums of slot s's rows for thread id's products: its own copy, so no thread writes what
 * another reads. */
static const int32_t *gather_sums(const hgrn_ws_t *w, int s, int id, int nt) {
    int32_t *mine = w->sum_mine + id * w->sum_stride + s * w->B;
    for (int64_t b = 0; b < w->B; ++b) {
        int32_t total = 0;
        for (int t = 0; t < nt; ++t) total += w->sum_part[t * w->sum_stride + s * w->B + b];
        mine[b] = total;
    }
    return mine;
}

/* AMX and AVX-512 panels: the quantized rows of slot s into tiles (pack_act_tile).  Threads split the tiles
 * by unit of K: a 64-byte line of a tile holds bytes of 16 rows, so splitting by row would have
 * threads write into the same lines. */
static void pack_act_tiles_share(const hgrn_ws_t *w, int s, int id, int nt) {
#if MW_X86
    const int64_t units = 4 * ((w->nb[s] + 1) / 2);
    const int64_t u0 = units * id / nt, u1 = units * (id + 1) / nt;
    for (int64_t m0 = 0; m0 < w->B; m0 += 16)
        pack_act_tile(w->q[s], w->qs[s], m0, m0 + 16 < w->B ? m0 + 16 : w->B, u0, u1, units, w->act_tiles[s]);
#else
    (void)w, (void)s, (void)id, (void)nt;
#endif
}

static inline job_t slot_job(const hgrn_ws_t *w, int s, const int32_t *sumq, const uint8_t *codes,
                             int64_t N, float *out, size_t pf_far) {
    job_t j = {codes, N, w->nb[s], w->q[s], w->qs[s], w->B, sumq, NULL, out, w->rs[s],
               w->act_tiles[s], w->mtiles, w->unpacked, pf_far, N};
    return j;
}

/* Work stealing at the end of a product: each thread claims its stretch of tiles in chunks of
 * about STEAL_BYTES of codes, then claims the chunks left in the other threads' stretches.  A
 * thread that runs slower (sharing its core with another process, taking the VM's interrupts)
 * no longer holds every other thread at the barrier for the rest of its stretch.  Chunks are
 * large enough that a claim (an atomic add on the owner's line) costs nothing next to the codes
 * it covers, and small enough that the threads finish within a chunk of one another.
 * STEAL_BYTES 0 restores the static split. */
#ifndef STEAL_BYTES
#define STEAL_BYTES 32768
#endif

/* A thread's stretch: up to three (job, tile range) pieces. */
typedef struct {
    int np;
    int k[3];
    int64_t t0[3], t1[3], len;
} stretch_t;

/* Thread id's stretch of the output tiles of up to three products that run together: an even
 * share of all their tiles, or with `each`, the rows my_span gives it of every product, so that
 * elementwise work split by my_span afterwards finds its inputs in the thread's own cache. */
static stretch_t my_stretch(const job_t *jobs, int njobs, int each, int64_t tr, int id, int nt) {
    stretch_t st = {0, {0}, {0}, {0}, 0};
    int64_t total = 0;
    for (int k = 0; k < njobs; ++k) total += (jobs[k].N + tr - 1) / tr;
    const int64_t a = total * id / nt, b = total * (id + 1) / nt;
    int64_t off = 0;
    for (int k = 0; k < njobs; ++k) {
        const int64_t tiles = (jobs[k].N + tr - 1) / tr;
        int64_t lo, hi;
        if (each) { /* my_span's rows are multiples of 16, so whole tiles */
            my_span(jobs[k].N, id, nt, &lo, &hi);
            lo /= tr, hi = (hi + tr - 1) / tr;
        } else {
            lo = a > off ? a - off : 0, hi = (b < off + tiles ? b : off + tiles) - off;
        }
        off += tiles;
        if (lo >= hi) continue;
        st.k[st.np] = k, st.t0[st.np] = lo, st.t1[st.np] = hi, ++st.np;
        st.len += hi - lo;
    }
    return st;
}

/* Tiles [s, e) of a stretch (counted from its start), piece by piece; each call may prefetch up
 * to the end of its piece, so a chunk's prefetches run on into the next one. */
static void run_stretch_part(run_fn fn, const job_t *jobs, const stretch_t *st, int64_t s, int64_t e, int id) {
    int64_t off = 0;
    for (int p = 0; p < st->np; ++p) {
        const int64_t len = st->t1[p] - st->t0[p];
        const int64_t lo = s > off ? s - off : 0, hi = (e < off + len ? e : off + len) - off;
        if (lo < hi) {
            job_t j = jobs[st->k[p]];
            j.pf_end = st->t1[p];
            fn(&j, st->t0[p] + lo, st->t0[p] + hi, id);
        }
        off += len;
    }
}

static inline int64_t *claim_of(const hgrn_ws_t *w, int set, int id) {
    return w->claims + (size_t)(set * w->nthreads + id) * 8;
}

/* Zeroes thread id's claim counters of both sets: at the start of a step, before its first
 * barrier, when no thread is in a product. */
static inline void claims_reset(const hgrn_ws_t *w, int id) {
    *claim_of(w, 0, id) = 0;
    *claim_of(w, 1, id) = 0;
}

/* Thread id's share of up to three products that run together (my_stretch), then whatever the
 * other threads have not claimed yet.  Consecutive products use the two sets of counters in
 * turn (set: the parity of the product in the step): each thread zeroes its counter of the other
 * set when it is done, and a barrier always separates two products. */
static void run_jobs(const hgrn_ws_t *w, const job_t *jobs, int njobs, int each, int id, int nt, int set) {
    const int64_t tr = tile_rows(w->isa);
    run_fn fn = runner(w->isa);
    if (!MW_SPIN_BARRIER || STEAL_BYTES == 0 || nt == 1) { /* MW_SPIN_BARRIER: GCC's atomics */
        const stretch_t st = my_stretch(jobs, njobs, each, tr, id, nt);
        run_stretch_part(fn, jobs, &st, 0, st.len, id);
        return;
    }
#if MW_SPIN_BARRIER
    const int64_t tile_bytes = (int64_t)jobs[0].nb * BLOCK_BYTES * tr;
    const int64_t chunk = STEAL_BYTES / tile_bytes > 0 ? STEAL_BYTES / tile_bytes : 1;
    for (int v = 0; v < nt; ++v) {
        const int owner = (id + v) % nt;
        const stretch_t st = my_stretch(jobs, njobs, each, tr, owner, nt);
        int64_t *claim = claim_of(w, set, owner);
        for (;;) {
            const int64_t s = __atomic_fetch_add(claim, chunk, __ATOMIC_RELAXED);
            if (s >= st.len) break;
            run_stretch_part(fn, jobs, &st, s, s + chunk < st.len ? s + chunk : st.len, id);
        }
    }
    __atomic_store_n(claim_of(w, set ^ 1, id), 0, __ATOMIC_RELAXED);
#endif
}

#endif /* MEMWISE_HGRN_WORKSPACE_H */
