"""fold_bimodal_signs: fold BIG's per-channel key signs into the q and k projections (exact).

PTQ4SAM's Bimodal Integration (papers.md §1.1): where `detect_bimodal` found a bimodal key, flip
every channel whose mean is negative, so all channels sit on the positive peak and a per-tensor
quantizer no longer wastes its levels on the empty valley. With gamma in {-1, +1}^C:
W_k <- diag(gamma) W_k, b_k <- gamma * b_k, W_q <- diag(gamma) W_q, b_q <- gamma * b_q.

Why exact: per head, logit_ij = sum_{c in head} q_ic k_jc / sqrt(d) and (g_c q)(g_c k) = q k;
negation is exact in IEEE arithmetic and rounding is symmetric, so every product, every partial
sum and every output is bit-identical in fp32. Softmax, V and out_proj are untouched.

Encoder attentions (fused `qkv_proj`, q/k slices, decomposed rel-pos) fold too: the q rows and k
rows of the fused weight and bias flip, and so do the matching columns of `rel_pos_h` and
`rel_pos_w`, since the rel-pos einsum contracts q's channels with the tables' columns. Those
tables are shared by all heads, so an encoder sign vector is per head_dim index (the same for
every head); a per-channel vector that differs between heads cannot be folded exactly and is
refused.

Reads: `findings["detect_bimodal"]` on each candidate key node (verdict, signs), roles and
`attn_path` from `annotate_roles`, `ctx.config.bimodal.attn_kinds`.
Writes: the parameters in place (the graph module's own copies, reached through the `get_attr`
nodes that feed the linears and the rel-pos gathers); `findings["fold_bimodal_signs"]` on every
node whose parameters changed and on the key node (a second run skips folded attentions).
Invariant: the topology is unchanged, and so is every full-precision output, bit for bit. Must
run before any weight quantizer is calibrated.

    before:  x -> linear(W_q, b_q) -> view -> q @ k^T <- view <- linear(W_k, b_k) <- y
    after:   x -> linear(gW_q, gb_q) -> view -> q @ k^T <- view <- linear(gW_k, gb_k) <- y
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from samq_fx.meta import add_finding, get_info, nodes_with_role
from samq_fx.passes.annotate_roles import SCALE_OPS, VIEW_OPS
from samq_fx.passes.detect_bimodal import PASS as DETECT_PASS
from samq_fx.passes.detect_bimodal import key_nodes
from samq_fx.pipeline import PassContext, PassResult

PASS = "fold_bimodal_signs"
aten = torch.ops.aten


class FoldError(ValueError):
    """An attention (or a sign vector) the fold cannot keep exact; the message says why."""


@dataclass(frozen=True)
class FoldSites:
    """Where one attention's signs go.

    linears: (linear node, weight target, bias target or None, first rows of each C-row segment
        to flip: (0,) for a decoder q_proj / k_proj, (q_slot*C, k_slot*C) for a fused qkv).
    tables: targets of rel-pos tables whose last dim (head_dim columns) flips.
    channels: C, the q/k channel count; num_heads, head_dim: the head split (C = heads x dim).
    encoder: signs may be given per head_dim index (the encoder's key slice has head_dim
        channels; its rel-pos tables, when present, are shared by all heads).
    nodes: every node whose record the pass updates.
    """

    attn_path: str
    linears: tuple[tuple[torch.fx.Node, str, str | None, tuple[int, ...]], ...]
    tables: tuple[str, ...]
    channels: int
    num_heads: int
    head_dim: int
    encoder: bool
    nodes: tuple[torch.fx.Node, ...]


def _is(node, *targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _is_passthrough(user: torch.fx.Node, node: torch.fx.Node) -> bool:
    """Ops that commute with a channel sign flip: views, and scaling by a Python scalar."""
    if _is(user, *VIEW_OPS):
        return user.args[0] is node
    return (
        _is(user, *SCALE_OPS)
        and user.args[0] is node
        and not isinstance(user.args[1], torch.fx.Node)
    )


def _consumers(node: torch.fx.Node) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(consumer, the value it reads) for every non-view use of node, through views."""
    out = []
    for user in node.users:
        if _is_passthrough(user, node):
            out.extend(_consumers(user))
        else:
            out.append((user, node))
    return out


def _only(gm: torch.fx.GraphModule, attn_path: str, role: str) -> torch.fx.Node:
    found = [n for n in nodes_with_role(gm, role) if get_info(n).attn_path == attn_path]
    if len(found) != 1:
        raise FoldError(f"{attn_path}: expected one {role!r} node, found {len(found)}")
    return found[0]


