"""Image priors and losses for data-free synthesis (``vitshrink synthesize``).

Each prior is a small function on tensors (tested against its formula) plus, where it needs a model's
internals, a context manager that installs forward hooks and sums the per-layer terms after a forward pass.

* BatchNorm statistics (DeepInversion, Yin et al. CVPR 2020, NVlabs/DeepInversion ``DeepInversionFeatureHook``):
  ``||var_batch - running_var||_2 + ||mean_batch - running_mean||_2`` on each BatchNorm2d input.
* Total variation, l1 and l2 forms, and the image l2 norm (DeepInversion ``get_image_prior_losses``); PSAQ-ViT's
  TV-range prior ``|TV_l2 - target|`` (zkkli/PSAQ-ViT ``generate_data.py``).
* Patch-similarity entropy (PSAQ-ViT, Li et al. ECCV 2022, zkkli/PSAQ-ViT ``generate_data.py``): the
  differential entropy of the cosine similarities between patch features of each MHSA output, estimated with
  a Gaussian kernel density; synthesis maximises it (the loss is its negative).
* Boundary-preserving intra-divergence (DearKD, Chen et al. CVPR 2022): the paper's exact formula could not be
  read, so ``intra_divergence_loss`` is OUR formulation; see its docstring.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitshrink.errors import UserError

PRIORS = ("bn", "patch-sim")
PRIOR_HELP = "bn (BatchNorm teachers: DeepInversion), patch-sim (ViT teachers: PSAQ-ViT)"


# --- BatchNorm statistics ------------------------------------------------------------------------------------

def bn_statistics_loss(features: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """DeepInversion's R_feature for one BatchNorm2d: l2 distance of the batch's per-channel mean and (biased)
    variance of the layer input ``features`` [B, C, H, W] to the layer's running statistics."""
    x = features.float()
    mean = x.mean(dim=(0, 2, 3))
    var = x.transpose(0, 1).reshape(x.shape[1], -1).var(dim=1, unbiased=False)
    return torch.linalg.vector_norm(running_var.float() - var) + torch.linalg.vector_norm(running_mean.float() - mean)


