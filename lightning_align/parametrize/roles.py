"""Parameter roles (input / hidden / output / vector / fixed) found by comparing shapes across widths.

microsoft/mup attaches an ``infshape`` to every parameter by zipping the shapes of a *base* model with
those of a *delta* model: a dimension is "infinite" (scales with width) when it differs between the two.
We do the same without touching the tensors: the model is re-instantiated on the ``meta`` device (no
memory, no RNG) at the base width and at a second width, and the comparison is kept in a side table of
:class:`ParamInfo` keyed by parameter name. Nothing is stored on the parameters, so the table survives
``torch.compile``, DDP/FSDP, ``deepcopy`` and checkpoints.

Roles follow TP5 Table 8 (mup's MuReadout form):

- ``hidden``: two infinite dimensions (fan-in and fan-out scale), e.g. ``Linear(n, n)``, a convolution
  ``(n, n, k, k)``, or stacked matrices ``(E, n, n)`` (MoE experts, :mod:`~lightning_align.parametrize.moe`:
  each slice is a hidden matrix, fan-in last as ``F.linear`` and mup's ``InfShape.main`` read it).
- ``input``: one infinite dimension that is the fan-out (``Linear(d, n)``), or any embedding-like
  weight (``nn.Embedding(V, n)``, raw ``nn.Parameter`` tables).
- ``output``: a ``Linear``/``Conv`` weight whose only infinite dimension is the fan-in (the readout), and
  MoE gates (router ``(E, n)``, a shared expert's ``(1, n)`` gate), which are readouts of the hidden state.
- ``vector``: a 1-D tensor with an infinite dimension (hidden biases, norm gains), a depthwise
  convolution's ``(n, 1, k, k)``, per-expert biases ``(E, n)``.
- ``fixed``: no infinite dimension (e.g. the readout bias, parameters of width-independent parts).

``role_overrides`` are applied before the automatic roles: an overridden parameter gets its role with no
automatic check, so an override resolves every refusal the automatic roles name.

Example:
    >>> import torch
    >>> from torch import nn
    >>> def build(width):
    ...     return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, width), nn.Linear(width, 2))
    >>> with torch.device("meta"):
    ...     base, delta = build(8), build(16)
    >>> infos = infer_roles(build(32), base, delta)
    >>> [infos[n].role for n in ("0.weight", "2.weight", "3.weight", "3.bias")]
    ['input', 'hidden', 'output', 'fixed']
    >>> infos["2.weight"].width_mult
    4.0
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from torch import nn

from lightning_align.measure.modules import is_hf_conv1d
from lightning_align.parametrize.moe import MoE, find_moe

Role = Literal["input", "hidden", "output", "vector", "fixed"]
ROLES: tuple[str, ...] = ("input", "hidden", "output", "vector", "fixed")
_FAN_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)


@dataclass(frozen=True)
class ParamInfo:
    """What the parametrization knows about one parameter (a row of the role table).

    Attributes:
        name: qualified parameter name (``named_parameters()``).
        module: qualified name of the module that owns it.
        shape: its shape in the model being trained.
        base_shape: its shape at the base width.
        infinite: for each dimension, whether it scales with width (mup's ``InfDim.isinf``).
        role: one of :data:`ROLES`.
        in_branch: it lives inside a residual branch (depth scaling applies).
        fan_out_dim / fan_in_dim: which dimensions are the fan-out and fan-in of a matrix (``(0, 1)`` for
            ``Linear``/``Conv``, ``(1, 0)`` for Hugging Face ``Conv1D``, the last two for stacked experts).

    Example::

        infos = infer_roles(model, base, delta)
        infos["fc1.weight"].role  # "input"
    """

    name: str
    module: str
    shape: tuple[int, ...]
    base_shape: tuple[int, ...]
    infinite: tuple[bool, ...]
    role: str
    in_branch: bool = False
    fan_out_dim: int = 0
    fan_in_dim: int = 1

    def dim_mult(self, i: int) -> float:
        """``dim / base_dim`` for an infinite dimension, 1 for a finite one (mup ``InfDim.width_mult``)."""
        return self.shape[i] / self.base_shape[i] if self.infinite[i] else 1

    @property
    def ninf(self) -> int:
        """Number of infinite dimensions."""
        return sum(self.infinite)

    @property
    def width_mult(self) -> float:
        """Multiplier of the *last* infinite dimension (the fan-in of a hidden weight), as mup's ``InfShape``."""
        for i in reversed(range(len(self.shape))):
            if self.infinite[i]:
                return self.dim_mult(i)
        return 1

    @property
    def fanin_mult(self) -> float:
        """Width multiplier of the fan-in dimension, 1 for tensors with fewer than 2 dimensions."""
        return self.dim_mult(self.fan_in_dim) if len(self.shape) >= 2 else 1

    @property
    def fanin_fanout_ratio(self) -> float:
        """``fanin_mult / fanout_mult`` (mup ``InfShape.fanin_fanout_mult_ratio``, which reads dimensions 1 and 0
        whatever the layout; equal for ``Linear``/``Conv`` and whenever fan-in and fan-out scale alike)."""
        return self.dim_mult(self.fan_in_dim) / self.dim_mult(self.fan_out_dim)

    def as_dict(self) -> dict[str, Any]:
        """Plain-type dict (for ``state_dict`` and tables)."""
        return asdict(self)


def infer_roles(
    model: nn.Module,
    base: nn.Module,
    delta: nn.Module,
    overrides: Mapping[str, str] | None = None,
    *,
    owner: str = "Parametrization",
) -> dict[str, ParamInfo]:
    """Role of every parameter of ``model`` from the shapes of a base and a delta model.

    Args:
        model: the model to parametrize (any width).
        base: the same architecture at the base width (typically on the ``meta`` device).
        delta: the same architecture at another width, to tell which dimensions scale with width.
        overrides: ``{regex: role}``; a parameter whose name fully matches a regex gets that role.
        owner: who is asking (named in error messages).

    Returns:
        ``{parameter name: ParamInfo}`` in ``named_parameters()`` order.

    Raises:
        ValueError: parameter names differ between the models, a shape has a different number of
            dimensions, a tensor's width-scaling dimensions are not a matrix's fan-out and fan-in (or an
            expert tensor has only one), with no override for it; an override names an unknown role,
            matches no parameter, or gives a matrix role to a vector.

    Example::

        base, delta = MLP(width=64).to("meta"), MLP(width=128).to("meta")
        infos = infer_roles(MLP(width=1024), base, delta)
        {n: i.role for n, i in infos.items()}
    """
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    base_shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    delta_shapes = {n: tuple(p.shape) for n, p in delta.named_parameters()}
    for other, what in ((base_shapes, "base"), (delta_shapes, "delta")):
        if other.keys() != shapes.keys():
            extra, missing = sorted(other.keys() - shapes.keys()), sorted(shapes.keys() - other.keys())
            raise ValueError(
                f"{owner}: the {what}-width model has different parameters than the model being trained "
                f"(only in {what}: {extra[:5]}, missing there: {missing[:5]}). Width keys must only change "
                "sizes, not the set of layers; check `width_keys`."
            )
    infinite: dict[str, tuple[bool, ...]] = {}
    for name, shape in shapes.items():
        b, d = base_shapes[name], delta_shapes[name]
        if not (len(b) == len(d) == len(shape)):
            raise ValueError(f"{owner}: parameter {name!r} changes its number of dimensions with width")
        infinite[name] = tuple(bi != di for bi, di in zip(b, d))
    modules = dict(model.named_modules())
    owners = parameter_owners(model)
    moe = find_moe(model, infinite)
    compiled = _compile_overrides(overrides, shapes, owner)
    infos: dict[str, ParamInfo] = {}
    for name, shape in shapes.items():
        owner_name = name.rsplit(".", 1)[0] if "." in name else ""
        module = modules.get(owner_name)
        forced = [role for regex, role in compiled if regex.fullmatch(name)]
        if forced:  # before any automatic rule: an override never meets an automatic refusal
            role, fans = forced[-1], _fan_dims(infinite[name], module, owner_name in moe.containers)
            if role in ("hidden", "output") and len(shape) < 2:
                raise ValueError(
                    f"{owner}(role_overrides=...): {name!r} has {len(shape)} dimension(s); role {role!r} needs a matrix"
                )
        else:
            role, fans = _auto_role(name, infinite[name], module, owner_name, moe, owner)
            if role == "output":  # a readout weight shared with an embedding is the embedding's (MuSharedReadout)
                for other in owners.get(name, [])[1:]:
                    if _auto_role(name, infinite[name], modules.get(other), other, moe, owner)[0] == "input":
                        role, owner_name = "input", other
                        break
        infos[name] = ParamInfo(name, owner_name, shape, base_shapes[name], infinite[name], role, False, *fans)
    return infos


def _compile_overrides(
    overrides: Mapping[str, str] | None, names: Mapping[str, Any], owner: str
) -> list[tuple[re.Pattern[str], str]]:
    compiled = []
    for pattern, role in (overrides or {}).items():
        if role not in ROLES:
            raise ValueError(f"{owner}(role_overrides=...): role {role!r} for {pattern!r} is not one of {list(ROLES)}")
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{owner}(role_overrides=...): {pattern!r} is not a valid regular expression: {err}") from err
        if not any(regex.fullmatch(n) for n in names):
            raise ValueError(
                f"{owner}(role_overrides=...): pattern {pattern!r} matches no parameter; "
                f"parameter names look like {list(names)[:6]}"
            )
        compiled.append((regex, role))
    return compiled


def override_pattern(name: str) -> str:
    r"""A ``role_overrides`` regex for ``name`` and its siblings in other numbered layers.

    Example:
        >>> print(override_pattern("model.layers.0.mlp.experts.gate_up_proj"))
        model\.layers\.\d+\.mlp\.experts\.gate_up_proj
    """
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))


