"""Fake quantizers: the modules the quantize engine inserts into SAM's FX graph.

Each quantizer is a `call_module` node. The PTQ4SAM / SAQ-SAM framework (docs papers.md §0-§2)
needs two kinds:

- `UniformQuantizer`: weights (per output channel, asymmetric, MSE-searched range, AdaRound) and
  activations (per tensor, asymmetric, LSQ-learnable step size). Per-group exists for torchao's
  int4 weight layout.
- `Log2Quantizer`: PTQ4SAM's AGQ quantizer for post-softmax probabilities, with a searched base
  2^(1/tau).

Every quantizer walks the same states, and nothing is decided behind the caller's back:

    observing --freeze() / set_clip() / set_agq()--> frozen --reset()--> observing

While observing, `forward` records statistics and returns x unchanged (calibration). Once frozen,
it fake-quantizes: x -> dequantize(quantize(x)), with straight-through gradients. `enabled=False`
makes a frozen quantizer return x (FP, for mixed precision and ablations).

`drop_prob` is QDrop's probability of quantizing each element. Block reconstruction sets it to
0.5. Evaluation needs 1.0: the reference repos left 0.5 on every layer input at test time
(papers.md §5.1), which made their learned rows look better than they are. `assert_deployable`
checks a whole model for that, for soft AdaRound rounding left on (§5.2), and for quantizers never
calibrated.

Lowering reads `qparams()`: (scale, zero_point, qmin, qmax) with scale float32 and zero_point
int32, shaped () per tensor, (C,) per channel, and x.shape[:-1] + (K // group_size,) per group
(torchao's (rows, groups) int4 layout). `quantize_tensor` / `dequantize` take exactly these, so the
lowering and the fake quant share one definition of the integer grid.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from samq_fx.serial import strict_from_dict

GRANULARITIES = ("tensor", "channel", "group")
OBSERVERS = ("minmax", "percentile", "mse")
LOG2_TAUS = (1, 2, 4)

# Smallest step size: keeps constant (e.g. all-zero) tensors quantizable instead of dividing by 0.
_MIN_SCALE = 1e-10
# Percentile and MSE observers look at most this many values per quantization row and batch
# (a seeded sample), bounding their cost on 4096-token activations; SAM weight rows are smaller.
SAMPLE_CAP = 2**20
# The MSE search evaluates ~28 candidate ranges; 2^16 sampled values per row pin its optimum.
MSE_SAMPLE_CAP = 2**16
# AGQ's floor for log2 of a probability (papers.md §1.2).
_LOG2_FLOOR = 1e-20


class QParams(NamedTuple):
    """What lowering needs: codes q = clamp(round(x / scale) + zero_point, qmin, qmax)."""

    scale: Tensor
    zero_point: Tensor
    qmin: int
    qmax: int


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Args:
        bits: 2..8.
        symmetric: zero_point 0 and a signed grid [-2^(b-1), 2^(b-1)-1]; else an integer
            zero_point in [0, 2^b-1] and the grid [0, 2^b-1].
        granularity: "tensor", "channel" (one scale per index of `ch_axis`) or "group" (groups
            of `group_size` consecutive values along the last dim, per row, as torchao int4).
            Qparams take the observed tensor's leading shape, so "group" suits weights, whose
            shape is fixed, not activations, whose batch varies.
        ch_axis: the channel axis for "channel"; negative values count from the end.
        group_size: required for "group", and only allowed there.
        observer: "minmax" (running min/max), "percentile" (per-batch quantiles, averaged) or
            "mse" (per-batch Lp-optimal clip among `search_steps` shrinks of min-max, averaged).
        percentile: the quantile kept by the percentile observer, in (0.5, 1].
        lp_norm: the p of the MSE observer's |x_hat - x|^p error; 2.4 as in PTQ4SAM/QDrop.
        search_steps: how many shrink factors k / steps (k = 1..steps) the MSE observer tries.

    Example:
        >>> QuantSpec(bits=4, granularity="channel", observer="mse").to_dict()["bits"]
        4
    """

    bits: int
    symmetric: bool = False
    granularity: str = "tensor"
    ch_axis: int = 0
    group_size: int | None = None
    observer: str = "minmax"
    percentile: float = 0.9999
    lp_norm: float = 2.4
    search_steps: int = 100

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity {self.granularity!r} not in {GRANULARITIES}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer {self.observer!r} not in {OBSERVERS}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(
                    f"granularity='group' needs a positive int group_size, got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"group_size={self.group_size} is only used with granularity='group', "
                f"not {self.granularity!r}"
            )
        if not 0.5 < self.percentile <= 1.0:
            raise ValueError(f"percentile must be in (0.5, 1], got {self.percentile}")
        if self.lp_norm <= 0 or self.search_steps < 1:
            raise ValueError(
                f"need lp_norm > 0 and search_steps >= 1, got {self.lp_norm}, {self.search_steps}"
            )

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        return strict_from_dict(cls, d)


