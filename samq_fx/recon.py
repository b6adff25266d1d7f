"""Block reconstruction (BRECQ / QDrop, as PTQ4SAM-L runs it): the driver.

`passes/tag_blocks.py` partitions each captured graph into units (papers.md §1.3); this file
reconstructs them one by one, in forward order, on a model that `samq_fx.quantize` returned:

    for unit in enc.0.attn, enc.0.mlp, ..., enc.neck, dec.0.self_attn, ..., dec.final_t2i:
        sub = extract_unit(graph, unit)      # GraphModule sharing qmodel's weights + quantizers
        x_q        <- tap(qmodel)            # upstream units already reconstructed, quantized
        x_fp, y_fp <- tap(fp_model)          # FP inputs (QDrop mixing) and FP targets
        repeat cfg.iters times, one random calibration image (all its prompts) per step:
            x~ = where(u < drop_prob, x_q, x_fp);  y^ = sub(x~)  with QDrop on sub's activations
            loss = loss_fn(y^, y_fp, unit) + round_weight * sum rounding_loss(beta)
            Adam: AdaRound alpha (lr_round), activation step sizes (LSQ, lr_scale, cosine to 0)
        harden rounding, drop_prob = 1.0 on every quantizer of the unit, scales fixed

`qmodel` is edited in place (its quantizers learn; its weights' rounding is decided). Units are
extracted, not re-implemented: the unit's nodes are copied into a standalone GraphModule whose
placeholders are the values the unit reads from outside (tensors and symbolic ints such as a
batch size), whose outputs are the unit's tensors used outside, and whose get_attr / call_module
targets are qmodel's own parameters and quantizer modules, so optimising the unit optimises
qmodel. Inputs and targets come from taps (`samq_fx.taps`) on the full models running each
calibration item, so glue (residual adds, norms, window partition) is computed by the graph
itself.

`fp_model` is the same capture without quantizers: the `CapturedSam` that was passed to
`quantize`, or a deep copy of qmodel with every quantizer `enabled = False`. Values are matched
by node name, which capture and `quantize` preserve.

Memory: per unit, for every item, the unit's quantized inputs, FP inputs and FP targets are
kept (on `cache_device`, default the data's device: pass "cpu" to keep accelerator memory for
the optimisation; a SAM-B decoder unit holds about 3 x 67 MB per image at 16 prompts), plus the
image embeddings of both models for decoder units (4 MB per image). Nothing outlives its unit.

Plug-ins for the methods built on this driver:
  loss_fn(preds, targets, unit) -> scalar   replaces the channel-summed squared error (PAR's
                                            loss); preds/targets are lists in `Unit.outputs`
                                            order.
  target_fn(unit, item) -> list[Tensor]     replaces the FP targets of a unit (SAQ-SAM's prompt-
                                            aware targets); called once per item while gathering,
                                            with `unit` the unit name; the result is what
                                            loss_fn receives as targets.
Either may return None for a unit it does not handle: that unit gets the default (FP outputs as
targets, `channel_sse`). `extract_span` copies any stretch of a graph between given nodes (the FP
neck and decoder that SAQ-SAM's PAR loss runs a stage's output through, `samq_fx.par`).

CAR-SAM's JCAR needs no plug-in: with `ReconConfig(units="joint-cross")` a decoder layer's
t2i, MLP and i2t are one unit whose outputs are the layer's token and image streams (T', I'),
and the default loss, summed over outputs, is the joint L2 ||F(T^, I^) - F(T, I)||^2 (per
output a mean over tokens of the channel sum, so the prompt tokens weigh as much as the image
tokens). Every unit's loss at every step is kept in `UnitReport.loss_curve`.

Determinism: item order, QDrop masks and input mixing draw from torch's global RNG inside
`torch.random.fork_rng`, seeded from `cfg.seed` and the unit's index, so a run is repeatable
and the caller's RNG state is untouched.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import Tensor

from samq_fx.calib import CalibItem, forward_item
from samq_fx.config import ReconConfig
from samq_fx.meta import get_info
from samq_fx.passes.tag_blocks import tag_blocks, unit_members, unit_order
from samq_fx.pipeline import PassContext, run_passes
from samq_fx.progress import Progress
from samq_fx.quantizers import Quantizer, UniformQuantizer, assert_deployable
from samq_fx.report import format_table
from samq_fx.taps import tap

PARTS = ("image_encoder", "mask_decoder")
# Module types whose 4-D outputs are NCHW (channel axis 1); everything else is channel-last.
_CHANNELS_FIRST = {"Conv2d", "ConvTranspose2d", "LayerNorm2d"}

LossFn = Callable[[list[Tensor], list[Tensor], str], Tensor]
TargetFn = Callable[[str, CalibItem], list[Tensor]]


# ---------------------------------------------------------------------------------------------
# Units: extraction.
# ---------------------------------------------------------------------------------------------


@dataclass
class Unit:
    """One reconstruction unit, extracted from a part's graph.

    `module(*values of inputs)` returns a tuple in `outputs` order. `inputs` and `outputs` are
    node names in the part's graph (the same in the FP capture).
    """

    name: str
    part: str
    module: torch.fx.GraphModule
    inputs: list[str]
    outputs: list[str]
    channel_dims: list[int]
    weight_quantizers: list[tuple[str, Quantizer, Tensor]]  # (site, quantizer, weight)
    act_quantizers: list[tuple[str, Quantizer]]

    def __call__(self, *args: Any) -> list[Tensor]:
        return list(self.module(*args))


def _is_tensor_valued(node: torch.fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _channel_dim(node: torch.fx.Node) -> int:
    info, val = get_info(node), node.meta.get("val")
    if info is not None and info.module_type in _CHANNELS_FIRST and val.dim() == 4:
        return 1
    return -1


def _fetch(gm: torch.nn.Module, target: str) -> Any:
    obj = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def extract_unit(gm: torch.fx.GraphModule, name: str, part: str = "") -> Unit:
    """Copy unit `name`'s nodes into a standalone GraphModule that shares gm's tensors/modules.

    Example:
        >>> unit = extract_unit(qmodel.image_encoder, "enc.0.attn", "image_encoder")
        >>> (out,) = unit(*values_of_unit_inputs)
    """
    members = unit_members(gm, name)
    member_set = set(members)
    inputs: list[torch.fx.Node] = []
    for node in members:
        for arg in node.all_input_nodes:
            if arg not in member_set and arg.op != "get_attr" and arg not in inputs:
                inputs.append(arg)
    outputs = [
        n for n in members if _is_tensor_valued(n) and any(u not in member_set for u in n.users)
    ]
    if not outputs:
        raise ValueError(f"unit {name!r} has no tensor output used outside it")
    module = _copy_nodes(gm, members, inputs, outputs, f"Unit_{name.replace('.', '_')}")
    weights, acts = [], []
    for node in members:
        info = get_info(node)
        if node.op != "call_module" or "site" not in info.quant:
            continue
        quantizer = gm.get_submodule(node.target)
        site = info.quant["site"]
        if info.quant["slot"] == "weight":
            (w_node,) = node.args
            weights.append((site, quantizer, _fetch(gm, w_node.target)))
        else:
            acts.append((site, quantizer))
    return Unit(
        name=name,
        part=part,
        module=module,
        inputs=[n.name for n in inputs],
        outputs=[n.name for n in outputs],
        channel_dims=[_channel_dim(n) for n in outputs],
        weight_quantizers=weights,
        act_quantizers=acts,
    )


def _copy_nodes(
    gm: torch.fx.GraphModule,
    members: list[torch.fx.Node],
    inputs: list[torch.fx.Node],
    outputs: list[torch.fx.Node],
    class_name: str,
) -> torch.fx.GraphModule:
    """A GraphModule computing `outputs` from `inputs` by copies of `members` (graph order);
    get_attr / call_module targets stay gm's own tensors and modules (shared, not copied)."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)

    def remap(arg: torch.fx.Node) -> torch.fx.Node:
        if arg not in env:  # a get_attr: the same parameter / constant, shared
            env[arg] = graph.get_attr(arg.target)
            env[arg].meta = dict(arg.meta)
        return env[arg]

    for node in members:
        env[node] = graph.node_copy(node, remap)
    graph.output(tuple(env[n] for n in outputs))
    return torch.fx.GraphModule(gm, graph, class_name=class_name)


