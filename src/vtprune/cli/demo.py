"""``vtprune demo`` (the README's first command) and ``vtprune generate``."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .arguments import add_method_arguments, default_method_args, parse_method_args

DEFAULT_DEMO_METHOD = "occamtoken"


def add_demo_cli(sub) -> None:

    p = sub.add_parser("demo", help="prune the shipped demo model on a few scenes; prints answers, tokens, time")
    p.add_argument("--scenes", type=int, default=4, help="number of test scenes (default 4)")
    p.add_argument("--out", default="vtprune-demo", help="folder for the overlay pictures")
    add_method_arguments(p, DEFAULT_DEMO_METHOD)
    p.set_defaults(func=run_demo)


def add_generate_cli(sub) -> None:

    p = sub.add_parser("generate", help="answer a prompt about one image with and without pruning")
    p.add_argument("--model", required=True, help="local path of a supported HF VLM (with its processor)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="question; the model's chat template is applied")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", default=None, help="write the kept-token overlay PNG here")
    add_method_arguments(p, DEFAULT_DEMO_METHOD)
    p.set_defaults(func=run_generate)


PREFILL_REPEATS = 5  # timed prefills per answer, after one warm-up; the median is shown


def _timed_generate(model, inputs, max_new_tokens):
    with torch.no_grad():
        model(**inputs, use_cache=False)  # warm-up: the first call pays for allocations and lazy set-up
        times = []
        for _ in range(PREFILL_REPEATS):
            start = time.perf_counter()
            model(**inputs, use_cache=False)
            times.append(time.perf_counter() - start)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:], sorted(times)[len(times) // 2]


def compare(model, processor, inputs, method_name, method_args, max_new_tokens=8):
    """Answer with and without pruning: (answer_full, answer_pruned, stats, prefill_full, prefill_pruned)."""
    import vtprune

    full_ids, prefill_full = _timed_generate(model, inputs, max_new_tokens)
    with vtprune.pruned(model, method_name, **method_args) as handle:
        pruned_ids, prefill_pruned = _timed_generate(model, inputs, max_new_tokens)
        stats = handle.stats[-1]  # the generate() prefill
    decode = processor.batch_decode if processor is not None else (lambda ids, **k: [str(i.tolist()) for i in ids])
    return (decode(full_ids, skip_special_tokens=True)[0].strip(), decode(pruned_ids, skip_special_tokens=True)[0].strip(),
            stats, prefill_full, prefill_pruned)


def run_demo(args) -> int:

    from ..demo import MODEL_DIR

    method_args = parse_method_args(args.arg) or default_method_args(args.method, MODEL_DIR)
    import vtprune

    vtprune.make_method(args.method, **method_args)  # a misspelt method or argument fails here, in one line
    try:
        from ..demo import load_demo_model
        model, processor = load_demo_model()
    except Exception as error:  # the shipped checkpoint is optional while it is being trained
        return _tiny_demo(args, method_args, error)
    from ..demo.scenes import make_split
    from ..demo.tokenizer import prompt
    from ..viz import save_overlay

    out_dir = Path(args.out)
    print(f"vtprune demo: the shipped scenes model (LLaVA architecture, 576 visual tokens), method {args.method} "
          f"{method_args}")
    rows = []
    for i, item in enumerate(make_split("test", args.scenes)):
        image = item.image()
        inputs = processor(images=image, text=prompt(item.question), return_tensors="pt")
        full, pruned, stats, t_full, t_pruned = compare(model, processor, inputs, args.method, method_args, 2)
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        path = save_overlay(out_dir / f"scene_{i}.png", image, stats.images[0].kept_cells, [(side, side)])
        kept = _final_tokens(stats)
        rows.append((item.question, item.answer, full.split()[0] if full else "", pruned.split()[0] if pruned else "",
                     stats.images[0].candidates, kept, t_full, t_pruned, path))
    _print_rows(rows)
    return 0


def _final_tokens(stats) -> int:
    """Visual tokens of the first image left after every stage (registers included)."""
    image = stats.images[0]
    stages = stats.llm_stages.get(0)
    return (max(stages.items())[1] if stages else image.after_pre_llm) + image.registers


def _print_rows(rows) -> None:
    header = f"{'question':44} {'truth':8} {'full':8} {'pruned':8} {'tokens':>9} {'prefill ms':>15}"
    print(f"prefill ms: median of {PREFILL_REPEATS} runs after a warm-up, without -> with pruning")
    print(header)
    print("-" * len(header))
    for q, truth, full, pruned, n, kept, t_full, t_pruned, path in rows:
        print(f"{q[:44]:44} {truth:8} {full[:8]:8} {pruned[:8]:8} {kept:>4}/{n:<4} "
              f"{t_full * 1e3:6.1f}->{t_pruned * 1e3:6.1f}")
    print(f"overlays: {', '.join(str(r[-1]) for r in rows)}")


def _tiny_demo(args, method_args, error) -> int:
    from ..tiny import Sample, make_inputs, tiny_model

    print(f"vtprune demo: the shipped demo model is not available ({error}).")
    print("Running on a tiny random-weight LLaVA built from a config instead: the answers are noise; "
          "the token counts and the mechanics are real.")
    model = tiny_model("llava")
    if "keep" in method_args and method_args["keep"] >= 16:  # the tiny tower has 16 patches
        method_args = {**{k: v for k, v in method_args.items() if k != "keep"}, "ratio": 0.25}
    if args.method == "occamtoken":  # the tiny decoder has 4 layers
        method_args = {"layer": 1, "lambda1": 1.0, **method_args}
    inputs = make_inputs(model, [Sample([1, 7, 8], [9, 10, 11], 0)])
    full, pruned, stats, t_full, t_pruned = compare(model, None, inputs, args.method, method_args)
    print(f"tokens entering the LLM: {stats.images[0].after_pre_llm} of {stats.images[0].candidates}; "
          f"prefill {t_full * 1e3:.1f} ms -> {t_pruned * 1e3:.1f} ms; answers {full} / {pruned}")
    return 0


def run_generate(args) -> int:
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..viz import save_overlay

    import vtprune

    from ..errors import InputError

    method_args = parse_method_args(args.arg) or default_method_args(args.method, args.model)
    vtprune.make_method(args.method, **method_args)  # a misspelt method or argument fails before loading
    if not Path(args.image).is_file():
        raise InputError(f"--image {args.image!r} is not a file; give the path of an image (PNG, JPEG, ...).")
    if not Path(args.model).is_dir():
        raise InputError(f"--model {args.model!r} is not a folder; give the local folder of a transformers "
                         f"checkpoint (vtprune does not download models).")
    model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    image = Image.open(args.image).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
    full, pruned, stats, t_full, t_pruned = compare(model, processor, inputs, args.method, method_args,
                                                    args.max_new_tokens)
    im = stats.images[0]
    print(f"without pruning ({t_full * 1e3:.0f} ms prefill): {full}")
    print(f"{args.method} {method_args} ({t_pruned * 1e3:.0f} ms prefill, {im.after_pre_llm} of {im.candidates} "
          f"visual tokens entered the LLM): {pruned}")
    if args.out and model.config.model_type == "llava":
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        print(f"overlay: {save_overlay(args.out, image, im.kept_cells, [(side, side)])}")
    return 0
