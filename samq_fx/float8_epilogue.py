"""A float8 GEMM whose epilogue applies the activation and quantizes for the next linear.

SAM's MLP is `lin2(act(lin1(x)))`. Lowered as two float8 linears, lin1 writes its output in
bf16 (4x the width of the block: SAM-H 32 layers x 32768 x 5120 at batch 8) and a separate
pass reads it back, applies GELU and writes lin2's float8 input: on the H100 that pass was
10.2 ms of SAM-H's 105 ms (`bench/profile_vit_h_h100_float8_i8attn.json`). Here the GEMM's
accumulator goes straight through scale, bias, activation and lin2's calibrated quantizer, and
only the float8 codes reach memory:

    out = fp8( clamp( act(x8·w8ᵀ · s_x·s_w + b) / s_out, ±448 ) )

`linear_act_reference` is the same function in float32 PyTorch with the exact (erf) GELU: the
op's CPU implementation and what the tests compare the kernel with. The unfused pair rounds
lin1's output to bf16 before the activation (a relative error up to 2^-9 in y, which the GELU's
tail multiplies); the kernel does not, and computes GELU to `GELU_RELATIVE_ERROR` of its value
everywhere (`gelu_fast`, the same formula in PyTorch). The GPU test holds the kernel's error
against the exact function to no more than the unfused pair's. The epilogue's instructions are
GEMM time: on SAM-H's lin1 the same kernel takes 0.39-0.44 ms with ReLU, 0.54-0.59 with the
first version's Abramowitz & Stegun erf and 0.50 with `gelu_fast`
(bench/gelu_epilogue_variants.py, bench/mlp_epilogue.py; bench/RESULTS.md, session 7).

Two kernels: one program a tile with pointer loads (any sm_89+ GPU), and a persistent one with
TMA loads and stores (sm_90); `launch` times both on a shape's first call and keeps the faster.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor, nn

from samq_fx.quantizers import UniformQuantizer
from samq_fx.triton_attention import FLOAT8_MAX, quantize_float8_static
from samq_fx.tuned_launch import TunedLauncher

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with PyTorch's Linux wheels
    triton = None

ACTIVATIONS = ("gelu", "relu")
"""Epilogue activations: aten.gelu (erf form, computed by `gelu_fast`) and aten.relu."""

GELU_RELATIVE_ERROR = 1.7e-3
"""Largest |gelu_fast(y) - gelu(y)| / |gelu(y)| over all y (0.162% measured in float32 over
y in [-12, 12]): below the 2^-9 of bf16 rounding that the unfused lowering applies to y, and
1/37 of an e4m3 step."""

_GELU_T = (-3.246238946914673, -0.3126406967639923, 0.008954372256994247,
           -0.0002384943945799023, 2.989293534483295e-06)  # fmt: skip
"""Coefficients of t(x) = x·(c0 + c1·x² + ... + c4·x⁸) in Φ(y) ≈ 1 / (1 + 2^t(x)), x = y/√2
clamped to ±4: a logistic fit of the normal CDF (erf(x) ≈ tanh(x·P(x²)), times -2·log2 e) for
the least worst relative error of Φ on the negative side, which by the logistic's symmetry
bounds the positive side too."""

K_MULTIPLE = 32
"""The kernel walks K in blocks of 32..128 without masks; other K are refused."""


def unsupported(in_features: int, activation: str) -> str | None:
    """Why this layer cannot take the fused kernel, or None."""
    if activation not in ACTIVATIONS:
        return f"activation {activation!r} has no fused epilogue (only {ACTIVATIONS})"
    if in_features % K_MULTIPLE:
        return f"in_features {in_features} is not a multiple of {K_MULTIPLE}"
    return None


def gelu_fast(y: Tensor) -> Tensor:
    """GELU as the kernel computes it, in PyTorch: y·Φ(y) with Φ(y) = 1 / (1 + 2^t(y/√2))
    (`_GELU_T`): one exp2 and one reciprocal, no erf (see `GELU_RELATIVE_ERROR`)."""
    x = (y * 0.7071067811865476).clamp(-4.0, 4.0)
    x2 = x * x
    c0, c1, c2, c3, c4 = _GELU_T
    t = x * (c0 + x2 * (c1 + x2 * (c2 + x2 * (c3 + x2 * c4))))
    return y / (1.0 + torch.exp2(t))


def _activation(y: Tensor, activation: str) -> Tensor:
    if activation == "gelu":
        return torch.nn.functional.gelu(y)
    return torch.relu(y)


def linear_act_reference(
    x: Tensor, w: Tensor, scales: Tensor, bias: Tensor | None, activation: str
) -> Tensor:
    """The kernel's function in float32 PyTorch: x (M, K) and w (N, K) float8 (or any float),
    scales = [s_x·s_w, s_out] float32; returns (M, N) float8 e4m3."""
    y = (x.float() @ w.float().t()) * scales[0]
    if bias is not None:
        y = y + bias.float()
    y = _activation(y, activation) / scales[1]
    return y.clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn)


if triton is not None:

    @triton.jit
    def _gelu_times(y, scale, FAST_RCP: tl.constexpr):
        """`gelu_fast`(y) · scale: a clamp, five FMAs, one exp2 and one reciprocal (the
        hardware's approximate one on a GPU, an exact divide under the interpreter)."""
        x = tl.minimum(tl.maximum(y * 0.7071067811865476, -4.0), 4.0)
        x2 = x * x
        p = -0.0002384943945799023 + x2 * 2.989293534483295e-06  # `_GELU_T`, Horner in x²
        p = 0.008954372256994247 + x2 * p
        p = -0.3126406967639923 + x2 * p
        t = x * (-3.246238946914673 + x2 * p)
        d = 1.0 + tl.exp2(t)
        if FAST_RCP:
            r = tl.inline_asm_elementwise(
                "rcp.approx.ftz.f32 $0, $1;", "=r,r", [d], dtype=tl.float32, is_pure=True, pack=1
            )
        else:
            r = 1.0 / d
        return y * scale * r

    @triton.jit
    def _epilogue(
        acc, BIAS, SCALES, offs_n, N,
        HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, FAST_RCP: tl.constexpr,
    ):  # fmt: skip
        """scale, bias, activation, and the next linear's quantizer (float32, clamped).

        The epilogue runs on the same warps as the tensor-core loop, so its instruction count
        is GEMM time: the divide by the output scale is one multiply by its reciprocal, and
        GELU is `_gelu_times` (no erf)."""
        y = acc * tl.load(SCALES)
        if HAS_BIAS:
            y += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        inv_out = 1.0 / tl.load(SCALES + 1)
        if ACTIVATION == "gelu":
            y = _gelu_times(y, inv_out, FAST_RCP)
        else:
            y = tl.maximum(y, 0.0) * inv_out
        return tl.minimum(tl.maximum(y, -448.0), 448.0)

    @triton.jit
    def _tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
        """(row block, column block) of a tile, in groups of GROUP_M row blocks so that
        consecutive tiles reuse the same weight columns from L2."""
        per_group = GROUP_M * num_n
        first_m = (tile // per_group) * GROUP_M
        group_rows = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (tile % per_group) % group_rows, (tile % per_group) // group_rows

    @triton.jit
    def _linear_act_kernel_tma(
        x_desc, w_desc, o_desc, BIAS, SCALES,
        M, N, K,
        HAS_BIAS: tl.constexpr,
        ACTIVATION: tl.constexpr,
        FAST_RCP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        NUM_SMS: tl.constexpr,
    ):  # fmt: skip
        """Persistent Hopper variant: one program per SM walks the tiles; TMA moves the tiles
        (zero-filled past the edges, stores clipped) and the tile loop is flattened with the K
        loop, so the next tile's loads overlap this tile's epilogue."""
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
            pid_m, pid_n = _tile(tile, num_m, num_n, GROUP_M)
            off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ki in range(k_tiles):
                a = x_desc.load([off_m, ki * BLOCK_K])
                b = w_desc.load([off_n, ki * BLOCK_K])
                acc = tl.dot(a, b.T, acc)
            offs_n = off_n + tl.arange(0, BLOCK_N)
            y = _epilogue(acc, BIAS, SCALES, offs_n, N, HAS_BIAS, ACTIVATION, FAST_RCP)
            o_desc.store([off_m, off_n], y.to(o_desc.dtype))

    @triton.jit
    def _linear_act_kernel(
        X, W, BIAS, OUT, SCALES,
        M, N, K,
        stride_xm, stride_wn, stride_om,
        HAS_BIAS: tl.constexpr,
        ACTIVATION: tl.constexpr,
        FAST_RCP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):  # fmt: skip
        pid_m, pid_n = _tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # rows / columns past the edge read row 0 (always valid) and are masked at the store,
        # so the K loop runs without masks
        rows = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
        cols = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
        x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = W + cols[None, :] * stride_wn + offs_k[:, None]  # wᵀ tile, K-contiguous
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K, BLOCK_K):
            acc = tl.dot(tl.load(x_ptrs), tl.load(w_ptrs), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        y = _epilogue(acc, BIAS, SCALES, offs_n, N, HAS_BIAS, ACTIVATION, FAST_RCP)
        o_ptrs = OUT + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(
            o_ptrs, y.to(OUT.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :]
        )

    def _prune(configs, named_args, **kwargs):
        k = named_args["K"]
        kept = [c for c in configs if k % c.kwargs["BLOCK_K"] == 0]
        return kept or [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8})]

    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                      num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in (
            (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4),
            (128, 128, 128, 4, 4), (128, 256, 64, 8, 4), (64, 128, 128, 4, 4),
            (128, 128, 128, 8, 3), (128, 128, 128, 4, 3), (128, 128, 64, 4, 4),
        )
    ]  # fmt: skip
    _tuned_kernel = triton.autotune(
        _CONFIGS,
        key=["M", "N", "K", "HAS_BIAS", "ACTIVATION"],
        prune_configs_by={"early_config_prune": _prune},
    )(_linear_act_kernel)

    def _set_descriptor_blocks(nargs) -> None:
        bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
        nargs["x_desc"].block_shape = [bm, bk]
        nargs["w_desc"].block_shape = [bn, bk]
        nargs["o_desc"].block_shape = [bm, bn]

    _TMA_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                      num_warps=w, num_stages=s, pre_hook=_set_descriptor_blocks)
        for bm, bn, bk, w, s in (
            (128, 256, 128, 8, 3), (128, 256, 64, 8, 4), (128, 128, 128, 8, 4),
            (128, 128, 128, 4, 4), (256, 128, 128, 8, 3), (128, 128, 64, 4, 5),
        )
    ]  # fmt: skip
    _tuned_kernel_tma = triton.autotune(  # TMA zero-fills past K: any K % 32 == 0 runs
        _TMA_CONFIGS, key=["M", "N", "K", "HAS_BIAS", "ACTIVATION"]
    )(_linear_act_kernel_tma)

    _launch_pointer = TunedLauncher(_tuned_kernel)
    _launch_tma = TunedLauncher(_tuned_kernel_tma)

