"""Training-only parts of OC-VTP: the masked slot-conditioned decoder and the area-weighted loss.

Li, Zhao, Deng, Wang, Pajarinen, "Object-Centric Vision Token Pruning for Vision Language Models",
arXiv 2511.20439. The pruner's slots must carry enough of the image to reconstruct the tower's tokens:
a 4-layer pre-norm Transformer decoder (width d = the tower's, 4 heads, FFN 4d, GELU, no causal mask)
reads the slots as memory and predicts every token from queries in which a random subset of tokens is
replaced by a learned mask token. The loss is an MSE weighted towards tokens held by small slots.
None of this is needed at inference; checkpoints hold the pruner alone.

As the public code (``ARRandTransformerDecoder``), the first layer's pre-norm is moved in front of the
stack (``input_norm=True``, the default): the residual stream starts from the normalised query. With the
same weights, slot noise and visible set the loss equals the public code's (fixture
``tests/fixtures/parity/ocvtp.json``, unmasked cases); ``input_norm=False`` keeps standard pre-norm layers.

Deviations from the public code:

* No physical shuffling: the public code permutes tokens and position embeddings, masks a prefix of the
  permutation and un-permutes the output. Without a causal mask the decoder is permutation-equivariant,
  so we draw the visible set as the first ``v`` ranks of a random permutation and leave the order alone
  (the same distribution of visible sets, the same outputs).
* The "small constant" visible count (``int(256 · 0.1) − 1 = 24`` of 576 tokens in the public code) is
  scaled to the token count: ``round(24 / 576 · N)``, clipped to [0, N − 2].
* Masking is also used for validation (with a fixed generator), so validation measures the training
  objective on held-out images; the public code validated unmasked (and on a training batch).
"""
from __future__ import annotations

import torch
from torch import nn

SMALL_VISIBLE_FRACTION = 24 / 576


class SlotDecoder(nn.Module):
    """Masked, slot-conditioned reconstruction of the tower's tokens (training only)."""

    def __init__(self, dim: int, num_tokens: int, slot_dim: int, layers: int = 4, heads: int = 4,
                 ffn_mult: int = 4, input_norm: bool = True):
        """``input_norm=True`` (the public code): the first layer's pre-norm is taken out of the layer and
        applied once to the query in front of the stack, so the residual stream starts from the
        normalised query. ``input_norm=False``: standard pre-norm layers (the residual stream starts from
        the raw query)."""
        super().__init__()
        if dim % heads:
            raise ValueError(f"The decoder width {dim} is not divisible by its {heads} heads.")
        if num_tokens < 2:
            raise ValueError(f"The decoder needs at least 2 tokens per image, got {num_tokens}.")
        self.dim, self.num_tokens = dim, num_tokens
        self.query_proj = nn.Linear(dim, dim, bias=False)
        self.query_norm = nn.LayerNorm(dim)
        self.memory_proj = nn.Linear(slot_dim, dim, bias=False)
        self.memory_norm = nn.LayerNorm(dim)
        self.mask_token = nn.Parameter(torch.randn(dim) * dim ** -0.5)
        self.position = nn.Parameter(torch.empty(num_tokens, dim))
        nn.init.trunc_normal_(self.position)
        layer = nn.TransformerDecoderLayer(d_model=dim, nhead=heads, dim_feedforward=ffn_mult * dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True, bias=False)
        self.backbone = nn.TransformerDecoder(layer, num_layers=layers)
        self.input_norm: nn.Module = nn.Identity()
        if input_norm:
            self.input_norm = self.backbone.layers[0].norm1
            self.backbone.layers[0].norm1 = nn.Identity()

    def visible_mask(self, batch: int, generator: torch.Generator | None = None,
                     p_uniform: float = 0.5) -> torch.Tensor:
        """(B, N) bool, True where the token stays visible. The visible count is uniform in [0, N − 2]
        with probability ``p_uniform``, otherwise the small constant."""
        n, device = self.num_tokens, self.position.device
        ranks = torch.argsort(torch.rand(batch, n, generator=generator, device=device), dim=1)
        uniform = torch.randint(0, n - 1, (batch, 1), generator=generator, device=device)
        small = min(n - 2, int(round(SMALL_VISIBLE_FRACTION * n)))
        use_uniform = torch.rand(batch, 1, generator=generator, device=device) < p_uniform
        count = torch.where(use_uniform, uniform, torch.full_like(uniform, small))
        return ranks < count

    def forward(self, tokens: torch.Tensor, slots: torch.Tensor, *, mask: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """tokens (B, N, d), slots (B, K, s) → reconstruction (B, N, d)."""
        b, n, _ = tokens.shape
        if n != self.num_tokens:
            raise ValueError(f"This decoder was built for {self.num_tokens} tokens per image, got {n}.")
        query = self.query_norm(self.query_proj(tokens))
        if mask:
            visible = self.visible_mask(b, generator)
            query = torch.where(visible.unsqueeze(-1), query, self.mask_token.to(query.dtype))
        query = query + self.position
        memory = self.memory_norm(self.memory_proj(slots))
        return self.backbone(self.input_norm(query), memory)


def area_weighted_mse(pred: torch.Tensor, target: torch.Tensor, attn: torch.Tensor, *, power: float = 0.5,
                      cap: float = 10.0, eps: float = 1e-8, reduction: str = "mean") -> torch.Tensor:
    """The paper's area-weighted MSE.

    Each token n belongs to slot s(n) = argmax_k A[k, n]; a slot's area is its share of the tokens;
    w_k = max(area_k, eps)^(−power), normalised by its mean over slots and capped at ``cap``; a token's
    weight is a_n = Σ_k A[k, n] w_k; the loss is Σ_n a_n e_n / Σ_n a_n with e_n the token's MSE over
    channels. A (B, K, N) is detached: the weights steer the reconstruction, not the slots.
    """
    attn = attn.detach().float()
    b, k, n = attn.shape
    owner = attn.argmax(dim=1)  # (B, N)
    area = torch.zeros(b, k, device=attn.device).scatter_add_(1, owner, torch.ones_like(owner, dtype=torch.float))
    w = (area / n).clamp_min(eps).pow(-power)
    w = (w / w.mean(dim=1, keepdim=True).clamp_min(eps)).clamp(max=cap)
    a = (attn * w.unsqueeze(-1)).sum(dim=1)  # (B, N)
    err = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    per_image = (a * err).sum(dim=1) / a.sum(dim=1).clamp_min(eps)
    if reduction == "none":
        return per_image
    if reduction == "sum":
        return per_image.sum()
    return per_image.mean()


class OCVTPModel(nn.Module):
    """Pruner + decoder, as trained. ``forward`` returns the per-image loss (B,)."""

    def __init__(self, pruner: nn.Module, decoder: SlotDecoder):
        super().__init__()
        self.pruner = pruner
        self.decoder = decoder

    def forward(self, tokens: torch.Tensor, k: int, generator: torch.Generator | None = None,
                mask: bool = True, epsilon: torch.Tensor | None = None) -> torch.Tensor:
        """``epsilon`` passes the slot noise explicitly; otherwise each image draws its own (from
        ``generator`` when given, else from the global RNG, as the public code's training does)."""
        slots, attn = self.pruner(tokens, k, generator=generator, noise="per_call", epsilon=epsilon)
        recon = self.decoder(tokens, slots, mask=mask, generator=generator)
        return area_weighted_mse(recon, tokens, attn, reduction="none")
