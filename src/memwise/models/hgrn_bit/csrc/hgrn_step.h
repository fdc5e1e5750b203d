/* The fused HGRN-Bit decode step: one token of B sequences through every layer and the lm_head in
 * one OpenMP parallel region (memwise/models/hgrn_bit/fused_step.py calls it once per token).
 *
 * The step follows the model's PyTorch code (memwise/models/hgrn_bit/modules.py) phase by phase.
 * Each phase ends at a barrier: the products are split over output rows, and the float work
 * between them over batch rows, or, with fewer rows than threads (decode of one sequence), over
 * the elements of each row ("split"): then the quantization of a row, which must see the whole
 * row, is shared by the threads after a barrier.  Products go through the kernel library's jobs
 * (memwise/kernels/csrc), with its tiles, activation layouts and rescale.
 *
 * Compiled with -DMW_STEP_TIMING, every barrier also adds the time of the phase it closes to
 * step_timings (benchmarks/step_phases.py builds such a copy); otherwise the hook is empty. */
#ifndef MEMWISE_HGRN_STEP_H
#define MEMWISE_HGRN_STEP_H

#include "hgrn_model.h"
#include "hgrn_ops.h"
#include "hgrn_workspace.h"

/* The phases, as the timing hook names them. */
#define HGRN_PHASES(X)                                                                          \
    X(ATTN_QUANTIZE, "attn_norm, quantize i/f/g")                                               \
    X(IFG_PRODUCTS, "i/f/g products")                                                           \
    X(MLGRU, "MLGRU gates, recurrence, output")                                                 \
    X(O_QUANTIZE, "quantize o")                                                                 \
    X(O_PRODUCT, "o product (+ residual)")                                                      \
    X(MLP_QUANTIZE, "mlp_norm, quantize gate/up")                                               \
    X(GATE_PRODUCT, "gate/up product")                                                          \
    X(GLU, "GLU")                                                                               \
    X(DOWN_QUANTIZE, "quantize down")                                                           \
    X(DOWN_PRODUCT, "down product (+ residual)")                                                \
    X(TILES, "activation tiles")                                                                \
    X(HEAD_QUANTIZE, "final norm, quantize head")                                               \
    X(HEAD_PRODUCT, "lm_head product")
#define PHASE_ID(id, name) PH_##id,
enum { HGRN_PHASES(PHASE_ID) N_PHASES };
#undef PHASE_ID

/* One step's inputs and outputs: x [B, H] the embedded tokens (overwritten: the residual stream),
 * state [L, B, D] advanced in place, mask [B] (0 zeroes a padded row's recurrence input) or NULL,
 * logits [B, V] written. */
typedef struct {
    float *x, *state, *logits;
    const float *mask;
} hgrn_io_t;

/* What one thread of the step knows. */
typedef struct {
    const hgrn_ws_t *w;
    const hgrn_model_t *model;
    const hgrn_io_t *io;
    const row_ops_t *ops;
    size_t far;      /* distance of far prefetches, 0 for none */
    int id, nt;
    int split;       /* fewer rows than threads: threads share each row's float work */
    int tiled;       /* the products read activation tiles */
    int64_t b0, b1;  /* without split: this thread's rows */
    int my_gen;      /* spin_barrier's generation */
    int products;    /* products run so far in this step: run_jobs' claim counters alternate */
} step_thread_t;

#ifdef MW_STEP_TIMING
#define TIMING_THREADS 64
typedef struct {
    double wall[N_PHASES], work[TIMING_THREADS][N_PHASES], left[TIMING_THREADS], last;
    long steps;
} step_timings_t;
static step_timings_t step_timings;

static inline void timing_start(void) {
    step_timings.last = omp_get_wtime();
    for (int t = 0; t < TIMING_THREADS; ++t) step_timings.left[t] = step_timings.last;
    ++step_timings.steps;
}
static inline void timing_arrive(const step_thread_t *t, int phase) {
    if (t->id < TIMING_THREADS) step_timings.work[t->id][phase] += omp_get_wtime() - step_timings.left[t->id];
}
static inline void timing_leave(const step_thread_t *t, int phase) {
    const double now = omp_get_wtime();
    if (t->id < TIMING_THREADS) step_timings.left[t->id] = now;
    if (t->id == 0) step_timings.wall[phase] += now - step_timings.last, step_timings.last = now;
}
#else
#define timing_start() ((void)0)
#define timing_arrive(t, phase) ((void)0)
#define timing_leave(t, phase) ((void)0)
#endif

