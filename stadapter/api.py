"""Offline use: one trunk + one task as an ordinary ``torch.nn.Module``."""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor, nn

from .bank import AdapterStack
from .bundle import TaskBundle, check_fits_trunk, load_bundle
from .config import TaskSpec
from .factory import load_trunk
from .trunk import VideoTrunk


class VideoClassifier(nn.Module):
    """Normalised frames ``[B, T, 3, H, W]`` -> logits ``[B, num_classes]``.

    Attributes:
        labels: class names, in logit order.
        spec: the task's :class:`~stadapter.config.TaskSpec` (sampling, version, metrics).
    """

    def __init__(self, trunk: VideoTrunk, stack: AdapterStack, spec: TaskSpec):
        super().__init__()
        self.trunk = trunk
        self.spec = spec
        self.labels = list(spec.labels)
        self._stack = stack

    @property
    def stack(self) -> AdapterStack:
        return self._stack

    def _apply(self, fn, recurse: bool = True):  # keep the stack on the module's device / dtype
        super()._apply(fn, recurse)
        self._stack = AdapterStack(
            slots={k: s.map(fn) for k, s in self._stack.slots.items()},
            head_w=fn(self._stack.head_w),
            head_b=fn(self._stack.head_b),
            num_classes=self._stack.num_classes,
            activation=self._stack.activation,
        )
        return self

    def forward(self, frames: Tensor) -> Tensor:
        return self.trunk(frames, self._stack)

    @torch.no_grad()
    def predict_views(self, views: Tensor) -> Tensor:
        """views ``[V, T, 3, H, W]`` of one clip -> class probabilities ``[C]`` (softmax, averaged over views)."""
        p = next(self.trunk.parameters())
        logits = self(views.to(device=p.device, dtype=p.dtype))
        return logits.float().softmax(dim=-1).mean(dim=0)


def load_classifier(
    trunk: str | os.PathLike | VideoTrunk,
    task: str | os.PathLike | TaskBundle,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
) -> VideoClassifier:
    """Load a trunk folder (or an already loaded trunk) and a task bundle as one eval module.

    Example::

        clf = stadapter.load_classifier(trunk="model_repository/trunk", task="model_repository/tasks/motion/1")
        logits = clf(frames)  # frames: [B, T, 3, H, W], normalised with clf.spec.sampling.mean/std
    """
    trunk_mod = trunk if isinstance(trunk, VideoTrunk) else load_trunk(trunk)
    if isinstance(task, TaskBundle):
        check_fits_trunk(task, trunk_mod)
        bundle = task
    else:
        bundle = load_bundle(task, trunk_mod)
    clf = VideoClassifier(trunk_mod, bundle.stack(trunk_mod.num_blocks), bundle.spec).eval()
    return clf.to(device=device, dtype=dtype)
