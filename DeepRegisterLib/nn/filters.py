"""Box filters and grid sampling that use every CPU thread on a single image.

Instance optimisation works on one image pair, and on the CPU PyTorch spreads ``avg_pool`` and
``grid_sample`` over the batch and channels only: they ran on one thread whatever the machine
had, and were about 80 % of an optimisation step. The box filter here sums along one axis at a
time (3·w operations per voxel instead of w³, all threaded), and the grid sampler splits one
image's output points into chunks: the compiled sampler's ranges, or PyTorch's batch entries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import trilinear_sampler

# Below this many output points per thread, splitting costs more than it saves. PyTorch samples
# 3D with a scalar kernel: split from 2 048 points a thread there (the affine search's 20 000
# samples took 1.1 ms a step, forward and backward, on one thread and 0.63 ms on two). Its 2D
# kernel is vectorised, and an image that needs a gradient gets a buffer its size per chunk.
PARALLEL_MIN_POINTS = 2**15
PARALLEL_MIN_POINTS_3D = 2**11  # an image without a gradient
# A batch entry's channel (a plane) at least this large is filtered on its own, so that its
# passes along the three axes read it from the cache: a 2 mm brain grid's three velocity
# channels took 5.1 ms together and 3.4 ms one after the other; a 4 mm grid's 0.29 and 0.43 ms.
PLANE_MIN_POINTS = 2**19
# Each chunk of an image that needs a gradient gets its own gradient buffer, the image's size.
MAX_GRADIENT_CHUNKS = 8


def box_filter(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of each ``window``-wide square (2D) or cube (3D), over the voxels inside the grid.

    The same as ``avg_pool`` with stride 1, padding ``window // 2`` and
    ``count_include_pad=False``, for an odd ``window``.
    """
    if window % 2 != 1:
        raise ValueError(f"the box filter needs an odd window, got {window}")
    if window == 1:
        return x
    sums = _BoxSum.apply(x, window // 2)
    return sums * _inverse_counts(tuple(x.shape[2:]), window, x.device, x.dtype)


class _BoxSum(torch.autograd.Function):
    """Zero-padded window sums, one axis at a time, as shifted in-place additions.

    Every addition is an element-wise operation PyTorch spreads over all threads; a depthwise
    convolution (one channel per group) takes PyTorch's unthreaded slow path, forward and
    backward, and cost 5–9 times as much on 2 mm brain grids. A symmetric window sum with zero
    padding is its own adjoint, so the backward pass is the same sum of the gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, half: int) -> torch.Tensor:
        ctx.half = half
        return _window_sums(x, half)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _BoxSum.apply(grad, ctx.half), None


def _window_sums(x: torch.Tensor, half: int) -> torch.Tensor:
    planes = x.shape[0] * x.shape[1]
    if x.device.type != "cpu" or planes == 1 or math.prod(x.shape[2:]) < PLANE_MIN_POINTS:
        return _plane_sums(x, half)
    # One plane after the other: its three passes stay within the CPU's cache.
    flat = x.reshape(planes, 1, *x.shape[2:])
    sums = torch.empty_like(flat, memory_format=torch.contiguous_format)
    for plane in range(planes):
        _plane_sums(flat[plane : plane + 1], half, sums[plane : plane + 1])
    return sums.view(x.shape)


def _plane_sums(x: torch.Tensor, half: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The window sums along each axis in turn, the last axis's written into ``out`` if given."""
    summed = x
    for axis in range(2, x.dim()):
        n = x.shape[axis]
        if out is not None and axis == x.dim() - 1:
            total = out.copy_(summed)
        else:
            total = summed.clone(memory_format=torch.contiguous_format)
        for shift in range(1, min(half, n - 1) + 1):
            total.narrow(axis, shift, n - shift).add_(summed.narrow(axis, 0, n - shift))
            total.narrow(axis, 0, n - shift).add_(summed.narrow(axis, shift, n - shift))
        summed = total
    return summed


def _inverse_counts(
    shape: tuple[int, ...], window: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """1 / (voxels of each window that lie inside the grid): a product over the axes.

    Made at each call: cached, it saved 0.1 ms a call, but its grid-sized tensor, taken in the
    middle of a run and kept, raised a `fast` command's peak memory by 80 MB.
    """
    half = window // 2
    inverse = torch.ones((), device=device, dtype=dtype)
    for axis, n in enumerate(shape):
        index = torch.arange(n, device=device)
        count = (index + half).clamp(max=n - 1) - (index - half).clamp(min=0) + 1
        view = [1] * len(shape)
        view[axis] = n
        inverse = inverse * count.to(dtype).reciprocal().view(view)
    return inverse


def grid_sample(
    image: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """``F.grid_sample`` with ``align_corners=True``; for one image on a CPU with several
    threads, its output points are split into as many chunks, sampled side by side.

    One 3D float32 image, trilinear, goes to the compiled sampler (``trilinear_sampler``);
    otherwise the chunks are PyTorch's batch entries. Outputs equal ``F.grid_sample``'s; the
    gradient with respect to ``image`` adds the chunks' parts, so its last bits depend on the
    number of threads (the same either way), and up to MAX_GRADIENT_CHUNKS - 1 more copies of
    it exist during the backward pass.
    """
    chunks = _chunks(image, grid)
    if trilinear_sampler.takes(image, grid, mode, padding_mode):
        return trilinear_sampler.grid_sample(image, grid, padding_mode == "border", chunks)
    if chunks == 1:
        return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    points = math.prod(grid.shape[1:-1])
    dim = grid.shape[-1]
    flat = grid.reshape(points, dim)
    pad = -points % chunks
    if pad:
        flat = torch.cat([flat, flat.new_zeros((pad, dim))])
    batch = flat.view(chunks, *([1] * (dim - 1)), -1, dim)
    out = F.grid_sample(
        image.expand(chunks, *image.shape[1:]),
        batch,
        mode=mode,
        padding_mode=padding_mode,
        align_corners=True,
    )
    channels = image.shape[1]
    out = out.reshape(chunks, channels, -1).transpose(0, 1).reshape(channels, -1)[:, :points]
    return out.reshape(1, channels, *grid.shape[1:-1])


def _chunks(image: torch.Tensor, grid: torch.Tensor) -> int:
    """Into how many chunks ``grid_sample`` splits the points: one per thread where there are
    enough of them, at most MAX_GRADIENT_CHUNKS for an image that needs a gradient."""
    chunks = torch.get_num_threads()
    if image.requires_grad:
        chunks = min(chunks, MAX_GRADIENT_CHUNKS)
    points = math.prod(grid.shape[1:-1])
    least = PARALLEL_MIN_POINTS
    if grid.shape[-1] == 3 and not image.requires_grad:
        least = PARALLEL_MIN_POINTS_3D
    if image.device.type != "cpu" or image.shape[0] != 1 or chunks < 2 or points < chunks * least:
        return 1
    return chunks
