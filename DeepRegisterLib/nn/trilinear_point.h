/* One point of PyTorch's 3D trilinear grid sampling (float32, corners aligned, zero or border
 * padding), forward and backward: the statements trilinear.c runs point by point, and
 * trilinear_avx2.c where a group of eight points needs them one at a time.
 *
 * Each arithmetic statement is PyTorch's own (aten/src/ATen/native/GridSampler.cpp), in its
 * order, so that the compiler rounds it the same way: the outputs and gradients are PyTorch's
 * bits, which the tests check.
 */

#ifndef DR_TRILINEAR_POINT_H
#define DR_TRILINEAR_POINT_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* One input image (one batch entry): C channels of D × H × W voxels, any strides. */
typedef struct {
    const float *data;
    int64_t channels, depth, height, width;
    int64_t stride_c, stride_d, stride_h, stride_w;
} Volume;

/* grid_sample's coordinate in [-1, 1], corners aligned, as a voxel index. */
static inline float unnormalised(float coordinate, int64_t size) {
    return ((coordinate + 1) / 2) * (size - 1);
}

/* std::min(size - 1, std::max(index, 0)), as PyTorch clips for border padding (NaN → size − 1). */
static inline float clipped(float index, int64_t size) {
    float low = index < 0.0f ? 0.0f : index;
    float high = (float)(size - 1);
    return low < high ? low : high;
}

/* The backward pass's index and its derivative with respect to the grid coordinate. */
static inline float unnormalised_with_derivative(float coordinate, int64_t size, int border,
                                                 float *derivative) {
    float slope = (float)(size - 1) / 2;
    float index = unnormalised(coordinate, size);
    if (border) {
        float high = (float)(size - 1);
        if (index <= 0.0f) {
            slope = slope * 0.0f;
            index = 0.0f;
        } else if (index >= high) {
            slope = slope * 0.0f;
            index = high;
        } else {
            slope = slope * 1.0f;
        }
    }
    *derivative = slope;
    return index;
}

/* z · stride_z + y · stride_y + x · stride_x without signed overflow: a corner far outside
 * the image (a point at 1e30, or NaN, whose index is INT64_MIN) gives an offset that is only
 * used when a corner of its cell lies inside, where the sum is exact. */
static inline int64_t offset_of(int64_t z, int64_t y, int64_t x, int64_t stride_z,
                                int64_t stride_y, int64_t stride_x) {
    return (int64_t)((uint64_t)z * (uint64_t)stride_z + (uint64_t)y * (uint64_t)stride_y +
                     (uint64_t)x * (uint64_t)stride_x);
}

static inline int inside(const Volume *v, int64_t z, int64_t y, int64_t x) {
    return z >= 0 && z < v->depth && y >= 0 && y < v->height && x >= 0 && x < v->width;
}

/* The eight corners of a cell in PyTorch's order (t/b = z0/z1, n/s = y0/y1, w/e = x0/x1): corner
 * k lies at z0 + DZ(k), y0 + DY(k), x0 + DX(k). */
#define DX(k) ((k) & 1)
#define DY(k) (((k) >> 1) & 1)
#define DZ(k) ((k) >> 2)

/* A point's cell: its first corner, each axis's two fractions (fx[0] = x1 − x, fx[1] = x − x0;
 * a corner's weight along x is fx[DX(k)]), the corners' weights and which corners lie inside. */
typedef struct {
    int64_t x0, y0, z0, offset;
    float fx[2], fy[2], fz[2];
    float weight[8];
    int in[8];
} Cell;

static inline void locate(const Volume *v, float ix, float iy, float iz, Cell *cell) {
    int64_t x0 = (int64_t)floorf(ix), y0 = (int64_t)floorf(iy), z0 = (int64_t)floorf(iz);
    cell->x0 = x0;
    cell->y0 = y0;
    cell->z0 = z0;
    cell->offset = offset_of(z0, y0, x0, v->stride_d, v->stride_h, v->stride_w);
    cell->fx[0] = (x0 + 1) - ix;
    cell->fx[1] = ix - x0;
    cell->fy[0] = (y0 + 1) - iy;
    cell->fy[1] = iy - y0;
    cell->fz[0] = (z0 + 1) - iz;
    cell->fz[1] = iz - z0;
    for (int k = 0; k < 8; ++k) {
        /* PyTorch's tnw = (ix_bse − ix) · (iy_bse − iy) · (iz_bse − iz), and so on: x, y, z. */
        cell->weight[k] = cell->fx[DX(k)] * cell->fy[DY(k)] * cell->fz[DZ(k)];
        cell->in[k] = inside(v, z0 + DZ(k), y0 + DY(k), x0 + DX(k));
    }
}

/* Corner k's offset from the first corner, for an image with these strides. */
static inline int64_t corner_offset(int k, int64_t stride_z, int64_t stride_y, int64_t stride_x) {
    return DZ(k) * stride_z + DY(k) * stride_y + DX(k) * stride_x;
}

