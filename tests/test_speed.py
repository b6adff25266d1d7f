"""samq_fx.speed's timing on the CPU: what each img/s column divides by. (The speeds themselves
are bench/RESULTS.md's, never a test's.)"""

from __future__ import annotations

import json
import time

import pytest
import torch

from samq_fx.speed import Row, against_best_bf16, main, time_back_to_back, time_calls

CPU = torch.device("cpu")


def _sleeper(calls: list, seconds: float):
    def fn():
        calls.append(time.perf_counter())
        time.sleep(seconds)

    return fn


def test_back_to_back_runs_every_call_and_gives_seconds_a_call():
    calls: list = []
    per_call = time_back_to_back(_sleeper(calls, 0.01), CPU, 5)
    assert len(calls) == 5
    assert 0.01 <= per_call < 0.05, per_call


def test_time_calls_times_each_repeat_after_the_first_call_and_warmup():
    calls: list = []
    times, first = time_calls(_sleeper(calls, 0.005), CPU, repeats=4, warmup=2)
    assert len(calls) == 1 + 2 + 4 and len(times) == 4
    assert all(0.005 <= t < 0.05 for t in times) and first >= 0.005


def _row(setting: str, img_per_s: float, b2b: float | None, part="encoder", batch=8) -> Row:
    return Row("sha", "torch", "torchao", "dev", "vit_b", setting, part, batch, img_per_s,
               1.0, 1.0, 1.0, 0.0, 0.0, 0.0, None, b2b)  # fmt: skip


def test_ratios_are_against_the_best_bf16_row_of_the_same_part_and_batch():
    rows = [
        _row("bf16-triton-all", 380.0, 400.0),
        _row("float8-static", 494.0, 500.0),
        _row("bf16-triton-all@cg", 390.0, 395.0),  # the best synchronized bf16: 390
        _row("int8-static", 468.0, None),
        _row("fp32-compile", 100.0, 100.0),  # not a bf16 pipeline: no baseline
        _row("float8-static", 90.0, 91.0, batch=1),  # no bf16 row at batch 1
    ]
    ratios = against_best_bf16(rows)
    assert ratios[1] == (494.0 / 390.0, 500.0 / 400.0)
    assert ratios[0] == (380.0 / 390.0, 1.0) and ratios[2] == (1.0, 395.0 / 400.0)
    assert ratios[3] == (468.0 / 390.0, None)
    assert ratios[5] == (None, None)


@pytest.mark.slow
def test_bench_labels_rows_whose_cuda_graphs_inductor_skipped(tmp_path):
    """Asked for CUDA graphs where inductor records none (here: a CPU model, which it always
    skips), the bench says "@cg-skipped" rather than claiming "@cg" for the row."""
    out = tmp_path / "speed.json"
    argv = ["--model", "tiny", "--device", "cpu", "--prompts", "0", "--repeats", "2",
            "--batch", "1", "--settings", "bf16-compile", "--cudagraphs", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["setting"] == "bf16-compile@cg-skipped"


def test_every_bench_variant_is_a_valid_lowering_option():
    """Each `+suffix` of a lowered setting names `LowerConfig` fields with values it accepts (a
    typo would only surface on a GPU run), and suffixes combine."""
    from samq_fx.lower import LowerConfig
    from samq_fx.speed import VARIANTS, lowering_options

    for variant in VARIANTS:
        backend, options = lowering_options(f"int8-dynamic+{variant}")
        LowerConfig(backend=backend, **options)  # raises on an unknown field or value
    backend, options = lowering_options("int8-dynamic+wtri+grpscales")
    assert backend == "int8-dynamic"
    assert options == {"window_attention": "triton", "dynamic_scales": "group"}
