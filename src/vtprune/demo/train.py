"""Train the shipped demo VLM on generated scenes (seeded, reproducible; CPU or GPU).

    python -m vtprune.demo.train --out DIR --minutes 40 [--device cuda]

The model is a ``LlavaForConditionalGeneration`` in llava-hf's layout: a CLIP-style tower at 336 px,
patch 14 (576 patch tokens + CLS), LLaVA's 2-layer MLP projector, a small Llama decoder, a word-level
tokenizer. Each training sequence holds one scene and several question/answer turns; the loss is
taken on the answers only. Progress, validation accuracy and the hardware go to ``DIR/train_log.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import scenes
from .tokenizer import build_processor, prompt

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the CLIPImageProcessor defaults
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NUM_PATCHES = (scenes.IMAGE_SIZE // scenes.PATCH) ** 2  # 576

VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)
TEXT = dict(hidden_size=160, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)


def build_model(processor, seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=scenes.IMAGE_SIZE, patch_size=scenes.PATCH, **VISION),
        text_config=LlamaConfig(vocab_size=len(tok), max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **TEXT),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


class PatchHeads(torch.nn.Module):
    """Training-only auxiliary heads: per patch, the colour, shape and object-centre labels of the scene
    (``scenes.patch_labels``), read from the features the projector hands the LLM. They make the tower
    learn grounded patch features much faster on a CPU budget; they are not saved with the model."""

    def __init__(self, width: int):
        super().__init__()
        self.color = torch.nn.Linear(width, 1 + len(scenes.COLOR_NAMES))
        self.shape = torch.nn.Linear(width, 1 + len(scenes.SHAPES))
        self.center = torch.nn.Linear(width, 2)

    def loss(self, features: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy
        return sum(ce(getattr(self, k)(features).flatten(0, 1), labels[k].flatten()) for k in ("color", "shape", "center"))


_MEAN = np.array(OPENAI_CLIP_MEAN, dtype=np.float32)
_STD = np.array(OPENAI_CLIP_STD, dtype=np.float32)


def pixel_values(images) -> torch.Tensor:
    """What the processor's CLIPImageProcessor returns for 336x336 RGB images (rescale + normalise),
    without its per-call overhead."""
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(((arr - _MEAN) / _STD).transpose(0, 3, 1, 2).copy())


class TurnEncoder:
    """Token ids of multi-turn conversations, identical to what the processor produces for the first
    turn (``USER: <image>\\n{q} ASSISTANT:`` with <image> expanded to 576), cached per string."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[str, list[int]] = {}
        self.image = tokenizer.convert_tokens_to_ids("<image>")
        self.pad = tokenizer.pad_token_id

    def ids(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.tok(text)["input_ids"]
        return self.cache[text]

    def conversation(self, qa, image_keep=None) -> tuple[list[int], list[int], list[int]]:
        """ids, labels and position ids; with ``image_keep`` (sorted patch indices) only those image
        placeholders are emitted, at the positions they have in the full sequence (training curriculum)."""
        ids, labels, pos = [], [], []
        for k, (question, answer) in enumerate(qa):
            if k == 0:
                head, tail = prompt(question).split("<image>")
                h, t = self.ids(head), self.ids(tail)
                kept = list(range(NUM_PATCHES)) if image_keep is None else [int(i) for i in image_keep]
                turn = h + [self.image] * len(kept) + t
                tpos = list(range(len(h))) + [len(h) + i for i in kept] + \
                    list(range(len(h) + NUM_PATCHES, len(h) + NUM_PATCHES + len(t)))
            else:
                turn = self.ids(f"USER: {question} ASSISTANT:")
                tpos = list(range(pos[-1] + 1, pos[-1] + 1 + len(turn)))
            ans = self.ids(f"{answer}</s>")
            ids += turn + ans
            labels += [-100] * len(turn) + ans
            pos += tpos + list(range(tpos[-1] + 1, tpos[-1] + 1 + len(ans)))
        return ids, labels, pos


def training_sequence(encoder: TurnEncoder, seed: int, turns: int, max_background: int | None = None):
    """(image, input_ids, labels, patch labels, position ids, kept patches) of one train scene with
    ``turns`` question/answer pairs.

    ``max_background`` (curriculum): the LLM sees every patch an object touches plus a random
    16..max_background of the background patches, at their original positions; None = all 576.
    """
    scene = scenes.make_scene(scenes.SPLIT_BASES["train"] + seed)
    rng = np.random.default_rng([seed, 7])
    qa = scenes.scene_questions(scene, rng, turns)
    labels_np = scenes.patch_labels(scene, min_frac=0.02)
    keep = None
    if max_background is not None and max_background < NUM_PATCHES:
        on = (labels_np["color"] > 0) | (labels_np["center"] > 0)
        background = np.flatnonzero(~on)
        k = int(rng.integers(min(16, max_background), max_background + 1))
        keep = np.sort(np.concatenate([np.flatnonzero(on), rng.choice(background, min(k, len(background)),
                                                                     replace=False)]))
    ids, labels, pos = encoder.conversation([(q, a) for _, q, a in qa], keep)
    patch = {k: torch.from_numpy(v) for k, v in scenes.patch_labels(scene).items()}
    keep_t = torch.arange(NUM_PATCHES) if keep is None else torch.from_numpy(keep)
    return scenes.render(scene), torch.tensor(ids), torch.tensor(labels), patch, torch.tensor(pos), keep_t


def collate(items, pad_id: int):
    length = max(len(i[1]) for i in items)
    ids = torch.full((len(items), length), pad_id)
    labels = torch.full((len(items), length), -100)
    mask = torch.zeros(len(items), length, dtype=torch.long)
    pos = torch.zeros(len(items), length, dtype=torch.long)
    for b, (_, x, y, _, p, _) in enumerate(items):
        ids[b, : len(x)], labels[b, : len(y)], mask[b, : len(x)], pos[b, : len(p)] = x, y, 1, p
    patch = {k: torch.stack([i[3][k] for i in items]) for k in items[0][3]}
    keep = [i[5] for i in items]
    return pixel_values([i[0] for i in items]), ids, labels, mask, patch, pos, keep


def training_forward(model, pixels, ids, mask, labels, position_ids=None, keep=None):
    """(answer-token loss, projected patch features): the model's own forward, except that the last
    CLIP layer is skipped -- with ``vision_feature_layer=-2`` its output is never read, so the result
    is identical and a quarter of the tower's compute is saved. ``keep`` (per sample, patch indices)
    matches sequences built with fewer image placeholders (see :func:`training_sequence`)."""
    tower = model.model.vision_tower
    hidden = tower.pre_layrnorm(tower.embeddings(pixels))
    for layer in tower.encoder.layers[:-1]:
        hidden = layer(hidden, None)
    patches = model.model.multi_modal_projector(hidden[:, 1:])
    embeds = model.get_input_embeddings()(ids)
    where = (ids == model.config.image_token_id).unsqueeze(-1)
    image = patches if keep is None else torch.cat([patches[b, k.to(patches.device)] for b, k in enumerate(keep)])
    embeds = embeds.masked_scatter(where, image.to(embeds.dtype).reshape(-1, embeds.shape[-1]))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                        position_ids=position_ids).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), target[keep]), patches