/* The end of a phase: every thread waits for every other. */
static inline void step_sync(step_thread_t *t, int phase) {
    timing_arrive(t, phase);
    step_barrier(t->w->barrier, t->nt, &t->my_gen);
    timing_leave(t, phase);
    (void)phase;
}

/* The rows whose float work this thread does: all of them when threads share rows. */
static inline int64_t rows_from(const step_thread_t *t) { return t->split ? 0 : t->b0; }
static inline int64_t rows_to(const step_thread_t *t) { return t->split ? t->w->B : t->b1; }

/* Row b of x (r given) quantized into slot s for BitLinear p: whole, or this thread's part. */
static inline void quantize_for(const step_thread_t *t, int s, int64_t b, const float *x, float r,
                                const hgrn_bitlinear_t *p, int64_t K) {
    if (t->split)
        put_row_part(t->w, s, b, x, r, p->gain, K, p->scale, t->id, t->nt);
    else
        put_row(t->w, s, b, x, r, p->gain, K, p->scale);
}

/* h = rmsnorm(x) * norm in this thread's scratch row, quantized into slots for BitLinears. */
static void norm_and_quantize(const step_thread_t *t, const float *norm, const hgrn_bitlinear_t *const *p,
                              const int *slots, int n) {
    const hgrn_ws_t *w = t->w;
    const int64_t H = w->H;
    for (int64_t b = rows_from(t); b < rows_to(t); ++b) {
        float *h = t->split ? w->hs + (int64_t)t->id * H : w->h + b * H;
        t->ops->norm(t->io->x + b * H, norm, H, t->model->eps, h);
        const float r = t->ops->rms(h, H, t->model->eps);
        for (int k = 0; k < n; ++k) quantize_for(t, slots[k], b, h, r, p[k], H);
    }
}

/* The activation tiles of slots, when the products read tiles. */
static void pack_tiles(step_thread_t *t, const int *slots, int n) {
    if (!t->tiled) return;
    for (int k = 0; k < n; ++k) pack_act_tiles_share(t->w, slots[k], t->id, t->nt);
    step_sync(t, PH_TILES);
}

/* A product job for slot s: rows of slot s times codes, into out (added to it with residual). */
static job_t product(const step_thread_t *t, int s, const uint8_t *codes, int64_t N, float *out, int residual) {
    const int32_t *sums = t->split ? gather_sums(t->w, s, t->id, t->nt) : t->w->sumq[s];
    job_t j = slot_job(t->w, s, sums, codes, N, out, t->far);
    j.residual = residual;
    return j;
}

/* Slot s (its tiles packed first, when the products read tiles) times codes into out: this
 * thread's share of the output rows. */
static void multiply(step_thread_t *t, int s, const uint8_t *codes, int64_t N, float *out, int residual) {
    pack_tiles(t, &s, 1);
    const job_t j = product(t, s, codes, N, out, residual);
    run_jobs(t->w, &j, 1, 0, t->id, t->nt, t->products++ & 1);
}

/* The rows of src [B, K] quantized into slot s for BitLinear p (each row's own RMS), then the
 * phase's barrier. */
static void quantize_rows(step_thread_t *t, int s, const float *src, int64_t K, const hgrn_bitlinear_t *p,
                          int phase) {
    for (int64_t b = rows_from(t); b < rows_to(t); ++b)
        quantize_for(t, s, b, src + b * K, t->ops->rms(src + b * K, K, t->model->eps), p, K);
    step_sync(t, phase);
}

