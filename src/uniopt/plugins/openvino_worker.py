"""A trial process for one OpenVINO model: compile an IR, then run it on the arrays it is sent.

Run as a script by :mod:`uniopt.plugins.openvino_trial` (never imported by uniopt): it imports
OpenVINO and numpy only, so a candidate that loses takes OpenVINO's CPU plugin, its JIT kernels
and its heap with it when this process ends. It talks over the connection whose file descriptor
is its first argument, in pickled tuples:

- ``("compile", xml, device, config)`` -> ``("ok", precision)`` or ``("error", type, message)``
- ``("infer", arrays)`` -> ``("ok", outputs)`` or ``("error", type, message)``
- ``("run", calls)`` -> ``("ok", seconds)``: each call ``(reset, arrays)`` (pickled) runs in
  turn, the model's states reset first where ``reset`` is true; ``seconds`` is what they took
  here, without the messages' round trip (for timing a decode loop's steps)
- ``("exit",)`` or the connection closed: the process ends.

Arrays travel through a shared buffer when the parent passes one (a memfd, the second argument):
an array in a message is then ``(offset, shape, dtype)`` in that buffer, and the outputs are
written back into it at offset 0 when they fit (the inputs are no longer needed by then).
Pickled through the connection, a 4 MB array took 6.5 ms each way on a 2-vCPU VM.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # run by path: uniopt's plugin modules must not shadow top-level ones

import mmap  # noqa: E402
import time  # noqa: E402
from multiprocessing.connection import Connection  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402


def _error(exc: BaseException) -> tuple[str, str, str]:
    return ("error", type(exc).__name__, str(exc).strip()[:2000])


def _compile(message: tuple[Any, ...]) -> tuple[Any, Any]:
    _, xml, device, config = message
    import openvino as ov

    compiled = ov.Core().compile_model(xml, device, config)
    return compiled, compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


class SharedArrays:
    """Arrays placed in a buffer both processes map: ``(offset, shape, dtype)`` stands for an array.

    ``fd`` is a file whose size the writer sets; the reader maps it again when it has grown.
    """

    ALIGN = 64

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.map: mmap.mmap | None = None

    def _mapped(self, size: int) -> mmap.mmap:
        if self.map is None or len(self.map) < size:
            if os.fstat(self.fd).st_size < size:
                os.ftruncate(self.fd, size)
            if self.map is not None:
                self.map.close()
            self.map = mmap.mmap(self.fd, os.fstat(self.fd).st_size)
        return self.map

    def put(self, arrays: list[Any]) -> list[tuple[int, tuple[int, ...], str]]:
        """Copy ``arrays`` into the buffer (growing it as needed); their places in it."""
        places, offset = [], 0
        for array in arrays:
            places.append((offset, tuple(array.shape), array.dtype.str))
            offset += -(-array.nbytes // self.ALIGN) * self.ALIGN
        buffer = self._mapped(max(offset, 1))
        for array, (start, shape, dtype) in zip(arrays, places, strict=True):
            np.copyto(np.ndarray(shape, dtype, buffer=buffer, offset=start), array, casting="no")
        return places

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
        os.close(self.fd)

    def get(self, places: list[tuple[int, tuple[int, ...], str]], copy: bool) -> list[Any]:
        """The arrays at ``places``: views of the buffer, or copies with ``copy``."""
        end = max((start + int(np.prod(shape)) * np.dtype(dtype).itemsize for start, shape, dtype in places), default=1)
        buffer = self._mapped(end)
        views = [np.ndarray(shape, dtype, buffer=buffer, offset=start) for start, shape, dtype in places]
        return [v.copy() for v in views] if copy else views


def serve(conn: Connection, shared: SharedArrays | None = None) -> None:
    """Answer messages until told to exit or the parent goes away."""
    request, outputs = None, []
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "exit":
            return
        try:
            if message[0] == "compile":
                compiled, precision = _compile(message)
                request, outputs = compiled.create_infer_request(), list(compiled.outputs)
                reply: tuple[Any, ...] = ("ok", precision)
            elif message[0] == "infer" and request is not None:
                arrays = message[1] if shared is None else shared.get(message[1], copy=False)
                request.infer(arrays)  # copies its inputs (share_inputs=False): the buffer is free again
                del arrays
                results = [request.get_tensor(port).data for port in outputs]
                if shared is None:
                    reply = ("ok", [r.copy() for r in results])
                else:
                    reply = ("shared", shared.put(results))
            elif message[0] == "run" and request is not None:
                started = time.perf_counter()
                for reset, arrays in message[1]:
                    if reset:
                        request.reset_state()
                    request.infer(arrays)
                reply = ("ok", time.perf_counter() - started)
            else:
                reply = ("error", "RuntimeError", f"unexpected message {message[0]!r}")
        except Exception as exc:  # sent to the parent, which raises it there
            reply = _error(exc)
        conn.send(reply)


if __name__ == "__main__":
    try:
        with open("/proc/self/oom_score_adj", "w") as adj:  # under the limit, the kernel kills a trial first
            adj.write("1000")
    except OSError:
        pass
    serve(Connection(int(sys.argv[1])), SharedArrays(int(sys.argv[2])) if len(sys.argv) > 2 else None)
