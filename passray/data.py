"""Datasets held in memory as uint8 tensors; normalised and augmented on the device.

Every dataset is decoded once into ``[N,3,H,W]`` uint8 images and int64 labels. A
``TensorLoader`` moves a split to the device once and then only gathers batches there, so
an epoch costs no per-sample Python work and no host->device image traffic. Shuffling and
sharding use ``torch.utils.data.DistributedSampler`` literally, so Ray/DDP semantics match.
Nothing here imports ray or mlflow.
"""

from __future__ import annotations

import functools
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from passray import image_cache
from passray._registry import Registry
from passray.config import DataConfig

__all__ = [
    "Dataset",
    "Loaders",
    "Split",
    "TensorLoader",
    "available_datasets",
    "load_dataset",
    "load_dataset_kept",
    "make_loaders",
    "register_dataset",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_PAD = 4  # random-crop padding, as in the standard CIFAR recipe


@dataclass(eq=False)  # tensors make field-wise == ambiguous
class Split:
    """One split: ``images`` [N,3,H,W] uint8 and ``labels`` [N] int64 (CPU until a loader moves them)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return f"Split(images={tuple(self.images.shape)} {self.images.dtype}, labels={tuple(self.labels.shape)})"


@dataclass(eq=False)  # tensors make field-wise == ambiguous
class Dataset:
    """Train/val/test splits; ``mean``/``std`` (0..1 scale) come from train only, so val/test never leak."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-2])


Factory = Callable[[DataConfig], tuple[Split, Split, list[str]]]
_REGISTRY: Registry[Factory] = Registry("dataset")
register_dataset = _REGISTRY.register


def available_datasets() -> list[str]:
    return _REGISTRY.names()


def load_dataset(cfg: DataConfig) -> Dataset:
    """Build the dataset named by ``cfg``: class filter, resize, seeded val carve, train limit, stats."""
    train_full, test, names = _REGISTRY.get(cfg.name)(cfg)
    if len(names) < 2:  # one class trains to val accuracy 1.0 and exports a constant
        source = f"data.name={cfg.name!r}" + (f" (data.root={cfg.root})" if cfg.root else "")
        raise ValueError(f"{source} has {len(names)} class(es) {names}; a classifier needs at least 2")
    if cfg.classes is not None:
        train_full, test, names = _select_classes(train_full, test, names, cfg.classes)
    if cfg.image_size is not None:
        train_full, test = _resize(train_full, cfg.image_size), _resize(test, cfg.image_size)
    height, width = train_full.images.shape[-2:]
    if height != width:  # prompts, cost tracing and structure.json assume square inputs
        raise ValueError(f"data.name={cfg.name!r}: images are {height}x{width}; set data.image_size to use them square")
    train, val = _carve_val(train_full, cfg.val_fraction, cfg.seed, cfg.limit_train)
    mean, std = _channel_stats(train.images)
    return Dataset(cfg.name, train, val, test, len(names), list(names), mean, std)


@functools.lru_cache(maxsize=1)
def _kept(data: str) -> Dataset:
    return load_dataset(DataConfig.model_validate_json(data))


def load_dataset_kept(cfg: DataConfig) -> Dataset:
    """``load_dataset``, kept in this process for the next call with the same config: a Tune trial process
    reused for the next trial (``tune.reuse_actors``) decodes its data once, not once per trial. One
    dataset is kept (another config replaces it); callers only read the splits."""
    return _kept(cfg.model_dump_json())


def _select_classes(train: Split, test: Split, names: list[str], classes: list[int]) -> tuple[Split, Split, list[str]]:
    """Keep ``classes`` and remap them to 0..k-1 in the given order (class names follow)."""
    bad = [c for c in classes if not 0 <= c < len(names)]
    if not classes or bad or len(set(classes)) != len(classes):
        raise ValueError(f"data.classes: {classes!r} must be distinct labels in 0..{len(names) - 1}"
                         + (f"; not present: {bad}" if bad else ""))
    if len(classes) < 2:
        raise ValueError(f"data.classes: {classes!r} keeps one class; a classifier needs at least 2")
    lut = torch.full((len(names),), -1, dtype=torch.int64)
    lut[torch.tensor(classes)] = torch.arange(len(classes))

    def keep(split: Split) -> Split:
        new = lut[split.labels]
        mask = new >= 0
        return Split(split.images[mask], new[mask])

    return keep(train), keep(test), [names[c] for c in classes]


def _resize(split: Split, size: int, chunk: int = 4096) -> Split:
    """Bilinear + antialias resize, once, uint8 -> float -> uint8 in chunks to bound memory."""
    if split.images.shape[-1] == size and split.images.shape[-2] == size:
        return split
    out = torch.empty((len(split), 3, size, size), dtype=torch.uint8)
    for i in range(0, len(split), chunk):
        x = split.images[i:i + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i:i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return Split(out, split.labels)


def _stratified_order(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded permutation in which every prefix holds each class in proportion.

    Each sample gets the quantile of its rank inside its class (ranks from a seeded
    permutation); sorting by that quantile interleaves the classes.
    """
    n = labels.numel()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    lab = labels[perm]
    by_class = torch.sort(lab, stable=True).indices  # within a class: permuted order
    counts = torch.bincount(lab)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.float64)
    sorted_lab = lab[by_class]
    rank[by_class] = (torch.arange(n) - starts[sorted_lab]).double()
    quantile = (rank + 0.5) / counts[lab].double()
    return perm[torch.sort(quantile, stable=True).indices]


def _carve_val(full: Split, fraction: float, seed: int, limit: int | None) -> tuple[Split, Split]:
    """Hold out ``fraction`` of train as val (stratified, seeded), then cap train at ``limit``."""
    n = len(full)
    if n < 2:
        raise ValueError(f"training split has {n} image(s); need at least 2 to carve data.val_fraction")
    n_val = min(max(round(n * fraction), 1), n - 1)
    order = _stratified_order(full.labels, seed)
    val_idx, train_idx = order[:n_val], order[n_val:]
    if limit is not None:
        train_idx = train_idx[:limit]
    val_idx, train_idx = val_idx.sort().values, train_idx.sort().values
    return (Split(full.images[train_idx], full.labels[train_idx]),
            Split(full.images[val_idx], full.labels[val_idx]))


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std on the 0..1 scale from 256-bin histograms (no float copy)."""
    hist = torch.stack([torch.bincount(images[:, c].reshape(-1), minlength=256) for c in range(3)]).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    count = hist.sum(1)
    mean = (hist * values).sum(1) / count
    std = ((hist * values.square()).sum(1) / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


class TensorLoader:
    """Iterates ``(x, y)`` batches from a device-resident split: x float32 normalised, y int64.

    Indices come from ``DistributedSampler`` (so ``shuffle=False`` gives rank r the indices
    r, r+W, ...; ``set_epoch`` reshuffles). Augmentation (random crop with zero padding 4 +
    horizontal flip) is one batched gather, seeded by (seed, epoch, rank) for reproducibility.
    """

    def __init__(self, split: Split, batch_size: int, *, mean: Sequence[float], std: Sequence[float],
                 device: torch.device | str = "cpu", shuffle: bool = False, augment: bool = False,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, seed: int = 0,
                 channels_last: bool = False) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size, self.augment, self.drop_last = batch_size, augment, drop_last
        self.rank, self.seed, self.channels_last = rank, seed, channels_last
        self.epoch = 0
        if shuffle or drop_last:
            self.sampler = DistributedSampler(range(len(split)), num_replicas=world_size, rank=rank,
                                              shuffle=shuffle, seed=seed, drop_last=drop_last)
        else:  # evaluation: an exact partition (DistributedSampler would pad by repeating samples)
            self.sampler = range(rank, len(split), world_size)
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)  # (x/255 - mean)/std == x*scale + shift
        self._shift = -mean_t / std_t

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = torch.tensor(list(iter(self.sampler)), dtype=torch.int64, device=self.device)
        gen = None
        if self.augment:
            gen = torch.Generator(device=self.images.device)
            gen.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_009 + self.rank) % 2**63)
        for b in range(len(self)):
            idx = indices[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[idx]
            if gen is not None:
                x = _crop_flip(x, gen)
            x = torch.addcmul(self._shift, x.float(), self._scale)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]


def _crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = _PAD) -> torch.Tensor:
    """Random crop of the zero-padded batch + horizontal flip (p=0.5), as two gathers and a mask."""
    b, c, h, w = x.shape
    dev = x.device
    dy = torch.randint(-pad, pad + 1, (b, 1), generator=gen, device=dev)
    dx = torch.randint(-pad, pad + 1, (b, 1), generator=gen, device=dev)
    flip = torch.rand((b, 1), generator=gen, device=dev) < 0.5
    rows = torch.arange(h, device=dev) + dy  # source row of each output row
    cols = torch.arange(w, device=dev)
    cols = torch.where(flip, w - 1 - cols, cols) + dx
    valid = (((rows >= 0) & (rows < h)).unsqueeze(2) & ((cols >= 0) & (cols < w)).unsqueeze(1))
    out = x.gather(2, rows.clamp(0, h - 1).view(b, 1, h, 1).expand(b, c, h, w))
    out = out.gather(3, cols.clamp(0, w - 1).view(b, 1, 1, w).expand(b, c, h, w))
    return out * valid.unsqueeze(1).to(out.dtype)


