/* What the fused decode steps of the model families (hgrn_bit, bitnet, decoder) share around their
 * own work: a workspace's buffers carved from one allocation, the team of threads that runs a step
 * (one OpenMP parallel region per step, a barrier between its phases), and the rotary table of a
 * position.  Model-free: each family's step header includes it. */
#ifndef MEMWISE_KERNELS_STEP_WORKSPACE_H
#define MEMWISE_KERNELS_STEP_WORKSPACE_H

#include "barrier.h"
#include "jobs.h"

/* The buffers of a workspace in one allocation, every piece 64-byte aligned and zeroed: the
 * workspace lists each piece's bytes (pieces_add), allocates once (pieces_alloc), then takes the
 * pieces in the order it listed them (pieces_take).  A piece of 0 bytes shares its address with
 * the next. */
#define STEP_MAX_PIECES 48
typedef struct {
    size_t size[STEP_MAX_PIECES];
    int n, taken;
    char *next;
} step_pieces_t;

static inline void pieces_add(step_pieces_t *p, size_t bytes) {
    if (p->n < STEP_MAX_PIECES) p->size[p->n] = (bytes + 63) & ~(size_t)63;
    ++p->n; /* past STEP_MAX_PIECES, pieces_alloc fails */
}

/* The zeroed memory of every piece listed, or NULL. */
static void *pieces_alloc(step_pieces_t *p) {
    if (p->n > STEP_MAX_PIECES) return NULL;
    size_t total = 0;
    for (int k = 0; k < p->n; ++k) total += p->size[k];
    void *mem = alloc64(total);
    if (mem) memset(mem, 0, total);
    p->next = mem;
    p->taken = 0;
    return mem;
}

static inline void *pieces_take(step_pieces_t *p) {
    void *piece = p->next;
    p->next += p->size[p->taken++];
    return piece;
}

/* A workspace's barrier words (spin_barrier's count on a cache line of its own, then its
 * generation and sleepers a line further): the bytes of their piece. */
#define STEP_BARRIER_BYTES 128

/* The end of a phase: every thread of the step waits for every other. */
static inline void step_barrier(int *barrier, int nt, int *my_gen) {
#if MW_SPIN_BARRIER
    spin_barrier(barrier, barrier + 16, barrier + 17, nt, my_gen);
#elif defined(_OPENMP)
#pragma omp barrier
#endif
    (void)barrier, (void)nt, (void)my_gen;
}

/* First thing in a step's parallel region: this thread's id of nt, and the barrier's generation,
 * which every thread reads before its first arrival so that all start equal. */
static inline void step_join(const int *barrier, int *id, int *nt, int *my_gen) {
#ifdef _OPENMP
    *id = omp_get_thread_num();
    *nt = omp_get_num_threads();
#else
    *id = 0, *nt = 1;
#endif
#if MW_SPIN_BARRIER
    *my_gen = __atomic_load_n(barrier + 16, __ATOMIC_ACQUIRE);
#else
    *my_gen = 0;
    (void)barrier;
#endif
}

/* cos and sin of position pos for n rotary frequencies, as rotary_angles computes them: the
 * float32 angle pos * inv_freq[i]. */
static void rotary_table(int64_t pos, const float *inv_freq, int64_t n, float *cs, float *sn) {
    for (int64_t i = 0; i < n; ++i) {
        const float angle = (float)pos * inv_freq[i];
        cs[i] = (float)cos((double)angle);
        sn[i] = (float)sin((double)angle);
    }
}

#endif /* MEMWISE_KERNELS_STEP_WORKSPACE_H */
