"""The compiled trilinear sampler gives the bits PyTorch's sampler gave, values and gradients,
on any number of threads, running its ranges on torch's own OpenMP runtime (and not at all
where it cannot); without it the engine samples with PyTorch and registers to the same bits.

The reference is ``filters.grid_sample`` with the compiled sampler off: PyTorch's kernel on the
same chunks, whose image gradient adds one part per chunk in the same order.
"""

from __future__ import annotations

import importlib.machinery
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from conftest import EVERY_CMAKE_BUILD, REPO_ROOT, built_by_cmake

from DeepRegisterLib.nn import filters, trilinear_sampler

pytestmark = pytest.mark.skipif(
    not trilinear_sampler.available(),
    reason="the compiled sampler was not built with this install (no C compiler?)",
)

Sample = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@pytest.fixture
def threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def pytorchs(monkeypatch: pytest.MonkeyPatch, padding_mode: str) -> Sample:
    """``filters.grid_sample`` as it was before the compiled sampler: PyTorch's chunks."""

    def sample(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        with monkeypatch.context() as patch:
            patch.setattr(trilinear_sampler, "takes", lambda *arguments: False)
            return filters.grid_sample(image, grid, "bilinear", padding_mode)

    return sample


def values_and_gradients(
    sample: Sample, image: torch.Tensor, grid: torch.Tensor, upstream: torch.Tensor,
    image_grad: bool = True, grid_grad: bool = True,
) -> list[torch.Tensor | None]:  # fmt: skip
    image_leaf = image.detach().clone().requires_grad_(image_grad)
    grid_leaf = grid.detach().clone().requires_grad_(grid_grad)
    out = sample(image_leaf, grid_leaf)
    if image_grad or grid_grad:
        (out * upstream).sum().backward()
    return [out.detach(), image_leaf.grad, grid_leaf.grad]


def assert_same_bits(ours: list, theirs: list) -> None:
    for mine, reference in zip(ours, theirs, strict=True):
        if reference is None:
            assert mine is None
        else:
            # equal_nan: NaN points give NaN in both; any other difference is a failure.
            assert torch.equal(mine.isnan(), reference.isnan())
            assert torch.equal(mine.nan_to_num(), reference.nan_to_num())


def awkward_grid(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Points inside, on and past every face, on the corners exactly, far away, and not
    numbers at all: where the paddings, the floors and the bounds tests differ. They lie spread
    over the grid, each in another of eight lanes, so that groups of eight points run one point
    at a time in the middle of a range, beside groups that do not."""
    grid = torch.rand((1, *shape, 3), generator=generator) * 2.6 - 1.3
    flat = grid.view(-1, 3)
    specials = torch.tensor(
        [[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [0.0, 1.0, -1.0], [1e30, 0.0, 0.0],
         [-1e30, 0.5, 0.5], [float("nan"), 0.0, 0.0], [0.0, float("inf"), 0.0],
         [0.0, 0.0, float("-inf")], [1.0000001, 0.0, -1.0000001]]
    )  # fmt: skip
    step = len(flat) // len(specials)
    flat[[i * step + i % 8 for i in range(len(specials))]] = specials
    return grid


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_the_same_bits_as_pytorch_on_any_number_of_threads(
    padding_mode: str, channels: int, count: int, threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small grids split too; 9 × 10 × 11 points leave the last chunk short.
    monkeypatch.setattr(filters, "PARALLEL_MIN_POINTS", 1)
    torch.set_num_threads(count)
    generator = torch.Generator().manual_seed(count * 10 + channels)
    image = torch.randn((1, channels, 7, 8, 9), generator=generator)
    grid = awkward_grid((9, 10, 11), generator)
    upstream = torch.randn((1, channels, 9, 10, 11), generator=generator)
    for image_grad, grid_grad in [(True, True), (False, True), (True, False), (False, False)]:
        ours, theirs = (
            values_and_gradients(sample, image, grid, upstream, image_grad, grid_grad)
            for sample in (lambda i, g: filters.grid_sample(i, g, "bilinear", padding_mode),
                           pytorchs(monkeypatch, padding_mode))
        )  # fmt: skip
        assert_same_bits(ours, theirs)


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_a_single_chunk_is_pytorchs_own_call(padding_mode: str, threads: None) -> None:
    """One thread: exactly ``F.grid_sample``, gradients included (no chunks to add)."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(1)
    image = torch.randn((1, 2, 6, 7, 8), generator=generator)
    grid = awkward_grid((5, 6, 7), generator)
    upstream = torch.randn((1, 2, 5, 6, 7), generator=generator)
    ours = values_and_gradients(
        lambda i, g: filters.grid_sample(i, g, "bilinear", padding_mode), image, grid, upstream
    )
    theirs = values_and_gradients(
        lambda i, g: F.grid_sample(i, g, padding_mode=padding_mode, align_corners=True),
        image, grid, upstream,
    )  # fmt: skip
    assert_same_bits(ours, theirs)


def test_images_and_grids_laid_out_any_way(threads: None, monkeypatch) -> None:
    """A strided image (a channel-last copy, a crop) and a grid that is a view are read as
    they lie; the output is a new contiguous tensor."""
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(2)
    volume = torch.randn((1, 3, 9, 10, 11), generator=generator)
    images = [
        volume.contiguous(memory_format=torch.channels_last_3d),
        volume[:, :, 1:8, ::2, 2:],
        volume[:, 1:2].expand(1, 3, 9, 10, 11),
    ]
    grid = awkward_grid((6, 5, 4), generator).transpose(1, 3)  # a view, not contiguous
    upstream = torch.randn((1, 3, *grid.shape[1:-1]), generator=generator)
    for image in images:
        ours = values_and_gradients(filters.grid_sample, image, grid, upstream)
        assert ours[0].is_contiguous()
        assert_same_bits(ours, values_and_gradients(pytorchs(monkeypatch, "zeros"), image, grid,
                                                    upstream))  # fmt: skip


def test_what_it_does_not_take_goes_to_pytorch() -> None:
    image, grid = torch.zeros((1, 1, 4, 4, 4)), torch.zeros((1, 2, 2, 2, 3))
    takes = trilinear_sampler.takes
    assert takes(image, grid, "bilinear", "zeros")
    assert takes(image, grid, "bilinear", "border")
    assert not takes(image, grid, "nearest", "zeros")
    assert not takes(image, grid, "bilinear", "reflection")
    assert not takes(image.double(), grid.double(), "bilinear", "zeros")
    assert not takes(image[:, :, 0], grid[:, 0, :, :, :2], "bilinear", "zeros")  # 2D
    assert not takes(image.expand(2, 1, 4, 4, 4), grid.expand(2, 2, 2, 2, 3), "bilinear", "zeros")


def test_its_ranges_run_on_torchs_openmp_threads(threads: None) -> None:
    """The library's OpenMP runtime is torch's: the same ``omp_get_thread_num``, and the
    thread count torch sets is the one its parallel regions read."""
    library = trilinear_sampler._library()
    assert trilinear_sampler.shares_torchs_openmp(library)
    for count in (1, 3):
        torch.set_num_threads(count)
        assert library.omp_get_max_threads() == count


def test_a_team_smaller_than_its_ranges_runs_the_rest_in_turn() -> None:
    """Where OpenMP gives fewer threads than ranges (a thread limit), each thread runs its
    ranges one after another: the same bits as PyTorch's chunks."""
    script = (
        "import torch\n"
        "from DeepRegisterLib.nn import filters, trilinear_sampler\n"
        "torch.set_num_threads(3)\n"
        "filters.PARALLEL_MIN_POINTS = 1\n"
        "generator = torch.Generator().manual_seed(4)\n"
        "image = torch.randn((1, 2, 7, 8, 9), generator=generator, requires_grad=True)\n"
        "grid = (torch.rand((1, 9, 10, 11, 3), generator=generator) * 2.6 - 1.3)\n"
        "grid.requires_grad_()\n"
        "results = []\n"
        "for compiled in (True, False):\n"
        "    trilinear_sampler.takes = (lambda t: lambda *a: t)(compiled)\n"
        "    image.grad = grid.grad = None\n"
        "    out = filters.grid_sample(image, grid)\n"
        "    (out * out).sum().backward()\n"
        "    results.append([out.detach(), image.grad, grid.grad])\n"
        "print(trilinear_sampler._library().omp_get_thread_limit(),\n"
        "      all(torch.equal(a, b) for a, b in zip(*results)))\n"
    )
    environment = os.environ | {"OMP_THREAD_LIMIT": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment,
        timeout=120, check=True,
    )  # fmt: skip
    assert completed.stdout.split() == ["1", "True"]


def assert_pytorch_samples(monkeypatch, module_file: Path | None) -> None:
    """With the compiled module found at ``module_file`` (None: not built), the sampler is not
    available, takes nothing, and ``filters`` gives PyTorch's own result, raising nothing."""
    spec = None
    if module_file is not None:
        spec = importlib.machinery.ModuleSpec("_trilinear", None, origin=str(module_file))
    monkeypatch.setattr(trilinear_sampler.importlib.util, "find_spec", lambda name: spec)
    trilinear_sampler._library.cache_clear()
    try:
        assert not trilinear_sampler.available()
        image, grid = torch.rand((1, 1, 4, 4, 4)), torch.rand((1, 3, 3, 3, 3)) * 2 - 1
        assert not trilinear_sampler.takes(image, grid, "bilinear", "zeros")
        expected = F.grid_sample(image, grid, align_corners=True)
        assert torch.equal(filters.grid_sample(image, grid), expected)
    finally:
        trilinear_sampler._library.cache_clear()


def test_without_the_compiled_module_pytorch_samples(monkeypatch) -> None:
    """An install that could not compile it."""
    assert_pytorch_samples(monkeypatch, None)


def test_a_library_that_cannot_load_is_not_used(tmp_path, monkeypatch) -> None:
    """A library whose dependencies this machine lacks (an extension package where torch
    brought no ``libgomp.so.1``): it fails to load, and no error reaches the registration."""
    unloadable = tmp_path / "_trilinear.abi3.so"
    unloadable.write_bytes(b"not a shared library")
    assert_pytorch_samples(monkeypatch, unloadable)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build with")
def test_a_library_from_another_version_is_not_used(tmp_path, monkeypatch) -> None:
    """A module built from an older trilinear.c (an editable install not built again): it lacks
    a function the sampler calls, and PyTorch samples."""
    source = (REPO_ROOT / "DeepRegisterLib" / "nn" / "trilinear.c").read_text()
    older = tmp_path / "trilinear.c"
    older.write_text(source.replace("dr_trilinear_lanes", "dr_trilinear_lanes_renamed"))
    shutil.copy(REPO_ROOT / "DeepRegisterLib" / "nn" / "trilinear_point.h", tmp_path)
    built = tmp_path / "_trilinear.abi3.so"
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-fopenmp", "-DDR_WITHOUT_PYTHON", "-DDR_WITHOUT_AVX2",
         str(older), "-o", str(built), "-lm"],
        check=True, timeout=120,
    )  # fmt: skip
    assert_pytorch_samples(monkeypatch, built)


