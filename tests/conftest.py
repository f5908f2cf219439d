"""Shared test fixtures: a tiny fake MNIST / CIFAR-10 in the real on-disk formats, so the real loaders run
without the network, and the repo root on sys.path so tests can import the scripts."""
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)


def fake_digits(n, seed, size=28):
    """n images of class-dependent strokes: class k is a bar at angle k*18 degrees, plus noise. Structured
    enough that a model can learn it in a few steps and a classifier can tell the classes apart."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    images = np.zeros((n, size, size), np.float32)
    for i, k in enumerate(labels):
        a = np.deg2rad(k * 18)
        dist = np.abs(xx * np.sin(a) - yy * np.cos(a))  # distance to a line through the centre
        images[i] = (dist < 1.5 + rng.uniform(0, 1)) * (np.hypot(xx, yy) < size * 0.4)
    images = np.clip(images * 255 + rng.normal(0, 10, images.shape), 0, 255)
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_idx(folder, prefix, images, labels):
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, h, w) + images.tobytes())
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A data folder with fake MNIST (256 train, 64 test) and fake CIFAR-10 (64 train, 32 test)."""
    root = tmp_path_factory.mktemp("data")
    for name in ("MNIST", "FashionMNIST"):
        write_idx(root / name / "raw", "train", *fake_digits(256, seed=0))
        write_idx(root / name / "raw", "t10k", *fake_digits(64, seed=1))
    cifar = root / "cifar-10-batches-py"
    cifar.mkdir()
    rng = np.random.default_rng(2)
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        n = 32 if name == "test_batch" else 13
        batch = {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        with open(cifar / name, "wb") as f:
            pickle.dump(batch, f)
    return root


@pytest.fixture
def one_thread():
    """For tests of models too small to gain from a second thread: on a busy shared CPU every op of a 2-thread run
    waits at a barrier for the descheduled thread (seen: 10x slower); restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_mnist(tmp_path_factory):
    """Fake MNIST of 8x8 digits with their labels, in the real IDX format: for the pixel models, whose sampling of
    28x28 images would dominate the test time."""
    root = tmp_path_factory.mktemp("small")
    write_idx(root / "MNIST" / "raw", "train", *fake_digits(64, seed=0, size=8))
    write_idx(root / "MNIST" / "raw", "t10k", *fake_digits(16, seed=1, size=8))
    return root


def sigint_at(monkeypatch, step):
    """Send Ctrl-C (SIGINT) to this process as step `step` of a run ends (common.Run.log, the end of every step)."""
    import os
    import signal

    import common
    log = common.Run.log

    def log_then_interrupt(self, figures):
        log(self, figures)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(common.Run, "log", log_then_interrupt)


def same_weights(ckpt_a, ckpt_b, key="model"):
    """True when two checkpoint files hold bit-identical tensors under `key` (a state dict)."""
    a = torch.load(ckpt_a, weights_only=True)[key]
    b = torch.load(ckpt_b, weights_only=True)[key]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def folder_snapshot(folder):
    """{relative path: bytes} of every file under `folder`: to show that bad input wrote nothing."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
