"""Synthesis settings: the official scripts' values, one named set per teacher kind, chosen from the teacher.

``settings_for(prior, input_size, name)`` returns a ``SynthesisSettings``:

* ``deepinversion-cifar`` -- BatchNorm CNN at <= 64 px: NVlabs/DeepInversion ``cifar10/deepinversion_cifar10.py``
  run with the paper parameters of ``cifar10/README.md`` (``--bs=256 --r_feature_weight=10 --di_lr=0.05``).
* ``deepinversion-imagenet`` -- BatchNorm CNN at larger sizes: NVlabs/DeepInversion ``imagenet_inversion.py``
  defaults with ``deepinversion.py`` ``setting_id=1`` (2,000 iterations at full resolution).
* ``psaq-vit-deit`` -- LayerNorm ViT (patch-similarity prior): zkkli/PSAQ-ViT ``generate_data.py`` for DeiT.

Every value cites its source; what is ours says so (docs/FIDELITY.md, "Synthesis", lists every difference).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from vitshrink.errors import UserError

SETTING_SETS = ("deepinversion-cifar", "deepinversion-imagenet", "psaq-vit-deit")
SETTINGS_HELP = "auto|" + "|".join(SETTING_SETS) + " (auto: from the teacher's prior and input size)"
# DeepInversion's CIFAR script is written for 32 px; we use it up to 64 px (ours: the boundary between "CIFAR-like"
# and "ImageNet-like" inputs; 64 px is Tiny-ImageNet's size, still far from 224).
SMALL_INPUT_MAX = 64


@dataclass
class SynthesisSettings:
    """The optimisation's settings. The defaults are the ``deepinversion-imagenet`` set; ``settings_for`` builds
    the others."""

    name: str = "deepinversion-imagenet"
    # Steps per batch and images per batch: deepinversion.py setting_id=1 (2,000 iterations at full resolution);
    # imagenet_inversion.py --bs 64.
    iterations: int = 2000
    batch_size: int = 64
    # Adam on the pixels: imagenet_inversion.py --lr 0.2; deepinversion.py betas (0.5, 0.9), eps 1e-8.
    lr: float = 0.2
    betas: tuple[float, float] = (0.5, 0.9)
    # "cosine": utils.lr_cosine_policy(lr, 100, iterations) (linear warm-up over 100 iterations, then cosine),
    # restarted at each stage; "constant": no schedule (DeepInversion's CIFAR script). Ours: the warm-up is capped
    # at a fifth of a stage so short runs leave it (official stages are >= 500 iterations: the cap never binds).
    lr_schedule: str = "cosine"
    warmup_iterations: int = 100
    # Cross-entropy to the target: deepinversion.py main_loss_multiplier 1.0.
    ce_weight: float = 1.0
    # BatchNorm statistics: imagenet_inversion.py --r_feature 0.05, --first_bn_multiplier 10.
    bn_weight: float = 0.05
    first_bn_multiplier: float = 10.0
    # Patch-similarity entropy (PSAQ-ViT generate_data.py: loss_entropy enters with weight 1); Gaussian KDE
    # bandwidth 0.01 (PSAQ-ViT utils/kde.py).
    patch_sim_weight: float = 1.0
    kde_bandwidth: float = 0.01
    # Image priors: imagenet_inversion.py --tv_l1 0, --tv_l2 1e-4, --l2 1e-5.
    tv_l1_weight: float = 0.0
    tv_l2_weight: float = 1e-4
    l2_weight: float = 1e-5
    # PSAQ-ViT's TV-range prior, weight * |TV_l2 - U(low, high)| (generate_data.py: 0.05, U(2500, 3000) drawn once
    # per batch "for batch_size 32" at 3x224x224). Ours: the range is scaled by sqrt(elements / 32*3*224*224),
    # as TV_l2 (a norm over the whole batch) scales, so other batch and image sizes ask for the same smoothness.
    tv_range_weight: float = 0.0
    tv_range: tuple[float, float] = (2500.0, 3000.0)
    tv_range_reference_elements: int = 32 * 3 * 224 * 224
    # Random shift of the image (torch.roll) in each stage, as a fraction of the image side: deepinversion.py
    # jitter 30 at 224 px. Iterations are split evenly over the stages, the lr schedule restarting at each.
    jitter_stages: tuple[float, ...] = (30 / 224,)
    # One offset for both axes (PSAQ-ViT: shifts=(off, off)) or one per axis (DeepInversion: off1, off2).
    jitter_same_offset: bool = False
    # Horizontal flip with p = 0.5: imagenet_inversion.py parameters["do_flip"] = True (README: --do_flip).
    flip: bool = True
    # Clamp pixels to the valid range after each step: deepinversion.py do_clip = True for setting_id 0 and 1.
    clip: bool = True
    # "best": keep the batch with the lowest total loss (deepinversion.py best_cost / best_inputs), "last": the
    # final iterate (PSAQ-ViT generate_data.py returns img after the last step).
    keep: str = "best"
    # Boundary-preserving intra-divergence (DearKD; our formulation, see vitshrink.distill.priors): OFF by default,
    # as in every official synthesis script above; it was never measured on vs off (docs/FIDELITY.md).
    divergence_weight: float = 0.0
    divergence_margin: float = 0.1
    extra: dict[str, Any] = field(default_factory=dict)

    def stage_iterations(self) -> list[int]:
        """Iterations of each jitter stage: an even split, any remainder in the last stage."""
        count = len(self.jitter_stages)
        base = self.iterations // count
        return [base] * (count - 1) + [self.iterations - base * (count - 1)]

    def tv_range_target(self, elements: int, draw: float) -> float:
        """PSAQ-ViT's ``var_pred`` for a batch of ``elements`` values, with ``draw`` uniform in [0, 1)."""
        low, high = self.tv_range
        return (low + (high - low) * draw) * math.sqrt(elements / self.tv_range_reference_elements)


