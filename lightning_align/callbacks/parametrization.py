"""Parametrization: μP, depth-μP, CompleteP, NTK or SP applied before fit, with no model code changes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from typing_extensions import override

from lightning_align.arguments import Count, Name, NonEmpty, PositiveFloat, Regex, checked_init
from lightning_align.callbacks.strategy import check_strategy
from lightning_align.logging import log_text, markdown_table, writing_as
from lightning_align.measure.sharded import has_sharded_parameters, user_class_name
from lightning_align.parametrize.apply import Parametrized, retarget_scheduler
from lightning_align.parametrize.auto import auto_parametrize
from lightning_align.parametrize.roles import ROLE_TABLE_HEADER, Role, role_table_rows

SchemeName = Literal["sp", "ntk", "mup", "depth_mup", "completep"]
InitName = Literal["default", "normal", "orthogonal"]
FamilyName = Literal["auto", "adam", "sgd"]
UnscalableName = Literal["error", "warn"]
#: Hyper-parameter names or dotted paths into one (``config.n_embd``).
Keys = Annotated[list[Name], NonEmpty()]
_MARK = "_lightning_align_parametrization"


class Parametrization(Callback):
    """Apply a width/depth parametrization to the LightningModule before training starts.

    Roles are found by re-instantiating the module on the ``meta`` device from its saved
    hyper-parameters (``self.save_hyperparameters()``) at the base width (and at twice it, to see which
    dimensions scale), as microsoft/mup's ``set_base_shapes(model, base, delta)`` does. Then, once per
    model: the init is rescaled (μP: readout and biases width-constant; optional ``orthogonal``/``normal``
    re-draw at each role's μP scale; optional zero readout), forward multipliers are attached as hooks
    (readout input ``× output_mult/m``, input ``× input_mult``, residual branches ``× (L/L0)^-α``), the
    attention scale is multiplied by ``√(d0/d)`` (``attn_scale`` in ours, ``scaling`` in Hugging Face,
    ``scale`` in timm), and the module's ``configure_optimizers`` is wrapped so the optimizer it
    returns (also one LightningCLI builds from ``optimizer:``) has its param groups split with per-group
    ``lr``/``weight_decay``/``eps`` factors (tables in :mod:`lightning_align.parametrize.rules`) and its LR
    schedulers follow. At the base width and depth every scheme is SP, bit for bit.

    The role table (``param/roles``) and the final per-parameter LR table (``param/lr_table``) are printed
    once and logged as TensorBoard text. Metadata stays in this callback (never on tensors) and in its
    ``state_dict``; weights are rescaled once per model (a second ``fit`` does not rescale; on a
    ``ckpt_path`` resume the checkpoint weights replace them).

    Hugging Face and timm models need no code change: save their config as a hyper-parameter and name
    widths and depth by path (``width_keys=["config.n_embd"]``, ``depth_keys=["config.n_layer"]``); a
    readout tied to the embedding (GPT-2, Llama with ``tie_word_embeddings``, BERT's masked-LM decoder, T5) is
    handled as mup's ``MuSharedReadout``; the residual branches of their standard blocks are found without
    ``branch_pattern``. The head dimension is read from the attention module or its config under the common
    names (``head_dim``, ``attention_head_size``, T5's ``key_value_proj_dim``/``d_kv``, ``kv_channels``,
    ``hidden_size // num_attention_heads``, ...); a head dimension fixed across widths (the number of heads
    scales) needs no attention change. MoE experts stacked in 3-D parameters are hidden matrices per expert,
    their routers readouts (:mod:`lightning_align.parametrize.moe`). ``role_overrides`` are applied before the
    automatic roles, so an override resolves any refusal about a parameter's role.

    Args:
        scheme: ``sp | ntk | mup | depth_mup | completep``.
        base_width: width at which the model is SP (``None``: the current width, so widths only
            scale relative to the model as configured). With several ``width_keys``, the first key takes
            this value and the others scale by the same ratio.
        base_depth: depth at which depth schemes are SP (``None``: the current depth).
        width_keys: hyper-parameter names, or dotted paths into one (``config.n_embd``), that set the width
            (``None``: ``["width"]``). Sizes that must scale together are listed together
            (``["config.hidden_size", "config.intermediate_size"]``).
        depth_keys: hyper-parameter names or paths that set the depth (``None``: ``["depth"]``); the first is ``L``.
        branch_pattern: regex (full match) of residual branch module names; ``None`` uses the module's
            ``residual_branches`` property, else the branches of standard Hugging Face / timm blocks
            (``attn``/``self_attn`` and ``mlp``; timm layer scales ``ls1``/``ls2``). Depth schemes need one.
        init: ``default`` (the module's own init, μP-rescaled), ``normal`` or ``orthogonal``.
        readout_zero_init: zero-initialise the readout (μP's recommended option).
        input_mult: μP's input multiplier α_in (on the outputs of input-role layers).
        output_mult: μP's output multiplier α_out (the readout sees ``α_out · x / m``).
        decoupled_wd: do not width-scale weight decay (mup's ``decoupled_wd``).
        optimizer_family: ``auto`` (from the optimizer class), ``adam`` or ``sgd``.
        role_overrides: ``{parameter regex: role}``, roles ``input|hidden|output|vector|fixed``.
        unscalable_attention: ``error`` (default) or ``warn`` when an attention's head dimension changes
            with width but its scale cannot be set (e.g. ``nn.MultiheadAttention``).
        verbose: print the role and LR tables once.

    Example::

        trainer = Trainer(callbacks=[Parametrization("mup", base_width=64)])
        trainer.fit(MLP(width=1024))  # LR tuned at width 64 transfers

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_align.Parametrization
              init_args: {scheme: mup, base_width: 64}
    """

    @checked_init
    def __init__(
        self,
        scheme: SchemeName = "mup",
        base_width: Count | None = None,
        base_depth: Count | None = None,
        width_keys: Keys | None = None,
        depth_keys: Keys | None = None,
        branch_pattern: Regex | None = None,
        init: InitName = "default",
        readout_zero_init: bool = False,
        input_mult: PositiveFloat = 1.0,
        output_mult: PositiveFloat = 1.0,
        decoupled_wd: bool = False,
        optimizer_family: FamilyName = "auto",
        role_overrides: dict[Regex, Role] | None = None,
        unscalable_attention: UnscalableName = "error",
        verbose: bool = True,
    ) -> None:
        self.scheme = scheme
        self.base_width = base_width
        self.base_depth = base_depth
        self.width_keys = list(width_keys) if width_keys is not None else ["width"]
        self.depth_keys = list(depth_keys) if depth_keys is not None else ["depth"]
        self.branch_pattern = branch_pattern
        self.init = init
        self.readout_zero_init = readout_zero_init
        self.input_mult = float(input_mult)
        self.output_mult = float(output_mult)
        self.decoupled_wd = decoupled_wd
        self.optimizer_family = optimizer_family
        self.role_overrides = dict(role_overrides) if role_overrides else None
        self.unscalable_attention = unscalable_attention
        self.verbose = verbose
        self.parametrized: Parametrized | None = None
        self.applied = False
        self._loaded_state: dict[str, Any] | None = None
        self._original_configure: Any = None
        self._lr_logged = False
        self._token = f"{scheme}@{id(self):x}"
        self._trainer: pl.Trainer | None = None

    # ----------------------------------------------------------------------------------------------
    # Lightning hooks
    # ----------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, "Parametrization")  # before anything is rescaled or wrapped
        self._trainer = trainer
        if any(True for _ in pl_module.parameters()):
            self._apply(trainer, pl_module, rescale=stage == "fit" and trainer.ckpt_path is None)
        if stage == "fit":
            self._wrap_configure_optimizers(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._original_configure is not None:
            if self._original_configure is _CLASS_METHOD:
                pl_module.__dict__.pop("configure_optimizers", None)
            else:
                pl_module.configure_optimizers = self._original_configure
            self._original_configure = None

    @override
    def state_dict(self) -> dict[str, Any]:
        p = self.parametrized
        return {
            "scheme": self.scheme,
            "applied": self.applied,
            "depth_mult": p.depth_mult if p else None,
            "roles": {n: i.as_dict() for n, i in p.infos.items()} if p else {},
            "attention": dict(p.attention) if p else {},
            "tied": dict(p.tied) if p else {},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        scheme = state_dict.get("scheme")
        if scheme is not None and scheme != self.scheme:
            raise ValueError(
                f"Parametrization: the checkpoint was trained with scheme {scheme!r}, this callback applies "
                f"{self.scheme!r}; resume with the same scheme."
            )
        self._loaded_state = dict(state_dict)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(scheme=self.scheme)

    # ----------------------------------------------------------------------------------------------
    # Internals
    # ----------------------------------------------------------------------------------------------
    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rescale: bool) -> None:
        mark = pl_module.__dict__.get(_MARK)
        if mark is not None:
            if mark == self._token:
                return  # a second fit/validate with the same model: nothing to do again
            raise RuntimeError(
                f"Parametrization: {type(pl_module).__name__} was already parametrized by another Parametrization "
                "callback; use one callback per model."
            )
        p = auto_parametrize(
            pl_module,
            self.scheme,
            self.base_width,
            self.base_depth,
            self.width_keys,
            self.depth_keys,
            self.branch_pattern,
            init=self.init,
            readout_zero_init=self.readout_zero_init,
            input_mult=self.input_mult,
            output_mult=self.output_mult,
            decoupled_wd=self.decoupled_wd,
            role_overrides=self.role_overrides,
            rescale_init=rescale,
            unscalable_attention=self.unscalable_attention,
            warn=rank_zero_warn,
        )
        self.parametrized = p
        pl_module.__dict__[_MARK] = self._token  # a plain string: the module stays picklable/deep-copyable
        self.applied = True
        table = markdown_table(ROLE_TABLE_HEADER, role_table_rows(p.infos))
        header = (
            f"scheme={self.scheme}, widths={p.widths} (base {p.base_widths}), depth mult={p.depth_mult:g}, "
            f"branches={len(p.branches)}, attention rescaled={list(p.attention)}"
            + (f", tied readouts={p.tied}" if p.tied else "")
            + (f", MoE gates (readouts)={p.gates}" if p.gates else "")
        )
        if self.verbose:
            rank_zero_info(f"Parametrization: {header}\n{table}")
        with writing_as("Parametrization"):  # a failed write warns naming it
            log_text(trainer, "param/roles", f"{header}\n\n{table}")

    def _wrap_configure_optimizers(self, pl_module: pl.LightningModule) -> None:
        if self._original_configure is not None:
            return
        self._original_configure = pl_module.__dict__.get("configure_optimizers", _CLASS_METHOD)
        inner = pl_module.configure_optimizers

        def configure_optimizers() -> Any:
            out = inner()
            self._rewrite(self._trainer, pl_module, out)
            return out

        pl_module.configure_optimizers = configure_optimizers

    def _rewrite(self, trainer: pl.Trainer, pl_module: pl.LightningModule, out: Any) -> None:
        if pl_module.__dict__.get(_MARK) != self._token:  # parameters were created in configure_model
            if self.init != "default" and has_sharded_parameters(pl_module):
                raise ValueError(
                    f"Parametrization(init={self.init!r}): {user_class_name(pl_module)} creates its layers in "
                    "configure_model, where they were sharded (fully_shard) before this callback could re-draw them, "
                    "and a re-draw needs each whole matrix. Create the layers in __init__ (the callback then applies "
                    "before sharding), or use init='default' (a rescaling, which works on the shards)."
                )
            self._apply(trainer, pl_module, rescale=trainer.ckpt_path is None)
        assert self.parametrized is not None
        self._check_against_checkpoint()
        optimizers: list[torch.optim.Optimizer] = []
        schedulers: list[Any] = []
        _collect(out, optimizers, schedulers)
        if not optimizers:
            raise ValueError(
                f"Parametrization: {type(pl_module).__name__}.configure_optimizers returned no optimizer; "
                "μP needs per-parameter learning rates."
            )
        for opt in optimizers:
            mapping = self.parametrized.rewrite_optimizer_with_mapping(opt, self.optimizer_family)
            if mapping is None:
                continue
            for sched in schedulers:
                if getattr(sched, "optimizer", None) is opt:
                    retarget_scheduler(sched, mapping)
        table = markdown_table(
            ["parameter", "role", "lr", "weight_decay", "eps"], self.parametrized.lr_table_rows(optimizers)
        )
        if self.verbose and not self._lr_logged:
            rank_zero_info(f"Parametrization: final per-parameter settings\n{table}")
        self._lr_logged = True
        with writing_as("Parametrization"):
            log_text(trainer, "param/lr_table", table)


    def _check_against_checkpoint(self) -> None:
        """After a ``ckpt_path`` restore: the roles and base shapes must be those the checkpoint trained with."""
        saved = (self._loaded_state or {}).get("roles") or {}
        assert self.parametrized is not None
        for name, info in self.parametrized.infos.items():
            old = saved.get(name)
            if old is None:
                continue
            if old["role"] != info.role or tuple(old["base_shape"]) != info.base_shape:
                raise ValueError(
                    f"Parametrization: parameter {name!r} was trained as {old['role']} with base shape "
                    f"{tuple(old['base_shape'])}, now it is {info.role} with base shape {info.base_shape}; resume "
                    "with the same base_width / width_keys / role_overrides."
                )
        self._loaded_state = None


_CLASS_METHOD = object()  # marker: configure_optimizers came from the class, not the instance


def _collect(obj: Any, optimizers: list[Any], schedulers: list[Any]) -> None:
    """Optimizers and LR schedulers anywhere in what ``configure_optimizers`` returned."""
    if isinstance(obj, torch.optim.Optimizer):
        if all(o is not obj for o in optimizers):
            optimizers.append(obj)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _collect(v, optimizers, schedulers)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect(v, optimizers, schedulers)
    elif isinstance(getattr(obj, "optimizer", None), torch.optim.Optimizer):
        if all(s is not obj for s in schedulers):
            schedulers.append(obj)
