"""Fixtures: small generated datasets in every layout, a tiny trained checkpoint, and the
shared CIFAR-10 copy when this machine has it."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
from models import TINY  # noqa: E402

SHARED = ROOT.parent / "shared" / "datasets" / "cifar10"
# the tiny model with its encrypted conv in 2 groups of 4 channels
TINY_G2 = dataclasses.replace(TINY, name="tiny_g2", convs=[(8, 3, 2, 1, 0, 2)])
N_PER_CLASS = {"train": 6, "test": 2}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long runs (real FHE on bigger circuits, full-split evaluations)")
    config.addinivalue_line("markers", "dataset: needs ../shared/datasets/cifar10")


_status = {}


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    _status["exit"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Exit with pytest's own status. Once a test has run a Concrete circuit, concrete-python
    2.10's runtime ends the process with status 0 whatever pytest returns, so a failing
    suite would look green; os._exit skips that exit handler. This is the last hook, after
    the summary is printed and every plugin has finished (cli.hard_exit does the same for
    the scripts)."""
    if "exit" in _status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_status["exit"])


def pytest_collection_modifyitems(config, items):
    if config.getoption("-m"):
        return
    skip = pytest.mark.skip(reason="slow: run with -m 'slow or not slow'")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def fake_images(split: str, seed: int):
    """Images whose mean colour depends on the class, so a model can learn something."""
    rng = np.random.default_rng(seed)
    for label, cls in enumerate(data.CLASSES):
        for i in range(N_PER_CLASS[split]):
            base = np.array([label * 25, 255 - label * 25, (label * 77) % 255], dtype=np.int16)
            img = np.clip(base + rng.integers(-30, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            yield cls, label, i, img


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Archive caches go to a temporary folder; tests never read the user's cache."""
    monkeypatch.setenv("CIFAR10_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv("CIFAR10_DIR", raising=False)


def write_tree(root: Path, ext: str = "png") -> Path:
    for split in data.SPLITS:
        for cls, _, i, img in fake_images(split, seed=7):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:04d}.{ext}")
    return root


@pytest.fixture(scope="session")
def tree_dir(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="session")
def archive_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    tree = write_tree(root / "build" / "cifar10", ext="jpg")
    with tarfile.open(root / "cifar10-jpeg.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname="cifar10")
    return root


@pytest.fixture(scope="session")
def official_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("official")
    d = root / "cifar-10-batches-py"
    d.mkdir()
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        items = list(fake_images(split, seed=7))
        chunks = np.array_split(np.arange(len(items)), len(names))
        for name, idx in zip(names, chunks):
            flat = np.stack([items[j][3].transpose(2, 0, 1).reshape(-1) for j in idx])  # (N, 3072), CHW
            with open(d / name, "wb") as f:
                pickle.dump({"data": flat, "labels": [items[j][1] for j in idx]}, f)
    return root


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_data_dir) -> Path:
    """A tiny model trained for one epoch on generated data (a few seconds)."""
    import train

    out = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    train.main(["--model", "tiny", "--epochs", "1", "--data-dir", str(tiny_data_dir), "--val-size", "10",
                "--batch-size", "16", "--workers", "0", "--out", str(out)])
    return out


def encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def needs_dataset(fn):
    """A test on the shared CIFAR-10 copy: marked `dataset` (its own tier in `make test`),
    skipped where the copy is absent."""
    return pytest.mark.dataset(pytest.mark.skipif(not SHARED.exists(), reason="../shared/datasets/cifar10 not present")(fn))


def assert_no_secret_key(blobs: list[bytes], client_dir: Path) -> None:
    """No piece of any secret key the client holds (in client_dir/keys) is in blobs."""
    secrets = sorted((Path(client_dir) / "keys").rglob("secretKey_*"))
    assert secrets, "the client holds its secret keys"
    for path in secrets:
        key = path.read_bytes()
        window = key[len(key) // 2 : len(key) // 2 + 256]  # binary coefficients as u64 words
        assert len(set(window)) > 1  # not a run of one byte value
        assert not any(window in b for b in blobs), f"{path.name} found"