/* The MLGRU's float work over elements [k0, k1) of row b: gates, recurrence, output o. */
static void mlgru_span(const step_thread_t *t, const hgrn_layer_t *layer, int64_t l, int64_t b,
                       int64_t k0, int64_t k1) {
    const hgrn_ws_t *w = t->w;
    const int64_t D = w->D, hd = D / t->model->heads, n = k1 - k0;
    if (n <= 0) return;
    const float *iv = w->fi + b * D, *fv = w->ff + b * D, *gv = w->fg + b * D;
    const float *lower = layer->lower_bound;
    const float *mask = t->io->mask;
    float *st = t->io->state + (l * w->B + b) * D;
    float *e1 = w->e1 + b * w->ew, *e2 = w->e2 + b * w->ew, *o = w->o + b * D;
    t->ops->neg_exp(fv + k0, e1 + k0, n);
    t->ops->neg_exp(iv + k0, e2 + k0, n);
    t->ops->gates(iv + k0, e1 + k0, e2 + k0, lower ? lower + k0 : NULL, mask ? mask + b : NULL, st + k0, n);
    t->ops->neg_exp(st + k0, e1 + k0, n);
    for (int64_t h0 = k0 / hd * hd; h0 < k1; h0 += hd) {
        const int64_t s0 = h0 > k0 ? h0 : k0, s1 = h0 + hd < k1 ? h0 + hd : k1;
        const float r = t->ops->rms(gv + h0, hd, t->model->eps);
        t->ops->gate_out(gv + s0, r, layer->g_norm + (s0 - h0), st + s0, e1 + s0, o + s0, s1 - s0);
    }
}

/* The token mixer: x = x + o_proj(MLGRU(attn_norm(x))). */
static void step_mlgru(step_thread_t *t, const hgrn_layer_t *layer, int64_t l) {
    const hgrn_ws_t *w = t->w;
    const int64_t B = w->B, D = w->D, H = w->H;
    const hgrn_bitlinear_t *ifg[3] = {&layer->i_proj, &layer->f_proj, &layer->g_proj};
    const int slots[3] = {SLOT_I, SLOT_F, SLOT_G};
    norm_and_quantize(t, layer->attn_norm, ifg, slots, 3);
    step_sync(t, PH_ATTN_QUANTIZE);
    pack_tiles(t, slots, 3);
    const job_t jobs[3] = {product(t, SLOT_I, layer->i_proj.codes, D, w->fi, 0),
                           product(t, SLOT_F, layer->f_proj.codes, D, w->ff, 0),
                           product(t, SLOT_G, layer->g_proj.codes, D, w->fg, 0)};
    run_jobs(w, jobs, 3, t->split, t->id, t->nt, t->products++ & 1);
    /* What the float work reads next, fetched while the other threads finish. */
    prefetch_floats(layer->lower_bound, layer->lower_bound ? D : 0);
    prefetch_floats(layer->g_norm, D / t->model->heads);
    prefetch_floats(layer->o_proj.gain, D);
    int64_t k0 = 0, k1 = D;
    if (t->split) my_span(D, t->id, t->nt, &k0, &k1);
    for (int64_t b = rows_from(t); b < rows_to(t); ++b)
        prefetch_floats(t->io->state + (l * B + b) * D + k0, k1 - k0);
    step_sync(t, PH_IFG_PRODUCTS);
    for (int64_t b = rows_from(t); b < rows_to(t); ++b) mlgru_span(t, layer, l, b, k0, k1);
    if (t->split) step_sync(t, PH_MLGRU);
    quantize_rows(t, SLOT_O, w->o, D, &layer->o_proj, PH_O_QUANTIZE);
    multiply(t, SLOT_O, layer->o_proj.codes, H, t->io->x, 1);
    prefetch_floats(layer->mlp_norm, H);
    prefetch_floats(layer->gate_proj.gain, H);
    step_sync(t, PH_O_PRODUCT);
}

