/* Shared by every part: headers, instruction-set ids and their detection, and the packed layout.
 *
 * The packed layout is the one documented in memwise/kernels/packed.py: per output row, blocks of 128
 * weights in 32 bytes; byte j of a block holds the codes c = t + 1 of weights j, j+32, j+64, j+96
 * in bits 0-1, 2-3, 4-5, 6-7. Codes are unsigned, activations signed, so every path computes
 * sum(c * q) with unsigned-by-signed products and subtracts sum(q) once per activation row; the
 * result equals sum(t * q) exactly, q = -128 included.
 *
 * Instruction-set paths are compiled per function with target attributes and chosen at run time,
 * so the extension never needs -march=native and runs on any x86-64 (or any other CPU, scalar). */
#ifndef MEMWISE_KERNELS_COMMON_H
#define MEMWISE_KERNELS_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* syscall(), for the AMX permission; Python.h defines it too */
#endif

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MW_X86 1
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#else
#define MW_X86 0
#endif
#if defined(__GNUC__) || defined(__clang__)
#include <sched.h>
#endif

/* Bodies inlined into per-instruction-set copies of their callers. */
#if defined(__GNUC__) || defined(__clang__)
#define MW_INLINE static inline __attribute__((always_inline))
#else
#define MW_INLINE static __forceinline
#endif

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVXVNNI = 2, ISA_AVX512VNNI = 3, ISA_AMX = 4 };
#define N_ISAS 5

/* Below this many activation rows the AMX path hands over to AVX-512 VNNI.  AMX must first
 * unpack each weight panel to one byte per code in memory, a fixed cost per panel that only
 * pays off when enough activation rows share it (docs/intel-xeon-amx-2026-11.md has the
 * measurements behind 5). */
#define AMX_MIN_ROWS 5

/* Bytes of one pair of blocks of K in AMX buffers: 4 units of 64 bytes for 16 rows (run_amx). */
#define AMX_PAIR_BYTES (4 * 16 * 64)

/* AMX buffers: B tiles of M activation rows, [mtiles][units][16][64], and one thread's unpacked
 * weight codes for K of nb blocks, [pairs][4 units][16][64]. */
static size_t act_tiles_bytes(int64_t M, int64_t nb) {
    return (size_t)((M + 15) / 16) * (size_t)((nb + 1) / 2) * AMX_PAIR_BYTES;
}

static size_t unpacked_bytes(int64_t nb) { return (size_t)((nb + 1) / 2) * AMX_PAIR_BYTES; }

/* From this many activation rows the AVX-512 path multiplies unpacked panels (run_panels). */
#define PANEL_MIN_ROWS 4

/* Whether products of M activation rows on this path need the per-thread unpacked panels. */
static int uses_panels(int isa, int64_t M) {
    return isa == ISA_AMX || (isa == ISA_AVX512VNNI && M >= PANEL_MIN_ROWS);
}

#define BLOCK 128
#define BLOCK_BYTES 32

/* Weight rows processed together: each activation load is shared by this many rows. */
#define TILE_N 4

/* Bytes one activation row takes in the kernel's layout.  The AVX-512 path reads two blocks
 * per 64-byte load, so its rows are padded to pairs of blocks. */
static size_t qrow_bytes(int isa, int64_t nb) {
    if (isa == ISA_AVX512VNNI)
        return (size_t)((nb + 1) / 2) * 256;
    return (size_t)nb * BLOCK;
}

/* Where the 32 activations k = 32*chunk .. 32*chunk+31 go in a row of the kernel's layout.
 * 256-bit and scalar paths use the natural order.  The AVX-512 path interleaves block pairs so
 * that one 64-byte load lines up with the codes of group g of both blocks of a 64-byte weight
 * load: [b0 g0 | b1 g0][b0 g1 | b1 g1][b0 g2 | b1 g2][b0 g3 | b1 g3]. */
static inline size_t chunk_offset(int isa, int64_t chunk) {
    if (isa == ISA_AVX512VNNI) {
        int64_t b = chunk >> 2, g = chunk & 3;
        return (size_t)((b >> 1) * 256 + g * 64 + (b & 1) * 32);
    }
    return (size_t)chunk * 32;
}


#if MW_X86
/* Target attributes of the per-instruction-set copies. */
#define T256 __attribute__((target("avx2,fma")))
#define TVNNI __attribute__((target("avx2,fma,avxvnni")))
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define TAMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,gfni,amx-tile,amx-int8")))

static int amx_permitted(void) {
#if defined(__linux__)
    /* Linux hands out the AMX register state only to processes that ask for it. */
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#else
    return 0;
#endif
}
#endif

static int isa_check(int isa) {
    if (isa == ISA_SCALAR) return 1;
#if MW_X86
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
    if (isa == ISA_AVX2) return 1;
    if (isa == ISA_AVXVNNI) return __builtin_cpu_supports("avxvnni") ? 1 : 0;
    int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    if (isa == ISA_AVX512VNNI) return avx512;
    if (isa == ISA_AMX) /* GFNI unpacks the codes (amx_unpack_pair); every AMX CPU has it */
        return avx512 && __builtin_cpu_supports("gfni") && __builtin_cpu_supports("amx-tile") &&
               __builtin_cpu_supports("amx-int8") && amx_permitted();
#endif
    return 0;
}

static int isa_supported(int isa) {
    static int known[N_ISAS] = {-1, -1, -1, -1, -1};
    if (isa < 0 || isa >= N_ISAS) return 0;
    if (known[isa] < 0) known[isa] = isa_check(isa);
    return known[isa];
}

#endif /* MEMWISE_KERNELS_COMMON_H */
