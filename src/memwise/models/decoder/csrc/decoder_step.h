/* The fused decoder step: one token of one sequence through every layer of a pre-norm decoder
 * with int8 or int4 projections (gpt2, opt, llama, mistral) in one OpenMP parallel region
 * (memwise/models/decoder/fused_step.py calls it once per token; the embedding, the positions, the
 * final norm and the lm_head stay in Python).
 *
 * Per layer, as modules.py computes it: the norm (LayerNorm or RMSNorm), the fused q/k/v projection
 * (the activation quantized per token, the kernel library's int8 or int4 row products, the bias),
 * rotary embedding where the model has it, the new key and value written into the DecoderCache at
 * slot `pos`, attention of the query over slots 0..pos, the out projection added to the residual,
 * the norm, up (gate and up when gated), the activation, down added to the residual.
 * The products are split over output rows (contiguous stretches of tiles), attention over
 * key/value heads (each thread writes the cache rows of its heads and then attends with their query
 * heads, so no barrier between the two).  A row's norm and quantization are one thread's work:
 * with one row they take microseconds against the products' milliseconds. */
#ifndef MEMWISE_DECODER_STEP_H
#define MEMWISE_DECODER_STEP_H

#include "decoder_model.h"
#include "decoder_ops.h"
#include "int4_products.h"
#include "int8_products.h"
#include "step_workspace.h"

/* Activation slots: K = H (q/k/v, up), K = heads * head_dim (out), K = I (down).  A slot always
 * holds a row of one K, so its padding stays zero from allocation on. */
enum { DSLOT_H = 0, DSLOT_Q = 1, DSLOT_I = 2, DN_SLOTS = 3 };

typedef struct {
    int isa, level, scheme, nthreads;
    int64_t H, Q, KV, I, hd, max_length;
    int64_t kp[DN_SLOTS];
    int8_t *q[DN_SLOTS];        /* the quantized row, plain order, zero padded to kp */
    uint8_t *a[DN_SLOTS];       /* its path form: int8's I8_ACT_* row, or int4's pair order */
    float *qsum[DN_SLOTS];      /* int4: each group's sum of q */
    float *xinv;                /* [DN_SLOTS]: 1 / s */
    float *ones, *h, *qkv, *attn, *res, *u, *t, *cs, *sn;
    float *scores;              /* per thread: max_length scores, then max_length exps */
    int *barrier;               /* spin_barrier's count; its generation and sleepers a line further */
    void *mem;
} decoder_ws_t;

static void decoder_ws_free(decoder_ws_t *w) {
    if (w) free(w->mem);
    free(w);
}

static int64_t decoder_padded(int64_t k) { return (k + 63) / 64 * 64; }

static decoder_ws_t *decoder_ws_make(int isa, int scheme, int64_t H, int64_t Q, int64_t KV, int64_t I, int64_t hd,
                                     int64_t max_length, int nthreads) {
    decoder_ws_t *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    w->isa = isa, w->level = vec_level_of(isa), w->scheme = scheme;
    w->nthreads = nthreads < 1 ? 1 : nthreads;
    w->H = H, w->Q = Q, w->KV = KV, w->I = I, w->hd = hd, w->max_length = max_length;
    const int64_t ks[DN_SLOTS] = {H, Q, I};
    const int64_t widest = H > Q ? (H > I ? H : I) : (Q > I ? Q : I);
    step_pieces_t pieces = {0};
    for (int s = 0; s < DN_SLOTS; ++s) {
        w->kp[s] = decoder_padded(ks[s]);
        pieces_add(&pieces, (size_t)w->kp[s]);
        pieces_add(&pieces, (size_t)w->kp[s]);
        pieces_add(&pieces, sizeof(float) * (size_t)(w->kp[s] / 64));
    }
    const int64_t floats[] = {DN_SLOTS, widest, H, Q + 2 * KV, Q, H, 2 * I, I, hd, hd,
                              2 * max_length * w->nthreads};
    for (int k = 0; k < 11; ++k) pieces_add(&pieces, sizeof(float) * (size_t)floats[k]);
    pieces_add(&pieces, STEP_BARRIER_BYTES);
    w->mem = pieces_alloc(&pieces);
    if (!w->mem) {
        free(w);
        return NULL;
    }
    for (int s = 0; s < DN_SLOTS; ++s) {
        w->q[s] = pieces_take(&pieces);
        w->a[s] = pieces_take(&pieces);
        w->qsum[s] = pieces_take(&pieces);
    }
    w->xinv = pieces_take(&pieces);
    w->ones = pieces_take(&pieces);
    w->h = pieces_take(&pieces);
    w->qkv = pieces_take(&pieces);
    w->attn = pieces_take(&pieces);
    w->res = pieces_take(&pieces);
    w->u = pieces_take(&pieces);
    w->t = pieces_take(&pieces);
    w->cs = pieces_take(&pieces);
    w->sn = pieces_take(&pieces);
    w->scores = pieces_take(&pieces);
    w->barrier = pieces_take(&pieces);
    for (int64_t k = 0; k < widest; ++k) w->ones[k] = 1.0f;
    return w;
}

