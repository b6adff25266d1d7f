"""compensate_matmul: CAR-SAM's MatMul-Aware Compensation (MAC), papers.md §3.1.

A quantized attention matmul multiplies two quantized operands. MAC moves one operand's
activation-quantization error into the FP weight of the projection that feeds the *other* one,
so the product matches full precision in least squares; the weight quantizers are then
initialised on the compensated weights. Per head h (channels h*d .. h*d+d-1), with X~ = [X, 1]
the projection's input (the ones column carries the bias correction):

    q_proj <- k's error:  min ||Q K^T - X~_q (W~_q + D) K^^T||^2 + lam ||D||^2      (Sylvester)
    k_proj <- q's error:  min ||K Q^T - X~_k (W~_k + D) Q^^T||^2 + lam ||D||^2      (symmetric)
    v_proj <- attn's:     min ||A V    - A^ X~_v (W~_v + D)||^2  + lam ||D||^2      (ridge)

Summed over every prompt b of every calibration image, the q/k normal equations are the
Kronecker system (sum_b G_b (x) B_b + lam I) vec D = vec sum_b X~_b^T R_b K^_b with G_b = X~^T X~,
B_b = K^^T K^ and R_b = Q (K - K^)^T. With one sample, multiplying by G^-1 gives papers.md's
Sylvester equation A D + D B = C, A = lam G^-1, C = G^-1 X~^T R K^ (`sylvester_reference`
solves that form with scipy's Bartels-Stewart; a test checks both agree). The sum is
solved densely in float64: (in+1)*head_dim unknowns per head (1,032 on tiny's cross attentions,
4,112 on SAM-B's; the accumulator is heads x that squared: ~1 GB float64 for SAM-B).

What it can do: a q-side correction changes the logits X~ D K^^T only within the span of K^'s
head_dim columns, so against N_k >> head_dim keys (t2i: 1,024 image keys on tiny, 4,096 on
SAM-B) it removes only the part of Q dK^T in that span, and only the part that is systematic
given X; against the 7 prompt-token keys of an i2t attention (<= head_dim) it can remove it
all. On tiny at W4A4 the q/k residuals drop 1-20 %, the v residuals 5-60 % (findings).

Choices the paper leaves open, and ours:
- lam: relative, lam * mean diagonal of each head's system matrix (`MacConfig.lam`, 0.1), so
  it does not depend on activation scale; the logits' 1/sqrt(d) is a constant factor of the
  objective and is absorbed by the relative lam.
- X is the projection's input as the calibrated model computes it (upstream quantized, its own
  input quantizer applied): what the layer sees at deployment. Q, K, V come from the FP weights
  (the site's weight quantizers are off while its statistics are gathered): MAC corrects the FP
  weight, before weight quantization, as the paper says.
- q and k are corrected simultaneously, each from the pre-MAC statistics (Jacobi): to first
  order their corrections cancel the two operands' errors independently, whereas a sequential
  update would count the first correction as error in the second.
- bias: corrected too (`MacConfig.bias`), through the ones column.
- v: A is the softmax output before its quantizer, A^ after it (uniform or AGQ log2): the ridge
  compensates the probabilities' quantization error; V's own error is not compensated.
- the operands' quantizers must be per tensor (elementwise), so K^ = quantizer(K) in the
  projection's (B, N, C) layout equals what the matmul sees after the head split.
- sites: the decoder attentions of `MacConfig.attn_kinds` (cross attentions by default), one at
  a time in forward order; each sees the earlier sites already compensated and re-quantized.
  The encoder is not compensated (papers.md: MAC is decoder-specific; its fused qkv and rel-pos
  terms would need their own derivation).

Reads: `ctx.config.mac`, roles/attn_kind/attn_path, the inserted, frozen quantizers,
`ctx.state["model"]` and `ctx.state["calib_items"]`.
Writes: the q/k/v projection weights and biases in place (topology unchanged); their weight
quantizers are reset and re-initialised; `findings["compensate_matmul"]` on each corrected
projection: the operand whose error it absorbs, lambda, residual norm before/after (the
objective above, over all calibration samples), |D| / |W|.
Invariant: an attention whose operands are not quantized (a_bits=None) is left bit-identical.

    before:  x -> qz -> linear(qz_w(W_q), b_q) -> heads -> qz_q -> q @ k^T
    after:   x -> qz -> linear(qz_w'(W_q + D_w), b_q + D_b) -> heads -> qz_q -> q @ k^T
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.fx
from torch import Tensor

from samq_fx.calib import forward_item
from samq_fx.meta import add_finding, get_info, nodes_with_role
from samq_fx.passes.annotate_roles import VIEW_OPS
from samq_fx.pipeline import PassContext, PassResult
from samq_fx.quantizers import Log2Quantizer, Quantizer, UniformQuantizer
from samq_fx.taps import tap

PASS = "compensate_matmul"
# (projection to correct, the matmul slot whose quantization error it absorbs)
SIDES = {"q": "k", "k": "q", "v": "attn"}


class MacError(ValueError):
    """An attention MAC cannot compensate (shared weights, non-elementwise quantizer...)."""


@dataclass(frozen=True)
class Projection:
    linear: torch.fx.Node
    weight: str  # get_attr target
    bias: str | None
    weight_quantizer: torch.fx.Node | None
    heads: int
    head_dim: int


@dataclass(frozen=True)
class MacSite:
    """One attention: its q/k/v projections, softmax, and the operand quantizers (None: FP)."""

    attn_path: str
    attn_kind: str
    proj: dict[str, Projection]
    softmax: torch.fx.Node
    quantizers: dict[str, Quantizer | None]  # slot q, k, attn -> module


def _is(node, *targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _strip_quantizer(gm, node: torch.fx.Node) -> tuple[torch.fx.Node, Quantizer | None]:
    if node.op == "call_module" and "site" in get_info(node).quant:
        module = gm.get_submodule(node.target)
        elementwise = isinstance(module, Log2Quantizer) or (
            isinstance(module, UniformQuantizer) and module.spec.granularity == "tensor"
        )
        if not elementwise:
            raise MacError(f"{node.target} is not a per-tensor quantizer")
        return node.args[0], module
    return node, None


def _projection(gm, operand: torch.fx.Node, role: str, path: str) -> Projection:
    """The linear of `role` behind `operand`, through views; its params and head split."""
    node, split = operand, None
    while _is(node, *VIEW_OPS):
        split = (
            node
            if _is(node, torch.ops.aten.view.default, torch.ops.aten.reshape.default)
            else split
        )
        node = node.args[0]
    info = get_info(node)
    if not _is(node, torch.ops.aten.linear.default) or info is None or info.role != role:
        raise MacError(f"{path}: the {role} operand does not come from a linear through views")
    channels = node.meta["val"].shape[-1]
    heads, dim = split.args[1][-2:] if split is not None else (None, None)
    if not isinstance(heads, int) or heads * (channels // heads) != channels:
        raise MacError(f"{path}: no static head split after {node.name}")
    if len(node.users) != 1:
        raise MacError(f"{path}: {node.name} has {len(node.users)} users, expected the head split")
    w_arg, q_node = node.args[1], None
    if w_arg.op == "call_module":
        q_node, w_arg = w_arg, w_arg.args[0]
    b_arg = node.args[2] if len(node.args) > 2 else None
    for attr, reader in ((w_arg, q_node or node), (b_arg, node)):
        if attr is None:
            continue
        twins = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == attr.target]
        if attr.op != "get_attr" or len(twins) != 1 or list(attr.users) != [reader]:
            raise MacError(f"{path}: parameter of {node.name} is shared or not a get_attr")
    return Projection(
        node,
        w_arg.target,
        None if b_arg is None else b_arg.target,
        q_node,
        heads,
        channels // heads,
    )


def find_sites(gm: torch.fx.GraphModule, kinds: tuple[str, ...]) -> list[MacSite]:
    """Every attention of `gm` whose kind is in `kinds`, in forward order."""
    sites = []
    for qk in nodes_with_role(gm, "qk_matmul"):
        info = get_info(qk)
        if info.attn_kind not in kinds:
            continue
        path = info.attn_path
        (av,) = [n for n in nodes_with_role(gm, "av_matmul") if get_info(n).attn_path == path]
        ops = {}
        for slot, arg in (("q", qk.args[0]), ("k", qk.args[1]), ("attn", av.args[0]), ("v", av.args[1])):  # fmt: skip
            ops[slot] = _strip_quantizer(gm, arg)
        softmax = ops["attn"][0]
        if get_info(softmax) is None or get_info(softmax).role != "attn_softmax":
            raise MacError(f"{path}: the av_matmul's probabilities are not the softmax output")
        proj = {s: _projection(gm, ops[s][0], f"{s}_proj", path) for s in ("q", "k", "v")}
        quantizers = {s: ops[s][1] for s in ("q", "k", "attn")}
        sites.append(MacSite(path, info.attn_kind, proj, softmax, quantizers))
    return sites


def _tensor(gm: torch.nn.Module, target: str) -> Tensor:
    obj = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


# --------------------------------------------------------------------------------------------
# Statistics and solves (plain tensors: testable without a graph).
# --------------------------------------------------------------------------------------------


def _augment(x: Tensor, bias: bool) -> Tensor:
    x = x.double()
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1) if bias else x


def _heads(t: Tensor, heads: int) -> Tensor:
    """(B, N, h*d) -> (B, h, N, d), SAM's head split."""
    b, n, c = t.shape
    return t.double().reshape(b, n, heads, c // heads).transpose(1, 2)


class QkStats:
    """Sums over samples of the normal equations that correct a projection (self side) for the
    quantization error of the other operand: per head h, M (n*d, n*d), C (n, d), sum ||R||^2."""

    def __init__(self) -> None:
        self.m = self.c = None
        self.rr = 0.0
        self.samples = 0

    def add(self, x: Tensor, own: Tensor, other: Tensor, other_q: Tensor) -> None:
        """x (B, N, n) augmented input; own (B, h, N, d) this side's FP operand; other /
        other_q (B, h, M, d) the other operand before / after its quantizer."""
        gram = torch.einsum("bni,bnj->bij", x, x)
        b_mat = torch.einsum("bhmp,bhmq->bhpq", other_q, other_q)
        err = other - other_q
        m = torch.einsum("bij,bhqp->hipjq", gram, b_mat)
        xo = torch.einsum("bni,bhnp->bhip", x, own)
        c = torch.einsum("bhip,bhpq->hiq", xo, torch.einsum("bhmp,bhmq->bhpq", err, other_q))
        own_gram = torch.einsum("bhnp,bhnq->bhpq", own, own)
        rr = torch.einsum("bhpq,bhpq->", own_gram, torch.einsum("bhmp,bhmq->bhpq", err, err))
        self.m = m if self.m is None else self.m + m
        self.c = c if self.c is None else self.c + c
        self.rr += float(rr)
        self.samples += x.shape[0]

    def system(self) -> tuple[Tensor, Tensor]:
        h, n, d = self.c.shape
        return self.m.reshape(h, n * d, n * d), self.c.reshape(h, n * d)


class RidgeStats:
    """Sums for the v correction: per head G (n, n) = sum Z^T Z, C (n, d) = sum Z^T R with
    Z = A^ X~ and R = (A - A^) V."""

    def __init__(self) -> None:
        self.g = self.c = None
        self.rr = 0.0
        self.samples = 0

    def add(self, x: Tensor, attn: Tensor, attn_q: Tensor, v: Tensor) -> None:
        """x (B, K, n); attn / attn_q (B, h, Q, K); v (B, h, K, d)."""
        attn, attn_q = attn.double(), attn_q.double()
        z = torch.einsum("bhqk,bkn->bhqn", attn_q, x)
        r = torch.einsum("bhqk,bhkd->bhqd", attn - attn_q, v)
        g = torch.einsum("bhqn,bhqm->hnm", z, z)
        c = torch.einsum("bhqn,bhqd->hnd", z, r)
        self.g = g if self.g is None else self.g + g
        self.c = c if self.c is None else self.c + c
        self.rr += float(r.pow(2).sum())
        self.samples += x.shape[0]

    def system(self) -> tuple[Tensor, Tensor]:
        h, n, d = self.c.shape
        eye = torch.eye(d, dtype=self.g.dtype, device=self.g.device)
        # one (n*d) system per head, block-diagonal over d: kron(G, I_d) with vec row-major
        m = torch.einsum("hij,pq->hipjq", self.g, eye).reshape(h, n * d, n * d)
        return m, self.c.reshape(h, n * d)


def solve(
    m: Tensor, c: Tensor, rr: float, lam: float, relative: bool = True
) -> tuple[Tensor, float, float, float]:
    """(M + lam_abs I) x = c per head, lam_abs = lam * mean diag(M) (or lam if not relative).
    Returns (x (h, n*d), lam_abs, residual norm before, after): ||R||, ||R - X~ D K^^T||."""
    scale = float(m.diagonal(dim1=-2, dim2=-1).mean().clamp(min=1e-30)) if relative else 1.0
    lam_abs = lam * scale
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    x = torch.linalg.solve(m + lam_abs * eye, c.unsqueeze(-1)).squeeze(-1)
    after = rr - 2 * float((x * c).sum()) + float(torch.einsum("hi,hij,hj->", x, m, x))
    return x, lam_abs, rr**0.5, max(after, 0.0) ** 0.5


def sylvester_reference(x: Tensor, own: Tensor, other: Tensor, other_q: Tensor, lam: float):
    """The paper's single-sample form (papers.md §3.1), one head: A D + D B = C with
    A = lam (X^T X)^-1, B = K^^T K^, C = (X^T X)^-1 X^T R K^; for tests of `QkStats`."""
    from scipy.linalg import solve_sylvester

    x, own, other, other_q = (t.double() for t in (x, own, other, other_q))
    gram_inv = torch.linalg.inv(x.T @ x)
    r = own @ (other - other_q).T
    c = gram_inv @ x.T @ r @ other_q
    return torch.from_numpy(
        solve_sylvester((lam * gram_inv).numpy(), (other_q.T @ other_q).numpy(), c.numpy())
    )


# --------------------------------------------------------------------------------------------
# The pass.
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _fp_weights(gm, site: MacSite):
    """The site's q/k/v weight quantizers off: statistics see the FP weights MAC corrects."""
    mods = [
        gm.get_submodule(p.weight_quantizer.target)
        for p in site.proj.values()
        if p.weight_quantizer
    ]
    saved = [m.enabled for m in mods]
    try:
        for m in mods:
            m.enabled = False
        yield
    finally:
        for m, e in zip(mods, saved, strict=True):
            m.enabled = e


def _quantize(module: Quantizer | None, t: Tensor) -> Tensor:
    return t if module is None else module(t)


@torch.no_grad()
def _gather(gm, model, items, embeddings, site: MacSite, sides, bias: bool) -> dict:
    p = site.proj
    watch = list(
        dict.fromkeys(
            [p[s].linear.args[0] for s in "qkv"] + [p[s].linear for s in "qkv"] + [site.softmax]
        )
    )
    stats = {"q": QkStats(), "k": QkStats(), "v": RidgeStats()}
    with _fp_weights(gm, site), tap(gm, watch) as seen:
        for item, emb in zip(items, embeddings, strict=True):
            forward_item(model, item, image_embeddings=emb)
            val = {n: v.pop() for n, v in seen.items()}  # one item's values at a time
            x = {s: _augment(val[p[s].linear.args[0].name], bias) for s in "qkv"}
            fp = {s: val[p[s].linear.name] for s in "qkv"}
            heads = {s: _heads(fp[s], p[s].heads) for s in "qkv"}
            quant = {s: _heads(_quantize(site.quantizers[s], fp[s]), p[s].heads) for s in "qk"}
            if "q" in sides:
                stats["q"].add(x["q"], heads["q"], heads["k"], quant["k"])
            if "k" in sides:
                stats["k"].add(x["k"], heads["k"], heads["q"], quant["q"])
            if "v" in sides:
                attn = val[site.softmax.name]
                stats["v"].add(x["v"], attn, _quantize(site.quantizers["attn"], attn), heads["v"])
    return {s: stats[s] for s in sides}


def _apply(gm, proj: Projection, x: Tensor, bias: bool) -> float:
    """Add the per-head solution to W (and b); re-initialise the weight quantizer. Returns
    |D_w| / |W|."""
    w = _tensor(gm, proj.weight)
    h, d = proj.heads, proj.head_dim
    delta = x.reshape(h, -1, d).permute(0, 2, 1).reshape(h * d, -1)  # (C, n), row h*d + p
    with torch.no_grad():
        w.add_(delta[:, : w.shape[1]].to(w))
        if bias:
            _tensor(gm, proj.bias).add_(delta[:, w.shape[1]].to(w))
        if proj.weight_quantizer is not None:
            module = gm.get_submodule(proj.weight_quantizer.target)
            module.reset()
            module(w)
            module.freeze()
    return float(delta[:, : w.shape[1]].norm() / w.detach().norm().clamp(min=1e-30))


def compensate_matmul(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Compensate every attention of `mac.attn_kinds`; counts per corrected projection.

    Returns counts `attentions` (considered), `q_proj`, `k_proj`, `v_proj` (corrected) and
    `rejected` {attn_path: why nothing was corrected}.
    """
    cfg = getattr(ctx.config, "mac", None)
    zero = {"attentions": 0, "q_proj": 0, "k_proj": 0, "v_proj": 0}
    if cfg is None:
        return PassResult(counts=zero, notes=["mac is off"])
    if ctx.part != "mask_decoder":
        return PassResult(counts=zero, notes=[f"MAC is decoder-only; {ctx.part} untouched"])
    sites = find_sites(gm, cfg.attn_kinds)
    if not sites:
        seen = sorted({get_info(n).attn_kind for n in nodes_with_role(gm, "qk_matmul")})
        raise MacError(f"no attention of kinds {list(cfg.attn_kinds)} in {ctx.part}; kinds: {seen}")
    model, items = ctx.state["model"], ctx.state["calib_items"][: cfg.images]
    counts, rejected = dict(zero, attentions=len(sites)), {}
    embeddings = None
    for site in sites:
        wanted = [s for s in ("q", "k") if cfg.qk] + (["v"] if cfg.v else [])
        sides = [s for s in wanted if site.quantizers[SIDES[s]] is not None]
        if not sides:
            rejected[site.attn_path] = f"operands {[SIDES[s] for s in wanted]} are not quantized"
            continue
        bias = cfg.bias and all(site.proj[s].bias is not None for s in sides)
        if embeddings is None:
            with torch.no_grad():
                embeddings = [model.image_encoder(it.image) for it in items]
        stats = _gather(gm, model, items, embeddings, site, sides, bias)
        for side, st in stats.items():
            x, lam_abs, before, after = solve(*st.system(), st.rr, cfg.lam)
            rel = _apply(gm, site.proj[side], x, bias)
            add_finding(
                site.proj[side].linear,
                PASS,
                {
                    "absorbs": SIDES[side],
                    "lambda": lam_abs,
                    "residual_before": before,
                    "residual_after": after,
                    "delta_rel": rel,
                    "bias": bias,
                    "samples": st.samples,
                },
            )
            counts[f"{side}_proj"] += 1
    notes = [f"nothing compensated: {rejected}"] if len(rejected) == len(sites) else []
    return PassResult(counts=counts, rejected=rejected, notes=notes)
