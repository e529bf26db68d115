"""OpenVINO candidates tried in a process of their own, so that one that loses leaves nothing resident.

Compiling an OpenVINO model loads its CPU plugin and fills oneDNN's JIT-kernel cache and the
plugin's heap, and none of that goes back to the system when the compiled model is freed: on
diarization in auto mode the engine's process held 592 MiB after the search, against 401 MiB
for a warm start that loads only the chosen stages and 428 MiB with OpenVINO left out
(``python benchmarks/memory.py diarization --mode auto``, 2-vCPU Zen 4).

So in auto mode (``BuildContext.trial``) an OpenVINO challenger is compiled and run in a trial
process (:mod:`uniopt.plugins.openvino_worker`, started with ``sys.executable``; it imports only
OpenVINO and numpy). The guard and the interleaved timing call it through a connection; the
arrays go through a shared buffer (a memfd) where ``os.memfd_create`` exists, else pickled. The
round trip is part of the candidate's timing, a small bias against it: about 0.2 ms per call
(``python benchmarks/trial_overhead.py``). The optimizer compiles the winner again in the
engine's process (from the cached IR and OpenVINO's blob cache) and checks it again; a loser ends
with its process. The trial process asks the kernel to kill it first under a memory limit;
killed, it is a refusal for memory (:class:`~uniopt.errors.StepKilledError`).
``UNIOPT_TRIAL_PROCESSES=false`` compiles every candidate in the engine's process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from typing import Any

from ..errors import StepKilledError
from ..memory import note_child_peak, process_status_bytes
from .openvino_worker import SharedArrays

__all__ = ["TrialProcess", "TrialTimeout", "TrialUnavailable", "trial_wanted"]

log = logging.getLogger("uniopt")

WORKER = Path(__file__).with_name("openvino_worker.py")
#: A compile or a call that takes longer than this ends the trial process (a hang must not stop a start).
TIMEOUT_S = 900.0


class TrialTimeout(RuntimeError):
    """The trial process did not answer within its time limit and was killed."""


class TrialUnavailable(RuntimeError):
    """The trial process did not start, or exited on its own (not by a signal): the model itself is not to blame.

    The builder then compiles the candidate in the engine's process. A process killed by a signal
    while compiling is not this: the same compile could take the engine down.
    """


def _shared_buffer() -> SharedArrays | None:
    """A buffer both processes map (a memfd); None where there is none (arrays are pickled then)."""
    try:
        return SharedArrays(os.memfd_create("uniopt-trial"))
    except (AttributeError, OSError):  # no memfd_create here, or a sandbox refuses it
        return None


def trial_wanted(context: Any) -> bool:
    """Whether this build is a trial (auto mode's challengers) and trial processes are allowed."""
    return bool(getattr(context, "trial", False)) and context.settings.trial_processes


def _stop(proc: subprocess.Popen[bytes], conn: Any, shared: SharedArrays | None) -> None:
    try:
        conn.send(("exit",))
    except (OSError, ValueError):
        pass
    conn.close()
    if shared is not None:
        shared.close()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class TrialProcess:
    """One IR compiled and served by a process of its own; :meth:`run_arrays` runs it there.

    The process ends when this object is closed or garbage-collected. ``what`` names it in errors.
    """

    def __init__(
        self, xml: Path, device: str, config: dict[str, str], what: str, timeout_s: float = TIMEOUT_S, wait: bool = True
    ):
        """Start the process and compile ``xml`` there; without ``wait``, :meth:`wait_compiled` waits for
        the compile (which then notes no peak: the caller counts the processes compiling at once)."""
        self.what = what
        self.timeout_s = timeout_s
        ours, theirs = multiprocessing.Pipe()
        self._shared = _shared_buffer()
        fds = [theirs.fileno(), *([self._shared.fd] if self._shared is not None else [])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # what this process imports
        try:
            if not sys.executable or getattr(sys, "frozen", False):  # no interpreter, or it is the application
                raise OSError("no Python interpreter to start (sys.executable is empty or a frozen application)")
            self._proc = subprocess.Popen(
                [sys.executable, str(WORKER), *map(str, fds)],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            for end in (ours, theirs, self._shared):
                if end is not None:
                    end.close()
            raise TrialUnavailable(f"{what}: the trial process did not start: {exc}") from exc
        theirs.close()
        self._conn = ours
        self._lock = threading.RLock()
        self._close = weakref.finalize(self, _stop, self._proc, ours, self._shared)
        self.pid = self._proc.pid
        #: The precision OpenVINO runs the model in, as it reports it (``f32``, ``bf16``, ...).
        self.precision = ""
        self._compiling = True
        try:
            self._send(("compile", str(xml), device, config))
        except BaseException:
            self.close()
            raise
        if wait:
            self.wait_compiled()
            note_child_peak(self.peak_bytes())

    def wait_compiled(self) -> None:
        """Wait for the compile the process started with (at once when it is done already)."""
        with self._lock:
            if not self._compiling:
                return
            try:
                self.precision = self._receive()
            except BaseException:
                self.close()
                raise
            self._compiling = False

    def run_arrays(self, arrays: list[Any]) -> list[Any]:
        """The model's outputs for ``arrays``, computed in the trial process."""
        with self._lock:  # one request at a time (the buffer is the request's); stages are shared across threads
            self._check_open()
            if self._shared is None:
                return self._ask(("infer", arrays))  # type: ignore[no-any-return]
            places = self._ask(("infer", self._shared.put(arrays)))
            return self._shared.get(places, copy=True)

    def run_calls(self, calls: list[tuple[bool, list[Any]]]) -> float:
        """Seconds the trial process took to run ``calls`` (``(reset states first, arrays)`` each) in turn."""
        with self._lock:
            return float(self._ask(("run", calls)))

    def peak_bytes(self) -> int:
        """The trial process's peak resident memory so far (all of it is beside the engine's process)."""
        return process_status_bytes("VmHWM", self.pid) or 0

    def rss_bytes(self) -> int:
        """What the trial process holds now: the compiled model, its runtime and an interpreter."""
        return process_status_bytes("VmRSS", self.pid) or 0

    def close(self) -> None:
        """End the process; a call running in another thread finishes first (the buffer is its until then)."""
        with self._lock:
            self._close()

    def _check_open(self) -> None:
        if not self._close.alive:
            raise RuntimeError(f"{self.what}: the trial process was closed")

    def _ask(self, message: tuple[Any, ...]) -> Any:
        self.wait_compiled()
        self._send(message)
        return self._receive()

    def _send(self, message: tuple[Any, ...]) -> None:
        self._check_open()
        try:
            self._conn.send(message)
        except (EOFError, OSError) as exc:
            raise self._died() from exc

    def _receive(self) -> Any:
        self._check_open()
        try:
            if not self._conn.poll(self.timeout_s):
                self._proc.kill()
                self.close()
                raise TrialTimeout(f"{self.what}: no answer in {self.timeout_s:.0f} s; its process was killed")
            reply = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise self._died() from exc
        if reply[0] in ("ok", "shared"):
            return reply[1]
        _, kind, text = reply
        raise RuntimeError(f"{kind}: {text}")

    def _died(self) -> Exception:
        code = self._proc.wait()
        self.close()
        if code == -signal.SIGKILL:
            return StepKilledError(self.what)
        if code < 0:
            return RuntimeError(f"{self.what}: the trial process died of signal {signal.Signals(-code).name}")
        return TrialUnavailable(f"{self.what}: the trial process exited with status {code}")

    def __repr__(self) -> str:
        return f"TrialProcess({self.what!r}, pid={self.pid}, open={self._close.alive})"