def _fan_dims(infinite: tuple[bool, ...], module: nn.Module | None, stacked: bool) -> tuple[int, int]:
    """``(fan_out_dim, fan_in_dim)``: HF ``Conv1D`` is ``(in, out)``; stacked experts end in ``(out, in)``."""
    if len(infinite) == 2 and is_hf_conv1d(module):
        return 1, 0
    if len(infinite) >= 3 and (stacked or (sum(infinite) == 2 and infinite[-1] and infinite[-2] and not infinite[0])):
        return len(infinite) - 2, len(infinite) - 1
    return 0, 1


def _auto_role(
    name: str, infinite: tuple[bool, ...], module: nn.Module | None, module_name: str, moe: MoE, owner: str
) -> tuple[str, tuple[int, int]]:
    ninf, nd = sum(infinite), len(infinite)
    stacked = module_name in moe.containers and nd >= 3
    fans = _fan_dims(infinite, module, stacked)
    if ninf == 0:
        return "fixed", fans
    if nd < 2:
        return "vector", fans
    if ninf == 2 and infinite[fans[0]] and infinite[fans[1]]:
        return "hidden", fans
    if ninf >= 2:
        raise ValueError(
            f"{owner}: parameter {name!r} has width-scaling dimensions {infinite}: neither "
            "(fan_out, fan_in) first (a Linear or Conv weight) nor the last two after fixed leading dimensions "
            "(stacked matrices such as MoE experts), so its fan-in and fan-out cannot be told. Give it a role with "
            f"`role_overrides`, e.g. {{{override_pattern(name)!r}: 'hidden'}}."
        )
    if stacked:
        raise ValueError(
            f"{owner}: expert tensor {name!r} holds matrices of which only one side scales with width (dimensions "
            f"scaling: {infinite}), so each expert is readout- or input-like: the expert size is probably missing "
            "from `width_keys` (e.g. 'config.moe_intermediate_size' next to 'config.hidden_size'). Else give it a "
            f"role with `role_overrides`, e.g. {{{override_pattern(name)!r}: 'hidden'}}."
        )
    if module_name in moe.containers:
        return "vector", fans  # per-expert biases (E, n)
    if module_name in moe.gates:
        return "output", fans  # a router reads the hidden state out into a fixed number of logits
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and infinite[0]:
        return "vector", fans  # depthwise: a filter per channel, fan-in fixed by the groups
    if isinstance(module, _FAN_LAYERS):
        return ("input" if infinite[0] else "output"), fans
    if is_hf_conv1d(module):  # HF Conv1D stores (fan_in, fan_out)
        return ("input" if infinite[1] else "output"), fans
    return "input", fans  # embedding tables and raw parameters: a lookup, fan-in fixed


