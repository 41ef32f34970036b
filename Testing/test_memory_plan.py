"""Short of memory, the engine picks a safe path itself and says which: a coarser grid for the
deformable stages, the CPU when the GPU is short or runs out; it refuses only when nothing fits."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegisterLib.cli import main as cli
from DeepRegisterLib.errors import InputError, ResourceError
from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair
from DeepRegisterLib.nn.filters import MAX_GRADIENT_CHUNKS
from DeepRegisterLib.registration import (
    engine,
    job,
    memory_plan,
    optimisation_stage,
)
from DeepRegisterLib.registration.memory_plan import estimate_peak_bytes, plan_memory

GIB = 2**30


@pytest.fixture(scope="module")
def pair() -> tuple[sitk.Image, sitk.Image]:
    generated = phantom_pair(demo_grid(3, size=48), amplitude_mm=4.0)
    return generated.fixed, generated.moving


def voxels(spacing_mm: float) -> int:
    """A network grid over a 192 mm cube."""
    return int((192 / spacing_mm) ** 3)


def needed(pair, spacing_mm: float) -> int:
    return estimate_peak_bytes(*pair, voxels(spacing_mm))


def test_a_plan_that_fits_is_kept_unchanged(pair) -> None:
    plan = plan_memory(*pair, voxels, 2.0, model_name="brain3d", budget_bytes=needed(pair, 2.0))
    assert (plan.spacing_mm, plan.use_model, plan.device, plan.notes) == (2.0, True, "cpu", ())
    assert plan.estimated_bytes == needed(pair, 2.0)
    unlimited = plan_memory(*pair, voxels, 2.0, budget_bytes=None)
    assert unlimited.notes == ()


def test_short_of_memory_the_first_coarser_grid_that_fits_is_chosen_and_named(pair) -> None:
    budget = needed(pair, 4.0) + 1  # 3 mm (1.5×) does not fit, 4 mm (2×) does
    assert needed(pair, 3.0) > budget
    plan = plan_memory(*pair, voxels, 2.0, model_name="brain3d", budget_bytes=budget)
    assert plan.spacing_mm == 4.0
    assert plan.estimated_bytes == needed(pair, 4.0) <= budget
    assert not plan.use_model, "a model trained at 2 mm cannot run on a 4 mm grid"
    (note,) = plan.notes
    for words in ("2 mm grid needs about", "coarser 4 mm grid", "without model 'brain3d'"):
        assert words in note


def test_when_no_grid_fits_the_run_is_refused_saying_what_was_tried(pair) -> None:
    with pytest.raises(ResourceError, match=r"still .* GiB on a 8 mm grid"):
        plan_memory(*pair, voxels, 2.0, budget_bytes=needed(pair, 8.0) - 1)


def test_a_gpu_too_small_for_the_network_grid_sends_the_work_to_the_cpu(pair) -> None:
    on_gpu = voxels(2.0) * memory_plan.GPU_BYTES_PER_NETWORK_VOXEL + memory_plan.GPU_FIXED_BYTES
    roomy = plan_memory(*pair, voxels, 2.0, device="cuda", gpu_free_bytes=2 * on_gpu)
    assert (roomy.device, roomy.notes) == ("cuda", ())
    short = plan_memory(*pair, voxels, 2.0, device="cuda", gpu_free_bytes=on_gpu // 2)
    assert short.device == "cpu"
    assert "so they run on the CPU" in short.notes[0]


def test_the_budget_is_the_smaller_of_the_limit_and_what_is_available(monkeypatch) -> None:
    monkeypatch.setattr(memory_plan, "available_memory_bytes", lambda: 10 * GIB)
    assert memory_plan.memory_budget() == 9 * GIB
    assert memory_plan.memory_budget(2 * GIB) == 2 * GIB
    monkeypatch.setattr(memory_plan, "available_memory_bytes", lambda: None)
    assert memory_plan.memory_budget() is None
    assert memory_plan.memory_budget(GIB) == GIB


def test_register_under_a_memory_limit_runs_coarser_and_says_so(pair) -> None:
    options = dict(preset="balanced", model=None, device="cpu", iterations=6)
    free = engine.register(*pair, **options)
    assert free.report["notes"] == []
    spacing = free.report["network_grid"]["spacing_mm"]
    messages: list[str] = []
    limited = engine.register(
        *pair, **options, max_memory_gib=(free.report["estimated_peak_bytes"] - 1) / 2**30,
        progress=lambda fraction, message: messages.append(message),
    )  # fmt: skip
    coarse = limited.report["network_grid"]["spacing_mm"]
    assert coarse > spacing
    assert limited.report["estimated_peak_bytes"] < free.report["estimated_peak_bytes"]
    (note,) = limited.report["notes"]
    assert f"coarser {coarse:g} mm grid" in note
    assert note in messages, "the choice is announced while running, not only in the report"
    assert limited.report["ncc_after"] > limited.report["ncc_affine"]
    assert np.all(np.isfinite(sitk.GetArrayViewFromImage(limited.displacement)))


def test_the_command_line_takes_a_memory_limit_and_prints_the_choice(
    pair, tmp_path, capsys
) -> None:
    fixed, moving = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
    sitk.WriteImage(pair[0], str(fixed))
    sitk.WriteImage(pair[1], str(moving))
    arguments = ["register", "--fixed", str(fixed), "--moving", str(moving), "--quiet",
                 "--preset", "balanced", "--iterations", "3", "--model", "none",
                 "--warped", str(tmp_path / "warped.nii.gz")]  # fmt: skip
    # The command line keeps neither the dense displacement nor det J for --warped alone.
    free = engine.register(*pair, preset="balanced", model=None, device="cpu", iterations=3,
                           compute_displacement=False, compute_jacobian=False)  # fmt: skip
    limit_gib = (free.report["estimated_peak_bytes"] - 1) / GIB
    assert cli.main([*arguments, "--max-memory", f"{limit_gib:.12f}"]) == 0
    assert "note: memory: the 2 mm grid needs about" in capsys.readouterr().out
    assert cli.main([*arguments, "--max-memory", "0.000001"]) == cli.EXIT_MEMORY
    assert cli.main([*arguments, "--max-memory", "-1"]) == cli.EXIT_INPUT


def test_a_gpu_out_of_memory_error_reruns_on_the_cpu_with_the_same_result(
    pair, monkeypatch
) -> None:
    """No GPU here: the deformable stages are sent to PyTorch's "meta" device, where the
    optimiser raises the error CUDA raises when it runs out of memory."""
    options = dict(preset="fast", model=None, iterations=5)
    on_cpu = engine.register(*pair, device="cpu", **options)
    real_optimise = optimisation_stage.optimise_velocity

    def optimise(fixed, *args, **kwargs):
        if fixed.device.type != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_optimise(fixed, *args, **kwargs)

    monkeypatch.setattr(optimisation_stage, "optimise_velocity", optimise)
    monkeypatch.setattr(job, "resolve_device", lambda device: torch.device("meta"))
    messages: list[str] = []
    fell_back = engine.register(
        *pair, device="cuda", progress=lambda f, m: messages.append(m), **options
    )
    note = "memory: the GPU ran out of memory, so the registration was run again on the CPU"
    assert fell_back.report["notes"] == [note]
    assert note in messages
    assert fell_back.report["device"] == "cpu"
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(fell_back.displacement),
        sitk.GetArrayViewFromImage(on_cpu.displacement),
    )


def test_an_out_of_memory_error_on_the_cpu_is_not_retried(pair, monkeypatch) -> None:
    def optimise(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(optimisation_stage, "optimise_velocity", optimise)
    with pytest.raises(torch.OutOfMemoryError):
        engine.register(*pair, preset="fast", model=None, device="cpu", iterations=2)


def test_a_non_positive_memory_limit_is_refused(pair) -> None:
    with pytest.raises(InputError, match="memory limit max_memory_gib must be positive"):
        engine.register(*pair, model=None, device="cpu", max_memory_gib=0)


def test_the_estimate_counts_a_gradient_copy_of_the_flow_per_further_thread(
    pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The threaded grid sampler gives each thread's chunk its own gradient buffer.
    counts = {}
    for threads in (1, 4, MAX_GRADIENT_CHUNKS, MAX_GRADIENT_CHUNKS + 8):
        monkeypatch.setattr(torch, "get_num_threads", lambda count=threads: count)
        counts[threads] = needed(pair, 2.0)
    flow_bytes = voxels(2.0) * 3 * 4
    assert counts[4] - counts[1] == 3 * flow_bytes
    assert counts[MAX_GRADIENT_CHUNKS] - counts[1] == (MAX_GRADIENT_CHUNKS - 1) * flow_bytes
    assert counts[MAX_GRADIENT_CHUNKS + 8] == counts[MAX_GRADIENT_CHUNKS]


def test_a_colour_moving_picture_is_counted_with_its_channels(pair) -> None:
    """The estimate the engine plans with holds each colour channel after the first, as
    float32 to warp and warped (5 bytes a fixed and a moving voxel each); grey is as it was."""
    fixed, moving = pair
    grey = sitk.Cast(sitk.RescaleIntensity(moving, 0, 255), sitk.sitkUInt8)
    colour = sitk.Compose([grey] * 3)
    voxels_each = fixed.GetNumberOfPixels() + moving.GetNumberOfPixels()
    assert (
        estimate_peak_bytes(fixed, colour, 1000) - estimate_peak_bytes(fixed, grey, 1000)
        == 2 * 5 * voxels_each
    )
    reports = [
        engine.register(fixed, image, preset="fast", model=None, iterations=0).report
        for image in (grey, colour)
    ]
    planned = [report["estimated_peak_bytes"] for report in reports]
    assert planned[1] - planned[0] == 2 * 5 * voxels_each


def test_a_ct_keeps_its_grid_where_the_memory_covers_what_it_was_measured_to_take(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The 512² × 600 CT pair's `fast` run took 4.2–4.3 GiB above its images with the Python
    API's default outputs (two threads: benchmarks/memory.py --sweep). With 6 GiB to spend it
    keeps its 2.86 mm grid; the estimate calibrated in November (10.2 GiB) refused it outright
    there, and with 10 GiB sent it to a 4.29 mm grid. The command line's run, with 3 GiB."""
    from DeepRegisterLib.imaging.geometry import ImageHeader

    ct = ImageHeader(3, (512, 512, 600), (0.78, 0.78, 1.0), 1, sitk.sitkInt16)
    network = 121 * 88 * 193  # the pair's 2.86 mm network grid over its foreground
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    plan = plan_memory(ct, ct, lambda mm: int(network * (2.86 / mm) ** 3), 2.86,
                       budget_bytes=6 * GIB)  # fmt: skip
    assert (plan.spacing_mm, plan.notes) == (2.86, ())
    assert 4.3 * GIB < plan.estimated_bytes < 6 * GIB
    # The command line's outputs (no dense displacement, no det J): it took 1.77–1.89 GiB.
    from DeepRegisterLib.registration.settings import RegistrationSettings

    command = RegistrationSettings(compute_displacement=False, compute_jacobian=False)
    lean = plan_memory(ct, ct, lambda mm: int(network * (2.86 / mm) ** 3), 2.86,
                       budget_bytes=3 * GIB, settings=command)  # fmt: skip
    assert (lean.spacing_mm, lean.notes) == (2.86, ())
    assert 1.9 * GIB < lean.estimated_bytes < 3 * GIB


