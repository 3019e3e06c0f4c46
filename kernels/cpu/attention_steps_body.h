/* The body of one attention_token_steps_<act> entry point (attention_steps.c includes it once per dtype, with
 * ACT_T / ACT_LOAD / ACT_STORE / ACT_ROUND and ENTRY defined; it undefines them again). Returns 0, or -1 when
 * scratch memory could not be allocated (nothing changed then). */

/* y = round(x / rms(x) * w) then RoPE on its first R dims, each product and sum rounded as torch rounds: one head
 * row of D values from the projection (src) to dst, as fp32 holding activation-dtype values */
static inline void NORM_ROPE(const ACT_T *src, const float *w, float eps, const ACT_T *cos,
                             const ACT_T *sin, int64_t D, int64_t R, float *restrict tmp, float *restrict dst) {
    float ss = 0.0f;
    for (int64_t i = 0; i < D; i++) {
        tmp[i] = ACT_LOAD(src[i]);
        ss += tmp[i] * tmp[i];
    }
    const float rstd = 1.0f / sqrtf(ss / (float)D + eps);
    for (int64_t i = 0; i < D; i++)
        tmp[i] = ACT_ROUND((tmp[i] * rstd) * w[i]);
    const int64_t half = R / 2;
    for (int64_t i = 0; i < R; i++) {
        const float rotated = i < half ? -tmp[i + half] : tmp[i - half];
        dst[i] = ACT_ROUND(ACT_ROUND(tmp[i] * ACT_LOAD(cos[i])) + ACT_ROUND(rotated * ACT_LOAD(sin[i])));
    }
    for (int64_t i = R; i < D; i++)
        dst[i] = tmp[i];
}

