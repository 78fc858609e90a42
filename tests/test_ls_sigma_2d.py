"""bench/ls_sigma_2d.py: the split of a reconstruction's error along and across the curve, and the table it writes."""

import argparse
import importlib.util
import os

import pytest
import torch

import train_2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("ls_sigma_2d", os.path.join(ROOT, "bench", "ls_sigma_2d.py"))
ls_sigma_2d = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ls_sigma_2d)


def points(n=30000):
    return train_2d.sample_data(n, torch.Generator().manual_seed(0), "sine", return_u=True)


def test_a_reconstruction_at_the_true_u_leaves_the_whole_noise_in_both_directions():
    x, u = points()
    fractions = ls_sigma_2d.along_and_across(x - train_2d.manifold(u), u)  # error = the noise itself
    assert fractions.shape == (3, 2)
    assert fractions.flatten().tolist() == pytest.approx([1.0] * 6, abs=0.06)


def test_the_curves_nearest_point_leaves_only_the_noise_across_it():
    x, u = points()
    grid = train_2d.manifold(torch.linspace(-1.2, 1.2, 48001))  # nearest point by search, not by the tangent
    nearest = torch.cat([grid[torch.cdist(part, grid).argmin(dim=1)] for part in x.split(2000)])
    fractions = ls_sigma_2d.along_and_across(x - nearest, u)
    along, across = fractions[:, 0].tolist(), fractions[:, 1].tolist()
    assert along == pytest.approx([0.0] * 3, abs=0.03)
    # across the curve: the whole noise on the nearly straight thirds; the bend pulls it a little below 1 at s = 0.1
    assert across == pytest.approx([1.0] * 3, abs=0.06)
    # ...and a second latent that kept half the noise across the curve would show as one half
    half = ls_sigma_2d.along_and_across(0.5 ** 0.5 * (x - nearest), u)
    assert half[:, 1].tolist() == pytest.approx([a / 2 for a in across], rel=1e-5)


def test_the_script_writes_one_row_per_seed_where_it_is_told(tmp_path):
    out = tmp_path / "table.md"
    args = argparse.Namespace(seeds=2, steps=30, hidden=16, points=600, threshold=0.055, noise=[0.05, 0.01, 0.1],
                              logdir=str(tmp_path / "runs"), out=str(out))
    ls_sigma_2d.main(args)
    states, along_training = out.read_text().split("Each seed's sigma along training")
    along_training, encodes = along_training.split("What each seed's second latent (by KL) encodes")
    rows = [line for line in states.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[0] for row in rows] == ["| 0", "| 1"]
    assert all("not in 30" in row for row in rows)  # 30 steps leave sigma far above 0.055
    assert "sqrt(E s^2) = 0.0648" in states and "sqrt(E s^2 / 2) = 0.0458" in states
    # sigma along training: steps 2, 3, 6, ..., 30 (5 % of the run, then every 10 %), moving from its start at 1
    lines = along_training.splitlines()
    assert "| seed | 2 | 3 | 6 | 9 | 12 | 15 | 18 | 21 | 24 | 27 | 30 |" in lines
    trajectory = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[0] for row in trajectory] == ["| 0", "| 1"]
    for row, state in zip(trajectory, rows):
        sigma = [float(v) for v in row.strip("| ").split(" | ")[1:]]
        assert len(sigma) == 11 and 0.99 < sigma[0] < 1.01 and len(set(sigma)) > 5
        assert sigma[-1] == pytest.approx(float(state.split(" | ")[1]), abs=2e-3)  # the last step's, before its update
    # the second latent: one row per seed, a correlation with u and four figures per region
    encoding = [line for line in encodes.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[0] for row in encoding] == ["| 0", "| 1"]
    assert all(-1 <= float(row.split(" | ")[1]) <= 1 and row.count(";") == 3 for row in encoding)
    assert all(len(row.split(" | ")) == 2 + 3 + 3 for row in encoding)  # and the sweep at 0.5, 1 and 2 std


def test_the_noise_flag_changes_the_data_and_only_for_that_run(tmp_path):
    out = tmp_path / "table.md"
    args = argparse.Namespace(seeds=1, steps=20, hidden=16, points=600, threshold=0.04, noise=[0.05, 0.05, 0.05],
                              logdir=str(tmp_path / "runs"), out=str(out))
    ls_sigma_2d.main(args)
    text = out.read_text()
    assert "sqrt(E s^2) = 0.0500" in text and "s = 0.05: along, across / s^2 | " * 3 in text
    assert train_2d.NOISE_LEVELS["sine"] == (0.05, 0.01, 0.1)  # restored for whatever runs next


def test_a_latent_that_codes_the_noise_across_the_curve_reads_as_such():
    # Seed 0's latent is the noise across the curve, and one posterior std of it moves the reconstruction by s across;
    # seed 1's is u, and moves it by 2 s along. The correlations and moves must say so, region by region.
    x, u = points()
    tangent, normal = ls_sigma_2d.frame(u)
    noise = x - train_2d.manifold(u)
    s = train_2d.noise_level(u, "sine")[:, None]
    latent_mean = torch.stack([(noise * normal).sum(-1), u])
    moved = torch.stack([normal * s, 2 * tangent * s])
    encodes, with_u = ls_sigma_2d.what_a_latent_encodes(latent_mean, moved, x, u)
    assert encodes.shape == (2, 3, 4)
    assert encodes[0, :, 0].tolist() == pytest.approx([1.0] * 3, abs=1e-5)  # with the noise across
    assert encodes[0, :, 1].abs().max() < 0.03
    assert encodes[0, :, 2:].flatten().tolist() == pytest.approx([1.0, 0.0] * 3, abs=1e-5)  # moves across, not along
    assert encodes[1, :, 3].tolist() == pytest.approx([2.0] * 3, abs=1e-5) and encodes[1, :, 2].abs().max() < 1e-5
    assert with_u[1].item() == pytest.approx(1.0, abs=1e-5) and abs(with_u[0].item()) < 0.03


def test_the_sweep_along_a_latent_grows_with_t_for_a_linear_decoder_and_not_for_a_step():
    # Latent 1 of 2 moves the reconstruction across the curve: linearly (0.3 per unit), or as a step of height 0.3
    # at 0 (two sheets). From the mean z = 0 with posterior std 0.5: linear 0.15 t, step 0.3 at every t.
    normal = torch.tensor([[0.0, 1.0]]).expand(5, 2)
    mu, std, latent = torch.zeros(1, 5, 2), torch.full((1, 5), 0.5), torch.ones(1, 1, 1, dtype=torch.int64)
    linear = lambda z: torch.stack([z[..., 0], 0.3 * z[..., 1]], dim=-1)
    step = lambda z: torch.stack([z[..., 0], 0.3 * (z[..., 1] > 0).float()], dim=-1)
    assert ls_sigma_2d.sweep_across(linear, mu, std, latent, normal).flatten().tolist() == \
        pytest.approx([0.15 * t for t in ls_sigma_2d.SWEEP])
    assert ls_sigma_2d.sweep_across(step, mu, std, latent, normal).flatten().tolist() == \
        pytest.approx([0.3 / 2**0.5] * len(ls_sigma_2d.SWEEP))  # one side moves 0.3, the other 0