@dataclass
class Span:
    """A stretch of a graph as a module: `module(*inputs values, *extras values)` returns the
    `outputs` values as a tuple. `extras` are the values the span reads that do not depend on
    its inputs (the image batch size read off the encoder's input; the key branch when the span
    starts at a query): they are recorded from a run of the full graph and passed in."""

    module: torch.fx.GraphModule
    inputs: list[str]
    extras: list[str]
    outputs: list[str]


def extract_span(gm: torch.fx.GraphModule, inputs: Sequence[str], outputs: Sequence[str]) -> Span:
    """Copy the nodes that compute `outputs` from `inputs` (node names of gm) into a module.

    Walks back from the outputs and stops at the inputs. A node that depends on an input, or
    only on parameters, is copied; any other node the walk reaches becomes an extra input.
    Parameters and quantizers are gm's own (shared), so a quantizer changed outside changes
    the span.

    Example:
        >>> neck = extract_span(fp.image_encoder, ["add_24"], ["add_28"])
        >>> (embedding,) = neck.module(block_output, *extra_values)
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    missing = [n for n in [*inputs, *outputs] if n not in by_name]
    if missing:
        raise ValueError(f"nodes {missing} are not in this graph")
    starts = [by_name[n] for n in inputs]
    dependent, param_only = set(starts), set()
    for node in gm.graph.nodes:
        args = node.all_input_nodes
        if any(a in dependent for a in args):
            dependent.add(node)
        elif node.op == "get_attr" or (
            node.op not in ("placeholder", "output") and all(a in param_only for a in args)
        ):
            param_only.add(node)
    members: set[torch.fx.Node] = set()
    extras: list[torch.fx.Node] = []
    stack = [by_name[n] for n in outputs]
    while stack:
        node = stack.pop()
        if node in members or node in starts or node in extras or node.op == "get_attr":
            continue
        if node in dependent or node in param_only:
            members.add(node)
            stack.extend(node.all_input_nodes)
        else:
            extras.append(node)
    extras.sort(key=list(gm.graph.nodes).index)
    ordered = [n for n in gm.graph.nodes if n in members]
    module = _copy_nodes(gm, ordered, starts + extras, [by_name[n] for n in outputs], "Span")
    return Span(module, list(inputs), [n.name for n in extras], list(outputs))


def tag_units(qmodel: torch.nn.Module, cfg: ReconConfig) -> dict[str, list[str]]:
    """Run `tag_blocks` on both graphs of qmodel (recorded in their pass logs): part -> units."""
    out = {}
    for part in PARTS:
        gm = getattr(qmodel, part)
        run_passes(gm, PassContext(part=part, arch=qmodel.samq_arch, config=cfg), [tag_blocks])
        out[part] = unit_order(gm)
    return out


# ---------------------------------------------------------------------------------------------
# Inputs and targets: taps on the full models.
# ---------------------------------------------------------------------------------------------


@dataclass
class UnitData:
    """Per calibration item: the unit's inputs in the quantized and the FP model, and targets."""

    inputs_q: list[list[Any]]
    inputs_fp: list[list[Any]]
    targets: list[list[Tensor]]


