"""Behaviour of passray.data: splits, class filtering, device loaders, augmentation, imagefolder."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from passray.config import DataConfig
from passray.data import (
    Dataset,
    Split,
    TensorLoader,
    available_datasets,
    load_dataset,
    load_dataset_kept,
    make_loaders,
)

CLASSES = ["cat", "dog", "eel"]


def _rows(split: Split) -> set[bytes]:
    return {img.numpy().tobytes() for img in split.images}


def _id_split(n: int) -> Split:
    """Labels are the sample ids, so a loader's y tells which indices it yielded."""
    return Split(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), torch.arange(n))


def _ids(loader: TensorLoader) -> list[int]:
    return [int(i) for _, y in loader for i in y]


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset(DataConfig())


# --------------------------------------------------------------------------- datasets


def test_registry_lists_builtin_datasets():
    assert {"digits", "synthetic", "cifar10", "cifar100", "imagefolder"} <= set(available_datasets())


@pytest.mark.parametrize("name", ["digits", "synthetic"])
@pytest.mark.parametrize("size", [None, 16])
def test_builtin_dataset_contract(name, size):
    ds = load_dataset(DataConfig(name=name, image_size=size, num_samples=100))
    side = size or 32
    assert ds.num_classes == len(ds.class_names) == 10
    assert ds.image_size == side
    for split in (ds.train, ds.val, ds.test):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.images.shape[1:] == (3, side, side)
        assert split.labels.shape == (len(split),) and int(split.labels.max()) < 10
    assert len(ds.mean) == len(ds.std) == 3 and all(0 < s < 1 for s in ds.std)


def test_digits_sizes_and_disjoint_splits(digits):
    assert (len(digits.train) + len(digits.val), len(digits.test)) == (1438, 359)
    assert len(digits.val) == round(1438 * 0.1)
    train, val, test = _rows(digits.train), _rows(digits.val), _rows(digits.test)
    assert len(train) == len(digits.train)  # digits has no duplicate images, so rows identify samples
    assert not (train & val) and not (train & test) and not (val & test)
    assert set(digits.val.labels.tolist()) == set(range(10))  # stratified carve


def test_split_is_deterministic_and_seeded(digits):
    again = load_dataset(DataConfig())
    for a, b in [(digits.train, again.train), (digits.val, again.val), (digits.test, again.test)]:
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    other = load_dataset(DataConfig(seed=1))
    assert torch.equal(other.test.images, digits.test.images)  # test never depends on data.seed
    assert _rows(other.val) != _rows(digits.val)


