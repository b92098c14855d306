"""μP / depth-μP on Hugging Face and timm models with no code change.

Tiny models built from configs (no download): GPT-2 (tied readout, ``Conv1D``), Llama (tied or not,
``head_dim`` stored in its config), timm ViT (fused attention, optional layer scale). Oracles: mup's
``MuSharedReadout`` model with ``set_base_shapes`` and ``MuAdam``/``MuSGD`` on the same weights; attention
computed by hand with ``1/d`` logits; residual branches scaled by hand.
"""

from __future__ import annotations

import copy
import math
import re

import lightning.pytorch as pl
import pytest
import timm.models.vision_transformer as timm_vit
import torch
import torchvision
import transformers
from helpers import fit
from mup import MuAdam, MuSGD, MuSharedReadout, set_base_shapes
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_align.callbacks.parametrization import Parametrization
from lightning_align.parametrize.auto import auto_parametrize
from lightning_align.parametrize.ecosystem import standard_branches

BASE, VOCAB = 16, 64


def gpt2_config(width: int, layers: int = 2, **kw) -> transformers.GPT2Config:
    return transformers.GPT2Config(
        n_embd=width, n_layer=layers, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw,
    )  # fmt: skip


def llama_config(width: int, layers: int = 2, tie: bool = True, **kw) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=16, tie_word_embeddings=tie,
        bos_token_id=0, eos_token_id=0, **kw,
    )  # fmt: skip


def hf_model(config):
    cls = transformers.GPT2LMHeadModel if config.model_type == "gpt2" else transformers.LlamaForCausalLM
    return cls(config)


class HFHolder(nn.Module):
    """A plain module holding a HF causal LM built from the config it saves (as ``save_hyperparameters``)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.hparams = {"config": config}
        self.model = hf_model(config)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=idx).logits


class LitHF(pl.LightningModule):
    """A LightningModule that saves a HF config as its hyper-parameter ``config``."""

    def __init__(self, config, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = hf_model(config)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(input_ids=x).logits.flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class TimmViT(nn.Module):
    def __init__(self, width: int = 32, depth: int = 2, init_values: float | None = None) -> None:
        super().__init__()
        self.hparams = {"width": width, "depth": depth, "init_values": init_values}
        self.net = timm_vit.VisionTransformer(
            img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=width, depth=depth, num_heads=2,
            init_values=init_values,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mu_shared(config):
    """The same HF model with mup's ``MuSharedReadout`` as tied readout."""
    model = hf_model(config)
    emb = model.get_input_embeddings().weight
    model.lm_head = MuSharedReadout(emb, bias=False)
    return model


def mup_reference(make_config, width: int):
    model = mu_shared(make_config(width))
    with torch.device("meta"):
        base, delta = mu_shared(make_config(BASE)), mu_shared(make_config(2 * BASE))
    set_base_shapes(model, base, delta=delta)
    return model


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in ("GPT2Attention", "LlamaAttention")]


