"""train_images.py: conventions, one step per sigma mode on both architectures, resume, end to end on tiny data;
torchrun on 2 gloo processes, the NaN guard, SIGTERM and resume, killed saves and damaged checkpoints."""

import gzip
import json
import math
import os
import pathlib
import signal
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import train_images
from common import (bits_per_dim, dequantized_bits_per_dim, discretized_gaussian_nll, elbo_terms, gaussian_nll,
                    load_checkpoint)
from kernels.gaussian_nll import TRITON_AVAILABLE
from test_common import ReplayedOnCPU

ROOT = train_images.__file__.rsplit("/", 1)[0]


def write_tiny_mnist(folder, n_train=192, n_test=48, seed=0, blank_test_images=0):
    """Four gzip IDX files of random strokes in MNIST's format; the first `blank_test_images` test images are blank."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        images = (rng.random((n, 28, 28)) > 0.8).astype(np.uint8) * rng.integers(100, 256, (n, 28, 28), dtype=np.uint8)
        if prefix == "t10k":
            images[:blank_test_images] = 0
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
        nll = train_images.likelihood(args)
        recon_nll, kl, elbo, (mean, log_sigma) = elbo_terms(model, obs, x, event_dims=3, nll=nll)
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


@pytest.mark.parametrize("sigma", ["fixed", "learned-scalar", "learned", "optimal"])
def test_the_evaluated_elbo_splits_into_kl_log_sigma_and_residuals(sigma):
    # The one-sample bound's record carries its KL and mean log sigma, by which a generalisation gap splits (Eq. 11):
    # -ELBO = KL + D (mean log sigma + 1/2 log 2 pi) + sum (x - mean)^2 / 2 sigma^2, the last part >= 0.
    torch.manual_seed(0)
    args = train_images.parse_args(["--sigma", sigma, "--batch-size", "4"])
    model, obs = train_images.make_model(args)
    pixels = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8)
    device = torch.device("cpu")
    result = train_images.evaluate(model, obs, pixels, args, device, generator=torch.Generator().manual_seed(3))
    x = pixels.float() / 255
    eps = torch.randn(10, model.latent_dim, generator=torch.Generator().manual_seed(3))  # its first draw: one batch
    model.eval(), obs.eval()
    with torch.no_grad():
        _, kl, elbo, (mean, log_sigma) = elbo_terms(model, obs, x, eps=eps, event_dims=3)
    assert result["kl_nats_per_image"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert result["mean_log_sigma"] == pytest.approx(log_sigma.expand_as(x).mean().item(), rel=1e-5, abs=1e-6)
    assert result["nats_per_image"] == pytest.approx(elbo.mean().item(), rel=1e-5)
    dims = x[0].numel()
    residual = -result["nats_per_image"] - result["kl_nats_per_image"] - dims * (
        result["mean_log_sigma"] + 0.5 * math.log(2 * math.pi))
    by_hand = (((x - mean) ** 2) / (2 * torch.exp(2 * log_sigma))).sum((1, 2, 3)).mean().item()
    assert residual == pytest.approx(by_hand, rel=1e-4) and residual > 0
    iwae = train_images.evaluate(model, obs, pixels, args, device, k=3, generator=torch.Generator().manual_seed(3))
    assert "kl_nats_per_image" not in iwae  # an importance-weighted bound has no such split


def run(args, cwd=ROOT, timeout=600, env=None):
    """train_images.py in a subprocess; on the CPU (its behaviour under test) unless args name a device."""
    device = [] if "--device" in args else ["--device", "cpu"]
    return subprocess.run([sys.executable, "train_images.py", *args, *device], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def tiny_flags(tmp_path, data):
    return ["--data-dir", str(data), "--batch-size", "64", "--eval-images", "32", "--iwae-k", "3",
            "--iwae-images", "8", "--log-every", "1", "--logdir", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out"), "--device", "cpu"]


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
    # The evaluated epochs' curves (test, training-image, validation ELBO) carry across the resume.
    assert len(a["curves"]) == 2 and a["curves"] == b["curves"] and a["curves"][0][3] is None
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
    for name in ["mnist_fixed_continuous_1ep", "mnist_learned_continuous_1ep", "mnist_learned_discretized_1ep"]:
        for kind in ["reconstructions", "generations"]:
            assert (out / f"{name}_{kind}.png").stat().st_size > 500
        assert f"| `{name}_{{reconstructions,generations}}.png` | `python train_images.py " in table


def test_f_vaes_of_other_sigmas_keep_figures_of_their_own():
    # Until 2026-11-29 the stem left --sigma-value out: F-VAEs with sigma 0.25 and 0.05 overwrote the MSE's figures.
    run = {"dataset": "mnist", "sigma": "fixed", "sigma_value": 1 / math.sqrt(2), "likelihood": "continuous",
           "epochs": 10, "seed": 0}
    assert train_images.figure_stem(run) == "mnist_fixed_continuous_10ep"
    assert train_images.figure_stem({**run, "sigma_value": 0.2517}) == "mnist_fixed0.2517_continuous_10ep"
    assert train_images.figure_stem({**run, "sigma_value": 0.5, "kl_weight": 4.0, "seed": 2}) == \
        "mnist_fixed0.5_continuous_10ep_kl4_seed2"
    assert train_images.figure_stem({**run, "sigma": "learned", "sigma_value": None}) == "mnist_learned_continuous_10ep"


def test_reconstruction_measures_on_hand_made_images():
    # A bright square on a dark field: its border pixels (both sides of the jump) are the edges, nothing else.
    x = torch.zeros(1, 1, 8, 8)
    x[..., 2:6, 2:6] = 1.0
    edges = train_images.edge_pixels(x)
    assert edges.sum() == 6 * 6 - 2 * 2 - 4 and not edges[..., 3:5, 3:5].any() and not edges[..., 0, :].any()
    # Per-pixel sigma 4x larger on the edges: ratio 4. Means off by 0.1 everywhere: MSE 0.01, PSNR 20 dB.
    log_sigma = torch.where(edges, math.log(0.04), math.log(0.01))
    psnr_db, ratio = train_images.reconstruction_measures(x, x + 0.1 * (1 - 2 * x), log_sigma)
    assert psnr_db == pytest.approx(20.0) and ratio == pytest.approx(4.0)
    assert train_images.reconstruction_measures(x, x, torch.zeros(1, 1, 1, 1)) == (math.inf, None)  # scalar sigma
    # Means outside [0, 1] are clipped first: a mean of 2 on the 16 white pixels costs nothing, 0.1 on the 48 dark ones
    # costs 0.01 each.
    psnr_db = train_images.reconstruction_measures(x, x * 2 + 0.1 * (1 - x), log_sigma)[0]
    assert psnr_db == pytest.approx(-10 * math.log10(0.01 * 48 / 64))


def test_table_2_gives_each_run_its_global_batch():
    # Recorded since 2026-11-28; before, read from the command (the default, 128, never changed) and the processes.
    command = "python train_images.py --dataset mnist"
    assert train_images.run_batch({"command": command}) == 128
    assert train_images.run_batch({"command": command + " --batch-size 512"}) == 512
    assert train_images.run_batch({"command": "torchrun " + command + " --batch-size=64", "processes": 2}) == 128
    assert train_images.run_batch({"command": command, "batch_size": 1024}) == 1024


@pytest.mark.skipif(train_images.fcntl is None, reason="file locks are POSIX")
def test_runs_that_finish_together_take_turns_at_table_2(tmp_path):
    """A run holding runs.jsonl's lock (another Table 2 row finishing) makes the next wait, so that the table
    rewritten last has both rows."""
    with open(os.path.join(ROOT, "results", "images", "runs.jsonl")) as f:
        record = json.loads(f.readline())  # a real record, as record_run writes it
    with open(tmp_path / "runs.jsonl", "a") as held:
        train_images.fcntl.flock(held, train_images.fcntl.LOCK_EX)
        waiting = threading.Thread(target=train_images.append_run, args=(str(tmp_path), record))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive() and (tmp_path / "runs.jsonl").read_text() == ""
        assert not (tmp_path / "table2.md").exists()
        held.write(json.dumps(record) + "\n")
    waiting.join(10)
    assert not waiting.is_alive() and len((tmp_path / "runs.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "table2.md").read_text().count(f"| {record['dataset']} |") == 2


def test_table_2_gathers_the_seeds_of_a_row(tmp_path):
    """Runs whose commands differ only in --seed get one row under 'Over seeds': the last run of each seed, mean,
    sample standard deviation and range; a run recorded without its seed has it read from its run folder."""
    with open(os.path.join(ROOT, "results", "images", "runs.jsonl")) as f:
        template = json.loads(f.readline())  # a real record, as record_run writes it
    template.pop("seed", None)
    command = "python train_images.py --dataset mnist --epochs 3 --sigma learned"
    records = []
    for seed, nats, command_seed in [(0, -100.0, ""), (1, 999.0, " --seed 1"), (2, -104.0, " --seed=2"),
                                     (1, -102.0, " --seed 1")]:  # seed 1 run again: its last run counts
        record = json.loads(json.dumps(template))
        record.update(command=command + command_seed, run_dir=f"runs/train_images__mnist__learned__seed{seed}__1")
        record["final"]["nats_per_image"] = nats
        records.append(record)
    alone = json.loads(json.dumps(template))
    alone.update(command=command + " --lr 1e-4 --seed 5", seed=5)
    with open(tmp_path / "runs.jsonl", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in [*records, alone])
    train_images.write_table2(str(tmp_path))
    table = (tmp_path / "table2.md").read_text()
    _, _, seeds = table.partition("## Over seeds")
    (row,) = [line for line in seeds.splitlines() if line.startswith("| ")][1:]  # below the header
    cells = row.split(" | ")
    assert cells[4] == "128" and cells[5] == "0, 1, 2" and f"`{command}`" in row and "--lr 1e-4" not in seeds
    assert cells[10] == "-102.000 ± 2.000 [-104.000, -100.000]"  # nats/image of seeds 0, 1 (its last run), 2
    assert f"| {template['likelihood']} | 5 |" in table and f"| {template['likelihood']} | 0 |" in table
    # The figures cell: n/a while a run's figures are not beside the table, their name once they are.
    assert table.partition("## Over seeds")[0].count(f"| n/a | `{command}") == 5
    stem = f"{template['dataset']}_{template['sigma']}_{template['likelihood']}_{template['epochs']}ep_seed2"
    for kind in ["reconstructions", "generations"]:
        (tmp_path / f"{stem}_{kind}.png").write_bytes(b"")
    train_images.write_table2(str(tmp_path))
    table = (tmp_path / "table2.md").read_text()
    assert f"| `{stem}_{{reconstructions,generations}}.png` | `{command} --seed=2` |" in table
    assert table.partition("## Over seeds")[0].count(f"| n/a | `{command}") == 4


@pytest.mark.parametrize("flags, message", [
    (["--sigma", "learned", "--sigma-value", "0.1"], "--sigma-value goes with --sigma fixed only"),
    (["--dataset", "celeba", "--download"], "--download fetches MNIST only"),
    (["--resume", "x.pt", "--sigma", "fixed"], "drop --sigma"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--device", "cpu", "--compile", "reduce-overhead"], "records CUDA graphs"),
    (["--device", "cpu", "--compile", "whole-step"], "records CUDA graphs"),
    (["--eval-images", "0"], "--eval-images must be >= 1"),
    (["--eval-every", "0"], "--eval-every must be >= 1"),
    (["--lv-fresh-adam"], "--lv-fresh-adam restarts Adam at the warm start's hand-over; add --lv-warmup N"),
    (["--lv-warmup-sigma", "optimal"], "--lv-warmup-sigma is the warm start's phase before the hand-over"),
    (["--lv-handover-sigma", "mse"], "--lv-handover-sigma is where the warm start's head starts; add --lv-warmup N"),
    (["--lv-warmup", "5", "--lv-warmup-sigma", "optimal", "--lv-handover-sigma", "mse"],
     "--lv-handover-sigma mse is what --lv-warmup-sigma optimal does already"),
    (["--celeba-extra-train", "img_align_celeba_89x109"], "--celeba-extra-train adds CelebA training images"),
    (["--dataset", "celeba", "--celeba-extra-train", "img_align_celeba/"], "names the --celeba-images folder itself"),
    (["--valid-images", "0"], "--valid-images must be >= 1"),
    (["--resume", "x.pt", "--valid-images", "5"], "drop --valid-images"),
    (["--kl-weight", "0"], "--kl-weight must be a finite number > 0"),
    (["--kl-weight", "inf"], "--kl-weight must be a finite number > 0"),
])
def test_contradictory_flags_are_refused(flags, message):
    result = run(flags)
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]


def test_a_kl_weight_on_a_fixed_sigma_is_a_sigma_in_disguise(tmp_path):
    # Sec. 3.2: with sigma fixed, lambda on the KL makes the loss lambda times the ELBO loss of sigma x sqrt(lambda), up
    # to a constant: sigma = 0.5 with lambda = 4 has 4 times the gradients of sigma = 1 with lambda = 1, exactly.
    gradients = {}
    for sigma_value, kl_weight in [("0.5", "4"), ("1", "1")]:
        torch.manual_seed(0)
        args = train_images.parse_args(["--sigma", "fixed", "--sigma-value", sigma_value, "--kl-weight", kl_weight,
                                        "--device", "cpu"])
        train_images.resolve_defaults(args, torch.device("cpu"), 1)
        model, _, step_module, _ = train_images.build(args, torch.device("cpu"))
        torch.manual_seed(1)
        recon_nll, kl, objective, _ = step_module(torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8),
                                                  torch.randn(8, model.latent_dim))
        objective.mean().backward()
        gradients[kl_weight] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert gradients["4"].norm() > 0 and torch.equal(gradients["4"], 4 * gradients["1"])
    # Adam is blind to the gradients' scale but for its eps (1e-8), which tells g from 4g where |g| is near it (15% of
    # this tiny run's entries): the two trainings end close, and sigma = 0.5 with lambda = 1 far from both.
    data = write_tiny_mnist(tmp_path / "mnist")
    weights, records = {}, {}
    for name, flags in [("weighted", ["--sigma-value", "0.5", "--kl-weight", "4"]),
                        ("disguised", ["--sigma-value", "1"]), ("unweighted", ["--sigma-value", "0.5"])]:
        result = run(["--epochs", "1", "--sigma", "fixed", *flags, *tiny_flags(tmp_path / name, data)])
        assert result.returncode == 0, result.stderr[-3000:]
        weights[name] = torch.cat([value.flatten() for value in only_checkpoint(tmp_path / name)["model"].values()])
        lines = (tmp_path / name / "out" / "runs.jsonl").read_text().splitlines()
        (records[name],) = [json.loads(line) for line in lines]
    apart = (weights["unweighted"] - weights["disguised"]).norm()
    assert apart > 0.1 and (weights["weighted"] - weights["disguised"]).norm() < 0.1 * apart
    # Evaluation reports the ELBO (lambda = 1) of the model as it is, under its own sigma = 0.5:
    # -ELBO = KL + D (log sigma + log(2 pi) / 2) + squared error / (2 sigma^2), so from sigma = 1 to 0.5 (nearly the
    # same networks) the KL stays, the log sigma term falls by D log 2 and the squared-error term is 4 times as large.
    dims, weighted, disguised = 784, records["weighted"]["final"], records["disguised"]["final"]
    assert weighted["kl_nats_per_image"] == pytest.approx(disguised["kl_nats_per_image"], rel=1e-3)
    squared_error_term = -disguised["nats_per_image"] - disguised["kl_nats_per_image"] \
        - dims / 2 * math.log(2 * math.pi)
    expected = -(disguised["kl_nats_per_image"] + dims * (math.log(0.5) + math.log(2 * math.pi) / 2)
                 + 4 * squared_error_term)
    assert weighted["nats_per_image"] == pytest.approx(expected, rel=1e-5)
    assert train_images.setting_name(records["weighted"]) == "F-VAE (sigma=0.5), KL weight 4"
    assert train_images.paper_value(records["weighted"]) == "not in the paper"
    assert (tmp_path / "weighted" / "out" / "mnist_fixed0.5_continuous_1ep_kl4_generations.png").exists()


def test_missing_data_and_bad_checkpoint_give_one_clear_line(tmp_path):
    result = run(["--data-dir", str(tmp_path / "nowhere"), "--epochs", "1"])
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "nowhere" in result.stderr and "--download" in result.stderr
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"garbage")
    result = run(["--resume", str(bad)])
    assert result.returncode == 1 and "corrupt" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flag", ["--out", "--logdir"])
def test_an_output_folder_that_cannot_be_made_stops_the_run_before_it_trains(tmp_path, flag):
    # Found at the end, a bad --out would cost the whole run's record; found at start-up it costs nothing.
    data = write_tiny_mnist(tmp_path / "mnist")
    (tmp_path / "a_file").write_text("")
    flags = tiny_flags(tmp_path, data)
    flags[flags.index(flag) + 1] = str(tmp_path / "a_file" / "folder")
    result = run(["--epochs", "1", *flags])
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert result.stderr.startswith(f"error: {flag} {tmp_path / 'a_file' / 'folder'}")
    assert "name a folder" in result.stderr
    assert "epoch 1" not in result.stdout and not (tmp_path / "runs").exists()


# --- torchrun, NaN guard, signals, atomic and damaged checkpoints ---


def torchrun(args, processes, timeout=600):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "train_images.py", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # args pin --device cpu: one GPU or none


def only_checkpoint(folder):
    (path,) = (folder / "runs").glob("*/ckpt.pt")
    return load_checkpoint(path)


def test_two_gloo_processes_match_one_process_with_the_doubled_batch(tmp_path):
    # Rank 0 evaluates the first 16 of the 32 test images, rank 1 the others: blank, then strokes (-617 and -658
    # nats/image after these 3 steps), so that one rank's share alone would be 20 nats from the mean of both.
    data = write_tiny_mnist(tmp_path / "mnist", blank_test_images=16)
    one = run(["--epochs", "1", *tiny_flags(tmp_path / "one", data), "--batch-size", "64"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(["--epochs", "1", *tiny_flags(tmp_path / "two", data), "--batch-size", "32"], processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    # Rank 0 alone writes: one run folder holding one checkpoint and one TensorBoard file, one record, one summary.
    (run_dir,) = (tmp_path / "two" / "runs").iterdir()
    assert sorted(path.name.split(".")[0] for path in run_dir.iterdir()) == ["ckpt", "events"]
    assert len((tmp_path / "two" / "out" / "runs.jsonl").read_text().splitlines()) == 1
    assert two.stdout.count("final:") == 1 and two.stdout.count("train_images: mnist") == 1
    a, b = only_checkpoint(tmp_path / "one"), only_checkpoint(tmp_path / "two")
    assert a["step"] == b["step"] == 3 and b["world_size"] == 2
    # Same global batches and noise, gradients averaged over the ranks: the updates agree up to float summation
    # order. Adam divides by sqrt(v), so a weight whose gradient is at rounding level can move by up to lr: compare the
    # updates as a whole (relative L2 error, measured 3e-5) and count the weights that differ by more than 1e-6
    # (measured 2e-5 of them).
    torch.manual_seed(0)
    initial = train_images.make_model(train_images.parse_args([]))[0].state_dict()
    update_a = torch.cat([(a["model"][key] - initial[key]).flatten() for key in initial])
    update_b = torch.cat([(b["model"][key] - initial[key]).flatten() for key in initial])
    assert update_a.norm() > 0.01
    assert (update_a - update_b).norm() / update_a.norm() < 1e-3
    assert ((update_a - update_b).abs() > 1e-6).float().mean() < 1e-3
    # The test ELBO, all-reduced over the ranks, is the mean of all 32 images (up to Monte Carlo noise, ~0.1 nat).
    assert abs(a["test"]["nats_per_image"] - b["test"]["nats_per_image"]) < 1.0


@pytest.mark.parametrize("quantity", ["loss", "gradients"])
def test_a_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, quantity):
    data = write_tiny_mnist(tmp_path / "mnist")
    hook = {"loss": "4", "gradients": "4:gradients"}[quantity]  # step 4: the first of epoch 2 (3 steps an epoch)
    result = subprocess.run([sys.executable, "train_images.py", "--epochs", "2", *tiny_flags(tmp_path, data)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "VAE_INJECT_NAN_AT_STEP": hook})
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert f"non-finite {quantity} at step 4" in line and "LV-VAE" in line and "--lr" in line
    state = only_checkpoint(tmp_path)  # the end of epoch 1, untouched, loadable
    assert (state["epoch"], state["step"]) == (1, 3) and str(tmp_path) in line and "(step 3)" in line
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    assert not (tmp_path / "out").exists()


def test_sigterm_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    data = write_tiny_mnist(tmp_path / "mnist")
    straight = run(["--epochs", "2", *tiny_flags(tmp_path / "straight", data)])
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = only_checkpoint(tmp_path / "straight")
    # Step 4: the middle of epoch 2 (3 steps an epoch). Step 3: the last step of epoch 1, before its evaluation.
    for signal_step, stop in [(4, "step 4 (epoch 2, 64 of 192 images)"), (3, "step 3 (epoch 1, 192 of 192 images)")]:
        folder = tmp_path / f"stopped_at_{signal_step}"
        stopped = subprocess.run([sys.executable, "train_images.py", "--epochs", "2", *tiny_flags(folder, data)],
                                 cwd=ROOT, capture_output=True, text=True, timeout=600,
                                 env={**os.environ, "VAE_SIGNAL_AT_STEP": str(signal_step)})
        assert stopped.returncode == 128 + signal.SIGTERM
        (line,) = stopped.stderr.strip().splitlines()
        assert f"SIGTERM received; stopped after {stop}" in line and "--resume" in line
        (ckpt,) = (folder / "runs").glob("*/ckpt.pt")
        state = load_checkpoint(ckpt)
        assert (state["epoch"], state["position"], state["step"]) == ((1, 64, 4) if signal_step == 4 else (0, 192, 3))
        resumed = run(["--resume", str(ckpt), "--epochs", "2", "--out", str(folder / "out")])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        state = load_checkpoint(ckpt)
        assert state["step"] == reference["step"] == 6
        for key in reference["model"]:
            assert torch.equal(reference["model"][key], state["model"][key]), (signal_step, key)
        records = [json.loads((path / "out" / "runs.jsonl").read_text()) for path in [tmp_path / "straight", folder]]
        assert records[0]["final"] == records[1]["final"]


@pytest.fixture(scope="module")
def one_epoch_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("one_epoch")
    result = run(["--epochs", "1", *tiny_flags(folder, write_tiny_mnist(folder / "mnist"))])
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = (folder / "runs").glob("*/ckpt.pt")
    return path


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_bit_in_the_middle(path):  # the middle of the file lies in the weights
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def not_ours(path):
    torch.save({"weights": torch.zeros(3)}, path)


def wrong_shape(path):
    state = torch.load(path, weights_only=False)
    state["model"]["encoder.0.weight"] = torch.zeros(3)
    torch.save(state, path)


@pytest.mark.parametrize("damage, message", [(truncate, "is corrupt"), (flip_a_bit_in_the_middle, "fails its CRC-32"),
                                             (not_ours, "is not a train_images.py checkpoint"),
                                             (wrong_shape, "does not match this model")])
def test_damaged_or_mismatched_checkpoint_is_refused_with_one_line(one_epoch_checkpoint, tmp_path, damage, message):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(one_epoch_checkpoint.read_bytes())
    damage(bad)
    with pytest.raises(SystemExit) as error:
        train_images.main(train_images.parse_args(["--resume", str(bad)]))
    assert isinstance(error.value.code, str) and "\n" not in error.value.code
    assert error.value.code.startswith("error: ") and message in error.value.code and str(bad) in error.value.code


HALF_A_SAVE = """
import io, sys, time, torch
from common import save_checkpoint
save_checkpoint(sys.argv[1], {"version": 0, "weights": torch.zeros(1000)})
real_save = torch.save

