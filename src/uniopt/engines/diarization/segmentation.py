"""pyannote segmentation-3.0 (PyanNet) as a plain PyTorch module, with weights read from its ONNX file.

Architecture, mirrored node by node from ``segmentation-3.0.onnx``:

* SincNet front-end: InstanceNorm1d(1) on the waveform; the 80 sinc band-pass filters, which the
  ONNX graph already holds as a constant (80, 1, 251) tensor, frozen into a Conv1d (stride 10, no
  bias); abs; then three blocks of MaxPool1d(3) -> InstanceNorm1d -> LeakyReLU(0.01), with
  Conv1d(80, 60, 5) and Conv1d(60, 60, 5) before the second and third blocks;
* a 4-layer bidirectional LSTM, hidden size 128;
* Linear(256, 128) -> LeakyReLU -> Linear(128, 128) -> LeakyReLU -> Linear(128, 7) -> log-softmax
  over the 7 powerset classes.

Input is (batch, 1, samples) float32 at 16 kHz; a 10 s window gives (batch, 589, 7).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from uniopt.engines.diarization.weights import find_segmentation_onnx
from uniopt.errors import BackendUnavailable, InputError, UniOptError

__all__ = [
    "POWERSET_CLASSES",
    "PyanNet",
    "load_segmentation_model",
    "powerset_to_speakers",
]

SAMPLE_RATE = 16_000
#: pyannote's powerset for at most 3 speakers and at most 2 of them active in a frame.
POWERSET_CLASSES: tuple[frozenset[int], ...] = (
    frozenset(),
    frozenset({0}),
    frozenset({1}),
    frozenset({2}),
    frozenset({0, 1}),
    frozenset({0, 2}),
    frozenset({1, 2}),
)
_NUM_SPEAKERS = 3
_LEAKY_SLOPE = 0.01


class SincNet(nn.Module):
    """pyannote's SincNet front-end with the sinc filters frozen into ``conv1d[0]``."""

    def __init__(self) -> None:
        super().__init__()
        self.wav_norm1d = nn.InstanceNorm1d(1, affine=True)
        self.conv1d = nn.ModuleList(
            [
                nn.Conv1d(1, 80, 251, stride=10, bias=False),
                nn.Conv1d(80, 60, 5),
                nn.Conv1d(60, 60, 5),
            ]
        )
        self.pool1d = nn.ModuleList([nn.MaxPool1d(3, stride=3) for _ in range(3)])
        self.norm1d = nn.ModuleList(
            [
                nn.InstanceNorm1d(80, affine=True),
                nn.InstanceNorm1d(60, affine=True),
                nn.InstanceNorm1d(60, affine=True),
            ]
        )

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(batch, 1, samples) -> (batch, 60, frames)."""
        outputs = self.wav_norm1d(waveforms)
        for index, (conv, pool, norm) in enumerate(zip(self.conv1d, self.pool1d, self.norm1d, strict=True)):
            outputs = conv(outputs)
            if index == 0:
                outputs = torch.abs(outputs)
            outputs = F.leaky_relu(norm(pool(outputs)), _LEAKY_SLOPE)
        return outputs


class PyanNet(nn.Module):
    """pyannote segmentation-3.0: waveform (batch, 1, samples) -> log-probs (batch, frames, 7)."""

    def __init__(self) -> None:
        super().__init__()
        self.sincnet = SincNet()
        self.lstm = nn.LSTM(60, 128, num_layers=4, bidirectional=True, batch_first=True)
        self.linear = nn.ModuleList([nn.Linear(256, 128), nn.Linear(128, 128)])
        self.classifier = nn.Linear(128, len(POWERSET_CLASSES))

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        """Powerset log-probabilities, (batch, frames, 7); 589 frames for 10 s at 16 kHz."""
        if waveforms.dim() != 3 or waveforms.shape[1] != 1:
            raise InputError(f"PyanNet expects waveforms shaped (batch, 1, samples), got {tuple(waveforms.shape)}")
        outputs = self.sincnet(waveforms).transpose(1, 2)
        outputs, _ = self.lstm(outputs)
        for linear in self.linear:
            outputs = F.leaky_relu(linear(outputs), _LEAKY_SLOPE)
        return F.log_softmax(self.classifier(outputs), dim=-1)


def _onnx_lstm_to_torch(array: np.ndarray, hidden: int) -> np.ndarray:
    """Reorder gate blocks along axis 0 from ONNX (i, o, f, c) to torch (i, f, g=c, o)."""
    i, o, f, c = (array[k * hidden : (k + 1) * hidden] for k in range(4))
    return np.concatenate([i, f, c, o], axis=0)


def _state_dict_from_onnx(path: Path) -> dict[str, torch.Tensor]:
    """Map the initializers of ``segmentation-3.0.onnx`` onto :class:`PyanNet`'s parameter names."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BackendUnavailable("onnx", "diarization", "needed to read segmentation-3.0.onnx") from exc

    graph = onnx.load(str(path)).graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes = list(graph.node)

    def const(name: str) -> np.ndarray:
        if name not in consts:
            raise UniOptError(f"{path}: tensor {name!r} is not a constant initializer; unexpected graph")
        return consts[name]

    def of_type(op: str) -> list:
        return [n for n in nodes if n.op_type == op]

    norms, convs, lstms, matmuls = (
        of_type("InstanceNormalization"),
        of_type("Conv"),
        of_type("LSTM"),
        of_type("MatMul"),
    )
    if_nodes = of_type("If")
    if (len(norms), len(convs), len(lstms), len(matmuls), len(if_nodes)) != (4, 2, 4, 3, 1):
        raise UniOptError(f"{path} is not the PyanNet segmentation-3.0 graph this port mirrors")
    # The sinc filterbank conv sits in both branches of the mono/multi-channel If; its weights
    # are a precomputed constant (80, 1, 251).
    branch = next(a.g for a in if_nodes[0].attribute if a.name == "then_branch")
    sinc_conv = next(n for n in branch.node if n.op_type == "Conv")

    state: dict[str, np.ndarray] = {"sincnet.conv1d.0.weight": const(sinc_conv.input[1])}
    for name, node in zip(
        ["sincnet.wav_norm1d", "sincnet.norm1d.0", "sincnet.norm1d.1", "sincnet.norm1d.2"], norms, strict=True
    ):
        state[f"{name}.weight"], state[f"{name}.bias"] = const(node.input[1]), const(node.input[2])
    for k, node in enumerate(convs, start=1):
        state[f"sincnet.conv1d.{k}.weight"] = const(node.input[1])
        state[f"sincnet.conv1d.{k}.bias"] = const(node.input[2])

    for layer, node in enumerate(lstms):
        hidden = next(a.i for a in node.attribute if a.name == "hidden_size")
        w, r, b = const(node.input[1]), const(node.input[2]), const(node.input[3])
        for direction, suffix in enumerate(["", "_reverse"]):
            wb, rb = b[direction, : 4 * hidden], b[direction, 4 * hidden :]
            state[f"lstm.weight_ih_l{layer}{suffix}"] = _onnx_lstm_to_torch(w[direction], hidden)
            state[f"lstm.weight_hh_l{layer}{suffix}"] = _onnx_lstm_to_torch(r[direction], hidden)
            state[f"lstm.bias_ih_l{layer}{suffix}"] = _onnx_lstm_to_torch(wb, hidden)
            state[f"lstm.bias_hh_l{layer}{suffix}"] = _onnx_lstm_to_torch(rb, hidden)

    consumers = {inp: n for n in nodes for inp in n.input}
    for name, node in zip(["linear.0", "linear.1", "classifier"], matmuls, strict=True):
        add = consumers[node.output[0]]
        bias_name = next(i for i in add.input if i != node.output[0])
        state[f"{name}.weight"] = const(node.input[1]).T
        state[f"{name}.bias"] = const(bias_name)
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in state.items()}


