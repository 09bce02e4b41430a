"""Training tasks of the feature-relation methods (losses: :mod:`vitshrink.distill.feature_losses`).

* :class:`ManifoldTask` -- logit KD plus the manifold terms between tapped student and teacher blocks.
* :class:`TargetAwareTask` -- logit KD plus TaT between the student's and the teacher's last feature maps.
* :class:`CrossArchTask` -- a CNN student from a ViT teacher: labels plus the partially cross attention and
  group-wise linear projector losses, with multi-view robust training.

Each task's trainable module is the student together with its projectors, and computes the feature loss in
its own ``forward`` (teacher tensors passed in), so DDP sees every trained parameter take part in the forward.
Only the student is saved as the model; the projectors are checkpointed in ``last.pt``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitshrink.distill import feature_losses, losses
from vitshrink.distill.taps import FeatureTaps
from vitshrink.distill.tasks import DistillTask
from vitshrink.distill.teachers import Teachers


def patch_map(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """ViT tokens (B, prefix + H*W, C) -> the patch tokens as a (B, C, H, W) map (prefix tokens dropped)."""
    height, width = int(grid[0]), int(grid[1])
    patches = tokens[:, tokens.shape[1] - height * width:]
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def to_grid(feature: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """A (B, C, H, W) map brought to ``grid``: average-pooled when larger, bilinear when smaller."""
    size = (int(grid[0]), int(grid[1]))
    if tuple(feature.shape[-2:]) == size:
        return feature
    if feature.shape[-2] >= size[0] and feature.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(feature, size)
    return F.interpolate(feature, size=size, mode="bilinear", align_corners=False)


class TappedStudent(nn.Module):
    """The student, returning ``(logits, {point: tensor})`` for its feature points."""

    def __init__(self, student: nn.Module, points: Sequence[str]):
        super().__init__()
        self.student, self.points = student, list(points)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with FeatureTaps(self.student, self.points) as feats:
            logits = self.student(x)
        return logits, dict(feats)


class ManifoldTask(DistillTask):
    """``(1 - kd_weight) CE + kd_weight T^2 KL + beta (w_inter L_inter + w_intra L_intra + w_random L_random)``
    (ManifoldKD ``DistillationLoss`` + ``engine.py``: the five terms are summed)."""

    soft_targets = True

    def __init__(self, student: nn.Module, teachers: Teachers, *, pairs: Sequence[tuple[str, str]], kd_weight: float,
                 temperature: float, beta: float, num_random: int, intra_weight: float, inter_weight: float,
                 random_weight: float, smoothing: float = 0.0):
        super().__init__(TappedStudent(student, [s for s, _ in pairs]), teachers)
        self.pairs, self.kd_weight, self.temperature, self.beta = list(pairs), kd_weight, temperature, beta
        self.num_random, self.smoothing = num_random, smoothing
        self.weights = dict(intra_weight=intra_weight, inter_weight=inter_weight, random_weight=random_weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor | None = None,
                extras: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        logits, feats = self.trainable_module(input)
        teacher_logits, teacher_feats = self.teachers.main.features(input, [t for _, t in self.pairs])
        kd = losses.kd_loss(logits, teacher_logits, target, kd_weight=self.kd_weight, temperature=self.temperature,
                            smoothing=self.smoothing)
        terms = feature_losses.manifold_loss([feats[s] for s, _ in self.pairs],
                                             [teacher_feats[t] for _, t in self.pairs],
                                             num_random=self.num_random, **self.weights)
        manifold = self.beta * (terms.intra + terms.inter + terms.random)
        return {**kd, "loss": kd["loss"] + manifold, "output": logits, "manifold_loss": manifold.detach(),
                "intra_loss": terms.intra.detach(), "inter_loss": terms.inter.detach(),
                "random_loss": terms.random.detach()}


class Embed(nn.Module):
    """TaT's student embedding (official ``special.py`` ``Embed``): 3x3 conv without bias, then BatchNorm."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class TargetAwareStudent(nn.Module):
    """The student plus TaT's query and value embeddings; ``forward(x, teacher_map)`` -> (logits, TaT loss)."""

    def __init__(self, student: nn.Module, point: str, grid: Sequence[int], widths: tuple[int, int], form: str,
                 patch_grid: Sequence[int], heads: int, anchors: Sequence[int], patch_weight: float,
                 anchor_weight: float):
        super().__init__()
        self.student, self.point, self.grid = student, point, tuple(grid)
        self.query, self.value = Embed(*widths), Embed(*widths)
        self.form, self.patch_grid, self.heads, self.anchors = form, tuple(patch_grid), heads, tuple(anchors)
        self.patch_weight, self.anchor_weight = patch_weight, anchor_weight

    def forward(self, x: torch.Tensor, teacher_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with FeatureTaps(self.student, [self.point]) as feats:
            logits = self.student(x)
        student_map = patch_map(feats[self.point], self.grid)
        q, v = self.query(student_map), self.value(student_map)
        key = target = to_grid(teacher_map, self.grid)  # the official classification code: key = teacher feature
        if self.form == "one_to_all":
            return logits, feature_losses.target_aware_loss(q, key, v, target)
        rows, cols = self.patch_grid
        grouped = feature_losses.patch_group_loss(q, key, v, target, rows=rows, cols=cols, heads=self.heads)
        anchored = feature_losses.anchor_point_loss(q, key, v, target, anchor_rows=self.anchors[0],
                                                    anchor_cols=self.anchors[1])
        return logits, self.patch_weight * grouped + self.anchor_weight * anchored


class TargetAwareTask(DistillTask):
    """``(1 - kd_weight) CE + kd_weight T^2 KL + tat_weight L_TaT`` (official TaT config: ``KDLoss`` alpha 0.5,
    T 1, plus ``MaskedFM`` with factor 0.1)."""

    soft_targets = True

    def __init__(self, student: nn.Module, teachers: Teachers, *, teacher_point: str, teacher_grid: Sequence[int],
                 kd_weight: float, temperature: float, tat_weight: float, smoothing: float = 0.0, **student_kwargs):
        super().__init__(TargetAwareStudent(student, **student_kwargs), teachers)
        self.teacher_point, self.teacher_grid = teacher_point, tuple(teacher_grid)
        self.kd_weight, self.temperature = kd_weight, temperature
        self.tat_weight, self.smoothing = tat_weight, smoothing

    def forward(self, input: torch.Tensor, target: torch.Tensor | None = None,
                extras: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        teacher_logits, feats = self.teachers.main.features(input, [self.teacher_point])
        logits, tat = self.trainable_module(input, patch_map(feats[self.teacher_point], self.teacher_grid))
        kd = losses.kd_loss(logits, teacher_logits, target, kd_weight=self.kd_weight, temperature=self.temperature,
                            smoothing=self.smoothing)
        return {**kd, "loss": kd["loss"] + self.tat_weight * tat, "output": logits, "tat_loss": tat.detach()}


class GroupWiseLinear(nn.Module):
    """The group-wise linear projector: the map's positions are cut into ``group`` x ``group`` tiles of
    neighbouring positions; every position of a tile goes through that tile's own linear layer."""

    def __init__(self, in_channels: int, out_channels: int, grid: Sequence[int], group: int):
        super().__init__()
        rows, cols = (torch.arange(int(n)) // group for n in grid)
        tile = rows[:, None] * int(cols.max() + 1) + cols[None, :]
        self.register_buffer("tile", tile.flatten(), persistent=False)
        tiles = int(tile.max()) + 1
        self.weight = nn.Parameter(torch.empty(tiles, in_channels, out_channels))
        self.bias = nn.Parameter(torch.zeros(tiles, out_channels))
        bound = in_channels ** -0.5  # nn.Linear's default init, per tile
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> tokens (B, H*W, C_out)."""
        tokens = feature_map.flatten(2).transpose(1, 2)
        return torch.einsum("bnc,nco->bno", tokens, self.weight[self.tile]) + self.bias[self.tile]


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


class CrossArchStudent(nn.Module):
    """A CNN student plus the PCA projector (three 3x3 convs to Q, K, V), the GL projector and the multi-view
    discriminator. ``forward(x, teacher_qkv, teacher_tokens)`` -> (logits, {pca, gl, adversarial} losses)."""

    def __init__(self, student: nn.Module, point: str, grid: Sequence[int], widths: tuple[int, int], heads: int,
                 cross_probability: float, group: int):
        super().__init__()
        self.student, self.point, self.grid, self.heads = student, point, tuple(grid), heads
        self.cross_probability = cross_probability
        cnn, vit = widths
        self.qkv = nn.ModuleList(nn.Conv2d(cnn, vit, kernel_size=3, padding=1) for _ in range(3))
        self.linear = GroupWiseLinear(cnn, vit, grid, group)
        self.discriminator = nn.Sequential(nn.Linear(vit, vit // 2), nn.LeakyReLU(0.2), nn.Linear(vit // 2, 1))

    def forward(self, x: torch.Tensor, teacher_qkv: torch.Tensor, teacher_tokens: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with FeatureTaps(self.student, [self.point]) as feats:
            logits = self.student(x)
        feature = to_grid(feats[self.point], self.grid)
        batch, tokens = feature.shape[0], self.grid[0] * self.grid[1]
        student_qkv = [conv(feature).flatten(2).transpose(1, 2).reshape(batch, tokens, self.heads, -1).transpose(1, 2)
                       for conv in self.qkv]
        p = self.cross_probability if self.training else 0.0
        crossed = [feature_losses.partial_cross(s, t, p) for s, t in zip(student_qkv, teacher_qkv)]
        pca = feature_losses.cross_attention_loss(crossed, teacher_qkv)
        projected = self.linear(feature)
        gl = F.mse_loss(projected.float(), teacher_tokens.float())
        # The discriminator learns teacher (1) from projected student (0) features; the student sees the
        # reversed gradient, so one optimiser step trains both sides of the min-max.
        real = self.discriminator(teacher_tokens.mean(1))
        fake = self.discriminator(_ReverseGradient.apply(projected).mean(1))
        adversarial = F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) \
            + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        return logits, {"pca_loss": pca, "gl_loss": gl, "adversarial_loss": adversarial}


def multi_view(images: torch.Tensor, probability: float, erase: float, noise: float) -> torch.Tensor:
    """The multi-view generator: each image, with ``probability``, gets a random square (side ``erase`` of the
    image) set to zero and Gaussian noise of std ``noise`` (normalised units); draws from the global generator."""
    if probability <= 0:
        return images
    batch, _, height, width = images.shape
    chosen = (torch.rand(batch, device=images.device) < probability).view(batch, 1, 1, 1)
    side_h, side_w = max(1, int(height * erase)), max(1, int(width * erase))
    top = torch.randint(0, height - side_h + 1, (batch, 1, 1), device=images.device)
    left = torch.randint(0, width - side_w + 1, (batch, 1, 1), device=images.device)
    rows = torch.arange(height, device=images.device).view(1, height, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, width)
    box = ((rows >= top) & (rows < top + side_h) & (cols >= left) & (cols < left + side_w)).unsqueeze(1)
    viewed = images.masked_fill(box, 0.0) + noise * torch.randn_like(images)
    return torch.where(chosen, viewed, images)


class CrossArchTask(DistillTask):
    """``CE(y) + pca_weight L_PCA + gl_weight L_GL + adversarial_weight L_adv`` on the multi-view batch."""

    soft_targets = True

    def __init__(self, student: nn.Module, teachers: Teachers, *, teacher_block: str, prefix_tokens: int,
                 pca_weight: float, gl_weight: float, adversarial_weight: float, view_probability: float,
                 view_erase: float, view_noise: float, smoothing: float = 0.0, **student_kwargs):
        super().__init__(CrossArchStudent(student, **student_kwargs), teachers)
        self.teacher_block, self.prefix = teacher_block, prefix_tokens
        self.weights = {"pca_loss": pca_weight, "gl_loss": gl_weight, "adversarial_loss": adversarial_weight}
        self.view = (view_probability, view_erase, view_noise)
        self.smoothing = smoothing

    def forward(self, input: torch.Tensor, target: torch.Tensor,
                extras: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        images = multi_view(input, *self.view) if self.training else input
        points = [f"{self.teacher_block}:qkv", self.teacher_block]
        _, feats = self.teachers.main.features(images, points)
        teacher_qkv = feats[points[0]][:, :, :, self.prefix:]
        logits, terms = self.trainable_module(images, teacher_qkv, feats[points[1]][:, self.prefix:])
        task_loss = losses.cross_entropy(logits, target, self.smoothing)
        loss = task_loss + sum(self.weights[name] * value for name, value in terms.items())
        return {"loss": loss, "output": logits, "task_loss": task_loss.detach(),
                **{name: value.detach() for name, value in terms.items()}}
