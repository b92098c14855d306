"""The measurements on Hugging Face and timm models, against brute-force oracles, with no glue code.

Tiny GPT-2 (tied embeddings, ``Conv1D`` layers), Llama and a timm ViT built from configs (no download). The
modules take HF dict batches and return ``ModelOutput`` objects, as users' modules do.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import timm
import torch
import transformers
from helpers import MemoryLogger, assert_same_training_state, fit, measurement_suite
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

from lightning_align import FeatureAlignment, NTKSpectrum, Sharpness
from lightning_align.measure.operators import FlatParams

VOCAB, T = 16, 6


class HFLM(pl.LightningModule):
    """A Hugging Face causal LM on dict batches (``input_ids``, ``labels``) returning its ``ModelOutput``."""

    def __init__(self, kind: str = "gpt2", dropout: float = 0.0, width: int = 8, layers: int = 2, checkpointing: bool = False) -> None:
        super().__init__()
        if kind == "gpt2":
            config = transformers.GPT2Config(
                vocab_size=VOCAB, n_positions=T, n_embd=width, n_layer=layers, n_head=2,
                resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
            )  # fmt: skip
            self.model = transformers.GPT2LMHeadModel(config)
        else:
            config = transformers.LlamaConfig(
                vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=T, attention_dropout=dropout,
            )  # fmt: skip
            self.model = transformers.LlamaForCausalLM(config)
        if checkpointing:
            self.model.gradient_checkpointing_enable()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def token_loader(n: int = 24, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    return DataLoader([{"input_ids": i, "labels": i} for i in ids], batch_size=batch_size)


class TimmViT(pl.LightningModule):
    """A timm ViT classifier on ``(images, labels)``."""

    def __init__(self, drop: float = 0.0) -> None:
        super().__init__()
        self.net = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, in_chans=1, num_classes=3,
            embed_dim=8, depth=2, num_heads=2, attn_drop_rate=drop, proj_drop_rate=drop, drop_path_rate=drop,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def image_loader(n: int = 24) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(data, batch_size=8)


def _probe_loss_hessian(module: pl.LightningModule, batch: Any) -> torch.Tensor:
    """Dense Hessian of the probe loss in float64, all modules in eval mode (the probe's deterministic function)."""
    model = copy.deepcopy(module).double().eval()
    batch = {k: v for k, v in batch.items()} if isinstance(batch, dict) else (batch[0].double(), batch[1])
    fp = FlatParams.of(model)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params = fp.unflatten(flat)
        if isinstance(batch, dict):
            return functional_call(model, params, (), batch).loss
        return nn.functional.cross_entropy(functional_call(model, params, (batch[0],)), batch[1])

    with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU kernel has no double backward
        return torch.autograd.functional.hessian(loss, fp.flatten([p.detach() for p in fp.tensors]).double())


@pytest.mark.parametrize("make", [lambda: HFLM("gpt2"), lambda: HFLM("llama"), TimmViT], ids=["gpt2", "llama", "timm_vit"])
def test_sharpness_equals_the_dense_hessian(make) -> None:
    loader = token_loader() if not isinstance(make(), TimmViT) else image_loader()
    logger = MemoryLogger()
    cb = Sharpness(every_n_steps=2, probe_size=16, k=2, tol=1e-6, max_matvecs=300)
    module, _ = fit([cb], make, loader=loader, max_steps=2, logger=logger)
    exact = torch.linalg.eigvalsh(_probe_loss_hessian(module, cb.probe_batch))
    assert logger.by_step("sharpness/max_eig")[2] == pytest.approx(float(exact[-1]), rel=1e-4)
    assert logger.by_step("sharpness/eig_2")[2] == pytest.approx(float(exact[-2]), rel=1e-4)


def _explicit_ntk(module: pl.LightningModule, batch: Any, reduce: str) -> torch.Tensor:
    """``J Jᵀ`` from the explicit Jacobian of the (reduced) outputs, eval mode, float64."""
    model = copy.deepcopy(module).double().eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def outputs(*flat: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, flat))
        if isinstance(batch, dict):
            out = functional_call(model, params, (), {"input_ids": batch["input_ids"]}).logits
        else:
            out = functional_call(model, params, (batch[0].double(),))
        if out.ndim == 3:
            out = out.mean(1) if reduce == "mean" else out[:, -1]
        return out.reshape(-1)

    with sdpa_kernel([SDPBackend.MATH]):
        jac = torch.autograd.functional.jacobian(outputs, tuple(p.detach() for _, p in model.named_parameters() if p.requires_grad))
    j = torch.cat([x.reshape(x.shape[0], -1) for x in jac], dim=1)
    return j @ j.T


@pytest.mark.parametrize("kind", ["gpt2", "llama", "timm_vit"])
@pytest.mark.parametrize("reduce", ["mean", "last"])
def test_ntk_equals_explicit_jacobians(kind: str, reduce: str) -> None:
    if kind == "timm_vit" and reduce == "last":
        pytest.skip("a classifier has no sequence dimension")
    make = TimmViT if kind == "timm_vit" else (lambda: HFLM(kind))
    loader = image_loader() if kind == "timm_vit" else token_loader()
    logger = MemoryLogger()
    cb = NTKSpectrum(every_n_steps=2, probe_size=4, k=3, sequence_output=reduce)
    module, _ = fit([cb], make, loader=loader, max_steps=2, logger=logger)
    eig = torch.linalg.eigvalsh(_explicit_ntk(module, cb.probe_batch, reduce))
    assert logger.by_step("ntk/max_eig")[2] == pytest.approx(float(eig[-1]), rel=1e-5)
    assert logger.by_step("ntk/trace")[2] == pytest.approx(float(eig.sum()), rel=1e-5)
    if kind != "timm_vit":  # token targets do not fit the kernel: alignment not logged, said once
        assert not logger.series("ntk/alignment")


