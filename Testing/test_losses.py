"""Similarity measures: what instance optimisation computes once per level equals the plain
measure exactly, values and gradients."""

from __future__ import annotations

import pytest
import torch

from DeepRegisterLib.losses import SIMILARITIES, lncc, similarity_function, similarity_to


@pytest.mark.parametrize("name", SIMILARITIES)
@pytest.mark.parametrize("shape", [(20, 24), (12, 16, 14)], ids=["2d", "3d"])
@pytest.mark.parametrize("masked", [False, True], ids=["whole", "masked"])
def test_prepared_similarity_equals_the_plain_measure(
    name: str, shape: tuple[int, ...], masked: bool
) -> None:
    generator = torch.Generator().manual_seed(0)
    fixed = torch.rand((1, 1, *shape), generator=generator)
    moving = torch.rand((1, 1, *shape), generator=generator)
    mask = (torch.rand((1, 1, *shape), generator=generator) > 0.3).float() if masked else None
    window = 5

    def value_and_gradient(measure) -> tuple[torch.Tensor, torch.Tensor]:
        warped = moving.clone().requires_grad_(True)
        value = measure(warped)
        value.backward()
        return value.detach(), warped.grad

    plain = similarity_function(name)
    expected = value_and_gradient(lambda warped: plain(fixed, warped, mask, window))
    prepared = value_and_gradient(similarity_to(name, fixed, mask, window))
    assert torch.equal(prepared[0], expected[0])
    assert torch.equal(prepared[1], expected[1])
    assert expected[1].abs().sum() > 0


def test_local_ncc_of_an_image_with_itself_is_minus_one_even_where_flat() -> None:
    image = torch.zeros((1, 1, 16, 16))
    image[..., 4:12, 4:12] = torch.rand((8, 8), generator=torch.Generator().manual_seed(1))
    assert float(lncc(image, image)) == pytest.approx(-1.0, abs=1e-6)


def test_an_unknown_similarity_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="lncc, mse, mind"):
        similarity_to("ssd", torch.zeros((1, 1, 4, 4)), None, 3)
