/* The body of one deltanet_token_steps_<act>_<state> entry point (deltanet_steps.c includes it once per pair, with
 * ACT_T / ACT_LOAD / ACT_STORE / ACT_ROUND, STATE_T / STATE_LOAD / STATE_STORE / STATE_IS_F32 and ENTRY defined;
 * it undefines them again). Returns 0, or -1 when scratch memory could not be allocated (nothing changed then). */

int ENTRY(const struct deltanet_args *a) {
    const int64_t Hk = a->Hk, Hv = a->Hv, dk = a->dk, dv = a->dv, K = a->K;
    const int64_t r = Hv / Hk, key_dim = Hk * dk, value_dim = Hv * dv, D = 2 * key_dim + value_dim;
    const int64_t group = 2 * dk + 2 * r * dv; /* one key head's qkvz columns: [q | k | v (r heads) | z (r heads)] */
    const float scale = (float)pow((double)dk, -0.5);
    int64_t rows = 0; /* the token-step rows of all the sequences: y holds each one's conv output */
    for (int64_t s = 0; s < a->num_seqs; s++)
        rows += a->seqs[5 * s + 1];
    if (rows == 0)
        return 0;
    /* work items run on up to `threads` threads, each with its own scratch: the conv of each sequence, then each
     * (sequence, value head); an item's arithmetic is the same on any thread, so results do not depend on the
     * thread count. One thread where there is little to split (the parallel region's start costs ~1-2 us) */
    const int64_t items = a->num_seqs * Hv, wanted = a->threads < items ? a->threads : items;
    const int threads = (int)(wanted > 1 && rows * Hv * dk * dv >= a->parallel_min_work ? wanted : 1);
    /* y: the conv outputs of every row (act values as fp32); per thread: x, one position's conv input, then the
     * head's vectors and (bf16 pool) its state in fp32 */
    const int64_t per_thread = D + 2 * dk + 3 * dv + (STATE_IS_F32 ? 0 : dk * dv);
    /* y_row: where each sequence's rows start in y (packed: the batch's other rows, a prefill chunk's, have none) */
    int64_t *y_row = malloc(sizeof(int64_t) * (size_t)a->num_seqs);
    float *y = malloc(sizeof(float) * (size_t)(rows * D + threads * per_thread));
    if (y == NULL || y_row == NULL) {
        free(y);
        free(y_row);
        return -1;
    }
    for (int64_t s = 0, at = 0; s < a->num_seqs; at += a->seqs[5 * s + 1], s++)
        y_row[s] = at;

    const ACT_T *qkvz = (const ACT_T *)a->qkvz, *ba = (const ACT_T *)a->ba;
    ACT_T *conv_pool = (ACT_T *)a->conv_state, *spec_conv = (ACT_T *)a->spec_conv, *out = (ACT_T *)a->out;
    STATE_T *ssm_pool = (STATE_T *)a->ssm_state, *spec_ssm = (STATE_T *)a->spec_ssm;
    const int64_t conv_row = (K - 1) * D, head_state = dk * dv;

#pragma omp parallel num_threads(threads)
    {
    /* restrict: the compiler may vectorise the row loops only when it knows these never overlap */
    float *restrict x = y + rows * D + thread_index() * per_thread, *restrict qn = x + D, *restrict kn = qn + dk;
    float *restrict kv = kn + dk, *restrict o = kv + dv, *restrict u = o + dv;
#if !STATE_IS_F32
    float *restrict scratch = u + dv; /* one head's state in fp32 when the pool holds bf16 */
#endif

#pragma omp for schedule(static)
    for (int64_t s = 0; s < a->num_seqs; s++) {
        const int64_t row0 = a->seqs[5 * s], n = a->seqs[5 * s + 1], slot = a->seqs[5 * s + 2];
        const int fresh = a->seqs[5 * s + 3] != 0, verify = a->seqs[5 * s + 4] != 0 && spec_conv != NULL;
        if (n == 0)
            continue;
        ACT_T *hist = conv_pool + slot * conv_row; /* [K-1, D], oldest first */
        if (fresh)
            for (int64_t i = 0; i < conv_row; i++)
                hist[i] = ACT_STORE(0.0f);

        /* causal conv + SiLU, position by position: kernels/conv1d/reference.py */
        for (int64_t j = 0; j < n; j++) {
            const ACT_T *row = qkvz + (row0 + j) * a->qkvz_stride;
            for (int64_t h = 0; h < Hk; h++) {
                const ACT_T *g = row + h * group;
                for (int64_t i = 0; i < dk; i++) {
                    x[h * dk + i] = ACT_LOAD(g[i]);
                    x[key_dim + h * dk + i] = ACT_LOAD(g[dk + i]);
                }
                for (int64_t i = 0; i < r * dv; i++)
                    x[2 * key_dim + h * r * dv + i] = ACT_LOAD(g[2 * dk + i]);
            }
            float *restrict yj = y + (y_row[s] + j) * D;
            for (int64_t c = 0; c < D; c++)
                yj[c] = 0.0f;
            for (int64_t t = 0; t < K - 1; t++) {
                const ACT_T *h = hist + t * D;
                const float *w = a->conv_weight + t * D;
                for (int64_t c = 0; c < D; c++)
                    yj[c] += ACT_LOAD(h[c]) * w[c];
            }
            const float *w_last = a->conv_weight + (K - 1) * D;
            for (int64_t c = 0; c < D; c++)
                yj[c] = ACT_ROUND(silu(yj[c] + x[c] * w_last[c]));
            for (int64_t t = 0; t + 1 < K - 1; t++)
                memcpy(hist + t * D, hist + (t + 1) * D, sizeof(ACT_T) * (size_t)D);
            for (int64_t c = 0; c < D; c++)
                hist[(K - 2) * D + c] = ACT_STORE(x[c]);
            if (verify && j < n - 1)
                memcpy(spec_conv + (slot * a->k_max + j) * conv_row, hist, sizeof(ACT_T) * (size_t)conv_row);
        }
    }

    /* gates, gated delta rule and gated RMSNorm, head by head (after every conv: the loop above ends in a
     * barrier): gated_delta_rule/reference.py, norms/ */
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; item++) {
        const int64_t s = item / Hv, hv = item % Hv;
        const int64_t row0 = a->seqs[5 * s], n = a->seqs[5 * s + 1], slot = a->seqs[5 * s + 2];
        const int fresh = a->seqs[5 * s + 3] != 0, verify = a->seqs[5 * s + 4] != 0 && spec_conv != NULL;
        if (n == 0)
            continue;
        const int64_t kh = hv / r, hi = hv % r;
        STATE_T *pool_head = ssm_pool + (slot * Hv + hv) * head_state;
#if STATE_IS_F32
        float *restrict S = pool_head; /* advanced in place */
        if (fresh)
            memset(S, 0, sizeof(float) * (size_t)head_state);
#else
        float *restrict S = scratch;
        for (int64_t i = 0; i < head_state; i++)
            S[i] = fresh ? 0.0f : STATE_LOAD(pool_head[i]);
#endif
        for (int64_t j = 0; j < n; j++) {
            const float *yj = y + (y_row[s] + j) * D;
            const ACT_T *bav = ba + (row0 + j) * a->ba_stride + kh * 2 * r;
            float sq = 0.0f, sk = 0.0f;
            for (int64_t i = 0; i < dk; i++) {
                sq += yj[kh * dk + i] * yj[kh * dk + i];
                sk += yj[key_dim + kh * dk + i] * yj[key_dim + kh * dk + i];
            }
            const float rq = 1.0f / sqrtf(sq + 1e-6f), rk = 1.0f / sqrtf(sk + 1e-6f);
            for (int64_t i = 0; i < dk; i++) {
                qn[i] = (yj[kh * dk + i] * rq) * scale;
                kn[i] = yj[key_dim + kh * dk + i] * rk;
            }
            const float beta = ACT_ROUND(sigmoid(ACT_LOAD(bav[hi])));
            const float decay = exp_f(a->neg_A[hv] * softplus(ACT_LOAD(bav[r + hi]) + a->dt_bias[hv]));
            /* S *= decay; kv = S^T k */
            for (int64_t e = 0; e < dv; e++)
                kv[e] = 0.0f;
            for (int64_t i = 0; i < dk; i++) {
                float *restrict Si = S + i * dv;
                const float ki = kn[i];
                for (int64_t e = 0; e < dv; e++) {
                    Si[e] = Si[e] * decay;
                    kv[e] += ki * Si[e];
                }
            }
            const float *v = yj + 2 * key_dim + hv * dv;
            for (int64_t e = 0; e < dv; e++) {
                u[e] = (v[e] - kv[e]) * beta;
                o[e] = 0.0f;
            }
            /* S += k u^T; o = S^T q */
            for (int64_t i = 0; i < dk; i++) {
                float *restrict Si = S + i * dv;
                const float ki = kn[i], qi = qn[i];
                for (int64_t e = 0; e < dv; e++) {
                    Si[e] = Si[e] + ki * u[e];
                    o[e] += qi * Si[e];
                }
            }
            if (verify && j < n - 1) {
                STATE_T *dst = spec_ssm + ((slot * a->k_max + j) * Hv + hv) * head_state;
                for (int64_t i = 0; i < head_state; i++)
                    dst[i] = STATE_STORE(S[i]);
            }
            /* y = w * rms_norm(o) (rounded as torch rounds), times silu(z) */
            float ss = 0.0f;
            for (int64_t e = 0; e < dv; e++) {
                o[e] = ACT_ROUND(o[e]);
                ss += o[e] * o[e];
            }
            const float rr = 1.0f / sqrtf(ss / (float)dv + a->eps);
            const ACT_T *z = qkvz + (row0 + j) * a->qkvz_stride + kh * group + 2 * dk + r * dv + hi * dv;
            ACT_T *dst = out + (row0 + j) * value_dim + hv * dv;
            for (int64_t e = 0; e < dv; e++) {
                const float normed = ACT_ROUND(a->norm_weight[e] * ACT_ROUND(o[e] * rr));
                dst[e] = ACT_STORE(normed * silu(ACT_LOAD(z[e])));
            }
        }
#if !STATE_IS_F32
        for (int64_t i = 0; i < head_state; i++)
            pool_head[i] = STATE_STORE(S[i]);
#endif
    }
    } /* omp parallel */
    free(y);
    free(y_row);
    return 0;
}

#undef ACT_T
#undef ACT_LOAD
#undef ACT_STORE
#undef ACT_ROUND
#undef STATE_T
#undef STATE_LOAD
#undef STATE_STORE
#undef STATE_IS_F32
#undef ENTRY