@torch.no_grad()
def answer_accuracy(model, processor, examples, batch_size: int = 16) -> dict:
    """Greedy one-word answers on ``examples``; accuracy overall and per question type (percent)."""
    from .bench import evaluate

    return evaluate(model, processor, examples, batch_size=batch_size)


def train(out: str, minutes: float = 40.0, batch_size: int = 16, turns: int = 4, lr: float = 1e-3,
          device: str = "cpu", seed: int = 0, eval_every: int = 100, val_questions: int = 300, max_steps: int = 0,
          aux_weight: float = 0.5, init: str | None = None, warmup: int = 100, first_seed: int = 0,
          background_start: int = 0, background_full_at: float = 0.8):
    """Train (or, with ``init``, continue training) and save the best-on-validation checkpoint to ``out``.

    The cosine schedule spans ``max_steps`` when given, else it is sized after 50 steps to ``minutes``.
    Scenes are train-split seeds ``first_seed + step * batch_size + i``. With ``background_start`` > 0
    the LLM first sees the object patches plus up to ``background_start`` background patches, a
    budget that grows geometrically to all 576 at ``background_full_at`` of the run (curriculum:
    a strong gradient for learning to look up objects early, the real input at the end).
    """
    torch.manual_seed(seed)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    processor = build_processor()
    if init:  # continue from a saved checkpoint (weights only; the schedule starts afresh)
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(init).to(device)
    else:
        model = build_model(processor, seed).to(device)
    model.train()
    heads = PatchHeads(model.config.text_config.hidden_size).to(device)
    encoder = TurnEncoder(processor.tokenizer)
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    val = scenes.make_split("val", val_questions)
    est_steps = max_steps or 10_000
    log = {"init": init, "hardware": hardware(device), "torch": torch.__version__, "batch_size": batch_size, "turns": turns,
           "lr": lr, "seed": seed, "init": init, "first_seed": first_seed, "max_steps": max_steps,
           "minutes": minutes, "background_start": background_start,
           "background_full_at": background_full_at, "vision": VISION, "text": TEXT, "aux_weight": aux_weight, "steps": [], "evals": []}
    start, step, best = time.time(), 0, -1.0
    bar = tqdm(desc="training", unit="step", total=max_steps or None, mininterval=10.0)
    while True:
        elapsed = (time.time() - start) / 60
        if (max_steps and step >= max_steps) or (not max_steps and elapsed >= minutes):
            break
        if not max_steps and step == 50:  # size the cosine schedule to the time budget
            est_steps = int(50 * minutes / max(elapsed, 1e-6))
        progress = min(1.0, step / max(est_steps, 1))
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        max_bg = None
        if background_start and progress < background_full_at:
            max_bg = int(background_start * (NUM_PATCHES / background_start) ** (progress / background_full_at))
        items = [training_sequence(encoder, first_seed + step * batch_size + i, turns, max_bg)
                 for i in range(batch_size)]
        pixels, ids, labels, mask, patch, pos, keep = (x.to(device) if torch.is_tensor(x) else x
                                                       for x in collate(items, encoder.pad))
        loss, patches = training_forward(model, pixels, ids, mask, labels, pos, keep)
        aux = heads.loss(patches, {k: v.to(device) for k, v in patch.items()})
        optimizer.zero_grad(set_to_none=True)
        (loss + aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        log["steps"].append({"step": step, "loss": round(float(loss), 4), "aux": round(float(aux), 4),
                             "lr": optimizer.param_groups[0]["lr"], "max_background": max_bg, "minutes": round((time.time() - start) / 60, 3)})
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.3f}", aux=f"{float(aux):.3f}")
        if step % eval_every == 0:
            model.eval()
            acc = answer_accuracy(model, processor, val)
            model.train()
            log["evals"].append({"step": step, "minutes": round((time.time() - start) / 60, 2), **acc})
            tqdm.write(f"step {step}: val {json.dumps({k: round(v, 1) for k, v in acc.items()})}")
            if acc["overall"] >= best:
                best = acc["overall"]
                save(model, processor, out_dir)
            (out_dir / "train_log.json").write_text(json.dumps(log, indent=1))
    model.eval()
    acc = answer_accuracy(model, processor, val)
    log["evals"].append({"step": step, "minutes": round((time.time() - start) / 60, 2), **acc})
    if acc["overall"] >= best:
        save(model, processor, out_dir)
    log["total_steps"] = step
    log["total_minutes"] = (time.time() - start) / 60
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def hardware(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    import os

    text = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {device}"
    if str(device).startswith("cuda"):
        text += f" ({torch.cuda.get_device_name(0)})"
    return text


def save(model, processor, out_dir: Path) -> None:
    """save_pretrained, with the vision weights renamed to llava-hf's ``vision_tower.vision_model.*``."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    path = out_dir / "model.safetensors"
    tensors = load_file(path)
    renamed = {}
    for key, value in tensors.items():
        for prefix in ("model.vision_tower.", "vision_tower."):
            if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
                key = prefix + "vision_model." + key[len(prefix):]
                break
        renamed[key] = value.contiguous()
    save_file(renamed, path, metadata={"format": "pt"})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--max-steps", "--steps", type=int, default=0, help="stop after N steps instead of --minutes")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4, help="question/answer turns per scene")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--init", default=None, help="start from this checkpoint instead of random weights")
    parser.add_argument("--val-questions", type=int, default=300)
    parser.add_argument("--aux-weight", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--first-seed", type=int, default=0, help="first train-scene seed (use a fresh range "
                        "when continuing from --init)")
    parser.add_argument("--background-start", type=int, default=0,
                        help="curriculum: background patches the LLM sees at first (0 = all 576 throughout)")
    parser.add_argument("--background-full-at", type=float, default=0.8,
                        help="fraction of the run at which the LLM sees all 576 patches again")
    args = parser.parse_args(argv)
    log = train(args.out, args.minutes, args.batch_size, args.turns, args.lr, args.device, args.seed, args.eval_every,
                val_questions=args.val_questions, max_steps=args.max_steps, aux_weight=args.aux_weight,
                init=args.init, warmup=args.warmup, first_seed=args.first_seed,
                background_start=args.background_start, background_full_at=args.background_full_at)
    print(json.dumps(log["evals"][-1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