KERNELS = ("pointer", "tma")
"""`pointer`: one program a tile, loads through pointers (any sm_89+ GPU); `tma`: persistent,
TMA loads and stores (Hopper, sm_90+). `launch` times both on a shape's first call and keeps
the faster (`chosen_kernels`)."""
_CHOSEN: dict[tuple, str] = {}


def chosen_kernels() -> dict[tuple, str]:
    """(M, N, K, has_bias, activation) -> the kernel `launch` picked for that shape."""
    return dict(_CHOSEN)


def _tma_ok(x: Tensor) -> bool:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return x.is_cuda and torch.cuda.get_device_capability(x.device) >= (9, 0)


def _run(kernel: str, x, w, out, scales, bias, activation, block=None) -> None:
    """Launch `kernel` autotuned, or the pointer kernel at a fixed `block` (see `launch`)."""
    m, k = x.shape
    n = w.shape[0]
    bias_arg = bias if bias is not None else scales  # never read when HAS_BIAS is False
    # the interpreter (CPU tensors) has no PTX: it divides where a GPU takes rcp.approx
    common = {"HAS_BIAS": bias is not None, "ACTIVATION": activation, "FAST_RCP": x.is_cuda}
    if kernel == "pointer":
        args = (x, w, bias_arg, out, scales, m, n, k, x.stride(0), w.stride(0), out.stride(0))
        if block is not None:
            bm, bn, bk = block
            grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
            _linear_act_kernel[grid](*args, **common, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                     GROUP_M=4, num_warps=4)  # fmt: skip
            return
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),
        )
        _launch_pointer(_tuning_key(x, w, out, bias, activation), grid, *args, **common)
        return
    from triton.tools.tensor_descriptor import TensorDescriptor

    sms = _multiprocessors(x.device)
    # block shapes are placeholders until the config's pre_hook sets them
    x_desc = TensorDescriptor.from_tensor(x, [1, 32])
    w_desc = TensorDescriptor.from_tensor(w, [1, 32])
    o_desc = TensorDescriptor.from_tensor(out, [1, 16])
    grid = lambda meta: (  # noqa: E731
        min(sms, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),
    )
    _launch_tma(_tuning_key(x, w, out, bias, activation), grid,
                x_desc, w_desc, o_desc, bias_arg, scales, m, n, k, **common, NUM_SMS=sms)  # fmt: skip


