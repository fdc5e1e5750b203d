/* How many VPDPBUSD (512-bit) a core retires per second: the ceiling of a batched ternary product.
 *
 * A decode step at batch B multiplies every weight by B activations; one zmm VPDPBUSD does 64 of
 * those multiply-adds, so a step needs at least weights * B / 64 of them, however the codes are
 * unpacked.  This program runs register-only VPDPBUSDs on 16 independent accumulators (no loads,
 * no dependency chains shorter than the pipeline), so its rate is the instruction's throughput on
 * this core and nothing else.  Each thread runs the loop; the total is the machine's rate.
 *
 * Build and run (x86-64 with AVX-512 VNNI):
 *   gcc -O2 -fopenmp benchmarks/vnni_peak.c -o /tmp/vnni_peak
 *   OMP_NUM_THREADS=1 /tmp/vnni_peak; OMP_NUM_THREADS=2 /tmp/vnni_peak
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#define T512 __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define ACCUMULATORS 16 /* the named c0 .. c15 in run() */
#define ROUNDS 200000000L

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* The register form, written in asm: GCC 12 copies the accumulator around the intrinsic. */
#define DPBUSD(acc, a, b) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b))

/* ROUNDS x 16 VPDPBUSD; returns a value that depends on every result, so none is dropped.  The
 * accumulators are 16 named variables: kept in an array, GCC 12 left them on the stack, and the
 * loop then timed store-to-load forwarding instead of the instruction. */
static T512 int32_t run(int seed) {
    __m512i c0 = _mm512_set1_epi32(seed), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
    __m512i c8 = c0, c9 = c0, c10 = c0, c11 = c0, c12 = c0, c13 = c0, c14 = c0, c15 = c0;
    const __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(-1);
    for (long k = 0; k < ROUNDS; ++k) {
        DPBUSD(c0, a, b); DPBUSD(c1, a, b); DPBUSD(c2, a, b); DPBUSD(c3, a, b);
        DPBUSD(c4, a, b); DPBUSD(c5, a, b); DPBUSD(c6, a, b); DPBUSD(c7, a, b);
        DPBUSD(c8, a, b); DPBUSD(c9, a, b); DPBUSD(c10, a, b); DPBUSD(c11, a, b);
        DPBUSD(c12, a, b); DPBUSD(c13, a, b); DPBUSD(c14, a, b); DPBUSD(c15, a, b);
    }
    __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3)),
                                 _mm512_add_epi32(_mm512_add_epi32(c4, c5), _mm512_add_epi32(c6, c7)));
    s = _mm512_add_epi32(s, _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c8, c9), _mm512_add_epi32(c10, c11)),
                                             _mm512_add_epi32(_mm512_add_epi32(c12, c13), _mm512_add_epi32(c14, c15))));
    return _mm512_reduce_add_epi32(s);
}

int main(void) {
    if (!__builtin_cpu_supports("avx512vnni")) {
        fprintf(stderr, "vnni_peak: this CPU has no AVX-512 VNNI\n");
        return 1;
    }
    int32_t check = 0;
    run(0); /* warm up: clocks and AVX-512 power state */
    const double t0 = now();
    int threads = 1;
#pragma omp parallel reduction(+ : check)
    {
#pragma omp single
        threads = omp_get_num_threads();
        check += run(omp_get_thread_num());
    }
    const double seconds = now() - t0;
    const double per_s = (double)ROUNDS * ACCUMULATORS * threads / seconds;
    printf("%d thread(s): %.2f G VPDPBUSD/s (%.2f G per thread), %.0f G int8 multiply-adds/s  [%d]\n",
           threads, per_s / 1e9, per_s / threads / 1e9, per_s * 64 / 1e9, check);
    return 0;
}
