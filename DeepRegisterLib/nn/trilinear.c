/* PyTorch's 3D trilinear grid sampling (float32, corners aligned, zero or border padding),
 * forward and backward, over a range of output points: see trilinear_sampler.py.
 *
 * Each arithmetic statement is PyTorch's own (aten/src/ATen/native/GridSampler.cpp), in its
 * order, so that the compiler rounds it the same way: the outputs and gradients are PyTorch's
 * bits, which the tests check. What differs is what PyTorch pays around them: this code runs
 * one image's points in ranges on several threads of the caller's, where PyTorch's CPU kernel
 * runs one thread per batch entry, and it needs no batch of expanded copies to do so.
 *
 * The functions are called through ctypes, which releases the interpreter lock. For pip,
 * setuptools builds this file as an extension module that defines nothing for Python but its
 * init function (Windows links one in); Slicer's extension build (trilinear.cmake) builds it
 * without Python, as a plain library under the same name: ctypes needs no more.
 */

#include <math.h>
#include <stdint.h>

#if defined(_WIN32)
#define DR_EXPORT __declspec(dllexport)
#else
#define DR_EXPORT __attribute__((visibility("default")))
#endif

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
    float index = ((coordinate + 1) / 2) * (size - 1);
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

/* A point's cell: its corner (z0, y0, x0), its fractions, the eight corners' weights in
 * PyTorch's order (t/b = z0/z1, n/s = y0/y1, w/e = x0/x1) and which corners lie inside. */
typedef struct {
    int64_t x0, y0, z0, offset;
    float ax, bx, ay, by, az, bz;  /* x1 − x, x − x0, … */
    float weight[8];
    int in[8];
} Cell;

static inline void locate(const Volume *v, float ix, float iy, float iz, Cell *cell) {
    int64_t x0 = (int64_t)floorf(ix), y0 = (int64_t)floorf(iy), z0 = (int64_t)floorf(iz);
    int64_t x1 = x0 + 1, y1 = y0 + 1, z1 = z0 + 1;
    cell->x0 = x0;
    cell->y0 = y0;
    cell->z0 = z0;
    cell->offset = offset_of(z0, y0, x0, v->stride_d, v->stride_h, v->stride_w);
    cell->ax = x1 - ix;
    cell->bx = ix - x0;
    cell->ay = y1 - iy;
    cell->by = iy - y0;
    cell->az = z1 - iz;
    cell->bz = iz - z0;
    cell->weight[0] = (x1 - ix) * (y1 - iy) * (z1 - iz); /* tnw */
    cell->weight[1] = (ix - x0) * (y1 - iy) * (z1 - iz); /* tne */
    cell->weight[2] = (x1 - ix) * (iy - y0) * (z1 - iz); /* tsw */
    cell->weight[3] = (ix - x0) * (iy - y0) * (z1 - iz); /* tse */
    cell->weight[4] = (x1 - ix) * (y1 - iy) * (iz - z0); /* bnw */
    cell->weight[5] = (ix - x0) * (y1 - iy) * (iz - z0); /* bne */
    cell->weight[6] = (x1 - ix) * (iy - y0) * (iz - z0); /* bsw */
    cell->weight[7] = (ix - x0) * (iy - y0) * (iz - z0); /* bse */
    for (int corner = 0; corner < 8; ++corner) {
        cell->in[corner] = inside(v, z0 + (corner >> 2), y0 + ((corner >> 1) & 1), x0 + (corner & 1));
    }
}

static inline int64_t corner_offset(const Volume *v, int corner) {
    return (corner >> 2) * v->stride_d + ((corner >> 1) & 1) * v->stride_h + (corner & 1) * v->stride_w;
}

/* Samples points [start, end) of grid (x, y, z per point, contiguous) into out, channel c of
 * point p at out[c * out_channel_stride + p]. */
DR_EXPORT void dr_trilinear_forward(
    const float *image, int64_t channels, int64_t depth, int64_t height, int64_t width,
    int64_t stride_c, int64_t stride_d, int64_t stride_h, int64_t stride_w,
    const float *grid, int64_t start, int64_t end, int border,
    float *out, int64_t out_channel_stride) {
    Volume v = {image, channels, depth, height, width, stride_c, stride_d, stride_h, stride_w};
    int64_t corners[8];
    for (int corner = 0; corner < 8; ++corner) corners[corner] = corner_offset(&v, corner);
    for (int64_t p = start; p < end; ++p) {
        float ix = unnormalised(grid[3 * p], width);
        float iy = unnormalised(grid[3 * p + 1], height);
        float iz = unnormalised(grid[3 * p + 2], depth);
        if (border) {
            ix = clipped(ix, width);
            iy = clipped(iy, height);
            iz = clipped(iz, depth);
        }
        Cell cell;
        locate(&v, ix, iy, iz, &cell);
        for (int64_t c = 0; c < channels; ++c) {
            float value = 0.0f;
            for (int corner = 0; corner < 8; ++corner) {
                if (cell.in[corner]) {
                    value += image[c * stride_c + cell.offset + corners[corner]] * cell.weight[corner];
                }
            }
            out[c * out_channel_stride + p] = value;
        }
    }
}