def test_a_registration_gives_the_same_bits_without_it(monkeypatch) -> None:
    """The whole engine (affine search, network, optimisation, outputs), each way."""
    from DeepRegisterLib import RegistrationSettings, register
    from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair

    pair = phantom_pair(demo_grid(3, 48), amplitude_mm=4.0, seed=3)
    settings = RegistrationSettings(preset="fast", compute_jacobian=True)
    calls: list[int] = []
    compiled_sample = trilinear_sampler.grid_sample

    def counted(*arguments):
        calls.append(1)
        return compiled_sample(*arguments)

    monkeypatch.setattr(trilinear_sampler, "grid_sample", counted)
    compiled = register(pair.fixed, pair.moving, settings)
    assert len(calls) > 100  # the optimisation's steps sample several times each
    monkeypatch.setattr(trilinear_sampler, "takes", lambda *arguments: False)
    pytorch = register(pair.fixed, pair.moving, settings)
    for name in ("warped", "displacement", "jacobian"):
        ours, theirs = getattr(compiled, name), getattr(pytorch, name)
        assert np.array_equal(sitk.GetArrayViewFromImage(ours), sitk.GetArrayViewFromImage(theirs))
    assert compiled.affine.GetParameters() == pytorch.affine.GetParameters()


def built_sampler(tmp_path: Path, *options: str) -> Path:
    """trilinear.cmake's library, as the extension's CMakeLists.txt calls it."""
    return built_by_cmake(
        tmp_path, "DeepRegisterLib/nn/trilinear.cmake", "deepregister_add_trilinear_sampler",
        "_trilinear", *options,
    )  # fmt: skip


