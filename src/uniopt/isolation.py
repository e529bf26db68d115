"""Build steps in a forked child process, so that what they allocate and import goes back to the system.

An ONNX export, an OpenVINO conversion or nncf compression imports libraries (torch.onnx,
onnx, onnxscript, nncf: 10-70 MiB each) and leaves freed heap that a
Python process rarely hands back: 70-95 MiB stayed resident after exporting the diarization or
phoneme models in-process, although only the files are used afterwards. Run in a child forked
from this process, the step sees the module exactly as it is (copy-on-write: nothing is pickled
or copied), writes its files, and everything else ends with the child.

The child:

- runs PyTorch on one thread: GNU OpenMP hangs in a forked child that starts a parallel region
  after the parent used one;
- asks to be the first process the kernel kills when the memory limit is reached
  (``oom_score_adj`` 1000), so an estimate that was too low costs the candidate, not the engine;
- sends back the step's return value and the memory steps it measured, or the exception it
  raised (pickled; as a ``RuntimeError`` naming its type when it does not pickle).

No ONNX Runtime session is made in a child: a session freed in a forked child of a process that
has used ONNX Runtime hangs. The steps that make one (ORT optimization, the export's check at
other sizes) run in the engine's process; ORT quantization, which edits the ONNX file only, runs
in a child. The child never collects the parent's objects (``gc.freeze``; the parent collects its
garbage just before forking), so no session of the parent's is freed there either.

Where ``fork`` is missing (not Linux/macOS), CUDA is initialised (a forked child cannot use it) or
``UNIOPT_ISOLATE_BUILDS=false`` (``Settings.isolate_builds``), the step runs in this process.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .errors import StepKilledError
from .memory import note_child_peak

__all__ = ["BuildTimeout", "IsolatedStep", "can_isolate", "isolated_build", "measured_build", "run_isolated"]

log = logging.getLogger("uniopt")
T = TypeVar("T")

#: A child that runs longer than this is killed and the step fails (a hang must not stop a start).
DEFAULT_TIMEOUT_S = 900.0
_POLL_S = 0.02


class BuildTimeout(RuntimeError):
    """An isolated build step ran past its time limit and was killed."""


def can_isolate() -> bool:
    """Whether build steps can run in a forked child here (see the module docstring)."""
    if not hasattr(os, "fork") or sys.platform not in ("linux", "darwin"):
        return False
    torch = sys.modules.get("torch")
    return not (torch is not None and torch.cuda.is_initialized())


def run_isolated(step: Callable[[], T], what: str, timeout_s: float = DEFAULT_TIMEOUT_S, enabled: bool = True) -> T:
    """Run ``step()`` in a forked child and return its result (or raise its exception) here.

    With ``enabled`` false, or where :func:`can_isolate` says no, it runs in this process.

    ``what`` names the step in errors. A child killed by a signal is reported as a
    :class:`~uniopt.errors.MemoryBudgetError` when the signal is SIGKILL (the OOM killer's), else
    as a ``RuntimeError``; one that runs past ``timeout_s`` is killed (:class:`BuildTimeout`).
    """
    started = IsolatedStep(step, what, timeout_s, enabled)
    value = started.result()
    note_child_peak(started.peak_bytes)
    return value


class IsolatedStep(Generic[T]):
    """``step()`` started in a forked child now, as :func:`run_isolated` runs it; :meth:`result` waits for it.

    Steps started one after the other run side by side; the caller counts their peaks
    (:attr:`peak_bytes`, known once :meth:`result` returned or raised). Where the step cannot be
    isolated it runs here, at once.
    """

    def __init__(self, step: Callable[[], T], what: str, timeout_s: float = DEFAULT_TIMEOUT_S, enabled: bool = True):
        self.what, self.timeout_s = what, timeout_s
        #: The child's peak above this process's RSS (0 for a step run here).
        self.peak_bytes = 0
        self._pid: int | None = None
        self._outcome: tuple[bool, Any] | None = None
        if not (enabled and can_isolate()):
            try:
                self._outcome = (True, step())
            except Exception as exc:
                self._outcome = (False, exc)
            return
        self._channel = tempfile.TemporaryFile()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        gc.collect()  # garbage of this process is freed here, where its backends' destructors are safe
        pid = os.fork()
        if pid == 0:  # the child: never returns into the parent's code
            _child(step, self._channel)
        self._pid = pid

    def result(self) -> T:
        """The step's return value, or its exception raised here (waits for the child the first time)."""
        if self._outcome is None:
            self._outcome = self._collect()
        ok, value = self._outcome
        if ok:
            return value  # type: ignore[no-any-return]
        raise value

    def _collect(self) -> tuple[bool, Any]:
        assert self._pid is not None
        with self._channel:
            try:
                status = _wait(self._pid, self.what, self.timeout_s)
            except BuildTimeout as exc:
                return False, exc
            self._channel.seek(0)
            payload = self._channel.read()
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig == signal.SIGKILL:
                return False, StepKilledError(self.what)
            return False, RuntimeError(f"{self.what}: the step's process died of signal {signal.Signals(sig).name}")
        if not payload:
            code = os.WEXITSTATUS(status)
            return False, RuntimeError(f"{self.what}: the step's process exited with status {code} and no result")
        ok, value, self.peak_bytes = pickle.loads(payload)
        return ok, value


def isolated_build(build: Callable[[Any], T], context: Any, what: str) -> Callable[[Any], T]:
    """``build(directory)`` run in a child as ``context.settings`` says; the memory steps it measured are
    appended to ``context.memory_steps``."""

    def run(directory: Any) -> T:
        step = measured_build(build, directory, context)
        result, measured = run_isolated(step, what, enabled=context.settings.isolate_builds)
        context.memory_steps.extend(measured)
        return result

    return run


def measured_build(
    build: Callable[[Any], T], directory: Any, context: Any
) -> Callable[[], tuple[T, list[dict[str, Any]]]]:
    """``build(directory)`` as a step that also returns the memory steps it measured (``context.memory_steps``
    is a copy in a child: the caller appends them to its own)."""
    known = len(context.memory_steps)

    def step() -> tuple[T, list[dict[str, Any]]]:
        return build(directory), context.memory_steps[known:]

    return step


def _wait(pid: int, what: str, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise BuildTimeout(f"{what}: did not finish in {timeout_s:.0f} s; its process was killed")
        time.sleep(_POLL_S)


def _child(step: Callable[[], Any], channel: Any) -> None:
    """Run ``step`` and write ``(ok, value or exception, peak bytes)`` to ``channel``; then exit at once."""
    code = 1
    gc.freeze()  # what the parent left is never collected here (an ORT session freed in a child hangs)
    try:
        try:
            with open("/proc/self/oom_score_adj", "w") as adj:
                adj.write("1000")
        except OSError:
            pass
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(1)
        from .memory import measure_memory

        with measure_memory() as use:
            try:
                result: tuple[bool, Any] = (True, step())
            except BaseException as exc:  # sent to the parent, which raises it
                result = (False, _picklable(exc))
        try:
            payload = pickle.dumps((*result, use.peak_increase_bytes))
        except Exception as exc:  # the result itself does not pickle
            payload = pickle.dumps((False, RuntimeError(f"the step's result cannot be sent back: {exc}"), 0))
        channel.write(payload)
        channel.flush()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
