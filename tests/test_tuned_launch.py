"""TunedLauncher: the autotuner picks once per key, later calls skip it and run that config."""

from __future__ import annotations

import textwrap

import pytest

from samq_fx.tuned_launch import TunedLauncher


class _Config:
    def __init__(self, block: int, pre_hook=None) -> None:
        self.block, self.pre_hook = block, pre_hook

    def all_kwargs(self) -> dict:
        return {"BLOCK": self.block, "num_warps": 4}


class _Kernel:
    """Records the launches it gets, as `tuned.fn` (the JIT function) would run them."""

    def __init__(self) -> None:
        self.launches: list[tuple] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


class _Autotuner:
    """Triton's autotuner interface as TunedLauncher uses it: a config per call's shape."""

    arg_names = ["x", "n"]

    def __init__(self, pre_hook=None) -> None:
        self.fn = _Kernel()
        self.tuned_calls = 0
        self.pre_hook = pre_hook

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.tuned_calls += 1
            self.best_config = _Config(64 if args[1] < 100 else 128, self.pre_hook)
            self.fn[grid](*args, **kwargs, **self.best_config.all_kwargs())

        return run


def test_second_call_of_a_key_skips_the_autotuner_and_runs_its_config():
    tuned = _Autotuner()
    launch = TunedLauncher(tuned)
    launch(("small",), (1,), "x", 10, FLAG=True)
    launch(("small",), (2,), "y", 10, FLAG=True)
    launch(("large",), (3,), "z", 1000, FLAG=False)
    launch(("large",), (4,), "w", 1000, FLAG=False)
    assert tuned.tuned_calls == 2  # once per key
    blocks = [kwargs["BLOCK"] for _, _, kwargs in tuned.fn.launches]
    assert blocks == [64, 64, 128, 128]
    grid, args, kwargs = tuned.fn.launches[1]
    assert grid == (2,) and args == ("y", 10) and kwargs["FLAG"] is True
    assert kwargs["num_warps"] == 4


def test_config_pre_hook_sees_the_arguments_on_the_bypassed_call():
    seen = []
    tuned = _Autotuner(pre_hook=lambda nargs: seen.append(dict(nargs)))
    launch = TunedLauncher(tuned)
    launch(("k",), (1,), "x", 10)  # the autotuner runs its own hooks: our stub runs none
    launch(("k",), (1,), "y", 10)
    assert seen == [{"x": "y", "n": 10, "BLOCK": 64, "num_warps": 4}]


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch, triton, triton.language as tl
    from samq_fx.tuned_launch import TunedLauncher

    def one_config(configs, named_args, **kwargs):  # the interpreter cannot time configs
        return [c for c in configs if (c.kwargs["BLOCK"] == 16) == (named_args["N"] < 60)]

    configs = [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})]
    @triton.autotune(configs, key=["N"], prune_configs_by={"early_config_prune": one_config})
    @triton.jit
    def double(X, Y, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, 2 * tl.load(X + offs, mask=offs < N), mask=offs < N)

    launch = TunedLauncher(double)
    ok = True
    for n in (50, 50, 70, 70):
        x, y = torch.randn(n), torch.zeros(n)
        launch((n,), lambda meta: (triton.cdiv(n, meta["BLOCK"]),), x, y, n)
        ok &= torch.equal(y, 2 * x)
    blocks = [launch.chosen[(n,)].kwargs["BLOCK"] for n in (50, 70)]
    print(ok, sorted(launch.chosen), blocks, len(double.cache))
    """
)


def test_real_autotuned_kernel_through_the_launcher(triton_interpreter):
    pytest.importorskip("triton")
    out = triton_interpreter(_INTERPRETER_SCRIPT)
    # right results on every call; the launcher kept one config per key; the autotuner tuned
    # each key once (its cache)
    assert out == "True [(50,), (70,)] [16, 32] 2", out


_CACHE_FLAGS = textwrap.dedent(
    """
    from samq_fx import gemm_epilogue as ge, triton_attention as ta, window_attention as wa
    tuners = (ge._tuned_kernel, ge._tuned_kernel_tma, ta._tuned_kernel, wa._tuned_kernel)
    print(*(t.cache_results for t in tuners))
    """
)


@pytest.mark.parametrize("setting, expected", [(None, "True"), ("0", "False")])
def test_every_autotuner_keeps_its_timings_on_disk_unless_told_not_to(setting, expected):
    """CACHE_AUTOTUNING reaches all four autotuners (GEMM pointer and TMA, global and window
    attention); SAMQ_CACHE_AUTOTUNING=0 turns it off. (That a second process then times no
    config is a GPU test: the interpreter never caches.)"""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "SAMQ_CACHE_AUTOTUNING"}
    if setting is not None:
        env["SAMQ_CACHE_AUTOTUNING"] = setting
    out = subprocess.run([sys.executable, "-c", _CACHE_FLAGS], env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.split() == [expected] * 4, out.stderr[-2000:]