class Loaders(NamedTuple):
    train: TensorLoader
    val: TensorLoader
    test: TensorLoader


def make_loaders(ds: Dataset, cfg: DataConfig, device: torch.device | str, rank: int = 0, world_size: int = 1,
                 seed: int = 0, channels_last: bool = False) -> Loaders:
    """Train shuffles (+ augments if ``cfg.augment``) and drops a ragged tail; val/test keep order."""
    common = dict(mean=ds.mean, std=ds.std, device=device, rank=rank, world_size=world_size, seed=seed,
                  channels_last=channels_last)
    # Dropping the tail avoids a size-1 BatchNorm batch; tiny (smoke) splits keep it.
    drop = len(ds.train) >= cfg.batch_size * world_size
    train = TensorLoader(ds.train, cfg.batch_size, shuffle=True, augment=cfg.augment, drop_last=drop, **common)
    val = TensorLoader(ds.val, cfg.eval_batch_size, **common)
    test = TensorLoader(ds.test, cfg.eval_batch_size, **common)
    return Loaders(train, val, test)


@register_dataset("digits")
def _digits(cfg: DataConfig) -> tuple[Split, Split, list[str]]:
    """scikit-learn's bundled 8x8 digits, upscaled (bilinear) to 32x32 grey x3; fixed 20 % test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    size = cfg.image_size or 32
    x = torch.from_numpy(bunch.data).float().view(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = (x * 255).round_().clamp_(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    labels = torch.from_numpy(bunch.target).long()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))  # independent of cfg.seed
    n_test = round(0.2 * len(labels))
    test_idx, train_idx = perm[:n_test].sort().values, perm[n_test:].sort().values
    names = [str(int(t)) for t in bunch.target_names]
    return Split(images[train_idx], labels[train_idx]), Split(images[test_idx], labels[test_idx]), names


@register_dataset("synthetic")
def _synthetic(cfg: DataConfig) -> tuple[Split, Split, list[str]]:
    """10 classes, each a fixed smooth colour template plus noise: learnable, seeded, instant."""
    size, k, n = cfg.image_size or 32, 10, cfg.num_samples
    gen = torch.Generator().manual_seed(1234)  # fixed: the data is a dataset, not a run choice
    templates = F.interpolate(torch.rand(k, 3, 4, 4, generator=gen), size=(size, size), mode="bilinear",
                              align_corners=False)

    def make(count: int) -> Split:
        labels = torch.arange(count) % k
        labels = labels[torch.randperm(count, generator=gen)]
        noise = torch.randn(count, 3, size, size, generator=gen) * 0.15
        x = (0.2 + 0.6 * templates[labels] + noise).clamp_(0, 1)
        return Split((x * 255).round_().to(torch.uint8), labels)

    return make(2 * n), make(n), [f"class{i}" for i in range(k)]


def _cifar(cfg: DataConfig, cls_name: str) -> tuple[Split, Split, list[str]]:
    """torchvision-format CIFAR root, read via ``.data``/``.targets``; users pre-download (no internet)."""
    import torchvision

    if cfg.root is None:
        raise ValueError(f"data.root is required for {cfg.name} (a torchvision CIFAR root, pre-downloaded)")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: {cfg.name} root not found (pre-download it; passray never downloads)")
    splits = []
    for train in (True, False):
        try:
            ds = getattr(torchvision.datasets, cls_name)(str(root), train=train, download=False)
        except RuntimeError:
            raise FileNotFoundError(f"{root}: {cfg.name} files missing or corrupted "
                                    "(expected torchvision's extracted layout; pre-download it)") from None
        images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        splits.append(Split(images, torch.as_tensor(ds.targets, dtype=torch.int64)))
    return splits[0], splits[1], list(ds.classes)


register_dataset("cifar10")(lambda cfg: _cifar(cfg, "CIFAR10"))
register_dataset("cifar100")(lambda cfg: _cifar(cfg, "CIFAR100"))


# One image: (path parts below the root, e.g. ("train", "cat", "0001.jpg"), bytes or a file path).
_Entry = tuple[tuple[str, ...], bytes | Path]


class _Scan(NamedTuple):
    """A root's images, and every folder below it (as path parts): a class folder without images must be seen."""

    images: list[_Entry]
    folders: set[tuple[str, ...]]


