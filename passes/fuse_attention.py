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
int8 q·kᵀ, float8 P·v), which quantizes q, k and v itself with dynamic per-tensor scales.
A windowed attention with "triton" gets `samq_fx.window_attention` instead, wired past SAM's
head split and merge: it reads q, k, v as strided views of the qkv output, takes the rel-pos
tables (it computes rel_h / rel_w itself) and its (B, L, C) output feeds the projection through a
reshape; where that structure is not found it falls back to the general kernel with a note.
A global attention with "triton", or with "float8" and calibrated q, k, v, is wired the same
way to `triton_attention.global_rel_pos_attention` (a rel-pos terms kernel from q and the
tables, then the attention kernel; float8: q, k, v codes from their static scales made by
plain ops inductor fuses): SAM's head split copies, the q permute, the two einsums and the
head merge go (`_WIRED` lists the wirings).
Calibrated attention inputs: where q, k and v each pass through an 8-bit per-tensor quantizer
(the "W8A8-int8-attn" preset puts them on the global attentions), the "float8" kernel takes
their calibrated ranges as static float8 scales (`rel_pos_attention_float8_static`: no amax
pass over q, k, v) and the quantizers leave the graph. Conservative otherwise: an attention
whose probabilities pass through a quantizer, whose q, k, v carry another grid, or whose kernel
is not "float8" is left unfused and listed in `rejected`, so the lowered model never drops a
quantizer silently. The mask decoder's attentions
(a few tokens against the image, well under 1% of SAM's time) are not touched.

Reads: NodeInfo roles and attn_path. Writes: the fused node carries the av_matmul's record with
role "fused_attention" and `findings["fuse_attention"]` = {"rel_pos": bool, "kernel": name
(the kernel asked for, or "triton-window" / "triton-global" / "float8-global" where wired),
"scales": "static" | "dynamic" | None (8-bit q, k, v scales: calibrated, per call, none)}.
Invariant: the function computed is unchanged up to the kernels' float rounding ("flex",
"triton") or their 8-bit rounding of q, k, v and P ("float8", "int8-qk"; with static scales
also the clip of q, k, v to their calibrated ranges, as the fake-quant model clips them).
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from samq_fx import triton_attention, window_attention
from samq_fx.gemm_epilogue import static_scale
from samq_fx.kernels import plain_attention, rel_pos_attention
from samq_fx.meta import add_finding, get_info, update_info
from samq_fx.passes.insert_quantizers import fetch_attr
from samq_fx.pipeline import PassContext, PassResult
from samq_fx.quantizers import Quantizer, UniformQuantizer

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


def _is_disabled_quantizer(gm: torch.fx.GraphModule, node) -> bool:
    """Whether `node` calls a disabled quantizer: the identity, an explicit FP choice."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_module"):
        return False
    module = gm.get_submodule(node.target)
    return isinstance(module, Quantizer) and not module.enabled


def _through_quantizer(gm: torch.fx.GraphModule, node, slot: str, quantizers: dict):
    """The tensor a calibrated quantizer on `node` reads (the quantizer goes into
    `quantizers[slot]`), what a disabled one reads, or `node` itself when it is not a
    quantizer."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_module"):
        return node
    if _is_disabled_quantizer(gm, node):
        return node.args[0]
    module = gm.get_submodule(node.target)
    if not isinstance(module, UniformQuantizer):
        raise LookupError(f"{slot} passes through a {type(module).__name__} no kernel computes")
    if module.spec.bits != 8 or module.spec.granularity != "tensor":
        raise LookupError(
            f"{slot}'s quantizer is {module.spec.bits}-bit per {module.spec.granularity}: the "
            "float8 attention takes 8-bit per-tensor ranges"
        )
    quantizers[slot] = module
    return node.args[0]


def _match(gm: torch.fx.GraphModule, softmax: torch.fx.Node):
    """(q, k, v, rel_h, rel_w, av, quantizers) of the attention around `softmax`, with
    `quantizers` the calibrated 8-bit quantizers on q, k and v ({} if none); LookupError if any
    part is not the eager chain (another quantizer, an extra user, another dim)."""
    if softmax.args[1:] not in ((-1,), (-1, False)) or not _single_user(softmax):
        raise LookupError("softmax is not over the last dim with one user")
    (av,) = softmax.users
    probs = softmax
    if _is_disabled_quantizer(gm, av) and _single_user(av):
        probs, (av,) = av, av.users  # an identity quantizer on the probabilities
    if not (_is(av, aten.matmul.default) and av.args[0] is probs):
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
    quantizers: dict = {}
    q = _through_quantizer(gm, qk.args[0], "q", quantizers)
    k_t = _through_quantizer(gm, qk.args[1], "k", quantizers)
    v = _through_quantizer(gm, v, "v", quantizers)
    if not (_is(k_t, aten.transpose.int) and tuple(k_t.args[1:]) in ((-2, -1), (-1, -2))):
        raise LookupError("k does not reach q·kᵀ as transpose(k, -2, -1)")
    if quantizers and len(quantizers) != 3:
        raise LookupError(f"only {sorted(quantizers)} of q, k, v are quantized: no kernel")
    return q, k_t.args[0], v, rel_h, rel_w, av, quantizers


