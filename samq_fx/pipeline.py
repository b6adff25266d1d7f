"""The pass runner: the one place that lists pass order.

Every pass is a plain function `(gm, ctx) -> PassResult` that edits `gm` in place. The runner
names each pass, lints the graph and recompiles after it, times it, records what it did, and
re-raises a failure as "while running 'X' after ['A', 'B']" so a broken pipeline says where.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.fx

from samq_fx.models import SamArch


@dataclass
class PassContext:
    """What a pass may read besides the graph: which part it is, the architecture, the config,
    and `state` for data one pass hands to a later one (calibration statistics, say)."""

    part: str
    arch: SamArch
    config: Any = None
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassResult:
    """What a pass did: counts a test can assert, candidates it rejected (name -> reason)."""

    counts: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class PassRecord:
    name: str
    part: str
    seconds: float
    result: PassResult

    def summary(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.result.counts.items())
        rejected = f", rejected={len(self.result.rejected)}" if self.result.rejected else ""
        return f"{self.part}: {self.name} ({counts}{rejected}) in {self.seconds * 1e3:.0f} ms"


GraphPass = Callable[[torch.fx.GraphModule, PassContext], PassResult]


class PassError(RuntimeError):
    pass


def run_passes(
    gm: torch.fx.GraphModule, ctx: PassContext, passes: Sequence[GraphPass]
) -> list[PassRecord]:
    """Run `passes` in order on `gm`; returns one record per pass (also kept on `gm`)."""
    records: list[PassRecord] = list(getattr(gm, "samq_pass_log", []))
    done = [r.name for r in records]
    for graph_pass in passes:
        name = graph_pass.__name__
        start = time.perf_counter()
        try:
            result = graph_pass(gm, ctx)
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
        except Exception as err:
            raise PassError(f"while running {name!r} on {ctx.part} after {done}: {err}") from err
        if not isinstance(result, PassResult):
            raise PassError(f"pass {name!r} returned {type(result).__name__}, not PassResult")
        records.append(PassRecord(name, ctx.part, time.perf_counter() - start, result))
        done.append(name)
    gm.samq_pass_log = records
    return records


def capture_passes() -> list[GraphPass]:
    """Passes that run on every freshly exported graph, in order."""
    from samq_fx.passes.annotate_roles import annotate_roles
    from samq_fx.passes.canonicalize import canonicalize

    return [canonicalize, annotate_roles]


def bimodal_passes(config: Any) -> list[GraphPass]:
    """PTQ4SAM's BIG: detect bimodal keys, fold their signs (before any weight observer)."""
    from samq_fx.passes.detect_bimodal import detect_bimodal
    from samq_fx.passes.fold_bimodal_signs import fold_bimodal_signs

    return [detect_bimodal, fold_bimodal_signs]


def calibrated_passes(config: Any) -> list[GraphPass]:
    """Passes that need calibrated quantizers in place: AGQ's base search, then SAQ-SAM's PCC
    (whose attention maps go through the log2 quantizers AGQ has set)."""
    from samq_fx.passes.install_pcc_clips import install_pcc_clips
    from samq_fx.passes.search_agq import search_agq

    passes: list[GraphPass] = []
    if config.agq is not None:
        passes.append(search_agq)
    if getattr(config, "pcc", None) is not None:
        passes.append(install_pcc_clips)
    return passes


def compensation_passes(config: Any) -> list[GraphPass]:
    """CAR-SAM's MAC: needs frozen activation quantizers; re-initialises the weight quantizers
    of the projections it corrects."""
    from samq_fx.passes.compensate_matmul import compensate_matmul

    return [compensate_matmul] if getattr(config, "mac", None) is not None else []


def quantize_passes(config: Any) -> list[GraphPass]:
    """Passes that turn a captured graph into a fake-quantized one, in order, for `config`."""
    from samq_fx.passes.insert_quantizers import insert_quantizers
    from samq_fx.passes.plan_quantization import plan_quantization

    return [plan_quantization, insert_quantizers]
