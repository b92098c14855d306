"""A timm image classifier built by name, with ``width``/``depth`` arguments (a small ViT by default).

Why: vision researchers train ``timm`` models. :class:`TimmClassifier` builds any ``timm.create_model(name,
pretrained=False, ...)`` (no download) and maps its plain integer hyper-parameters ``width``/``depth``/``heads``
onto the model's own arguments (``embed_dim``/``depth``/``num_heads`` for ViTs), so
:class:`~lightning_align.Parametrization` can re-instantiate it at a base width on the meta device and the
suite sees timm's real layers (``blocks.N.attn`` with its ``scale``, ``blocks.N.mlp``). ``timm`` is imported
only when a model is built.
"""

from __future__ import annotations

from typing import Any

import torch

from example_modules.base import ExampleModule, LossName, OptimizerName


class TimmClassifier(ExampleModule):
    """Any timm classifier (``timm.create_model``) trained on ``(images, labels)`` batches with cross-entropy.

    The network is ``self.model``. Keyword arguments given to ``create_model``: ``num_classes``, ``in_chans``,
    ``{width_arg: width}``, ``{depth_arg: depth}``, ``num_heads``, ``img_size``, ``patch_size`` and
    ``mlp_ratio`` (each only when not ``None``), ``drop_rate``/``attn_drop_rate``/``drop_path_rate`` (only when
    non-zero, so models without them still build) and ``model_kwargs``. The defaults scale
    ``vit_tiny_patch16_224`` down to 8x8 digit images with 2x2 patches.

    Args:
        model_name: a timm model name (``timm.list_models()``).
        num_classes, in_chans: classifier outputs and image channels (digits: 10 and 1).
        width: ``embed_dim`` of a ViT (``width_arg`` names another argument); ``None`` passes nothing.
        depth: number of blocks (``depth_arg``); ``None`` passes nothing.
        heads: ``num_heads``; ``None`` passes nothing.
        img_size, patch_size: image and patch sizes (ViTs); ``None`` passes nothing.
        mlp_ratio: MLP width / ``width`` (ViTs); ``None`` keeps the model's default.
        dropout: ``drop_rate`` (timm's dropout before the classifier head).
        attn_drop: ``attn_drop_rate`` (dropout on the attention weights).
        drop_path: ``drop_path_rate`` (stochastic depth).
        width_arg, depth_arg: names of the model's width and depth arguments.
        model_kwargs: further ``create_model`` arguments (e.g. ``{global_pool: avg, class_token: false}``).
        loss, optimizer, lr, momentum, weight_decay: as in every example module.

    Example:
        >>> m = TimmClassifier(width=16, depth=1, heads=2)
        >>> m(torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        num_classes: int = 10,
        in_chans: int = 1,
        width: int | None = 64,
        depth: int | None = 2,
        heads: int | None = 4,
        img_size: int | None = 8,
        patch_size: int | None = 2,
        mlp_ratio: float | None = 4.0,
        dropout: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        width_arg: str = "embed_dim",
        depth_arg: str = "depth",
        model_kwargs: dict[str, Any] | None = None,
        loss: LossName = "cross_entropy",
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._configure_training(loss, optimizer, lr, momentum, weight_decay)
        if width is not None and heads is not None and width % heads:
            raise ValueError(f"TimmClassifier: width {width} is not divisible by heads {heads}")
        import timm

        kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
        optional = {
            width_arg: width, depth_arg: depth, "num_heads": heads,
            "img_size": img_size, "patch_size": patch_size, "mlp_ratio": mlp_ratio,
        }
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        rates = {"drop_rate": dropout, "attn_drop_rate": attn_drop, "drop_path_rate": drop_path}
        kwargs.update({k: v for k, v in rates.items() if v})
        kwargs.update(model_kwargs or {})
        try:
            self.model = timm.create_model(model_name, pretrained=False, **kwargs)
        except TypeError as err:
            raise TypeError(
                f"TimmClassifier: timm model {model_name!r} does not take the arguments {sorted(kwargs)}: {err}. "
                "Set the ViT-only arguments (width, depth, heads, img_size, patch_size, mlp_ratio) to null, or name "
                "the model's own width/depth arguments with width_arg/depth_arg."
            ) from err
        self.width, self.depth = width, depth

    @property
    def residual_branches(self) -> list[str]:
        """Qualified names of the residual branches (``model.blocks.i.attn`` and ``.mlp``), for depth-μP."""
        blocks = getattr(self.model, "blocks", None)
        if blocks is None:
            return []
        return [f"model.blocks.{i}.{kind}" for i in range(len(blocks)) for kind in ("attn", "mlp")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_classes)`` for images ``(batch, in_chans, H, W)``."""
        return self.model(x)
