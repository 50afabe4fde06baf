"""The OC-VTP pruner: slot attention over a vision tower's middle-layer tokens (inference part).

Li, Zhao, Deng, Wang, Pajarinen, "Object-Centric Vision Token Pruning for Vision Language Models",
arXiv 2511.20439. A small encoder MLP projects the tower's tokens, K slots compete for the tokens in
three iterations of slot attention, and each slot nominates the token it attends to most. Only this
module is needed at inference; the decoder (:mod:`vtprune.ocvtp.decoder`) exists for training.

Architecture as the paper's public code (``OC-VTP/model.py``, ``LLaVA/llava/model/ocl_model.py``):
encoder LayerNorm → Linear(d, 2d) → GELU → Linear(2d, s); one shared learned Gaussian (mean, log-std)
from which the K initial slots are drawn; slot attention with a single head of width s: inputs
LayerNorm'd, keys/values/queries without bias, softmax over the *slots*, weighted-mean updates,
``GRUCell``, residual FFN s → 4s → s (GELU); straight-through gradient to the initial slots on the last
iteration; every linear and GRU bias starts at zero. With the same weights and the same ε the slot
attention equals the public code's (fixture ``tests/fixtures/parity/ocvtp.json``).

Slot noise: ``initial_slots`` draws ε per ``noise``: ``"fixed"`` (the default of
:class:`vtprune.methods.ocvtp.OCVTP`) from a CPU generator seeded with ``seed`` — the same numbers as
the public code's ``randn_like`` after ``torch.manual_seed(seed)`` for one image — shared by every image
of a batch; ``"per_call"`` a fresh draw per image from the global RNG, as the public code does on every
call; ``epsilon`` passes ε explicitly.

Deviations from the public code:

* The slot width ``s`` is configurable (512 in the paper; the shipped demo checkpoint uses a smaller
  width to stay near 1 MB); the public code's FFN dropout (0.01, active in its training only) is not used.
* The log-std starts at 0 (std 1). The public code initialised the (1, 1, s) log-std with Xavier-uniform,
  which yields values within ±0.11, i.e. a std close to 1 as well.
* Checkpoints are safetensors files holding the pruner alone, loaded strictly, with a JSON config
  (see :func:`save_pruner` / :func:`load_pruner`); the public code pickled the pruner together with its
  decoder and loaded it non-strictly.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import VTPruneError

FORMAT_VERSION = 1
WEIGHTS_NAME = "pruner.safetensors"
CONFIG_NAME = "pruner.json"


class CheckpointError(VTPruneError, ValueError):
    """An OC-VTP checkpoint is missing, malformed, or does not fit the model it is used with."""


@dataclass
class PrunerConfig:
    """Everything needed to rebuild a pruner and to check that it fits a vision tower.

    input_dim   width of the tower's hidden states (1024 for CLIP ViT-L/14).
    slot_dim    slot-attention width (512 in the paper).
    hidden_dim  hidden width of the encoder MLP (default 2 · input_dim).
    ffn_dim     hidden width of the slot FFN (default 4 · slot_dim).
    iters       slot-attention iterations (3).
    layer       the tower's hidden states the pruner reads, as an index into HF ``hidden_states``:
                the output of encoder block ``layer`` (1-based), i.e. ``ctx.hidden(layer - 1)``.
                9 for LLaVA's 24-block CLIP tower, as in the paper.
    tower       identity of the tower the pruner was trained on (family, widths, depth, patch size,
                weight statistics), or None for synthetic data; see :func:`vtprune.ocvtp.extract.tower_identity`.
    num_tokens  token count of the training features (informative).
    training    free-form training facts (steps, losses, data) written by the trainer.
    """

    input_dim: int
    slot_dim: int = 512
    hidden_dim: int | None = None
    ffn_dim: int | None = None
    iters: int = 3
    layer: int = 9
    tower: dict | None = None
    num_tokens: int | None = None
    training: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.hidden_dim is None:
            self.hidden_dim = 2 * self.input_dim
        if self.ffn_dim is None:
            self.ffn_dim = 4 * self.slot_dim
        for name in ("input_dim", "slot_dim", "hidden_dim", "ffn_dim", "iters", "layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"PrunerConfig.{name} must be a positive integer, got {value!r}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PrunerConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"Unknown keys in the OC-VTP pruner config: {', '.join(unknown)}.")
        if "input_dim" not in data:
            raise CheckpointError("The OC-VTP pruner config has no 'input_dim'.")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise CheckpointError(f"OC-VTP checkpoint format {version} is not supported (expected {FORMAT_VERSION}).")
        return cls(**data)


class SlotAttention(nn.Module):
    """Single-head slot attention (Locatello et al. 2020) with the straight-through last iteration."""

    def __init__(self, dim: int, ffn_dim: int, iters: int = 3, eps: float = 1e-5):
        super().__init__()
        self.dim, self.iters, self.eps = dim, iters, eps
        self.norm_input = nn.LayerNorm(dim)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.norm_slots = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))

    def forward(self, inputs: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs (B, N, s), initial slots (B, K, s) → slots (B, K, s), attention (B, K, N) of the last
        iteration (each column sums to 1 over the slots)."""
        b, k, d = slots.shape
        x = self.norm_input(inputs)
        keys, values = self.to_k(x), self.to_v(x)
        init = slots
        attn = None
        for i in range(self.iters):
            if i == self.iters - 1:  # straight-through: the last step's gradient reaches the initial slots
                slots = slots.detach() + init - init.detach()
            previous = slots
            q = self.to_q(self.norm_slots(slots))
            logits = torch.einsum("bkd,bnd->bkn", q, keys) / math.sqrt(d)
            attn = logits.softmax(dim=1)  # tokens compete for slots
            weights = attn / (attn.sum(dim=-1, keepdim=True) + self.eps)
            updates = torch.einsum("bkn,bnd->bkd", weights, values)
            slots = self.gru(updates.reshape(-1, d), previous.reshape(-1, d)).view(b, k, d)
            slots = slots + self.ffn(self.norm_ffn(slots))
        return slots, attn