def load_segmentation_model(path: Path | None = None) -> PyanNet:
    """Build :class:`PyanNet` with the weights of ``segmentation-3.0.onnx`` (found when ``path`` is None)."""
    onnx_path = Path(path) if path is not None else find_segmentation_onnx()
    if not onnx_path.is_file():
        raise InputError(f"segmentation model file not found: {onnx_path}")
    model = PyanNet()
    model.load_state_dict(_state_dict_from_onnx(onnx_path), strict=True)
    return model.eval()


def _powerset_mapping() -> np.ndarray:
    mapping = np.zeros((len(POWERSET_CLASSES), _NUM_SPEAKERS), dtype=np.float32)
    for index, speakers in enumerate(POWERSET_CLASSES):
        mapping[index, sorted(speakers)] = 1.0
    return mapping


_POWERSET_MAPPING = torch.from_numpy(_powerset_mapping())


def powerset_to_speakers(log_probs: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Hard-decode powerset scores (..., 7) into per-speaker activity (..., 3) of 0/1 floats.

    Each frame takes the argmax powerset class and activates that class's speakers. Returns the
    same array type as given (torch tensor or numpy array).
    """
    is_numpy = isinstance(log_probs, np.ndarray)
    scores = torch.from_numpy(log_probs) if is_numpy else log_probs
    if not isinstance(scores, torch.Tensor):
        raise InputError(f"powerset scores must be a torch tensor or numpy array, got {type(log_probs).__name__}")
    if scores.dim() < 1 or scores.shape[-1] != len(POWERSET_CLASSES):
        raise InputError(f"powerset scores must end with {len(POWERSET_CLASSES)} classes, got {tuple(scores.shape)}")
    activity = _POWERSET_MAPPING.to(scores.device)[scores.argmax(dim=-1)]
    return activity.numpy() if is_numpy else activity
