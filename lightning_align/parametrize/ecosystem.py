"""Layers of Hugging Face ``transformers``, ``timm`` and our own modules, recognised by duck typing.

Why: μP and depth-μP need to know three things a model does not declare: where its residual branches
are, which attribute sets its attention-logit scale, and which head dimension that scale refers to. The
libraries are optional, so nothing here imports them: classes are recognised by attribute and child names.

- **Residual branches** (:func:`standard_branches`): numbered blocks (``transformer.h.N``,
  ``model.layers.N``, ``blocks.N``) holding an attention and an MLP child: GPT-2 ``attn``/``mlp``
  (and ``crossattention``), Llama-style ``self_attn``/``mlp``, timm ``attn``/``mlp`` — or timm's layer
  scales ``ls1``/``ls2`` when present, since their output is what joins the residual stream.
- **Attention scale** (:func:`attention_scale_attr`): ``attn_scale`` (ours), ``scaling`` (HF attention;
  read by every attention implementation), ``scale`` next to ``fused_attn`` (timm; only the unfused path
  reads it, so the caller also sets ``fused_attn = False``).
- **Head dimension** (:func:`head_dim`): read from the module, then from its ``config``, under the common
  names (:data:`HEAD_DIM_NAMES`: ``head_dim`` in HF, timm, ours and ``nn.MultiheadAttention``, BERT's
  ``attention_head_size``, T5's ``key_value_proj_dim``/``d_kv``, Megatron's ``kv_channels``, ...), else
  derived as a total size over a head count (:data:`HEAD_DIM_RATIOS`: ``hidden_size // num_attention_heads``,
  T5's ``inner_dim // n_heads``, ...) or timm's ``qkv.out_features // 3 // num_heads``.

Example:
    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.attn, self.mlp = nn.Linear(4, 4), nn.Linear(4, 4)
    >>> model = nn.Module()
    >>> model.blocks = nn.ModuleList(Block() for _ in range(2))
    >>> list(standard_branches(model))
    ['blocks.0.attn', 'blocks.0.mlp', 'blocks.1.attn', 'blocks.1.mlp']
"""

from __future__ import annotations

from typing import Any

from torch import nn

# (attention child, MLP child) of a residual block, in the order they are tried.
_BLOCK_CHILDREN: tuple[tuple[str, str], ...] = (("attn", "mlp"), ("self_attn", "mlp"))
# timm layer scales following each branch: their output is the branch output.
_LAYER_SCALES: dict[str, str] = {"attn": "ls1", "self_attn": "ls1", "mlp": "ls2"}
# Extra branches of a block when present (GPT-2 with add_cross_attention).
_EXTRA_BRANCHES: tuple[str, ...] = ("crossattention",)
# Children / parameters that mark an attention's query, key and value projections.
_QKV_NAMES = frozenset({
    "qkv", "qkv_proj", "q_proj", "k_proj", "v_proj", "query", "key", "value", "c_attn", "q", "k", "v",
    "in_proj_weight", "q_proj_weight", "Wqkv", "to_q", "to_k", "to_v", "query_key_value", "q_lin", "k_lin", "v_lin",
})  # fmt: skip


def standard_branches(model: nn.Module) -> dict[str, list[str]]:
    """Residual branches of standard HF / timm / GPT-style blocks: ``{hooked module: modules in the branch}``.

    The hooked module's output is multiplied by the depth multiplier; the parameters of every listed
    module are "in the branch" (depth learning-rate rules). A block is a module whose name ends in a
    number and that has an ``attn``/``self_attn`` and an ``mlp`` child. With timm layer scales
    (``ls1``/``ls2`` that are not ``nn.Identity``) the layer scale is hooked and holds the branch with
    the attention/MLP it scales. Empty when no such block exists.

    Example::

        standard_branches(GPT2LMHeadModel(config))  # {"transformer.h.0.attn": [...], "transformer.h.0.mlp": [...], ...}
    """
    out: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not name or not name.rsplit(".", 1)[-1].isdigit() or any(name.startswith(b + ".") for b in out):
            continue
        children = dict(module.named_children())
        for attn, mlp in _BLOCK_CHILDREN:
            if attn not in children or mlp not in children:
                continue
            for child in (attn, *(c for c in _EXTRA_BRANCHES if c in children), mlp):
                scale_name = _LAYER_SCALES.get(child)
                scale = children.get(scale_name) if scale_name else None
                if scale is not None and not isinstance(scale, nn.Identity) and any(True for _ in scale.parameters()):
                    out[f"{name}.{scale_name}"] = [f"{name}.{scale_name}", f"{name}.{child}"]
                else:
                    out[f"{name}.{child}"] = [f"{name}.{child}"]
            break
    return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


