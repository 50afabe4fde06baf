"""The lmms-eval model ``vtprune``: a Hugging Face VLM from a local path, pruned by a vtprune method.

Registered with lmms-eval through the ``lmms_eval.models`` entry point (see ``vtprune.eval``)::

    python -m lmms_eval --model vtprune \\
        --model_args pretrained=/models/llava-1.5-7b-hf,method=cls_topk,keep=64 \\
        --tasks gqa,pope --batch_size 8 --output_path out/ --log_samples

``--model_args`` (comma separated ``name=value``):

* ``pretrained`` -- local folder of a supported model and its processor (LLaVA-1.5, LLaVA-NeXT,
  Qwen2.5-VL, Qwen3-VL); ``demo`` names the shipped scenes model.
* ``method`` -- a vtprune method name (``vtprune methods``), or ``none`` (default) for the
  unmodified model. Every argument this class does not know is passed to the method, e.g.
  ``keep=64``, ``ratio=0.25``, ``layer=2``.
* ``layout`` -- LLaVA-NeXT only: ``model`` or ``flat`` (default: the method's own, see ``vtprune.apply``).
* ``device`` (default ``cuda`` when available, else ``cpu``; under ``accelerate launch`` each
  process takes its own device), ``dtype`` (``auto``: the checkpoint's dtype on a GPU, float32 on
  the CPU; or ``float32``/``bfloat16``/``float16``), ``attn_implementation`` (default: the model's),
  ``batch_size``, ``max_new_tokens`` (default for tasks that set none: 1024), ``threads`` (CPU
  threads per process), ``stats_path`` (also write the token statistics to this JSON file),
  ``min_pixels`` / ``max_pixels`` (Qwen processors: the image resolution range), ``device_map``
  (e.g. ``auto``: one large model over several GPUs, single process).

Kept visual tokens are recorded per request (padding requests that lmms-eval adds to balance ranks
are skipped), gathered over all processes when lmms-eval calls ``clean()`` at the end of the run,
and reported (a) in the results JSON under ``throughput`` as
``avg_vtprune_visual_tokens_entering_llm`` and ``avg_vtprune_visual_tokens_layer_averaged``,
(b) in ``stats_path`` when given, and (c) under ``vtprune`` in the results written by
``vtprune eval``. For ``method=none`` the counts are the image placeholder tokens of the prompt
(LLaVA-NeXT: including its newline tokens), i.e. what entered the unmodified LLM.
Per sample, ``token_counts.input_tokens`` in the logged samples is the prompt length that entered
the LLM (text and kept visual tokens).
"""
from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger
from tqdm import tqdm

NO_METHOD = ("none", "", None)


def resolve_pretrained(pretrained: str) -> str:
    """A local model folder for ``pretrained`` (``demo`` means the shipped scenes model)."""
    if str(pretrained).lower() == "demo":
        from .. import demo

        folder = Path(getattr(demo, "MODEL_DIR", Path(demo.__file__).resolve().parent / "model"))
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"The shipped demo model is missing from {folder} (see vtprune.demo.train).")
        return str(folder)
    path = Path(pretrained).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"pretrained={pretrained!r} is not a local folder. The vtprune lmms-eval model loads local "
            "checkpoints only (download the model first, e.g. `hf download ORG/NAME --local-dir DIR`).")
    return str(path)


def build_prompt(processor, text: str, n_images: int) -> str:
    """The model's own chat template around ``text`` with ``n_images`` images.

    Images go before the text unless ``text`` holds ``<image>`` markers, which are replaced in place.
    """
    marker = "<image>"
    if marker in text:
        parts = text.split(marker)
        content: list[dict] = []
        for i, part in enumerate(parts):
            if i:
                content.append({"type": "image"})
            if part.strip():
                content.append({"type": "text", "text": part.strip()})
    else:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    tokenizer = getattr(processor, "tokenizer", processor)
    image_token = getattr(processor, "image_token", marker)
    if getattr(tokenizer, "chat_template", None):
        flat = "".join(image_token + "\n" if c["type"] == "image" else c["text"] for c in content)
        return tokenizer.apply_chat_template([{"role": "user", "content": flat}], add_generation_prompt=True,
                                             tokenize=False)
    flat = "".join(image_token + "\n" if c["type"] == "image" else c["text"] for c in content)
    return f"USER: {flat} ASSISTANT:"  # LLaVA-1.5's conversation format


