"""benchmarks/quality.py: the Frechet distance, precision/recall and class entropy against their definitions,
the PNG-grid reader, and the calibration floors in the right order on synthetic digits (no MNIST needed)."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402
import quality as Q  # noqa: E402


def test_frechet_distance_of_two_gaussians_is_the_closed_form():
    """N(0, I) vs N(mu, diag(s^2)): ||mu||^2 + sum (1 - s)^2, from samples."""
    g = torch.Generator().manual_seed(0)
    mu, s = torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([1.0, 2.0, 0.5, 3.0])
    a = torch.randn(200_000, 4, generator=g)
    b = torch.randn(200_000, 4, generator=g) * s + mu
    expected = (mu ** 2).sum() + ((1 - s) ** 2).sum()  # 5.25 + 5.25
    assert Q.frechet_distance(a, b) == pytest.approx(expected.item(), rel=0.02)
    assert Q.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_with_correlated_features_is_the_closed_form():
    """Non-diagonal covariances S1 = A A^T, S2 = B B^T: Tr (S1 S2)^(1/2) = sum sqrt(eig(S1 S2)), computed here from
    the eigenvalues of the non-symmetric product (another route than quality.py's). A formula that read only the
    diagonals would give ||mu||^2 + sum (sqrt(s1_ii) - sqrt(s2_ii))^2, far from it."""
    g = torch.Generator().manual_seed(1)
    A = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.5, 0.0], [-0.4, 0.3, 0.8]], dtype=torch.float64)
    B = torch.tensor([[1.5, 0.0, 0.0], [-1.0, 0.7, 0.0], [0.2, 0.9, 0.4]], dtype=torch.float64)
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    s1, s2 = A @ A.T, B @ B.T
    tr_sqrt = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0).sqrt().sum()
    expected = (mu ** 2).sum() + s1.trace() + s2.trace() - 2 * tr_sqrt
    diagonal_only = (mu ** 2).sum() + ((s1.diagonal().sqrt() - s2.diagonal().sqrt()) ** 2).sum()
    assert abs(expected - diagonal_only) > 1.0  # the test tells the two apart
    a = torch.randn(400_000, 3, generator=g, dtype=torch.float64) @ A.T
    b = torch.randn(400_000, 3, generator=g, dtype=torch.float64) @ B.T + mu
    assert Q.frechet_distance(a, b) == pytest.approx(expected.item(), rel=0.02)
    assert Q.frechet_distance(a, b) == pytest.approx(Q.frechet_distance(b, a), rel=1e-9)  # symmetric


def test_precision_and_recall_follow_the_knn_manifolds():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(500, 8, generator=g)
    assert Q.precision_recall(real, real) == (1.0, 1.0)  # every point lies in its own ball
    assert Q.precision_recall(real + 100, real) == (0.0, 0.0)  # far away: neither looks real nor covers
    cluster = real[:1] + 0.01 * torch.randn(500, 8, generator=g)  # all samples near one real point
    precision, recall = Q.precision_recall(cluster, real)
    assert precision == 1.0 and recall < 0.05  # real-looking, but a collapse: covers almost nothing


def test_class_entropy_is_one_for_all_classes_and_zero_for_one():
    assert Q.class_entropy(torch.full((10,), 7)) == pytest.approx(1.0)
    assert Q.class_entropy(torch.tensor([0, 0, 0, 50, 0, 0, 0, 0, 0, 0])) == pytest.approx(0.0, abs=1e-9)
    assert Q.class_entropy(torch.tensor([5, 5] + [0] * 8)) == pytest.approx(math.log(2) / math.log(10))


def test_a_png_grid_reads_back_as_its_images(tmp_path):
    x = torch.rand(12, 1, 28, 28)
    common.save_grid(x, tmp_path / "grid.png", nrow=4)
    back = Q.read_samples(tmp_path / "grid.png")
    assert back.shape == (12, 1, 28, 28)
    assert (back - x).abs().max() <= 1 / 255 + 1e-6  # 8-bit PNG: within one level
    torch.save(x * 2, tmp_path / "bad.pt")
    with pytest.raises(common.UsageError, match="in \\[0, 1\\]"):
        Q.read_samples(tmp_path / "bad.pt")
    with pytest.raises(common.UsageError, match="no such file"):
        Q.read_samples(tmp_path / "none.pt")


def synthetic_digits(n, seed):
    """Ten classes of 28x28 strokes: class k is a 3-pixel-wide bar through the centre at angle 18k degrees,
    shifted by up to 3 pixels and with random grey levels, so a class is a spread, not a point."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    angle = y.float() * math.pi / 10
    shift = torch.randint(-3, 4, (n, 2), generator=g).float()
    px, py = xx[None] - 13.5 - shift[:, 0, None, None], yy[None] - 13.5 - shift[:, 1, None, None]
    dist = (px * torch.sin(angle)[:, None, None] - py * torch.cos(angle)[:, None, None]).abs()
    along = (px * torch.cos(angle)[:, None, None] + py * torch.sin(angle)[:, None, None]).abs()
    ink = ((dist < 1.5) & (along < 10)).float() * (0.6 + 0.4 * torch.rand(n, 1, 1, generator=g))
    return ink[:, None], y


def test_the_floors_come_in_order_real_blurred_one_class():
    """The calibration that makes the figures mean something: real images score best, blurred ones worse, a
    single class worst (FD), and a single class covers little of the data (recall)."""
    torch.manual_seed(0)
    x, y = synthetic_digits(3000, seed=1)
    x_test, y_test = synthetic_digits(1000, seed=2)
    model = Q.fit_classifier(x, y, steps=150)
    assert (Q.predict(model, x_test)[0].argmax(1) == y_test).float().mean() > 0.9  # it learned the classes
    test_feats, real_feats = Q.reference(model, (x, y, x_test, y_test), n=300)
    rows = {name: Q.score(model, imgs, test_feats, real_feats) for name, imgs in Q.floors((x, y), n=300).items()}
    real, blurred, one = (rows[k] for k in ("real training images (floor)", "real, blurred (sigma 1)",
                                            "real, one class (7)"))
    assert real["fd"] < blurred["fd"] < one["fd"]
    assert one["recall"] < real["recall"] and one["class_entropy"] < 0.2 < 0.9 < real["class_entropy"]
    # asked class: the real images' own labels are what the classifier sees; a shift of every label by one is not
    images, labels = x_test[:300], y_test[:300]
    assert Q.score(model, images, test_feats, real_feats, labels)["asked"] > 0.9
    assert Q.score(model, images, test_feats, real_feats, (labels + 1) % 10)["asked"] < 0.1


def test_labels_are_read_from_beside_a_samples_file(tmp_path):
    torch.save(torch.rand(4, 1, 28, 28), tmp_path / "samples.pt")
    assert Q.read_labels(tmp_path / "samples.pt") is None  # an unconditional model's samples
    torch.save(torch.tensor([3, 3, 1, 0]), tmp_path / "labels.pt")
    assert torch.equal(Q.read_labels(tmp_path / "samples.pt"), torch.tensor([3, 3, 1, 0]))