class ModelFeed:
    """Runs one part of a captured Sam on calibration items; for the decoder it caches each
    item's image embedding (computed once, after the encoder's units are final)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.embeddings: dict[int, Tensor] = {}

    @torch.no_grad()
    def run(self, part: str, index: int, item: CalibItem) -> None:
        model = self.model
        if part == "image_encoder":
            model.image_encoder(item.image)
            return
        if index not in self.embeddings:
            self.embeddings[index] = model.image_encoder(item.image)
        forward_item(model, item, image_embeddings=self.embeddings[index])


def record(
    feed: ModelFeed,
    part: str,
    names: Sequence[str],
    items: Sequence[CalibItem],
    cache_device: torch.device | None = None,
) -> list[list[Any]]:
    """Values of the nodes `names` of `feed.model`'s `part` graph, per item: [item][name]."""
    gm = getattr(feed.model, part)
    by_name = {n.name: n for n in gm.graph.nodes}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(
            f"{part}: nodes {missing} are not in this model's graph; fp_model must be the same "
            "capture as qmodel (the CapturedSam given to quantize, or a copy of qmodel)"
        )

    def keep(value: Any) -> Any:
        if isinstance(value, Tensor):
            value = value.detach()
            return value if cache_device is None else value.to(cache_device)
        return value

    unique = list(dict.fromkeys(names))
    with tap(gm, [by_name[n] for n in unique], transform=keep) as seen:
        for i, item in enumerate(items):
            feed.run(part, i, item)
    return [[seen[n][i] for n in names] for i in range(len(items))]


