/* The fused HGRN-Bit decode step: every layer's products and the float work between them in one
 * OpenMP region (memwise/kernels/fused.py builds the plan that hgrn_step_run follows).
 *
 * Part of memwise.kernels._ternary: ternary.c includes every part once, in one translation unit,
 * so that the per-instruction-set copies of a function inline what they call from other parts. */

/* ------------------------------------------------------------------------------------------ */
/* Fused HGRN-Bit decode step                                                                 */
/* ------------------------------------------------------------------------------------------ */

/* One call computes a whole decode step of an HGRN-Bit model (memwise/models/hgrn_bit.py): every
 * layer's MLGRU and GLU, the final norm and the lm_head, for B sequences of one token each, in one
 * OpenMP parallel region.  Products are split over output rows with barriers between dependent
 * steps, and use the same tiles, activation layouts and rescale (`put`) as bitlinear(); RMSNorm and
 * quantization use the same functions.  The elementwise float operations are written in the order
 * and with the roundings of the PyTorch code of the model, and exp is computed the way torch's CPU
 * kernels compute it (next section), so that the step can reproduce the unfused path bit for bit. */

/* ---- exp as torch's CPU kernels compute it ---- */

/* torch's sigmoid and silu kernels compute exp two ways in one call: the vectorized loop runs on
 * 2 * (vector width) elements at a time with Sleef's expf_u10 algorithm, and the elements left
 * over go through std::exp (glibc's expf).  Both are reproduced here; which elements take which
 * path follows torch's loop structure (see ew_geom_t).  The Sleef algorithm: q = rint(d / ln 2),
 * a two-part reduction s = d - q ln 2 with fused multiply-adds, a degree-6 polynomial, and a
 * scaling by 2^q done as two multiplications. */
#define EXP_R_LN2 1.442695040888963407359924681001892137426645954152985934135449406931f
#define EXP_L2U 0.693145751953125f
#define EXP_L2L 1.428606765330187045e-06f
#define EXP_C6 0.000198527617612853646278381f
#define EXP_C5 0.00139304355252534151077271f
#define EXP_C4 0.00833336077630519866943359f
#define EXP_C3 0.0416664853692054748535156f
#define EXP_C2 0.166666671633720397949219f

static inline float pow2i_scalar(int32_t q) {
    uint32_t bits = (uint32_t)(q + 0x7f) << 23;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static float vexpf_lane(float d) {
    if (d != d) return d;
    if (d < -104.0f) return 0.0f;
    if (100.0f < d) return INFINITY;
    int32_t q = (int32_t)rintf(d * EXP_R_LN2);
    float qf = (float)q;
    float s = fmaf(qf, -EXP_L2U, d);
    s = fmaf(qf, -EXP_L2L, s);
    float u = EXP_C6;
    u = fmaf(u, s, EXP_C5);
    u = fmaf(u, s, EXP_C4);
    u = fmaf(u, s, EXP_C3);
    u = fmaf(u, s, EXP_C2);
    u = fmaf(u, s, 0.5f);
    u = 1.0f + fmaf(s * s, u, s);
    int32_t h = q >> 1;
    return (u * pow2i_scalar(h)) * pow2i_scalar(q - h);
}

#if MW_X86
static inline __attribute__((always_inline)) T512 __m512 vexp512(__m512 d) {
    __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(d, _mm512_set1_ps(EXP_R_LN2)));
    __m512 qf = _mm512_cvtepi32_ps(q);
    __m512 s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-EXP_L2U), d);
    s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-EXP_L2L), s);
    __m512 u = _mm512_set1_ps(EXP_C6);
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(EXP_C5));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(EXP_C4));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(EXP_C3));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(EXP_C2));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.5f));
    u = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_mul_ps(s, s), u, s));
    __m512i h = _mm512_srai_epi32(q, 1);
    const __m512i bias = _mm512_set1_epi32(0x7f);
    __m512 p1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(h, bias), 23));
    __m512 p2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(q, h), bias), 23));
    u = _mm512_mul_ps(_mm512_mul_ps(u, p1), p2);
    u = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(d, _mm512_set1_ps(-104.0f), _CMP_LT_OQ), u,
                             _mm512_setzero_ps());
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_set1_ps(100.0f), d, _CMP_LT_OQ), u,
                                _mm512_set1_ps(INFINITY));
}

static T512 void vexp_neg_512(const float *x, float *e, int64_t n) {
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
#define NEG512(v) _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), sign))
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) _mm512_storeu_ps(e + k, vexp512(NEG512(_mm512_loadu_ps(x + k))));
    if (k < n) {
        __mmask16 m = (__mmask16)((1u << (n - k)) - 1u);
        _mm512_mask_storeu_ps(e + k, m, vexp512(NEG512(_mm512_maskz_loadu_ps(m, x + k))));
    }
#undef NEG512
}