def _tuning_key(x, w, out, bias, activation) -> tuple:
    """What the autotuners' keys and pruning read: the shape, bias, activation and dtypes."""
    bias_dtype = None if bias is None else bias.dtype
    return (x.shape[0], w.shape[0], x.shape[1], activation, x.dtype, out.dtype, bias_dtype)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch(
    x: Tensor,
    w: Tensor,
    scales: Tensor,
    bias: Tensor | None,
    activation: str,
    *,
    out_dtype: torch.dtype = torch.float8_e4m3fn,
    block: tuple[int, int, int] | None = None,
    kernel: str | None = None,
) -> Tensor:
    """Run a Triton kernel: `kernel` from `KERNELS`, or None for the faster on this shape
    (timed once). `block` = (BLOCK_M, BLOCK_N, BLOCK_K) runs the pointer kernel untuned, as the
    interpreter tests do; they also store float32 to see the values before rounding."""
    if triton is None:
        raise RuntimeError("the fused float8 linear needs Triton, which is not installed")
    m, k = x.shape
    n = w.shape[0]
    problem = unsupported(k, activation)
    if problem:
        raise ValueError(problem)
    x, w = x.contiguous(), w.contiguous()
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if block is not None:
        _run("pointer", x, w, out, scales, bias, activation, block=block)
        return out
    if kernel is None:
        kernel = _CHOSEN.get(key := (m, n, k, bias is not None, activation))
        if kernel is None:
            kernel = _pick(x, w, out, scales, bias, activation) if _tma_ok(x) else "pointer"
            _CHOSEN[key] = kernel
    elif kernel not in KERNELS or (kernel == "tma" and not _tma_ok(x)):
        raise ValueError(f"kernel {kernel!r} cannot run here; kernels: {KERNELS} (tma: sm_90+)")
    _run(kernel, x, w, out, scales, bias, activation)
    return out


