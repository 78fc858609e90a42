"""What the experiment scripts share: networks, observation models, the ELBO, logging and checkpoints.

Berger & Sebag, "Variational Auto-Encoders: Not all failures are equal" (paper.md in the shared folder).

- networks: `EnsembleLinear` and `ResNetMLP` (Sec. 4.1: a ResNet of 4 residual blocks of 200 units) with a
  leading *member* dimension, so that M independent models (seeds, settings) train as one batched computation;
  `MLPVAE`, the Gaussian encoder + decoder built from them; `ConvVAE`, App. B's conv encoder and decoder with
  residual blocks for MNIST and CelebA.
- observation models p(x|z) = N(mean, sigma^2), all parametrised through log sigma, one class each:
  `FixedSigma` (F-VAE), `LearnedScalarSigma` (LS-VAE, Eq. 10), `LearnedPerDimSigma` (LV-VAE, Eq. 11),
  `ScheduledSigma` (App. A.2: a fixed sigma that follows a recorded sigma(t)), `OptimalSigma` (the sigma-VAE of
  Rybkin et al. 2021, sigma^2 = batch MSE). Each turns the decoder output into (mean, log_sigma).
- `gaussian_nll`, `discretized_gaussian_nll`, `gaussian_kl`, `elbo_terms`, `iwae_bound`: in nats, every normalising
  constant included; `bits_per_dim`, `dequantized_bits_per_dim`: the units of the paper's Table 2 and of the literature.
- `CUDAGraphStep`: a whole training step (forward, backward, optimizer) recorded once as a CUDA graph and replayed.
- TensorBoard writer, sigma statistics, atomic checkpoints.
- data: MNIST's IDX files (`load_mnist`, `download_mnist`) and CelebA's JPEGs with a uint8 cache (`load_celeba`).
"""

import gzip
import hashlib
import http.client
import math
import os
import struct
import sys
import textwrap
import time
import urllib.request
import zipfile
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

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