static inline __attribute__((always_inline)) T256 __m256 vexp256(__m256 d) {
    __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(d, _mm256_set1_ps(EXP_R_LN2)));
    __m256 qf = _mm256_cvtepi32_ps(q);
    __m256 s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-EXP_L2U), d);
    s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-EXP_L2L), s);
    __m256 u = _mm256_set1_ps(EXP_C6);
    u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(EXP_C5));
    u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(EXP_C4));
    u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(EXP_C3));
    u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(EXP_C2));
    u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.5f));
    u = _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_mul_ps(s, s), u, s));
    __m256i h = _mm256_srai_epi32(q, 1);
    const __m256i bias = _mm256_set1_epi32(0x7f);
    __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, bias), 23));
    __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(q, h), bias), 23));
    u = _mm256_mul_ps(_mm256_mul_ps(u, p1), p2);
    u = _mm256_blendv_ps(u, _mm256_setzero_ps(), _mm256_cmp_ps(d, _mm256_set1_ps(-104.0f), _CMP_LT_OQ));
    return _mm256_blendv_ps(u, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(_mm256_set1_ps(100.0f), d, _CMP_LT_OQ));
}

static T256 void vexp_neg_256(const float *x, float *e, int64_t n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    int64_t k = 0;
    for (; k + 8 <= n; k += 8)
        _mm256_storeu_ps(e + k, vexp256(_mm256_xor_ps(_mm256_loadu_ps(x + k), sign)));
    for (; k < n; ++k) e[k] = vexpf_lane(-x[k]);
}
#endif

/* e[k] = Sleef-algorithm exp(-x[k]); every path gives the same bits (IEEE operations and fused
 * multiply-adds only), the vector ones are just faster. */
static void vexp_neg(int level, const float *x, float *e, int64_t n) {
#if MW_X86
    if (level >= VEC_AVX512) {
        vexp_neg_512(x, e, n);
        return;
    }
    if (level >= VEC_AVX2) {
        vexp_neg_256(x, e, n);
        return;
    }
#endif
    (void)level;
    for (int64_t k = 0; k < n; ++k) e[k] = vexpf_lane(-x[k]);
}

/* Which elements of an elementwise op torch computes in its vector loop.  The op runs over a
 * [rows, cols] tensor of N elements.  TensorIterator splits N into `chunk`-sized pieces when it
 * parallelizes (N > 32768 with more than one thread: ceil(N / threads) elements each, fewer
 * threads when the grain allows fewer), and a strided input (`rowsplit`, like the gate half of
 * the GLU projection) is walked one row at a time; each resulting segment runs the vector loop on
 * its first floor(len / step) * step elements and std::exp on the rest.  step = 0: all std::exp. */
typedef struct {
    int64_t N, chunk, cols;
    int rowsplit, step, level;
} ew_geom_t;

#define TORCH_GRAIN 32768

static ew_geom_t ew_geom(int64_t rows, int64_t cols, int rowsplit, int step, int torch_threads, int level) {
    ew_geom_t g = {rows * cols, rows * cols, cols, rowsplit, step, level};
    if (g.N > TORCH_GRAIN && torch_threads > 1) {
        int64_t nt = (g.N + TORCH_GRAIN - 1) / TORCH_GRAIN;
        if (nt > torch_threads) nt = torch_threads;
        g.chunk = (g.N + nt - 1) / nt;
    }
    if (g.chunk < 1) g.chunk = 1;
    return g;
}

/* e[k] = exp(-x[k]) for the n elements whose flat index in the op is base + k (all in one row),
 * each computed the way torch computes that element. */
static void neg_exp_like_torch(const float *x, float *e, int64_t n, int64_t base, const ew_geom_t *g) {
    if (g->step > 0) vexp_neg(g->level, x, e, n);
    int64_t pos = base, end = base + n;
    while (pos < end) {
        int64_t ss = pos / g->chunk * g->chunk;
        int64_t se = ss + g->chunk < g->N ? ss + g->chunk : g->N;
        if (g->rowsplit) {
            int64_t rs = pos / g->cols * g->cols;
            if (rs > ss) ss = rs;
            if (rs + g->cols < se) se = rs + g->cols;
        }
        int64_t vend = g->step > 0 ? ss + (se - ss) / g->step * g->step : ss;
        int64_t a = vend > pos ? vend : pos, b = se < end ? se : end;
        for (int64_t k = a; k < b; ++k) e[k - base] = expf(-x[k - base]);
        pos = b;
    }
}

/* ---- the step ---- */

/* Activation slots of a step: three with K = H (i, f, g; gate_proj and lm_head reuse the first),
 * one with K = D (o_proj), one with K = I (down_proj).  A slot always holds rows of one K, so the
 * padding of its rows stays zero from allocation on. */
enum { SLOT_I = 0, SLOT_F = 1, SLOT_G = 2, SLOT_O = 3, SLOT_DOWN = 4, N_SLOTS = 5 };

typedef struct {
    int isa, layout, level, nthreads;
    int64_t B, H, D, I, mtiles;
    int64_t nb[N_SLOTS];
    size_t qs[N_SLOTS];
    int8_t *q[N_SLOTS];
    int32_t *sumq[N_SLOTS];
    float *rs[N_SLOTS];
    int8_t *act_tiles[N_SLOTS];
    uint8_t *unpacked;
    float *h, *fi, *ff, *fg, *o, *y, *u, *e1, *e2;
    float *hs;  /* per thread, H floats: normalized rows when threads share a row's work */
    /* When threads share rows: per thread, [N_SLOTS][B] sums of the q it quantized (sum_part)
     * and the whole rows' sums it gathered for its products (sum_mine), sum_stride apart. */
    int32_t *sum_part, *sum_mine;
    int64_t sum_stride;
    int *barrier; /* spin_barrier's count, and its generation a line further */
    int64_t ew; /* floats per row of e1 / e2 */
    void *mem;
} hgrn_ws_t;

