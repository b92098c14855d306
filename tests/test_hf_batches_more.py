"""Hugging Face batches and model kinds, continued: padding left out of every per-position statistic, expert stacks
and other weights of two or more dimensions in the effective learning rates, FeatureSpeedControl on the layers that
run on the probe.

Oracles: the same probe with and without extra padding (pad tokens appended, zeros in the mask: with right padding the
unpadded positions' activations are the same, so every value must be), by-hand masked statistics, ``‖ΔW‖/‖W‖`` of the
optimizer's real step, and outputs computed with a weight scaled by hand. Tiny models built from configs.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import transformers
from helpers import MemoryLogger, fit
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

from lightning_align import CoordCheck, EffectiveLR, ELRWarmup, FeatureAlignment, RankMonitor
from lightning_align.callbacks.feature_speed_control import FeatureSpeedControl
from lightning_align.measure.rank import representation_ranks
from test_hf_batches import HFModule, TorchEncoder, mixtral, padded_loader

VOCAB, T, N = 16, 6, 8


def qwen() -> HFModule:
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, use_cache=False, attention_dropout=0.1,
    )  # fmt: skip
    return HFModule(transformers.Qwen2ForCausalLM(config))


def bert() -> HFModule:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )  # fmt: skip
    return HFModule(transformers.BertForMaskedLM(config))


def t5() -> HFModule:
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=8, d_ff=16, d_kv=4, num_layers=1, num_decoder_layers=1, num_heads=2,
        dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return HFModule(transformers.T5ForConditionalGeneration(config))


def probe(seq2seq: bool) -> dict[str, torch.Tensor]:
    """``N`` right-padded sequences (lengths 2..T); an encoder-decoder's labels of other lengths (``-100`` padding)."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, T + 1, (2, N), generator=g)
    lengths[:, 0] = T  # some sequence fills the batch: its length is T
    mask = (torch.arange(T)[None, :] < lengths[0][:, None]).long()
    ids = torch.randint(2, VOCAB, (N, T), generator=g) * mask
    target_mask = (torch.arange(T)[None, :] < lengths[1][:, None]) if seq2seq else mask == 1
    targets = torch.randint(2, VOCAB, (N, T), generator=g) if seq2seq else ids
    return {"input_ids": ids, "attention_mask": mask, "labels": targets.masked_fill(~target_mask, -100)}


def extra_padding(batch: dict[str, torch.Tensor], inputs: int, labels: int) -> dict[str, torch.Tensor]:
    """``batch`` with pad tokens appended: ``inputs`` columns to the input ids and mask, ``labels`` to the labels."""

    def pad(t: torch.Tensor, k: int, value: int) -> torch.Tensor:
        return torch.cat([t, torch.full((t.shape[0], k), value, dtype=t.dtype)], dim=1)

    return {"input_ids": pad(batch["input_ids"], inputs, 0), "attention_mask": pad(batch["attention_mask"], inputs, 0),
            "labels": pad(batch["labels"], labels, -100)}  # fmt: skip


def suite_on(batch: dict[str, torch.Tensor], make: Any, seq2seq: bool) -> dict[int, dict[str, float]]:
    """Step-0..2 values of CoordCheck, RankMonitor and FeatureAlignment with ``batch`` as their probe (in float64: a cosine
    near 0 would amplify float32 rounding, which differs with the sequence length)."""
    suite = [CoordCheck(every_n_steps=1), RankMonitor(every_n_steps=1, histograms=False), FeatureAlignment(every_n_steps=1)]
    for cb in suite:
        cb.set_probe_batch(batch)
    logger = MemoryLogger()
    fit(suite, make, loader=padded_loader(seq2seq=seq2seq), max_steps=2, logger=logger, precision="64-true")
    return {step: logger.at(step) for step in range(3)}


@pytest.mark.parametrize(("make", "seq2seq"), [(qwen, False), (bert, False), (t5, True)], ids=["qwen2", "bert", "t5"])
def test_extra_padding_changes_no_per_position_statistic(make: Any, seq2seq: bool) -> None:
    batch = probe(seq2seq)
    plain = suite_on(batch, make, seq2seq)
    padded = suite_on(extra_padding(batch, 3, 4 if seq2seq else 3), make, seq2seq)  # no length equal to N
    for step in range(3):
        tags = [t for t in plain[step] if t.startswith(("coord/", "rank/repr", "align/"))]
        assert len(tags) > 20 and set(tags) == {t for t in padded[step] if t.startswith(("coord/", "rank/repr", "align/"))}
        for tag in tags:
            assert padded[step][tag] == pytest.approx(plain[step][tag], rel=1e-6, abs=1e-9), (step, tag)


