"""Train the shipped demo VLM on generated scenes (seeded, reproducible; CPU or GPU).

The model is a ``LlavaForConditionalGeneration`` in llava-hf's layout: a CLIP-style tower at 336 px,
patch 14 (576 patch tokens + CLS), LLaVA's 2-layer MLP projector, a small Llama decoder, a word-level
tokenizer. Training has three stages, so that it fits a two-core CPU budget:

1. ``vision``: the tower + projector learn to emit, for every patch, its *scene code* -- the sum of
   fixed random vectors for the patch's colour, shape, object-centre flag, row and column
   (:func:`scene_codes`, labels from ``scenes.patch_labels``). Cross-entropy through the fixed code
   vectors plus a small MSE to their sum; trained on 8x8-patch windows cut from scenes, each window
   at its own rows of the position embedding (a ninth of a full image's cost).
2. ``llm``: the Llama decoder learns to answer multi-turn questions from the exact scene codes, with
   no image rendered and no tower run, on short sequences (the objects' patches plus 16 background
   patches, at their original positions). Attention is supervised (:func:`retrieval_targets`): at
   each object word of a question two heads of layer 1 read that object's patches; at the position
   that predicts the answer two heads of layer 2 read the object's patches (one-object questions) or
   the two object words (spatial questions), where a fixed linear probe must find both objects'
   centres (:func:`position_loss`); for counting questions they spread evenly over the counted
   centres and the first token, whose share 1 / (count + 1) a second probe reads
   (:func:`count_targets`). Without the retrieval loss the decoder did not find the asked
   object among the image tokens (~45 % for 1,000+ steps); without the object-word and position
   terms spatial questions stayed at chance.
3. ``llm --init <stage 2> --vision <stage 1> --background 576``: the decoder continues on the features
   stage 1's frozen tower computes from rendered scenes, all 576 tokens (what the shipped model used).
   ``joint`` instead fine-tunes tower and decoder end to end (answer loss plus the stage-1 loss, to
   keep the codes); it is slower on a CPU.

Stages 1 and 2 do not depend on each other: run them side by side, one core each::

    python -m vtprune.demo.train vision --out runs/vision --steps 3500 --threads 1
    python -m vtprune.demo.train vision --init runs/vision --whole-images --out runs/vision_full \
        --steps 600 --lr 5e-4 --first-seed 7000000 --threads 1
    python -m vtprune.demo.train llm --out runs/llm --steps 3000 --stop-at 900 --threads 1
    python -m vtprune.demo.train llm --init runs/llm --vision runs/vision_full --background 576 \
        --attention-weight 0 --steps 300 --lr 5e-4 --out runs/final --threads 2

(the shipped model continued both ``llm`` runs once more; the README has the exact recipe).

Each stage writes a loadable checkpoint and ``train_log.json`` (steps, losses, validation accuracy,
hardware) to its ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
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
GRID = scenes.GRID
NUM_PATCHES = GRID * GRID  # 576
WINDOW = 8  # patches per side of a stage-1 training window

VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)
# 5 heads of 32: vLLM's CPU attention accepts head size 32 (not 40)
TEXT = dict(hidden_size=160, intermediate_size=384, num_hidden_layers=4, num_attention_heads=5, num_key_value_heads=5)
CODE_SEED = 1234
MENTION_LAYER, ANSWER_LAYER = 1, 2  # decoder layers whose heads 0 and 1 the retrieval loss supervises
COUNT_SINK = 0  # the sequence position counting heads use as their sink (the prompt's first token, "USER")


def build_model(processor, seed: int = 0):
    """A freshly initialised demo model; the tower's position embeddings start as 2-D sin/cos."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=scenes.IMAGE_SIZE, patch_size=scenes.PATCH, **VISION),
        text_config=LlamaConfig(vocab_size=len(tok), max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **TEXT),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # a 2-D layout from the start: local attention is found much sooner
        tower_of(model).embeddings.position_embedding.weight[1:] = sincos_grid(VISION["hidden_size"])
    return model


def sincos_grid(dim: int) -> torch.Tensor:
    """(576, dim) 2-D sine/cosine position table, raster order."""
    yy, xx = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    freqs = 1.0 / 10 ** (torch.arange(dim // 4) / (dim // 4))
    x, y = xx.flatten()[:, None] * freqs, yy.flatten()[:, None] * freqs
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], 1)


# ----------------------------------------------------------------------------------- scene codes
def scene_codes(dim: int, seed: int = CODE_SEED) -> dict[str, torch.Tensor]:
    """Fixed random code vectors (norm ~4, nearly orthogonal) per label value: what stage 1 teaches
    the projector to emit and what stage 2's decoder reads."""
    g = torch.Generator().manual_seed(seed)
    sizes = {"color": 1 + len(scenes.COLOR_NAMES), "shape": 1 + len(scenes.SHAPES), "center": 2, "row": GRID, "col": GRID}
    return {k: torch.randn(n, dim, generator=g) * (4.0 / dim ** 0.5) for k, n in sizes.items()}


