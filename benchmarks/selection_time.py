"""Selection time of every pruning method on synthetic contexts, no model (issue 21).

Times ``select_vision`` / ``select_projected`` / ``select_llm`` alone — the method's own tensor logic —
on random inputs of two sizes:

* ``576``: one crop of 24×24 tokens (LLaVA-1.5), 1024-d features, keep 64;
* ``2880``: five crops of 24×24 (LLaVA-NeXT base + 2×2 crops, flat layout), 1024-d features, keep 64.

LLM-stage methods get a sample of BOS + the visual tokens (+ one register for OccamToken) + 32 text
tokens, 1024-d hidden states, 16 heads of precomputed attention rows for the text tokens and 8 heads
of 128-d keys; they are timed at their first pruning layer. Each method runs ``--warmup`` times, then
``--repeats`` timed runs; the table gives the median (and the 25th–75th percentiles in the JSON).

    python benchmarks/selection_time.py --out benchmarks/results/2026-12-02_cpu_selection-time.json \
        [--compare-src /path/to/old/src --compare-label COMMIT] [--before OLD.json]

``--compare-src`` times the code of another source tree (e.g. ``git archive COMMIT src``) in a child
process, alternating with this one configuration by configuration, so that both columns see the same
machine state; ``--before`` copies the medians of an earlier JSON of this script instead. Either way
the table and the JSON carry both columns (before / after) and the speed-up.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from vtprune.methods import make_method
from vtprune.methods.base import ImageContext, LLMContext

DIM = 1024
KEEP = 64
SIDE = 24
TEXT = 32
HEADS = 16


def image_context(crops: int, seed: int = 0, registers: bool = False, device: str = "cpu") -> ImageContext:
    g = torch.Generator().manual_seed(seed)
    per = SIDE * SIDE
    n = per * crops
    feats = torch.randn(n, DIM, generator=g)
    cols = per + (1 if registers else 0)
    rows = [torch.softmax(torch.randn(HEADS, cols, generator=g) * 2, -1) for _ in range(crops)]
    cls = torch.cat([r[:, :per] for r in rows] + ([r[:, per:] for r in rows] if registers else []), 1)
    vattn = torch.softmax(torch.randn(crops, HEADS, per + 1, per + 1, generator=g), -1)
    received = torch.rand(n, generator=g)
    text = torch.randn(TEXT, DIM, generator=g)
    hidden = torch.randn(n, DIM, generator=g)
    reg_received = torch.rand(crops, generator=g) * 0.5
    keys = torch.randn(HEADS, n, DIM // HEADS, generator=g)  # the feature layer's keys (VisionZip's metric)
    t = {k: v.to(device) for k, v in dict(feats=feats, cls=cls, vattn=vattn, received=received, text=text,
                                          hidden=hidden, reg_received=reg_received, keys=keys).items()}
    providers = {"cls_attention": lambda: t["cls"], "received_attention": lambda: t["received"],
                 "vision_attention": lambda layer: t["vattn"], "text_embeddings": lambda: t["text"],
                 "hidden": lambda layer: t["hidden"], "register_received_attention": lambda: t["reg_received"],
                 "keys": lambda: t["keys"]}
    slices = [slice(i * per, (i + 1) * per) for i in range(crops)]
    return ImageContext(features=t["feats"], grids=[(SIDE, SIDE)] * crops, crop_slices=slices,
                        family="llava" if crops == 1 else "llava_next", image_index=0,
                        extra=1 if registers else 0, providers=providers)


def llm_context(v: int, seed: int = 0, registers: int = 0, device: str = "cpu") -> LLMContext:
    g = torch.Generator().manual_seed(seed)
    length = 1 + v + registers + TEXT
    hidden = torch.randn(length, DIM, generator=g).to(device)
    first_text = 1 + v + registers
    logits = torch.randn(HEADS, TEXT, length, generator=g) * 2
    causal = torch.arange(length)[None, :] <= torch.arange(first_text, length)[:, None]
    rows = torch.softmax(logits.masked_fill(~causal, -float("inf")), -1).to(device)  # (H, TEXT, L)
    keys = torch.randn(8, length, 128, generator=g).to(device)
    visual = torch.arange(1, 1 + v, device=device)
    regs = torch.arange(1 + v, 1 + v + registers, device=device)
    text = torch.arange(first_text, length, device=device)

    own_rows = torch.softmax((torch.randn(HEADS, TEXT, length, generator=g) * 2).masked_fill(~causal, -float("inf")),
                             -1).to(device)  # the pruning layer's own attention (PyramidDrop)
    embeddings = (torch.randn(v, DIM, generator=g).to(device), torch.randn(TEXT, DIM, generator=g).to(device))
    norm_weight = (1 + 0.1 * torch.randn(DIM, generator=g)).to(device)

    def attention(q, rows=rows):
        return rows.index_select(1, torch.as_tensor(q, device=rows.device) - first_text)

    providers = {"attention": attention, "keys": lambda: keys,
                 "layer_attention": lambda q: attention(q, own_rows),
                 "input_embeddings": lambda: embeddings,  # the first decoder layer's inputs (SparseVLM's raters)
                 "final_norm": lambda x: torch.nn.functional.rms_norm(x, (DIM,), norm_weight, 1e-6)}  # DART
    return LLMContext(hidden=hidden, visual=visual, text_after=text, layer=2, stage_index=0, family="llava",
                      original_visual=v, providers=providers, registers=regs)


def ocvtp_checkpoint() -> str:
    from vtprune.ocvtp.pruner import PrunerConfig, SlotPruner, save_pruner

    torch.manual_seed(0)
    return str(save_pruner(SlotPruner(PrunerConfig(input_dim=DIM, layer=9)), Path("/tmp/vtprune_bench_ocvtp")))


def methods(ckpt: str | None):
    """(row name, stage, factory) for every method."""
    out = [
        ("cls_topk", "vision", lambda: make_method("cls_topk", keep=KEEP)),
        ("random", "vision", lambda: make_method("random", keep=KEEP)),
        ("pooling", "vision", lambda: make_method("pooling", keep=KEEP)),
        ("visionzip", "vision", lambda: make_method("visionzip", keep=KEEP)),
        ("vispruner", "vision", lambda: make_method("vispruner", keep=KEEP)),
        ("hiprune", "vision", lambda: make_method("hiprune", keep=KEEP)),
        ("occamtoken stage I (λ1)", "vision-reg", lambda: _occam(lambda1=0.5)),
        ("occamtoken stage I (keep)", "vision-reg", lambda: _occam(keep=KEEP)),
        ("divprune", "projected", lambda: make_method("divprune", keep=KEEP)),
        ("cdpruner", "projected", lambda: make_method("cdpruner", keep=KEEP)),
        ("fastv", "llm", lambda: make_method("fastv", keep=KEEP)),
        ("pyramiddrop (stage 1)", "llm", lambda: make_method("pyramiddrop", keep=KEEP)),
        ("dart", "llm", lambda: make_method("dart", keep=KEEP)),
        ("sparsevlm (stage 1, rank rule)", "llm", lambda: make_method("sparsevlm", keep=KEEP)),
        ("occamtoken stage II (λ2=1)", "llm-reg", lambda: _occam(lambda2=1.0)),
    ]
    if ckpt is not None:
        out.append(("ocvtp (random pruner)", "vision", lambda: make_method("ocvtp", keep=KEEP, checkpoint=ckpt)))
    return out


def _occam(**kw):
    return make_method("occamtoken", neurons=[], **kw).bind("llava", 32)


def similarity_macs(name: str, crops: int) -> int | None:
    """Multiply-adds of the token-similarity matrices a method builds with its default arguments (None:
    it builds none): DivPrune N²·D over all crops together, CDPruner N²·D per crop; VisPruner, per crop
    (equal budgets), its rounds of near-duplicate removal: R tokens left → the even positions against the
    odd ones, ⌈R/2⌉·⌊R/2⌋·D, 8 fewer tokens each round (the official code)."""
    n, per = SIDE * SIDE * crops, SIDE * SIDE
    if name == "divprune":
        return n * n * DIM  # all crops together
    if name == "cdpruner":
        return crops * per * per * DIM
    if name == "vispruner":
        from vtprune.methods.vispruner import equal_budget, removal_rounds

        total = 0
        for budget in equal_budget(KEEP, [per] * crops):
            important = int(budget * 0.5)  # the default important_ratio
            residual = per - important
            for removed in removal_rounds(residual, budget - important):
                total += (residual + 1) // 2 * (residual // 2) * DIM
                residual -= removed
        return total
    return None


def time_one(factory, stage: str, crops: int, warmup: int, repeats: int, device: str) -> dict:
    n = SIDE * SIDE * crops
    if stage.startswith("llm"):
        ctx = llm_context(n, registers=1 if stage == "llm-reg" else 0, device=device)
        call = lambda m: m.select_llm(ctx)  # noqa: E731
    else:
        ctx = image_context(crops, registers=stage == "vision-reg", device=device)
        call = (lambda m: m.select_projected(ctx)) if stage == "projected" else (lambda m: m.select_vision(ctx))  # noqa: E731
    method = factory()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        call(method)
    sync()
    times = []
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            sel = call(method)
            sync()
            times.append(time.perf_counter() - start)
    finally:
        gc.enable()
    return {"times": times, "kept": int(sel.keep.numel())}


def summary(times: list[float], prefix: str = "") -> dict:
    q = statistics.quantiles(sorted(times), n=4)
    return {f"{prefix}median_ms": 1e3 * statistics.median(times), f"{prefix}p25_ms": 1e3 * q[0],
            f"{prefix}p75_ms": 1e3 * q[2], f"{prefix}repeats": len(times)}


class Baseline:
    """This script in a child process that imports vtprune from ``src`` (the code before a change), so
    that both are timed in alternation on the same machine state (a shared machine drifts)."""

    def __init__(self, src: str, threads: int, ckpt: str | None):
        import subprocess

        env = {**os.environ, "PYTHONPATH": src}
        cmd = [sys.executable, __file__, "--serve", "--threads", str(threads)] + ([] if ckpt else ["--no-ocvtp"])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.source = self.ask({"what": "source"})["source"]

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def serve(args) -> int:
    ckpt = None if args.no_ocvtp else ocvtp_checkpoint()
    table = {name: (stage, factory) for name, stage, factory in methods(ckpt)}
    for line in sys.stdin:
        req = json.loads(line)
        if req["what"] == "source":
            out = {"source": str(Path(sys.modules["vtprune"].__file__).parent)}
        else:
            stage, factory = table[req["name"]]
            out = time_one(factory, stage, req["crops"], req["warmup"], req["repeats"], args.device)
        print(json.dumps(out), flush=True)
    return 0


def _cpu_name() -> str:
    # imported here: the child that times an older source tree (--compare-src) imports this script with
    # that tree's vtprune, which may predate this helper
    from vtprune.bench.latency import cpu_name

    return cpu_name()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--before", help="an earlier JSON of this script: adds its medians as a 'before' column")
    p.add_argument("--compare-src", help="a source tree (its src/ folder) of the code before a change: timed in "
                                         "alternation with this one, in a child process, for the 'before' column")
    p.add_argument("--compare-label", default="before", help="what --compare-src is (e.g. a commit)")
    p.add_argument("--rounds", type=int, default=2, help="with --compare-src: alternations per configuration")
    p.add_argument("--label", default="after", help="name of this run's column (default: after)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20, help="timed runs per configuration (and side)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", nargs="*", help="row names (prefixes) to run")
    p.add_argument("--no-ocvtp", action="store_true", help="skip ocvtp (it builds a random pruner)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    if args.serve:
        return serve(args)
    if not args.out:
        p.error("--out is required")
    ckpt = None if args.no_ocvtp else ocvtp_checkpoint()
    sizes = {"576": 1, "2880": 5}
    before = json.loads(Path(args.before).read_text()) if args.before else None
    baseline = Baseline(args.compare_src, args.threads, ckpt) if args.compare_src else None
    rounds = max(1, args.rounds) if baseline else 1
    per_round = -(-args.repeats // rounds)
    results: dict = {}
    try:
        for name, stage, factory in methods(ckpt):
            if args.only and not any(name.startswith(o) for o in args.only):
                continue
            results[name] = {}
            for label, crops in sizes.items():
                mine, theirs = [], []
                for _ in range(rounds):
                    mine += time_one(factory, stage, crops, args.warmup, per_round, args.device)["times"]
                    if baseline:
                        theirs += baseline.ask({"what": "time", "name": name, "crops": crops, "warmup": args.warmup,
                                                "repeats": per_round})["times"]
                r = summary(mine)
                macs = similarity_macs(name, crops)
                if macs is not None:
                    r["similarity_macs"] = macs
                if theirs:
                    r.update(summary(theirs, "before_"))
                elif before is not None and name in before["results"] and label in before["results"][name]:
                    r["before_median_ms"] = before["results"][name][label]["median_ms"]
                if "before_median_ms" in r:
                    r["speedup"] = r["before_median_ms"] / r["median_ms"]
                results[name][label] = r
                extra = f"  (before {r['before_median_ms']:9.2f} ms)" if "before_median_ms" in r else ""
                print(f"  {name:34s} {label:>5s}: {r['median_ms']:9.2f} ms{extra}", file=sys.stderr, flush=True)
    finally:
        if baseline:
            baseline.close()
    command = "python " + " ".join(["benchmarks/selection_time.py"] + (argv if argv is not None else sys.argv[1:]))
    if os.environ.get("PYTHONPATH"):
        command = f"PYTHONPATH={os.environ['PYTHONPATH']} {command}"
    doc = {
        "what": "selection time of each vtprune method alone (select_* on synthetic contexts, no model)",
        "command": command,
        "date": datetime.date.today().isoformat(),
        "git_commit": _git_commit(),
        "vtprune_source": str(Path(sys.modules["vtprune"].__file__).parent),
        "device": args.device if args.device != "cpu" else _cpu_name(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "setup": {"dim": DIM, "keep": KEEP, "576": "1 crop of 24x24", "2880": "5 crops of 24x24 (flat)",
                  "llm": f"BOS + visual (+1 register for occamtoken) + {TEXT} text tokens, {HEADS} heads of "
                         f"attention rows, 8x128-d keys",
                  "warmup": args.warmup, "repeats": args.repeats, "statistic": "median (p25, p75) of repeats",
                  "similarity_macs": "multiply-adds of the token-similarity matrices the method builds with its "
                                     "defaults (divprune: N²·D, all crops together; cdpruner: N²·D per crop; "
                                     "vispruner: per crop, every round of its near-duplicate removal, "
                                     "⌈R/2⌉·⌊R/2⌋·D with R tokens left; FLOPs are twice these)"},
        "column": args.label,
        "results": results,
    }
    if baseline:
        doc["before"] = {"source": baseline.source, "label": args.compare_label,
                         "how": f"timed in a child process importing that source, alternating with this one "
                                f"({rounds} rounds of {per_round} repeats per configuration and side)"}
    elif before is not None:
        doc["before"] = {"command": before.get("command"), "git_commit": before.get("git_commit"),
                         "date": before.get("date")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    print(table(doc))
    return 0


def table(doc: dict) -> str:
    has_before = "before" in doc
    head = "| method | tokens | " + ("before ms | after ms | speed-up |" if has_before else "ms |") + " similarity MACs |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, by in doc["results"].items():
        for label, r in by.items():
            macs = r.get("similarity_macs")
            macs = f"{macs / 1e9:.2f} G" if macs else ""
            if has_before:
                b = r.get("before_median_ms")
                cells = (f"{b:.2f}" if b is not None else "", f"{r['median_ms']:.2f}",
                         f"{r['speedup']:.1f}×" if b is not None else "")
            else:
                cells = (f"{r['median_ms']:.2f}",)
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + f" | {macs} |")
    return "\n".join(lines)


def _git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    raise SystemExit(main())
