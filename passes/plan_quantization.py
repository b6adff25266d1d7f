"""plan_quantization: decide, per quantizer site, whether and how it is quantized.

Reads: `node.meta["samq"]` roles (from annotate_roles) and `ctx.config` (a `QuantConfig`).
Writes: `NodeInfo.quant` on every node with a quantizer site, a mapping slot -> decision:

    linear / conv roles   {"weight": decision | None, "input": decision | None}
    pos_embed             {"weight": decision | None}   (opt-in: only an Override quantizes it)
    qk_matmul             {"q": decision | None, "k": decision | None}
    av_matmul             {"attn": decision | None, "v": decision | None}

A decision is a JSON-ready dict, `{"kind": "uniform", "spec": QuantSpec.to_dict()}` (later
methods add `{"kind": "log2", ...}`), and None keeps that tensor in floating point. Decisions are
data, not modules, so a saved model replays exactly the plan it was calibrated with.

Invariant: the graph is not changed (`insert_quantizers` acts on the plan). Every `Override` in the
config must match at least one site, else `PlanError` lists the roles it could have matched.
"""

from __future__ import annotations

from samq_fx.config import MATMUL_SLOTS, TABLE_ROLES, WEIGHT_ROLES, QuantConfig
from samq_fx.meta import get_info, update_info
from samq_fx.pipeline import PassContext, PassResult
from samq_fx.quantizers import QuantSpec


class PlanError(ValueError):
    """A config that does not fit the model (an override that selects nothing, say)."""


def weight_channel_axis(role: str) -> int:
    """Output-channel axis of the weight: conv_transpose2d stores (in, out, kh, kw); the
    position embedding (1, H, W, C) is scaled per channel, its last axis."""
    return {"upscale_conv": 1, "pos_embed": -1}.get(role, 0)


def weight_spec(cfg: QuantConfig, bits: int, role: str) -> QuantSpec:
    observer = "minmax" if cfg.method in ("minmax", "percentile") else "mse"
    group = cfg.w_granularity == "group" and role not in (
        "neck_conv",
        "patch_embed",
        "upscale_conv",
        *TABLE_ROLES,
    )
    return QuantSpec(
        bits=bits,
        symmetric=cfg.w_symmetric,
        granularity="group" if group else "channel",
        group_size=cfg.w_group_size if group else None,
        ch_axis=weight_channel_axis(role),
        observer=observer,
    )


def activation_spec(cfg: QuantConfig, bits: int) -> QuantSpec:
    return QuantSpec(
        bits=bits,
        symmetric=cfg.a_symmetric,
        granularity="tensor",
        observer=cfg.method if cfg.method in ("minmax", "percentile", "mse") else "mse",
        percentile=cfg.percentile,
    )


def uniform(spec: QuantSpec) -> dict:
    return {"kind": "uniform", "spec": spec.to_dict()}


def _site_slots(role: str | None) -> tuple[str, ...]:
    if role in WEIGHT_ROLES:
        return ("weight", "input")
    if role in TABLE_ROLES:
        return ("weight",)
    return MATMUL_SLOTS.get(role, ())


def plan_quantization(gm, ctx: PassContext) -> PassResult:
    cfg: QuantConfig = ctx.config
    hits = ctx.state.setdefault("override_hits", [0] * len(cfg.overrides))
    counts = {"sites": 0, "quantized": 0, "fp": 0}
    for node in gm.graph.nodes:
        info = get_info(node)
        slots = _site_slots(info.role if info else None)
        if not slots:
            continue
        plan = {}
        for slot in slots:
            quantize = info.role not in cfg.fp_roles and info.role not in TABLE_ROLES
            bits = cfg.w_bits if slot == "weight" else cfg.a_bits
            for i, ov in enumerate(cfg.overrides):
                if ov.matches(ctx.part, info.role, info.attn_kind, info.module_path, slot):
                    hits[i] += 1
                    quantize = quantize if ov.quantize is None else ov.quantize
                    bits = (ov.w_bits if slot == "weight" else ov.a_bits) or bits
            if not quantize or bits is None:
                plan[slot] = None
            elif slot == "weight":
                plan[slot] = uniform(weight_spec(cfg, bits, info.role))
            elif slot == "attn" and cfg.agq is not None:
                plan[slot] = {"kind": "log2", "bits": bits, "tau": 1}  # tau: search_agq
            else:
                plan[slot] = uniform(activation_spec(cfg, bits))
        update_info(node, "plan_quantization", quant=plan)
        counts["sites"] += 1
        counts["quantized" if any(plan.values()) else "fp"] += 1
    return PassResult(counts=counts)


def check_overrides_matched(cfg: QuantConfig, hits: list[int], seen_roles: set[str]) -> None:
    """After planning every part: an override that selected no site is a user error."""
    for ov, n in zip(cfg.overrides, hits):
        if n == 0:
            raise PlanError(
                f"override {ov.to_dict()} matches no quantizer site; roles with sites in this "
                f"model: {sorted(seen_roles)}"
            )