/* The channel mixer: x = x + down_proj(silu(gate) * up), [gate, up] = gate_proj(mlp_norm(x)). */
static void step_glu(step_thread_t *t, const hgrn_layer_t *layer) {
    const hgrn_ws_t *w = t->w;
    const int64_t I = w->I, H = w->H;
    const hgrn_bitlinear_t *gate[1] = {&layer->gate_proj};
    const int in_slot[1] = {SLOT_I};
    norm_and_quantize(t, layer->mlp_norm, gate, in_slot, 1);
    step_sync(t, PH_MLP_QUANTIZE);
    pack_tiles(t, in_slot, 1);
    const job_t j = product(t, SLOT_I, layer->gate_proj.codes, 2 * I, w->y, 0);
    if (t->split) { /* gate and up halves apart, so that each thread multiplies the rows of both
                     * that its part of the GLU reads */
        job_t halves[2] = {j, j};
        halves[0].N = halves[1].N = I;
        halves[1].w = j.w + (size_t)I * (size_t)w->nb[SLOT_I] * BLOCK_BYTES;
        halves[1].out_f32 = w->y + I;
        run_jobs(w, halves, 2, 1, t->id, t->nt, t->products++ & 1);
    } else {
        run_jobs(w, &j, 1, 0, t->id, t->nt, t->products++ & 1);
    }
    prefetch_floats(layer->down_proj.gain, I);
    step_sync(t, PH_GATE_PRODUCT);
    int64_t k0 = 0, k1 = I;
    if (t->split) my_span(I, t->id, t->nt, &k0, &k1);
    for (int64_t b = rows_from(t); b < rows_to(t) && k0 < k1; ++b) {
        const float *g = w->y + b * 2 * I + k0;
        float *e = w->e1 + b * w->ew + k0;
        t->ops->neg_exp(g, e, k1 - k0);
        t->ops->glu(g, g + I, e, w->u + b * I + k0, k1 - k0);
    }
    if (t->split) step_sync(t, PH_GLU);
    quantize_rows(t, SLOT_DOWN, w->u, I, &layer->down_proj, PH_DOWN_QUANTIZE);
    multiply(t, SLOT_DOWN, layer->down_proj.codes, H, t->io->x, 1);
}

/* After the last layer: logits = lm_head(final_norm(x)). */
static void step_head(step_thread_t *t) {
    const hgrn_model_t *m = t->model;
    const hgrn_bitlinear_t *head[1] = {&m->lm_head};
    const int slot[1] = {SLOT_I};
    norm_and_quantize(t, m->final_norm, head, slot, 1);
    step_sync(t, PH_HEAD_QUANTIZE);
    multiply(t, SLOT_I, m->lm_head.codes, m->vocab, t->io->logits, 0);
    timing_arrive(t, PH_HEAD_PRODUCT);
    timing_leave(t, PH_HEAD_PRODUCT);
}

/* Asks for the next layer's (or the head's) input gains while the down product's stragglers finish. */
static void prefetch_next(const step_thread_t *t, int64_t l) {
    const hgrn_model_t *m = t->model;
    const int64_t H = m->hidden;
    if (l + 1 < m->num_layers) {
        const hgrn_layer_t *next = m->layers + l + 1;
        prefetch_floats(next->attn_norm, H);
        prefetch_floats(next->i_proj.gain, H);
        prefetch_floats(next->f_proj.gain, H);
        prefetch_floats(next->g_proj.gain, H);
    } else {
        prefetch_floats(m->final_norm, H);
        prefetch_floats(m->lm_head.gain, H);
    }
}

static void hgrn_step_run(const hgrn_ws_t *w, const hgrn_model_t *model, const hgrn_io_t *io) {
    timing_start();
#ifdef _OPENMP
#pragma omp parallel num_threads(w->nthreads)
#endif
    {
        step_thread_t t = {w, model, io, row_ops(w->level), model->weights_from_dram ? PF_FAR_BYTES : 0,
                           0, 1, 0, uses_panels(w->isa, w->B), 0, 0, 0};
        step_join(w->barrier, &t.id, &t.nt, &t.my_gen);
        t.split = w->B < t.nt;
        claims_reset(w, t.id);
        my_rows(w->B, t.id, t.nt, &t.b0, &t.b1);
        for (int64_t l = 0; l < model->num_layers; ++l) {
            step_mlgru(&t, model->layers + l, l);
            step_glu(&t, model->layers + l);
            prefetch_next(&t, l);
            step_sync(&t, PH_DOWN_PRODUCT);
        }
        step_head(&t);
    }
}

#endif /* MEMWISE_HGRN_STEP_H */
