/* trilinear_point.h's statements on eight points at once, in AVX2's eight float lanes.
 *
 * Each lane runs its point's statements in their order, with IEEE operations that round as the
 * scalar ones do (no fused multiply-add: this file targets AVX2 alone), so every lane gives the
 * bits trilinear_point.h gives, which PyTorch gives. A corner outside the image is skipped as
 * there: its lanes keep their sums (a blend, not an added zero) and its voxel is never read
 * (a masked gather). Where a group holds a point whose index a float cannot floor exactly
 * (|index| ≥ 2²³, infinite, NaN: far outside the image), the group runs point by point.
 * A gradient added into the image stays scalar, point after point, so each voxel sums its
 * shares in the order the scalar code does.
 *
 * On a 2 mm brain's squaring (three channels, 1.1 million points, two threads) the forward pass
 * took 12 ms against 16, with both gradients 50 against 60 ms; a warp's (one channel, the
 * grid's gradient) 16 against 25 ms.
 */

#include "trilinear_point.h"

#if defined(DR_AVX2_BUILT)
#include <immintrin.h>

#define DR_AVX2 __attribute__((target("avx2")))

/* Eight points' cells (lane i = point p + i), as Cell: each corner's weights, which lanes'
 * corners lie inside, and their voxels' offsets in the image (int32: see dr_avx2_takes). */
typedef struct {
    __m256i x0, y0, z0;
    __m256 fx[2], fy[2], fz[2];
    __m256 weight[8], in[8];
    __m256i at[8];
} Cells;

int dr_avx2_takes(const Volume *v) {
    const int64_t most = INT32_MAX;
    if (v->channels > most || v->depth > most || v->height > most || v->width > most) return 0;
    const double last = (double)(v->channels - 1) * v->stride_c + (double)(v->depth - 1) * v->stride_d +
                        (double)(v->height - 1) * v->stride_h + (double)(v->width - 1) * v->stride_w;
    return last <= (double)most && __builtin_cpu_supports("avx2");
}

DR_AVX2 static inline __m256 unnormalised8(__m256 coordinate, int64_t size) {
    const __m256 half = _mm256_div_ps(_mm256_add_ps(coordinate, _mm256_set1_ps(1.0f)),
                                      _mm256_set1_ps(2.0f));
    return _mm256_mul_ps(half, _mm256_set1_ps((float)(size - 1)));
}

/* clipped(): a NaN index fails both comparisons and becomes size − 1. */
DR_AVX2 static inline __m256 clipped8(__m256 index, int64_t size) {
    const __m256 zero = _mm256_setzero_ps(), high = _mm256_set1_ps((float)(size - 1));
    const __m256 low = _mm256_blendv_ps(index, zero, _mm256_cmp_ps(index, zero, _CMP_LT_OQ));
    return _mm256_blendv_ps(high, low, _mm256_cmp_ps(low, high, _CMP_LT_OQ));
}

/* unnormalised_with_derivative()'s border clip: the slope times 0 where the index is clipped. */
DR_AVX2 static inline __m256 clipped_with_derivative8(__m256 index, int64_t size, __m256 *slope) {
    const __m256 zero = _mm256_setzero_ps(), high = _mm256_set1_ps((float)(size - 1));
    const __m256 below = _mm256_cmp_ps(index, zero, _CMP_LE_OQ);
    const __m256 above = _mm256_andnot_ps(below, _mm256_cmp_ps(index, high, _CMP_GE_OQ));
    *slope = _mm256_blendv_ps(*slope, _mm256_mul_ps(*slope, zero), _mm256_or_ps(below, above));
    return _mm256_blendv_ps(_mm256_blendv_ps(index, zero, below), high, above);
}

