"""Typed run configuration, loaded from YAML plus ``--set key=value`` overrides.

One ``Config`` object describes a whole run (data, backbone, budget, method, search,
fine-tune, Ray and MLflow settings), so the same file drives ``passray.prune``,
``passray.train`` and ``passray.tune``. Unknown keys and bad values raise
``ConfigError`` whose one-line message names the dotted key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

__all__ = [
    "BudgetConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "FinetuneConfig",
    "HypernetConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "PromptConfig",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "apply_overrides",
    "describe_keys",
    "load_config",
]


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the offending key."""


class _Section(BaseModel):
    """inf and nan are refused in every float: ``gt=0`` alone lets ``lr: .inf`` through, and a run would train on it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    name: str = Field("digits", description="dataset: digits | synthetic | cifar10 | cifar100 | imagefolder")
    root: str | None = Field(None, description="dataset root (cifar: torchvision root; imagefolder: folder or .tar.gz with train/ and test/ or val/)")
    image_size: int | None = Field(None, gt=0, description="resize images to this side; None keeps the dataset's own (digits: 32)")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="part of train held out for every decision; test is only reported")
    classes: list[int] | None = Field(None, description="keep only these labels (remapped to 0..k-1): downstream and transfer splits")
    limit_train: int | None = Field(None, gt=0, description="cap on training samples, for smoke runs")
    batch_size: int = Field(128, gt=0, description="per-worker training batch")
    eval_batch_size: int = Field(512, gt=0, description="evaluation batch; larger is faster and changes nothing")
    augment: bool = Field(True, description="random crop (pad 4) + horizontal flip, done on the device")
    num_samples: int = Field(512, gt=0, description="synthetic only: images per split")
    seed: int = Field(0, description="seed of the train/val split, fixed so every method sees the same split")
    cache: bool = Field(True, description="imagefolder: keep the decoded images on disk ($PASSRAY_DATA_CACHE, else ~/.cache/passray/data), so each process of a search loads them instead of decoding every JPEG again")


class ModelConfig(_Section):
    arch: str = Field("resnet18", description="backbone: a passray name (convnet, resnet8), a torchvision name, or timm:<name>")
    cifar_stem: bool = Field(True, description="stride-1 stem without max-pool, for 32x32 inputs")
    weights: str | None = Field(None, description="None (random init), 'hub' (pretrained download), a .safetensors/.pth path")
    width: float = Field(1.0, gt=0, description="width multiplier for passray's own small backbones")


class BudgetConfig(_Section):
    kind: Literal["macs", "params", "latency"] = Field("macs", description="what the budget counts; latency: predicted serving time from a per-layer table (python -m passray.profile)")
    keep_ratio: float = Field(0.5, gt=0, lt=1, description="fraction of the dense network's MACs/params/latency to keep")
    allocation: Literal["global", "uniform"] = Field("global", description="one threshold over all groups, or the same keep fraction per group")
    min_channels: int = Field(1, ge=1, description="every group keeps at least this many channels")
    round_to: int = Field(1, ge=1, description="kept widths are rounded up to a multiple of this (8 suits tensor cores)")
    latency_batch_size: int = Field(256, gt=0, description="latency budgets: the serving batch the table is timed at (small batches are launch-bound)")
    measure_speedup: bool = Field(False, description="after export, time dense vs pruned at the serving batch/dtype and report predicted (latency table) and measured speed-up; always on for latency budgets")
    latency_table: str = Field("measure", description="latency budgets: 'measure' (cached table for device/backbone/batch/dtype, else time now and cache), 'auto' (cached, else analytic), 'analytic' (roofline guess, poor on GPUs), or a JSON path from passray.profile")


class PromptConfig(_Section):
    kind: Literal["none", "pad", "patch", "full"] = Field("pad", description="visual prompt added to every normalised image")
    size: int = Field(4, ge=1, description="pad: border width; patch: side of the corner patch; ignored for full/none")


class HypernetConfig(_Section):
    hidden_size: int = Field(64, gt=0, description="LSTM hidden size H")
    recurrent: bool = Field(True, description="False: an MLP per group instead of the LSTM (ablation)")
    stats_length: int = Field(16, ge=2, description="each per-channel statistic is resampled to this many points")
    lr: float | None = Field(None, gt=0, description="search learning rate of the hypernet and prompt encoder (None: search.lr); prompt V and head keep search.lr")
    temperature: float = Field(0.2, gt=0, description="temperature T at the start of search: the scale of the sampling noise and of the sigmoid whose slope is the mask gradient (scores are standardised, so 0.2 explores near the threshold only)")
    temperature_final: float | None = Field(0.05, gt=0, description="T is annealed to this by the end of search; None keeps it fixed")
    batch_norm: Literal["batch", "frozen"] = Field("batch", description="BN during search: batch statistics (what BN recalibration later gives) or the backbone's frozen running statistics")
    keep: Literal["best", "last"] = Field("best", description="after search: masks, head and prompt of the best-validated epoch (initial masks included), or of the last")
    prior: Literal["taylor", "l1", "none"] = Field("taylor", description="what scores start from (the residual starts at zero): taylor = first-order Taylor scores on a few train batches (first masks = global Taylor's), l1 = per-group standardised L1 (near uniform L1), none")
    sample: bool = Field(True, description="draw training masks from scores + logistic noise of scale T (budget still exact), so a kept channel's worth is measured when it is dropped; False: deterministic masks")
    estimator: Literal["dropped", "straight_through"] = Field("dropped", description="gradient of a channel's score: dropped = the loss's sensitivity to adding the channel back, taken while it is dropped (its worth given the rest); straight_through = at the hard mask, kept channels too (there it is biased: shrinking any channel's output lowers a miscalibrated loss)")
    project_budget: bool = Field(True, description="remove from the mask gradient its component that would change the budget (the allocator undoes it anyway), leaving the exchange of channels at equal cost")
    warmup_epochs: int = Field(0, ge=0, description="first search epochs train only head and prompt under the prior's masks (a new head starts random; its gradients would mislead the hypernet)")
    cuda_graph: bool = Field(True, description="on one GPU (not under DDP), capture the mask computation (hypernet, allocator, straight-through masks) as a CUDA graph: the same masks from two graph launches a step instead of hundreds of kernels; it stands aside while the whole step is one graph (cuda_graph)")


class OptimConfig(_Section):
    epochs: int = Field(1, ge=0, description="passes over the training split")
    lr: float = Field(0.01, gt=0, description="peak learning rate")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="SGD with Nesterov momentum, or AdamW")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="decoupled for AdamW, L2 for SGD")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="learning-rate schedule over the epochs")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")


class PretrainConfig(OptimConfig):
    """Dense training is the same for every method, budget and transfer mode: worth keeping."""

    cache: bool = Field(True, description="reuse the dense backbone an earlier run trained with the same data, model, recipe and seed ($PASSRAY_DENSE_CACHE, else ~/.cache/passray/dense); train and store it on a miss; false: always train")


class DistillConfig(_Section):
    weight: float = Field(0.0, ge=0, le=1, description="w in (1-w)*CE + w*T^2*KL(teacher || student), the teacher being the dense network with its own head; 0 (off) is the plain cross-entropy fine-tune, unchanged")
    temperature: float = Field(4.0, gt=0, description="T, softening teacher and student alike (Hinton's KD; T^2 keeps the term's gradient scale independent of T)")


class FinetuneConfig(OptimConfig):
    """Fine-tune alone can distil: pretrain and search have no dense teacher to learn from."""

    distill: DistillConfig = Field(default_factory=DistillConfig)


class TrainConfig(_Section):
    num_workers: int = Field(0, ge=0, description="Ray Train workers; 0 runs the engine in-process (no DDP)")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL; CPU workers use gloo")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves for each worker")
    gpus_per_worker: float | None = Field(None, gt=0, le=1, description="with use_gpu: the GPU share each process running the engine reserves (a Ray Train worker, or a tune trial with num_workers 0); 0.25 packs four trials on one GPU, which pays when one trial leaves the GPU idle; None: a whole GPU")
    storage_path: str = Field("ray_results", description="Ray storage (local dir, NFS or s3://); shared by all nodes on a cluster")
    name: str | None = Field(None, description="run name; re-running the same (storage_path, name) resumes")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint (-1: unlimited)")
    ddp_cuda_graph: bool = Field(True, description="with cuda_graph, DDP steps over NCCL are graphed too, their gradient all-reduce captured with them (11 eager steps before each capture; if any rank's capture fails, all run eagerly). On H200 x2 it took a small run's search from 63k images/s on 1 GPU to 101k on 2 (eager DDP: 29k); false: eager DDP steps")
    checkpoints_to_keep: int = Field(2, ge=1, description="newest checkpoints kept on storage")
    fail_at_step: int | None = Field(None, ge=0, description="fault injection: the worker dies once at this global step (tests, demos)")

    @field_validator("gpus_per_worker")
    @classmethod
    def _gpu_share_usable(cls, value: float | None, info: ValidationInfo) -> float | None:
        """A share needs GPUs at all, and NCCL refuses two ranks of one job on one GPU (Ray may pack them so)."""
        if value is None:
            return value
        if not info.data.get("use_gpu"):
            raise ValueError("needs train.use_gpu: true")
        if value < 1 and info.data.get("num_workers", 0) > 1:
            raise ValueError("a GPU share below 1 needs train.num_workers <= 1: NCCL refuses two ranks on one GPU")
        return value


class TuneConfig(_Section):
    name: str = Field("passray-tune", description="experiment name (Tune dir and MLflow parent run)")
    num_samples: int = Field(4, ge=1, description="number of trials")
    objective: Literal["single", "multi"] = Field("single", description="single: max val accuracy with ASHA; multi: accuracy vs MACs Pareto front")
    max_concurrent_trials: int | None = Field(None, ge=1, description="None: derived from cluster CPUs/GPUs and per-trial resources")
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs reserved by a trial's driver when it runs the engine in-process")
    reuse_actors: bool = Field(True, description="start each trial in the process of a finished one (Tune's reuse_actors): no process start, imports and CUDA context per trial; false if trials leave state behind")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs before a trial may be stopped")
    reduction_factor: int = Field(2, ge=2, description="ASHA: keep 1/reduction_factor of trials at each rung")
    max_trial_failures: int = Field(1, ge=0, description="retries of a failed trial")
    space: dict[str, dict[str, Any]] = Field(default_factory=dict, description="dotted config key -> {type: int|uniform|loguniform|choice, low, high, values}")


class TrackingConfig(_Section):
    uri: str | None = Field(None, description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    experiment: str = Field("passray", description="MLflow experiment name")
    register_best: bool = Field(True, description="register the best hypernet and structure in the model registry")


# What ``method`` accepts: PASS and the baselines ``passray.importance`` registers (it adds any
# criterion registered later, so a config never has to import Torch-Pruning to be validated).
METHODS: list[str] = ["pass", "l1", "l2", "taylor", "random", "bn_scale"]


class Config(_Section):
    method: str = Field("pass", description="pass, or a baseline: l1 | l2 | taylor | random | bn_scale")
    seed: int = Field(0, description="seed for init, shuffling and random scores")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    amp: bool = Field(False, description="bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = Field(False, description="channels_last memory format on CUDA")
    cuda_graph: bool = Field(True, description="on one GPU (alone or as a single Ray Train worker; as DDP ranks with train.ddp_cuda_graph), each training step's forward and backward run as one replayed CUDA graph, captured after two eager steps (the same computation, without the host launching hundreds of small kernels); a step that cannot be captured runs eagerly with a warning; a stage captures its step once and replays it in every epoch")
    output_dir: str = Field("outputs/run", description="where structure.json, weights and hypernet are written")
    head_epochs: int = Field(0, ge=0, description="baselines: epochs of head-only training under their masks (set to search.epochs when the head is new, for fairness)")
    bn_recalibration_batches: int = Field(20, ge=0, description="train batches used to re-estimate BN statistics under the masks")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    hypernet: HypernetConfig = Field(default_factory=HypernetConfig)
    pretrain: PretrainConfig = Field(default_factory=lambda: PretrainConfig(epochs=0, lr=0.1), description="dense training before pruning (in-house checkpoint)")
    search: OptimConfig = Field(default_factory=lambda: OptimConfig(epochs=2, lr=3e-3, optimizer="adamw", weight_decay=0.0), description="PASS joint search of hypernet, prompt encoder, prompt and head")
    finetune: FinetuneConfig = Field(default_factory=lambda: FinetuneConfig(epochs=2, lr=0.01), description="training of the masked subnetwork")
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; choose one of {', '.join(METHODS)}")
        return value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def derive(self, changes: dict[str, Any]) -> "Config":
        """This config with dotted keys changed (``{"search.epochs": 3}``), validated again.

        The one way tune, transfer and the benchmarks make a config from another: values stay
        typed (no ``key=value`` strings), and a bad key or value is a one-line ``ConfigError``.
        """
        tree = copy.deepcopy(self.to_dict())
        for key, value in changes.items():
            _set_dotted(tree, key, value)
        return validate(tree)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> scalar values (MLflow params, result tables)."""
        return dict(_flatten(self.to_dict()))