/* One point's share of the gradients: added into grad_image (contiguous C × D × H × W, zeroed
 * by the caller, one buffer per range of points) unless NULL, and the point's grid gradient
 * written to grad_grid[3p …] unless NULL. PyTorch's statements, corner by corner. */
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
    const int64_t grad_corners[8] = {0, 1, row, row + 1, plane, plane + 1, plane + row, plane + row + 1};
    const float ax = cell.ax, bx = cell.bx, ay = cell.ay, by = cell.by, az = cell.az, bz = cell.bz;
    float gx = 0.0f, gy = 0.0f, gz = 0.0f;
    for (int64_t c = 0; c < v->channels; ++c) {
        const float g = grad_out[c * grad_out_channel_stride + p];
        if (grad_image) {
            for (int corner = 0; corner < 8; ++corner) {
                if (cell.in[corner]) {
                    grad_image[c * volume + grad_offset + grad_corners[corner]] += cell.weight[corner] * g;
                }
            }
        }
        if (!grad_grid) continue;
        const int64_t base = (int64_t)((uint64_t)(c * v->stride_c) + (uint64_t)cell.offset);
        float value;
        if (cell.in[0]) {
            value = v->data[base + corners[0]];
            gx -= value * ay * az * g;
            gy -= value * ax * az * g;
            gz -= value * ax * ay * g;
        }
        if (cell.in[1]) {
            value = v->data[base + corners[1]];
            gx += value * ay * az * g;
            gy -= value * bx * az * g;
            gz -= value * bx * ay * g;
        }
        if (cell.in[2]) {
            value = v->data[base + corners[2]];
            gx -= value * by * az * g;
            gy += value * ax * az * g;
            gz -= value * ax * by * g;
        }
        if (cell.in[3]) {
            value = v->data[base + corners[3]];
            gx += value * by * az * g;
            gy += value * bx * az * g;
            gz -= value * bx * by * g;
        }
        if (cell.in[4]) {
            value = v->data[base + corners[4]];
            gx -= value * ay * bz * g;
            gy -= value * ax * bz * g;
            gz += value * ax * ay * g;
        }
        if (cell.in[5]) {
            value = v->data[base + corners[5]];
            gx += value * ay * bz * g;
            gy -= value * bx * bz * g;
            gz += value * bx * ay * g;
        }
        if (cell.in[6]) {
            value = v->data[base + corners[6]];
            gx -= value * by * bz * g;
            gy += value * ax * bz * g;
            gz += value * ax * by * g;
        }
        if (cell.in[7]) {
            value = v->data[base + corners[7]];
            gx += value * by * bz * g;
            gy += value * bx * bz * g;
            gz += value * bx * by * g;
        }
    }
    if (grad_grid) {
        grad_grid[3 * p] = gx_mult * gx;
        grad_grid[3 * p + 1] = gy_mult * gy;
        grad_grid[3 * p + 2] = gz_mult * gz;
    }
}

/* The gradients of points [start, end): see backward_point. grad_out holds channel c of point p
 * at grad_out[c * grad_out_channel_stride + p]. */
DR_EXPORT void dr_trilinear_backward(
    const float *image, int64_t channels, int64_t depth, int64_t height, int64_t width,
    int64_t stride_c, int64_t stride_d, int64_t stride_h, int64_t stride_w,
    const float *grid, int64_t start, int64_t end, int border,
    const float *grad_out, int64_t grad_out_channel_stride, float *grad_image, float *grad_grid) {
    Volume v = {image, channels, depth, height, width, stride_c, stride_d, stride_h, stride_w};
    int64_t corners[8];
    for (int corner = 0; corner < 8; ++corner) corners[corner] = corner_offset(&v, corner);
    for (int64_t p = start; p < end; ++p) {
        backward_point(&v, corners, grid, p, border, grad_out, grad_out_channel_stride,
                       grad_image, grad_grid);
    }
}

#ifndef DR_WITHOUT_PYTHON
#define Py_LIMITED_API 0x030A0000
#include <Python.h>

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_trilinear",
    .m_doc = "PyTorch's trilinear grid sampling, compiled: called through ctypes.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__trilinear(void) { return PyModule_Create(&module); }
#endif
