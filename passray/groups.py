"""Prunable channel groups (from Torch-Pruning), channel gates, and exact costs under masks.

A *group* is a set of coupled channels: a conv's out-channels, its BN, the next layers'
in-channels, and every layer tied to the same residual stream or concat. Torch-Pruning's
``DependencyGraph`` finds them for any traceable CNN, so nothing here knows about ResNets.

Masks (one 0/1 vector per group) are applied by *gates*: forward hooks that multiply the
output of every module whose output channels belong to a group and that could turn a
zero channel into a non-zero one (norm layers, bias-carrying convs/linears). That makes
the masked network compute exactly what the physically pruned one computes.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

import torch
import torch.nn as nn
import torch_pruning as tp

from passray._cost import _LAYERS, CostModel, LayerShape, is_depthwise, trace_layer_shapes

__all__ = ["TRACE_LIMIT_S", "ChannelGroup", "ChannelGroups", "count_macs_params"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
# The slowest grouping that ends took ~60 s here (timm resnest14d at 64 px, 2 busy CPU cores); Torch-Pruning's
# grouping of timm rexnet_100 or ecaresnet26t runs for hours. Five times the slow real case ends such a hang.
TRACE_LIMIT_S = 300.0
_ALARM_REPEAT_S = 0.5
_T = TypeVar("_T")


@dataclass
class GroupItem:
    """One module dimension that a group's channels control."""

    module: str
    dim: str  # "out" or "in" (depthwise convs and norms count as "out")
    idxs: torch.Tensor  # indices in that module's dimension
    root_idxs: torch.Tensor  # the group channel each index comes from


@dataclass
class ChannelGroup:
    name: str  # root module name: stable, readable, used as the key in structure.json
    width: int
    items: list[GroupItem] = field(default_factory=list)
    tp_group: object = field(default=None, repr=False)  # Torch-Pruning's Group (live model only)


def _unsupported(group: "ChannelGroup", model: nn.Module) -> str | None:
    """Why masking this group would not equal pruning it (then it is left whole), or None.

    - grouped (not depthwise) convs need the same channels kept in every conv group;
    - LayerNorm/GroupNorm normalise *over* channels, so a zeroed channel still shifts the
      statistics of the kept ones.
    """
    for it in group.items:
        module = model.get_submodule(it.module)
        if isinstance(module, nn.Conv2d) and module.groups > 1 and not is_depthwise(module):
            return f"grouped convolution {it.module} (groups={module.groups})"
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            return f"{type(module).__name__} {it.module} normalises over channels"
    return None


def _needs_gate(module: nn.Module, dim: str) -> bool:
    """Gate outputs that could be non-zero for a zero input channel."""
    if dim != "out":
        return False
    if isinstance(module, _NORMS):
        return True
    return isinstance(module, _LAYERS) and getattr(module, "bias", None) is not None


