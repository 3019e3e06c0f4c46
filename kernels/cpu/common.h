/* What the C kernels for CPUs share: bf16 <-> fp32 as torch converts, a dot product summed in a fixed order, and
 * exp / sigmoid / SiLU in plain float arithmetic that the compiler vectorises. */

#ifndef QNEXT_CPU_COMMON_H
#define QNEXT_CPU_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16_t;

static inline float bf16_load(bf16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* fp32 -> bf16, round to nearest even (torch's conversion); NaN stays a quiet NaN */
static inline bf16_t bf16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

static inline float bf16_round(float f) { return bf16_load(bf16_store(f)); }

static inline float f32_load(float x) { return x; }
static inline float f32_store(float f) { return f; }
static inline float f32_round(float f) { return f; }

/* exp(x) in plain float arithmetic, so the compiler vectorises the loops calling it (libm's expf is a call per
 * element: the conv's and the gate's SiLU over every channel took most of a call). x = n ln2 + r with |r| <= ln2/2
 * (ln2 in two parts, Cody-Waite), exp(r) by Cephes' expf polynomial (~1 ulp), 2^n put into the exponent bits.
 * Arguments are clamped to [-87, 88] (2^n stays a normal float: exp(-87) ~ 1.6e-38 stands in for the underflow
 * to 0, exp(88) ~ 1.7e38 for the overflow); NaN stays NaN (both comparisons are false). */
static inline float exp_f(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it leaves round(x / ln2) in the low mantissa bits */
    const float t = x * 1.44269504088896341f + magic;
    const float n = t - magic;
    int32_t t_bits, magic_bits;
    memcpy(&t_bits, &t, sizeof t_bits);
    memcpy(&magic_bits, &magic, sizeof magic_bits);
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    const float p = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r
                      + 1.6666665459e-1f) * r + 5.0000001201e-1f) * (r * r) + r + 1.0f;
    const uint32_t scale_bits = (uint32_t)(t_bits - magic_bits + 127) << 23;
    float scale;
    memcpy(&scale, &scale_bits, sizeof scale);
    return p * scale;
}

typedef float vf8 __attribute__((vector_size(32))); /* 8 fp32 lanes: one AVX register, two NEON ones */

/* sum of a[i] * b[i] over n floats: 8 lane sums (lane l takes i = l mod 8, in order of i), then a fixed tree.
 * Vectorised by construction, and the same order in every call */
static inline float dot_lanes(const float *a, const float *b, int64_t n) {
    vf8 acc = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        vf8 x, y;
        memcpy(&x, a + i, sizeof x);
        memcpy(&y, b + i, sizeof y);
        acc += x * y;
    }
    float part[8];
    memcpy(part, &acc, sizeof part);
    for (; i < n; i++)
        part[i % 8] += a[i] * b[i];
    return ((part[0] + part[4]) + (part[2] + part[6])) + ((part[1] + part[5]) + (part[3] + part[7]));
}

/* The OpenMP thread running the caller (0 in a library built without OpenMP, whose pragmas are then ignored): the
 * passes that split their work give each thread its own scratch. How many threads a pass may use comes from the
 * caller (kernels/cpu openmp_threads: torch's own pool, or one). */
#ifdef _OPENMP
#include <omp.h>
static inline int thread_index(void) { return omp_get_thread_num(); }
#else
static inline int thread_index(void) { return 0; }
#endif

static inline float silu(float x) { return x / (1.0f + exp_f(-x)); }
static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_f(-x)); }
static inline float softplus(float x) { return x > 20.0f ? x : log1pf(exp_f(x)); } /* F.softplus, threshold 20 */

#endif