/* Whether every lane's index floors exactly in a float and converts to int32. */
DR_AVX2 static inline int floors_exactly(__m256 ix, __m256 iy, __m256 iz) {
    const __m256 limit = _mm256_set1_ps(8388608.0f), sign = _mm256_set1_ps(-0.0f);
    const __m256 x = _mm256_cmp_ps(_mm256_andnot_ps(sign, ix), limit, _CMP_LT_OQ);
    const __m256 y = _mm256_cmp_ps(_mm256_andnot_ps(sign, iy), limit, _CMP_LT_OQ);
    const __m256 z = _mm256_cmp_ps(_mm256_andnot_ps(sign, iz), limit, _CMP_LT_OQ);
    return _mm256_movemask_ps(_mm256_and_ps(x, _mm256_and_ps(y, z))) == 0xFF;
}

/* 0 ≤ i < size, lane by lane. */
DR_AVX2 static inline __m256i within(__m256i i, int64_t size) {
    return _mm256_and_si256(_mm256_cmpgt_epi32(i, _mm256_set1_epi32(-1)),
                            _mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)size), i));
}

/* locate(): the floor is exact here (floors_exactly), so x0 + 1 as a float is (float)(x0 + 1).
 * corners[k] is corner k's offset in the image (corner_offset). */
DR_AVX2 static inline void locate8(const Volume *v, const int64_t corners[8], __m256 ix,
                                   __m256 iy, __m256 iz, Cells *cell) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 x0 = _mm256_floor_ps(ix), y0 = _mm256_floor_ps(iy), z0 = _mm256_floor_ps(iz);
    cell->fx[0] = _mm256_sub_ps(_mm256_add_ps(x0, one), ix);
    cell->fx[1] = _mm256_sub_ps(ix, x0);
    cell->fy[0] = _mm256_sub_ps(_mm256_add_ps(y0, one), iy);
    cell->fy[1] = _mm256_sub_ps(iy, y0);
    cell->fz[0] = _mm256_sub_ps(_mm256_add_ps(z0, one), iz);
    cell->fz[1] = _mm256_sub_ps(iz, z0);
    cell->x0 = _mm256_cvttps_epi32(x0);
    cell->y0 = _mm256_cvttps_epi32(y0);
    cell->z0 = _mm256_cvttps_epi32(z0);
    const __m256i next = _mm256_set1_epi32(1);
    const __m256i in_x[2] = {within(cell->x0, v->width),
                             within(_mm256_add_epi32(cell->x0, next), v->width)};
    const __m256i in_y[2] = {within(cell->y0, v->height),
                             within(_mm256_add_epi32(cell->y0, next), v->height)};
    const __m256i in_z[2] = {within(cell->z0, v->depth),
                             within(_mm256_add_epi32(cell->z0, next), v->depth)};
    /* Wraps for a corner outside, whose voxel is never read. */
    const __m256i offset = _mm256_add_epi32(
        _mm256_add_epi32(_mm256_mullo_epi32(cell->z0, _mm256_set1_epi32((int32_t)v->stride_d)),
                         _mm256_mullo_epi32(cell->y0, _mm256_set1_epi32((int32_t)v->stride_h))),
        _mm256_mullo_epi32(cell->x0, _mm256_set1_epi32((int32_t)v->stride_w)));
    for (int k = 0; k < 8; ++k) {
        cell->weight[k] = _mm256_mul_ps(_mm256_mul_ps(cell->fx[DX(k)], cell->fy[DY(k)]),
                                        cell->fz[DZ(k)]);
        cell->in[k] = _mm256_castsi256_ps(
            _mm256_and_si256(in_x[DX(k)], _mm256_and_si256(in_y[DY(k)], in_z[DZ(k)])));
        cell->at[k] = _mm256_add_epi32(offset, _mm256_set1_epi32((int32_t)corners[k]));
    }
}

/* Coordinate `axis` (0 = x) of points p … p + 7 of a contiguous (x, y, z) grid. */
DR_AVX2 static inline __m256 coordinates8(const float *grid, int64_t p, int axis) {
    const __m256i every_third = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
    return _mm256_i32gather_ps(grid + 3 * p + axis, every_third, 4);
}