class ResidualBlock(nn.Module):
    """h + conv3x3(relu(conv3x3(relu(h)))), channels and size kept."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h):
        return h + self.conv2(F.relu(self.conv1(F.relu(h))))


class ConvVAE(nn.Module):
    """Conv VAE of App. B: convs then residual blocks in the encoder, the mirror image in the decoder.

    widths[i] channels after conv i, strides[i] in {1, 2} (stride 2: 4x4 kernel halving the size; stride 1: 3x3).
    MNIST: widths (32, 64, 64), strides (2, 2, 1), 4 blocks, latent 256: (B, 1, 28, 28) -> 64 x 7 x 7.
    CelebA: widths (64, 128, 256, 256), strides (2, 2, 2, 2), 5 blocks, latent 2048: (B, 3, 64, 64) -> 256 x 4 x 4.
    The decoder outputs channels * decoder_outputs_per_dim maps (2 for LV-VAE: mean and raw log sigma per pixel).
    """

    def __init__(self, channels, size, widths, strides, blocks, latent_dim, decoder_outputs_per_dim=1):
        super().__init__()
        self.latent_dim = latent_dim
        layers, in_channels = [], channels
        for width, stride in zip(widths, strides):
            layers += [nn.Conv2d(in_channels, width, 4 if stride == 2 else 3, stride, 1), nn.ReLU()]
            in_channels, size = width, size // stride
        layers += [ResidualBlock(in_channels) for _ in range(blocks)] + [nn.ReLU(), nn.Flatten()]
        self.encoder = nn.Sequential(*layers, nn.Linear(in_channels * size * size, 2 * latent_dim))
        self.bottom_shape = (in_channels, size, size)
        layers = [nn.Linear(latent_dim, in_channels * size * size), nn.Unflatten(1, self.bottom_shape)]
        layers += [ResidualBlock(in_channels) for _ in range(blocks)]
        out_widths = list(widths[-2::-1]) + [channels * decoder_outputs_per_dim]
        for width, stride in zip(out_widths, strides[::-1]):
            layers += [nn.ReLU(), nn.ConvTranspose2d(in_channels, width, 4 if stride == 2 else 3, stride, 1)]
            in_channels = width
        self.decoder = nn.Sequential(*layers)

    def encode(self, x):
        """x (B, C, H, W) in [0, 1] -> mu, log_std, each (B, latent_dim), fp32 (also under bf16 autocast: the KL
        and the sample z are computed from them in fp32)."""
        return self.encoder(x).float().chunk(2, dim=-1)

    def decode(self, z):
        """z (B, latent_dim) -> (B, C * decoder_outputs_per_dim, H, W): the mean (and raw log sigma) per pixel.

        The output layer runs in fp32 even under bf16 autocast: bf16 rounds values near 1 to steps of 2**-8 = 0.0039,
        coarser than the smallest sigma a per-pixel model learns (the floor, 0.0025), which would cap the NLL.
        """
        hidden = self.decoder[:-1](z)
        with torch.autocast(hidden.device.type, enabled=False):
            return self.decoder[-1](hidden.float())


# --- observation models ---


def soft_floor(raw_log_sigma, floor=MIN_LOG_SIGMA):
    """log_sigma = floor + softplus(raw - floor): smooth, monotone, >= floor, and ~ raw well above the floor.

    softplus(y) = max(y, 0) + log1p(exp(-|y|)), written out: torch's fused softplus rounds some inputs 1 ulp apart on
    AVX2 and AVX-512 CPUs, which made LV-VAE's trajectories depend on the machine; exp and log1p do not (tested).
    """
    y = raw_log_sigma - floor
    return floor + (F.relu(y) + torch.log1p(torch.exp(-y.abs())))


def inverse_soft_floor(log_sigma, floor=MIN_LOG_SIGMA):
    """The raw value that `soft_floor` maps to log_sigma (> floor): a float, or a tensor elementwise."""
    if torch.is_tensor(log_sigma):
        return floor + torch.log(torch.expm1(log_sigma - floor))
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

    Call `set_step(t)` before each training step; past the end of the schedule the last value is kept. It writes
    log_sigma in place, so that a CUDA graph that reads it sees each step's value.
    """

    def __init__(self, log_sigma_schedule):
        super().__init__(1.0)
        self.register_buffer("schedule", torch.as_tensor(log_sigma_schedule, dtype=torch.float32))
        self.log_sigma = self.schedule[0].clone()

    @torch.no_grad()
    def set_step(self, step):
        self.log_sigma.copy_(self.schedule[min(step, len(self.schedule) - 1)])


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
        return (0.5 * torch.log(self.running_mse)).clamp(min=self.floor)  # the floor is on log sigma, as in forward

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


def discretized_gaussian_nll(x, mean, log_sigma, event_dims=1, levels=256):
    """-log P(pixel) in nats of N(mean, sigma^2) integrated over each pixel's bin, summed over `event_dims` dims.

    x holds pixel / (levels - 1) in [0, 1]; the bin of pixel k is [(k - 1/2), (k + 1/2)] / (levels - 1), with the
    first and last bins stretched to -inf and +inf, so the probabilities of the `levels` values sum to 1 and
    -log P >= 0: the likelihood is bounded and sigma gains nothing below a fraction of a bin.
    """
    half_bin = 0.5 / (levels - 1)
    inv_sigma = torch.exp(-log_sigma)
    upper = torch.where(x > 1 - half_bin, torch.inf, (x + half_bin - mean) * inv_sigma)
    lower = torch.where(x < half_bin, -torch.inf, (x - half_bin - mean) * inv_sigma)
    # log(Phi(upper) - Phi(lower)) without cancellation: use the tail on the side where both are smaller.
    flip = (lower + upper) > 0
    upper, lower = torch.where(flip, -lower, upper), torch.where(flip, -upper, lower)
    log_cdf_upper = torch.special.log_ndtr(upper)
    mass = -torch.expm1(torch.special.log_ndtr(lower) - log_cdf_upper)  # 1 - Phi(lower)/Phi(upper), in (0, 1]
    # A bin far narrower than sigma (sigma >~ 1e4 bins) rounds mass to 0 in float32: use the density at the centre.
    midpoint = -0.5 * ((x - mean) * inv_sigma) ** 2 - HALF_LOG_2PI + torch.log(2 * half_bin * inv_sigma)
    log_prob = torch.where(mass > 1e-6, log_cdf_upper + torch.log(mass.clamp(min=1e-30)), midpoint)
    return -log_prob.sum(dim=tuple(range(-event_dims, 0)))


