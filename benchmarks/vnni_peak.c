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
#define ACCUMULATORS 16
#define ROUNDS 200000000L

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* The register form, written in asm: GCC 12 copies the accumulator around the intrinsic. */
#define DPBUSD(acc, a, b) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b))

/* ROUNDS x 16 VPDPBUSD; returns a value that depends on every result, so none is dropped. */
static T512 int32_t run(int seed) {
    __m512i acc[ACCUMULATORS];
    for (int r = 0; r < ACCUMULATORS; ++r) acc[r] = _mm512_set1_epi32(seed + r);
    const __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(-1);
    for (long k = 0; k < ROUNDS; ++k) {
#pragma GCC unroll 16
        for (int r = 0; r < ACCUMULATORS; ++r) DPBUSD(acc[r], a, b);
    }
    __m512i s = acc[0];
    for (int r = 1; r < ACCUMULATORS; ++r) s = _mm512_add_epi32(s, acc[r]);
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