WIDTH_KEYS = {"gpt2": ["config.n_embd"], "llama": ["config.hidden_size", "config.intermediate_size"]}
CONFIGS = {"gpt2": gpt2_config, "llama": llama_config}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tied_readout_logits_equal_mushared_readout(arch):
    width = 4 * BASE
    torch.manual_seed(0)
    ours = HFHolder(CONFIGS[arch](width))
    emb = ours.model.get_input_embeddings().weight
    assert ours.model.lm_head.weight is emb
    emb_before = emb.detach().clone()
    p = auto_parametrize(ours, "mup", base_width=BASE, width_keys=WIDTH_KEYS[arch], readout_zero_init=True)
    emb_name = next(n for n, q in ours.named_parameters() if q is emb)
    assert p.tied == {"model.lm_head": emb_name}
    assert p.infos[emb_name].role == "input" and p.infos[emb_name].width_mult == 4.0
    assert torch.equal(emb, emb_before)  # the shared weight keeps the embedding's init (not zeroed or rescaled)
    assert len(p.attention) == 2 and all(f == pytest.approx(0.5) for f in p.attention.values())

    theirs = mup_reference(CONFIGS[arch], width)
    d, d0 = width // 2, BASE // 2
    for attn in attention_modules(theirs):  # mup's 1/d attention, set by hand
        attn.scaling = math.sqrt(d0) / d
    theirs.load_state_dict(ours.model.state_dict())
    ours.eval(), theirs.eval()
    idx = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(1))
    want = theirs(input_ids=idx).logits
    torch.testing.assert_close(ours(idx), want, rtol=1e-6, atol=1e-6)
    p.remove_hooks()  # without the readout multiplier the logits are 4x: the check has power
    torch.testing.assert_close(ours(idx), 4.0 * want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("mu_opt,torch_opt,kw", [
    (MuAdam, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    (MuSGD, torch.optim.SGD, {"lr": 0.1, "weight_decay": 1e-4}),
], ids=["adamw", "sgd"])  # fmt: skip
def test_tied_learning_rates_equal_mup(arch, mu_opt, torch_opt, kw):
    torch.manual_seed(0)
    ours = HFHolder(CONFIGS[arch](4 * BASE))
    p = auto_parametrize(ours, "mup", base_width=BASE, width_keys=WIDTH_KEYS[arch])
    opt = p.rewrite_optimizer(torch_opt(ours.parameters(), **kw))
    theirs = mup_reference(CONFIGS[arch], 4 * BASE)
    ref = mu_opt(theirs.parameters(), **kw)

    def per_param(model, optimizer, prefix=""):
        names = {id(q): n.removeprefix(prefix) for n, q in model.named_parameters()}
        return {names[id(q)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for q in g["params"]}

    got, want = per_param(ours, opt, "model."), per_param(theirs, ref)
    assert got == want
    emb = "transformer.wte.weight" if arch == "gpt2" else "model.embed_tokens.weight"
    hidden = "transformer.h.0.attn.c_attn.weight" if arch == "gpt2" else "model.layers.0.mlp.up_proj.weight"
    if torch_opt is torch.optim.SGD:  # the tied weight has the input rule: SGD η·m
        assert got[emb][0] == pytest.approx(0.4)
    else:
        assert got[emb][0] == 1e-2 and got[hidden][0] == pytest.approx(1e-2 / 4)


def _causal_attention(q, k, v, scale):
    s = (q @ k.transpose(-1, -2)) * scale
    t = q.shape[-2]
    s = s.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_gpt2_attention_output_is_hand_computed_one_over_d(impl):
    width, d, d0 = 4 * BASE, 2 * BASE, BASE // 2
    config = gpt2_config(width, scale_attn_by_inverse_layer_idx=True)
    config._attn_implementation = impl
    model = HFHolder(config).eval()
    auto_parametrize(model, "mup", base_width=BASE, width_keys=["config.n_embd"])
    x = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(0))
    for layer, block in enumerate(model.model.transformer.h):
        attn = block.attn
        assert attn.scaling == pytest.approx(math.sqrt(d0) / d / (layer + 1))  # by-layer factor kept
        q, k, v = (t.view(2, 5, 2, d).transpose(1, 2) for t in attn.c_attn(x).split(width, dim=-1))
        if impl == "sdpa":  # causal without a mask
            y = _causal_attention(q, k, v, math.sqrt(d0) / d / (layer + 1))
        else:  # the eager path applies only the mask it is given (none here)
            y = ((q @ k.transpose(-1, -2)) * math.sqrt(d0) / d / (layer + 1)).softmax(-1) @ v
        want = attn.c_proj(y.transpose(1, 2).reshape(2, 5, width))
        torch.testing.assert_close(attn(x)[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init_values", [None, 1e-1])
def test_timm_attention_output_is_one_over_d_despite_fused_path(init_values):
    width, d, d0 = 4 * BASE, 2 * BASE, BASE // 2
    torch.manual_seed(0)
    model = TimmViT(width, 2, init_values).eval()
    attn = model.net.blocks[0].attn
    assert attn.fused_attn  # timm's default path ignores `scale`
    p = auto_parametrize(model, "mup", base_width=BASE)
    assert set(p.attention) == {"net.blocks.0.attn", "net.blocks.1.attn"} and not attn.fused_attn
    x = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(0))
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, d).permute(2, 0, 3, 1, 4)
    y = ((q @ k.transpose(-1, -2)) * (math.sqrt(d0) / d)).softmax(-1) @ v
    torch.testing.assert_close(attn(x), attn.proj(y.transpose(1, 2).reshape(2, 5, width)), rtol=1e-5, atol=1e-6)
    assert p.infos["net.head.weight"].role == "output" and p.infos["net.blocks.0.attn.qkv.weight"].role == "hidden"


def test_config_paths_deep_copy_and_llama_head_dim_follows_width():
    config = llama_config(4 * BASE, tie=False)
    model = HFHolder(config)
    p = auto_parametrize(model, "mup", base_width=BASE, width_keys=WIDTH_KEYS["llama"])
    assert p.widths == {"config.hidden_size": 64, "config.intermediate_size": 128}
    assert p.base_widths == {"config.hidden_size": 16, "config.intermediate_size": 32}
    assert (config.hidden_size, config.intermediate_size, config.head_dim) == (64, 128, 32)  # not changed in place
    roles = {n.removeprefix("model.model."): i.role for n, i in p.infos.items()}
    # head_dim scaled with hidden_size in the base (else q/k/v would look like readouts)
    assert {roles[f"layers.0.{m}.weight"] for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj")} == {"hidden"}
    assert p.infos["model.lm_head.weight"].role == "output" and not p.tied
    assert p.attention == {f"model.model.layers.{i}.self_attn": pytest.approx(0.5) for i in range(2)}
    # a related size left out (intermediate_size fixed): the MLP input layers look like readouts -> warned
    with pytest.warns(UserWarning, match=r"5 layers are treated as readouts.*gate_proj"):
        auto_parametrize(HFHolder(llama_config(4 * BASE, tie=False)), "mup", base_width=BASE, width_keys=["config.hidden_size"])
    # a path into a saved config that does not exist, and a top-level key that is not saved
    with pytest.raises(ValueError, match=r"width key 'config\.n_embdx' does not exist: config \(GPT2Config\) has no attribute 'n_embdx'"):
        auto_parametrize(HFHolder(gpt2_config(32)), "mup", base_width=BASE, width_keys=["config.n_embdx"])
    with pytest.raises(ValueError, match=r"width key\(s\) \['cfg\.n_embd'\]"):
        auto_parametrize(HFHolder(gpt2_config(32)), "mup", base_width=BASE, width_keys=["cfg.n_embd"])


class DictConfigNet(nn.Module):
    def __init__(self, net: dict) -> None:
        super().__init__()
        self.hparams = {"net": net}
        self.fc1, self.fc2 = nn.Linear(4, net["width"]), nn.Linear(net["width"], net["width"])
        self.out = nn.Linear(net["width"], 2)


def test_dict_hparam_path_and_depth_path():
    net = {"width": 64, "depth": 2}
    p = auto_parametrize(DictConfigNet(net), "mup", base_width=BASE, width_keys=["net.width"])
    assert net == {"width": 64, "depth": 2} and p.base_widths == {"net.width": BASE}
    assert [p.infos[n].role for n in ("fc1.weight", "fc2.weight", "out.weight")] == ["input", "hidden", "output"]
    with pytest.raises(ValueError, match=r"depth key 'net\.layers' does not exist: net \(dict\) has no key 'layers'"):
        auto_parametrize(DictConfigNet(net), "completep", base_width=BASE, width_keys=["net.width"],
                         depth_keys=["net.layers"], branch_pattern="fc2")  # fmt: skip


@pytest.mark.parametrize("kind", ["gpt2", "llama", "timm", "timm_ls"])
def test_standard_branches_found_and_scaled(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        make = lambda: HFHolder(gpt2_config(32, layers=4))
        kw = {"width_keys": ["config.n_embd"], "depth_keys": ["config.n_layer"]}
        want = [f"model.transformer.h.{i}.{b}" for i in range(4) for b in ("attn", "mlp")]
        outputs = {b: ("c_proj",) for b in ("attn", "mlp")}
    elif kind == "llama":
        make = lambda: HFHolder(llama_config(32, layers=4))
        kw = {"width_keys": WIDTH_KEYS["llama"], "depth_keys": ["config.num_hidden_layers"]}
        want = [f"model.model.layers.{i}.{b}" for i in range(4) for b in ("self_attn", "mlp")]
        outputs = {"self_attn": ("o_proj",), "mlp": ("down_proj",)}
    else:
        ls = kind == "timm_ls"
        make = lambda: TimmViT(32, 4, init_values=0.5 if ls else None)
        kw = {}
        want = [f"net.blocks.{i}.{b}" for i in range(4) for b in (("ls1", "ls2") if ls else ("attn", "mlp"))]
        outputs = {b: ("gamma",) for b in ("ls1", "ls2")} if ls else {"attn": ("proj",), "mlp": ("fc2",)}
    model = make()
    reference = copy.deepcopy(model)
    p = auto_parametrize(model, "depth_mup", base_width=32, base_depth=1, **kw)
    assert p.branches == want == list(standard_branches(model))
    mult = 4**-0.5
    for name, info in p.infos.items():  # parameters of the attention/MLP (and their layer scale) are in the branch
        inside = any(f".{b}." in name for b in ("attn", "self_attn", "mlp", "ls1", "ls2"))
        assert info.in_branch == inside, name
    # the branch output is what is multiplied: equal to scaling each branch's last linear map by hand
    with torch.no_grad():
        for name, module in reference.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in outputs and name in p.branches:
                for sub in outputs[leaf]:
                    target = module if sub == "gamma" else getattr(module, sub)
                    for q in target.parameters(recurse=False):
                        q.mul_(mult)
    model.eval(), reference.eval()
    x = torch.randint(0, VOCAB, (2, 6)) if kind in ("gpt2", "llama") else torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_callback_on_lightning_module_with_hf_config():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (16, 9), generator=g)
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8)
    module = LitHF(gpt2_config(2 * BASE, layers=2))
    cb = Parametrization("depth_mup", base_width=BASE, base_depth=1, width_keys=["config.n_embd"],
                         depth_keys=["config.n_layer"], verbose=False)  # fmt: skip
    _, trainer = fit([cb], module=module, loader=loader, max_steps=2)
    p = cb.parametrized
    assert p is not None and p.tied == {"model.lm_head": "model.transformer.wte.weight"}
    assert p.depth_mult == 2.0 and len(p.branches) == 4 and len(p.attention) == 2
    assert cb.state_dict()["tied"] == {"model.lm_head": "model.transformer.wte.weight"}
    names = {id(q): n for n, q in module.named_parameters()}
    lr = {names[id(q)]: g["lr"] for g in trainer.optimizers[0].param_groups for q in g["params"]}
    assert lr["model.transformer.wte.weight"] == pytest.approx(1e-2)
    assert lr["model.transformer.h.0.attn.c_attn.weight"] == pytest.approx(1e-2 / 2 / math.sqrt(2))  # /m, /√m_L
    assert lr["model.transformer.ln_f.weight"] == pytest.approx(1e-2)


class LitTorchvision(pl.LightningModule):
    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = __import__("torchvision").models.resnet18(num_classes=num_classes)  # width is not used


class MHANet(nn.Module):
    def __init__(self, width: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.hparams = {"width": width, "heads": heads}
        self.inp = nn.Linear(4, width)
        self.mha = nn.MultiheadAttention(width, heads, batch_first=True)
        self.out = nn.Linear(width, 2)


class MyAttention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))


class CustomAttnNet(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.hparams = {"width": width}
        self.inp, self.attn, self.out = nn.Linear(4, width), MyAttention(width), nn.Linear(width, 2)


def test_models_that_cannot_be_parametrized_say_what_to_do():
    with pytest.raises(ValueError, match=r"ResNet has no saved hyper-parameters.*takes the width.*save_hyperparameters"):
        auto_parametrize(torchvision.models.resnet18(), "mup")
    with pytest.raises(ValueError, match=r"width key\(s\) \['width'\].*config\.n_embd.*resnet18\(\).*save_hyperparameters"):
        auto_parametrize(_WithoutWidth(), "mup", base_width=16)
    with pytest.raises(ValueError, match=r"no parameter of LitTorchvision changes shape.*resnet18\(\)"):
        auto_parametrize(LitTorchvision(), "mup", base_width=16)


class _WithoutWidth(pl.LightningModule):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(4, num_classes)


@pytest.mark.parametrize("make,name", [(MHANet, "'mha' (MultiheadAttention)"), (CustomAttnNet, "'attn' (MyAttention)")])
def test_attention_whose_scale_cannot_be_set_is_an_error_or_a_warning(make, name):
    model = make(width=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"cannot set the attention scale of {re.escape(name)}.*unscalable_attention='warn'"):
        auto_parametrize(model, "mup", base_width=16)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # refused before any change
    assert not model.out._forward_pre_hooks
    with pytest.warns(UserWarning, match=re.escape(name)):
        p = auto_parametrize(model, "mup", base_width=16, unscalable_attention="warn")
    assert not p.attention
    auto_parametrize(make(width=64), "sp", base_width=16)  # SP changes no attention: nothing to say
    if make is MHANet:  # head_dim fixed across widths (heads scale): nothing to change, no error
        auto_parametrize(MHANet(width=64, heads=8), "mup", base_width=16, width_keys=["width", "heads"])


def test_base_width_is_sp_on_hf():
    torch.manual_seed(0)
    plain = HFHolder(gpt2_config(32))
    model = copy.deepcopy(plain)
    p = auto_parametrize(model, "mup", base_width=32, width_keys=["config.n_embd"])
    assert not p.handles and not p.attention and p.tied
    idx = torch.randint(0, VOCAB, (2, 6))
    assert torch.equal(model.eval()(idx), plain.eval()(idx))


class HeadFirst(nn.Module):
    """Readout registered before the embedding: ``named_parameters()`` lists the shared weight as ``head.weight``."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.hparams = {"width": width}
        self.head = nn.Linear(width, 10, bias=False)
        self.emb = nn.Embedding(10, width)
        self.emb.weight = self.head.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(idx))


def test_tie_found_whichever_module_lists_the_weight():
    torch.manual_seed(0)
    model = HeadFirst(64)
    before = model.head.weight.detach().clone()
    p = auto_parametrize(model, "mup", base_width=16, readout_zero_init=True)
    assert list(p.infos) == ["head.weight"]
    info = p.infos["head.weight"]
    assert (info.role, info.module) == ("input", "emb") and p.tied == {"head": "head.weight"}
    assert torch.equal(model.head.weight, before)  # embedding init kept: not rescaled, not zeroed
    idx = torch.randint(0, 10, (3, 4))
    torch.testing.assert_close(model(idx), model.emb(idx) / 4.0 @ before.T)


class LitMHA(pl.LightningModule):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.inp, self.out = nn.Linear(8, width), nn.Linear(width, 3)
        self.mha = nn.MultiheadAttention(width, 2, batch_first=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.inp(x).unsqueeze(1)
        return F.cross_entropy(self.out(self.mha(h, h, h)[0].squeeze(1)), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_callback_refuses_unscalable_attention_before_training():
    with pytest.raises(ValueError, match="unscalable_attention must be one of"):
        Parametrization(unscalable_attention="ignore")
    module = LitMHA()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot set the attention scale of 'mha' \(MultiheadAttention\)"):
        fit([Parametrization("mup", base_width=16, verbose=False)], module=module, max_steps=2)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())
    _, trainer = fit([Parametrization("mup", base_width=16, unscalable_attention="warn", verbose=False)],
                     module=LitMHA(), max_steps=1)  # fmt: skip
    assert trainer.global_step == 1
