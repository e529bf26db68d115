"""Candidates that stay in PyTorch: dynamic int8, weight-only int8, bf16 weights, and torch.compile.

inductor's cache for a compiled component lives in a cache entry keyed by the component's content,
the compile mode and the library versions (in its ``runtime/`` folder), so it is counted, evicted
and cleared with that entry. A ``TORCHINDUCTOR_CACHE_DIR`` the user set is left as it is.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import NotApplicable
from ..tiers.cpu import BF16_FLAGS
from .candidate import BuildContext, BuildStep, Candidate, Requirements, Stage
from .hookspecs import hookimpl
from .memory_costs import memory_step

__all__ = [
    "INT8_WEIGHT_FLAGS",
    "DynamicInt8Linear",
    "Int8Backend",
    "Int8WeightLinear",
    "TorchDynamicInt8",
    "int8_backend",
    "int8_weight_kernel_missing",
    "quantize_int8_weights",
    "quantize_weight_int8",
]

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


#: The ATen op behind :class:`Int8WeightLinear`, by name for the probe (a CPU kernel since torch 2.3).
_INT8_WEIGHT_OP = "_weight_int8pack_mm"
#: The instruction sets its CPU kernel is vectorised for (any one); elsewhere it is a scalar loop.
INT8_WEIGHT_FLAGS: tuple[str, ...] = ("avx512f", "avx2", "neon")


def quantize_weight_int8(weight: torch.Tensor, block_elements: int = 2**20) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of a ``[out, in]`` weight with one scale per output channel: ``(int8 weight, scales)``.

    Each scale is the channel's largest magnitude over 127, rounded up to a bf16 value (the kernel
    takes its scales in the activations' dtype), so ``int8 * scale`` is exactly the weight the
    kernel multiplies by and no value is clipped. An all-zero channel gets scale 1. Rows are
    converted about ``block_elements`` values at a time, so the float temporaries stay small next
    to a large projection.
    """
    weight = weight.detach()
    quantized = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=Int8WeightLinear.COMPUTE_DTYPE, device=weight.device)
    rows = max(1, block_elements // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        block = weight[start : start + rows].float()
        ideal = torch.linalg.vector_norm(block, ord=float("inf"), dim=1) / 127
        ideal = torch.where(ideal > 0, ideal, torch.ones_like(ideal))
        scale = ideal.to(scales.dtype)
        scale = torch.where(scale.float() < ideal, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
        scales[start : start + rows] = scale
        quantized[start : start + rows] = torch.div(block, scale.float()[:, None]).round_().clamp_(-127, 127)
    return quantized, scales


class Int8WeightLinear(torch.nn.Module):
    """A Linear holding int8 weights (one scale per output channel) that computes with float activations.

    ``torch.ops.aten._weight_int8pack_mm`` reads the int8 weight and scales each product as it
    accumulates in float32. On x86 its CPU kernel is vectorised (AVX-512, AVX2) for bf16
    activations only; for float32 it runs a scalar loop several times slower than the FP32 layer.
    So activations go in as bf16 and the result (rounded to bf16 by the kernel) comes back in the
    input's dtype, with the bias added there: only the layer's input and output are rounded, the
    rest of the model (norms, attention, residual sums, caches) stays in float32.

    The vectorised kernel reads the activations with aligned loads in blocks of 16 along the input
    dimension, so ``in_features`` must be a multiple of :attr:`IN_FEATURES_MULTIPLE` (see
    :meth:`takes`) and the activations are always copied into a fresh contiguous bf16 buffer.
    """

    #: The dtype the kernel computes in, and its scales' dtype.
    COMPUTE_DTYPE = torch.bfloat16
    #: The input dimension the vectorised kernel steps through (16 bf16 values per AVX-512 load).
    IN_FEATURES_MULTIPLE = 16

    weight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def takes(cls, layer: torch.nn.Module) -> bool:
        """Whether ``layer`` is a plain ``nn.Linear`` this kernel can compute."""
        return type(layer) is torch.nn.Linear and layer.in_features % cls.IN_FEATURES_MULTIPLE == 0

    @classmethod
    def from_linear(
        cls, layer: torch.nn.Module, quantized: dict[int, tuple[torch.Tensor, torch.Tensor]]
    ) -> Int8WeightLinear:
        """The int8 layer for ``layer``; ``quantized`` holds the weights done already (a shared one is done once)."""
        assert isinstance(layer, torch.nn.Linear)
        key = id(layer.weight)
        if key not in quantized:
            quantized[key] = quantize_weight_int8(layer.weight)
        weight, scales = quantized[key]
        return cls(weight, scales, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(
            dtype=self.COMPUTE_DTYPE, memory_format=torch.contiguous_format, copy=True
        )
        y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight this layer multiplies by."""
        return self.weight.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight=int8, activations={str(self.COMPUTE_DTYPE).removeprefix('torch.')}"
        )


@functools.cache
def int8_weight_kernel_missing() -> str | None:
    """None when this torch has a working CPU kernel for :class:`Int8WeightLinear`, else why not.

    Probed once per process with a tiny product whose answer is known.
    """
    dtype = Int8WeightLinear.COMPUTE_DTYPE
    x = torch.linspace(-2, 2, 64).reshape(2, 32).to(dtype)
    weight = torch.arange(-64, 64).reshape(4, 32).to(torch.int8)
    scales = torch.tensor([0.5, 0.25, 1.0, 2.0], dtype=dtype)
    try:
        got = getattr(torch.ops.aten, _INT8_WEIGHT_OP)(x, weight, scales)
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"torch {torch.__version__} has no CPU kernel aten.{_INT8_WEIGHT_OP} for {dtype} ({first})"
    expected = x.float() @ (weight.float() * scales.float()[:, None]).t()
    if got.shape != expected.shape or not torch.allclose(got.float(), expected, rtol=1e-2, atol=1e-2):
        return f"aten.{_INT8_WEIGHT_OP} gives wrong results on torch {torch.__version__}"
    return None


def quantize_int8_weights(module: torch.nn.Module) -> torch.nn.Module:
    """A lean copy of ``module`` in which each Linear the kernel takes is an :class:`Int8WeightLinear`.

    So is each projection that offers ``to_linear()`` (an output projection tied to an embedding:
    the copy's embedding stays float for its lookups). A shared weight is quantized once and
    stays shared. The copy shares the weights about to be quantized with ``module``, which is
    left as it was. Raises :class:`NotApplicable` when there is nothing to quantize.
    """
    unfit = f"no nn.Linear with in_features a multiple of {Int8WeightLinear.IN_FEATURES_MULTIPLE} to quantize"
    layers = [m for m in module.modules() if Int8WeightLinear.takes(m)]
    if not layers and not any(callable(getattr(m, "to_linear", None)) for m in module.modules()):
        raise NotApplicable(unfit)
    quantized: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def replace(layer: torch.nn.Module) -> torch.nn.Module | None:
        to_linear = getattr(layer, "to_linear", None)
        linear = to_linear() if callable(to_linear) else layer
        # a Linear the kernel cannot take stays as it was (a tied projection stays tied)
        return Int8WeightLinear.from_linear(linear, quantized) if Int8WeightLinear.takes(linear) else None

    work = _replace_modules(lean_copy(module, {id(p): p for m in layers for p in m.parameters()}), replace)
    if not quantized:
        raise NotApplicable(unfit)
    return work.eval()


def _build_int8_weights(component: Any, context: BuildContext) -> Stage:
    missing = int8_weight_kernel_missing()
    if missing:
        raise NotApplicable(missing)
    with memory_step("torch-int8-weights", component, context):
        work = quantize_int8_weights(component.module)
    kept = [
        f"{name or 'module'} ({type(m).__name__})"
        for name, m in work.named_modules()
        if type(m) is torch.nn.Linear or callable(getattr(m, "to_linear", None))
    ]
    layers = sum(isinstance(m, Int8WeightLinear) for m in work.modules())
    info = {"int8_layers": layers, "kept_float": kept, "activations": str(Int8WeightLinear.COMPUTE_DTYPE)}
    return Stage("torch-int8-weights", work, info)


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


#: The variable inductor reads its cache directory from, at each write.
INDUCTOR_CACHE_VAR = "TORCHINDUCTOR_CACHE_DIR"
_inductor_dir_lock = threading.Lock()  # the variable is process-wide: one compile at a time points it
_users_dir_logged: set[str] = set()


def inductor_key(component: Any, settings: Any) -> dict[str, Any]:
    """What identifies inductor's cache for a component: its content, the compile mode, dynamic shapes, versions."""
    from ..cache import library_versions

    return {
        "artifact": "inductor-cache",
        "component": component.key(),
        "mode": settings.compile_mode,
        "dynamic": bool(component.dynamic_axes),
        "versions": library_versions(),
    }


def _users_inductor_dir() -> str | None:
    """``TORCHINDUCTOR_CACHE_DIR`` when the user set it (inductor itself sets it to its default)."""
    value = os.environ.get(INDUCTOR_CACHE_VAR)
    if value is None:
        return None
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return value
    return None if os.path.abspath(value) == os.path.abspath(default_cache_dir()) else value


def inductor_cache_dir(component: Any, context: BuildContext) -> Path | None:
    """The folder inductor's cache for ``component`` goes to: its entry's ``runtime/`` folder.

    None without a cache, or when the user set ``TORCHINDUCTOR_CACHE_DIR`` (kept, and logged once).
    """
    if context.cache is None:
        return None
    users = _users_inductor_dir()
    if users is not None:
        if users not in _users_dir_logged:
            _users_dir_logged.add(users)
            log.info("inductor's cache stays in %s=%s, outside uniopt's cache", INDUCTOR_CACHE_VAR, users)
        return None
    from ..cache import cache_key

    description = {"component": component.name, "compile_mode": context.settings.compile_mode}
    key = cache_key(inductor_key(component, context.settings))
    entry, _ = context.cache.get_or_build(key, lambda _: None, kind="inductor", description=description)
    folder: Path | None = context.cache.runtime_dir(entry.path)
    return folder


def _clear_inductor_caches() -> None:
    """Forget inductor's in-memory code caches, so kernels are written to (and read from) the directory now set."""
    from torch._inductor import utils

    clear = getattr(utils, "clear_caches", None) or getattr(utils, "clear_inductor_caches", None)
    if callable(clear):
        clear()


@contextlib.contextmanager
def inductor_cache_in(folder: Path | None) -> Iterator[None]:
    """Point ``TORCHINDUCTOR_CACHE_DIR`` at ``folder`` for the block (nothing when None); restore it after."""
    if folder is None:
        yield
        return
    with _inductor_dir_lock:
        before = os.environ.get(INDUCTOR_CACHE_VAR)
        os.environ[INDUCTOR_CACHE_VAR] = str(folder)
        _clear_inductor_caches()
        try:
            yield
        finally:
            _clear_inductor_caches()
            if before is None:
                os.environ.pop(INDUCTOR_CACHE_VAR, None)
            else:
                os.environ[INDUCTOR_CACHE_VAR] = before


def _build_compile(component: Any, context: BuildContext) -> Stage:
    """Compile, and pay the compile cost now: a first call over ``compile_budget_s`` is a failure.

    The compile and its first call write inductor's cache into the component's entry
    (:func:`inductor_cache_dir`).
    """
    settings = context.settings
    folder = inductor_cache_dir(component, context)
    compiled = torch.compile(component.module, mode=settings.compile_mode, dynamic=bool(component.dynamic_axes))
    started = time.perf_counter()
    with memory_step("torch-compile", component, context), inductor_cache_in(folder), torch.inference_mode():
        compiled(*copy.deepcopy(component.example_inputs))
    seconds = time.perf_counter() - started
    if seconds > settings.compile_budget_s:
        raise TimeoutError(
            f"first call compiled in {seconds:.0f} s, over UNIOPT_COMPILE_BUDGET={settings.compile_budget_s:g} s"
        )
    info: dict[str, Any] = {"compile_seconds": seconds}
    if folder is not None:
        info["inductor_cache"] = str(folder)
    return Stage("torch-compile", compiled, info)


@hookimpl
def uniopt_register_candidates(register: Any) -> None:
    register(
        Candidate(
            "torch-int8",
            "torch_native",
            "dynamic int8 Linear layers (quantize_dynamic)",
            _build_int8({torch.nn.Linear}, "torch-int8"),
            Requirements(packages=("torch",), precision="int8", setting="use_model_quantization"),
            (BuildStep("torch-int8"),),
        )
    )
    register(
        Candidate(
            "torch-int8-rnn",
            "torch_native",
            "dynamic int8 Linear, LSTM and GRU layers",
            _build_int8({torch.nn.Linear, *_RNN_TYPES}, "torch-int8-rnn"),
            Requirements(packages=("torch",), precision="int8", setting="use_model_quantization"),
            (BuildStep("torch-int8"),),
        )
    )
    register(
        Candidate(
            "torch-int8-weights",
            "torch_native",
            "int8 Linear weights, one scale per output channel, bf16 activations (aten._weight_int8pack_mm)",
            _build_int8_weights,
            Requirements(
                packages=("torch",),
                cpu_flags_any=INT8_WEIGHT_FLAGS,
                precision="int8",
                setting="use_model_quantization",
            ),
            (BuildStep("torch-int8-weights"),),
        )
    )
    register(
        Candidate(
            "torch-bf16",
            "torch_native",
            "bf16 weights and activations in eager PyTorch",
            _build_bf16,
            Requirements(packages=("torch",), cpu_flags_any=BF16_FLAGS, precision="bf16"),
            (BuildStep("torch-copy"),),
        )
    )
    register(
        Candidate(
            "torch-compile",
            "torch_native",
            "torch.compile with inductor; its cache lives in the component's cache entry",
            _build_compile,
            Requirements(packages=("torch",), min_memory_bytes=4 * 2**30, setting="use_model_compilation"),
            (BuildStep("torch-compile"),),
        )
    )