def _check_bits(bits: object) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")


# ---------------------------------------------------------------------------------------------
# Pure helpers: the integer grid, shared by the fake quant, the observers and the lowering.
# ---------------------------------------------------------------------------------------------


def _broadcast(x: Tensor, t: Tensor, ch_axis: int | None, group_size: int | None):
    """View x, and a compact qparam tensor t, so that t broadcasts over the view.

    Compact shapes: () per tensor, (C,) per channel along ch_axis, x.shape[:-1] + (groups,) per
    group. Returns (x_view, t_view); reshape results back with `.reshape(x.shape)`.
    """
    if group_size is not None:
        if x.shape[-1] % group_size:
            raise ValueError(f"last dim {x.shape[-1]} is not a multiple of group_size {group_size}")
        x_view = x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
        return x_view, t.unsqueeze(-1)
    if ch_axis is not None and t.dim() == 1:
        shape = [1] * x.dim()
        shape[ch_axis] = -1
        return x, t.reshape(shape)
    return x, t


def quantize_tensor(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    *,
    ch_axis: int | None = None,
    group_size: int | None = None,
) -> Tensor:
    """Integer codes clamp(round(x / scale) + zero_point, qmin, qmax), in x's float dtype.

    Args:
        x: the tensor.
        scale, zero_point: compact qparams as `qparams()` returns them (see `_broadcast`).
        qmin, qmax: the integer range.
        ch_axis: the channel axis when scale is per channel.
        group_size: the group size when scale is per group (groups along the last dim).

    Returns:
        integer-valued codes with x's shape; cast with `.to(torch.int8)` etc. for storage.
        Rounding is torch.round (half to even).
    """
    x_view, s = _broadcast(x, scale, ch_axis, group_size)
    _, z = _broadcast(x, zero_point.to(x.dtype), ch_axis, group_size)
    q = torch.clamp(torch.round(x_view / s) + z, qmin, qmax)
    return q.reshape(x.shape)


def dequantize(
    q: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    *,
    ch_axis: int | None = None,
    group_size: int | None = None,
) -> Tensor:
    """(q - zero_point) * scale, with `quantize_tensor`'s qparam layouts."""
    q = q.to(scale.dtype)
    q_view, s = _broadcast(q, scale, ch_axis, group_size)
    _, z = _broadcast(q, zero_point.to(q.dtype), ch_axis, group_size)
    return ((q_view - z) * s).reshape(q.shape)


def log2_fake_quantize(a: Tensor, scale: Tensor | float, tau: int, bits: int) -> Tensor:
    """AGQ's log2 fake quant of probabilities (papers.md §1.2), without gradient tricks.

    a_int = round(-tau * log2(max(a, 1e-20) / s)); a_hat = s * 2^(-clamp(a_int, 0, L-1) / tau),
    and a_hat = 0 where a_int >= L (L = 2^bits). Values above s saturate to s. The AGQ search
    can call this on candidate (s, tau) without touching the module.
    """
    return _log2_core(
        a, torch.as_tensor(scale, dtype=a.dtype, device=a.device), tau, bits, torch.round
    )


def _log2_core(a: Tensor, s: Tensor, tau: int, bits: int, round_fn) -> Tensor:
    levels = 2**bits
    a_int = round_fn(-tau * torch.log2(a.clamp(min=_LOG2_FLOOR) / s))
    a_hat = s * torch.exp2(-_clamp(a_int, 0, levels - 1) / tau)
    return torch.where(a_int >= levels, torch.zeros_like(a_hat), a_hat)


def _range_to_qparams(lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool):
    """(scale, zero_point) whose grid covers [lo, hi] and always contains 0.

    Asymmetric, as PCC writes it: s = (max(hi,0) - min(lo,0)) / (qmax - qmin),
    z = clamp(qmin - round(min(lo,0) / s), qmin, qmax). Symmetric: s = max(|lo|, |hi|) / qmax,
    z = 0, so every observed value's code lies in [-qmax, qmax] and fq(-x) = -fq(x) there.
    """
    if symmetric:
        scale = (torch.maximum(-lo, hi).clamp(min=0) / qmax).clamp(min=_MIN_SCALE)
        return scale, torch.zeros_like(scale)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=_MIN_SCALE)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero_point


class _RoundSTE(torch.autograd.Function):
    """round forward, identity backward. A Function rather than `(round(x) - x).detach() + x`,
    whose forward is off the integer by an ulp: outputs then leave the grid, and clamp's
    gradient at qmin/qmax depends on which way the ulp fell."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _GradScale(torch.autograd.Function):
    """Identity forward (exactly), gradient times g backward: LSQ's step-size gradient scale."""

    @staticmethod
    def forward(ctx, t: Tensor, g: float) -> Tensor:
        ctx.g = g
        return t.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.g, None