def _tensor(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _check_exclusive(gm, attr: torch.fx.Node, allowed: set, attn_path: str) -> str:
    """The get_attr's tensor is read only by `allowed` nodes and shares storage with nothing."""
    if attr.op != "get_attr":
        raise FoldError(f"{attn_path}: {attr.name} is not a parameter (get_attr)")
    if set(attr.users) - allowed:
        others = sorted(u.name for u in set(attr.users) - allowed)
        raise FoldError(f"{attn_path}: {attr.target} is also read by {others}")
    twins = [n.name for n in gm.graph.nodes if n.op == "get_attr" and n.target == attr.target]
    if len(twins) > 1:
        raise FoldError(f"{attn_path}: {attr.target} is read by several get_attr nodes {twins}")
    ptr = _tensor(gm, attr.target).untyped_storage().data_ptr()
    named = list(gm.named_parameters(remove_duplicate=False))
    named += list(gm.named_buffers(remove_duplicate=False))
    sharing = [k for k, t in named if t.untyped_storage().data_ptr() == ptr]
    if len(sharing) > 1:
        raise FoldError(f"{attn_path}: {attr.target} shares storage with {sharing}")
    return attr.target


def _linear_params(gm, linear: torch.fx.Node, attn_path: str) -> tuple[str, str | None]:
    if not _is(linear, aten.linear.default):
        raise FoldError(f"{attn_path}: {linear.name} is not aten.linear")
    weight = _check_exclusive(gm, linear.args[1], {linear}, attn_path)
    bias_node = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    bias = None if bias_node is None else _check_exclusive(gm, bias_node, {linear}, attn_path)
    return weight, bias


def _head_split(linear: torch.fx.Node, channels: int, attn_path: str) -> tuple[int, int]:
    """(heads, head_dim) from the reshape that separates heads right after a projection."""
    (user,) = linear.users
    if not _is(user, aten.view.default, aten.reshape.default):
        raise FoldError(f"{attn_path}: {linear.name} is not followed by a head-split reshape")
    heads, dim = user.args[1][-2:]
    if not isinstance(heads, int) or not isinstance(dim, int):
        raise FoldError(f"{attn_path}: head split of {linear.name} is not static: {user.args[1]}")
    dim = channels // heads if dim == -1 else dim
    if heads * dim != channels:
        raise FoldError(f"{attn_path}: {heads} x {dim} heads do not cover {channels} channels")
    return heads, dim


def _decoder_sites(gm, attn_path: str) -> FoldSites:
    q, k, qk = (_only(gm, attn_path, r) for r in ("q_proj", "k_proj", "qk_matmul"))
    splits = []
    for lin, operand in ((q, 0), (k, 1)):
        uses = _consumers(lin)
        if len(lin.users) != 1 or uses != [(qk, qk.args[operand])]:
            seen = sorted(u.name for u, _ in uses)
            raise FoldError(f"{attn_path}: {lin.name} feeds {seen}, not only q @ k^T")
        channels = lin.meta["val"].shape[-1]
        splits.append((channels, *_head_split(lin, channels, attn_path)))
    if splits[0] != splits[1]:
        raise FoldError(
            f"{attn_path}: q and k head partitions differ (channels, heads, dim): {splits}"
        )
    (wq, bq), (wk, bk) = _linear_params(gm, q, attn_path), _linear_params(gm, k, attn_path)
    channels, heads, dim = splits[0]
    return FoldSites(
        attn_path, ((q, wq, bq, (0,)), (k, wk, bk, (0,))), (), channels, heads, dim, False, (q, k)
    )


def _qkv_layout(qkv: torch.fx.Node, attn_path: str) -> tuple[int, torch.fx.Node]:
    """SAM's layout: linear -> reshape(.., 3, heads, -1) -> permute(2, 0, 3, 1, 4) ->
    reshape(3, ..) -> unbind(0). Returns (heads, the unbind node)."""
    chain, node = [], qkv
    for want in ("reshape", "permute", "reshape", "unbind"):
        if len(node.users) != 1:
            raise FoldError(f"{attn_path}: {node.name} has {len(node.users)} users in qkv split")
        (node,) = node.users
        chain.append(node)
        ok = {
            "reshape": _is(node, aten.view.default, aten.reshape.default),
            "permute": _is(node, aten.permute.default) and list(node.args[1]) == [2, 0, 3, 1, 4],
            "unbind": _is(node, aten.unbind.int) and (node.args[1:] or (0,))[0] == 0,
        }[want]
        if not ok:
            raise FoldError(f"{attn_path}: qkv split is not SAM's layout at {node.name}")
    shape = chain[0].args[1]
    if shape[-3] != 3 or not isinstance(shape[-2], int):
        raise FoldError(f"{attn_path}: qkv reshape {shape} is not (.., 3, heads, dim)")
    return shape[-2], chain[-1]


def _rel_pos_table(gm, einsum: torch.fx.Node, head_dim: int, attn_path: str) -> torch.fx.Node:
    equation, (_, gathered) = einsum.args
    ins, out = equation.replace(" ", "").split("->")
    a, b = ins.split(",")
    if a[-1] != b[-1] or a[-1] in out:
        raise FoldError(f"{attn_path}: rel-pos einsum {equation!r} does not contract channels")
    if not (_is(gathered, aten.index.Tensor) and len(gathered.args[1]) == 1):
        raise FoldError(f"{attn_path}: rel-pos table of {einsum.name} is not a row gather")
    table = gathered.args[0]
    if table.op != "get_attr" or _tensor(gm, table.target).shape[-1] != head_dim:
        raise FoldError(f"{attn_path}: rel-pos table of {einsum.name} has no {head_dim} columns")
    return table


def _encoder_sites(gm, attn_path: str) -> FoldSites:
    qkv, q, k, qk = (_only(gm, attn_path, r) for r in ("qkv_proj", "q", "k", "qk_matmul"))
    heads, unbind = _qkv_layout(qkv, attn_path)
    if q.args[0] is not unbind or k.args[0] is not unbind:
        raise FoldError(f"{attn_path}: q and k are not slices of the qkv projection")
    channels = qkv.meta["val"].shape[-1] // 3
    dim = channels // heads
    if heads * dim != channels:
        raise FoldError(f"{attn_path}: {heads} heads do not divide {channels} channels")
    rel = [n for n in nodes_with_role(gm, "rel_pos") if get_info(n).attn_path == attn_path]
    q_uses, k_uses = _consumers(q), _consumers(k)
    if k_uses != [(qk, qk.args[1])]:
        raise FoldError(f"{attn_path}: k feeds {sorted(u.name for u, _ in k_uses)}, not only qk")
    allowed = {(qk, qk.args[0])} | {(e, e.args[1][0]) for e in rel}
    if set(q_uses) != allowed:
        seen = sorted(u.name for u, _ in q_uses)
        raise FoldError(f"{attn_path}: q feeds {seen}, not exactly q @ k^T and the rel-pos terms")
    tables = []
    for einsum in rel:
        table = _rel_pos_table(gm, einsum, dim, attn_path)
        gathers = set(table.users)
        if any(set(g.users) - set(rel) for g in gathers):
            raise FoldError(f"{attn_path}: {table.target} is used outside this attention")
        tables.append(_check_exclusive(gm, table, gathers, attn_path))
    weight, bias = _linear_params(gm, qkv, attn_path)
    segments = (q.args[1] * channels, k.args[1] * channels)
    return FoldSites(
        attn_path,
        ((qkv, weight, bias, segments),),
        tuple(tables),
        channels,
        heads,
        dim,
        True,
        (qkv, *rel),
    )


def attention_paths(gm: torch.fx.GraphModule) -> list[str]:
    return [get_info(n).attn_path for n in nodes_with_role(gm, "qk_matmul")]


def fold_sites(gm: torch.fx.GraphModule, attn_path: str) -> FoldSites:
    """Check every precondition of the fold for one attention; raise `FoldError` at the first
    that fails (shared parameters, extra consumers of q or k, unequal head splits...)."""
    paths = attention_paths(gm)
    if attn_path not in paths:
        raise FoldError(f"no attention {attn_path!r} in this graph; attentions: {paths}")
    has_qkv = any(get_info(n).attn_path == attn_path for n in nodes_with_role(gm, "qkv_proj"))
    return _encoder_sites(gm, attn_path) if has_qkv else _decoder_sites(gm, attn_path)


def _expand(signs: torch.Tensor, sites: FoldSites) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-channel signs (C,), per-head_dim signs (head_dim,) or None), validated."""
    s = torch.as_tensor(signs).detach().cpu().flatten().to(torch.float64)
    if not bool(((s == 1) | (s == -1)).all()):
        raise FoldError(f"{sites.attn_path}: signs must all be +1 or -1, got {s.unique().tolist()}")
    c, heads, dim = sites.channels, sites.num_heads, sites.head_dim
    if sites.encoder and s.numel() == dim:
        return s.repeat(heads), s
    if s.numel() != c:
        want = f"{c} (channels) or {dim} (head_dim, shared by heads)" if sites.encoder else str(c)
        raise FoldError(f"{sites.attn_path}: {s.numel()} signs given, expected {want}")
    if sites.tables:
        per_head = s.reshape(heads, dim)
        if not bool((per_head == per_head[0]).all()):
            raise FoldError(
                f"{sites.attn_path}: signs differ between heads, but the rel-pos tables "
                f"{list(sites.tables)} are shared by all heads; give head_dim={dim} signs"
            )
        return s, per_head[0]
    return s, None


def _apply(gm: torch.fx.GraphModule, sites: FoldSites, signs: torch.Tensor) -> int:
    """Scale the parameters in place; returns how many channels flipped."""
    per_channel, per_dim = _expand(signs, sites)
    c = sites.channels
    with torch.no_grad():
        for _, weight, bias, segments in sites.linears:
            w = _tensor(gm, weight)
            full = torch.ones(w.shape[0], dtype=torch.float64)
            for start in segments:
                full[start : start + c] = per_channel
            full = full.to(device=w.device, dtype=w.dtype)
            w.mul_(full.reshape(-1, *([1] * (w.dim() - 1))))
            if bias is not None:
                _tensor(gm, bias).mul_(full)
        for table in sites.tables:
            t = _tensor(gm, table)
            t.mul_(per_dim.to(device=t.device, dtype=t.dtype))
    return int((per_channel < 0).sum())


def fold_signs(gm: torch.fx.GraphModule, attn_path: str, signs: torch.Tensor) -> None:
    """Flip the q and k channels of one attention by `signs` (+-1), in place and exactly.

    Args:
        gm: a captured graph with roles (`annotate_roles`).
        attn_path: the attention's module path (`NodeInfo.attn_path`), e.g.
            "transformer.layers.0.cross_attn_token_to_image" or "blocks.3.attn".
        signs: +-1 per q/k channel (decoder: internal_dim); for an encoder attention with
            rel-pos, head_dim values shared by all heads (or C values equal across heads).

    Records nothing (`fold_bimodal_signs` does); applying the same signs twice restores the
    parameters bit for bit.

    Example:
        >>> fold_signs(captured.mask_decoder, "transformer.final_attn_token_to_image",
        ...            torch.tensor([1, -1] * 32))
    """
    _apply(gm, fold_sites(gm, attn_path), signs)


def _peaks(n: int) -> str:
    return f"{n} peak" if n == 1 else f"{n} peaks"


def _record(sites: FoldSites, key: torch.fx.Node, flipped: int) -> None:
    for node, weight, bias, segments in sites.linears:
        what = "q and k rows of the fused qkv" if len(segments) == 2 else "output rows"
        params = [weight] + ([bias] if bias else [])
        add_finding(node, PASS, {"flipped": flipped, "scaled": what, "params": params})
    for node in sites.nodes:
        if get_info(node).role == "rel_pos":
            add_finding(node, PASS, {"flipped": flipped, "scaled": "rel-pos table columns"})
    if PASS not in get_info(key).findings:
        add_finding(key, PASS, {"flipped": flipped, "scaled": "key channels (via k weights)"})


def fold_bimodal_signs(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Fold the detected signs of every bimodal key into its attention's q and k projections.

    Returns counts `folded` and `considered` (keys with a detect_bimodal finding) and `rejected`
    {attn_path: reason} for keys that are not bimodal, already folded, or cannot fold exactly.
    """
    cfg = getattr(ctx.config, "bimodal", None)
    if cfg is None:
        return PassResult(counts={"folded": 0, "considered": 0}, notes=["bimodal is off"])
    keys = key_nodes(gm, cfg.attn_kinds)
    folded, rejected = 0, {}
    for key in keys:
        info = get_info(key)
        found = info.findings.get(DETECT_PASS)
        if found is None:
            raise FoldError(f"{info.attn_path}: no {DETECT_PASS} finding; run {DETECT_PASS} first")
        if PASS in info.findings:
            rejected[info.attn_path] = "already folded"
        elif not found["bimodal"]:
            rejected[info.attn_path] = f"not bimodal ({_peaks(found['peaks'])})"
        else:
            try:
                sites = fold_sites(gm, info.attn_path)
                flipped = _apply(gm, sites, torch.tensor(found["signs"]))
            except FoldError as err:
                rejected[info.attn_path] = str(err)
                continue
            _record(sites, key, flipped)
            folded += 1
    notes = []
    if not keys:
        notes.append(f"no attention of kinds {list(cfg.attn_kinds)} in {ctx.part}")
    elif folded == 0:
        why = "; ".join(f"{p}: {r}" for p, r in rejected.items())
        notes.append(f"nothing folded in {ctx.part}: {why}")
    return PassResult(
        counts={"folded": folded, "considered": len(keys)}, rejected=rejected, notes=notes
    )
