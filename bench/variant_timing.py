"""What the kernel-variant benches share (`int8_epilogue_variants.py`,
`int8_token_tile_scales.py`): their command line, with a `--check` that runs under Triton's
interpreter on the CPU, and timing in alternating rounds, best of each, because the H100 lowers
its clock under load (bench/tensor_core_peak_h100.json) and a variant timed right after another
would pay for that one's heat."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path


def parse_args(doc: str, argv, rounds: int, extra: Callable | None = None) -> argparse.Namespace:
    """--json, --check (refused unless TRITON_INTERPRET=1), --rounds; `extra(parser)` adds a
    bench's own options."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    if extra is not None:
        extra(p)
    p.add_argument("--json", type=Path)
    p.add_argument("--check", action="store_true", help="correctness under the interpreter (CPU)")
    p.add_argument("--rounds", type=int, default=rounds, help="alternating timing rounds")
    args = p.parse_args(argv)
    if args.check and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--check runs on the CPU under Triton's interpreter: set TRITON_INTERPRET=1")
    return args


def time_alternating(runs: dict[str, Callable], rows: dict[str, dict], rounds: int) -> None:
    """rows[name]["ms"] = the best of `rounds` timings of runs[name], the variants in turn."""
    from triton.testing import do_bench

    for row in rows.values():
        row["ms"] = float("inf")
    for _ in range(rounds):
        for name, run in runs.items():
            rows[name]["ms"] = min(rows[name]["ms"], do_bench(run, warmup=10, rep=60))