def parameter_owners(model: nn.Module) -> dict[str, list[str]]:
    """``{parameter name: names of every module holding it}``, the owner in ``named_parameters()`` first.

    A parameter held by several modules is tied (e.g. GPT-2's ``lm_head.weight is transformer.wte.weight``);
    ``named_parameters()`` lists it once, under its first owner.

    Example:
        >>> emb = nn.Embedding(10, 4)
        >>> model = nn.ModuleDict({"emb": emb, "head": nn.Linear(4, 10, bias=False)})
        >>> model["head"].weight = emb.weight
        >>> parameter_owners(model)["emb.weight"]
        ['emb', 'head']
    """
    first: dict[int, str] = {}
    out: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        module = name.rsplit(".", 1)[0] if "." in name else ""
        key = first.setdefault(id(p), name)
        out.setdefault(key, [])
        if module not in out[key]:
            out[key].append(module)
    return out


def tied_readouts(model: nn.Module, infos: Mapping[str, ParamInfo]) -> dict[str, str]:
    """``{readout module: shared parameter name}`` for linear readouts whose weight is an embedding's.

    A ``Linear`` whose ``weight`` is a parameter with an input (embedding) role, listed under another
    module, and whose fan-in (dimension 1) scales with width while its fan-out does not: microsoft/mup's
    ``MuSharedReadout``. The shared weight keeps the embedding's init and learning rate; the readout
    multiplier goes on this module's input.
    """
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    out: dict[str, str] = {}
    for name, holders in parameter_owners(model).items():
        info = infos.get(name)
        if info is None or info.role != "input" or info.infinite != (False, True):
            continue
        for holder in holders:
            module = modules.get(holder)
            if holder != info.module and isinstance(module, nn.Linear) and module.weight is params[name]:
                out[holder] = name
    return out