static void hgrn_ws_free(hgrn_ws_t *w) {
    if (w) free(w->mem);
    free(w);
}

static hgrn_ws_t *hgrn_ws_make(int isa, int64_t B, int64_t H, int64_t D, int64_t I, int nthreads) {
    hgrn_ws_t *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    w->isa = (isa == ISA_AMX && B < AMX_MIN_ROWS) ? ISA_AVX512VNNI : isa;
    /* AMX products take K in the AVX-512 path's order (see run_amx). */
    w->layout = w->isa == ISA_AMX ? ISA_AVX512VNNI : w->isa;
    w->level = vec_level_of(isa);
    w->nthreads = nthreads < 1 ? 1 : nthreads;
    w->B = B, w->H = H, w->D = D, w->I = I;
    w->mtiles = (B + 15) / 16;
    const int64_t ks[N_SLOTS] = {H, H, H, D, I};
    int64_t nb_max = 0;
    for (int s = 0; s < N_SLOTS; ++s) {
        w->nb[s] = (ks[s] + BLOCK - 1) / BLOCK;
        w->qs[s] = qrow_bytes(w->layout, w->nb[s]);
        if (w->nb[s] > nb_max) nb_max = w->nb[s];
    }
    w->ew = D > I ? D : I;
    /* One allocation, every piece 64-byte aligned. */
    size_t sizes[N_SLOTS * 4 + 16], total = 0;
    int n = 0;
    for (int s = 0; s < N_SLOTS; ++s) {
        sizes[n++] = w->qs[s] * (size_t)B;
        sizes[n++] = sizeof(int32_t) * (size_t)B;
        sizes[n++] = sizeof(float) * (size_t)B;
        sizes[n++] = uses_panels(w->isa, B) ? act_tiles_bytes(B, w->nb[s]) : 0;
    }
    sizes[n++] = uses_panels(w->isa, B) ? (size_t)w->nthreads * unpacked_bytes(nb_max) : 0;
    const int64_t widths[] = {H, D, D, D, D, 2 * I, I, w->ew, w->ew};
    for (int k = 0; k < 9; ++k) sizes[n++] = sizeof(float) * (size_t)(B * widths[k]);
    sizes[n++] = sizeof(float) * (size_t)(w->nthreads * H);
    w->sum_stride = (N_SLOTS * B + 15) / 16 * 16; /* a thread's sums on lines of their own */
    sizes[n++] = sizeof(int32_t) * (size_t)(w->nthreads * w->sum_stride);
    sizes[n++] = sizeof(int32_t) * (size_t)(w->nthreads * w->sum_stride);
    sizes[n++] = 128;
    for (int k = 0; k < n; ++k) total += (sizes[k] + 63) & ~(size_t)63;
    w->mem = alloc64(total);
    if (!w->mem) {
        free(w);
        return NULL;
    }
    memset(w->mem, 0, total);
    char *p = w->mem;
    n = 0;
#define TAKE(dst, type)                                                                         \
    do {                                                                                        \
        dst = (type)(void *)p;                                                                  \
        p += (sizes[n++] + 63) & ~(size_t)63;                                                   \
    } while (0)
    for (int s = 0; s < N_SLOTS; ++s) {
        TAKE(w->q[s], int8_t *);
        TAKE(w->sumq[s], int32_t *);
        TAKE(w->rs[s], float *);
        TAKE(w->act_tiles[s], int8_t *);
    }
    TAKE(w->unpacked, uint8_t *);
    TAKE(w->h, float *);
    TAKE(w->fi, float *);
    TAKE(w->ff, float *);
    TAKE(w->fg, float *);
    TAKE(w->o, float *);
    TAKE(w->y, float *);
    TAKE(w->u, float *);
    TAKE(w->e1, float *);
    TAKE(w->e2, float *);
    TAKE(w->hs, float *);
    TAKE(w->sum_part, int32_t *);
    TAKE(w->sum_mine, int32_t *);
    TAKE(w->barrier, int *);
#undef TAKE
    return w;
}

/* The plan: int64 words written by memwise/kernels/fused.py.
 * Header (PLAN_HEADER words): L, H, D, I, V, heads, final norm gain, lm_head codes, lm_head gain,
 * and 1 when the weights stream from DRAM (far prefetches on, see PF_FAR_BYTES), else 0.
 * Then per layer (PLAN_LAYER words): the pointers listed in the enum below.
 * Scales (float32): lm_head's m, then per layer (SCALES_LAYER floats) i, f, g, o, gate, down. */
#define PLAN_HEADER 16
#define PLAN_LAYER 16
#define SCALES_HEADER 8
#define SCALES_LAYER 8
enum {
    PL_ATTN_NORM, PL_I_W, PL_I_G, PL_F_W, PL_F_G, PL_G_W, PL_G_G, PL_G_NORM, PL_O_W, PL_O_G,
    PL_MLP_NORM, PL_GATE_W, PL_GATE_G, PL_DOWN_W, PL_DOWN_G, PL_LOWER
};
enum { SC_I, SC_F, SC_G, SC_O, SC_GATE, SC_DOWN };

