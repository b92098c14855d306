"""μP attention logits: ``1/d`` in the head dimension ``d``, set through the scale attribute the forward reads.

Why ``1/d``: once training correlates queries and keys, ``q·k`` over a head of dimension ``d`` grows like
``d``, so μP scales the logits by ``1/d`` (TP5 §J.2; microsoft/mup's ``attn_mult / d``). At the base width
every scheme is SP, so the scale at head dimension ``d`` is the base module's scale times ``d0/d``: standard
attention (``1/√d0`` at the base) gets ``√d0/d``, mup's ``attn_mult/d`` with ``attn_mult = √d0``; T5's
unscaled logits (scale 1) get ``d0/d``; a configured scale (Gemma's ``query_pre_attn_scalar``) gets its
base value times ``d0/d``.

A head dimension that does not change with width (the number of heads scales instead, as T5's ``d_kv`` or
``num_heads`` in ``width_keys``) needs no change: ``1/d`` and the module's own scale then differ by a
width-independent constant, and mup computes the same logits. Only an attention whose head dimension
changes (or cannot be read while its shapes change) and whose scale cannot be set is refused (or, with
``unscalable_attention="warn"``, left with its own scale, and the warning says so).

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Attn(nn.Module):
    ...     def __init__(self, width):
    ...         super().__init__()
    ...         self.q_proj, self.head_dim, self.scaling = nn.Linear(width, width), width // 2, (width // 2) ** -0.5
    >>> changes, problems = plan_attention(nn.Sequential(Attn(64)), nn.Sequential(Attn(16)))
    >>> [(c.name, c.attr, round(c.value, 6)) for c in changes], problems
    ([('0', 'scaling', 0.088388)], [])
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightning_align.parametrize.ecosystem import HEAD_DIM_NAMES, attention_scale_attr, head_dim, looks_like_attention


@dataclass(frozen=True)
class AttentionChange:
    """A new value for the attention-logit scale attribute ``attr`` of module ``name``."""

    name: str
    module: nn.Module
    attr: str
    value: float


def plan_attention(model: nn.Module, base: nn.Module) -> tuple[list[AttentionChange], list[str]]:
    """``(changes, problems)``: μP scales to set, and attentions whose scale is needed but cannot be set.

    Each problem is ``"'name' (Class): reason"``. Nothing is changed here, so a caller can refuse first.
    """
    base_modules = dict(base.named_modules())
    seen: list[str] = []
    changes: list[AttentionChange] = []
    problems: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in seen):
            continue
        attr, base_module = attention_scale_attr(module), base_modules.get(name)
        if attr is not None:
            seen.append(name)
            d, d0 = head_dim(module), head_dim(base_module)
            base_scale = getattr(base_module, attr, None)
            if d0 is None or not isinstance(base_scale, (int, float)):
                problems.append(f"{name!r} ({type(module).__name__}): the base-width model has no such attention")
            elif d != d0:
                changes.append(AttentionChange(name, module, attr, float(base_scale) * d0 / d))
        elif looks_like_attention(module) and not any(attention_scale_attr(m) for m in module.modules() if m is not module):
            seen.append(name)
            reason = _unscalable_reason(module, base_module)
            if reason is not None:
                problems.append(f"{name!r} ({type(module).__name__}): {reason}")
    return changes, problems


def _unscalable_reason(module: nn.Module, base: nn.Module | None) -> str | None:
    """Why an attention without a settable scale needs one (``None``: its head dimension is fixed)."""
    d, d0 = head_dim(module), head_dim(base)
    if d is not None and d0 is not None:
        if d == d0:
            return None
        return f"its head dimension changes with width ({d0} at the base width, {d} here) and it has no scale attribute"
    base_shapes = {n: tuple(p.shape) for n, p in base.named_parameters()} if base is not None else {}
    if base is not None and all(base_shapes.get(n) == tuple(p.shape) for n, p in module.named_parameters()):
        return None
    names = ", ".join(f"`{n}`" for n in HEAD_DIM_NAMES[:5])
    return f"its head dimension cannot be read (no {names}, ... on it or its `config`) while its shapes change with width"


def unscalable_message(scheme: str, problems: list[str], *, refuse: bool) -> str:
    """The refusal (``refuse=True``) or the warning for attentions whose μP scale cannot be set."""
    where = "; ".join(problems)
    if refuse:
        return (
            f"Parametrization(scheme={scheme!r}): cannot set the attention scale of {where}, so μP's 1/head_dim "
            "attention logits cannot be applied. Keep the "
            "head dimension fixed across widths (scale the number of heads in `width_keys`, e.g. "
            "'config.num_attention_heads'), or expose `head_dim` and a logit scale the forward reads (`scaling` as "
            "in Hugging Face, `scale` with `fused_attn` as in timm, or `attn_scale`); "
            "`unscalable_attention='warn'` trains with the module's own logit scale, unchanged."
        )
    return (
        f"Parametrization(scheme={scheme!r}): attention left with the module's own logit scale, unchanged from SP "
        f"(1/sqrt(head_dim) in standard attention), not μP's 1/head_dim: {where}. Its logits may grow with width "
        "and the learning rate may not transfer; keep the head dimension fixed across widths for μP."
    )