class ChannelGroups:
    """The prunable groups of one live model, its gates and its cost model.

    Build once per model instance: the Torch-Pruning groups hold references to its modules.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, ignored_layers: Sequence[nn.Module] = (),
                 trace_limit_s: float = TRACE_LIMIT_S) -> None:
        """Deriving the groups is refused (``ValueError``) when Torch-Pruning fails or takes over ``trace_limit_s``."""
        self.model = model
        self.input_shape = tuple(example_input.shape[1:])
        was_training = model.training
        model.eval()
        names = {m: n for n, m in model.named_modules()}
        order = {n: i for i, n in enumerate(names.values())}
        label = type(model).__name__
        try:
            self.dg, self.groups, self.left_whole = _time_limited(
                lambda: self._trace(model, example_input, ignored_layers, names), trace_limit_s)
        except _OutOfTime:
            raise ValueError(f"{label}: Torch-Pruning did not finish deriving its channel groups within "
                             f"{trace_limit_s:g} s (it loops for hours on some graphs, e.g. timm rexnet_100)") from None
        except Exception as err:  # whatever breaks inside Torch-Pruning's tracing is one user-facing problem
            first_line = str(err).splitlines()[0] if str(err) else ""
            raise ValueError(f"{label}: Torch-Pruning cannot derive its channel groups "
                             f"({type(err).__name__}: {first_line})") from None
        finally:
            model.train(was_training)
        if not self.groups:
            why = f" (left whole: {'; '.join(sorted(set(self.left_whole.values())))})" if self.left_whole else ""
            raise ValueError(f"no prunable channel groups found in {label}{why}")
        shapes = trace_layer_shapes(model, example_input)  # filled by forward hooks: in execution order
        executed = {name: i for i, name in enumerate(shapes)}
        # network order, for the LSTM: the order layers run in, not the order they were registered in
        self.groups.sort(key=lambda g: (executed.get(g.name, len(executed)), order[g.name]))
        self.cost = CostModel.build(model, shapes, self.groups)
        self._gates: _Gates | None = None  # hooks exist only while masks are set

    @classmethod
    def _trace(cls, model: nn.Module, example_input: torch.Tensor, ignored_layers: Sequence[nn.Module],
               names: dict[nn.Module, str]) -> tuple[object, list[ChannelGroup], dict[str, str]]:
        """Torch-Pruning's dependency graph, the prunable groups, and why the others are left whole."""
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
        groups, left_whole = [], {}
        roots = [nn.Conv2d, nn.Linear]
        for tp_group in dg.get_all_groups(ignored_layers=list(ignored_layers), root_module_types=roots):
            group = cls._convert(tp_group, names)
            if group is None:
                continue
            reason = _unsupported(group, model)
            if reason:
                left_whole[group.name] = reason
            else:
                groups.append(group)
        return dg, groups, left_whole

    @staticmethod
    def _convert(tp_group, names: dict[nn.Module, str]) -> ChannelGroup | None:
        root = tp_group[0].dep.target.module
        width = len(tp_group[0].idxs)
        if root not in names or width < 2:
            return None
        group = ChannelGroup(name=names[root], width=width, tp_group=tp_group)
        dg = tp_group._DG
        for item in tp_group.items:
            module = item.dep.target.module
            if module not in names or not isinstance(module, nn.Module):
                continue  # functional ops (add, cat, ...) carry no parameters
            is_out = dg.is_out_channel_pruning_fn(item.dep.handler)
            dim = "out" if is_out or is_depthwise(module) or isinstance(module, _NORMS) else "in"
            group.items.append(GroupItem(names[module], dim, torch.as_tensor(item.idxs, dtype=torch.long),
                                         torch.as_tensor(item.root_idxs, dtype=torch.long)))
        return group

    # ------------------------------------------------------------------ description
    @property
    def widths(self) -> list[int]:
        return [g.width for g in self.groups]

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    def __len__(self) -> int:
        return len(self.groups)

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def root_weights(self, group: ChannelGroup) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
        """(module, idxs, root_idxs) for every module whose out-channels the group owns."""
        return [(self.module(it.module), it.idxs, it.root_idxs) for it in group.items if it.dim == "out"]

    # ------------------------------------------------------------------ masks
    def set_masks(self, masks: Sequence[torch.Tensor] | None) -> None:
        """Gate the live model with one mask per group (None removes the effect)."""
        if masks is not None:
            if len(masks) != len(self.groups):
                raise ValueError(f"expected {len(self.groups)} masks, got {len(masks)}")
            for g, m in zip(self.groups, masks):
                if m.shape != (g.width,):
                    raise ValueError(f"mask for group {g.name!r} has shape {tuple(m.shape)}, expected ({g.width},)")
        if masks is None:
            self.remove_gates()
            return
        if self._gates is None:
            self._gates = _Gates(self.model, self.groups)
        self._gates.masks = list(masks)

    def remove_gates(self) -> None:
        if self._gates is not None:
            self._gates.remove()
            self._gates = None

    def kept_counts(self, masks: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([(m > 0.5).sum() for m in masks]).to(torch.float64)

    def cost_ratio(self, masks: Sequence[torch.Tensor], kind: str = "macs") -> float:
        kept = self.kept_counts(masks).cpu()
        return float(self.cost.cost(kept[None], kind)[0] / self.cost.dense(kind))

    # ------------------------------------------------------------------ physical pruning
    def prune(self, masks: Sequence[torch.Tensor]) -> None:
        """Remove masked channels from the live model in place (gates are removed first)."""
        self.remove_gates()
        for group, mask in zip(self.groups, masks):
            drop = torch.nonzero(mask.detach().cpu() < 0.5).flatten().tolist()
            if drop:
                group.tp_group.prune(idxs=drop)

    def pruning_history(self) -> list:
        return [[name, bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in self.dg.pruning_history()]


class _OutOfTime(BaseException):
    """Raised inside a time-limited call when its time is up (not an ``Exception``: traced code may catch those)."""


def _time_limited(fn: Callable[[], _T], seconds: float) -> _T:
    """``fn()``, or ``_OutOfTime`` after ``seconds`` of wall-clock time.

    In the main thread (the CLIs) SIGALRM interrupts ``fn`` in place: Torch-Pruning's hangs are
    pure Python loops. The alarm repeats, because Torch-Pruning's tracing retries a failed forward
    under a bare ``except:`` that swallows the first one. Elsewhere (Ray Train runs the train
    function in a thread), or when someone else's alarm is pending, ``fn`` runs in a daemon thread
    that is abandoned when time is up.
    """
    if (threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
            and signal.getitimer(signal.ITIMER_REAL)[0] == 0):
        armed = True

        def on_alarm(signum, frame) -> None:
            if armed:
                raise _OutOfTime

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds, _ALARM_REPEAT_S)
        try:
            try:
                return fn()
            finally:
                armed = False
        finally:  # an alarm that lands in the inner ``finally`` still reaches this one: the next is far off
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as err:  # handed to the caller's thread below
            outcome["error"] = err

    worker = threading.Thread(target=run, name="passray-trace", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise _OutOfTime
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class _Gates:
    """Forward hooks that multiply module outputs by their group's current mask."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup]) -> None:
        self.masks: list[torch.Tensor] | None = None
        plan: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for gi, group in enumerate(groups):
            for it in group.items:
                if _needs_gate(model.get_submodule(it.module), it.dim):
                    plan.setdefault(it.module, []).append((gi, it.idxs, it.root_idxs))
        self.handles = [model.get_submodule(name).register_forward_hook(self._hook(entries, groups))
                        for name, entries in plan.items()]

    def _hook(self, entries: list[tuple[int, torch.Tensor, torch.Tensor]], groups: list[ChannelGroup]):
        gi0, idxs0, root0 = entries[0]
        # the whole mask as is: one group whose channels are exactly this output's (not a slice of a wider group)
        identity = (len(entries) == 1 and len(idxs0) == groups[gi0].width and torch.equal(idxs0, root0)
                    and torch.equal(idxs0, torch.arange(len(idxs0))))
        on_device: dict[torch.device, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}

        def hook(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
            if self.masks is None:
                return out
            dim = -1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1
            if identity and out.shape[dim] == len(idxs0):
                mask = self.masks[gi0]
            else:  # channels from several groups (after a concat) or re-indexed ones
                device = self.masks[gi0].device
                if device not in on_device:
                    on_device[device] = [(gi, i.to(device), r.to(device)) for gi, i, r in entries]
                mask = torch.ones(out.shape[dim], device=device, dtype=self.masks[gi0].dtype)
                for gi, idxs, root_idxs in on_device[device]:
                    mask = mask.index_put((idxs,), self.masks[gi][root_idxs])
            shape = [1] * out.dim()
            shape[dim] = -1
            return out * mask.to(out.dtype).view(shape)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.masks = None


def count_macs_params(model: nn.Module, example_input: torch.Tensor) -> tuple[float, float]:
    """MACs of conv/linear layers for one input sample, and the parameter count.

    Counts from the modules' actual weight shapes, so it is an independent check of the
    cost model (which predicts the same numbers from masks without pruning).
    """
    shapes: dict[str, LayerShape] = trace_layer_shapes(model, example_input)
    macs = sum(model.get_submodule(name).weight.numel() * s.spatial for name, s in shapes.items())
    params = sum(p.numel() for p in model.parameters())
    return float(macs), float(params)
