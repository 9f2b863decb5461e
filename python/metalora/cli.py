"""The ``metalora`` command.

Subcommands are added by the modules that own them; each has a ``--help`` and exits with a
non-zero status and one clear line on bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Sequence

import numpy as np

from . import __version__
from ._dispatch import capabilities, set_isa
from .combine import MODES, combine_modules


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def _cmd_info(args: argparse.Namespace) -> int:
    caps = capabilities()
    print(f"metalora {__version__}")
    for key in ("compiled", "available"):
        print(f"  {key:10s} {', '.join(caps[key])}")
    print(f"  {'active':10s} {caps['active']} (default {caps['default']}; force a lower one with "
          f"METALORA_ISA=serial|avx2|avx512|neon)")
    print(f"  {'threads':10s} {caps['threads']} (OpenMP {'on' if caps['openmp'] else 'off'})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Combine a synthetic bank of adapters for a small model and report timing and accuracy."""
    rng = np.random.default_rng(args.seed)
    shapes = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
              "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
    K, r = args.adapters, args.r
    modules = {}
    for layer in range(args.layers):
        for name, (n_out, n_in) in shapes.items():
            A = [(rng.standard_normal((r, n_in)) / np.sqrt(n_in)).astype(np.float32) for _ in range(K)]
            B = [(rng.standard_normal((n_out, r)) * 0.02).astype(np.float32) for _ in range(K)]
            modules[f"model.layers.{layer}.{name}"] = (A, B)
    w = rng.dirichlet(np.ones(K))
    print(f"demonstration: {K} random rank-{r} adapters on SmolLM2-135M shapes "
          f"({len(modules)} modules), weights {np.round(w, 3).tolist()}")
    _cmd_info(args)
    for mode in MODES if args.mode == "all" else (args.mode,):
        t = time.perf_counter()
        out, info = combine_modules(modules, w, mode=mode, threads=args.threads, log=True)
        dt = time.perf_counter() - t
        name = next(iter(out))
        a, b = out[name]
        A, B = modules[name]
        exact = sum(w[j] * (B[j].astype(np.float64) @ A[j].astype(np.float64)) for j in range(K))
        err = np.linalg.norm(b.astype(np.float64) @ a - exact) / np.linalg.norm(exact)
        extra = ""
        if mode == "svd":
            extra = f", kept energy (mean) {np.mean([i['energy'] for i in info.values()]):.4f}"
        print(f"  {mode:6s} {dt * 1e3:8.1f} ms  rank {a.shape[0]:3d}  relative error of "
              f"{name} vs the exact sum {err:.2e}{extra}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metalora",
        description="Make a LoRA adapter for a new task on a CPU, without gradient training, "
                    "by combining a bank of existing adapters.")
    parser.add_argument("--version", action="version", version=f"metalora {__version__}")
    parser.add_argument("--isa", choices=["serial", "avx2", "avx512", "neon"],
                        help="force a SIMD level (default: the best this CPU has)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="show the build's SIMD levels and threads",
                       description="Show compiled/available/active SIMD levels and threads.")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="combine a synthetic bank and report speed and accuracy",
                       description="Combine random adapters of SmolLM2-135M shapes with every mode "
                                   "and compare with the exact float64 sum. Needs no files.")
    p.add_argument("--adapters", type=int, default=8, help="number of adapters (default 8)")
    p.add_argument("--r", type=int, default=8, help="rank of each adapter (default 8)")
    p.add_argument("--layers", type=int, default=30, help="transformer layers (default 30)")
    p.add_argument("--mode", choices=list(MODES) + ["all"], default="all")
    p.add_argument("--threads", type=int, default=0, help="threads (0 = all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    for register in EXTRA_COMMANDS:
        register(sub)
    return parser


#: Functions that add subcommands: register(subparsers) -> None.
EXTRA_COMMANDS: list[Callable] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        if args.isa:
            set_isa(args.isa)
        return int(args.func(args) or 0)
    except (UserError, ValueError, TypeError, FileNotFoundError, NotADirectoryError,
            FileExistsError, OverflowError) as exc:
        print(f"metalora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metalora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
