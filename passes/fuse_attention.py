"""fuse_attention: one fused-attention call per image-encoder attention (lowering).

Eager SAM computes each encoder attention as a chain that materialises (B·heads, L, L) logits:

    qk   = matmul(q_scaled, transpose(k, -2, -1))
    s    = view(add(add(view(qk), unsqueeze(rel_h, 4)), unsqueeze(rel_w, 3)))   (or qk alone)
    out  = matmul(softmax(s, -1), v)

This pass matches that chain from the roles `annotate_roles` wrote (qk_matmul, attn_softmax,
av_matmul) and the exact view/add/unsqueeze structure around them, and replaces it by

    out  = samq_fx.kernels.rel_pos_attention(q_scaled, k, v, rel_h, rel_w)   (or plain_attention)

which runs flex attention (flash kernel, bias added inside) under torch.compile on CUDA and SDPA
otherwise; or, with `ctx.state["attention"]` (global attentions) and
`ctx.state["window_attention"]` (windowed ones) = "triton", "float8" or "int8-qk", by
`samq_fx.triton_attention` (bias added in the kernel; float8: 8-bit q·kᵀ and P·v; int8-qk:
int8 q·kᵀ, float8 P·v), which quantizes q, k and v itself with dynamic per-tensor scales. Conservative: an attention whose q, k, probabilities or v still pass through an
enabled fake quantizer (its integer grid is not what the kernels compute) is left unfused and listed in
`rejected`, so the lowered model never drops a quantizer silently. The mask decoder's attentions
(a few tokens against the image, well under 1% of SAM's time) are not touched.

Reads: NodeInfo roles and attn_path. Writes: the fused node carries the av_matmul's record with
role "fused_attention" and `findings["fuse_attention"]` = {"rel_pos": bool, "kernel": name}.
Invariant: the function computed is unchanged up to the kernels' float rounding ("flex",
"triton") or their 8-bit rounding of q, k, v and P ("float8", "int8-qk").
"""

from __future__ import annotations

import torch
import torch.fx

from samq_fx import triton_attention
from samq_fx.kernels import plain_attention, rel_pos_attention
from samq_fx.meta import add_finding, get_info, update_info
from samq_fx.pipeline import PassContext, PassResult

PASS_NAME = "fuse_attention"
aten = torch.ops.aten
REL_POS_KERNELS = {
    "flex": rel_pos_attention,
    "triton": triton_attention.rel_pos_attention_bf16,
    "float8": triton_attention.rel_pos_attention_float8,
    "int8-qk": triton_attention.rel_pos_attention_int8_qk,
}
"""`ctx.state["attention"]` -> the function that replaces an attention with rel-pos bias."""


def _is(node, *targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _single_user(node: torch.fx.Node) -> bool:
    return len(node.users) == 1


def _rel_pos_terms(logits: torch.fx.Node, qk: torch.fx.Node):
    """(rel_h, rel_w) if `logits` is view(add(add(view(qk), unsqueeze(rel_h, 4)),
    unsqueeze(rel_w, 3))); (None, None) if logits is qk itself; raises LookupError otherwise."""
    if logits is qk:
        return None, None
    if not _is(logits, aten.view.default, aten.reshape.default):
        raise LookupError("logits are not a view of the bias sum")
    add_w = logits.args[0]
    if not (_is(add_w, aten.add.Tensor) and _single_user(add_w)):
        raise LookupError("no rel_w add before the softmax")
    add_h, unsq_w = add_w.args
    if not (_is(add_h, aten.add.Tensor) and _single_user(add_h)):
        raise LookupError("no rel_h add before the softmax")
    view_qk, unsq_h = add_h.args
    ok = (
        _is(view_qk, aten.view.default, aten.reshape.default)
        and view_qk.args[0] is qk
        and _is(unsq_h, aten.unsqueeze.default)
        and unsq_h.args[1] == 4
        and _is(unsq_w, aten.unsqueeze.default)
        and unsq_w.args[1] == 3
    )
    if not ok:
        raise LookupError("bias adds do not have SAM's decomposed rel-pos shape")
    return unsq_h.args[0], unsq_w.args[0]


def _match(softmax: torch.fx.Node):
    """(q, k, v, rel_h, rel_w, av) of the attention around `softmax`; LookupError if any part
    is not the plain eager chain (a quantizer in between, an extra user, another dim)."""
    if softmax.args[1:] not in ((-1,), (-1, False)) or not _single_user(softmax):
        raise LookupError("softmax is not over the last dim with one user")
    (av,) = softmax.users
    if not (_is(av, aten.matmul.default) and av.args[0] is softmax):
        raise LookupError("softmax output goes through a quantizer or elsewhere before attn·v")
    v = av.args[1]
    logits = softmax.args[0]
    qk = logits
    while not _is(qk, aten.matmul.default):
        if not isinstance(qk, torch.fx.Node) or not qk.all_input_nodes:
            raise LookupError("no q·kᵀ matmul feeds the softmax")
        qk = qk.all_input_nodes[0]
    if not _single_user(qk):
        raise LookupError("q·kᵀ has more than one user")
    rel_h, rel_w = _rel_pos_terms(logits, qk)
    q, k_t = qk.args
    if not (_is(k_t, aten.transpose.int) and tuple(k_t.args[1:]) in ((-2, -1), (-1, -2))):
        raise LookupError("k reaches q·kᵀ through a quantizer or not as transpose(k, -2, -1)")
    for name, operand in (("q", q), ("v", v)):
        if operand.op == "call_module":
            raise LookupError(f"{name} reaches the attention through a fake quantizer")
    return q, k_t.args[0], v, rel_h, rel_w, av


def fuse_attention(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult(counts={"fused": 0, "with_rel_pos": 0})
    chosen = {
        "enc_global": ctx.state.get("attention", "flex"),
        "enc_window": ctx.state.get("window_attention", "flex"),
    }
    for name in chosen.values():
        if name not in REL_POS_KERNELS:
            raise ValueError(f"attention kernel {name!r}; kernels: {list(REL_POS_KERNELS)}")
    if ctx.part != "image_encoder":
        result.notes.append("mask decoder attentions are not fused (a few tokens each)")
        return result
    for softmax in [n for n in gm.graph.nodes if _is(n, aten.softmax.int)]:
        info = get_info(softmax)
        if info is None or info.role != "attn_softmax":
            continue
        try:
            q, k, v, rel_h, rel_w, av = _match(softmax)
        except LookupError as err:
            result.rejected[info.attn_path] = str(err)
            continue
        with gm.graph.inserting_before(av):
            if rel_h is None:
                fused = gm.graph.call_function(plain_attention, (q, k, v))
            else:
                kernel_name = chosen.get(info.attn_kind, "flex")
                kernel = REL_POS_KERNELS[kernel_name]
                fused = gm.graph.call_function(kernel, (q, k, v, rel_h, rel_w))
        fused.meta = dict(av.meta)
        update_info(fused, PASS_NAME, role="fused_attention")
        used = kernel_name if rel_h is not None else "sdpa"
        add_finding(fused, PASS_NAME, {"rel_pos": rel_h is not None, "kernel": used})
        av.replace_all_uses_with(fused)
        gm.graph.erase_node(av)
        result.counts["fused"] += 1
        result.counts["with_rel_pos"] += rel_h is not None
    gm.graph.eliminate_dead_code()
    if result.counts["fused"] == 0 and not result.rejected:
        raise LookupError(
            "fuse_attention found no encoder attention (softmax with role attn_softmax)"
        )
    return result
