"""Can this backbone be pruned exactly? A trial run up front, before any training.

Torch-Pruning traces most CNNs, but on some graphs (timm cspnet, ghostnet, mixnet, nfnet,
sknet, res2net, ...) its groups are wrong in ways that show only when the network is
physically pruned: after the search, an hour into a run, as a bare traceback. The groups
whose structure shows it (index maps outside a layer, splits) are left whole when the
groups are built (``groups._unsupported``); the trial finds the rest in seconds. It first
checks that the cost model keeps every layer at least one channel wide at the floor.
Then, on a copy whose norm layers, biases and head are randomised (so a wrongly gated
channel shows in the output), it masks a random subset of every group, prunes the copy,
and checks that masked == pruned, that the cost model counts the pruned layers exactly,
that the pruned weights reload from safetensors, and that the pruned network also runs
in training mode (fine-tuning does; aux heads run only there). A failure is located by
bisection over the groups (in network order) and refused in one line naming the first
bad group. Last, a MACs/params budget that groups left whole put out of reach is refused
with that cause."""

from __future__ import annotations

import copy
from typing import NoReturn

import torch
import torch.nn as nn
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from passray.cost import LAYERS, layer_dims
from passray._state_io import load_tensors
from passray.budget import Allocator
from passray.config import BudgetConfig
from passray.equivalence import check_equivalence, exact_fp32
from passray.groups import _NORMS, ChannelGroups, build_groups, count_macs_params
from passray.models import classifier

__all__ = ["check_prunable"]

_ADVICE = "choose another model.arch"
_COUNT_TOLERANCE = 1e-6  # relative: the cost model is exact, this only absorbs float64 rounding


def check_prunable(backbone: nn.Module, image_size: int, budget: BudgetConfig, arch: str) -> None:
    """Return if ``backbone`` prunes exactly under ``budget``'s constraints; else raise a one-line ``ValueError``.

    ``arch`` names the backbone in the message. ``backbone`` itself is left untouched (the trial
    runs on copies) and so is the global random state.
    """
    device = _device(backbone)
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # dropout in the training-mode forward must not move the run's RNG
        model, groups = _prepared(backbone, image_size, arch)
        found = _shrunk_below_one(groups, budget)
        if found is not None:
            _refuse(arch, backbone, groups, *found)
        masks = _random_masks(groups, budget)
        x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
        cause = _attempt(model, groups, masks, x)
        if cause is not None:
            _refuse(arch, backbone, groups, *_first_bad_group(backbone, image_size, arch, masks, x, cause))
        _check_budget_reachable(groups, budget, arch)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _prepared(backbone: nn.Module, image_size: int, arch: str) -> tuple[nn.Module, ChannelGroups]:
    """An eval-mode copy of ``backbone`` with randomised norms, biases and head, and its channel groups."""
    model = copy.deepcopy(backbone).eval()
    try:
        groups = build_groups(model, image_size)
    except ValueError as err:
        raise ValueError(f"{arch}: cannot be pruned: {err}; {_ADVICE}") from None
    _randomise(model)
    return model, groups