HEAD_DIM_NAMES: tuple[str, ...] = (
    "head_dim", "attention_head_size", "key_value_proj_dim", "d_kv", "kv_channels", "head_size", "d_head", "dim_head",
)  # fmt: skip
"""Attribute / config names that hold the per-head dimension directly (first found wins)."""
HEAD_DIM_RATIOS: tuple[tuple[str, str], ...] = (
    ("all_head_size", "num_attention_heads"), ("inner_dim", "n_heads"), ("embed_dim", "num_heads"),
    ("hidden_size", "num_attention_heads"), ("hidden_size", "num_heads"), ("d_model", "num_heads"),
    ("d_model", "n_head"), ("n_embd", "n_head"), ("dim", "num_heads"),
)  # fmt: skip
"""``(total size, head count)`` name pairs whose ratio is the head dimension when no direct name is set."""


def _positive_int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and x > 0 else None


def _read_head_dim(obj: Any) -> int | None:
    for attr in HEAD_DIM_NAMES:
        value = _positive_int(getattr(obj, attr, None))
        if value is not None:
            return value
    for total, heads in HEAD_DIM_RATIOS:
        t, h = _positive_int(getattr(obj, total, None)), _positive_int(getattr(obj, heads, None))
        if t is not None and h is not None and t % h == 0:
            return t // h
    return None


def head_dim(module: nn.Module | None) -> int | None:
    """The per-head dimension an attention module's scale refers to, or ``None`` when it cannot be told.

    The module's own attributes first (:data:`HEAD_DIM_NAMES`, then :data:`HEAD_DIM_RATIOS`, then timm's fused
    ``qkv``), then, for a class named ``...Attention...``, the same names on its ``config`` (Hugging Face
    attention modules keep theirs; a whole model holding the same config is not an attention).

    Example:
        >>> class T5Like(nn.Module):
        ...     key_value_proj_dim, n_heads, inner_dim = 8, 4, 32
        >>> head_dim(T5Like()), head_dim(nn.MultiheadAttention(16, 2)), head_dim(nn.Linear(2, 2))
        (8, 8, None)
    """
    if module is None:
        return None
    value = _read_head_dim(module)
    if value is not None:
        return value
    qkv, heads = getattr(module, "qkv", None), _positive_int(getattr(module, "num_heads", None))
    if isinstance(qkv, nn.Linear) and heads is not None and qkv.out_features % (3 * heads) == 0:
        return qkv.out_features // 3 // heads
    config = getattr(module, "config", None)
    if config is None or isinstance(config, nn.Module) or "attention" not in type(module).__name__.lower():
        return None
    return _read_head_dim(config)


def attention_scale_attr(module: nn.Module) -> str | None:
    """Name of the attribute holding the attention-logit scale that the module's forward reads, if any.

    ``attn_scale`` (ours), ``scaling`` (HF attention), ``scale`` with a ``fused_attn`` flag (timm). The
    module must also tell its head dimension (:func:`head_dim`).
    """
    if head_dim(module) is None:
        return None
    if _is_number(getattr(module, "attn_scale", None)):
        return "attn_scale"
    if _is_number(getattr(module, "scaling", None)):
        return "scaling"
    if _is_number(getattr(module, "scale", None)) and hasattr(module, "fused_attn"):
        return "scale"
    return None


def looks_like_attention(module: nn.Module) -> bool:
    """``nn.MultiheadAttention``, or a class named ``...Attention`` with query/key/value projections."""
    if isinstance(module, nn.MultiheadAttention):
        return True
    if not type(module).__name__.lower().endswith("attention"):
        return False
    names = {n for n, _ in module.named_children()} | {n for n, _ in module.named_parameters(recurse=False)}
    return bool(names & _QKV_NAMES)