def _pick(x, w, out, scales, bias, activation) -> str:
    """The faster kernel on this shape, each at its autotuned config."""
    from triton.testing import do_bench

    times = {}
    for kernel in KERNELS:
        try:
            _run(kernel, x, w, out, scales, bias, activation)  # autotunes
        except Exception as err:  # a Triton without this kernel's features: use the other one
            warnings.warn(
                f"float8 epilogue kernel {kernel!r} failed to build ({err!r:.300})", stacklevel=3
            )
            continue
        times[kernel] = do_bench(lambda k=kernel: _run(k, x, w, out, scales, bias, activation))
    return min(times, key=times.get)


@torch.library.custom_op("samq::float8_linear_act", mutates_args=())
def float8_linear_act_op(
    x: Tensor, w: Tensor, scales: Tensor, bias: Tensor | None, activation: str
) -> Tensor:
    """act(x·wᵀ·scales[0] + bias) quantized to float8 e4m3 with scale scales[1].

    Args:
        x: (M, K) float8 e4m3, the input's codes (scale s_x).
        w: (N, K) float8 e4m3, the weight's codes (scale s_w).
        scales: (2,) float32 [s_x·s_w, s_out], s_out the next linear's input scale.
        bias: (N,) or None.
        activation: "gelu" (`gelu_fast` on CUDA, exact erf on the CPU) or "relu".

    Returns:
        (M, N) float8 e4m3. CUDA runs the Triton kernel, the CPU `linear_act_reference`.
    """
    if x.device.type == "cuda":
        return launch(x, w, scales, bias, activation)
    return linear_act_reference(x, w, scales, bias, activation)


