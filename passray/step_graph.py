"""A training step captured once as a CUDA graph and replayed for every batch.

A CIFAR-sized step is a few hundred small kernels (a PASS search step more than a dense one:
gates, hypernet, allocator), and the host cannot launch them as fast as the GPU runs them: on
the H200 a search step ran 7.5 ms of kernels in 14 ms of wall time. Replaying a captured graph
launches every kernel of the step at once; there, search epochs ran 2.0x faster and fine-tune
epochs 1.9x (ResNet-18, CIFAR-10, batch 256). Evaluation is left eager: at its larger batches
the GPU, not the host, is the bound.

It is the same computation: the step's own code, run eagerly for the first batches (they warm
up cuDNN and the allocator, and are real steps), then captured. A module that draws host-seeded
randomness each step (``PassPruner``'s noise) reads it from a buffer it refills in its
``before_replay()``, which is called before every replay. A batch of another shape (a ragged
last batch) runs eagerly. A step that cannot be captured (a host sync, an op that graphs refuse)
runs eagerly for good, with a warning.

Under DDP (several ranks, NCCL; ``train.ddp_cuda_graph``), the gradient all-reduce is captured with
the step, as PyTorch's notes on CUDA graphs with DDP ask: DDP is built on the capture's stream
(``capture_stream``; it keeps the gradient accumulators, which remember the stream they were made
on), the step runs eagerly for 11 DDP steps before the capture, and the ranks agree after each
capture: if any rank failed, all run eagerly, since a graph replays its all-reduce only with the
graphs of every other rank. A graph holding NCCL work is freed only once the device has run it
(``engine.Step.close``), and before the process group goes (else ``destroy_process_group`` hangs).
When each epoch freed its graph unsynchronized, both ranks died at the next epoch's start on H200
x2, and Ray Train's restart from the last checkpoint cost 17-19 s.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import traceback
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

_log = logging.getLogger(__name__)

__all__ = ["DDP_WARMUP", "StepGraph", "capture_stream", "graphable", "in_step_graph"]

_thread = threading.local()
_streams: dict[torch.device, torch.cuda.Stream] = {}
DDP_WARMUP = 11  # eager DDP steps before a capture (PyTorch's CUDA-graph notes: DDP sets itself up in the first ones)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def graphable(device: torch.device, ddp: bool = False) -> bool:
    """Whole-step graphs run on a CUDA device: alone, as a world of one (Ray Train's single worker), or,
    with ``ddp``, as DDP ranks over NCCL (whose collectives CUDA graphs capture)."""
    return device.type == "cuda" and (not _distributed() or (ddp and dist.get_backend() == "nccl"))


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream of ``device`` that step graphs warm up and capture on; build DDP under it
    (``with torch.cuda.stream(capture_stream(device))``) so that its gradient hooks live on it too."""
    device = torch.device(device.type, torch.cuda.current_device() if device.index is None else device.index)
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


def in_step_graph() -> bool:
    """Is a ``StepGraph`` warming up or capturing in this thread? Graphs inside the step (``PassPruner``'s)
    stand aside: the whole step becomes one graph."""
    return getattr(_thread, "active", False)


class StepGraph:
    """``step(x, y)``: eager for the first ``warmup`` calls, then captured and replayed on batches of
    the captured shape. ``captured`` says whether a graph exists (a training step must then keep its
    gradient tensors: the graph writes into them)."""

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], None], model: nn.Module,
                 warmup: int | None = None) -> None:
        self.step, self.model = step, model
        self.warmup = warmup if warmup is not None else (DDP_WARMUP if _distributed() else 2)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self._calls = 0
        self._static: tuple[torch.Tensor, torch.Tensor] | None = None
        self._before: list[Callable[[], None]] = []

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.graph is None:
            self._calls += 1
            if self.failed:
                self.step(x, y)
            elif self._calls <= self.warmup:
                # on the capture's stream: autograd remembers the stream that first accumulated each gradient
                with self._on_side_stream(x.device):
                    self.step(x, y)
            else:
                self._capture(x, y)
            if self.graph is None:
                return
        static_x, static_y = self._static
        if x.shape != static_x.shape or y.shape != static_y.shape:
            self.step(x, y)
            return
        static_x.copy_(x)
        static_y.copy_(y)
        for refill in self._before:
            refill()
        self.graph.replay()

    @contextlib.contextmanager
    def _on_side_stream(self, device: torch.device):
        stream = capture_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        _thread.active = True
        try:
            with torch.cuda.stream(stream):
                yield stream
        finally:
            _thread.active = False
            torch.cuda.current_stream(device).wait_stream(stream)

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Capture the step on this batch's shape (the batch itself then runs as the first replay)."""
        static = (x.clone(), y.clone())
        graph = torch.cuda.CUDAGraph()
        error = None
        try:
            # thread_local: CUDA calls of other threads (NCCL's watchdog, Ray's) do not void the capture
            with self._on_side_stream(x.device) as stream, torch.cuda.graph(graph, stream=stream,
                                                                            capture_error_mode="thread_local"):
                self.step(*static)
        except Exception as err:  # noqa: BLE001 -- any refusal: the step stays correct, only eager
            _log.debug("capture failed:\n%s", traceback.format_exc())
            error = str(err).splitlines()[0] if str(err) else type(err).__name__
        if _distributed():  # every rank replays, or none does
            ok = torch.tensor([error is None], dtype=torch.int32, device=x.device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if error is None and not ok.item():
                error = "another rank's capture failed"
        if error is not None:
            self.failed = True
            # DDP over parameters a step leaves out (PASS's warm-up; find_unused_parameters) copies its map
            # of used parameters from the host, which no capture can hold (H200 x2): expected there
            if getattr(self.model, "find_unused_parameters", False):
                _log.info("DDP steps that leave parameters unused run eagerly (not capturable: %s)", error)
            else:
                _log.warning("running %s steps eagerly: CUDA graph capture failed (%s)", type(self.model).__name__, error)
            self.step(x, y)
            return
        self.graph, self._static = graph, static
        self._before = [m.before_replay for m in self.model.modules() if callable(getattr(m, "before_replay", None))]
