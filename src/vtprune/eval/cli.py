"""``vtprune eval``: accuracy through lmms-eval, with the kept visual tokens in the results.

A thin front end over lmms-eval's evaluator (``lmms_eval.evaluator.simple_evaluate``)::

    vtprune eval --model /models/llava-1.5-7b-hf --method cls_topk --arg keep=64 --tasks gqa,pope
    vtprune eval --model demo --tasks vtprune_scenes --scenes 500          # the shipped scenes model
    vtprune eval ... --num-processes 4      # data parallel: re-runs itself under `accelerate launch`
    vtprune eval ... --print-command        # the equivalent plain lmms-eval command line
    vtprune eval --benchmark scenes --methods cls_topk,fastv --budgets 576,64   # no lmms-eval needed

It writes lmms-eval's usual files under ``--output`` (``<model>/<date>_results.json`` and, with
``--log-samples``, the per-task sample logs) and adds ``"vtprune"`` to the results: the method, its
arguments and the mean visual tokens per request entering the LLM and layer-averaged (per task too).
``vtprune_scenes`` in ``--tasks`` exports the scenes benchmark first (``vtprune.eval.export_scenes``)
and adds its folder to lmms-eval's task search path. Needs the ``lmms`` extra.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

DEFAULT_OUTPUT = "vtprune-eval"


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` command to ``vtprune``'s sub-command parsers."""
    p = subparsers.add_parser("eval", help="accuracy through lmms-eval (needs the lmms extra)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(p)
    p.set_defaults(func=run_eval)
    return p


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local folder of a supported HF VLM with its processor, or 'demo' (the shipped scenes model)")
    p.add_argument("--method", default="none", help="pruning method (see `vtprune methods`); 'none' = unpruned")
    p.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                   help="method argument, repeatable, e.g. --arg keep=64 --arg layer=2")
    p.add_argument("--tasks", default=None, help="comma-separated lmms-eval tasks, e.g. gqa,pope,vtprune_scenes")
    p.add_argument("--batch-size", type=int, default=None,
                   help="requests per forward pass (default 1; 16 with --benchmark scenes)")
    p.add_argument("--limit", type=float, default=None, help="only the first N documents per task (testing)")
    p.add_argument("--output", default=DEFAULT_OUTPUT, help=f"results folder (default {DEFAULT_OUTPUT})")
    p.add_argument("--log-samples", action=argparse.BooleanOptionalAction, default=True,
                   help="also write every prediction (default on)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (checkpoint dtype on GPU, float32 on CPU), bfloat16, ...")
    p.add_argument("--attn-implementation", default=None, help="sdpa / flash_attention_2 / eager (default: the model's)")
    p.add_argument("--layout", default=None, choices=("model", "flat"),
                   help="LLaVA-NeXT token layout (default: the method's own; OccamToken flat, the others model)")
    p.add_argument("--num-processes", type=int, default=1,
                   help="data-parallel processes; >1 re-runs this command under `accelerate launch`")
    p.add_argument("--include-path", action="append", default=[], help="extra lmms-eval task folder (repeatable)")
    p.add_argument("--scenes", type=int, default=500, help="questions of the scenes test split for vtprune_scenes")
    p.add_argument("--scenes-dir", default=None,
                   help="where to export the scenes task (default OUTPUT/vtprune_scenes_task)")
    p.add_argument("--gen-kwargs", default=None, help="lmms-eval generation overrides, e.g. max_new_tokens=16")
    p.add_argument("--verbosity", default="WARNING", help="lmms-eval log level (default WARNING)")
    p.add_argument("--print-command", action="store_true",
                   help="print the equivalent lmms-eval / accelerate command line and exit")
    bench = p.add_argument_group("the demo model's scenes benchmark without lmms-eval (vtprune.demo.benchmark)")
    bench.add_argument("--benchmark", choices=("scenes",), default=None,
                       help="run the scenes benchmark table (methods x budgets) in process instead of lmms-eval")
    bench.add_argument("--methods", default="random,pooling,cls_topk,fastv,occamtoken", help="with --benchmark")
    bench.add_argument("--budgets", default="576,192,128,64,32,16", help="with --benchmark; 576 = unpruned")
    bench.add_argument("--questions", type=int, default=2000, help="with --benchmark: test questions")
    bench.add_argument("--calibration", type=int, default=64, help="with --benchmark: OccamToken calibration scenes")
    bench.add_argument("--out", default="vtprune-scenes", help="with --benchmark: folder for scenes.json/png")
    bench.add_argument("--seeds", type=int, default=1,
                       help="with --benchmark: runs averaged for stochastic methods (random, ocvtp)")