@register_dataset("imagefolder")
def _imagefolder(cfg: DataConfig) -> tuple[Split, Split, list[str]]:
    """``root``: a folder or a .tar/.tar.gz/.tgz with train/<class>/* and test/<class>/* (or val/).

    Archives are read streaming (nothing is extracted). Images are decoded once with PIL;
    they are resized to ``data.image_size`` (square) if set, else must all share one size.
    The decoded tensors are cached on disk (``passray.image_cache``, ``data.cache``).
    """
    if cfg.root is None:
        raise ValueError("data.root is required for imagefolder (a folder or .tar.gz with train/ and test/)")
    root = Path(cfg.root).expanduser()
    decode = functools.partial(_decode_image_folder, root, cfg.image_size)
    train_x, train_y, eval_x, eval_y, classes = image_cache.cached(root, cfg.image_size, decode) if cfg.cache \
        else decode()
    return Split(train_x, train_y), Split(eval_x, eval_y), classes


def _decode_image_folder(root: Path, size: int | None) -> image_cache.Decoded:
    entries, folders = _scan_archive(root) if root.is_file() else _scan_dir(root)
    tops, wrapper = {parts[0] for parts, _ in entries}, ""
    if "train" not in tops and len(tops) == 1 and all(len(p) > 3 for p, _ in entries):
        wrapper = f"{next(iter(tops))}/"  # one wrapping folder, e.g. cifar10/train/...
        entries = [(parts[1:], src) for parts, src in entries]
        folders = {f[1:] for f in folders if len(f) > 1}
        tops = {parts[0] for parts, _ in entries}
    if "train" not in tops:
        raise FileNotFoundError(f"{root}: no train/<class>/<image> found")
    eval_name = "test" if "test" in tops else "val" if "val" in tops else None
    if eval_name is None:
        raise FileNotFoundError(f"{root}: no test/<class>/<image> (or val/) found next to train/")
    groups = {s: sorted((p, src) for p, src in entries if p[0] == s) for s in ("train", eval_name)}
    _refuse_empty_class_folders(root, wrapper, groups, folders)
    classes = sorted({p[1] for p, _ in groups["train"]})
    eval_classes = sorted({p[1] for p, _ in groups[eval_name]})
    if classes != eval_classes:
        raise ValueError(f"{root}: {eval_name}/ classes {eval_classes} differ from train/ classes {classes}")
    index = {c: i for i, c in enumerate(classes)}
    decoded = []
    for s in ("train", eval_name):
        decoded += [_decode_all(root, groups[s], size), torch.tensor([index[p[1]] for p, _ in groups[s]])]
    return (*decoded, classes)