def _static_scales(gm: torch.fx.GraphModule, path: str, quantizers: dict) -> torch.fx.Node:
    """A get_attr node of the (3,) float32 float8 scales of q, k, v from their quantizers'
    calibrated ranges (a buffer of `gm`)."""
    scales = torch.stack([static_scale(quantizers[slot]).reshape(()) for slot in "qkv"])
    name = "samq_attention_scales__" + path.replace(".", "_")
    gm.register_buffer(name, scales)
    node = gm.graph.get_attr(name)
    node.meta["val"] = scales
    return node


def _is_view(node, rank: int | None = None) -> bool:
    return _is(node, aten.view.default, aten.reshape.default) and (
        rank is None or len(node.args[1]) == rank
    )


def _head_split(q_scaled, k, v):
    """(qkv5, scale, q): the (3, B, heads, L, D) permuted view of the qkv linear's output that q,
    k and v are copied out of by SAM's `reshape(3, B·heads, L, -1).unbind(0)`, q's softmax
    scale and the unscaled q; LookupError if the graph is not that."""
    if not (_is(q_scaled, aten.mul.Tensor) and isinstance(q_scaled.args[1], float)):
        raise LookupError("q is not the head split times a constant softmax scale")
    q = q_scaled.args[0]
    parts = (q, k, v)
    if not all(_is(n, operator.getitem) and n.args[1] == i for i, n in enumerate(parts)):
        raise LookupError("q, k, v are not the three parts of one unbind")
    unbind = q.args[0]
    if not (_is(unbind, aten.unbind.int) and all(n.args[0] is unbind for n in parts)):
        raise LookupError("q, k, v are not the three parts of one unbind")
    merged = unbind.args[0]
    if unbind.args[1:] not in ((), (0,)) or not _is_view(merged, 4):
        raise LookupError("the unbind is not of the (3, B·heads, L, D) head split")
    qkv5 = merged.args[0]
    if not (_is(qkv5, aten.permute.default) and list(qkv5.args[1]) == [2, 0, 3, 1, 4]):
        raise LookupError("the head split is not SAM's permute(2, 0, 3, 1, 4) of the qkv output")
    return qkv5, q_scaled.args[1], q


def _head_merge(av):
    """The node that hands the attention output to the output projection: SAM's
    `view(B, heads, H, W, D).permute(0, 2, 3, 1, 4).reshape(B, H, W, C)` of attn·v."""
    split = next(iter(av.users)) if _single_user(av) else None
    if not _is_view(split, 5) or not _single_user(split):
        raise LookupError("attn·v is not split into (B, heads, H, W, D)")
    (perm,) = split.users
    if not (_is(perm, aten.permute.default) and list(perm.args[1]) == [0, 2, 3, 1, 4]):
        raise LookupError("the head merge is not permute(0, 2, 3, 1, 4)")
    (merged,) = perm.users
    if not (_single_user(perm) and _is_view(merged, 4)):
        raise LookupError("the head merge is not reshaped to (B, H, W, C)")
    return merged


def _rel_pos_table(gm: torch.fx.GraphModule, term, q, axis: int, size: int):
    """The rel_pos_h (axis 0) / rel_pos_w (axis 1) parameter node behind SAM's rel-pos term
    `einsum(eq, [reshape(q), index(table, [i - j + size - 1])])`; LookupError otherwise (a
    table resized by interpolation, another equation)."""
    eq = ("bhwc,hkc->bhwk", "bhwc,wkc->bhwk")[axis]
    if not (_is(term, aten.einsum.default) and term.args[0] == eq):
        raise LookupError(f"the rel-pos term is not einsum({eq!r})")
    grid, gathered = term.args[1]
    if not (_is_view(grid, 4) and grid.args[0] is q and _is(gathered, aten.index.Tensor)):
        raise LookupError("the rel-pos einsum does not read q and an indexed table")
    table, (coords_node,) = gathered.args
    is_attr = isinstance(coords_node, torch.fx.Node) and coords_node.op == "get_attr"
    coords = fetch_attr(gm, coords_node.target) if is_attr else None
    span = torch.arange(size)
    want = span[:, None] - span[None, :] + size - 1
    if coords is None or coords.shape != want.shape or not torch.equal(coords.cpu(), want):
        raise LookupError("the rel-pos table is not indexed by i - j + size - 1")
    val = table.meta.get("val")
    if val is None or val.dim() != 2 or val.shape[0] != 2 * size - 1:
        raise LookupError(f"the rel-pos table is not ({2 * size - 1}, head dim)")
    return table


