"""Width/depth parametrizations (sp | ntk | mup | depth_mup | completep) for plain PyTorch modules.

No Lightning import: :class:`~lightning_align.callbacks.parametrization.Parametrization` is the thin
Lightning layer over :func:`auto_parametrize`, and :func:`coord_check` is the offline check.
"""

from lightning_align.parametrize.apply import Parametrized, optimizer_family, parametrize, retarget_scheduler
from lightning_align.parametrize.auto import auto_parametrize
from lightning_align.parametrize.coord_check import CoordCheckResult, coord_check
from lightning_align.parametrize.ecosystem import standard_branches
from lightning_align.parametrize.roles import ROLES, ParamInfo, infer_roles
from lightning_align.parametrize.rules import SCHEMES, ParamRule, Scale, branch_multiplier, optimizer_rule

__all__ = [
    "ROLES",
    "SCHEMES",
    "CoordCheckResult",
    "ParamInfo",
    "ParamRule",
    "Parametrized",
    "Scale",
    "auto_parametrize",
    "branch_multiplier",
    "coord_check",
    "infer_roles",
    "optimizer_family",
    "optimizer_rule",
    "parametrize",
    "retarget_scheduler",
    "standard_branches",
]
