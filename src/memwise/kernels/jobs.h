/* Running one product: the path's function, the split of weight tiles over threads, and the
 * aligned buffers that activations, tiles and workspaces live in.
 *
 * Part of memwise.kernels._ternary: ternary.c includes every part once, in one translation unit,
 * so that the per-instruction-set copies of a function inline what they call from other parts. */

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
 * as memwise.ternary.codes_buffer allocates the codes, so that a bandwidth measured in it compares
 * with the kernels' (with 4 KB pages the GEMV measured up to 23% above the read bandwidth). */
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