def gather(
    unit: Unit,
    q_feed: ModelFeed,
    fp_feed: ModelFeed,
    items: Sequence[CalibItem],
    *,
    target_fn: TargetFn | None = None,
    cache_device: torch.device | None = None,
) -> UnitData:
    """Unit inputs from qmodel and fp_model, and FP targets (or `target_fn`'s), per item."""
    inputs_q = record(q_feed, unit.part, unit.inputs, items, cache_device)
    fp = record(fp_feed, unit.part, unit.inputs + unit.outputs, items, cache_device)
    k = len(unit.inputs)
    targets = [row[k:] for row in fp]
    if target_fn is not None:
        for i, item in enumerate(items):
            custom = target_fn(unit.name, item)
            if custom is not None:
                targets[i] = list(custom)
    return UnitData(inputs_q, [row[:k] for row in fp], targets)


# ---------------------------------------------------------------------------------------------
# Loss and the optimisation of one unit.
# ---------------------------------------------------------------------------------------------


def channel_sse(
    preds: Sequence[Tensor],
    targets: Sequence[Tensor],
    unit: str = "",
    *,
    channel_dims: Sequence[int] | None = None,
) -> Tensor:
    """PTQ4SAM's reconstruction loss: per output, the mean over non-channel dims of the sum over
    channels of (pred - target)^2 (papers.md §1.3); summed over outputs.

    Args:
        preds, targets: tensors in the unit's output order.
        unit: the unit name (unused; the `loss_fn` signature).
        channel_dims: the channel axis of each output (default: last).
    """
    total = preds[0].new_zeros((), dtype=torch.float32)
    for k, (p, t) in enumerate(zip(preds, targets, strict=True)):
        dim = -1 if channel_dims is None else channel_dims[k]
        total = total + (p.float() - t.float()).pow(2).sum(dim).mean()
    return total


def beta_at(step: int, cfg: ReconConfig) -> float | None:
    """The rounding regulariser's beta at `step`: None in warm-up, then beta[0] -> beta[1]."""
    start = int(cfg.warmup * cfg.iters)
    if step < start:
        return None
    rel = (step - start) / max(cfg.iters - start, 1)
    b0, b1 = cfg.beta
    return b1 + (b0 - b1) * max(0.0, 1.0 - rel)


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, Tensor) else value


def _mixed_inputs(xq: list, xfp: list, p: float, device: torch.device) -> list:
    """QDrop's input: where(u < p, x_q, x_fp) per element for float tensors (x_q when p = 1)."""
    out = []
    for a, b in zip(xq, xfp, strict=True):
        a = _to(a, device)
        if p < 1.0 and isinstance(a, Tensor) and a.is_floating_point():
            b = _to(b, device)
            a = torch.where(torch.rand_like(a) < p, a, b)
        out.append(a)
    return out