def patch_label_tensors(scene) -> dict[str, torch.Tensor]:
    labels = {k: torch.from_numpy(v) for k, v in scenes.patch_labels(scene).items()}
    cells = torch.arange(NUM_PATCHES)
    return {**labels, "row": cells // GRID, "col": cells % GRID}


def code_features(codes, labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the codes of every label: (..., dim) for labels of shape (...)."""
    return sum(codes[k][labels[k]] for k in codes)


def code_loss(codes, features: torch.Tensor, labels: dict[str, torch.Tensor], stats: dict | None = None,
              centre_weight: float = 5.0):
    """Stage-1 objective on projected patch features: cross-entropy of the dot products with each
    code table (shape weighted 2x, object centres ``centre_weight`` x as the rare class) + 0.1 * MSE to
    the code sum."""
    ce = torch.nn.functional.cross_entropy
    codes = {k: v.to(features.device) for k, v in codes.items()}
    logits = {k: features @ codes[k].T for k in codes}
    loss = 0.1 * ((features - code_features(codes, labels)) ** 2).sum(-1).mean()
    loss = loss + ce(logits["color"].flatten(0, -2), labels["color"].flatten())
    loss = loss + 2.0 * ce(logits["shape"].flatten(0, -2), labels["shape"].flatten())
    loss = loss + ce(logits["center"].flatten(0, -2), labels["center"].flatten(), weight=features.new_tensor([1.0, centre_weight]))
    if stats is not None:
        centres = labels["center"] > 0
        stats["centre_shape_acc"] = float((logits["shape"][centres].argmax(-1) == labels["shape"][centres]).float().mean())
        stats["centre_recall"] = float((logits["center"][centres].argmax(-1) == 1).float().mean())
    return loss


# ------------------------------------------------------------------------------------- helpers
_MEAN = np.array(OPENAI_CLIP_MEAN, dtype=np.float32)
_STD = np.array(OPENAI_CLIP_STD, dtype=np.float32)


def pixel_values(images) -> torch.Tensor:
    """What the processor's CLIPImageProcessor returns for 336x336 RGB images (rescale + normalise),
    without its per-call overhead."""
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(((arr - _MEAN) / _STD).transpose(0, 3, 1, 2).copy())


def tower_of(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower)


def vision_patches(model, pixels: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
    """Projected patch features (B, N, D) as LLaVA computes them (``vision_feature_layer=-2``: the
    last CLIP layer's output is never read, so it is skipped). ``cells`` (B, N) gives the grid cell of
    each patch of a window smaller than the image, whose position embeddings are then used."""
    tower = tower_of(model)
    emb = tower.embeddings
    if cells is None:
        hidden = emb(pixels)
    else:
        patches = emb.patch_embedding(pixels).flatten(2).transpose(1, 2) + emb.position_embedding.weight[1 + cells]
        cls = (emb.class_embedding + emb.position_embedding.weight[0]).expand(len(pixels), 1, -1)
        hidden = torch.cat([cls, patches], 1)
    hidden = tower.pre_layrnorm(hidden)
    for layer in tower.encoder.layers[:-1]:
        hidden = layer(hidden, None)
    return model.model.multi_modal_projector(hidden[:, 1:])


class TurnEncoder:
    """Token ids of multi-turn conversations, identical to what the processor produces for the first
    turn (``USER: <image>\\n{q} ASSISTANT:`` with <image> expanded to 576), cached per string."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[str, list[int]] = {}
        self.image = tokenizer.convert_tokens_to_ids("<image>")
        self.pad = tokenizer.pad_token_id
        words = [*scenes.SHAPES, *scenes.PLURALS.values(), "object", "objects"]
        self.object_words = set(tokenizer.convert_tokens_to_ids(words))  # the words that name an object

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


def conversation_batch(encoder: TurnEncoder, seeds, turns: int, background: int | None = None):
    """Scenes of train seeds ``seeds`` with ``turns`` question/answer pairs each, right-padded:
    (scenes, ids, labels, attention mask, position ids, kept patch indices per scene, questions per scene).

    ``background``: the image part holds every patch an object touches plus a random 16..``background``
    of the background patches, at their original positions (a short sequence in which retrieval is learnt
    quickly); None = all 576 patches.
    """
    rows, kept, drawn, asked = [], [], [], []
    for seed in seeds:
        scene = scenes.make_scene(scenes.SPLIT_BASES["train"] + seed)
        rng = np.random.default_rng([seed, 7])
        qa = scenes.scene_questions(scene, rng, turns)
        keep = np.arange(NUM_PATCHES)
        if background is not None and background < NUM_PATCHES:
            touched = scenes.patch_labels(scene, min_frac=0.02)["color"] > 0
            free = np.flatnonzero(~touched)
            k = min(int(rng.integers(min(16, background), background + 1)), len(free))
            keep = np.sort(np.concatenate([np.flatnonzero(touched), rng.choice(free, k, replace=False)]))
        rows.append(encoder.conversation([(q, a) for _, q, a in qa], keep))
        kept.append(torch.from_numpy(keep))
        drawn.append(scene)
        asked.append([q for _, q, _ in qa])
    length = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), length), encoder.pad)
    labels = torch.full((len(rows), length), -100)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    pos = torch.zeros(len(rows), length, dtype=torch.long)
    for b, (x, y, p) in enumerate(rows):
        ids[b, : len(x)], labels[b, : len(y)], pos[b, : len(p)] = torch.tensor(x), torch.tensor(y), torch.tensor(p)
        mask[b, : len(x)] = 1
    return drawn, ids, labels, mask, pos, kept, asked


