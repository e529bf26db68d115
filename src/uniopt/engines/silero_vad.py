"""Declare the network inside silero-vad's packaged TorchScript model as a uniopt component.

``silero_vad.load_silero_vad()`` returns a ``torch.jit.ScriptModule`` (``VADRNNJITMerge``) whose
``forward(chunk, sr)`` keeps the LSTM state and the last samples of the previous chunk as
attributes and calls its stateless network, ``_model(x, state) -> (speech_prob, state)``, from
TorchScript, where no Python-level installation reaches. :class:`SileroVadAdapter` runs that
outer ``forward`` in Python, with the same validation, state and context handling, so the
network is a component whose stages every call uses. Pass the adapter where silero's own
functions take the model: ``get_speech_timestamps(audio, fast)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..optimizer.component import Component, Metric

__all__ = ["SileroVadAdapter"]

#: Samples per chunk silero's model takes, by sample rate.
CHUNK_SAMPLES = {16_000: 512, 8_000: 256}


class SileroVadAdapter(nn.Module):
    """silero-vad's ``VADRNNJITMerge`` with its outer ``forward`` in Python and its 16 kHz network a component.

    ``forward(chunk [B, 512] or [512], sr) -> speech probability [B, 1]``, equal to the packaged
    model's; ``reset_states()`` starts a new stream. 8 kHz calls run the packaged 8 kHz network.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        for name in ("_model", "_model_8k", "reset_states", "sample_rates"):
            if not hasattr(model, name):
                raise TypeError(f"{type(model).__name__} lacks {name!r}; expected silero-vad's load_silero_vad() model")
        self.network = model._model
        self.network_8k = model._model_8k
        self.sample_rates = list(model.sample_rates)
        self.state_size = self._state_size()
        self.reset_states()

    def _state_size(self) -> int:
        with torch.inference_mode():
            _, state = self.network(torch.zeros(1, 576), torch.zeros(0))
        return int(state.shape[-1])

    def reset_states(self, batch_size: int = 1) -> None:
        """Forget the stream: zero LSTM state and no context (as the packaged model's ``reset_states``)."""
        self._state = torch.zeros(2, batch_size, self.state_size)
        self._context = torch.zeros(0)
        self._last_sr = 0
        self._last_batch_size = 0

    def _validated(self, x: Tensor, sr: int) -> tuple[Tensor, int]:
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if x.dim() > 2:
            raise ValueError(f"Too many dimensions for input audio chunk {x.dim()}")
        if sr != 16_000 and sr % 16_000 == 0:
            x, sr = x[:, :: sr // 16_000], 16_000
        if sr not in self.sample_rates:
            raise ValueError(f"Supported sampling rates: {self.sample_rates} (or multiply of 16000)")
        if sr / x.shape[1] > 31.25:
            raise ValueError("Input audio chunk is too short")
        return x, sr

    def forward(self, x: Tensor, sr: int) -> Tensor:
        x, sr = self._validated(x, sr)
        if x.shape[-1] != CHUNK_SAMPLES[sr]:
            supported = "256 for 8000 sample rate, 512 for 16000"
            raise ValueError(f"Provided number of samples is {x.shape[-1]} (Supported values: {supported})")
        batch = x.shape[0]
        network = self.network if sr == 16_000 else self.network_8k
        context_size = 64 if sr == 16_000 else 32
        if (self._last_sr and self._last_sr != sr) or (self._last_batch_size and self._last_batch_size != batch):
            self.reset_states(batch)
        if self._state.shape[1] != batch:
            self._state = torch.zeros(2, batch, self.state_size)
        if not len(self._context):
            self._context = torch.zeros(batch, context_size)
        x = torch.cat([self._context.to(x.device), x], dim=1)
        out, self._state = network(x, self._state)
        self._context = x[..., -context_size:]
        self._last_sr, self._last_batch_size = sr, batch
        return out  # type: ignore[no-any-return]

    def uniopt_components(self) -> list[Component]:
        """The 16 kHz network: ``(x [B, 64 context + 512 samples], state [2, B, 128]) -> (prob [B, 1], state)``."""
        generator = torch.Generator().manual_seed(0)

        def inputs(batch: int) -> tuple[Tensor, Tensor]:
            tone = torch.sin(torch.arange(576) * 0.07 * (1 + torch.arange(batch)[:, None]))
            audio = 0.3 * tone + 0.05 * torch.randn(batch, 576, generator=generator)
            return audio, 0.5 * torch.randn(2, batch, self.state_size, generator=generator).tanh()

        return [
            Component(
                "network", self.network, inputs(1),
                input_names=("x", "state"), output_names=("speech_prob", "state_out"),
                dynamic_axes={"x": {0: "batch"}, "state": {1: "batch"}, "speech_prob": {0: "batch"},
                              "state_out": {1: "batch"}},
                metric=Metric("snr_db", 30.0), kind="generic", exporter="legacy",
                calibration_inputs=[inputs(1), inputs(2), inputs(4)], validation_inputs=[inputs(3)],
                audio_seconds=512 / 16_000,
            )
        ]  # fmt: skip
