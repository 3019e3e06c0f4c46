/* The body of one rms_norm_zc_<act> entry point (norms.c includes it once per dtype, with ACT_T / ACT_LOAD /
 * ACT_STORE and ENTRY defined; it undefines them again). Returns 0, or -1 when scratch memory could
 * not be allocated (nothing written then). */

int ENTRY(const struct rms_norm_args *a) {
    const int64_t dim = a->dim;
    float stack[4096];
    float *t = dim <= 2048 ? stack : malloc(sizeof(float) * (size_t)(2 * dim));
    if (t == NULL)
        return -1;
    float *restrict row = t, *restrict factor = t + dim;
    const ACT_T *w = (const ACT_T *)a->weight;
    for (int64_t i = 0; i < dim; i++)
        factor[i] = 1.0f + ACT_LOAD(w[i]);
    for (int64_t r = 0; r < a->rows; r++) {
        const ACT_T *x = (const ACT_T *)a->x + r * a->x_stride;
        if (a->residual != NULL) {
            const ACT_T *res = (const ACT_T *)a->residual + r * a->residual_stride;
            ACT_T *sum = (ACT_T *)a->sum_out + r * dim;
            for (int64_t i = 0; i < dim; i++) {
                sum[i] = ACT_STORE(ACT_LOAD(x[i]) + ACT_LOAD(res[i]));
                row[i] = ACT_LOAD(sum[i]);
            }
        } else {
            for (int64_t i = 0; i < dim; i++)
                row[i] = ACT_LOAD(x[i]);
        }
        const float rstd = 1.0f / sqrtf(dot_lanes(row, row, dim) / (float)dim + a->eps);
        ACT_T *out = (ACT_T *)a->out + r * dim;
        for (int64_t i = 0; i < dim; i++)
            out[i] = ACT_STORE((row[i] * rstd) * factor[i]);
    }
    if (t != stack)
        free(t);
    return 0;
}

#undef ACT_T
#undef ACT_LOAD
#undef ACT_STORE
#undef ENTRY
