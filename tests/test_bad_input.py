"""Bad input catalogue: each case is a clear error that names the culprit, raised before the first optimizer step.

Every argument of every public callback has at least one bad value in :data:`ARGUMENT_CASES` (checked by
``test_every_argument_of_every_callback_has_a_bad_value``): each is refused at construction with
``Callback(argument=value): argument must be <accepted>; got value``.
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Annotated, Any, Callable, get_args

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyClassifier, fit, tiny_loader
from torch import nn
from torch.utils.data import DataLoader

from example_modules import MLP, TorchvisionDataModule
from lightning_align import (
    AlignSummary,
    CoordCheck,
    EffectiveLR,
    ELRWarmup,
    FeatureAlignment,
    FeatureSpeedControl,
    NTKSpectrum,
    Parametrization,
    RankMonitor,
    Sharpness,
)
from lightning_align.arguments import Bound, CallbackArgumentError, accepts, type_hints
from lightning_align.callbacks.base import MeasurementCallback


class Frozen(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.requires_grad_(False)
        self.extra = nn.Parameter(torch.zeros(1))  # the optimizer needs something; the loss does not use it


class VectorLoss(TinyClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y, reduction="none")


class NoHparams(pl.LightningModule):
    def __init__(self, width: int = 16) -> None:
        super().__init__()  # no save_hyperparameters(): cannot be re-instantiated at a base width
        self.net = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def nan_loader() -> DataLoader:
    data = tiny_loader().dataset
    data.tensors[0][5, 1] = float("nan")  # one bad feature value in the training data
    return DataLoader(data, batch_size=16)


class StringOutput(TinyClassifier):
    def forward(self, x: torch.Tensor) -> Any:
        return {"scores": self.net(x)}  # no tensor the suite can read as the prediction

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0])["scores"], batch[1])


class Manual(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        opt.step()


class ConfigModule(NoHparams):
    def __init__(self, config: dict | None = None) -> None:
        super().__init__((config or {"hidden": 16})["hidden"])
        self.save_hyperparameters()


def dict_loader() -> DataLoader:
    data = [{"features": torch.randn(8), "label": torch.tensor(1)} for _ in range(16)]
    return DataLoader(data, batch_size=4)


FIT_CASES: list[tuple[str, Callable[[], list[pl.Callback]], Callable[[], pl.LightningModule], Callable[[], DataLoader], str]] = [
    ("RankMonitor unknown layer", lambda: [RankMonitor(layers=["encoder.fc"])], TinyClassifier, tiny_loader, "'encoder.fc' matches no module"),
    ("RankMonitor weight without a matrix", lambda: [RankMonitor(weights=["net.2"])], TinyClassifier, tiny_loader, r"RankMonitor\(weights=...\).*net\.2"),
    ("FeatureAlignment unknown module", lambda: [FeatureAlignment(layers=["decoder"])], TinyClassifier, tiny_loader, "'decoder'"),
    ("CoordCheck unknown layer", lambda: [CoordCheck(layers=["head"])], TinyClassifier, tiny_loader, "'head'"),
    ("EffectiveLR unknown weight", lambda: [EffectiveLR(weights=["stem"])], TinyClassifier, tiny_loader, "'stem'"),
    ("Sharpness k above its product budget", lambda: [Sharpness(k=10**6)], TinyClassifier, tiny_loader, "lower k or raise max_matvecs"),
    ("Sharpness asks for more eigenvalues than trainable parameters", lambda: [Sharpness(min_eig=True)], Frozen, tiny_loader, "Frozen has only 1 trainable"),
    ("Sharpness of a loss that uses no trainable parameter", lambda: [Sharpness()], Frozen, tiny_loader, "does not depend on any trainable parameter"),
    ("Sharpness with a non-scalar loss", lambda: [Sharpness()], VectorLoss, tiny_loader, "scalar"),
    ("ELRWarmup without scale-invariant weights", lambda: [ELRWarmup()], lambda: MLP(in_features=8, num_classes=3, width=8, depth=2), tiny_loader, "MLP has no scale-invariant weights"),
    ("ELRWarmup on data with a NaN", lambda: [ELRWarmup()], TinyClassifier, nan_loader, "non-finite outputs"),
    ("probe batch without inputs", lambda: [RankMonitor()], TinyClassifier, dict_loader, "cannot find the inputs"),
    ("Parametrization of a module without saved hyper-parameters", lambda: [Parametrization("mup", base_width=8)], NoHparams, tiny_loader, "NoHparams"),
    ("Parametrization with a missing width key", lambda: [Parametrization("mup", base_width=8, width_keys=["d_model"])], TinyClassifier, tiny_loader, "d_model"),
    ("an output the suite cannot read", lambda: [CoordCheck()], StringOutput, tiny_loader, r"returned dict.*probe_outputs"),
    ("manual optimization without probe_loss", lambda: [FeatureAlignment()], Manual, tiny_loader, r"FeatureAlignment: Manual uses manual optimization.*probe_loss"),
    ("two instances of one callback without names", lambda: [RankMonitor(), RankMonitor(every_n_steps=5)], TinyClassifier, tiny_loader,
     r"RankMonitor\(name=None\): two RankMonitor callbacks without a name share one checkpoint key.*RankMonitor\(name='...'\)"),
    ("two instances of one callback with one name", lambda: [Sharpness(name="a"), Sharpness(name="a", k=2)], TinyClassifier, tiny_loader,
     r"Sharpness\(name='a'\): two Sharpness callbacks named 'a' share one checkpoint key"),
    ("NTK exact solver above max_exact_size", lambda: [NTKSpectrum(solver="exact", max_exact_size=10, probe_size=8)], TinyClassifier, tiny_loader,
     r"NTKSpectrum\(solver='exact', max_exact_size=10\): the kernel would be 24x24, above max_exact_size, so it was not built"),
    ("NTK exact solver above max_exact_size, summed over outputs",
     lambda: [NTKSpectrum(solver="exact", max_exact_size=4, probe_size=8, trace_outputs=True)], TinyClassifier, tiny_loader,
     r"NTKSpectrum\(solver='exact', max_exact_size=4\): the kernel would be 8x8"),
    ("NTK kernel above max_rows", lambda: [NTKSpectrum(probe_size=64, max_rows=100)], TinyClassifier, tiny_loader, r"max_rows=100.*lower probe_size"),
    ("Parametrization width path that does not exist", lambda: [Parametrization("mup", base_width=8, width_keys=["config.width"])],
     ConfigModule, tiny_loader, "config.width"),
    ("Parametrization branch pattern that matches nothing", lambda: [Parametrization("depth_mup", base_width=8, base_depth=1, branch_pattern=r"blocks\.\d+")],
     TinyClassifier, tiny_loader, "blocks"),
]


@pytest.mark.parametrize("case", FIT_CASES, ids=[c[0] for c in FIT_CASES])
def test_fails_before_the_first_optimizer_step(case: tuple) -> None:
    _, callbacks, make_module, make_loader, match = case
    torch.manual_seed(0)
    module = make_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        fit(callbacks(), module=module, loader=make_loader(), max_steps=2)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k in after), "an optimizer step was taken"


INIT_CASES: list[tuple[str, Callable[[], Any], str]] = [
    ("every_n_steps < 1", lambda: RankMonitor(every_n_steps=0), r"RankMonitor\(every_n_steps=0\): every_n_steps must be an int >= 1"),
    ("unknown schedule", lambda: Sharpness(schedule="cosine"), "schedule must be"),
    ("empty probe", lambda: CoordCheck(probe_size=0), "probe_size"),
    ("unknown bn_mode", lambda: FeatureAlignment(bn_mode="frozen"), "bn_mode"),
    ("NTK on train-mode BatchNorm", lambda: NTKSpectrum(bn_mode="train"), "BatchNorm"),
    ("unknown parametrization scheme", lambda: Parametrization(scheme="mup2"), "mup2"),
    ("negative target feature speed", lambda: FeatureSpeedControl(target_speed=-0.1), "target_speed"),
    ("missing local data set", lambda: TorchvisionDataModule(name="mnist", root="/nonexistent/data").setup(), "/nonexistent/data"),
]


@pytest.mark.parametrize("case", INIT_CASES, ids=[c[0] for c in INIT_CASES])
def test_bad_arguments_fail_at_once(case: tuple) -> None:
    _, build, match = case
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
        build()


def test_a_callback_appended_after_the_trainer_was_built_is_checked_at_setup() -> None:
    module = TinyClassifier()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(callbacks=[RankMonitor()], max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.callbacks.append(RankMonitor(every_n_steps=3))  # past the Trainer's own check of state keys
    with pytest.raises(ValueError, match=r"two RankMonitor callbacks without a name.*name='...'"):
        trainer.fit(module, tiny_loader())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


# ------------------------------------------------------------------------------------------------------------------
# The catalogue: every argument of every callback, at least one bad value each, refused at construction
# ------------------------------------------------------------------------------------------------------------------
CALLBACKS = [FeatureAlignment, FeatureSpeedControl, Sharpness, NTKSpectrum, EffectiveLR, ELRWarmup, RankMonitor, CoordCheck,
             Parametrization, AlignSummary]
REQUIRED: dict[type, dict[str, Any]] = {FeatureSpeedControl: {"target_speed": 0.1}}
NAN, INF = math.nan, math.inf
#: Arguments several callbacks share (applied to each callback that takes them).
SHARED_BAD: dict[str, list[Any]] = {
    "every_n_steps": [0, 2.5, True, "10", -3],
    "schedule": ["cosine", None],
    "max_overhead": [0, 1.5, NAN, "fast", True],
    "probe_size": [0, 2.5, "all", None],
    "probe_seed": ["a", -1, 2**40, 1.5],
    "bn_mode": ["frozen", True],
    "dropout": ["yes", 1],
    "name": ["", 3],
    "layers": [[], "net.0", ["net.(0"], [3]],
    "weights": [[], "net.0", ["("]],
    "figure_every": [-1, 0.5, True],
    "histograms": ["no", 1],
    "scale_factor": [0, 1, -2.0, INF, NAN],
    "invariance_rtol": [0, NAN, -1e-3],
}
OWN_BAD: dict[type, dict[str, list[Any]]] = {
    Sharpness: {
        "k": [0, 1.5, True], "min_eig": ["no", 1], "trace": ["yes"], "density": [0], "preconditioned": ["auto", 1],
        "tol": [-1e-3, NAN, INF, "small"], "max_matvecs": [0, 10.0], "warm_start": ["true"], "trace_samples": [0],
        "trace_basis": [-1], "density_steps": [0], "density_vectors": [0], "method": ["hvp"], "gradient_check": [None],
        "high_precision": ["fp64"], "seed": ["x", -5],
    },
    NTKSpectrum: {
        "k": [0], "trace_outputs": ["yes"], "solver": ["eigh"], "max_exact_size": [0, 10.5], "alignment": ["auto"],
        "sequence_output": ["first"], "max_rows": [0], "max_memory_gb": [0, -1.0, INF, NAN], "trace_samples": [1, 2.0],
        "tol": [NAN, -1.0], "max_matvecs": [0], "bn_mode": ["train"],
    },
    RankMonitor: {"threshold": [0, NAN], "near_one_tol": [-0.1], "repr_tol": [NAN, 0.0], "jacobian_points": [-1, 2.5]},
    CoordCheck: {},
    FeatureAlignment: {},
    EffectiveLR: {},
    ELRWarmup: {},
    FeatureSpeedControl: {
        "target_speed": [-0.1, 0, [], [0.1, NAN], "fast", INF], "min_multiplier": [0, 2.0], "max_multiplier": [0.5, INF],
        "smoothing": [1.0, -0.1],
    },
    Parametrization: {
        "scheme": ["mu_p"], "base_width": [0, 64.0], "base_depth": [0], "width_keys": ["width", [], [""]],
        "depth_keys": ["depth", []], "branch_pattern": ["(", 3], "init": ["xavier"], "readout_zero_init": ["yes"],
        "input_mult": [NAN, 0, -1.0], "output_mult": [0, INF], "decoupled_wd": [1], "optimizer_family": ["lion"],
        "role_overrides": [{"readout": "head"}, {"(": "output"}, ["readout"]], "unscalable_attention": ["ignore"],
        "verbose": ["loud"],
    },
    AlignSummary: {"progress_bar": ["yes"], "table": [0], "style": ["fancy"]},
}


def _arguments(cls: type) -> list[str]:
    return [n for n in inspect.signature(cls).parameters]


ARGUMENT_CASES = [
    (cls, argument, value)
    for cls in CALLBACKS
    for argument in _arguments(cls)
    for value in OWN_BAD[cls].get(argument, SHARED_BAD.get(argument, []))
]


@pytest.mark.parametrize(("cls", "argument", "value"), ARGUMENT_CASES, ids=[f"{c.__name__}-{a}={v!r}" for c, a, v in ARGUMENT_CASES])
def test_a_bad_argument_is_refused_naming_callback_argument_and_value(cls: type, argument: str, value: Any) -> None:
    shown = re.escape(repr(value))
    with pytest.raises(CallbackArgumentError, match=rf"^{cls.__name__}\({argument}={shown}\): {argument} must be .+; got {shown}"):
        cls(**{**REQUIRED.get(cls, {}), argument: value})


def test_every_argument_of_every_callback_has_a_bad_value() -> None:
    missing = [f"{cls.__name__}.{a}" for cls in CALLBACKS for a in _arguments(cls) if not OWN_BAD[cls].get(a, SHARED_BAD.get(a))]
    assert not missing, f"arguments without a bad value in the catalogue: {missing}"


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
def test_every_default_is_accepted_by_its_own_annotation(cls: type) -> None:
    hints = type_hints(inspect.unwrap(cls.__init__))
    for name, parameter in inspect.signature(cls).parameters.items():
        if parameter.default is not parameter.empty:
            assert accepts(hints[name], parameter.default), f"{cls.__name__}({name}={parameter.default!r})"


def test_the_literal_annotations_list_what_the_code_accepts() -> None:
    from lightning_align.callbacks.parametrization import InitName, SchemeName, UnscalableName
    from lightning_align.parametrize.apply import INITS, UNSCALABLE_ATTENTION
    from lightning_align.parametrize.roles import ROLES, Role
    from lightning_align.parametrize.rules import SCHEMES

    for literal, values in ((SchemeName, SCHEMES), (InitName, INITS), (UnscalableName, UNSCALABLE_ATTENTION), (Role, ROLES)):
        assert get_args(literal) == tuple(values)


#: The bad arguments of the user report (issue 27), with the whole message each now gets.
ISSUE_EXAMPLES: list[tuple[Callable[[], Any], str]] = [
    (lambda: Sharpness(every_n_steps=2.5), "Sharpness(every_n_steps=2.5): every_n_steps must be an int >= 1; got 2.5"),
    (lambda: RankMonitor(probe_seed="a"), "RankMonitor(probe_seed='a'): probe_seed must be an int in [0, 4294967295]; got 'a'"),
    (lambda: CoordCheck(dropout="yes"), "CoordCheck(dropout='yes'): dropout must be True or False; got 'yes'"),
    (lambda: Sharpness(seed="x"), "Sharpness(seed='x'): seed must be an int in [0, 4294967295]; got 'x'"),
    (lambda: Sharpness(min_eig="no"), "Sharpness(min_eig='no'): min_eig must be True or False; got 'no'"),
    (lambda: Parametrization(width_keys="width"),
     "Parametrization(width_keys='width'): width_keys must be a non-empty list of non-empty strings or None; got 'width' "
     "(a single string; a list is written ['width'])"),
    (lambda: RankMonitor(repr_tol=NAN), "RankMonitor(repr_tol=nan): repr_tol must be a finite float > 0; got nan"),
    (lambda: EffectiveLR(weights=[]),
     "EffectiveLR(weights=[]): weights must be a non-empty list of names or regular expressions or None; got []"),
    (lambda: CoordCheck(layers=[]), "CoordCheck(layers=[]): layers must be a non-empty list of names or regular expressions or None; got []"),
    (lambda: Parametrization(output_mult=0), "Parametrization(output_mult=0): output_mult must be a finite float > 0; got 0"),
    (lambda: Parametrization(input_mult=NAN), "Parametrization(input_mult=nan): input_mult must be a finite float > 0; got nan"),
    (lambda: RankMonitor(histograms="no"), "RankMonitor(histograms='no'): histograms must be True or False; got 'no'"),
    (lambda: NTKSpectrum(histograms="no"), "NTKSpectrum(histograms='no'): histograms must be True or False; got 'no'"),
    (lambda: Sharpness(k=3, max_matvecs=2),
     "Sharpness(max_matvecs=2): max_matvecs must be at least k = 3; got 2 (Lanczos needs a product per eigenvalue asked for: "
     "k=3, min_eig=False); lower k or raise max_matvecs"),
    (lambda: FeatureAlignment(modules=["readout"]), "FeatureAlignment: unknown argument 'modules'; it is now called 'layers'"),
    (lambda: RankMonitor(every_n_step=5), "RankMonitor: unknown argument 'every_n_step'; did you mean 'every_n_steps'?"),
]


@pytest.mark.parametrize(("build", "message"), ISSUE_EXAMPLES, ids=[m.split(":")[0] for _, m in ISSUE_EXAMPLES])
def test_the_reported_bad_arguments_get_the_whole_message(build: Callable[[], Any], message: str) -> None:
    with pytest.raises(CallbackArgumentError) as info:
        build()
    assert str(info.value) == message
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)  # code catching either keeps working


class WeightNorm(MeasurementCallback):
    """A user's measurement callback: its own annotations are checked, and the shared ones by the base."""

    def __init__(self, power: Annotated[float, Bound(1)] = 2.0, every_n_steps: int = 10, **kwargs: Any) -> None:
        super().__init__(every_n_steps, **kwargs)
        self.power = power

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> dict[str, float]:
        return {"norm/weights": float(sum(p.norm() ** self.power for p in pl_module.parameters()))}


