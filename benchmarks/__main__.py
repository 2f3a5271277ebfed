"""``python -m benchmarks``: the benchmarks of mezo-run, by suite or one at a time.

    python -m benchmarks list                          # the suites and their commands
    python -m benchmarks run SUITE [--out-dir DIR]     # -> DIR (benchmarks/results)/SUITE-DEVICE-DATE.json
    python -m benchmarks gpu SUITE [--out-dir DIR]     # on the GPU host: offline install, then run
    python -m benchmarks MODULE [ARGS ...]             # one harness, e.g. compare --rows hf,vllm

Each harness also runs alone as ``python -m benchmarks.MODULE`` (its own --help).
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: the harnesses with a main(argv) of their own
MODULES = ("accuracy", "backprop", "bench_dp", "bench_eval_long", "bench_hf", "bench_perturb", "bench_reuse",
           "compare", "gpu_sglang", "profile_step", "reward_speed", "seed7b", "sweep")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in MODULES:
        module = importlib.import_module(f"benchmarks.{argv[0]}")
        sys.argv = [module.__file__, *argv[1:]]   # what the harness records as its command
        if argv[0] == "compare":
            return module.main(argv[1:], prog="python -m benchmarks compare")
        return module.main(argv[1:]) or 0
    from .suites import SUITES, describe
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the suites and their commands")
    for name, helptext in (("run", "run a suite here"), ("gpu", "on the GPU host: install offline, run a suite")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("suite", choices=list(SUITES))
        s.add_argument("--out-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.command == "list":
        print(describe())
        print(f"\nharnesses: {', '.join(MODULES)}")
        return 0
    if args.command == "gpu":
        from .gpu import main as gpu_main
        return gpu_main(args.suite, args.out_dir)
    from .suites import run
    record = run(args.suite, args.out_dir, command=" ".join(["python -m benchmarks", *argv]))
    return 0 if record["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
