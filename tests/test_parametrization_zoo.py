"""μP on a zoo of model families, against microsoft/mup 1.0.0, or refused for the true reason.

Each family is built tiny from its library's config at a ``width`` (the zoo holder saves it, as
``save_hyperparameters`` does). The oracle is the same model drawn from the same seed with mup's readouts
swapped in (``MuReadout``; ``MuSharedReadout`` for a readout tied to the embedding), ``set_base_shapes``
with base and delta models, ``MuAdam``/``MuSGD``, and mup's ``attn_mult/d`` attention logits set by hand
(``attn_mult = √d0``; nothing to set where the head dimension is fixed). Checked: every parameter's learning
rate and weight decay, the init (where mup's differs by design, said so), and the logits on the same weights.
"""

from __future__ import annotations

import math
import re
import warnings

import lightning.pytorch as pl
import peft
import pytest
import timm.models.convnext as timm_convnext
import torch
import torchvision
import transformers
from helpers import fit
from mup import MuAdam, MuReadout, MuSGD, MuSharedReadout, set_base_shapes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_align.callbacks.parametrization import Parametrization
from lightning_align.parametrize.auto import auto_parametrize

BASE, WIDTH, VOCAB = 16, 64, 32
M = WIDTH / BASE
T = transformers
transformers.logging.set_verbosity_error()


def _mixtral(w: int, expert: int | None = None) -> nn.Module:
    cfg = T.MixtralConfig(hidden_size=w, intermediate_size=expert or 2 * w, num_attention_heads=2, num_key_value_heads=2,
                          num_hidden_layers=1, vocab_size=VOCAB, num_local_experts=4, num_experts_per_tok=2,
                          max_position_embeddings=16, tie_word_embeddings=False)  # fmt: skip
    return T.MixtralForCausalLM(cfg)


def _drawn(model: nn.Module, *names: str) -> nn.Module:
    """``model`` with zero-initialised parameters drawn (a trained state), so that the logits depend on them."""
    for name in names:
        nn.init.normal_(model.get_parameter(name), std=0.05)
    return model


def _gpt2_lora(w: int) -> nn.Module:
    cfg = T.GPT2Config(n_embd=w, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=16)
    lora = peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    return _drawn(peft.get_peft_model(T.GPT2LMHeadModel(cfg), lora), "base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight")


def _efficientnet(w: int) -> nn.Module:
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig

    setting = [MBConvConfig(1, 3, 1, w, w, 1), MBConvConfig(4, 3, 2, w, 2 * w, 1)]
    return EfficientNet(setting, dropout=0.0, num_classes=5, last_channel=4 * w)


BUILDERS = {
    "bert": lambda w: T.BertForMaskedLM(T.BertConfig(
        hidden_size=w, intermediate_size=2 * w, num_attention_heads=2, num_hidden_layers=1, vocab_size=VOCAB,
        max_position_embeddings=16)),
    "qwen2_tied": lambda w: T.Qwen2ForCausalLM(T.Qwen2Config(
        hidden_size=w, intermediate_size=2 * w, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
        vocab_size=VOCAB, max_position_embeddings=16, tie_word_embeddings=True)),
    "qwen2_untied": lambda w: T.Qwen2ForCausalLM(T.Qwen2Config(
        hidden_size=w, intermediate_size=2 * w, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
        vocab_size=VOCAB, max_position_embeddings=16, tie_word_embeddings=False)),
    "t5": lambda w: T.T5ForConditionalGeneration(T.T5Config(  # d_kv fixed: the number of heads scales
        d_model=w, d_ff=2 * w, d_kv=8, num_heads=w // 8, num_layers=1, num_decoder_layers=1, vocab_size=VOCAB,
        decoder_start_token_id=0, relative_attention_num_buckets=8)),
    "t5_dkv": lambda w: T.T5ForConditionalGeneration(T.T5Config(  # d_kv scales: T5's unscaled logits get d0/d
        d_model=w, d_ff=2 * w, d_kv=w // 2, num_heads=2, num_layers=1, num_decoder_layers=1, vocab_size=VOCAB,
        decoder_start_token_id=0, relative_attention_num_buckets=8)),
    "hf_vit": lambda w: T.ViTForImageClassification(T.ViTConfig(
        hidden_size=w, intermediate_size=2 * w, num_attention_heads=2, num_hidden_layers=1, image_size=8, patch_size=4,
        num_channels=3, num_labels=5)),
    "convnext": lambda w: timm_convnext.ConvNeXt(in_chans=3, num_classes=5, depths=(1, 1, 1, 1), dims=(w, w, 2 * w, 2 * w)),
    "tv_vit": lambda w: _drawn(torchvision.models.VisionTransformer(  # heads scale: head dimension 8 at every width
        image_size=32, patch_size=8, num_layers=2, num_heads=w // 8, hidden_dim=w, mlp_dim=2 * w, num_classes=5),
        "heads.head.weight"),
    "tv_vit_fixed_heads": lambda w: torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=w, mlp_dim=2 * w, num_classes=5),
    "efficientnet": _efficientnet,
    "gpt2_lora": _gpt2_lora,
    "mixtral": _mixtral,
    "mixtral_fixed_experts": lambda w: _mixtral(w, expert=32),
}  # fmt: skip