@pytest.mark.parametrize("kind", ["gpt2", "llama", "timm_vit"])
def test_attention_dropout_does_not_change_any_measurement(kind: str) -> None:
    """Dropout inside attention (functional ``dropout_p``) is off in probes: values equal those at dropout 0."""

    def run(p: float) -> dict[str, float]:
        make = (lambda: TimmViT(drop=p)) if kind == "timm_vit" else (lambda: HFLM(kind, dropout=p))
        loader = image_loader() if kind == "timm_vit" else token_loader()
        logger = MemoryLogger()
        suite = measurement_suite(every_n_steps=100, jacobian_points=0 if kind != "timm_vit" else 2)
        fit(suite, make, loader=loader, max_steps=1, logger=logger)
        return logger.at(0)

    with_dropout, without = run(0.1), run(0.0)
    assert with_dropout.keys() == without.keys() and len(without) > 10
    for tag, value in without.items():
        assert with_dropout[tag] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), tag


def test_training_with_the_suite_is_bit_identical_on_gpt2_with_dropout() -> None:
    make = lambda: HFLM("gpt2", dropout=0.1)  # noqa: E731
    plain = fit([], make, loader=token_loader(), max_steps=4)
    measured = fit(measurement_suite(jacobian_points=0), make, loader=token_loader(), max_steps=4)
    assert_same_training_state(plain, measured)


def test_default_layers_cover_every_gpt2_block() -> None:
    logger = MemoryLogger()
    fit(measurement_suite(every_n_steps=100, jacobian_points=0), lambda: HFLM("gpt2", layers=3), loader=token_loader(), max_steps=1, logger=logger)
    tags = {t for _, m in logger.rows for t in m}
    for family in ("align/cos/", "rank/weight_stable/", "coord/rms/"):
        for block in range(3):
            assert any(t.startswith(f"{family}model.transformer.h.{block}.") for t in tags), (family, block)
    assert "align/cos/model.transformer.h.0.attn.c_attn" in tags  # a Conv1D layer


def test_feature_alignment_under_gradient_checkpointing_equals_the_plain_run() -> None:
    def run(checkpointing: bool) -> dict[int, float]:
        logger = MemoryLogger()
        cb = FeatureAlignment(every_n_steps=1, probe_size=16)
        fit([cb], lambda: HFLM("gpt2", checkpointing=checkpointing), loader=token_loader(), max_steps=4, logger=logger)
        return {s: v for s, m in logger.rows for t, v in m.items() if t == "align/cos/model.transformer.h.1.mlp.c_fc" for s in [s]}

    plain, checkpointed = run(False), run(True)
    assert sorted(plain) == [0, 1, 2, 3, 4]
    for step, value in plain.items():
        assert checkpointed[step] == pytest.approx(value, rel=1e-5), step
    assert all(math.isfinite(v) for v in plain.values())


class TorchvisionResNet(pl.LightningModule):
    """torchvision's ResNet-18 (BatchNorm everywhere) on small images."""

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        self.net = torchvision.models.resnet18(num_classes=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_training_with_the_suite_is_bit_identical_on_torchvision_resnet18() -> None:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 3, (16,), generator=g))
    loader = DataLoader(data, batch_size=8)
    suite = [
        FeatureAlignment(every_n_steps=2, probe_size=8),
        Sharpness(every_n_steps=2, probe_size=8, k=1, max_matvecs=20, tol=1e-2),
        NTKSpectrum(every_n_steps=2, probe_size=2, k=2, weights=[r"net\.fc\..*"]),
        *[cb for cb in measurement_suite(every_n_steps=2) if type(cb).__name__ in ("EffectiveLR", "RankMonitor", "CoordCheck")],
    ]
    for cb in suite:
        cb.probe_size = min(cb.probe_size, 8)
    plain = fit([], TorchvisionResNet, loader=loader, max_steps=3)
    measured = fit(suite, TorchvisionResNet, loader=loader, max_steps=3)
    assert_same_training_state(plain, measured)


def test_whole_suite_on_llama_with_checkpointing_dropout_and_accumulation_is_bit_identical() -> None:
    """NTKSpectrum and RankMonitor run with HF gradient checkpointing on (its input-grad hook is off in probes)."""
    make = lambda: HFLM("llama", dropout=0.1, checkpointing=True)  # noqa: E731
    plain = fit([], make, loader=token_loader(), max_steps=3, accumulate_grad_batches=2)
    logger = MemoryLogger()
    measured = fit(measurement_suite(jacobian_points=0), make, loader=token_loader(), max_steps=3, accumulate_grad_batches=2, logger=logger)
    assert_same_training_state(plain, measured)
    assert math.isfinite(logger.by_step("ntk/max_eig")[0]) and math.isfinite(logger.by_step("sharpness/max_eig")[2])