def _flatten(visuals) -> list:
    out = []
    for v in visuals or []:
        if isinstance(v, (list, tuple)):
            out.extend(_flatten(v))
        elif v is not None:
            out.append(v)
    return out


class VTPruneLMM(lmms):
    """lmms-eval model: a supported HF VLM (local path) with a vtprune method applied."""

    is_simple = True

    def __init__(self, pretrained: str, method: str | None = "none", layout: str | None = None,
                 device: str | None = None, dtype: str = "auto", attn_implementation: str | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, max_new_tokens: int = 1024,
                 threads: int | None = None, stats_path: str | None = None, trust_remote_code: bool = False,
                 min_pixels: int | None = None, max_pixels: int | None = None, device_map: str | None = None,
                 **method_kwargs: Any) -> None:
        super().__init__()
        from accelerate import Accelerator
        from transformers import AutoModelForImageTextToText, AutoProcessor

        import vtprune
        from vtprune.models import family_of

        accelerator = Accelerator()
        self.accelerator = accelerator
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and accelerator.num_processes != world:
            raise RuntimeError(
                f"WORLD_SIZE is {world} but accelerate sees {accelerator.num_processes} process(es) "
                f"({accelerator.distributed_type}). On a machine without GPUs launch with "
                "`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N ...`.")
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes
        if accelerator.num_processes > 1:
            self._device = accelerator.device
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self._device.type == "cpu":
            n = int(threads) if threads else max(1, (os.cpu_count() or 1) // max(1, accelerator.num_processes))
            torch.set_num_threads(n)
        if dtype == "auto":
            torch_dtype = torch.float32 if self._device.type == "cpu" else "auto"
        else:
            torch_dtype = getattr(torch, str(dtype))

        self.pretrained = str(pretrained)
        path = resolve_pretrained(self.pretrained)
        load = {"dtype": torch_dtype, "trust_remote_code": bool(trust_remote_code)}
        if attn_implementation:
            load["attn_implementation"] = attn_implementation
        if device_map and accelerator.num_processes == 1:  # one model spread over several GPUs
            self._model = AutoModelForImageTextToText.from_pretrained(path, device_map=device_map, **load).eval()
            self._device = self._model.get_input_embeddings().weight.device
        else:
            self._model = AutoModelForImageTextToText.from_pretrained(path, **load).to(self._device).eval()
        processor_kwargs = {k: int(v) for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
                            if v is not None}  # Qwen processors: the image resolution range
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=bool(trust_remote_code),
                                                       **processor_kwargs)
        self._tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self._tokenizer.padding_side = "left"  # batched generation: prompts end at the same column
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        gen_eos = getattr(getattr(self._model, "generation_config", None), "eos_token_id", None)
        gen_eos = gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]
        self._eos_ids = {t for t in [*gen_eos, self._tokenizer.eos_token_id] if t is not None}
        # an answer ends at the end-of-sequence token or at any other special token (padding,
        # unknown, image placeholders are never part of an answer): the first generated word is
        # then the same as a one-step greedy evaluation's (vtprune.demo.bench)
        self._stop_ids = self._eos_ids | set(getattr(self._tokenizer, "all_special_ids", []) or [])
        self.family = family_of(self._model)
        text_cfg = getattr(self._model.config, "text_config", self._model.config)
        self.num_layers = int(text_cfg.num_hidden_layers)
        self.image_token_id = getattr(self._model.config, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(self._model.config, "image_token_index", None)

        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1
        self.default_max_new_tokens = int(max_new_tokens)
        self.stats_path = stats_path
        self.method_name = None if method in NO_METHOD or str(method).lower() == "none" else str(method)
        self.method_kwargs = {k: _bracketed_tuple(v) for k, v in method_kwargs.items()}
        self.layout = layout
        self.handle = None
        if self.method_name is not None:
            options = {"layout": layout} if layout else {}
            self.handle = vtprune.apply(self._model, self.method_name, **options, **self.method_kwargs)
        elif self.method_kwargs:
            raise TypeError(f"Unexpected model arguments without a method: {sorted(self.method_kwargs)}")
        self.method_description = self.handle.method.describe() if self.handle else "none"

        self._records: list[dict] = []  # one per (non-padding) request: visual tokens of its prompt
        self._gen_seconds = 0.0
        self._gen_tokens = 0
        self._summary: dict | None = None
        if self._rank == 0:
            eval_logger.info(f"vtprune: {self.family} model from {path}, method {self.method_description}, "
                             f"{self._world_size} process(es), device {self._device}")

    # -- lmms-eval plumbing ----------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self):
        return self._tokenizer.eos_token_id

    @property
    def config(self):
        return self._model.config

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _encode(self, texts: list[str], images: list) -> dict:
        kwargs = {"text": texts, "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = images
        inputs = self.processor(**kwargs)
        out = {}
        for key, value in inputs.items():
            if torch.is_tensor(value):
                value = value.to(self._device)
                if value.is_floating_point():
                    value = value.to(self._model.dtype)
            out[key] = value
        return out

    # -- statistics ------------------------------------------------------------------------------
    def _record(self, requests: list[Instance], n_images: list[int], inputs: dict, kind: str) -> list[int]:
        """Visual tokens per request of one batch (after a pruned or an unpruned prefill).

        Returns per sample the prompt length that entered the LLM (text + visual tokens)."""
        mask = inputs["attention_mask"]
        prompt_len = mask.sum(1).tolist()
        if self.image_token_id is not None:
            placeholders = (inputs["input_ids"] == self.image_token_id).sum(1).tolist()
        else:
            placeholders = [0] * len(requests)
        entering, averaged, candidates = list(placeholders), [float(p) for p in placeholders], list(placeholders)
        final = list(placeholders)  # visual tokens left after the last in-LLM stage
        registers = [0] * len(requests)  # register tokens (OccamToken) that entered with the images
        method_seconds = 0.0
        if self.handle is not None and self.handle.stats:
            groups, start = [], 0
            for n in n_images:
                groups.append(list(range(start, start + n)))
                start += n
            calls = list(self.handle.stats)
            self.handle.reset_stats()
            call = calls[0]  # the batch's prefill; later entries would be further prefills of the same batch
            method_seconds = sum(c.method_seconds for c in calls)
            if len(call.images) == start:
                averaged = call.layer_averaged(self.num_layers, sample_images=groups)
                for b, g in enumerate(groups):
                    if g:
                        kept = sum(call.images[i].visual_tokens for i in g)
                        cand = sum(call.images[i].candidates for i in g)
                        prompt_len[b] = prompt_len[b] - placeholders[b] + kept
                        entering[b], candidates[b] = kept, cand
                        stages = call.llm_stages.get(b, {})
                        never_pruned = sum(call.images[i].registers + call.images[i].newlines for i in g)
                        final[b] = stages[max(stages)] + never_pruned if stages else kept
                        registers[b] = sum(call.images[i].registers for i in g)
            else:  # should not happen: keep the request but say so
                eval_logger.warning(f"vtprune: {len(call.images)} images in the stats for {start} in the batch")
        for b, req in enumerate(requests):
            if (req.metadata or {}).get("__padding_only__"):
                continue
            if n_images[b] == 0:
                continue  # text-only request: no visual tokens to report
            self._records.append({"task": req.task_name, "doc_id": req.doc_id, "kind": kind,
                                  "images": n_images[b], "visual_tokens_before_pruning": candidates[b],
                                  "visual_tokens_entering_llm": entering[b],
                                  "visual_tokens_layer_averaged": float(averaged[b]),
                                  "visual_tokens_after_last_stage": final[b],
                                  "registers": registers[b],
                                  "method_seconds": method_seconds / max(1, len(requests))})
        return prompt_len

    def vtprune_summary(self) -> dict:
        """Mean visual tokens per request over every process (call after the run; see ``clean``)."""
        if self._summary is None:
            self._summary = self._summarize(self._gather())
        return self._summary

    def _gather(self) -> tuple[list[dict], float, int]:
        local = (self._records, self._gen_seconds, self._gen_tokens)
        if self._world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone = [None] * self._world_size
            torch.distributed.all_gather_object(everyone, local)
            records = [r for part in everyone for r in part[0]]
            return records, sum(p[1] for p in everyone), sum(p[2] for p in everyone)
        return local

    def _summarize(self, gathered) -> dict:
        records, seconds, tokens = gathered

        def means(rows):
            n = len(rows)
            if not n:
                return {"requests": 0}
            return {
                "requests": n,
                "mean_visual_tokens_before_pruning": sum(r["visual_tokens_before_pruning"] for r in rows) / n,
                "mean_visual_tokens_entering_llm": sum(r["visual_tokens_entering_llm"] for r in rows) / n,
                "mean_visual_tokens_layer_averaged": sum(r["visual_tokens_layer_averaged"] for r in rows) / n,
                "mean_visual_tokens_after_last_stage": sum(r["visual_tokens_after_last_stage"] for r in rows) / n,
                "mean_registers": sum(r["registers"] for r in rows) / n,
            }

        by_task = OrderedDict()
        for r in records:
            by_task.setdefault(r["task"], []).append(r)
        return {
            "model": self.pretrained,
            "family": self.family,
            "method": self.method_name or "none",
            "method_args": self.method_kwargs,
            "method_description": self.method_description,
            "layout": self.layout,
            "num_decoder_layers": self.num_layers,
            "world_size": self._world_size,
            **means(records),
            "method_seconds": sum(r["method_seconds"] for r in records),
            "generation_seconds": seconds,
            "generated_tokens": tokens,
            "by_task": {t: means(rows) for t, rows in by_task.items()},
        }

    def clean(self):
        """Called by lmms-eval on every rank once all requests ran: gather and report the statistics."""
        summary = self.vtprune_summary()
        if self._rank == 0:
            from lmms_eval.models.model_utils.gen_metrics import log_metrics

            extra = {}
            if summary.get("requests"):
                extra = {"vtprune_visual_tokens_entering_llm": summary["mean_visual_tokens_entering_llm"],
                         "vtprune_visual_tokens_layer_averaged": summary["mean_visual_tokens_layer_averaged"],
                         "vtprune_visual_tokens_before_pruning": summary["mean_visual_tokens_before_pruning"]}
            seconds, tokens = summary["generation_seconds"], summary["generated_tokens"]
            log_metrics(total_elapsed_time=seconds, total_gen_tokens=tokens,
                        avg_speed=tokens / seconds if seconds > 0 else 0.0, additional_metrics=extra)
            if self.stats_path:
                Path(self.stats_path).parent.mkdir(parents=True, exist_ok=True)
                Path(self.stats_path).write_text(json.dumps(summary, indent=2))
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        super().clean()

    # -- requests --------------------------------------------------------------------------------
    def _batches(self, requests: list[Instance], key):
        """Batches of indices into ``requests``: grouped by ``key``, longest prompts first."""
        groups: "OrderedDict[str, list[int]]" = OrderedDict()
        for i, req in enumerate(requests):
            groups.setdefault(key(req), []).append(i)
        for idx in groups.values():
            idx.sort(key=lambda i: -len(requests[i].args[0]))
            for s in range(0, len(idx), self.batch_size_per_gpu):
                yield idx[s:s + self.batch_size_per_gpu]

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=self._rank != 0, desc="vtprune generate")
        for batch in self._batches(requests, key=lambda r: json.dumps(r.args[1], sort_keys=True, default=str)):
            reqs = [requests[i] for i in batch]
            gen_kwargs = dict(reqs[0].args[1] or {})
            texts, images, n_images = [], [], []
            for req in reqs:
                context, _, doc_to_visual, doc_id, task, split = req.args
                visuals = _flatten(doc_to_visual(self._doc(task, split, doc_id))) if doc_to_visual else []
                texts.append(build_prompt(self.processor, context, len(visuals)))
                images.extend(visuals)
                n_images.append(len(visuals))
            inputs = self._encode(texts, images)
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(gen_kwargs.get("temperature", 0) or 0)
            do_sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
            generate = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens", self.default_max_new_tokens)),
                        "do_sample": do_sample, "num_beams": int(gen_kwargs.get("num_beams", 1) or 1),
                        "pad_token_id": self._tokenizer.pad_token_id, "use_cache": True}
            if do_sample:
                generate["temperature"] = temperature
                if gen_kwargs.get("top_p") is not None:
                    generate["top_p"] = float(gen_kwargs["top_p"])
            else:
                generate.update(temperature=None, top_p=None, top_k=None)
            start = time.perf_counter()
            with torch.inference_mode():
                out = self._model.generate(**inputs, **generate)
            self._gen_seconds += time.perf_counter() - start
            new = out[:, inputs["input_ids"].shape[1]:]
            prompt_len = self._record(reqs, n_images, inputs, "generate_until")
            for b, i in enumerate(batch):
                ids = new[b].tolist()
                n_out = next((k for k, t in enumerate(ids) if t in self._stop_ids), len(ids))
                text = self._tokenizer.decode(ids[:n_out], skip_special_tokens=True)
                for stop in until:
                    if stop and stop in text:
                        text = text.split(stop, 1)[0]
                self._gen_tokens += n_out
                results[i] = GenerationResult(text=text, token_counts=TokenCounts(
                    input_tokens=int(prompt_len[b]), output_tokens=int(n_out)))
            pbar.update(len(batch))
        pbar.close()
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request ``(loss, is_greedy)``: the mean negative log-likelihood of the continuation's
        tokens after the (pruned) prompt, and whether greedy decoding would produce them.

        lmms-eval's convention, not lm-eval's: its Hugging Face models return the loss of the
        continuation and its multiple-choice scoring takes the *argmin* (``lmms_eval/api/task.py``),
        so vtprune returns the same quantity. The pair is wrapped in a ``GenerationResult`` because
        lmms-eval 0.7.3's evaluator turns every other non-string model output into its ``str()``.

        Works for every supported family: the continuation is text after the image, which pruning
        never removes, and the outputs of a pruned prefill end with the same text tokens as the
        prompt (left padding), so the last logits line up with the continuation."""
        results: list[GenerationResult | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=self._rank != 0, desc="vtprune loglikelihood")
        for batch in self._batches(requests, key=lambda r: "all"):
            reqs = [requests[i] for i in batch]
            texts, images, n_images, n_cont = [], [], [], []
            for req in reqs:
                context, target, doc_to_visual, doc_id, task, split = req.args
                doc = self._doc(task, split, doc_id)
                continuation = target if isinstance(target, str) else str(target(doc))
                visuals = _flatten(doc_to_visual(doc)) if doc_to_visual else []
                prompt = build_prompt(self.processor, context, len(visuals))
                full = prompt + continuation
                whole = self._tokenizer(full, add_special_tokens=False)["input_ids"]
                head = self._tokenizer(prompt, add_special_tokens=False)["input_ids"]
                n = len(whole) - len(head)
                if n <= 0:
                    raise ValueError(f"Empty continuation {continuation!r} for doc {doc_id} of {task}")
                texts.append(full)
                images.extend(visuals)
                n_images.append(len(visuals))
                n_cont.append(n)
            inputs = self._encode(texts, images)
            with torch.inference_mode():
                logits = self._model(**inputs, use_cache=False).logits.float()
            prompt_len = self._record(reqs, n_images, inputs, "loglikelihood")
            ids = inputs["input_ids"]
            for b, (i, n) in enumerate(zip(batch, n_cont)):
                target_ids = ids[b, -n:]
                logprobs = torch.log_softmax(logits[b, -n - 1:-1], dim=-1)
                loss = -logprobs.gather(-1, target_ids[:, None]).mean().item()
                greedy = bool((logprobs.argmax(-1) == target_ids).all())
                results[i] = GenerationResult(text=(float(loss), greedy),  # see the docstring
                                              token_counts=TokenCounts(input_tokens=int(prompt_len[b])))
            pbar.update(len(batch))
        pbar.close()
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("The vtprune lmms-eval model does not implement multi-round generation.")


def _bracketed_tuple(value: Any) -> Any:
    """``"[8,16,24]"`` (how ``vtprune eval`` passes a tuple through lmms-eval's comma-split model_args)
    as ``(8, 16, 24)``; anything else unchanged."""
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        from ..cli.arguments import parse_value

        return tuple(parse_value(part) for part in value[1:-1].split(",") if part.strip())
    return value
