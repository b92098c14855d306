"""Mixtures of experts: expert tensors stacked in one parameter, and the gates that route to them.

Why: Hugging Face MoE models (Mixtral, Qwen2-/Qwen3-MoE, OLMoE, DeepSeek, GPT-OSS, ...) hold their experts
as 3-D parameters ``(num_experts, out, in)`` (or ``(num_experts, in, out)``) and route with a raw
``weight`` of shape ``(num_experts, hidden)``; no ``nn.Linear`` says what they are. μP reads them by
structure (no import of any library):

- an **expert container** is a module owning a parameter of 3 or more dimensions whose first dimension is
  its expert count (``num_experts``, ``num_local_experts``, ``n_routed_experts``) or is fixed while the
  last two scale with width. Each slice is a matrix: a hidden matrix when both of its dimensions scale;
  its 2-D parameters ``(num_experts, n)`` are per-expert biases (vector-like);
- a **gate** is a module next to the experts (inside the MoE block that holds them, not inside the
  experts) with a 2-D ``weight`` of shape ``(num_experts, hidden)`` or ``(1, hidden)`` (a shared expert's
  scalar gate). Its fan-in scales and its fan-out does not, which makes it a readout in μP (TP5 Table 3:
  "output weights"; mup's ``assert_hidden_size_inf`` wants every such layer to be a ``MuReadout``): router
  logits are ``W x / m`` as ``MuReadout`` computes them, so routing decisions do not drift with width.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Experts(nn.Module):
    ...     def __init__(self, n):
    ...         super().__init__()
    ...         self.num_experts, self.w = 4, nn.Parameter(torch.zeros(4, 2 * n, n))
    >>> block = nn.Module()
    >>> block.experts, block.gate = Experts(8), nn.Linear(8, 4, bias=False)
    >>> moe = find_moe(block, {"experts.w": (False, True, True), "gate.weight": (False, True)})
    >>> moe.containers, moe.gates
    ({'experts'}, {'gate'})
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

_COUNT_ATTRS: tuple[str, ...] = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclass(frozen=True)
class MoE:
    """Names of expert containers and of gates (modules) in a model."""

    containers: set[str] = field(default_factory=set)
    gates: set[str] = field(default_factory=set)


def expert_count(module: nn.Module) -> int | None:
    """The module's number of experts (``num_experts`` and the like), ``None`` if it does not say."""
    for attr in _COUNT_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _is_stacked(shape: tuple[int, ...], infinite: tuple[bool, ...], count: int | None) -> bool:
    if len(shape) < 3:
        return False
    if count is not None and shape[0] == count:
        return True
    return sum(infinite) == 2 and infinite[-1] and infinite[-2]


def find_moe(model: nn.Module, infinite: Mapping[str, tuple[bool, ...]]) -> MoE:
    """Expert containers and gates of ``model``, given which dimensions of each parameter scale with width."""
    modules = dict(model.named_modules())
    containers: dict[str, int] = {}
    for name, module in modules.items():
        count = expert_count(module)
        for pname, p in module.named_parameters(recurse=False):
            key = f"{name}.{pname}" if name else pname
            if key in infinite and _is_stacked(tuple(p.shape), infinite[key], count):
                containers[name] = count or p.shape[0]
                break
    blocks: dict[str, tuple[int, list[str]]] = {}
    for name, count in containers.items():
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        blocks.setdefault(parent, (count, []))[1].append(name)
    for name, module in modules.items():  # experts held as a list of modules
        experts = getattr(module, "experts", None)
        if isinstance(experts, nn.ModuleList) and name not in blocks:
            blocks[name] = (len(experts), [f"{name}.experts" if name else "experts"])
    gates: set[str] = set()
    for block, (count, inner) in blocks.items():
        for name, module in modules.items():
            inside = name.startswith(block + ".") if block else bool(name)
            if not inside or any(name == c or name.startswith(c + ".") for c in inner):
                continue
            weight = infinite.get(f"{name}.weight")
            w = getattr(module, "weight", None)
            if weight == (False, True) and isinstance(w, nn.Parameter) and w.shape[0] in (count, 1):
                gates.add(name)
    return MoE(set(containers), gates)
