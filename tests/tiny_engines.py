"""Small engines importable by ``package.module:factory`` specs, for the CLI tests (``optimize prepare``)."""

from __future__ import annotations

import torch


def wide_mlp() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """A deterministic MLP and its example input; the same weights in every process."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).eval()
    return model, (torch.randn(4, 16, 64),)


class TtsDecoderOnly:
    """The TTS engine at its test size (seeded weights: the same in every process), its decoder alone."""

    def __init__(self) -> None:
        from uniopt.engines.tts import FishSpeechConfig, FishSpeechEngine

        self.engine = FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=4), seed=4)
        self.decoder = self.engine.decoder

    def uniopt_components(self) -> list:
        return self.engine.uniopt_components()[:1]