def test_mean_std_come_from_train_only(digits):
    x = digits.train.images.double() / 255
    torch.testing.assert_close(torch.tensor(digits.mean, dtype=torch.float64), x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(torch.tensor(digits.std, dtype=torch.float64),
                               x.std(dim=(0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-7)


def test_classes_are_filtered_and_remapped(digits):
    ds = load_dataset(DataConfig(classes=[7, 2, 5]))
    assert ds.num_classes == 3 and ds.class_names == ["7", "2", "5"]
    for split in (ds.train, ds.val, ds.test):
        assert set(split.labels.tolist()) == {0, 1, 2}
    # a digit-7 test image keeps its pixels and gets label 0
    sevens = digits.test.images[digits.test.labels == 7]
    assert torch.equal(ds.test.images[ds.test.labels == 0], sevens)


@pytest.mark.parametrize("classes", [[3, 10], [1, 1], [], [-1], [3]])
def test_bad_classes_raise(classes):
    with pytest.raises(ValueError, match="data.classes"):
        load_dataset(DataConfig(classes=classes))


def test_limit_train_caps_train_but_not_val(digits):
    ds = load_dataset(DataConfig(limit_train=50))
    assert len(ds.train) == 50 and len(ds.val) == len(digits.val)
    assert torch.equal(ds.val.images, digits.val.images)
    assert _rows(ds.train) <= _rows(digits.train)
    assert len(set(ds.train.labels.tolist())) == 10  # a stratified subset, not the first class


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*digits"):
        load_dataset(DataConfig(name="nope"))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_root_names_path(name, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        load_dataset(DataConfig(name=name, root=str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_dataset(DataConfig(name=name, root=str(tmp_path)))  # exists, but holds no batches


# --------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_loader_covers_every_index_once(shuffle, drop_last):
    loader = TensorLoader(_id_split(103), 10, mean=(0, 0, 0), std=(1, 1, 1), shuffle=shuffle, drop_last=drop_last)
    ids = _ids(loader)
    assert len(loader) == (10 if drop_last else 11)
    if drop_last:
        assert len(ids) == 100 and len(set(ids)) == 100
    else:
        assert sorted(ids) == list(range(103))
        assert (ids == list(range(103))) is not shuffle


def test_ranks_partition_the_data():
    n, world = 100, 2
    per_rank = []
    for rank in range(world):
        loader = TensorLoader(_id_split(n), 8, mean=(0, 0, 0), std=(1, 1, 1), shuffle=True, seed=3,
                              rank=rank, world_size=world)
        loader.set_epoch(2)
        per_rank.append(_ids(loader))
        assert len(loader) == 7
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(n))


def test_unshuffled_ranks_interleave_like_distributed_sampler():
    loaders = [TensorLoader(_id_split(10), 4, mean=(0, 0, 0), std=(1, 1, 1), rank=r, world_size=2) for r in range(2)]
    assert _ids(loaders[0]) == [0, 2, 4, 6, 8] and _ids(loaders[1]) == [1, 3, 5, 7, 9]


def test_set_epoch_changes_order():
    loader = TensorLoader(_id_split(64), 16, mean=(0, 0, 0), std=(1, 1, 1), shuffle=True)
    first = _ids(loader)
    assert _ids(loader) == first  # same epoch, same order
    loader.set_epoch(1)
    assert _ids(loader) != first and sorted(_ids(loader)) == sorted(first)


def test_batches_are_normalised(digits):
    loader = TensorLoader(digits.train, 256, mean=digits.mean, std=digits.std)
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    assert xs[0].shape == (256, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, digits.train.labels)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)


def _all_crops_and_flips(img: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Every zero-padded crop of img and of its mirror: [2*(2*pad+1)**2, C, H, W]."""
    _, h, w = img.shape
    out = []
    for src in (img, img.flip(-1)):
        padded = torch.nn.functional.pad(src, (pad, pad, pad, pad))
        out += [padded[:, i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    return torch.stack(out)


def test_augmentation_is_a_crop_or_flip_and_keeps_labels(digits):
    split = Split(digits.train.images[:64], digits.train.labels[:64])
    ident = dict(mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))  # x equals the raw pixel value
    plain = next(iter(TensorLoader(split, 64, **ident)))
    aug_x, aug_y = next(iter(TensorLoader(split, 64, augment=True, seed=5, **ident)))
    assert aug_x.shape == plain[0].shape and torch.equal(aug_y, plain[1])
    assert not torch.equal(aug_x, plain[0])
    for raw, got in zip(split.images[:16].float(), aug_x[:16]):
        candidates = _all_crops_and_flips(raw)
        assert (candidates - got).abs().flatten(1).amax(1).min() < 1e-3
    again = next(iter(TensorLoader(split, 64, augment=True, seed=5, **ident)))[0]
    assert torch.equal(again, aug_x)  # seeded by (seed, epoch, rank)


def test_channels_last_and_make_loaders(digits):
    cfg = DataConfig(batch_size=100, eval_batch_size=1000)
    loaders = make_loaders(digits, cfg, "cpu", channels_last=True)
    x, y = next(iter(loaders.train))
    assert x.shape == (100, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert loaders.train.augment and len(loaders.train) == len(digits.train) // 100
    assert len(loaders.val) == 1 and len(loaders.test) == 1
    assert torch.equal(torch.cat([y for _, y in loaders.test]), digits.test.labels)


# --------------------------------------------------------------------------- imagefolder


def _png(color: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), color, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _layout(eval_split: str = "test", eval_classes: list[str] = CLASSES, per_class: int = 4) -> dict[str, bytes]:
    files = {}
    for split, classes in (("train", CLASSES), (eval_split, eval_classes)):
        for c, cls in enumerate(classes):
            for i in range(per_class):
                files[f"{split}/{cls}/{i:03d}.png"] = _png(60 * c + i)
    return files


def _write_dir(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _write_tar(path: Path, files: dict[str, bytes], folders: Sequence[str] = ()) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name in folders:  # folder members (an archive may have none)
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in reversed(list(files.items())):  # member order must not matter
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _make_root(kind: str, tmp_path: Path, files: dict[str, bytes], folders: Sequence[str] = ()) -> Path:
    """A folder or a .tar.gz holding ``files`` and the (possibly empty) ``folders``."""
    if kind == "tar":
        return _write_tar(tmp_path / "imgs.tar.gz", files, folders)
    for name in folders:
        (tmp_path / "imgs" / name).mkdir(parents=True, exist_ok=True)
    return _write_dir(tmp_path / "imgs", files)


@pytest.mark.parametrize("kind", ["dir", "tar"])
@pytest.mark.parametrize("eval_split", ["test", "val"])
def test_imagefolder_loads(kind, eval_split, tmp_path):
    root = _make_root(kind, tmp_path, _layout(eval_split))
    ds = load_dataset(DataConfig(name="imagefolder", root=str(root), val_fraction=0.25))
    assert ds.class_names == CLASSES and ds.num_classes == 3 and ds.image_size == 8
    assert (len(ds.train), len(ds.val), len(ds.test)) == (9, 3, 12)
    assert ds.test.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.test.images[:, :, 0, 0].tolist() == [[v] * 3 for v in (0, 1, 2, 3, 60, 61, 62, 63, 120, 121, 122, 123)]
    pixels_match_label = ds.train.images[:, 0, 0, 0].long() // 60 == ds.train.labels
    assert pixels_match_label.all()


def test_imagefolder_dir_and_tar_agree_and_resize(tmp_path):
    files = _layout()
    files["train/cat/big.png"] = _png(7, size=12)  # mixed sizes are fine once image_size is set
    grey = io.BytesIO()
    Image.fromarray(np.full((8, 8), 9, dtype=np.uint8), mode="L").save(grey, format="PNG")
    files["train/dog/grey.png"] = grey.getvalue()  # greyscale becomes 3 equal channels
    a = load_dataset(DataConfig(name="imagefolder", root=str(_write_dir(tmp_path / "d", files)), image_size=6))
    b = load_dataset(DataConfig(name="imagefolder", root=str(_write_tar(tmp_path / "t.tar", files)), image_size=6))
    assert a.image_size == 6 and len(a.train) + len(a.val) == 14
    assert any(bool((img == 9).all()) for img in torch.cat([a.train.images, a.val.images]))
    for sa, sb in [(a.train, b.train), (a.val, b.val), (a.test, b.test)]:
        assert torch.equal(sa.images, sb.images) and torch.equal(sa.labels, sb.labels)


def test_imagefolder_tar_with_wrapping_folder_and_odd_names(tmp_path):
    files = {f"data/{k.replace('test/', 'test//')}": v for k, v in _layout().items()}
    ds = load_dataset(DataConfig(name="imagefolder", root=str(_write_tar(tmp_path / "w.tgz", files))))
    assert ds.class_names == CLASSES and len(ds.test) == 12


@pytest.mark.parametrize("kind", ["dir", "tar"])
def test_imagefolder_mismatched_sizes_name_the_file(kind, tmp_path):
    files = _layout()
    files["train/dog/big.png"] = _png(1, size=12)
    root = _make_root(kind, tmp_path, files)
    with pytest.raises(ValueError, match=r"train/dog/big\.png: image is 12x12.*data\.image_size"):
        load_dataset(DataConfig(name="imagefolder", root=str(root)))


@pytest.mark.parametrize("kind", ["dir", "tar"])
@pytest.mark.parametrize("case, error, message", [
    ("no_train", FileNotFoundError, "no train/"),
    ("no_eval", FileNotFoundError, "no test/"),
    ("classes", ValueError, "classes"),
    ("flat_train", FileNotFoundError, "no train/"),
    ("corrupt", ValueError, "cannot decode"),
])
def test_imagefolder_errors_name_the_path(kind, case, error, message, tmp_path):
    files = _layout(eval_classes=CLASSES[:2]) if case == "classes" else _layout()
    if case == "no_train":
        files = {k.replace("train/", "other/"): v for k, v in files.items()}
    elif case == "no_eval":
        files = {k: v for k, v in files.items() if k.startswith("train/")}
    elif case == "flat_train":
        files = {f"train/{i}.png": _png(i) for i in range(3)} | {k: v for k, v in files.items() if k.startswith("test/")}
    elif case == "corrupt":
        files["train/eel/bad.jpg"] = b"not an image"
    root = _make_root(kind, tmp_path, files)
    with pytest.raises(error, match=message) as info:
        load_dataset(DataConfig(name="imagefolder", root=str(root)))
    assert str(root) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["dir", "tar"])
def test_imagefolder_with_one_class_is_refused(kind, tmp_path):
    """One class trains to val accuracy 1.0 and exports a constant: refused, naming the root."""
    root = _make_root(kind, tmp_path, {k: v for k, v in _layout().items() if "/cat/" in k})
    with pytest.raises(ValueError, match=r"has 1 class\(es\) \['cat'\]; a classifier needs at least 2") as info:
        load_dataset(DataConfig(name="imagefolder", root=str(root)))
    assert str(root) in str(info.value)


@pytest.mark.parametrize("kind", ["dir", "tar"])
@pytest.mark.parametrize("case, folders, named", [
    ("empty", ["train/fox"], "train/fox"),
    ("empty in test", ["test/fox"], "test/fox"),
    ("no image suffix", [], "test/eel"),
    ("wrapped", ["data/train/fox"], "data/train/fox"),
])
def test_imagefolder_class_folder_without_images_is_refused(kind, case, folders, named, tmp_path):
    """Refused, naming the folder: dropping it would shift the labels of every later class."""
    files = _layout()
    if case == "empty in test":
        files |= {f"train/fox/{i}.png": _png(i) for i in range(2)}
    elif case == "no image suffix":
        files = {k: v for k, v in files.items() if not k.startswith("test/eel/")} | {"test/eel/notes.txt": b"hi"}
    elif case == "wrapped":
        files = {f"data/{k}": v for k, v in files.items()}
    root = _make_root(kind, tmp_path, files, folders)
    with pytest.raises(ValueError, match="no images in class folder") as info:
        load_dataset(DataConfig(name="imagefolder", root=str(root)))
    assert str(info.value).startswith(f"{root}: no images in class folder(s) {named} (image suffixes: .jpg")


@pytest.mark.parametrize("kind", ["dir", "tar"])
def test_imagefolder_hidden_folders_are_no_classes(kind, tmp_path):
    """Jupyter's .ipynb_checkpoints and macOS metadata folders are neither classes nor empty classes."""
    root = _make_root(kind, tmp_path, _layout(), ["train/.ipynb_checkpoints", "test/.hidden/inner", "train/cat/.x"])
    assert load_dataset(DataConfig(name="imagefolder", root=str(root))).class_names == CLASSES


def test_imagefolder_missing_or_bad_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "nowhere")))
    not_archive = tmp_path / "notes.txt"
    not_archive.write_text("hello")
    with pytest.raises(ValueError, match=f"{not_archive}: not a directory"):
        load_dataset(DataConfig(name="imagefolder", root=str(not_archive)))
    with pytest.raises(ValueError, match="data.root"):
        load_dataset(DataConfig(name="imagefolder"))


@pytest.mark.parametrize("kind", ["dir", "tar"])
def test_decoded_images_are_cached_until_the_source_changes(kind, tmp_path, monkeypatch, caplog):
    """The second load reads the cache (no image is decoded); an edited source misses; a corrupt entry is
    decoded again with a warning; ``data.cache: false`` neither reads nor writes it."""
    import passray.data
    import passray.image_cache

    root = _make_root(kind, tmp_path, _layout())
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=6)
    first = load_dataset(cfg)
    [entry] = passray.image_cache.cache_root().glob("*.safetensors")

    def refuse(*args):
        raise AssertionError("decoded although cached")

    def load_without_decoding(cfg: DataConfig) -> Dataset:
        with monkeypatch.context() as m:
            m.setattr(passray.data, "_decode_all", refuse)
            return load_dataset(cfg)

    again = load_without_decoding(cfg)
    with pytest.raises(AssertionError, match="decoded although cached"):  # another decode size is another entry
        load_without_decoding(cfg.model_copy(update={"image_size": 5}))
    assert again.class_names == first.class_names
    for a, b in [(first.train, again.train), (first.val, again.val), (first.test, again.test)]:
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)

    entry.write_bytes(b"not safetensors")
    assert torch.equal(load_dataset(cfg).test.images, first.test.images)
    assert "ignoring the decoded-image cache entry" in caplog.text
    assert torch.equal(load_without_decoding(cfg).test.images, first.test.images)  # the entry was written again

    files = _layout()
    files["test/cat/000.png"] = _png(200)
    edited = _make_root(kind, tmp_path, files)
    assert edited == root and load_dataset(cfg).test.images[0, 0, 0, 0] == 200

    monkeypatch.setenv(passray.image_cache.ENV, str(tmp_path / "off"))
    load_dataset(cfg.model_copy(update={"cache": False}))
    assert not (tmp_path / "off").exists()


def test_data_module_imports_neither_ray_nor_mlflow(imported_after):
    assert imported_after["passray.data"] == []


def test_a_trial_process_decodes_its_data_once() -> None:
    """What a reused trial process keeps: the decoded splits of the last data config, not one per trial."""
    data = DataConfig(name="digits", limit_train=64)
    first = load_dataset_kept(data)
    assert load_dataset_kept(data.model_copy()) is first
    other = load_dataset_kept(data.model_copy(update={"limit_train": 32}))
    assert other is not first and len(other.train) == 32 and len(first.train) == 64