def elbo_terms(model, obs, x, eps=None, event_dims=1, nll=gaussian_nll):
    """One-sample ELBO of a VAE (`MLPVAE` on (M, B, D), `ConvVAE` on (B, C, H, W)) with observation model `obs`.

    Returns recon_nll, kl, elbo (each of x's batch shape, nats per sample; elbo = -recon_nll - kl) and the decoder's
    (mean, log_sigma). `eps` is the reparametrisation noise, drawn here when None; `nll` the likelihood.
    """
    mu, log_std = model.encode(x)
    if eps is None:
        eps = torch.randn_like(mu)
    z_sample = mu + torch.exp(log_std) * eps
    mean, log_sigma = obs(model.decode(z_sample), x)
    recon_nll = nll(x, mean, log_sigma, event_dims)
    kl = gaussian_kl(mu, log_std)
    return recon_nll, kl, -recon_nll - kl, (mean, log_sigma)


def bits_per_dim(log_density_nats, dims):
    """A log density (or bound) in nats per sample -> bits per dimension, same sign (the paper's Table 2 unit)."""
    return log_density_nats / (dims * math.log(2))


def dequantized_bits_per_dim(log_density_nats, dims, bin_width):
    """Bits per dimension of discrete data from a continuous density p of uniformly dequantized data (lower is better).

    P(pixel) = integral of p over its bin >= bin_width * exp(E log p) (Jensen), so
    -log2 P / dims <= -log2 p / dims - log2(bin_width): 8 bits for a uniform density on [0, 1] with 256 bins.
    """
    return -bits_per_dim(log_density_nats, dims) - math.log2(bin_width)


@torch.no_grad()
def iwae_bound(model, obs, x, k, generator=None, event_dims=1, nll=gaussian_nll, eps=None):
    """k-sample importance-weighted bound (Burda et al. 2016) on log p(x), nats per sample, of x's batch shape.

    log p(x) >= E log (1/k) sum_j p(x|z_j) p(z_j) / q(z_j|x),  z_j ~ q(z|x). k = 1 is the ELBO. The k samples of the
    B points go through the decoder as one batch of k*B (in the batch dimension, the last before the event dims).
    eps: the (..., k, B, L) reparametrisation noise, drawn here from `generator` when None.
    """
    mu, log_std = model.encode(x)  # (..., B, L)
    lead, batch = mu.shape[:-2], mu.shape[-2]
    if eps is None:
        eps = torch.randn(lead + (k,) + mu.shape[-2:], generator=generator, device=x.device)  # (..., k, B, L)
    z_sample = mu.unsqueeze(-3) + torch.exp(log_std).unsqueeze(-3) * eps
    decoder_out = model.decode(z_sample.reshape(lead + (k * batch, mu.shape[-1])))
    event_shape = x.shape[x.ndim - event_dims :]
    x_repeated = x.unsqueeze(len(lead)).expand(lead + (k, batch) + event_shape)
    x_repeated = x_repeated.reshape(lead + (k * batch,) + event_shape)
    mean, log_sigma = obs(decoder_out, x_repeated)
    log_px_z = -nll(x_repeated, mean, log_sigma, event_dims).reshape(lead + (k, batch))
    log_pz = -gaussian_nll(z_sample, torch.zeros(()), torch.zeros(()))
    log_qz_x = -gaussian_nll(eps, torch.zeros(()), torch.zeros(())) - log_std.sum(-1).unsqueeze(-2)
    return torch.logsumexp(log_px_z + log_pz - log_qz_x, dim=-2) - math.log(k)


# --- one training step as one CUDA graph ---