# readouts as mup wants them: {module: "readout" (MuReadout) | "shared" (MuSharedReadout) | "router" (MuReadout's input multiplier)}
READOUTS = {
    "bert": {"cls.predictions.decoder": "shared"},
    "qwen2_tied": {"lm_head": "shared"},
    "qwen2_untied": {"lm_head": "readout"},
    "t5": {"lm_head": "shared"},
    "t5_dkv": {"lm_head": "shared"},
    "hf_vit": {"classifier": "readout"},
    "convnext": {"head.fc": "readout"},
    "tv_vit": {"heads.head": "readout"},
    "efficientnet": {"classifier.1": "readout"},
    "gpt2_lora": {"base_model.model.lm_head": "shared", "base_model.model.transformer.h.0.attn.c_attn.lora_A.default": "readout"},
    "mixtral": {"lm_head": "readout", "model.layers.0.mlp.gate": "router"},
}
INPUTS = {
    "text": lambda: {"input_ids": torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))},
    "seq2seq": lambda: {"input_ids": torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1)),
                        "decoder_input_ids": torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(2))},
    "image8": lambda: {"pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))},
    "image32": lambda: torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
}  # fmt: skip
INPUT_OF = {"bert": "text", "qwen2_tied": "text", "qwen2_untied": "text", "t5": "seq2seq", "t5_dkv": "seq2seq",
            "hf_vit": "image8", "convnext": "image32", "tv_vit": "image32", "efficientnet": "image32",
            "gpt2_lora": "text", "mixtral": "text"}  # fmt: skip


class Zoo(nn.Module):
    """A model of one family at one width, saving both as hyper-parameters (as ``save_hyperparameters``)."""

    def __init__(self, family: str, width: int) -> None:
        super().__init__()
        self.hparams = {"family": family, "width": width}
        self.model = BUILDERS[family](width)


def _swap_readouts(model: nn.Module, family: str) -> nn.Module:
    """The model with mup's readout layers in place of its own (same parameters, same names)."""
    for name, kind in READOUTS.get(family, {}).items():
        parent_name, _, leaf = name.rpartition(".")
        parent, old = model.get_submodule(parent_name), model.get_submodule(name)
        if kind == "router":  # HF routers compute F.linear(x, weight): mup's MuReadout multiplier on x
            mu = MuReadout(*reversed(old.weight.shape), bias=False)
            mu.weight = old.weight
            object.__setattr__(old, "_mu", mu)  # not a child: names and state dict stay the router's
            old.register_forward_pre_hook(lambda mod, args: (mod._mu.output_mult * args[0] / mod._mu.width_mult(),))
            continue
        bias = old.bias is not None
        new = MuSharedReadout(old.weight, bias=bias) if kind == "shared" else MuReadout(old.in_features, old.out_features, bias=bias)
        if kind == "readout":
            new.weight = old.weight
        if bias:
            new.bias = old.bias
        setattr(parent, leaf, new)
    return model


def _rescale_routers(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "_mu"):
            module._mu._rescale_parameters()


