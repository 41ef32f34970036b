"""PyTorch's trilinear grid sampling of one 3D float32 image, compiled, on PyTorch's threads.

PyTorch's CPU grid sampler is scalar code run one batch entry per thread; ``filters`` gave it
one image's points as a batch of expanded copies, and it was most of an optimisation step.
``trilinear_point.h`` holds the same statements in the same order (so the same bits, forward
and backward); ``trilinear.c`` runs them over ranges of points side by side in an OpenMP
parallel region, and ``trilinear_avx2.c`` eight points at a time where the CPU has AVX2 (each
lane the same statements: the same bits again). On a 2 mm brain grid a forward pass took 6.3 ms
against PyTorch's 11.5 ms, and with its backward 28 against 41 ms, before the eight lanes took
a quarter off a squaring's passes and a third off a warp's.

The region runs on PyTorch's own OpenMP workers, which spin after each operation waiting for
the next: threads of ours would share the cores with them, and lost where they spin long. So
the library is used only where it shares torch's OpenMP runtime (its ``omp_get_thread_num`` is
torch's): on Linux, where both name ``libgomp.so.1``. Where the compiled module is missing (no
C compiler) or runs another runtime (macOS, Windows), :func:`available` is false and ``filters``
uses PyTorch's sampler: the same results, slower.
"""

from __future__ import annotations

import ctypes
import importlib.util
from functools import lru_cache

import torch
from torch.autograd.function import once_differentiable

_I64 = ctypes.c_int64
_POINTER = ctypes.c_void_p
# The image: its data, channels, depth, height, width, and the four strides.
_IMAGE = [_POINTER, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64]
# The grid, its number of points, the ranges they are split into, border padding or zeros.
_POINTS = [_POINTER, _I64, _I64, ctypes.c_int]


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The compiled module beside this one (built by pip's install or Slicer's extension
    build), where it runs on torch's OpenMP threads. A library that cannot load here (an
    extension package on a machine whose torch brought no ``libgomp.so.1``, and none installed)
    is not used either, nor one built from another version (an editable install whose module
    was not built again), which lacks a function this one calls."""
    spec = importlib.util.find_spec(f"{__package__}._trilinear")
    if spec is None or spec.origin is None:
        return None
    try:
        library = loaded(spec.origin)
    except (OSError, AttributeError):
        return None
    return library if shares_torchs_openmp(library) else None


def loaded(path: str) -> ctypes.CDLL:
    """The sampler's library at ``path``, its functions' arguments declared."""
    library = ctypes.CDLL(path)
    library.dr_trilinear_forward.argtypes = [*_IMAGE, *_POINTS, _POINTER]
    library.dr_trilinear_forward.restype = None
    library.dr_trilinear_backward.argtypes = [*_IMAGE, *_POINTS, _POINTER, _POINTER, _POINTER]
    library.dr_trilinear_backward.restype = None
    library.dr_trilinear_lanes.argtypes = [_I64, _I64, _I64, _I64]
    library.dr_trilinear_lanes.restype = _I64
    return library


def shares_torchs_openmp(library: ctypes.CDLL) -> bool:
    """Whether ``library`` runs its parallel regions on torch's OpenMP runtime: the
    ``omp_get_thread_num`` its own dependencies give it is the one torch's give torch. False
    for a library built without OpenMP, and where a library's dependencies cannot be searched
    by name (Windows)."""
    try:
        ours = library.omp_get_thread_num
        torchs = ctypes.CDLL(torch._C.__file__).omp_get_thread_num
    except (AttributeError, OSError):
        return False
    return ctypes.cast(ours, _POINTER).value == ctypes.cast(torchs, _POINTER).value


def available() -> bool:
    """Whether the compiled sampler was built with this install and shares torch's OpenMP."""
    return _library() is not None


def lanes(shape: tuple[int, ...]) -> int:
    """How many points the sampler runs at a time for a contiguous (1, C, D, H, W) image here:
    8 with AVX2 (while the image's offsets fit 32 bits), else 1; 0 where it is not used."""
    library = _library()
    return 0 if library is None else int(library.dr_trilinear_lanes(*shape[1:]))


def takes(image: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str) -> bool:
    """Whether :func:`grid_sample` samples ``image`` at ``grid`` (else PyTorch does)."""
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
        out = image.new_empty((1, image.shape[1], *grid.shape[1:-1]))
        _library().dr_trilinear_forward(
            *_image_arguments(image), grid.data_ptr(), grid.numel() // 3, chunks, border,
            out.data_ptr(),
        )  # fmt: skip
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
        _library().dr_trilinear_backward(
            *_image_arguments(image), grid.data_ptr(), points, chunks, ctx.border,
            grad.data_ptr(),
            None if image_grads is None else image_grads.data_ptr(),
            None if grid_grad is None else grid_grad.data_ptr(),
        )  # fmt: skip
        image_grad = None
        if image_grads is not None:
            image_grad = image_grads if chunks == 1 else image_grads.sum(0, keepdim=True)
        return image_grad, grid_grad, None, None


def _image_arguments(image: torch.Tensor) -> tuple[int, ...]:
    _, channels, depth, height, width = image.shape
    _, *strides = image.stride()
    return (image.data_ptr(), channels, depth, height, width, *strides)
