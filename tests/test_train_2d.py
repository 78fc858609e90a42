"""train_2d.py: the batched ensemble, the learned sigma's dynamics, the data, the command line, end to end."""

import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import train_2d
from common import (FixedSigma, LearnedPerDimSigma, LearnedScalarSigma, OptimalSigma, ScheduledSigma, elbo_terms,
                    soft_floor)
from test_common import ReplayedOnCPU

ROOT = train_2d.__file__.rsplit("/", 1)[0]


def small_args(tmp_path, *extra):
    return train_2d.parse_args(["--hidden", "32", "--blocks", "2", "--logdir", str(tmp_path / "runs"),
                                "--out", str(tmp_path / "out"), "--log-every", "5", "--lv-warmup", "1", *extra])


def test_ensemble_member_follows_the_same_trajectory_as_the_model_trained_alone(tmp_path):
    args = small_args(tmp_path, "--steps", "40")
    torch.manual_seed(0)
    ensemble = train_2d.Ensemble([("F-VAE sigma=0.1", FixedSigma(torch.full((3, 1, 1), 0.1))),
                                  ("LS-VAE", LearnedScalarSigma((3, 1, 1)))], [5, 6, 7], args, "cpu")
    history, _ = train_2d.train([ensemble], [5, 6, 7], args, "cpu", "ensemble")
    torch.manual_seed(1)  # the global RNG must play no part
    alone = train_2d.Ensemble([("LS-VAE", LearnedScalarSigma((1, 1, 1)))], [6], args, "cpu")
    history_alone, _ = train_2d.train([alone], [6], args, "cpu", "alone")
    member = 3 + 1  # group LS-VAE (second), seed 6 (second)
    for p, p_alone in zip(ensemble.model.parameters(), alone.model.parameters()):
        torch.testing.assert_close(p[member], p_alone[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ensemble.group("LS-VAE").log_sigma[1], alone.group("LS-VAE").log_sigma[0])
    assert history["LS-VAE"]["elbo"][:, 1] == pytest.approx(history_alone["LS-VAE"]["elbo"][:, 0], abs=1e-4)
    # ...and members of different settings did not stay together: the observation model matters.
    assert not torch.allclose(ensemble.model.decoder.output.weight[1], ensemble.model.decoder.output.weight[member])


def test_learned_sigma_moves_down_from_one_in_a_short_run(tmp_path):
    args = small_args(tmp_path, "--steps", "150", "--lr", "3e-3")
    scalar = train_2d.Ensemble([("LS-VAE", LearnedScalarSigma((2, 1, 1)))], [0, 1], args, "cpu")
    per_dim = train_2d.Ensemble([("LV-VAE", LearnedPerDimSigma())], [0, 1], args, "cpu")
    history, ls_schedule = train_2d.train([scalar, per_dim], [0, 1], args, "cpu", "short")
    assert ls_schedule.shape == (150, 2)
    torch.testing.assert_close(ls_schedule[0], torch.zeros(2), atol=1e-5, rtol=0)  # starts at sigma = 1
    assert (scalar.group("LS-VAE").log_sigma.exp() < 0.8).all()
    assert (ls_schedule[1:] <= ls_schedule[:-1] + 1e-3).float().mean() > 0.95  # moves down, almost monotonically
    assert history["LV-VAE"]["log_sigma"][-1].max() < math.log(0.8)


def elbo_terms_around_hand_over(ensemble, name, step):
    """The warm start `name` (members 2, 3 of a 2-seed, 2-row ensemble) hands over at `step`; elbo_terms on 500 fixed
    points and noise just before and after it. -> x, eps, before, after."""
    x = train_2d.sample_data(500, torch.Generator().manual_seed(123)).expand(4, -1, -1)
    eps = torch.randn(4, 500, 2, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = elbo_terms(ensemble.model, ensemble.obs, x, eps)
        ensemble.hand_over(name, step=step)
        after = elbo_terms(ensemble.model, ensemble.obs, x, eps)
    return x, eps, before, after


def test_warm_start_trains_as_ls_vae_then_hands_over_with_the_same_elbo(tmp_path):
    args = small_args(tmp_path, "--steps", "40", "--lr", "3e-3")
    args.lv_warmup = 40  # the hand-over would come at step 41: this call trains the LS phase only
    warm = train_2d.WarmStartSigma(2)
    ensemble = train_2d.Ensemble([("LV-VAE", LearnedPerDimSigma()), ("LV-VAE, warm start", warm)], [0, 1], args, "cpu")
    head = ensemble.model.decoder.output.weight[2:, :, 2:]  # the warm start's log sigma head (members 2, 3)
    head_at_start = head.clone()
    train_2d.train([ensemble], [0, 1], args, "cpu", "LS phase")
    assert not warm.handed_over.any()
    # The LS phase: the head's gradient was exactly zero, so Adam left it where it started; the scalar sigma moved.
    assert torch.equal(head, head_at_start)
    assert (warm.scalar.log_sigma < -0.05).all()

    x, eps, before, after = elbo_terms_around_hand_over(ensemble, "LV-VAE, warm start", step=41)
    assert warm.handed_over.all() and (head == 0).all() and warm.handover_step.tolist() == [41, 41]
    # The same batch and noise: the same log sigma and ELBO of every point, to float precision.
    torch.testing.assert_close(after[3][1], before[3][1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(after[2], before[2], rtol=1e-6, atol=1e-6)

    # From there on the head learns: sigma becomes a function of z, and another hand-over changes nothing.
    args = small_args(tmp_path, "--steps", "30", "--lv-warmup", "1", "--lr", "3e-3")
    train_2d.train([ensemble], [0, 1], args, "cpu", "LV phase")
    with torch.no_grad():
        log_sigma = elbo_terms(ensemble.model, ensemble.obs, x, eps)[3][1][2:]  # (2, 500, 2)
    assert log_sigma.std(dim=1).min() > 1e-3
    assert not (head == 0).all()


def test_sigma_vae_warm_start_trains_as_sigma_vae_then_hands_over_to_the_same_model(tmp_path):
    args = small_args(tmp_path, "--steps", "30", "--lr", "3e-3")
    args.lv_warmup = 30  # the sigma-VAE phase only
    warm = train_2d.WarmStartSigma(2, warm="optimal")
    ensemble = train_2d.Ensemble([("sigma-VAE", OptimalSigma((2, 1, 1))), ("LV-VAE, warm start (sigma-VAE)", warm)],
                                 [0, 1], args, "cpu")
    history, _ = train_2d.train([ensemble], [0, 1], args, "cpu", "sigma-VAE phase")
    assert not warm.handed_over.any()
    # The warm phase is sigma-VAE: the same seeds give the sigma-VAE row's trajectory (its head's gradient is zero, as
    # is that of the unused half of the sigma-VAE members' output layer) and its running MSE.
    assert history["LV-VAE, warm start (sigma-VAE)"]["elbo"] == pytest.approx(history["sigma-VAE"]["elbo"], abs=1e-4)
    for p in ensemble.model.parameters():
        torch.testing.assert_close(p[2:], p[:2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(warm.scalar.running_mse, ensemble.group("sigma-VAE").running_mse)
    assert (warm.scalar.running_mse < 1).all()  # it moved from 1 toward the batches' MSE (momentum 0.99: it lags)

    ensemble.model.eval(), ensemble.obs.eval()  # evaluation uses the running MSE: a fixed model, one sigma a member
    _, _, before, after = elbo_terms_around_hand_over(ensemble, "LV-VAE, warm start (sigma-VAE)", step=31)
    assert warm.handed_over.all() and (ensemble.model.decoder.output.weight[2:, :, 2:] == 0).all()
    torch.testing.assert_close(after[3][1][2:], warm.scalar.log_sigma.expand(2, 500, 2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(after[2], before[2], rtol=1e-6, atol=1e-6)

    # A running MSE at or below the floor (where the soft floor has no inverse): the head starts just above it.
    floored = train_2d.WarmStartSigma(1, warm="optimal")
    floored.scalar.running_mse.fill_(1e-30)
    weight, bias = torch.ones(1, 4, 2), torch.zeros(1, 1, 2)
    floored.hand_over(weight, bias, step=1)
    assert torch.isfinite(bias).all() and (soft_floor(bias) - floored.floor).sub(1e-3).abs().max() < 1e-5


def test_warm_start_hands_over_at_the_step_after_lv_warmup_inside_training(tmp_path):
    for steps, handed_over in [(20, False), (21, True)]:
        args = small_args(tmp_path, "--steps", str(steps))
        args.lv_warmup = 20  # the command line refuses --lv-warmup >= --steps; the first call is the LS phase alone
        ensemble = train_2d.Ensemble([("LV-VAE, warm start", train_2d.WarmStartSigma(2))], [0, 1], args, "cpu")
        history, _ = train_2d.train([ensemble], [0, 1], args, "cpu", "warm start")
        assert ensemble.group("LV-VAE, warm start").handed_over.tolist() == [[[handed_over]]] * 2
    assert history["LV-VAE, warm start"]["fold"].shape == (5, 2, 2)  # probed at steps 5, 10, 15, 20, 21: seeds, (u, x2)


def test_settled_trigger_hands_over_the_seeds_whose_losses_stopped_moving(tmp_path):
    args = small_args(tmp_path, "--steps", "10", "--lv-handover", "settled")
    ensemble = train_2d.Ensemble([("LV-VAE, warm start", train_2d.WarmStartSigma(2))], [0, 1], args, "cpu")
    warm, window = ensemble.group("LV-VAE, warm start"), train_2d.SETTLE_WINDOW
    for step in range(1, 4 * window + 2):
        ensemble.before_step(step, args)
        # seed 0: losses flat; seed 1: the KL still rising by 0.1 nats per window (5 x the tolerance)
        recon_nll = torch.full((2, 100), -1.0)
        kl = torch.stack([torch.full((100,), 2.0), torch.full((100,), 2.0 + 0.1 * step / window)])
        ensemble.after_step(recon_nll, kl, step, args)
    # First look at step 2 * window + 1 (the averages' change over the second window): seed 0 hands over there.
    assert warm.handover_step.tolist() == [2 * window + 1, -1]
    assert warm.handed_over.reshape(-1).tolist() == [True, False]


def test_a_non_finite_loss_stops_the_run_naming_step_row_and_seed(tmp_path):
    result = subprocess.run([sys.executable, "train_2d.py", "--steps", "30", "--seeds", "2", "--hidden", "8",
                             "--blocks", "1", "--settings", "F", "--fixed-sigmas", "1", "1e-30",
                             "--out", str(tmp_path / "out"), "--logdir", str(tmp_path / "runs")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "non-finite loss at step 1 in F-VAE sigma=1e-30 (seed 0)" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "table1.md").exists()


def stop_once_trained(tmp_path, steps_before_stop, *extra):
    """train_2d.py started for 100,000 steps, sent SIGTERM once its progress bar shows steps_before_stop steps."""
    process = subprocess.Popen(
        [sys.executable, "train_2d.py", "--steps", "100000", "--seeds", "2", "--hidden", "8", "--blocks", "1",
         "--settings", "F", "LS", "Fstar", "--fixed-sigmas", "0.1", "--eval-points", "200", "--iwae-points", "20",
         "--iwae-k", "5", "--out", str(tmp_path / "out"), "--logdir", str(tmp_path / "runs"), *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = b""
    while not any(int(done) >= steps_before_stop for done in re.findall(rb"(\d+)/100000", output)):
        chunk = os.read(process.stdout.fileno(), 4096)  # tqdm redraws with \r: read what comes, not lines
        assert chunk, output.decode()[-2000:]
        output += chunk
    process.send_signal(signal.SIGTERM)
    output += process.stdout.read()
    return process.wait(timeout=300), output.decode()


def test_sigterm_stops_training_and_writes_what_it_trained_marked_as_cut_short(tmp_path):
    returncode, output = stop_once_trained(tmp_path, 20, "--log-every", "5")
    assert returncode == 128 + signal.SIGTERM, output[-2000:]
    stopped = re.search(r"stopped by SIGTERM at step (\d+) of 100000 of phase 1, before phase 2 \(F\*-VAE, F-sched\)",
                        output)
    assert stopped and int(stopped[1]) >= 20, output[-2000:]
    table = (tmp_path / "out" / "table1.md").read_text()
    assert f"**Not the protocol above: {stopped[0]}.**" in table
    assert "| F-VAE sigma=0.1 |" in table and "| LS-VAE |" in table and "F*-VAE |" not in table
    assert (tmp_path / "out" / "fig10_ls_sigma.png").exists()
    # Stopped before anything was recorded, it writes nothing and says so.
    returncode, output = stop_once_trained(tmp_path / "early", 1, "--log-every", "100000")
    assert returncode == 1 and "before the first record (every --log-every 100000 steps); nothing written" in output
    assert not (tmp_path / "early" / "out").exists()


def test_data_log_density_matches_the_tube_approximation():
    # On the curve in the small-noise region (u = 0, s = 0.01, no curvature there), the density is the uniform
    # density of u (1/2) spread along the curve (speed |c'(0)|) times a 1-D Gaussian across it.
    x = train_2d.manifold(torch.zeros(1))
    speed = math.sqrt(4 + math.pi**2)
    expected = math.log(0.5 / speed) - 0.5 * math.log(2 * math.pi * 0.01**2)
    assert train_2d.data_log_density(x).item() == pytest.approx(expected, abs=0.01)
    x, u = train_2d.sample_data(3000, torch.Generator().manual_seed(0), return_u=True)
    assert x.shape == (3000, 2) and u.min() >= -1 and u.max() <= 1
    residual = (x - train_2d.manifold(u)) / train_2d.noise_level(u)[:, None]
    assert residual.std().item() == pytest.approx(1.0, abs=0.05)


def test_spiral_density_matches_the_tube_approximation_and_its_noise_is_isotropic():
    # u = 0: radius 1, angle 1.25 pi, in the small-noise region (0.01); the curve's speed is |c'(0)|.
    x = train_2d.manifold(torch.zeros(1), "spiral")
    speed = math.sqrt(0.5**2 + (1.25 * math.pi) ** 2)
    expected = math.log(0.5 / speed) - 0.5 * math.log(2 * math.pi * 0.01**2)
    assert train_2d.data_log_density(x, "spiral").item() == pytest.approx(expected, abs=0.01)
    x, u = train_2d.sample_data(3000, torch.Generator().manual_seed(0), "spiral", return_u=True)
    residual = (x - train_2d.manifold(u, "spiral")) / train_2d.noise_level(u, "spiral")[:, None]
    assert residual.std(dim=0).tolist() == pytest.approx([1.0, 1.0], abs=0.05)


def test_circle_noise_is_radial_and_its_density_integrates_to_one():
    x, u = train_2d.sample_data(3000, torch.Generator().manual_seed(0), "circle", return_u=True)
    radius = x.norm(dim=1)
    torch.testing.assert_close(x / radius[:, None], train_2d.manifold(u, "circle"), rtol=0, atol=1e-5)  # on the ray
    for low, high, level in [(-1, -1 / 3, 0.01), (-1 / 3, 1 / 3, 0.05), (1 / 3, 1, 0.1)]:
        third = (u >= low) & (u < high)
        assert ((radius[third] - 1) / level).std().item() == pytest.approx(1.0, abs=0.08)
    # Midpoint rule on a 2-D grid fine enough for the thinnest part of the ring (0.002 against noise 0.01).
    step = 0.002
    grid = torch.arange(-1.5 + step / 2, 1.5, step)
    total = sum(train_2d.data_log_density(torch.stack([torch.full_like(grid, a), grid], 1), "circle").exp().sum()
                for a in grid.tolist()) * step**2
    assert total.item() == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("flags, message", [
    (["--preset", "paper", "--steps", "10"], "--preset paper fixes"),
    (["--settings", "F", "Fstar"], "add LS to --settings"),
    (["--fixed-sigmas", "0.1", "-1"], "--fixed-sigmas must all be > 0"),
    (["--iwae-points", "5000", "--eval-points", "1000"], "cannot exceed --eval-points"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--settings", "nope"], "invalid choice"),
    (["--data", "torus"], "invalid choice"),
    (["--steps", "500"], "--lv-warmup (1000) must be below --steps (500)"),
])
def test_contradictory_flags_are_refused_at_parse_time(flags, message):
    result = subprocess.run([sys.executable, "train_2d.py", *flags], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]


def test_help_documents_every_flag():
    result = subprocess.run([sys.executable, "train_2d.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    for action in train_2d.parser._actions:
        assert action.help, action.option_strings


@pytest.mark.parametrize("flag", ["--out", "--logdir"])
def test_an_output_folder_that_is_a_file_stops_the_run_before_it_trains(tmp_path, flag):
    (tmp_path / "a_file").write_text("")
    folders = {"--out": str(tmp_path / "out"), "--logdir": str(tmp_path / "runs"), flag: str(tmp_path / "a_file")}
    result = subprocess.run([sys.executable, "train_2d.py", "--steps", "2000", "--settings", "LS",
                             *[item for pair in folders.items() for item in pair]],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {flag} {tmp_path / 'a_file'} is a file, not a folder; name a folder"
    assert result.stdout == ""  # stopped before its first line


def run_tiny(out, logdir, *extra):
    result = subprocess.run(
        [sys.executable, "train_2d.py", "--steps", "30", "--lv-warmup", "10", "--seeds", "2", "--hidden", "16",
         "--blocks", "1", "--fixed-sigmas", "1", "0.1", "--eval-points", "500", "--iwae-points", "50", "--iwae-k", "10",
         "--out", str(out), "--logdir", str(logdir), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return (out / "table1.md").read_text()


def test_end_to_end_writes_table_and_figures_and_a_rerun_of_some_rows_gives_the_same_rows(tmp_path):
    out = tmp_path / "out"
    table = run_tiny(out, tmp_path / "runs")
    assert "python train_2d.py --steps 30" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = [row.split("|")[1].strip() for row in rows]
    assert names[:-1] == ["F-VAE sigma=1", "F-VAE sigma=0.1", "LS-VAE", "sigma-VAE", "LV-VAE", "LV-VAE, warm start",
                          "LV-VAE, warm start (sigma-VAE)", "F*-VAE", "F-sched"]
    for row in rows[:-1]:
        cells = row.split("|")
        measured = float(cells[3].split("±")[0])
        # Gibbs: no model's expected log-likelihood passes the data's own (the ceiling row, about 0.08 nats)
        assert math.isfinite(measured) and measured < 0.5, row
        per_seed = [float(value) for value in cells[4].split("/")]
        assert len(per_seed) == 2 and sum(per_seed) / 2 == pytest.approx(measured, abs=1.5e-3), row
    for name in ["fig3_dataset", "fig4_all_settings", "fig6_learned_sigma", "fig7_fixed_sigma",
                 "fig8_losses_fixed_sigma", "fig9_losses_learned_sigma", "fig10_ls_sigma", "fig11_lv_fold"]:
        assert (out / f"{name}.png").stat().st_size > 10000, name
    assert len(list((tmp_path / "runs").iterdir())) == 9  # one TensorBoard run per setting
    # Every draw is seeded (weights, data, training and evaluation noise, one stream per seed), and a member's numbers
    # do not depend on the rows trained beside it (beyond the last bits of a member that lands in the scalar tail of a
    # vectorised kernel, README): a rerun of three rows gives those rows' numbers again.
    rerun = run_tiny(tmp_path / "rerun", tmp_path / "runs_rerun", "--settings", "LS", "LV", "Fsched")
    numbers = lambda text, names: [line for line in text.splitlines() if line.startswith(names)]
    shared = ("| LS-VAE |", "| LV-VAE |", "| F-sched |", "| true log-density", "LS-VAE's sigma")
    assert len(numbers(rerun, shared)) == 5 and numbers(rerun, shared) == numbers(table, shared)


TRAIN_DIGEST = """
import hashlib, sys, torch
import train_2d
from common import LearnedPerDimSigma
args = train_2d.parse_args(["--steps", "100", "--lv-warmup", "50", "--hidden", "16", "--blocks", "1",
                            "--logdir", sys.argv[1]])
ensemble = train_2d.Ensemble([("LV-VAE", LearnedPerDimSigma()), ("LV-VAE, warm start", train_2d.WarmStartSigma(3))],
                             [0, 1, 2], args, "cpu")
train_2d.train([ensemble], [0, 1, 2], args, "cpu", "digest")
print(torch.backends.cpu.get_cpu_capability(), hashlib.sha256(b"".join(p.detach().numpy().tobytes()
      for p in list(ensemble.model.parameters()) + list(ensemble.obs.parameters()))).hexdigest())
"""


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="needs a CPU with AVX-512 to compare")
def test_lv_rows_train_bit_identically_on_avx2_and_avx512_kernels(tmp_path):
    # Issue 12, item 6: a rerun changed the LV-VAE row alone; the machine's vector kernels (AVX2 or AVX-512) decided
    # the last bit of torch's fused softplus in the sigma head, and LV-VAE's dynamics amplified it.
    import os

    digests = set()
    for capability in ["AVX512", "AVX2"]:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower(), OMP_NUM_THREADS="1")
        result = subprocess.run([sys.executable, "-c", TRAIN_DIGEST, str(tmp_path / "runs")], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-1000:]
        used, digest = result.stdout.split()[-2:]
        assert used == capability
        digests.add(digest)
    assert len(digests) == 1


def test_graphed_steps_train_exactly_as_eager_steps(tmp_path, monkeypatch):
    # --cuda-graphs on the CPU: common.CUDAGraphStep with its CUDA calls replaced by what they do (ReplayedOnCPU:
    # the step's outputs are static tensors that every later step overwrites). Every kind of row in both phases, the
    # warm start handing over mid-run, F-sched replaying LS's sigma: the same weights, records and fold probes bit for
    # bit as eager steps, so nothing in the loop keeps a graph output that the next step overwrites.
    args = small_args(tmp_path, "--steps", "60", "--lv-warmup", "20")
    written = []  # what train() hands to TensorBoard: LV rows' sigma at every record among it
    monkeypatch.setattr(train_2d, "write_tensorboard", lambda history, lv_sigma, *_: written.append(lv_sigma))

    def run(graphed):
        def maybe_graphed(ens):
            if graphed:
                ens.graphed_step = ReplayedOnCPU(ens.step_terms, train_2d.GRAPH_WARMUP_STEPS,
                                                 lambda: ens.optimizer.zero_grad(set_to_none=True))
            return ens

        groups = [("F-VAE sigma=0.1", FixedSigma(torch.full((2, 1, 1), 0.1))),
                  ("LS-VAE", LearnedScalarSigma((2, 1, 1))), ("sigma-VAE", OptimalSigma((2, 1, 1))),
                  ("LV-VAE", LearnedPerDimSigma(dim=-1)), ("LV-VAE, warm start", train_2d.WarmStartSigma(2)),
                  ("LV-VAE, warm start (sigma-VAE)", train_2d.WarmStartSigma(2, warm="optimal"))]
        phase1 = maybe_graphed(train_2d.Ensemble(groups, [0, 1], args, "cpu"))
        history, schedule = train_2d.train([phase1], [0, 1], args, "cpu", "phase 1")
        phase2 = maybe_graphed(train_2d.Ensemble([("F-sched", ScheduledSigma(schedule.reshape(60, -1, 1, 1)))],
                                                 [10000, 10001], args, "cpu"))
        history.update(train_2d.train([phase2], [10000, 10001], args, "cpu", "phase 2")[0])
        if graphed:
            assert phase1.graphed_step.graph == phase2.graphed_step.graph == "recorded"
        return history, [p.detach().clone() for ens in (phase1, phase2) for p in ens.model.parameters()]

    runs = {graphed: run(graphed) for graphed in [False, True]}
    (eager, eager_weights), (replayed, replayed_weights) = runs[False], runs[True]
    assert eager.keys() == replayed.keys()
    for name in eager:
        for key, value in eager[name].items():
            assert (replayed[name][key] == value).all(), (name, key)
    assert all(torch.equal(a, b) for a, b in zip(eager_weights, replayed_weights))
    eager_sigma, replayed_sigma = written[0], written[2]  # phase 1 of each run
    assert eager_sigma.keys() == replayed_sigma.keys() == {"LV-VAE", "LV-VAE, warm start",
                                                           "LV-VAE, warm start (sigma-VAE)"}
    assert all(torch.equal(eager_sigma[name], replayed_sigma[name]) for name in eager_sigma)
