"""Feature taps: hooks and timm's forward_intermediates give the same tensors; inputs, attention, clean-up."""
from __future__ import annotations

import pytest
import torch

from vitshrink.distill.taps import FeatureTaps, forward_with_taps
from vitshrink.io import create_model


def _vit():
    torch.manual_seed(0)
    return create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3,
                        mlp_ratio=2.0, num_classes=10).eval()


def test_forward_intermediates_and_hooks_give_the_same_block_tensors():
    model, x = _vit(), torch.randn(3, 3, 32, 32)
    points = ["blocks.1", "blocks.3"]
    with torch.no_grad():
        output, fast = forward_with_taps(model, x, points)  # every point a block: forward_intermediates
        with FeatureTaps(model, points) as hooked:
            reference = model(x)
    assert set(fast) == set(hooked) == set(points)
    torch.testing.assert_close(output, reference, rtol=0, atol=0)
    for point in points:
        assert fast[point].shape == (3, 1 + 16, 48)  # class token first, then the 16 patch tokens
        torch.testing.assert_close(fast[point], hooked[point], rtol=0, atol=0)
    assert not any(block._forward_hooks for block in model.blocks)  # hooks removed on exit


def test_hooks_for_inputs_attention_and_cnn_layers():
    model, x = _vit(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        output, feats = forward_with_taps(model, x, ["head:input", "blocks.2:attn", "blocks.2:cls_attn", "norm"])
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(feats["head:input"], pooled)
        # The attention map recomputed by hand from the block's own qkv projection.
        block, tokens = model.blocks[2], {}
        handle = block.attn.register_forward_pre_hook(lambda m, inputs: tokens.__setitem__("x", inputs[0]))
        model(x)
        handle.remove()
        attn = block.attn
        b, n, _ = tokens["x"].shape
        q, k, _ = attn.qkv(tokens["x"]).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        full = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)
    torch.testing.assert_close(feats["blocks.2:attn"], full)
    torch.testing.assert_close(feats["blocks.2:cls_attn"], full[:, :, 0])
    torch.testing.assert_close(output, model(x).detach())
    cnn = create_model("cifar_resnet20", num_classes=10).eval()
    with torch.no_grad():
        _, maps = forward_with_taps(cnn, x, ["layer1", "layer3"])  # not ViT blocks: hooks
    assert maps["layer1"].shape[:2] == (2, 16) and maps["layer3"].shape[:2] == (2, 64)
    with pytest.raises(ValueError, match="no such module"):
        forward_with_taps(model, x, ["blocks.9"])
    with pytest.raises(ValueError, match="unknown suffix"):
        FeatureTaps(model, ["blocks.1:weights"]).__enter__()
    assert not model.blocks[2].attn.qkv._forward_hooks
