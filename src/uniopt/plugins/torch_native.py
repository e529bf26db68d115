"""Candidates that stay in PyTorch: dynamic int8, bf16 weights, and torch.compile."""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import torch

from ..errors import NotApplicable
from ..tiers.cpu import BF16_FLAGS
from .candidate import BuildContext, Candidate, Requirements, Stage
from .hookspecs import hookimpl
from .memory_costs import memory_step

__all__ = ["DynamicInt8Linear", "Int8Backend", "TorchDynamicInt8", "int8_backend"]

log = logging.getLogger("uniopt")


class Int8Backend(Protocol):
    """Turns the given layer types of a module into int8 layers; replaceable by another backend."""

    name: str

    def quantize(self, module: torch.nn.Module, layer_types: set[type[torch.nn.Module]]) -> torch.nn.Module: ...


class TorchDynamicInt8:
    """``torch.ao.quantization.quantize_dynamic``: deprecated upstream, still the fast eager CPU path.

    Linear weights get one scale per output channel, which keeps a decoder's choices closer to
    FP32 than one scale per tensor at the same speed.

    Its deprecation warning is shown at most once per process. Two of its traps are handled here:
    a bare root layer is returned unchanged (so it is wrapped first), and an output projection
    written as ``F.linear(x, embedding.weight)`` is invisible to it (submodules that offer
    ``to_linear()`` are replaced by the ``nn.Linear`` it returns).
    """

    name = "torch.ao dynamic"
    _warned = False

    def quantize(self, module: torch.nn.Module, layer_types: set[type[torch.nn.Module]]) -> torch.nn.Module:
        # The copy shares the weights of the layers about to be quantized (they are packed anew,
        # never changed), so quantizing adds the int8 weights, not a second FP32 model.
        shared = [p for m in module.modules() if isinstance(m, tuple(layer_types)) for p in m.parameters()]
        work = _untie_projections(lean_copy(module, {id(p): p for p in shared}))
        wrapped = isinstance(work, tuple(layer_types))
        if wrapped:
            work = torch.nn.Sequential(work)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            spec = {kind: _qconfig(kind) for kind in layer_types}
            quantized = torch.ao.quantization.quantize_dynamic(work, spec, dtype=torch.qint8, inplace=True)
        for warning in caught:
            if issubclass(warning.category, DeprecationWarning) and not TorchDynamicInt8._warned:
                TorchDynamicInt8._warned = True
                log.warning("uniopt uses torch.ao dynamic quantization: %s", str(warning.message).splitlines()[0])
        lean = _replace_modules(quantized, _lean_linear)
        return lean[0] if wrapped else lean  # type: ignore[index]


class DynamicInt8Linear(torch.nn.Module):
    """A dynamic int8 Linear that calls the quantized op directly.

    Computes what ``torch.ao.nn.quantized.dynamic.Linear`` computes (the same op and arguments)
    without its per-call Python, about 10 us a call: much of a batch-1 decode step's time.
    """

    def __init__(self, layer: Any) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.packed = layer._packed_params._packed_params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, True)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype=torch.qint8"


def lean_copy(module: torch.nn.Module, tensors: dict[int, torch.Tensor]) -> torch.nn.Module:
    """A deep copy of ``module`` in which each parameter or buffer whose ``id`` is in ``tensors`` is that tensor.

    Seeding ``copy.deepcopy``'s memo this way never materialises a full FP32 copy: the given
    tensors are shared or already converted, the rest is copied.
    """
    return copy.deepcopy(module, memo=dict(tensors))


