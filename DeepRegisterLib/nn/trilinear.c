/* PyTorch's 3D trilinear grid sampling (float32, corners aligned, zero or border padding),
 * forward and backward, of one image's points in ranges: see trilinear_sampler.py.
 *
 * Each point runs PyTorch's own statements (trilinear_point.h), so the outputs and gradients
 * are PyTorch's bits, which the tests check. What differs is what PyTorch pays around them: this
 * code splits one image's points into ranges run side by side, where PyTorch's CPU kernel runs
 * one thread per batch entry, and it needs no batch of expanded copies to do so. Where the
 * machine has AVX2, a range runs eight points at a time (trilinear_avx2.c), to the same bits.
 *
 * The ranges run in an OpenMP parallel region. Linked by the name libgomp.so.1, the library
 * shares the OpenMP runtime torch loaded, so the ranges run on PyTorch's own workers, which
 * wait (spinning) for the next region after each operation: threads of our own would have to
 * share the cores with them. Python checks that the runtime is shared before sampling here.
 *
 * The functions are called through ctypes, which releases the interpreter lock. For pip,
 * setuptools builds this file as an extension module that defines nothing for Python but its
 * init function (Windows links one in); Slicer's extension build (trilinear.cmake) builds it
 * without Python, as a plain library under the same name: ctypes needs no more.
 */

#include "trilinear_point.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(_WIN32)
#define DR_EXPORT __declspec(dllexport)
#else
#define DR_EXPORT __attribute__((visibility("default")))
#endif

/* Range c of `chunks` over `points`: ceil(points / chunks) points each, the last the rest. */
static inline void range_of(int64_t c, int64_t chunks, int64_t points, int64_t *start,
                            int64_t *end) {
    const int64_t size = (points + chunks - 1) / chunks;
    *start = c * size < points ? c * size : points;
    *end = (c + 1) * size < points ? (c + 1) * size : points;
}

/* This thread's number in its parallel region's team, and the team's size. */
#if defined(_OPENMP)
#define DR_THREAD omp_get_thread_num()
#define DR_TEAM omp_get_num_threads()
#else
#define DR_THREAD 0
#define DR_TEAM 1
#endif

/* Whether this image's ranges run eight points at a time here. */
static int in_eights(const Volume *v) {
#if defined(DR_AVX2_BUILT)
    return dr_avx2_takes(v);
#else
    (void)v;
    return 0;
#endif
}

/* Samples points [start, end) of grid into out. */
static void forward_range(const Volume *v, const int64_t corners[8], int eights,
                          const float *grid, int64_t start, int64_t end, int border, float *out,
                          int64_t points) {
#if defined(DR_AVX2_BUILT)
    if (eights) {
        dr_forward_range_avx2(v, corners, grid, start, end, border, out, points);
        return;
    }
#endif
    (void)eights;
    for (int64_t p = start; p < end; ++p) forward_point(v, corners, grid, p, border, out, points);
}

/* The gradients of points [start, end), the image's into grad_image (unless NULL). */
static void backward_range(const Volume *v, const int64_t corners[8], int eights,
                           const float *grid, int64_t start, int64_t end, int border,
                           const float *grad_out, int64_t points, float *grad_image,
                           float *grad_grid) {
#if defined(DR_AVX2_BUILT)
    if (eights) {
        dr_backward_range_avx2(v, corners, grid, start, end, border, grad_out, points,
                               grad_image, grad_grid);
        return;
    }
#endif
    (void)eights;
    for (int64_t p = start; p < end; ++p) {
        backward_point(v, corners, grid, p, border, grad_out, points, grad_image, grad_grid);
    }
}

/* How many points a range runs at a time on this machine for an image of this size: 8 or 1. */
DR_EXPORT int64_t dr_trilinear_lanes(int64_t channels, int64_t depth, int64_t height,
                                     int64_t width) {
    const Volume v = {NULL, channels, depth, height, width, depth * height * width,
                      height * width, width, 1};
    return in_eights(&v) ? 8 : 1;
}

/* Samples all `points` of grid into out (channel c of point p at out[c * points + p]), in
 * `chunks` ranges side by side, one a thread. */
DR_EXPORT void dr_trilinear_forward(
    const float *image, int64_t channels, int64_t depth, int64_t height, int64_t width,
    int64_t stride_c, int64_t stride_d, int64_t stride_h, int64_t stride_w,
    const float *grid, int64_t points, int64_t chunks, int border, float *out) {
    const Volume v = {image, channels, depth, height, width, stride_c, stride_d, stride_h, stride_w};
    const int eights = in_eights(&v);
    int64_t corners[8];
    for (int k = 0; k < 8; ++k) corners[k] = corner_offset(k, stride_d, stride_h, stride_w);
#pragma omp parallel num_threads((int)chunks) if (chunks > 1)
    {
        /* A team smaller than asked (a thread limit) runs the rest of the ranges in turn. */
        for (int64_t c = DR_THREAD; c < chunks; c += DR_TEAM) {
            int64_t start, end;
            range_of(c, chunks, points, &start, &end);
            forward_range(&v, corners, eights, grid, start, end, border, out, points);
        }
    }
}

/* The gradients of all `points` (see backward_point) in `chunks` ranges side by side: range c
 * adds its image gradient into the c-th of `chunks` buffers of C × D × H × W (zeroed by the
 * caller) unless grad_image is NULL. grad_out holds channel c of point p at
 * grad_out[c * points + p]. */
DR_EXPORT void dr_trilinear_backward(
    const float *image, int64_t channels, int64_t depth, int64_t height, int64_t width,
    int64_t stride_c, int64_t stride_d, int64_t stride_h, int64_t stride_w,
    const float *grid, int64_t points, int64_t chunks, int border,
    const float *grad_out, float *grad_image, float *grad_grid) {
    const Volume v = {image, channels, depth, height, width, stride_c, stride_d, stride_h, stride_w};
    const int64_t buffer = channels * depth * height * width;
    const int eights = in_eights(&v);
    int64_t corners[8];
    for (int k = 0; k < 8; ++k) corners[k] = corner_offset(k, stride_d, stride_h, stride_w);
#pragma omp parallel num_threads((int)chunks) if (chunks > 1)
    {
        for (int64_t c = DR_THREAD; c < chunks; c += DR_TEAM) {
            int64_t start, end;
            range_of(c, chunks, points, &start, &end);
            float *grad_image_c = grad_image ? grad_image + c * buffer : NULL;
            backward_range(&v, corners, eights, grid, start, end, border, grad_out, points,
                           grad_image_c, grad_grid);
        }
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
