"""The verb: `quantize(sam, calib_loader, config)`, and `save` / `load` of its result.

    q = samq_fx.quantize(samq_fx.build_sam("tiny"), loader, samq_fx.QuantConfig.preset("W4A4"))
    SamPredictor(q).set_image(image)          # a drop-in Sam
    samq_fx.save(q, "tiny_w4a4.samq")

`quantize` never edits the user's model: it captures a copy, plans and inserts quantizers as
passes (`samq_fx.pipeline.quantize_passes`), calibrates weights from the weights themselves and
activations on the calibration images, freezes every quantizer, and checks that what it returns
quantizes exactly as deployment would (`assert_deployable`).

Order of the method parts: BIG folds signs into the FP weights before any observer; AGQ searches
once the uniform quantizers are frozen; MAC (CAR-SAM) then needs the activation grids fixed (it
compensates their error), adds its correction to the FP q/k/v weights of the decoder attentions
and re-initialises those weights' quantizers (activation ranges stay as calibrated); block
reconstruction (PTQ4SAM's units, or JCAR's joint-cross ones) runs last, against FP targets from
a copy taken before any quantizer, so MAC's correction never leaks into the targets.

A saved file holds tensors, quantizer state, the architecture, the config and the plan; no
pickled code. `load` rebuilds the module tree from the architecture, captures it, replays the
same passes from the config, checks the plan is the one saved, and loads the tensors: the result
computes bit for bit what the saved model computed.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from pathlib import Path

import torch
from segment_anything.modeling import Sam

from samq_fx.calib import prepare_calibration, run_calibration, validate_loader
from samq_fx.capture import CapturedSam, capture
from samq_fx.config import QuantConfig
from samq_fx.meta import get_info
from samq_fx.models import SamArch, arch_of, sam_from_arch
from samq_fx.passes.insert_quantizers import weight_quantizer_inputs
from samq_fx.passes.plan_quantization import check_overrides_matched
from samq_fx.pipeline import (
    PassContext,
    bimodal_passes,
    calibrated_passes,
    compensation_passes,
    quantize_passes,
    run_passes,
)
from samq_fx.quantizers import Log2Quantizer, Quantizer, assert_deployable
from samq_fx.serial import load_tensors

FORMAT = "samq-fx"
FORMAT_VERSION = 1
PARTS = ("image_encoder", "mask_decoder")


class QuantizedSam(CapturedSam):
    """A captured `Sam` with fake quantizers in its graphs; `samq_config` says how."""

    samq_config: QuantConfig


class SaveFileError(ValueError):
    """A saved model that cannot be loaded: not ours, another format version, truncated."""


def _run_on_parts(model: CapturedSam, cfg: QuantConfig, passes, state: dict | None = None) -> dict:
    """Run `passes` on both graphs; one `state` dict is shared by the two contexts."""
    state = {} if state is None else state
    for part in PARTS:
        ctx = PassContext(part=part, arch=model.samq_arch, config=cfg, state=state)
        run_passes(getattr(model, part), ctx, passes)
    return state


def _prepare_graphs(model: CapturedSam, cfg: QuantConfig) -> None:
    """Plan and insert quantizers in both graphs (the part `load` replays)."""
    hits = [0] * len(cfg.overrides)
    _run_on_parts(model, cfg, quantize_passes(cfg), {"override_hits": hits})
    seen_roles: set[str] = set()
    for part in PARTS:
        for node in getattr(model, part).graph.nodes:
            info = get_info(node)
            if info is not None and info.quant and info.role:
                seen_roles.add(info.role)
    check_overrides_matched(cfg, hits, seen_roles)


def _as_quantized(captured: CapturedSam) -> QuantizedSam:
    captured.__class__ = QuantizedSam
    return captured


def quantizers(model: torch.nn.Module) -> dict[str, Quantizer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Quantizer)}


@torch.no_grad()
def calibrate_weights(model: torch.nn.Module) -> int:
    n = 0
    for part in PARTS:
        for quantizer, weight in weight_quantizer_inputs(getattr(model, part)):
            quantizer(weight)
            quantizer.freeze()
            n += 1
    return n


def quantize(
    sam: Sam,
    calib_loader,
    config: QuantConfig | None = None,
    *,
    progress: bool = True,
    process_group=None,
) -> QuantizedSam:
    """Quantize a SAM post-training.

    Args:
        sam: a `Sam` (eager or `samq_fx.capture`d). Not modified.
        calib_loader: iterable of calibration samples (see `samq_fx.calib`): images as H x W x 3
            uint8 arrays or paths, optionally with "boxes" / "points" prompts.
        config: a `QuantConfig` (default W8A8 MSE); `QuantConfig.preset("W4A4")` for presets.
        progress: print progress lines on stderr.
        process_group: a `torch.distributed` group of several ranks (e.g. `dist.group.WORLD`
            under torchrun) to shard calibration over: every rank passes the same loader, feeds
            its share of the images through the observers, and the statistics are combined
            across ranks. The later steps (AGQ's search, reconstruction) run on every rank with
            the same data and rank 0's result is broadcast, so all ranks return the same model.

    Returns:
        A `QuantizedSam`: drop-in for `Sam` (SamPredictor accepts it).

    Example:
        >>> q = quantize(build_sam("tiny"), [{"image": img}], QuantConfig(w_bits=4, a_bits=4))
    """
    cfg = config or QuantConfig()
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(cfg).__name__}")
    if isinstance(sam, QuantizedSam):
        raise ValueError("this model is already quantized; pass the full-precision Sam")
    if not isinstance(sam, Sam):
        raise TypeError(f"quantize expects a segment_anything Sam, got {type(sam).__name__}")
    start = time.perf_counter()
    raws = validate_loader(calib_loader, cfg.calib)  # bad input fails before any work
    model = copy.deepcopy(sam) if isinstance(sam, CapturedSam) else capture(sam)
    items = prepare_calibration(model, raws, cfg.calib, progress)
    data = {"model": model, "calib_items": items}
    if cfg.bimodal is not None:  # folds into FP weights, before any weight observer
        _run_on_parts(model, cfg, bimodal_passes(cfg), data)
    fp_model = copy.deepcopy(model) if cfg.recon is not None else None
    _prepare_graphs(model, cfg)
    model = _as_quantized(model)
    calibrate_weights(model)
    group = _shard_group(process_group)
    run_calibration(model, items, progress, group=group)
    _freeze(model, skip_log2=cfg.agq is not None)
    if calibrated_passes(cfg):  # log2 quantizers pass values through until AGQ sets them
        _run_on_parts(model, cfg, calibrated_passes(cfg), data)
    _freeze(model)
    if cfg.mac is not None:  # activation grids fixed: fold MAC into FP weights, re-init their grids
        _run_on_parts(model, cfg, compensation_passes(cfg), data)
    if cfg.recon is not None:
        from samq_fx.recon import reconstruct

        par = contextlib.nullcontext()
        if cfg.par is not None:
            from samq_fx.par import PromptAwareLoss

            par = PromptAwareLoss(model, fp_model, cfg.par)
        with par:
            plugins = {} if cfg.par is None else {"loss_fn": par.loss, "target_fn": par.targets}
            model.samq_recon = reconstruct(
                model, fp_model, items, cfg.recon, progress=progress, **plugins
            )
    if group is not None:
        _broadcast_state(model, group)
    assert_deployable(model)
    model.samq_config = cfg
    model.samq_calibration = {
        "image_ids": [it.image_id for it in items],
        "num_prompts": sum(it.num_prompts for it in items),
        "seconds": time.perf_counter() - start,
    }
    return model.eval()


def _shard_group(group):
    if group is None:
        return None
    import torch.distributed as dist

    return group if dist.get_world_size(group) > 1 else None


def _broadcast_state(model: torch.nn.Module, group) -> None:
    """Overwrite every rank's tensors with rank 0's, in place."""
    import torch.distributed as dist

    src = dist.get_global_rank(group, 0)
    for value in model.state_dict(keep_vars=True).values():
        if isinstance(value, torch.Tensor):
            dist.broadcast(value.data, src=src, group=group)


def _freeze(model: torch.nn.Module, skip_log2: bool = False) -> None:
    for quantizer in quantizers(model).values():
        if not (skip_log2 and isinstance(quantizer, Log2Quantizer)):
            quantizer.freeze()


def _plan_of(model: torch.nn.Module) -> dict[str, dict]:
    plan = {}
    for part in PARTS:
        for node in getattr(model, part).graph.nodes:
            info = get_info(node)
            if info is not None and info.quant and info.role is not None:
                plan[f"{part}:{node.name}"] = dict(info.quant)
    return plan


def save(model: QuantizedSam, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a quantized model: tensors, quantizer state, architecture, config, plan.

    A lowered model (`samq_fx.lower`) is written as the quantized model it was lowered from plus
    the lowering recipe; `load` lowers it again (kernel layouts belong to the loading device).
    """
    lowering = getattr(model, "samq_lowering", None)
    if lowering is not None:
        model = model.__dict__["_samq_source"]
    if not isinstance(model, QuantizedSam):
        raise TypeError(
            f"save expects a QuantizedSam (from samq_fx.quantize), got {type(model).__name__}"
        )
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --force) to replace it")
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "arch": model.samq_arch.to_dict(),
        "config": model.samq_config.to_dict(),
        "plan": _plan_of(model),
        "calibration": dict(model.samq_calibration),
        "lowering": None if lowering is None else lowering.to_dict(),
        "state_dict": {
            k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
            for k, v in model.state_dict().items()
        },
    }
    tmp = path.with_name(path.name + ".partial")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def _read(path: Path) -> dict:
    if not path.is_file():
        raise SaveFileError(f"{path} does not exist")
    payload = load_tensors(path, SaveFileError, "a samq-fx quantized model")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SaveFileError(f"{path} is not a samq-fx quantized model")
    if payload.get("version") != FORMAT_VERSION:
        raise SaveFileError(
            f"{path} has format version {payload.get('version')!r}; this samq-fx reads version "
            f"{FORMAT_VERSION}: quantize the model again with this version"
        )
    return payload


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> QuantizedSam:
    """Load a model written by `save`; it computes exactly what the saved model computed (a
    lowered model is lowered again, on `map_location`, with its saved recipe)."""
    path = Path(path)
    payload = _read(path)
    arch = SamArch.from_dict(payload["arch"])
    cfg = QuantConfig.from_dict(payload["config"])
    model = capture(sam_from_arch(arch))
    _prepare_graphs(model, cfg)
    model = _as_quantized(model)
    if _plan_of(model) != payload["plan"]:
        raise SaveFileError(
            f"{path}: the quantization plan replayed from its config differs from the saved one "
            "(saved by an incompatible samq-fx?)"
        )
    model.load_state_dict(payload["state_dict"], strict=True)
    model.samq_config = cfg
    model.samq_arch = arch
    model.samq_calibration = payload.get("calibration", {})
    assert_deployable(model)
    model = model.to(map_location).eval()
    if payload.get("lowering") is not None:
        from samq_fx.lower import LowerConfig, lower

        cfg = LowerConfig.from_dict(payload["lowering"])
        options = {f: v for f, v in cfg.to_dict().items() if f != "backend"}
        model = lower(model, cfg.backend, **options, verbose=False)
    return model


__all__ = ["QuantizedSam", "SaveFileError", "arch_of", "load", "quantize", "save"]