def batchnorm_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BatchNorm2d layers that carry running statistics (the ones DeepInversion can match)."""
    return [m for m in model.modules()
            if isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None]


class HookedPrior:
    """Per-layer terms that forward hooks on ``layers`` record during one forward pass; ``loss()`` combines them
    (``_total``). A subclass says how a layer is hooked (``_register``). Use as a context manager: the hooks are
    removed on exit."""

    def __init__(self, layers: Sequence[nn.Module]):
        self.layers = list(layers)
        self._terms: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def _register(self, index: int, layer: nn.Module):
        """Install the hook that stores layer ``index``'s term in ``self._terms[index]``; return its handle."""
        raise NotImplementedError

    def _total(self, terms: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def __enter__(self):
        self._handles = [self._register(i, layer) for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def loss(self) -> torch.Tensor:
        if len(self._terms) != len(self.layers):
            raise RuntimeError(f"{type(self).__name__}.loss() before a forward pass through every hooked layer")
        terms = [self._terms[i] for i in range(len(self.layers))]
        self._terms = {}
        return self._total(terms)


class BNStatisticsPrior(HookedPrior):
    """Hooks every BatchNorm2d of ``model``; after a forward pass, ``loss()`` is the sum of the per-layer
    ``bn_statistics_loss`` terms, the first layer's weighted by ``first_multiplier`` (DeepInversion's
    ``first_bn_multiplier``)."""

    def __init__(self, model: nn.Module, *, first_multiplier: float = 1.0):
        layers = batchnorm_layers(model)
        if not layers:
            raise UserError(f"the teacher has no BatchNorm2d layer with running statistics: prior 'bn' needs one; "
                            f"priors: {PRIOR_HELP}")
        super().__init__(layers)
        self.first_multiplier = first_multiplier

    def _register(self, index: int, layer: nn.Module):
        def hook(module: nn.BatchNorm2d, inputs, output) -> None:
            self._terms[index] = bn_statistics_loss(inputs[0], module.running_mean, module.running_var)
        return layer.register_forward_hook(hook)

    def _total(self, terms: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([t * (self.first_multiplier if i == 0 else 1.0) for i, t in enumerate(terms)]).sum()


# --- Image priors -------------------------------------------------------------------------------------------

def _neighbour_differences(images: torch.Tensor) -> list[torch.Tensor]:
    """Differences to the right, down, and along both diagonals (DeepInversion's four TV directions)."""
    return [images[:, :, :, :-1] - images[:, :, :, 1:],
            images[:, :, :-1, :] - images[:, :, 1:, :],
            images[:, :, 1:, :-1] - images[:, :, :-1, 1:],
            images[:, :, :-1, :-1] - images[:, :, 1:, 1:]]


def total_variation_l1(images: torch.Tensor) -> torch.Tensor:
    """Sum over the four directions of the mean absolute neighbour difference."""
    return sum(d.abs().mean() for d in _neighbour_differences(images))


def total_variation_l2(images: torch.Tensor) -> torch.Tensor:
    """Sum over the four directions of the Frobenius norm of the neighbour differences (whole batch)."""
    return sum(torch.linalg.vector_norm(d) for d in _neighbour_differences(images))


def total_variation_range(images: torch.Tensor, target: float) -> torch.Tensor:
    """PSAQ-ViT's image prior (zkkli/PSAQ-ViT ``generate_data.py``: ``torch.norm(get_image_prior_losses(img_jit)
    - var_pred)``): the distance of the batch's ``total_variation_l2`` to a target value, so images are pulled
    toward a given smoothness rather than to flat colour. The official target is drawn from U(2500, 3000) once
    per batch (``SynthesisSettings.tv_range_target``)."""
    return (total_variation_l2(images) - target).abs()


def image_l2(images: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each image's l2 norm (DeepInversion's ``loss_l2``)."""
    return torch.linalg.vector_norm(images.flatten(1), dim=1).mean()


# --- Patch-similarity entropy (PSAQ-ViT) ----------------------------------------------------------------------

def gaussian_kde(samples: torch.Tensor, points: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Gaussian kernel density of each row of ``samples`` [B, M] evaluated at ``points`` [B, P] -> [B, P]."""
    diffs = points.unsqueeze(2) - samples.unsqueeze(1)
    norm = 1.0 / math.sqrt(2.0 * math.pi * bandwidth ** 2)
    return (norm * torch.exp(-diffs.pow(2) / (2.0 * bandwidth ** 2))).mean(dim=2)


def differential_entropy(density: torch.Tensor, points: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``-integral p log p`` by the trapezoidal rule over ``points``, per row, then the batch mean. ``eps`` is
    added to the density before the log, as PSAQ-ViT does, so empty bins contribute ~0 and log stays finite."""
    density = density + eps
    return torch.trapezoid(-density * torch.log(density), points, dim=-1).mean()


def patch_similarity_entropy(patches: torch.Tensor, *, bandwidth: float = 0.01, steps: int = 10) -> torch.Tensor:
    """PSAQ-ViT's prior on one layer: the differential entropy of the pairwise cosine similarities between the
    patch features ``patches`` [B, N, C] of each image (all N*N pairs, as the official code), estimated with a
    Gaussian KDE (bandwidth 0.01) at ``steps`` points spanning the batch's [min, max] similarity."""
    unit = F.normalize(patches.float(), dim=2, eps=1e-8)
    sims = unit @ unit.transpose(1, 2)  # = F.cosine_similarity over all pairs, without the [B, N, N, C] broadcast
    batch = sims.shape[0]
    low, high = sims.min().item(), sims.max().item()  # the grid is a constant, as in the official code
    points = torch.linspace(low, high, steps, device=sims.device).repeat(batch, 1)
    return differential_entropy(gaussian_kde(sims.reshape(batch, -1), points, bandwidth), points)


def _num_prefix_tokens(model: nn.Module) -> int:
    return int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0))


def vit_attention_layers(model: nn.Module) -> list[nn.Module]:
    """The MHSA modules of a timm-style ViT (``blocks.N.attn`` with ``proj`` and ``num_heads``), else []."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        return []
    layers = [getattr(block, "attn", None) for block in blocks]
    if not layers or any(a is None or not isinstance(getattr(a, "proj", None), nn.Module)
                         or not hasattr(a, "num_heads") for a in layers):
        return []
    return layers


class PatchSimilarityPrior(HookedPrior):
    """Hooks each MHSA of a ViT; after a forward pass, ``loss()`` is ``-sum_layers patch_similarity_entropy``.

    The tapped feature is the official one: the per-head ``softmax(qk^T) v`` averaged over heads (PSAQ-ViT hooks
    ``attn.matmul2`` and takes ``.mean(dim=1)``). In timm that tensor is the input of ``attn.proj`` with the heads
    concatenated, so it is read there and reshaped [B, N, H, d] -> mean over H. Prefix (class) tokens are dropped.
    """

    def __init__(self, model: nn.Module, *, bandwidth: float = 0.01, steps: int = 10):
        layers = vit_attention_layers(model)
        if not layers:
            raise UserError("the teacher has no ViT attention blocks (blocks.N.attn): prior 'patch-sim' needs them; "
                            f"priors: {PRIOR_HELP}")
        super().__init__(layers)
        self.prefix = _num_prefix_tokens(model)
        self.bandwidth, self.steps = bandwidth, steps

    def _register(self, index: int, layer: nn.Module):
        heads = int(layer.num_heads)

        def hook(module: nn.Module, inputs) -> None:
            x = inputs[0]
            batch, tokens, width = x.shape
            per_head_mean = x.reshape(batch, tokens, heads, width // heads).mean(dim=2)
            self._terms[index] = patch_similarity_entropy(per_head_mean[:, self.prefix:], bandwidth=self.bandwidth,
                                                          steps=self.steps)
        return layer.proj.register_forward_pre_hook(hook)

    def _total(self, terms: list[torch.Tensor]) -> torch.Tensor:
        return -torch.stack(terms).sum()


# --- Boundary-preserving intra-divergence (DearKD; our formulation) -------------------------------------------

def intra_divergence_loss(embeddings: torch.Tensor, targets: torch.Tensor, *, margin: float = 0.1,
                          boundary_weight: float = 1.0) -> torch.Tensor:
    """Boundary-preserving intra-divergence. OUR formulation: DearKD (Chen et al. CVPR 2022, sec. 3.3) names the
    loss and its intent -- push synthesised samples of one class apart while keeping them on their class's side
    of the decision boundary -- but its exact formula could not be read, so this is ours.

    With ``z`` the l2-normalised teacher embeddings [B, D] and ``d_ij = ||z_i - z_j||_2``, for each anchor ``i``
    with positives ``P(i)`` (same target, ``j != i``) and negatives ``N(i)`` (other targets):

        divergence_i = -mean_{j in P(i)} d_ij                       (spread each class out)
        boundary_i   = relu(max_{j in P(i)} d_ij - min_{k in N(i)} d_ik + margin)
                                                                    (but keep it nearer itself than any other class)
        loss = mean_i (divergence_i + boundary_weight * boundary_i)

    over the anchors that have a positive; an anchor without negatives has no boundary term. Returns 0 when no
    anchor has a positive (every target distinct).
    """
    z = F.normalize(embeddings.float(), dim=1)
    dist = torch.cdist(z, z)  # exact zeros on the diagonal are excluded below
    same = targets.unsqueeze(0) == targets.unsqueeze(1)
    eye = torch.eye(len(targets), dtype=torch.bool, device=targets.device)
    positive, negative = same & ~eye, ~same
    has_pos = positive.any(dim=1)
    if not has_pos.any():
        return embeddings.sum() * 0.0
    pos_count = positive.sum(dim=1).clamp(min=1)
    divergence = -(dist * positive).sum(dim=1) / pos_count
    farthest_pos = dist.masked_fill(~positive, float("-inf")).max(dim=1).values
    nearest_neg = dist.masked_fill(~negative, float("inf")).min(dim=1).values
    has_neg = negative.any(dim=1)
    boundary = torch.where(has_neg & has_pos, F.relu(farthest_pos - nearest_neg + margin), torch.zeros_like(divergence))
    per_anchor = divergence + boundary_weight * boundary
    return per_anchor[has_pos].mean()


# --- Which prior a teacher supports ---------------------------------------------------------------------------

def available_priors(model: nn.Module) -> list[str]:
    """The priors this model supports: 'bn' with BatchNorm2d running stats, 'patch-sim' with ViT MHSA blocks."""
    found = []
    if batchnorm_layers(model):
        found.append("bn")
    if vit_attention_layers(model):
        found.append("patch-sim")
    return found


def choose_prior(model: nn.Module, prior: str = "auto") -> str:
    """Resolve ``prior`` (auto|bn|patch-sim) for ``model``; BatchNorm wins under auto (DeepInversion's prior
    matches real feature statistics, the stronger signal). A prior the model cannot use is a UserError."""
    if prior not in ("auto", *PRIORS):
        raise UserError(f"--prior must be auto, bn or patch-sim, got {prior!r}")
    found = available_priors(model)
    if prior == "auto":
        if not found:
            raise UserError(f"the teacher ({type(model).__name__}) has neither BatchNorm2d layers nor ViT attention "
                            f"blocks, so no synthesis prior applies; priors: {PRIOR_HELP}")
        return found[0]
    if prior not in found:
        usable = ", ".join(found) if found else "none"
        raise UserError(f"--prior {prior}: the teacher ({type(model).__name__}) does not support it "
                        f"(usable here: {usable}); priors: {PRIOR_HELP}")
    return prior


def make_prior(model: nn.Module, prior: str, *, first_bn_multiplier: float = 1.0,
               bandwidth: float = 0.01) -> BNStatisticsPrior | PatchSimilarityPrior:
    """The hook-based prior named ``prior`` ('bn' or 'patch-sim') on ``model``."""
    if prior == "bn":
        return BNStatisticsPrior(model, first_multiplier=first_bn_multiplier)
    if prior == "patch-sim":
        return PatchSimilarityPrior(model, bandwidth=bandwidth)
    raise UserError(f"unknown prior {prior!r}; priors: {PRIOR_HELP}")


__all__: Sequence[str] = ["PRIORS", "BNStatisticsPrior", "HookedPrior", "PatchSimilarityPrior", "available_priors",
                          "batchnorm_layers", "bn_statistics_loss", "choose_prior", "differential_entropy",
                          "gaussian_kde", "image_l2", "intra_divergence_loss", "make_prior",
                          "patch_similarity_entropy", "total_variation_l1", "total_variation_l2",
                          "total_variation_range", "vit_attention_layers"]
