"""The one record a node carries: `node.meta["samq"]`, a frozen `NodeInfo`.

Analysis passes write decisions here and rewrite passes read them, so a decision is made once,
in one place, and a test (or `samq_fx.explain`) can read it back. Records are immutable:
a pass that changes one builds a new record with `update_info`, which also appends the pass's
name to `touched_by`.

Schema (fields are None where they do not apply):
  part          "image_encoder" or "mask_decoder": which captured graph the node is in
  module_path   the innermost `nn.Module` the node came from ("blocks.3.attn.qkv")
  module_type   that module's class name ("Linear", "Attention", ...)
  role          what the node does in SAM (see `ROLES`), assigned by `annotate_roles`
  attn_kind     for attention nodes: enc_window, enc_global, dec_self, token_to_image,
                image_to_token, final_token_to_image
  attn_path     the module path of the attention the node belongs to
  block         ViT block index (encoder) or two-way layer index (decoder; the final
                token-to-image attention gets `decoder_depth`)
  unit          reconstruction unit this node belongs to ("enc.3.attn", "dec.0.t2i", ...),
                written by `tag_blocks`; None for glue between units (residual adds, norms)
  touched_by    names of the passes that wrote this record, in order
  quant         quantization decisions (`plan_quantization`): slot -> decision
  findings      what analysis passes measured and decided here, keyed by pass (BIG's peak
                count and signs, AGQ's per-tau errors, PCC's metric curve, MAC's residuals)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch.fx

META_KEY = "samq"

ATTN_KINDS = (
    "enc_window",
    "enc_global",
    "dec_self",
    "token_to_image",
    "image_to_token",
    "final_token_to_image",
)

ROLES = {
    # image encoder
    "patch_embed": "patch-embedding convolution (stays in floating point in the papers)",
    "qkv_proj": "fused q/k/v projection of an encoder attention",
    "q": "query tensor of an attention (encoder: q slice of qkv)",
    "k": "key tensor of an attention (encoder: k slice of qkv)",
    "v": "value tensor of an attention (encoder: v slice of qkv)",
    "rel_pos": "decomposed relative-position term added to the encoder logits",
    "neck_conv": "convolution of the encoder neck",
    "pos_embed": "the absolute position embedding added to the patch tokens (a weight-only site)",
    # both
    "q_proj": "query projection of a decoder attention",
    "k_proj": "key projection of a decoder attention",
    "v_proj": "value projection of a decoder attention",
    "qk_matmul": "q @ k^T, the attention logits",
    "attn_softmax": "softmax over the logits: the attention probabilities",
    "av_matmul": "probabilities @ v",
    "out_proj": "output projection of an attention",
    "mlp_fc1": "first linear of an MLP block",
    "mlp_fc2": "second linear of an MLP block",
    # mask decoder heads
    "upscale_conv": "transposed convolution of the decoder's output upscaling",
    "hypernet_fc": "linear of a hypernetwork MLP (mask-token -> mask weights)",
    "iou_head_fc": "linear of the IoU prediction head",
    "mask_matmul": "hypernetwork weights @ upscaled embedding: the mask logits",
    # lowering
    "fused_attention": "softmax(q·kᵀ + rel-pos)·v in one fused kernel (passes/fuse_attention)",
}


@dataclass(frozen=True)
class NodeInfo:
    part: str
    module_path: str
    module_type: str
    role: str | None = None
    attn_kind: str | None = None
    attn_path: str | None = None
    block: int | None = None
    unit: str | None = None
    touched_by: tuple[str, ...] = ()
    quant: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    findings: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))

    def row(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["quant"], d["findings"] = dict(self.quant), dict(self.findings)
        return d


def get_info(node: torch.fx.Node) -> NodeInfo | None:
    return node.meta.get(META_KEY)


def set_info(node: torch.fx.Node, info: NodeInfo) -> None:
    node.meta[META_KEY] = info


def update_info(node: torch.fx.Node, pass_name: str, **changes: Any) -> NodeInfo:
    """Replace fields of the node's record (creating none: the node must have one)."""
    info = get_info(node)
    if info is None:
        raise KeyError(f"node {node.name!r} has no samq record; run annotate_roles first")
    for key in ("quant", "findings"):
        if key in changes:
            changes[key] = MappingProxyType(dict(changes[key]))
    touched = info.touched_by if pass_name in info.touched_by else info.touched_by + (pass_name,)
    new = dataclasses.replace(info, touched_by=touched, **changes)
    set_info(node, new)
    return new


def module_stack(node: torch.fx.Node) -> list[tuple[str, str]]:
    """[(module_path, qualified_class_name), ...] outermost first, from torch.export's meta."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(path, str(cls)) for path, cls in stack.values()]


def innermost_module(node: torch.fx.Node) -> tuple[str, str]:
    """(module_path, class name) of the innermost module, ("", "") at the top level."""
    stack = module_stack(node)
    if not stack:
        return "", ""
    path, cls = stack[-1]
    return path, cls.rsplit(".", 1)[-1]


def add_finding(node: torch.fx.Node, pass_name: str, finding: Any) -> NodeInfo:
    """Record what `pass_name` measured or decided at `node` (under its own key)."""
    info = get_info(node)
    findings = dict(info.findings) if info is not None else {}
    findings[pass_name] = finding
    return update_info(node, pass_name, findings=findings)


def nodes_with_role(gm: torch.fx.GraphModule, *roles: str) -> list[torch.fx.Node]:
    out = []
    for node in gm.graph.nodes:
        info = get_info(node)
        if info is not None and info.role in roles:
            out.append(node)
    return out