def _flatten(tree: dict[str, Any], prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "space":
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in first and first["type"] != "missing" and not isinstance(first["input"], dict):
        msg = f"{msg} (got {first['input']!r})"
    return f"config key '{key}': {msg}"


def _over_defaults(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` on top of ``defaults``, section by section (a search space is replaced whole)."""
    merged = dict(defaults)
    for key, value in given.items():
        base = defaults.get(key)
        both = isinstance(value, dict) and isinstance(base, dict) and key != "space"
        merged[key] = _over_defaults(base, value) if both else value
    return merged


def validate(tree: dict[str, Any]) -> Config:
    """Dict -> Config, turning pydantic's report into a one-line ``ConfigError``.

    Keys a section leaves out take ``Config``'s defaults, not the section class's: ``pretrain``,
    ``search`` and ``finetune`` share a class with different defaults, and ``--set finetune.lr=0.1``
    alone must not turn ``finetune.epochs`` into the class's 1.
    """
    if not isinstance(tree, dict):
        raise ConfigError(f"config must be a mapping, got {type(tree).__name__}")
    try:
        return Config.model_validate(_over_defaults(Config().to_dict(), tree))
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key=value`` strings (values parsed as YAML) to a copy of ``tree``."""
    tree = copy.deepcopy(tree)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Read YAML (or start from ``base``/defaults), apply overrides, validate."""
    tree: dict[str, Any] = copy.deepcopy(base) if base else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            line = getattr(getattr(err, "problem_mark", None), "line", None)
            where = f" line {line + 1}" if line is not None else ""
            problem = getattr(err, "problem", None) or ""
            if "'\\t'" in problem:
                problem = "a tab; YAML indents with spaces"
            raise ConfigError(f"config file {path}{where}: invalid YAML" + (f" ({problem})" if problem else "")) from None
        if loaded is None:  # an empty (or comments-only) file would run the built-in defaults unannounced
            raise ConfigError(f"config file {path} is empty")
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        tree.update(loaded)
    return validate(apply_overrides(tree, overrides))


def describe_keys(section: BaseModel | None = None, prefix: str = "") -> list[str]:
    """One line per configurable key with its default and reason (for ``--help``)."""
    section = Config() if section is None else section
    lines = []
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            lines.extend(describe_keys(value, f"{prefix}{name}."))
        else:
            lines.append(f"  {prefix}{name} = {value!r}: {field.description or ''}")
    return lines
