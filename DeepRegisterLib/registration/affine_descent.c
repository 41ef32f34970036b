/* The affine search's inner loop, compiled: the mutual information of sampled voxels under
 * each pose, its gradient, and regular-step gradient descent over a pose's parameters
 * (affine_descent.py calls it; affine_search.py says what the search does with it).
 *
 * Why C: the search is thousands of small steps, each a few dozen tensor operations in
 * PyTorch, and in a fresh process it had to wait for torch's import (about a second of one
 * core). Here a whole level runs in one call that holds no interpreter lock and needs no
 * torch, so it runs while torch loads. One thread and sums in sample order: the same inputs
 * give the same pose.
 *
 * A 2D pair comes as a volume one voxel deep, its points and poses with a zero third axis.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_BINS 64
#define MAX_PARAMETERS 12

#if defined(_WIN32)
#define DR_EXPORT __declspec(dllexport)
#else
#define DR_EXPORT __attribute__((visibility("default")))
#endif

/* One level: the fixed samples and the moving copy (affine_levels.py builds it). */
typedef struct {
    const float *offsets;   /* (samples, 3): fixed points minus the centre, mm */
    const int32_t *rows;    /* (samples,): each fixed value's histogram bin times bins */
    int64_t samples;
    const float *moving;    /* (depth, height, width), intensities in [0, 1] */
    const uint8_t *mask;    /* the moving mask on the same voxels, or NULL */
    int64_t depth, height, width;
    double to_sampler[9];   /* moving points to sampler coordinates: T y + offset */
    double sampler_offset[3];
    double centre[3];
    int64_t bins;           /* the joint histogram's bins along each axis, at most MAX_BINS */
    double log_floor;       /* added inside each logarithm: empty bins stay finite */
} DrLevel;

/* The descent's schedule (affine_search.py declares each figure). */
typedef struct {
    int64_t iterations;
    double first_step, radius_mm, relaxation, min_step;
} DrSteps;

/* What pass one keeps of each sample for pass two (the gradient). */
typedef struct {
    int32_t column; /* the first of the four moving bins */
    float fraction, slope; /* the position within the bin; d position / d value (0 if clipped) */
    double value_gradient[3]; /* d value / d sampler coordinate */
} Sample;

/* Sampler coordinate to index along an axis of ``size`` voxels (align_corners, border). */
static double to_index(double coordinate, int64_t size, double *scale) {
    double index = (coordinate + 1.0) * 0.5 * (double)(size - 1);
    *scale = 0.5 * (double)(size - 1);
    if (index <= 0.0) {
        *scale = 0.0;
        return 0.0;
    }
    if (index >= (double)(size - 1)) {
        *scale = 0.0;
        return (double)(size - 1);
    }
    return index;
}

static void cell(double index, int64_t size, int64_t *low, double *fraction) {
    int64_t base = (int64_t)floor(index);
    if (base > size - 2) base = size > 1 ? size - 2 : 0;
    *low = base;
    *fraction = index - (double)base;
}

/* The moving value at sampler coordinates ``c`` and its gradient; false where the moving
 * mask (nearest voxel) excludes the point. */
static int sample(const DrLevel *level, const double c[3], double *value, double gradient[3]) {
    const int64_t sizes[3] = {level->width, level->height, level->depth};
    double index[3], scale[3], fraction[3];
    int64_t low[3], step[3];
    for (int axis = 0; axis < 3; axis++) {
        index[axis] = to_index(c[axis], sizes[axis], &scale[axis]);
        cell(index[axis], sizes[axis], &low[axis], &fraction[axis]);
        step[axis] = sizes[axis] > 1 ? 1 : 0;
    }
    const int64_t plane = level->height * level->width;
    if (level->mask != NULL) {
        int64_t nearest = (int64_t)nearbyint(index[2]) * plane +
                          (int64_t)nearbyint(index[1]) * level->width +
                          (int64_t)nearbyint(index[0]);
        if (level->mask[nearest] == 0) return 0;
    }
    const float *origin = level->moving + low[2] * plane + low[1] * level->width + low[0];
    const int64_t dx = step[0], dy = step[1] * level->width, dz = step[2] * plane;
    const double v000 = origin[0], v100 = origin[dx], v010 = origin[dy], v110 = origin[dy + dx];
    const double v001 = origin[dz], v101 = origin[dz + dx], v011 = origin[dz + dy];
    const double v111 = origin[dz + dy + dx];
    const double fx = fraction[0], fy = fraction[1], fz = fraction[2];
    const double x00 = v000 + fx * (v100 - v000), x10 = v010 + fx * (v110 - v010);
    const double x01 = v001 + fx * (v101 - v001), x11 = v011 + fx * (v111 - v011);
    const double y0 = x00 + fy * (x10 - x00), y1 = x01 + fy * (x11 - x01);
    *value = y0 + fz * (y1 - y0);
    const double along_x = (1 - fz) * ((1 - fy) * (v100 - v000) + fy * (v110 - v010)) +
                           fz * ((1 - fy) * (v101 - v001) + fy * (v111 - v011));
    gradient[0] = along_x * scale[0];
    gradient[1] = ((1 - fz) * (x10 - x00) + fz * (x11 - x01)) * scale[1];
    gradient[2] = (y1 - y0) * scale[2];
    return 1;
}