def _wire_to_qkv(gm, path, q_scaled, k, v, rel_h, rel_w, av, kernel, fits, quantizers):
    """Wire `kernel` (`window_rel_pos_attention` or `global_rel_pos_attention`) straight to the
    qkv linear's output, the rel-pos tables and the output projection's input, so neither the
    head split nor the head merge is copied and the rel-pos terms are computed in the kernel.
    `fits(kh, kw)` says whether the kernel takes the key grid; `quantizers` (global only):
    q's, k's and v's calibrated ones, whose static float8 scales the call gets. Returns the
    node that now feeds the projection; LookupError (graph untouched) if SAM's structure around
    the attention is not there or the grid does not fit."""
    qkv5, scale, q = _head_split(q_scaled, k, v)
    merged = _head_merge(av)
    kh, kw = (t.meta["val"].shape[-1] for t in (rel_h, rel_w))
    if not all(isinstance(n, int) for n in (kh, kw)) or not fits(kh, kw):
        raise LookupError(f"a {kh} x {kw} key grid does not fit the kernel")
    table_h = _rel_pos_table(gm, rel_h, q, 0, kh)
    table_w = _rel_pos_table(gm, rel_w, q, 1, kw)
    graph = gm.graph
    with graph.inserting_after(qkv5):
        views = [graph.call_function(aten.select.int, (qkv5, 0, i)) for i in range(3)]
    for i, node in enumerate(views):
        node.meta = {"val": qkv5.meta["val"][i]} if "val" in qkv5.meta else {}
    args = (*views, table_h, table_w, scale, kh, kw)
    if kernel is triton_attention.global_rel_pos_attention:
        with graph.inserting_before(merged):
            scales = _static_scales(gm, path, quantizers) if quantizers else None
        args = (*args, scales)
    with graph.inserting_before(merged):
        fused = graph.call_function(kernel, args)
        out = graph.call_function(aten.reshape.default, (fused, merged.args[1]))
    fused.meta = dict(av.meta)
    if "val" in merged.meta:
        fused.meta["val"] = merged.meta["val"].flatten(1, 2)
    out.meta = dict(merged.meta)
    merged.replace_all_uses_with(out)
    return fused


def _any_grid(kh: int, kw: int) -> bool:
    """The global kernel walks any key grid tile by tile (online softmax)."""
    return True


_WIRED = {
    ("enc_window", "triton", False): (
        window_attention.window_rel_pos_attention,
        window_attention.fits_one_tile,
        "triton-window",
    ),
    ("enc_global", "triton", False): (
        triton_attention.global_rel_pos_attention,
        _any_grid,
        "triton-global",
    ),
    ("enc_global", "float8", True): (
        triton_attention.global_rel_pos_attention,
        _any_grid,
        "float8-global",
    ),
}
"""(attention kind, kernel, q, k, v calibrated) -> the kernel wired to the qkv output and the
projection's input, whether it takes a key grid, its name in the findings. Dynamic-scale 8-bit
kernels are not wired: their amax passes read q, k, v in the head-split layout anyway."""


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
            q, k, v, rel_h, rel_w, av, quantizers = _match(gm, softmax)
        except LookupError as err:
            result.rejected[info.attn_path] = str(err)
            continue
        kernel_name = chosen.get(info.attn_kind, "flex") if rel_h is not None else "sdpa"
        if quantizers and kernel_name != "float8":
            result.rejected[info.attn_path] = (
                f"q, k, v carry calibrated 8-bit ranges, which only the 'float8' attention "
                f"kernel takes (static scales); this attention's kernel is {kernel_name!r}"
            )
            continue
        fused = None
        wired = _WIRED.get((info.attn_kind, kernel_name, bool(quantizers)))
        if wired is not None:
            kernel, fits, wired_name = wired
            try:
                fused = _wire_to_qkv(
                    gm, info.attn_path, q, k, v, rel_h, rel_w, av, kernel, fits, quantizers
                )
                kernel_name = wired_name
            except LookupError as err:  # the general Triton kernel takes it, with the copies
                result.notes.append(f"{info.attn_path}: {wired_name} kernel not wired ({err})")
        if fused is None:
            with gm.graph.inserting_before(av):
                if rel_h is None:
                    fused = gm.graph.call_function(plain_attention, (q, k, v))
                elif quantizers:
                    scales = _static_scales(gm, info.attn_path, quantizers)
                    fused = gm.graph.call_function(
                        triton_attention.rel_pos_attention_float8_static,
                        (q, k, v, rel_h, rel_w, scales),
                    )
                else:
                    kernel = REL_POS_KERNELS[kernel_name]
                    fused = gm.graph.call_function(kernel, (q, k, v, rel_h, rel_w))
            fused.meta = dict(av.meta)
            av.replace_all_uses_with(fused)
            gm.graph.erase_node(av)
        update_info(fused, PASS_NAME, role="fused_attention")
        eight_bit = "dynamic" if kernel_name in ("float8", "int8-qk") else None
        scale_kind = "static" if quantizers else eight_bit
        finding = {"rel_pos": rel_h is not None, "kernel": kernel_name, "scales": scale_kind}
        add_finding(fused, PASS_NAME, finding)
        result.counts["fused"] += 1
        result.counts["with_rel_pos"] += rel_h is not None
    gm.graph.eliminate_dead_code()
    if result.counts["fused"] == 0 and not result.rejected:
        raise LookupError(
            "fuse_attention found no encoder attention (softmax with role attn_softmax)"
        )
    return result