int ENTRY(const struct attention_args *a) {
    const int64_t Hq = a->Hq, Hkv = a->Hkv, D = a->D, R = a->R, bs = a->block_size, group = Hq / Hkv;
    int64_t max_ctx = 0, max_n = 0, work = 0;
    for (int64_t s = 0; s < a->num_seqs; s++) {
        max_ctx = a->seqs[4 * s + 2] > max_ctx ? a->seqs[4 * s + 2] : max_ctx;
        max_n = a->seqs[4 * s + 1] > max_n ? a->seqs[4 * s + 1] : max_n;
        work += a->seqs[4 * s + 1] * a->seqs[4 * s + 2];
    }
    if (max_ctx == 0)
        return 0;
    /* work items run on up to `threads` threads, each with its own scratch: each sequence's cache writes, then
     * each (sequence, position, KV head); an item's arithmetic is the same on any thread, so results do not depend
     * on the thread count. One thread where there is little to split */
    const int64_t items = a->num_seqs * max_n * Hkv, wanted = a->threads < items ? a->threads : items;
    /* no more threads than items: each thread's scratch holds a whole context (group x max_ctx floats) */
    const int threads = (int)(wanted > 1 && work * Hq * D >= a->parallel_min_work ? wanted : 1);
    /* per thread -- p: the softmax weights of one KV head's query heads over the context ([group, max_ctx]);
     * q / o: their rows ([group, D] each); sums: their softmax denominators; kf: one cached key or value as fp32 */
    const int64_t per_thread = group * max_ctx + 2 * group * D + group + 2 * D;
    float *scratch = malloc(sizeof(float) * (size_t)(threads * per_thread));
    if (scratch == NULL)
        return -1;

    const ACT_T *qg = (const ACT_T *)a->qg, *kin = (const ACT_T *)a->k, *vin = (const ACT_T *)a->v;
    const ACT_T *cos = (const ACT_T *)a->cos, *sin = (const ACT_T *)a->sin;
    ACT_T *k_cache = (ACT_T *)a->k_cache, *v_cache = (ACT_T *)a->v_cache, *out = (ACT_T *)a->out;

#pragma omp parallel num_threads(threads)
    {
    float *restrict p = scratch + thread_index() * per_thread;
    float *restrict q = p + group * max_ctx, *restrict o = q + group * D, *restrict sums = o + group * D;
    float *restrict kf = sums + group, *restrict tmp = kf + D;

    /* this step's keys (normed, rotated) and values into the cache first: a verify chunk's position j reads the
     * keys of positions < j of the same chunk (the loop ends in a barrier) */
#pragma omp for schedule(static)
    for (int64_t s = 0; s < a->num_seqs; s++) {
        const int64_t row0 = a->seqs[4 * s], n = a->seqs[4 * s + 1];
        for (int64_t j = 0; j < n; j++) {
            const int64_t t = row0 + j, slot = a->slot_mapping[t];
            if (slot < 0)
                continue;
            for (int64_t h = 0; h < Hkv; h++) {
                ACT_T *kdst = k_cache + (slot * Hkv + h) * D, *vdst = v_cache + (slot * Hkv + h) * D;
                NORM_ROPE(kin + t * a->k_stride + h * D, a->k_norm, a->eps, cos + t * R, sin + t * R, D, R, tmp, kf);
                for (int64_t i = 0; i < D; i++)
                    kdst[i] = ACT_STORE(kf[i]);
                memcpy(vdst, vin + t * a->v_stride + h * D, sizeof(ACT_T) * (size_t)D);
            }
        }
    }

#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; item++) {
        const int64_t s = item / (max_n * Hkv), j = item / Hkv % max_n, kvh = item % Hkv;
        const int64_t row0 = a->seqs[4 * s], n = a->seqs[4 * s + 1], ctx = a->seqs[4 * s + 2];
        const int32_t *table = a->block_tables + a->seqs[4 * s + 3] * a->bt_stride;
        if (j >= n)
            continue;
        const int64_t t = row0 + j, len = ctx - n + j + 1; /* this query sees positions 0..len-1 */
        const ACT_T *row = qg + t * a->qg_stride;
        /* the query heads reading this KV head: each key and value is loaded once for all of them */
        for (int64_t g = 0; g < group; g++)
            NORM_ROPE(row + (kvh * group + g) * 2 * D, a->q_norm, a->eps, cos + t * R, sin + t * R, D, R,
                      tmp, q + g * D);
        for (int64_t pos = 0; pos < len; pos++) {
            const ACT_T *key = k_cache + (slot_of(table, bs, pos) * Hkv + kvh) * D;
            for (int64_t i = 0; i < D; i++)
                kf[i] = ACT_LOAD(key[i]);
            for (int64_t g = 0; g < group; g++)
                p[g * max_ctx + pos] = dot_lanes(q + g * D, kf, D) * a->scale;
        }
        for (int64_t g = 0; g < group; g++) {
            float *restrict pg = p + g * max_ctx;
            float m = -INFINITY, l = 0.0f;
            for (int64_t pos = 0; pos < len; pos++)
                m = pg[pos] > m ? pg[pos] : m;
            for (int64_t pos = 0; pos < len; pos++)
                pg[pos] = exp_f(pg[pos] - m);
            for (int64_t pos = 0; pos < len; pos++)
                l += pg[pos];
            sums[g] = l;
            for (int64_t i = 0; i < D; i++)
                o[g * D + i] = 0.0f;
        }
        for (int64_t pos = 0; pos < len; pos++) {
            const ACT_T *val = v_cache + (slot_of(table, bs, pos) * Hkv + kvh) * D;
            for (int64_t i = 0; i < D; i++)
                kf[i] = ACT_LOAD(val[i]);
            for (int64_t g = 0; g < group; g++) {
                const float e = p[g * max_ctx + pos];
                float *restrict og = o + g * D;
                for (int64_t i = 0; i < D; i++)
                    og[i] += e * kf[i];
            }
        }
        for (int64_t g = 0; g < group; g++) {
            const int64_t h = kvh * group + g;
            const ACT_T *gate = row + h * 2 * D + D;
            ACT_T *dst = out + t * Hq * D + h * D;
            for (int64_t i = 0; i < D; i++)
                dst[i] = ACT_STORE(ACT_ROUND(o[g * D + i] / sums[g]) * ACT_ROUND(sigmoid(ACT_LOAD(gate[i]))));
        }
    }
    } /* omp parallel */
    free(scratch);
    return 0;
}

#undef NORM_ROPE
#undef ACT_T
#undef ACT_LOAD
#undef ACT_STORE
#undef ACT_ROUND
#undef ENTRY