/* The cubic B-spline Parzen window's four taps at ``f`` and their slopes. */
static void taps(double f, double weight[4], double slope[4]) {
    const double f2 = f * f, f3 = f2 * f, g = 1.0 - f;
    weight[0] = g * g * g / 6.0;
    weight[1] = (3 * f3 - 6 * f2 + 4) / 6.0;
    weight[2] = (-3 * f3 + 3 * f2 + 3 * f + 1) / 6.0;
    weight[3] = f3 / 6.0;
    slope[0] = -0.5 * g * g;
    slope[1] = (9 * f2 - 12 * f) / 6.0;
    slope[2] = (-9 * f2 + 6 * f + 3) / 6.0;
    slope[3] = 0.5 * f2;
}

static int64_t column_of(int32_t first, int tap, int64_t bins) {
    int64_t column = first + tap;
    return column < 0 ? 0 : (column > bins - 1 ? bins - 1 : column);
}

/* The map from a sample's offset x - centre to sampler coordinates under the pose
 * y = M (x - centre) + centre + shift: linear = T M, constant = T (centre + shift) + offset. In
 * single precision, as PyTorch's search had it: a header's last bits (NRRD writes directions
 * as text) leave it, and so the steps, as they were, and a point on a voxel's face is inside or
 * not as it was there. (Built without basic-block vectorising: GCC 12's dropped two lanes of
 * these roundings at -O2.) */
static void sampler_map(const DrLevel *level, const double matrix[9], const double shift[3],
                        double linear[9], double constant[3]) {
    const double *t = level->to_sampler;
    for (int r = 0; r < 3; r++) {
        constant[r] = level->sampler_offset[r];
        for (int c = 0; c < 3; c++) {
            linear[r * 3 + c] = t[r * 3] * matrix[c] + t[r * 3 + 1] * matrix[3 + c] +
                                t[r * 3 + 2] * matrix[6 + c];
            constant[r] += t[r * 3 + c] * (level->centre[c] + shift[c]);
        }
    }
    for (int e = 0; e < 9; e++) linear[e] = (double)(float)linear[e];
    for (int r = 0; r < 3; r++) constant[r] = (double)(float)constant[r];
}

/* Pass one: each sample inside the moving image (and its mask) adds its four B-spline taps to
 * its row of ``joint`` (bins x bins, zeroed), and ``kept`` what pass two needs of it. The
 * samples counted. */
static double fill_joint(const DrLevel *level, const double linear[9], const double constant[3],
                         double *joint, Sample *kept) {
    const int64_t bins = level->bins;
    double total = 0.0;
    for (int64_t i = 0; i < level->samples; i++) {
        const float *o = level->offsets + 3 * i;
        double c[3], value, gradient[3], weight[4], slope[4];
        kept[i].column = -1;
        for (int r = 0; r < 3; r++)
            c[r] = (float)(linear[r * 3] * o[0] + linear[r * 3 + 1] * o[1] +
                           linear[r * 3 + 2] * o[2] + constant[r]);
        if (fabs(c[0]) > 1.0 || fabs(c[1]) > 1.0 || fabs(c[2]) > 1.0) continue;
        if (!sample(level, c, &value, gradient)) continue;
        const int clipped = value < 0.0 || value > 1.0;
        const double kept_value = clipped ? (value < 0.0 ? 0.0 : 1.0) : value;
        const double position = kept_value * (double)(bins - 3) + 1.0;
        const double base = floor(position);
        taps(position - base, weight, slope);
        kept[i].column = (int32_t)base - 1;
        kept[i].fraction = (float)(position - base);
        kept[i].slope = clipped ? 0.0f : (float)(bins - 3);
        memcpy(kept[i].value_gradient, gradient, sizeof gradient);
        for (int k = 0; k < 4; k++)
            joint[level->rows[i] + column_of(kept[i].column, k, bins)] += weight[k];
        total += 1.0;
    }
    return total;
}

