"""The optimisation's own Adam (``torch.optim.Adam`` imports torch's compiler stack on first use):
it takes torch's steps, and its in-place update rounds as the textbook expression does."""

from __future__ import annotations

import torch

from DeepRegisterLib.registration.optimisation import Adam


def gradients(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(9)
    return [torch.randn((1, 3, 5, 6, 7), generator=generator) for _ in range(count)]


def test_our_adam_takes_torchs_steps() -> None:
    start = torch.randn((1, 3, 5, 6, 7), generator=torch.Generator().manual_seed(4))
    ours, theirs = start.clone(), start.clone().requires_grad_(True)
    optimiser, reference = Adam(ours, lr=0.5), torch.optim.Adam([theirs], lr=0.5)
    for grad in gradients(20):
        ours.grad, theirs.grad = grad, grad.clone()
        optimiser.step()
        reference.step()
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-5)
    assert not torch.equal(ours, start)


def test_our_adams_update_rounds_as_the_textbook_expression() -> None:
    lr, (beta1, beta2), eps = 0.5, (0.9, 0.999), 1e-8
    parameter = torch.zeros((1, 3, 5, 6, 7))
    expected = parameter.clone()
    first, second = torch.zeros_like(expected), torch.zeros_like(expected)
    optimiser = Adam(parameter, lr)
    for step, grad in enumerate(gradients(12), start=1):
        parameter.grad = grad
        optimiser.step()
        first = torch.add(first * beta1, grad, alpha=1 - beta1)
        second = torch.addcmul(second * beta2, grad, grad, value=1 - beta2)
        first_hat, second_hat = first / (1 - beta1**step), second / (1 - beta2**step)
        expected = expected - lr * first_hat / (second_hat.sqrt() + eps)
        assert torch.equal(parameter, expected), step
