"""Reading a batch and a model's output: which part is the input, which the target, which the prediction.

A batch is ``(inputs, targets, ...)``, a mapping with input/target keys (``x``/``y``, ``input``/``target``, ...),
or a Hugging Face mapping (``input_ids``, ``attention_mask``, ``pixel_values``, ``labels``, ...), whose inputs are
passed to the model as keyword arguments (:func:`call_model`; an encoder-decoder also gets the decoder inputs it
makes from the labels, :func:`with_decoder_inputs`). A model output is a tensor, a tuple (first
tensor), or a Hugging Face ``ModelOutput``-like object (``.logits``, else ``.last_hidden_state``): :func:`prediction`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

INPUT_KEYS = ("x", "input", "inputs")
TARGET_KEYS = ("y", "target", "targets", "label", "labels")
#: A mapping batch with one of these keys is a Hugging Face batch: every key but the labels goes to the model.
HF_INPUT_KEYS = ("input_ids", "pixel_values", "inputs_embeds", "input_values", "input_features")
HF_LABEL_KEYS = ("labels", "label", "start_positions", "end_positions")


#: Keys that already give an encoder-decoder its decoder inputs (then none are made from the labels).
DECODER_INPUT_KEYS = ("decoder_input_ids", "decoder_inputs_embeds")


class ModelKwargs(dict):
    """Inputs passed to the model as keyword arguments (``model(**inputs)``): a Hugging Face batch less its labels.

    ``labels`` keeps the batch's ``labels`` (not passed as such): :func:`call_model` makes an encoder-decoder's
    decoder inputs from them. Mapping a ``ModelKwargs`` to a new one (``map_tensors``) drops it: call
    :func:`batch_inputs` on the mapped batch instead.
    """

    labels: Any = None


def call_model(model: Any, inputs: Any) -> Any:
    """``model(**inputs)`` for :class:`ModelKwargs` (with an encoder-decoder's decoder inputs), else ``model(inputs)``."""
    return model(**with_decoder_inputs(model, inputs)) if isinstance(inputs, ModelKwargs) else model(inputs)


def seq2seq_model(model: Any) -> Any:
    """The Hugging Face encoder-decoder inside ``model`` (``config.is_encoder_decoder``), or ``None``."""
    if not isinstance(model, torch.nn.Module):
        return None
    for module in model.modules():
        if getattr(getattr(module, "config", None), "is_encoder_decoder", False) is True:
            return module
    return None


def with_decoder_inputs(model: Any, inputs: ModelKwargs) -> dict[str, Any]:
    """``inputs`` plus the decoder inputs an encoder-decoder makes from the labels, as the model makes them.

    A Hugging Face encoder-decoder given ``labels`` and no decoder inputs shifts the labels right
    (``prepare_decoder_input_ids_from_labels``: the start token first, ``-100`` as padding); the probe does the
    same and passes ``decoder_input_ids``, or passes ``labels`` when the module's ``forward`` takes those and not
    ``decoder_input_ids`` (the model then makes them itself). Other models, or a batch with decoder inputs or
    without labels: ``inputs`` as they are.
    """
    labels = inputs.labels
    if labels is None or any(k in inputs for k in DECODER_INPUT_KEYS):
        return inputs
    seq2seq = seq2seq_model(model)
    if seq2seq is None:
        return inputs
    accepts = _keyword_arguments(model)
    prepare = getattr(seq2seq, "prepare_decoder_input_ids_from_labels", None)
    if callable(prepare) and (accepts is None or "decoder_input_ids" in accepts):
        return {**inputs, "decoder_input_ids": prepare(labels=labels)}
    if accepts is None or "labels" in accepts:
        return {**inputs, "labels": labels}
    raise TypeError(
        f"lightning_align: {type(model).__name__} holds the encoder-decoder {type(seq2seq).__name__}, whose decoder needs "
        "inputs made from the batch's `labels`, but its forward takes neither `decoder_input_ids` nor `labels`; "
        "accept one of them in forward or define `probe_outputs(batch)` on the module."
    )


def _keyword_arguments(model: Any) -> set[str] | None:
    """The keyword names ``model.forward`` takes, ``None`` when it takes ``**kwargs`` (or cannot be read)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def prediction(output: Any, owner: str = "lightning_align") -> torch.Tensor:
    """The prediction tensor of a model output: itself, ``.logits`` / ``.last_hidden_state`` of a Hugging Face
    ``ModelOutput`` (or a mapping with those keys), or the first tensor of a tuple.

    Example:
        >>> prediction((torch.ones(2), "aux")).shape
        torch.Size([2])
    """
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"{owner}: the model returned {type(output).__name__}, which holds no prediction tensor (a tensor, a tuple "
        "starting with one, or an output with `.logits` / `.last_hidden_state`); define `probe_outputs(batch)` "
        "on your LightningModule to return the tensor to measure."
    )


def batch_inputs(batch: Any, owner: str = "lightning_align") -> Any:
    """The model inputs of a batch (``batch[0]`` or ``batch["x"]``-like).

    Example:
        >>> batch_inputs({"x": 1, "y": 2})
        1
    """
    return _batch_part(batch, 0, INPUT_KEYS, "inputs", owner)


def batch_targets(batch: Any, owner: str = "lightning_align") -> Any:
    """The targets of a batch (``batch[1]`` or ``batch["y"]``-like).

    Example:
        >>> batch_targets((torch.zeros(2, 3), torch.tensor([0, 1])))
        tensor([0, 1])
    """
    return _batch_part(batch, 1, TARGET_KEYS, "targets", owner)


def _batch_part(batch: Any, index: int, keys: tuple[str, ...], what: str, owner: str) -> Any:
    if isinstance(batch, (tuple, list)) and len(batch) > index:
        return batch[index]
    if isinstance(batch, Mapping) and index == 0 and any(k in batch for k in HF_INPUT_KEYS):
        inputs = ModelKwargs((k, v) for k, v in batch.items() if k not in HF_LABEL_KEYS)
        inputs.labels = batch.get("labels")
        return inputs
    if isinstance(batch, Mapping):
        for k in keys:
            if k in batch:
                return batch[k]
    raise TypeError(
        f"{owner}: cannot find the {what} in a batch of type {type(batch).__name__}: expected a tuple/list "
        f"(inputs, targets, ...) or a mapping with one of the keys {list(keys)} (or {list(HF_INPUT_KEYS)} for "
        "model inputs); or define "
        f"`probe_loss(batch)` / `probe_outputs(batch)` on your LightningModule."
    )


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch (leading dimension of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for part in batch:
            if isinstance(part, (torch.Tensor, tuple, list, Mapping)):
                return batch_size_of(part)
    raise TypeError(f"cannot find a tensor in a batch of type {type(batch).__name__}")
