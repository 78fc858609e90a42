"""What the experiment scripts share: networks, observation models, the ELBO, logging and checkpoints.

Berger & Sebag, "Variational Auto-Encoders: Not all failures are equal" (paper.md in the shared folder).

- networks: `EnsembleLinear` and `ResNetMLP` (Sec. 4.1: a ResNet of 4 residual blocks of 200 units) with a
  leading *member* dimension, so that M independent models (seeds, settings) train as one batched computation;
  `MLPVAE`, the Gaussian encoder + decoder built from them.
- observation models p(x|z) = N(mean, sigma^2), all parametrised through log sigma, one class each:
  `FixedSigma` (F-VAE), `LearnedScalarSigma` (LS-VAE, Eq. 10), `LearnedPerDimSigma` (LV-VAE, Eq. 11),
  `ScheduledSigma` (App. A.2: a fixed sigma that follows a recorded sigma(t)), `OptimalSigma` (the sigma-VAE of
  Rybkin et al. 2021, sigma^2 = batch MSE). Each turns the decoder output into (mean, log_sigma).
- `gaussian_nll`, `gaussian_kl`, `elbo_terms`, `iwae_bound`: in nats, every normalising constant included.
- TensorBoard writer, sigma statistics, atomic checkpoints.
"""

import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

# Lower bound of every *learned* log sigma, applied as a soft floor: log_sigma = MIN + softplus(raw - MIN).
# An unconstrained Gaussian decoder has an unbounded likelihood (Mattei & Frellsen 2018): sigma -> 0 on any point it
# reconstructs exactly. -6 (sigma >= 0.0025) is the sigma-VAE's choice; it is far below every noise level of the
# 2-D data (>= 0.01), so it only ever acts on runaway values. Fixed sigmas are not floored.
MIN_LOG_SIGMA = -6.0


# --- networks ---


class EnsembleLinear(nn.Module):
    """M independent affine maps applied at once: x (M, B, in) -> (M, B, out)."""

    def __init__(self, members, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(members, 1, out_features))

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)

    @torch.no_grad()
    def reset_parameters(self, generators):
        """nn.Linear's default init, member m drawn from generators[m] (so a member's init depends on its seed only)."""
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        for m, generator in enumerate(generators):
            self.weight[m].uniform_(-bound, bound, generator=generator)
            self.bias[m].uniform_(-bound, bound, generator=generator)


class ResNetMLP(nn.Module):
    """ResNet MLP (Sec. 4.1): input layer, `blocks` residual blocks h + W2 relu(W1 relu(h)) of `hidden` units, output.

    Batched over M members: x (M, B, in) -> (M, B, out).
    """

    def __init__(self, members, in_dim, out_dim, hidden=200, blocks=4):
        super().__init__()
        self.input = EnsembleLinear(members, in_dim, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleList([EnsembleLinear(members, hidden, hidden), EnsembleLinear(members, hidden, hidden)])
            for _ in range(blocks)
        )
        self.output = EnsembleLinear(members, hidden, out_dim)

    def forward(self, x):
        h = self.input(x)
        for first, second in self.blocks:
            h = h + second(F.relu(first(F.relu(h))))
        return self.output(F.relu(h))


class MLPVAE(nn.Module):
    """M VAEs with ResNet-MLP encoder and decoder; Gaussian encoder q(z|x) = N(mu, exp(log_std)^2), prior N(0, I).

    `seeds[m]` seeds member m's initial weights: members with the same seed start from the same weights, and a
    member starts exactly where a model trained alone with that seed starts.
    """

    def __init__(self, seeds, x_dim, latent_dim, decoder_out_dim, hidden=200, blocks=4):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = ResNetMLP(len(seeds), x_dim, 2 * latent_dim, hidden, blocks)
        self.decoder = ResNetMLP(len(seeds), latent_dim, decoder_out_dim, hidden, blocks)
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        for module in self.modules():
            if isinstance(module, EnsembleLinear):
                module.reset_parameters(generators)

    def encode(self, x):
        """x (M, B, x_dim) -> mu, log_std, each (M, B, latent_dim)."""
        mu, log_std = self.encoder(x).chunk(2, dim=-1)
        return mu, log_std

    def decode(self, z):
        """z (M, B, latent_dim) -> decoder output (M, B, decoder_out_dim), read by an observation model."""
        return self.decoder(z)


# --- observation models ---


def soft_floor(raw_log_sigma, floor=MIN_LOG_SIGMA):
    """log_sigma = floor + softplus(raw - floor): smooth, monotone, >= floor, and ~ raw well above the floor."""
    return floor + F.softplus(raw_log_sigma - floor)