def model_args_string(args) -> str:
    """lmms-eval ``--model_args`` for the ``vtprune`` model."""
    from ..cli.arguments import parse_method_args

    parts = [f"pretrained={args.model}", f"method={args.method}"]
    for key, value in parse_method_args(args.arg).items():
        # lmms-eval splits model_args on commas outside brackets: a tuple travels as [a,b,c]
        parts.append(f"{key}=[{','.join(map(str, value))}]" if isinstance(value, tuple) else f"{key}={value}")
    if args.layout is not None:
        parts.append(f"layout={args.layout}")
    if args.device:
        parts.append(f"device={args.device}")
    if args.dtype != "auto":
        parts.append(f"dtype={args.dtype}")
    if args.attn_implementation:
        parts.append(f"attn_implementation={args.attn_implementation}")
    return ",".join(parts)


def _task_list(args) -> list[str]:
    return [t.strip() for t in args.tasks.split(",") if t.strip()]


def _export_on_rank0(folder: Path, n: int, timeout: float = 900.0) -> None:
    import time

    from .export_scenes import export_scenes

    if int(os.environ.get("RANK", "0")) == 0:
        export_scenes(folder, n=n)
        return
    deadline = time.monotonic() + timeout
    manifest = folder / "manifest.json"
    while time.monotonic() < deadline:
        try:
            if json.loads(manifest.read_text()).get("n") == n:
                return
        except (OSError, ValueError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"rank {os.environ.get('RANK')}: the scenes export in {folder} did not appear")


def _include_paths(args, export: bool | None) -> list[str]:
    """Task folders for lmms-eval; ``export``: True = export the scenes task here, False = do not,
    None = distributed rank (rank 0 exports, the others wait)."""
    from . import SCENES_TASK

    paths = list(args.include_path)
    if SCENES_TASK in _task_list(args):
        folder = Path(args.scenes_dir or Path(args.output) / f"{SCENES_TASK}_task")
        if export:
            from .export_scenes import export_scenes

            export_scenes(folder, n=args.scenes)
        elif export is None:  # a rank of a distributed run: rank 0 exports, the others wait for it
            _export_on_rank0(folder, args.scenes)
        paths.append(str(folder))
    return paths


def lmms_command(args, include_paths: list[str]) -> list[str]:
    """The plain lmms-eval command line that runs the same evaluation (entry point registered)."""
    cmd = ["python", "-m", "lmms_eval"]
    if args.num_processes > 1:
        cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(args.num_processes),
               "-m", "lmms_eval"]
        if not _cuda_available() or args.device == "cpu":
            cmd = ["env", "ACCELERATE_USE_CPU=true", *cmd]
    cmd += ["--model", "vtprune", "--model_args", model_args_string(args), "--tasks", args.tasks,
            "--batch_size", str(args.batch_size), "--output_path", args.output]
    for path in include_paths:
        cmd += ["--include_path", path]
    if args.limit is not None:
        cmd += ["--limit", _fmt_limit(args.limit)]
    if args.log_samples:
        cmd.append("--log_samples")
    if args.gen_kwargs:
        cmd += ["--gen_kwargs", args.gen_kwargs]
    return cmd


def _fmt_limit(limit: float) -> str:
    return str(int(limit)) if float(limit).is_integer() else str(limit)


