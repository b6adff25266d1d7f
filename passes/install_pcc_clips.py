"""install_pcc_clips: SAQ-SAM's Perceptual-Consistency Clipping (PCC) of decoder q/k activations.

The mask decoder's query/key activations lie mostly in [-1, 1] but have extreme outliers;
clipping them hard keeps the masks, yet an MSE range never clips that hard (papers.md §2.1).
PCC picks each clip by how well the attention keeps its *focus*:

    focus(A)  = A > theta * max over the row of A              (per prompt b, head h, query q)
    distance  = 1 - mean over (b, h) of |focus(A_fp) & focus(A_q)| / (|focus(A_fp) | focus(A_q)| + 1e-6)

Sites: per decoder attention (2 x (self, t2i, i2t) + final t2i = 7), four tensors: the input of
q_proj, its output (the q operand of q @ k^T), the input of k_proj and its output (the k operand),
in that order, attentions in forward order: 28 sites. Candidates: for each p of
`PccConfig.percentiles` (29 values .85 .. .99999) the clip (quantile(x, 1 - p), quantile(x, p)) of
the tensor x the site sees on one calibration image with all its prompts (quantiles by one sort
of the values, a seeded sample of `SORT_CAP` when larger; never `torch.quantile`, which fails on
big tensors). "No clip" is not a candidate.

Search: greedy in forward order; the first sweep starts with every PCC site in floating point and
switches each on with its chosen clip; the second sweep re-searches each site with all the others
quantized. A_fp always comes from one all-FP pass (every quantizer of the model off); A_q from the
model as calibrated (weights, other activations and earlier sites quantized), with the site's
candidate installed. The distance is measured on the site's own attention (where its q or k
enters); the image embedding is the quantized encoder's, computed once. Ties go to the smaller p
(the harder clip). Cost: one decoder forward per site and sweep records the site's input and
the rest of its attention's inputs; each candidate then runs only the stretch of graph from the
site to its softmax (`recon.extract_span`), which computes exactly what the full decoder would.

Reads: the plan's inserted quantizers (`UniformQuantizer` on the q_proj / k_proj "input" edges and
the qk_matmul "q" / "k" edges), `ctx.state["model"]`, `ctx.state["calib_items"]`.
Writes: `UniformQuantizer.set_clip(lo, hi)` on each site (frozen, bounds kept for lowering), and
on the consumer node a finding {slot: {site, p, lo, hi, distance, before (the calibrated range),
curves (one distance per candidate, per sweep)}}. The graph is unchanged.

The encoder has no PCC (no such sites): the pass returns sites=0 there. On the decoder, PCC
switched on with no quantized q/k site (weights-only, or overrides keeping them FP) is an error
that lists what it saw.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx

from samq_fx.calib import forward_item
from samq_fx.meta import add_finding, get_info, nodes_with_role
from samq_fx.pipeline import PassContext, PassResult
from samq_fx.quantizers import Quantizer, UniformQuantizer
from samq_fx.recon import extract_span
from samq_fx.taps import tap

PASS_NAME = "install_pcc_clips"
DECODER_KINDS = ("dec_self", "token_to_image", "image_to_token", "final_token_to_image")
# Above this many values the quantiles come from a seeded sample (one sort of 2^24 floats).
SORT_CAP = 2**24
# (label, role of the consumer, slot): the four tensors of one attention, in search order.
_SLOTS = (("q_in", "q_proj", "input"), ("q_out", "qk_matmul", "q"),
          ("k_in", "k_proj", "input"), ("k_out", "qk_matmul", "k"))  # fmt: skip


class PccError(ValueError):
    """PCC switched on where it has nothing to clip."""


@dataclass
class PccSite:
    label: str  # "<attn_path>:q_in" etc.
    consumer: torch.fx.Node
    slot: str
    quantizer_node: torch.fx.Node
    quantizer: UniformQuantizer
    softmax: torch.fx.Node


# ---------------------------------------------------------------------------------------------
# Pure pieces: candidates, the metric, the choice.
# ---------------------------------------------------------------------------------------------


def percentile_clips(x: torch.Tensor, percentiles: Sequence[float]) -> list[tuple[float, float]]:
    """(quantile(x, 1 - p), quantile(x, p)) per p, kthvalue-style: the k-th smallest with
    k = ceil(p * n). One sort; tensors above `SORT_CAP` values are sampled (seeded)."""
    v = x.detach().flatten().float()
    if v.numel() > SORT_CAP:
        gen = torch.Generator().manual_seed(v.numel() % (2**31))
        v = v[torch.randint(v.numel(), (SORT_CAP,), generator=gen).to(v.device)]
    v = v.sort().values
    n = v.numel()
    out = []
    for p in percentiles:
        k_hi = min(max(math.ceil(p * n), 1), n)
        out.append((float(v[n - k_hi]), float(v[k_hi - 1])))
    return out


def focus(a: torch.Tensor, theta: float) -> torch.Tensor:
    """Where each attention row concentrates: a > theta * the row's maximum."""
    return a > theta * a.amax(-1, keepdim=True)


