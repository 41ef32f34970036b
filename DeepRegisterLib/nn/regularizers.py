"""Penalties on a flow's shape: its roughness (diffusion) and its folding (det J below a margin).

Both take hand-written backward passes. Autograd differentiates ``torch.diff`` and
``torch.gradient`` through slices, and each slice's backward fills a zero tensor the flow's size:
24 per optimisation step in 3D, a sixth of a step on a 2 mm brain grid. Here each backward
writes one gradient tensor in place, and the folding penalty's works only on the box around the
voxels below the margin (nothing at all where there are none).
"""

from __future__ import annotations

import torch


def diffusion(flow: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of a flow: penalises non-smooth deformations."""
    return _Diffusion.apply(flow)


def flow_jacobian_determinant(flow: torch.Tensor) -> torch.Tensor:
    """det(I + ∇u) of a voxel-unit flow (N, dim, *shape), with central differences."""
    return _determinant(_jacobian(flow))


def folding_penalty(flow: torch.Tensor, margin: float = 0.05) -> torch.Tensor:
    """Mean shortfall of det J below ``margin``: zero for a transform that keeps every voxel's
    orientation with room to spare (Kuang & Schmah 2019).

    Scaling and squaring is diffeomorphic only for a velocity smooth on the grid's scale; a
    velocity on a fine control grid can turn sharply enough to fold, and diffusion alone lets
    it wherever the similarity pulls hard.
    """
    return _FoldingPenalty.apply(flow, margin)


class _Diffusion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flow: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(flow)
        spatial = flow.dim() - 2
        total = flow.new_zeros(())
        for axis in range(2, flow.dim()):
            total = total + torch.diff(flow, dim=axis).pow(2).mean()
        return total / spatial

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (flow,) = ctx.saved_tensors
        spatial = flow.dim() - 2
        out = torch.zeros_like(flow)
        for axis in range(2, flow.dim()):
            n = flow.shape[axis]
            if n < 2:  # no difference along this axis (the forward value is NaN, as a mean of none)
                continue
            difference = torch.diff(flow, dim=axis)
            difference.mul_(grad * (2.0 / (difference.numel() * spatial)))
            # d/du[i] of (u[i+1] − u[i])²: + at i + 1, − at i.
            out.narrow(axis, 1, n - 1).add_(difference)
            out.narrow(axis, 0, n - 1).sub_(difference)
        return out


def _jacobian(flow: torch.Tensor) -> list[list[torch.Tensor]]:
    """j[r][c] = δ_rc + ∂u_r/∂x_c (N, *shape): the flow's channel r moves along array axis r
    (``warp``)."""
    spatial = flow.dim() - 2
    grads = [_gradient(flow, axis).unbind(1) for axis in range(2, 2 + spatial)]
    axes = range(spatial)
    return [[grads[c][r] + 1.0 if r == c else grads[c][r] for c in axes] for r in axes]


def _gradient(u: torch.Tensor, axis: int) -> torch.Tensor:
    """``torch.gradient(u, dim=axis)[0]``, bit for bit (unit spacing, edge order 1), written
    into one tensor: torch.gradient builds each axis from three new pieces and concatenates
    them, which cost more than the differences."""
    n = u.shape[axis]
    out = torch.empty_like(u)
    if n > 2:
        inner = out.narrow(axis, 1, n - 2)
        torch.sub(u.narrow(axis, 2, n - 2), u.narrow(axis, 0, n - 2), out=inner)
        inner.mul_(0.5)
    torch.sub(u.narrow(axis, 1, 1), u.narrow(axis, 0, 1), out=out.narrow(axis, 0, 1))
    torch.sub(u.narrow(axis, n - 1, 1), u.narrow(axis, n - 2, 1), out=out.narrow(axis, n - 1, 1))
    return out


def _determinant(j: list[list[torch.Tensor]]) -> torch.Tensor:
    if len(j) == 2:
        return j[0][0] * j[1][1] - j[0][1] * j[1][0]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )


def _cofactors(j: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """∂ det / ∂ j[r][c]."""
    if len(j) == 2:
        return [[j[1][1], -j[1][0]], [-j[0][1], j[0][0]]]

    def minor(r: int, c: int) -> torch.Tensor:
        rows = [i for i in range(3) if i != r]
        cols = [i for i in range(3) if i != c]
        return j[rows[0]][cols[0]] * j[rows[1]][cols[1]] - j[rows[0]][cols[1]] * j[rows[1]][cols[0]]

    return [[minor(r, c) if (r + c) % 2 == 0 else -minor(r, c) for c in range(3)] for r in range(3)]


def _add_gradient_adjoint(out: torch.Tensor, h: torch.Tensor, axis: int) -> None:
    """``out += Gᵀ h`` for G = ``torch.gradient`` along ``axis`` (unit spacing, edge order 1):
    central differences inside, one-sided ones at both ends."""
    n = h.shape[axis]
    if n > 2:
        inner = h.narrow(axis, 1, n - 2) * 0.5
        out.narrow(axis, 2, n - 2).add_(inner)
        out.narrow(axis, 0, n - 2).sub_(inner)
    first, last = h.narrow(axis, 0, 1), h.narrow(axis, n - 1, 1)
    out.narrow(axis, 1, 1).add_(first)
    out.narrow(axis, 0, 1).sub_(first)
    out.narrow(axis, n - 1, 1).add_(last)
    out.narrow(axis, n - 2, 1).sub_(last)


class _FoldingPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flow: torch.Tensor, margin: float) -> torch.Tensor:
        shortfall = margin - flow_jacobian_determinant(flow)
        folded = shortfall > 0
        ctx.save_for_backward(flow, folded)
        return shortfall.clamp_min(0).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        flow, folded = ctx.saved_tensors
        out = torch.zeros_like(flow)
        box = _box_around(folded)
        if box is None:
            return out, None
        # Only the folded voxels and their neighbours get a gradient: a few hundred voxels
        # of a 2 mm brain grid, whose box is a few per cent of it. The cofactors and their
        # adjoint are computed there alone, with the same bits as on the whole grid (the box
        # ends one voxel past the last fold, so its own one-sided edges weigh nothing).
        weight = folded[box].to(flow.dtype).mul_(-grad / folded.numel())
        region = (slice(None), slice(None), *box[1:])
        cofactors = _cofactors(_jacobian(flow[region]))
        spatial = flow.dim() - 2
        for r in range(spatial):
            channel = out[region].select(1, r)
            for c in range(spatial):
                # d/dj[r][c] of mean(margin − det) over the folded voxels: −cofactor / count.
                _add_gradient_adjoint(channel, cofactors[r][c] * weight, 1 + c)
        return out, None


def _box_around(where: torch.Tensor) -> tuple[slice, ...] | None:
    """Slices of ``where`` (N, *shape) holding its true voxels and one more on each side
    (within the grid), every batch entry whole; None when it holds none."""
    if not bool(where.any()):
        return None
    box = [slice(None)]
    for axis in range(1, where.dim()):
        others = tuple(a for a in range(where.dim()) if a != axis)
        hits = torch.nonzero(where.view(torch.uint8).amax(dim=others)).flatten()
        low, high = int(hits[0]), int(hits[-1])
        box.append(slice(max(low - 1, 0), min(high + 2, where.shape[axis])))
    return tuple(box)
