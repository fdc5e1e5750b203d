/* Greedy decoding's choice: the index of each row's largest logit, as torch.max finds it. */
#ifndef MEMWISE_KERNELS_ARGMAX_H
#define MEMWISE_KERNELS_ARGMAX_H

#include "common.h"

/* The first largest of x[k0, k1), or the first NaN (torch.max's answer): *best and its index. */
static void argmax_scalar(const float *x, int64_t k0, int64_t k1, float *best, int64_t *at) {
    float m = x[k0];
    int64_t i = k0;
    if (m == m)
        for (int64_t k = k0 + 1; k < k1; ++k) {
            if (x[k] != x[k]) {
                m = x[k], i = k;
                break;
            }
            if (x[k] > m) m = x[k], i = k;
        }
    *best = m, *at = i;
}

#if MW_X86
static T512 void argmax_avx512(const float *x, int64_t k0, int64_t k1, float *best, int64_t *at) {
    if (k1 - k0 < 32) {
        argmax_scalar(x, k0, k1, best, at);
        return;
    }
    /* Per lane the first largest (strictly greater replaces); NaNs are looked up apart. */
    __m512 vmax = _mm512_loadu_ps(x + k0);
    __m512i vidx = _mm512_add_epi32(_mm512_set1_epi32((int)k0), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8,
                                                                                    9, 10, 11, 12, 13, 14, 15));
    __m512i cur = vidx;
    const __m512i sixteen = _mm512_set1_epi32(16);
    __mmask16 nan = _mm512_cmp_ps_mask(vmax, vmax, _CMP_UNORD_Q);
    int64_t k = k0 + 16;
    for (; k + 16 <= k1; k += 16) {
        const __m512 v = _mm512_loadu_ps(x + k);
        cur = _mm512_add_epi32(cur, sixteen);
        const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);
        vmax = _mm512_mask_mov_ps(vmax, gt, v);
        vidx = _mm512_mask_mov_epi32(vidx, gt, cur);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    if (nan) { /* rare: the plain scan finds the first NaN */
        argmax_scalar(x, k0, k1, best, at);
        return;
    }
    float lanes[16];
    int32_t idx[16];
    _mm512_storeu_ps(lanes, vmax);
    _mm512_storeu_si512((void *)idx, vidx);
    float m = lanes[0];
    int64_t i = idx[0];
    for (int l = 1; l < 16; ++l)
        if (lanes[l] > m || (lanes[l] == m && idx[l] < i)) m = lanes[l], i = idx[l];
    for (; k < k1; ++k) {
        if (x[k] != x[k]) {
            argmax_scalar(x, k0, k1, best, at);
            return;
        }
        if (x[k] > m) m = x[k], i = k;
    }
    *best = m, *at = i;
}
#endif

#endif /* MEMWISE_KERNELS_ARGMAX_H */