class SlotPruner(nn.Module):
    """The OC-VTP pruner. ``forward`` runs slot attention; :meth:`select` picks the kept tokens."""

    def __init__(self, config: PrunerConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = nn.Sequential(nn.LayerNorm(c.input_dim), nn.Linear(c.input_dim, c.hidden_dim), nn.GELU(),
                                     nn.Linear(c.hidden_dim, c.slot_dim))
        self.slot_mean = nn.Parameter(torch.empty(c.slot_dim))
        self.slot_log_std = nn.Parameter(torch.zeros(c.slot_dim))
        self.slot_attention = SlotAttention(c.slot_dim, c.ffn_dim, c.iters)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = math.sqrt(6.0 / (1 + self.config.slot_dim))  # Xavier-uniform of a (1, s) matrix
        nn.init.uniform_(self.slot_mean, -bound, bound)
        nn.init.zeros_(self.slot_log_std)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GRUCell):
                nn.init.zeros_(module.bias_ih)
                nn.init.zeros_(module.bias_hh)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def initial_slots(self, batch: int, k: int, *, seed: int = 0, noise: str = "fixed",
                      generator: torch.Generator | None = None, epsilon: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, k, s) initial slots: ``mean + std · ε``.

        ``epsilon`` (k, s) or (batch, k, s) passes ε explicitly. Otherwise ``noise="fixed"`` (default)
        draws ε on the CPU from a generator seeded with ``seed`` and shares it by every image of the
        batch (the same stream as the public code's ``randn_like`` after ``torch.manual_seed(seed)``
        for one image); ``noise="per_call"`` draws a fresh ε per image from the global RNG, as the public
        code does. ``generator`` (on the parameters' device) draws a different ε per image (training,
        validation).
        """
        mean, std = self.slot_mean, self.slot_log_std.exp()
        s = mean.shape[0]
        if epsilon is not None:
            eps = epsilon.to(mean.device, mean.dtype).expand(batch, k, s)
        elif generator is not None:
            eps = torch.randn(batch, k, s, generator=generator, device=mean.device)
        elif noise == "per_call":
            eps = torch.randn(batch, k, s, device=mean.device)
        elif noise == "fixed":
            g = torch.Generator(device="cpu").manual_seed(int(seed))
            eps = torch.randn(k, s, generator=g).to(mean.device).expand(batch, k, s)
        else:
            raise ValueError(f"noise must be 'fixed' or 'per_call', got {noise!r}.")
        return mean + std * eps.to(mean.dtype)

    def forward(self, tokens: torch.Tensor, k: int, *, seed: int = 0, noise: str = "fixed",
                generator: torch.Generator | None = None,
                epsilon: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, N, input_dim) → slots (B, K, s) and slot attention (B, K, N)."""
        if tokens.dim() != 3:
            raise ValueError(f"Expected tokens of shape (batch, tokens, {self.config.input_dim}), got {tuple(tokens.shape)}.")
        if tokens.shape[-1] != self.config.input_dim:
            raise CheckpointError(
                f"This OC-VTP pruner takes {self.config.input_dim}-d tokens but got {tokens.shape[-1]}-d ones; "
                f"train a pruner on this tower's features (vtprune ocvtp extract / train)."
            )
        if not isinstance(k, int) or k <= 0:
            raise ValueError(f"The number of slots must be a positive integer, got {k!r}.")
        x = self.encoder(tokens.to(self.slot_mean.dtype))
        slots = self.initial_slots(tokens.shape[0], k, seed=seed, noise=noise, generator=generator, epsilon=epsilon)
        return self.slot_attention(x, slots)

    @torch.no_grad()
    def select(self, tokens: torch.Tensor, keep: int, fill_scores: torch.Tensor | None = None, *, seed: int = 0,
               noise: str = "fixed", cls_slot: bool = True, epsilon: torch.Tensor | None = None) -> torch.Tensor:
        """(B, keep) sorted, unique indices of the tokens to keep for each image of ``tokens`` (B, N, d).

        ``cls_slot=True`` runs keep + 1 slots, as the public code does when the CLS token counts in its
        budget (``OCL_HAS_CLS=1``); ``cls_slot=False`` runs keep slots. See :func:`select_from_attention`
        for the rule. ``fill_scores`` (B, N) ranks the tokens used to fill the budget when slots share
        a token.
        """
        if tokens.dim() == 2:
            tokens = tokens.unsqueeze(0)
        n = tokens.shape[1]
        if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= n:
            raise ValueError(f"keep must be an integer in [1, {n}], got {keep!r}.")
        if keep == n:
            return torch.arange(n, device=tokens.device).expand(tokens.shape[0], n).clone()
        _, attn = self(tokens, slot_count(keep, cls_slot), seed=seed, noise=noise, epsilon=epsilon)
        return select_from_attention(attn, keep, fill_scores)


