"""What is trained: ST-Adapter and the paper's baselines, on one frozen trunk.

* ``st-adapter``: adapters + head (:class:`~stadapter.TaskAdapters`), trunk frozen.
* ``linear``: head only, on the frame-mean CLS feature of the frozen image model.
* ``full``: every trunk parameter + head (frame mean; no temporal modelling).
* ``partial``: the last N trunk blocks (+ ``ln_post``) + head (frame mean).

``st-adapter`` and ``linear`` export as servable task bundles (a linear probe is
an adapter bundle whose single adapter is exactly zero, i.e. the identity);
``full`` and ``partial`` change the shared trunk, so they cannot be served as an
adapter of it and are written as checkpoints only.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor, nn

from stadapter import AdapterConfig, TaskAdapters, VideoTrunk

Method = Literal["st-adapter", "linear", "full", "partial"]
METHODS: tuple[str, ...] = ("st-adapter", "linear", "full", "partial")
# The adapter a linear probe is exported with: width 1 on the last block, all zeros = identity.
LINEAR_EXPORT_ADAPTER = AdapterConfig(width=1, kernel=(1, 1, 1), pre_attn=True, pre_mlp=False, layers=1)


class VideoModel(nn.Module):
    """frames [B, T, 3, H, W] -> logits [B, C] for any method; ``trainable`` lists what the optimiser sees."""

    def __init__(
        self,
        trunk: VideoTrunk,
        method: Method,
        num_classes: int,
        adapter: Optional[AdapterConfig] = None,
        partial_blocks: int = 1,
        dropout: float = 0.5,
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; known: {METHODS}")
        self.trunk = trunk
        self.method = method
        self.dropout = nn.Dropout(dropout)
        if method == "st-adapter":
            self.adapters: Optional[TaskAdapters] = TaskAdapters(adapter or AdapterConfig(), trunk.dim, trunk.num_blocks, num_classes)
            self.head = self.adapters.fc
        else:
            self.adapters = None
            self.head = nn.Linear(trunk.dim, num_classes)
            nn.init.normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        if method == "full":
            trunk.visual.requires_grad_(True)
        elif method == "partial":
            if not 1 <= partial_blocks <= trunk.num_blocks:
                raise ValueError(f"--partial-blocks must be in 1..{trunk.num_blocks}, got {partial_blocks}")
            for blk in list(trunk.blocks)[trunk.num_blocks - partial_blocks :]:
                blk.requires_grad_(True)
            trunk.visual.ln_post.requires_grad_(True)

    @property
    def trunk_trainable(self) -> bool:
        return self.method in ("full", "partial")

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for _, p in self.trainable_parameters())

    def forward(self, frames: Tensor) -> Tensor:
        stack = self.adapters.stack() if self.adapters is not None else None
        feats = self.trunk.forward_features(frames, stack)  # [B, d]
        return self.head(self.dropout(feats.to(self.head.weight.dtype)))

    def trainable_state(self) -> dict[str, Tensor]:
        """Only what training changed (what a checkpoint must hold)."""
        names = {n for n, _ in self.trainable_parameters()}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        own = self.trainable_state()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit this model: missing {missing[:4]}, unexpected {unexpected[:4]}")
        self.load_state_dict(state, strict=False)

    def export_weights(self) -> tuple[AdapterConfig, dict[str, Tensor]]:
        """(adapter config, bundle tensors) for a servable method."""
        if self.adapters is not None:
            return self.adapters.config, {k: v.detach().float().cpu() for k, v in self.adapters.state_dict().items()}
        if self.method != "linear":
            raise ValueError(f"method {self.method!r} changes the trunk and cannot be exported as an adapter bundle")
        probe = TaskAdapters(LINEAR_EXPORT_ADAPTER, self.trunk.dim, self.trunk.num_blocks, self.head.out_features)
        state = {k: torch.zeros_like(v) for k, v in probe.state_dict().items()}
        state["fc.weight"] = self.head.weight.detach().float().cpu()
        state["fc.bias"] = self.head.bias.detach().float().cpu()
        return LINEAR_EXPORT_ADAPTER, state
