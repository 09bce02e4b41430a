"""Foreign ViT state-dict layouts renamed into timm's ``VisionTransformer`` layout.

Recognised: torchvision's ``VisionTransformer`` (``vit_b_16`` family), lucidrains' ``vit-pytorch`` ``ViT``,
PyTorch's ``nn.TransformerEncoder`` (post-norm ReLU unless told otherwise), and hand-written modules: separate
q/k/v linears (fused into ``qkv``), ``nn.MultiheadAttention`` (``in_proj``/``out_proj``), q/k/v Linears feeding
one (folded), per-head attention (concatenated), one norm per block (shared), ``nn.Sequential`` MLPs and heads,
a Linear patch embedding, common aliases of the norms, embeddings and head, a 1-D/2-D class token or position
embedding (a sin/cos one kept constant). What no tensor tells (norm placement, activation, epsilon) is taken
from the layout's defaults and listed in ``Layout.assumed`` (the note says it; ``load_model(assume=...)``
states it instead). ``apply_key_map`` runs the user's ``--key-map REGEX=REPLACEMENT`` rules
before any of this. Each function returns new dicts; tensors are never modified in place.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from vitshrink.errors import UserError
from vitshrink.io.folding import concat_per_head, fold_double_projection, is_sinusoidal, linear_patch_to_conv


@dataclass
class Layout:
    """A state dict in timm's layout, what was recognised, and the kwargs the layout implies."""

    state: dict[str, torch.Tensor]
    name: str | None = None  # e.g. "torchvision VisionTransformer"
    conversions: list[str] = field(default_factory=list)  # e.g. "separate q/k/v fused into qkv"
    kwargs: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # preprocessing the layout's library uses (mean, std)
    # What the tensors cannot tell and was taken from the layout's defaults: (kwarg, value, in words).
    assumed: list[tuple[str, Any, str]] = field(default_factory=list)
    assumed_why: str = ""

    def note(self) -> str | None:
        if self.name is None and not self.conversions:
            return None
        what = self.name or "timm-like ViT"
        done = f" ({'; '.join(self.conversions)})" if self.conversions else ""
        return f"layout recognised: {what}, converted to timm's VisionTransformer{done}"

    def assume(self, kwarg: str, value: Any, words: str) -> None:
        """Take ``kwarg=value`` (said ``words`` in the note) unless the tensors already decided it."""
        if kwarg not in self.kwargs:
            self.kwargs[kwarg] = value
            self.assumed.append((kwarg, value, words))

    def assumption_note(self) -> str | None:
        """e.g. "nn.TransformerEncoder: assumed post-norm (norm_first=False), ReLU, eps 1e-5 (...): norm_placement=..."
        (what was assumed in words, then as the kwargs that state it otherwise)."""
        if not self.assumed:
            return None
        words = ", ".join(w for _, _, w in self.assumed)
        values = ", ".join(f"{k}={v!r}" for k, v, _ in self.assumed)
        why = f" ({self.assumed_why}; the weights cannot tell)" if self.assumed_why else " (the weights cannot tell)"
        return f"{self.name or 'hand-written ViT'}: assumed {words}{why}: {values}"


def apply_key_map(state: dict[str, torch.Tensor], key_map: Sequence[str] | None,
                  source: str) -> dict[str, torch.Tensor]:
    """Rename keys with ``REGEX=REPLACEMENT`` rules (``re.sub`` on every key, in the order given)."""
    if not key_map:
        return state
    rules = []
    for rule in key_map:
        pattern, sep, replacement = str(rule).partition("=")
        if not sep or not pattern:
            raise UserError(f"--key-map {rule!r}: expected REGEX=REPLACEMENT, e.g. 'mlp\\.0\\.=mlp.fc1.'")
        try:
            rules.append((re.compile(pattern), replacement))
        except re.error as exc:
            raise UserError(f"--key-map {rule!r}: invalid regular expression ({exc})") from None
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new = key
        for regex, replacement in rules:
            try:
                new = regex.sub(replacement, new)
            except (re.error, IndexError) as exc:
                raise UserError(f"--key-map: replacement {replacement!r} is invalid ({exc})") from None
        if new in renamed:
            raise UserError(f"{source}: --key-map maps two tensors onto {new} (one of them is {key})")
        renamed[new] = tensor
    return renamed


