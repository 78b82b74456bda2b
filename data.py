"""CIFAR-10 loading: one loader for every script, the notebook and the tests.

Accepted layouts, looked for in this order inside the data directory:
  1. the official torchvision files   cifar-10-batches-py/{data_batch_*,test_batch}
  2. an image-folder tree             [cifar10/]{train,test}/<class>/*.{jpg,png}
  3. a .tar.gz of such a tree         *.tar.gz (decoded once, then cached as .npz)

Where the data lives: --data-dir, else $CIFAR10_DIR, else ./data. If nothing is found
there, the official files are downloaded with torchvision; offline, that fails with one
clear message (raised as DataError, which the scripts turn into a non-zero exit).

Images from a folder tree or an archive are put in one fixed seeded shuffled order at
decode time: archives group files by class, so without it "the first 1000 images" would
be all airplanes. The official files are already shuffled and keep their order.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from provenance import atomic_write

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = ("train", "test")
MEAN = STD = (0.5, 0.5, 0.5)  # the reference's Normalize
SHUFFLE_SEED = 0  # the fixed order of folder-tree / archive images
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_DATA_DIR = "./data"


class DataError(RuntimeError):
    """The dataset could not be found or read; the message says what to do."""


@dataclass
class Cifar10Arrays:
    """One split in memory: images (N, 32, 32, 3) uint8 and labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray
    source: str  # where it came from, for logs and result files

    def __len__(self) -> int:
        return len(self.labels)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """--data-dir, else $CIFAR10_DIR, else ./data."""
    return Path(data_dir or os.environ.get("CIFAR10_DIR") or DEFAULT_DATA_DIR)


def cache_dir() -> Path:
    """Where decoded archives are cached; the data directory itself may be read-only."""
    root = os.environ.get("CIFAR10_CACHE") or Path.home() / ".cache" / "fhe-cifar10"
    return Path(root)


# ---------------------------------------------------------------- layout readers


def _read_official(batches_dir: Path, split: str) -> Cifar10Arrays:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = batches_dir / name
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            raise DataError(f"cannot read {path}: {e}") from e
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    # (N, 3, 32, 32) -> (N, 32, 32, 3); copy so the array is C-contiguous
    hwc = np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1))
    return Cifar10Arrays(hwc, np.concatenate(labels), str(batches_dir))


def _decode(named_bytes: list[tuple[str, int, bytes]], source: str) -> Cifar10Arrays:
    """Decode (name, label, encoded image) triples into arrays, in the fixed shuffled order."""
    from PIL import Image
    from tqdm import tqdm

    named_bytes.sort(key=lambda t: t[0])  # independent of file-system / archive order
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(named_bytes))
    images = np.empty((len(named_bytes), 32, 32, 3), dtype=np.uint8)
    labels = np.empty(len(named_bytes), dtype=np.int64)
    for out, i in enumerate(tqdm(order, desc=f"decode {Path(source).name}", leave=False)):
        name, label, blob = named_bytes[i]
        try:
            img = Image.open(io.BytesIO(blob)).convert("RGB")
        except Exception as e:  # PIL raises several types for a bad image
            raise DataError(f"cannot decode image {name} in {source}: {e}") from e
        if img.size != (32, 32):
            raise DataError(f"image {name} in {source} is {img.size[0]}x{img.size[1]}, expected 32x32")
        images[out] = np.asarray(img)
        labels[out] = label
    return Cifar10Arrays(images, labels, source)


def _split_of(parts: tuple[str, ...]) -> tuple[str, int] | None:
    """('.../train/cat/0001.jpg' parts) -> ('train', 3), or None if not a dataset image."""
    if len(parts) < 3 or not parts[-1].lower().endswith(IMAGE_EXTS):
        return None
    split, cls = parts[-3], parts[-2]
    if split not in SPLITS or cls not in CLASSES:
        return None
    return split, CLASSES.index(cls)


def _find_tree(root: Path) -> Path | None:
    for cand in (root, root / "cifar10"):
        if all((cand / s).is_dir() for s in SPLITS):
            return cand
    return None


def _read_tree(tree: Path, split: str) -> Cifar10Arrays:
    items = []
    for cls_dir in sorted((tree / split).iterdir()):
        if cls_dir.name not in CLASSES:
            continue
        for f in cls_dir.iterdir():
            if f.suffix.lower() in IMAGE_EXTS:
                items.append((f"{cls_dir.name}/{f.name}", CLASSES.index(cls_dir.name), f.read_bytes()))
    if not items:
        raise DataError(f"no images found under {tree / split}/<class>/")
    return _decode(items, str(tree / split))


def _archive_cache_path(archive: Path, split: str) -> Path:
    st = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / f"{archive.name.split('.')[0]}-{key}-{split}.npz"