/* The mutual information of ``joint`` (counts of ``total`` samples, made probabilities here),
 * and where ``slope_of`` is not NULL d MI / d each joint probability. */
static double joint_information(double *joint, int64_t bins, double total, double floor_,
                                double *slope_of) {
    double fixed[MAX_BINS] = {0}, moving[MAX_BINS] = {0};
    for (int64_t a = 0; a < bins; a++)
        for (int64_t b = 0; b < bins; b++) {
            joint[a * bins + b] /= total;
            fixed[a] += joint[a * bins + b];
            moving[b] += joint[a * bins + b];
        }
    double result = 0.0, by_row[MAX_BINS] = {0}, by_column[MAX_BINS] = {0};
    for (int64_t a = 0; a < bins; a++)
        for (int64_t b = 0; b < bins; b++) {
            const double p = joint[a * bins + b], product = fixed[a] * moving[b] + floor_;
            const double log_ratio = log(p + floor_) - log(product);
            result += p * log_ratio;
            if (slope_of == NULL) continue;
            slope_of[a * bins + b] = log_ratio + p / (p + floor_);
            by_row[a] += p * moving[b] / product;
            by_column[b] += p * fixed[a] / product;
        }
    if (slope_of != NULL)
        for (int64_t a = 0; a < bins; a++)
            for (int64_t b = 0; b < bins; b++) slope_of[a * bins + b] -= by_row[a] + by_column[b];
    return result;
}

/* Pass two: each sample's share of d MI / d value, along its sampler coordinates, summed
 * into the gradient in the map (d_linear, d_constant: zeroed). */
static void map_gradient(const DrLevel *level, const Sample *kept, const double *slope_of,
                         double total, double d_linear[9], double d_constant[3]) {
    const int64_t bins = level->bins;
    for (int64_t i = 0; i < level->samples; i++) {
        if (kept[i].column < 0 || kept[i].slope == 0.0f) continue;
        double weight[4], slope[4], d_value = 0.0;
        taps(kept[i].fraction, weight, slope);
        for (int k = 0; k < 4; k++)
            d_value += slope_of[level->rows[i] + column_of(kept[i].column, k, bins)] * slope[k];
        d_value *= kept[i].slope / total;
        const float *o = level->offsets + 3 * i;
        for (int r = 0; r < 3; r++) {
            const double g = d_value * kept[i].value_gradient[r];
            d_constant[r] += g;
            for (int c = 0; c < 3; c++) d_linear[r * 3 + c] += g * o[c];
        }
    }
}

/* The mutual information of the samples under y = M (x - centre) + centre + shift, and where
 * ``d_matrix`` is not NULL its gradient in M (row-major) and the shift. ``kept`` holds a
 * Sample for each sample. As registration/mutual_information.py's metric: the fixed axis a
 * plain bin count, the moving one a cubic B-spline window, samples outside the moving image
 * (or its mask) not counted. */
static double information(const DrLevel *level, const double matrix[9], const double shift[3],
                          double *d_matrix, double *d_shift, Sample *kept) {
    const int64_t bins = level->bins;
    double linear[9], constant[3], joint[MAX_BINS * MAX_BINS], slope_of[MAX_BINS * MAX_BINS];
    sampler_map(level, matrix, shift, linear, constant);
    memset(joint, 0, (size_t)(bins * bins) * sizeof(double));
    const double total = fill_joint(level, linear, constant, joint, kept);
    if (d_matrix != NULL) {
        memset(d_matrix, 0, 9 * sizeof(double));
        memset(d_shift, 0, 3 * sizeof(double));
    }
    if (total <= 0.0) return 0.0;
    const double result =
        joint_information(joint, bins, total, level->log_floor, d_matrix ? slope_of : NULL);
    if (d_matrix == NULL) return result;
    double d_linear[9] = {0}, d_constant[3] = {0};
    map_gradient(level, kept, slope_of, total, d_linear, d_constant);
    /* linear = T M and constant = T (centre + shift) + offset: back through T. */
    const double *t = level->to_sampler;
    for (int r = 0; r < 3; r++) {
        for (int c = 0; c < 3; c++)
            d_matrix[r * 3 + c] = t[r] * d_linear[c] + t[3 + r] * d_linear[3 + c] +
                                  t[6 + r] * d_linear[6 + c];
        d_shift[r] = t[r] * d_constant[0] + t[3 + r] * d_constant[1] + t[6 + r] * d_constant[2];
    }
    return result;
}