def test_the_estimate_counts_the_dense_outputs_only_where_they_are_kept(pair) -> None:
    """The dense displacement (4 bytes a component), det J (4) and the dense inverse (4 a
    component, on the moving grid) are counted where the settings keep them: the command
    line, a batch and Slicer keep none of them, and the CT pair's run took 1.89 GiB there
    against 4.20 with the Python API's defaults (benchmarks/memory.py --outputs)."""
    from DeepRegisterLib.registration.settings import RegistrationSettings

    fixed, moving = pair
    fixed_voxels, moving_voxels = fixed.GetNumberOfPixels(), moving.GetNumberOfPixels()
    api = RegistrationSettings()
    lean = api.replace(compute_displacement=False, keep_jacobian=False)
    inverse = api.replace(compute_inverse=True, compute_inverse_displacement=True)
    assert estimate_peak_bytes(fixed, moving, 1000) == estimate_peak_bytes(fixed, moving, 1000, api)
    saved = estimate_peak_bytes(*pair, 1000, api) - estimate_peak_bytes(*pair, 1000, lean)
    assert saved == fixed_voxels * (3 * 4 + 4)
    added = estimate_peak_bytes(*pair, 1000, inverse) - estimate_peak_bytes(*pair, 1000, api)
    assert added == moving_voxels * 3 * 4
    no_jacobian = api.replace(compute_jacobian=False)  # nothing to keep
    assert estimate_peak_bytes(*pair, 1000, no_jacobian) == estimate_peak_bytes(
        *pair, 1000, api.replace(keep_jacobian=False)
    )
