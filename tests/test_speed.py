"""samq_fx.speed's timing on the CPU: what each img/s column divides by. (The speeds themselves
are bench/RESULTS.md's, never a test's.)"""

from __future__ import annotations

import time

import torch

from samq_fx.speed import time_back_to_back, time_calls

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