/* One step's input and output: x [H] the embedded token (overwritten: the residual stream, the
 * last layer's output on return), pos the cache slot (= the token's position: no padding). */
typedef struct {
    float *x;
    int64_t pos;
} decoder_io_t;

typedef struct {
    const decoder_ws_t *w;
    const decoder_model_t *m;
    const decoder_io_t *io;
    const decoder_ops_t *ops;
    int id, nt;
    int my_gen;      /* spin_barrier's generation */
} decoder_thread_t;

/* The end of a phase: every thread waits for every other. */
static inline void decoder_sync(decoder_thread_t *t) { step_barrier(t->w->barrier, t->nt, &t->my_gen); }

/* Thread 0 only: row x (K values) quantized per token into slot s as Int8Linear / Int4Linear do
 * (int8.quantize_tokens: s = 127 / max|x|, round half to even), and its path form written. */
static void quantize_slot(const decoder_thread_t *t, int s, const float *x, int64_t K) {
    const decoder_ws_t *w = t->w;
    float scale;
    quantize_row_lv(w->level, x, 1.0f, w->ones, K, ISA_SCALAR, 1, w->q[s], &scale);
    w->xinv[s] = 1.0f / scale;
    if (w->scheme == DECODER_INT8) {
        i8_act_row(i8_act_form(w->isa), w->q[s], w->kp[s], w->a[s]);
        return;
    }
    const int64_t G = w->kp[s] / I4_GROUP;
    for (int64_t g = 0; g < G; ++g) {
        int32_t sum = 0;
        for (int i = 0; i < I4_GROUP; ++i) sum += w->q[s][g * I4_GROUP + i];
        w->qsum[s][g] = (float)sum;
    }
    if (i4_uses_pairs(w->isa)) i4_pair_row(w->q[s], G, (int8_t *)w->a[s]);
}

/* This thread's share of p's output rows for the row in slot s, into out (bias added); then every
 * thread waits. */
static void project(decoder_thread_t *t, int s, const decoder_projection_t *p, float *out) {
    const decoder_ws_t *w = t->w;
    if (w->scheme == DECODER_INT8) {
        const int64_t a = p->rows * t->id / t->nt, b = p->rows * (t->id + 1) / t->nt;
        const i8_job_t j = {p->weights, p->row_sums, p->scales, p->bias, p->rows, w->kp[s], 1, w->q[s], w->a[s],
                            w->xinv + s, NULL, out};
        if (a < b) i8_run_tiles(&j, i8_rows_of(w->isa), 1, a, b);
    } else {
        const int64_t tiles = (p->rows + I4_TILE - 1) / I4_TILE;
        const int64_t a = tiles * t->id / t->nt, b = tiles * (t->id + 1) / t->nt;
        const i4_job_t j = {p->weights, p->scales, p->bias, p->rows, w->kp[s], w->kp[s] / I4_GROUP, 1, w->q[s],
                            i4_uses_pairs(w->isa) ? (const int8_t *)w->a[s] : NULL, w->qsum[s], w->xinv + s,
                            NULL, out};
        if (a < b) i4_run_tiles(&j, i4_dots_of(w->isa), i4_widen_of(w->isa), a, b);
    }
    decoder_sync(t);
}

