"""Lowering: from a calibrated fake-quant model to real kernels, per layer.

    q = samq_fx.quantize(sam, loader, QuantConfig.preset("W8A8-int8"))
    fast = samq_fx.lower(q, backend="int8-static", compile=True)   # drop-in Sam
    SamPredictor(fast).set_image(image)

This is the only file that imports torchao (`int8_kernel="torchao"`; int4 runs PyTorch's own
tinygemm op). The graph work is passes, run per part:
`passes/lower_tables.py` keeps a quantized position embedding (W4A16-int4's) as its one-byte
codes, `passes/lower_linears.py` swaps each fake-quantized linear for a module on plain buffers built
from the calibrated quantizers (`make_linear` below: `Int8Linear`, `Int4Linear`,
`Float8Linear`), and
`passes/fuse_attention.py` swaps the encoder's attention chains for one fused kernel,
`passes/patch_embed_as_matmul.py` turns the patch-embedding convolution into a matmul, and
`passes/fuse_linear_epilogue.py` (float8-static, int8-static) runs each encoder MLP's lin1 +
GELU + lin2's input quantizer as one GEMM (`samq_fx/gemm_epilogue.py`), and
`passes/fuse_attention_codes.py` (the same backends) has the attention kernels wired to the qkv
output write their output projection's input codes. The last,
`cast_boundaries` (here), casts graph inputs to the compute dtype and float outputs back to
float32, so `SamPredictor` feeds the lowered model exactly what it feeds `Sam`.

Backends (what runs where; `BACKENDS` holds the same as data):

  int8-static    int8 weights x int8 activations with the calibrated per-tensor scale and zero
                 point (codes copied from the quantizer, AdaRound's rounding included), on
                 plain buffers (`Int8Linear`): on CUDA this project's Triton GEMM with the
                 zero point, scales and bias in its epilogue, on the CPU torch._int_mm
                 (`INT8_KERNELS`; "torchao": torchao's `Int8Tensor`). Needs symmetric 8-bit
                 weights.
  int8-dynamic   the same weights; activations quantized per token at run time (symmetric).
  int4-weight    W4A16 (`Int4Linear`): the calibrated codes, 4 bits a weight in memory, with a
                 scale and a one-byte zero point per group of 32..256 (tinygemm: its own
                 (scale, zero) pair). Two kernels (`INT4_KERNELS`): the
                 codes dequantized at each call for the compute dtype's GEMM (the default,
                 CPU and CUDA), or packed for PyTorch's int4 tinygemm (aten._weight_int4pack_mm,
                 CUDA).
  float8-static  H100 / Ada: float8 e4m3 weights (per tensor) and activations, the activation
                 scale from the calibrated range -> torch._scaled_mm (`Float8Linear`).

A layer a backend has no kernel for (W4A4, W6A6, attention matmul quantizers, asymmetric weights
for the int8 kernel) stays fake-quantized and is named in the report and a warning; if no layer
can be lowered at all, `LoweringError` says why. Nothing is substituted silently.

Saving: `samq_fx.save(lowered)` writes the quantized model it came from plus this recipe;
`samq_fx.load` lowers again on the loading machine (kernel layouts differ between devices).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from samq_fx.api import PARTS, QuantizedSam
from samq_fx.capture import CapturedSam, select_mask_outputs
from samq_fx.gemm_epilogue import (
    DYNAMIC_HIDDEN_SCALES,
    Float8Linear,
    Int8Linear,
    Int8LinearDynamic,
    static_scale,
    unsupported,
)
from samq_fx.meta import get_info
from samq_fx.passes.fuse_attention import fuse_attention as fuse_attention_pass
from samq_fx.passes.fuse_attention_codes import fuse_attention_codes
from samq_fx.passes.fuse_linear_epilogue import fuse_linear_epilogue
from samq_fx.passes.fuse_residual_add import fuse_residual_add
from samq_fx.passes.lower_linears import lower_linears
from samq_fx.passes.lower_tables import lower_tables
from samq_fx.passes.patch_embed_as_matmul import patch_embed_as_matmul
from samq_fx.pipeline import PassContext, PassResult, run_passes
from samq_fx.quantizers import UniformQuantizer, assert_deployable
from samq_fx.report import format_table
from samq_fx.serial import DictConfig
from samq_fx.triton_attention import FLOAT8_MAX

BACKENDS = {
    "int8-static": "W8A8, int8 x int8 with calibrated activation scales and zero points",
    "int8-dynamic": "W8A8, int8 x int8 with per-token activation scales at run time",
    "int4-weight": "W4A16, int4 weights per group x bf16 activations (tinygemm on CUDA)",
    "float8-static": "float8 e4m3 x e4m3, calibrated activation scale (H100/Ada)",
}
# Not offered: float8 with per-row dynamic scales. Window attention pads tokens with zeros, and
# torchao 0.18's per-row float8 scale of an all-zero row is 0, so those rows come out NaN
# (measured on the H100: SQNR nan). float8-static has no such rows to scale.
ATTENTION_KERNELS = {
    "flex": "flex attention, bias folded into q·k (CUDA + compile); SDPA otherwise",
    "triton": "Triton flash kernel, bias added in-kernel, compute dtype (CUDA); on windows the "
    "one-tile window kernel that reads the qkv output and computes the rel-pos terms itself",
    "float8": "Triton flash kernel, float8 e4m3 q·kᵀ and P·v, dynamic scales or the calibrated "
    "ones of q, k, v quantizers (H100/Ada)",
    "int8-qk": "Triton flash kernel, int8 q·kᵀ (k smoothed), float8 P·v (H100/Ada)",
}
INT8_KERNELS = {
    "samq": "int8 codes on plain buffers: CUDA runs samq's Triton GEMM with the zero point, "
    "scales and bias in its epilogue (`samq_fx.gemm_epilogue`); the CPU torch._int_mm",
    "torchao": "torchao's Int8Tensor -> torch._int_mm (cuBLAS on CUDA, more than 16 rows)",
}
"""How int8-static / int8-dynamic multiply. On the H100, cuBLAS's int8 GEMM (torchao's path)
runs sm80 kernels: SAM-B's encoder at batch 8 spent 9.6 ms in them against 5-6 ms in float8's
sm90 GEMMs (bench/RESULTS.md, session 5)."""
INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_KERNELS = {
    "dequant": "codes dequantized per call (one fused elementwise kernel) x the float GEMM",
    "tinygemm": "PyTorch's int4 tinygemm (aten._weight_int4pack_mm), CUDA, bf16 activations",
}
"""How int4-weight multiplies. tinygemm is built for few rows (LLM decoding), and SAM's GEMMs
have thousands: the encoder's 4,096 tokens an image, the mask decoder's image-side projections
4,096 a prompt. On the H100 tinygemm ran SAM-B's encoder at 0.11x bf16's speed and its decoder
(64 prompts) at 0.37x; dequantizing a layer's codes (one pass over 0.5 bytes a weight) and
running the bf16 GEMM matched bf16 in both (bench/RESULTS.md, session 8)."""


class LoweringError(ValueError):
    """A model that cannot be lowered with the asked backend (the message says why)."""


@dataclass(frozen=True)
class LowerConfig(DictConfig):
    """How `lower` runs.

    Args:
        backend: one of `BACKENDS`.
        dtype: compute dtype of everything that is not an integer kernel: "bfloat16",
            "float16", "float32", or None for bfloat16 on CUDA and float32 on the CPU.
        fuse_attention: replace encoder attention chains by a fused kernel (flex attention /
            SDPA carrying the relative-position bias) where no quantizer sits inside.
        attention: the fused encoder attention's kernel (`ATTENTION_KERNELS`): "flex" (flex
            attention on CUDA under compile, SDPA otherwise, compute dtype), "triton" (this
            project's Triton kernel, compute dtype), "float8" (the Triton kernel with float8
            q·kᵀ and P·v) or "int8-qk" (int8 q·kᵀ, float8 P·v); the last three need CUDA and
            quantize q, k, v with dynamic per-tensor scales, except where the model has
            calibrated q, k, v quantizers (preset "W8A8-int8-attn"): "float8" takes their ranges
            as static scales. It applies to the global attentions, which hold ~90% of the
            encoder's attention work. "triton" and static-scale "float8" are wired like the
            window kernel: q, k, v read from the qkv output, rel-pos terms from the tables
            (`triton_attention.global_attention_op`), output in the projection's layout.
        window_attention: the same for the windowed attentions (14 x 14 tokens in SAM). "flex"
            is the default because it also runs on the CPU (SDPA); on CUDA "triton" is the
            fastest: `samq_fx.window_attention`'s kernel, wired to the qkv output and the
            projection's input with no copies, rel-pos terms computed inside (bench/RESULTS.md).
        strict: raise instead of keeping a layer fake-quantized.
        fuse_epilogue: float8-static and int8-static: run each image-encoder MLP (lin1 ->
            GELU -> lin2) as one 8-bit GEMM whose epilogue applies the GELU and writes lin2's
            8-bit input (`samq_fx.gemm_epilogue`), instead of a bf16 round trip between them
            (int8-dynamic: codes with dynamic scales, see `dynamic_scales`);
            and have the window and global attention kernels write their output projection's
            8-bit input (`passes/fuse_attention_codes.py`). int8-static and int8-dynamic (the
            "samq" kernel): each encoder block's residual add joins the epilogue of the GEMM
            before it (`passes/fuse_residual_add.py`).
        int4_kernel: int4-weight: one of `INT4_KERNELS`, "dequant" (CPU and CUDA) or
            "tinygemm" (CUDA and bf16 only; refused with the reason elsewhere).
        int8_kernel: int8-static / int8-dynamic: one of `INT8_KERNELS`, "samq" (this
            project's kernel on CUDA; torch._int_mm on the CPU) or "torchao".
        dynamic_scales: int8-dynamic with the fused MLP epilogue: how lin2's input (the MLP's
            hidden activation) is scaled, one of `DYNAMIC_HIDDEN_SCALES`: "group" (a scale per
            token and 128 hidden channels, written by lin1's epilogue) or "token" (per token,
            as every other int8-dynamic input; a compute-dtype round trip between the GEMMs),
            or None for `default_dynamic_scales` of the model's device: "group" on CUDA, where
            it is faster (SAM-B, H100: 1.09x against 1.05x the best bf16) and "token" on the
            CPU, where the group-scaled GEMM is torch._int_mm a group at a time (tiny SAM,
            2 cores, batch 4: 26.2 against 31.7 img/s; bench/RESULTS.md, session 21).
            Group scales are the finer grid either way (tiny SAM: 42.0 against 41.3 dB).
    """

    backend: str = "int8-static"
    dtype: str | None = None
    fuse_attention: bool = True
    attention: str = "flex"
    window_attention: str = "flex"
    strict: bool = False
    fuse_epilogue: bool = True
    int4_kernel: str = "dequant"
    int8_kernel: str = "samq"
    dynamic_scales: str | None = None

    def __post_init__(self) -> None:
        if self.dynamic_scales is not None and self.dynamic_scales not in DYNAMIC_HIDDEN_SCALES:
            raise LoweringError(
                f"unknown dynamic_scales {self.dynamic_scales!r}; one of "
                f"{list(DYNAMIC_HIDDEN_SCALES)}"
            )
        if self.int8_kernel not in INT8_KERNELS:
            raise LoweringError(
                f"unknown int8 kernel {self.int8_kernel!r}; kernels: {list(INT8_KERNELS)}"
            )
        if self.int4_kernel not in INT4_KERNELS:
            raise LoweringError(
                f"unknown int4 kernel {self.int4_kernel!r}; kernels: {list(INT4_KERNELS)}"
            )
        if self.backend not in BACKENDS:
            raise LoweringError(
                f"unknown lowering backend {self.backend!r}; backends: {list(BACKENDS)}"
            )
        for kernel in (self.attention, self.window_attention):
            if kernel not in ATTENTION_KERNELS:
                raise LoweringError(
                    f"unknown attention kernel {kernel!r}; kernels: {list(ATTENTION_KERNELS)}"
                )
        if self.dtype not in (None, "bfloat16", "float16", "float32"):
            raise LoweringError(
                f"dtype must be bfloat16, float16, float32 or None, not {self.dtype!r}"
            )


@dataclass
class LoweringReport:
    """What lowering did, per part: lowered linears (site -> kernel), sites kept fake-quantized
    (site -> reason), fused attentions, weight bytes before (fp16) and after."""

    backend: str
    dtype: str
    device: str
    lowered: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    attention: str = "flex"
    fused_attention: int = 0
    unfused_attention: dict[str, str] = field(default_factory=dict)
    fused_epilogues: int = 0
    unfused_epilogues: dict[str, str] = field(default_factory=dict)
    attention_codes: int = 0
    fused_residuals: int = 0
    unfused_residuals: dict[str, str] = field(default_factory=dict)
    weight_bytes: int = 0
    fp16_weight_bytes: int = 0

    def table(self) -> str:
        rows = [(site, "lowered", kernel) for site, kernel in self.lowered.items()]
        rows += [(site, "fake-quant", reason) for site, reason in self.kept.items()]
        head = (
            f"lowering {self.backend} ({self.dtype}, {self.device}): {len(self.lowered)} sites "
            f"lowered, {len(self.kept)} kept fake-quantized, {self.fused_attention} attentions "
            f"fused ({self.attention}), {self.fused_epilogues} activation epilogues fused, "
            f"{self.attention_codes} attentions write their projection's codes, "
            f"{self.fused_residuals} residual adds in a GEMM epilogue; "
            f"weights {self.weight_bytes / 2**20:.1f} MiB "
            f"({self.weight_bytes / max(self.fp16_weight_bytes, 1):.2f}x fp16)"
        )
        return head + "\n" + format_table(("site", "status", "kernel / reason"), rows)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class LoweredSam(QuantizedSam):
    """A quantized SAM whose layers run real kernels; `samq_lowering` says how."""

    samq_lowering: LowerConfig
    samq_lowering_report: LoweringReport


# -- kernels (torchao) ---------------------------------------------------------------------


def _int8_weight_codes(w_q: UniformQuantizer, weight: torch.Tensor):
    """(codes int8 (N, K), scale float32 (N, 1)) or a reason the int8 kernels cannot take it."""
    spec = w_q.spec
    if spec.bits != 8:
        return None, f"{spec.bits}-bit weights (int8 kernels take 8-bit)"
    if not spec.symmetric:
        return None, (
            "asymmetric weights; the int8 kernels take symmetric per-channel weights: "
            "quantize with w_symmetric=True (preset 'W8A8-int8')"
        )
    if spec.granularity not in ("channel", "tensor") or (
        spec.granularity == "channel" and spec.ch_axis != 0
    ):
        return None, f"{spec.granularity} weight scales (int8 kernels take per-output-channel)"
    qp = w_q.qparams()
    codes = w_q.int_repr(weight).to(torch.int8)
    scale = qp.scale.float().reshape(-1, 1).expand(weight.shape[0], 1).contiguous()
    return (codes, scale), "ok"


def _per_tensor_shape(x_val) -> list[int]:
    """A per-tensor scale's shape for an activation like `x_val` (torchao wants its rank)."""
    return [1] * (x_val.dim() if isinstance(x_val, torch.Tensor) else 3)


