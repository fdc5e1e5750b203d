/* The barrier of the fused decode steps (one OpenMP parallel region per step, a barrier between
 * its phases): spin_barrier over three words of the caller's workspace (count on a cache line of
 * its own, then generation and sleepers a line further).  Model-free: the model families' steps
 * include it.  Without OpenMP (or without GCC/clang atomics) MW_SPIN_BARRIER is 0 and the steps use
 * OpenMP's barrier or none. */
#ifndef MEMWISE_KERNELS_BARRIER_H
#define MEMWISE_KERNELS_BARRIER_H

#include "common.h"

/* A decode step of mmfree-2.7b passes about 320 of them, so it must be cheaper
 * than OpenMP's (several times, measured): a waiting thread spins for up to SPIN_NS, which covers
 * the imbalance of phases on an idle machine.  Past that, the thread it waits for has most likely
 * been descheduled by another process, so it sleeps on a futex: spinning or sched_yield would
 * spend the CPU share of its own core, which another process may be using, and a thread that slept
 * is woken ahead of a busy loop, where one that yielded waits out the busy loop's time slice. */
#if defined(_OPENMP) && (defined(__GNUC__) || defined(__clang__))
#define MW_SPIN_BARRIER 1
#define SPIN_NS 50000

#if defined(__linux__)
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#define MW_FUTEX 1
#else
#define MW_FUTEX 0
#endif

static inline void cpu_relax(void) {
#if MW_X86
    _mm_pause();
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Sleeps while *gen == g.  `sleepers` tells the last thread to arrive whether a wake-up call is
 * needed: a waiter counts itself before it looks at gen, the releaser stores gen before it looks
 * at the count (both sequentially consistent), so one of them always sees the other. */
static void sleep_while(int *gen, int *sleepers, int g) {
    while (__atomic_load_n(gen, __ATOMIC_ACQUIRE) == g) {
#if MW_FUTEX
        __atomic_add_fetch(sleepers, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(gen, __ATOMIC_SEQ_CST) == g)
            syscall(SYS_futex, gen, FUTEX_WAIT_PRIVATE, g, NULL, NULL, 0);
        __atomic_sub_fetch(sleepers, 1, __ATOMIC_SEQ_CST);
#else
        (void)sleepers;
        sched_yield();
#endif
    }
}

/* count, gen and sleepers: the workspace's barrier words (count on a line of its own). */
static void spin_barrier(int *count, int *gen, int *sleepers, int nt, int *my_gen) {
    const int g = *my_gen;
    *my_gen = g + 1;
    if (__atomic_add_fetch(count, 1, __ATOMIC_ACQ_REL) == nt) {
        __atomic_store_n(count, 0, __ATOMIC_RELAXED); /* ordered before the release below */
        __atomic_store_n(gen, g + 1, __ATOMIC_SEQ_CST);
#if MW_FUTEX
        if (__atomic_load_n(sleepers, __ATOMIC_SEQ_CST))
            syscall(SYS_futex, gen, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#endif
        return;
    }
    const int64_t give_up = now_ns() + SPIN_NS;
    for (unsigned spins = 1; __atomic_load_n(gen, __ATOMIC_ACQUIRE) == g; ++spins) {
        cpu_relax();
        if (spins % 64 == 0 && now_ns() > give_up) {
            sleep_while(gen, sleepers, g);
            return;
        }
    }
}
#endif

#ifndef MW_SPIN_BARRIER
#define MW_SPIN_BARRIER 0
#endif

#endif /* MEMWISE_KERNELS_BARRIER_H */
