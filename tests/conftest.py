"""Shared fixtures. Models are built once per session: export is the slow part on a CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import samq_fx
from samq_fx import gemm_epilogue


@pytest.fixture(autouse=True, scope="session")
def _deterministic_threads():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_random():
    torch.manual_seed(0)
    return samq_fx.build_sam("tiny", pretrained=False)


@pytest.fixture(scope="session")
def tiny_random_captured(tiny_random):
    return samq_fx.capture(tiny_random)


@pytest.fixture(scope="session")
def vit_b_random():
    torch.manual_seed(0)
    return samq_fx.build_sam("vit_b")


@pytest.fixture(scope="session")
def vit_b_captured(vit_b_random):
    return samq_fx.capture(vit_b_random)


@pytest.fixture(scope="session")
def tiny_trained_captured():
    """The shipped (trained) tiny SAM, captured once for the session; tests only read it
    (`quantize`, `lower` and `optimize_float` copy it)."""
    return samq_fx.capture(samq_fx.build_sam("tiny"))


@pytest.fixture(scope="session")
def triton_interpreter():
    """Run a Python script under Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before
    triton is imported, hence a subprocess) and return its last stdout line."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]

    def run(script: str) -> str:
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
        proc = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.strip().splitlines()[-1]

    return run


@pytest.fixture(scope="session")
def random_int8_linear():
    """features, seed -> an `Int8Linear` (features x features, calibrated input scale 0.02 and
    zero point 5, float32 output) with random codes, scales and bias: what the graph-pass
    tests put where a lowered linear sits."""

    def make(features: int, seed: int = 0) -> gemm_epilogue.Int8Linear:
        g = torch.Generator().manual_seed(seed)
        codes = torch.randint(-127, 128, (features, features), generator=g, dtype=torch.int8)
        w_scale = torch.rand(features, generator=g) * 1e-2 + 1e-3
        bias = torch.randn(features, generator=g)
        return gemm_epilogue.Int8Linear(codes, w_scale, 0.02, 5, bias, torch.float32)

    return make
