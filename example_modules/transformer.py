"""Small transformers: a ViT for small images and a byte-level GPT for text.

Attention modules expose ``attn_scale`` (the softmax temperature, ``1/sqrt(head_dim)`` by default, so a
parametrization can switch to μP's ``1/head_dim``) and ``head_dim``. Blocks are pre-LayerNorm with two
residual branches, ``attn`` and ``mlp``, each scaled by ``branch_multiplier``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from example_modules.base import ExampleModule, LossName, OptimizerName
from example_modules.mlp import branch_scale


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` with an explicit ``attn_scale``."""

    def __init__(self, width: int, heads: int, causal: bool) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"SelfAttention: width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = width // heads
        self.attn_scale = 1.0 / math.sqrt(self.head_dim)
        self.causal = causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=self.attn_scale)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class AttentionBranch(nn.Module):
    """``attn(ln(h))``."""

    def __init__(self, width: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attn(self.ln(h))


class MLPBranch(nn.Module):
    """``fc2(gelu(fc1(ln(h))))``."""

    def __init__(self, width: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.ln(h))))


class TransformerBlock(nn.Module):
    """``h + β·attn(ln(h))``, then ``h + β·mlp(ln(h))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, multiplier: float, causal: bool) -> None:
        super().__init__()
        self.attn = AttentionBranch(width, heads, causal)
        self.mlp = MLPBranch(width, mlp_ratio)
        self.multiplier = multiplier

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.multiplier * self.attn(h)
        return h + self.multiplier * self.mlp(h)


class _TransformerModule(ExampleModule):
    blocks: nn.ModuleList

    @property
    def residual_branches(self) -> list[str]:
        """Qualified names of the residual branches (``blocks.i.attn`` and ``blocks.i.mlp``)."""
        return [f"blocks.{i}.{kind}" for i in range(len(self.blocks)) for kind in ("attn", "mlp")]


class ViT(_TransformerModule):
    """Vision transformer for small images (8x8 digits by default): patches, blocks, mean-pool, readout.

    Layer names: ``patch_embed`` (Linear over flattened patches), ``pos_emb``, ``blocks.i.attn.attn.qkv``/``proj``,
    ``blocks.i.mlp.fc1``/``fc2``, ``ln_f``, ``readout``.

    Example:
        >>> ViT(width=16, depth=1, heads=2)(torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        image_size: int = 8,
        patch_size: int = 2,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 2,
        branch_multiplier: float | None = 1.0,
        loss: LossName = "cross_entropy",
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if image_size % patch_size:
            raise ValueError(f"ViT: image_size {image_size} is not divisible by patch_size {patch_size}")
        self._configure_training(loss, optimizer, lr, momentum, weight_decay)
        beta = branch_scale(branch_multiplier, depth)
        n_patches = (image_size // patch_size) ** 2
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.image_size = image_size
        self.patch_embed = nn.Linear(in_channels * patch_size**2, width)
        self.pos_emb = nn.Parameter(0.02 * torch.randn(1, n_patches, width))
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio, beta, causal=False) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.readout = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            x = x.reshape(x.shape[0], self.in_channels, self.image_size, self.image_size)
        p = self.patch_size
        patches = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # (b, n_patches, c·p·p)
        h = self.patch_embed(patches) + self.pos_emb
        for block in self.blocks:
            h = block(h)
        return self.readout(self.ln_f(h).mean(dim=1))


class GPT(_TransformerModule):
    """Byte-level causal language model (vocabulary of 256 bytes).

    Input ``(batch, time)`` byte ids, output ``(batch, time, vocab)`` logits; the loss is the mean
    next-byte cross-entropy. Layer names: ``tok_emb``, ``pos_emb``, ``blocks.i.attn.attn.qkv``/``proj``,
    ``blocks.i.mlp.fc1``/``fc2``, ``ln_f``, ``lm_head``.

    Example:
        >>> GPT(width=16, depth=1, heads=2, block_size=8)(torch.randint(0, 256, (2, 8))).shape
        torch.Size([2, 8, 256])
    """

    def __init__(
        self,
        vocab_size: int = 256,
        block_size: int = 64,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        branch_multiplier: float | None = 1.0,
        optimizer: OptimizerName = "adamw",
        lr: float = 3e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._configure_training("cross_entropy", optimizer, lr, momentum, weight_decay)
        beta = branch_scale(branch_multiplier, depth)
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Embedding(block_size, width)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio, beta, causal=True) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"GPT: sequence length {t} exceeds block_size {self.block_size}")
        h = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.ln_f(h))