class CUDAGraphStep:
    """step(*inputs) -> tensor(s), run as one CUDA graph: PyTorch's recipe for whole-network capture. For small models
    whose steps are bound by the host launching hundreds of kernels (the 2-D ensembles, MNIST), one replay a step.

    The first `warmup` calls run eagerly on a side stream: real steps, which also create the optimizer's state,
    compile what torch.compile compiles and let cuDNN pick its algorithms. The next call records the step once on
    static copies of its inputs, after before_record() (zero_grad(set_to_none=True): the recorded backward then
    allocates the gradients in the graph's own memory), and replays it: recording runs nothing. Every later call
    copies its inputs into the static ones and replays. What changes between steps must change in place in tensors
    the step reads (an optimizer capturable=True keeps its step counts on the GPU). The returned outputs are then the
    graph's static tensors, overwritten by the next call: copy what must outlive it.
    """

    def __init__(self, step, warmup=3, before_record=lambda: None):
        self.step, self.warmup, self.before_record = step, warmup, before_record
        self.calls, self.graph, self.inputs, self.outputs = 0, None, None, None

    def __call__(self, *inputs):
        self.calls += 1
        if self.calls <= self.warmup:
            return self.warm_up(inputs)
        if self.graph is None:
            self.inputs = [x.clone() for x in inputs]
            self.before_record()
            self.record()
        else:
            for static, x in zip(self.inputs, inputs):
                static.copy_(x)
        self.replay()
        return self.outputs

    # The three steps that touch CUDA (tests/test_common.py replaces them with a CPU stand-in of the same semantics)

    def warm_up(self, inputs):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = self.step(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    def record(self):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.step(*self.inputs)

    def replay(self):
        self.graph.replay()


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


def writable_folder(path, flag):
    """Check now that folder `path` (named by `flag`) is one or can be made, in a folder that can be written, or stop
    with one line: a bad output folder must stop a run before it trains, not when it writes its results. Makes
    nothing."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # the nearest part of the path that exists (a file inside it does not)
        existing = os.path.dirname(existing)
    where = "" if existing == os.path.abspath(path) else f": {existing}"
    if not os.path.isdir(existing):
        raise SystemExit(f"error: {flag} {path}{where} is a file, not a folder; name a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"error: {flag} {path}{where} is not writable; name a folder you can write to")


def write_file_atomically(path, write):
    """Call write(f) on a temporary file next to path, flush it to disk, rename it to path; on failure remove it.

    The rename is atomic: path holds the old file or the new one, never a part of it, even if the process is killed.
    """
    tmp_path = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp_path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def save_figure(fig, path, command):
    """Save a matplotlib figure as PNG with the command that made it, in a footer below it, wrapped to the figure's
    width, and in the PNG's metadata. The saved area is the figure's content (bbox "tight"), so that a long title
    or footer is never cut at the edge."""
    import matplotlib.pyplot as plt

    chars = max(60, int(fig.get_figwidth() * 72 / (6 * 0.6)))  # 6 pt text, ~0.6 em a character
    fig.text(0.01, 0, textwrap.fill(command, chars, break_on_hyphens=False, break_long_words=False), fontsize=6,
             color="gray", va="top")
    fig.savefig(path, dpi=110, metadata={"Description": command}, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


def save_checkpoint(path, state):
    """torch.save to a temporary file in the same folder, flushed to disk, then renamed: never a half-written file."""
    write_file_atomically(path, lambda f: torch.save(state, f))


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint written by `save_checkpoint`; one clear error line if it is missing, damaged or unreadable.

    torch.load does not check the CRC-32 that torch.save stores for every record of its zip file, so a flipped bit
    in a tensor would load silently as a different weight: zipfile checks them first.
    """
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}; check the path given to --resume")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # the first record whose CRC-32 does not match, or None
        if damaged is not None:
            raise ValueError(f"record {damaged} fails its CRC-32 check")
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as error:  # zipfile and torch raise several types for a damaged file
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SystemExit(f"error: checkpoint {path} is corrupt or not a checkpoint ({reason}); start without --resume")


