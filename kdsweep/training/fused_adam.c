/* One Adam or AdamW update of K stacked members in one pass per element: the C form of fused.py's
 * FusedOptimizer.step for Adam, built and loaded by kdsweep/common/native.py.
 *
 * p, g, m, v: (K, n) float32, contiguous (parameters, gradients, exp_avg, exp_avg_sq); member k's own
 * scalars at [k]: w1 = 1 - beta1, step_size = lr / (1 - beta1^t), wd (Adam's L2 term, mode 1) and decay
 * = 1 - lr wd (AdamW's decoupled decay, mode 2); mode 0 has no decay term. Each element, as torch's ops
 * compute it in FusedOptimizer.step:
 *   mode 1: g = g + p wd            mode 2: p = p decay
 *   m = lerp(m, g, w1)              as torch's vectorised lerp: fma(w, g - m, m), or fma(w - 1, g - m, g) for w >= 1/2
 *   v = fma((1 - beta2) g, g, v beta2)           as torch's addcmul_: fma(value t1, t2, self)
 *   p = fma(-(m / (sqrt(v) / bc2_sqrt + eps)), step_size, p)
 * The same values as torch's ops up to float rounding: sqrtf here is correctly rounded, torch's vectorised
 * sqrt (Sleef) is within an ulp of it. One pass reads and writes each of the four tensors once, where
 * torch's ops make eight passes over them (nine with a decay term), each from memory for a group's parameters.
 */

#include <math.h>
#include <stdint.h>

void fused_adam_f32(float *restrict p, const float *restrict g, float *restrict m, float *restrict v, int64_t K,
                    int64_t n, const float *restrict w1, const float *restrict step_size, const float *restrict wd,
                    const float *restrict decay, float bc2_sqrt, float beta2, float one_minus_beta2, float eps,
                    int mode) {
    for (int64_t k = 0; k < K; k++) {
        const float w = w1[k], s = step_size[k], l2 = wd[k], c = decay[k];
        const int small = w < 0.5f;
        float *restrict pk = p + k * n, *restrict mk = m + k * n, *restrict vk = v + k * n;
        const float *restrict gk = g + k * n;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            float pi = pk[i], gi = gk[i];
            if (mode == 1)
                gi = gi + pi * l2;
            else if (mode == 2)
                pi = pi * c;
            const float d = gi - mk[i];
            const float mi = small ? fmaf(w, d, mk[i]) : fmaf(w - 1.0f, d, gi);
            const float vi = fmaf(one_minus_beta2 * gi, gi, vk[i] * beta2);
            mk[i] = mi;
            vk[i] = vi;
            pk[i] = fmaf(-(mi / (sqrtf(vi) / bc2_sqrt + eps)), s, pi);
        }
    }
}
