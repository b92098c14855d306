"""Every measurement on Hugging Face batches and model kinds, against brute-force oracles.

Padded text batches (``attention_mask`` with zeros) through NTKSpectrum (kernel over the positions the reduction
uses, vs explicit Jacobians row by row), encoder-decoder batches (decoder inputs made from the labels as the model
makes them) through every callback that runs the model, default layer sets that hold only modules that run on the
probe (found by watching the forward), attention found by what it computes, and mixture-of-experts weights held as
3-D tensors measured per expert. Tiny models built from configs (no download).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import transformers
from helpers import MemoryLogger, fit
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

from lightning_align import CoordCheck, FeatureAlignment, NTKSpectrum, RankMonitor, Sharpness
from lightning_align.measure import empirical_ntk, flatten_kernel
from lightning_align.measure.batch import ModelKwargs, call_model
from lightning_align.measure.rank import representation_ranks, stable_rank

VOCAB, T = 16, 6


class HFModule(pl.LightningModule):
    """A Hugging Face model on dict batches: ``forward(**batch)``, the training loss is the model's ``.loss``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch: Any) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def bert() -> HFModule:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=T, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )  # fmt: skip
    return HFModule(transformers.BertForMaskedLM(config))


def qwen() -> HFModule:
    """Grouped-query attention (1 key/value head for 2 query heads), rotary embeddings, tied embeddings."""
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=T, use_cache=False, attention_dropout=0.1,
    )  # fmt: skip
    return HFModule(transformers.Qwen2ForCausalLM(config))


def t5(d_model: int = 16, d_ff: int = 32, d_kv: int = 8, vocab: int = VOCAB) -> HFModule:
    config = transformers.T5Config(
        vocab_size=vocab, d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_layers=1, num_decoder_layers=1, num_heads=2,
        dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return HFModule(transformers.T5ForConditionalGeneration(config))


def mixtral() -> HFModule:
    """A top-2 mixture of 4 experts held as 3-D parameters ``(experts, out, in)``."""
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=T, use_cache=False,
    )  # fmt: skip
    return HFModule(transformers.MixtralForCausalLM(config))


def padded_loader(n: int = 16, vocab: int = VOCAB, seq2seq: bool = False) -> DataLoader:
    """Right-padded token batches (lengths 2..T): ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on padding;
    for an encoder-decoder, targets of their own lengths)."""
    g = torch.Generator().manual_seed(0)

    def tokens() -> tuple[torch.Tensor, torch.Tensor]:
        length = int(torch.randint(2, T + 1, (), generator=g))
        mask = (torch.arange(T) < length).long()
        return torch.randint(2, vocab, (T,), generator=g) * mask, mask

    rows = []
    for _ in range(n):
        ids, mask = tokens()
        target, target_mask = tokens() if seq2seq else (ids, mask)
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": target.masked_fill(target_mask == 0, -100)})
    return DataLoader(rows, batch_size=8)


def _positions(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The model's keyword inputs (an encoder-decoder's decoder inputs shifted from the labels, by hand) and the mask
    of the output positions its loss counts."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if model.config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = model._shift_right(batch["labels"])
        return kwargs, batch["labels"] != -100
    return kwargs, batch["attention_mask"] == 1


def explicit_ntk(module: HFModule, batch: dict[str, torch.Tensor], reduce: str) -> torch.Tensor:
    """``J Jᵀ`` in float64 (eval mode), ``J`` built row by row with ``torch.autograd``, the outputs reduced by hand:
    the mean over the counted positions, or the logits at the last counted one (right padding: length - 1)."""
    model = copy.deepcopy(module.model).double().eval()
    kwargs, mask = _positions(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel([SDPBackend.MATH]):
        logits = model(**kwargs).logits
        if reduce == "mean":
            weights = mask[..., None].double()
            out = ((logits * weights).sum(1) / weights.sum(1)).reshape(-1)
        else:
            out = logits[torch.arange(len(mask)), mask.long().sum(1) - 1].reshape(-1)
        rows = []
        for r in range(out.numel()):
            grads = torch.autograd.grad(out[r], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]))
    jac = torch.stack(rows)
    return jac @ jac.T