#define PTR(type, word) ((type)(uintptr_t)(word))

/* Asks for the floats [p, p + n) in L2, a request per line.  Between two products the step's
 * float work reads gains and states that the streaming weights have pushed out of every cache;
 * each thread asks for the next phase's vectors as soon as its share of a product is done, so
 * they arrive while it waits for the other threads. */
static inline void prefetch_floats(const float *p, int64_t n) {
#if MW_X86
    const char *c = (const char *)p;
    for (int64_t o = 0; o < n * (int64_t)sizeof(float); o += 64) _mm_prefetch(c + o, _MM_HINT_T1);
#else
    (void)p, (void)n;
#endif
}

/* Rows of the batch handled by thread id of nt. */
static inline void my_rows(int64_t B, int id, int nt, int64_t *b0, int64_t *b1) {
    *b0 = B * id / nt;
    *b1 = B * (id + 1) / nt;
}

/* ---- row operations, compiled once per instruction set (the same IEEE operations in each) ---- */

/* h = rmsnorm(x) * gain, as torch computes x * rsqrt(mean(x^2) + eps) * gain. */
MW_INLINE void norm_body(const float *x, const float *gain, int64_t K, float eps, int W, float *h) {
    const float r = rms_inverse_body(x, K, eps, W);
    for (int64_t k = 0; k < K; ++k) h[k] = (x[k] * r) * gain[k];
}

/* The MLGRU's gates and recurrence over n channels, e_f = exp(-f) and e_i = exp(-i) given:
 * f = sigmoid(f), f = lower + (1 - lower) * f, c = silu(i) * (1 - f) (* mask),
 * state = state * f, state = state + c; each operation rounded as torch rounds it. */
MW_INLINE void gates_body(const float *iv, const float *e_f, const float *e_i, const float *lower,
                          const float *mask, float *st, int64_t n) {
    const float mk = mask ? *mask : 1.0f;
    for (int64_t k = 0; k < n; ++k) {
        float f = 1.0f / (e_f[k] + 1.0f);
        if (lower) f = lower[k] + (1.0f - lower[k]) * f;
        float c = (iv[k] / (1.0f + e_i[k])) * (1.0f - f);
        if (mask) c = c * mk;
        float s = st[k] * f;
        st[k] = s + c;
    }
}

/* o = (rmsnorm(g) * g_norm) * silu(state), r of g's head given, e = exp(-state). */
MW_INLINE void gate_out_body(const float *g, float r, const float *gnorm, const float *st, const float *e,
                             float *o, int64_t n) {
    for (int64_t k = 0; k < n; ++k) o[k] = ((g[k] * r) * gnorm[k]) * (st[k] / (1.0f + e[k]));
}

/* u = silu(gate) * up, e = exp(-gate). */
MW_INLINE void glu_body(const float *gate, const float *up, const float *e, float *u, int64_t n) {
    for (int64_t k = 0; k < n; ++k) u[k] = (gate[k] / (1.0f + e[k])) * up[k];
}

typedef struct {
    float (*rms)(const float *, int64_t, float, int);
    void (*norm)(const float *, const float *, int64_t, float, int, float *);
    void (*gates)(const float *, const float *, const float *, const float *, const float *, float *, int64_t);
    void (*gate_out)(const float *, float, const float *, const float *, const float *, float *, int64_t);
    void (*glu)(const float *, const float *, const float *, float *, int64_t);
} row_ops_t;

