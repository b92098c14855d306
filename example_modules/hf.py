"""A Hugging Face causal language model (GPT-2 or Llama) built from a config, with ``width``/``depth`` arguments.

Why: researchers train ``transformers`` models, not our toy GPT. :class:`HFCausalLM` builds a randomly
initialised ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` (no download, no pretrained weights) whose sizes are
plain integer hyper-parameters, so :class:`~lightning_align.Parametrization` can re-instantiate it at a base
width on the meta device (``width_keys=["width"]``, ``depth_keys=["depth"]``), and the suite sees the
ecosystem's real layers (GPT-2's ``Conv1D``, tied embeddings), batches (``{"input_ids", "labels"}`` mappings)
and outputs (``CausalLMOutputWithPast``). ``transformers`` is imported only when a model is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch

from example_modules.base import ExampleModule, OptimizerName

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PretrainedConfig

ModelType = Literal["gpt2", "llama"]


def hf_causal_lm_config(
    model_type: str,
    width: int,
    depth: int,
    heads: int,
    vocab_size: int,
    block_size: int,
    dropout: float,
    tie_embeddings: bool,
) -> PretrainedConfig:
    """A GPT-2 or Llama config whose every width (hidden, MLP = 4x, head dim = width/heads) scales with ``width``."""
    if width % heads:
        raise ValueError(f"HFCausalLM: width {width} is not divisible by heads {heads}")
    if model_type == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=block_size,
            n_embd=width,
            n_layer=depth,
            n_head=heads,
            n_inner=4 * width,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            use_cache=False,
            bos_token_id=0,
            eos_token_id=0,
            tie_word_embeddings=tie_embeddings,
        )
    if model_type == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            max_position_embeddings=block_size,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=width // heads,
            attention_dropout=dropout,
            use_cache=False,
            bos_token_id=0,
            eos_token_id=0,
            tie_word_embeddings=tie_embeddings,
        )
    raise ValueError(f"HFCausalLM: model_type must be 'gpt2' or 'llama', got {model_type!r}")


class HFCausalLM(ExampleModule):
    """Any Hugging Face causal LM (GPT-2, Llama) from a config, trained on HF-style dict batches.

    The network is ``self.model`` (a ``transformers`` ``*ForCausalLM``). Batches are mappings
    ``{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}`` with ``labels == input_ids`` (the model
    shifts them), e.g. from ``CharTextDataModule(batch_format="hf")``; ``forward`` returns the HF
    ``ModelOutput`` (``.logits``, ``.loss``). Layer names: ``model.transformer.h.i.attn``/``mlp`` (GPT-2),
    ``model.model.layers.i.self_attn``/``mlp`` (Llama), ``model.lm_head`` (tied to the input embedding by default).

    Args:
        model_type: ``gpt2`` or ``llama``.
        width: hidden size (``n_embd``/``hidden_size``); the MLP is ``4 * width`` and the head dim ``width // heads``.
        depth: number of blocks (``n_layer``/``num_hidden_layers``).
        heads: attention heads (Llama: as many key/value heads, i.e. no grouped-query attention).
        vocab_size: 256 for byte-level text.
        block_size: maximum sequence length (position embeddings / RoPE range).
        dropout: GPT-2's residual, embedding and attention dropout; Llama's attention dropout.
        tie_embeddings: share the input embedding with ``lm_head``.
        optimizer, lr, momentum, weight_decay: the optimizer (as in every example module).
        gradient_checkpointing: ``self.model.gradient_checkpointing_enable()`` (non-reentrant; called
            ``activation_checkpointing_enable`` in recent ``transformers``).
        attn_implementation: ``sdpa``, ``eager`` (or any implementation ``transformers`` knows).

    Example:
        >>> m = HFCausalLM(width=16, depth=1, heads=2, block_size=8)
        >>> ids = torch.randint(0, 256, (2, 8))
        >>> out = m(input_ids=ids, labels=ids)
        >>> tuple(out.logits.shape), out.loss.ndim
        ((2, 8, 256), 0)
    """

    def __init__(
        self,
        model_type: ModelType = "gpt2",
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        vocab_size: int = 256,
        block_size: int = 64,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        optimizer: OptimizerName = "adamw",
        lr: float = 3e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        gradient_checkpointing: bool = False,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._configure_training("cross_entropy", optimizer, lr, momentum, weight_decay)
        from transformers import AutoModelForCausalLM

        config = hf_causal_lm_config(model_type, width, depth, heads, vocab_size, block_size, dropout, tie_embeddings)
        self.model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
        self.model.loss_type = "ForCausalLM"  # GPT2LMHeadModel's name matches no HF loss: same loss, no warning
        self.width, self.depth, self.block_size = width, depth, block_size
        if gradient_checkpointing:
            enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @property
    def residual_branches(self) -> list[str]:
        """Qualified names of the residual branches (attention and MLP of every block), for depth-μP."""
        if self.hparams.model_type == "gpt2":
            return [f"model.transformer.h.{i}.{kind}" for i in range(self.depth) for kind in ("attn", "mlp")]
        return [f"model.model.layers.{i}.{kind}" for i in range(self.depth) for kind in ("self_attn", "mlp")]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> Any:
        """The HF ``ModelOutput``: ``.logits`` ``(B, T, vocab)`` and, with ``labels``, the mean next-token ``.loss``."""
        if input_ids.shape[1] > self.block_size:
            raise ValueError(f"HFCausalLM: sequence length {input_ids.shape[1]} exceeds block_size {self.block_size}")
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(
                f"HFCausalLM expects HF-style dict batches {{'input_ids', 'labels'}}, got {type(batch).__name__}; "
                "use CharTextDataModule(batch_format='hf')"
            )
        loss = self(**batch).loss
        if loss is None:
            raise ValueError("HFCausalLM: the batch has no 'labels', so the model returned no loss")
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train", batch_size=batch["input_ids"].shape[0])
        return loss