/* Channel c's value at each lane's corner k, zero where it lies outside (then unused). */
DR_AVX2 static inline __m256 corner_values(const Volume *v, const Cells *cell, int64_t c, int k) {
    return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), v->data + c * v->stride_c, cell->at[k],
                                    cell->in[k], 4);
}

/* forward_point() on points p … p + 7; false (nothing written) where they must go one by one. */
DR_AVX2 static int forward8(const Volume *v, const int64_t corners[8], const float *grid,
                            int64_t p, int border, float *out, int64_t points) {
    __m256 ix = unnormalised8(coordinates8(grid, p, 0), v->width);
    __m256 iy = unnormalised8(coordinates8(grid, p, 1), v->height);
    __m256 iz = unnormalised8(coordinates8(grid, p, 2), v->depth);
    if (border) {
        ix = clipped8(ix, v->width);
        iy = clipped8(iy, v->height);
        iz = clipped8(iz, v->depth);
    }
    if (!floors_exactly(ix, iy, iz)) return 0;
    Cells cell;
    locate8(v, corners, ix, iy, iz, &cell);
    for (int64_t c = 0; c < v->channels; ++c) {
        __m256 value = _mm256_setzero_ps();
        for (int k = 0; k < 8; ++k) {
            const __m256 share = _mm256_mul_ps(corner_values(v, &cell, c, k), cell.weight[k]);
            value = _mm256_blendv_ps(value, _mm256_add_ps(value, share), cell.in[k]);
        }
        _mm256_storeu_ps(out + c * points + p, value);
    }
    return 1;
}

DR_AVX2 void dr_forward_range_avx2(const Volume *v, const int64_t corners[8], const float *grid,
                                   int64_t start, int64_t end, int border, float *out,
                                   int64_t points) {
    int64_t p = start;
    for (; p + 8 <= end; p += 8) {
        if (forward8(v, corners, grid, p, border, out, points)) continue;
        for (int64_t q = p; q < p + 8; ++q) forward_point(v, corners, grid, q, border, out, points);
    }
    for (; p < end; ++p) forward_point(v, corners, grid, p, border, out, points);
}

/* Where each lane's first corner and corner k lie in a contiguous C × D × H × W gradient
 * image (channel 0), and which lanes' corners lie inside (bit i: lane i). */
typedef struct {
    int64_t first[8], step[8];
    int in[8];
} Targets;

DR_AVX2 static inline void targets_of(const Volume *v, const Cells *cell, Targets *to) {
    int32_t x0[8], y0[8], z0[8];
    _mm256_storeu_si256((__m256i *)x0, cell->x0);
    _mm256_storeu_si256((__m256i *)y0, cell->y0);
    _mm256_storeu_si256((__m256i *)z0, cell->z0);
    const int64_t plane = v->height * v->width, row = v->width;
    for (int lane = 0; lane < 8; ++lane) {
        to->first[lane] = offset_of(z0[lane], y0[lane], x0[lane], plane, row, 1);
    }
    for (int k = 0; k < 8; ++k) {
        to->step[k] = corner_offset(k, plane, row, 1);
        to->in[k] = _mm256_movemask_ps(cell->in[k]);
    }
}

/* backward_point()'s image gradient for channel c (at `channel` in grad_image) of the eight
 * points, lane after lane. */
DR_AVX2 static inline void add_image_shares(const Cells *cell, const Targets *to, __m256 g,
                                            int64_t channel, float *grad_image) {
    float shares[8][8];
    for (int k = 0; k < 8; ++k) _mm256_storeu_ps(shares[k], _mm256_mul_ps(cell->weight[k], g));
    for (int lane = 0; lane < 8; ++lane) {
        const int64_t first = channel + to->first[lane];
        for (int k = 0; k < 8; ++k) {
            if (to->in[k] >> lane & 1) grad_image[first + to->step[k]] += shares[k][lane];
        }
    }
}