def _read_archive(archive: Path, split: str) -> Cifar10Arrays:
    """Decode both splits of a .tar.gz tree once, cache them, return the one asked for."""
    cached = _archive_cache_path(archive, split)
    if cached.exists():
        with np.load(cached) as z:
            return Cifar10Arrays(z["images"], z["labels"], str(archive))
    per_split: dict[str, list] = {s: [] for s in SPLITS}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                hit = _split_of(tuple(Path(member.name).parts)) if member.isfile() else None
                if hit:
                    blob = tar.extractfile(member).read()
                    per_split[hit[0]].append((member.name, hit[1], blob))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read archive {archive}: {e}. Is it a complete .tar.gz?") from e
    for s in SPLITS:
        if not per_split[s]:
            raise DataError(f"archive {archive} holds no {s}/<class>/<image> files")
    result = None
    for s in SPLITS:
        arrays = _decode(per_split[s], str(archive))
        # a temporary name of this process's own, then a rename: an interrupted run leaves no
        # half cache, and two processes decoding at once do not take each other's file
        atomic_write(_archive_cache_path(archive, s), lambda tmp: _save_npz(tmp, arrays))
        if s == split:
            result = arrays
    return result


def _save_npz(path: str, arrays: Cifar10Arrays) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a bare name
        np.savez(f, images=arrays.images, labels=arrays.labels)


def _download(root: Path, split: str) -> Cifar10Arrays:
    import torchvision

    try:
        torchvision.datasets.CIFAR10(str(root), train=(split == "train"), download=True)
    except Exception as e:  # offline: URLError, socket errors, ...
        raise DataError(
            f"no CIFAR-10 found in {root.resolve()} (looked for cifar-10-batches-py/, "
            f"train/ and test/ class folders, or a *.tar.gz of them), and downloading it "
            f"failed ({type(e).__name__}: {e}). Point --data-dir or CIFAR10_DIR at a local "
            f"copy, e.g. CIFAR10_DIR=../shared/datasets/cifar10"
        ) from None
    return _read_official(root / "cifar-10-batches-py", split)


def load_split(split: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> Cifar10Arrays:
    """Load one split ("train" or "test") as uint8 arrays, from whichever layout is present."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = resolve_data_dir(data_dir)
    if root.is_file() and root.name.endswith(".tar.gz"):
        return _read_archive(root, split)
    for batches in (root / "cifar-10-batches-py", root):
        if (batches / "test_batch").is_file():
            return _read_official(batches, split)
    tree = _find_tree(root)
    if tree is not None:
        return _read_tree(tree, split)
    archives = sorted(root.glob("*.tar.gz")) if root.is_dir() else []
    if archives:
        return _read_archive(archives[0], split)
    if not download:
        raise DataError(f"no CIFAR-10 found in {root.resolve()} and downloading is disabled")
    return _download(root, split)


# ---------------------------------------------------------------- torch datasets


def transforms(train: bool):
    """The reference's preprocessing; random crop and flip for training only."""
    from torchvision import transforms as T

    augment = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    return T.Compose([T.ToTensor(), *augment, T.Normalize(MEAN, STD)])  # augment the (3, 32, 32) tensor


class ArrayDataset:
    """A torch-style dataset over uint8 HWC arrays; index i is always the same image."""

    def __init__(self, arrays: Cifar10Arrays, indices=None, train: bool = False):
        self.arrays = arrays
        self.indices = np.arange(len(arrays)) if indices is None else np.asarray(indices)
        self.transform = transforms(train)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        j = self.indices[i]
        return self.transform(self.arrays.images[j]), int(self.arrays.labels[j])


def first_n(n: int | None, total: int) -> np.ndarray:
    """Deterministic subset: the first n indices (all when n is None)."""
    if n is not None and not 0 < n <= total:
        raise DataError(f"asked for {n} images but the split holds {total}")
    return np.arange(total if n is None else n)


def dataset(split: str, data_dir=None, n: int | None = None, start: int = 0, train_aug: bool = False) -> ArrayDataset:
    """The images [start, start + n) of a split, preprocessed (no augmentation unless asked)."""
    arrays = load_split(split, data_dir)
    if start < 0 or start >= len(arrays):
        raise DataError(f"--start {start} is outside the {split} split (0..{len(arrays) - 1})")
    idx = start + first_n(n, len(arrays) - start)
    return ArrayDataset(arrays, idx, train=train_aug)


def train_val_datasets(data_dir=None, val_size: int = 5000, n_train: int | None = None):
    """Held-out validation = the last val_size training images; the test split stays untouched."""
    arrays = load_split("train", data_dir)
    if not 0 < val_size < len(arrays):
        raise DataError(f"--val-size {val_size} must be between 1 and {len(arrays) - 1}")
    train_idx = np.arange(len(arrays) - val_size)
    if n_train is not None:
        train_idx = train_idx[first_n(n_train, len(train_idx))]
    val_idx = np.arange(len(arrays) - val_size, len(arrays))
    return ArrayDataset(arrays, train_idx, train=True), ArrayDataset(arrays, val_idx, train=False)


def stack(ds: ArrayDataset):
    """All images of a (small) dataset as one (N, 3, 32, 32) float tensor, plus labels (N,)."""
    import torch

    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), np.asarray(ys)