def inverse_soft_floor(log_sigma, floor=MIN_LOG_SIGMA):
    """The raw value that `soft_floor` maps to log_sigma (> floor)."""
    return floor + math.log(math.expm1(log_sigma - floor))


class FixedSigma(nn.Module):
    """F-VAE: p(x|z) = N(mean, sigma^2), sigma fixed. sigma: a float, or a tensor broadcastable to x (one per member).

    The MSE loss is sigma^2 = 1/2 (Sec. 3.2).
    """

    decoder_outputs_per_dim = 1

    def __init__(self, sigma):
        super().__init__()
        self.register_buffer("log_sigma", torch.log(torch.as_tensor(sigma, dtype=torch.float32)))

    def forward(self, decoder_out, x=None):
        return decoder_out, self.log_sigma


class LearnedScalarSigma(nn.Module):
    """LS-VAE (Eq. 10): one learned sigma shared by all dimensions (one per member with shape=(M, 1, 1)), init 1."""

    decoder_outputs_per_dim = 1

    def __init__(self, shape=(), init_sigma=1.0, floor=MIN_LOG_SIGMA):
        super().__init__()
        self.floor = floor
        self.raw_log_sigma = nn.Parameter(torch.full(shape, inverse_soft_floor(math.log(init_sigma), floor)))

    @property
    def log_sigma(self):
        return soft_floor(self.raw_log_sigma, self.floor)

    def forward(self, decoder_out, x=None):
        return decoder_out, self.log_sigma


class LearnedPerDimSigma(nn.Module):
    """LV-VAE (Eq. 11): the decoder outputs (mean, raw log sigma) per dimension, split along `dim`."""

    decoder_outputs_per_dim = 2

    def __init__(self, dim=-1, floor=MIN_LOG_SIGMA):
        super().__init__()
        self.dim = dim
        self.floor = floor

    def forward(self, decoder_out, x=None):
        mean, raw_log_sigma = decoder_out.chunk(2, dim=self.dim)
        return mean, soft_floor(raw_log_sigma, self.floor)


class ScheduledSigma(FixedSigma):
    """App. A.2: a fixed sigma (no gradient) that follows a recorded trajectory. schedule: (T, *shape) of log sigma.

    Call `set_step(t)` before each training step; past the end of the schedule the last value is kept.
    """

    def __init__(self, log_sigma_schedule):
        super().__init__(1.0)
        self.register_buffer("schedule", torch.as_tensor(log_sigma_schedule, dtype=torch.float32))
        self.log_sigma = self.schedule[0].clone()

    def set_step(self, step):
        self.log_sigma = self.schedule[min(step, len(self.schedule) - 1)]


class OptimalSigma(nn.Module):
    """sigma-VAE (Rybkin et al. 2021): sigma^2 = mean squared error of the batch, with no gradient through sigma.

    The MSE is averaged over every dimension where `shape` is 1 (shape=(M, 1, 1): one sigma per member). In train
    mode sigma comes from the batch and updates a running average (momentum 0.99); in eval mode that average is
    used, so that the evaluated model is a fixed density that does not look at the test points.
    """

    decoder_outputs_per_dim = 1

    def __init__(self, shape=(), momentum=0.99, floor=MIN_LOG_SIGMA):
        super().__init__()
        self.momentum = momentum
        self.floor = floor
        self.register_buffer("running_mse", torch.ones(shape))

    @property
    def log_sigma(self):
        return 0.5 * torch.log(self.running_mse).clamp(min=self.floor)

    def forward(self, decoder_out, x=None):
        if not self.training:
            return decoder_out, self.log_sigma
        squared_error = (x - decoder_out).detach() ** 2
        shape = (1,) * (squared_error.ndim - self.running_mse.ndim) + tuple(self.running_mse.shape)
        dims = [d for d, size in enumerate(shape) if size == 1]
        batch_mse = squared_error.mean(dim=dims, keepdim=True).reshape(self.running_mse.shape)
        with torch.no_grad():
            self.running_mse.mul_(self.momentum).add_((1 - self.momentum) * batch_mse)
        return decoder_out, (0.5 * torch.log(batch_mse)).clamp(min=self.floor)


# --- ELBO, IWAE ---


def gaussian_nll(x, mean, log_sigma, event_dims=1):
    """-log N(x; mean, exp(log_sigma)^2) in nats, summed over the last `event_dims` dimensions.

    # Eq. 11: nll = sum_i 0.5 * ((x_i - mean_i) / sigma_i)**2 + log_sigma_i + 0.5 * log(2*pi)
    # (a scalar log_sigma broadcasts, which gives Eq. 10's D log sigma; the paper drops the 0.5 log 2pi, we keep it)
    """
    nll = 0.5 * ((x - mean) * torch.exp(-log_sigma)) ** 2 + log_sigma + HALF_LOG_2PI
    return nll.sum(dim=tuple(range(-event_dims, 0)))