def mup_twin(family: str, width: int = WIDTH) -> nn.Module:
    """The family's model from seed 0 with mup's readouts and ``set_base_shapes`` (init rescaled by mup)."""
    torch.manual_seed(0)
    model = _swap_readouts(BUILDERS[family](width), family)
    with torch.device("meta"):
        base = _swap_readouts(BUILDERS[family](BASE), family)
        delta = _swap_readouts(BUILDERS[family](2 * BASE), family)
    set_base_shapes(model, base, delta=delta, do_assert=False)
    _rescale_routers(model)
    return model


def ours(family: str, width: int = WIDTH, **kw):
    torch.manual_seed(0)
    holder = Zoo(family, width)
    return holder, auto_parametrize(holder, "mup", base_width=BASE, **kw)


def _per_param(model: nn.Module, optimizer: torch.optim.Optimizer, prefix: str = "") -> dict[str, tuple[float, float]]:
    names = {id(p): n.removeprefix(prefix) for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


HEADS = {"bert": 2, "qwen2_tied": 4, "qwen2_untied": 4, "hf_vit": 2, "gpt2_lora": 2, "mixtral": 2}


def _set_mup_attention(model: nn.Module, family: str, names) -> None:
    """mup's ``attn_mult/d`` with ``attn_mult = √d0`` (SP at the base), on each attention whose head dimension scales."""
    d, d0 = WIDTH // HEADS.get(family, 1), BASE // HEADS.get(family, 1)
    for name in names:
        model.get_submodule(name.removeprefix("model.")).scaling = math.sqrt(d0) / d


def _logits(model: nn.Module, family: str) -> torch.Tensor:
    x = INPUTS[INPUT_OF[family]]()
    out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


FAMILIES = ["bert", "qwen2_tied", "qwen2_untied", "t5", "hf_vit", "convnext", "tv_vit", "efficientnet", "gpt2_lora", "mixtral"]
ATTENTION = {"bert": 1, "qwen2_tied": 1, "qwen2_untied": 1, "t5": 0, "hf_vit": 1, "convnext": 0, "tv_vit": 0,
             "efficientnet": 0, "gpt2_lora": 1, "mixtral": 1}  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_learning_rates_init_and_logits_equal_mup(family):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "several readouts" warning: routers and adapters are readouts by design
        holder, p = ours(family)
    theirs = mup_twin(family)
    assert len(p.attention) == ATTENTION[family], p.attention
    stacked = {n for n, i in p.infos.items() if len(i.shape) == 3 and i.role == "hidden"}
    for mu_opt, torch_opt, kw in ((MuAdam, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
                                  (MuSGD, torch.optim.SGD, {"lr": 0.1, "weight_decay": 1e-4})):  # fmt: skip
        got = _per_param(holder, p.rewrite_optimizer(torch_opt(holder.parameters(), **kw)), "model.")
        want = _per_param(theirs, mu_opt(theirs.parameters(), **kw))
        assert got.keys() == want.keys()
        for name in want:
            if mu_opt is MuSGD and f"model.{name}" in stacked:  # mup reads dims (1, 0) of a 3-D tensor; per expert: η·(m_in/m_out)⁻¹
                assert got[name] == (kw["lr"], kw["weight_decay"]) and want[name][0] == kw["lr"] / M, name
            else:
                assert got[name] == want[name], f"{family} {name}: ours {got[name]} vs mup {want[name]}"
        assert {v[0] for v in got.values()} != {kw["lr"]}  # some learning rates are scaled: the check has power
    mine, ref = holder.model.state_dict(), theirs.state_dict()
    shared = {m.weight.data_ptr() for m in theirs.modules() if isinstance(m, MuSharedReadout)}
    for key in ref:  # init: set_base_shapes's rescaling (mup's MuSharedReadout also rescales the embedding; we do not)
        if ref[key].data_ptr() not in shared:
            assert torch.equal(mine[key], ref[key]), f"{family} {key}"
    theirs.load_state_dict(mine)
    _set_mup_attention(theirs, family, p.attention)
    holder.eval(), theirs.eval()
    with torch.no_grad():
        want = _logits(theirs, family)
        torch.testing.assert_close(_logits(holder.model, family), want, rtol=1e-5, atol=1e-6)
        p.remove_hooks()  # without the readout multiplier the logits differ: the check has power
        assert not torch.allclose(_logits(holder.model, family), want, rtol=1e-3, atol=1e-5)


def test_t5_head_dim_scaling_gets_one_over_d_from_its_own_unscaled_logits():
    holder, p = ours("t5_dkv")  # d_kv = width/2: T5's scale 1 at the base becomes d0/d (μP), not √(d0/d)
    d, d0 = WIDTH // 2, BASE // 2
    attns = [m for m in holder.modules() if type(m).__name__ == "T5Attention"]
    assert len(p.attention) == len(attns) == 3 and all(a.scaling == d0 / d for a in attns)
    theirs = mup_twin("t5_dkv")
    theirs.load_state_dict(holder.model.state_dict())
    for attn in (m for m in theirs.modules() if type(m).__name__ == "T5Attention"):
        attn.scaling = d0 / d  # mup's attn_mult/d with attn_mult = d0 (T5's scale 1 at the base)
    holder.eval(), theirs.eval()
    torch.testing.assert_close(_logits(holder.model, "t5_dkv"), _logits(theirs, "t5_dkv"), rtol=1e-5, atol=1e-6)


class LitSeq2Seq(pl.LightningModule):
    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = BUILDERS["t5"](width)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.model(input_ids=x, attention_mask=torch.ones_like(x), labels=y).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_encoder_decoder_with_fixed_head_dim_is_accepted_at_fit_start():
    tokens = torch.randint(0, VOCAB, (8, 6), generator=torch.Generator().manual_seed(0))
    cb = Parametrization("mup", base_width=BASE, verbose=False)
    _, trainer = fit([cb], module=LitSeq2Seq(), loader=DataLoader(TensorDataset(tokens, tokens.flip(1)), batch_size=4), max_steps=1)
    assert trainer.global_step == 1 and cb.parametrized.attention == {}  # head dimension 8 at every width: nothing to set
    assert cb.parametrized.tied == {"model.lm_head": "model.shared.weight"}


def test_attention_refused_for_the_true_reason_and_the_warning_says_what_is_computed():
    with pytest.raises(ValueError, match=r"'model\.encoder\.layers\.encoder_layer_0\.self_attention' \(MultiheadAttention\): its head "
                       r"dimension changes with width \(8 at the base width, 32 here\).*scale the number of heads"):
        ours("tv_vit_fixed_heads")
    torch.manual_seed(0)
    sp = Zoo("tv_vit_fixed_heads", WIDTH)
    with pytest.warns(UserWarning, match=r"attention left with the module's own logit scale, unchanged from SP .* not μP's 1/head_dim"):
        holder, p = ours("tv_vit_fixed_heads", unscalable_attention="warn")
    x = torch.randn(2, 17, WIDTH, generator=torch.Generator().manual_seed(0))
    mha, mha_sp = (m.model.encoder.layers[0].self_attention for m in (holder, sp))
    assert p.attention == {} and torch.equal(mha(x, x, x)[0], mha_sp(x, x, x)[0])  # what the warning says: SP attention


def _experts_pattern(message: str) -> dict[str, str]:
    found = re.search(r"role_overrides`, e\.g\. \{'(.+?)': 'hidden'\}", message)
    assert found, message
    return {found.group(1).replace("\\\\", "\\"): "hidden"}


def test_moe_refusal_names_an_override_that_works_and_overrides_win():
    with pytest.raises(ValueError, match=r"expert tensor 'model\.model\.layers\.0\.mlp\.experts\.gate_up_proj'.*"
                       r"expert size is probably missing from `width_keys`") as err:
        ours("mixtral_fixed_experts")
    overrides = _experts_pattern(str(err.value))
    overrides[overrides.popitem()[0].replace("gate_up_proj", "(gate_up|down)_proj")] = "hidden"
    _, p = ours("mixtral_fixed_experts", role_overrides=overrides)  # the named remedy works
    assert p.infos["model.model.layers.0.mlp.experts.down_proj"].role == "hidden"
    # an override is applied before the automatic roles (before, a 3-D expert tensor was refused even with one)
    _, p = ours("mixtral", role_overrides={r".*experts\..*": "vector"})
    assert {p.infos[f"model.model.layers.0.mlp.experts.{n}"].role for n in ("gate_up_proj", "down_proj")} == {"vector"}
    with pytest.raises(ValueError, match=r"role_overrides.*'model\.model\.norm\.weight' has 1 dimension\(s\); role 'hidden' needs a matrix"):
        ours("mixtral", role_overrides={r"model\.model\.norm\.weight": "hidden"})


@pytest.mark.parametrize("kind", ["qwen2_moe", "olmoe", "gpt_oss"])
def test_moe_families_roles(kind):
    common = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1, vocab_size=VOCAB,
                  num_experts_per_tok=2, max_position_embeddings=16)  # fmt: skip

    def build(w):
        if kind == "qwen2_moe":
            return T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**{**common, "hidden_size": w}, intermediate_size=2 * w, num_experts=4,
                                                          moe_intermediate_size=w, shared_expert_intermediate_size=w))
        if kind == "olmoe":
            return T.OlmoeForCausalLM(T.OlmoeConfig(**{**common, "hidden_size": w}, intermediate_size=w, num_experts=4))
        return T.GptOssForCausalLM(T.GptOssConfig(**{**common, "hidden_size": w}, intermediate_size=w, head_dim=w // 2,
                                                  num_local_experts=4, layer_types=["full_attention"]))  # fmt: skip

    BUILDERS[kind] = build
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            holder, p = ours(kind, init="orthogonal")
    finally:
        del BUILDERS[kind]
    roles = {n.removeprefix("model.model.layers.0.mlp."): i.role for n, i in p.infos.items() if ".mlp." in n}
    gate = "router" if kind == "gpt_oss" else "gate"
    assert roles["experts.gate_up_proj"] == roles["experts.down_proj"] == "hidden"
    assert roles[f"{gate}.weight"] == "output" and f"model.model.layers.0.mlp.{gate}" in p.gates
    if kind == "qwen2_moe":
        assert roles["shared_expert_gate.weight"] == "output" and roles["shared_expert.up_proj.weight"] == "hidden"
    if kind == "gpt_oss":  # (E, in, out) layout, per-expert biases, a router bias
        assert roles["experts.gate_up_proj_bias"] == roles["experts.down_proj_bias"] == "vector"
        assert roles["router.bias"] == "fixed"
    experts = holder.get_parameter("model.model.layers.0.mlp.experts.down_proj").detach()
    for w in experts:  # init="orthogonal": each expert its own (scaled) orthogonal matrix
        g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        torch.testing.assert_close(g / g.diagonal().mean(), torch.eye(len(g)), atol=1e-4, rtol=0)
    opt = p.rewrite_optimizer(torch.optim.AdamW(holder.parameters(), lr=1e-2))
    lrs = _per_param(holder, opt)
    assert lrs["model.model.layers.0.mlp.experts.down_proj"][0] == pytest.approx(1e-2 / M)
    assert lrs[f"model.model.layers.0.mlp.{gate}.weight"][0] == 1e-2


