"""What every model of ours shares: the layer-list contract, activation checkpointing of a block, and the walk
over each parameter once that initialisation (from (seed, name), or a checkpoint) takes."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.utils.checkpoint
from torch import nn


def unique_parameters(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Parameter, tuple[int, ...]]]:
    """(owning module, full name, parameter, full shape) of each parameter once (a tied one under its first
    name); the shape is the full one also for ZeRO-3's placeholders (``ds_shape``)."""
    seen = set()
    for mod_name, m in model.named_modules():
        for p_name, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            yield m, name, p, tuple(getattr(p, "ds_shape", p.shape))


class CheckpointedBlock(nn.Module):
    """A block whose ``_forward`` is recomputed in backward when ``checkpoint`` is set (activation checkpointing)."""

    checkpoint = False

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class LayerListLM(nn.Module):
    """``embed``, ``blocks``, ``head``, applied in order (``layers()``: what pipelines cut); the output matrix
    tied to the token embedding when ``config.tie_weights``."""

    def tie(self) -> None:
        """Share the token embedding with the output projection again (a move to a new device can split them)."""
        if self.config.tie_weights:
            self.head.out.weight = self.embed.tok.weight

    def layers(self) -> list[nn.Module]:
        return [self.embed, *self.blocks, self.head]

    def keep_layers(self, mine: set[int]) -> None:
        """Drop (replace by identities) every entry of ``layers()`` whose index is not in ``mine``: a pipeline
        stage keeps its own layers, under their names."""
        for i in range(len(self.blocks)):
            if i + 1 not in mine:
                self.blocks[i] = nn.Identity()
        if 0 not in mine:
            self.embed = nn.Identity()
        if len(self.blocks) + 1 not in mine:
            self.head = nn.Identity()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = idx
        for layer in self.layers():
            x = layer(x)
        return x  # logits (B, T, V)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # shared tensors counted once
