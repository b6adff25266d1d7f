"""Launch an autotuned Triton kernel at the config its autotuner chose, without the autotuner.

`triton.autotune` runs on every call: it rebuilds its argument dict and key (a string per
tensor dtype), merges the config's kwargs and runs the config's pre-hook before the JIT's own
launch. On the H100 host that is about 40 µs of CPU a call for the float8 MLP kernel
(`bench/launch_overhead.py`), and a lowered SAM-B encoder makes 24 such calls a forward: at
batch 1 the encoder is bound by the CPU, and at batch 8 its first blocks leave the GPU waiting
for launches (bench/RESULTS.md, session 9). The autotuner still picks the config, once per key;
later calls with that key go straight to the kernel.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

CACHE_AUTOTUNING = os.environ.get("SAMQ_CACHE_AUTOTUNING", "1") != "0"
"""Every autotuner here keeps its timings on disk (`cache_results`, in Triton's cache directory:
`TRITON_CACHE_DIR`, by default ~/.triton/cache), keyed by the kernel's source, the GPU target,
the shapes and dtypes in its key and the candidate configs. A new process that lowers the same
model (a restarted server, the next `samq-fx bench` run) compiles only each shape's winning
config instead of compiling and timing every candidate. GPUs of one target (sm_90: H100 and
H200) share entries: point TRITON_CACHE_DIR elsewhere, or set SAMQ_CACHE_AUTOTUNING=0 before
the import, to tune afresh."""


class TunedLauncher:
    """`launcher(key, grid, *args, **kwargs)` = `tuned[grid](*args, **kwargs)`, where `key` holds
    every value the autotuner's key and config pruning read (the caller's duty: a key that
    misses one could reuse a config pruned for other shapes)."""

    def __init__(self, tuned: Any) -> None:
        self.tuned = tuned
        self.chosen: dict[tuple, Any] = {}
        self._meta: dict[tuple, dict] = {}  # key -> the chosen config's launch keywords

    def __call__(self, key: tuple, grid: Callable | tuple, *args: Any, **kwargs: Any) -> None:
        meta = self._meta.get(key)
        if meta is None:  # the autotuner benchmarks (or finds) this key's config
            self.tuned[grid](*args, **kwargs)
            self.chosen[key] = config = self.tuned.best_config
            self._meta[key] = config.all_kwargs()
            return
        config = self.chosen[key]
        if config.pre_hook is not None:
            config.pre_hook({**dict(zip(self.tuned.arg_names, args)), **kwargs, **meta})
        self.tuned.fn[grid](*args, **kwargs, **meta)


__all__ = ["CACHE_AUTOTUNING", "TunedLauncher"]