@float8_linear_act_op.register_fake
def _(x, w, scales, bias, activation):
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float8_e4m3fn)


def quantize_static(x: Tensor, scale: Tensor) -> Tensor:
    """x / scale clamped to ±448 in float8 e4m3: torchao's static float8 activation quantizer,
    as plain ops so that inductor fuses it into the kernel that produces x."""
    return quantize_float8_static(x, scale)


def static_scale(quantizer: UniformQuantizer) -> Tensor:
    """The float8 scale of a calibrated per-tensor range [lo, hi]: max(|lo|, |hi|) / 448, so
    that the range's end maps to e4m3's largest value."""
    qp = quantizer.qparams()
    lo = (qp.qmin - qp.zero_point.float()) * qp.scale
    hi = (qp.qmax - qp.zero_point.float()) * qp.scale
    return torch.maximum(lo.abs(), hi.abs()).float() / FLOAT8_MAX


class Float8LinearAct(nn.Module):
    """lin1 + activation + lin2's input quantizer: float8 in, float8 codes for lin2 out."""

    def __init__(self, weight, w_scale, x_scale, bias, out_scale, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.register_buffer("weight", weight.contiguous())  # (N, K) e4m3 codes
        self.register_buffer("x_scale", x_scale.float().reshape(()))
        scales = torch.stack([x_scale.float().reshape(()) * w_scale.float().reshape(()),
                              out_scale.float().reshape(())])  # fmt: skip
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        x8 = quantize_static(x, self.x_scale).reshape(-1, x.shape[-1])
        y = float8_linear_act_op(x8, self.weight, self.scales, self.bias, self.activation)
        return y.reshape(*x.shape[:-1], self.weight.shape[0])


class Float8LinearOnCodes(nn.Module):
    """lin2 of a fused pair: takes the float8 codes `Float8LinearAct` wrote (scale `x_scale`)
    and runs the same `torch._scaled_mm` as torchao's float8 linear."""

    def __init__(self, weight, w_scale, x_scale, bias, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_dtype = out_dtype
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("w_scale", w_scale.float().reshape(1, 1))
        self.register_buffer("x_scale", x_scale.float().reshape(1, 1))
        self.register_buffer("bias", bias)

    def forward(self, x8: Tensor) -> Tensor:
        y = torch._scaled_mm(
            x8.reshape(-1, x8.shape[-1]).contiguous(),  # cuBLASLt: row-major A (eager)
            self.weight.t(),
            scale_a=self.x_scale,
            scale_b=self.w_scale,
            bias=self.bias,
            out_dtype=self.out_dtype,
            use_fast_accum=True,
        )
        return y.reshape(*x8.shape[:-1], self.weight.shape[0])


class Float8Linear(Float8LinearOnCodes):
    """A float8-static linear on plain tensors: x quantized with its calibrated scale, then the
    same `torch._scaled_mm` as torchao's float8 linear. torchao's module keeps its weight as a
    tensor subclass, which the compiled model's runtime wrapper unwraps (and dynamo's guards
    inspect) on every call; on plain buffers that per-call Python work is gone."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(quantize_static(x, self.x_scale))