# --------------------------------------------------------------------------- attention supervision
_COLOR_INDEX = {c: i + 1 for i, c in enumerate(scenes.COLOR_NAMES)}
_SHAPE_INDEX = {**{s: i + 1 for i, s in enumerate(scenes.SHAPES)},
                **{scenes.PLURALS[s]: i + 1 for i, s in enumerate(scenes.SHAPES)}}


def referent_patches(labels: dict[str, torch.Tensor], question: str) -> list[torch.Tensor]:
    """(576,) bool masks of the patches showing each object the question refers to, in the order the
    question names them (a colour word, then a shape word or "object(s)"); counting questions refer to
    object centres only, "how many objects" to every centre. A mask is empty when nothing matches."""
    words = question.replace("?", " ").split()
    refs, colour = [], None
    for w in words:
        if w in _COLOR_INDEX:
            colour = _COLOR_INDEX[w]
        elif w in _SHAPE_INDEX or w in ("object", "objects"):
            refs.append((colour, _SHAPE_INDEX.get(w)))
            colour = None
    masks = []
    for colour, shape in refs or [(None, None)]:
        m = labels["color"] > 0
        if colour is not None:
            m = m & (labels["color"] == colour)
        if shape is not None:
            m = m & (labels["shape"] == shape)
        if "many" in words:
            m = m & (labels["center"] > 0)
        masks.append(m)
    return masks


def _asked(ids, labels, questions):
    """(sequence, question, position of its first answer token, position where the question's turn
    starts) for every answered question of a batch."""
    for b in range(len(ids)):
        answered = labels[b] != -100
        first_answer_tokens = torch.nonzero(answered[1:] & ~answered[:-1]).flatten() + 1
        for question, t in zip(questions[b], first_answer_tokens.tolist()):
            start = int(torch.nonzero(answered[:t]).max()) + 1 if answered[:t].any() else 0
            yield b, question, t, start


def retrieval_targets(encoder: TurnEncoder, ids, labels, kept, patch_labels, questions) -> dict:
    """Where to supervise attention, as {layer: (where (Q, 2) of (sequence, position), masks (Q, 2, T),
    evenly (Q,))}: the mask of what heads 0 and 1 of that layer should read at that position, and
    whether they must spread their attention evenly over it (else only its total mass counts).

    - ``MENTION_LAYER``, at every object word of a question ("circle", "object", "squares"): both heads
      read the patches of the object that word names (colour and shape are bound there, one token apart).
    - ``ANSWER_LAYER``, at the position that predicts the answer: for a one-object question both heads
      read the object's patches; for a two-object (spatial) question head h reads the h-th object word,
      which by then carries what ``MENTION_LAYER`` fetched (reading both objects' patches straight from
      the answer position left spatial questions at chance: the words of the two objects were not bound).
      For a counting question both heads read, evenly, the centre patch of every counted object and the
      sequence's first token (``COUNT_SINK``): the sink's share, 1 / (count + 1), encodes the count (a
      mean over the objects alone does not; counting stayed at 74 % without it).
    """
    rows: dict[int, tuple[list, list, list]] = {MENTION_LAYER: ([], [], []), ANSWER_LAYER: ([], [], [])}

    def add(layer, b, t, targets, evenly=False):
        m = torch.zeros(2, ids.shape[1], dtype=torch.bool)
        for h, target in enumerate(targets):
            m[h, target] = True
        rows[layer][0].append((b, t))
        rows[layer][1].append(m)
        rows[layer][2].append(evenly)

    slots = [torch.nonzero(row == encoder.image).flatten() for row in ids]  # image positions per sequence
    for b, question, t, start in _asked(ids, labels, questions):
        refs = [slots[b][ref[kept[b]]] for ref in referent_patches(patch_labels[b], question)]
        words = [start + i for i, w in enumerate(ids[b, start:t].tolist()) if w in encoder.object_words]
        for word, ref in zip(words, refs):
            add(MENTION_LAYER, b, word, (ref, ref))
        if _is_count(question):  # the object centres and the sink, evenly: the sink's share is 1 / (count + 1)
            read = torch.cat([refs[0], torch.tensor([COUNT_SINK])])
            add(ANSWER_LAYER, b, t - 1, (read, read), evenly=True)
        else:
            add(ANSWER_LAYER, b, t - 1, words[:2] if len(refs) == 2 else (refs[0], refs[0]))
    return {layer: (torch.tensor(where).reshape(-1, 2), torch.stack(masks), torch.tensor(even, dtype=torch.bool))
            for layer, (where, masks, even) in rows.items()}