/* This thread's share of the key/value heads' attention (attend_cache_heads); then every thread waits. */
static void attend_heads(decoder_thread_t *t, const decoder_layer_t *layer) {
    const decoder_ws_t *w = t->w;
    const decoder_model_t *m = t->m;
    const cache_attention_t c = {t->ops->rope, t->ops->attend, w->qkv, layer->keys, layer->values, w->attn, w->cs,
                                 w->sn, w->scores + (size_t)t->id * 2 * (size_t)w->max_length, m->heads,
                                 m->kv_heads, m->head_dim, m->max_length, m->rotary_dim / 2, t->io->pos};
    attend_cache_heads(&c, m->kv_heads * t->id / t->nt, m->kv_heads * (t->id + 1) / t->nt);
    decoder_sync(t);
}

/* Thread 0: x += res (the previous projection's output, when `add`), the norm into h, h
 * quantized into slot DSLOT_H; then every thread waits. */
static void norm_input(decoder_thread_t *t, int add, const float *weight, const float *bias) {
    if (t->id == 0) {
        const decoder_ws_t *w = t->w;
        float *x = t->io->x;
        if (add)
            for (int64_t k = 0; k < w->H; ++k) x[k] += w->res[k];
        if (t->m->norm == DECODER_RMS_NORM) t->ops->rms_norm(x, weight, w->H, t->m->eps, w->h);
        else t->ops->layer_norm(x, weight, bias, w->H, t->m->eps, w->h);
        quantize_slot(t, DSLOT_H, w->h, w->H);
    }
    decoder_sync(t);
}

/* The activation over this thread's span of u (gated: act(gate) * up into the gate half), then
 * thread 0 quantizes u's first I values into DSLOT_I. */
static void activate(decoder_thread_t *t) {
    const decoder_ws_t *w = t->w;
    int64_t k0, k1;
    my_span(w->I, t->id, t->nt, &k0, &k1);
    if (k0 < k1) {
        if (t->m->gated) t->ops->silu_glu(w->u + k0, w->u + w->I + k0, w->t + k0, k1 - k0);
        else if (t->m->activation == DECODER_RELU) t->ops->relu(w->u + k0, k1 - k0);
        else t->ops->gelu_tanh(w->u + k0, w->t + k0, k1 - k0);
    }
    decoder_sync(t);
    if (t->id == 0) quantize_slot(t, DSLOT_I, w->u, w->I);
    decoder_sync(t);
}

static void decoder_layer(decoder_thread_t *t, const decoder_layer_t *layer, int first) {
    const decoder_ws_t *w = t->w;
    norm_input(t, !first, layer->attn_norm_weight, layer->attn_norm_bias);
    project(t, DSLOT_H, &layer->qkv, w->qkv);
    attend_heads(t, layer);
    if (t->id == 0) quantize_slot(t, DSLOT_Q, w->attn, w->Q);
    decoder_sync(t);
    project(t, DSLOT_Q, &layer->out, w->res);
    norm_input(t, 1, layer->mlp_norm_weight, layer->mlp_norm_bias);
    project(t, DSLOT_H, &layer->up, w->u);
    activate(t);
    project(t, DSLOT_I, &layer->down, w->res);
}

static void decoder_step_run(const decoder_ws_t *w, const decoder_model_t *m, const decoder_io_t *io) {
    rotary_table(io->pos, m->inv_freq, m->rotary_dim / 2, w->cs, w->sn);
#ifdef _OPENMP
#pragma omp parallel num_threads(w->nthreads)
#endif
    {
        decoder_thread_t t = {w, m, io, decoder_ops(w->level), 0, 1, 0};
        step_join(w->barrier, &t.id, &t.nt, &t.my_gen);
        for (int64_t l = 0; l < m->num_layers; ++l) decoder_layer(&t, m->layers + l, l == 0);
    }
    /* The last layer's down projection, added after every thread is done with it. */
    for (int64_t k = 0; k < w->H; ++k) io->x[k] += w->res[k];
}

#endif /* MEMWISE_DECODER_STEP_H */
