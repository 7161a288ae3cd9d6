"""Training, search and evaluation loops: device-agnostic, AMP-capable, DDP-aware, no Ray.

Metrics are accumulated as device tensors and read once per epoch (no per-step host
sync); under ``torch.distributed`` they are all-reduced so every rank reports the same
numbers. The same loop serves dense training, PASS search and fine-tuning: what is
trained is decided by which parameters the optimizer holds.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from passray.config import OptimConfig
from passray.step_graph import StepGraph, graphable

__all__ = ["Distillation", "Step", "autocast", "build_optimizer", "distillation_loss", "evaluate", "recalibrate_bn",
           "resolve_device", "run_epoch"]

StepHook = Callable[[int], None]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available on this machine")
    return device


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op elsewhere (CPU bf16 is slower than fp32 here)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_optimizer(params: Iterable[nn.Parameter] | list[dict], cfg: OptimConfig, total_steps: int):
    """Optimizer + per-step scheduler (cosine to zero, or constant); ``params`` may be
    torch param groups (dicts with their own ``lr``), each scheduled alike."""
    params = list(params)
    given = params if params and isinstance(params[0], dict) else [{"params": params}]
    trainable = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in given]
    groups = [g for g in trainable if g["params"]]
    if not groups:
        raise ValueError("nothing to train: no parameter requires grad")
    # On a GPU, one fused kernel updates every parameter (the small steps of a CIFAR-sized net
    # are bound by kernel launches, not by arithmetic); elsewhere torch's default.
    fused = True if all(p.is_cuda for g in groups for p in g["params"]) else None
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                              weight_decay=cfg.weight_decay, fused=fused)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    total = max(total_steps, 1)
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return opt, sched


def _reduce(sums: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    return sums


def _batches(loader: Iterable, desc: str, show: bool) -> Iterator:
    total = len(loader) if hasattr(loader, "__len__") else None
    return iter(tqdm(loader, desc=desc, total=total, leave=False, disable=not show, mininterval=1.0))


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, weight: float,
                      temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Hinton's KD: (1-w)·CE(student, y) + w·T²·KL(softmax(teacher/T) || softmax(student/T)), in fp32.

    T² keeps the KL term's gradient on the scale of the cross-entropy's whatever T is, so ``weight``
    alone decides the mix.
    """
    logits, teacher_logits = logits.float(), teacher_logits.float()
    hard = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    soft = F.kl_div(F.log_softmax(logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean", log_target=True)
    return (1 - weight) * hard + weight * temperature ** 2 * soft


@dataclass(frozen=True)
class Distillation:
    """A frozen teacher and the KD mix; the student's training loss becomes ``distillation_loss``.

    The teacher sees the very batch the student sees (same augmentation), under the same autocast;
    it is not wrapped in DDP (each worker runs its own copy) and never trained: the caller hands it
    in eval mode without gradients.
    """

    teacher: nn.Module
    weight: float
    temperature: float

    def loss(self, x: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
             label_smoothing: float) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        return distillation_loss(logits, teacher_logits, targets, self.weight, self.temperature, label_smoothing)


class Step:
    """One step of ``model`` on a batch ``(x, y)``: forward and loss, and with an optimizer backward,
    optimizer and scheduler step; (loss * n, correct, n) are added to ``sums`` on the device.

    ``cuda_graph``: on one GPU (``step_graph.graphable``; with ``ddp_graph`` also as DDP ranks, their
    all-reduce captured too), a training step's forward, loss, backward and sums run as one replayed
    CUDA graph (``passray.step_graph``). The optimizer and scheduler step stay eager: the learning rate
    is a Python number that changes every step, and a fused optimizer is a few kernels. The graph
    writes the gradients in place, so they are zeroed, not freed, once it exists.
    """

    def __init__(self, model: nn.Module, device: torch.device, *, optimizer=None, scheduler=None, amp: bool = False,
                 label_smoothing: float = 0.0, distill: Distillation | None = None, cuda_graph: bool = False,
                 ddp_graph: bool = False) -> None:
        self.model, self.device, self.optimizer, self.scheduler = model, device, optimizer, scheduler
        self.amp, self.label_smoothing, self.distill = amp, label_smoothing, distill
        self.sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss * n, correct, n
        training = optimizer is not None
        graphed = training and cuda_graph and graphable(device, ddp_graph)
        self.graph = StepGraph(self._body, model) if graphed else None

    def _body(self, x: torch.Tensor, y: torch.Tensor) -> None:
        training = self.optimizer is not None
        with autocast(self.device, self.amp):
            logits = self.model(x)
            if training and self.distill is not None:
                loss = self.distill.loss(x, logits, y, self.label_smoothing)
            else:
                loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing if training else 0.0)
        if training:
            self.optimizer.zero_grad(set_to_none=self.graph is None or not self.graph.captured)
            loss.backward()
        n = y.numel()  # Python scalars go to the kernels as arguments: no host-device copy
        self.sums[0] += loss.detach().double() * n
        self.sums[1] += (logits.argmax(1) == y).sum()
        self.sums[2] += n

    def close(self) -> None:
        """Free the captured graph and its memory now, once the device has run it (it refers back to this
        step: a cycle that only the garbage collector would break, at a moment that differs per rank)."""
        if self.graph is not None and self.graph.captured:
            torch.cuda.synchronize(self.device)
        self.graph = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        (self.graph or self._body)(x, y)
        if self.optimizer is not None:
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()


def run_epoch(model: nn.Module, loader: Iterable, device: torch.device, *, optimizer=None, scheduler=None,
              amp: bool = False, label_smoothing: float = 0.0, distill: Distillation | None = None,
              on_step: StepHook | None = None, step_offset: int = 0, desc: str = "",
              progress: bool = False, step: Step | None = None) -> dict[str, float]:
    """One pass over ``loader``; trains when an optimizer is given (with ``distill``: on the KD loss).
    Returns loss/accuracy.

    ``step``: a training ``Step`` the caller keeps across epochs (``RunContext.fit``: its CUDA graph is
    captured once per stage, not once per epoch); its sums restart here, and the arguments that would
    build one are not used."""
    own = step is None
    if own:
        step = Step(model, device, optimizer=optimizer, scheduler=scheduler, amp=amp, label_smoothing=label_smoothing,
                    distill=distill)
    else:
        step.sums.zero_()  # in place: a captured graph adds into this tensor
    try:
        with contextlib.nullcontext() if step.optimizer is not None else torch.no_grad():
            for i, (x, y) in enumerate(_batches(loader, desc, progress)):
                if on_step is not None:
                    on_step(step_offset + i)
                step(x, y)
    finally:
        if own:
            step.close()
    loss_sum, correct, n = _reduce(step.sums).tolist()
    return {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1)}