# --- recognising whole layouts --------------------------------------------------------------------

_TORCHVISION = [
    (r"^conv_proj\.", "patch_embed.proj."), (r"^class_token$", "cls_token"),
    (r"^encoder\.pos_embedding$", "pos_embed"), (r"^encoder\.ln\.", "norm."), (r"^heads\.head\.", "head."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.", r"blocks.\1."),
    (r"^(blocks\.\d+\.)mlp\.linear_1\.", r"\1mlp.fc1."), (r"^(blocks\.\d+\.)mlp\.linear_2\.", r"\1mlp.fc2."),
]
_VIT_PYTORCH = [
    (r"^to_patch_embedding\.1\.", "patch_embed.pixel_norm."), (r"^to_patch_embedding\.2\.", "patch_embed.proj."),
    (r"^to_patch_embedding\.3\.", "patch_embed.norm."), (r"^pos_embedding$", "pos_embed"),
    (r"^transformer\.layers\.(\d+)\.0\.", r"blocks.\1.attn."),
    (r"^transformer\.layers\.(\d+)\.1\.net\.", r"blocks.\1.mlp."),
    (r"^transformer\.norm\.", "norm."), (r"^mlp_head\.", "head."),
]

# Inside one block (the text after "blocks.N."), applied in order.
_BLOCK_ALIASES = [
    (r"^(attention|self_attention|self_attn|mhsa|msa|attn_layer)\.", "attn."),
    (r"^attn\.in_proj_weight$", "attn.qkv.weight"), (r"^attn\.in_proj_bias$", "attn.qkv.bias"),
    (r"^attn\.(out_proj|o_proj|to_out\.0|to_out|out|dense|proj_out|c_proj)\.", "attn.proj."),
    (r"^attn\.(to_qkv|qkv_proj|c_attn|in_proj)\.", "attn.qkv."),
    (r"^attn\.(query|q_proj|to_q|wq)\.", "attn.q."), (r"^attn\.(key|k_proj|to_k|wk)\.", "attn.k."),
    (r"^attn\.(value|v_proj|to_v|wv)\.", "attn.v."),
    (r"^attn\.(norm|ln|layer_norm)\.", "norm1."),
    (r"^(ln_1|ln1|norm_1|layernorm_before|attention_norm|attn_norm|norm_attn|layer_norm1|ln_attn)\.", "norm1."),
    (r"^(ln_2|ln2|norm_2|layernorm_after|ffn_norm|mlp_norm|norm_mlp|layer_norm2|ln_mlp)\.", "norm2."),
    (r"^(ffn|ff|feed_forward|feedforward|mlp_block)\.", "mlp."), (r"^mlp\.(net|layers|block)\.", "mlp."),
    (r"^linear1\.", "mlp.fc1."), (r"^linear2\.", "mlp.fc2."),  # nn.TransformerEncoderLayer
    (r"^mlp\.(linear1|linear_1|lin1|dense1|w1|c_fc|up_proj|dense_1)\.", "mlp.fc1."),
    (r"^mlp\.(linear2|linear_2|lin2|dense2|w2|c_proj|down_proj|dense_2)\.", "mlp.fc2."),
]
_BLOCK_CONTAINER = re.compile(r"^(?:encoder\.|transformer\.|vit\.|backbone\.)?"
                              r"(?:blocks|layers|layer|resblocks|encoder|transformer)\.(\d+)\.(.+)$")
_TOP_ALIASES = [
    (r"^(conv_proj|patch_embedding|patch_embed|patch_embed\.projection|patch_embed\.conv|"
     r"patch_embeddings\.projection|patch_embeddings|to_patch_embedding\.0|embedding|linear_embedding|"
     r"patch_proj|patch_to_embedding)\.(weight|bias)$", r"patch_embed.proj.\2"),
    (r"^(class_token|cls_embedding|cls|class_embedding)$", "cls_token"),
    (r"^(pos_embedding|position_embedding|position_embeddings|positional_embedding|pos_emb|"
     r"encoder\.pos_embedding|positional_encoding|pos_encoding|pos_table|position_table|pe)$", "pos_embed"),
    (r"^(ln|ln_f|final_norm|encoder_norm|encoder\.ln|encoder\.norm|transformer\.norm|layernorm|norm_f|"
     r"ln_post|norm_final)\.", "norm."),
    (r"^(fc|classifier|classifer|mlp_head|heads\.head|linear_head|heads|cls_head|out_head|output_head|"
     r"classification_head)\.(weight|bias)$", r"head.\2"),
]


def convert_layout(state: dict[str, torch.Tensor], in_chans: int | None = None) -> Layout:
    """The state dict in timm's ViT layout (unchanged where it already is), and what was converted."""
    layout = Layout(state=dict(state))
    keys = list(state)
    if _is_torch_encoder(keys):
        layout.name = "nn.TransformerEncoder"
        layout.assumed_why = "nn.TransformerEncoderLayer's defaults"
        layout.assume("norm_placement", "post", "post-norm (norm_first=False)")
        layout.assume("act_layer", "relu", "ReLU")
        layout.assume("norm_eps", 1e-5, "eps 1e-5")
    elif "conv_proj.weight" in state and any(k.startswith("encoder.layers.encoder_layer_") for k in keys):
        layout.name = "torchvision VisionTransformer"
        if any(k.startswith("heads.pre_logits") for k in keys):
            raise UserError("torchvision ViT with representation_size (heads.pre_logits) has no timm equivalent")
        layout.state = _rename(layout.state, _TORCHVISION)
        # torchvision's ViT weights are trained with ImageNet mean/std (its ImageClassification transform).
        layout.data = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    elif any(k.startswith("to_patch_embedding.") for k in keys) and any(
            k.startswith("transformer.layers.0.0.") for k in keys):
        layout.name = "vit-pytorch ViT"
        layout.state = _rename(layout.state, _VIT_PYTORCH)
        layout.kwargs["norm_eps"] = 1e-5  # vit-pytorch uses nn.LayerNorm's default epsilon
        if "patch_embed.pixel_norm.weight" in layout.state:
            layout.kwargs["patch_embed"] = "pixel_norm"
    layout.state = _sequential_head(layout.state, layout)
    layout.state = _rename_top_level(layout.state, layout)
    layout.state = _rename_blocks(layout.state, layout)
    _linear_patch_embedding(layout, in_chans)
    if layout.name is None and layout.conversions and "patch_embed.proj.weight" in layout.state:
        # Renamed from a user's own module: nn.LayerNorm's epsilon and timm's block are the likeliest.
        layout.name = "hand-written ViT"
        layout.assumed_why = "the usual nn.LayerNorm and timm block"
        layout.assume("norm_placement", "pre", "pre-norm")
        layout.assume("act_layer", "gelu", "GELU")
        layout.assume("norm_eps", 1e-5, "eps 1e-5")
    return layout


def _is_torch_encoder(keys: list[str]) -> bool:
    """``nn.TransformerEncoderLayer``'s own attribute names: ``self_attn.in_proj_weight`` beside ``linear1``."""
    return (any(re.search(r"(^|\.)\d+\.self_attn\.in_proj_weight$", k) for k in keys)
            and any(re.search(r"(^|\.)\d+\.linear1\.weight$", k) for k in keys))


_HEAD_SEQUENTIAL = re.compile(r"^(mlp_head|head|classifier|classifer|fc|cls_head|out_head|output_head|"
                              r"classification_head|linear_head)\.(\d+)\.(weight|bias)$")


def _sequential_head(state: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """A head written as ``nn.Sequential``: [LayerNorm, Linear] (the norm goes before the classifier: ``norm`` on
    a class token, ``fc_norm`` after average pooling) or [Linear, activation, Linear] (``pre_logits.fc`` and
    ``head``; the activation has no weights, so it is assumed)."""
    children: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if match := _HEAD_SEQUENTIAL.match(key):
            children.setdefault(int(match.group(2)), {})[match.group(3)] = tensor
    if not children or len({m.group(1) for k in state if (m := _HEAD_SEQUENTIAL.match(k))}) != 1:
        return state
    order = sorted(children)
    kinds = ["norm" if children[i]["weight"].dim() == 1 else "linear" for i in order if "weight" in children[i]]
    has_cls = any(re.match(r"^(cls_token|class_token|cls_embedding|cls|class_embedding)$", k) for k in state)
    if kinds == ["linear"]:
        names = ["head"]
    elif kinds == ["norm", "linear"]:
        names = ["norm" if has_cls else "fc_norm", "head"]
        if names[0] in state or any(k.startswith(f"{names[0]}.") for k in state):
            return state  # a final norm already: left for the mismatch report
        _note(layout, f"head [LayerNorm, Linear] as {names[0]} + head")
    elif kinds == ["linear", "linear"] and order[1] - order[0] == 2:
        names = ["pre_logits.fc", "head"]
        layout.kwargs["head_hidden"] = int(children[order[0]]["weight"].shape[0])
        layout.assume("head_act", "tanh", "a tanh between the head's Linears")
        _note(layout, "head [Linear, activation, Linear] as pre_logits + head")
    elif kinds == ["linear", "linear"] and order[1] - order[0] == 1:
        # Two Linears with nothing between are one: W = W2 @ W1, b = W2 @ b1 + b2.
        first, second = children[order[0]], children[order[1]]
        weight = second["weight"] @ first["weight"]
        bias = second.get("bias", torch.zeros(weight.shape[0], dtype=weight.dtype))
        if "bias" in first:
            bias = bias + second["weight"] @ first["bias"]
        children, order, names = {0: {"weight": weight, "bias": bias}}, [0], ["head"]
        _note(layout, "head [Linear, Linear] folded into one Linear")
    else:
        return state
    out = {k: v for k, v in state.items() if not _HEAD_SEQUENTIAL.match(k)}
    for name, index in zip(names, order):
        for kind, tensor in children[index].items():
            out[f"{name}.{kind}"] = tensor
    return out


def _linear_patch_embedding(layout: Layout, in_chans: int | None) -> None:
    """A Linear patch projection over unfolded patches -> the patch convolution (vit-pytorch's has its own)."""
    weight = layout.state.get("patch_embed.proj.weight")
    if weight is None or weight.dim() != 2 or layout.kwargs.get("patch_embed") == "pixel_norm":
        return
    patch_dim = int(weight.shape[1])
    for chans in [in_chans] if in_chans else [3, 1, 4, 2]:
        patch = math.isqrt(patch_dim // chans)
        if patch * patch * chans == patch_dim:
            layout.state["patch_embed.proj.weight"] = linear_patch_to_conv(weight, chans)
            order = " (channel, row, column) order, as Tensor.unfold gives" if chans > 1 else ""
            _note(layout, f"Linear patch embedding over unfolded {patch}x{patch} patches as the patch "
                          f"convolution{order}")
            return


def _rename(state: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out[key] = tensor
    return out


def _rename_top_level(state: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not _BLOCK_CONTAINER.match(key):
            for pattern, replacement in _TOP_ALIASES:
                new = re.sub(pattern, replacement, key)
                if new != key and new not in state:
                    key = new
                    break
        out[key] = tensor
    cls = out.get("cls_token")
    if cls is not None and cls.numel() == 0:
        del out["cls_token"]  # vit-pytorch with pool="mean": an empty class token
        layout.conversions.append("no class token: global average pooling")
    elif cls is not None and cls.dim() < 3:
        out["cls_token"] = cls.reshape(1, 1, -1)
    pos = out.get("pos_embed")
    if pos is not None and pos.dim() == 2:
        out["pos_embed"] = pos.unsqueeze(0)
    if pos is not None and pos.dim() >= 2 and pos.shape[-2] > 1 and is_sinusoidal(pos):
        layout.kwargs["fixed_pos_embed"] = True
        _note(layout, "the position table is the fixed sin/cos table: kept constant")
    return out


def _rename_blocks(state: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    per_block: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _BLOCK_CONTAINER.match(key)
        if match is None:
            out[key] = tensor
            continue
        per_block.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    for index, original in sorted(per_block.items()):
        if fold_double_projection(original):
            _note(layout, "q/k/v Linears into nn.MultiheadAttention folded into one qkv (W_in @ W_q)")
        if heads := concat_per_head(original):
            layout.kwargs["num_heads"] = heads
            _note(layout, f"{heads} per-head q/k/v Linears concatenated into one qkv")
        block = {}
        for rest, tensor in original.items():
            if rest.endswith("in_proj_weight"):
                _note(layout, "nn.MultiheadAttention in_proj/out_proj as qkv/proj")
            new = rest
            for pattern, replacement in _BLOCK_ALIASES:
                candidate = re.sub(pattern, replacement, new)
                # A name the block already has keeps its meaning (timm's own attn.norm, for one).
                if candidate == new or candidate not in original:
                    new = candidate
            block[new] = tensor
        block = _fuse_qkv(block, layout)
        block = _sequential_mlp(block, layout)
        block = _shared_norm(block, layout)
        for rest, tensor in block.items():
            out[f"blocks.{index}.{rest}"] = tensor
    return out


def _note(layout: Layout, text: str) -> None:
    if text not in layout.conversions:
        layout.conversions.append(text)


def _fuse_qkv(block: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Separate q, k, v linears -> one qkv (rows q, then k, then v: timm's order); a missing bias is zero."""
    if not all(f"attn.{p}.weight" in block for p in "qkv"):
        return block
    block = dict(block)
    weights = [block.pop(f"attn.{p}.weight") for p in "qkv"]
    biases = [block.pop(f"attn.{p}.bias", None) for p in "qkv"]
    block["attn.qkv.weight"] = torch.cat(weights, dim=0)
    if any(b is not None for b in biases):
        block["attn.qkv.bias"] = torch.cat([b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)
                                            for b, w in zip(biases, weights)])
    _note(layout, "separate q/k/v fused into qkv")
    return block


def _shared_norm(block: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """One block-level ``norm`` beside both branches and no norm1/norm2: the norm both sub-blocks use."""
    if not any(k.startswith("norm.") for k in block) or any(k.startswith(("norm1.", "norm2.")) for k in block):
        return block
    if not any(k.startswith("attn.") for k in block) or not any(k.startswith("mlp.") for k in block):
        return block
    layout.kwargs["shared_norm"] = True
    _note(layout, "one LayerNorm per block, shared by attention and MLP")
    return {(f"norm1.{k[5:]}" if k.startswith("norm.") else k): v for k, v in block.items()}


def _sequential_mlp(block: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """``mlp.0``/``mlp.3``-style children: the Linears in order become fc1/fc2, a LayerNorm before them norm2."""
    children = sorted({int(m.group(1)) for k in block if (m := re.match(r"mlp\.(\d+)\.", k))})
    if not children:
        return block
    linear = [c for c in children if block.get(f"mlp.{c}.weight") is not None and block[f"mlp.{c}.weight"].dim() == 2]
    norms = [c for c in children if c not in linear and (not linear or c < linear[0])]
    if len(linear) != 2 or len(norms) > 1 or len(norms) + len(linear) != len(children):
        return block  # not a plain MLP: left for the mismatch report
    names = {linear[0]: "mlp.fc1", linear[1]: "mlp.fc2"}
    if norms:
        if any(k.startswith("norm2.") for k in block):
            return block
        names[norms[0]] = "norm2"
    out = {}
    for key, tensor in block.items():
        match = re.match(r"mlp\.(\d+)\.(.+)$", key)
        out[f"{names[int(match.group(1))]}.{match.group(2)}" if match else key] = tensor
    _note(layout, "Sequential MLP as fc1/fc2" + (" (its LayerNorm as norm2)" if norms else ""))
    return out
