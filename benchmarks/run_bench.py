#!/usr/bin/env python3
"""Run the standard ``vtprune bench`` suites and file the results under ``benchmarks/results/``.

    python benchmarks/run_bench.py                      # GPU suite (see benchmarks/README.md)
    python benchmarks/run_bench.py --suite cpu-smoke    # tiny models on the CPU, a minute or so
    python benchmarks/run_bench.py --only llava-1.5-7b --methods fastv,cls_topk -- --repeats 20

Each run writes ``<date>_<device>_<name>.json`` (every raw number, the environment, the arguments),
``.md`` (the table with device and date) and ``.png`` (prefill vs visual tokens, with the limit curve).
Arguments after ``--`` go to every ``vtprune bench`` call unchanged (they override the suite's).
"""
from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> vtprune bench arguments. Budgets: the papers' (LLaVA-1.5: 576 -> 192/128/64/32;
# LLaVA-NeXT: 2880 -> 640/320/160/40, i.e. the same 1/9 ... 1/72 ratios at 5 crops).
SUITES = {
    "gpu": {
        "llava-next-7b": ["--random-weights", "llava-next-7b", "--budgets", "640,320,160,40", "--image-size", "672x672"],
        "llava-1.5-7b": ["--random-weights", "llava-1.5-7b", "--budgets", "192,128,64,32"],
    },
    "cpu-smoke": {
        "tiny-llava": ["--tiny", "llava", "--budgets", "8,4"],
        "tiny-llava_next": ["--tiny", "llava_next", "--budgets", "8,4"],
        "tiny-qwen2_5_vl": ["--tiny", "qwen2_5_vl", "--budgets", "8,4"],
        "tiny-qwen3_vl": ["--tiny", "qwen3_vl", "--budgets", "8,4"],
    },
}
SUITE_DEFAULTS = {
    "gpu": ["--dtype", "bf16", "--device", "cuda", "--warmup", "3", "--repeats", "20", "--new-tokens", "16"],
    "cpu-smoke": ["--device", "cpu", "--warmup", "1", "--repeats", "5", "--new-tokens", "4", "--threads", "1"],
}


def default_methods() -> str:
    """Every registered method that takes a keep= budget, plus keep_all (the pipeline's own overhead)."""
    import vtprune
    from vtprune.bench.latency import method_takes_budget

    names = [m for m in vtprune.available_methods() if method_takes_budget(m)]
    return ",".join(names + ["keep_all"])


def device_slug(suite: str) -> str:
    if suite == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("run_bench.py: the gpu suite needs a CUDA device (try --suite cpu-smoke)")
        name = torch.cuda.get_device_name(0)
    else:
        name = "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="gpu")
    p.add_argument("--only", default=None, help="comma-separated run names of the suite (default: all)")
    p.add_argument("--methods", default=None, help="methods (default: every keep= method, plus keep_all)")
    p.add_argument("--out", default=str(HERE / "results"), help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)

    from vtprune.bench.latency import main as bench_main

    runs = SUITES[args.suite]
    names = args.only.split(",") if args.only else list(runs)
    unknown = [n for n in names if n not in runs]
    if unknown:
        raise SystemExit(f"run_bench.py: unknown run(s) {unknown}; the {args.suite} suite has {list(runs)}")
    methods = args.methods or default_methods()
    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = device_slug(args.suite)
    worst = 0
    for name in names:
        base = out / f"{stamp}_{slug}_{name}"
        cmd = [*SUITE_DEFAULTS[args.suite], *runs[name], "--methods", methods, *passthrough,
               "--json", f"{base}.json", "--markdown", f"{base}.md", "--png", f"{base}.png"]
        print(f"\n=== {name}: vtprune bench {' '.join(cmd)}", flush=True)
        worst = max(worst, bench_main(cmd))
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
