"""Priors and losses for data-free synthesis: each equals its formula on fixed tensors, and the official
DeepInversion / PSAQ-ViT computations (reference transcriptions below) agree with ours on the same tensors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitshrink.distill.priors import (BNStatisticsPrior, PatchSimilarityPrior, available_priors, bn_statistics_loss,
                                      choose_prior, differential_entropy, gaussian_kde, image_l2,
                                      intra_divergence_loss, patch_similarity_entropy, total_variation_l1,
                                      total_variation_l2)
from vitshrink.errors import UserError

torch.set_num_threads(1)


# --- Reference transcriptions (NOT our code) ---------------------------------------------------------------
# NVlabs/DeepInversion deepinversion.py, DeepInversionFeatureHook.hook_fn (the r_feature term).
def _ref_deepinversion_r_feature(module, input_0):
    nch = input_0.shape[1]
    mean = input_0.mean([0, 2, 3])
    var = input_0.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
    return torch.norm(module.running_var.data - var, 2) + torch.norm(module.running_mean.data - mean, 2)


# NVlabs/DeepInversion deepinversion.py, get_image_prior_losses.
def _ref_deepinversion_image_priors(inputs_jit):
    diff1 = inputs_jit[:, :, :, :-1] - inputs_jit[:, :, :, 1:]
    diff2 = inputs_jit[:, :, :-1, :] - inputs_jit[:, :, 1:, :]
    diff3 = inputs_jit[:, :, 1:, :-1] - inputs_jit[:, :, :-1, 1:]
    diff4 = inputs_jit[:, :, :-1, :-1] - inputs_jit[:, :, 1:, 1:]
    loss_var_l2 = torch.norm(diff1) + torch.norm(diff2) + torch.norm(diff3) + torch.norm(diff4)
    loss_var_l1 = (diff1.abs() / 255.0).mean() + (diff2.abs() / 255.0).mean() + (
        diff3.abs() / 255.0).mean() + (diff4.abs() / 255.0).mean()
    loss_var_l1 = loss_var_l1 * 255.0
    return loss_var_l1, loss_var_l2


# zkkli/PSAQ-ViT utils/kde.py GaussianKernel (bandwidth 0.01) + KernelDensityEstimator, and generate_data.py's
# per-hook entropy (differential_entropy, sims, linspace grid) for one layer's matmul2 output ``attention``.
def _ref_psaq_entropy(attention, batch_size):
    def gaussian_kernel(test_xs, train_xs, bandwidth=0.01):
        test_xs = test_xs.view(test_xs.shape[0], test_xs.shape[1], 1)
        train_xs = train_xs.view(train_xs.shape[0], 1, *train_xs.shape[1:])
        diffs = test_xs - train_xs
        var = bandwidth ** 2
        exp = torch.exp(- torch.pow(diffs, 2) / (2 * var))
        coef = 1 / torch.sqrt(torch.tensor(2 * np.pi * var))
        return (coef * exp).mean(dim=-1)

    def differential_entropy_ref(pdf, x_pdf):
        pdf = pdf + 1e-4
        f = -1 * pdf * torch.log(pdf)
        return torch.trapz(f, x_pdf, dim=-1).mean()

    attention_p = attention.mean(dim=1)[:, 1:, :]
    sims = torch.cosine_similarity(attention_p.unsqueeze(1), attention_p.unsqueeze(2), dim=3)
    train = sims.view(batch_size, -1)
    x_plot = torch.linspace(sims.min().item(), sims.max().item(), steps=10).repeat(batch_size, 1)
    return differential_entropy_ref(gaussian_kernel(x_plot, train), x_plot)
# --- end of reference transcriptions -------------------------------------------------------------------------


def test_bn_statistics_loss_is_the_l2_distance_of_batch_stats_to_running_stats():
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2) / 10
    running_mean, running_var = torch.tensor([0.1, 0.5, -0.2]), torch.tensor([1.0, 0.3, 2.0])
    per_channel = x.transpose(0, 1).reshape(3, -1).double().numpy()
    mean, var = per_channel.mean(axis=1), per_channel.var(axis=1)  # numpy var is the biased one
    expected = np.linalg.norm(running_var.numpy() - var) + np.linalg.norm(running_mean.numpy() - mean)
    assert bn_statistics_loss(x, running_mean, running_var).item() == pytest.approx(expected, rel=1e-6)
    bn = nn.BatchNorm2d(3)
    bn.running_mean.copy_(running_mean)
    bn.running_var.copy_(running_var)
    torch.manual_seed(0)
    y = torch.randn(4, 3, 5, 5) * 2 + 1
    diff = (bn_statistics_loss(y, bn.running_mean, bn.running_var) - _ref_deepinversion_r_feature(bn, y)).abs()
    assert diff.item() < 1e-5  # measured max abs diff vs the official hook: 0.0


def test_bn_prior_hooks_every_batchnorm_and_weights_the_first():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5))
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    net.eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        first_in = net[0](x)
        second_in = net[3](net[2](net[1](first_in)))
    expected = (10 * _ref_deepinversion_r_feature(net[1], first_in) + _ref_deepinversion_r_feature(net[4], second_in))
    with BNStatisticsPrior(net, first_multiplier=10) as prior:
        net(x)
        got = prior.loss()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    net(x)  # hooks are gone after the context
    assert all(not bn._forward_hooks for bn in (net[1], net[4]))


def test_total_variation_and_l2_equal_their_formulas():
    image = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    # right: (0-1, 2-4); down: (0-2, 1-4); anti-diagonal: 2-1; diagonal: 0-4
    assert total_variation_l1(image).item() == pytest.approx(1.5 + 2.5 + 1 + 4)
    assert total_variation_l2(image).item() == pytest.approx(math.sqrt(5) + math.sqrt(13) + 1 + 4)
    two = torch.tensor([[[[3.0, 4.0]]], [[[0.0, 0.0]]]])
    assert image_l2(two).item() == pytest.approx((5 + 0) / 2)
    torch.manual_seed(1)
    x = torch.randn(4, 3, 9, 7)
    ref_l1, ref_l2 = _ref_deepinversion_image_priors(x)
    assert abs(total_variation_l1(x) - ref_l1).item() < 1e-4  # measured 4.8e-7 (official divides, re-multiplies by 255)
    assert abs(total_variation_l2(x) - ref_l2).item() < 1e-4  # measured 0.0
    assert abs(image_l2(x) - torch.norm(x.view(4, -1), dim=1).mean()).item() < 1e-6


def test_kde_and_differential_entropy_equal_their_formulas():
    samples = torch.tensor([[0.0, 1.0]])
    points = torch.tensor([[0.0, 0.5]])
    h = 0.5
    expected = [(1 + math.exp(-1 / (2 * h * h))) / 2 / math.sqrt(2 * math.pi * h * h),
                2 * math.exp(-0.25 / (2 * h * h)) / 2 / math.sqrt(2 * math.pi * h * h)]
    assert gaussian_kde(samples, points, h)[0].tolist() == pytest.approx(expected, rel=1e-6)
    # The entropy of N(0, s^2) is 0.5 log(2 pi e s^2); the trapezoidal rule on its exact pdf must find it.
    s = 0.7
    grid = torch.linspace(-8 * s, 8 * s, 4001, dtype=torch.float64).unsqueeze(0)
    pdf = torch.exp(-grid ** 2 / (2 * s * s)) / math.sqrt(2 * math.pi * s * s)
    assert differential_entropy(pdf, grid, eps=0).item() == pytest.approx(0.5 * math.log(2 * math.pi * math.e * s * s),
                                                                          abs=1e-6)


def test_patch_similarity_entropy_matches_psaq_vit_official_code():
    torch.manual_seed(0)
    for batch, heads, tokens, dim in ((3, 2, 17, 8), (2, 3, 65, 16)):
        attention = torch.randn(batch, heads, tokens, dim)
        ours = patch_similarity_entropy(attention.mean(dim=1)[:, 1:, :])
        ref = _ref_psaq_entropy(attention, batch)
        assert abs(ours - ref).item() < 1e-4, (ours, ref)  # measured max abs diff: 4.1e-7


def _tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3,
                             num_classes=5).eval()


def test_patch_similarity_prior_reads_the_head_mean_of_attention_times_values():
    model = _tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    captured = []
    handles = [blk.attn.register_forward_pre_hook(lambda m, inp: captured.append(inp[0])) for blk in model.blocks]
    with PatchSimilarityPrior(model) as prior:
        model(x)
        got = prior.loss()
    for handle in handles:
        handle.remove()
    expected = 0.0
    for block, tokens in zip(model.blocks, captured):  # recompute PSAQ's matmul2 output from the qkv weights
        attn = block.attn
        b, n, c = tokens.shape
        qkv = attn.qkv(tokens).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        expected = expected - _ref_psaq_entropy(weights @ v, b)
    assert got.item() == pytest.approx(float(expected.detach()), abs=1e-4)


def _loop_intra_divergence(z, targets, margin, boundary_weight):
    """The docstring formula written out with loops (independent of the vectorised code)."""
    z = F.normalize(z.double(), dim=1)
    terms = []
    for i in range(len(z)):
        pos = [torch.dist(z[i], z[j]).item() for j in range(len(z)) if j != i and targets[j] == targets[i]]
        neg = [torch.dist(z[i], z[k]).item() for k in range(len(z)) if targets[k] != targets[i]]
        if not pos:
            continue
        term = -sum(pos) / len(pos)
        if neg:
            term += boundary_weight * max(0.0, max(pos) - min(neg) + margin)
        terms.append(term)
    return sum(terms) / len(terms) if terms else 0.0


def test_intra_divergence_equals_its_formula():
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    targets = torch.tensor([0, 0, 1, 1])
    # each anchor: its positive at sqrt(2), its nearest negative at sqrt(2) -> boundary term = margin
    got = intra_divergence_loss(square * 3, targets, margin=0.1, boundary_weight=1.0)
    assert got.item() == pytest.approx(-math.sqrt(2) + 0.1, rel=1e-6)
    tight = torch.tensor([[1.0, 0.0], [0.8, 0.6], [-1.0, 0.0], [-0.8, -0.6]])
    assert intra_divergence_loss(tight, targets).item() == pytest.approx(-math.sqrt(0.4), rel=1e-5)  # boundary off
    assert intra_divergence_loss(tight, torch.tensor([0, 1, 2, 3])).item() == 0.0  # no positives
    torch.manual_seed(0)
    z, t = torch.randn(12, 6), torch.tensor([0, 1, 2] * 4)
    for margin, weight in ((0.1, 1.0), (2.0, 0.5)):
        assert intra_divergence_loss(z, t, margin=margin, boundary_weight=weight).item() == pytest.approx(
            _loop_intra_divergence(z, t, margin, weight), abs=1e-5)
    # Descending the loss spreads a class out.
    z = tight.clone().requires_grad_(True)
    intra_divergence_loss(z, targets).backward()
    moved = F.normalize(z - 0.1 * z.grad, dim=1)
    assert torch.dist(moved[0], moved[1]) > torch.dist(F.normalize(tight, dim=1)[0], F.normalize(tight, dim=1)[1])


def test_auto_prior_follows_what_the_teacher_has_and_refuses_otherwise():
    from vitshrink.models.cifar_resnet import cifar_resnet20

    assert choose_prior(cifar_resnet20()) == "bn"
    vit = _tiny_vit()
    assert available_priors(vit) == ["patch-sim"] and choose_prior(vit, "auto") == "patch-sim"
    with pytest.raises(UserError, match="usable here: patch-sim.*bn .*patch-sim"):
        choose_prior(vit, "bn")
    with pytest.raises(UserError, match="neither BatchNorm2d.*bn .*patch-sim"):
        choose_prior(nn.Sequential(nn.Flatten(), nn.LayerNorm(12), nn.Linear(12, 3)))
    with pytest.raises(UserError, match="--prior must be"):
        choose_prior(vit, "deepinversion")