@torch.no_grad()
def unit_mse(unit: Unit, data: UnitData, device: torch.device) -> float | None:
    """Mean over items and outputs of the MSE of the unit on quantized inputs vs the targets
    (quantizers as they are; None where targets do not match the outputs' shapes)."""
    errs = []
    for xq, ys in zip(data.inputs_q, data.targets, strict=True):
        preds = unit(*[_to(x, device) for x in xq])
        if len(preds) != len(ys) or any(p.shape != y.shape for p, y in zip(preds, ys)):
            return None
        errs += [
            float((p.float() - _to(y, device).float()).pow(2).mean()) for p, y in zip(preds, ys)
        ]
    return float(np.mean(errs))


@dataclass
class UnitReport:
    """One unit's reconstruction. `loss_first` / `loss_last`: the mean reconstruction loss
    (without the rounding regulariser) over the first / last max(1, min(50, iters // 10)) steps;
    `loss_curve`: that loss at every step; `mse_before` / `mse_after`: the unit's output MSE
    against its targets on the gathered quantized inputs, with no QDrop, before and after (None
    when targets come from a `target_fn` whose shapes differ from the outputs)."""

    name: str
    part: str
    iters: int
    weights: int  # AdaRound weight quantizers
    activations: int  # LSQ activation quantizers
    loss_first: float | None
    loss_last: float | None
    mse_before: float | None
    mse_after: float | None
    seconds: float
    gather_seconds: float
    loss_curve: list[float] = field(default_factory=list)


@dataclass
class ReconReport:
    units: list[UnitReport] = field(default_factory=list)
    seconds: float = 0.0
    config: dict = field(default_factory=dict)

    def format_table(self) -> str:
        body = format_table(
            ("unit", "iters", "W", "A", "loss first", "loss last", "mse before", "mse after", "s"),
            (
                (
                    u.name,
                    u.iters,
                    u.weights,
                    u.activations,
                    _fmt(u.loss_first),
                    _fmt(u.loss_last),
                    _fmt(u.mse_before),
                    _fmt(u.mse_after),
                    f"{u.seconds:.1f}",
                )
                for u in self.units
            ),
        )
        return f"{body}\n{len(self.units)} units in {self.seconds:.1f} s"

    def to_dict(self) -> dict:
        return {
            "units": [dataclasses.asdict(u) for u in self.units],
            "seconds": self.seconds,
            "config": self.config,
        }