def _refuse_empty_class_folders(root: Path, wrapper: str, groups: dict[str, list[_Entry]],
                                folders: set[tuple[str, ...]]) -> None:
    """Refused, not dropped (torchvision's ImageFolder refuses too): dropping one shifts the label of every
    later class, and the head would have fewer outputs than the class folders the user sees."""
    empty = [f"{wrapper}{split}/{f[1]}" for split, images in groups.items()
             for f in sorted(folders - {p[:2] for p, _ in images}) if len(f) == 2 and f[0] == split]
    if empty:
        raise ValueError(f"{root}: no images in class folder(s) {', '.join(empty)} (image suffixes: "
                         f"{' '.join(IMAGE_SUFFIXES)}); add images or remove the folder")


def _is_image(parts: tuple[str, ...]) -> bool:
    """An image under <split>/<class>/...; hidden files (e.g. macOS ``._x.jpg``) are skipped."""
    return len(parts) >= 3 and _is_visible(parts) and parts[-1].lower().endswith(IMAGE_SUFFIXES)


def _is_visible(parts: tuple[str, ...]) -> bool:
    """Not hidden and not below a hidden folder (``.ipynb_checkpoints``, macOS ``._x.jpg``): never a class."""
    return not any(p.startswith(".") for p in parts)


def _scan_dir(root: Path) -> _Scan:
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or directory")
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory or a .tar/.tar.gz archive")
    scan = _Scan([], set())
    for path in root.rglob("*"):
        parts = path.relative_to(root).parts
        if _is_image(parts) and path.is_file():
            scan.images.append((parts, path))
        elif _is_visible(parts) and path.is_dir():
            scan.folders.add(parts)
    return scan


