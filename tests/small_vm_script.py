"""``scripts/small_vm.py`` (run a command in a 1.3 CPU / 1.5 GiB cgroup), importable by the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "small_vm.py"
_spec = importlib.util.spec_from_file_location("small_vm", _PATH)
assert _spec is not None and _spec.loader is not None
small_vm = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = small_vm  # dataclasses look their module up there
_spec.loader.exec_module(small_vm)
