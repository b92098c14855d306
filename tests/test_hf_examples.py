"""The Hugging Face and timm example wrappers: they build, train, rebuild at another width, and serve HF batches.

These tests cover the wrappers themselves (``example_modules/hf.py``, ``example_modules/timm_models.py``,
``CharTextDataModule(batch_format="hf")``), independently of the measurement callbacks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from example_modules import CharTextDataModule, DigitsDataModule, HFCausalLM, TimmClassifier
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:.*self.log.*:UserWarning")
TINY = {"width": 16, "depth": 2, "heads": 2, "block_size": 8}


def tiny_lm(model_type: str = "gpt2", **kwargs) -> HFCausalLM:
    torch.manual_seed(0)
    return HFCausalLM(model_type=model_type, **{**TINY, **kwargs})


def ids(batch: int = 3, t: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (batch, t), generator=torch.Generator().manual_seed(1))


def test_transformers_and_timm_are_imported_lazily() -> None:
    """``import example_modules`` must not need transformers/timm: no top-level import of either."""
    for name in ("hf.py", "timm_models.py"):
        tree = ast.parse((ROOT / "example_modules" / name).read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            assert not any(m.split(".")[0] in ("transformers", "timm") for m in mods), (name, mods)


# ---------------------------------------------------------------- HFCausalLM


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_hf_config_follows_width_depth_heads(model_type: str) -> None:
    m = tiny_lm(model_type, dropout=0.1)
    cfg = m.model.config
    if model_type == "gpt2":
        assert type(m.model).__name__ == "GPT2LMHeadModel"
        assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_inner, cfg.n_positions) == (16, 2, 2, 64, 8)
        assert cfg.resid_pdrop == cfg.embd_pdrop == cfg.attn_pdrop == 0.1
        assert len(m.model.transformer.h) == 2
    else:
        assert type(m.model).__name__ == "LlamaForCausalLM"
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (16, 2, 2)
        assert (cfg.intermediate_size, cfg.head_dim, cfg.num_key_value_heads) == (64, 8, 2)
        assert cfg.attention_dropout == 0.1
        assert m.model.model.layers[0].mlp.up_proj.out_features == 64
    assert cfg.vocab_size == 256
    assert cfg._attn_implementation == "sdpa"
    assert m.model.lm_head.weight is m.model.get_input_embeddings().weight  # tied by default
    for name in m.residual_branches:
        m.get_submodule(name)  # the declared branches exist
    assert len(m.residual_branches) == 4


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_hf_untied_and_eager(model_type: str) -> None:
    m = tiny_lm(model_type, tie_embeddings=False, attn_implementation="eager")
    assert m.model.lm_head.weight is not m.model.get_input_embeddings().weight
    assert m.model.config._attn_implementation == "eager"


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_hf_forward_returns_model_output_with_next_token_loss(model_type: str) -> None:
    from transformers.utils import ModelOutput

    m = tiny_lm(model_type).eval()
    x = ids()
    out = m(input_ids=x, labels=x)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (3, 8, 256)
    by_hand = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, by_hand)
    assert m(input_ids=x).loss is None
    with pytest.raises(ValueError, match="block_size"):
        m(input_ids=ids(t=9))


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_hf_training_step_backward(model_type: str) -> None:
    m = tiny_lm(model_type).train()
    x = ids()
    loss = m.training_step({"input_ids": x, "labels": x}, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    with pytest.raises(TypeError, match="batch_format='hf'"):
        m.training_step((x, x), 0)


def test_hf_gradient_checkpointing_gives_the_same_gradients() -> None:
    plain = tiny_lm("gpt2").train()
    ckpt = tiny_lm("gpt2", gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    new_name = hasattr(plain.model, "is_activation_checkpointing")  # transformers >= 5.x
    flag = "is_activation_checkpointing" if new_name else "is_gradient_checkpointing"
    assert getattr(ckpt.model, flag) and not getattr(plain.model, flag)
    x = ids()
    for m in (plain, ckpt):
        m(input_ids=x, labels=x).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_hf_dropout_is_on_in_train_mode_only() -> None:
    m = tiny_lm("gpt2", dropout=0.5)
    x = ids()
    m.train()
    assert not torch.equal(m(input_ids=x).logits, m(input_ids=x).logits)
    m.eval()
    assert torch.equal(m(input_ids=x).logits, m(input_ids=x).logits)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_hf_saved_hparams_rebuild_at_another_width_on_meta(model_type: str) -> None:
    m = tiny_lm(model_type)
    hp = dict(m.hparams)
    assert hp == {
        "model_type": model_type, "width": 16, "depth": 2, "heads": 2, "vocab_size": 256, "block_size": 8,
        "dropout": 0.0, "tie_embeddings": True, "optimizer": "adamw", "lr": 3e-3, "momentum": 0.0,
        "weight_decay": 0.0, "gradient_checkpointing": False, "attn_implementation": "sdpa",
    }
    with torch.device("meta"):
        wide = HFCausalLM(**{**hp, "width": 32, "depth": 3})
    assert all(p.device.type == "meta" for p in wide.parameters())
    assert wide.width == 32 and wide.depth == 3
    n_small = {n: p.shape for n, p in m.named_parameters()}
    n_wide = {n: p.shape for n, p in wide.named_parameters()}
    assert set(n_small) < set(n_wide)  # same names, one more block
    emb = "model.transformer.wte.weight" if model_type == "gpt2" else "model.model.embed_tokens.weight"
    assert n_wide[emb] == (256, 32)


def test_hf_optimizer_choice() -> None:
    assert isinstance(tiny_lm(optimizer="sgd", lr=0.1, momentum=0.9).configure_optimizers(), torch.optim.SGD)
    opt = tiny_lm(weight_decay=0.01).configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 0.01
    with pytest.raises(ValueError, match="width 10 is not divisible by heads 4"):
        HFCausalLM(width=10, heads=4)
    with pytest.raises(ValueError, match="model_type"):
        HFCausalLM(model_type="bert", **TINY)


# ---------------------------------------------------------------- data


def test_char_text_hf_batches_and_default_unchanged() -> None:
    hf = CharTextDataModule(block_size=8, max_bytes=5_000, batch_size=4, batch_format="hf")
    batch = next(iter(hf.train_dataloader()))
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == (4, 8) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"], batch["labels"])
    assert int(batch["input_ids"].max()) < 256
    val = next(iter(hf.val_dataloader()))
    assert set(val) == {"input_ids", "labels"}

    plain = CharTextDataModule(block_size=8, max_bytes=5_000, batch_size=4)
    assert plain.hparams.batch_format == "tuple"
    x, y = next(iter(plain.val_dataloader()))
    assert x.shape == y.shape == (4, 8) and torch.equal(x[:, 1:], y[:, :-1])
    # the same windows: the HF window is the tuple window's inputs
    assert torch.equal(next(iter(hf.val_dataloader()))["input_ids"], x)
    with pytest.raises(ValueError, match="batch_format"):
        CharTextDataModule(batch_format="dict")


# ---------------------------------------------------------------- TimmClassifier


def tiny_vit(**kwargs) -> TimmClassifier:
    torch.manual_seed(0)
    return TimmClassifier(**{"width": 16, "depth": 2, "heads": 2, **kwargs})


def test_timm_vit_is_built_from_width_depth_heads() -> None:
    m = tiny_vit(dropout=0.1, attn_drop=0.2, drop_path=0.3)
    v = m.model
    assert type(v).__name__ == "VisionTransformer"
    assert v.embed_dim == 16 and len(v.blocks) == 2 and v.blocks[0].attn.num_heads == 2
    assert v.patch_embed.proj.kernel_size == (2, 2) and v.patch_embed.proj.in_channels == 1
    assert v.blocks[0].mlp.fc1.out_features == 64 and v.head.out_features == 10
    assert v.head_drop.p == 0.1 and v.blocks[0].attn.attn_drop.p == 0.2
    assert v.blocks[1].drop_path1.drop_prob == pytest.approx(0.3)
    out = m.eval()(torch.randn(3, 1, 8, 8))
    assert out.shape == (3, 10)
    for name in m.residual_branches:
        m.get_submodule(name)
    assert len(m.residual_branches) == 4


def test_timm_step_backward_and_meta_rebuild() -> None:
    m = tiny_vit()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    loss = m.training_step((x, y), 0)
    torch.testing.assert_close(loss, F.cross_entropy(m(x), y))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    hp = dict(m.hparams)
    assert {"model_name", "width", "depth", "heads", "img_size", "patch_size", "in_chans", "num_classes"} <= set(hp)
    with torch.device("meta"):
        wide = TimmClassifier(**{**hp, "width": 32})
    assert all(p.device.type == "meta" for p in wide.parameters())
    assert wide.model.embed_dim == 32 and wide.model.blocks[0].mlp.fc1.out_features == 128


def test_timm_other_models_and_clear_error() -> None:
    none = {"width": None, "depth": None, "heads": None, "img_size": None, "patch_size": None, "mlp_ratio": None}
    r = TimmClassifier(model_name="resnet18", **none)
    assert r.eval()(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert r.residual_branches == []
    with pytest.raises(TypeError, match="ViT-only arguments"):
        TimmClassifier(model_name="resnet18")
    with pytest.raises(ValueError, match="not divisible by heads"):
        TimmClassifier(width=10, heads=4)


# ---------------------------------------------------------------- training without lightning_align


def _fit(model: pl.LightningModule, data: pl.LightningDataModule, tmp_path: Path) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=data)
    return trainer


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_hf_trainer_fit(model_type: str, tmp_path: Path) -> None:
    data = CharTextDataModule(block_size=8, max_bytes=5_000, batch_size=4, batch_format="hf")
    trainer = _fit(tiny_lm(model_type), data, tmp_path)
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_timm_trainer_fit(tmp_path: Path) -> None:
    trainer = _fit(tiny_vit(), DigitsDataModule(batch_size=16, as_images=True), tmp_path)
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


# ---------------------------------------------------------------- the shipped configs, whole suite


@pytest.mark.parametrize("name", ["hf_gpt2", "hf_llama", "timm_vit"])
def test_hf_config_runs_with_the_whole_suite(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_configs import fast_args

    from lightning_align.cli import build_cli

    monkeypatch.chdir(tmp_path)
    cli = build_cli(fast_args(ROOT / "configs" / f"{name}.yaml", tmp_path))
    assert cli.trainer.global_step == 3
    metrics = cli.trainer.callback_metrics
    for prefix in ("align/cos/", "sharpness/max_eig", "ntk/max_eig", "elr/", "rank/", "coord/rms/"):
        assert any(k.startswith(prefix) for k in metrics), f"{prefix} missing from {name}"