static void multiply(const double a[9], const double b[9], double out[9]) {
    for (int r = 0; r < 3; r++)
        for (int c = 0; c < 3; c++)
            out[r * 3 + c] = a[r * 3] * b[c] + a[r * 3 + 1] * b[3 + c] + a[r * 3 + 2] * b[6 + c];
}

/* Turns about x, y and z by ``angles`` (R = Rz Ry Rx), and where ``d`` is not NULL the
 * derivative of R in each angle. */
static void rotation(const double angles[3], double r[9], double d[3][9]) {
    const double cx = cos(angles[0]), sx = sin(angles[0]), cy = cos(angles[1]);
    const double sy = sin(angles[1]), cz = cos(angles[2]), sz = sin(angles[2]);
    const double about_x[9] = {1, 0, 0, 0, cx, -sx, 0, sx, cx};
    const double about_y[9] = {cy, 0, sy, 0, 1, 0, -sy, 0, cy};
    const double about_z[9] = {cz, -sz, 0, sz, cz, 0, 0, 0, 1};
    double zy[9];
    multiply(about_z, about_y, zy);
    multiply(zy, about_x, r);
    if (d == NULL) return;
    const double dx[9] = {0, 0, 0, 0, -sx, -cx, 0, cx, -sx};
    const double dy[9] = {-sy, 0, cy, 0, 0, 0, -cy, 0, -sy};
    const double dz[9] = {-sz, -cz, 0, cz, -sz, 0, 0, 0, 0};
    double part[9];
    multiply(zy, dx, d[0]);
    multiply(about_z, dy, part);
    multiply(part, about_x, d[1]);
    multiply(dz, about_y, part);
    multiply(part, about_x, d[2]);
}

/* A pose's parameters: ``linear`` angles (rigid: 1 in 2D, about z; 3 in 3D) or matrix
 * entries (dim x dim), then dim shifts, each scaled to move points by about a millimetre. */
typedef struct {
    int dim, rigid, linear;
    double radius_mm, start_matrix[9], start_shift[3];
} Parameters;

/* The pose of ``p``: M = change (p) start_matrix, shift = start_shift + p's shifts; and where
 * ``d_p`` is not NULL, d_p from the gradient in M and shift. */
static void pose_of(const Parameters *s, const double *p, double matrix[9], double shift[3],
                    double d_rotation[3][9]) {
    double change[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1};
    if (s->rigid) {
        double angles[3] = {0, 0, 0};
        for (int k = 0; k < s->linear; k++) angles[s->dim == 2 ? 2 : k] = p[k] / s->radius_mm;
        rotation(angles, change, d_rotation);
    } else {
        for (int r = 0; r < s->dim; r++)
            for (int c = 0; c < s->dim; c++) change[r * 3 + c] += p[r * s->dim + c] / s->radius_mm;
    }
    multiply(change, s->start_matrix, matrix);
    for (int k = 0; k < 3; k++) shift[k] = s->start_shift[k] + (k < s->dim ? p[s->linear + k] : 0);
}

static void parameter_gradient(const Parameters *s, const double d_matrix[9],
                               const double d_shift[3], double d_rotation[3][9], double *d_p) {
    double d_change[9]; /* d_matrix start_matrix^T */
    const double *m = s->start_matrix;
    for (int r = 0; r < 3; r++)
        for (int c = 0; c < 3; c++)
            d_change[r * 3 + c] = d_matrix[r * 3] * m[c * 3] + d_matrix[r * 3 + 1] * m[c * 3 + 1] +
                                  d_matrix[r * 3 + 2] * m[c * 3 + 2];
    if (s->rigid) {
        for (int k = 0; k < s->linear; k++) {
            const double *d = d_rotation[s->dim == 2 ? 2 : k];
            double sum = 0.0;
            for (int e = 0; e < 9; e++) sum += d_change[e] * d[e];
            d_p[k] = sum / s->radius_mm;
        }
    } else {
        for (int r = 0; r < s->dim; r++)
            for (int c = 0; c < s->dim; c++)
                d_p[r * s->dim + c] = d_change[r * 3 + c] / s->radius_mm;
    }
    for (int k = 0; k < s->dim; k++) d_p[s->linear + k] = d_shift[k];
}

