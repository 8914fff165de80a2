"""How a session is run: a plain `session.run` on CPU, I/O binding with reused page-locked host buffers on a GPU.

A plain run on CUDA copies the input out of pageable memory (the driver stages it through a bounce buffer) and
allocates the output anew on every call. Bound, a batch is copied once into a host buffer that is reused between
batches and page-locked, so the device reads it by DMA, and the logits are written straight into a second
page-locked buffer: one copy each way, no allocation per batch. The buffers are page-locked with the CUDA
runtime's cudaHostRegister, from the libcudart that ONNX Runtime's CUDA provider has loaded; where that fails
they stay pageable, and `BoundRunner.pinned` says so. (This ONNX Runtime's Python API names no 'cuda_pinned'
device for OrtValues, so the pinning is done here.)

make_runner picks the path from the provider the session really runs on; the server (serving/model_holder.py)
and the export's latency gate (tasks/ship/latency.py) both call it, so the gate measures the run path served.
On CPU the plain run stays: binding there was no faster (docs/serving.md has the numbers).
Nothing here imports PyTorch: the serving image has none.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tuneline.core.onnx_session import GPU_PROVIDERS

Runner = Callable[[np.ndarray], np.ndarray]  # float32 pixels [rows, ...] -> float32 logits [rows, ...]
IDLE_BUFFERS = 4  # buffer sets kept between calls: one per run that can be in flight at once (worker + inline)
CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so")


@functools.cache
def _cudart() -> ctypes.CDLL | None:
    """The CUDA runtime already in the process (dlopen by soname finds the one the CUDA provider loaded)."""
    for name in CUDART_NAMES:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
        return lib
    return None


def pin(array: np.ndarray) -> bool:
    """Page-lock `array`'s memory until the array is freed; False where the CUDA runtime cannot (no libcudart,
    no GPU)."""
    lib = _cudart()
    if lib is None or not array.flags.c_contiguous or array.nbytes == 0:
        return False
    pointer = array.ctypes.data
    if lib.cudaHostRegister(pointer, array.nbytes, 0) != 0:  # 0: cudaSuccess; flags 0: cudaHostRegisterDefault
        return False
    done = weakref.finalize(array, lib.cudaHostUnregister, pointer)
    done.atexit = False  # at exit the CUDA context is going away with the process anyway
    return True


def plain_runner(session, input_name: str, output_name: str) -> Runner:
    """`session.run` as is: ONNX Runtime allocates the output, no buffer outlives a call."""
    def run(pixels: np.ndarray) -> np.ndarray:
        return session.run([output_name], {input_name: pixels})[0]
    return run


@dataclass
class _Buffers:
    binding: object           # onnxruntime.IOBinding: one per buffer set, as a binding is not shared across threads
    inputs: np.ndarray        # float32 [capacity, *row_shape]
    outputs: np.ndarray | None  # float32 [capacity, *output row shape]; None when the graph's is not fixed

    @property
    def capacity(self) -> int:
        return len(self.inputs)


class BoundRunner:
    """`session.run` through I/O binding, from host buffers reused between calls (page-locked when `pin`).

    Thread-safe: each call takes a buffer set of its own from a small pool (the server runs a batch in its worker
    thread while a lone request may run on the event loop). A call with more rows than any idle set holds gets a
    new, larger set; at most IDLE_BUFFERS sets are kept.
    """

    def __init__(self, session, input_name: str, output_name: str, capacity: int = 64, pin_memory: bool = True):
        self.session, self.input_name, self.output_name = session, input_name, output_name
        self.capacity, self.pin_memory = capacity, pin_memory
        self.pinned: bool | None = None  # whether the buffers are page-locked; None until the first call
        self.allocations = 0             # buffer sets made so far (the reuse is visible: tests, the GPU check)
        shape = next(o.shape for o in session.get_outputs() if o.name == output_name)
        self._output_row = tuple(shape[1:]) if all(isinstance(d, int) for d in shape[1:]) else None
        self._idle: list[_Buffers] = []
        self._lock = threading.Lock()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        rows = len(pixels)
        buffers = self._acquire(rows, pixels.shape[1:])
        try:
            inputs = buffers.inputs[:rows]
            inputs[...] = pixels  # the one host-side copy of the batch, into the reused (page-locked) buffer
            binding = buffers.binding
            binding.bind_input(self.input_name, "cpu", 0, np.float32, list(inputs.shape), inputs.ctypes.data)
            if buffers.outputs is None:
                binding.bind_output(self.output_name, "cpu")  # shape known only after the run: ONNX Runtime allocates
            else:
                binding.bind_output(self.output_name, "cpu", 0, np.float32, [rows, *self._output_row],
                                    buffers.outputs.ctypes.data)
            self.session.run_with_iobinding(binding)
            if buffers.outputs is None:
                return binding.copy_outputs_to_cpu()[0]
            return buffers.outputs[:rows].copy()  # the buffer is reused by the next call
        finally:
            self._release(buffers)

    def _acquire(self, rows: int, row_shape: tuple[int, ...]) -> _Buffers:
        with self._lock:
            for index, buffers in enumerate(self._idle):
                if buffers.capacity >= rows and buffers.inputs.shape[1:] == row_shape:
                    return self._idle.pop(index)
        return self._allocate(max(rows, self.capacity), row_shape)

    def _release(self, buffers: _Buffers) -> None:
        with self._lock:
            self._idle.append(buffers)
            if len(self._idle) > IDLE_BUFFERS:
                self._idle.remove(min(self._idle, key=lambda b: b.capacity))

    def _allocate(self, capacity: int, row_shape: tuple[int, ...]) -> _Buffers:
        inputs = np.zeros((capacity, *row_shape), dtype=np.float32)
        outputs = None if self._output_row is None else np.zeros((capacity, *self._output_row), dtype=np.float32)
        pinned = self.pin_memory and pin(inputs) and (outputs is None or pin(outputs))
        with self._lock:
            self.allocations += 1
            self.pinned = pinned if self.pinned is None else self.pinned and pinned
        return _Buffers(self.session.io_binding(), inputs, outputs)


def make_runner(session, input_name: str, output_name: str, capacity: int = 64) -> Runner:
    """The run path for the provider `session` really runs on: bound (page-locked buffers) on a GPU provider,
    plain on CPU. `capacity`: rows the buffers hold (serve.max_batch_size; a larger call gets larger buffers)."""
    if session.get_providers()[0] in GPU_PROVIDERS:
        return BoundRunner(session, input_name, output_name, capacity, pin_memory=True)
    return plain_runner(session, input_name, output_name)
