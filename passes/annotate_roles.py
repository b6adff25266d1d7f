"""annotate_roles: name every node of a captured SAM graph that a later pass cares about.

Reads: torch.export's `nn_module_stack` and `val` meta; `ctx.part` and `ctx.arch`.
Writes: `node.meta["samq"]` (a `NodeInfo`) on every call_function node, with `role`,
`attn_kind`, `attn_path` and `block` set on the nodes listed in `samq_fx.meta.ROLES`.

Roles come from the graph's structure, not from names:
  * an attention is found from its softmax: the matmul that consumes it is `av_matmul`; the
    matmul its logits come from is `qk_matmul`; walking back from their operands through
    views, transposes, scalar scaling and the q/k/v split reaches the projections (`q_proj`,
    `k_proj`, `v_proj`, or the encoder's fused `qkv_proj` and its `q`/`k`/`v` slices); walking
    forward from `av_matmul` through views reaches `out_proj`.
  * its kind comes from the sequence lengths of the logits: the encoder's global attention
    spans every image token, a window attention fewer; in the decoder the image side has
    `(img_size/patch)^2` tokens and the prompt side a dynamic count, so token->image,
    image->token and token self-attention tell themselves apart. The token->image attention
    outside the two-way layers is the final one.
  * an MLP is linear -> activation -> linear inside one module; in the decoder, MLPs whose
    output is stacked into the mask product are the hypernetworks, the other is the IoU head.

Invariant: the graph is not changed. A graph in which an expected role is missing raises
`RoleError` naming what is missing.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx

from samq_fx.meta import NodeInfo, get_info, innermost_module, module_stack, set_info
from samq_fx.pipeline import PassContext, PassResult

aten = torch.ops.aten

VIEW_OPS = {
    aten.view.default,
    aten.reshape.default,
    aten.transpose.int,
    aten.permute.default,
    aten.contiguous.default,
    aten.unsqueeze.default,
    aten.flatten.using_ints,
}
SCALE_OPS = {aten.mul.Tensor, aten.div.Tensor}
_ACTIVATIONS = {aten.relu.default, aten.gelu.default}
_BLOCK_TYPES = {"Block", "TwoWayAttentionBlock"}


class RoleError(RuntimeError):
    """A captured graph lacks a structure SAM must have."""


def _is(node: torch.fx.Node, *targets) -> bool:
    return node.op == "call_function" and node.target in targets


def _through_views(node: torch.fx.Node) -> torch.fx.Node:
    """Walk back through view-like ops and scalar scaling to the producing op."""
    while node.op == "call_function" and (
        node.target in VIEW_OPS
        or (node.target in SCALE_OPS and not isinstance(node.args[1], torch.fx.Node))
    ):
        node = node.args[0]
    return node


def _forward_through_views(node: torch.fx.Node) -> torch.fx.Node:
    while len(node.users) == 1:
        (user,) = node.users
        if not _is(user, *VIEW_OPS):
            break
        node = user
    return node


def _logits_source(softmax: torch.fx.Node) -> torch.fx.Node | None:
    """The q @ k^T matmul that a softmax's logits come from (through rel-pos adds, scaling)."""
    frontier = [softmax.args[0]]
    while frontier:
        node = frontier.pop()
        if _is(node, aten.matmul.default):
            return node
        if node.op == "call_function" and (
            node.target in VIEW_OPS or node.target in SCALE_OPS or node.target == aten.add.Tensor
        ):
            frontier.append(node.args[0])
    return None


def _seq_len(node: torch.fx.Node, dim: int):
    val = node.meta.get("val")
    return None if val is None else val.shape[dim]


def _block_index(node: torch.fx.Node, order: dict[str, int]) -> int | None:
    for path, cls in reversed(module_stack(node)):
        if cls.rsplit(".", 1)[-1] in _BLOCK_TYPES:
            return order.setdefault(path, len(order))
    return None


