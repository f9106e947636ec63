import pytest
import torch

from layerdiff import losses


def test_identity_and_reconstruction_are_zero_at_the_target():
    image = torch.rand(2, 3, 8, 8)
    alpha = torch.rand(2, 1, 8, 8)
    assert losses.identity_loss(image, image) == 0
    assert losses.reconstruction_loss(image, alpha, image, alpha) == 0
    assert losses.reconstruction_loss(image + 0.5, alpha, image, alpha) == pytest.approx(0.25)
    assert losses.reconstruction_loss(image, alpha + 0.5, image, alpha) == pytest.approx(0.25)


def test_identity_target_gets_no_gradient():
    adjusted = torch.rand(1, 3, 4, 4, requires_grad=True)
    original = torch.rand(1, 3, 4, 4, requires_grad=True)
    losses.identity_loss(adjusted, original).backward()
    assert adjusted.grad is not None and original.grad is None


def test_hinge_losses():
    confident_real, confident_fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    assert losses.hinge_discriminator_loss(confident_real, confident_fake) == 0
    assert losses.hinge_discriminator_loss(torch.zeros(4), torch.zeros(4)) == pytest.approx(1.0)
    assert losses.generator_adversarial_loss(torch.tensor([1.0, 3.0])) == pytest.approx(-2.0)


def test_adaptive_weight_is_the_gradient_norm_ratio():
    layer = torch.nn.Linear(3, 2)
    output = layer(torch.ones(5, 3))
    reconstruction = output.square().mean()
    adversarial = 10.0 * output.mean()
    weight = losses.adaptive_adversarial_weight(reconstruction, adversarial, layer.weight)
    grad_rec = torch.autograd.grad(reconstruction, layer.weight, retain_graph=True)[0]
    grad_adv = torch.autograd.grad(adversarial, layer.weight)[0]
    assert weight == pytest.approx((grad_rec.norm() / (grad_adv.norm() + 1e-4)).item(), rel=1e-5)
    assert not weight.requires_grad


def test_generator_total_follows_equation_6():
    total = losses.transparent_vae_generator_loss(
        torch.tensor(2.0), torch.tensor(3.0), torch.tensor(5.0),
        reconstruction_weight=1.0, identity_weight=0.5, adversarial_weight=0.01,
    )
    assert total == pytest.approx(2.0 + 1.5 + 0.05)
    without_gan = losses.transparent_vae_generator_loss(
        torch.tensor(2.0), torch.tensor(3.0), None, reconstruction_weight=1.0, identity_weight=1.0, adversarial_weight=0.01
    )
    assert without_gan == pytest.approx(5.0)