def test_head_dimension_read_from_common_names_modules_and_configs():
    from types import SimpleNamespace

    from lightning_align.parametrize.ecosystem import head_dim

    t5 = BUILDERS["t5"](WIDTH).encoder.block[0].layer[0].SelfAttention
    bert = BUILDERS["bert"](WIDTH).bert.encoder.layer[0].attention.self
    assert (head_dim(t5), head_dim(bert), head_dim(nn.MultiheadAttention(WIDTH, 4))) == (8, 32, 16)

    class ConfigOnlyAttention(nn.Module):  # reads its config at forward time
        def __init__(self, **config) -> None:
            super().__init__()
            self.config = SimpleNamespace(**config)

    assert head_dim(ConfigOnlyAttention(d_kv=12, d_model=64, num_heads=2)) == 12
    assert head_dim(ConfigOnlyAttention(kv_channels=24, hidden_size=64, num_attention_heads=2)) == 24
    assert head_dim(ConfigOnlyAttention(hidden_size=64, num_attention_heads=4, head_dim=None)) == 16
    assert head_dim(ConfigOnlyAttention(vocab_size=10)) is None
    assert head_dim(BUILDERS["bert"](WIDTH)) is None  # a whole model holding the config is not an attention


def test_depthwise_convolutions_are_vector_like():
    _, p = ours("convnext")
    dw = p.infos["model.stages.1.blocks.0.conv_dw.weight"]
    assert dw.role == "vector" and dw.infinite == (True, False, False, False)
    assert p.infos["model.stem.0.weight"].role == "input" and p.infos["model.head.fc.weight"].role == "output"