def slot_count(keep: int, cls_slot: bool = True) -> int:
    """Slots run for a budget of ``keep`` patch tokens: keep + 1 when the CLS token takes a place in the
    public code's kept set (``OCL_HAS_CLS=1``: target keep + 1, CLS always added, CLS dropped by the
    LLaVA feature selection afterwards), else keep."""
    return keep + 1 if cls_slot else keep


def select_from_attention(attn: torch.Tensor, keep: int, fill_scores: torch.Tensor | None = None,
                          exclude: torch.Tensor | None = None) -> torch.Tensor:
    """The kept tokens from slot attention ``attn`` (B, K, N): (B, keep) sorted unique indices.

    Each slot nominates its argmax token (first index on ties). Nominated tokens are ranked by the
    largest attention any slot gave them; the rest of the budget goes to the other tokens ranked by
    ``fill_scores`` (B, N) — by default each token's slot-attention mass, Σ_k A[k, n] / Σ_n' A[k, n'] (its
    weight in the slots' updates; the plain column sum is 1 for every token since the softmax runs over
    the slots). Every remaining tie is broken by the lower index. The result is sorted ascending.
    ``exclude`` (B, N) bool: nominated tokens that lose their nomination (they rank with the others).
    """
    if attn.dim() == 2:
        attn = attn.unsqueeze(0)
    b, k, n = attn.shape
    if not 1 <= keep <= n:
        raise ValueError(f"keep must lie in [1, {n}], got {keep}.")
    attn = attn.float()
    if fill_scores is None:  # each token's share of the slots' weighted means (A's columns sum to 1)
        fill = (attn / (attn.sum(dim=2, keepdim=True) + 1e-5)).sum(dim=1)
    else:
        fill = fill_scores.to(attn.device).float().reshape(b, n)
    best, nominated = attn.max(dim=2)  # (B, K) per slot: its largest attention and the token
    chosen = torch.full((b, n), float("-inf"), device=attn.device)
    chosen.scatter_reduce_(1, nominated, best, reduce="amax", include_self=True)
    if exclude is not None:
        chosen = chosen.masked_fill(exclude.to(attn.device).reshape(b, n), float("-inf"))
    # order: by fill score (stable → lower index first on ties), then stably by nomination strength;
    # tokens nobody nominated (-inf) keep the fill order behind every nominated token
    by_fill = torch.sort(fill, dim=1, descending=True, stable=True).indices
    strength = chosen.gather(1, by_fill)
    order = by_fill.gather(1, torch.sort(strength, dim=1, descending=True, stable=True).indices)
    return torch.sort(order[:, :keep], dim=1).values