/* Samples point p of grid (x, y, z per point, contiguous) into out, channel c at
 * out[c * points + p]; corners[k] is corner k's offset in the image (corner_offset). */
static inline void forward_point(const Volume *v, const int64_t corners[8], const float *grid,
                                 int64_t p, int border, float *out, int64_t points) {
    float ix = unnormalised(grid[3 * p], v->width);
    float iy = unnormalised(grid[3 * p + 1], v->height);
    float iz = unnormalised(grid[3 * p + 2], v->depth);
    if (border) {
        ix = clipped(ix, v->width);
        iy = clipped(iy, v->height);
        iz = clipped(iz, v->depth);
    }
    Cell cell;
    locate(v, ix, iy, iz, &cell);
    for (int64_t c = 0; c < v->channels; ++c) {
        const int64_t base = c * v->stride_c + cell.offset;
        float value = 0.0f;
        for (int k = 0; k < 8; ++k) {
            if (cell.in[k]) value += v->data[base + corners[k]] * cell.weight[k];
        }
        out[c * points + p] = value;
    }
}

/* One point's share of the gradients: added into grad_image (contiguous C × D × H × W, zeroed
 * by the caller, one buffer per range of points) unless NULL, and the point's grid gradient
 * written to grad_grid[3p …] unless NULL. PyTorch's statements, corner by corner: for tnw,
 * gix −= tnw_val · (iy_bse − iy) · (iz_bse − iz) · gOut, and so on, each axis's term added for
 * a corner on its far side and subtracted for one on its near side. */
static inline void backward_point(const Volume *v, const int64_t corners[8], const float *grid,
                                  int64_t p, int border, const float *grad_out,
                                  int64_t grad_out_channel_stride, float *grad_image,
                                  float *grad_grid) {
    float gx_mult, gy_mult, gz_mult;
    float ix = unnormalised_with_derivative(grid[3 * p], v->width, border, &gx_mult);
    float iy = unnormalised_with_derivative(grid[3 * p + 1], v->height, border, &gy_mult);
    float iz = unnormalised_with_derivative(grid[3 * p + 2], v->depth, border, &gz_mult);
    Cell cell;
    locate(v, ix, iy, iz, &cell);
    const int64_t plane = v->height * v->width, row = v->width, volume = v->depth * plane;
    const int64_t grad_offset = offset_of(cell.z0, cell.y0, cell.x0, plane, row, 1);
    int64_t grad_corners[8];
    for (int k = 0; k < 8; ++k) grad_corners[k] = corner_offset(k, plane, row, 1);
    const float *fx = cell.fx, *fy = cell.fy, *fz = cell.fz;
    float gx = 0.0f, gy = 0.0f, gz = 0.0f;
    for (int64_t c = 0; c < v->channels; ++c) {
        const float g = grad_out[c * grad_out_channel_stride + p];
        if (grad_image) {
            for (int k = 0; k < 8; ++k) {
                if (cell.in[k]) grad_image[c * volume + grad_offset + grad_corners[k]] += cell.weight[k] * g;
            }
        }
        if (!grad_grid) continue;
        const int64_t base = (int64_t)((uint64_t)(c * v->stride_c) + (uint64_t)cell.offset);
        for (int k = 0; k < 8; ++k) {
            if (!cell.in[k]) continue;
            const float value = v->data[base + corners[k]];
            const int dx = DX(k), dy = DY(k), dz = DZ(k);
            const float tx = value * fy[dy] * fz[dz] * g;
            const float ty = value * fx[dx] * fz[dz] * g;
            const float tz = value * fx[dx] * fy[dy] * g;
            gx = dx ? gx + tx : gx - tx;
            gy = dy ? gy + ty : gy - ty;
            gz = dz ? gz + tz : gz - tz;
        }
    }
    if (grad_grid) {
        grad_grid[3 * p] = gx_mult * gx;
        grad_grid[3 * p + 1] = gy_mult * gy;
        grad_grid[3 * p + 2] = gz_mult * gz;
    }
}

/* Eight points at a time where the compiler can target AVX2 (trilinear_avx2.c); whether this
 * machine has it is asked when the library runs. DR_WITHOUT_AVX2 builds without (a test does). */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(DR_WITHOUT_AVX2)
#define DR_AVX2_BUILT 1
#define DR_HIDDEN __attribute__((visibility("hidden")))
DR_HIDDEN int dr_avx2_takes(const Volume *v);
DR_HIDDEN void dr_forward_range_avx2(const Volume *v, const int64_t corners[8], const float *grid,
                                     int64_t start, int64_t end, int border, float *out,
                                     int64_t points);
DR_HIDDEN void dr_backward_range_avx2(const Volume *v, const int64_t corners[8],
                                      const float *grid, int64_t start, int64_t end, int border,
                                      const float *grad_out, int64_t points, float *grad_image,
                                      float *grad_grid);
#endif

#endif
