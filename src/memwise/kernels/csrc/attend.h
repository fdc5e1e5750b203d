/* Float work that every fused decode step with an attention cache shares, model-free: a dot product
 * in 16 interleaved lanes, rotate_half rotary embedding of one head, and attention of one query head
 * over the first n rows of its key/value head.  Bodies only (MW_INLINE): each family compiles them
 * once per vector level inside its own ops table, so MEMWISE_ISA forces the float code too.  Float
 * arithmetic in its own order: it agrees with torch (SDPA) to rounding, not bit for bit. */
#ifndef MEMWISE_KERNELS_ATTEND_H
#define MEMWISE_KERNELS_ATTEND_H

#include "exp.h"
#include "quantize.h"

/* sum of a[k] * b[k] (b = NULL: of a[k]) in 16 interleaved lanes, then the lanes and the tail. */
MW_INLINE float lanes_dot(const float *a, const float *b, int64_t n) {
    int64_t k = 0;
    float total = 0.0f;
#if defined(__GNUC__) || defined(__clang__)
    mw_vf16 acc = {0}, va, vb;
    for (; k + 16 <= n; k += 16) {
        memcpy(&va, a + k, sizeof va);
        if (b) {
            memcpy(&vb, b + k, sizeof vb);
            acc += va * vb;
        } else {
            acc += va;
        }
    }
    for (int l = 0; l < 16; ++l) total += acc[l];
#endif
    for (; k < n; ++k) total += b ? a[k] * b[k] : a[k];
    return total;
}

/* rotate_half rotary embedding of one head in place: the first `half` values against the next
 * `half`, cos and sin [half] of the position; dimensions past 2 half pass unrotated. */
MW_INLINE void rope_body(float *x, const float *cs, const float *sn, int64_t half) {
    for (int64_t i = 0; i < half; ++i) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cs[i] - b * sn[i];
        x[i + half] = b * cs[i] + a * sn[i];
    }
}

/* out [d] = softmax(q . k_j / sqrt(d)) over j < n, times v_j: one query head against its key/value
 * head ([max_length, d] each, the first n rows written).  scores and e hold n floats. */
MW_INLINE void attend_body(const float *q, const float *keys, const float *values, int64_t n, int64_t d,
                           float *scores, float *e, float *out, void (*neg_exp)(const float *, float *, int64_t)) {
    const float scale = 1.0f / sqrtf((float)d);
    float top = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
        scores[j] = lanes_dot(q, keys + j * d, d) * scale;
        if (scores[j] > top) top = scores[j];
    }
    for (int64_t j = 0; j < n; ++j) scores[j] = top - scores[j];
    neg_exp(scores, e, n); /* exp(score - max) */
    float total = 0.0f;
    for (int64_t j = 0; j < n; ++j) total += e[j];
    for (int64_t k = 0; k < d; ++k) out[k] = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
        const float p = e[j];
        const float *v = values + j * d;
        for (int64_t k = 0; k < d; ++k) out[k] += p * v[k];
    }
    const float inv = 1.0f / total;
    for (int64_t k = 0; k < d; ++k) out[k] *= inv;
}

/* One token's attention in a layer with a key/value cache, as a step's thread does its share of it:
 * through a family's ops table (rope and attend, the bodies above compiled for its vector level). */
typedef struct {
    void (*rope)(float *, const float *, const float *, int64_t);
    void (*attend)(const float *, const float *, const float *, int64_t, int64_t, float *, float *, float *);
    float *qkv;             /* the token's q [heads * hd], then k and v [kv_heads * hd] */
    float *keys, *values;   /* the layer's cache, [kv_heads][slots][hd] each */
    float *out;             /* [heads * hd] */
    const float *cs, *sn;   /* the position's rotary table, rotary_half entries */
    float *scores;          /* this thread's 2 * slots floats: scores, then exps */
    int64_t heads, kv_heads, hd, slots, rotary_half, pos;
} cache_attention_t;

/* Key/value heads [g0, g1): rotate the new key (rotary_half > 0), write key and value into the cache
 * at pos, then attend with every query head of those groups (rotated too) over slots 0..pos.  Each
 * thread writes only its own heads' cache rows, so no barrier between writing and attending. */
static void attend_cache_heads(const cache_attention_t *c, int64_t g0, int64_t g1) {
    const int64_t hd = c->hd, group = c->heads / c->kv_heads, Q = c->heads * hd, KV = c->kv_heads * hd;
    for (int64_t g = g0; g < g1; ++g) {
        float *k = c->qkv + Q + g * hd, *v = c->qkv + Q + KV + g * hd;
        if (c->rotary_half) c->rope(k, c->cs, c->sn, c->rotary_half);
        float *keys = c->keys + g * c->slots * hd, *values = c->values + g * c->slots * hd;
        memcpy(keys + c->pos * hd, k, sizeof(float) * (size_t)hd);
        memcpy(values + c->pos * hd, v, sizeof(float) * (size_t)hd);
        for (int64_t h = g * group; h < (g + 1) * group; ++h) {
            if (c->rotary_half) c->rope(c->qkv + h * hd, c->cs, c->sn, c->rotary_half);
            c->attend(c->qkv + h * hd, keys, values, c->pos + 1, hd, c->scores, c->scores + c->slots,
                      c->out + h * hd);
        }
    }
}

#endif /* MEMWISE_KERNELS_ATTEND_H */
