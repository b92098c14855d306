"""The model zoo: tiny models of the families our users train, built from configs (no download), with dropout on.

Each :class:`Family` builds a LightningModule around a Hugging Face, timm, torchvision, PEFT or plain-torch model
and a small loader of the batches that family trains on (token ids with padding masks, encoder-decoder labels,
images). ``tests/test_zoo.py`` runs the whole measurement suite at its default arguments on every family and holds
each value against a brute-force oracle. A family needs no glue beyond the LightningModule a user writes anyway:
``training_step`` returns the model's loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

VOCAB, SEQ, SAMPLES, BATCH = 16, 6, 16, 8


class DictDataset(Dataset):
    """Samples as dicts of tensors: what Hugging Face collators produce, one sample at a time."""

    def __init__(self, columns: dict[str, torch.Tensor]) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


class PairDataset(Dataset):
    """``(image, label)`` samples."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def padded_tokens(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (``SAMPLES``, ``SEQ``) with right padding (id 0) and the attention mask: lengths 3..SEQ."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (SAMPLES, SEQ), generator=g)
    lengths = torch.randint(3, SEQ + 1, (SAMPLES,), generator=g)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def causal_lm_data() -> DictDataset:
    ids, mask = padded_tokens()
    return DictDataset({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})


def masked_lm_data() -> DictDataset:
    ids, mask = padded_tokens()
    g = torch.Generator().manual_seed(1)
    chosen = (torch.rand(ids.shape, generator=g) < 0.3) & (mask == 1)
    chosen[:, 0] = True  # every sequence has a target
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    inputs = torch.where(chosen, torch.full_like(ids, VOCAB - 1), ids)  # the [MASK] token
    return DictDataset({"input_ids": inputs, "attention_mask": mask, "labels": labels})


def seq2seq_data() -> DictDataset:
    ids, mask = padded_tokens()
    targets = torch.flip(ids[:, :4], dims=[1]).clamp_min(1)
    return DictDataset({"input_ids": ids, "attention_mask": mask, "labels": targets})


def image_data(channels: int = 1, size: int = 8, classes: int = 3) -> PairDataset:
    g = torch.Generator().manual_seed(0)
    return PairDataset(torch.randn(SAMPLES, channels, size, size, generator=g), torch.randint(0, classes, (SAMPLES,), generator=g))


def pixel_data() -> DictDataset:
    data = image_data()
    return DictDataset({"pixel_values": data.x, "labels": data.y})


def sequence_class_data() -> DictDataset:
    ids, mask = padded_tokens()
    return DictDataset({"input_ids": ids, "attention_mask": mask, "labels": ids[:, 0] % 3})


def speech_data() -> DictDataset:
    """Log-mel-like features ``(SAMPLES, 4 bins, 8 frames)`` and 4 target tokens each (a speech recogniser's batch)."""
    g = torch.Generator().manual_seed(0)
    return DictDataset({"input_features": torch.randn(SAMPLES, 4, 8, generator=g),
                        "labels": torch.randint(2, VOCAB, (SAMPLES, 4), generator=g)})


def token_class_data() -> PairDataset:
    ids, _ = padded_tokens()
    return PairDataset(ids, ids[:, 0] % 3)


class ZooModule(pl.LightningModule):
    """A LightningModule around ``build()``: AdamW, and the loss the family trains on.

    ``kind``: ``"hf"`` (the batch is a dict of model keyword arguments with ``labels``; the loss is the model's
    own ``.loss``), ``"classify"`` (``(x, y)`` batches, cross-entropy of the model's logits).
    """

    def __init__(self, build: Callable[[], nn.Module], kind: str, lr: float = 3e-3) -> None:
        super().__init__()
        self.model = build()
        self.kind, self.lr = kind, lr

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.kind == "hf":
            loss = self.model(**batch).loss
        else:
            x, y = batch
            loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, batch_size=BATCH)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