def hardware(device=torch.device("cpu")):
    """One line naming what a run ran on: the GPU, or the CPU model and its thread count; and torch's version."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        models = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")] \
            if os.path.exists("/proc/cpuinfo") else []
        name = f"CPU {models[0] if models else 'unknown'}, {torch.get_num_threads()} threads"
    return f"{name}, torch {torch.__version__}"


def pick_device(name):
    """--device auto|cpu|cuda -> torch.device; asking for cuda without one is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible; use --device cpu or auto")
    return torch.device(name)


# --- data: MNIST and CelebA ---


class DataError(Exception):
    """A missing, corrupt or inconsistent data file. The message is one line that names the file and the fix."""


MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
# sha256 of each file's *decompressed* contents: mirrors re-gzip the files, so the .gz bytes differ, the IDX do not.
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),  # 60,000 images
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),  # 10,000 images
}
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049  # uint8 IDX with 3 dimensions (n, rows, cols) / 1 dimension (n)
GZIP_ERRORS = (OSError, EOFError, zlib.error)  # what gzip raises for a bad header, a cut stream, corrupt data


def read_idx(path, magic):
    """A uint8 IDX file, raw or gzip (name ends in .gz) -> numpy array (n, rows, cols) for magic 2051, (n,) for 2049.

    Checks the big-endian header and that the payload is exactly n * rows * cols bytes.
    """
    fix = "delete it and re-run with --download"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:  # unreadable: permissions, an I/O error
        raise DataError(f"error: cannot read {path} ({error.strerror}); check the file, or {fix}")
    if str(path).endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except GZIP_ERRORS as error:
            raise DataError(f"error: {path} is not a valid gzip file ({error}); {fix}")
    ndim = magic & 0xFF  # the magic's bytes: 0, 0, 0x08 (uint8), number of dimensions
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(f"error: {path} is truncated: {len(data)} bytes, shorter than its header; {fix}")
    found_magic, *shape = struct.unpack(f">{1 + ndim}I", data[:header_size])
    if found_magic != magic:
        raise DataError(f"error: {path} has magic number {found_magic}, expected {magic}; {fix}")
    expected = header_size + math.prod(shape)
    if len(data) < expected:
        raise DataError(f"error: {path} is truncated: {len(data)} of {expected} bytes; {fix}")
    if len(data) > expected:
        raise DataError(f"error: {path} has {len(data) - expected} trailing bytes after its {expected} bytes; {fix}")
    return np.frombuffer(data, np.uint8, offset=header_size).reshape(shape).copy()


def find_mnist_file(data_dir, name):
    """data_dir/name, else data_dir/name.gz; None when neither exists."""
    for path in (os.path.join(data_dir, name), os.path.join(data_dir, f"{name}.gz")):
        if os.path.isfile(path):
            return path
    return None


def load_mnist(data_dir, split, download=False):
    """MNIST images of split "train" (60,000) or "test" (10,000) -> uint8 tensor (N, 1, 28, 28), grey levels 0-255.

    Reads the IDX files in data_dir, raw or gzip (raw first); the labels are checked, not returned. download=True
    fetches missing files first with `download_mnist`.
    """
    if split not in MNIST_FILES:
        raise DataError(f"error: unknown MNIST split {split!r}; use train or test")
    paths = [find_mnist_file(data_dir, name) for name in MNIST_FILES[split]]
    if download and None in paths:
        download_mnist(data_dir)
        paths = [find_mnist_file(data_dir, name) for name in MNIST_FILES[split]]
    for name, path in zip(MNIST_FILES[split], paths):
        if path is None:
            raise DataError(
                f"error: no {os.path.join(data_dir, name)}[.gz]; pass --download, or point --data-dir at the folder"
                " that holds the MNIST files"
            )
    images_path, labels_path = paths
    images = read_idx(images_path, IDX_IMAGES_MAGIC)  # (N, rows, cols)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)  # (N,)
    fix = "delete it and re-run with --download"
    if images.shape[1:] != (28, 28):
        raise DataError(f"error: {images_path} holds {images.shape[1]}x{images.shape[2]} images, not 28x28; {fix}")
    if len(images) == 0:
        raise DataError(f"error: {images_path} holds no images; {fix}")
    if len(labels) != len(images):
        raise DataError(
            f"error: {images_path} has {len(images)} images but {labels_path} has {len(labels)} labels;"
            " delete both and re-run with --download"
        )
    if labels.max(initial=0) > 9:
        raise DataError(f"error: {labels_path} holds label {labels.max()}, not a digit 0-9; {fix}")
    return torch.from_numpy(images).unsqueeze(1)


