"""RegistrationSettings: the one declaration of every registration option.

A value that does not fit is refused when the settings are made, naming the field and the values
that would fit; the command line's options are the fields; a report's "settings" object is the
settings, and feeding it back (``--settings``) gives the same settings.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import SimpleITK as sitk

from DeepRegisterLib import RegistrationSettings, register
from DeepRegisterLib.cli import main as cli
from DeepRegisterLib.errors import InputError
from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair
from DeepRegisterLib.nn import losses
from DeepRegisterLib.registration import settings as settings_module
from DeepRegisterLib.registration.presets import PRESETS

#: A run small enough to finish in a second or two: 2D, no network, two steps.
TINY = dict(preset="fast", model=None, iterations=2, device="cpu")


def test_the_defaults_are_valid_and_name_every_field() -> None:
    defaults = RegistrationSettings()
    assert defaults.preset in PRESETS
    assert defaults.similarity in settings_module.SIMILARITIES
    assert tuple(defaults.to_dict()) == settings_module.field_names()
    assert RegistrationSettings(**defaults.to_dict()) == defaults


def test_the_similarities_offered_are_those_the_losses_implement() -> None:
    assert settings_module.SIMILARITIES == losses.SIMILARITIES
    for name in settings_module.SIMILARITIES:
        assert callable(losses.similarity_function(name))


PRESET_CHOICES = ", ".join(PRESETS)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("preset", "turbo", f"unknown preset 'turbo'; choose one of {PRESET_CHOICES}"),
        ("preset", "", "preset must be a non-empty string"),
        ("similarity", "ssd", "unknown similarity 'ssd'; choose one of lncc, mse, mind"),
        ("similarity", 3, "similarity must be a non-empty string"),
        ("device", "tpu", "unknown device 'tpu'; choose auto, cpu, cuda or cuda:N"),
        ("device", "cuda:", "unknown device 'cuda:'"),
        ("device", "cuda:x", "unknown device 'cuda:x'"),
        ("device", "CPU", "unknown device 'CPU'"),
        ("model", "", "model must be a non-empty string"),
        ("model", "   ", "model must be a non-empty string"),
        ("regularization", -0.5, "regularization must be a number ≥ 0, got -0.5"),
        ("regularization", math.nan, "regularization must be a number ≥ 0, got nan"),
        ("regularization", math.inf, "regularization must be a number ≥ 0, got inf"),
        ("regularization", "1", "regularization must be a number ≥ 0, got '1'"),
        ("regularization", True, "regularization must be a number ≥ 0, got True"),
        ("iterations", -1, "iterations must be a whole number ≥ 0, got -1"),
        ("iterations", 2.5, "iterations must be a whole number ≥ 0, got 2.5"),
        ("iterations", 10.0, "iterations must be a whole number ≥ 0, got 10.0"),
        ("iterations", True, "iterations must be a whole number ≥ 0, got True"),
        ("iterations", "5", "iterations must be a whole number ≥ 0, got '5'"),
        ("seed", -3, "seed must be a whole number ≥ 0, got -3"),
        ("seed", None, "seed must be a whole number ≥ 0, got None"),
        ("seed", False, "seed must be a whole number ≥ 0, got False"),
        ("max_memory_gib", 0, "max_memory_gib must be positive, got 0"),
        ("max_memory_gib", 0.0, "max_memory_gib must be positive, got 0"),
        ("max_memory_gib", -1.0, "max_memory_gib must be a number ≥ 0, got -1.0"),
        ("max_memory_gib", math.nan, "max_memory_gib must be a number ≥ 0, got nan"),
        ("affine", "yes", "affine must be True or False, got 'yes'"),
        ("affine", 1, "affine must be True or False, got 1"),
        ("compute_inverse", None, "compute_inverse must be True or False, got None"),
        ("compute_jacobian", 0, "compute_jacobian must be True or False, got 0"),
    ],
)
def test_a_bad_value_is_refused_naming_the_field_and_what_would_do(
    field: str, value: object, expected: str
) -> None:
    with pytest.raises(InputError, match=re.escape(expected)):
        RegistrationSettings(**{field: value})
    # The same check guards every way in: a copy, a dict and the register() keywords.
    with pytest.raises(InputError, match=re.escape(expected)):
        RegistrationSettings().replace(**{field: value})
    with pytest.raises(InputError, match=re.escape(expected)):
        RegistrationSettings.from_dict({field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("device", "cuda:1"),
        ("device", "cuda:12"),
        ("device", "cuda"),
        ("device", "cpu"),
        ("regularization", 0),
        ("regularization", 12.5),
        ("regularization", None),
        ("iterations", 0),
        ("iterations", None),
        ("max_memory_gib", 0.25),
        ("max_memory_gib", 3),
        ("seed", 2**40),
        *[("preset", name) for name in PRESETS],
        *[("similarity", name) for name in settings_module.SIMILARITIES],
    ],
)
def test_a_good_value_is_kept_as_given(field: str, value: object) -> None:
    assert getattr(RegistrationSettings(**{field: value}), field) == value


def test_no_model_is_spelled_none_and_a_path_becomes_its_text(tmp_path: Path) -> None:
    assert RegistrationSettings(model=None).model == "none"
    assert RegistrationSettings(model=tmp_path / "m.pt").model == str(tmp_path / "m.pt")
    assert RegistrationSettings(model=None).to_dict()["model"] == "none"


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RegistrationSettings().seed = 3  # type: ignore[misc]


def test_an_unknown_name_is_refused_with_the_list_of_settings() -> None:
    every = ", ".join(settings_module.field_names())
    with pytest.raises(InputError, match=re.escape(f"unknown setting(s) smoothness; the settings "
                                                   f"are {every}")):  # fmt: skip
        RegistrationSettings().replace(smoothness=2.0)
    with pytest.raises(InputError, match=r"unknown setting\(s\) itterations, smoothness"):
        RegistrationSettings.from_dict({"itterations": 3, "smoothness": 2.0, "seed": 1})


def test_to_dict_and_from_dict_round_trip_through_json() -> None:
    chosen = RegistrationSettings(
        preset="fast", model=None, similarity="mind", regularization=2.5, iterations=40,
        affine=False, compute_inverse=True, compute_warped=False, compute_displacement=False,
        compute_inverse_displacement=True, compute_jacobian=False, keep_jacobian=False,
        device="cuda:1", seed=9, max_memory_gib=1.5,
    )  # fmt: skip
    assert all(chosen.to_dict()[f.name] != f.default for f in dataclasses.fields(chosen))
    assert RegistrationSettings.from_dict(json.loads(json.dumps(chosen.to_dict()))) == chosen
    assert RegistrationSettings.from_dict({}) == RegistrationSettings()
    # A partial dict is the defaults with those fields changed.
    assert RegistrationSettings.from_dict({"seed": 4}) == RegistrationSettings(seed=4)


def _normalised(text: str) -> str:
    return " ".join(text.split())


def test_every_command_line_setting_is_an_option_of_register_with_its_help(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "2000")  # one line per option: no wrapping inside words
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(["register", "--help"])
    assert exited.value.code == 0
    usage = _normalised(capsys.readouterr().out)
    flags = [f for f in dataclasses.fields(RegistrationSettings) if f.metadata["cli"] == "flag"]
    assert len(flags) >= 8
    for field in flags:
        option = "--" + field.name.replace("_", "-")
        if field.type == "bool" and field.default:
            option = "--no-" + option[2:]
        elif field.name == "max_memory_gib":
            option = "--max-memory"  # the one option named apart from its field
        assert f"{option} " in usage, f"{field.name}: no {option} in register --help"
        assert _normalised(field.metadata["help"]) in usage, f"{field.name}: help text missing"
        for choice in field.metadata["choices"]:
            assert choice in usage
    for field in dataclasses.fields(RegistrationSettings):
        if field.metadata["cli"] == "derived":
            assert f"--{field.name.replace('_', '-')} " not in usage
    assert "--settings JSON" in usage


@pytest.fixture(scope="module")
def a_tiny_pair_on_disk(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pair")
    pair = phantom_pair(demo_grid(2, size=32), amplitude_mm=2.0, rotation_deg=3.0)
    paths = {"fixed": folder / "fixed.nii.gz", "moving": folder / "moving.nii.gz"}
    sitk.WriteImage(pair.fixed, str(paths["fixed"]))
    sitk.WriteImage(pair.moving, str(paths["moving"]))
    return paths


def test_the_report_records_the_settings_it_ran_with(a_tiny_pair_on_disk) -> None:
    settings = RegistrationSettings(**TINY, similarity="mse", seed=5, compute_jacobian=False)
    result = register(a_tiny_pair_on_disk["fixed"], a_tiny_pair_on_disk["moving"], settings)
    assert result.report["settings"] == settings.to_dict()
    # Keywords override the settings given, and the report says so.
    result = register(a_tiny_pair_on_disk["fixed"], a_tiny_pair_on_disk["moving"], settings, seed=6)
    assert result.report["settings"] == settings.replace(seed=6).to_dict()


def run_register(pair: dict[str, Path], folder: Path, *options: str) -> int:
    return cli.main([
        "register", "--fixed", str(pair["fixed"]), "--moving", str(pair["moving"]),
        "--report", str(folder / "report.json"), "--quiet", *options,
    ])  # fmt: skip


def test_a_settings_file_is_the_base_and_options_given_override_it(
    a_tiny_pair_on_disk, tmp_path: Path
) -> None:
    base = RegistrationSettings(**TINY, similarity="mse", seed=7, regularization=3.0)
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps(base.to_dict()))
    out = tmp_path / "out"
    out.mkdir()
    code = run_register(
        a_tiny_pair_on_disk, out, "--settings", str(settings_file),
        "--similarity", "lncc", "--iterations", "1", "--no-affine",
    )  # fmt: skip
    assert code == cli.EXIT_OK
    recorded = json.loads((out / "report.json").read_text())["settings"]
    # Derived from the outputs asked for: a report alone needs no warped image, no dense field,
    # no det J image.
    expected = base.replace(
        similarity="lncc", iterations=1, affine=False, compute_warped=False,
        compute_displacement=False, keep_jacobian=False,
    )  # fmt: skip
    assert RegistrationSettings.from_dict(recorded) == expected
    # The report's settings fed back as a file reproduce them exactly.
    settings_file.write_text(json.dumps(recorded))
    (out / "report.json").unlink()
    assert run_register(a_tiny_pair_on_disk, out, "--settings", str(settings_file)) == 0
    assert json.loads((out / "report.json").read_text())["settings"] == recorded


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read the settings file"),
        ("{not json", "cannot read the settings file"),
        ('["fast"]', "must hold a JSON object of settings"),
        ('{"preset": "turbo"}', "unknown preset 'turbo'; choose one of"),
        ('{"iterations": -4}', "iterations must be a whole number ≥ 0, got -4"),
        ('{"smoothness": 1}', "unknown setting(s) smoothness; the settings are preset, model"),
    ],
    ids=["missing", "not-json", "a-list", "bad-preset", "bad-iterations", "unknown-name"],
)
def test_a_bad_settings_file_exits_with_2_saying_what_is_wrong(
    a_tiny_pair_on_disk,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str | None,
    expected: str,
) -> None:
    settings_file = tmp_path / "settings.json"
    if content is not None:
        settings_file.write_text(content)
    out = tmp_path / "out"
    out.mkdir()
    code = run_register(a_tiny_pair_on_disk, out, "--settings", str(settings_file))
    assert code == cli.EXIT_INPUT == 2
    assert expected in capsys.readouterr().err
    assert list(out.iterdir()) == []
