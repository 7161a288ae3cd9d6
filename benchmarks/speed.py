"""PASS search cost and pruned-network speed, measured on one device.

(a) Step throughput (images/s) of a PASS search step (frozen backbone, hypernet + prompt +
    head trained with AdamW, masks from the allocator every step) vs a dense training step
    of the same backbone and batch, and vs a fine-tune step of pruned networks.
(b) Inference throughput of the dense and pruned networks: batch 1024 bf16 and batch 1 on
    the GPU, batch 1 fp32 on the CPU. Pruned networks come from the shared allocator at
    each target with uniform-L1 and global-L2 scores (and, with ``--quality-results``, the
    allocations PASS learned in the quality benchmark); speed needs no trained weights.
(c) Derived: a search epoch in fine-tune epochs, from the step throughputs.

Every measurement is one row; rows already in the results file are skipped.

    python benchmarks/speed.py --smoke
    python benchmarks/speed.py --time-budget 540
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, ResultsFile, TimeBudget, cli, estimate, gpu_settings, now  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

__all__ = ["Case", "main"]

SCORES = {"uniform_l1": ("l1", "uniform"), "global_l2": ("l2", "global")}


@dataclass(frozen=True)
class Case:
    """One measurement: a step kind on a network, device, batch size and number format."""

    part: str  # "train" (SGD step of the net), "search" (PASS search step), "infer" (forward only)
    net: str  # "dense", "<scores>@<target>", "pass_learned@<target>"; search: "pass@<target>"
    device: str
    batch: int
    dtype: str  # "bf16" (autocast for steps, bf16 weights for inference) or "fp32"

    def key(self) -> tuple:
        return (self.part, self.net, self.device, self.batch, self.dtype)


# ------------------------------------------------------------------ networks
class Nets:
    """Builds (and caches on the CPU) the dense backbone and the pruned variants."""

    def __init__(self, args: argparse.Namespace) -> None:
        from passray.config import ModelConfig

        self.args = args
        self.model_cfg = ModelConfig(arch=args.arch, cifar_stem=not args.smoke, width=args.width, weights=args.weights)
        self.cache: dict[str, nn.Module] = {}
        self.learned = _learned_allocations(args.quality_results) if args.quality_results else {}

    def example(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, 3, self.args.image_size, self.args.image_size)

    def dense(self) -> nn.Module:
        from passray.models import create_backbone

        torch.manual_seed(0)
        return create_backbone(self.model_cfg, self.args.num_classes)

    def get(self, name: str) -> nn.Module:
        """A fresh copy of network ``name`` on the CPU."""
        if name not in self.cache:
            self.cache[name] = self.dense() if name == "dense" else self._pruned(name)
        return copy.deepcopy(self.cache[name])

    def _pruned(self, name: str) -> nn.Module:
        from passray.budget import Allocator
        from passray.config import BudgetConfig
        from passray.groups import build_groups
        from passray.importance import compute_scores

        kind, target = name.split("@")
        net = self.dense()
        groups = build_groups(net, self.args.image_size)
        if kind == "pass_learned":
            masks = _masks_from_counts(groups, self.learned[float(target)])
        else:
            method, allocation = SCORES[kind]
            budget = BudgetConfig(keep_ratio=float(target), allocation=allocation,
                                  min_channels=self.args.min_channels, round_to=self.args.round_to)
            masks = Allocator(groups.cost, budget)(compute_scores(method, groups, seed=0)).masks
        groups.prune(masks)
        return net

    def cost(self, name: str) -> tuple[float, float]:
        from passray.groups import count_macs_params

        return count_macs_params(self.get(name).eval(), self.example())


def _learned_allocations(path: str) -> dict[float, dict[str, Any]]:
    """PASS's kept channels per group at each target (setting 'all', row 'pass', lowest seed)."""
    if not Path(path).is_file():
        print(f"[speed] no {path} yet: no pass_learned networks this time", flush=True)
        return {}
    rows = [r for r in json.loads(Path(path).read_text()).get("rows", [])
            if r.get("setting") == "all" and r.get("row") == "pass" and "kept_per_group" in r]
    chosen: dict[float, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        chosen.setdefault(float(r["target"]), r)
    return chosen


def _masks_from_counts(groups, row: dict[str, Any]) -> list[torch.Tensor]:
    """Keep the first k channels of each group: speed depends on widths, not on which channels."""
    if [list(g) for g in row["groups"]] != [[g.name, g.width] for g in groups.groups]:
        raise ValueError("--quality-results: its channel groups do not match this backbone (other --arch?)")
    return [torch.arange(g.width).lt(k).float() for g, k in zip(groups.groups, row["kept_per_group"])]


# ------------------------------------------------------------------ steps
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(nets: Nets, case: Case, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = nets.example(case.batch).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, nets.args.num_classes, (case.batch,), device=device)


def train_step(nets: Nets, case: Case, device: torch.device, step_graph: bool = True) -> Callable[[], None]:
    """An SGD step of all weights: dense training, or fine-tuning a pruned network."""
    cl = device.type == "cuda"
    net = nets.get(case.net).to(device).train()
    if cl:
        net = net.to(memory_format=torch.channels_last)
    opt = _optimizer(net.parameters(), "sgd", lr=0.01, weight_decay=5e-4)
    return _step(net, opt, *_batch(nets, case, device, cl), device, case.dtype, step_graph)


def _optimizer(params, kind: str, **kw) -> torch.optim.Optimizer:
    """The optimizer the pipeline builds (``engine.build_optimizer``: fused on a GPU)."""
    from passray.config import OptimConfig
    from passray.engine import build_optimizer

    return build_optimizer(list(params), OptimConfig(optimizer=kind, **kw), 1_000_000)[0]


def _step(net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          device: torch.device, dtype: str, step_graph: bool) -> Callable[[], None]:
    """The pipeline's own step (``engine.Step``, as ``run_epoch`` makes it), on one fixed batch."""
    from passray.engine import Step

    step = Step(net, device, optimizer=opt, amp=dtype == "bf16", cuda_graph=step_graph)
    return functools.partial(step, x, y)


def search_step(nets: Nets, case: Case, device: torch.device, step_graph: bool = True,
                cuda_graph: bool = True, prompt: str = "pad") -> Callable[[], None]:
    """A PASS search step built as ``passray.search`` builds it (backbone frozen but the head)."""
    from passray.budget import Allocator
    from passray.config import BudgetConfig, HypernetConfig, PromptConfig
    from passray.groups import build_groups
    from passray.hypernet import create_pass_pruner
    from passray.models import classifier
    from passray.network import PrunableNet
    from passray.prompts import create_prompt
    from passray.search import SearchNet

    cl = device.type == "cuda"
    backbone = nets.get("dense").to(device)
    if cl:
        backbone = backbone.to(memory_format=torch.channels_last)
    net = PrunableNet(backbone, create_prompt(PromptConfig(kind=prompt), nets.args.image_size)).to(device).train()
    groups = build_groups(backbone, nets.args.image_size)
    budget = BudgetConfig(keep_ratio=float(case.net.split("@")[1]), allocation="global",
                          min_channels=nets.args.min_channels, round_to=nets.args.round_to)
    torch.manual_seed(0)
    pruner = create_pass_pruner(groups, HypernetConfig(cuda_graph=cuda_graph), Allocator(groups.cost, budget, device),
                                net.prompt.enabled).to(device)
    hypernet = pruner.hypernet
    head = classifier(backbone)
    backbone.requires_grad_(False)
    head.requires_grad_(True)
    net.attach(groups)
    opt = _optimizer([*hypernet.parameters(), *net.prompt.parameters(), *head.parameters()], "adamw", lr=3e-3,
                     weight_decay=0.0)
    step = _step(SearchNet(net, pruner), opt, *_batch(nets, case, device, cl), device, case.dtype, step_graph)
    step.pruner = pruner  # type: ignore[attr-defined]  (for graph_matches_eager)
    return step


def graph_matches_eager(nets: Nets, case: Case, device: torch.device, steps: int = 6) -> dict[str, Any] | None:
    """Do the CUDA-graphed search steps (the mask computation's graph, and the whole step's) and the eager
    ones draw the same masks and reach the same losses, step after step, from the same start?
    (Deterministic kernels, so that only the launch path differs.) None on a CPU."""
    if device.type != "cuda":
        return None
    runs = {}
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for graphs in ((False, False), (False, True), (True, False)):  # (whole step, mask computation)
            torch.manual_seed(0)
            step, drawn, losses = search_step(nets, case, device, *graphs), [], []
            for _ in range(steps):
                step()
                drawn.append([m.clone() for m in step.pruner.last.masks])
                losses.append(float(step.func.sums[0]))  # running sum of loss * n
            runs[graphs] = drawn, losses
    finally:
        torch.use_deterministic_algorithms(False)
    eager_masks, eager_losses = runs[(False, False)]
    graphed = {"mask_graph": runs[(False, True)], "step_graph": runs[(True, False)]}
    same = {name: all(torch.equal(a, b) for x, y in zip(eager_masks, masks) for a, b in zip(x, y))
            for name, (masks, _) in graphed.items()}
    diff = {name: max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager_losses, losses))
            for name, (_, losses) in graphed.items()}
    return {"steps": steps, "masks_equal": same, "loss_max_relative_difference": diff}


