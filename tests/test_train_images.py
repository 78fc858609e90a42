"""train_images.py: conventions, one step per sigma mode on both architectures, resume, end to end on tiny data."""

import argparse
import gzip
import json
import math
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_images
from common import bits_per_dim, dequantized_bits_per_dim, discretized_gaussian_nll, elbo_terms, load_checkpoint

ROOT = train_images.__file__.rsplit("/", 1)[0]


def write_tiny_mnist(folder, n_train=192, n_test=48, seed=0):
    """Four gzip IDX files with random strokes, in MNIST's own format."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        images = (rng.random((n, 28, 28)) > 0.8).astype(np.uint8) * rng.integers(100, 256, (n, 28, 28), dtype=np.uint8)
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes())
    return folder


def test_bits_per_dim_conventions_on_hand_computed_cases():
    # A uniform density on [0, 1]^D: log p = 0, so 8-bit data cost log2(255) ~ 8 bits/dim through dequantization.
    assert dequantized_bits_per_dim(0.0, 784, 1 / 255) == pytest.approx(math.log2(255))
    # sigma^2 = 1/2 (the MSE) with zero error: log p = -D/2 log(pi) nats: -0.826 bits/pixel in Table 2's unit.
    assert bits_per_dim(-784 / 2 * math.log(math.pi), 784) == pytest.approx(-0.5 * math.log2(math.pi))
    # A density of 2^3 per dim on 8-bit data with bins of 1/255: 7.994 - 3 bits/dim.
    assert dequantized_bits_per_dim(3 * 10 * math.log(2), 10, 1 / 255) == pytest.approx(math.log2(255) - 3)


def test_discretized_likelihood_sums_to_one_over_the_256_bins():
    pixels = (torch.arange(256, dtype=torch.float64) / 255).reshape(256, 1)
    for mean in [-0.3, 0.0, 0.37, 1.0, 1.4]:
        for log_sigma in [-8.0, -6.0, -3.0, 0.0, 4.0, 12.0]:
            nll = discretized_gaussian_nll(pixels, torch.full_like(pixels, mean), torch.full_like(pixels, log_sigma))
            assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=1e-6), (mean, log_sigma)
            assert (nll >= -1e-12).all()
    # float32, as in training: still a distribution
    pixels32 = pixels.float()
    nll = discretized_gaussian_nll(pixels32, torch.full_like(pixels32, 0.5), torch.full_like(pixels32, -5.0))
    assert torch.exp(-nll.double()).sum().item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("dataset", ["mnist", "celeba"])
@pytest.mark.parametrize("sigma", ["fixed", "learned-scalar", "learned", "optimal"])
def test_one_training_step_per_sigma_mode(dataset, sigma):
    torch.manual_seed(0)
    args = train_images.parse_args(["--dataset", dataset, "--sigma", sigma])
    model, obs = train_images.make_model(args)
    arch = train_images.ARCHITECTURES[dataset]
    x = torch.rand(2, arch["channels"], arch["size"], arch["size"])
    optimizer = torch.optim.Adam(list(model.parameters()) + list(obs.parameters()), lr=1e-3)
    for likelihood in ["continuous", "discretized"]:
        args.likelihood = likelihood
        recon_nll, kl, elbo, (mean, log_sigma) = elbo_terms(model, obs, x, event_dims=3, nll=train_images.likelihood(args))
        assert mean.shape == x.shape and recon_nll.shape == kl.shape == (2,)
        assert torch.isfinite(elbo).all()
        optimizer.zero_grad()
        (-elbo.mean()).backward()
        if sigma == "learned-scalar":
            assert obs.raw_log_sigma.grad.abs().item() > 0
        if sigma == "learned":  # the decoder's last transposed conv: output channels C..2C hold raw log sigma
            grad = model.decoder[-1].weight.grad[:, arch["channels"] :]
            assert grad.abs().sum() > 0
            assert log_sigma.shape == x.shape
        optimizer.step()


def run(args, cwd=ROOT, timeout=600):
    result = subprocess.run([sys.executable, "train_images.py", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout)
    return result


def tiny_flags(tmp_path, data):
    return ["--data-dir", str(data), "--batch-size", "64", "--eval-images", "32", "--iwae-k", "3",
            "--iwae-images", "8", "--log-every", "1", "--logdir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    data = write_tiny_mnist(tmp_path / "mnist")
    straight = run(["--epochs", "2", *tiny_flags(tmp_path / "a", data)])
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run(["--epochs", "1", *tiny_flags(tmp_path / "b", data)])
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = next((tmp_path / "b" / "runs").glob("*/ckpt.pt"))
    resumed = run(["--resume", str(ckpt), "--epochs", "2", "--out", str(tmp_path / "b" / "out")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_checkpoint(next((tmp_path / "a" / "runs").glob("*/ckpt.pt")))
    b = load_checkpoint(ckpt)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # The resumed run wrote into the same run folder: one TensorBoard run, one checkpoint.
    assert len(list((tmp_path / "b" / "runs").iterdir())) == 1


def test_end_to_end_writes_table_and_figures(tmp_path):
    data = write_tiny_mnist(tmp_path / "mnist")
    for sigma in ["fixed", "learned"]:
        result = run(["--epochs", "1", "--sigma", sigma, *tiny_flags(tmp_path, data)])
        assert result.returncode == 0, result.stderr[-3000:]
    result = run(["--epochs", "1", "--likelihood", "discretized", *tiny_flags(tmp_path, data)])
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["sigma"], r["likelihood"]) for r in runs] == [("fixed", "continuous"), ("learned", "continuous"),
                                                            ("learned", "discretized")]
    for r in runs:
        assert math.isfinite(r["final"]["bits_per_dim_8bit"]) and math.isfinite(r["iwae"]["bits_per_dim_8bit"])
    fixed = runs[0]["final"]["table2_bits_per_pixel"]
    assert fixed < -0.5 * math.log2(math.pi)  # sigma^2 = 1/2 caps the density at -0.826 bits/pixel
    assert runs[2]["final"]["table2_bits_per_pixel"] is None and runs[2]["final"]["bits_per_dim_8bit"] > 0
    table = (out / "table2.md").read_text()
    assert table.count("| mnist |") == 3 and "| 0.06 |" in table and "| 4.89 |" in table
    for name in ["mnist_fixed_continuous", "mnist_learned_continuous", "mnist_learned_discretized"]:
        for kind in ["reconstructions", "generations"]:
            assert (out / f"{name}_{kind}.png").stat().st_size > 500


@pytest.mark.parametrize("flags, message", [
    (["--sigma", "learned", "--sigma-value", "0.1"], "--sigma-value goes with --sigma fixed only"),
    (["--dataset", "celeba", "--download"], "--download fetches MNIST only"),
    (["--resume", "x.pt", "--sigma", "fixed"], "drop --sigma"),
    (["--epochs", "0"], "--epochs must be >= 1"),
])
def test_contradictory_flags_are_refused(flags, message):
    result = run(flags)
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]


def test_missing_data_and_bad_checkpoint_give_one_clear_line(tmp_path):
    result = run(["--data-dir", str(tmp_path / "nowhere"), "--epochs", "1"])
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "nowhere" in result.stderr and "--download" in result.stderr
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"garbage")
    result = run(["--resume", str(bad)])
    assert result.returncode == 1 and "corrupt" in result.stderr and len(result.stderr.strip().splitlines()) == 1
