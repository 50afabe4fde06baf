"""Serving throughput of pruned vs unpruned LLaVA on vLLM (CPU), in one run. Not a test.

    python tests_vllm/bench_throughput.py [--model PATH] [--requests 32] [--method M] [--keep 64] [--args JSON]

Without ``--model`` it builds a model of the shipped demo model's architecture (CLIP-style tower at
336 px, patch 14: 576 patch tokens; 4-layer Llama) with random weights — the decoder uses 5 heads of
32 instead of 4 of 40 because vLLM's CPU attention supports head sizes 32, 64, 80, ... only. Both
engines see the same requests (rendered demo scenes, one question each, greedy, a fixed number of
new tokens) and take turns, round by round; it prints requests/s and tokens/s for each and the
pruned/unpruned ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def build_demo_shaped(path: Path) -> Path:
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from tiny_checkpoints import _save_state, _spread
    from vtprune.demo import scenes
    from vtprune.demo.tokenizer import build_processor

    processor = build_processor()
    tok = processor.tokenizer
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=scenes.IMAGE_SIZE, patch_size=scenes.PATCH, hidden_size=128,
                                       intermediate_size=256, num_hidden_layers=4, num_attention_heads=4),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=160, intermediate_size=384, num_hidden_layers=4,
                                num_attention_heads=5, num_key_value_heads=5, max_position_embeddings=1024,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    _spread(model)
    path.mkdir(parents=True, exist_ok=True)
    model.config.architectures = ["LlavaForConditionalGeneration"]
    model.config.save_pretrained(path)
    pre = "model.vision_tower."
    _save_state(model, path, lambda k: pre + "vision_model." + k[len(pre):]
                if k.startswith(pre) and not k.startswith(pre + "vision_model.") else k)
    processor.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_engine(path: str, overrides: dict | None, max_num_seqs: int):
    from vllm import LLM

    kwargs = dict(model=path, dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=max_num_seqs,
                  seed=0, enable_prefix_caching=False)  # every request pays its prefill
    if overrides:
        kwargs["hf_overrides"] = overrides
    return LLM(**kwargs)


def timed(llm, requests: list[dict], params) -> tuple[float, int, int]:
    start = time.perf_counter()
    outs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return (seconds, sum(len(o.prompt_token_ids) for o in outs), sum(len(o.outputs[0].token_ids) for o in outs))


def summary(runs: list[tuple[float, int, int]], n_requests: int) -> dict:
    seconds = sum(r[0] for r in runs)
    prompt = sum(r[1] for r in runs)
    generated = sum(r[2] for r in runs)
    n = n_requests * len(runs)
    return {"seconds": seconds, "requests": n, "requests_per_s": n / seconds, "prompt_tokens": prompt,
            "generated_tokens": generated, "generated_tokens_per_s": generated / seconds,
            "total_tokens_per_s": (prompt + generated) / seconds, "mean_prompt_len": prompt / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a LLaVA checkpoint (llava-hf layout); default: a demo-shaped random model")
    p.add_argument("--requests", type=int, default=32, help="requests per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the two engines alternate")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--method", default="cls_topk")
    p.add_argument("--keep", type=int, default=64)
    p.add_argument("--args", default="{}", help='the method\'s other arguments, JSON (occamtoken: \'{"stage2": false}\')')
    p.add_argument("--out", help="also write the report (JSON) here")
    args = p.parse_args()

    from vtprune.demo import scenes
    from vtprune.demo.tokenizer import prompt as demo_prompt

    path = args.model or str(build_demo_shaped(Path(tempfile.mkdtemp(prefix="vtprune-bench-")) / "model"))
    def batch(start: int) -> list[dict]:
        return [{"prompt": demo_prompt(ex.question), "multi_modal_data": {"image": scenes.render(ex.scene)}}
                for ex in scenes.make_split("test", args.requests, start=start)]

    warmup = batch(0)[:2]
    rounds = [batch(2 + r * args.requests) for r in range(args.rounds)]  # fresh scenes every round
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, min_tokens=args.new_tokens)
    # both engines live side by side and take turns, so that load from other processes hits both alike
    plain = make_engine(path, None, args.max_num_seqs)
    pruning = make_engine(path, {"architectures": ["VTPruneLlavaForConditionalGeneration"],
                                 "vtprune_method": args.method, "vtprune_keep": args.keep,
                                 "vtprune_args": json.loads(args.args)}, args.max_num_seqs)
    for llm in (plain, pruning):
        llm.generate(warmup, params, use_tqdm=False)
    runs_full, runs_pruned = [], []
    for requests in rounds:
        runs_full.append(timed(plain, requests, params))
        runs_pruned.append(timed(pruning, requests, params))
    for llm in (plain, pruning):
        llm.llm_engine.engine_core.shutdown()
    full, pruned = summary(runs_full, args.requests), summary(runs_pruned, args.requests)
    report = {"model": path, "requests_per_round": args.requests, "rounds": args.rounds, "new_tokens": args.new_tokens,
              "method": args.method, "keep": args.keep, "args": json.loads(args.args), "unpruned": full, "pruned": pruned,
              "ratio_requests_per_s": pruned["requests_per_s"] / full["requests_per_s"],
              "ratio_generated_tokens_per_s": pruned["generated_tokens_per_s"] / full["generated_tokens_per_s"]}
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print("THROUGHPUT " + json.dumps(report))


if __name__ == "__main__":
    main()