def gunzip_sha256(data):
    """sha256 hex digest of the decompressed contents of gzip bytes; None when they are not a valid gzip stream."""
    try:
        return hashlib.sha256(gzip.decompress(data)).hexdigest()
    except GZIP_ERRORS:
        return None


def download_mnist(data_dir, base_url=MNIST_URL, checksums=MNIST_SHA256):
    """Fetch each file named in checksums (name.gz -> sha256 of its decompressed contents) from base_url to data_dir.

    A file already there and valid is kept. A download is checked before it is written, atomically, so a failed or
    mismatching one leaves nothing behind and keeps the file already there.
    """
    os.makedirs(data_dir, exist_ok=True)
    for name, sha256 in checksums.items():
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                if gunzip_sha256(f.read()) == sha256:
                    continue
        url = base_url.rstrip("/") + "/" + name
        print(f"mnist: downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
        except (OSError, http.client.HTTPException) as error:  # HTTP errors, refused connections, timeouts, cut replies
            raise DataError(
                f"error: cannot download {url} ({error}); check the connection, or put the MNIST files in {data_dir}"
                " by hand"
            )
        digest = gunzip_sha256(data)
        if digest != sha256:
            found = "is not a valid gzip file" if digest is None else f"has sha256 {digest}"
            raise DataError(
                f"error: {name} from {url} {found} after decompression, expected {sha256}; nothing was written to"
                f" {data_dir}; try again, or put the MNIST files there by hand"
            )
        write_file_atomically(path, lambda f: f.write(data))


CELEBA_SIZE = (178, 218)  # width, height of img_align_celeba's aligned faces
# The usual CelebA-64 crop: a 148x148 box centred on the 178x218 image, (left, top, right, bottom) in pixels.
CELEBA_CROP = (15, 35, 163, 183)
CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}  # the codes of list_eval_partition.txt


def read_celeba_partition(path):
    """list_eval_partition.txt (rows like "000001.jpg 0", CRLF line endings) -> {image file name: split code}."""
    partition = {}
    with open(path, encoding="latin-1") as f:  # text mode reads CRLF as "\n"; latin-1 decodes any byte
        for line_number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:  # a copy may end with a blank line
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise DataError(
                    f"error: {path} line {line_number} reads {line.strip()[:40]!r}, not '<name>.jpg <0|1|2>';"
                    " download list_eval_partition.txt again"
                )
            partition[fields[0]] = int(fields[1])
    return partition


def decode_celeba_jpeg(path, size):
    """An aligned CelebA JPEG (178x218, or any size of that aspect ratio) -> uint8 (3, size, size) and its (w, h).

    The CELEBA_CROP box, scaled by width / 178, resized with Pillow's antialiased BICUBIC filter.
    """
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")  # decodes the whole file, so a cut or corrupt one fails here
    except Exception as error:  # Pillow raises several types for a broken file
        raise DataError(f"error: cannot decode {path} ({error}); delete it or download it again")
    width, height = image.size
    if width * CELEBA_SIZE[1] != height * CELEBA_SIZE[0]:
        raise DataError(
            f"error: {path} is {width}x{height}, not 178x218 nor that aspect ratio; it is not an aligned CelebA image,"
            " delete it or download it again"
        )
    box = tuple(corner * width / CELEBA_SIZE[0] for corner in CELEBA_CROP)  # Pillow takes a fractional box
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return np.asarray(image).transpose(2, 0, 1), (width, height)  # (3, size, size)


def read_celeba_cache(path, fingerprint, split):
    """The split's images from a cache written by `load_celeba`; None when it is absent, damaged or stale."""
    try:
        with np.load(path) as cache:
            if str(cache["fingerprint"]) != fingerprint:
                return None
            return cache[split]
    except Exception:  # numpy and zipfile raise several types for a missing or damaged file: rebuild it
        return None