def save_half_then_hang(state, f):  # the save in progress: half of its bytes are on disk
    buffer = io.BytesIO()
    real_save(state, buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    print("half written", flush=True)
    time.sleep(600)

torch.save = save_half_then_hang
save_checkpoint(sys.argv[1], {"version": 1, "weights": torch.ones(1000)})
"""


def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "ckpt.pt"
    child = subprocess.Popen([sys.executable, "-c", HALF_A_SAVE, str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline() == "half written\n"
    child.kill()  # SIGKILL: no handler, no finally
    child.wait()
    child.stdout.close()
    state = load_checkpoint(path)
    assert state["version"] == 0 and torch.equal(state["weights"], torch.zeros(1000))
    (leftover,) = tmp_path.glob("ckpt.pt.tmp*")  # what writing in place would have left as ckpt.pt
    with pytest.raises(SystemExit, match="corrupt"):
        load_checkpoint(leftover)


# --- precision and compile flags: on the CPU here, without CUDA graphs; bf16 is emulated on this CPU: tiny runs ---


def final_nats(out):
    (record,) = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    return record["final"]["nats_per_image"]


def test_bf16_compiled_step_reaches_the_fp32_test_elbo_and_checkpoints_cross_over(tmp_path):
    # 8 steps of 32 images, LV-VAE: bf16 autocast + torch.compile (default mode on the CPU; bf16 is emulated here)
    # against the fp32 eager reference. Measured: fp32 -438.87, bf16 compiled -438.85 nats/image (512 images, 16
    # steps; on an H200 with CUDA graphs 0.25 nat apart); another seed lands 3.8 nats away. Tolerance 0.5 nat/image.
    data = write_tiny_mnist(tmp_path / "mnist", n_train=256, n_test=64)
    flags = lambda name: ["--epochs", "1", "--batch-size", "32", "--eval-images", "64", "--iwae-k", "2",
                          "--iwae-images", "8", "--data-dir", str(data), "--logdir", str(tmp_path / name / "runs"),
                          "--out", str(tmp_path / name / "out")]
    fp32 = run([*flags("fp32"), "--dtype", "fp32", "--compile", "none"])
    assert fp32.returncode == 0, fp32.stderr[-3000:]
    bf16 = run([*flags("bf16"), "--dtype", "bf16", "--compile", "default"])
    assert bf16.returncode == 0, bf16.stderr[-3000:]
    assert "bf16, compile default" in bf16.stdout
    other_seed = run([*flags("seed1"), "--seed", "1"])
    assert other_seed.returncode == 0, other_seed.stderr[-3000:]
    fp32_nats, bf16_nats = final_nats(tmp_path / "fp32" / "out"), final_nats(tmp_path / "bf16" / "out")
    assert abs(bf16_nats - fp32_nats) < 0.5, (bf16_nats, fp32_nats)
    assert abs(final_nats(tmp_path / "seed1" / "out") - fp32_nats) > 2.0  # the tolerance is tighter than a reseed
    # Each checkpoint continues under the other's flags; the resumed run keeps its own settings otherwise.
    for name, other in [("bf16", ["--dtype", "fp32", "--compile", "none"]), ("fp32", ["--dtype", "bf16"])]:
        (ckpt,) = (tmp_path / name / "runs").glob("*/ckpt.pt")
        resumed = run(["--resume", str(ckpt), "--epochs", "2", *other, "--device", "cpu"])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        state = load_checkpoint(ckpt)
        assert (state["epoch"], state["step"], state["args"]["batch_size"]) == (2, 16, 32)
        assert state["args"]["dtype"] == other[1] and state["args"]["data_dir"] == str(data)
        assert all(group["fused"] for group in state["optimizer"]["param_groups"])


def test_resume_places_adam_state_for_this_run(tmp_path):
    # A checkpoint's Adam state, written by another implementation, device or layout, is placed for this run's fused
    # Adam: step counts on the parameters' device, moments in the parameters' layout (fused Adam on CUDA refuses
    # NCHW moments for channels_last weights: seen on an H200).
    conv = torch.nn.Conv2d(3, 4, 3)
    saved = torch.optim.Adam(conv.parameters())  # plain Adam: step counts on the CPU, moments NCHW
    conv(torch.rand(2, 3, 5, 5)).sum().backward()
    saved.step()
    conv = conv.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(conv.parameters(), fused=True)
    train_images.load_optimizer(optimizer, saved.state_dict())
    assert all(group["fused"] and not group["capturable"] for group in optimizer.param_groups)
    moments = optimizer.state[conv.weight]
    assert moments["exp_avg"].is_contiguous(memory_format=torch.channels_last) and moments["step"].item() == 1
    assert torch.equal(moments["exp_avg"], saved.state[saved.param_groups[0]["params"][0]]["exp_avg"])
    # --compile whole-step's Adam is capturable (its step counts read inside the CUDA graph); a checkpoint of a
    # non-capturable Adam must not switch that off, nor a capturable one switch it on for the others.
    capturable = torch.optim.Adam(conv.parameters(), fused=True, capturable=True)
    train_images.load_optimizer(capturable, saved.state_dict())
    assert all(group["capturable"] for group in capturable.param_groups)
    train_images.load_optimizer(optimizer, capturable.state_dict())
    assert not any(group["capturable"] for group in optimizer.param_groups)


def test_auto_defaults_by_device_and_processes():
    # bench/NOTES.md's rule, applied to results/bench_train.md of 2026-11-28: whole-step on one GPU (2.5x and 1.45x
    # reduce-overhead's images/s on MNIST and CelebA); compile default under torchrun; fp32 eager on the CPU. Only
    # the device's type is read: no GPU needed. What is given explicitly stays.
    cases = [("cuda", 1, [], ("bf16", "whole-step")), ("cuda", 2, [], ("bf16", "default")),
             ("cpu", 1, [], ("fp32", "none")),
             ("cuda", 1, ["--compile", "reduce-overhead"], ("bf16", "reduce-overhead")),
             ("cuda", 1, ["--dtype", "fp32"], ("fp32", "whole-step"))]
    for device, world_size, flags, expected in cases:
        args = train_images.parse_args(flags)
        train_images.resolve_defaults(args, torch.device(device), world_size)
        assert (args.dtype, args.compile) == expected, (device, world_size, flags)


def test_nll_kernel_auto_leaves_a_compiled_step_to_inductor_and_fuses_an_eager_one():
    # On CUDA (decided from results/bench_train_ablations.md): PyTorch's NLL inside a compiled step, which Inductor
    # fuses with its neighbours, the Triton kernel in an eager step and in evaluation; on the CPU PyTorch always.
    args = train_images.parse_args(["--device", "cpu"])
    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    assert train_images.likelihood(args, cuda, compiled=True) is gaussian_nll
    assert train_images.likelihood(args, torch.device("cpu"), compiled=False) is gaussian_nll
    if TRITON_AVAILABLE:
        assert train_images.likelihood(args, cuda, compiled=False) is not gaussian_nll
        args.nll_kernel = "triton"
        assert train_images.likelihood(args, cuda, compiled=True) is not gaussian_nll
    args.nll_kernel, args.likelihood = "torch", "continuous"
    assert train_images.likelihood(args, cuda, compiled=False) is gaussian_nll


@pytest.mark.parametrize("flags", [["--sigma", "learned", "--lv-warmup", "4"],
                                   ["--sigma", "learned", "--lv-warmup", "4", "--lv-warmup-sigma", "optimal"],
                                   ["--sigma", "optimal"]], ids=["warmstart", "warmstart-optimal", "optimal"])
def test_whole_step_graph_trains_exactly_as_eager_steps(monkeypatch, flags):
    # --compile whole-step (the GPU default) on the CPU: common.CUDAGraphStep with its CUDA calls replaced by what they
    # do (ReplayedOnCPU), around train_step with its NaN guard and Adam. Six steps (three warm-up, record, replays) on
    # new batches: the same losses, weights and guard as six eager steps, with the loop's use of the returned terms;
    # the warm starts hand over between steps 4 and 5 (sigma-VAE's by setting its running MSE in place).
    monkeypatch.setattr(train_images, "CUDAGraphStep", ReplayedOnCPU)
    args = train_images.parse_args([*flags, "--device", "cpu"])
    train_images.resolve_defaults(args, torch.device("cpu"), 1)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=generator),
                torch.randn(8, 256, generator=generator)) for _ in range(6)]
    results, whole_step = [], train_images.WholeStepGraph()
    for step_fn in [train_images.train_step, whole_step]:
        torch.manual_seed(0)
        model, obs, step_module, optimizer = train_images.build(args, torch.device("cpu"))
        guard = train_images.NanGuard(optimizer, 0, torch.device("cpu"))
        meter, losses = torch.zeros(4), []
        for step, (pixels, eps) in enumerate(batches, start=1):
            terms = step_fn(step_module, optimizer, guard, pixels, eps, False)
            meter += terms  # as main() does, at once
            losses.append(terms[0].item())
            if step == args.lv_warmup:  # as main() does
                train_images.hand_over(args, model, obs, optimizer, batches[0][0], torch.device("cpu"))
        results.append((losses, meter, [p.detach().clone() for p in [*model.parameters(), *obs.buffers()]],
                        guard.step.item()))  # obs's buffers: sigma-VAE's running MSE, the warm start's flag
    (eager_losses, eager_meter, eager_weights, eager_steps), (losses, meter, weights, steps) = results
    assert losses == eager_losses and torch.equal(meter, eager_meter) and steps == eager_steps == 6
    assert len(set(losses)) == 6 and all(torch.equal(a, b) for a, b in zip(weights, eager_weights))
    assert whole_step.graphed.graph == "recorded" and whole_step.graphed.calls == 6


def test_nan_guard_skips_the_bad_update_and_every_later_one():
    torch.manual_seed(0)
    weights = torch.nn.Parameter(torch.randn(5))
    optimizer = torch.optim.Adam([weights], lr=0.1, fused=True)
    guard = train_images.NanGuard(optimizer, step=10, device=torch.device("cpu"))
    history = []
    for step, poison in enumerate([None, None, "gradients", None, "loss", None], start=11):
        loss = (weights**2).sum() * (float("nan") if poison == "loss" else 1.0)
        optimizer.zero_grad()
        loss.backward()
        if poison == "gradients":
            weights.grad[0] = float("inf")
        guard.update(loss)
        optimizer.step()
        history.append(weights.detach().clone())
    assert guard.read() == (13, "gradients")  # the first bad step, with the device's step count
    assert not torch.equal(history[0], history[1])  # steps 11 and 12 updated the weights
    assert all(torch.equal(history[1], later) for later in history[2:])  # nothing from step 13 on
    assert optimizer.state[weights]["step"].item() == 2
    assert train_images.NanGuard(optimizer, 0, torch.device("cpu")).read() is None


def test_nan_is_reported_with_its_step_at_the_next_log_point(tmp_path):
    # The guard is read every --log-every steps and at each epoch's end: a NaN loss at step 4 (the first of epoch 2)
    # is found at step 6 and reported as step 4; the checkpoint of epoch 1 stays as it was.
    data = write_tiny_mnist(tmp_path / "mnist")
    result = run(["--epochs", "2", *tiny_flags(tmp_path, data), "--log-every", "100"],
                 env={"VAE_INJECT_NAN_AT_STEP": "4"})
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert "non-finite loss at step 4 (epoch 2" in line and "every later one were skipped" in line
    state = only_checkpoint(tmp_path)
    assert (state["epoch"], state["step"]) == (1, 3)


def test_eval_every_evaluates_and_saves_on_its_epochs_and_the_last(tmp_path):
    data = write_tiny_mnist(tmp_path / "mnist", n_train=64)
    result = run(["--epochs", "3", "--eval-every", "2", *tiny_flags(tmp_path, data)])
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = [line.split(":")[0] for line in result.stdout.splitlines() if ": test ELBO" in line]
    assert evaluated == ["epoch 2", "epoch 3"]
    assert only_checkpoint(tmp_path)["epoch"] == 3


def test_how_often_a_run_evaluates_does_not_change_its_training(tmp_path):
    data = write_tiny_mnist(tmp_path / "mnist", n_train=128)
    models = []
    for every in ["1", "2"]:
        folder = tmp_path / f"every_{every}"
        # sigma-VAE: its evaluation draws noise for the test ELBO and for its sigma (the training images' MSE)
        result = run(["--epochs", "2", "--eval-every", every, "--sigma", "optimal", *tiny_flags(folder, data)])
        assert result.returncode == 0, result.stderr[-3000:]
        models.append(only_checkpoint(folder)["model"])
    for key in models[0]:
        assert torch.equal(models[0][key], models[1][key]), key


def test_bench_train_writes_its_table(tmp_path):
    out = tmp_path / "bench_train.md"
    result = subprocess.run([sys.executable, "bench/bench_train.py", "--device", "cpu", "--datasets", "mnist",
                             "--sigmas", "fixed", "learned", "--configs", "fp32", "--steps", "2", "--warmup", "1",
                             "--batch-size", "16", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    assert "GPU figures are still to be measured" in table and "Hardware: CPU" in table
    rows = [line for line in table.splitlines() if line.startswith("| mnist |")]
    assert [row.split(" | ")[1] for row in rows] == ["F-VAE", "LV-VAE"]
    assert all(float(row.split(" | ")[3].replace(",", "")) > 0 for row in rows)


# --- one path: short runs, logging, figures, records ---


def test_each_epoch_drops_its_last_partial_batch(tmp_path):
    # 200 images in batches of 64: 3 steps an epoch, the last 8 images sit it out (one batch shape for torch.compile).
    data = write_tiny_mnist(tmp_path / "mnist", n_train=200)
    result = run(["--epochs", "2", *tiny_flags(tmp_path, data)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 steps of 64 an epoch" in result.stdout
    assert only_checkpoint(tmp_path)["step"] == 6


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A 2-epoch run of 3 steps an epoch with the defaults a new user has: no --out, --log-every 50. Also the
    modification times of everything under results/ before it."""
    tmp_path = tmp_path_factory.mktemp("short_run")
    results = {path: path.stat().st_mtime_ns for path in (pathlib.Path(ROOT) / "results").rglob("*")}
    data = write_tiny_mnist(tmp_path / "mnist")
    result = run(["--epochs", "2", "--data-dir", str(data), "--batch-size", "64", "--eval-images", "32", "--iwae-k",
                  "50", "--iwae-images", "32", "--logdir", str(tmp_path / "runs")])
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    return result, run_dir, data, results


def test_a_run_writes_into_its_own_folder_and_records_a_relative_command(short_run):
    result, run_dir, data, results = short_run
    assert {path: path.stat().st_mtime_ns for path in (pathlib.Path(ROOT) / "results").rglob("*")} == results
    assert {"table2.md", "runs.jsonl", "mnist_learned_continuous_2ep_generations.png"} <= set(os.listdir(run_dir))
    (record,) = [json.loads(line) for line in (run_dir / "runs.jsonl").read_text().splitlines()]
    assert record["command"].startswith("python train_images.py --epochs 2 ")
    assert record["batch_size"] == 64 and f"| 2 | {record['train_images']} | 64 |" in \
        (run_dir / "table2.md").read_text()  # epochs, train images, batch
    # The generalisation gap: the same one-sample ELBO on 32 training images, minus the test ELBO.
    gap = record["final_train"]["nats_per_image"] - record["final"]["nats_per_image"]
    assert math.isfinite(gap) and f"| {gap:.3f} | 50, 32 |" in (run_dir / "table2.md").read_text()
    # LV-VAE's reconstruction measures (App. B.1), in the record and in the table.
    assert 0 < record["psnr_db"] < 60 and record["edge_sigma_ratio"] > 0
    assert f"| {record['psnr_db']:.3f} | {record['edge_sigma_ratio']:.3f} |" in (run_dir / "table2.md").read_text()
    assert f"--data-dir {data}" in record["command"]  # outside the repository: stays absolute
    root = "/home/user/vae"
    command = train_images.command_line("python", [f"{root}/train_images.py", "--data-dir", f"{root}/data/mnist",
                                                   f"--out={root}/results/images", "--logdir", "/scratch/runs"])
    assert train_images.ROOT != root and "/home/user" in command  # not this repository: nothing to shorten
    here = train_images.ROOT
    command = train_images.command_line("python", [f"{here}/train_images.py", "--data-dir", f"{here}/data/mnist",
                                                   f"--out={here}/results/images", "--logdir", "/scratch/runs"])
    assert command == "python train_images.py --data-dir data/mnist --out=results/images --logdir /scratch/runs"


def test_a_short_run_logs_its_first_step_and_every_epoch_to_tensorboard(short_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _, _ = short_run
    events = EventAccumulator(str(run_dir), size_guidance={"histograms": 0, "images": 0}).Reload()
    assert [event.step for event in events.Scalars("train/elbo")] == [1, 3, 6]  # 3 steps an epoch, --log-every 50
    assert [event.step for event in events.Scalars("charts/images_per_sec")] == [1, 3, 6]
    assert [event.step for event in events.Histograms("eval/log_sigma")] == [3, 6]
    assert [event.step for event in events.Scalars("eval_train/nats_per_image")] == [3, 6]  # the training images'
    assert {"eval/reconstructions", "eval/generated_samples"} <= set(events.Tags()["images"])


def test_figures_are_labelled_scaled_up_and_carry_their_command(short_run):
    _, run_dir, _, _ = short_run
    for kind in ["reconstructions", "generations"]:
        with Image.open(run_dir / f"mnist_learned_continuous_2ep_{kind}.png") as image:
            assert image.width >= 4 * 115 and "python train_images.py --epochs 2" in image.info["Description"]


def test_wall_time_includes_the_final_evaluation_and_the_evaluation_shows_progress(short_run):
    result, run_dir, _, _ = short_run
    (record,) = [json.loads(line) for line in (run_dir / "runs.jsonl").read_text().splitlines()]
    assert 0 < record["train_minutes"] < record["wall_minutes"]
    assert f"{record['wall_minutes']:.1f} min ({record['train_minutes']:.1f})" in (run_dir / "table2.md").read_text()
    assert "IWAE-50 of 32 test images (1,600 decoder passes" in result.stdout and "final IWAE-50" in result.stdout


def test_sigma_vae_is_evaluated_with_the_training_mse_of_its_final_model(tmp_path):
    # The running average of the batch MSE starts at 1 and lags (after one MNIST epoch it said sigma = 0.157 where the
    # training set's MSE gives 0.108). The evaluated sigma must be the final model's own.
    data = write_tiny_mnist(tmp_path / "mnist")
    result = run(["--epochs", "1", "--sigma", "optimal", *tiny_flags(tmp_path, data)])
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    sigma = float(record["sigma_summary"].split()[0])
    args = train_images.parse_args(["--sigma", "optimal"])
    model, _ = train_images.make_model(args)
    model.load_state_dict(only_checkpoint(tmp_path)["model"])
    pixels = train_images.load_mnist(str(data), "train")
    with torch.no_grad():
        x = pixels.float() / 255
        mu, log_std = model.encode(x)
        mse = ((x - model.decode(mu + log_std.exp() * torch.randn_like(mu))) ** 2).mean().item()
    assert sigma == pytest.approx(math.sqrt(mse), rel=0.02) and sigma < 0.9


def test_celeba_cache_goes_to_cache_dir_and_the_dataset_folder_stays_untouched(tmp_path):
    from test_data import tiny_celeba

    tiny_celeba(tmp_path / "celeba", splits=(0, 0, 0, 0, 1, 2))
    result = run(["--dataset", "celeba", "--data-dir", str(tmp_path / "celeba"), "--cache-dir", str(tmp_path / "cache"),
                  "--epochs", "1", "--batch-size", "4", "--eval-images", "1", "--iwae-k", "2", "--iwae-images", "1",
                  "--logdir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.listdir(tmp_path / "cache") == ["celeba_img_align_celeba_64.npz"]
    assert sorted(os.listdir(tmp_path / "celeba")) == ["img_align_celeba", "list_eval_partition.txt"]


def two_folder_celeba(folder):
    """Full-size faces 000001-000006 (train, train, train, train, valid, test) and half-size copies of 000003 (train,
    in both folders), 000006 (test) and the new training faces 000007 and 000008."""
    from test_data import face, tiny_celeba

    tiny_celeba(folder, splits=(0, 0, 0, 0, 1, 2))
    rows = [f"{i:06d}.jpg {code}" for i, code in enumerate([0, 0, 0, 0, 1, 2, 0, 0], 1)]
    (folder / "list_eval_partition.txt").write_bytes(("\r\n".join(rows) + "\r\n").encode())
    (folder / "img_align_celeba_89x109").mkdir()
    for number in [3, 6, 7, 8]:
        face(number - 1, (89, 109)).save(folder / "img_align_celeba_89x109" / f"{number:06d}.jpg", quality=95)
    return folder


def test_celeba_extra_train_appends_the_new_training_faces_of_a_second_folder(tmp_path, capsys):
    from test_data import assert_inside_colours

    data = two_folder_celeba(tmp_path / "celeba")
    flags = ["--dataset", "celeba", "--data-dir", str(data), "--cache-dir", str(tmp_path / "cache")]
    args = train_images.parse_args([*flags, "--celeba-extra-train", "img_align_celeba_89x109"])
    train = train_images.load_split(args, "train")
    assert train.shape == (6, 3, 64, 64)
    assert_inside_colours(train, [0, 1, 2, 3, 6, 7])  # the first folder's four, then 000007 and 000008
    assert "2 training images of img_align_celeba_89x109 join the 4 of img_align_celeba: 6 (1 in both" \
        in capsys.readouterr().out
    # The test images come from the first folder alone; without the flag the training set is the first folder's
    assert torch.equal(train_images.load_split(args, "test"), train_images.load_split(
        train_images.parse_args(flags), "test"))
    assert torch.equal(train_images.load_split(train_images.parse_args(flags), "train"), train[:4])


def test_celeba_extra_train_run_records_its_pool(tmp_path):
    data = two_folder_celeba(tmp_path / "celeba")
    result = run(["--dataset", "celeba", "--data-dir", str(data), "--cache-dir", str(tmp_path / "cache"),
                  "--celeba-extra-train", "img_align_celeba_89x109", "--epochs", "1", "--batch-size", "4",
                  "--eval-images", "1", "--iwae-k", "2", "--iwae-images", "1", "--logdir", str(tmp_path / "runs"),
                  "--out", str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    assert record["train_images"] == 6 and record["celeba_extra_train"] == "img_align_celeba_89x109"
    stem = "celeba_learned_continuous_1ep_plus-img_align_celeba_89x109"
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["runs.jsonl", "table2.md", f"{stem}_reconstructions.png", f"{stem}_generations.png"])
    assert "| celeba | LV-VAE, + img_align_celeba_89x109 faces | continuous | 0 | 1 | 6 |" in \
        (tmp_path / "out" / "table2.md").read_text()
    assert sorted(os.listdir(tmp_path / "cache")) == ["celeba_img_align_celeba_64.npz",
                                                      "celeba_img_align_celeba_89x109_64.npz"]


# --- LV-VAE with a warm start (issue 12; ours, not the paper's) ---


def test_warm_start_hand_over_leaves_the_elbo_unchanged():
    # LS-VAE first (the per-pixel head gets no gradient), then the head takes over with zero weights and the scalar's
    # raw log sigma as bias: the ELBO of a fixed batch and fixed noise is the same just before and after.
    torch.manual_seed(0)
    args = train_images.parse_args(["--sigma", "learned", "--lv-warmup", "5"])
    model, obs = train_images.make_model(args)
    assert isinstance(obs, train_images.WarmStartSigma)
    with torch.no_grad():
        obs.scalar.raw_log_sigma.fill_(-1.3)  # as if LS-VAE had learned sigma = exp(-1.3)
    x, eps = torch.rand(4, 1, 28, 28), torch.randn(4, 256)
    _, _, elbo, (_, log_sigma) = elbo_terms(model, obs, x, eps, event_dims=3)
    elbo.sum().backward()
    assert model.decoder[-1].weight.grad[:, 1:].abs().max() == 0  # the per-pixel head: exactly zero gradient
    assert torch.allclose(log_sigma, torch.full_like(log_sigma, obs.scalar.log_sigma.item()))
    obs.hand_over(model.decoder[-1])
    _, _, after, (_, log_sigma_after) = elbo_terms(model, obs, x, eps, event_dims=3)
    torch.testing.assert_close(after, elbo, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(log_sigma_after, log_sigma)
    model.zero_grad(), obs.zero_grad()
    after.sum().backward()
    assert model.decoder[-1].weight.grad[:, 1:].abs().max() > 0 and obs.scalar.raw_log_sigma.grad.abs().item() == 0


def training_mse_by_hand(model, train, batch, seed):
    """The training images' MSE as set_optimal_sigma computes it (z ~ q(z|x)), with the draws of manual_seed(seed)."""
    torch.manual_seed(seed)
    squared = []
    for part in train.split(batch):
        part = part.float() / 255
        mu, log_std = model.encode(part)
        squared.append((part - model.decode(mu + log_std.exp() * torch.randn_like(mu))[:, :1]) ** 2)
    return torch.cat(squared).mean()


def test_sigma_vae_warm_phase_hands_over_at_the_training_images_mse():
    # --lv-warmup-sigma optimal: before the hand-over sigma^2 is the batch's MSE (no parameter, no gradient to the
    # head); at it the loop sets the scalar to the training images' MSE and the head starts there for every pixel.
    torch.manual_seed(0)
    args = train_images.parse_args(["--sigma", "learned", "--lv-warmup", "5", "--lv-warmup-sigma", "optimal",
                                    "--batch-size", "16"])
    model, obs = train_images.make_model(args)
    assert list(obs.parameters()) == []
    x, eps = torch.rand(4, 1, 28, 28), torch.randn(4, 256)
    _, _, elbo, (mean, log_sigma) = elbo_terms(model, obs, x, eps, event_dims=3)
    torch.testing.assert_close(log_sigma, torch.full_like(log_sigma, 0.5 * ((x - mean) ** 2).mean().log().item()))
    elbo.sum().backward()
    assert model.decoder[-1].weight.grad[:, 1:].abs().max() == 0
    train = (torch.rand(48, 1, 28, 28) * 255).to(torch.uint8)
    torch.manual_seed(1)
    train_images.hand_over(args, model, obs, None, train, torch.device("cpu"))  # as main() does
    train_mse = training_mse_by_hand(model, train, args.batch_size * 4, seed=1)
    torch.testing.assert_close(obs.scalar.running_mse, train_mse.reshape(1, 1, 1).detach())
    _, _, _, (_, after) = elbo_terms(model, obs, x, eps, event_dims=3)
    torch.testing.assert_close(after, torch.full_like(after, 0.5 * train_mse.log().item()), rtol=1e-5, atol=1e-5)
    assert model.training  # set_optimal_sigma leaves the model in training mode


def test_ls_vae_warm_phase_with_the_mse_head_hands_over_at_the_training_images_mse(capsys):
    # --lv-handover-sigma mse: an LS-VAE phase (its scalar unchanged), but the head starts where a sigma-VAE phase's
    # would, at the training images' MSE, for every pixel; the hand-over says where it was and where it starts.
    torch.manual_seed(0)
    args = train_images.parse_args(["--sigma", "learned", "--lv-warmup", "5", "--lv-handover-sigma", "mse",
                                    "--batch-size", "16"])
    model, obs = train_images.make_model(args)
    with torch.no_grad():
        obs.scalar.raw_log_sigma.fill_(0.3)  # as if LS-VAE's sigma had risen to ~1.3, far above the MSE's
    warm = obs.scalar.log_sigma.item()
    train = (torch.rand(48, 1, 28, 28) * 255).to(torch.uint8)
    torch.manual_seed(1)
    train_images.hand_over(args, model, obs, None, train, torch.device("cpu"))  # as main() does
    start = 0.5 * training_mse_by_hand(model, train, args.batch_size * 4, seed=1).log().item()
    assert start < warm - 0.5  # the random decoder's MSE on uniform pixels, ~0.25: not the scalar's start
    _, _, _, (_, after) = elbo_terms(model, obs, torch.rand(4, 1, 28, 28), torch.randn(4, 256), event_dims=3)
    torch.testing.assert_close(after, torch.full_like(after, start), rtol=1e-5, atol=1e-5)
    assert obs.scalar.log_sigma.item() == warm and model.training
    assert capsys.readouterr().out == f"hand-over: LS-VAE's learned log sigma {warm:.3f}, the per-pixel head starts " \
        f"at {start:.3f}\n"


def test_fresh_adam_gives_the_sigma_head_bias_corrected_updates_and_leaves_other_layers_alone():
    # Three LS-VAE steps, the hand-over, one more step. Kept state: the head's moments are still 0 but its step count
    # is the layer's, t = 4 at that step, so its first update is lr (0.1 / (1 - 0.9**t)) sqrt((1 - 0.999**t) / 0.001)
    # = 0.58 lr per weight (1.27 lr at CelebA's t = 176, 3.0 lr at MNIST's 2,346); restarted (--lv-fresh-adam): a
    # fresh Adam's first update, lr g / |g| = lr. Every layer before the output layer: the same update in both.
    args = train_images.parse_args(["--sigma", "learned", "--lv-warmup", "3", "--device", "cpu", "--lr", "1e-3"])
    train_images.resolve_defaults(args, torch.device("cpu"), 1)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=generator),
                torch.randn(8, 256, generator=generator)) for _ in range(4)]
    results = []
    for fresh in [False, True]:
        torch.manual_seed(0)
        model, obs, step_module, optimizer = train_images.build(args, torch.device("cpu"))
        guard = train_images.NanGuard(optimizer, 0, torch.device("cpu"))
        for step, (pixels, eps) in enumerate(batches, start=1):
            if step == 4:
                before = [p.detach().clone() for p in model.parameters()]
            train_images.train_step(step_module, optimizer, guard, pixels, eps, False)
            if step == args.lv_warmup:
                args.lv_fresh_adam = fresh
                train_images.hand_over(args, model, obs, optimizer, None, torch.device("cpu"))  # as main() does
        results.append([p.detach() - b for p, b in zip(model.parameters(), before)])
    kept, restarted = results
    head = lambda updates: updates[-2][:, 1:].abs()  # decoder[-1].weight (in, out = mean, raw log sigma, kH, kW)
    moved = head(restarted) > 0
    assert moved.float().mean() > 0.9
    torch.testing.assert_close(head(restarted)[moved], torch.full_like(head(restarted)[moved], 1e-3), rtol=1e-3,
                               atol=0)
    expected = 1e-3 * 0.1 / (1 - 0.9**4) * math.sqrt((1 - 0.999**4) / 0.001)
    torch.testing.assert_close(head(kept)[moved], torch.full_like(head(kept)[moved], expected), rtol=1e-3, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(kept[:-2], restarted[:-2]))  # every layer before the output layer


@pytest.mark.parametrize("flags, setting, stem", [
    ([], "4 steps", "warmstart"),
    (["--lv-fresh-adam"], "4 steps, fresh Adam", "warmstart-freshadam"),
    (["--lv-warmup-sigma", "optimal"], "4 steps of sigma-VAE", "warmstart-optimal"),
    (["--lv-handover-sigma", "mse"], "4 steps, head at the MSE's sigma", "warmstart-msehead"),
])
def test_warm_start_run_hands_over_at_its_step_and_records_its_row(tmp_path, flags, setting, stem):
    data = write_tiny_mnist(tmp_path / "mnist")
    fresh_adam = "--lv-fresh-adam" in flags
    result = run(["--epochs", "2", "--lv-warmup", "4", "--seed", "1", *flags, *tiny_flags(tmp_path, data)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: --lv-warmup" not in result.stdout  # 4 of its 6 steps: it hands over (the suite's tests: not)
    state = only_checkpoint(tmp_path)
    assert bool(state["obs"]["handed_over"]) and state["model"]["decoder.11.bias"][1] != 0
    # Adam's step counts after the 6 steps: the output layer's restarted at the hand-over with --lv-fresh-adam
    names = [name for name, _ in train_images.make_model(train_images.parse_args(["--lv-warmup", "4"]))[0]
             .named_parameters()]
    steps = {name: state["optimizer"]["state"][i]["step"].item() for i, name in enumerate(names)}
    assert steps["decoder.11.weight"] == steps["decoder.11.bias"] == (2 if fresh_adam else 6)
    assert {value for name, value in steps.items() if not name.startswith("decoder.11.")} == {6}
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    assert record["lv_warmup"] == 4 and record["seed"] == 1 and record["lv_fresh_adam"] == fresh_adam
    assert record["lv_warmup_sigma"] == ("optimal" if "optimal" in flags else "learned-scalar")
    assert record["lv_handover_sigma"] == ("mse" if "mse" in flags else "warm")
    warm = "sigma-VAE's running (lagging)" if "optimal" in flags else "LS-VAE's learned"
    assert f"hand-over: {warm} log sigma" in result.stdout
    assert f"| LV-VAE, warm start ({setting}) | continuous | 1 |" in (tmp_path / "out" / "table2.md").read_text()
    assert (tmp_path / "out" / f"mnist_learned_{stem}_continuous_2ep_seed1_reconstructions.png").exists()
    result = run(["--sigma", "fixed", "--lv-warmup", "4"])
    assert result.returncode == 2 and "--lv-warmup goes with --sigma learned only" in result.stderr


# --- early stopping on the validation ELBO (--valid-images; ours) ---


def test_mnist_validation_images_are_its_last_training_images_held_out(tmp_path):
    data = write_tiny_mnist(tmp_path / "mnist", n_train=256)
    flags = ["--data-dir", str(data), "--batch-size", "64"]
    full = train_images.load_split(train_images.parse_args(flags), "train")
    args = train_images.parse_args([*flags, "--valid-images", "64", "--max-train-images", "128"])
    train, valid, test = train_images.load_data(args, 0, 1, torch.device("cpu"))
    assert torch.equal(valid, full[192:]) and torch.equal(train, full[:128]) and len(test) == 48
    assert train_images.load_data(train_images.parse_args(flags), 0, 1, torch.device("cpu"))[1] is None
    with pytest.raises(SystemExit, match=r"^error: --valid-images 200 leaves fewer than one global batch of MNIST's "
                                         r"256 training images; lower it$"):
        train_images.load_data(train_images.parse_args([*flags, "--valid-images", "200"]), 0, 1, torch.device("cpu"))


def test_celeba_validation_images_come_from_the_split_file(tmp_path):
    from test_data import tiny_celeba

    tiny_celeba(tmp_path / "celeba", splits=(0, 0, 0, 1, 1, 2))
    flags = ["--dataset", "celeba", "--data-dir", str(tmp_path / "celeba"), "--cache-dir", str(tmp_path / "cache"),
             "--batch-size", "2"]
    args = train_images.parse_args([*flags, "--valid-images", "1"])
    train, valid, test = train_images.load_data(args, 0, 1, torch.device("cpu"))
    assert (len(train), len(test)) == (3, 1) and torch.equal(valid, train_images.load_split(args, "valid")[:1])
    # "at most N": a folder with fewer validation images gives what it has; one with none stops with one line
    assert len(train_images.load_data(train_images.parse_args([*flags, "--valid-images", "9"]), 0, 1,
                                      torch.device("cpu"))[1]) == 2
    tiny_celeba(tmp_path / "no_valid", splits=(0, 0, 0, 2))
    args = train_images.parse_args(["--dataset", "celeba", "--data-dir", str(tmp_path / "no_valid"), "--batch-size",
                                    "2", "--valid-images", "5"])
    with pytest.raises(SystemExit, match=r"^error: none of the valid images .* or drop --valid-images$"):
        train_images.load_data(args, 0, 1, torch.device("cpu"))


def test_the_selected_weights_are_evaluated_with_the_last_epochs_noise():
    args = train_images.parse_args(["--device", "cpu", "--eval-images", "8", "--iwae-k", "2", "--iwae-images", "4",
                                    "--epochs", "3"])
    train_images.resolve_defaults(args, torch.device("cpu"), 1)
    torch.manual_seed(0)
    model, obs, _, _ = train_images.build(args, torch.device("cpu"))
    pixels = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    on_cpu = lambda module: {key: value.clone() for key, value in module.state_dict().items()}
    best = {"epoch": 2, "step": 7, "valid": {"nats_per_image": -1.0}, "model": on_cpu(model), "obs": on_cpu(obs)}
    with torch.no_grad():  # the last epoch's weights differ from the selected ones
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))

    def bounds(model, obs):
        generator = torch.Generator().manual_seed(1)
        return (train_images.evaluate(model, obs, pixels, args, torch.device("cpu"), images=8, generator=generator),
                train_images.evaluate(model, obs, pixels, args, torch.device("cpu"), k=2, images=4,
                                      generator=generator),
                train_images.evaluate(model, obs, pixels[8:], args, torch.device("cpu"), images=8,
                                      generator=generator))

    last, before = bounds(model, obs), on_cpu(model)
    selection = {"curve": [[1, -3.0], [2, -1.0], [3, -2.0]], "best": best}
    selected = train_images.evaluate_selected(selection, model, obs, last, (pixels, pixels[8:]), args,
                                              torch.device("cpu"), 8, 4)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())  # left as it was
    reference_model, reference_obs = train_images.make_model(args)
    reference_model.load_state_dict(best["model"]), reference_obs.load_state_dict(best["obs"])
    expected = bounds(reference_model, reference_obs)
    assert [selected[key] for key in ["final", "iwae", "final_train"]] == list(expected)
    assert selected["final"] != last[0] and (selected["epoch"], selected["step"]) == (2, 7)
    assert selected["curve"] == selection["curve"]
    # the best epoch is the last: its bounds are the last epoch's, not evaluated again
    selection["best"] = {**best, "epoch": 3}
    selected = train_images.evaluate_selected(selection, model, obs, last, (pixels, pixels[8:]), args,
                                              torch.device("cpu"), 8, 4)
    assert (selected["final"], selected["iwae"], selected["final_train"]) == tuple(last)


def test_early_stopping_records_the_best_validation_epoch_and_resumes_exactly(tmp_path):
    data = write_tiny_mnist(tmp_path / "mnist", n_train=256)
    straight = run(["--epochs", "3", "--valid-images", "64", *tiny_flags(tmp_path / "a", data)])
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "early stopping: each evaluation also takes the ELBO of 64 validation images" in straight.stdout
    (record,) = [json.loads(line) for line in (tmp_path / "a" / "out" / "runs.jsonl").read_text().splitlines()]
    selected = record["selected"]
    assert record["train_images"] == 192 and record["valid_images"] == 64
    assert [epoch for epoch, _ in selected["curve"]] == [1, 2, 3]
    assert selected["epoch"] == max(selected["curve"], key=lambda point: point[1])[0]
    assert selected["valid"]["nats_per_image"] == dict(selected["curve"])[selected["epoch"]]
    # the checkpoint keeps the selected weights; the record's bounds are theirs
    state = only_checkpoint(tmp_path / "a")
    best = state["selection"]["best"]
    assert best["epoch"] == selected["epoch"] and best["step"] == 3 * selected["epoch"]
    args = train_images.parse_args(["--device", "cpu", "--eval-images", "32"])
    model, obs = train_images.make_model(args)
    model.load_state_dict(best["model"]), obs.load_state_dict(best["obs"])
    test_pixels = train_images.load_split(train_images.parse_args(["--data-dir", str(data)]), "test")
    again = train_images.evaluate(model, obs, test_pixels, args, torch.device("cpu"), images=32,
                                  generator=torch.Generator().manual_seed(1))
    assert again["nats_per_image"] == pytest.approx(selected["final"]["nats_per_image"], rel=1e-6)
    table = (tmp_path / "a" / "out" / "table2.md").read_text()
    assert "## Selected on validation" in table
    assert f"| mnist | LV-VAE, 64 held out | continuous | 0 | 3 | 64 | {selected['epoch']} of 3 evaluated |" in table
    assert (tmp_path / "a" / "out" / "mnist_learned_continuous_3ep_valid64_reconstructions.png").exists()
    # stopped after epoch 2 and resumed: the same curve, the same choice, the same bounds
    first = run(["--epochs", "2", "--valid-images", "64", *tiny_flags(tmp_path / "b", data)])
    assert first.returncode == 0, first.stderr[-3000:]
    (ckpt,) = (tmp_path / "b" / "runs").glob("*/ckpt.pt")
    resumed = run(["--resume", str(ckpt), "--epochs", "3", "--out", str(tmp_path / "b" / "resumed")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (again,) = [json.loads(line) for line in (tmp_path / "b" / "resumed" / "runs.jsonl").read_text().splitlines()]
    assert again["selected"] == selected


def test_early_stopping_under_two_gloo_processes(tmp_path):
    # Each rank evaluates its share of the validation images and the sums are all-reduced: every rank keeps the same
    # weights and evaluates them again at the end (collectives on every rank, or the run would hang); rank 0 writes.
    data = write_tiny_mnist(tmp_path / "mnist", n_train=256)
    two = torchrun(["--epochs", "2", "--valid-images", "64", *tiny_flags(tmp_path, data), "--batch-size", "32"],
                   processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    selected = record["selected"]
    assert record["train_images"] == 192 and record["valid_images"] == 64 and record["processes"] == 2
    assert [epoch for epoch, _ in selected["curve"]] == [1, 2]
    assert selected["epoch"] == max(selected["curve"], key=lambda point: point[1])[0]
    assert only_checkpoint(tmp_path)["selection"]["best"]["epoch"] == selected["epoch"]