@pytest.mark.parametrize(
    ("family", "reduce"), [("bert", "mean"), ("bert", "last"), ("qwen", "mean"), ("qwen", "last"), ("t5", "mean"), ("t5", "last")]
)
def test_ntk_on_padded_batches_equals_explicit_jacobians(family: str, reduce: str) -> None:
    """The kernel over the counted positions only: padding (attention_mask 0; for T5 labels -100) left out."""
    make = {"bert": bert, "qwen": qwen, "t5": t5}[family]
    logger = MemoryLogger()
    cb = NTKSpectrum(every_n_steps=1, probe_size=4, k=3, sequence_output=reduce)
    module, _ = fit([cb], make, loader=padded_loader(seq2seq=family == "t5"), max_steps=1, logger=logger)
    assert not bool(_positions(module.model, cb.probe_batch)[1].all())  # the probe has padding
    eig = torch.linalg.eigvalsh(explicit_ntk(module, cb.probe_batch, reduce))
    assert logger.by_step("ntk/max_eig")[1] == pytest.approx(float(eig[-1]), rel=2e-5)
    assert logger.by_step("ntk/trace")[1] == pytest.approx(float(eig.sum()), rel=2e-5)


def test_ntk_refuses_every_position_of_a_padded_batch() -> None:
    with pytest.raises(ValueError, match=r"sequence_output='all'.*padding.*'mean' or 'last'"):
        fit([NTKSpectrum(every_n_steps=1, probe_size=4, sequence_output="all")], bert, loader=padded_loader(), max_steps=1)


