"""Model adapters: what the pipeline needs to know about one model family.

An adapter finds the image-token spans in ``input_ids`` (from the config's image token id, never an
offset), runs the vision side up to each insertion point and hands methods the contexts they ask
for, builds original position ids (1-D or M-RoPE), and names the decoder layers.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from ..attention import record_attention
from ..errors import InputError, UnsupportedModelError  # noqa: F401
from ..methods.base import Instruction, Method

if TYPE_CHECKING:
    from ..pipeline.layout import Layout


def supported_classes() -> list[str]:
    from .families import supported_classes as classes

    return classes()


def family_of(model) -> str:
    """The family name of a transformers model; UnsupportedModelError for an unsupported class."""
    from .families import family_of_model

    return family_of_model(model).name


TEXT, CANDIDATE, REGISTER, NEWLINE = range(4)  # what a unit / a column of the compact sequence holds


def unit_kind_table(newline: torch.Tensor, extras: int) -> torch.Tensor:
    """Per unit of an image (``newline``: which of its ``n_units`` are newline tokens), then per extra
    unit (registers, forwarded [CLS]): NEWLINE, CANDIDATE or REGISTER."""
    kinds = torch.where(newline, NEWLINE, CANDIDATE)
    return torch.cat([kinds, torch.full((extras,), REGISTER, dtype=kinds.dtype)])


def host_ids(input_ids: torch.Tensor) -> np.ndarray:
    """The token ids on the host, for the bookkeeping of where the images are."""
    return input_ids.cpu().numpy()  # sync: where the images are (once per call)


@dataclass
class EncodedImage:
    """One image after the vision side and any vision/projected pruning.

    embeds     (len(keep), D_llm) the LLM inputs of the kept units.
    keep       sorted indices of the kept units among the image's ``n_units + n_extra`` units.
    n_units    units of the full layout that own a position (patches, newline tokens).
    n_extra    units appended after them (test-time registers, forwarded [CLS] tokens); they take the
               last unit's position.
    candidates number of prunable units (patches; not newline tokens, not registers).
    protected  indices (into the full unit list) that in-LLM methods must keep (registers).
    deepstack  Qwen3-VL: per DeepStack layer, (len(keep), D_llm) features of the kept units.
    """

    embeds: torch.Tensor
    keep: torch.Tensor
    n_units: int
    n_extra: int = 0
    candidates: int = 0
    protected: torch.Tensor | None = None
    deepstack: list[torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    unit_cells: torch.Tensor | None = None  # (n_units+n_extra, 3): crop, row, col of each unit (-1 = none)
    unit_kind: torch.Tensor | None = None  # (n_units+n_extra,) on the host, ``unit_kind_table``; else derived
    modality: str = "image"  # "video": frames of one video (LLaVA-OneVision)


class Adapter:
    """Shared logic; subclasses fill in the family specifics."""

    family: str = ""
    #: None when positions="contiguous" works for this family (1-D positions); else why it does not
    contiguous_positions_unsupported: str | None = None

    def __init__(self, model, layout: str = "model"):
        self.model = model
        self.config = model.config
        self.layout = layout
        self._rows_memo: tuple[torch.Tensor, int, tuple] | None = None  # (tensor, its version, its rows)

    def host_rows(self, values: torch.Tensor) -> tuple[tuple[int, ...], ...]:
        """The rows of a small 2-D tensor of image sizes or grids as Python ints, read once per tensor
        and version (the model's forward reads them too); the keys of the per-size tables."""
        memo = self._rows_memo
        if memo is not None and memo[0] is values and memo[1] == values._version:
            return memo[2]
        rows = tuple(tuple(r) for r in values.tolist())  # sync: the image sizes or grids, once per call
        self._rows_memo = (values, values._version, rows)  # holding the tensor keeps its id from being reused
        return rows

    # -- structure --------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def language_model(self):
        return self.model.model.language_model

    @property
    def text_config(self):
        return self.config.text_config

    @property
    def decoder_layers(self):
        return self.language_model.layers

    @property
    def vision_depth(self) -> int:
        """Number of blocks of the vision tower."""
        raise NotImplementedError

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    # -- inputs -----------------------------------------------------------------------------
    def num_images(self, inputs: dict) -> int:
        raise NotImplementedError

    def expected_tokens(self, inputs: dict) -> list[int]:
        """Placeholder tokens each image occupies in the processor's ``input_ids``."""
        raise NotImplementedError

    def image_spans(self, input_ids: torch.Tensor, inputs: dict) -> list[list[tuple[int, int]]]:
        """Per sample, the (start, end) column ranges of its images, in order; checks the counts."""
        return self.placeholder_spans(input_ids, self.image_token_id, self.expected_tokens(inputs), "image")

    @staticmethod
    def placeholder_spans(input_ids: torch.Tensor | np.ndarray, token_id: int, expected: list[int],
                          what: str) -> list[list[tuple[int, int]]]:
        """Per sample, the (start, end) column ranges of the runs of ``token_id``, cut into items of
        ``expected`` placeholders each (in order over the batch); checks the counts. ``input_ids``: a
        tensor, or its host copy (``host_ids``) when the caller looks for several tokens."""
        ids = input_ids if isinstance(input_ids, np.ndarray) else host_ids(input_ids)
        is_item = np.zeros((ids.shape[0], ids.shape[1] + 2), dtype=np.int8)  # host: numpy, 0-padded
        is_item[:, 1:-1] = ids == token_id
        edges = is_item[:, 1:] - is_item[:, :-1]  # +1 where a run starts, -1 after it
        samples, starts = np.nonzero(edges == 1)  # host: numpy
        runs = zip(samples.tolist(), starts.tolist(), np.nonzero(edges == -1)[1].tolist())  # host: numpy
        spans: list[list[tuple[int, int]]] = [[] for _ in range(ids.shape[0])]
        k = 0
        for b, col, end in runs:  # (sample, first column, column after the run), in order
            while col < end:  # a run may hold several images back to back
                if k >= len(expected):
                    raise InputError(
                        f"input_ids hold more {what} placeholders than the {len(expected)} {what}(s) given. "
                        f"Pass one {what} per '<{what}>' in the prompt (use the model's processor to build inputs)."
                    )
                if end - col < expected[k]:
                    raise InputError(
                        f"{what.capitalize()} {k} needs {expected[k]} placeholder tokens but input_ids hold a run of "
                        f"{end - col}. Build the inputs with the model's processor so placeholders match {what}s."
                    )
                spans[b].append((col, col + expected[k]))
                col += expected[k]
                k += 1
        if k != len(expected):
            raise InputError(
                f"{len(expected)} {what}(s) were given but input_ids hold placeholders for {k}. "
                f"Put one '<{what}>' per {what} in the prompt (use the model's processor)."
            )
        return spans

    def check_prefill_inputs(self, input_ids: torch.Tensor, image_inputs: dict, user_positions) -> None:
        """Refuse, before anything runs, inputs on which a pruned run could not equal the plain model."""

    @functools.cached_property
    def _first_parameter(self) -> torch.nn.Parameter:  # the same object after model.to(...): its device follows
        return next(self.model.parameters())

    def check_inputs(self, pixel_values: torch.Tensor) -> None:
        param = self._first_parameter
        if pixel_values.device != param.device:
            raise InputError(
                f"pixel_values are on {pixel_values.device} but the model is on {param.device}; "
                f"move the inputs with .to(model.device)."
            )
        if not pixel_values.is_floating_point():
            raise InputError(f"pixel_values must be floating point, got {pixel_values.dtype}.")

    # -- positions --------------------------------------------------------------------------
    def full_positions(self, input_ids, attention_mask, inputs, user_positions) -> torch.Tensor:
        """(P, B, L) original position ids of the full (unpruned) sequence."""
        if user_positions is not None:
            return user_positions if user_positions.dim() == 3 else user_positions.unsqueeze(0)
        length = input_ids.shape[1]
        return torch.arange(length, device=input_ids.device).view(1, 1, -1).expand(1, input_ids.shape[0], -1)

    def decode_positions(self, session, attention_mask, q_len: int) -> torch.Tensor:
        """Positions the unmodified model would use for ``q_len`` new tokens (no position_ids given)."""
        start = session.original_seen
        pos = torch.arange(start, start + q_len, device=session.compact_mask.device)
        return pos.view(1, -1).expand(session.compact_mask.shape[0], -1)

    def format_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Turn (P, B, L) into what this family's forward takes."""
        return positions[0] if positions.shape[0] == 1 else positions

    # -- vision side -------------------------------------------------------------------------
    def encode_images(self, inputs: dict, method: Method | None, instructions: list[Instruction],
                      timer) -> list[EncodedImage]:
        raise NotImplementedError

    def mm_encoder_outputs(self, images: list[EncodedImage]) -> dict:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"image": BaseModelOutputWithPooling(pooler_output=tuple(im.embeds for im in images))}

    # -- in-LLM pruning ------------------------------------------------------------------------
    def patch_decoder(self, current_layout: Callable[[], Layout | None]) -> Callable[[], None]:
        """Patch what the language model does outside its decoder layers that in-LLM pruning must see
        (``current_layout()``: the layout inside the decoder during a pruned prefill, else None);
        returns the function that restores it. Nothing to patch by default."""
        return lambda: None

    # -- helpers for subclasses ----------------------------------------------------------------
    @staticmethod
    @contextlib.contextmanager
    def recording(modules: dict[int, Any]):
        """Record the attention of the given vision blocks (by index) while the tower runs."""
        with contextlib.ExitStack() as stack:
            yield {i: stack.enter_context(record_attention(m)) for i, m in modules.items()}




def adapter_for(model, **options) -> Adapter:
    from .families import family_of_model

    return family_of_model(model).adapter(model, **options)
