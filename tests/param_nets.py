"""Tiny networks shared by the parametrization tests (no tests here).

Each net saves its init arguments in ``hparams`` (like ``save_hyperparameters``) so that
``auto_parametrize`` can rebuild it at the base width, and can be built with mup's ``MuReadout`` as
readout (``mu=True``) for the parity tests: with the same seed both variants draw identical weights.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from mup import MuReadout
from torch import nn
from torch.nn import functional as F


def _readout(width: int, out: int, mu: bool, output_mult: float, zero: bool) -> nn.Linear:
    if mu:
        return MuReadout(width, out, output_mult=output_mult, readout_zero_init=zero)
    return nn.Linear(width, out)


class MLPNet(nn.Module):
    """``in -> width -> width -> out`` ReLU MLP (mup/test/models.py shape, smaller)."""

    def __init__(self, width: int = 64, in_features: int = 20, out: int = 10, mu: bool = False,
                 output_mult: float = 1.0, zero: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.hparams = {"width": width, "in_features": in_features, "out": out, "mu": mu,
                        "output_mult": output_mult, "zero": zero}  # fmt: skip
        self.fc1 = nn.Linear(in_features, width)
        self.fc2 = nn.Linear(width, width)
        self.readout = _readout(width, out, mu, output_mult, zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(F.relu(self.fc2(F.relu(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.attn_scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.attn_scale)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Byte-level pre-LN Transformer with fixed head count (so head_dim scales with width)."""

    def __init__(self, width: int = 32, depth: int = 2, heads: int = 2, vocab: int = 32, context: int = 8,
                 mu: bool = False, mu_attn: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.hparams = {"width": width, "depth": depth, "heads": heads, "vocab": vocab, "context": context,
                        "mu": mu, "mu_attn": mu_attn}  # fmt: skip
        self.tok_emb = nn.Embedding(vocab, width)
        self.pos_emb = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = _readout(width, vocab, mu, 1.0, False)

    @property
    def residual_branches(self) -> list[str]:
        return [f"blocks.{i}.{b}" for i in range(len(self.blocks)) for b in ("attn", "mlp")]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.ln_f(h))


class LitMLP(pl.LightningModule):
    """A LightningModule MLP (input, ``depth - 1`` hidden layers, readout) with a configurable optimizer."""

    def __init__(self, width: int = 32, depth: int = 2, in_features: int = 8, num_classes: int = 3,
                 optimizer: str = "adam", lr: float = 1e-2, weight_decay: float = 0.0, scheduler: str = "none") -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        dims = [in_features] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(depth))
        self.readout = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.readout(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt: torch.optim.Optimizer
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        elif hp.optimizer == "lbfgs":
            opt = torch.optim.LBFGS(self.parameters(), lr=hp.lr)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "lambda":
            return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))]
        if hp.scheduler == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=100)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


class LitResMLP(pl.LightningModule):
    """Residual MLP ``h + branch_i(h)`` with ``residual_branches``, for depth tests."""

    def __init__(self, width: int = 32, depth: int = 2, in_features: int = 8, num_classes: int = 3, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Linear(width, width)) for _ in range(depth))
        self.readout = nn.Linear(width, num_classes)

    @property
    def residual_branches(self) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.readout(h)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class DepthNet(nn.Module):
    """Residual MLP ``h + branch_i(h)`` (branch = ReLU, Linear); ``stream`` records the final residual stream."""

    def __init__(self, width: int = 64, depth: int = 2, in_features: int = 20, out: int = 10) -> None:
        super().__init__()
        self.hparams = {"width": width, "depth": depth, "in_features": in_features, "out": out}
        self.embed = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Linear(width, width)) for _ in range(depth))
        self.stream = nn.Identity()
        self.readout = nn.Linear(width, out)

    @property
    def residual_branches(self) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.readout(self.stream(h))


class LazyLitMLP(pl.LightningModule):
    """Like LitMLP, but its layers are created in ``configure_model`` (after callback ``setup``)."""

    forward = LitMLP.forward
    training_step = LitMLP.training_step

    def __init__(self, width: int = 32, depth: int = 2, in_features: int = 8, num_classes: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layers: nn.ModuleList | None = None

    def configure_model(self) -> None:
        if self.layers is not None:
            return
        hp = self.hparams
        dims = [hp.in_features] + [hp.width] * hp.depth
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(hp.depth))
        self.readout = nn.Linear(hp.width, hp.num_classes)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)
