/* The fused BitNet decode step: one token of one sequence through every layer in one OpenMP
 * parallel region (memwise/models/bitnet/fused_step.py calls it once per token; the embedding,
 * the final norm and the lm_head stay in Python).
 *
 * Per layer, as modules.py computes it: the stacked q/k/v BitLinear (RMSNorm with its gain, int8
 * per token, the kernel library's exact ternary product, each matrix's m / s), rotary embedding,
 * the new key and value written into the DecoderCache at slot `pos`, attention of the query over
 * slots 0..pos, the o BitLinear added to the residual, the stacked gate/up BitLinear, the GLU, the
 * down BitLinear added to the residual.  The products are split over output rows (weight tiles),
 * attention over key/value heads (each thread writes the cache rows of its heads and then attends
 * with their query heads, so no barrier between the two).  A row's norm and quantization are one
 * thread's work: with one row they take microseconds against the products' milliseconds. */
#ifndef MEMWISE_BITNET_STEP_H
#define MEMWISE_BITNET_STEP_H

#include "bitnet_model.h"
#include "bitnet_ops.h"
#include "step_workspace.h"

/* Activation slots: K = H (q/k/v, gate/up), K = heads * head_dim (o), K = I (down).  A slot always
 * holds a row of one K, so its padding stays zero from allocation on. */
enum { SLOT_H = 0, SLOT_Q = 1, SLOT_I = 2, N_SLOTS = 3 };

typedef struct {
    int isa, layout, level, nthreads;
    int64_t H, Q, KV, I, hd, max_length;
    int64_t nb[N_SLOTS];
    size_t qs[N_SLOTS];
    int8_t *q[N_SLOTS];
    int32_t *sumq;   /* [N_SLOTS] */
    float *rs;       /* [N_SLOTS][3]: each stacked matrix's m / s */
    float *qkv, *attn, *y, *u, *e, *cs, *sn;
    float *scores;   /* per thread: max_length scores, then max_length exps */
    int *barrier;    /* spin_barrier's count; its generation and sleepers a line further */
    void *mem;
} bitnet_ws_t;

static void bitnet_ws_free(bitnet_ws_t *w) {
    if (w) free(w->mem);
    free(w);
}

static bitnet_ws_t *bitnet_ws_make(int isa, int64_t H, int64_t Q, int64_t KV, int64_t I, int64_t hd,
                                   int64_t max_length, int nthreads) {
    bitnet_ws_t *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    /* One row: AMX needs AMX_MIN_ROWS, and no path reads panels. */
    w->isa = isa == ISA_AMX ? ISA_AVX512VNNI : isa;
    w->layout = w->isa;
    w->level = vec_level_of(isa);
    w->nthreads = nthreads < 1 ? 1 : nthreads;
    w->H = H, w->Q = Q, w->KV = KV, w->I = I, w->hd = hd, w->max_length = max_length;
    const int64_t ks[N_SLOTS] = {H, Q, I};
    step_pieces_t pieces = {0};
    for (int s = 0; s < N_SLOTS; ++s) {
        w->nb[s] = (ks[s] + BLOCK - 1) / BLOCK;
        w->qs[s] = qrow_bytes(w->layout, w->nb[s]);
        pieces_add(&pieces, w->qs[s]);
    }
    const int64_t floats[] = {N_SLOTS, 3 * N_SLOTS, Q + 2 * KV, Q, 2 * I, I, I, hd / 2, hd / 2,
                              2 * max_length * w->nthreads};
    for (int k = 0; k < 10; ++k) pieces_add(&pieces, sizeof(float) * (size_t)floats[k]);
    pieces_add(&pieces, STEP_BARRIER_BYTES);
    w->mem = pieces_alloc(&pieces);
    if (!w->mem) {
        free(w);
        return NULL;
    }
    for (int s = 0; s < N_SLOTS; ++s) w->q[s] = pieces_take(&pieces);
    w->sumq = pieces_take(&pieces);
    w->rs = pieces_take(&pieces);
    w->qkv = pieces_take(&pieces);
    w->attn = pieces_take(&pieces);
    w->y = pieces_take(&pieces);
    w->u = pieces_take(&pieces);
    w->e = pieces_take(&pieces);
    w->cs = pieces_take(&pieces);
    w->sn = pieces_take(&pieces);
    w->scores = pieces_take(&pieces);
    w->barrier = pieces_take(&pieces);
    return w;
}

/* One step's input and output: x [H] the embedded token (overwritten: the residual stream, the
 * last layer's output on return), pos the cache slot (= the token's position: no padding). */
typedef struct {
    float *x;
    int64_t pos;
} bitnet_io_t;

typedef struct {
    const bitnet_ws_t *w;
    const bitnet_model_t *m;
    const bitnet_io_t *io;
    const bitnet_ops_t *ops;
    size_t far;
    int id, nt;
    int my_gen;      /* spin_barrier's generation */
} bitnet_thread_t;

/* The end of a phase: every thread waits for every other. */
static inline void bitnet_sync(bitnet_thread_t *t) { step_barrier(t->w->barrier, t->nt, &t->my_gen); }

/* Thread 0: x (K values) normalized with p's gain and quantized into slot s, each stacked
 * matrix's rescale m / s stored; then every thread waits for it. */