def test_per_position_statistics_equal_masked_ones_by_hand() -> None:
    """Qwen2 on a right-padded probe: CoordCheck's RMS and L1, RankMonitor's effective rank over the counted positions
    (one row each) and FeatureAlignment's speed and angle of the gradient step at step 0, ``f``, ``b = dL/df`` and
    ``δf = J·Δθ`` (by ``torch.func.jvp``) restricted to the counted positions; float64 throughout."""
    batch, layer = probe(False), "model.model.layers.0.mlp.down_proj"
    suite = [CoordCheck(every_n_steps=100), RankMonitor(every_n_steps=100, histograms=False), FeatureAlignment(every_n_steps=100)]
    for cb in suite:
        cb.set_probe_batch(batch)
    logger = MemoryLogger()
    fit(suite, qwen, loader=padded_loader(), max_steps=1, logger=logger, precision="64-true")
    step0 = logger.at(0)
    pl.seed_everything(0, verbose=False)
    model = qwen().model.double().eval()  # the weights the step-0 measurements saw
    mask = batch["attention_mask"] == 1
    module = model.get_submodule(layer.removeprefix("model."))
    params = {n: p.detach() for n, p in model.named_parameters()}

    def run(theta: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        seen = {}
        handle = module.register_forward_hook(lambda _m, _i, out: seen.update(f=out))
        try:
            loss = torch.func.functional_call(model, theta, (), batch).loss
        finally:
            handle.remove()
        return seen["f"], loss

    with sdpa_kernel([SDPBackend.MATH]):
        theta = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        f, loss = run(theta)
        grads = torch.autograd.grad(loss, [f, *theta.values()])
        b, step = grads[0], {n: -1e-2 * g for n, g in zip(theta, grads[1:])}  # Adam's lr: the gradient step
        _, df = torch.func.jvp(lambda th: run(th)[0], (params,), (step,))
    h = f.detach()[mask]
    assert step0[f"coord/rms/{layer}"] == pytest.approx(float(h.pow(2).mean().sqrt()), rel=1e-6)
    assert step0[f"coord/l1/{layer}"] == pytest.approx(float(h.abs().mean()), rel=1e-6)
    assert step0[f"rank/repr_effective/{layer}"] == pytest.approx(representation_ranks(h).effective_rank, rel=1e-6)
    df, b = df[mask], b[mask]
    assert step0[f"align/speed/{layer}"] == pytest.approx(float(df.norm() / h.norm()), rel=1e-6)
    assert step0[f"align/cos/{layer}"] == pytest.approx(float(-(b * df).sum() / (b.norm() * df.norm())), rel=1e-6)


class StepRatios(Callback):
    """``‖ΔW‖/‖W‖`` of every trainable parameter over each optimizer step, by hand."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.ratios: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        now = dict(pl_module.named_parameters())
        self.ratios.append({n: float((now[n].detach() - w).norm() / w.norm()) for n, w in self.before.items()})


def elr_tag(parameter: str) -> str:
    """A module's ``weight`` is logged under the module's name, any other parameter under its own."""
    return "elr/" + parameter.removesuffix(".weight")


@pytest.mark.parametrize(("make", "special"), [
    (mixtral, ["model.model.layers.0.mlp.experts.gate_up_proj", "model.model.layers.0.mlp.experts.down_proj",
               "model.model.layers.0.mlp.gate.weight"]),
    (TorchEncoder, ["encoder.layers.0.self_attn.in_proj_weight"]),
], ids=["mixtral", "torch-encoder"])  # fmt: skip
def test_effective_lr_measures_every_weight_of_two_or_more_dimensions(make: Any, special: list[str], caplog: Any) -> None:
    """Expert stacks ``(E, out, in)`` (whole), a router's matrix, ``in_proj_weight``: logged with ``‖ΔW‖/‖W‖`` of the real
    step; every trainable parameter of two or more dimensions has its tag. RankMonitor names what it leaves out."""
    cb, oracle, logger = EffectiveLR(every_n_steps=1, probe_size=8), StepRatios(), MemoryLogger()
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    module, _ = fit([cb, oracle, RankMonitor(every_n_steps=100, probe_size=8)], make, loader=padded_loader(), max_steps=2, logger=logger)
    matrices = [n for n, p in module.named_parameters() if p.requires_grad and p.ndim >= 2]
    assert set(special) <= set(matrices)
    for step in (1, 2):
        logged = logger.at(step)
        assert {elr_tag(n) for n in matrices} <= set(logged)
        for name in special:
            assert cb.invariance[elr_tag(name)[4:]].params == (name.rpartition(".")[2],)  # the tensor alone
            assert logged[elr_tag(name)] == pytest.approx(oracle.ratios[step - 1][name], rel=1e-5), name
    if make is TorchEncoder:
        assert "RankMonitor: ['encoder.layers.0.self_attn.in_proj_weight'] of TorchEncoder are read" in caplog.text


class Experts(nn.Module):
    """Three expert matrices held as one ``(3, 8, 8)`` parameter, each output normalised (no gain) or not."""

    def __init__(self, normed: bool) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 8, 8) / math.sqrt(8))
        self.normed = normed

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("eoi,ni->neo", self.w, h)
        return (nn.functional.layer_norm(z, (8,), eps=1e-12) if self.normed else z).mean(1)


class ExpertNet(pl.LightningModule):
    def __init__(self, normed: bool = True, lr: float = 1.0) -> None:
        super().__init__()
        self.inp, self.experts, self.head = nn.Linear(4, 8), Experts(normed), nn.Linear(8, 3)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.experts(torch.tanh(self.inp(x))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def expert_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    return DataLoader(list(zip(x, y)), batch_size=16)


@pytest.mark.parametrize("normed", [True, False])
def test_scale_invariance_of_a_stack_of_expert_matrices(normed: bool) -> None:
    """The stack scaled whole leaves the outputs as they are when each expert's output is normalised (checked by hand),
    and EffectiveLR says so; ELRWarmup, whose only scale-invariant weight is that stack, warms up at its critical LR."""
    pl.seed_everything(0, verbose=False)
    net, x = ExpertNet(normed).eval(), torch.randn(16, 4)
    scaled = copy.deepcopy(net)
    with torch.no_grad():
        scaled.experts.w.mul_(3.0)
    change = float((scaled(x) - net(x)).norm() / net(x).norm())
    assert (change < 1e-6) if normed else (change > 1e-2)
    logger = MemoryLogger()
    fit([EffectiveLR(every_n_steps=1)], lambda: ExpertNet(normed), loader=expert_loader(), max_steps=1, logger=logger)
    assert logger.at(0)["elr/si/experts.w"] == float(normed)
    if not normed:
        return

    class CriticalFactor(Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
            w = pl_module.experts.w
            self.factor = min(1.0, 1.0 / (pl_module.lr * float(w.grad.norm() / w.norm())))  # 1/(η·e) for one weight

    oracle, logger = CriticalFactor(), MemoryLogger()
    fit([ELRWarmup(), oracle], lambda: ExpertNet(lr=1e3), loader=expert_loader(), max_steps=1, logger=logger)
    assert logger.at(1)["elr/warmup_factor"] == pytest.approx(oracle.factor, rel=1e-6) and oracle.factor < 1


def test_feature_speed_control_defaults_are_the_layers_that_run(tmp_path: Any) -> None:
    """nn.MultiheadAttention's out_proj (read, never called), a tied ``shared`` and a pooler that never run, a block
    whose output is its last layer's: left out of the defaults; per-layer targets count the layers kept; the layers
    are saved with the plan and restored on resume; a named layer that never runs is refused naming ``layers``."""
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
    first, logger = FeatureSpeedControl(target_speed=0.05, every_n_steps=1, probe_size=8), MemoryLogger()
    fit([first, ckpt], TorchEncoder, loader=padded_loader(), max_steps=2, logger=logger, enable_checkpointing=True)
    layers = list(first._layers)
    assert {"encoder.layers.0.linear1", "encoder.layers.0.linear2", "head"} <= set(layers)
    assert not {"encoder.layers.0.self_attn.out_proj", "pooler", "shared"} & set(layers)
    assert {t.removeprefix("align/control_multiplier/") for t in logger.at(2) if t.startswith("align/control_multiplier/")} == set(layers)
    second = FeatureSpeedControl(target_speed=0.05, every_n_steps=1, probe_size=8)
    fit([second], TorchEncoder, loader=padded_loader(), max_steps=4, ckpt_path=str(tmp_path / "last.ckpt"))
    assert list(second._layers) == layers and second.plan == first.plan
    per_layer = FeatureSpeedControl(target_speed=[0.05] * len(layers), every_n_steps=1, probe_size=8)
    fit([per_layer], TorchEncoder, loader=padded_loader(), max_steps=1)
    assert list(per_layer._layers) == layers
    named = FeatureSpeedControl(target_speed=0.05, layers=[r"encoder\.layers\.0\.self_attn\.out_proj", "head"], probe_size=8)
    with pytest.raises(ValueError, match=r"FeatureSpeedControl\(layers=\.\.\.\).*out_proj.*not called.*from `layers`"):
        fit([named], TorchEncoder, loader=padded_loader(), max_steps=1)