def position_targets(ids, labels, patch_labels, questions) -> tuple[torch.Tensor, torch.Tensor]:
    """For every two-object question: the (sequence, position) that predicts its answer and the two
    objects' centres (x1, y1, x2, y2), each in [-1, 1] (the mean patch row and column of each)."""
    where, targets = [], []
    for b, question, t, _ in _asked(ids, labels, questions):
        refs = referent_patches(patch_labels[b], question)
        if len(refs) != 2 or not all(r.any() for r in refs):
            continue
        cells = [torch.nonzero(r).flatten().float() for r in refs]
        targets.append(torch.stack([v for c in cells for v in ((c % GRID).mean(), (c // GRID).mean())]))
        where.append((b, t - 1))
    return torch.tensor(where).reshape(-1, 2), torch.stack(targets) / (GRID - 1) * 2 - 1 if targets else torch.zeros(0, 4)


def count_targets(encoder: TurnEncoder, ids, labels, questions) -> tuple[torch.Tensor, torch.Tensor]:
    """For every counting question: the (sequence, position) that predicts its answer and
    1 / (count + 1) mapped to [-1, 1] (the sink's share of the evenly spread attention, see
    :func:`retrieval_targets`), as a (Q, 1) target for :func:`count_probe`."""
    where, targets = [], []
    for b, question, t, _ in _asked(ids, labels, questions):
        if _is_count(question):
            where.append((b, t - 1))
            count = scenes.NUMBERS.index(encoder.tok.convert_ids_to_tokens(int(labels[b, t])))
            targets.append([2.0 / (count + 1) - 1])
    return torch.tensor(where).reshape(-1, 2), torch.tensor(targets).reshape(-1, 1)


def _is_count(question: str) -> bool:
    return question.startswith("how many")


def position_loss(hidden: torch.Tensor, where: torch.Tensor, targets: torch.Tensor, probe=None) -> torch.Tensor:
    """Mean squared error of a fixed linear probe (default :func:`position_probe`) read from ``hidden``
    (B, T, D) at ``where``: the answer position must carry both objects' coordinates, linearly. Without
    it the decoder did not learn to compare positions (spatial questions stayed at chance for 1,000+
    steps). With ``probe=count_probe`` the same for counting questions and :func:`count_targets`."""
    if len(where) == 0:
        return hidden.sum() * 0
    weights = (probe or position_probe)(hidden.shape[-1]).to(hidden)
    return ((hidden[where[:, 0], where[:, 1]] @ weights.T - targets.to(hidden)) ** 2).mean()


def position_probe(dim: int) -> torch.Tensor:
    """(4, dim) fixed random unit directions the residual stream must encode x1, y1, x2, y2 along."""
    return _fixed_directions(4, dim, CODE_SEED + 1)


def count_probe(dim: int) -> torch.Tensor:
    """(1, dim) a fixed random unit direction the residual stream must encode a count along."""
    return _fixed_directions(1, dim, CODE_SEED + 2)


def _fixed_directions(n: int, dim: int, seed: int) -> torch.Tensor:
    probe = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return probe / probe.norm(dim=-1, keepdim=True)


def retrieval_loss(attention: torch.Tensor, where: torch.Tensor, masks: torch.Tensor,
                   evenly: torch.Tensor | None = None) -> torch.Tensor:
    """-log of the attention mass the supervised heads put on their targets (one layer's attention
    probabilities (B, H, T, T)); for ``evenly`` rows, the cross-entropy of the attention against the
    uniform distribution over the targets instead (its minimum is reached at exactly that spread).
    Rows with no target (the asked object is absent) are not supervised."""
    rows = attention[where[:, 0], :2, where[:, 1]]  # (Q, 2, T)
    mass = -torch.log((rows * masks).sum(-1) + 1e-6)
    if evenly is not None and evenly.any():
        spread = -(torch.log(rows + 1e-6) * masks).sum(-1) / masks.sum(-1).clamp_min(1)
        mass = torch.where(evenly[:, None], spread, mass)
    return mass[masks.any(-1)].mean()


def decoder_losses(model, image_features, ids, mask, labels, position_ids, with_internals: bool = False):
    """Cross-entropy on the answer tokens, with ``image_features`` (all kept patches of the batch,
    concatenated) in place of the <image> placeholders; and the decoder's output, with every layer's
    attention probabilities and hidden states when ``with_internals`` (the model must then run eager
    attention)."""
    embeds = model.get_input_embeddings()(ids)
    where = (ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(where, image_features.to(embeds.dtype).reshape(-1, embeds.shape[-1]))
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                     output_attentions=with_internals, output_hidden_states=with_internals)
    target = labels[:, 1:]
    answer = target != -100
    logits = model.lm_head(out.last_hidden_state[:, :-1][answer])
    return torch.nn.functional.cross_entropy(logits.float(), target[answer]), out


def set_lr(optimizer, lr: float, step: int, total: int, warmup: int = 100) -> None:
    """Linear warm-up, then cosine decay to 5 % of ``lr``."""
    decay = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(total, 1))))
    for group in optimizer.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / warmup) * decay


# ------------------------------------------------------------------------------------- stages
def train_vision(out: str, steps: int = 4000, scenes_per_step: int = 4, windows: int = 4, lr: float = 2e-3,
                 seed: int = 0, device: str = "cpu", first_seed: int = 6_000_000, init: str | None = None,
                 centre_weight: float = 5.0, workers: int = 0) -> dict:
    """Stage 1 (see the module docstring). Windows are centred near a random object 80 % of the time.
    ``windows=0`` trains on whole images instead (``scenes_per_step`` per step): a short second pass
    from ``init`` adapts the tower to attending over all 577 tokens. ``centre_weight``: the weight of
    the object-centre class in the centre-flag cross-entropy (centres are 1 patch in ~70 on whole
    images; counting reads these flags)."""
    processor = build_processor()
    if init:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(init).to(device).train()
    else:
        model = build_model(processor, seed).to(device).train()
    codes = scene_codes(model.config.text_config.hidden_size)
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    log = _new_log("vision", device, steps=steps, scenes_per_step=scenes_per_step, windows=windows, lr=lr, seed=seed,
                   init=init, first_seed=first_seed, centre_weight=centre_weight)
    start = time.time()
    batches = _loader(_StepBatches(_vision_batch, first_seed, scenes_per_step, windows), steps, workers)
    bar = tqdm(batches, total=steps, desc="vision", unit="step", mininterval=5.0)
    for step, (pixels, cells, labels) in enumerate(bar):
        set_lr(optimizer, lr, step, steps)
        stats: dict = {}
        loss = code_loss(codes, vision_patches(model, pixels.to(device), None if cells is None else cells.to(device)),
                         {k: v.to(device) for k, v in labels.items()}, stats, centre_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        log["steps"].append({"step": step + 1, "loss": round(float(loss), 4), **{k: round(v, 3) for k, v in stats.items()},
                             "minutes": round((time.time() - start) / 60, 3)})
        bar.set_postfix(loss=f"{float(loss):.3f}", shape=f"{stats['centre_shape_acc']:.2f}", refresh=False)
    log["eval"] = vision_accuracy(model, codes, scenes.make_split("val", 200))
    return _finish(model, processor, out, log, start)


class _StepBatches(torch.utils.data.Dataset):
    """The batch of training step ``i`` is item ``i``: built from seeds alone, so a run gives the same
    batches whatever the number of loader workers."""

    def __init__(self, make, *args):
        self.make, self.args = make, args

    def __len__(self):
        return 1 << 30

    def __getitem__(self, step: int):
        return self.make(step, *self.args)


def _vision_batch(step: int, first_seed: int, scenes_per_step: int, windows: int):
    first = first_seed + step * scenes_per_step
    if windows:
        return _window_batch(first, scenes_per_step, windows, step)
    return _image_batch(first, scenes_per_step)


def _loader(batches: _StepBatches, steps: int, workers: int):
    """Items 0 .. steps-1 in order; ``workers`` > 0 builds them in that many processes (scene
    rendering, not the model, bounds a step's time on a GPU)."""
    if not workers:
        return (batches[i] for i in range(steps))
    sampler = range(steps)
    return torch.utils.data.DataLoader(batches, batch_size=None, sampler=sampler, num_workers=workers,
                                       prefetch_factor=4, generator=torch.Generator())  # leaves the global RNG alone


def _image_batch(first: int, n_scenes: int):
    drawn = [scenes.make_scene(scenes.SPLIT_BASES["train"] + first + i) for i in range(n_scenes)]
    return pixel_values([scenes.render(s) for s in drawn]), None, stacked_labels(drawn)


def stacked_labels(drawn) -> dict[str, torch.Tensor]:
    """Patch labels of whole scenes, (B, 576) per key (each scene's labels computed once)."""
    labels = [patch_label_tensors(s) for s in drawn]
    return {k: torch.stack([lb[k] for lb in labels]) for k in labels[0]}


def _window_batch(first: int, n_scenes: int, windows: int, step: int):
    pixels, cells, labels = [], [], []
    offsets = torch.arange(WINDOW)
    for i in range(n_scenes):
        scene = scenes.make_scene(scenes.SPLIT_BASES["train"] + first + i)
        image = pixel_values([scenes.render(scene)])[0]
        lab = patch_label_tensors(scene)
        rng = np.random.default_rng([step, i, 3])
        for _ in range(windows):
            if scene.objects and rng.random() < 0.8:
                o = scene.objects[int(rng.integers(len(scene.objects)))]
                wy, wx = (int(np.clip(c // scenes.PATCH - WINDOW // 2 + rng.integers(-2, 3), 0, GRID - WINDOW))
                          for c in (o.cy, o.cx))
            else:
                wy, wx = (int(v) for v in rng.integers(0, GRID - WINDOW + 1, size=2))
            p = scenes.PATCH
            pixels.append(image[:, wy * p:(wy + WINDOW) * p, wx * p:(wx + WINDOW) * p])
            cell = ((wy + offsets[:, None]) * GRID + wx + offsets[None, :]).flatten()
            cells.append(cell)
            labels.append({k: v[cell] for k, v in lab.items()})
    return torch.stack(pixels), torch.stack(cells), {k: torch.stack([lb[k] for lb in labels]) for k in labels[0]}


@torch.no_grad()
def vision_accuracy(model, codes, examples) -> dict:
    """Stage-1 read-out on full val images: % of object centres whose shape / colour / centre flag
    decode right, and % of background patches not taken for a centre."""
    model.eval()
    hits = {"centre_shape": [], "centre_color": [], "centre_flag": [], "background_not_centre": []}
    for start in range(0, len(examples), 16):
        chunk = [e.scene for e in examples[start:start + 16]]
        feats = vision_patches(model, pixel_values([scenes.render(s) for s in chunk]).to(model.device)).cpu()
        for f, scene in zip(feats, chunk):
            lab = patch_label_tensors(scene)
            centre = lab["center"] > 0
            decoded = {k: (f @ codes[k].T).argmax(-1) for k in ("color", "shape", "center")}
            hits["centre_shape"] += (decoded["shape"][centre] == lab["shape"][centre]).tolist()
            hits["centre_color"] += (decoded["color"][centre] == lab["color"][centre]).tolist()
            hits["centre_flag"] += (decoded["center"][centre] == 1).tolist()
            hits["background_not_centre"] += (decoded["center"][~centre] == 0).tolist()
    model.train()
    return {k: round(100.0 * float(np.mean(v)), 2) for k, v in hits.items()}


def train_llm(out: str, steps: int = 3000, batch_size: int = 16, turns: int = 24, lr: float = 1e-3, seed: int = 0,
              device: str = "cpu", background: int | None = 16, noise: float = 0.1, attention_weight: float = 0.5,
              eval_every: int = 300, first_seed: int = 8_000_000, init: str | None = None,
              vision: str | None = None, stop_at: int | None = None, workers: int = 0) -> dict:
    """Stage 2 (see the module docstring): the decoder reads exact scene codes (plus Gaussian noise of
    ``noise`` x their std, so that stage 1's imperfect codes are in distribution) -- or, with
    ``vision`` (a stage-1 checkpoint), the features its frozen tower computes from the rendered scene.

    ``attention_weight`` > 0 adds :func:`retrieval_loss` (see :func:`retrieval_targets`): without it the
    decoder sat at ~45 % for 1,000+ steps (it did not find the asked object among the image tokens);
    with it, retrieval is learnt within a few hundred steps. ``init`` continues a decoder checkpoint;
    ``stop_at`` ends the run (evaluated and saved) after that many steps of the ``steps`` schedule.
    """
    processor = build_processor()
    model = _llm_stage_model(processor, seed, init, vision).to(device).train()
    codes = scene_codes(model.config.text_config.hidden_size)
    if attention_weight:
        model.set_attn_implementation("eager")  # attention probabilities are needed
    encoder = TurnEncoder(processor.tokenizer)
    params = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    log = _new_log("llm", device, steps=steps, batch_size=batch_size, turns=turns, lr=lr, seed=seed,
                   background=background, noise=noise, attention_weight=attention_weight,
                   retrieval_layers=[MENTION_LAYER, ANSWER_LAYER], init=init, vision=vision, first_seed=first_seed)
    val = scenes.make_split("val", 300)
    start = time.time()
    batches = _StepBatches(_llm_batch, encoder, first_seed, batch_size, turns, background, bool(vision),
                           bool(attention_weight or not vision))
    bar = tqdm(_loader(batches, steps, workers), total=steps, desc="llm", unit="step", mininterval=5.0)
    for step, (drawn, ids, labels, mask, pos, kept, questions, patch, pixels) in enumerate(bar):
        set_lr(optimizer, lr, step, steps)
        if vision:
            with torch.no_grad():
                whole = vision_patches(model, pixels.to(device))
            feats = torch.cat([f[k.to(device)] for f, k in zip(whole, kept)])
        else:
            feats = torch.cat([code_features(codes, lab)[k] for lab, k in zip(patch, kept)])
            feats = feats + noise * feats.std() * torch.randn_like(feats)
        loss, internals = decoder_losses(model, feats.to(device), ids.to(device), mask.to(device), labels.to(device),
                                         pos.to(device), with_internals=bool(attention_weight))
        total, retrieval = loss, None
        if attention_weight:
            targets = retrieval_targets(encoder, ids, labels, kept, patch, questions)
            retrieval = sum(retrieval_loss(internals.attentions[layer], where.to(device), masks.to(device), even.to(device))
                            for layer, (where, masks, even) in targets.items()) / len(targets)
            answer_hidden = internals.hidden_states[ANSWER_LAYER + 1]
            where, centres = position_targets(ids, labels, patch, questions)
            retrieval = retrieval + position_loss(answer_hidden, where.to(device), centres)
            where, counts = count_targets(encoder, ids, labels, questions)
            retrieval = retrieval + position_loss(answer_hidden, where.to(device), counts, probe=count_probe)
            total = loss + attention_weight * retrieval
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        loss_value, retrieval_value = loss.item(), None if retrieval is None else retrieval.item()
        log["steps"].append({"step": step + 1, "loss": round(loss_value, 4),
                             "retrieval": None if retrieval_value is None else round(retrieval_value, 4),
                             "minutes": round((time.time() - start) / 60, 3)})
        bar.set_postfix(loss=f"{loss_value:.3f}", retrieval="-" if retrieval_value is None else f"{retrieval_value:.3f}",
                        refresh=False)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            model.set_attn_implementation("sdpa")
            acc = (answer_accuracy(model, processor, val) if vision else code_accuracy(model, codes, encoder, val))
            if attention_weight:
                model.set_attn_implementation("eager")
            log["evals"].append({"step": step + 1, "minutes": round((time.time() - start) / 60, 2), **acc})
            tqdm.write(f"llm step {step + 1}: val {json.dumps(acc)}")
        if stop_at and step + 1 >= stop_at:
            break
    model.set_attn_implementation("sdpa")
    return _finish(model, processor, out, log, start)


def _llm_batch(step: int, encoder: TurnEncoder, first_seed: int, batch_size: int, turns: int,
               background: int | None, render: bool, with_labels: bool):
    """A stage-2 batch: :func:`conversation_batch`, each scene's patch labels when ``with_labels``
    (the codes and the retrieval targets read them), and its pixels when ``render``."""
    batch = conversation_batch(encoder, [first_seed + step * batch_size + i for i in range(batch_size)], turns, background)
    drawn = batch[0]
    patch = [patch_label_tensors(s) for s in drawn] if with_labels else None
    pixels = pixel_values([scenes.render(s) for s in drawn]) if render else None
    return (*batch, patch, pixels)


def _llm_stage_model(processor, seed: int, init: str | None, vision: str | None):
    """A fresh model, or ``init``'s; with ``vision``, that checkpoint's tower and projector under it."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(init) if init else build_model(processor, seed)
    if model.get_input_embeddings().num_embeddings < len(processor.tokenizer):  # words added since ``init``
        model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    if vision:
        tower = LlavaForConditionalGeneration.from_pretrained(vision)
        model.model.vision_tower.load_state_dict(tower.model.vision_tower.state_dict())
        model.model.multi_modal_projector.load_state_dict(tower.model.multi_modal_projector.state_dict())
    return model


@torch.no_grad()
def code_accuracy(model, codes, encoder: TurnEncoder, examples, batch_size: int = 50) -> dict:
    """Stage-2 accuracy (%) on ``examples`` with the exact scene codes as the image features."""
    model.eval()
    tok = encoder.tok
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        rows = [encoder.conversation([(e.question, e.answer)]) for e in chunk]
        rows = [(ids[:-2], pos[:-2]) for ids, _, pos in rows]  # drop "<answer> </s>"
        length = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), length), encoder.pad)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        pos = torch.zeros(len(rows), length, dtype=torch.long)
        for b, (x, p) in enumerate(rows):  # left padding: the answer comes at the last position
            ids[b, length - len(x):], pos[b, length - len(p):], mask[b, length - len(x):] = torch.tensor(x), torch.tensor(p), 1
        feats = torch.cat([code_features(codes, patch_label_tensors(e.scene)) for e in chunk]).to(model.device)
        embeds = model.get_input_embeddings()(ids.to(model.device))
        embeds = embeds.masked_scatter((ids.to(model.device) == model.config.image_token_id)[..., None], feats)
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask.to(model.device),
                                            position_ids=pos.to(model.device)).last_hidden_state
        words = tok.convert_ids_to_tokens(model.lm_head(hidden[:, -1]).argmax(-1).tolist())
        for e, w in zip(chunk, words):
            hits.setdefault(e.qtype, []).append(w == e.answer)
    model.train()
    result = {q: round(100.0 * float(np.mean(v)), 1) for q, v in sorted(hits.items())}
    result["overall"] = round(100.0 * float(np.mean(sum(hits.values(), []))), 1)
    return result


def train_joint(out: str, vision: str, llm: str, steps: int = 400, batch_size: int = 8, turns: int = 16,
                lr: float = 3e-4, code_weight: float = 0.5, seed: int = 0, device: str = "cpu",
                eval_every: int = 200, first_seed: int = 9_000_000) -> dict:
    """Stage 3 (see the module docstring): the whole model on rendered scenes, all 576 tokens."""
    processor = build_processor()
    model = _llm_stage_model(processor, seed, init=llm, vision=vision).to(device).train()
    torch.manual_seed(seed)
    codes = scene_codes(model.config.text_config.hidden_size)
    encoder = TurnEncoder(processor.tokenizer)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    log = _new_log("joint", device, vision=vision, llm=llm, steps=steps, batch_size=batch_size, turns=turns, lr=lr,
                   code_weight=code_weight, seed=seed)
    val = scenes.make_split("val", 300)
    log["evals"].append({"step": 0, **answer_accuracy(model, processor, val)})
    tqdm.write(f"joint step 0: val {json.dumps(log['evals'][-1])}")
    start = time.time()
    bar = tqdm(range(steps), desc="joint", unit="step", mininterval=5.0)
    for step in bar:
        set_lr(optimizer, lr, step, steps, warmup=20)
        drawn, ids, labels, mask, pos, _, _ = conversation_batch(
            encoder, [first_seed + step * batch_size + i for i in range(batch_size)], turns)
        feats = vision_patches(model, pixel_values([scenes.render(s) for s in drawn]).to(device))
        loss, _ = decoder_losses(model, feats, ids.to(device), mask.to(device), labels.to(device), pos.to(device))
        patch = {k: v.to(device) for k, v in stacked_labels(drawn).items()}
        aux = code_loss(codes, feats, patch)
        optimizer.zero_grad(set_to_none=True)
        (loss + code_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        log["steps"].append({"step": step + 1, "loss": round(float(loss), 4), "code_loss": round(float(aux), 4),
                             "minutes": round((time.time() - start) / 60, 3)})
        bar.set_postfix(loss=f"{float(loss):.3f}", code=f"{float(aux):.3f}", refresh=False)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            log["evals"].append({"step": step + 1, "minutes": round((time.time() - start) / 60, 2),
                                 **answer_accuracy(model, processor, val)})
            tqdm.write(f"joint step {step + 1}: val {json.dumps(log['evals'][-1])}")
    return _finish(model, processor, out, log, start)


@torch.no_grad()
def answer_accuracy(model, processor, examples, batch_size: int = 16) -> dict:
    """Greedy one-word answers on ``examples`` through the model's own forward (percent)."""
    from .bench import evaluate

    was_training = model.training
    model.eval()
    result = {k: round(v, 2) for k, v in evaluate(model, processor, examples, batch_size=batch_size).items()}
    model.train(was_training)
    return result


# ----------------------------------------------------------------------------------- bookkeeping
def _new_log(stage: str, device: str, **settings) -> dict:
    return {"stage": stage, "hardware": hardware(device), "torch": torch.__version__, "vision_config": VISION,
            "text_config": TEXT, **settings, "steps": [], "evals": []}


def _finish(model, processor, out: str, log: dict, start: float) -> dict:
    log["total_minutes"] = round((time.time() - start) / 60, 2)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    save(model, processor, out_dir)
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def hardware(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
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
    sub = parser.add_subparsers(dest="stage", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="checkpoint folder to write")
    common.add_argument("--steps", type=int, required=True)
    common.add_argument("--lr", type=float)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    common.add_argument("--workers", type=int, default=0,
                        help="processes that render the training scenes (0 = in the training process)")
    vision = sub.add_parser("vision", parents=[common], help="stage 1: tower + projector -> scene codes")
    vision.add_argument("--init", help="continue from this checkpoint")
    vision.add_argument("--whole-images", action="store_true", help="train on whole images, not 8x8 windows")
    vision.add_argument("--first-seed", type=int, default=6_000_000, help="first train-scene seed")
    vision.add_argument("--centre-weight", type=float, default=5.0, help="weight of the object-centre class")
    llm = sub.add_parser("llm", parents=[common], help="stage 2: decoder on exact scene codes")
    llm.add_argument("--batch-size", type=int, default=16)
    llm.add_argument("--turns", type=int, default=24)
    llm.add_argument("--background", type=int, default=16,
                     help="at most this many background patches besides the objects' (576 = the whole image)")
    llm.add_argument("--attention-weight", type=float, default=0.5, help="weight of the retrieval loss (0 = off)")
    llm.add_argument("--init", help="continue from this checkpoint's decoder")
    llm.add_argument("--vision", help="read this stage-1 checkpoint's frozen tower features instead of exact codes")
    llm.add_argument("--stop-at", type=int, help="stop (evaluate, save) after this many steps of the --steps schedule")
    llm.add_argument("--first-seed", type=int, default=8_000_000, help="first train-scene seed")
    joint = sub.add_parser("joint", parents=[common], help="stage 3: end to end on rendered scenes")
    joint.add_argument("--vision", required=True, help="stage-1 checkpoint")
    joint.add_argument("--llm", required=True, help="stage-2 checkpoint")
    joint.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = dict(out=args.out, steps=args.steps, seed=args.seed, device=args.device)
    if args.lr is not None:
        kwargs["lr"] = args.lr
    if args.stage == "vision":
        log = train_vision(init=args.init, windows=0 if args.whole_images else 4, first_seed=args.first_seed,
                           centre_weight=args.centre_weight, workers=args.workers, **kwargs)
        print(json.dumps(log["eval"]))
    elif args.stage == "llm":
        log = train_llm(batch_size=args.batch_size, turns=args.turns, background=args.background,
                        attention_weight=args.attention_weight, init=args.init, vision=args.vision,
                        stop_at=args.stop_at, first_seed=args.first_seed, workers=args.workers, **kwargs)
        print(json.dumps(log["evals"][-1]))
    else:
        log = train_joint(vision=args.vision, llm=args.llm, batch_size=args.batch_size, **kwargs)
        print(json.dumps(log["evals"][-1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