/* backward_point() on points p … p + 7; false (nothing written) where they must go one by one. */
DR_AVX2 static int backward8(const Volume *v, const int64_t corners[8], const float *grid,
                             int64_t p, int border, const float *grad_out, int64_t points,
                             float *grad_image, float *grad_grid) {
    __m256 ix = unnormalised8(coordinates8(grid, p, 0), v->width);
    __m256 iy = unnormalised8(coordinates8(grid, p, 1), v->height);
    __m256 iz = unnormalised8(coordinates8(grid, p, 2), v->depth);
    __m256 x_mult = _mm256_set1_ps((float)(v->width - 1) / 2);
    __m256 y_mult = _mm256_set1_ps((float)(v->height - 1) / 2);
    __m256 z_mult = _mm256_set1_ps((float)(v->depth - 1) / 2);
    if (border) {
        ix = clipped_with_derivative8(ix, v->width, &x_mult);
        iy = clipped_with_derivative8(iy, v->height, &y_mult);
        iz = clipped_with_derivative8(iz, v->depth, &z_mult);
    }
    if (!floors_exactly(ix, iy, iz)) return 0;
    Cells cell;
    locate8(v, corners, ix, iy, iz, &cell);
    Targets to;
    if (grad_image) targets_of(v, &cell, &to);
    const int64_t volume = v->depth * v->height * v->width;
    __m256 gx = _mm256_setzero_ps(), gy = _mm256_setzero_ps(), gz = _mm256_setzero_ps();
    for (int64_t c = 0; c < v->channels; ++c) {
        const __m256 g = _mm256_loadu_ps(grad_out + c * points + p);
        if (grad_image) add_image_shares(&cell, &to, g, c * volume, grad_image);
        if (!grad_grid) continue;
        for (int k = 0; k < 8; ++k) {
            const __m256 value = corner_values(v, &cell, c, k), in = cell.in[k];
            const __m256 fx = cell.fx[DX(k)], fy = cell.fy[DY(k)], fz = cell.fz[DZ(k)];
            const __m256 tx = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(value, fy), fz), g);
            const __m256 ty = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(value, fx), fz), g);
            const __m256 tz = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(value, fx), fy), g);
            gx = _mm256_blendv_ps(gx, DX(k) ? _mm256_add_ps(gx, tx) : _mm256_sub_ps(gx, tx), in);
            gy = _mm256_blendv_ps(gy, DY(k) ? _mm256_add_ps(gy, ty) : _mm256_sub_ps(gy, ty), in);
            gz = _mm256_blendv_ps(gz, DZ(k) ? _mm256_add_ps(gz, tz) : _mm256_sub_ps(gz, tz), in);
        }
    }
    if (grad_grid) {
        float x[8], y[8], z[8];
        _mm256_storeu_ps(x, _mm256_mul_ps(x_mult, gx));
        _mm256_storeu_ps(y, _mm256_mul_ps(y_mult, gy));
        _mm256_storeu_ps(z, _mm256_mul_ps(z_mult, gz));
        for (int lane = 0; lane < 8; ++lane) {
            grad_grid[3 * (p + lane)] = x[lane];
            grad_grid[3 * (p + lane) + 1] = y[lane];
            grad_grid[3 * (p + lane) + 2] = z[lane];
        }
    }
    return 1;
}

DR_AVX2 void dr_backward_range_avx2(const Volume *v, const int64_t corners[8], const float *grid,
                                    int64_t start, int64_t end, int border,
                                    const float *grad_out, int64_t points, float *grad_image,
                                    float *grad_grid) {
    int64_t p = start;
    for (; p + 8 <= end; p += 8) {
        if (backward8(v, corners, grid, p, border, grad_out, points, grad_image, grad_grid)) {
            continue;
        }
        for (int64_t q = p; q < p + 8; ++q) {
            backward_point(v, corners, grid, q, border, grad_out, points, grad_image, grad_grid);
        }
    }
    for (; p < end; ++p) {
        backward_point(v, corners, grid, p, border, grad_out, points, grad_image, grad_grid);
    }
}
#endif