#define DEFINE_ROW_OPS(NAME, ATTR)                                                              \
    static ATTR float NAME##_rms(const float *x, int64_t K, float eps, int W) {                 \
        return rms_inverse_body(x, K, eps, W);                                                  \
    }                                                                                           \
    static ATTR void NAME##_norm(const float *x, const float *gain, int64_t K, float eps, int W, \
                                 float *h) {                                                    \
        norm_body(x, gain, K, eps, W, h);                                                       \
    }                                                                                           \
    static ATTR void NAME##_gates(const float *iv, const float *e_f, const float *e_i,          \
                                  const float *lower, const float *mask, float *st, int64_t n) { \
        gates_body(iv, e_f, e_i, lower, mask, st, n);                                           \
    }                                                                                           \
    static ATTR void NAME##_gate_out(const float *g, float r, const float *gnorm, const float *st, \
                                     const float *e, float *o, int64_t n) {                     \
        gate_out_body(g, r, gnorm, st, e, o, n);                                                \
    }                                                                                           \
    static ATTR void NAME##_glu(const float *gate, const float *up, const float *e, float *u,   \
                                int64_t n) {                                                    \
        glu_body(gate, up, e, u, n);                                                            \
    }                                                                                           \
    static const row_ops_t NAME = {NAME##_rms, NAME##_norm, NAME##_gates, NAME##_gate_out,      \
                                   NAME##_glu};

DEFINE_ROW_OPS(row_ops_generic, )
#if MW_X86
DEFINE_ROW_OPS(row_ops_avx2, T256)
DEFINE_ROW_OPS(row_ops_avx512, T512)
#endif

static const row_ops_t *row_ops(int level) {
#if MW_X86
    if (level >= VEC_AVX512) return &row_ops_avx512;
    if (level >= VEC_AVX2) return &row_ops_avx2;
#endif
    (void)level;
    return &row_ops_generic;
}

/* ---- products ---- */

/* Quantizes one row x (r given) into slot s at row b, with rescale m. */
static inline void put_row(const hgrn_ws_t *w, int s, int64_t b, const float *x, float r,
                           const float *gain, int64_t K, float m) {
    float sc;
    int8_t *dst = w->q[s] + (size_t)b * w->qs[s];
    w->sumq[s][b] = quantize_row_lv(w->level, x, r, gain, K, w->layout, 0, dst, &sc);
    /* torch evaluates `acc.float() * (m / s)` as acc * (reciprocal(s) * m) in float32. */
    w->rs[s][b] = (1.0f / sc) * m;
}

/* Elements [k0, k1) of a row of n, thread id's share when nt threads split one row (multiples of
 * 16, so vector loops stay whole). */
static inline void my_span(int64_t n, int id, int nt, int64_t *k0, int64_t *k1) {
    const int64_t units = (n + 15) / 16;
    *k0 = units * id / nt * 16;
    *k1 = units * (id + 1) / nt * 16;
    if (*k0 > n) *k0 = n;
    if (*k1 > n) *k1 = n;
}

/* Threads sharing rows: thread id quantizes its part [k0, k1) of row b (r given) into slot s.
 * Each thread computes the whole row's amax itself, so the only wait is the barrier before the
 * product, after which gather_sums adds up the parts' sums. */
static inline void put_row_part(const hgrn_ws_t *w, int s, int64_t b, const float *x, float r,
                                const float *gain, int64_t K, float m, int id, int nt) {
    int64_t k0, k1;
    my_span(K, id, nt, &k0, &k1);
    const float amax = row_amax_lv(w->level, x, r, gain, K);
    float sc;
    int8_t *dst = w->q[s] + (size_t)b * w->qs[s];
    w->sum_part[id * w->sum_stride + s * w->B + b] =
        k0 < k1 ? quantize_span_lv(w->level, x, r, gain, amax, w->layout, 0, dst, &sc, k0, k1) : 0;
    /* Every thread computes the same s; one stores the rescale. */
    if (id == 0) {
        if (k0 >= k1) quantize_span_lv(w->level, x, r, gain, amax, w->layout, 0, dst, &sc, 0, 0);
        w->rs[s][b] = (1.0f / sc) * m;
    }
}

/* The sums of slot s's rows for thread id's products: its own copy, so no thread writes what
 * another reads. */
static const int32_t *gather_sums(const hgrn_ws_t *w, int s, int id, int nt) {
    int32_t *mine = w->sum_mine + id * w->sum_stride + s * w->B;
    for (int64_t b = 0; b < w->B; ++b) {
        int32_t total = 0;
        for (int t = 0; t < nt; ++t) total += w->sum_part[t * w->sum_stride + s * w->B + b];
        mine[b] = total;
    }
    return mine;
}

/* AMX and AVX-512 panels: the quantized rows of slot s into tiles (pack_act_tile).  Threads split the tiles
 * by unit of K: a 64-byte line of a tile holds bytes of 16 rows, so splitting by row would have
 * threads write into the same lines. */
static void pack_act_tiles_share(const hgrn_ws_t *w, int s, int id, int nt) {
#if MW_X86
    const int64_t units = 4 * ((w->nb[s] + 1) / 2);
    const int64_t u0 = units * id / nt, u1 = units * (id + 1) / nt;
    for (int64_t m0 = 0; m0 < w->B; m0 += 16)
        pack_act_tile(w->q[s], w->qs[s], m0, m0 + 16 < w->B ? m0 + 16 : w->B, u0, u1, units, w->act_tiles[s]);
#else
    (void)w, (void)s, (void)id, (void)nt;
#endif
}

static inline job_t slot_job(const hgrn_ws_t *w, int s, const int32_t *sumq, const uint8_t *codes,
                             int64_t N, float *out, size_t pf_far) {
    job_t j = {codes, N, w->nb[s], w->q[s], w->qs[s], w->B, sumq, NULL, out, w->rs[s],
               w->act_tiles[s], w->mtiles, w->unpacked, pf_far, N};
    return j;
}

/* Thread id's share of the output tiles of up to three products that run together: an even share
 * of all their tiles, or with `each`, the rows my_span gives it of every product, so that
 * elementwise work split by my_span afterwards finds its inputs in the thread's own cache.
 * (Splitting the last tiles dynamically, by a shared counter, made the 370M batch-16 step about
 * 10% slower on the Intel Xeon VM: each extra range restarts the weight prefetches.) */
static void run_jobs(const hgrn_ws_t *w, const job_t *jobs, int njobs, int each, int id, int nt) {
    const int64_t tr = tile_rows(w->isa);
    run_fn fn = runner(w->isa);
    if (each) { /* my_span's rows are multiples of 16, so whole tiles */
        for (int k = 0; k < njobs; ++k) {
            int64_t n0, n1;
            my_span(jobs[k].N, id, nt, &n0, &n1);
            if (n0 < n1) fn(&jobs[k], n0 / tr, (n1 + tr - 1) / tr, id);
        }
        return;
    }
    int64_t tiles[3], total = 0;
    for (int k = 0; k < njobs; ++k) {
        tiles[k] = (jobs[k].N + tr - 1) / tr;
        total += tiles[k];
    }
    const int64_t a = total * id / nt, b = total * (id + 1) / nt;
    int64_t off = 0;
    for (int k = 0; k < njobs; ++k) {
        const int64_t lo = a > off ? a : off, hi = b < off + tiles[k] ? b : off + tiles[k];
        if (lo < hi) fn(&jobs[k], lo - off, hi - off, id);
        off += tiles[k];
    }
}

typedef struct {
    const int64_t *plan;
    const float *scales;
    float eps;
    int W, exp_step, torch_threads;
    float *x, *state, *logits;
    const float *mask;
} hgrn_args_t;

/* ---- the step ---- */

/* MLGRU gates, recurrence and output o for elements [k0, k1) of row b of layer l. */
static void mlgru_span(const hgrn_ws_t *w, const hgrn_args_t *a, const row_ops_t *ops, const int64_t *lp,
                       int64_t l, int64_t b, int64_t heads, const ew_geom_t *gflat, int64_t k0, int64_t k1) {
    const int64_t D = w->D, hd = D / heads, n = k1 - k0;
    if (n <= 0) return;
    const float *iv = w->fi + b * D, *fv = w->ff + b * D, *gv = w->fg + b * D;
    const float *lower = PTR(const float *, lp[PL_LOWER]);
    const float *gnorm = PTR(const float *, lp[PL_G_NORM]);
    float *st = a->state + (l * w->B + b) * D;
    float *e1 = w->e1 + b * w->ew, *e2 = w->e2 + b * w->ew, *o = w->o + b * D;
    neg_exp_like_torch(fv + k0, e1 + k0, n, b * D + k0, gflat);
    neg_exp_like_torch(iv + k0, e2 + k0, n, b * D + k0, gflat);
    ops->gates(iv + k0, e1 + k0, e2 + k0, lower ? lower + k0 : NULL, a->mask ? a->mask + b : NULL,
               st + k0, n);
    neg_exp_like_torch(st + k0, e1 + k0, n, b * D + k0, gflat);
    for (int64_t h0 = k0 / hd * hd; h0 < k1; h0 += hd) {
        const int64_t s0 = h0 > k0 ? h0 : k0, s1 = h0 + hd < k1 ? h0 + hd : k1;
        const float r = ops->rms(gv + h0, hd, a->eps, a->W);
        ops->gate_out(gv + s0, r, gnorm + (s0 - h0), st + s0, e1 + s0, o + s0, s1 - s0);
    }
}

/* The step's barrier.  A decode step of mmfree-2.7b passes about 320 of them; OpenMP's costs
 * 0.35-0.4 us on the Intel Xeon VM when both threads arrive together, this one 0.08 us.  It spins,
 * then yields the CPU, so that more threads than cores still make progress. */
#if defined(_OPENMP) && (defined(__GNUC__) || defined(__clang__))
#define MW_SPIN_BARRIER 1
#define SPIN_BEFORE_YIELD 20000

static inline void cpu_relax(void) {
#if MW_X86
    _mm_pause();
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

static void spin_barrier(int *count, int *gen, int nt, int *my_gen) {
    const int g = *my_gen;
    *my_gen = g + 1;
    if (__atomic_add_fetch(count, 1, __ATOMIC_ACQ_REL) == nt) {
        __atomic_store_n(count, 0, __ATOMIC_RELAXED); /* ordered before the release below */
        __atomic_store_n(gen, g + 1, __ATOMIC_RELEASE);
        return;
    }
    for (long spins = 0; __atomic_load_n(gen, __ATOMIC_ACQUIRE) == g; ++spins) {
        if (spins < SPIN_BEFORE_YIELD)
            cpu_relax();
        else
            sched_yield();
    }
}
#endif

static void hgrn_step_run(const hgrn_ws_t *w, const hgrn_args_t *a) {
    const int64_t *plan = a->plan;
    const int64_t L = plan[0], H = plan[1], D = plan[2], I = plan[3], V = plan[4], heads = plan[5];
    const size_t far = plan[9] ? PF_FAR_BYTES : 0;
    const int64_t B = w->B;
    const ew_geom_t gflat = ew_geom(B, D, 0, a->exp_step, a->torch_threads, w->level);
    const ew_geom_t ggate = ew_geom(B, I, 1, a->exp_step, a->torch_threads, w->level);
    const float eps = a->eps;
    const int W = a->W, tiled = uses_panels(w->isa, B);
    const row_ops_t *ops = row_ops(w->level);
    float *x = a->x;
#ifdef _OPENMP
#pragma omp parallel num_threads(w->nthreads)
#endif
    {
#ifdef _OPENMP
        const int id = omp_get_thread_num(), nt = omp_get_num_threads();
#if MW_SPIN_BARRIER
        /* Every thread reads the generation before its first arrival, so all start equal. */
        int my_gen = __atomic_load_n(w->barrier + 16, __ATOMIC_ACQUIRE);
#define SYNC spin_barrier(w->barrier, w->barrier + 16, nt, &my_gen);
#elif defined(_MSC_VER)
#define SYNC __pragma(omp barrier)
#else
#define SYNC _Pragma("omp barrier")
#endif
#else
        const int id = 0, nt = 1;
#define SYNC
#endif
        /* With at least as many rows as threads, each thread takes whole rows.  With fewer (decode
         * of one sequence), threads share rows: the elementwise work is split by element, and
         * the quantization of a row, which must see the whole row, follows a barrier. */
        const int split = B < nt;
        int64_t b0, b1;
        /* The row sums a product reads: gathered from the threads' parts when they share rows. */
#define sums(s) (split ? gather_sums(w, s, id, nt) : w->sumq[s])
        my_rows(B, id, nt, &b0, &b1);
        for (int64_t l = 0; l < L; ++l) {
            const int64_t *lp = plan + PLAN_HEADER + l * PLAN_LAYER;
            const float *scl = a->scales + SCALES_HEADER + l * SCALES_LAYER;
            /* h = attn_norm(x), quantized three times for i, f and g; when threads share rows,
             * the (row, projection) pairs are spread over them and each computes its own h. */
            const int slots[3] = {SLOT_I, SLOT_F, SLOT_G}, sc[3] = {SC_I, SC_F, SC_G};
            const int64_t gains[3] = {lp[PL_I_G], lp[PL_F_G], lp[PL_G_G]};
            if (!split) {
                for (int64_t b = b0; b < b1; ++b) {
                    float *hb = w->h + b * H;
                    ops->norm(x + b * H, PTR(const float *, lp[PL_ATTN_NORM]), H, eps, W, hb);
                    const float r = ops->rms(hb, H, eps, W);
                    for (int k = 0; k < 3; ++k)
                        put_row(w, slots[k], b, hb, r, PTR(const float *, gains[k]), H, scl[sc[k]]);
                }
            } else {
                for (int64_t b = 0; b < B; ++b) {
                    float *hb = w->hs + (int64_t)id * H;
                    ops->norm(x + b * H, PTR(const float *, lp[PL_ATTN_NORM]), H, eps, W, hb);
                    const float r = ops->rms(hb, H, eps, W);
                    for (int k = 0; k < 3; ++k)
                        put_row_part(w, slots[k], b, hb, r, PTR(const float *, gains[k]), H, scl[sc[k]], id, nt);
                }
            }
            SYNC
            if (tiled) {
                for (int k = 0; k < 3; ++k) pack_act_tiles_share(w, slots[k], id, nt);
                SYNC
            }
            {
                job_t jobs[3] = {slot_job(w, SLOT_I, sums(SLOT_I), PTR(const uint8_t *, lp[PL_I_W]), D, w->fi, far),
                                 slot_job(w, SLOT_F, sums(SLOT_F), PTR(const uint8_t *, lp[PL_F_W]), D, w->ff, far),
                                 slot_job(w, SLOT_G, sums(SLOT_G), PTR(const uint8_t *, lp[PL_G_W]), D, w->fg, far)};
                run_jobs(w, jobs, 3, split, id, nt);
                prefetch_floats(PTR(const float *, lp[PL_LOWER]), lp[PL_LOWER] ? D : 0);
                prefetch_floats(PTR(const float *, lp[PL_G_NORM]), D / heads);
                prefetch_floats(PTR(const float *, lp[PL_O_G]), D);
                if (split) {
                    int64_t k0, k1;
                    my_span(D, id, nt, &k0, &k1);
                    for (int64_t b = 0; b < B; ++b) prefetch_floats(a->state + (l * B + b) * D + k0, k1 - k0);
                } else {
                    prefetch_floats(a->state + (l * B + b0) * D, (b1 - b0) * D);
                }
            }
            SYNC
            /* MLGRU: gates, recurrence, o; then o quantized for o_proj. */
            if (!split) {
                for (int64_t b = b0; b < b1; ++b) {
                    mlgru_span(w, a, ops, lp, l, b, heads, &gflat, 0, D);
                    const float *o = w->o + b * D;
                    put_row(w, SLOT_O, b, o, ops->rms(o, D, eps, W), PTR(const float *, lp[PL_O_G]), D,
                            scl[SC_O]);
                }
            } else {
                int64_t k0, k1;
                my_span(D, id, nt, &k0, &k1);
                for (int64_t b = 0; b < B; ++b) mlgru_span(w, a, ops, lp, l, b, heads, &gflat, k0, k1);
                SYNC
                for (int64_t b = 0; b < B; ++b) {
                    const float *o = w->o + b * D;
                    put_row_part(w, SLOT_O, b, o, ops->rms(o, D, eps, W), PTR(const float *, lp[PL_O_G]), D,
                                 scl[SC_O], id, nt);
                }
            }
            SYNC
            if (tiled) {
                pack_act_tiles_share(w, SLOT_O, id, nt);
                SYNC
            }
            {
                /* x = x + attn(...), added as the product stores attn */
                job_t j = slot_job(w, SLOT_O, sums(SLOT_O), PTR(const uint8_t *, lp[PL_O_W]), H, x, far);
                j.residual = 1;
                run_jobs(w, &j, 1, 0, id, nt);
                prefetch_floats(PTR(const float *, lp[PL_MLP_NORM]), H);
                prefetch_floats(PTR(const float *, lp[PL_GATE_G]), H);
            }
            SYNC
            /* h = mlp_norm(x), quantized for gate_proj. */
            if (!split) {
                for (int64_t b = b0; b < b1; ++b) {
                    float *hb = w->h + b * H;
                    ops->norm(x + b * H, PTR(const float *, lp[PL_MLP_NORM]), H, eps, W, hb);
                    put_row(w, SLOT_I, b, hb, ops->rms(hb, H, eps, W), PTR(const float *, lp[PL_GATE_G]), H,
                            scl[SC_GATE]);
                }
            } else {
                for (int64_t b = 0; b < B; ++b) {
                    float *hb = w->hs + (int64_t)id * H;
                    ops->norm(x + b * H, PTR(const float *, lp[PL_MLP_NORM]), H, eps, W, hb);
                    put_row_part(w, SLOT_I, b, hb, ops->rms(hb, H, eps, W), PTR(const float *, lp[PL_GATE_G]), H,
                                 scl[SC_GATE], id, nt);
                }
            }
            SYNC
            if (tiled) {
                pack_act_tiles_share(w, SLOT_I, id, nt);
                SYNC
            }
            {
                const uint8_t *codes = PTR(const uint8_t *, lp[PL_GATE_W]);
                job_t j = slot_job(w, SLOT_I, sums(SLOT_I), codes, 2 * I, w->y, far);
                if (split) { /* the gate and up halves apart, so that each thread multiplies
                              * the rows of both that its part of the GLU needs */
                    job_t halves[2] = {j, j};
                    halves[0].N = halves[1].N = I;
                    halves[1].w = codes + (size_t)I * (size_t)w->nb[SLOT_I] * BLOCK_BYTES;
                    halves[1].out_f32 = w->y + I;
                    run_jobs(w, halves, 2, 1, id, nt);
                } else {
                    run_jobs(w, &j, 1, 0, id, nt);
                }
                prefetch_floats(PTR(const float *, lp[PL_DOWN_G]), I);
            }
            SYNC
            /* silu(gate) * up, quantized for down_proj. */
            {
                int64_t k0 = 0, k1 = I, r0 = b0, r1 = b1;
                if (split) {
                    my_span(I, id, nt, &k0, &k1);
                    r0 = 0;
                    r1 = B;
                }
                for (int64_t b = r0; b < r1 && k0 < k1; ++b) {
                    const float *gate = w->y + b * 2 * I + k0;
                    float *e = w->e1 + b * w->ew + k0;
                    neg_exp_like_torch(gate, e, k1 - k0, b * I + k0, &ggate);
                    ops->glu(gate, gate + I, e, w->u + b * I + k0, k1 - k0);
                }
                if (split) {
                    SYNC
                    for (int64_t b = 0; b < B; ++b) {
                        const float *u = w->u + b * I;
                        put_row_part(w, SLOT_DOWN, b, u, ops->rms(u, I, eps, W), PTR(const float *, lp[PL_DOWN_G]),
                                     I, scl[SC_DOWN], id, nt);
                    }
                }
                for (int64_t b = b0; b < b1 && !split; ++b) {
                    const float *u = w->u + b * I;
                    put_row(w, SLOT_DOWN, b, u, ops->rms(u, I, eps, W), PTR(const float *, lp[PL_DOWN_G]), I,
                            scl[SC_DOWN]);
                }
            }
            SYNC
            if (tiled) {
                pack_act_tiles_share(w, SLOT_DOWN, id, nt);
                SYNC
            }
            {
                /* x = x + mlp(...) */
                job_t j = slot_job(w, SLOT_DOWN, sums(SLOT_DOWN), PTR(const uint8_t *, lp[PL_DOWN_W]), H, x, far);
                j.residual = 1;
                run_jobs(w, &j, 1, 0, id, nt);
                if (l + 1 < L) {
                    const int64_t *next = lp + PLAN_LAYER;
                    const int64_t vecs[4] = {next[PL_ATTN_NORM], next[PL_I_G], next[PL_F_G], next[PL_G_G]};
                    for (int k = 0; k < 4; ++k) prefetch_floats(PTR(const float *, vecs[k]), H);
                } else {
                    prefetch_floats(PTR(const float *, plan[6]), H);
                    prefetch_floats(PTR(const float *, plan[8]), H);
                }
            }
            SYNC
        }
        /* The final norm and the lm_head. */
        for (int64_t b = split ? 0 : b0; b < (split ? B : b1); ++b) {
            float *hb = split ? w->hs + (int64_t)id * H : w->h + b * H;
            ops->norm(x + b * H, PTR(const float *, plan[6]), H, eps, W, hb);
            const float r = ops->rms(hb, H, eps, W);
            if (split)
                put_row_part(w, SLOT_I, b, hb, r, PTR(const float *, plan[8]), H, a->scales[0], id, nt);
            else
                put_row(w, SLOT_I, b, hb, r, PTR(const float *, plan[8]), H, a->scales[0]);
        }
        SYNC
        if (tiled) {
            pack_act_tiles_share(w, SLOT_I, id, nt);
            SYNC
        }
        {
            job_t j = slot_job(w, SLOT_I, sums(SLOT_I), PTR(const uint8_t *, plan[7]), V, a->logits, far);
            run_jobs(w, &j, 1, 0, id, nt);
        }
#undef sums
#undef SYNC
    }
}