def _activation_spec_problem(in_q, bits: int) -> str | None:
    if in_q is None or not in_q.enabled:
        return "activations not quantized (A16): use backend int4-weight or keep it in float"
    if not isinstance(in_q, UniformQuantizer):
        return f"{type(in_q).__name__} activations have no integer kernel"
    if in_q.spec.bits != bits:
        return f"{in_q.spec.bits}-bit activations: no kernel (torchao runs {bits}-bit)"
    if in_q.spec.granularity != "tensor":
        return "activation scales not per tensor"
    return None


class TorchaoInt8Linear(nn.Linear):
    """An nn.Linear whose weight is torchao's `Int8Tensor` (int8 x int8 -> torch._int_mm), plus
    the one shape rule the CUDA kernel adds: more than 16 rows (`_int_mm` refuses fewer).
    torchao's eager path works around it, but under torch.compile inductor calls `_int_mm`
    directly, and the mask decoder's token-side linears see 7 rows a prompt: one box through
    `SamPredictor` failed. Such calls get zero rows appended and dropped again, which leaves
    the real rows' results unchanged (each row is quantized and multiplied on its own)."""

    MIN_CUDA_ROWS = 17

    def pads(self, x: torch.Tensor, rows: int) -> bool:
        """Whether this call needs the zero rows: CUDA and fewer than 17 rows."""
        return x.is_cuda and rows < self.MIN_CUDA_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if not self.pads(x, rows):
            return nn.functional.linear(x, self.weight, self.bias)
        x2 = x.reshape(rows, x.shape[-1])
        padded = torch.cat([x2, x2.new_zeros(self.MIN_CUDA_ROWS - rows, x2.shape[1])])
        # keep x's rank: the calibrated activation scale is shaped for it
        padded = padded.reshape(*(1,) * (x.ndim - 2), *padded.shape)
        y = nn.functional.linear(padded, self.weight, self.bias).reshape(-1, self.out_features)
        return y[:rows].reshape(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """A W4A16 linear from the calibrated codes and grid, 4 bits a weight in memory, run by one
    of two kernels (`INT4_KERNELS`):

    - "dequant": two codes a byte, (N, K/2); each call dequantizes them to the compute dtype
      (float32 arithmetic, one rounding) and runs the float GEMM. Under torch.compile the
      dequantization is one elementwise kernel whose output lives only for that GEMM. The CPU
      always takes this path (PyTorch's CPU int4 kernel, `_weight_int4pack_mm_for_cpu`, took
      11.5 s for one 4096x768x3072 product on this project's 2-core machine, 130x the float
      GEMM).
    - "tinygemm" (CUDA, bf16): the codes packed for `aten._weight_int4pack_mm`, which reads
      the 4-bit weights inside the GEMM: best when a call has few rows.

    Why not torchao's int4 tensor: it re-derives each group's (scale, zero) from the
    dequantized weights (so a calibrated clip is not kept exactly) and pads the input dim to a
    multiple of 1024, which stores SAM-B's 768-wide layers a third larger and pads every
    activation at run time. tinygemm itself needs neither: K a multiple of 32, N of 8.

    Our grid is w = (q - z) * s with q in [qmin, qmin + 15]; the codes are stored as
    u = q - qmin in [0, 15]. "dequant" keeps a group's s in the compute dtype and its integer
    zero point as one byte, u_z = z - qmin, and computes w = (u - u_z) * s: 3 bytes a group in
    bf16, 0.547 bytes a weight at groups of 64. tinygemm computes w = (u - 8) * scale + zero,
    so it keeps (scale, zero) = (s, (8 + qmin - z) * s), both in bf16 as it requires: 4 bytes a
    group, and zero rounded to bf16. Rounding s to bf16 moves a weight by at most 2^-6 of its
    step.
    """

    def __init__(
        self, codes, qparams, bias, group_size: int, dtype: torch.dtype, kernel: str = "dequant"
    ):
        super().__init__()
        if kernel not in INT4_KERNELS:
            raise LoweringError(f"unknown int4 kernel {kernel!r}; kernels: {list(INT4_KERNELS)}")
        if kernel == "tinygemm" and codes.device.type != "cuda":
            raise LoweringError(f"int4 tinygemm runs on CUDA; these codes are on {codes.device}")
        out_f, in_f = codes.shape
        self.in_features, self.out_features, self.group_size = in_f, out_f, group_size
        self.kernel = kernel
        q = (codes.to(torch.int32) - qparams.qmin).reshape(out_f, in_f)
        if q.numel() and not (0 <= int(q.min()) and int(q.max()) <= 15):
            raise LoweringError("int4 codes outside a 16-level grid")
        s = qparams.scale.float().reshape(out_f, in_f // group_size)
        z = qparams.zero_point.float().reshape(out_f, in_f // group_size)
        packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # (N, K/2), even k high
        if kernel == "tinygemm":
            zero = (8 + qparams.qmin - z) * s
            scale_zero = torch.stack([s, zero], dim=-1).transpose(0, 1).contiguous()
            packed = torch.ops.aten._convert_weight_to_int4pack(packed, _inner_k_tiles(in_f))
            self.register_buffer("scale_zero", scale_zero.to(dtype))
        else:
            zero_code = z - qparams.qmin
            if zero_code.numel() and not (
                torch.equal(zero_code, zero_code.round())
                and 0 <= float(zero_code.min())
                and float(zero_code.max()) <= 255
            ):
                raise LoweringError("int4 zero points that are not integers on the codes' grid")
            self.register_buffer("scale", s.to(dtype))
            self.register_buffer("zero_code", zero_code.to(torch.uint8))
        self.register_buffer("packed", packed)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    @staticmethod
    def unsupported(
        shape, group_size: int, dtype: torch.dtype, device: torch.device, kernel: str
    ) -> str | None:
        """Why `kernel` cannot take this layer, or None."""
        out_f, in_f = shape
        if in_f % group_size or in_f % 32 or out_f % 8:
            return (
                f"a {out_f}x{in_f} weight: the int4 kernels need in_features a multiple of 32 "
                f"and of the group ({group_size}), out_features a multiple of 8"
            )
        if kernel == "tinygemm" and device.type != "cuda":
            return f"int4 tinygemm runs on CUDA, not on {device}"
        if kernel == "tinygemm" and dtype != torch.bfloat16:
            return f"int4 tinygemm takes bfloat16 activations, not {dtype}"
        return None

    @staticmethod
    def kernel_name(kernel: str) -> str:
        if kernel == "tinygemm":
            return "int4 tinygemm (aten._weight_int4pack_mm) x bf16"
        return "int4 weights, dequantized per call x float GEMM"

    def dequantized_weight(self) -> torch.Tensor:
        """The (N, K) weight the codes stand for, in the compute dtype (the "dequant" kernel's
        GEMM operand; for tinygemm, unpacked from the nibble layout it was built from)."""
        if self.kernel != "dequant":
            raise LoweringError("dequantized_weight reads the 'dequant' layout")
        u = torch.stack([self.packed >> 4, self.packed & 15], dim=-1)
        u = u.reshape(self.out_features, -1, self.group_size).float()
        w = (u - self.zero_code.float()[..., None]) * self.scale.float()[..., None]
        return w.reshape(self.out_features, -1).to(self.scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "dequant":
            return nn.functional.linear(x, self.dequantized_weight(), self.bias)
        x2 = x.reshape(-1, self.in_features).contiguous()
        y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scale_zero)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def _inner_k_tiles(in_features: int) -> int:
    """tinygemm's k-tiles per packed word group: the largest of 8, 4, 2 whose 16-wide tiles
    divide in_features (the kernel requires it)."""
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


class KernelBackend:
    """Builds one lowered linear per calibrated site (`make_linear`), for one backend."""

    def __init__(
        self,
        name: str,
        dtype: torch.dtype,
        device: torch.device,
        int4_kernel: str = "dequant",
        int8_kernel: str = "samq",
        dynamic_scales: str | None = None,
    ) -> None:
        self.name, self.dtype, self.device = name, dtype, device
        self.int4_kernel, self.int8_kernel = int4_kernel, int8_kernel
        # `fuse_linear_epilogue`'s int8-dynamic pairs; None: this device's default
        self.dynamic_scales = dynamic_scales or default_dynamic_scales(device)

    def make_linear(self, site, w_q, weight, in_q, bias, x_val):
        """(module, kernel description) or (None, reason the site stays fake-quantized)."""
        if not isinstance(w_q, UniformQuantizer) or not w_q.enabled:
            return None, "weight quantizer disabled or not uniform"
        build = getattr(self, "_" + self.name.replace("-", "_"))
        return build(w_q, weight, in_q, bias, x_val)

    def _linear(self, weight: torch.Tensor, bias, cls: type[nn.Linear] = nn.Linear) -> nn.Linear:
        out_f, in_f = weight.shape
        lin = cls(in_f, out_f, bias=bias is not None, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            lin.weight.copy_(weight)
            if bias is not None:
                lin.bias.copy_(bias)
        lin.requires_grad_(False)
        return lin

    def _bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The bias as a plain-buffer module holds it: on the device, in the compute dtype."""
        return None if bias is None else bias.detach().to(self.device, self.dtype)

    def _int8(self, w_q, weight, in_q, bias, x_val, dynamic: bool):
        problem = _activation_spec_problem(in_q, 8)
        if problem:
            return None, problem
        packed, why = _int8_weight_codes(w_q, weight)
        if packed is None:
            return None, why
        codes, w_scale = packed
        qp, zero = None, 0
        if not dynamic:
            qp = in_q.qparams()
            # our grids are [0, 255] (asymmetric) or [-128, 127]; int8 kernels want [-128, 127]
            zero = int(qp.zero_point.reshape(-1)[0]) - (128 if qp.qmin == 0 else 0)
        if self.int8_kernel == "torchao":
            return self._torchao_int8(codes, w_scale, weight, in_q, bias, x_val, zero, dynamic)
        if problem := unsupported(weight.shape[1]):  # the same layers on every device
            return None, f"the int8 GEMM kernel: {problem}"
        codes, w_scale = codes.to(self.device), w_scale.to(self.device)
        b = self._bias(bias)
        gemm = "samq Triton GEMM" if self.device.type == "cuda" else "torch._int_mm"
        if dynamic:
            module = Int8LinearDynamic(codes, w_scale, b, self.dtype)
            return module, f"int8 x int8 ({gemm}), activations per token at run time"
        x_scale = qp.scale.float().reshape(-1)[0].to(self.device)
        module = Int8Linear(codes, w_scale, x_scale, zero, b, self.dtype)
        return module, f"int8 x int8 ({gemm}), calibrated activation scale"

    def _torchao_int8(self, codes, w_scale, weight, in_q, bias, x_val, zero: int, dynamic: bool):
        from torchao.quantization.granularity import PerRow, PerTensor
        from torchao.quantization.quant_primitives import MappingType
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import (
            Int8Tensor,
            QuantizeTensorToInt8Kwargs,
        )

        lin = self._linear(weight, bias, TorchaoInt8Linear)
        if dynamic:
            act = QuantizeTensorToInt8Kwargs(
                granularity=PerRow(), mapping_type=MappingType.SYMMETRIC
            )
            extra, kernel = {}, "int8 x int8 (torchao, _int_mm), activations per token at run time"
        else:
            shape = _per_tensor_shape(x_val)
            mapping = MappingType.ASYMMETRIC if zero else MappingType.SYMMETRIC
            act = QuantizeTensorToInt8Kwargs(granularity=PerTensor(), mapping_type=mapping)
            extra = {
                "act_quant_scale": in_q.qparams().scale.float().reshape(shape).to(self.device),
                "act_quant_zero_point": torch.full(
                    shape, zero, dtype=torch.int8, device=self.device
                ),  # fmt: skip
            }
            kernel = "int8 x int8 (torchao, _int_mm), calibrated activation scale"
        lin.weight = nn.Parameter(
            Int8Tensor(
                codes.to(self.device),
                w_scale.to(self.device),
                [1, weight.shape[1]],
                self.dtype,
                act_quant_kwargs=act,
                **extra,
            ),
            requires_grad=False,
        )
        return lin, kernel

    def _int8_static(self, w_q, weight, in_q, bias, x_val):
        return self._int8(w_q, weight, in_q, bias, x_val, dynamic=False)

    def _int8_dynamic(self, w_q, weight, in_q, bias, x_val):
        return self._int8(w_q, weight, in_q, bias, x_val, dynamic=True)

    def _int4_weight(self, w_q, weight, in_q, bias, x_val):
        spec = w_q.spec
        if in_q is not None and in_q.enabled:
            return None, (
                f"activations quantized to {getattr(in_q.spec, 'bits', '?')} bits: int4 "
                "weight-only kernels take float activations (quantize with a_bits=None)"
            )
        if spec.bits != 4 or spec.granularity != "group" or spec.group_size not in INT4_GROUP_SIZES:
            return None, (
                f"{spec.bits}-bit {spec.granularity} weights; int4 kernels take 4-bit weights in "
                f"groups of {INT4_GROUP_SIZES} (preset 'W4A16')"
            )
        kernel = self.int4_kernel
        problem = Int4Linear.unsupported(
            weight.shape, spec.group_size, self.dtype, self.device, kernel
        )
        if problem:
            return None, problem
        codes = w_q.int_repr(weight).to(self.device)
        lin = Int4Linear(codes, w_q.qparams(), bias, spec.group_size, self.dtype, kernel)
        return lin, Int4Linear.kernel_name(kernel)

    def _float8_ok(self) -> str | None:
        if self.device.type != "cuda" or torch.cuda.get_device_capability(self.device) < (8, 9):
            name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
            return f"float8 matmuls need an sm_89+ GPU (H100, L4, ...); this device is {name}"
        return None

    def _float8_static(self, w_q, weight, in_q, bias, x_val):
        problem = self._float8_ok() or _activation_spec_problem(in_q, 8)
        if problem:
            return None, problem
        act_scale = static_scale(in_q).to(self.device)
        # the weight per tensor as torchao's float8 weight quantization does it (amax / 448,
        # from the weight in the compute dtype), on plain buffers (`Float8Linear`)
        w = weight.detach().to(self.device, self.dtype).float()
        w_scale = (w.abs().amax() / FLOAT8_MAX).clamp(min=1e-12)
        codes = (w / w_scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn)
        b = self._bias(bias)
        module = Float8Linear(codes, w_scale, act_scale, b, self.dtype)
        return module, "float8 e4m3 (_scaled_mm), calibrated activation scale"


# -- graph edits -------------------------------------------------------------------------------


def cast_boundaries(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Cast float inputs to the compute dtype (`ctx.state["dtype"]`) and float outputs back to
    float32."""
    dtype = ctx.state["dtype"]
    counts = {"inputs": 0, "outputs": 0}
    if dtype == torch.float32:
        return PassResult(counts=counts)
    for node in [n for n in gm.graph.nodes if n.op == "placeholder"]:
        val = node.meta.get("val")
        if not (isinstance(val, torch.Tensor) and val.is_floating_point()):
            continue
        with gm.graph.inserting_after(node):
            cast = gm.graph.call_method("to", (node, dtype))
        node.replace_all_uses_with(cast, delete_user_cb=lambda user, cast=cast: user is not cast)
        counts["inputs"] += 1
    out = next(n for n in gm.graph.nodes if n.op == "output")

    def to_float(arg, before):
        val = arg.meta.get("val")
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            counts["outputs"] += 1
            with gm.graph.inserting_before(before):
                return gm.graph.call_method("float", (arg,))
        if arg.op == "call_function" and arg.target is select_mask_outputs:
            # the decoder ends in this python-level choice (no example value): cast what it picks
            # from, so that SamPredictor gets float32 masks and scores as from Sam
            arg.args = torch.fx.map_arg(arg.args, lambda a: to_float(a, arg))
            return arg
        if val is None and arg.op != "placeholder":  # a placeholder: the multimask flag
            raise LoweringError(
                f"cast_boundaries: output {arg.name} has no example value, so its dtype is "
                "unknown and it would leave the model in the compute dtype"
            )
        return arg

    out.args = torch.fx.map_arg(out.args, lambda a: to_float(a, out))
    return PassResult(counts=counts)


MLP_EPILOGUE_KERNEL = "{input} + {activation} + {out} out (Triton, fused)"
"""The report's kernel name of an MLP's lin1 with `fuse_linear_epilogue`'s epilogue ("out":
lin2's codes, `GROUP_CODES` for int8-dynamic's, or the compute dtype)."""
GROUP_CODES = "int8 (scales per token and 128 channels)"
"""The report's name of int8-dynamic's hidden codes (`fuse_linear_epilogue`'s "int8-group")."""
GROUP_CONSUMER_KERNEL = "int8 x int8 on lin1's codes, scales per token and 128 channels (Triton)"
"""The report's kernel name of the lin2 that takes them."""


def default_dynamic_scales(device: torch.device) -> str:
    """int8-dynamic's MLP hidden scales when `LowerConfig.dynamic_scales` is None: "group" where
    the Triton GEMMs write and apply them (CUDA), "token" on the CPU (see `LowerConfig`)."""
    return "group" if device.type == "cuda" else "token"


def _has_mlp_epilogue(cfg: LowerConfig) -> bool:
    """Whether `cfg` lowers MLPs to linears `fuse_linear_epilogue` can fuse: float8-static, or
    int8-static / int8-dynamic on this project's int8 kernel (torchao's has no epilogue to
    extend)."""
    return cfg.backend == "float8-static" or (
        cfg.backend in ("int8-static", "int8-dynamic") and cfg.int8_kernel == "samq"
    )


def _writes_attention_codes(cfg: LowerConfig) -> bool:
    """Whether `fuse_attention_codes` runs: the static 8-bit backends, whose projections have a
    calibrated input scale the attention kernels can quantize with (a per-token scale needs
    all heads of a token, which no attention program holds)."""
    return cfg.backend in ("float8-static", "int8-static")


def _fuses_residual(cfg: LowerConfig) -> bool:
    """Whether `fuse_residual_add` runs: the int8 backends on this project's kernel, whose
    epilogue adds the residual (`fuse_epilogue` switches it off with the other fusions)."""
    return (
        cfg.fuse_epilogue
        and cfg.backend in ("int8-static", "int8-dynamic")
        and cfg.int8_kernel == "samq"
    )


def _check_attention_kernel(attention: str, device: torch.device) -> None:
    """Refuse an attention kernel this device cannot run (no silent fallback)."""
    if attention == "flex":
        return
    if device.type != "cuda":
        raise LoweringError(
            f"attention kernel {attention!r} is a Triton CUDA kernel; the model is on {device}: "
            "use attention='flex' (SDPA on the CPU)"
        )
    if attention in ("float8", "int8-qk") and torch.cuda.get_device_capability(device) < (8, 9):
        raise LoweringError(
            f"attention kernel {attention!r} needs float8 tensor cores (sm_89+: H100, L4, ...); "
            f"this GPU is {torch.cuda.get_device_name(device)}"
        )


def _pass_state(dtype: torch.dtype, attention: str, window_attention: str) -> dict:
    """What the float graph edits read from `PassContext.state` (`cast_boundaries`,
    `fuse_attention`), the same for `lower` and `optimize_float`."""
    return {"dtype": dtype, "attention": attention, "window_attention": window_attention}


def _float_passes(part: str, fuse_attention: bool) -> list:
    """The graph edits that need no quantizer, shared by `lower` and `optimize_float`: the
    encoder's patch embedding as one GEMM and its fused attention, then the boundary casts."""
    passes = []
    if part == "image_encoder":
        passes = [patch_embed_as_matmul] + ([fuse_attention_pass] if fuse_attention else [])
    return [*passes, cast_boundaries]


def _cast_floats(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters and buffers to `dtype`, except the quantizers' (their scales must stay
    float32: a bf16 scale moves the integer grid)."""
    for part in PARTS:
        gm = getattr(model, part)
        skip = {
            id(t)
            for m in gm.modules()
            if m.__class__.__name__.endswith("Quantizer")
            for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        }
        for module in gm.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if id(p) not in skip and p.is_floating_point():
                    setattr(module, name, nn.Parameter(p.detach().to(dtype), requires_grad=False))
            for name, b in list(module.named_buffers(recurse=False)):
                if b is not None and id(b) not in skip and b.is_floating_point():
                    module._buffers[name] = b.to(dtype)


def stored_bytes(gm: nn.Module) -> int:
    """Bytes of parameters and buffers, counting tensor subclasses by their inner tensors."""
    total = 0
    seen: set[int] = set()
    for t in list(gm.parameters()) + list(gm.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        inner = getattr(t, "tensor_data_names", None)
        if inner is not None:
            names = list(inner) + list(getattr(t, "optional_tensor_data_names", []))
            parts = [getattr(t, n, None) for n in names]
            total += sum(p.numel() * p.element_size() for p in parts if p is not None)
        else:
            total += t.numel() * t.element_size()
    return total


def _fp16_bytes(model: nn.Module) -> int:
    return sum(
        2 * p.numel()
        for part in PARTS
        for name, p in getattr(model, part).named_parameters()
        if "samq_quantizers" not in name
    )


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def lower(
    qmodel: QuantizedSam,
    backend: str = "int8-static",
    *,
    dtype: str | None = None,
    fuse_attention: bool = True,
    attention: str = "flex",
    window_attention: str = "flex",
    strict: bool = False,
    fuse_epilogue: bool = True,
    int4_kernel: str = "dequant",
    int8_kernel: str = "samq",
    dynamic_scales: str | None = None,
    compile: bool = False,
    cudagraphs: bool = False,
    verbose: bool = True,
) -> LoweredSam:
    """Lower a calibrated model to real kernels. The argument is not modified.

    Args:
        qmodel: a `QuantizedSam` from `samq_fx.quantize` (or `samq_fx.load`).
        backend: one of `BACKENDS` ("int8-static", "int8-dynamic", "int4-weight",
            "float8-static").
        dtype: compute dtype for everything else (default bfloat16 on CUDA, float32 on CPU).
        fuse_attention: fuse the encoder's attention (with its relative-position bias).
        attention, window_attention: the kernels of the global and the windowed attentions,
            from `ATTENTION_KERNELS` ("flex", "triton", "float8", "int8-qk"); "float8" and
            "int8-qk" make the attention matmuls 8-bit.
        strict: raise `LoweringError` if any quantized layer has no kernel (else it stays
            fake-quantized, with a warning that names it).
        fuse_epilogue: float8-static and int8-static: fuse each encoder MLP's GELU and the
            next linear's input quantizer into the first GEMM, and each wired attention's
            output projection's quantizer into its kernel; int8-static and int8-dynamic
            also add each encoder block's residual in the GEMM before it (see `LowerConfig`).
        int4_kernel: int4-weight: "dequant" or "tinygemm" (`INT4_KERNELS`).
        int8_kernel: int8-static / int8-dynamic: "samq" or "torchao" (`INT8_KERNELS`).
        dynamic_scales: int8-dynamic: the MLPs' hidden activation scaled per token and 128
            channels ("group", written by lin1's epilogue) or per token ("token"); None: "group"
            on CUDA, "token" on the CPU (see `LowerConfig`).
        compile: wrap the image encoder and mask decoder in `torch.compile(fullgraph=True)`.
        cudagraphs: with `compile`, replay each image-encoder call as a CUDA graph (see
            `compile_parts`): the float8 pipeline launches more kernels from Python than the
            bf16 one and is CPU-bound at batch 1 without it. A replay's output lives in the
            graph's memory and the next replay overwrites it (PyTorch raises if an old one is
            read): `SamPredictor` keeps only the latest image's embedding, so it works as is;
            clone an embedding you keep across `set_image` calls.
        verbose: print the lowering table.

    Returns:
        A `LoweredSam`, a drop-in `Sam` (`SamPredictor`, `SamAutomaticMaskGenerator`).

    Example:
        >>> fast = lower(q, "int8-static", compile=True)
    """
    cfg = LowerConfig(
        backend=backend,
        dtype=dtype,
        fuse_attention=fuse_attention,
        attention=attention,
        window_attention=window_attention,
        strict=strict,
        fuse_epilogue=fuse_epilogue,
        int4_kernel=int4_kernel,
        int8_kernel=int8_kernel,
        dynamic_scales=dynamic_scales,
    )
    if cudagraphs and not compile:
        raise LoweringError("cudagraphs=True replays the compiled model: pass compile=True too")
    if isinstance(qmodel, LoweredSam):
        raise LoweringError("this model is already lowered; lower the QuantizedSam it came from")
    if not isinstance(qmodel, QuantizedSam):
        raise LoweringError(
            f"lower expects a QuantizedSam from samq_fx.quantize, got {type(qmodel).__name__}"
        )
    assert_deployable(qmodel)
    device = qmodel.pixel_mean.device
    torch_dtype = (
        _DTYPES[cfg.dtype]
        if cfg.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    if cudagraphs and device.type != "cuda":
        raise LoweringError(
            f"cudagraphs=True needs a model on a CUDA device; this one is on {device}"
        )
    _check_attention_kernel(cfg.attention, device)
    _check_attention_kernel(cfg.window_attention, device)
    model = copy.deepcopy(qmodel)
    model.__class__ = LoweredSam
    fp16_bytes = _fp16_bytes(model)
    _cast_floats(model, torch_dtype)
    report = LoweringReport(cfg.backend, str(torch_dtype).removeprefix("torch."), str(device))
    report.attention = (
        f"global {cfg.attention}, window {cfg.window_attention}"
        if cfg.fuse_attention
        else "unfused"
    )
    tables = 0  # lowered tables (lower_tables), which run no kernel
    for part in PARTS:
        gm = getattr(model, part)
        state = _pass_state(torch_dtype, cfg.attention, cfg.window_attention)
        kernels = KernelBackend(cfg.backend, torch_dtype, device, cfg.int4_kernel, cfg.int8_kernel,
                                cfg.dynamic_scales)  # fmt: skip
        ctx = PassContext(part, model.samq_arch, config=kernels, state=state)
        # the encoder's MLPs see B x 4096 tokens; the decoder's a few per prompt, where an
        # autotuned kernel per prompt count would cost more than the round trip it saves
        fuse_mlp = cfg.fuse_epilogue and part == "image_encoder" and _has_mlp_epilogue(cfg)
        epilogue = [fuse_linear_epilogue] if fuse_mlp else []
        *edits, cast = _float_passes(part, cfg.fuse_attention)
        # the wired attention kernels quantize their output for the projection: same backends
        wired = fuse_mlp and cfg.fuse_attention and _writes_attention_codes(cfg)
        codes = [fuse_attention_codes] if wired else []
        # the int8 GEMMs add the residual stream in their epilogue (x + lin2, x + proj)
        residual = [fuse_residual_add] if _fuses_residual(cfg) and part == "image_encoder" else []
        passes = [lower_tables, lower_linears, *epilogue, *edits, *codes, *residual, cast]
        records = run_passes(gm, ctx, passes)
        results = {r.name: r.result for r in records}  # the latest run of each pass
        prefix = "enc" if part == "image_encoder" else "dec"
        for site, reason in {
            **results["lower_tables"].rejected,
            **results["lower_linears"].rejected,
        }.items():
            report.kept[f"{prefix}:{site}"] = reason
        group_consumers = []
        for node in gm.graph.nodes:
            info = get_info(node)
            findings = info.findings if info is not None else {}
            finding = findings.get("lower_linears") or findings.get("lower_tables")
            if finding and node.op == "call_module":
                kernel = finding["kernel"]
                fused = info.findings.get("fuse_linear_epilogue")
                if fused:
                    names = {"none": report.dtype, "int8-group": GROUP_CODES}
                    out = names.get(fused["codes"], fused["codes"])
                    kernel = MLP_EPILOGUE_KERNEL.format(**fused, out=out)
                    if fused["codes"] == "int8-group":
                        group_consumers.append(f"{prefix}:{fused['consumer']}")
                report.lowered[f"{prefix}:{node.target.split('.', 1)[1]}"] = kernel
        report.lowered.update(dict.fromkeys(group_consumers, GROUP_CONSUMER_KERNEL))
        if "fuse_linear_epilogue" in results:
            report.fused_epilogues += results["fuse_linear_epilogue"].counts["fused"]
            report.unfused_epilogues.update(results["fuse_linear_epilogue"].rejected)
        if "fuse_attention_codes" in results:
            report.attention_codes += results["fuse_attention_codes"].counts["fused"]
        if "fuse_residual_add" in results:
            report.fused_residuals += results["fuse_residual_add"].counts["fused"]
            report.unfused_residuals.update(results["fuse_residual_add"].rejected)
        if "fuse_attention" in results:
            report.fused_attention += results["fuse_attention"].counts["fused"]
            report.unfused_attention.update(results["fuse_attention"].rejected)
        tables += results["lower_tables"].counts["lowered"]
        report.weight_bytes += stored_bytes(gm)
    report.fp16_weight_bytes = fp16_bytes
    if len(report.lowered) == tables:  # a table is no kernel: the linears all stayed fake-quant
        reasons = sorted(set(report.kept.values()))
        raise LoweringError(
            f"backend {cfg.backend!r} has no kernel for any layer of this "
            f"{qmodel.samq_config.name} model, so it stays fake-quantized: "
            + "; ".join(reasons[:4])
        )
    if report.kept:
        message = (
            f"{len(report.kept)} quantized linears have no {cfg.backend} kernel and stay "
            f"fake-quantized: " + ", ".join(f"{k} ({v})" for k, v in list(report.kept.items())[:3])
        )
        if cfg.strict:
            raise LoweringError(message)
        warnings.warn(message, stacklevel=2)
    model.samq_lowering = cfg
    model.samq_lowering_report = report
    model.__dict__["_samq_source"] = qmodel  # what save() writes; not a submodule
    if verbose:
        print(report.table())
    if compile:
        compile_parts(model, cudagraphs=cudagraphs)
    return model.eval()


CUDA_FUSION_OPTIONS = {"realize_opcount_threshold": 100, "realize_acc_reads_threshold": 16}
"""Inductor stores an elementwise chain to memory once it passes 30 ops or 8 tensor reads. A
windowed block's LayerNorm + pad + partition is past both, so with the defaults the float8
input of its qkv GEMM came from two kernels and a float32 tensor in between (SAM-H, batch 8:
200 MB written and read again, per block). With these limits the chain is one kernel that
writes the float8 codes: SAM-H's float8 encoder 87.95 -> 85.47 ms of kernels, bf16 unchanged
within noise (bench/RESULTS.md, session 7)."""


def compile_parts(
    model: CapturedSam, *, fuse_int_mm_with_mul: bool = True, cudagraphs: bool = False
) -> CapturedSam:
    """torch.compile(fullgraph=True) the image encoder and mask decoder in place.

    `fuse_int_mm_with_mul` lets inductor fuse torch._int_mm with the rescale that follows it
    (one of torchao's recommended settings; the others, coordinate-descent tuning above all,
    cost minutes of compile time for little here). `cudagraphs` replays each image-encoder
    call as one CUDA graph (inductor's "reduce-overhead"): no per-kernel launch gaps, at the
    price of one recorded graph per batch size. The mask decoder is compiled without graphs:
    its prompt count changes from call to call (a graph each), and with both parts graphed the
    decoder's first call after an encoder call failed inside inductor on the H100 (torch 2.11,
    `tests/test_lower_gpu.py`). On CUDA, `CUDA_FUSION_OPTIONS` lets one kernel do a window's
    LayerNorm, padding, partition and float8 quantization.
    """
    options = {"force_fuse_int_mm_with_mul": fuse_int_mm_with_mul}
    if model.pixel_mean.device.type == "cuda":
        options |= CUDA_FUSION_OPTIONS
    for part in PARTS:
        graphs = cudagraphs and part == "image_encoder"
        gm = getattr(model, part)
        compiled = torch.compile(
            gm, fullgraph=True, options=options | {"triton.cudagraphs": graphs}
        )
        setattr(model, part, compiled)
    return model


def optimize_float(
    captured: CapturedSam,
    dtype: str = "bfloat16",
    *,
    fuse_attention: bool = True,
    attention: str = "flex",
    window_attention: str = "flex",
) -> CapturedSam:
    """The best floating-point pipeline without quantization: a copy of `captured` cast to
    `dtype`, with fused attention ("flex" or "triton", see `LowerConfig`); `compile_parts` it
    for speed. The baseline `lower`'s speed is judged against, built from the same passes."""
    for kernel in (attention, window_attention):
        if kernel not in ("flex", "triton"):
            raise ValueError(f"optimize_float keeps attention in {dtype}: 'flex' or 'triton'")
        _check_attention_kernel(kernel, captured.pixel_mean.device)
    if not isinstance(captured, CapturedSam) or isinstance(captured, QuantizedSam):
        raise TypeError("optimize_float expects a full-precision samq_fx.capture(sam) model")
    model = copy.deepcopy(captured)
    torch_dtype = _DTYPES[dtype]
    _cast_floats(model, torch_dtype)
    for part in PARTS:
        state = _pass_state(torch_dtype, attention, window_attention)
        ctx = PassContext(part, model.samq_arch, state=state)
        run_passes(getattr(model, part), ctx, _float_passes(part, fuse_attention))
    return model.eval()


__all__ = [
    "ATTENTION_KERNELS",
    "BACKENDS",
    "INT4_KERNELS",
    "LowerConfig",
    "LoweredSam",
    "LoweringError",
    "LoweringReport",
    "compile_parts",
    "lower",
    "optimize_float",
    "stored_bytes",
]