def _loss_window(iters: int) -> int:
    return max(1, min(50, iters // 10))


def optimise_unit(
    unit: Unit,
    data: UnitData,
    cfg: ReconConfig,
    *,
    loss_fn: LossFn | None = None,
    device: torch.device,
    label: str = "",
    progress: bool = True,
) -> tuple[int, int, int, float | None, float | None, list[float]]:
    """Run cfg.iters steps on one unit, then harden it. Returns (iters, weights, activations,
    loss_first, loss_last, the loss of every step). On exit, even by an exception, the unit's
    rounding is hard, its quantizers have drop_prob 1.0 and fixed scales."""
    rounding = []
    for _, q, w in unit.weight_quantizers:
        if q.enabled and isinstance(q, UniformQuantizer) and q.rounding == "nearest":
            rounding.append(q.enable_adaround(w))
    acts = [q for _, q in unit.act_quantizers if q.enabled]
    try:
        for q in acts:
            q.learn_scale(True)
            q.drop_prob = cfg.drop_prob
        groups = []
        if rounding:
            groups.append({"params": [q.alpha for q in rounding], "lr": cfg.lr_round})
        if acts:
            groups.append({"params": [q.scale for q in acts], "lr": cfg.lr_scale, "cosine": True})
        if not groups:
            return 0, 0, 0, None, None, []
        custom = loss_fn

        def loss_fn(p: list[Tensor], t: list[Tensor], name: str) -> Tensor:
            loss = None if custom is None else custom(p, t, name)
            return channel_sse(p, t, name, channel_dims=unit.channel_dims) if loss is None else loss

        opt = torch.optim.Adam(groups)
        window = _loss_window(cfg.iters)
        first = last = torch.zeros((), device=device)
        curve = torch.zeros(cfg.iters, device=device)  # no host sync per step
        bar = Progress(cfg.iters, progress, f"recon {label}", unit="steps")
        picks = torch.randint(len(data.inputs_q), (cfg.iters,)).tolist()
        for step, i in enumerate(picks):
            args = _mixed_inputs(data.inputs_q[i], data.inputs_fp[i], cfg.drop_prob, device)
            targets = [_to(t, device) for t in data.targets[i]]
            rec = loss_fn(unit(*args), targets, unit.name)
            loss = rec
            beta = beta_at(step, cfg)
            if rounding and beta is not None and cfg.round_weight > 0:
                reg = sum(q.rounding_loss(beta) for q in rounding)
                loss = rec + cfg.round_weight * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for group in opt.param_groups:
                if group.get("cosine"):
                    group["lr"] = (
                        cfg.lr_scale * 0.5 * (1 + math.cos(math.pi * (step + 1) / cfg.iters))
                    )
            curve[step] = rec.detach()
            if step < window:
                first = first + rec.detach()
            if step >= cfg.iters - window:
                last = last + rec.detach()
            done = step + 1
            if progress and (done == cfg.iters or time.perf_counter() - bar.last >= bar.every_s):
                bar.update(done, f"loss {float(rec.detach()):.4g}")
        return (
            cfg.iters,
            len(rounding),
            len(acts),
            float(first) / window,
            float(last) / window,
            curve.tolist(),
        )
    finally:
        for q in rounding:
            if q.rounding == "soft":
                q.harden()
        for _, q in unit.act_quantizers:
            q.drop_prob = 1.0
            if q.frozen:
                q.learn_scale(False)


# ---------------------------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------------------------


def _limit_prompts(item: CalibItem, k: int, rng: np.random.Generator) -> CalibItem:
    n = item.num_prompts
    if n <= k:
        return item
    keep = torch.as_tensor(np.sort(rng.choice(n, k, replace=False)), device=item.image.device)

    def pick(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.index_select(0, keep)

    return dataclasses.replace(
        item, boxes=pick(item.boxes), points=pick(item.points), point_labels=pick(item.point_labels)
    )


def _check_models(qmodel: torch.nn.Module, fp_model: torch.nn.Module) -> None:
    if fp_model is qmodel:
        raise ValueError("fp_model is qmodel; pass the FP capture (or a copy, quantizers disabled)")
    for part in PARTS:
        if not isinstance(getattr(qmodel, part, None), torch.fx.GraphModule):
            raise TypeError(
                f"qmodel.{part} is not a captured graph; pass samq_fx.quantize's result"
            )
    active = [n for n, m in fp_model.named_modules() if isinstance(m, Quantizer) and m.enabled]
    if active:
        raise ValueError(
            f"fp_model has {len(active)} enabled quantizers (e.g. {active[0]}); pass the FP "
            "capture, or a deep copy of qmodel with every quantizer's enabled = False"
        )
    try:
        assert_deployable(qmodel)
    except Exception as err:
        raise ValueError(f"reconstruct needs a calibrated, frozen qmodel: {err}") from err


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def reconstruct(
    qmodel: torch.nn.Module,
    fp_model: torch.nn.Module,
    items: Sequence[CalibItem],
    cfg: ReconConfig,
    *,
    loss_fn: LossFn | None = None,
    target_fn: TargetFn | None = None,
    units: Sequence[str] | None = None,
    cache_device: str | torch.device | None = None,
    progress: bool = True,
) -> ReconReport:
    """Reconstruct qmodel unit by unit (PTQ4SAM-L / QDrop), in place.

    Args:
        qmodel: a `QuantizedSam` from `samq_fx.quantize` (calibrated, frozen, deployable).
        fp_model: the same capture in full precision (see the module docstring).
        items: calibration items (`samq_fx.calib.prepare_calibration`); each step uses one,
            with at most `cfg.max_prompts` of its prompts (a seeded subset).
        cfg: `ReconConfig`: unit mode, iterations, learning rates, QDrop, regulariser, seed.
        loss_fn: `(preds, targets, unit_name) -> loss`; default `channel_sse`.
        target_fn: `(unit_name, item) -> targets`, replacing the FP unit outputs as targets.
        units: reconstruct only these units (names from `tag_blocks`); default all.
        cache_device: where gathered inputs/targets live between steps (default: the data's).
        progress: progress lines on stderr.

    Returns:
        A `ReconReport` (per unit: iterations, loss, MSE before/after, seconds).

    Example:
        >>> q = samq_fx.quantize(captured, loader, QuantConfig.preset("W4A4"))
        >>> report = reconstruct(q, captured, items, ReconConfig(iters=2000))
        >>> print(report.format_table())
    """
    if not isinstance(cfg, ReconConfig):
        raise TypeError(f"cfg must be a ReconConfig, got {type(cfg).__name__}")
    if not items:
        raise ValueError("reconstruct needs at least one calibration item")
    _check_models(qmodel, fp_model)
    start = time.perf_counter()
    device = items[0].image.device
    cache = None if cache_device is None else torch.device(cache_device)
    rng = np.random.default_rng(cfg.seed)
    items = [_limit_prompts(it, cfg.max_prompts, rng) for it in items]
    order = [(part, name) for part, names in tag_units(qmodel, cfg).items() for name in names]
    if units is not None:
        known = {name for _, name in order}
        unknown = [u for u in units if u not in known]
        if unknown:
            raise ValueError(f"unknown units {unknown}; units: {[n for _, n in order]}")
        order = [(p, n) for p, n in order if n in set(units)]
    report = ReconReport(config=cfg.to_dict())
    q_feed, fp_feed = ModelFeed(qmodel), ModelFeed(fp_model)
    try:
        with torch.random.fork_rng(devices=_rng_devices(device)), torch.inference_mode(False):
            for k, (part, name) in enumerate(order):
                t0 = time.perf_counter()
                torch.manual_seed(cfg.seed * 100_003 + k)
                unit = extract_unit(getattr(qmodel, part), name, part)
                data = gather(unit, q_feed, fp_feed, items, target_fn=target_fn, cache_device=cache)
                t_gather = time.perf_counter() - t0
                before = unit_mse(unit, data, device)
                with torch.enable_grad():
                    iters, n_w, n_a, first, last, curve = optimise_unit(
                        unit,
                        data,
                        cfg,
                        loss_fn=loss_fn,
                        device=device,
                        label=f"{k + 1}/{len(order)} {name}",
                        progress=progress,
                    )
                after = unit_mse(unit, data, device)
                if part == "image_encoder":
                    q_feed.embeddings.clear()  # the encoder changed: decoder inputs must follow
                row = UnitReport(
                    name=name,
                    part=part,
                    iters=iters,
                    weights=n_w,
                    activations=n_a,
                    loss_first=first,
                    loss_last=last,
                    mse_before=before,
                    mse_after=after,
                    seconds=time.perf_counter() - t0,
                    gather_seconds=t_gather,
                    loss_curve=curve,
                )
                report.units.append(row)
                if progress:
                    print(
                        f"recon {k + 1}/{len(order)} {name}: {iters} steps, loss "
                        f"{_fmt(first)} -> {_fmt(last)}, mse {_fmt(before)} -> {_fmt(after)}, "
                        f"{row.seconds:.1f} s",
                        file=sys.stderr,
                        flush=True,
                    )
                del unit, data
    finally:
        for module in qmodel.modules():
            if isinstance(module, Quantizer):
                module.drop_prob = 1.0
    assert_deployable(qmodel)
    report.seconds = time.perf_counter() - start
    return report


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


__all__ = [
    "ModelFeed",
    "ReconReport",
    "Span",
    "Unit",
    "UnitData",
    "UnitReport",
    "beta_at",
    "channel_sse",
    "extract_span",
    "extract_unit",
    "gather",
    "optimise_unit",
    "reconstruct",
    "record",
    "tag_units",
    "unit_mse",
]
