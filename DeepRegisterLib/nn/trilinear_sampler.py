"""PyTorch's trilinear grid sampling of one 3D float32 image, compiled, on the caller's threads.

PyTorch's CPU grid sampler is scalar code run one batch entry per thread; ``filters`` gave it
one image's points as a batch of expanded copies, and it was most of an optimisation step.
``trilinear.c`` holds the same statements in the same order (so the same bits, forward and
backward), over ranges of points that a small thread pool runs side by side: on a 2 mm brain
grid a forward pass took 6.3 ms against 11.5 ms, and with its backward 28 against 41 ms. Its
threads need the cores that PyTorch's OpenMP workers spin on after each operation: it is used
where that spin is short, as processes that exist to register make it
(``DeepRegisterLib.openmp_waiting``).

Where the compiled module is missing (an install without a C compiler), :func:`available` is
false and ``filters`` uses PyTorch's sampler: the same results, slower.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch
from torch.autograd.function import once_differentiable

from ..openmp_waiting import waits_briefly

_I64 = ctypes.c_int64
_POINTER = ctypes.c_void_p
# The image: its data, channels, depth, height, width, and the four strides.
_IMAGE = [_POINTER, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64]
# The grid, the range of points, border padding or zeros.
_POINTS = [_POINTER, _I64, _I64, ctypes.c_int]


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The compiled module beside this one, built by pip's install or Slicer's extension build."""
    spec = importlib.util.find_spec(f"{__package__}._trilinear")
    if spec is None or spec.origin is None:
        return None
    return loaded(spec.origin)


def loaded(path: str) -> ctypes.CDLL:
    """The sampler's library at ``path``, its functions' arguments declared."""
    library = ctypes.CDLL(path)
    library.dr_trilinear_forward.argtypes = [*_IMAGE, *_POINTS, _POINTER, _I64]
    library.dr_trilinear_forward.restype = None
    library.dr_trilinear_backward.argtypes = [*_IMAGE, *_POINTS, _POINTER, _I64, _POINTER, _POINTER]
    library.dr_trilinear_backward.restype = None
    return library


def available() -> bool:
    """Whether the compiled sampler was built with this install."""
    return _library() is not None


def takes(image: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str) -> bool:
    """Whether :func:`grid_sample` samples ``image`` at ``grid`` (else PyTorch does): it can,
    and this process's OpenMP threads leave its threads their cores."""
    return (
        image.device.type == "cpu"
        and grid.device.type == "cpu"
        and image.dtype == torch.float32
        and grid.dtype == torch.float32
        and image.dim() == 5
        and image.shape[0] == 1
        and grid.shape[0] == 1
        and mode == "bilinear"
        and padding_mode in ("zeros", "border")
        and available()
        and waits_briefly()
    )


def grid_sample(image: torch.Tensor, grid: torch.Tensor, border: bool, chunks: int) -> torch.Tensor:
    """``F.grid_sample(image, grid, "bilinear", "border" if border else "zeros",
    align_corners=True)`` for what :func:`takes`, its points in ``chunks`` ranges side by side.

    The gradient with respect to ``image`` sums one buffer per range, as PyTorch sums the
    expanded copies ``filters`` gave it: the same bits for the same ``chunks``.
    """
    return _Trilinear.apply(image, grid, border, chunks)


class _Trilinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image: torch.Tensor, grid: torch.Tensor, border: bool, chunks: int):
        grid = grid.contiguous()
        ctx.save_for_backward(image, grid)
        ctx.border, ctx.chunks = border, chunks
        points = grid.numel() // 3
        out = image.new_empty((1, image.shape[1], *grid.shape[1:-1]))
        library, arguments = _library(), _image_arguments(image)

        def run(begin: int, end: int, _chunk: int) -> None:
            library.dr_trilinear_forward(
                *arguments, grid.data_ptr(), begin, end, border, out.data_ptr(), points
            )

        _in_ranges(run, points, chunks)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        image, grid = ctx.saved_tensors
        grad = grad.contiguous()
        points, chunks = grid.numel() // 3, ctx.chunks
        image_grads = None
        if ctx.needs_input_grad[0]:
            image_grads = image.new_zeros((chunks, *image.shape[1:]))
        grid_grad = torch.empty_like(grid) if ctx.needs_input_grad[1] else None
        library, arguments = _library(), _image_arguments(image)

        def run(begin: int, end: int, chunk: int) -> None:
            library.dr_trilinear_backward(
                *arguments, grid.data_ptr(), begin, end, ctx.border,
                grad.data_ptr(), points,
                None if image_grads is None else image_grads[chunk].data_ptr(),
                None if grid_grad is None else grid_grad.data_ptr(),
            )  # fmt: skip

        _in_ranges(run, points, chunks)
        image_grad = None
        if image_grads is not None:
            image_grad = image_grads if chunks == 1 else image_grads.sum(0, keepdim=True)
        return image_grad, grid_grad, None, None


def _image_arguments(image: torch.Tensor) -> tuple[int, ...]:
    _, channels, depth, height, width = image.shape
    _, *strides = image.stride()
    return (image.data_ptr(), channels, depth, height, width, *strides)


def _in_ranges(run: Callable[[int, int, int], None], points: int, chunks: int) -> None:
    """``run(begin, end, chunk)`` for each of ``chunks`` ranges of the points, side by side, the
    first on this thread. The ranges are ``filters``' batch entries: each holds
    ``ceil(points / chunks)`` points, the last the rest."""
    size = -(-points // chunks)
    calls = [(min(points, c * size), min(points, (c + 1) * size), c) for c in range(chunks)]
    if chunks == 1:
        run(*calls[0])
        return
    futures = [_pool().submit(run, *call) for call in calls[1:]]
    run(*calls[0])
    for future in futures:
        future.result()


#: The pool's threads' names: they outlive a run, idle between calls, as PyTorch's own do.
POOL_THREAD_PREFIX = "deepregister-sampler"
# The most threads the pool starts (it starts them only as calls need them); more chunks than
# that wait their turn, which stays correct.
_MAX_POOL_THREADS = 64
_executor: ThreadPoolExecutor | None = None
_executor_made = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The pool, made on first use: one per process, never replaced while a call may use it."""
    global _executor
    with _executor_made:
        if _executor is None:
            _executor = ThreadPoolExecutor(_MAX_POOL_THREADS, thread_name_prefix=POOL_THREAD_PREFIX)
        return _executor


def _forget_pool() -> None:
    """A forked child has none of its parent's threads: it makes its own pool."""
    global _executor, _executor_made
    _executor, _executor_made = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)