def adapter_readouts(model: nn.Module, infos: Mapping[str, ParamInfo]) -> set[str]:
    """Readout-role layers inside an adapter: a module (or its parent) of a tuner layer that holds a ``base_layer``.

    PEFT's LoRA-style layers add ``lora_B(lora_A(x))`` to ``base_layer(x)``; ``lora_A`` (``r × n``, ``r`` fixed)
    reads the hidden state out into ``r`` numbers, a readout in μP (mup's ``MuReadout``: ``1/m`` on its
    input), so its effective Adam learning rate is ``η/m`` while ``lora_B`` (an input-like ``n × r``) keeps
    ``η``: the ratio ``m`` that LoRA+ derives. These readouts are by design, unlike one a missing width key makes.
    """
    modules = dict(model.named_modules())
    out: set[str] = set()
    for info in infos.values():
        if info.role != "output":
            continue
        parts = info.module.split(".")
        for depth in (1, 2, 3):
            holder = modules.get(".".join(parts[:-depth])) if len(parts) > depth else None
            if isinstance(getattr(holder, "base_layer", None), nn.Module):
                out.add(info.module)
                break
    return out


def branch_parameters(
    infos: Mapping[str, ParamInfo], branches: list[str], members: Mapping[str, list[str]] | None = None
) -> dict[str, ParamInfo]:
    """Copy of ``infos`` with ``in_branch`` set for parameters inside any of the ``branches`` modules.

    ``members`` adds, per branch, other modules whose parameters belong to it (e.g. the attention a timm
    layer scale multiplies, when the layer scale is the hooked branch output).
    """
    scopes = list(branches) + [m for b in branches for m in (members or {}).get(b, [])]
    out = {}
    for name, info in infos.items():
        inside = any(info.module == b or info.module.startswith(b + ".") for b in scopes)
        out[name] = ParamInfo(**{**info.as_dict(), "in_branch": inside})
    return out


def role_table_rows(infos: Mapping[str, ParamInfo]) -> list[list[Any]]:
    """Rows ``[name, shape, base shape, role, width mult, in branch]`` for :func:`markdown_table`."""
    return [
        [i.name, list(i.shape), list(i.base_shape), i.role, f"{i.width_mult:g}", "yes" if i.in_branch else ""]
        for i in infos.values()
    ]


ROLE_TABLE_HEADER = ["parameter", "shape", "base shape", "role", "width mult", "in branch"]