def assert_samples_as_pytorch(library, monkeypatch: pytest.MonkeyPatch) -> None:
    """``library`` as the sampler's, on two threads: PyTorch's bits, both paddings."""
    monkeypatch.setattr(trilinear_sampler, "_library", lambda: library)
    monkeypatch.setattr(filters, "PARALLEL_MIN_POINTS", 1)
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(5)
    image = torch.randn((1, 3, 7, 8, 9), generator=generator)
    grid = awkward_grid((6, 7, 8), generator)
    upstream = torch.randn((1, 3, 6, 7, 8), generator=generator)
    for padding_mode in ("zeros", "border"):
        ours = values_and_gradients(
            lambda i, g, mode=padding_mode: filters.grid_sample(i, g, "bilinear", mode),
            image, grid, upstream,
        )  # fmt: skip
        theirs = values_and_gradients(pytorchs(monkeypatch, padding_mode), image, grid, upstream)
        assert_same_bits(ours, theirs)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake to build with")
def test_slicers_extension_build_makes_the_same_sampler(tmp_path, threads, monkeypatch) -> None:
    """trilinear.cmake builds a library without Python, on torch's OpenMP runtime, that the
    sampler finds under its module's name and loads: the same bits."""
    library = trilinear_sampler.loaded(str(built_sampler(tmp_path)))
    assert not hasattr(library, "PyInit__trilinear")
    assert trilinear_sampler.shares_torchs_openmp(library)
    assert library.dr_trilinear_lanes(3, 7, 8, 9) == trilinear_sampler.lanes((1, 3, 7, 8, 9))
    assert_samples_as_pytorch(library, monkeypatch)


def cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo to read")
def test_eight_points_at_a_time_where_the_cpu_has_avx2() -> None:
    """Eight lanes on an x86-64 CPU with AVX2, while an image's offsets fit 32 bits (the
    gathers' indices); one point at a time otherwise."""
    has_avx2 = platform.machine() in ("x86_64", "AMD64") and "avx2" in cpu_flags()
    assert trilinear_sampler.lanes((1, 3, 107, 111, 93)) == (8 if has_avx2 else 1)
    assert trilinear_sampler.lanes((1, 1, 2048, 1024, 1024)) == (8 if has_avx2 else 1)
    assert trilinear_sampler.lanes((1, 2, 2048, 1024, 1024)) == 1  # 2³² values


@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake to build with")
@EVERY_CMAKE_BUILD
def test_every_build_gives_the_same_bits(tmp_path, threads, monkeypatch, flags: str) -> None:
    """Flags that target this CPU (``-march=native``: FMA on most x86-64 and ARM CPUs) would
    let the compiler fuse a multiply and an add into one rounding; the build forbids it, so
    the bits stay PyTorch's. So they do at -O2, where GCC 12's basic-block vectoriser dropped
    roundings in the affine descent (test_affine_descent.py), and unoptimised, where the
    machine does what the C says (Release builds at -O3)."""
    built = built_sampler(tmp_path, flags)
    assert_samples_as_pytorch(trilinear_sampler.loaded(str(built)), monkeypatch)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake to build with")
def test_a_build_without_avx2_gives_the_same_bits(tmp_path, threads, monkeypatch) -> None:
    """The point-by-point code alone (a compiler that cannot target AVX2, another CPU), built
    here by switching the eight lanes off: PyTorch's bits too."""
    built = built_sampler(tmp_path, "-DCMAKE_C_FLAGS=-DDR_WITHOUT_AVX2")
    library = trilinear_sampler.loaded(str(built))
    assert library.dr_trilinear_lanes(3, 7, 8, 9) == 1
    assert_samples_as_pytorch(library, monkeypatch)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake to build with")
def test_a_build_without_openmp_is_not_used(tmp_path, monkeypatch) -> None:
    """Without OpenMP, the library would sample on one thread: it is refused, and PyTorch
    samples."""
    built = built_sampler(tmp_path, "-DCMAKE_DISABLE_FIND_PACKAGE_OpenMP=ON")
    assert not trilinear_sampler.shares_torchs_openmp(trilinear_sampler.loaded(str(built)))
    assert_pytorch_samples(monkeypatch, built)