def _dense_hessian(module: HFModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model = copy.deepcopy(module.model).double().eval()
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for name, p in zip(names, model.parameters()):
            params[name], i = theta[i : i + p.numel()].view_as(p), i + p.numel()
        return torch.func.functional_call(model, params, (), batch).loss

    with sdpa_kernel([SDPBackend.MATH]):
        return torch.autograd.functional.hessian(loss, flat, vectorize=True)


def test_encoder_decoder_batches_reach_every_callback_with_right_values() -> None:
    """T5 on (input_ids, attention_mask, labels): decoder inputs made from the labels, values checked at step 0."""
    make = lambda: t5(d_model=4, d_ff=4, d_kv=2, vocab=8)  # noqa: E731  (~450 parameters: a dense Hessian)
    layer = "model.decoder.block.0.layer.2.DenseReluDense.wo"
    suite = [
        NTKSpectrum(every_n_steps=100, probe_size=4, k=2),
        RankMonitor(every_n_steps=100, probe_size=8),
        CoordCheck(every_n_steps=100, probe_size=8),
        FeatureAlignment(every_n_steps=100, probe_size=8),
        Sharpness(every_n_steps=100, probe_size=8, k=1, tol=1e-7, max_matvecs=400),
    ]
    logger = MemoryLogger()
    fit(suite, make, loader=padded_loader(vocab=8, seq2seq=True), max_steps=1, logger=logger)
    step0 = logger.at(0)
    pl.seed_everything(0, verbose=False)
    init = make()  # the weights the step-0 measurements saw
    ntk, rank, coord, align, sharp = suite

    eig = torch.linalg.eigvalsh(explicit_ntk(init, ntk.probe_batch, "mean"))
    assert step0["ntk/max_eig"] == pytest.approx(float(eig[-1]), rel=2e-5)

    model = copy.deepcopy(init.model).eval()
    feats = {}
    handle = model.get_submodule(layer.removeprefix("model.")).register_forward_hook(lambda _m, _i, out: feats.update(h=out))
    with torch.no_grad():
        model(**coord.probe_batch)  # the model makes its decoder inputs from the labels itself
    counted = feats["h"][coord.probe_batch["labels"] != -100]  # a decoder layer: the positions its labels count
    assert step0[f"coord/rms/{layer}"] == pytest.approx(float(counted.pow(2).mean().sqrt()), rel=1e-5)
    with torch.no_grad():
        model(**rank.probe_batch)
    handle.remove()
    counted = feats["h"][rank.probe_batch["labels"] != -100]  # one row per counted position
    assert step0[f"rank/repr_effective/{layer}"] == pytest.approx(representation_ranks(counted).effective_rank, rel=1e-5)

    double = copy.deepcopy(init.model).double().eval()
    grads = torch.autograd.grad(double(**align.probe_batch).loss, list(double.parameters()))
    lr = 1e-2  # Adam's: FeatureAlignment's step-0 update is the gradient step at the optimizer's learning rate
    assert step0["align/loss_decrease"] == pytest.approx(lr * sum(float(g.pow(2).sum()) for g in grads), rel=1e-4)

    hessian = _dense_hessian(init, sharp.probe_batch)
    assert step0["sharpness/max_eig"] == pytest.approx(float(torch.linalg.eigvalsh(hessian)[-1]), rel=1e-4)


class _LabelsOnly(HFModule):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


class _InputsOnly(HFModule):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_decoder_inputs_follow_what_the_forward_takes() -> None:
    """``decoder_input_ids`` when the forward takes them (or ``**kwargs``), else ``labels``; neither: a clear refusal."""
    torch.manual_seed(0)
    batch = next(iter(padded_loader(seq2seq=True)))
    inputs = ModelKwargs((k, v) for k, v in batch.items() if k != "labels")
    inputs.labels = batch["labels"]
    model = t5().eval()
    expected = model.model(**batch).logits
    for module in (model, _LabelsOnly(model.model)):
        assert torch.equal(call_model(module, inputs).logits, expected)
    with pytest.raises(TypeError, match=r"encoder-decoder T5ForConditionalGeneration.*`probe_outputs\(batch\)`"):
        call_model(_InputsOnly(model.model), inputs)


class BareAttention(nn.Module):
    """Self-attention with no ``head_dim``/``num_heads``/``scale`` attribute: found by what it computes."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(x.shape[-1]), dim=-1) @ v)


class TorchEncoder(pl.LightningModule):
    """``nn.TransformerEncoder`` (its fused fast path in eval mode), a bare attention, a tied embedding whose first
    owner (``shared``) never runs, and a pooler that never runs."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.shared = nn.Embedding(VOCAB, d)
        self.embed = nn.Embedding(VOCAB, d)
        self.embed.weight = self.shared.weight
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.mix = BareAttention(d)
        self.pooler = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
        return self.head(self.mix(h).mean(1))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return nn.functional.cross_entropy(logits, batch["labels"][:, 0].clamp_min(0) % 3)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_default_layers_are_the_modules_that_run_on_the_probe() -> None:
    logger = MemoryLogger()
    suite = [FeatureAlignment(every_n_steps=100, probe_size=8), CoordCheck(every_n_steps=100, probe_size=8), RankMonitor(every_n_steps=100, probe_size=8)]
    fit(suite, TorchEncoder, loader=padded_loader(), max_steps=1, logger=logger)
    tags = logger.at(0)

    def layers(prefix: str) -> set[str]:
        return {t.removeprefix(prefix) for t in tags if t.startswith(prefix)}

    feature, coord, weights = layers("align/cos/"), layers("coord/rms/"), layers("rank/weight_stable/")
    assert {"mix", "encoder.layers.0.self_attn", "encoder.layers.0.linear1", "head"} <= feature  # attention by its computation
    assert {"encoder.layers.0.linear1", "encoder.layers.0.linear2", "embed"} <= coord  # the fused path is not taken
    assert {"encoder.layers.0.self_attn.out_proj", "embed", "head"} <= weights  # out_proj's weight is read by its attention
    for never_run in ("pooler", "shared"):
        assert never_run not in feature | coord | weights | layers("rank/repr_effective/")
    assert "encoder.layers.0.self_attn.out_proj" not in feature | coord  # no output of its own


@pytest.mark.parametrize("make", [FeatureAlignment, CoordCheck])
def test_a_named_layer_that_never_runs_is_refused_naming_layers(make) -> None:
    cb = make(every_n_steps=100, probe_size=8, layers=[r"encoder\.layers\.0\.self_attn\.out_proj"])
    with pytest.raises(ValueError, match=rf"{make.__name__}\(layers=\.\.\.\).*out_proj.*not called.*from `layers`") as err:
        fit([cb], TorchEncoder, loader=padded_loader(), max_steps=1)
    assert "`modules`" not in str(err.value)


def test_moe_experts_held_as_3d_tensors_are_measured() -> None:
    logger = MemoryLogger()
    suite = [RankMonitor(every_n_steps=100, probe_size=8), FeatureAlignment(every_n_steps=100, probe_size=8), CoordCheck(every_n_steps=100, probe_size=8)]
    fit(suite, mixtral, loader=padded_loader(), max_steps=1, logger=logger)
    tags = logger.at(0)
    pl.seed_everything(0, verbose=False)
    experts = mixtral().model.model.layers[0].mlp.experts
    for stack in ("gate_up_proj", "down_proj"):
        weights = getattr(experts, stack).detach()
        assert weights.ndim == 3 and weights.shape[0] == 4
        for e in range(4):
            tag = f"rank/weight_stable/model.model.layers.0.mlp.experts.{stack}.{e}"
            assert tags[tag] == pytest.approx(stable_rank(weights[e]), rel=1e-6)
    block = "model.model.layers.0.mlp"  # the mixture-of-experts block: found by its routing (topk), then its experts
    for family in ("align/cos/", "coord/rms/", "rank/repr_effective/"):
        assert f"{family}{block}" in tags, family


def test_rank_monitor_jacobian_on_embeddings_with_an_attention_mask() -> None:
    """With respect to ``inputs_embeds``, each sample with its own mask: the explicit Jacobians' ranks."""
    g = torch.Generator().manual_seed(0)
    rows = [
        {"inputs_embeds": torch.randn(T, 8, generator=g), "attention_mask": (torch.arange(T) < n).long(), "labels": torch.full((T,), -100)}
        for n in (3, 5, 6, 2)
    ]
    for row in rows:
        row["labels"][0] = 1
    logger = MemoryLogger()
    cb = RankMonitor(every_n_steps=100, probe_size=4, jacobian_points=2)
    fit([cb], bert, loader=DataLoader(rows, batch_size=4), max_steps=1, logger=logger)
    pl.seed_everything(0, verbose=False)
    model = bert().model.eval()
    ranks, logdets = [], []
    for i in range(2):
        x, mask = cb.probe_batch["inputs_embeds"][i : i + 1], cb.probe_batch["attention_mask"][i : i + 1]
        with sdpa_kernel([SDPBackend.MATH]):
            jac = torch.autograd.functional.jacobian(lambda z: model(inputs_embeds=z, attention_mask=mask).logits, x)
        s = torch.linalg.svdvals(jac.reshape(T * VOCAB, T * 8).double())
        rank = int((s > 1e-3 * s[0]).sum())
        ranks.append(rank)
        logdets.append(float(2 * s[:rank].log().sum()))
    assert logger.at(0)["rank/jacobian_numerical"] == sum(ranks) / 2
    assert logger.at(0)["rank/jacobian_logdet"] == pytest.approx(sum(logdets) / 2, rel=1e-3)


class RoutedExperts(nn.Module):
    """Top-1 routing to ``nn.Linear`` experts: data-dependent (vmap refuses it), a varying number of tokens per
    expert and sample."""

    def __init__(self, d: int = 4, experts: int = 3) -> None:
        super().__init__()
        self.embed, self.router = nn.Linear(2, d), nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        choice = self.router(h).argmax(-1)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            chosen = choice == e
            if bool(chosen.any()):
                out[chosen] = expert(h[chosen])
        return self.head(torch.tanh(out)).mean(1)


def test_ntk_of_a_forward_vmap_cannot_run_equals_explicit_jacobians() -> None:
    torch.manual_seed(0)
    net, x = RoutedExperts().double(), torch.randn(5, 7, 2, dtype=torch.float64)
    kernel = flatten_kernel(empirical_ntk(net, x))
    params = list(net.parameters())
    jac = torch.autograd.functional.jacobian(lambda *ps: torch.func.functional_call(net, dict(zip(dict(net.named_parameters()), ps)), (x,)).reshape(-1), tuple(params))
    j = torch.cat([t.reshape(t.shape[0], -1) for t in jac], dim=1)
    torch.testing.assert_close(kernel, j @ j.T, rtol=1e-10, atol=1e-10)
