/* Running one product: the path's function, the split of weight tiles over threads, and the
 * aligned buffers that activations, tiles and workspaces live in. */
#ifndef MEMWISE_KERNELS_JOBS_H
#define MEMWISE_KERNELS_JOBS_H

#include "products.h"
#include "amx.h"

typedef void (*run_fn)(const job_t *, int64_t, int64_t, int);

static run_fn runner(int isa) {
#if MW_X86
    switch (isa) {
    case ISA_AMX: return run_amx;
    case ISA_AVX512VNNI: return run_avx512vnni;
    case ISA_AVXVNNI: return run_avxvnni;
    case ISA_AVX2: return run_avx2;
    default: break;
    }
#endif
    (void)isa;
    return run_scalar;
}

/* Splits the weight tiles (TILE_N rows; 16 for AMX) evenly over the threads: each thread streams
 * one contiguous stretch of the packed matrix, which is what the hardware prefetchers handle
 * best. */
static int64_t tile_rows(int isa) { return isa == ISA_AMX ? 16 : TILE_N; }

static int job_threads(int isa, int64_t N, int nthreads) {
    int64_t tiles = (N + tile_rows(isa) - 1) / tile_rows(isa);
    if (nthreads < 1) nthreads = 1;
    if (nthreads > tiles) nthreads = (int)(tiles > 0 ? tiles : 1);
    return nthreads;
}

static void run_job(int isa, const job_t *j, int nthreads) {
    run_fn fn = runner(isa);
    int64_t tiles = (j->N + tile_rows(isa) - 1) / tile_rows(isa);
    nthreads = job_threads(isa, j->N, nthreads);
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
    {
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        int64_t t0 = tiles * id / nt, t1 = tiles * (id + 1) / nt;
        fn(j, t0, t1, id);
    }
#else
    fn(j, 0, tiles, 0);
#endif
}

static void *alloc64(size_t n) {
    size_t rounded = (n + 63) & ~(size_t)63;
    void *p = NULL;
    if (posix_memalign(&p, 64, rounded ? rounded : 64) != 0) return NULL;
    return p;
}

/* A buffer streamed like a model's packed codes: on Linux aligned to and advised for 2 MB pages,
 * as memwise.kernels.packed.codes_buffer allocates the codes, so that a bandwidth measured in it compares
 * with the kernels' (against small pages, the GEMV can seem to beat the read bandwidth). */
static void *alloc_streamed(size_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const size_t huge = (size_t)2 << 20, rounded = (n + huge - 1) & ~(huge - 1);
    void *p = NULL;
    if (posix_memalign(&p, huge, rounded ? rounded : huge) != 0) return NULL;
    (void)madvise(p, rounded, MADV_HUGEPAGE); /* refused where THP is off: small pages then */
    return p;
#else
    return alloc64(n);
#endif
}

/* Elements [k0, k1) of a row of n, thread id's share when nt threads split one row (multiples of
 * 16, so vector loops stay whole). */
static inline void my_span(int64_t n, int id, int nt, int64_t *k0, int64_t *k1) {
    const int64_t units = (n + 15) / 16;
    *k0 = units * id / nt * 16;
    *k1 = units * (id + 1) / nt * 16;
    if (*k0 > n) *k0 = n;
    if (*k1 > n) *k1 = n;
}

/* Buffers of one product call.  `layout` is the ISA whose activation layout the rows are
 * written in; AMX rows are written in the AVX-512 layout and then rearranged into B tiles. */
typedef struct {
    int isa, layout;
    size_t qs;
    int8_t *qbuf;
    int32_t *sumq;
    float *rs;
    int8_t *act_tiles;
    uint8_t *unpacked;
} product_call_t;

static void product_call_free(product_call_t *p) {
    free(p->qbuf);
    free(p->sumq);
    free(p->rs);
    free(p->act_tiles);
    free(p->unpacked);
}

static int product_call_make(product_call_t *p, int isa, long long N, long long nb, long long M, int nthreads) {
    memset(p, 0, sizeof *p);
    p->isa = (isa == ISA_AMX && M < AMX_MIN_ROWS) ? ISA_AVX512VNNI : isa;
    p->layout = p->isa == ISA_AMX ? ISA_AVX512VNNI : p->isa;
    p->qs = qrow_bytes(p->layout, nb);
    p->qbuf = alloc64(p->qs * (size_t)M);
    p->sumq = alloc64(sizeof(int32_t) * (size_t)M);
    p->rs = alloc64(sizeof(float) * (size_t)M);
    int ok = p->qbuf && p->sumq && p->rs;
    if (ok && uses_panels(p->isa, M)) {
        p->act_tiles = alloc64(act_tiles_bytes(M, nb));
        p->unpacked = alloc64((size_t)job_threads(p->isa, N, nthreads) * unpacked_bytes(nb));
        ok = p->act_tiles && p->unpacked;
    }
    if (!ok) product_call_free(p);
    return ok;
}

static void product_call_run(product_call_t *p, const uint8_t *w, long long N, long long nb, long long M,
                     int32_t *out_i32, float *out_f32, int nthreads) {
#if MW_X86
    if (uses_panels(p->isa, M)) pack_act_tiles(p->qbuf, p->qs, M, nb, p->act_tiles);
#endif
    job_t j = {w, N, nb, p->qbuf, p->qs, M, p->sumq, out_i32, out_f32, p->rs,
               p->act_tiles, (M + 15) / 16, p->unpacked, PF_FAR_BYTES, N};
    run_job(p->isa, &j, nthreads);
}

#endif /* MEMWISE_KERNELS_JOBS_H */
