"""samq-fx: post-training quantization of Segment Anything, as FX graph passes."""

from samq_fx import _source_layout  # noqa: F401  (first: maps samq_fx.passes in a checkout)
from samq_fx.api import QuantizedSam, SaveFileError, load, quantize, save
from samq_fx.calib import CalibrationError
from samq_fx.capture import CaptureConfig, CapturedSam, capture
from samq_fx.config import CalibConfig, Override, QuantConfig
from samq_fx.lower import LoweredSam, LoweringError, lower, optimize_float
from samq_fx.models import ARCHS, CheckpointError, SamArch, arch_of, build_sam
from samq_fx.report import QuantSummary, RoleTable, roles, summary

__all__ = [
    "ARCHS",
    "CalibConfig",
    "CalibrationError",
    "CaptureConfig",
    "CapturedSam",
    "CheckpointError",
    "LoweredSam",
    "LoweringError",
    "Override",
    "QuantConfig",
    "QuantizedSam",
    "QuantSummary",
    "RoleTable",
    "SamArch",
    "SaveFileError",
    "arch_of",
    "build_sam",
    "capture",
    "load",
    "lower",
    "optimize_float",
    "quantize",
    "roles",
    "save",
    "summary",
]
__version__ = "0.1.0"