/* Regular-step descent of one pose, as ITK's: each step moves the parameters by ``step``
 * along the gradient's direction; the step is cut by ``relaxation`` where the direction turns
 * back, and the search ends below ``min_step`` or after ``iterations`` steps. */
static void descend(const DrLevel *level, const Parameters *s, const DrSteps *steps, double *p,
                    double matrix[9], double shift[3], Sample *kept) {
    const int count = s->linear + s->dim;
    double previous[MAX_PARAMETERS] = {0}, gradient[MAX_PARAMETERS];
    double d_rotation[3][9], d_matrix[9], d_shift[3];
    int have_previous = 0;
    double step = steps->first_step;
    for (int64_t it = 0; it < steps->iterations && step >= steps->min_step; it++) {
        pose_of(s, p, matrix, shift, d_rotation);
        information(level, matrix, shift, d_matrix, d_shift, kept);
        parameter_gradient(s, d_matrix, d_shift, d_rotation, gradient);
        double turned = 0.0, length = 0.0;
        for (int k = 0; k < count; k++) {
            gradient[k] = -gradient[k]; /* descending the negative mutual information */
            turned += gradient[k] * previous[k];
            length += gradient[k] * gradient[k];
        }
        if (have_previous && turned < 0.0) step *= steps->relaxation;
        memcpy(previous, gradient, sizeof gradient);
        have_previous = 1;
        length = sqrt(length);
        if (step >= steps->min_step && length > 0.0)
            for (int k = 0; k < count; k++) p[k] -= step * gradient[k] / length;
    }
    pose_of(s, p, matrix, shift, NULL);
}

/* Each of ``poses`` poses descended on ``level``: the parameters (poses, count: the angles or
 * matrix entries, then the shifts) of a change to the start (``starts``: matrices (poses, 9),
 * then shifts (poses, 3)), from where they are to where they end, and the poses they end at
 * into ``ends`` (the same layout). A search keeps its parameters from one level to the next.
 * 0; -1 where memory ran out, -2 for bins out of range. */
DR_EXPORT int dr_affine_descend(const DrLevel *level, int64_t poses, const double *starts,
                                double *parameters, double *ends, int dim, int rigid,
                                const DrSteps *steps) {
    if (level->bins < 4 || level->bins > MAX_BINS) return -2;
    Sample *kept = malloc((size_t)(level->samples > 0 ? level->samples : 1) * sizeof(Sample));
    if (kept == NULL) return -1;
    for (int64_t n = 0; n < poses; n++) {
        Parameters s = {.dim = dim, .rigid = rigid, .radius_mm = steps->radius_mm};
        s.linear = rigid ? (dim == 2 ? 1 : 3) : dim * dim;
        memcpy(s.start_matrix, starts + 9 * n, sizeof s.start_matrix);
        memcpy(s.start_shift, starts + 9 * poses + 3 * n, sizeof s.start_shift);
        descend(level, &s, steps, parameters + (s.linear + dim) * n, ends + 9 * n,
                ends + 9 * poses + 3 * n, kept);
    }
    free(kept);
    return 0;
}

/* The mutual information under each pose into ``values`` and, where ``d_matrices`` is not
 * NULL, its gradient in each matrix (9) and shift (3). 0, or as dr_affine_descend. */
DR_EXPORT int dr_affine_information(const DrLevel *level, int64_t poses, const double *matrices,
                                    const double *shifts, double *values, double *d_matrices,
                                    double *d_shifts) {
    if (level->bins < 4 || level->bins > MAX_BINS) return -2;
    Sample *kept = malloc((size_t)(level->samples > 0 ? level->samples : 1) * sizeof(Sample));
    if (kept == NULL) return -1;
    for (int64_t n = 0; n < poses; n++)
        values[n] = information(level, matrices + 9 * n, shifts + 3 * n,
                                d_matrices == NULL ? NULL : d_matrices + 9 * n,
                                d_matrices == NULL ? NULL : d_shifts + 3 * n, kept);
    free(kept);
    return 0;
}

#ifndef DR_WITHOUT_PYTHON
#define Py_LIMITED_API 0x030A0000
#include <Python.h>

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_affine_descent",
    .m_doc = "The affine search's descent, compiled: called through ctypes.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__affine_descent(void) { return PyModule_Create(&module); }
#endif
