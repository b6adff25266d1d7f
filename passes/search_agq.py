"""search_agq: pick each softmax's log2 base and scale by PTQ4SAM's criterion (AGQ).

PTQ4SAM (papers.md §1.2) quantizes post-softmax probabilities on a log grid a_hat =
s * 2^(-k / tau), and picks, per softmax, the base 2^(1/tau) (tau in {1, 2, 4}) whose quantized
probabilities best preserve attn @ V:

    for each calibration image and tau:  s*_tau = argmin_s  mean | A_hat(s, tau) V - A V |^p
    tau = argmin over tau of the error summed over images;  s = mean over images of s*_tau

Reads: the plan (`NodeInfo.quant["attn"]["kind"] == "log2"` on av_matmul nodes) and the inserted
`Log2Quantizer` modules; `ctx.state["model"]` and `ctx.state["calib_items"]` to run the model.
Writes: `set_agq(s, tau)` on each log2 quantizer (which freezes it) and, on the av_matmul node,
a finding {tau, scale, error per tau, images}. The graph is unchanged.

A and V are the tensors the av_matmul sees in the model as calibrated so far (weights and the
other activations already quantized), one image at a time, so memory stays at one image's
attention maps. The error is measured on at most `ELEMENT_CAP` probabilities (a seeded subset of
maps and query rows): an unbiased estimate that keeps the 4096x4096 global maps affordable.
We use p = 2 (the paper's squared error) by default; the reference code's 2.4 is a config value.
"""

from __future__ import annotations

import math

import torch
import torch.fx

from samq_fx.calib import forward_item
from samq_fx.meta import add_finding, get_info, nodes_with_role
from samq_fx.pipeline import PassContext, PassResult
from samq_fx.quantizers import Log2Quantizer, log2_fake_quantize
from samq_fx.taps import tap

ELEMENT_CAP = 2**18


def _sites(gm: torch.fx.GraphModule) -> list[tuple]:
    """(av_matmul, its Log2Quantizer, the softmax node, the FP V node) per log2-planned site."""
    out = []
    for av in nodes_with_role(gm, "av_matmul"):
        attn_q, v_arg = av.args[0], av.args[1]
        if attn_q.op != "call_module":
            continue
        module = gm.get_submodule(attn_q.target)
        if isinstance(module, Log2Quantizer):
            v_fp = v_arg.args[0] if v_arg.op == "call_module" else v_arg
            out.append((av, module, attn_q.args[0], v_fp))
    return out


def _subsample(a: torch.Tensor, v: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded subset of attention maps (leading batch*head index) and query rows, at most
    `cap` probabilities in all, with the matching V. The error mean stays unbiased."""
    a = a.reshape(-1, *a.shape[-2:])
    v = v.reshape(-1, *v.shape[-2:])
    gen = torch.Generator().manual_seed(a.numel() % (2**31))
    rows = min(a.shape[1], max(1, cap // a.shape[2]))
    maps = min(a.shape[0], max(1, cap // (rows * a.shape[2])))
    pick_maps = torch.randperm(a.shape[0], generator=gen)[:maps].to(a.device)
    pick_rows = torch.randperm(a.shape[1], generator=gen)[:rows].to(a.device)
    return a[pick_maps][:, pick_rows].float(), v[pick_maps].float()


def agq_errors(
    a: torch.Tensor, v: torch.Tensor, bits: int, taus, candidates: int, p: float
) -> dict[int, tuple[float, float]]:
    """For one image: {tau: (best scale, error at it)}; `a` (..., Q, K), `v` (..., K, D)."""
    a, v = _subsample(a, v, ELEMENT_CAP)
    ref = a @ v
    a_max = float(a.amax())
    lo = min(0.1, 0.01 * a_max)
    hi = max(a_max, lo * 1.0001)
    best = {}
    for tau in taus:

        def error(s: float, tau: int = tau) -> float:
            return float((log2_fake_quantize(a, s, tau, bits) @ v - ref).abs().pow(p).mean())

        best[tau] = _log_search(error, lo, hi, candidates)
    return best


def _log_search(error, lo: float, hi: float, candidates: int) -> tuple[float, float]:
    """Minimise error(s) on a log grid: `candidates // 2` coarse points, then as many again
    between the best coarse point's neighbours. Returns (s, error(s))."""
    coarse = max(2, candidates // 2)
    grid = torch.logspace(math.log10(lo), math.log10(hi), coarse).tolist()
    errs = [error(s) for s in grid]
    i = min(range(len(grid)), key=errs.__getitem__)
    left, right = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    fine = torch.logspace(math.log10(left), math.log10(right), candidates - coarse + 2).tolist()
    for s in fine[1:-1]:
        grid.append(s)
        errs.append(error(s))
    j = min(range(len(grid)), key=errs.__getitem__)
    return grid[j], errs[j]


@torch.no_grad()
def search_agq(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    cfg = ctx.config.agq
    sites = _sites(gm)
    if not sites:
        return PassResult(counts={"sites": 0}, notes=["no log2-planned softmax in this graph"])
    model, items = ctx.state["model"], ctx.state["calib_items"][: cfg.search_images]
    taus = tuple(cfg.taus)
    scale_sums = {(site[0].name, t): 0.0 for site in sites for t in taus}
    err_sums = dict(scale_sums)
    watch = [softmax for _, _, softmax, _ in sites] + [v for _, _, _, v in sites]
    for item in items:
        with tap(gm, watch) as seen:
            forward_item(model, item)
        for av, quantizer, softmax, v_node in sites:
            (a,) = seen[softmax.name]
            (v,) = seen[v_node.name]
            for tau, (s, err) in agq_errors(
                a, v, quantizer.bits, taus, cfg.scale_candidates, cfg.p
            ).items():
                scale_sums[(av.name, tau)] += s
                err_sums[(av.name, tau)] += err
    chosen = {}
    for av, quantizer, _, _ in sites:
        errors = {t: err_sums[(av.name, t)] for t in taus}
        tau = min(taus, key=lambda t: (errors[t], t))
        scale = min(scale_sums[(av.name, tau)] / len(items), 1.0)
        quantizer.set_agq(scale, tau)
        info = get_info(av)
        chosen[f"{info.attn_kind}@{info.attn_path}"] = tau
        add_finding(
            av,
            "search_agq",
            {"tau": tau, "scale": scale, "error_per_tau": errors, "images": len(items)},
        )
    counts = {"sites": len(sites)} | {
        f"tau={t}": sum(v == t for v in chosen.values()) for t in taus
    }
    return PassResult(counts=counts, notes=[f"{k}: tau={v}" for k, v in chosen.items()])