def _round_ste(x: Tensor) -> Tensor:
    return _RoundSTE.apply(x)


def _grad_scale(t: Tensor, g: float) -> Tensor:
    return _GradScale.apply(t, g)


def _clamp(q: Tensor, qmin: int, qmax: int) -> Tensor:
    """clamp whose gradient passes for q in [qmin, qmax], bounds included.

    torch.clamp's gradient is 0 at a bound given as a number (0.5 given as a tensor), so a value
    that merely rounds to qmax would lose its gradient and get LSQ's "clipped" step gradient.
    """
    return torch.where(q < qmin, qmin, torch.where(q > qmax, qmax, q))


# ---------------------------------------------------------------------------------------------
# Observers: each batch becomes a (lo, hi) per quantization row.
# ---------------------------------------------------------------------------------------------


def _version_of(x: Tensor) -> int | None:
    """x's in-place version counter; None for inference-mode tensors, which have none."""
    try:
        return x._version
    except RuntimeError:
        return None


def _sample_columns(rows: Tensor, cap: int) -> Tensor:
    """At most `cap` columns of a (G, n) matrix, drawn with a fixed seed.

    A seeded random sample instead of a stride: a stride over a flattened (B, T, C) activation can
    alias with C and see only a few channels, missing exactly the outlier channels that matter.
    """
    n = rows.shape[1]
    if n <= cap:
        return rows
    gen = torch.Generator().manual_seed(n)
    idx = torch.randint(n, (cap,), generator=gen).to(rows.device)
    return rows.index_select(1, idx)