def focus_distance(a_fp: torch.Tensor, a_q: torch.Tensor, theta: float = 0.5) -> float:
    """1 - IoU of the FP and quantized focus, per (prompt, head) map, averaged (SAQ-SAM)."""
    m_fp, m_q = focus(a_fp.float(), theta), focus(a_q.float(), theta)
    inter = (m_fp & m_q).flatten(-2).sum(-1).float()
    union = (m_fp | m_q).flatten(-2).sum(-1).float()
    return float(1.0 - (inter / (union + 1e-6)).mean())


def choose(percentiles: Sequence[float], curve: Sequence[float]) -> int:
    """Index of the smallest distance; ties go to the smaller p (the harder clip)."""
    return min(range(len(curve)), key=lambda i: (curve[i], percentiles[i]))


def search_clip(
    x: torch.Tensor, percentiles: Sequence[float], distance: Callable[[float, float], float]
) -> tuple[int, list[tuple[float, float]], list[float]]:
    """Evaluate `distance(lo, hi)` on every candidate clip of x: (best index, clips, curve)."""
    clips = percentile_clips(x, percentiles)
    curve = [distance(lo, hi) for lo, hi in clips]
    return choose(percentiles, curve), clips, curve


# ---------------------------------------------------------------------------------------------
# The pass.
# ---------------------------------------------------------------------------------------------


def _by_attention(gm: torch.fx.GraphModule, role: str) -> dict[str, torch.fx.Node]:
    return {get_info(n).attn_path: n for n in nodes_with_role(gm, role)}


def find_sites(
    gm: torch.fx.GraphModule, attn_kinds: Sequence[str]
) -> tuple[list[PccSite], dict[str, str]]:
    """The PCC sites in search order, and the candidates rejected (label -> why)."""
    consumers = {role: _by_attention(gm, role) for role in ("q_proj", "k_proj", "qk_matmul")}
    sites, rejected = [], {}
    for softmax in nodes_with_role(gm, "attn_softmax"):
        info = get_info(softmax)
        if info.attn_kind not in attn_kinds:
            continue
        for label, role, slot in _SLOTS:
            name = f"{info.attn_path}:{label}"
            consumer = consumers[role].get(info.attn_path)
            if consumer is None:
                rejected[name] = f"no {role} node in this attention"
                continue
            arg = consumer.args[0 if slot in ("input", "q") else 1]
            module = gm.get_submodule(arg.target) if arg.op == "call_module" else None
            if not isinstance(module, UniformQuantizer):
                rejected[name] = "not quantized in the plan" if module is None else "not uniform"
                continue
            sites.append(PccSite(name, consumer, slot, arg, module, softmax))
    return sites, rejected


