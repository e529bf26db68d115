"""Small engines importable by ``package.module:factory`` specs, for the CLI tests (``optimize prepare``)."""

from __future__ import annotations

import torch


def wide_mlp() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """A deterministic MLP and its example input; the same weights in every process."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).eval()
    return model, (torch.randn(4, 16, 64),)