def _deepinversion_cifar() -> SynthesisSettings:
    # cifar10/deepinversion_cifar10.py with cifar10/README.md's paper parameters (--bs=256 --r_feature_weight=10
    # --di_lr=0.05): --iters_mi 2000; optim.Adam([inputs], lr) with torch's default betas (0.9, 0.999) and no lr
    # schedule; --di_var_scale 2.5e-5 (TV l2); --di_l2_scale 0; no TV l1; r_feature summed without a first-layer
    # boost; jitter lim_0 = lim_1 = 2 at 32 px, one offset per axis; no flip; no clip; main loss weight 1.
    return SynthesisSettings(
        name="deepinversion-cifar", iterations=2000, batch_size=256, lr=0.05, betas=(0.9, 0.999),
        lr_schedule="constant", bn_weight=10.0, first_bn_multiplier=1.0, tv_l1_weight=0.0, tv_l2_weight=2.5e-5,
        l2_weight=0.0, jitter_stages=(2 / 32,), jitter_same_offset=False, flip=False, clip=False, keep="best")


def _psaq_vit_deit() -> SynthesisSettings:
    # zkkli/PSAQ-ViT generate_data.py: lr 0.20 for DeiT (0.25 for Swin), Adam betas (0.5, 0.9), eps 1e-8;
    # two stages of 500 iterations, jitter lim 15 then 30 at 224 px, one offset for both axes (shifts=(off, off)),
    # lr_cosine_policy(lr, 100, 500) restarted per stage; flip p = 0.5; clip; loss = -entropy + 1.0 * CE + 0.05 *
    # |TV_l2 - U(2500, 3000)|; no BN, TV l1 or l2 term; the last iterate is returned. Batch: test_quant.py
    # --calib-batchsize default 32 (the U(2500, 3000) comment says "for batch_size 32").
    return SynthesisSettings(
        name="psaq-vit-deit", iterations=1000, batch_size=32, lr=0.20, betas=(0.5, 0.9), lr_schedule="cosine",
        bn_weight=0.0, first_bn_multiplier=1.0, patch_sim_weight=1.0, tv_l1_weight=0.0, tv_l2_weight=0.0,
        l2_weight=0.0, tv_range_weight=0.05, jitter_stages=(15 / 224, 30 / 224), jitter_same_offset=True,
        flip=True, clip=True, keep="last")


def settings_for(prior: str, input_size: Sequence[int], name: str = "auto") -> SynthesisSettings:
    """The named set (``auto``: from ``prior`` 'bn'/'patch-sim' and the teacher's ``input_size`` (C, H, W))."""
    if name not in ("auto", *SETTING_SETS):
        raise UserError(f"--settings must be {SETTINGS_HELP.split(' ')[0]}, got {name!r}")
    if name == "auto":
        if prior == "patch-sim":
            name = "psaq-vit-deit"
        else:
            name = "deepinversion-cifar" if max(input_size[1:]) <= SMALL_INPUT_MAX else "deepinversion-imagenet"
    if name == "deepinversion-cifar":
        return _deepinversion_cifar()
    if name == "psaq-vit-deit":
        return _psaq_vit_deit()
    return SynthesisSettings()


def with_overrides(settings: SynthesisSettings, **overrides: Any) -> SynthesisSettings:
    """``settings`` with the user's explicit values (None: keep the set's) applied."""
    return replace(settings, **{key: value for key, value in overrides.items() if value is not None})
