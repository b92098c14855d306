"""Applying a parametrization to a plain ``nn.Module``: init rewrite, forward multipliers, optimizer groups.

Pure PyTorch (no Lightning): :class:`~lightning_align.callbacks.parametrization.Parametrization` is a
thin layer over :func:`parametrize`, and offline users (e.g. :func:`~lightning_align.parametrize.coord_check`)
call it directly.

- **Init** (``mup`` family, as ``mup.set_base_shapes(rescale_params=True)`` leaves it): biases of
  ``Linear``/``Conv`` layers are multiplied by ``√m_in`` (width-constant), the readout weight and bias by
  ``√m`` (width-constant), optionally zero-initialised. ``init="normal"``/``"orthogonal"`` then re-draw
  every weight matrix (Gaussian, or orthogonal directions) at the RMS it has after that rescale, i.e. at
  its role's μP scale.
- **Forward multipliers** are forward hooks holding plain floats (they trace under ``torch.compile`` and
  cost one scalar multiply): the readout input ``× output_mult / m`` (a pre-hook, as ``MuReadout``), the
  input layers' outputs ``× input_mult``, residual branches' outputs ``× m_L^-α``.
- **Tied readouts** (a ``Linear`` whose weight is an embedding's, e.g. GPT-2's ``lm_head``) are handled as
  mup's ``MuSharedReadout``: the shared weight keeps the embedding's init and LR rules, the readout's input
  gets the ``output_mult / m`` multiplier. Unlike ``set_base_shapes`` with ``MuSharedReadout``, the shared
  weight is not rescaled by ``√m`` (it is the embedding's, whose μP init is width-constant).
- **Attention** gets ``1/d`` logits (the base module's scale ``× d0/d``, equal to SP at the base) through
  the attribute its forward reads (:mod:`~lightning_align.parametrize.attention`). An attention whose
  head dimension changes with width and whose scale cannot be set (``nn.MultiheadAttention``, an unknown
  ``...Attention`` class) is an error, or a warning with ``unscalable_attention="warn"``; a fixed head
  dimension (heads scale) needs no change.
- **Optimizer**: an optimizer's param groups are split by per-parameter factor in place (lr,
  ``initial_lr``, ``max_lr``, ``min_lr``, weight decay, ``eps``), and LR schedulers built on it follow
  (:func:`retarget_scheduler`); the splitting and the following are
  :func:`~lightning_align.measure.optim.split_param_groups` and :func:`~lightning_align.measure.optim.follow_split`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> def build(width):
    ...     return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, width), nn.Linear(width, 2))
    >>> with torch.device("meta"):
    ...     base, delta = build(8), build(16)
    >>> model = build(32)
    >>> p = parametrize(model, base, delta, scheme="mup")
    >>> opt = p.rewrite_optimizer(torch.optim.Adam(model.parameters(), lr=1e-2))
    >>> sorted({g["lr"] for g in opt.param_groups})
    [0.0025, 0.01]
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_align.measure.modules import is_hf_conv1d
from lightning_align.measure.optim import split_param_groups
from lightning_align.parametrize.attention import plan_attention, unscalable_message
from lightning_align.parametrize.groups import as_float, fmt_eps, optimizer_family, scale_group
from lightning_align.parametrize.groups import retarget_scheduler as retarget_scheduler  # re-exported
from lightning_align.parametrize.hooks import INPUT_LAYERS, ScaleOutput, ScaleReadoutInput, require_layer
from lightning_align.parametrize.moe import find_moe
from lightning_align.parametrize.roles import ParamInfo, adapter_readouts, branch_parameters, infer_roles, tied_readouts
from lightning_align.parametrize.rules import (
    MUP_FAMILY,
    SCHEMES,
    ParamRule,
    branch_multiplier,
    optimizer_rule,
    readout_multiplier_divisor,
)

INITS: tuple[str, ...] = ("default", "normal", "orthogonal")
UNSCALABLE_ATTENTION: tuple[str, ...] = ("error", "warn")


@dataclass
class Parametrized:
    """A model with a parametrization applied: the role table and what was done to the model.

    Attributes:
        infos: role table ``{parameter name: ParamInfo}``.
        scheme: the scheme applied.
        depth_mult: ``L / L0``.
        branches: residual branch module names (their outputs are scaled).
        attention: ``{module name: factor applied to its attention scale}``.
        handles: forward-hook handles of the multipliers.
        widths / base_widths: width hyper-parameters (filled by ``auto_parametrize``).
        tied: ``{readout module: shared embedding parameter}`` (``MuSharedReadout``-style readouts).
        branch_members: ``{branch: other modules whose parameters are in it}``.
        gates: MoE gates (routers), readouts of the hidden state (:mod:`~lightning_align.parametrize.moe`).

    Example::

        p = parametrize(model, base, delta, scheme="mup")
        optimizer = p.rewrite_optimizer(torch.optim.Adam(model.parameters(), lr=1e-3))
    """

    model: nn.Module
    infos: dict[str, ParamInfo]
    scheme: str
    depth_mult: float = 1.0
    branches: list[str] = field(default_factory=list)
    input_mult: float = 1.0
    output_mult: float = 1.0
    decoupled_wd: bool = False
    attention: dict[str, float] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)
    widths: dict[str, int] = field(default_factory=dict)
    base_widths: dict[str, int] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    branch_members: dict[str, list[str]] = field(default_factory=dict)
    gates: list[str] = field(default_factory=list)
    _rewritten: Any = field(default_factory=weakref.WeakSet)

    # -- rules ------------------------------------------------------------------------------------
    def rule(self, name: str, family: str) -> ParamRule:
        """Optimizer factors of parameter ``name`` for an optimizer family."""
        return optimizer_rule(self.infos[name], self.scheme, family, self.depth_mult, self.decoupled_wd)

    @property
    def readout_modules(self) -> dict[str, ParamInfo]:
        """``{module name: info of its weight}`` for output-role weights."""
        return {i.module: i for i in self.infos.values() if i.role == "output" and i.name.endswith("weight")}

    @property
    def tied_readout_modules(self) -> dict[str, ParamInfo]:
        """``{module name: info of the shared weight}`` for readouts tied to an embedding."""
        return {m: self.infos[n] for m, n in self.tied.items()}

    @property
    def input_modules(self) -> list[str]:
        """Modules owning an input-role weight."""
        return list(dict.fromkeys(i.module for i in self.infos.values() if i.role == "input"))

    # -- model changes --------------------------------------------------------------------------
    @torch.no_grad()
    def apply_init(self, init: str = "default", readout_zero_init: bool = False) -> None:
        """Rescale the init in place (μP family) and optionally re-draw weights; call once per model."""
        if init not in INITS:
            raise ValueError(f"Parametrization: init must be one of {list(INITS)}, got {init!r}")
        modules = dict(self.model.named_modules())
        readouts = self.readout_modules
        if self.scheme in MUP_FAMILY:
            for name, module in modules.items():
                if name in readouts:
                    mult = readouts[name].width_mult
                    for p in (getattr(module, "weight", None), getattr(module, "bias", None)):
                        if p is not None:
                            p.mul_(mult**0.5)
                elif name in self.tied:  # MuSharedReadout: its own bias is width-constant, the shared weight untouched
                    if isinstance(getattr(module, "bias", None), nn.Parameter):
                        module.bias.mul_(self.infos[self.tied[name]].width_mult ** 0.5)
                elif isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and module.bias is not None:
                    info = self.infos.get(f"{name}.weight")
                    if info is not None:
                        module.bias.mul_(info.fanin_mult**0.5)
        if init != "default":
            params = dict(self.model.named_parameters())
            for name, info in self.infos.items():
                p = params[name]
                if p.ndim < 2:
                    continue
                rms = p.float().pow(2).mean().sqrt().item()
                if rms == 0:
                    continue
                if init == "normal":
                    p.normal_(0.0, rms)
                else:  # stacked matrices (MoE experts): each expert its own orthogonal matrix
                    for matrix in p.flatten(0, info.fan_out_dim - 1) if info.fan_out_dim > 0 and p.ndim > 2 else [p]:
                        nn.init.orthogonal_(matrix)
                    p.mul_(rms / p.float().pow(2).mean().sqrt().item())
        if readout_zero_init:
            for name in readouts:
                for p in (getattr(modules[name], "weight", None), getattr(modules[name], "bias", None)):
                    if p is not None:
                        p.zero_()
            for name in self.tied:  # as MuSharedReadout: the shared weight is the embedding's, only the bias is zeroed
                if isinstance(getattr(modules[name], "bias", None), nn.Parameter):
                    modules[name].bias.zero_()

    def apply_attention(
        self, base: nn.Module, unscalable: str = "error", warn: Callable[[str], Any] | None = None
    ) -> None:
        """``1/d`` attention logits (μP family) through the scale attribute the forward reads.

        The scale becomes the base module's scale times ``d0/d`` (:mod:`~lightning_align.parametrize.attention`):
        ``attn_scale`` (ours), ``scaling`` (Hugging Face), ``scale`` (timm, with ``fused_attn = False``
        since timm's fused path ignores ``scale``). An attention whose head dimension changes with width (or
        cannot be read while its shapes change) and whose scale cannot be set raises (``unscalable="error"``,
        before any module is changed) or warns (``"warn"``) that it keeps its own scale.
        """
        if unscalable not in UNSCALABLE_ATTENTION:
            raise ValueError(f"Parametrization: unscalable_attention must be one of {list(UNSCALABLE_ATTENTION)}, got {unscalable!r}")
        if self.scheme not in MUP_FAMILY:
            return
        changes, problems = plan_attention(self.model, base)
        if problems:
            msg = unscalable_message(self.scheme, problems, refuse=unscalable == "error")
            if unscalable == "error":
                raise ValueError(msg)  # before any module is changed
            (warn or _warn)(msg)
        for change in changes:
            old = float(getattr(change.module, change.attr))
            setattr(change.module, change.attr, change.value)
            if change.attr == "scale":  # timm: F.scaled_dot_product_attention is called without scale=
                change.module.fused_attn = False
            self.attention[change.name] = change.value / old if old else change.value

    def register_hooks(self) -> None:
        """Register the forward multipliers (readout, input, branches); multipliers equal to 1 are skipped.

        Every layer is checked before the first hook is registered, so a refusal leaves the model as it was.
        """
        modules = dict(self.model.named_modules())
        plan: list[tuple[nn.Module, Any, bool]] = []  # (module, hook, is a pre-hook)
        for name, info in {**self.readout_modules, **self.tied_readout_modules}.items():
            div = readout_multiplier_divisor(self.scheme, info)
            if self.output_mult != 1 or div != 1:
                if not is_hf_conv1d(modules[name]) and name not in self.gates:  # a gate's forward is F.linear(x, weight)
                    require_layer(modules[name], info.name, "readout multiplier", (nn.Linear, nn.modules.conv._ConvNd))
                plan.append((modules[name], ScaleReadoutInput(self.output_mult, div), True))
        if self.input_mult != 1:
            for name in self.input_modules:
                require_layer(modules[name], name, "input_mult", INPUT_LAYERS)
                plan.append((modules[name], ScaleOutput(self.input_mult), False))
        mult = branch_multiplier(self.scheme, self.depth_mult)
        if mult != 1:
            plan.extend((modules[name], ScaleOutput(mult), False) for name in self.branches)
        for module, hook, pre in plan:
            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            self.handles.append(register(hook))

    def remove_hooks(self) -> None:
        """Remove the forward multipliers (the model is then SP-shaped again)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # -- optimizer --------------------------------------------------------------------------------
    def rewrite_optimizer(self, optimizer: torch.optim.Optimizer, family: str = "auto") -> torch.optim.Optimizer:
        """Split ``optimizer``'s param groups by per-parameter factor, in place (once per optimizer).

        Returns:
            The same optimizer. Its ``param_groups`` now hold scaled ``lr`` (and ``initial_lr``,
            ``max_lr``, ``min_lr``), ``weight_decay`` and ``eps``. Use :func:`retarget_scheduler` for
            schedulers created before this call.
        """
        self.rewrite_optimizer_with_mapping(optimizer, family)
        return optimizer

    def rewrite_optimizer_with_mapping(
        self, optimizer: torch.optim.Optimizer, family: str = "auto"
    ) -> list[tuple[int, ParamRule]] | None:
        """As :meth:`rewrite_optimizer`; returns ``[(old group index, rule)]`` per new group (``None`` if done before)."""
        if optimizer in self._rewritten:
            return None
        fam = optimizer_family(optimizer, family)
        names = {id(p): n for n, p in self.model.named_parameters()}

        def rule_of(p: torch.Tensor) -> ParamRule:
            if id(p) not in names:
                raise ValueError(
                    f"Parametrization: the optimizer holds a tensor of shape {tuple(p.shape)} that is not a "
                    f"parameter of {type(self.model).__name__}; cannot tell its μP role."
                )
            return self.rule(names[id(p)], fam)

        mapping = [(gi, rule or ParamRule()) for gi, rule in split_param_groups(optimizer, rule_of)]
        for group, (_, rule) in zip(optimizer.param_groups, mapping):
            scale_group(group, rule)
        self._rewritten.add(optimizer)
        return mapping

    def lr_table_rows(self, optimizers: Sequence[torch.optim.Optimizer]) -> list[list[Any]]:
        """Rows ``[parameter, role, lr, weight_decay, eps]`` of the final per-parameter settings."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        rows = []
        for opt in optimizers:
            for g in opt.param_groups:
                for p in g["params"]:
                    n = names.get(id(p), "?")
                    role = self.infos[n].role if n in self.infos else "?"
                    rows.append([n, role, f"{as_float(g.get('lr', float('nan'))):.6g}",
                                 f"{as_float(g.get('weight_decay', 0.0)):.6g}", fmt_eps(g.get("eps"))])  # fmt: skip
        return rows


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def _warn_unexpected_readouts(p: Parametrized, warn: Callable[[str], Any]) -> None:
    """Several readouts besides MoE gates and adapters' down-projections usually mean a missing width key."""
    expected = set(p.gates) | adapter_readouts(p.model, p.infos)  # readouts by design
    readouts = [r for r in [*p.readout_modules, *p.tied] if r not in expected]
    if len(readouts) > 1:
        warn(
            f"Parametrization: {len(readouts)} layers are treated as readouts (fan-in scales with width, fan-out "
            f"does not): {readouts}. If some are not output layers, a size that must scale with the width is "
            "missing from `width_keys` (e.g. the MLP size, the number of heads or the head size with the hidden "
            "size), or give them a role with `role_overrides`."
        )


