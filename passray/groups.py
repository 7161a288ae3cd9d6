"""Prunable channel groups (from Torch-Pruning), channel gates, and exact costs under masks.

A *group* is a set of coupled channels: a conv's out-channels, its BN, the next layers'
in-channels, and every layer tied to the same residual stream or concat. Torch-Pruning's
``DependencyGraph`` finds them for any traceable CNN, so nothing here knows about ResNets.

Masks (one 0/1 vector per group) are applied by *gates*: forward hooks that multiply the
output of every module whose output channels belong to a group and that could turn a
zero channel into a non-zero one (norm layers, bias-carrying convs/linears). That makes
the masked network compute exactly what the physically pruned one computes.

A grouped convolution (groups G, not depthwise) stays a valid grouped convolution only if
each of its conv groups keeps the same channels: a group holding one is pruned in *units*,
unit j being the channels at position j of every conv group (Torch-Pruning's own tie for
``groups > 1``). Masks, scores, the allocator and the cost model all count units; the one
place a unit becomes its channels is ``ChannelGroup.to_channels`` (gates and ``prune``).
"""

from __future__ import annotations

import functools
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame

from passray.cost import LAYERS, CostModel, LayerShape, is_depthwise, layer_dims, trace_layer_shapes
from passray.models import classifier

