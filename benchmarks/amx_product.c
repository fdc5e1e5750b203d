/* One thread's AMX product of 16 activation rows, timed apart from the fused step.
 *
 * The fused decode step at batch 16 spends most of its time in AMX products (run_amx in
 * src/memwise/kernels/amx.h).  This program includes the extension's ternary.c, which includes
 * amx.h and the other parts beside it, and times run_amx on one thread for an N x K ternary
 * matrix, cycling through COPIES distinct copies of it: one copy stays in L2, enough copies to
 * fill ~85 MB stream the codes from memory as a 370M decode step does.
 * The copies are allocated like the model's codes (alloc_streamed: 2 MB pages on Linux); with 4 KB
 * pages the streaming case measured about a fifth slower.
 * It prints the best of 7 passes in G weights/s and a checksum of the outputs, which must not
 * change between variants of amx.h that are meant to give the same results.
 *
 * Build and run (x86-64 with AMX; SRC picks the ternary.c to time: for a variant of amx.h, a
 * ternary.c in a copy of src/memwise/kernels that holds it):
 *   gcc -O3 -fopenmp -march=native -I. -DSRC='"src/memwise/kernels/ternary.c"' benchmarks/amx_product.c \
 *       $(python3-config --includes) $(python3-config --ldflags --embed) -lm -o /tmp/amx_product
 *   /tmp/amx_product N K [M] [COPIES] [REPS]      e.g. 5632 1024 16 60 2 (mmfree-370m gate/up)
 */
#include SRC
#include <time.h>

static double now(void) {
    struct timespec s;
    clock_gettime(CLOCK_MONOTONIC, &s);
    return (double)s.tv_sec + (double)s.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s N K [M=16] [COPIES=1] [REPS=10]\n", argv[0]);
        return 2;
    }
    const int64_t N = atoll(argv[1]), K = atoll(argv[2]);
    const int64_t M = argc > 3 ? atoll(argv[3]) : 16;
    const int copies = argc > 4 ? atoi(argv[4]) : 1, reps = argc > 5 ? atoi(argv[5]) : 10;
    if (N < 1 || K < 1 || M < AMX_MIN_ROWS || copies < 1 || reps < 1) {
        fprintf(stderr, "N, K, COPIES and REPS must be positive and M at least %d\n", AMX_MIN_ROWS);
        return 2;
    }
    if (!isa_check(ISA_AMX)) {
        fprintf(stderr, "this CPU (or kernel) does not offer AMX with GFNI\n");
        return 1;
    }
    const int64_t nb = (K + BLOCK - 1) / BLOCK;
    const size_t size = (size_t)N * (size_t)nb * BLOCK_BYTES;
    uint8_t *w = alloc_streamed(size * (size_t)copies);
    plan_t p;
    if (!w || !plan_make(&p, ISA_AMX, N, nb, M, 1)) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    srand(1);
    for (size_t i = 0; i < size * (size_t)copies; ++i) { /* codes 0-2 in all four fields */
        uint8_t b = 0;
        for (int g = 0; g < 4; ++g) b |= (uint8_t)((rand() % 3) << (2 * g));
        w[i] = b;
    }
    for (size_t i = 0; i < p.qs * (size_t)M; ++i) p.qbuf[i] = (int8_t)(rand() % 255 - 127);
    for (int64_t m = 0; m < M; ++m) {
        p.sumq[m] = 0;
        p.rs[m] = 1.0f;
    }
    amx_pack_activations(p.qbuf, p.qs, M, nb, p.amx_b);
    float *out = alloc64((size_t)(M * N) * sizeof(float));
    double best = 1e30;
    for (int pass = 0; pass < 7; ++pass) {
        const double t0 = now();
        for (int r = 0; r < reps; ++r)
            for (int c = 0; c < copies; ++c) {
                job_t j = {w + (size_t)c * size, N, nb, p.qbuf, p.qs, M, p.sumq, NULL, out, p.rs,
                           p.amx_b, (M + 15) / 16, p.amx_a, 0, N};
                run_amx(&j, 0, (N + 15) / 16, 0);
            }
        const double dt = (now() - t0) / reps / copies;
        if (dt < best) best = dt;
    }
    double sum = 0;
    for (int64_t i = 0; i < M * N; ++i) sum += out[i];
    printf("N %lld K %lld M %lld, %d copies (%.0f MB): %.1f us per product, %.1f G weights/s "
           "(checksum %.0f)\n", (long long)N, (long long)K, (long long)M, copies,
           (double)size * copies / 1e6, best * 1e6, (double)(N * K) / best / 1e9, sum);
    return 0;
}
