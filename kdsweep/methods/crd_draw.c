/* crd's negatives for one step, counted per sample: the C form of crd.py's draw_negatives followed by
 * count_draws, built and loaded by kdsweep/common/native.py. The same ids to the bit: position p = r * k + c
 * is mixed (the position word), xored with the step's key and mixed again into a uniform 32-bit word u, and
 * its id is u * total >> 32. Only the counts are written, rows x total floats, not the rows x k ids.
 * counts must come in zeroed; r * k must stay below 2^32 (the caller checks).
 */
#include <stdint.h>

#define GOLDEN 0x9E3779B9u
#define BLOCK 4096 /* ids hashed (vectorised) into a buffer, then counted */

static inline uint32_t mix32(uint32_t x) { /* crd.py's _mix32_ ("lowbias32") */
    x ^= x >> 16;
    x *= 0x21F0AAADu;
    x ^= x >> 15;
    x *= 0xD35A2D97u;
    x ^= x >> 15;
    return x;
}

void crd_counted_draws(long rows, long k, uint32_t key, long total, float *counts) {
    uint32_t ids[BLOCK];
    for (long r = 0; r < rows; r++) {
        float *row = counts + r * total;
        for (long start = 0; start < k; start += BLOCK) {
            const long n = k - start < BLOCK ? k - start : BLOCK;
            const uint32_t first = (uint32_t)(r * k + start);
            _Pragma("omp simd") for (long c = 0; c < n; c++) {
                const uint32_t u = mix32(mix32((first + (uint32_t)c) ^ GOLDEN) ^ key);
                ids[c] = (uint32_t)(((uint64_t)u * (uint64_t)total) >> 32);
            }
            for (long c = 0; c < n; c++) row[ids[c]] += 1;
        }
    }
}