# -- checkpoints ----------------------------------------------------------------------------------
def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix == ".safetensors":
        return p, p.with_suffix(".json")
    return p / WEIGHTS_NAME, p / CONFIG_NAME


def save_pruner(pruner: SlotPruner, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``pruner.safetensors`` (the pruner's weights alone) and ``pruner.json`` (its config) into the
    directory ``path`` (or next to ``path`` when it ends in ``.safetensors``). ``dtype`` (e.g.
    ``torch.float16``) stores smaller weights; they are loaded back as float32."""
    from safetensors.torch import save_file

    weights, config = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in pruner.state_dict().items()}
    save_file(state, str(weights), metadata={"format": "pt", "vtprune": "ocvtp-pruner",
                                             "format_version": str(FORMAT_VERSION)})
    _readable(weights)
    config.write_text(json.dumps(pruner.config.to_dict(), indent=2) + "\n")
    return weights.parent


def _readable(path: Path) -> None:
    """safetensors creates files owner-only; give them the usual permissions (umask applies)."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def read_config(path: str | Path) -> PrunerConfig:
    _, config = _paths(path)
    if not config.is_file():
        raise CheckpointError(f"No OC-VTP pruner config at {config}; a checkpoint is a folder with "
                              f"{WEIGHTS_NAME} and {CONFIG_NAME} (written by `vtprune ocvtp train`).")
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config} is not valid JSON: {e}") from None
    return PrunerConfig.from_dict(data)


def load_pruner(path: str | Path, map_location: str | torch.device = "cpu") -> SlotPruner:
    """Load a pruner saved by :func:`save_pruner`. Strict: a missing, unexpected or mis-shaped tensor
    raises :class:`CheckpointError` naming it. Returned in eval mode, float32."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, _ = _paths(path)
    config = read_config(path)
    if not weights.is_file():
        raise CheckpointError(f"No OC-VTP pruner weights at {weights}.")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"Cannot read {weights}: {e}") from None
    pruner = SlotPruner(config)
    expected = pruner.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    for key in sorted(set(expected) & set(state)):
        if tuple(state[key].shape) != tuple(expected[key].shape):
            problems.append(f"{key} has shape {tuple(state[key].shape)}, the config implies {tuple(expected[key].shape)}")
    if problems:
        raise CheckpointError(f"{weights} does not match its config {CONFIG_NAME}: " + "; ".join(problems) + ".")
    pruner.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return pruner.to(map_location).eval()


def describe(pruner: SlotPruner) -> dict[str, Any]:
    return {"parameters": pruner.num_parameters, **pruner.config.to_dict()}