def _in_distributed_launch() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _relaunch(argv: list[str], num_processes: int) -> int:
    """Run this command again under ``accelerate launch`` with ``num_processes`` processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "vtprune.eval.cli", *argv]
    env = dict(os.environ)
    if not _cuda_available():
        # accelerate treats a --multi_gpu launch on a machine without GPUs as one process per rank
        # with no distributed state unless told that the processes are CPU processes
        env["ACCELERATE_USE_CPU"] = "true"
    return subprocess.call(cmd, env=env)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_eval(args, argv: list[str] | None = None) -> int:
    if args.benchmark == "scenes":
        from ..demo.benchmark import run_cli

        args.batch_size = args.batch_size or 16
        return int(run_cli(args) or 0)
    args.batch_size = args.batch_size or 1
    if not args.model or not args.tasks:
        print("vtprune eval: --model and --tasks are required (or --benchmark scenes)", file=sys.stderr)
        return 2
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        print("vtprune eval needs lmms-eval: pip install 'vtprune[lmms]' (see docs/lmms-eval.md)", file=sys.stderr)
        return 2
    if args.print_command:
        from . import SCENES_TASK

        paths = _include_paths(args, export=False)
        if SCENES_TASK in _task_list(args):
            print(f"python -m vtprune.eval.export_scenes --out {shlex.quote(paths[-1])} --n {args.scenes}")
        print(shlex.join(lmms_command(args, paths)))
        return 0
    if args.num_processes > 1 and not _in_distributed_launch():
        _include_paths(args, export=True)  # export once, before the processes start
        if argv is None:
            argv = _argv_from_args(args)
        return _relaunch(_without_num_processes(argv), args.num_processes)
    return evaluate(args)


def _argv_from_args(args) -> list[str]:
    argv = ["--model", args.model, "--method", args.method, "--tasks", args.tasks,
            "--batch-size", str(args.batch_size), "--output", args.output, "--dtype", args.dtype,
            "--scenes", str(args.scenes), "--verbosity", args.verbosity]
    if args.layout is not None:
        argv += ["--layout", args.layout]
    for item in args.arg:
        argv += ["--arg", item]
    for path in args.include_path:
        argv += ["--include-path", path]
    for flag, value in (("--limit", args.limit), ("--device", args.device), ("--scenes-dir", args.scenes_dir),
                        ("--attn-implementation", args.attn_implementation), ("--gen-kwargs", args.gen_kwargs)):
        if value is not None:
            argv += [flag, _fmt_limit(value) if flag == "--limit" else str(value)]
    if not args.log_samples:
        argv.append("--no-log-samples")
    return argv


def _without_num_processes(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--num-processes":
            skip = True
            continue
        if item.startswith("--num-processes="):
            continue
        out.append(item)
    return out


def evaluate(args) -> int:
    """Run the evaluation in this process (one rank of it under ``accelerate launch``)."""
    from lmms_eval import evaluator, utils
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.tasks import TaskManager

    from . import MODEL_NAME, register
    from .lmms_model import VTPruneLMM

    register()
    include_paths = _include_paths(args, export=None if _in_distributed_launch() else True)
    task_manager = TaskManager(args.verbosity, include_path=include_paths or None, model_name=MODEL_NAME)
    tasks = _task_list(args)
    matched = task_manager.match_tasks(tasks)
    missing = [t for t in tasks if t not in matched and "*" not in t]
    if missing:
        print(f"vtprune eval: unknown lmms-eval task(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    model_args = model_args_string(args)
    lm = VTPruneLMM.create_from_arg_string(model_args, {"batch_size": args.batch_size})
    tracker = EvaluationTracker(output_path=args.output)
    datetime_str = utils.get_datetime_str()
    limit = None if args.limit is None else (int(args.limit) if float(args.limit).is_integer() else args.limit)
    results = evaluator.simple_evaluate(
        model=lm, model_args=model_args, tasks=matched, batch_size=args.batch_size, limit=limit,
        log_samples=args.log_samples, evaluation_tracker=tracker, task_manager=task_manager,
        gen_kwargs=args.gen_kwargs, verbosity=args.verbosity, datetime_str=datetime_str)
    if results is None:  # not the main process
        return 0
    results["config"]["model"] = MODEL_NAME
    results["vtprune"] = lm.vtprune_summary()
    samples = results.pop("samples", None) if args.log_samples else None
    tracker.save_results_aggregated(results=results, samples=samples, datetime_str=datetime_str)
    if args.log_samples and samples:
        for task_name in results.get("configs", {}):
            if task_name in samples:
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    print(utils.make_table(results))
    if "groups" in results:
        print(utils.make_table(results, "groups"))
    print(summary_line(results["vtprune"]))
    folder = Path(args.output) / tracker.general_config_tracker.model_name_sanitized
    print(f"results: {folder / (datetime_str.replace(':', '-') + '_results.json')}")
    return 0


def summary_line(summary: dict) -> str:
    if not summary.get("requests"):
        return f"vtprune: {summary.get('method_description')}: no request carried an image"
    return (f"vtprune: {summary['method_description']}: visual tokens per request "
            f"{summary['mean_visual_tokens_before_pruning']:.1f} -> entering the LLM "
            f"{summary['mean_visual_tokens_entering_llm']:.1f}, layer-averaged "
            f"{summary['mean_visual_tokens_layer_averaged']:.1f} ({summary['requests']} requests)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    return run_eval(args, argv)


if __name__ == "__main__":
    sys.exit(main())