def _in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """Each floating-point parameter and buffer of ``module`` converted to ``dtype``, by ``id`` (ties kept)."""
    converted: dict[int, torch.Tensor] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) in converted or not tensor.is_floating_point():
            continue
        data = tensor.detach().to(dtype)
        converted[id(tensor)] = (
            torch.nn.Parameter(data, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else data
        )
    return converted


def _replace_modules(
    module: torch.nn.Module, replace: Callable[[torch.nn.Module], torch.nn.Module | None]
) -> torch.nn.Module:
    """``replace(module)`` when it gives a module, else ``module`` with its children replaced in turn."""
    replacement = replace(module)
    if replacement is not None:
        return replacement
    for name, child in list(module.named_children()):
        new = _replace_modules(child, replace)
        if new is not child:
            setattr(module, name, new)
    return module


def _lean_linear(module: torch.nn.Module) -> torch.nn.Module | None:
    """A :class:`DynamicInt8Linear` for a qint8 ``torch.ao`` dynamic Linear."""
    if type(module) is torch.ao.nn.quantized.dynamic.Linear and module._packed_params.dtype == torch.qint8:
        return DynamicInt8Linear(module)
    return None


def _qconfig(kind: type[torch.nn.Module]) -> Any:
    """Per-output-channel weight scales for Linear (more accurate, as fast); per tensor for RNNs."""
    if issubclass(kind, torch.nn.Linear):
        return torch.ao.quantization.per_channel_dynamic_qconfig
    return torch.ao.quantization.default_dynamic_qconfig


def _untie_projections(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every submodule that offers ``to_linear()`` with that ``nn.Linear``."""

    def untie(submodule: torch.nn.Module) -> torch.nn.Module | None:
        to_linear = getattr(submodule, "to_linear", None)
        return to_linear() if callable(to_linear) else None

    return _replace_modules(module, untie)


#: The int8 backend the torch-int8 candidates use.
int8_backend: Int8Backend = TorchDynamicInt8()

_RNN_TYPES: set[type[torch.nn.Module]] = {torch.nn.LSTM, torch.nn.GRU}


def _has_layers(module: torch.nn.Module, types: set[type[torch.nn.Module]]) -> bool:
    return any(isinstance(m, tuple(types)) for m in module.modules())


def _build_int8(layer_types: set[type[torch.nn.Module]], name: str) -> Any:
    def build(component: Any, context: BuildContext) -> Stage:
        module = component.module
        if not _has_layers(module, layer_types) and not _has_layers(module, {torch.nn.Linear}):
            raise NotApplicable("no Linear/LSTM/GRU layer to quantize")
        if name == "torch-int8-rnn" and not _has_layers(module, _RNN_TYPES):
            raise NotApplicable("no LSTM/GRU layer in this component")
        with memory_step("torch-int8", component, context):
            quantized = int8_backend.quantize(module, layer_types).eval()
        return Stage(name, quantized, {"int8_backend": int8_backend.name})

    return build


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors of one or more dimensions to ``dtype``; 0-d tensors are controls and stay as they are.

    A 0-d input is a setting (a temperature, a top-p, a penalty), not an activation: in bf16, 0.8
    would become 0.80078125.
    """
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0:
        return value.to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


class _Bf16(torch.nn.Module):
    """A bf16 copy of a module: floating inputs (positional or keyword) in bf16, bf16 outputs back in float32."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.module(*_cast(args, torch.bfloat16), **_cast(kwargs, torch.bfloat16))
        return torch.utils._pytree.tree_map(
            lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 else t, out
        )


def _build_bf16(component: Any, context: BuildContext) -> Stage:
    with memory_step("torch-copy", component, context):
        module = lean_copy(component.module, _in_dtype(component.module, torch.bfloat16)).to(torch.bfloat16)
    return Stage("torch-bf16", _Bf16(module).eval())


def _build_compile(component: Any, context: BuildContext) -> Stage:
    """Compile, and pay the compile cost now: a first call over ``compile_budget_s`` is a failure."""
    settings = context.settings
    if context.cache is not None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(context.cache.root / "inductor"))
    compiled = torch.compile(component.module, mode=settings.compile_mode, dynamic=bool(component.dynamic_axes))
    started = time.perf_counter()
    with memory_step("torch-compile", component, context), torch.inference_mode():
        compiled(*copy.deepcopy(component.example_inputs))
    seconds = time.perf_counter() - started
    if seconds > settings.compile_budget_s:
        raise TimeoutError(
            f"first call compiled in {seconds:.0f} s, over UNIOPT_COMPILE_BUDGET={settings.compile_budget_s:g} s"
        )
    return Stage("torch-compile", compiled, {"compile_seconds": seconds})


@hookimpl
def uniopt_register_candidates(register: Any) -> None:
    register(
        Candidate(
            "torch-int8",
            "torch_native",
            "dynamic int8 Linear layers (quantize_dynamic)",
            _build_int8({torch.nn.Linear}, "torch-int8"),
            Requirements(packages=("torch",), precision="int8", setting="use_model_quantization"),
        )
    )
    register(
        Candidate(
            "torch-int8-rnn",
            "torch_native",
            "dynamic int8 Linear, LSTM and GRU layers",
            _build_int8({torch.nn.Linear, *_RNN_TYPES}, "torch-int8-rnn"),
            Requirements(packages=("torch",), precision="int8", setting="use_model_quantization"),
        )
    )
    register(
        Candidate(
            "torch-bf16",
            "torch_native",
            "bf16 weights and activations in eager PyTorch",
            _build_bf16,
            Requirements(packages=("torch",), cpu_flags_any=BF16_FLAGS, precision="bf16"),
        )
    )
    register(
        Candidate(
            "torch-compile",
            "torch_native",
            "torch.compile with inductor; its cache lives in uniopt's cache directory",
            _build_compile,
            Requirements(packages=("torch",), min_memory_bytes=4 * 2**30, setting="use_model_compilation"),
        )
    )