static void quantize_input(bitnet_thread_t *t, int s, const float *x, int64_t K, const bitnet_projection_t *p) {
    if (t->id == 0) {
        const bitnet_ws_t *w = t->w;
        float sc;
        const float r = t->ops->rms(x, K, t->m->eps);
        w->sumq[s] = quantize_row_lv(w->level, x, r, p->gain, K, w->layout, 0, w->q[s], &sc);
        for (int k = 0; k < p->count; ++k) w->rs[3 * s + k] = p->scales[k] / sc;
    }
    bitnet_sync(t);
}

/* This thread's share of the weight tiles of p's stacked matrices times slot s, matrix k's outputs
 * at out[k] (added to them with residual); then every thread waits. */
static void multiply(bitnet_thread_t *t, int s, const bitnet_projection_t *p, float *const *out,
                     int residual) {
    const bitnet_ws_t *w = t->w;
    const int64_t tr = tile_rows(w->isa);
    const run_fn fn = runner(w->isa);
    int64_t tiles[3], total = 0;
    for (int k = 0; k < p->count; ++k) {
        tiles[k] = (p->rows[k] + tr - 1) / tr;
        total += tiles[k];
    }
    const int64_t a = total * t->id / t->nt, b = total * (t->id + 1) / t->nt;
    const uint8_t *codes = p->codes;
    int64_t off = 0;
    for (int k = 0; k < p->count; ++k) {
        const int64_t lo = a > off ? a : off, hi = b < off + tiles[k] ? b : off + tiles[k];
        if (lo < hi) {
            const job_t j = {codes, p->rows[k], w->nb[s], w->q[s], w->qs[s], 1, w->sumq + s, NULL, out[k],
                             w->rs + 3 * s + k, NULL, 1, NULL, t->far, p->rows[k], residual};
            fn(&j, lo - off, hi - off, t->id);
        }
        codes += (size_t)p->rows[k] * (size_t)w->nb[s] * BLOCK_BYTES;
        off += tiles[k];
    }
    bitnet_sync(t);
}

/* This thread's share of the key/value heads' attention (attend_cache_heads, every head rotated);
 * then every thread waits. */
static void attend_heads(bitnet_thread_t *t, const bitnet_layer_t *layer) {
    const bitnet_ws_t *w = t->w;
    const bitnet_model_t *m = t->m;
    const cache_attention_t c = {t->ops->rope, t->ops->attend, w->qkv, layer->keys, layer->values, w->attn, w->cs,
                                 w->sn, w->scores + (size_t)t->id * 2 * (size_t)w->max_length, m->heads,
                                 m->kv_heads, m->head_dim, m->max_length, m->head_dim / 2, t->io->pos};
    attend_cache_heads(&c, m->kv_heads * t->id / t->nt, m->kv_heads * (t->id + 1) / t->nt);
    bitnet_sync(t);
}

/* u = act(gate) * up over this thread's span of I; then every thread waits. */
static void glu(bitnet_thread_t *t) {
    const bitnet_ws_t *w = t->w;
    int64_t k0, k1;
    my_span(w->I, t->id, t->nt, &k0, &k1);
    if (k0 < k1) {
        const float *gate = w->y + k0, *up = w->y + w->I + k0;
        if (t->m->relu2) {
            t->ops->glu_relu2(gate, up, w->u + k0, k1 - k0);
        } else {
            t->ops->neg_exp(gate, w->e + k0, k1 - k0);
            t->ops->glu_silu(gate, up, w->e + k0, w->u + k0, k1 - k0);
        }
    }
    bitnet_sync(t);
}

static void bitnet_layer(bitnet_thread_t *t, const bitnet_layer_t *layer) {
    const bitnet_ws_t *w = t->w;
    float *x = t->io->x;
    float *qkv_out[3] = {w->qkv, w->qkv + w->Q, w->qkv + w->Q + w->KV};
    quantize_input(t, SLOT_H, x, w->H, &layer->qkv);
    multiply(t, SLOT_H, &layer->qkv, qkv_out, 0);
    attend_heads(t, layer);
    float *residual[1] = {x};
    quantize_input(t, SLOT_Q, w->attn, w->Q, &layer->o);
    multiply(t, SLOT_Q, &layer->o, residual, 1);
    float *gate_up_out[2] = {w->y, w->y + w->I};
    quantize_input(t, SLOT_H, x, w->H, &layer->gate_up);
    multiply(t, SLOT_H, &layer->gate_up, gate_up_out, 0);
    glu(t);
    quantize_input(t, SLOT_I, w->u, w->I, &layer->down);
    multiply(t, SLOT_I, &layer->down, residual, 1);
}

static void bitnet_step_run(const bitnet_ws_t *w, const bitnet_model_t *m, const bitnet_io_t *io) {
    rotary_table(io->pos, m->inv_freq, m->head_dim / 2, w->cs, w->sn);
#ifdef _OPENMP
#pragma omp parallel num_threads(w->nthreads)
#endif
    {
        bitnet_thread_t t = {w, m, io, bitnet_ops(w->level), m->weights_from_dram ? PF_FAR_BYTES : 0, 0, 1, 0};
        step_join(w->barrier, &t.id, &t.nt, &t.my_gen);
        for (int64_t l = 0; l < m->num_layers; ++l) bitnet_layer(&t, m->layers + l);
    }
}

#endif /* MEMWISE_BITNET_STEP_H */