@dataclass(frozen=True)
class Family:
    """One model family of the zoo."""

    name: str
    build: Callable[[], nn.Module]
    kind: str
    data: Callable[[], Dataset]
    #: The modules' output is per position (a language model): NTK and rank reduce over positions.
    sequence: bool = False
    #: The model computes in float32 only (grouped expert matmuls): the oracles run in float32.
    float32_only: bool = False

    def module(self) -> ZooModule:
        return ZooModule(self.build, self.kind)

    def loader(self) -> DataLoader:
        return DataLoader(self.data(), batch_size=BATCH, shuffle=True)


def _qwen2(tied: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(
            vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=tied, attention_dropout=0.1,
            use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=1,
        )
        return Qwen2ForCausalLM(config)

    return build


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=SEQ, type_vocab_size=1, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
        pad_token_id=0,
    ))


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1, num_heads=2,
        dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, use_cache=False,
    ))


def _hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    ))


def _mixtral() -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=SEQ,
        attention_dropout=0.1, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=1,
        output_router_logits=False,
    ))


def _gpt2_lora() -> nn.Module:
    import peft
    from transformers import GPT2Config, GPT2LMHeadModel

    base = GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.1, embd_pdrop=0.1,
        attn_pdrop=0.1, use_cache=False, bos_token_id=1, eos_token_id=1, pad_token_id=0,
    ))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.1, fan_in_fan_out=True)
    return peft.get_peft_model(base, config)


def _timm_convnext() -> nn.Module:
    from timm.models.convnext import ConvNeXt

    # Four stages (timm's fixed layout); output_stride 8 dilates the last two, so 8x8 images stay 1x1 at the end.
    return ConvNeXt(in_chans=1, num_classes=3, depths=(1, 1, 1, 1), dims=(4, 4, 4, 4), output_stride=8,
                    drop_rate=0.1, drop_path_rate=0.1)


def _timm_vit() -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8,
        depth=1, num_heads=2, mlp_ratio=2.0, drop_rate=0.1, drop_path_rate=0.1,
    )


def _torchvision_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    # torchvision's ViT takes 3 channels; the data are 1-channel images broadcast by a 1x1 stem below.
    return nn.Sequential(
        nn.Conv2d(1, 3, 1),
        VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                          num_classes=3, dropout=0.1, attention_dropout=0.1),
    )


def _torchvision_efficientnet() -> nn.Module:
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig

    setting = [MBConvConfig(1, 3, 1, 4, 4, 1), MBConvConfig(2, 3, 2, 4, 8, 1)]
    return nn.Sequential(nn.Conv2d(1, 3, 1), EfficientNet(setting, dropout=0.1, stochastic_depth_prob=0.1, num_classes=3, last_channel=8))


def _distilbert() -> nn.Module:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=VOCAB, dim=8, n_layers=1, n_heads=2, hidden_dim=16, max_position_embeddings=SEQ, num_labels=3,
        dropout=0.1, attention_dropout=0.1, seq_classif_dropout=0.1, pad_token_id=0,
    ))


def _whisper() -> nn.Module:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    return WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=4, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, d_model=8, encoder_ffn_dim=16, decoder_ffn_dim=16, max_source_positions=4,
        max_target_positions=8, dropout=0.1, decoder_start_token_id=1, pad_token_id=0, eos_token_id=1, bos_token_id=1,
        use_cache=False,
    ))


def _mamba() -> nn.Module:
    from transformers import MambaConfig, MambaForCausalLM

    return MambaForCausalLM(MambaConfig(
        vocab_size=VOCAB, hidden_size=8, state_size=4, num_hidden_layers=1, expand=2, conv_kernel=2, use_cache=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=1,
    ))


def _qwen2_moe() -> nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=8, moe_intermediate_size=8, shared_expert_intermediate_size=8,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=SEQ, attention_dropout=0.1, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=1,
    ))