def _scan_archive(root: Path) -> _Scan:
    """Read image members of a tar stream into memory (entries like ``test//x.jpg`` are normalised).

    A file's parent folders count as folders: archives need not list folder members."""
    if not tarfile.is_tarfile(root):
        raise ValueError(f"{root}: not a directory or a .tar/.tar.gz archive")
    images, deepest = [], set()
    try:
        with tarfile.open(root, mode="r|*") as tar:
            for member in tar:
                parts = tuple(p for p in member.name.split("/") if p not in ("", "."))
                if member.isfile() and _is_image(parts):
                    images.append((parts, tar.extractfile(member).read()))
                deepest.add(parts if member.isdir() else parts[:-1])
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ValueError(f"{root}: cannot read archive ({err})") from None
    folders = {f[:i] for f in deepest for i in range(1, len(f) + 1)}
    return _Scan(images, {f for f in folders if _is_visible(f)})


def _decode_all(root: Path, entries: list[_Entry], size: int | None) -> torch.Tensor:
    """Decode to [N,3,H,W] uint8. Single-threaded: threads were slower for tiny JPEGs (GIL-bound)."""
    from PIL import Image

    def name(i: int) -> str:
        parts, src = entries[i]
        return str(src) if isinstance(src, Path) else f"{root}:{'/'.join(parts)}"

    out: np.ndarray | None = None
    for i, (_, src) in enumerate(entries):
        try:
            with Image.open(src if isinstance(src, Path) else io.BytesIO(src)) as img:
                img = img if img.mode == "RGB" else img.convert("RGB")
                if size is not None and img.size != (size, size):
                    img = img.resize((size, size), Image.BILINEAR)  # PIL antialiases when shrinking
                arr = np.asarray(img)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"{name(i)}: cannot decode image ({err})") from None
        if out is None:
            out = np.empty((len(entries), *arr.shape), dtype=np.uint8)
        elif arr.shape != out.shape[1:]:
            raise ValueError(f"{name(i)}: image is {arr.shape[1]}x{arr.shape[0]} but {name(0)} is "
                             f"{out.shape[2]}x{out.shape[1]}; set data.image_size to resize")
        out[i] = arr
    assert out is not None, "caller guarantees at least one entry"
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