def load_celeba(data_dir, split, size=64, images_dir=None, cache_dir=None, return_names=False):
    """CelebA images of split "train", "valid" or "test" -> uint8 tensor (N, 3, size, size), RGB 0-255.

    Reads CelebA's layout: data_dir/img_align_celeba/*.jpg (178x218) and data_dir/list_eval_partition.txt, and takes
    the images present, in name order. Each is cropped to the centred 148x148 box (15, 35, 163, 183) and resized to
    size x size with Pillow's BICUBIC. images_dir: another folder (relative to data_dir, or absolute) of images of
    the same aspect ratio, e.g. img_align_celeba_89x109; the box is scaled by width / 178. The JPEGs are decoded once
    into cache_dir (default data_dir)/celeba_<folder>_<size>.npz, rebuilt when the files, the crop or size change.
    return_names: also return the images' file names, in the tensor's order.
    """
    if split not in CELEBA_SPLITS:
        raise DataError(f"error: unknown CelebA split {split!r}; use train, valid or test")
    images_dir = os.path.join(data_dir, images_dir or "img_align_celeba")
    partition_path = os.path.join(data_dir, "list_eval_partition.txt")
    for path, kind in ((images_dir, "image folder"), (partition_path, "split file")):
        if not os.path.exists(path):
            raise DataError(
                f"error: no CelebA {kind} {path}; point --data-dir at the folder that holds img_align_celeba/ and"
                " list_eval_partition.txt"
            )
    partition = read_celeba_partition(partition_path)
    entries = sorted((entry for entry in os.scandir(images_dir) if entry.name.endswith(".jpg")), key=lambda e: e.name)
    names = {name: [e.name for e in entries if partition.get(e.name) == code] for name, code in CELEBA_SPLITS.items()}
    found = ", ".join(f"{len(names[name])} {name}" for name in CELEBA_SPLITS)
    if not names[split]:
        raise DataError(
            f"error: none of the {split} images of {partition_path} is in {images_dir} (found {found}); add them,"
            " or use another split or folder"
        )
    # The cache is stale when any image, the split file, the crop or the size changes.
    partition_stat = os.stat(partition_path)
    files = [(e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries]
    key = (files, partition_stat.st_size, partition_stat.st_mtime_ns, CELEBA_CROP, "bicubic", size)
    fingerprint = hashlib.sha256(repr(key).encode()).hexdigest()
    cache_dir = data_dir if cache_dir is None else cache_dir
    cache_path = os.path.join(cache_dir, f"celeba_{os.path.basename(os.path.normpath(images_dir))}_{size}.npz")

    images = read_celeba_cache(cache_path, fingerprint, split)
    action = "read from" if images is not None else f"decoding {sum(map(len, names.values()))} JPEGs once into"
    print(f"celeba: found {found} images in {images_dir}; {action} {cache_path}")
    if images is not None:
        return (torch.from_numpy(images), names[split]) if return_names else torch.from_numpy(images)

    arrays = {name: np.empty((len(names[name]), 3, size, size), np.uint8) for name in CELEBA_SPLITS}
    first = None  # (path, (width, height)) of the first image: every other must have its size
    for name in CELEBA_SPLITS:
        for i, file_name in enumerate(names[name]):
            path = os.path.join(images_dir, file_name)
            arrays[name][i], image_size = decode_celeba_jpeg(path, size)
            first = first or (path, image_size)
            if image_size != first[1]:
                raise DataError(
                    f"error: {path} is {image_size[0]}x{image_size[1]} but {first[0]} is {first[1][0]}x{first[1][1]};"
                    " the images of one folder must have one size, delete or replace the odd one"
                )
    try:
        os.makedirs(cache_dir, exist_ok=True)
        write_file_atomically(cache_path, lambda f: np.savez(f, fingerprint=fingerprint, **arrays))
    except OSError as error:  # a read-only data folder: work on, without the cache
        print(f"celeba: cannot write the cache {cache_path} ({error}); continuing without it")
    return (torch.from_numpy(arrays[split]), names[split]) if return_names else torch.from_numpy(arrays[split])