@contextmanager
def all_fp(model: torch.nn.Module) -> Iterator[None]:
    """Every quantizer of `model` off (enabled=False) inside the block; restored after."""
    saved = [(q, q.enabled) for q in model.modules() if isinstance(q, Quantizer)]
    try:
        for q, _ in saved:
            q.enabled = False
        yield
    finally:
        for q, flag in saved:
            q.enabled = flag


def _range_of(q: UniformQuantizer) -> tuple[float, float]:
    qp = q.qparams()
    s, z = qp.scale.float(), qp.zero_point.float()
    return float(((qp.qmin - z) * s).min()), float(((qp.qmax - z) * s).max())


@torch.no_grad()
def install_pcc_clips(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    cfg = ctx.config.pcc
    unknown = [k for k in cfg.attn_kinds if k not in DECODER_KINDS]
    if unknown:
        raise PccError(f"PCC searches decoder attentions only; got {unknown} ({DECODER_KINDS})")
    if ctx.part != "mask_decoder":
        return PassResult(counts={"sites": 0}, notes=["PCC clips decoder attentions only"])
    sites, rejected = find_sites(gm, cfg.attn_kinds)
    if not sites:
        raise PccError(f"PCC is on but no decoder q/k activation is quantized: {rejected}")
    model, items = ctx.state["model"], ctx.state["calib_items"]
    item = items[min(cfg.search_image, len(items) - 1)]
    ps = tuple(cfg.percentiles)
    softmaxes = list(dict.fromkeys(s.softmax for s in sites))
    with all_fp(model), tap(gm, softmaxes) as seen:
        forward_item(model, item)
    a_fp = {n.name: seen[n.name][0] for n in softmaxes}
    emb = model.image_encoder(item.image)  # quantized encoder; PCC does not change it
    before = {s.label: _range_of(s.quantizer) for s in sites}
    spans = {s.label: extract_span(gm, [s.quantizer_node.args[0].name], [s.softmax.name])
             for s in sites}  # fmt: skip
    for s in sites:
        s.quantizer.enabled = False
    curves: dict[str, list[list[float]]] = {s.label: [] for s in sites}
    chosen: dict[str, tuple[int, float, float]] = {}
    nodes = {n.name: n for n in gm.graph.nodes}
    for _sweep in range(cfg.sweeps):
        for s in sites:
            span = spans[s.label]
            watch = [nodes[n] for n in span.inputs + span.extras]
            with tap(gm, watch) as seen:  # the site's input and what its attention reads besides
                forward_item(model, item, image_embeddings=emb)
            x, *extras = (seen[n.name][0] for n in watch)
            s.quantizer.enabled = True

            def distance(lo: float, hi: float, s: PccSite = s, span=span, x=x, extras=extras):
                s.quantizer.set_clip(lo, hi)
                (a_q,) = span.module(x, *extras)
                return focus_distance(a_fp[s.softmax.name], a_q, cfg.theta)

            best, clips, curve = search_clip(x, ps, distance)
            s.quantizer.set_clip(*clips[best])
            curves[s.label].append(curve)
            chosen[s.label] = (best, *clips[best])
    for s in sites:
        best, lo, hi = chosen[s.label]
        info = get_info(s.consumer)
        record = dict(info.findings.get(PASS_NAME, {}))
        record[s.slot] = {
            "site": s.label,
            "p": ps[best],
            "lo": lo,
            "hi": hi,
            "distance": curves[s.label][-1][best],
            "before": before[s.label],
            "percentiles": list(ps),
            "curves": curves[s.label],
        }
        add_finding(s.consumer, PASS_NAME, record)
    harder = sum(chosen[s.label][2] - chosen[s.label][1] < before[s.label][1] - before[s.label][0]
                 for s in sites)  # fmt: skip
    counts = {"sites": len(sites), "narrower_than_calibrated": harder,
              "candidates": len(sites) * cfg.sweeps * len(ps)}  # fmt: skip
    notes = [f"{s.label}: p={ps[chosen[s.label][0]]}" for s in sites]
    return PassResult(counts=counts, rejected=rejected, notes=notes)