def infer_step(nets: Nets, case: Case, device: torch.device) -> Callable[[], None]:
    """Forward only, through the serving path (``passray.serving.Served``: eval mode, bf16 weights and
    inputs as deployed, channels_last and one CUDA graph per batch size on a GPU; eager on a CPU)."""
    from passray.serving import Served

    served = Served(nets.get(case.net), case.batch, device, case.dtype,
                    input_shape=(3, nets.args.image_size, nets.args.image_size), compile=nets.args.serve_compile)
    x = _batch(nets, case, device, device.type == "cuda")[0].to(served.dtype)
    return lambda: served(x)


BUILDERS = {"train": train_step, "search": search_step, "infer": infer_step}


def _count_syncs(step: Callable[[], None], device: torch.device) -> int | None:
    """Host<->device synchronisations in one step (CUDA's sync debug mode), None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def measure(nets: Nets, case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then ``repeats`` x ``steps`` timed steps with a device sync around each repeat."""
    started = time.perf_counter()
    device = torch.device(case.device)
    steps = args.latency_steps if case.batch == 1 else args.steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = BUILDERS[case.part](nets, case, device)
    # A search step is timed in alternation with a dense training step: both see the same host and
    # GPU conditions, which drift by more than the difference between them on a shared machine. On a
    # GPU, steps run as replayed CUDA graphs (engine.Step), and the eager steps are timed beside them.
    stepping = case.part in ("train", "search")
    dense_case = Case("train", "dense", case.device, case.batch, case.dtype)
    timed_fns = {"step": step}
    if case.part == "search":
        timed_fns["dense"] = train_step(nets, dense_case, device)
    if stepping and device.type == "cuda":
        timed_fns["eager"] = BUILDERS[case.part](nets, case, device, step_graph=False)
        if case.part == "search":
            timed_fns["eager_dense"] = train_step(nets, dense_case, device, step_graph=False)
    for _ in range(args.warmup):
        for fn in timed_fns.values():
            fn()
    _sync(device)
    syncs = _count_syncs(step, device)

    def timed(fn: Callable[[], None]) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        return (time.perf_counter() - t0) / steps

    repeats: dict[str, list[float]] = {name: [] for name in timed_fns}
    for _ in range(args.repeats):
        for name, fn in timed_fns.items():
            repeats[name].append(timed(fn))
    per_repeat = repeats["step"]
    median = {name: statistics.median(times) for name, times in repeats.items()}
    seconds_per_step = median["step"]
    paired = {}
    if "dense" in median:
        paired.update(dense_ms_per_step_paired=1000 * median["dense"],
                      search_step_over_dense_step_paired=median["dense"] / seconds_per_step)
    if "eager" in median:
        paired.update(step_cuda_graph=True, eager_ms_per_step=1000 * median["eager"])
    if "eager_dense" in median:
        paired.update(eager_dense_ms_per_step_paired=1000 * median["eager_dense"],
                      eager_search_step_over_dense_step_paired=median["eager_dense"] / median["eager"],
                      search_step_over_eager_dense_step_paired=median["eager_dense"] / seconds_per_step)
    exact = graph_matches_eager(nets, case, device) if case.part == "search" else None
    name = case.net if case.part != "search" else "dense"
    macs, params = nets.cost(name)
    dense_macs, dense_params = nets.cost("dense")
    return {**asdict(case), "images_per_s": case.batch / seconds_per_step, "ms_per_step": 1000 * seconds_per_step,
            "ms_per_step_repeats": [1000 * t for t in per_repeat], "steps": steps, "warmup": args.warmup,
            "macs": macs, "params": params, "macs_ratio": macs / dense_macs, "params_ratio": params / dense_params,
            "host_syncs_per_step": syncs, "graphs_match_eager": exact, **paired, "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "seconds": time.perf_counter() - started, "finished": now()}


# ------------------------------------------------------------------ plan and summary
def plan(args: argparse.Namespace, nets: Nets) -> list[Case]:
    gpu = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    step_dtype = "bf16" if gpu == "cuda" else "fp32"
    pruned = [f"{s}@{t}" for t in args.targets for s in SCORES]
    pruned += [f"pass_learned@{t}" for t in args.targets if float(t) in nets.learned]
    cases = [Case("train", "dense", gpu, args.batch_size, step_dtype)]
    cases += [Case("search", f"pass@{t}", gpu, args.batch_size, step_dtype) for t in args.targets]
    cases += [Case("train", n, gpu, args.batch_size, step_dtype) for n in pruned]
    if gpu == "cuda":
        infer = [("cuda", args.infer_batch, "bf16"), ("cuda", 1, "bf16"), ("cuda", 1, "fp32"), ("cpu", 1, "fp32")]
    else:
        infer = [("cpu", args.infer_batch, "fp32"), ("cpu", 1, "fp32")]
    cases += [Case("infer", n, d, b, dt) for d, b, dt in infer for n in ["dense", *pruned]]
    return cases


def derive(results: ResultsFile, args: argparse.Namespace) -> dict[str, Any]:
    """(c) search cost in fine-tune epochs, and inference speed-ups over dense."""
    rows = {tuple(r[k] for k in ("part", "net", "device", "batch", "dtype")): r for r in results.rows}
    out: dict[str, Any] = {"search": [], "inference": []}
    train = [r for r in results.rows if r["part"] == "train"]
    dense = next((r for r in train if r["net"] == "dense"), None)
    for r in (r for r in results.rows if r["part"] == "search"):
        target = r["net"].split("@")[1]
        entry = {"target": float(target), "search_images_per_s": r["images_per_s"],
                 "dense_train_images_per_s": dense and dense["images_per_s"],
                 # search throughput / dense training throughput (>= 1: a search step costs no more)
                 "search_step_over_dense_step": dense and r["images_per_s"] / dense["images_per_s"],
                 "search_step_over_dense_step_paired": r.get("search_step_over_dense_step_paired"),
                 "search_epoch_seconds": args.train_images / r["images_per_s"]}
        for scores in [*SCORES, "pass_learned"]:
            ft = rows.get(("train", f"{scores}@{target}", r["device"], r["batch"], r["dtype"]))
            if ft:
                ratio = ft["images_per_s"] / r["images_per_s"]
                entry[f"finetune_images_per_s_{scores}"] = ft["images_per_s"]
                entry[f"search_epoch_in_finetune_epochs_{scores}"] = ratio
                entry[f"search_total_in_finetune_epochs_{scores}"] = ratio * args.search_epochs
        out["search"].append(entry)
    for r in (r for r in results.rows if r["part"] == "infer" and r["net"] != "dense"):
        base = rows.get(("infer", "dense", r["device"], r["batch"], r["dtype"]))
        if base:
            out["inference"].append({"net": r["net"], "device": r["device"], "batch": r["batch"], "dtype": r["dtype"],
                                     "macs_ratio": r["macs_ratio"], "speedup": r["images_per_s"] / base["images_per_s"]})
    out["notes"] = (f"epochs of {args.train_images} images; search epoch in fine-tune epochs = fine-tune step "
                    "throughput of the pruned net / search step throughput; evaluation time not included")
    return out


def report(results: ResultsFile, args: argparse.Namespace) -> None:
    derived = derive(results, args)
    results.data["derived"] = derived
    results.save()
    print(f"{'part':7} {'net':22} {'device':6} {'batch':>5} {'dtype':5} {'img/s':>10} {'ms/step':>9} {'MACs':>6} {'syncs':>5}")
    for r in results.rows:
        print(f"{r['part']:7} {r['net']:22} {r['device']:6} {r['batch']:>5} {r['dtype']:5} {r['images_per_s']:>10.1f} "
              f"{r['ms_per_step']:>9.3f} {r['macs_ratio']:>6.3f} {'-' if r['host_syncs_per_step'] is None else r['host_syncs_per_step']:>5}")
    for e in derived["search"]:
        ft = e.get("search_epoch_in_finetune_epochs_uniform_l1")
        print(f"search @ keep {e['target']}: {e['search_images_per_s']:.0f} img/s"
              + (f", {e['search_step_over_dense_step']:.2f}x a dense training step's throughput" if e["dense_train_images_per_s"] else "")
              + (f" ({e['search_step_over_dense_step_paired']:.2f}x timed in alternation)"
                 if e.get("search_step_over_dense_step_paired") else "")
              + (f"; one search epoch = {ft:.2f} fine-tune epochs (uniform-L1 net), "
                 f"{args.search_epochs} search epochs = {ft * args.search_epochs:.1f}" if ft else ""))
    for e in derived["inference"]:
        print(f"infer {e['net']:22} {e['device']} bs {e['batch']} {e['dtype']}: MACs {e['macs_ratio']:.3f}, "
              f"speed-up {e['speedup']:.2f}x")
    print(f"[speed] wrote {results.path}", flush=True)


# ------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/speed.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", help="results JSON (default benchmarks/results/speed.json; --smoke: a temp dir)")
    p.add_argument("--arch", help="backbone (default resnet18 with CIFAR stem; --smoke: convnet)")
    p.add_argument("--weights", help="optional backbone weights (e.g. the quality benchmark's checkpoint)")
    p.add_argument("--quality-results", help="quality.json: also time the allocations PASS learned there")
    p.add_argument("--targets", nargs="+", type=float, help="keep ratios of dense MACs (default 0.5 0.25)")
    p.add_argument("--batch-size", type=int, help="training/search batch (default 512)")
    p.add_argument("--infer-batch", type=int, help="large inference batch (default 1024)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 10)")
    p.add_argument("--steps", type=int, help="timed steps per repeat (default 30)")
    p.add_argument("--latency-steps", type=int, help="timed steps per repeat at batch 1 (default 100)")
    p.add_argument("--repeats", type=int, help="repeats; the median is reported (default 5)")
    p.add_argument("--search-epochs", type=int, default=8, help="for (c): search epochs of the quality protocol")
    p.add_argument("--train-images", type=int, default=45000, help="for (c): images per epoch (45k/5k train/val)")
    p.add_argument("--serve-compile", default="default", choices=["default", "max-autotune", "none"],
                   help="torch.compile mode of the served networks on a GPU (passray.serving.Served; default: default)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="start no measurement that would end after this")
    p.add_argument("--smoke", action="store_true", help="CPU only, tiny convnet, a few steps")
    p.add_argument("--debug", action="store_true", help="full tracebacks")
    args = p.parse_args(argv)
    args.serve_compile = None if args.serve_compile == "none" else args.serve_compile
    smoke = dict(arch="convnet", targets=[0.5], batch_size=32, infer_batch=16, warmup=1, steps=2, latency_steps=2, repeats=1)
    full = dict(arch="resnet18", targets=[0.5, 0.25], batch_size=512, infer_batch=1024, warmup=10, steps=30,
                latency_steps=100, repeats=5)
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.width = 0.25 if args.smoke else 1.0
    args.image_size = 16 if args.smoke else 32
    args.num_classes = 10
    args.min_channels, args.round_to = (1, 1) if args.smoke else (8, 8)
    if args.results is None:
        args.results = (str(Path(tempfile.mkdtemp(prefix="passray-speed-")) / "speed.json") if args.smoke
                        else str(REPO / "benchmarks" / "results" / "speed_v2.json"))
    return args


def protocol(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("smoke", "arch", "width", "image_size", "num_classes", "min_channels", "round_to", "warmup", "steps",
            "latency_steps", "repeats", "serve_compile")
    return {**{k: getattr(args, k) for k in keys}, "weights": args.weights and Path(args.weights).name,
            "timing": "median over repeats of (wall time of `steps` steps between device syncs) / steps, after warm-up; "
                      "synthetic inputs already on the device (no data loading)",
            "search_step": "passray.search.SearchNet: PrunableNet + PassPruner (pad prompt 4, LSTM hidden 64), allocator on "
                           "the device each step, mask computation as a CUDA graph on a GPU (hypernet.cuda_graph), masks "
                           "folded into BatchNorm affines, backbone frozen but the head, AdamW on hypernet + prompt + head; "
                           "steps are passray.engine.Step (as run_epoch makes them): on a GPU forward + backward as one "
                           "replayed CUDA graph (cuda_graph), eager twins timed beside (eager_*)",
            "infer_step": "passray.serving.Served: eval, BN folded, bf16 weights/inputs, channels_last, torch.compile "
                          "(serve_compile) + one CUDA graph per batch on a GPU",
            "train_step": "SGD (Nesterov; engine.build_optimizer: fused on CUDA) on all weights; bf16 autocast and channels_last on CUDA",
            "pruned_nets": "passray.budget.Allocator masks (min_channels/round_to above) from l1-uniform and "
                           "l2-global scores, physically pruned with groups.prune; random init unless weights given"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = gpu_settings()
    budget = TimeBudget(args.time_budget, reserve=5.0)
    results = ResultsFile(args.results, "speed", ["part", "net", "device", "batch", "dtype"], protocol(args))
    results.start_invocation(settings)
    nets = Nets(args)
    cases = plan(args, nets)
    todo = [c for c in cases if not results.has(c.key())]
    print(f"[speed] {len(cases) - len(todo)} of {len(cases)} measurements already in {args.results}; {len(todo)} to run",
          flush=True)
    failures = 0
    for case in todo:
        guess = estimate(results.rows, "seconds", [
            lambda r: (r["part"], r["device"], r["batch"]) == (case.part, case.device, case.batch),
            lambda r: r["part"] == case.part], margin=1.3, extra=2.0)
        if not budget.allows(guess):
            print(f"[speed] time budget: stopped before {case.key()} after {budget.elapsed():.0f} s; "
                  "run the same command again to continue", flush=True)
            break
        try:
            row = measure(nets, case, args)
        except Exception as err:  # e.g. out of memory on one case: keep the others
            if args.debug:
                raise
            failures += 1
            print(f"[speed] FAILED {case.key()}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                  file=sys.stderr, flush=True)
            continue
        results.add(row)
        print(f"[speed] {case.part} {case.net} {case.device} bs {case.batch} {case.dtype}: "
              f"{row['images_per_s']:.1f} img/s ({row['seconds']:.1f} s)", flush=True)
    report(results, args)
    return 1 if failures else 0


if __name__ == "__main__":
    cli(main, "benchmarks/speed.py")
