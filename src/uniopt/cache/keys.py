"""Cache keys: canonical hashes of everything that changes an optimized artifact.

A key is the full sha256 of the canonical JSON of a mapping of parts (weights hash, module code,
input signature, export settings, library versions, precision, instruction-set tier, ...).
Nothing here imports torch or numpy unless it is handed a tensor or a module.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import importlib.metadata
import inspect
import json
import math
import sys
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "STATE_BUFFERS_ATTRIBUTE",
    "STATE_BUFFER_NAMES",
    "cache_key",
    "hash_inputs",
    "hash_module",
    "input_signature",
    "jsonable",
    "library_versions",
]

#: Buffer names that hold a module's running state, not constants: key/value caches, written in
#: place on every call (Fish-Speech's, gpt-fast's and torchtune's ``KVCache`` all use these names).
STATE_BUFFER_NAMES = frozenset({"k_cache", "v_cache"})
#: A module attribute listing more of *its own* buffers (local names) that hold running state.
STATE_BUFFERS_ATTRIBUTE = "uniopt_state_buffers"

# Distribution names tried for each library, canonical name first.
_LIBRARIES: dict[str, tuple[str, ...]] = {
    "uniopt": ("uniopt",),
    "torch": ("torch",),
    "onnx": ("onnx",),
    "onnxruntime": (
        "onnxruntime",
        "onnxruntime-gpu",
        "onnxruntime-openvino",
        "onnxruntime-directml",
        "onnxruntime-training",
    ),
    "openvino": ("openvino",),
    "nncf": ("nncf",),
    "transformers": ("transformers",),
}


def jsonable(value: Any) -> Any:
    """Return ``value`` as plain JSON data (tuples, paths, enums, dataclasses converted).

    Raises :class:`TypeError` for values that have no faithful JSON form.
    """
    if isinstance(value, enum.Enum):
        cls = type(value)
        return {"$enum": f"{cls.__module__}.{cls.__qualname__}.{value.name}"}
    if value is None or isinstance(value, (bool, str)):
        return value if not isinstance(value, str) else str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else {"$float": repr(float(value))}
    if isinstance(value, PurePath):
        return value.as_posix()
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"cache key mappings need str keys, got {k!r}")
            out[k] = jsonable(v)
        return out
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [jsonable(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = f"{type(value).__module__}.{type(value).__qualname__}"
        fields = {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"$dataclass": name, "fields": fields}
    module = type(value).__module__
    if module == "torch" and type(value).__name__ in ("dtype", "device"):
        return str(value)
    if module == "numpy" and hasattr(value, "item"):  # numpy scalar
        return jsonable(value.item())
    raise TypeError(f"cannot use a value of type {type(value).__qualname__} in a cache key")


def cache_key(parts: Mapping[str, Any]) -> str:
    """Return the full sha256 hex digest of the canonical JSON of ``parts``."""
    if not isinstance(parts, Mapping):
        raise TypeError(f"cache_key expects a mapping, got {type(parts).__qualname__}")
    text = json.dumps(jsonable(parts), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _feed(h: Any, *chunks: str | bytes) -> None:
    """Add length-prefixed chunks to a hash so that concatenations cannot collide."""
    for chunk in chunks:
        data = chunk.encode("utf-8") if isinstance(chunk, str) else chunk
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)


def _is_torch_class(cls: type) -> bool:
    name = cls.__module__ or ""
    return name in ("torch", "builtins") or name.startswith("torch.")


def _class_source(cls: type) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


def _feed_tensor(h: Any, tensor: torch.Tensor) -> None:
    import torch

    t = tensor.detach()
    if t.is_quantized:
        if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            _feed(h, f"q:{t.qscheme()}:{t.q_scale()!r}:{t.q_zero_point()}")
        else:
            _feed(h, f"q:{t.qscheme()}:{t.q_per_channel_axis()}")
            _feed_tensor(h, t.q_per_channel_scales())
            _feed_tensor(h, t.q_per_channel_zero_points())
        t = t.int_repr()
    if t.layout != torch.strided:
        t = t.to_dense()
    _feed(h, str(t.dtype), json.dumps(list(t.shape)))
    flat = t.cpu().contiguous().reshape(-1)
    _feed(h, flat.view(torch.uint8).numpy().tobytes())


def _feed_value(h: Any, value: Any) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        _feed(h, "tensor")
        _feed_tensor(h, value)
    elif isinstance(value, (list, tuple)):
        _feed(h, f"seq:{len(value)}")
        for item in value:
            _feed_value(h, item)
    elif isinstance(value, Mapping):
        _feed(h, f"map:{len(value)}")
        for key, item in value.items():
            _feed(h, repr(key))
            _feed_value(h, item)
    elif type(value).__module__ == "numpy" and hasattr(value, "tobytes"):
        _feed(h, "ndarray", str(value.dtype), json.dumps(list(value.shape)))
        _feed(h, value.tobytes())
    else:
        try:
            _feed(h, "json", json.dumps(jsonable(value), sort_keys=True))
        except TypeError:
            _feed(h, "repr", repr(value))


def _plain(value: Any) -> bool:
    """Whether an attribute value is plain data that is hashed (numbers, strings, dtypes, enums, tuples of them)."""
    if isinstance(value, (bool, int, float, str, enum.Enum)):
        return True
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return False


def _module_attributes() -> frozenset[str]:
    """The instance attributes every ``nn.Module`` has (hooks, registries, ``training``)."""
    import torch

    return frozenset(vars(torch.nn.Module())) | {STATE_BUFFERS_ATTRIBUTE}


def _state_buffers(module: torch.nn.Module, declared: Iterable[str]) -> set[str]:
    """Qualified names of the buffers that hold running state (see :func:`hash_module`)."""
    state = set(declared)
    for prefix, sub in module.named_modules(remove_duplicate=False):
        local = STATE_BUFFER_NAMES | set(getattr(sub, STATE_BUFFERS_ATTRIBUTE, ()))
        for name, _ in sub.named_buffers(recurse=False):
            if name in local:
                state.add(f"{prefix}.{name}" if prefix else name)
    return state


def _torchscript_code(module: torch.nn.Module) -> str:
    """The TorchScript source of every method of a scripted module ("" where it has none)."""
    methods: list[str] = getattr(getattr(module, "_c", None), "_method_names", lambda: [])()
    return "\n".join(getattr(module, m).code for m in sorted(methods) if hasattr(getattr(module, m), "code"))


def _feed_state(h: Any, value: Any) -> None:
    """A state buffer: its dtype and shape, never its values."""
    _feed(h, "state", str(value.dtype), json.dumps(list(value.shape)))


def hash_module(module: torch.nn.Module, *, state_buffers: Iterable[str] = ()) -> str:
    """Return a sha256 of a module's classes, code, structure, plain attributes, weights and buffers.

    Covers the qualified name and source of every non-torch class in the MRO of the module and of
    each submodule; ``repr(module)`` (hyper-parameters such as dropout rates and strides); every
    plain attribute of every submodule (``bool``, ``int``, ``float``, ``str``, enums, dtypes and
    lists or tuples of them, such as a ``scale`` or an ``eos_id``; not ``training``, which the
    optimizer sets, nor tensors or other objects that are not buffers); every ``state_dict``
    entry; and every non-persistent buffer.

    The rule for buffers: every buffer's name, dtype and shape always count; its values count
    unless the buffer holds *running state*, which a call overwrites (a key/value cache) and which
    would otherwise change the key on every call. State buffers are those named
    :data:`STATE_BUFFER_NAMES` (``k_cache``, ``v_cache``), those a module lists by local name in
    its :data:`STATE_BUFFERS_ATTRIBUTE` attribute (``uniopt_state_buffers``), and the qualified
    names passed as ``state_buffers``. Every other buffer, persistent or not (rotary tables,
    masks, offsets, scales), is a constant of the module and is hashed by value.
    """
    import torch

    h = hashlib.sha256()
    cls = type(module)
    _feed(h, "uniopt-module-hash-v2", f"{cls.__module__}.{cls.__qualname__}")
    own = _module_attributes()
    seen: set[type] = set()
    for name, sub in module.named_modules():
        _feed(h, "module", name, f"{type(sub).__module__}.{type(sub).__qualname__}")
        for klass in type(sub).__mro__:
            if klass in seen or _is_torch_class(klass):
                continue
            seen.add(klass)
            _feed(h, "class", f"{klass.__module__}.{klass.__qualname__}", _class_source(klass))
        if isinstance(sub, torch.jit.ScriptModule):  # its code is TorchScript, not its class's source
            _feed(h, "torchscript", name, _torchscript_code(sub))
        for attr, value in sorted(vars(sub).items()):
            if attr not in own and _plain(value):
                _feed(h, "attribute", attr, json.dumps(jsonable(value), sort_keys=True))
    _feed(h, "repr", repr(module))
    state = _state_buffers(module, state_buffers)
    entries = module.state_dict()
    for key, value in entries.items():
        _feed(h, "entry", key)
        if key in state and hasattr(value, "shape"):
            _feed_state(h, value)
        else:
            _feed_value(h, value)
    for key, value in module.named_buffers(remove_duplicate=False):
        if key in entries:
            continue
        _feed(h, "buffer", key)
        if key in state:
            _feed_state(h, value)
        else:
            _feed_value(h, value)
    return h.hexdigest()


def hash_inputs(input_sets: Iterable[Any]) -> str:
    """Return a sha256 of the values (not only the shapes) of a sequence of input sets."""
    h = hashlib.sha256()
    _feed(h, "uniopt-inputs-hash-v1")
    for inputs in input_sets:
        _feed(h, "set")
        _feed_value(h, inputs)
    return h.hexdigest()


def library_versions() -> dict[str, str | None]:
    """Return installed versions of the libraries that shape artifacts, without importing them.

    A non-canonical distribution (``onnxruntime-gpu``) is reported as ``"name==version"``.
    """
    versions: dict[str, str | None] = {}
    for library, distributions in _LIBRARIES.items():
        versions[library] = None
        for dist in distributions:
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
            versions[library] = version if dist == library else f"{dist}=={version}"
            break
    return versions


def _describe(value: Any) -> Any:
    torch = sys.modules.get("torch")
    numpy = sys.modules.get("numpy")
    if torch is not None and isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return {"type": "tensor", "dtype": dtype, "shape": list(value.shape)}
    if numpy is not None and isinstance(value, numpy.ndarray):
        return {"type": "ndarray", "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, tuple):
        return {"type": "tuple", "items": [_describe(v) for v in value]}
    if isinstance(value, list):
        return {"type": "list", "items": [_describe(v) for v in value]}
    if isinstance(value, Mapping):
        items = []
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"input dictionaries need str keys, got {k!r}")
            items.append([k, _describe(v)])
        return {"type": "dict", "items": items}
    if numpy is not None and isinstance(value, numpy.generic):
        return {"type": f"numpy.{value.dtype}", "value": jsonable(value.item())}
    if isinstance(value, enum.Enum):
        return {"type": "enum", "value": jsonable(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"type": type(value).__name__, "value": jsonable(value)}
    raise TypeError(f"cannot describe an input of type {type(value).__qualname__}")


def input_signature(inputs: Any) -> list[Any]:
    """Describe example inputs as JSON data: dtype and shape of arrays, type and value of scalars.

    ``inputs`` is usually the tuple of positional arguments; a single value counts as ``(value,)``.
    Containers keep their type and order, since both change an exported graph.
    """
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    return [_describe(v) for v in inputs]