__all__ = ["TRACE_LIMIT_S", "ChannelGroup", "ChannelGroups", "build_groups", "count_macs_params"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_WEIGHT_STANDARDISED = (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)
# The slowest grouping that ends took ~220 s here (timm ecaresnet26t at 32 px, 2 CPU cores: Torch-Pruning
# expands ECA's channels-as-length reshape index by index); hangs run for hours (timm rexnet_100 did, until the
# coupling was cut at channel slices). The limit ends a hang and leaves room for the slow real case.
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
    width: int  # units: the length of its masks and scores (its channels, unless grouped convs tie them)
    items: list[GroupItem] = field(default_factory=list)
    tp_group: object = field(default=None, repr=False)  # Torch-Pruning's Group (live model only)
    unit_of: torch.Tensor | None = field(default=None, repr=False)  # [channels]: each channel's unit; None: untied

    @property
    def channels(self) -> int:
        return self.width if self.unit_of is None else len(self.unit_of)

    @property
    def unit_channels(self) -> int:
        """Channels per unit (all units are equal: ``_tied_units`` checks it)."""
        return self.channels // self.width

    def to_channels(self, values: torch.Tensor) -> torch.Tensor:
        """Per-unit values (last dim) -> per-channel ones: every channel takes its unit's (differentiable)."""
        return values if self.unit_of is None else values.index_select(-1, self.unit_of.to(values.device))

    def to_units(self, values: torch.Tensor) -> torch.Tensor:
        """Per-channel values (last dim) -> the mean over each unit's channels (kept or dropped together)."""
        if self.unit_of is None:
            return values
        sums = values.new_zeros(*values.shape[:-1], self.width)
        return sums.index_add(-1, self.unit_of.to(values.device), values) / self.unit_channels


def _unsupported(group: ChannelGroup, model: nn.Module) -> str | None:
    """Why masking this group would not equal pruning it, or its cost not follow from a count of kept
    channels (then it is left whole), or None. Found from the group's structure alone, so every
    build of the same backbone leaves the same groups whole (saved structures depend on it).

    - LayerNorm/GroupNorm normalise *over* channels, and weight-standardised convs (timm's NF
      nets) over their input channels: a zeroed channel still shifts the statistics of the
      kept ones, and Torch-Pruning does not prune a standardised conv's gain;
    - Torch-Pruning maps the parts of a ``torch.split`` in the order it traced them, not their
      order in the tensor (reversed on every split of timm's res2net, mixnet and cspnet here),
      maps channel slices wrongly where they are added back (rexnet), and goes wrong elsewhere
      too: indices outside a layer, or one index twice;
    - a layer holding some of the group's channels more often than others (a split, a slice, a
      concat added to a residual) changes size with *which* channels are kept, not how many.
    """
    if any(item.dep.target.type == tp.ops.OPTYPE.SPLIT for item in group.tp_group.items):
        return "its channels pass through a torch.split, which Torch-Pruning maps by tracing order, not position"
    if any(_is_channel_slice(item.dep.target) for item in group.tp_group.items):
        return ("its channels pass through a channel slice (x[:, a:b]), where coupling is cut (Torch-Pruning maps "
                "slices wrongly)")
    for it in group.items:
        module = model.get_submodule(it.module)
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            return f"{type(module).__name__} {it.module} normalises over channels"
        if isinstance(module, _WEIGHT_STANDARDISED):
            return f"{type(module).__name__} {it.module} standardises its weights over its input channels"
        if not (isinstance(module, LAYERS) or isinstance(module, _NORMS) and module.weight is not None):
            continue  # no channel count to check against
        channels = layer_dims(module)[0 if it.dim == "out" else 1]
        if len(it.idxs) and (int(it.idxs.max()) >= channels or len(set(it.idxs.tolist())) < len(it.idxs)
                             or int(it.root_idxs.max()) >= group.width):
            return (f"Torch-Pruning maps its {group.width} channels onto {len(it.idxs)} {it.dim}-channels up to index "
                    f"{int(it.idxs.max())} of {it.module}, which has {channels}")
        counts = torch.bincount(it.root_idxs, minlength=group.width)
        if int(counts.min()) != int(counts.max()):
            return (f"{it.module} holds {int((counts > 0).sum())} of its {group.width} channels: which channels are "
                    f"kept, not how many, would set its size")
    return None


def _is_channel_slice(node) -> bool:
    """A Torch-Pruning graph node slicing the channel dimension (dim 1 of NCHW, dim 2 of NLC: as Torch-Pruning)."""
    if node.type != tp.ops.OPTYPE.SLICE:
        return False
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", ())
    return node.grad_fn._saved_dim == (2 if len(sizes) == 3 else 1)


def _conv_groups(module: nn.Module) -> int:
    """Conv groups that must keep equal channels when pruned: 1 for plain and depthwise layers (any subset works)."""
    if isinstance(module, LAYERS[:3]) and module.groups > 1 and not is_depthwise(module):
        return module.groups
    return 1


def _tied_units(group: ChannelGroup, model: nn.Module) -> tuple[torch.Tensor | None, str | None]:
    """``(unit_of, None)`` for a group holding grouped convs, ``(None, None)`` for one without, ``(None, why)``
    when no ties make pruning it valid (it is then left whole).

    A grouped conv's channel at position p of a conv group is tied to position p of every other
    conv group (Torch-Pruning prunes a grouped conv's input by slicing conv group 0's positions
    out of the weight, so all conv groups must drop the same positions). Ties through several
    grouped convs are merged (union-find), so convs with different G tie at the gcd of their
    group sizes. Valid only if every grouped conv has *all* of that dimension's channels in this
    group, and every layer loses the same number of entries per unit (the cost model is affine).
    """
    grouped = [(it, model.get_submodule(it.module)) for it in group.items
               if _conv_groups(model.get_submodule(it.module)) > 1]
    if not grouped:
        return None, None
    channels = group.width
    labels = ", ".join(sorted({f"{it.module} (groups={m.groups})" for it, m in grouped}))
    parent = list(range(channels))

    def find(c: int) -> int:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    for it, module in grouped:
        size = layer_dims(module)[0 if it.dim == "out" else 1]
        if not torch.equal(it.idxs.sort().values, torch.arange(size)):
            return None, (f"grouped convolution {it.module} (groups={module.groups}) has {len(it.idxs)} of its {size} "
                          f"{it.dim}-channels in this group: its conv groups cannot keep equal channels")
        first: dict[int, int] = {}
        for position, root in zip((it.idxs % (size // module.groups)).tolist(), it.root_idxs.tolist()):
            a, b = find(first.setdefault(position, root)), find(root)
            parent[max(a, b)] = min(a, b)  # the smallest channel names its unit: units in channel order
    _, unit_of = torch.unique(torch.tensor([find(c) for c in range(channels)]), return_inverse=True)
    units = int(unit_of.max()) + 1
    if units < 2:
        return None, f"grouped convolutions {labels} tie all {channels} channels into one unit"
    every_channel = (torch.arange(channels), group.name)
    for root_idxs, module_name in [every_channel, *((it.root_idxs, it.module) for it in group.items)]:
        valid = root_idxs[root_idxs < channels]  # layers mapped outside the group are left whole by _unsupported
        if len(set(torch.bincount(unit_of[valid], minlength=units).tolist())) > 1:
            return None, (f"grouped convolutions {labels} tie channels into units that {module_name} does not hold "
                          f"equally")
    return unit_of, None


def _needs_gate(module: nn.Module, dim: str) -> bool:
    """Gate outputs that could be non-zero for a zero input channel."""
    if dim != "out":
        return False
    if isinstance(module, _NORMS):
        return True
    return isinstance(module, LAYERS) and getattr(module, "bias", None) is not None


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
                             f"{trace_limit_s:g} s (it loops for hours on some graphs)") from None
        except Exception as err:  # whatever breaks inside Torch-Pruning's tracing is one user-facing problem
            first_line = str(err).splitlines()[0] if str(err) else ""
            raise ValueError(f"{label}: Torch-Pruning cannot derive its channel groups "
                             f"({type(err).__name__}: {first_line})") from None
        finally:
            model.train(was_training)
        if not self.groups:
            first = next(iter(self.left_whole.items()), None)
            why = f" ({len(self.left_whole)} left whole, e.g. {first[0]}: {first[1]})" if first else ""
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
        dg = _DependencyGraph().build_dependency(model, example_inputs=example_input.detach().requires_grad_(),
                                                 verbose=False)
        for node in dg.module2node.values():
            if _is_channel_slice(node):
                # Coupling stops at a channel slice: Torch-Pruning maps through it wrongly, and on chains of
                # slices added back (timm rexnet's partial residuals) its grouping runs for hours. A group
                # reaching one is left whole (``_unsupported``), so a coupling cut here is never pruned.
                node.dependencies = []
        groups, left_whole = [], {}
        roots = [nn.Conv2d, nn.Linear]
        for tp_group in dg.get_all_groups(ignored_layers=list(ignored_layers), root_module_types=roots):
            group = cls._convert(tp_group, names)
            if group is None:
                continue
            unit_of, reason = None, _unsupported(group, model)
            if reason is None:
                unit_of, reason = _tied_units(group, model)
            if reason:
                left_whole[group.name] = reason
                continue
            if unit_of is not None:
                group.unit_of, group.width = unit_of, int(unit_of.max()) + 1
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
        """Gate the live model with one mask per group, one entry per unit (None removes the effect)."""
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
        self._gates.masks = [g.to_channels(m) for g, m in zip(self.groups, masks)]

    @contextmanager
    def gated(self, masks: Sequence[torch.Tensor]) -> Iterator[None]:
        """The live model gated by ``masks`` inside the block only (the hooks stay, ungated, after it)."""
        self.set_masks(masks)
        try:
            yield
        finally:
            self._gates.masks = None

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
        """Remove masked units' channels from the live model in place (gates are removed first)."""
        self.remove_gates()
        for group, mask in zip(self.groups, masks):
            drop = torch.nonzero(group.to_channels(mask.detach().cpu()) < 0.5).flatten().tolist()
            if drop:
                group.tp_group.prune(idxs=drop)

    def pruning_history(self) -> list:
        return [[name, bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in self.dg.pruning_history()]


class _DependencyGraph(tp.DependencyGraph):
    """Torch-Pruning's graph, traced from an input that requires grad while the modules' own parameters
    do not.

    The graph keeps the traced autograd nodes (Torch-Pruning reads their saved sizes when it prunes).
    Traced with the parameters, it would keep their gradient accumulators alive too, tied to the CUDA
    stream of the trace, and every later backward would accumulate there: a step captured as a CUDA
    graph (``passray.step_graph``) on its own stream then fails. Torch-Pruning finds modules by forward
    hooks; of the accumulators it reads only the unwrapped parameters' (timm's layer scales, say),
    which keep requiring grad.
    """

    def _trace(self, model, *args, **kwargs):
        unwrapped = {id(p) for p, _ in self.unwrapped_parameters}
        frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in unwrapped]
        for p in frozen:
            p.requires_grad_(False)
        try:
            return super()._trace(model, *args, **kwargs)
        finally:
            for p in frozen:
                p.requires_grad_(True)


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
    """Multiply module outputs by their group's current mask (one entry per channel).

    A BatchNorm whose channels are exactly one group's takes the mask into its affine instead
    (weight * m, bias * m: the same output, BN(x) * m, with no pass over the activation, and the
    mask's gradient comes out of BN's own weight/bias gradient); other modules get a forward hook.
    The folded affines of all BNs are computed together, as one flat tensor, when masks are set.
    """

    fold_batch_norm = True  # False: hooks everywhere (the reference the folded path is tested against)

    def __init__(self, model: nn.Module, groups: list[ChannelGroup]) -> None:
        self._masks: list[torch.Tensor] | None = None
        self._affine: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        plan: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for gi, group in enumerate(groups):
            for it in group.items:
                if _needs_gate(model.get_submodule(it.module), it.dim):
                    plan.setdefault(it.module, []).append((gi, it.idxs, it.root_idxs))
        self.handles, self.folded = [], []  # folded: (BN, its group)
        for name, entries in plan.items():
            module = model.get_submodule(name)
            if (self.fold_batch_norm and type(module) in _FOLDABLE and module.affine and _whole_group(entries, groups)
                    and module.num_features == len(entries[0][1])):  # not a concat of the group and other channels
                module.forward = functools.partial(self._gated_batch_norm, module, len(self.folded))
                self.folded.append((module, entries[0][0]))
            else:
                self.handles.append(module.register_forward_hook(self._hook(entries, groups)))

    @property
    def masks(self) -> list[torch.Tensor] | None:
        """One mask per group, one entry per channel (None: ungated)."""
        return self._masks

    @masks.setter
    def masks(self, masks: list[torch.Tensor] | None) -> None:
        self._masks = masks
        self._affine = None if masks is None or not self.folded else self._fold(masks)

    def _fold(self, masks: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weight * m, bias * m) of every folded BN, from one multiply over all of them."""
        bns = [bn for bn, _ in self.folded]
        mask = torch.cat([masks[gi] for _, gi in self.folded]).to(bns[0].weight.dtype)
        sizes = [bn.num_features for bn in bns]
        weight = (torch.cat([bn.weight for bn in bns]) * mask).split(sizes)
        bias = (torch.cat([bn.bias for bn in bns]) * mask).split(sizes)
        return list(zip(weight, bias))

    def _gated_batch_norm(self, bn: nn.modules.batchnorm._BatchNorm, k: int, x: torch.Tensor) -> torch.Tensor:
        """``_BatchNorm.forward`` with the mask folded into its affine (``k``: its place in ``folded``)."""
        if self._affine is None:
            return type(bn).forward(bn, x)
        bn._check_input_dim(x)
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                factor = 1.0 / float(bn.num_batches_tracked)
        batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        keep_running = not bn.training or bn.track_running_stats
        weight, bias = self._affine[k]
        return F.batch_norm(x, bn.running_mean if keep_running else None, bn.running_var if keep_running else None,
                            weight, bias, batch_stats, factor, bn.eps)

    def _hook(self, entries: list[tuple[int, torch.Tensor, torch.Tensor]], groups: list[ChannelGroup]):
        gi0, idxs0, root0 = entries[0]
        identity = _whole_group(entries, groups)
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
        for bn, _ in self.folded:
            del bn.forward  # back to the class's forward
        self.handles, self.folded = [], []
        self.masks = None


_FOLDABLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)  # exact types: SyncBatchNorm and subclasses keep hooks


def _whole_group(entries: list[tuple[int, torch.Tensor, torch.Tensor]], groups: list[ChannelGroup]) -> bool:
    """The module's gated channels are exactly one group's, in order (not a slice of a wider group)."""
    gi0, idxs0, root0 = entries[0]
    return (len(entries) == 1 and len(idxs0) == groups[gi0].channels and torch.equal(idxs0, root0)
            and torch.equal(idxs0, torch.arange(len(idxs0))))


def count_macs_params(model: nn.Module, example_input: torch.Tensor) -> tuple[float, float]:
    """MACs of conv/linear layers for one input sample, and the parameter count.

    Counts from the modules' actual weight shapes, so it is an independent check of the
    cost model (which predicts the same numbers from masks without pruning).
    """
    shapes: dict[str, LayerShape] = trace_layer_shapes(model, example_input)
    macs = sum(model.get_submodule(name).weight.numel() * s.spatial for name, s in shapes.items())
    params = sum(p.numel() for p in model.parameters())
    return float(macs), float(params)


def build_groups(backbone: torch.nn.Module, image_size: int) -> ChannelGroups:
    """Channel groups of a backbone, leaving its classifier (the classes) alone."""
    example = torch.zeros(1, 3, image_size, image_size, device=next(backbone.parameters()).device)
    return ChannelGroups(backbone, example, ignored_layers=[classifier(backbone)])