def test_a_user_subclass_gets_the_same_checks_and_keeps_its_signature() -> None:
    with pytest.raises(CallbackArgumentError, match=r"^WeightNorm\(power=0.5\): power must be a finite float >= 1; got 0.5$"):
        WeightNorm(power=0.5)
    with pytest.raises(CallbackArgumentError, match=r"^WeightNorm\(every_n_steps=2.5\): every_n_steps must be an int; got 2.5$"):
        WeightNorm(every_n_steps=2.5)
    with pytest.raises(CallbackArgumentError, match=r"^WeightNorm\(probe_size=0\): probe_size must be an int >= 1; got 0$"):
        WeightNorm(probe_size=0)  # through **kwargs: checked by the base
    with pytest.raises(CallbackArgumentError, match=r"^WeightNorm\(bn_mode='evl'\): .*got 'evl' \(did you mean 'eval'\?\)$"):
        WeightNorm(bn_mode="evl")
    assert list(inspect.signature(WeightNorm).parameters) == ["power", "every_n_steps", "kwargs"]
    assert inspect.signature(Sharpness).parameters["k"].default == 1
    assert WeightNorm(power=3, probe_size=4).power == 3


def test_a_shared_argument_has_one_annotation_in_every_callback() -> None:
    """One name, one meaning, one valid set (docs/callbacks.md, "Arguments every callback shares")."""
    seen: dict[str, tuple[str, Any]] = {}
    for cls in CALLBACKS:
        hints = type_hints(inspect.unwrap(cls.__init__))
        for name in _arguments(cls):
            if name in SHARED_BAD:
                first = seen.setdefault(name, (cls.__name__, hints[name]))
                assert hints[name] == first[1], f"{cls.__name__}.{name} is annotated unlike {first[0]}.{name}"