@torch.no_grad()
def _randomise(model: nn.Module) -> None:
    """Norm statistics and affine parameters, biases and the head's weights, so that a channel gated or pruned
    wrongly shows in the output (fresh BNs map a zero channel to zero anyway; timm may start the head near zero)."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
        if isinstance(module, _NORMS) and getattr(module, "weight", None) is not None:
            module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
        if isinstance(module, (*_NORMS, *LAYERS)) and getattr(module, "bias", None) is not None:
            module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    head = classifier(model)
    if isinstance(head, nn.Linear):
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) / head.in_features ** 0.5)


def _refuse(arch: str, backbone: nn.Module, groups: ChannelGroups, index: int | None, cause: str) -> NoReturn:
    if index is None:
        raise ValueError(f"{arch}: cannot be pruned exactly: even with no channel removed, {cause}; {_ADVICE}")
    group = groups.groups[index]
    root = backbone.get_submodule(group.name)  # the dense original: the trial's copy may be pruned by now
    layer = type(root).__name__ + (f" {layer_dims(root)[1]}->{layer_dims(root)[0]}" if isinstance(root, LAYERS) else "")
    units = f" in {group.width} tied units" if group.unit_of is not None else ""
    raise ValueError(f"{arch}: cannot be pruned exactly: group {group.name} ({layer}, {group.channels} channels"
                     f"{units}, {index + 1} of {len(groups)}): {cause}; {_ADVICE}")


def _shrunk_below_one(groups: ChannelGroups, budget: BudgetConfig) -> tuple[int, str] | None:
    """The group that drives a layer of the cost model below one channel at the smallest allowed widths."""
    cost = groups.cost
    floor = cost.floor(budget.min_channels, budget.round_to)
    sizes = zip(("out", "in"), cost.layer_sizes(floor[None]), (cost.out_size, cost.in_size), (cost.a_out, cost.a_in))
    for dim, size, dense, share in sizes:
        bad = torch.nonzero((size[0] < 1) & (dense >= 1)).flatten()
        if len(bad):
            column = int(bad[0])
            index = int(share[:, column].argmax())
            return index, (f"at min_channels={budget.min_channels} the cost model leaves a layer with "
                           f"{float(size[0, column]):.3g} of its {float(dense[column]):.0f} {dim}-channels")
    return None


def _random_masks(groups: ChannelGroups, budget: BudgetConfig) -> list[torch.Tensor]:
    """About half of every group's units, at random positions, never below the allocator's floor."""
    cost = groups.cost
    masks = []
    floors, steps = cost.floor(budget.min_channels, budget.round_to), cost.unit_steps(budget.round_to)
    for index, (width, floor, step) in enumerate(zip(groups.widths, floors.long().tolist(), steps.long().tolist())):
        keep = min(width, max(floor, -(-(width // 2) // step) * step))
        if keep == width and floor < width:
            keep = floor
        chosen = torch.randperm(width, generator=torch.Generator().manual_seed(index))[:keep]
        masks.append(torch.zeros(width).index_fill_(0, chosen, 1.0))
    return masks


def _attempt(model: nn.Module, groups: ChannelGroups, masks: list[torch.Tensor], x: torch.Tensor) -> str | None:
    """Mask, prune and reload ``model`` in place; None if every check holds, else what went wrong."""
    stage = "the masked forward"
    try:
        with torch.no_grad(), exact_fp32():
            groups.set_masks([m.to(x.device) for m in masks])
            masked = model(x)
            stage = "physical pruning"
            groups.prune(masks)
            stage = "the pruned forward"
            pruned = model(x)
            stage = "the comparison"
            scale = masked.abs().max().clamp(min=torch.finfo(masked.dtype).tiny)
            check_equivalence(masked / scale, pruned / scale)  # relative to the output's size, however small
            measured = dict(zip(("macs", "params"), count_macs_params(model, x[:1])))
            kept = groups.kept_counts(masks)[None]
            for kind, value in measured.items():
                predicted = float(groups.cost.cost(kept, kind)[0])
                if abs(value - predicted) > _COUNT_TOLERANCE * max(predicted, 1.0):
                    return f"the cost model predicts {predicted:.0f} {kind}, the pruned network has {value:.0f}"
            stage = "reloading the pruned weights from safetensors"
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            load_tensors(model, load_bytes(save_bytes(state)))
            check_equivalence(pruned, model(x), labels=("pruned", "reloaded"))
            stage = "the pruned forward in training mode (fine-tuning runs it; aux heads run only there)"
            model.train()(x)
    except Exception as err:  # any failure is the answer the trial looks for
        first_line = str(err).splitlines()[0] if str(err) else ""
        return f"{stage} fails ({type(err).__name__}: {first_line})" if stage != "the comparison" else first_line
    finally:
        groups.remove_gates()
    return None


def _first_bad_group(backbone: nn.Module, image_size: int, arch: str, masks: list[torch.Tensor], x: torch.Tensor,
                     cause: str) -> tuple[int | None, str]:
    """Bisect over prefixes of the groups (network order): the group whose masking first makes the trial fail,
    or None when it fails with no channel removed (then no group is to blame: the network itself is)."""
    ones = [torch.ones_like(m) for m in masks]
    good, bad = -1, len(masks)  # masked prefixes: ``bad`` groups fail with ``cause``; ``good`` ones pass
    while bad - good > 1:
        middle = (good + bad) // 2
        model, groups = _prepared(backbone, image_size, arch)
        found = _attempt(model, groups, masks[:middle] + ones[middle:], x)
        if found is None:
            good = middle
        else:
            bad, cause = middle, found
    return (bad - 1 if bad > 0 else None), cause


def _check_budget_reachable(groups: ChannelGroups, budget: BudgetConfig, arch: str) -> None:
    """Refuse a MACs/params budget that no allocation meets, naming the real cause.

    Groups left whole (grouped convolutions, channel-wise normalisation) keep their full cost, so
    a budget can be out of reach whatever ``min_channels`` is: say so rather than blame it.
    A latency budget is checked by the ``Allocator`` once the device's table exists.
    """
    if budget.kind not in ("macs", "params"):
        return
    try:
        Allocator(groups.cost, budget)
    except ValueError as err:
        bare = groups.cost.minimum(budget.kind, 1) / groups.cost.dense(budget.kind)
        if bare <= budget.keep_ratio or not groups.left_whole:
            raise ValueError(f"{arch}: {err}") from None
        first = next(iter(groups.left_whole.items()))
        raise ValueError(
            f"{arch}: budget.keep_ratio={budget.keep_ratio} is out of reach: {len(groups.left_whole)} of "
            f"{len(groups.left_whole) + len(groups)} channel groups are left whole (e.g. {first[0]}: {first[1]}), "
            f"so even one channel per other group keeps {bare:.3f} of dense {budget.kind}; "
            f"raise budget.keep_ratio or choose another model.arch") from None