def _percentile_range(rows: Tensor, p: float, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Per row, the p-quantile of |x| (symmetric) or the (1-p, p) quantiles of x, by kthvalue."""
    n = rows.shape[1]
    k_hi = min(max(math.ceil(p * n), 1), n)
    if symmetric:
        amax = rows.abs().kthvalue(k_hi, dim=1).values
        return -amax, amax
    k_lo = n - k_hi + 1
    return rows.kthvalue(k_lo, dim=1).values, rows.kthvalue(k_hi, dim=1).values


def _mse_range(rows: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Per row, the shrink k/steps * [min, max] with the smallest sum |fq(x) - x|^p.

    Coarse to fine: every `stride`-th factor first (about 20), then every factor within a stride
    of each row's best, so 100 steps cost about 28 evaluations. Shrink factor 1 (plain min-max)
    is a coarse candidate, so the result is never worse than min-max on the values searched.
    Ties keep the smaller factor (the harder clip), as PCC does.
    """
    lo, hi = rows.amin(1), rows.amax(1)
    rows = _sample_columns(rows, MSE_SAMPLE_CAP)
    steps = spec.search_steps
    stride = max(1, steps // 20)
    best_err = torch.full_like(lo, math.inf)
    best_k = torch.full_like(lo, float(steps))

    def consider(k: Tensor) -> None:
        nonlocal best_err, best_k
        c_lo, c_hi = lo * (k / steps), hi * (k / steps)
        s, z = _range_to_qparams(c_lo, c_hi, spec.qmin, spec.qmax, spec.symmetric)
        s, z = s.unsqueeze(1), z.unsqueeze(1)
        x_hat = (torch.clamp(torch.round(rows / s) + z, spec.qmin, spec.qmax) - z) * s
        err = (x_hat - rows).abs().pow(spec.lp_norm).sum(1)
        better = (err < best_err) | ((err == best_err) & (k < best_k))
        best_err = torch.where(better, err, best_err)
        best_k = torch.where(better, k, best_k)

    for k in range(steps, 0, -stride):
        consider(torch.full_like(lo, float(k)))
    centre = best_k.clone()
    for d in range(-stride + 1, stride):
        if d:
            consider((centre + d).clamp(1, steps))
    return lo * (best_k / steps), hi * (best_k / steps)


# ---------------------------------------------------------------------------------------------
# The shared state machine.
# ---------------------------------------------------------------------------------------------


class Quantizer(nn.Module):
    """What every quantizer shares, so passes and drivers can treat them alike.

    Attributes:
        enabled: False makes a frozen quantizer return x unchanged (FP).
        drop_prob: QDrop's probability of quantizing each element; 1.0 (always) is the only
            deployable value.
        observing / frozen: the state (see the module docstring).

    Subclasses implement `_observe`, `_has_data`, `_install_from_observer`, `_fake_quant`,
    `_clear` and `qparams`, and extend `get_extra_state` / `set_extra_state`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True
        self._drop_prob = 1.0
        self._state = "observing"

    @property
    def observing(self) -> bool:
        return self._state == "observing"

    @property
    def frozen(self) -> bool:
        return self._state == "frozen"

    @property
    def drop_prob(self) -> float:
        return self._drop_prob

    @drop_prob.setter
    def drop_prob(self, p: float) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {p}")
        self._drop_prob = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            with torch.no_grad():
                self._observe(x)
            return x
        if not self.enabled:
            return x
        x_q = self._fake_quant(x)
        if self._drop_prob < 1.0:
            x_q = torch.where(torch.rand_like(x_q) < self._drop_prob, x_q, x)
        return x_q

    def freeze(self) -> Quantizer:
        """Fix the qparams from the statistics observed so far and start quantizing.

        Freezing a frozen quantizer does nothing, so a calibration loop may freeze every
        quantizer after PCC has already fixed some with `set_clip`.
        """
        if self.frozen:
            return self
        if not self._has_data():
            raise RuntimeError(
                f"{type(self).__name__}.freeze(): no data observed; run calibration batches "
                "through it first (or use set_clip / set_agq)"
            )
        self._install_from_observer()
        self._state = "frozen"
        return self

    def reset(self) -> Quantizer:
        """Back to observing, forgetting statistics and qparams; keeps spec, enabled, drop_prob."""
        self._clear()
        self._state = "observing"
        return self

    def learn_scale(self, flag: bool = True) -> Quantizer:
        """Make `scale` trainable (LSQ) or fixed. Build optimizers after this call."""
        if not self.frozen:
            raise RuntimeError(f"{type(self).__name__}.learn_scale(): freeze() first")
        self.scale.requires_grad_(flag)
        return self

    def deployment_problems(self) -> list[str]:
        """Why this quantizer would not compute what deployment computes; [] when fine."""
        problems = []
        if self.observing:
            problems.append("not calibrated (still observing; call freeze())")
        if self._drop_prob != 1.0:
            problems.append(f"drop_prob={self._drop_prob} (evaluation needs 1.0)")
        return problems

    def get_extra_state(self) -> dict:
        return {"state": self._state, "enabled": self.enabled, "drop_prob": self._drop_prob}

    def set_extra_state(self, state: dict) -> None:
        self._state = state["state"]
        self.enabled = state["enabled"]
        self.drop_prob = state["drop_prob"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # qparams are shaped by the data (C channels, G groups) and AdaRound tensors exist only
        # in some modes: adopt the saved shapes so a fresh quantizer can load a calibrated one.
        for name in [*self._parameters, *self._buffers]:
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if saved is not None and (current is None or current.shape != saved.shape):
                fresh = torch.empty_like(saved)
                if name in self._parameters:
                    grad = current is not None and current.requires_grad
                    self._parameters[name] = nn.Parameter(fresh, requires_grad=grad)
                else:
                    self._buffers[name] = fresh
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Uniform (integer-grid) quantizer.
# ---------------------------------------------------------------------------------------------


class UniformQuantizer(Quantizer):
    """Uniform fake quantizer with min-max / percentile / MSE observers, LSQ, AdaRound, PCC clip.

    States: observing -> frozen (by `freeze()` or `set_clip()`). Weight rounding, orthogonal to
    the state: "nearest" (default), "soft" (`enable_adaround`, during reconstruction) and "hard"
    (`harden()`, permanent and deployable).

    Observers reduce each batch to a (lo, hi) per row of quantization (tensor, channel or group).
    min-max keeps the running min and max. percentile and mse average the per-batch ranges over
    batches, as the references do for activations ("MSE, averaged over images"); a weight is one
    batch, so for weights the search is exact. Observing the same unchanged tensor again (a
    weight seen on every calibration batch) is skipped, so the MSE search runs once per weight.

    Example:
        >>> q = UniformQuantizer(QuantSpec(bits=4, granularity="channel", observer="mse"))
        >>> w = torch.randn(8, 16)
        >>> _ = q(w)                      # observe
        >>> w_hat = q.freeze()(w)         # fake-quantize
        >>> q.qparams().scale.shape
        torch.Size([8])
    """

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("clip_lo", None)
        self.register_buffer("clip_hi", None)
        self.register_parameter("alpha", None)
        self.register_buffer("hard_round", None)
        self._rounding = "nearest"
        self._clear_observer()

    # -- layout ---------------------------------------------------------------------------

    @property
    def qmin(self) -> int:
        return self.spec.qmin

    @property
    def qmax(self) -> int:
        return self.spec.qmax

    @property
    def rounding(self) -> str:
        """One of "nearest", "soft" (AdaRound learning) or "hard" (AdaRound decided)."""
        return self._rounding

    def _axis(self, x: Tensor) -> int | None:
        if self.spec.granularity != "channel":
            return None
        if not -x.dim() <= self.spec.ch_axis < x.dim():
            raise ValueError(f"ch_axis {self.spec.ch_axis} out of range for shape {tuple(x.shape)}")
        return self.spec.ch_axis % x.dim()

    def _compact_shape(self, x: Tensor) -> tuple[int, ...]:
        if self.spec.granularity == "tensor":
            return ()
        if self.spec.granularity == "channel":
            return (x.shape[self._axis(x)],)
        if x.shape[-1] % self.spec.group_size:
            raise ValueError(
                f"last dim {x.shape[-1]} is not a multiple of group_size {self.spec.group_size}"
            )
        return (*x.shape[:-1], x.shape[-1] // self.spec.group_size)

    def _rows(self, x: Tensor) -> Tensor:
        """x as a (G, n) float32 matrix, one row per scale, in the compact layout's order."""
        x = x.detach().float()
        if self.spec.granularity == "tensor":
            return x.reshape(1, -1)
        if self.spec.granularity == "channel":
            return x.movedim(self._axis(x), 0).reshape(x.shape[self._axis(x)], -1)
        return x.reshape(-1, self.spec.group_size)

    # -- observing ------------------------------------------------------------------------

    def _clear_observer(self) -> None:
        self.register_buffer("obs_lo", None, persistent=False)
        self.register_buffer("obs_hi", None, persistent=False)
        self._obs_batches = 0
        self._last_seen: tuple | None = None

    def _observe(self, x: Tensor) -> None:
        version = _version_of(x)
        if self._last_seen is not None and self._last_seen[0]() is x:
            if version is not None and self._last_seen[1] == version:
                return
        self._last_seen = (weakref.ref(x), version)
        lo, hi = self._batch_range(self._rows(x))
        shape = self._compact_shape(x)
        lo, hi = lo.reshape(shape), hi.reshape(shape)
        if self.obs_lo is None:
            self.obs_lo, self.obs_hi = lo, hi
        elif self.obs_lo.shape != lo.shape:
            raise ValueError(
                f"observed qparam shape {tuple(lo.shape)} differs from earlier batches' "
                f"{tuple(self.obs_lo.shape)} ({self.spec.granularity} granularity)"
            )
        elif self.spec.observer == "minmax":
            self.obs_lo, self.obs_hi = (
                torch.minimum(self.obs_lo, lo),
                torch.maximum(self.obs_hi, hi),
            )
        else:
            self.obs_lo, self.obs_hi = self.obs_lo + lo, self.obs_hi + hi
        self._obs_batches += 1

    def _batch_range(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        if self.spec.observer == "minmax":
            return rows.amin(1), rows.amax(1)
        if self.spec.observer == "percentile":
            rows = _sample_columns(rows, SAMPLE_CAP)
            return _percentile_range(rows, self.spec.percentile, self.spec.symmetric)
        return _mse_range(rows, self.spec)

    def _has_data(self) -> bool:
        return self._obs_batches > 0

    def compute_qparams(self) -> tuple[Tensor, Tensor]:
        """(scale, zero_point) from the statistics so far, without changing any state."""
        if not self._has_data():
            raise RuntimeError(f"{type(self).__name__}: no data observed")
        lo, hi = self.obs_lo, self.obs_hi
        if self.spec.observer != "minmax":
            lo, hi = lo / self._obs_batches, hi / self._obs_batches
        return _range_to_qparams(lo, hi, self.qmin, self.qmax, self.spec.symmetric)

    def _install_from_observer(self) -> None:
        self._install(*self.compute_qparams())

    def all_reduce_observer(self, group) -> None:
        """Combine this observer's statistics with the other ranks' (sharded calibration):
        min / max for min-max, sums and batch counts for the averaging observers."""
        import torch.distributed as dist

        if self.obs_lo is None:
            raise RuntimeError(f"{self}: this rank observed nothing; give every rank data")
        lo, hi = self.obs_lo.clone(), self.obs_hi.clone()
        count = torch.tensor([float(self._obs_batches)], device=lo.device)
        if self.spec.observer == "minmax":
            dist.all_reduce(lo, dist.ReduceOp.MIN, group=group)
            dist.all_reduce(hi, dist.ReduceOp.MAX, group=group)
        else:
            dist.all_reduce(lo, group=group)
            dist.all_reduce(hi, group=group)
        dist.all_reduce(count, group=group)
        self.obs_lo, self.obs_hi, self._obs_batches = lo, hi, int(count.item())

    def _install(self, scale: Tensor, zero_point: Tensor) -> None:
        # Ordinary tensors even when calibration runs under torch.inference_mode, so that LSQ
        # can later set requires_grad on the scale.
        with torch.inference_mode(False):
            self.scale = nn.Parameter(scale.detach().float().clone(), requires_grad=False)
            self.zero_point = zero_point.detach().float().clone()

    # -- fixed clip (PCC) -----------------------------------------------------------------

    def set_clip(self, lo: float | Tensor, hi: float | Tensor) -> UniformQuantizer:
        """Fix qparams from clip bounds (SAQ-SAM PCC) and freeze, whatever was observed.

        Args:
            lo, hi: floats, or tensors in the compact qparam shape.

        The grid then spans [min(lo,0), max(hi,0)] up to half a step (z is rounded). The bounds
        stay in `clip_lo` / `clip_hi` for lowering: a dynamic int8 kernel recomputes ranges and
        would erase the clip, so lowering must clamp explicitly or use these static scales.
        """
        lo_t = torch.as_tensor(lo, dtype=torch.float32, device=self.scale.device)
        hi_t = torch.as_tensor(hi, dtype=torch.float32, device=self.scale.device)
        if bool((lo_t > hi_t).any()):
            raise ValueError(f"set_clip needs lo <= hi, got lo={lo}, hi={hi}")
        self._install(*_range_to_qparams(lo_t, hi_t, self.qmin, self.qmax, self.spec.symmetric))
        with torch.inference_mode(False):
            self.clip_lo, self.clip_hi = lo_t.clone(), hi_t.clone()
        self._state = "frozen"
        return self

    # -- AdaRound ---------------------------------------------------------------------------

    def enable_adaround(self, weight: Tensor) -> UniformQuantizer:
        """Start learning the rounding of `weight` (AdaRound): soft mode.

        alpha is initialised so that h(alpha) = frac(W/s), h = clamp(1.2 sigmoid(alpha) - 0.1,
        0, 1), so the soft weight floor(W/s) + h starts at W itself. The sign of alpha is then
        forced to agree with frac >= 0.5, so that `harden()` before any training gives exactly
        floor(W/s) + 1[frac(W/s) >= 0.5] (round half up), free of sigmoid round-off at ties.
        """
        if not self.frozen:
            raise RuntimeError("enable_adaround(): freeze() the weight quantizer first")
        if self._rounding == "hard":
            raise RuntimeError("enable_adaround(): rounding was already hardened")
        ratio = self._ratio(weight.detach().float())
        frac = ratio - torch.floor(ratio)
        alpha = -torch.log(1.2 / (frac + 0.1) - 1.0)
        alpha = torch.where(frac >= 0.5, alpha.clamp(min=0.0), alpha.clamp(max=-1e-6))
        self.alpha = nn.Parameter(alpha.reshape(weight.shape).contiguous())
        self._rounding = "soft"
        return self

    def _check_shape(self, x: Tensor) -> None:
        if tuple(self.scale.shape) != self._compact_shape(x):
            raise ValueError(
                f"tensor of shape {tuple(x.shape)} needs qparams of shape "
                f"{self._compact_shape(x)}, but this quantizer has {tuple(self.scale.shape)}"
            )

    def _ratio(self, x: Tensor) -> Tensor:
        """x / s in the broadcast view, with s fixed: the quantity AdaRound floors."""
        self._check_shape(x)
        s = self.scale.detach().clamp(min=_MIN_SCALE)
        x_view, s = _broadcast(x, s, self._axis(x), self.spec.group_size)
        return x_view / s

    def soft_offset(self) -> Tensor:
        """h(alpha) = clamp(1.2 sigmoid(alpha) - 0.1, 0, 1), the learned rounding in [0, 1]."""
        if self._rounding != "soft":
            raise RuntimeError(f"soft_offset(): rounding is {self._rounding!r}, not 'soft'")
        return torch.clamp(1.2 * torch.sigmoid(self.alpha) - 0.1, 0.0, 1.0)

    def rounding_loss(self, beta: float) -> Tensor:
        """AdaRound's regulariser sum(1 - |2h - 1|^beta); it pushes every h to 0 or 1."""
        return (1.0 - (2.0 * self.soft_offset() - 1.0).abs().pow(beta)).sum()

    def harden(self) -> UniformQuantizer:
        """Decide the rounding for good: floor(W/s) + 1[alpha >= 0]; alpha is dropped."""
        if self._rounding != "soft":
            raise RuntimeError(f"harden(): rounding is {self._rounding!r}, not 'soft'")
        self.hard_round = (self.alpha.detach() >= 0).float()
        self.alpha = None
        self._rounding = "hard"
        return self

    # -- quantizing -----------------------------------------------------------------------

    def _fake_quant(self, x: Tensor) -> Tensor:
        codes, s, z = self._codes(x.float(), ste=True)
        return ((codes - z) * s).reshape(x.shape).to(x.dtype)

    def _codes(self, x: Tensor, ste: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(codes, s, z) in the broadcast view of x, honouring the rounding mode and LSQ."""
        self._check_shape(x)
        axis, group_size = self._axis(x), self.spec.group_size
        s = self.scale
        if s.requires_grad:
            # LSQ: g = 1 / sqrt(elements per step size * qmax), so the step size learns at a
            # rate comparable to the values it quantizes.
            s = _grad_scale(s, 1.0 / math.sqrt(x.numel() // s.numel() * self.qmax))
        x_view, s = _broadcast(x, s.clamp(min=_MIN_SCALE), axis, group_size)
        _, z = _broadcast(x, self.zero_point, axis, group_size)
        if self._rounding == "nearest":
            q = (_round_ste(x_view / s) if ste else torch.round(x_view / s)) + z
        else:
            q = torch.floor(self._ratio(x)) + self._offset(x).reshape(x_view.shape) + z
        return _clamp(q, self.qmin, self.qmax), s, z

    def _offset(self, x: Tensor) -> Tensor:
        """AdaRound's rounding offset (soft h(alpha) or hard 0/1) for the weight x."""
        offset = self.soft_offset() if self._rounding == "soft" else self.hard_round
        if offset.shape != x.shape:
            raise ValueError(
                f"AdaRound was set up for a weight of shape {tuple(offset.shape)}, "
                f"got {tuple(x.shape)}"
            )
        return offset

    def int_repr(self, x: Tensor) -> Tensor:
        """The int32 codes `forward` dequantizes (with AdaRound's decided rounding): what an
        integer kernel stores. Lowering must use this, not round(W/s), for hardened weights."""
        if not self.frozen or self._rounding == "soft":
            raise RuntimeError(
                f"int_repr(): needs a frozen quantizer without soft rounding ({self})"
            )
        with torch.no_grad():
            codes, _, _ = self._codes(x.float(), ste=False)
        return codes.reshape(x.shape).to(torch.int32)

    def qparams(self) -> QParams:
        """(scale float32, zero_point int32, qmin, qmax) in the compact layout (module docstring)."""
        if not self.frozen:
            raise RuntimeError(f"qparams(): quantizer is not frozen ({self})")
        scale = self.scale.detach().clamp(min=_MIN_SCALE).clone()
        return QParams(scale, self.zero_point.round().to(torch.int32), self.qmin, self.qmax)

    # -- bookkeeping ----------------------------------------------------------------------

    def _clear(self) -> None:
        self._clear_observer()
        self.scale = nn.Parameter(torch.ones((), device=self.scale.device), requires_grad=False)
        self.zero_point = torch.zeros((), device=self.scale.device)
        self.clip_lo = self.clip_hi = None
        self.alpha = self.hard_round = None
        self._rounding = "nearest"

    def deployment_problems(self) -> list[str]:
        problems = super().deployment_problems()
        if self._rounding == "soft":
            problems.append("soft AdaRound rounding still on (call harden())")
        return problems

    def get_extra_state(self) -> dict:
        return {
            **super().get_extra_state(),
            "spec": self.spec.to_dict(),
            "rounding": self._rounding,
        }

    def set_extra_state(self, state: dict) -> None:
        saved = QuantSpec.from_dict(state["spec"])
        if saved != self.spec:
            raise ValueError(f"saved quantizer has spec {saved}, this one {self.spec}")
        super().set_extra_state(state)
        self._rounding = state["rounding"]

    def extra_repr(self) -> str:
        spec = self.spec
        parts = [f"bits={spec.bits}", "symmetric" if spec.symmetric else "asymmetric"]
        if spec.granularity == "channel":
            parts.append(f"per-channel(axis={spec.ch_axis})")
        elif spec.granularity == "group":
            parts.append(f"per-group({spec.group_size})")
        else:
            parts.append("per-tensor")
        parts += [f"observer={spec.observer}", f"state={self._state}"]
        if self._rounding != "nearest":
            parts.append(f"rounding={self._rounding}")
        if self.clip_lo is not None:
            parts.append("clip=fixed")
        if self._drop_prob != 1.0:
            parts.append(f"drop_prob={self._drop_prob}")
        if not self.enabled:
            parts.append("disabled")
        return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Log2 quantizer for post-softmax probabilities (PTQ4SAM AGQ).
# ---------------------------------------------------------------------------------------------


class Log2Quantizer(Quantizer):
    """PTQ4SAM's AGQ quantizer: levels s * 2^(-k / tau), k = 0..2^b - 1, plus 0.

    Observing records the running max of the probabilities; `freeze()` sets s = the max, clamped to [1e-20, 1].
    The AGQ search picks (s, tau) with `log2_fake_quantize` and installs them with `set_agq`.
    `learn_scale(True)` trains s in reconstruction with straight-through rounding. No torchao
    kernel consumes log-coded values, so this quantizer is an accuracy model only (§1.2).

    Example:
        >>> q = Log2Quantizer(bits=4, tau=2)
        >>> _ = q(torch.softmax(torch.randn(2, 8), -1))
        >>> q.freeze().qparams().qmax
        15
    """

    def __init__(self, bits: int, tau: int = 1) -> None:
        super().__init__()
        _check_bits(bits)
        self.bits = bits
        self.tau = tau
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.register_buffer("obs_max", None, persistent=False)

    @property
    def tau(self) -> int:
        """The base is 2^(1/tau); tau in {1, 2, 4}, chosen per softmax site by the AGQ search."""
        return self._tau

    @tau.setter
    def tau(self, tau: int) -> None:
        if tau not in LOG2_TAUS:
            raise ValueError(f"tau must be one of {LOG2_TAUS}, got {tau!r}")
        self._tau = int(tau)

    def _observe(self, a: Tensor) -> None:
        m = a.detach().float().amax()
        self.obs_max = m if self.obs_max is None else torch.maximum(self.obs_max, m)

    def _has_data(self) -> bool:
        return self.obs_max is not None

    def all_reduce_observer(self, group) -> None:
        """The largest probability any rank saw (sharded calibration)."""
        import torch.distributed as dist

        if self.obs_max is None:
            raise RuntimeError(f"{self}: this rank observed nothing; give every rank data")
        m = self.obs_max.clone()
        dist.all_reduce(m, dist.ReduceOp.MAX, group=group)
        self.obs_max = m

    def _install_from_observer(self) -> None:
        if float(self.obs_max) <= 0:
            raise ValueError(
                f"Log2Quantizer observed max {float(self.obs_max)} <= 0; it is for probabilities"
            )
        self._set_scale(self.obs_max.clamp(min=_LOG2_FLOOR, max=1.0))

    def _set_scale(self, s: Tensor | float) -> None:
        with torch.inference_mode(False):  # see UniformQuantizer._install
            s = torch.as_tensor(s, dtype=torch.float32, device=self.scale.device).reshape(())
            self.scale = nn.Parameter(s.clone(), requires_grad=False)

    def set_agq(self, scale: float, tau: int) -> Log2Quantizer:
        """Install the AGQ search's (s, tau) and freeze."""
        if not 0 < scale <= 1:
            raise ValueError(f"AGQ scale must be in (0, 1], got {scale}")
        self.tau = tau
        self._set_scale(scale)
        self._state = "frozen"
        return self

    def _fake_quant(self, a: Tensor) -> Tensor:
        s = self.scale
        if s.requires_grad:
            s = _grad_scale(s, 1.0 / math.sqrt(a.numel() * (2**self.bits - 1)))
        s = s.clamp(min=_LOG2_FLOOR)
        return _log2_core(a.float(), s, self._tau, self.bits, _round_ste).to(a.dtype)

    def qparams(self) -> QParams:
        """(s, 0, 0, 2^b - 1): codes k mean s * 2^(-k / tau); read `tau` alongside."""
        if not self.frozen:
            raise RuntimeError(f"qparams(): quantizer is not frozen ({self})")
        zero = torch.zeros((), dtype=torch.int32, device=self.scale.device)
        scale = self.scale.detach().clamp(min=_LOG2_FLOOR).clone()
        return QParams(scale, zero, 0, 2**self.bits - 1)

    def _clear(self) -> None:
        self.obs_max = None
        self._set_scale(1.0)

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "bits": self.bits, "tau": self._tau}

    def set_extra_state(self, state: dict) -> None:
        if state["bits"] != self.bits:
            raise ValueError(f"saved Log2Quantizer has bits={state['bits']}, this one {self.bits}")
        super().set_extra_state(state)
        self.tau = state["tau"]

    def extra_repr(self) -> str:
        parts = [f"bits={self.bits}", f"tau={self._tau}", f"state={self._state}"]
        if self._drop_prob != 1.0:
            parts.append(f"drop_prob={self._drop_prob}")
        if not self.enabled:
            parts.append("disabled")
        return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Deployment check.
# ---------------------------------------------------------------------------------------------


class NotDeployableError(RuntimeError):
    """A model whose quantizers would not compute what the deployed integer model computes."""


def assert_deployable(module: nn.Module, *, allow_empty: bool = False) -> int:
    """Raise unless every enabled quantizer in `module` quantizes like deployment does.

    Checks: calibrated (frozen), drop_prob == 1.0 (no QDrop at evaluation, papers.md §5.1), and no
    soft AdaRound rounding left (§5.2). Disabled quantizers are skipped: disabling is an explicit
    FP decision. Finding no quantizer at all is an error unless `allow_empty`, since it usually
    means the check ran on the FP model instead of the quantized copy.

    Returns:
        the number of quantizers checked.

    Example:
        >>> q = UniformQuantizer(QuantSpec(bits=8))
        >>> assert_deployable(q)
        Traceback (most recent call last):
        ...
        samq_fx.quantizers.NotDeployableError: 1 of 1 quantizers are not deployable: <root> (UniformQuantizer): not calibrated (still observing; call freeze())
    """
    found, problems = 0, []
    for name, sub in module.named_modules():
        if not isinstance(sub, Quantizer):
            continue
        found += 1
        if sub.enabled:
            bad = sub.deployment_problems()
            if bad:
                problems.append(f"{name or '<root>'} ({type(sub).__name__}): {'; '.join(bad)}")
    if not found and not allow_empty:
        raise NotDeployableError(f"no quantizer found in {type(module).__name__}")
    if problems:
        raise NotDeployableError(
            f"{len(problems)} of {found} quantizers are not deployable: " + " | ".join(problems)
        )
    return found