def evaluate(model: nn.Module, loader: Iterable, device: torch.device, amp: bool = False) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        return run_epoch(model, loader, device, amp=amp)
    finally:
        model.train(was_training)


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def kept_bn_statistics(model: nn.Module) -> Iterator[None]:
    """Whatever the block does to BN running statistics (e.g. a recalibration to validate
    some masks) is undone when it ends."""
    norms = _batch_norms(model)
    saved = [[b.clone() for b in m.buffers()] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for b, old in zip(m.buffers(), buffers):
                    b.copy_(old)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, device: torch.device, batches: int, amp: bool = False) -> None:
    """Re-estimate BN running statistics under the current masks (cumulative average).

    Masks change every downstream layer's input distribution; without this, magnitude
    masks score near chance before fine-tuning and any comparison is unfair.
    """
    norms = _batch_norms(model)
    if not norms or batches == 0:
        return
    saved = [(m, m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            with autocast(device, amp):
                model(x)
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
    average_bn_statistics(model)  # every rank saw its own shard


@torch.no_grad()
def average_bn_statistics(model: nn.Module) -> None:
    """Under DDP, BN running statistics averaged over the ranks (each estimated them on its own shard);
    DDP does not broadcast them every step (``train._wrapper``), so a stage syncs them before it evaluates.
    A no-op without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for m in _batch_norms(model):
        for buffer in (m.running_mean, m.running_var):
            dist.all_reduce(buffer)
            buffer /= dist.get_world_size()