def gaussian_kl(mu, log_std):
    """KL(N(mu, exp(log_std)^2) || N(0, I)) in nats, summed over the last dimension (Kingma & Welling, App. B)."""
    return 0.5 * (mu**2 + torch.exp(2 * log_std) - 1 - 2 * log_std).sum(-1)


def elbo_terms(model, obs, x, eps=None):
    """One-sample ELBO of an `MLPVAE` with observation model `obs`. x: (M, B, D).

    Returns recon_nll, kl, elbo (each (M, B), nats per sample; elbo = -recon_nll - kl) and the decoder's
    (mean, log_sigma). `eps` (M, B, latent) is the reparametrisation noise; drawn here when None.
    """
    mu, log_std = model.encode(x)
    if eps is None:
        eps = torch.randn_like(mu)
    z_sample = mu + torch.exp(log_std) * eps
    mean, log_sigma = obs(model.decode(z_sample), x)
    recon_nll = gaussian_nll(x, mean, log_sigma)
    kl = gaussian_kl(mu, log_std)
    return recon_nll, kl, -recon_nll - kl, (mean, log_sigma)


@torch.no_grad()
def iwae_bound(model, obs, x, k, generator=None):
    """k-sample importance-weighted bound (Burda et al. 2016) on log p(x), nats per sample. x: (M, B, D) -> (M, B).

    log p(x) >= E log (1/k) sum_j p(x|z_j) p(z_j) / q(z_j|x),  z_j ~ q(z|x). k = 1 is the ELBO.
    """
    members, batch, x_dim = x.shape
    mu, log_std = model.encode(x)  # (M, B, L)
    eps = torch.randn((members, k) + mu.shape[1:], generator=generator, device=x.device)  # (M, k, B, L)
    z_sample = mu.unsqueeze(1) + torch.exp(log_std).unsqueeze(1) * eps
    decoder_out = model.decode(z_sample.reshape(members, k * batch, -1))
    x_repeated = x.unsqueeze(1).expand(members, k, batch, x_dim).reshape(members, k * batch, x_dim)
    mean, log_sigma = obs(decoder_out, x_repeated)
    log_px_z = -gaussian_nll(x_repeated, mean, log_sigma).reshape(members, k, batch)
    log_pz = -gaussian_nll(z_sample, torch.zeros(()), torch.zeros(()))
    log_qz_x = -gaussian_nll(eps, torch.zeros(()), torch.zeros(())) - log_std.sum(-1).unsqueeze(1)
    return torch.logsumexp(log_px_z + log_pz - log_qz_x, dim=1) - math.log(k)


# --- logging, checkpoints ---


def make_writer(run_dir, args):
    """A TensorBoard SummaryWriter in run_dir, with the command line and every argument logged as a text table."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(run_dir)
    rows = "\n".join(f"|{key}|{value}|" for key, value in sorted(vars(args).items()))
    writer.add_text("command", " ".join(["python"] + sys.argv))
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")
    return writer


def run_name(script, dataset, sigma, seed):
    """runs/<script>__<dataset>__<sigma>__seed<k>__<time>: the house naming of run directories."""
    return f"{script}__{dataset}__{sigma}__seed{seed}__{time.strftime('%Y%m%d-%H%M%S')}"


def log_sigma_stats(writer, prefix, log_sigma, step):
    """Log sigma: the value itself when it is one number, else mean/min/max of sigma and a histogram of log sigma."""
    log_sigma = log_sigma.detach().float()
    if log_sigma.numel() == 1:
        writer.add_scalar(f"{prefix}/sigma", log_sigma.exp().item(), step)
        return
    sigma = log_sigma.exp()
    writer.add_scalar(f"{prefix}/sigma_mean", sigma.mean().item(), step)
    writer.add_scalar(f"{prefix}/sigma_min", sigma.min().item(), step)
    writer.add_scalar(f"{prefix}/sigma_max", sigma.max().item(), step)
    writer.add_histogram(f"{prefix}/log_sigma", log_sigma.flatten().cpu(), step)


def save_checkpoint(path, state):
    """torch.save to a temporary file in the same folder, flushed to disk, then renamed: never a half-written file."""
    tmp_path = f"{path}.tmp{os.getpid()}"
    with open(tmp_path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint written by `save_checkpoint`; one clear error line if it is missing or unreadable."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}; check the path given to --resume")
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as error:  # torch raises several types for a corrupt file
        raise SystemExit(f"error: checkpoint {path} is corrupt or not a checkpoint ({error}); start without --resume")


def pick_device(name):
    """--device auto|cpu|cuda -> torch.device; asking for cuda without one is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible; use --device cpu or auto")
    return torch.device(name)
