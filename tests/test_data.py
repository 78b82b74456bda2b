"""The one loader: every layout, the cache, the fixed order, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

import data
import infer_torch
from conftest import N_PER_CLASS, SHARED, needs_dataset


@pytest.mark.parametrize("layout", ["tree_dir", "archive_dir", "official_dir"])
def test_every_layout_loads_both_splits(layout, request):
    root = request.getfixturevalue(layout)
    for split in data.SPLITS:
        arr = data.load_split(split, root, download=False)
        assert arr.images.shape == (10 * N_PER_CLASS[split], 32, 32, 3)
        assert arr.images.dtype == np.uint8 and arr.images.flags["C_CONTIGUOUS"]
        assert np.bincount(arr.labels, minlength=10).tolist() == [N_PER_CLASS[split]] * 10


def test_layouts_agree_on_pixels_and_labels(tree_dir, official_dir):
    tree = data.load_split("test", tree_dir)
    official = data.load_split("test", official_dir)
    # same generated images; the tree is re-ordered by the fixed shuffle, so compare as sets
    key = lambda a: sorted((int(l), a.images[i].tobytes()) for i, l in enumerate(a.labels))  # noqa: E731
    assert key(tree) == key(official)


def test_folder_order_is_shuffled_and_fixed(tree_dir):
    a = data.load_split("train", tree_dir)
    b = data.load_split("train", tree_dir)
    assert (a.labels == b.labels).all()
    # archives group files by class; the loader must not keep that order
    assert not (np.diff(a.labels) >= 0).all()


def test_archive_is_decoded_once(archive_dir, monkeypatch):
    first = data.load_split("train", archive_dir)
    calls = []
    monkeypatch.setattr(data, "_decode", lambda *a: calls.append(a))
    again = data.load_split("train", archive_dir)
    assert calls == [] and (again.images == first.images).all()


def test_two_processes_decoding_one_archive_at_once_both_succeed(archive_dir, monkeypatch, tmp_path):
    """Two runs started together on a fresh machine both decode the archive and write its cache.
    Here the second one runs entirely while the first is writing its cache file: neither may
    take the other's temporary file (a shared name made the first fail to rename)."""
    monkeypatch.setenv("CIFAR10_CACHE", str(tmp_path / "fresh-cache"))
    real_savez, other = np.savez, {}

    def savez_then_other_process(*args, **kwargs):
        real_savez(*args, **kwargs)
        if "started" not in other:
            other["started"] = True
            other["test"] = data.load_split("test", archive_dir)

    monkeypatch.setattr(np, "savez", savez_then_other_process)
    first = data.load_split("train", archive_dir)
    assert len(first.labels) == 10 * N_PER_CLASS["train"] and len(other["test"].labels) == 10 * N_PER_CLASS["test"]
    assert sorted(p.name.split("-")[-1] for p in data.cache_dir().iterdir()) == ["test.npz", "train.npz"]


def test_corrupt_archive_is_a_clear_error(tmp_path):
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b\x08 this is not a tarball")
    with pytest.raises(data.DataError, match="cannot read archive"):
        data.load_split("test", tmp_path)
    assert not any(data.cache_dir().glob("broken*"))  # nothing half-written


def test_missing_directory_message_and_exit(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(data.DataError, match="no CIFAR-10 found"):
        data.load_split("test", missing, download=False)
    # through a CLI, with the download failing as it does offline: one message, exit status 2
    monkeypatch.setattr(data, "_download", lambda root, split: (_ for _ in ()).throw(data.DataError(f"no CIFAR-10 found in {root}")))
    from cli import exit_status

    assert exit_status(infer_torch.main, ["--data-dir", str(missing), "--checkpoint", "checkpoints/fast.pt"]) == 2
    assert "no CIFAR-10 found" in capsys.readouterr().err


def test_offline_download_failure_names_what_was_looked_for(tmp_path, monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(data.DataError) as e:
        data.load_split("test", tmp_path)
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and "CIFAR10_DIR" in msg and "network unreachable" in msg


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    assert str(data.resolve_data_dir(None)) == "data"
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path))
    assert data.resolve_data_dir(None) == tmp_path
    assert str(data.resolve_data_dir("x")) == "x"


def test_subsets_are_deterministic_prefixes(tree_dir):
    ds = data.dataset("train", tree_dir, n=5)
    assert list(ds.indices) == [0, 1, 2, 3, 4]
    x0, y0 = ds[0]
    assert x0.shape == (3, 32, 32) and -1.0 <= float(x0.min()) and float(x0.max()) <= 1.0
    with pytest.raises(data.DataError):
        data.dataset("train", tree_dir, n=10_000)


@needs_dataset
def test_shared_dataset_counts():
    train = data.load_split("train", SHARED)
    test = data.load_split("test", SHARED)
    assert len(train) == 50_000 and len(test) == 10_000
    assert np.bincount(test.labels).tolist() == [1000] * 10
    # the fixed shuffle makes prefixes class-balanced
    assert np.bincount(test.labels[:1000], minlength=10).min() > 70