class _Annotator:
    def __init__(self, gm: torch.fx.GraphModule, ctx: PassContext):
        self.gm, self.ctx = gm, ctx
        self.block_order: dict[str, int] = {}
        self.image_tokens = ctx.arch.image_embedding_size**2

    def tag(self, node: torch.fx.Node, role: str, **fields) -> None:
        info = get_info(node)
        set_info(node, NodeInfo(**{**info.__dict__, "role": role, **fields}))

    def base_records(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op != "call_function":
                continue
            path, cls = innermost_module(node)
            set_info(
                node,
                NodeInfo(
                    part=self.ctx.part,
                    module_path=path,
                    module_type=cls,
                    block=_block_index(node, self.block_order),
                    touched_by=("annotate_roles",),
                ),
            )

    def attention_kind(self, qk: torch.fx.Node, in_block: bool) -> str:
        q_len, k_len = _seq_len(qk, -2), _seq_len(qk, -1)
        if self.ctx.part == "image_encoder":
            return "enc_global" if k_len == self.image_tokens else "enc_window"
        if k_len == self.image_tokens and q_len != self.image_tokens:
            return "token_to_image" if in_block else "final_token_to_image"
        if q_len == self.image_tokens and k_len != self.image_tokens:
            return "image_to_token"
        return "dec_self"

    def attentions(self) -> int:
        found = 0
        for softmax in [n for n in self.gm.graph.nodes if _is(n, aten.softmax.int)]:
            av = next((u for u in softmax.users if _is(u, aten.matmul.default)), None)
            qk = _logits_source(softmax)
            if av is None or qk is None:
                continue
            attn_path = get_info(softmax).module_path
            in_block = get_info(softmax).block is not None
            kind = self.attention_kind(qk, in_block)
            block = get_info(softmax).block
            if kind == "final_token_to_image":
                block = self.ctx.arch.decoder_depth
            common = {"attn_kind": kind, "attn_path": attn_path, "block": block}
            self.tag(qk, "qk_matmul", **common)
            self.tag(softmax, "attn_softmax", **common)
            self.tag(av, "av_matmul", **common)
            self.operands(qk, av, common)
            out = _forward_through_views(av)
            proj = next((u for u in out.users if _is(u, aten.linear.default)), None)
            if proj is not None:
                self.tag(proj, "out_proj", **common)
            for user in (n for n in self.gm.graph.nodes if _is(n, aten.einsum.default)):
                if get_info(user).module_path == attn_path:
                    self.tag(user, "rel_pos", **common)
            found += 1
        return found

    def operands(self, qk: torch.fx.Node, av: torch.fx.Node, common: dict) -> None:
        for operand, name in ((qk.args[0], "q"), (qk.args[1], "k"), (av.args[1], "v")):
            src = _through_views(operand)
            if _is(src, aten.linear.default):
                self.tag(src, f"{name}_proj", **common)
                continue
            # encoder: q, k, v are slices (getitem of unbind) of the fused qkv projection
            self.tag(src, name, **common)
            if _is(src.args[0], aten.unbind.int):
                qkv = _through_views(src.args[0].args[0])
                if _is(qkv, aten.linear.default):
                    self.tag(qkv, "qkv_proj", **common)

    def mlps(self) -> int:
        found = 0
        for act in [n for n in self.gm.graph.nodes if _is(n, *_ACTIVATIONS)]:
            fc1 = act.args[0]
            fc2 = next((u for u in act.users if _is(u, aten.linear.default)), None)
            if not _is(fc1, aten.linear.default) or fc2 is None:
                continue
            owner = get_info(fc1).module_path.rsplit(".", 1)[0]
            owner_type = next((c for p, c in module_stack(fc1) if p == owner), "").rsplit(".", 1)[
                -1
            ]
            if owner_type == "MLPBlock":
                self.tag(fc1, "mlp_fc1")
                self.tag(fc2, "mlp_fc2")
                found += 1
        return found

    def decoder_heads(self) -> None:
        heads: dict[str, list[torch.fx.Node]] = {}
        for node in self.gm.graph.nodes:
            info = get_info(node)
            if _is(node, aten.linear.default) and info.role is None:
                owner = info.module_path.rsplit(".", 1)[0]
                heads.setdefault(owner, []).append(node)
        for linears in heads.values():
            last = _forward_through_views(linears[-1])
            feeds_stack = any(_is(u, aten.stack.default) for u in last.users)
            for linear in linears:
                self.tag(linear, "hypernet_fc" if feeds_stack else "iou_head_fc")
        for node in self.gm.graph.nodes:
            if _is(node, aten.conv_transpose2d.input):
                self.tag(node, "upscale_conv")
            elif _is(node, aten.matmul.default) and get_info(node).role is None:
                if _is(_through_views(node.args[0]), aten.stack.default):
                    self.tag(node, "mask_matmul")

    def encoder_convs(self) -> None:
        for node in self.gm.graph.nodes:
            if _is(node, aten.conv2d.default):
                src = _through_views(node.args[0])
                self.tag(node, "patch_embed" if src.op == "placeholder" else "neck_conv")

    def position_embedding(self) -> None:
        """The add of a parameter to the patch tokens outside every module: x + pos_embed."""
        for node in self.gm.graph.nodes:
            if _is(node, aten.add.Tensor) and get_info(node).module_path == "":
                table = node.args[1]
                if isinstance(table, torch.fx.Node) and table.op == "get_attr":
                    self.tag(node, "pos_embed")


def expected_roles(ctx: PassContext) -> Counter:
    """How many nodes of each role (and attention kind) the architecture must have."""
    a = ctx.arch
    if ctx.part == "image_encoder":
        n, g = a.encoder_depth, len(a.encoder_global_attn_indexes)
        per_attn = ["qkv_proj", "q", "k", "v", "qk_matmul", "attn_softmax", "av_matmul"]
        want = Counter({r: n for r in per_attn + ["out_proj", "mlp_fc1", "mlp_fc2"]})
        want.update({"rel_pos": 2 * n, "patch_embed": 1, "neck_conv": 2, "pos_embed": 1})
        want.update({"kind:enc_global": g, "kind:enc_window": n - g})
        return want
    d = a.decoder_depth
    attns = 3 * d + 1
    per_attn = ["q_proj", "k_proj", "v_proj", "qk_matmul", "attn_softmax", "av_matmul"]
    want = Counter({r: attns for r in per_attn + ["out_proj"]})
    want.update({"mlp_fc1": d, "mlp_fc2": d, "hypernet_fc": 4 * 3, "iou_head_fc": 3})
    want.update({"upscale_conv": 2, "mask_matmul": 1})
    want.update(
        {"kind:dec_self": d, "kind:token_to_image": d, "kind:image_to_token": d}
        | {"kind:final_token_to_image": 1}
    )
    return want


def found_roles(gm: torch.fx.GraphModule) -> Counter:
    got: Counter = Counter()
    for node in gm.graph.nodes:
        info = get_info(node)
        if info is None or info.role is None:
            continue
        got[info.role] += 1
        if info.role == "attn_softmax":
            got[f"kind:{info.attn_kind}"] += 1
    return got


def annotate_roles(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    annotator = _Annotator(gm, ctx)
    annotator.base_records()
    attentions = annotator.attentions()
    mlps = annotator.mlps()
    if ctx.part == "image_encoder":
        annotator.encoder_convs()
        annotator.position_embedding()
    else:
        annotator.decoder_heads()
    want, got = expected_roles(ctx), found_roles(gm)
    wrong = {k: (want[k], got.get(k, 0)) for k in sorted(set(want) | set(got)) if want[k] != got[k]}
    if wrong:
        lines = ", ".join(f"{k}: expected {w}, found {g}" for k, (w, g) in wrong.items())
        raise RoleError(f"{ctx.part} ({ctx.arch.name}): role counts differ from SAM's: {lines}")
    return PassResult(counts={"attentions": attentions, "mlps": mlps, **dict(sorted(got.items()))})
