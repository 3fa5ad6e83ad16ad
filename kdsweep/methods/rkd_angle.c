/* rkd's angle term and its gradient in one pass over the anchors' pairs: the C form of rkd.py's _AngleLoss,
 * built and loaded by kdsweep/common/native.py.
 *
 * For each anchor i and pair (j, k), with h_ij = g_ij - g_ii / 2 and u_ij = 1 / d_ij (0 on the diagonal):
 *   raw = (g_jk - h_ij - h_ik) u_ij u_ik,  A = clamp(raw, -1, 1)   (the student's; A_t the teacher's)
 *   loss += smooth_l1(A - A_t)  (beta 1: c (d - c / 2) with d = A - A_t, c = clamp(d, -1, 1))
 * and the gradient with respect to the student's g, h and u, as _AngleLoss returns it before its last scaling:
 *   dg[j][k] = sum_i e_ijk,  sh[i][j] = sum_k e_ijk,  su[i][j] = sum_k c' raw,  e = c' u_ij u_ik,
 * with c' = c where -1 <= raw <= 1 (where the clamp passes the gradient, as torch's does) and 0 elsewhere.
 * The terms are symmetric in j and k, so k < j is computed once and counted for (j, k) and (k, j); the
 * diagonal k = j once. n^3 / 2 terms in one vectorised loop, against _AngleLoss's nineteen passes over n^3.
 * dg, sh and su must come in zeroed; returns the loss's sum (in double).
 */

#define CLAMP1(x) ((x) < -1 ? -1 : ((x) > 1 ? 1 : (x))) /* NaN stays NaN, as torch.clamp keeps it */

#define ANGLE(NAME, T)                                                                                     \
    double NAME(long n, const T *g, const T *h, const T *u, const T *gt, const T *ht, const T *ut, T *dg, \
                T *sh, T *su) {                                                                            \
        double total = 0;                                                                                  \
        for (long i = 0; i < n; i++) {                                                                     \
            const T *hi = h + i * n, *ui = u + i * n, *hti = ht + i * n, *uti = ut + i * n;                \
            T *shi = sh + i * n, *sui = su + i * n;                                                        \
            for (long j = 0; j < n; j++) {                                                                 \
                const T hij = hi[j], uij = ui[j], htij = hti[j], utij = uti[j];                            \
                const T *gj = g + j * n, *gtj = gt + j * n;                                                \
                T *dgj = dg + j * n;                                                                       \
                T part = 0, rh = 0, ru = 0;                                                                \
                /* k < j stands for (j, k) and (k, j), weight 2; k = j once. One loop with masks: the same loop   \
                 * stopping at k < j, with the diagonal after it, ran at half the speed (gcc 12, AVX-512). */     \
                _Pragma("omp simd reduction(+ : part, rh, ru)") for (long k = 0; k <= j; k++) {           \
                    const T uu = uij * ui[k];                                                              \
                    const T raw = (gj[k] - hij - hi[k]) * uu;                                              \
                    const T d = CLAMP1(raw) - CLAMP1((gtj[k] - htij - hti[k]) * (utij * uti[k]));          \
                    const T c = CLAMP1(d);                                                                 \
                    part += (k < j ? 2 : 1) * (c * (d - (T)0.5 * c));                                      \
                    const T gr = (raw >= -1 && raw <= 1) ? c : 0;                                          \
                    const T ge = gr * uu, gx = gr * raw;                                                   \
                    dgj[k] += ge;                                                                          \
                    rh += ge; /* as the pair (j, k) */                                                     \
                    ru += gx;                                                                              \
                    if (k < j) {                                                                           \
                        shi[k] += ge; /* as the pair (k, j) */                                             \
                        sui[k] += gx;                                                                      \
                    }                                                                                      \
                }                                                                                          \
                total += part;                                                                             \
                shi[j] += rh;                                                                              \
                sui[j] += ru;                                                                              \
            }                                                                                              \
        }                                                                                                  \
        for (long j = 0; j < n; j++) /* dg is symmetric: the lower triangle above, mirrored */            \
            for (long k = 0; k < j; k++) dg[k * n + j] = dg[j * n + k];                                    \
        return total;                                                                                      \
    }

ANGLE(rkd_angle_f32, float)
ANGLE(rkd_angle_f64, double)