def parametrize(
    model: nn.Module,
    base: nn.Module,
    delta: nn.Module,
    scheme: str = "mup",
    *,
    depth_mult: float = 1.0,
    branches: Sequence[str] = (),
    init: str = "default",
    readout_zero_init: bool = False,
    input_mult: float = 1.0,
    output_mult: float = 1.0,
    decoupled_wd: bool = False,
    role_overrides: Mapping[str, str] | None = None,
    rescale_init: bool = True,
    branch_members: Mapping[str, Sequence[str]] | None = None,
    unscalable_attention: str = "error",
    warn: Callable[[str], Any] | None = None,
) -> Parametrized:
    """Apply ``scheme`` to ``model`` given base/delta models (same architecture, other widths).

    Args:
        model: the model to change in place.
        base: the architecture at the base width (``meta`` device is fine).
        delta: the architecture at another width (tells which dimensions scale).
        scheme: ``sp | ntk | mup | depth_mup | completep``.
        depth_mult: ``L / L0`` for depth schemes.
        branches: residual branch module names (outputs scaled by ``m_L^-α``).
        init: ``default`` (keep, μP-rescaled), ``normal`` or ``orthogonal`` (re-drawn at the μP scale).
        readout_zero_init: zero the readout weight and bias.
        input_mult / output_mult: μP's tunable input and output multipliers.
        decoupled_wd: do not width-scale weight decay.
        role_overrides: ``{regex: role}``.
        rescale_init: change the weights (set ``False`` when they come from a μP checkpoint).
        branch_members: ``{branch: other modules whose parameters are in that branch}``.
        unscalable_attention: ``error`` or ``warn`` for an attention whose scale cannot be set while its
            head dimension changes with width.
        warn: how warnings are emitted (default :func:`warnings.warn`; Lightning passes ``rank_zero_warn``).

    Returns:
        The :class:`Parametrized` record; use ``rewrite_optimizer`` on the optimizer afterwards.

    Example::

        base, delta = MLP(width=64).to("meta"), MLP(width=128).to("meta")
        p = parametrize(MLP(width=1024), base, delta, scheme="mup")
    """
    if scheme not in SCHEMES:
        raise ValueError(f"Parametrization: unknown scheme {scheme!r}; choose one of {list(SCHEMES)}")
    if unscalable_attention not in UNSCALABLE_ATTENTION:
        raise ValueError(
            f"Parametrization: unscalable_attention must be one of {list(UNSCALABLE_ATTENTION)}, got {unscalable_attention!r}"
        )
    members = {b: list(m) for b, m in (branch_members or {}).items()}
    infos = branch_parameters(infer_roles(model, base, delta, role_overrides), list(branches), members)
    modules = dict(model.named_modules())
    missing = [b for b in [*branches, *(m for ms in members.values() for m in ms)] if b not in modules]
    if missing:
        raise ValueError(f"Parametrization: residual branches {missing} are not modules of {type(model).__name__}")
    if scheme != "sp" and not any(i.ninf for i in infos.values()):
        raise ValueError(
            f"Parametrization: no parameter of {type(model).__name__} changes shape between the base and the "
            f"second width, so the width does not reach the network and {scheme!r} would change nothing. The width "
            "argument must build the layers (a network with no width argument, such as torchvision's resnet18(), "
            "cannot be rebuilt at another width: wrap one that takes a width, e.g. a LightningModule whose __init__ "
            "takes `width`, builds the network from it and calls self.save_hyperparameters())."
        )
    p = Parametrized(
        model, infos, scheme, float(depth_mult), list(branches), float(input_mult), float(output_mult), decoupled_wd
    )
    p.tied = tied_readouts(model, infos)
    p.branch_members = members
    p.gates = sorted(find_moe(model, {n: i.infinite for n, i in infos.items()}).gates)
    if scheme != "sp":
        _warn_unexpected_readouts(p, warn or _warn)
    p.apply_attention(base, unscalable_attention, warn)  # before any weight changes: it may refuse the model
    p.register_hooks()  # likewise
    if rescale_init:
        p.apply_init(init, readout_zero_init)
    return p