def _timm_resnet() -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3, in_chans=1, stem_type="deep", stem_width=2, channels=(4, 4, 4, 4),
                  drop_rate=0.1, drop_path_rate=0.1)


def _timm_swin() -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=3, embed_dim=8, depths=(1,), num_heads=(2,),
                           window_size=2, drop_rate=0.1, drop_path_rate=0.1)


def _torchvision_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return nn.Sequential(nn.Conv2d(1, 3, 1), SwinTransformer(
        patch_size=[2, 2], embed_dim=8, depths=[2], num_heads=[2], window_size=[2, 2], num_classes=3, dropout=0.1,
        stochastic_depth_prob=0.1,
    ))


class RecurrentClassifier(nn.Module):
    """Token embeddings through a recurrent layer (``nn.LSTM`` or a 2-layer ``nn.GRU`` with dropout between layers),
    the last position's state to class logits."""

    def __init__(self, kind: str = "lstm") -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.rnn = nn.LSTM(8, 8, batch_first=True) if kind == "lstm" else nn.GRU(8, 8, 2, batch_first=True, dropout=0.1)
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.rnn(self.embed(ids))[0][:, -1]))


def _torchvision_mobilenet_v3() -> nn.Module:
    from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3

    # Squeeze-excitation gated by nn.Hardsigmoid, which has no double backward in torch (the probes run its clamp form).
    setting = [InvertedResidualConfig(4, 3, 8, 4, True, "HS", 2, 1, 1.0),
               InvertedResidualConfig(4, 3, 8, 8, False, "RE", 1, 1, 1.0)]
    return nn.Sequential(nn.Conv2d(1, 3, 1), MobileNetV3(setting, last_channel=8, num_classes=3, dropout=0.1))


class TorchTransformerClassifier(nn.Module):
    """``nn.TransformerEncoder`` (``nn.MultiheadAttention``, fused fast path in eval mode) over token embeddings,
    mean-pooled to class logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(dim=1))


FAMILIES: tuple[Family, ...] = (
    Family("qwen2_gqa_tied", _qwen2(True), "hf", causal_lm_data, sequence=True),
    Family("qwen2_gqa_untied", _qwen2(False), "hf", causal_lm_data, sequence=True),
    Family("bert_masked_lm", _bert, "hf", masked_lm_data, sequence=True),
    Family("t5_encoder_decoder", _t5, "hf", seq2seq_data, sequence=True),
    Family("hf_vit", _hf_vit, "hf", pixel_data),
    Family("mixtral_moe", _mixtral, "hf", causal_lm_data, sequence=True, float32_only=True),
    Family("qwen2_moe_shared_experts", _qwen2_moe, "hf", causal_lm_data, sequence=True, float32_only=True),
    Family("distilbert_classifier", _distilbert, "hf", sequence_class_data),
    Family("whisper_speech", _whisper, "hf", speech_data, sequence=True),
    Family("mamba_ssm", _mamba, "hf", causal_lm_data, sequence=True),
    Family("gpt2_peft_lora", _gpt2_lora, "hf", causal_lm_data, sequence=True),
    Family("timm_convnext", _timm_convnext, "classify", image_data),
    Family("timm_vit", _timm_vit, "classify", image_data),
    Family("torchvision_vit", _torchvision_vit, "classify", image_data),
    Family("torchvision_efficientnet", _torchvision_efficientnet, "classify", image_data),
    Family("torchvision_mobilenet_v3", _torchvision_mobilenet_v3, "classify", image_data),
    Family("timm_resnet", _timm_resnet, "classify", image_data),
    Family("timm_swin", _timm_swin, "classify", image_data),
    Family("torchvision_swin", _torchvision_swin, "classify", image_data),
    Family("lstm", RecurrentClassifier, "classify", token_class_data),
    Family("gru", lambda: RecurrentClassifier("gru"), "classify", token_class_data),
    Family("torch_transformer_encoder", TorchTransformerClassifier, "classify", token_class_data),
)
