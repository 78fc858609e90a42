"""common.py against independent references: torch.distributions, Monte Carlo, closed forms; CUDAGraphStep's
protocol on the CPU (tests/test_gpu.py runs the real CUDA graphs)."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from common import (
    MIN_LOG_SIGMA,
    CUDAGraphStep,
    EnsembleLinear,
    FixedSigma,
    LearnedPerDimSigma,
    LearnedScalarSigma,
    MLPVAE,
    OptimalSigma,
    ScheduledSigma,
    elbo_terms,
    gaussian_kl,
    gaussian_nll,
    inverse_soft_floor,
    iwae_bound,
    load_checkpoint,
    save_checkpoint,
    save_figure,
    soft_floor,
)


def reference_nll(x, mean, sigma):
    return -Normal(mean, sigma).log_prob(x).sum(-1)


def test_fixed_sigma_nll_equals_normal_log_prob():
    x, mean = torch.randn(3, 50, 2), torch.randn(3, 50, 2)
    sigma = torch.tensor([0.01, 0.3, 1.0]).reshape(3, 1, 1)
    mean_out, log_sigma = FixedSigma(sigma)(mean, x)
    expected = reference_nll(x, mean, sigma.expand_as(x))
    torch.testing.assert_close(gaussian_nll(x, mean_out, log_sigma), expected, rtol=1e-5, atol=1e-4)


def test_mse_is_fixed_sigma_half():
    # Sec. 3.2: the squared error loss is a Normal with sigma^2 = 1/2, up to a constant.
    x, mean = torch.rand(8, 784), torch.rand(8, 784)
    nll = gaussian_nll(x, *FixedSigma(math.sqrt(0.5))(mean, x))
    constant = 784 * (0.5 * math.log(2 * math.pi) + 0.5 * math.log(0.5))
    torch.testing.assert_close(nll, ((x - mean) ** 2).sum(-1) + constant)


def test_learned_scalar_sigma_nll_starts_at_one_and_matches_normal():
    obs = LearnedScalarSigma((2, 1, 1))
    torch.testing.assert_close(obs.log_sigma.exp(), torch.ones(2, 1, 1))
    with torch.no_grad():
        obs.raw_log_sigma.copy_(torch.tensor([-2.0, 0.5]).reshape(2, 1, 1))
    x, mean = torch.randn(2, 40, 5), torch.randn(2, 40, 5)
    expected = reference_nll(x, mean, obs.log_sigma.exp().expand_as(x))
    torch.testing.assert_close(gaussian_nll(x, *obs(mean, x)), expected, rtol=1e-5, atol=1e-4)
    # Eq. 10: a scalar sigma contributes D log sigma.
    zero_error = gaussian_nll(mean, *obs(mean, mean))
    expected = 5 * (obs.log_sigma.reshape(2, 1) + 0.5 * math.log(2 * math.pi)).expand(2, 40)
    torch.testing.assert_close(zero_error, expected)


def test_learned_per_dim_sigma_nll_equals_normal_log_prob():
    x, decoder_out = torch.randn(2, 30, 3), torch.randn(2, 30, 6) * 3
    mean, log_sigma = LearnedPerDimSigma(dim=-1)(decoder_out, x)
    assert mean.shape == log_sigma.shape == x.shape
    torch.testing.assert_close(mean, decoder_out[..., :3])
    expected = reference_nll(x, decoder_out[..., :3], soft_floor(decoder_out[..., 3:]).exp())
    torch.testing.assert_close(gaussian_nll(x, mean, log_sigma), expected, rtol=1e-5, atol=1e-4)


def test_per_pixel_sigma_splits_channels_of_images():
    decoder_out = torch.randn(4, 2, 7, 7)  # (B, 2C, H, W), C = 1
    mean, log_sigma = LearnedPerDimSigma(dim=1)(decoder_out)
    assert mean.shape == log_sigma.shape == (4, 1, 7, 7)
    x = torch.rand(4, 1, 7, 7)
    expected = -Normal(mean, log_sigma.exp()).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_nll(x, mean, log_sigma, event_dims=3), expected, rtol=1e-5, atol=1e-4)


def test_scheduled_sigma_follows_the_schedule_and_holds_the_last_value():
    schedule = torch.log(torch.tensor([[1.0, 0.5], [0.2, 0.1], [0.05, 0.04]])).reshape(3, 2, 1, 1)
    obs = ScheduledSigma(schedule)
    x, mean = torch.randn(2, 10, 2), torch.randn(2, 10, 2)
    for step, row in [(0, 0), (1, 1), (2, 2), (50, 2)]:
        obs.set_step(step)
        expected = reference_nll(x, mean, schedule[row].exp().expand_as(x))
        torch.testing.assert_close(gaussian_nll(x, *obs(mean, x)), expected, rtol=1e-5, atol=1e-4)
    assert not any(p.requires_grad for p in obs.parameters())


def test_optimal_sigma_is_the_batch_rmse_per_member_and_fixed_in_eval():
    x, mean = torch.randn(2, 100, 2), torch.randn(2, 100, 2, requires_grad=True)
    mean_scaled = mean * torch.tensor([1.0, 0.1]).reshape(2, 1, 1)
    obs = OptimalSigma((2, 1, 1), momentum=0.0)
    _, log_sigma = obs(mean_scaled, x)
    rmse = ((x - mean_scaled.detach()) ** 2).mean(dim=(1, 2)).sqrt()
    torch.testing.assert_close(log_sigma.exp().flatten(), rmse)
    assert not log_sigma.requires_grad  # no gradient through sigma
    expected = reference_nll(x, mean_scaled.detach(), rmse.reshape(2, 1, 1).expand_as(x))
    torch.testing.assert_close(gaussian_nll(x, mean_scaled, log_sigma).detach(), expected, rtol=1e-5, atol=1e-4)
    obs.eval()
    _, eval_log_sigma = obs(torch.zeros_like(x), x)  # a different batch: eval keeps the stored sigma
    torch.testing.assert_close(eval_log_sigma.exp().flatten(), rmse)


def test_optimal_sigma_has_the_same_floor_on_log_sigma_in_training_and_in_eval():
    # Below sigma = e^-3 (MSE < e^-6): the eval-mode sigma once clamped log(MSE), not log sigma, at the floor, so an
    # evaluated sigma-VAE could not go below sigma = e^(MIN_LOG_SIGMA / 2) = 0.0498 while it trained below it.
    obs = OptimalSigma((3, 1, 1), momentum=0.0)
    x = torch.zeros(3, 50, 2)
    mean = torch.tensor([0.02, 0.005, 1e-9]).reshape(3, 1, 1).expand_as(x)  # RMSE 0.02, 0.005, below e^-6
    _, train_log_sigma = obs(mean, x)
    obs.eval()
    _, eval_log_sigma = obs(mean, x)
    torch.testing.assert_close(eval_log_sigma, train_log_sigma)
    torch.testing.assert_close(eval_log_sigma.flatten(), torch.tensor([math.log(0.02), math.log(0.005), MIN_LOG_SIGMA]))


def test_soft_floor_bounds_learned_log_sigma():
    raw = torch.linspace(-40, 5, 200)
    log_sigma = soft_floor(raw)
    assert (log_sigma >= MIN_LOG_SIGMA).all() and (log_sigma[1:] >= log_sigma[:-1]).all()
    assert (log_sigma[raw > -12][1:] > log_sigma[raw > -12][:-1]).all()  # strictly, until float32 rounds to the floor
    torch.testing.assert_close(log_sigma[-1], raw[-1], atol=1e-4, rtol=0)  # ~identity well above the floor
    for value in [-5.0, -3.1, 0.0, 2.0]:
        assert soft_floor(torch.tensor(inverse_soft_floor(value))).item() == pytest.approx(value, abs=1e-5)
    values = torch.tensor([-5.0, -3.1, 0.0, 2.0])  # tensors, elementwise: the same raw values
    torch.testing.assert_close(inverse_soft_floor(values), torch.tensor([inverse_soft_floor(v) for v in values.tolist()]))


def test_gaussian_kl_equals_torch_and_monte_carlo():
    torch.manual_seed(0)
    mu, log_std = torch.randn(4, 3), torch.randn(4, 3) * 0.5
    q, p = Normal(mu, log_std.exp()), Normal(torch.zeros(4, 3), torch.ones(4, 3))
    torch.testing.assert_close(gaussian_kl(mu, log_std), kl_divergence(q, p).sum(-1))
    z = q.sample((200000,))
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    torch.testing.assert_close(gaussian_kl(mu, log_std), monte_carlo, atol=0.03, rtol=0.02)


def test_ensemble_linear_applies_each_members_own_weights():
    layer = EnsembleLinear(3, 4, 5)
    layer.reset_parameters([torch.Generator().manual_seed(s) for s in range(3)])
    x = torch.randn(3, 7, 4)
    for m in range(3):
        torch.testing.assert_close(layer(x)[m], x[m] @ layer.weight[m] + layer.bias[m], rtol=1e-5, atol=1e-5)
    assert not torch.equal(layer.weight[0], layer.weight[1])


def test_members_with_the_same_seed_start_from_the_same_weights():
    model = MLPVAE([7, 8, 7], x_dim=2, latent_dim=2, decoder_out_dim=2, hidden=16, blocks=2)
    alone = MLPVAE([7], x_dim=2, latent_dim=2, decoder_out_dim=2, hidden=16, blocks=2)
    for (name, p), p_alone in zip(model.named_parameters(), alone.parameters()):
        assert torch.equal(p[0], p[2]) and torch.equal(p[0], p_alone[0]), name
        assert not torch.equal(p[0], p[1]), name


def test_elbo_below_iwae_and_iwae_increases_with_k():
    torch.manual_seed(0)
    model = MLPVAE([0], x_dim=2, latent_dim=2, decoder_out_dim=2, hidden=32, blocks=2)
    obs = FixedSigma(1.0)
    x = torch.randn(1, 2000, 2)
    generator = torch.Generator().manual_seed(123)  # not 0: its stream would replay x's own draws as noise
    with torch.no_grad():
        elbo = torch.stack([elbo_terms(model, obs, x)[2] for _ in range(10)]).mean()
        iwae_1 = iwae_bound(model, obs, x, 1, generator).mean()
        iwae_5 = iwae_bound(model, obs, x, 5, generator).mean()
        iwae_50 = iwae_bound(model, obs, x, 50, generator).mean()
    assert iwae_1.item() == pytest.approx(elbo.item(), abs=0.05)  # IWAE-1 is the ELBO
    assert elbo < iwae_5 - 0.05 and iwae_5 < iwae_50 - 0.02, (elbo, iwae_5, iwae_50)


def test_gradients_reach_log_sigma():
    x = torch.randn(1, 64, 2)
    for obs, out_dim in [(LearnedScalarSigma((1, 1, 1)), 2), (LearnedPerDimSigma(), 4)]:
        model = MLPVAE([0], x_dim=2, latent_dim=2, decoder_out_dim=out_dim, hidden=16, blocks=1)
        (-elbo_terms(model, obs, x)[2].mean()).backward()
        if isinstance(obs, LearnedScalarSigma):
            grad = obs.raw_log_sigma.grad
        else:  # the decoder's output columns that hold raw log sigma
            grad = model.decoder.output.weight.grad[..., 2:]
        assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all()


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 3, "weights": torch.arange(4.0)})
    save_checkpoint(path, {"step": 4, "weights": torch.arange(5.0)})  # overwrite in place
    state = load_checkpoint(path)
    assert state["step"] == 4 and torch.equal(state["weights"], torch.arange(5.0))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="corrupt"):
        load_checkpoint(path)
    with pytest.raises(SystemExit, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


SOFT_FLOOR_DIGEST = """
import hashlib, torch
from common import soft_floor
generator = torch.Generator().manual_seed(0)
raw = (torch.randn(50, 3, 100, 4, generator=generator) * 3).requires_grad_()
out = torch.stack([soft_floor(part) for part in raw])  # small tensors, as in training, one call each
out.backward(torch.ones_like(out))
digest = hashlib.sha256(out.detach().numpy().tobytes() + raw.grad.numpy().tobytes()).hexdigest()
print(torch.backends.cpu.get_cpu_capability(), digest)
"""


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="needs a CPU with AVX-512 to compare")
def test_soft_floor_is_bit_identical_on_avx2_and_avx512_kernels():
    # torch's fused softplus rounded some of these inputs 1 ulp apart on the two kernels (136 of 640,000 elements),
    # which made LV-VAE's 2-D trajectories depend on the machine (issue 12, item 6).
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = {}
    for capability in ["AVX512", "AVX2"]:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower())
        result = subprocess.run([sys.executable, "-c", SOFT_FLOOR_DIGEST], cwd=root, env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-1000:]
        used, digest = result.stdout.split()
        assert used == capability
        digests[capability] = digest
    assert digests["AVX512"] == digests["AVX2"]


class ReplayedOnCPU(CUDAGraphStep):
    """CUDAGraphStep with its CUDA calls replaced by what they do, on the CPU: warm-up steps run eagerly, recording
    runs nothing, and a replay runs the step on the static inputs and writes its results into the same output
    tensors every time. A caller that keeps an output without copying it sees it overwritten, as with a real graph:
    the training loops of train_2d.py and train_images.py are tested against their eager steps with it."""

    def warm_up(self, inputs):
        return self.step(*inputs)

    def record(self):
        self.graph = "recorded"

    def replay(self):
        fresh = self.step(*self.inputs)
        if self.outputs is None:
            self.outputs = fresh
        elif isinstance(fresh, torch.Tensor):
            self.outputs.copy_(fresh)
        else:
            for static, new in zip(self.outputs, fresh):
                static.copy_(new)


def test_cuda_graph_step_warms_up_records_once_and_replays_on_copied_inputs():
    calls = []

    def step(x):
        calls.append(x.clone())
        return [x * 2, x.sum()]

    before = []
    graphed = ReplayedOnCPU(step, warmup=2, before_record=lambda: before.append(len(calls)))
    outputs = [graphed(torch.full((3,), float(i))) for i in range(5)]
    assert [c[0].item() for c in calls] == [0, 1, 2, 3, 4] and before == [2]  # recorded once, after the warm-up
    assert graphed.graph == "recorded" and outputs[2] is outputs[4]  # replays return the same static tensors...
    assert outputs[2][1].item() == 12.0  # ...overwritten by the last step (4 * 3), as a CUDA graph's are
    assert outputs[1][1].item() == 3.0  # a warm-up step's outputs are its own


def test_save_figure_keeps_a_long_title_and_command_whole(tmp_path):
    # The title and the footer of a figure are longer than the figure is wide (a long setting name, a long command):
    # nothing may be cut at the PNG's edge, so every edge pixel is background, and the metadata holds the command.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    command = "python train_images.py " + " ".join(f"--flag-{i} data/some/long/path/{i}" for i in range(12))
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1])
    fig.suptitle("celeba, LV-VAE, warm start (175 steps, head at the MSE's sigma), continuous likelihood, 30 epoch(s)")
    save_figure(fig, tmp_path / "fig.png", command)
    image = Image.open(tmp_path / "fig.png")
    assert image.info["Description"] == command
    gray = np.asarray(image.convert("L"))
    assert min(gray[:, 0].min(), gray[:, -1].min(), gray[0].min(), gray[-1].min()) == 255
    assert (gray < 200).any(axis=1).sum() > 0.2 * gray.shape[0]  # something was drawn


def test_writable_folder_makes_nothing_and_names_the_file_in_the_way(tmp_path):
    from common import writable_folder
    writable_folder(str(tmp_path / "a" / "b"), "--out")  # can be made: passes, and makes nothing
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as stop:
        writable_folder(str(tmp_path / "a_file" / "b"), "--out")
    in_the_way = tmp_path / "a_file"
    assert stop.value.code == f"error: --out {in_the_way / 'b'}: {in_the_way} is a file, not a folder; name a folder"
