"""bench/circle_replay.py: copies of a warm-start ensemble's members at the hand-over (weights, sigma, Adam's state),
the permutation test of the seeds' escape counts, and the table it writes."""

import argparse
import importlib.util
import os

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("circle_replay", os.path.join(ROOT, "bench", "circle_replay.py"))
circle_replay = importlib.util.module_from_spec(spec)
spec.loader.exec_module(circle_replay)
train_2d = circle_replay.train_2d


def test_copies_continue_exactly_as_their_original_member(tmp_path):
    flags = ["--data", "circle", "--settings", "LVwarm", "LVwarmopt", "--seeds", "2", "--hidden", "16", "--steps",
             "30", "--lv-warmup", "20", "--device", "cpu", "--logdir", str(tmp_path / "runs")]
    args = train_2d.parse_args(flags)
    args.steps = 20  # to the hand-over: both warm phases have trained (LS-VAE's sigma, sigma-VAE's running MSE)
    ens = circle_replay.warm_ensemble([0, 1], args)
    train_2d.train([ens], [0, 1], args, "cpu", "test")
    copies = circle_replay.replicate(ens, 3, args)
    x_eval = train_2d.sample_data(200, torch.Generator().manual_seed(5), "circle")
    before, after = train_2d.evaluate(ens, x_eval, args), train_2d.evaluate(copies, x_eval, args)
    for name in ens.names:
        assert torch.allclose(after[name]["elbo"], before[name]["elbo"].repeat_interleave(3), atol=1e-5)
    # The hand-over and one Adam step on the same batch and noise: a copy's head starts at its original's sigma and
    # moves as its original's does (moments and step count copied too)
    generator = torch.Generator().manual_seed(7)
    x = train_2d.sample_data(2 * args.batch_size, generator, "circle").reshape(2, args.batch_size, 2)
    eps = torch.randn(2, args.batch_size, args.latent_dim, generator=generator)
    for ensemble, repeat in [(ens, 1), (copies, 3)]:
        ensemble.before_step(args.lv_warmup + 1, args)
        ensemble.train_step(x.repeat_interleave(repeat, 0), eps.repeat_interleave(repeat, 0), args.lv_warmup + 1)
    assert all(model.handed_over.all() for model in copies.obs.models)
    index = torch.arange(4).repeat_interleave(3)
    for (key, value), copied in zip(ens.model.state_dict().items(), copies.model.state_dict().values()):
        assert torch.allclose(copied, value[index], atol=1e-6), key


def test_the_permutation_test_separates_decided_seeds_from_noise():
    generator = np.random.default_rng(1)
    decided = np.repeat(np.array([True] * 10 + [False] * 10)[:, None], 8, axis=1)  # each seed's copies alike
    assert circle_replay.permutation_p(decided, 2000, generator) < 0.001
    noise = generator.random((20, 8)) < 0.5  # every copy leaves with the same chance
    assert circle_replay.permutation_p(noise, 2000, generator) > 0.01


def test_the_script_writes_its_table_with_a_row_per_seed_and_setting(tmp_path):
    out = tmp_path / "replay.md"
    args = argparse.Namespace(seeds=2, first_seed=5, replicas=2, steps=40, hidden=16, lv_warmup=20, window=20,
                              permutations=50, logdir=str(tmp_path / "runs"), out=str(out))
    circle_replay.main(args)
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| LV-VAE, warm start")]
    assert len(rows) == 2 + 2 * 2  # the two settings' summaries, then each seed of each
    for row in rows[2:]:
        cells = row.strip("| ").split(" | ")
        elbos = [float(v) for v in cells[5].split(" / ")]
        assert cells[1] in ("5", "6") and float(cells[2]) >= 0 and cells[3] in ("yes", "no") and len(elbos) == 2
        assert cells[4] == f"{sum(v > circle_replay.ESCAPED for v in elbos)} of 2"
