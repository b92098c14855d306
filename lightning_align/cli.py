"""The ``lightning-align`` command: LightningCLI with every model, data module and callback of the suite.

Usage::

    lightning-align fit --config configs/quickstart.yaml
    lightning-align fit --config configs/quickstart.yaml --trainer.max_epochs 5
    lightning-align fit --model MLP --data DigitsDataModule --trainer.callbacks+=RankMonitor
    lightning-align report lightning_logs/version_0          # HTML report from the event files
    lightning-align sweep --config CONFIG --grid model.init_args.width=64,256 ...   # grid of fits + transfer

Models and data modules are chosen in subclass mode (``class_path`` in YAML, or a short class name);
the config is saved next to the logs (``config.yaml``, overwritten on re-runs); the logger is
TensorBoard (``lightning_logs/version_N``) unless the config says otherwise.
"""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI

import example_modules  # noqa: F401  (registers the example classes for short names)
import lightning_align.callbacks  # noqa: F401  (registers the callbacks for short names)
from lightning_align.arguments import CallbackArgumentError
from lightning_align.cli_errors import AlignArgumentParser, root_cause


DESCRIPTION = (
    "lightning_align: see and control feature learning while a model trains (alignment, sharpness, NTK, effective "
    "learning rates, rank, coordinate checks; muP and friends). Start with the quickstart: "
    "`lightning-align fit --config configs/quickstart.yaml`, then `tensorboard --logdir lightning_logs`. "
    "Also: `lightning-align report LOGDIR` (an HTML report of a run) and `lightning-align sweep` (LR-transfer grids)."
)


def _tensorboard_logger() -> dict:
    return {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": ".", "name": "lightning_logs", "default_hp_metric": False},
    }


class AlignCLI(LightningCLI):
    """LightningCLI whose config errors (a callback's ``ValueError`` at instantiation) are one short message."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as ex:
            cause = root_cause(ex) or ex
            kind = "" if isinstance(cause, CallbackArgumentError) else f"{type(cause).__name__}: "  # ours name the callback
            sys.stderr.write(f"lightning-align: error in the config: {kind}{cause}\n")
            sys.exit(2)
        except RuntimeError as ex:
            if "more than one stateful callback" not in str(ex):
                raise
            kind = str(ex).split("`")[1] if "`" in str(ex) else "callback"
            sys.stderr.write(f"lightning-align: error in the config: two {kind} callbacks share a checkpoint key; give each a distinct `name:` in init_args\n")
            sys.exit(2)


def build_cli(args: ArgsType = None, run: bool = True) -> LightningCLI:
    """Parse ``args`` (a list of strings; ``None`` reads ``sys.argv``), build everything and run the subcommand."""
    return AlignCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"logger": _tensorboard_logger()},
        parser_kwargs={"description": DESCRIPTION},
        parser_class=AlignArgumentParser,
        args=args,
        run=run,
    )


#: Subcommands of our own, dispatched before LightningCLI (whose subcommands are fixed).
EXTRA_SUBCOMMANDS = ("report", "sweep")


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-align`` console script (``report`` and ``sweep`` are ours, the rest LightningCLI's)."""
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)) and argv and argv[0] in EXTRA_SUBCOMMANDS:
        if argv[0] == "report":
            from lightning_align.report import main as run
        else:
            from lightning_align.sweep import main as run
        code = run([str(a) for a in argv[1:]])
        if code:
            sys.exit(code)
        return
    build_cli(args)


if __name__ == "__main__":  # pragma: no cover
    main()
