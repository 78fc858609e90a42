"""The artificial 2-D experiment (Sec. 4.1-4.2 and App. A): Table 1 and Figs. 3, 4, 6, 7, 8, 9, 10, and our Fig. 11.

Data (Fig. 3; the paper gives no formula, this one is fixed here): a 1-D manifold in R^2 with three noise regions,
    u ~ U(-1, 1),   x = (2u, sin(pi u)) + s(u) * n,   n ~ N(0, I_2),
    s(u) = 0.05 (moderate) for u < -1/3,  0.01 (small) for -1/3 <= u < 1/3,  0.1 (large) for u >= 1/3.
`--data circle` (radius 1, angle pi u, radial noise 0.01 / 0.05 / 0.1 on thirds of the angle) and `--data spiral`
(1.25 turns, radius 0.5 -> 1.5, the sine's noise regions) are ours, not the paper's. Every batch of 100 points is drawn
anew (the large-sample limit). The true log-density of the data is computed (quadrature over u, closed form for the
circle) as the ceiling no ELBO can pass.

Settings (Table 1): F-VAE with fixed sigma, LS-VAE (learned scalar sigma, Eq. 10), LV-VAE (learned per-dimension
sigma(z), Eq. 11), F*-VAE (sigma fixed at the final sigma of LS-VAE with the same seed), F-sched (App. A.2: a fixed
sigma that replays LS-VAE's recorded sigma(t), from another initialisation and data stream), and two rows the paper
does not have: the sigma-VAE of Rybkin et al. (sigma^2 = batch MSE), and LV-VAE with a warm start (ours: trained as
LS-VAE, or as sigma-VAE, for --lv-warmup steps, then handed over to the per-dimension sigma(z) head; see
WarmStartSigma). All seeds of all settings of a phase train as one batched ensemble (common.MLPVAE); members with the
same seed share initial weights, data batches and reparametrisation noise, so the settings differ only in their
observation model.

    python train_2d.py                                # quick preset: small nets, 3 seeds, a few minutes on a CPU
    python train_2d.py --preset paper --device cuda   # the paper's protocol: 10 seeds, 200-unit ResNets
    python train_2d.py --settings LS LV LVwarm --seeds 2 --steps 2000 --data circle --out results/2d_try
"""

import argparse
import math
import os
import re
import signal
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from common import (
    CUDAGraphStep,
    FixedSigma,
    LearnedPerDimSigma,
    LearnedScalarSigma,
    MIN_LOG_SIGMA,
    MLPVAE,
    OptimalSigma,
    ScheduledSigma,
    elbo_terms,
    hardware,
    inverse_soft_floor,
    iwae_bound,
    log_sigma_stats,
    make_writer,
    pick_device,
    run_name,
    save_figure,
    soft_floor,
    writable_folder,
)

PRESETS = {  # steps, seeds, hidden units; the paper: ResNets of 4 blocks of 200 units, 10 runs per setting
    "quick": dict(steps=4000, seeds=3, hidden=64),
    "paper": dict(steps=20000, seeds=10, hidden=200),
}
# The paper's Table 1 (ELBO, mean +- std over 10 runs), quoted to stand beside our numbers, never among them.
PAPER_TABLE1 = {
    "F-VAE sigma=1": "-1.14 ± 0.02",
    "F-VAE sigma=0.3": "-0.063 ± 0.03",
    "F-VAE sigma=0.1": "0.773 ± 0.09",
    "F-VAE sigma=0.043": "0.335 ± 0.08",
    "F-VAE sigma=0.03": "0.141 ± 0.10",
    "F-VAE sigma=0.01": "-0.961 ± 0.12",
    "LS-VAE": "1.26 ± 0.09 (sigma* = 0.043)",
    "LV-VAE": "1.62 ± 0.08",
    "LV-VAE, warm start": "not in the paper (ours)",
    "LV-VAE, warm start (sigma-VAE)": "not in the paper (ours)",
    "F*-VAE": "below F-VAE sigma=0.1 (text, Sec. 4.2)",
    "F-sched": "same as LS-VAE (text, App. A.2)",
}
SETTINGS = ["F", "LS", "LV", "LVwarm", "LVwarmopt", "Fstar", "Fsched", "optimal"]
WARM_ROWS = {"LVwarm": ("LV-VAE, warm start", "learned-scalar"),  # setting: (row, the warm phase's scalar sigma)
             "LVwarmopt": ("LV-VAE, warm start (sigma-VAE)", "optimal")}
DATASETS = ["sine", "circle", "spiral"]

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("--preset", choices=PRESETS, default="quick",
                    help="quick: %(quick)s (default); paper: %(paper)s. --steps/--seeds/--hidden override quick only"
                    % {k: ", ".join(f"{a}={b}" for a, b in v.items()) for k, v in PRESETS.items()})
parser.add_argument("--steps", type=int, help="training steps (batches) per phase; default from --preset")
parser.add_argument("--seeds", type=int, help="runs per setting, seeds --seed ... --seed+N-1; default from --preset")
parser.add_argument("--hidden", type=int, help="units per layer of the encoder and decoder ResNets; from --preset")
parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=SETTINGS,
                    help="which rows of Table 1 to train (default: all). Fstar and Fsched need LS; LVwarm is LV-VAE "
                         "with a warm start as LS-VAE, LVwarmopt with one as sigma-VAE (ours)")
parser.add_argument("--data", choices=DATASETS, default="sine",
                    help="sine: the paper's Fig. 3 shape (default); circle and spiral: ours (see the docstring)")
parser.add_argument("--lv-warmup", type=int, default=1000,
                    help="LVwarm, LVwarmopt: steps trained as LS-VAE (sigma-VAE) before the hand-over to the "
                         "per-dimension sigma(z) head (default 1000)")
parser.add_argument("--lv-handover", choices=["fixed", "settled"], default="fixed",
                    help="LVwarm, LVwarmopt: hand over after --lv-warmup steps (fixed, default), or per seed once the "
                         "warm phase's reconstruction NLL and KL have settled (see SETTLE_WINDOW)")
parser.add_argument("--fixed-sigmas", type=float, nargs="+", default=[1.0, 0.3, 0.1, 0.043, 0.03, 0.01],
                    help="sigma values of the F-VAE rows (default: the paper's 1 0.3 0.1 0.043 0.03 0.01)")
parser.add_argument("--blocks", type=int, default=4, help="residual blocks per ResNet (default 4, the paper's)")
parser.add_argument("--latent-dim", type=int, default=2, help="latent dimension (default 2)")
parser.add_argument("--batch-size", type=int, default=100, help="points per batch, drawn anew (default 100, paper's)")
parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
parser.add_argument("--eval-points", type=int, default=10000, help="fresh points for the final ELBO (default 10000)")
parser.add_argument("--iwae-k", type=int, default=100, help="importance samples of the IWAE bound (default 100)")
parser.add_argument("--iwae-points", type=int, default=1000,
                    help="how many of the eval points the IWAE-k bound uses (default 1000)")
parser.add_argument("--log-every", type=int, default=20, help="steps between recorded/logged losses (default 20)")
parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto: cuda if present")
parser.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                    help="on a GPU, replay each ensemble's whole training step (forward, backward, Adam) as one CUDA "
                         "graph: the tiny networks are bound by kernel launches (default auto: on with CUDA)")
parser.add_argument("--out", help="folder for table1.md and the figures (default results/2d/<preset>[_<data>])")
parser.add_argument("--logdir", default="runs", help="TensorBoard folder (default runs)")


def parse_args(argv=None):
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.preset == "paper" and any(getattr(args, key) is not None for key in preset):
        parser.error("--preset paper fixes --steps, --seeds and --hidden; drop them, or drop --preset paper")
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or f"results/2d/{args.preset}" + ("" if args.data == "sine" else f"_{args.data}")
    if ("Fstar" in args.settings or "Fsched" in args.settings) and "LS" not in args.settings:
        parser.error("Fstar and Fsched follow LS-VAE's learned sigma: add LS to --settings")
    if "F" in args.settings and not all(sigma > 0 for sigma in args.fixed_sigmas):
        parser.error("--fixed-sigmas must all be > 0")
    for key in ["steps", "seeds", "hidden", "blocks", "latent_dim", "batch_size", "eval_points", "iwae_k",
                "iwae_points", "log_every", "lv_warmup"]:
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    warm = [setting for setting in WARM_ROWS if setting in args.settings]
    if warm and args.lv_handover == "fixed" and args.lv_warmup >= args.steps:
        parser.error(f"--lv-warmup ({args.lv_warmup}) must be below --steps ({args.steps}): the warm start needs steps "
                     f"after its hand-over; lower --lv-warmup or drop {' and '.join(warm)} from --settings")
    if args.iwae_points > args.eval_points:
        parser.error("--iwae-points cannot exceed --eval-points (it uses the first of those points)")
    if args.lr <= 0:
        parser.error("--lr must be > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible; use --device cpu or auto")
    if args.cuda_graphs == "on" and (args.device == "cpu" or not torch.cuda.is_available()):
        parser.error("--cuda-graphs on needs a CUDA device; use --cuda-graphs auto or off")
    return args


# --- data ---

# Noise level s(u) on thirds of u: u < -1/3, -1/3 <= u < 1/3, u >= 1/3.
NOISE_EDGES = (-1 / 3, 1 / 3)
NOISE_LEVELS = {"sine": (0.05, 0.01, 0.1), "circle": (0.01, 0.05, 0.1), "spiral": (0.05, 0.01, 0.1)}


def manifold(u, data="sine"):
    """The noise-free curve c(u): u (...) in [-1, 1] -> (..., 2)."""
    if data == "sine":
        return torch.stack([2 * u, torch.sin(math.pi * u)], dim=-1)
    if data == "circle":  # radius R = 1, angle pi u: uniform on the circle
        return torch.stack([torch.cos(math.pi * u), torch.sin(math.pi * u)], dim=-1)
    angle, radius = 1.25 * math.pi * (u + 1), 1 + 0.5 * u  # spiral: 1.25 turns, 0.8 apart, radius 0.5 -> 1.5
    return radius[..., None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)


def noise_level(u, data="sine"):
    low, middle, high = NOISE_LEVELS[data]
    return torch.where(u < NOISE_EDGES[0], low, torch.where(u < NOISE_EDGES[1], middle, high))


def sample_data(n, generator, data="sine", return_u=False):
    """n points of the 2-D dataset (docstring) -> (n, 2); two draws from `generator`: u, then the noise."""
    u = torch.rand(n, generator=generator) * 2 - 1
    noise = torch.randn(n, 2, generator=generator)
    if data == "circle":  # radial noise: x = (1 + s(u) n_1) c(u)
        x = manifold(u, data) * (1 + noise_level(u, data)[:, None] * noise[:, :1])
    else:  # isotropic noise: x = c(u) + s(u) n
        x = manifold(u, data) + noise_level(u, data)[:, None] * noise
    return (x, u) if return_u else x


@torch.no_grad()
def data_log_density(x, data="sine", grid=20000, chunk=500):
    """log p_data(x) in nats, x (N, 2) -> (N,). Circle: closed form; sine, spiral: quadrature over u (midpoint rule)."""
    x = x.double().cpu()
    if data == "circle":
        # x = r (cos theta, sin theta), theta ~ U(-pi, pi), r ~ N(1, s^2): p(x) = p(theta) p(r | theta) / r
        r, u = x.norm(dim=1), torch.atan2(x[:, 1], x[:, 0]) / math.pi
        s = noise_level(u, data).double()
        return (-math.log(2 * math.pi) - torch.log(r) - 0.5 * ((r - 1) / s) ** 2 - torch.log(s)
                - 0.5 * math.log(2 * math.pi)).float()
    # log p(x) = log int_{-1}^{1} 1/2 N(x; c(u), s(u)^2 I) du
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid * 2 - 1
    centre, sigma = manifold(u, data), noise_level(u, data)
    out = []
    for x_chunk in x.split(chunk):
        sq = ((x_chunk[:, None, :] - centre[None]) ** 2).sum(-1)  # (chunk, grid)
        log_normal = -0.5 * sq / sigma**2 - 2 * torch.log(sigma) - math.log(2 * math.pi)
        out.append(torch.logsumexp(log_normal, dim=1) + math.log(2 / grid) - math.log(2))
    return torch.cat(out).float()


def draw_batches(generators, steps, args, device):
    """The next `steps` batches and reparametrisation noises of every seed: (steps, S, B, 2), (steps, S, B, L).

    Drawn on the CPU in the order of one step at a time (seed s: its batch, then its noise), so the numbers depend
    neither on the chunk length nor on the device; moved in one copy per chunk, so the loop never waits on the host.
    """
    x = torch.empty(steps, len(generators), args.batch_size, 2)
    eps = torch.empty(steps, len(generators), args.batch_size, args.latent_dim)
    for t in range(steps):
        for s, generator in enumerate(generators):
            x[t, s] = sample_data(args.batch_size, generator, args.data)
            eps[t, s] = torch.randn(args.batch_size, args.latent_dim, generator=generator)
    if device.type == "cuda":
        x, eps = x.pin_memory(), eps.pin_memory()
    return x.to(device, non_blocking=True), eps.to(device, non_blocking=True)


# --- ensembles: every seed of every setting of a phase, trained as one batched model ---

CHUNK_STEPS = 250  # batches drawn per copy to the device; also how often the host reads the NaN record
GRAPH_WARMUP_STEPS = 3  # --cuda-graphs: eager steps before the step is recorded (the PyTorch docs' recipe)
FOLD_PROBE_EVERY = 5  # steps between two looks at what the LV rows' latent encodes, until --lv-warmup + 500
SIGNALS = []  # SIGINT or SIGTERM received: training stops after its step, and what it trained is evaluated and written
# --lv-handover settled: every SETTLE_WINDOW steps, a warm-start member hands over once the running averages (time
# constant SETTLE_AVERAGE steps) of its training reconstruction NLL and KL have both moved by less than SETTLE_TOLERANCE
# nats per point over the window (first look at step 2 x SETTLE_WINDOW + 1). Chosen once, before any run: a window of a
# few hundred steps, a tolerance far below the differences between rows in Table 1 and above the averages' noise.
SETTLE_WINDOW, SETTLE_AVERAGE, SETTLE_TOLERANCE = 250, 100, 0.02


class WarmStartSigma(nn.Module):
    """LV-VAE with a warm start (ours, not the paper's): an LS-VAE (or sigma-VAE) until the hand-over, then LV-VAE's
    sigma(z).

    The decoder outputs (mean, raw log sigma) per dimension, as for LV-VAE (Eq. 11), but until a member hands over
    its log sigma is one scalar and the raw log sigma head is ignored: its gradient is exactly zero, so Adam leaves its
    weights and moments untouched. The scalar (`warm`): LS-VAE's, learned from sigma = 1 (Eq. 10), or sigma-VAE's,
    sigma^2 = the batch's MSE. `hand_over` sets the head's weights to 0 and its bias to the scalar's raw log sigma
    (sigma-VAE: that of its running MSE, momentum 0.99, i.e. about the last 100 batches'), so that soft_floor(head) =
    the scalar's log sigma for every z: the model is the same just before and after, and for LS-VAE its ELBO too (for
    sigma-VAE up to the batch's MSE against the running one). What changes is where the sigma terms' gradient goes:
    through the head into the decoder and, through z, into the encoder. Why (the fold of LV-VAE from scratch): README.

    Adam's step count is one per weight tensor, shared with the rest of the layer, so the head's fresh moments get
    almost no bias correction after the hand-over: under a steady gradient its updates reach ~5 lr some ten steps
    after it and fall back to ~lr over the next ~1,000 steps (a head trained from scratch moves by ~lr throughout).
    """

    decoder_outputs_per_dim = 2

    def __init__(self, members, floor=MIN_LOG_SIGMA, warm="learned-scalar"):
        super().__init__()
        self.floor = floor
        self.scalar = LearnedScalarSigma((members, 1, 1), floor=floor) if warm == "learned-scalar" else \
            OptimalSigma((members, 1, 1), floor=floor)  # the warm phase
        self.register_buffer("handed_over", torch.zeros(members, 1, 1, dtype=torch.bool))
        self.register_buffer("handover_step", torch.full((members,), -1, dtype=torch.long))
        # --lv-handover settled: running averages of (reconstruction NLL, KL), now and one window ago
        self.register_buffer("loss_average", torch.zeros(members, 2))
        self.register_buffer("loss_average_before", torch.full((members, 2), math.inf))

    def forward(self, decoder_out, x=None):
        mean, raw_log_sigma = decoder_out.chunk(2, dim=-1)
        per_dim = soft_floor(raw_log_sigma, self.floor)  # Eq. 11, after the hand-over
        return mean, torch.where(self.handed_over, per_dim, self.scalar(mean, x)[1])  # Eq. 10 (or sigma-VAE) before

    @torch.no_grad()
    def hand_over(self, head_weight, head_bias, step, now=None):
        """Members where `now` (members, 1, 1) is true (all when None) switch to the per-dimension head, once.

        head_weight (members, hidden, D) and head_bias (members, 1, D): views of the log sigma half of the decoder's
        output layer, set in place to 0 and to the scalar's raw log sigma.
        """
        now = (torch.ones_like(self.handed_over) if now is None else now) & ~self.handed_over
        if isinstance(self.scalar, LearnedScalarSigma):
            raw = self.scalar.raw_log_sigma
        else:  # sigma-VAE's log sigma is clamped at the floor, where the soft floor has no inverse
            raw = inverse_soft_floor(self.scalar.log_sigma.clamp(min=self.floor + 1e-3), self.floor)
        head_weight.copy_(torch.where(now, torch.zeros_like(head_weight), head_weight))
        head_bias.copy_(torch.where(now, raw.expand_as(head_bias), head_bias))
        self.handed_over |= now
        self.handover_step.copy_(torch.where(now.reshape(-1), step, self.handover_step))

    @torch.no_grad()
    def track(self, recon_nll, kl, step):
        """Running averages of each member's training reconstruction NLL and KL (members,), nats per point."""
        value = torch.stack([recon_nll, kl], dim=-1)
        decay = 0.0 if step == 1 else 1 - 1 / SETTLE_AVERAGE
        self.loss_average.mul_(decay).add_((1 - decay) * value)

    @torch.no_grad()
    def settled(self):
        """(members, 1, 1): both running averages moved by less than SETTLE_TOLERANCE since the last call."""
        moved = (self.loss_average - self.loss_average_before).abs().amax(dim=-1)
        self.loss_average_before.copy_(self.loss_average)
        return (moved < SETTLE_TOLERANCE)[:, None, None]


class StackedObservation(nn.Module):
    """Observation models of consecutive member groups, applied to their slices of the ensemble's decoder output.

    The decoder has as many outputs per data dimension as the widest model needs (2 with an LV row: mean and raw log
    sigma); a model that needs fewer reads the first ones, and the others get exactly zero gradient.
    """

    def __init__(self, groups):
        super().__init__()
        self.names = [name for name, _ in groups]
        self.models = nn.ModuleList(obs for _, obs in groups)

    def forward(self, decoder_out, x):
        sizes = [decoder_out.shape[0] // len(self.models)] * len(self.models)
        means, log_sigmas = [], []
        for obs, out_part, x_part in zip(self.models, decoder_out.split(sizes), x.split(sizes)):
            mean, log_sigma = obs(out_part[..., : x.shape[-1] * obs.decoder_outputs_per_dim], x_part)
            means.append(mean)
            log_sigmas.append(log_sigma.expand_as(mean))
        return torch.cat(means), torch.cat(log_sigmas)


class Ensemble:
    """One MLPVAE holding len(groups) x len(seeds) members, group-major, with its observation models and optimizer."""

    def __init__(self, groups, seeds, args, device):
        self.names, self.seeds = [name for name, _ in groups], seeds
        self.obs = StackedObservation(groups).to(device)
        out_dim = 2 * max(obs.decoder_outputs_per_dim for _, obs in groups)
        self.model = MLPVAE(seeds * len(groups), 2, args.latent_dim, out_dim, args.hidden, args.blocks).to(device)
        on_gpu = torch.device(device).type == "cuda"
        # capturable (step counts read on the GPU) on every GPU run, graphed or not: the same Adam arithmetic in both
        self.optimizer = torch.optim.Adam(list(self.model.parameters()) + list(self.obs.parameters()), lr=args.lr,
                                          fused=True, capturable=on_gpu)
        # NaN guard without a host sync: each step's loss per member stays on the device until check_finite reads it
        self.chunk_losses = torch.zeros(CHUNK_STEPS, len(self.names) * len(seeds), device=device)
        # --cuda-graphs: the whole step as one CUDA graph (common.CUDAGraphStep); None: eager steps
        self.graphed_step = CUDAGraphStep(self.step_terms, GRAPH_WARMUP_STEPS,
                                          lambda: self.optimizer.zero_grad(set_to_none=True)) \
            if on_gpu and args.cuda_graphs != "off" else None
        self.steps_trained = 0  # set by train(): fewer than --steps if a signal stopped it

    def group(self, name):
        return self.obs.models[self.names.index(name)]

    def per_group(self, values):
        """(M, ...) -> {setting name: (seeds, ...)}."""
        return dict(zip(self.names, values.reshape(len(self.names), len(self.seeds), *values.shape[1:])))

    def hand_over(self, name, step, now=None):
        """The warm start `name` hands over to its per-dimension sigma head (WarmStartSigma.hand_over)."""
        first = self.names.index(name) * len(self.seeds)
        rows, output = slice(first, first + len(self.seeds)), self.model.decoder.output
        dim = output.weight.shape[-1] // 2  # the decoder's outputs: D means, then D raw log sigmas
        self.group(name).hand_over(output.weight[rows, :, dim:], output.bias[rows, :, dim:], step, now)

    def before_step(self, step, args):
        for name, obs in zip(self.names, self.obs.models):
            if isinstance(obs, ScheduledSigma):
                obs.set_step(step - 1)
            if isinstance(obs, WarmStartSigma) and args.lv_handover == "fixed" and step == args.lv_warmup + 1:
                self.hand_over(name, step)
            if isinstance(obs, WarmStartSigma) and args.lv_handover == "settled" and step > SETTLE_WINDOW \
                    and step % SETTLE_WINDOW == 1:
                self.hand_over(name, step, obs.settled())

    def after_step(self, recon_nll, kl, step, args):
        """--lv-handover settled: the warm start's members follow their own losses (recon_nll, kl: (M, B))."""
        for name, obs in zip(self.names, self.obs.models):
            if isinstance(obs, WarmStartSigma) and args.lv_handover == "settled":
                recon_per_group, kl_per_group = self.per_group(recon_nll.mean(1)), self.per_group(kl.mean(1))
                obs.track(recon_per_group[name], kl_per_group[name], step)

    def step_terms(self, x_seeds, eps_seeds):
        """One Adam step of every member on its seed's batch (S, B, 2) and noise (S, B, L): the ELBO terms
        (recon_nll, kl, elbo, log_sigma) and the loss per member, detached. What a CUDA graph records."""
        repeat = len(self.names)
        recon_nll, kl, elbo, (_, log_sigma) = elbo_terms(
            self.model, self.obs, x_seeds.repeat(repeat, 1, 1), eps_seeds.repeat(repeat, 1, 1))
        loss_per_member = -elbo.mean(1)  # (M,) nats per point
        self.optimizer.zero_grad(set_to_none=True)
        # Members are independent: d(sum of losses)/d(member m's weights) = d(loss_m)/d(member m's weights).
        loss_per_member.sum().backward()
        self.optimizer.step()
        return [t.detach() for t in (recon_nll, kl, elbo, log_sigma, loss_per_member)]

    def train_step(self, x_seeds, eps_seeds, step):
        """step_terms, eagerly or (--cuda-graphs) replayed as one CUDA graph, whose outputs the next step overwrites:
        copy what must outlive the step. What acts between steps (hand-over, F-sched's sigma, the NaN record) writes
        in place into tensors the step reads, so eager and graphed steps compute the same."""
        step_fn = self.graphed_step or self.step_terms
        *terms, loss_per_member = step_fn(x_seeds, eps_seeds)
        self.chunk_losses[(step - 1) % CHUNK_STEPS] = loss_per_member
        return terms

    def check_finite(self, first_step, steps, args):
        """After steps first_step .. first_step + steps - 1: stop with one line naming the step, the row and the seed
        of the first non-finite loss. The one host sync of the loop."""
        bad = ~torch.isfinite(self.chunk_losses[:steps])
        if bad.any():
            row, member = bad.nonzero()[0].tolist()
            step = first_step + row
            name, seed = self.names[member // len(self.seeds)], self.seeds[member % len(self.seeds)]
            raise SystemExit(f"error: non-finite loss at step {step} in {name} (seed {seed}); "
                             f"lower --lr (now {args.lr}) or raise the smallest fixed sigma")


def ranks(values):
    """Ranks along the last dimension, as floats: Spearman's correlation is Pearson's correlation of ranks."""
    return values.argsort(-1).argsort(-1).float()


@torch.no_grad()
def fold_measure(model, probe_x, probe_ranks):
    """What each member's main latent encodes: |Spearman correlation| of its encoder mean's coordinate of largest
    variance over the P probe points with each of the K rows of probe_ranks (K, P), e.g. u and x2. -> (M, K)."""
    members = model.encoder.input.weight.shape[0]
    mu, _ = model.encode(probe_x.expand(members, -1, -1))  # (M, P, L)
    main = mu.gather(-1, mu.var(1).argmax(-1)[:, None, None].expand(-1, mu.shape[1], 1)).squeeze(-1)  # (M, P)
    a = ranks(main) - (len(probe_x) - 1) / 2
    b = probe_ranks - (len(probe_x) - 1) / 2
    return (a @ b.T / (a.norm(dim=-1)[:, None] * b.norm(dim=-1)[None])).abs()


def train(ensembles, data_seeds, args, device, phase):
    """Train the ensembles side by side; returns the recorded history {setting: {quantity: (records, seeds, ...)}}
    and LS-VAE's log sigma at every step (steps, seeds), or None.

    data_seeds[i]: the seed of the i-th member of every group. Each step, seed s's generator draws the batch and the
    reparametrisation noise of every member with seed s: the same stream a model trained alone with seed s sees.
    Nothing in the loop waits for the device but the NaN check, once per CHUNK_STEPS steps.
    """
    device = torch.device(device)
    generators = [torch.Generator().manual_seed(int(seed)) for seed in data_seeds]
    history = {name: {key: [] for key in ["step", "recon_nll", "kl", "elbo", "log_sigma"]}
               for ens in ensembles for name in ens.names}
    lv_log_sigma = {name: [] for ens in ensembles for name in ens.names if name.startswith("LV-VAE")}
    fold = {name: {"step": [], "corr": []} for name in lv_log_sigma}
    # What the LV rows' main latent encodes, on fixed points: ranks of u and of x2 (Fig. 11)
    probe_x, probe_u = sample_data(500, torch.Generator().manual_seed(2**31 - 2), args.data, return_u=True)
    probe_x, probe_ranks = probe_x.to(device), ranks(torch.stack([probe_u, probe_x[:, 1]])).to(device)
    has_ls = any("LS-VAE" in ens.names for ens in ensembles)
    ls_log_sigma = torch.zeros(args.steps, len(data_seeds), device=device) if has_ls else None
    progress = tqdm(range(1, args.steps + 1), desc=phase, mininterval=2, unit="step", file=sys.stdout)
    steps_done = args.steps
    for step in progress:
        if SIGNALS:  # a stop was asked for: end here, with what the steps so far trained
            steps_done = step - 1
            progress.close()
            break
        if (step - 1) % CHUNK_STEPS == 0:
            for ens in ensembles:
                ens.check_finite(step - CHUNK_STEPS, CHUNK_STEPS if step > 1 else 0, args)
            x_chunk, eps_chunk = draw_batches(generators, min(CHUNK_STEPS, args.steps - step + 1), args, device)
        x_seeds, eps_seeds = x_chunk[(step - 1) % CHUNK_STEPS], eps_chunk[(step - 1) % CHUNK_STEPS]  # (S, B, 2|L)
        record = step % args.log_every == 0 or step == args.steps
        probe = step % FOLD_PROBE_EVERY == 0 and step <= args.lv_warmup + 500 or record
        for ens in ensembles:
            ens.before_step(step, args)
            recon_nll, kl, elbo, log_sigma = ens.train_step(x_seeds, eps_seeds, step)
            ens.after_step(recon_nll, kl, step, args)
            if "LS-VAE" in ens.names:  # the sigma this step's loss used: the schedule F-sched replays
                ls_log_sigma[step - 1] = ens.per_group(log_sigma.detach())["LS-VAE"][:, 0, 0]
            if record:  # kept on the device until the end of training
                values = dict(recon_nll=recon_nll.mean(1), kl=kl.mean(1), elbo=elbo.mean(1),
                              log_sigma=log_sigma.mean(dim=(1, 2)))
                for key, value in values.items():
                    for name, per_seed in ens.per_group(value.detach()).items():
                        history[name][key].append(per_seed)
                for name, per_seed in ens.per_group(log_sigma).items():
                    history[name]["step"].append(step)
                    if name in lv_log_sigma:
                        lv_log_sigma[name].append(per_seed.clone())  # a CUDA graph's output is overwritten
            if probe and any(name in fold for name in ens.names):
                for name, corr in ens.per_group(fold_measure(ens.model, probe_x, probe_ranks)).items():
                    if name in fold:
                        fold[name]["step"].append(step)
                        fold[name]["corr"].append(corr)
    if not next(iter(history.values()))["step"]:
        raise SystemExit(f"train_2d: stopped at step {steps_done} of {phase}, before the first record (every "
                         f"--log-every {args.log_every} steps); nothing written")
    last_chunk = (steps_done - 1) % CHUNK_STEPS + 1
    for ens in ensembles:
        ens.check_finite(steps_done - last_chunk + 1, last_chunk, args)
        ens.steps_trained = steps_done
    history = {name: {key: np.array(v) if key == "step" else torch.stack(v).cpu().numpy() for key, v in h.items()}
               for name, h in history.items()}
    for name, f in fold.items():
        history[name]["fold_step"], history[name]["fold"] = np.array(f["step"]), torch.stack(f["corr"]).cpu().numpy()
    for ens in ensembles:
        for name, obs in zip(ens.names, ens.obs.models):
            if isinstance(obs, WarmStartSigma):  # -1: never handed over
                history[name]["handover_step"] = obs.handover_step.cpu().numpy()
    write_tensorboard(history, {name: torch.stack(v).cpu() for name, v in lv_log_sigma.items()}, data_seeds, args)
    return history, (ls_log_sigma[:steps_done].cpu() if has_ls else None)


def write_tensorboard(history, lv_log_sigma, data_seeds, args):
    """One TensorBoard run per setting: the recorded ELBO terms, and sigma (per-dimension sigma: statistics)."""
    for name, h in history.items():
        setting = re.sub(r"[ ,]+", "_", name)
        writer = make_writer(os.path.join(args.logdir, run_name("train_2d", args.data, setting,
                                                                f"{data_seeds[0]}-{data_seeds[-1]}")), args)
        for i, step in enumerate(h["step"]):
            for key in ["elbo", "recon_nll", "kl"]:
                writer.add_scalar(f"train/{key}", h[key][i].mean(), step)
            log_sigma_stats(writer, "train", lv_log_sigma[name][i] if name in lv_log_sigma
                            else torch.from_numpy(h["log_sigma"][i]), step)
        writer.close()


@torch.no_grad()
def evaluate(ens, x_eval, args):
    """Final ELBO (1 sample, all eval points) and IWAE-k (first iwae_points) per member: {setting: dict of (seeds,)}."""
    ens.model.eval(), ens.obs.eval()
    members = len(ens.names) * len(ens.seeds)
    # Seeded noise, one stream per seed, shared by every row: a member's numbers depend on its seed and setting only,
    # not on the device nor on which other rows train beside it.
    generators = [torch.Generator().manual_seed(2**30 + seed) for seed in ens.seeds]
    noise = lambda *shape: torch.stack([torch.randn(*shape, generator=g) for g in generators]).repeat(
        len(ens.names), *[1] * len(shape)).to(x_eval.device)
    elbo = torch.cat([elbo_terms(ens.model, ens.obs, part.expand(members, *part.shape),
                                 noise(len(part), args.latent_dim))[2]
                      for part in x_eval.split(1000)], dim=1)
    iwae = torch.cat([iwae_bound(ens.model, ens.obs, part.expand(members, *part.shape), args.iwae_k,
                                 eps=noise(args.iwae_k, len(part), args.latent_dim))
                      for part in x_eval[: args.iwae_points].split(max(1, 10000 // args.iwae_k))], dim=1)
    # Final sigma: the fixed or learned value; for LV-VAE the geometric mean of sigma over the eval points and dims.
    _, log_sigma = ens.obs(ens.model.decode(ens.model.encode(x_eval[:2000].expand(members, -1, -1))[0]),
                           x_eval[:2000].expand(members, -1, -1))
    out = {}
    for name in ens.names:
        out[name] = {}
    for key, value in dict(elbo=elbo.mean(1), iwae=iwae.mean(1), log_sigma=log_sigma.mean(dim=(1, 2))).items():
        for name, per_seed in ens.per_group(value.cpu()).items():
            out[name][key] = per_seed
    ens.model.train(), ens.obs.train()
    return out


# --- the experiment ---


def mean_std(values, fmt="{:.3f}"):
    values = np.asarray(values, dtype=np.float64)
    return f"{fmt.format(values.mean())} ± {fmt.format(values.std(ddof=1) if len(values) > 1 else 0.0)}"


def main(args):
    device = pick_device(args.device)
    command = "python " + " ".join(sys.argv)
    for flag, folder in [("--out", args.out), ("--logdir", args.logdir)]:  # checked now, not after training
        writable_folder(folder, flag)
    seeds = list(range(args.seed, args.seed + args.seeds))
    torch.manual_seed(args.seed)  # the figures' samples; weights, data and training noise have their own generators
    print(f"train_2d: preset {args.preset}, data {args.data}: {args.seeds} seeds x {args.steps} steps, ResNets of "
          f"{args.blocks} blocks of {args.hidden} units (paper: {PRESETS['paper']}), on {hardware(device)}")
    started = time.time()
    for number in (signal.SIGINT, signal.SIGTERM):  # the first stops training after its step; a second, at once
        signal.signal(number, lambda number, frame: (SIGNALS.append(number), signal.signal(number, signal.SIG_DFL)))

    # Phase 1: the rows that need nothing from another row, as one ensemble (one set of kernels per step).
    groups = [(f"F-VAE sigma={s:g}", FixedSigma(torch.full((len(seeds), 1, 1), s)))
              for s in (args.fixed_sigmas if "F" in args.settings else [])]
    if "LS" in args.settings:
        groups.append(("LS-VAE", LearnedScalarSigma((len(seeds), 1, 1))))
    if "optimal" in args.settings:
        groups.append(("sigma-VAE", OptimalSigma((len(seeds), 1, 1))))
    if "LV" in args.settings:
        groups.append(("LV-VAE", LearnedPerDimSigma(dim=-1)))
    for setting, (name, warm) in WARM_ROWS.items():
        if setting in args.settings:
            groups.append((name, WarmStartSigma(len(seeds), warm=warm)))
    ensembles = [Ensemble(groups, seeds, args, device)] if groups else []
    history, ls_schedule = train(ensembles, seeds, args, device, "phase 1")
    phase_seconds = [time.time() - started]

    # Phase 2: rows that take sigma from LS-VAE of the same seed, from other initial weights and data (seed + 10000):
    # with LS's own weights and batches, replaying its sigma(t) would retrace LS-VAE exactly, proving nothing.
    late_groups = []
    if "Fstar" in args.settings and not SIGNALS:
        late_groups.append(("F*-VAE", FixedSigma(ensembles[0].group("LS-VAE").log_sigma.detach().exp().cpu())))
    if "Fsched" in args.settings and not SIGNALS:
        late_groups.append(("F-sched", ScheduledSigma(ls_schedule.reshape(len(ls_schedule), -1, 1, 1))))
    if late_groups:
        late_seeds = [seed + 10000 for seed in seeds]
        ensembles.append(Ensemble(late_groups, late_seeds, args, device))
        late_history, _ = train(ensembles[-1:], late_seeds, args, device, "phase 2")
        history.update(late_history)
        phase_seconds.append(time.time() - started - phase_seconds[0])
    train_seconds = time.time() - started

    # --- evaluation: the same fresh points for every model ---
    x_eval, u_eval = sample_data(args.eval_points, torch.Generator().manual_seed(2**31 - 1), args.data, return_u=True)
    results = {}
    for ens in ensembles:
        results.update(evaluate(ens, x_eval.to(device), args))
    data_log_p = data_log_density(x_eval, args.data)
    stopped = stopped_early(ensembles, args)
    write_table(args, results, history, data_log_p, command, hardware(device), train_seconds, phase_seconds,
                time.time() - started, stopped)

    # --- figures ---
    write_figures(args, ensembles, history, x_eval, u_eval, command)
    print(f"wrote {args.out}/table1.md and figures in {time.time() - started:.0f} s")
    if stopped:  # the shell's convention for a run a signal ended
        print(f"train_2d: {stopped}; exit {128 + SIGNALS[0]}")
        sys.exit(128 + SIGNALS[0])


def stopped_early(ensembles, args):
    """What a stop signal cut short; '' if none came, or if training was complete when it came."""
    cut = [(phase, ens.steps_trained) for phase, ens in enumerate(ensembles, 1) if ens.steps_trained < args.steps]
    skipped = len(ensembles) < 2 and {"Fstar", "Fsched"} & set(args.settings)  # phase 2 never started
    if not SIGNALS or not (cut or skipped):
        return ""
    where = f"at step {cut[0][1]} of {args.steps} of phase {cut[0][0]}" if cut else "after phase 1"
    return f"stopped by {signal.Signals(SIGNALS[0]).name} {where}" + (
        ", before phase 2 (F*-VAE, F-sched)" if skipped else "")


# --- Table 1 ---


def write_table(args, results, history, data_log_p, command, machine, train_seconds, phase_seconds, total_seconds,
                stopped=""):
    half_log_2pi_d = math.log(2 * math.pi)  # D/2 log 2pi with D = 2: the constant the paper's ELBO leaves out
    ls_sigma = history["LS-VAE"]["log_sigma"] if "LS-VAE" in history else None
    lines = [
        f"# Table 1: ELBO of each setting on the 2-D data (Sec. 4.2), data `{args.data}`",
        "",
        f"Command: `{command}`",
        "",
        f"Preset `{args.preset}`: {args.seeds} seeds per setting (seeds {args.seed}..{args.seed + args.seeds - 1}), "
        f"{args.steps} steps of {args.batch_size} fresh points, Adam lr {args.lr}, ResNet MLPs of {args.blocks} "
        f"blocks x {args.hidden} units, latent dimension {args.latent_dim}. Hardware: {machine}. Training took "
        f"{train_seconds / 60:.1f} min ({' + '.join(f'{s / 60:.1f}' for s in phase_seconds)} for phases 1 and 2); "
        f"everything with evaluation and figures {total_seconds / 60:.1f} min.",
        "",
        *([f"**Not the protocol above: {stopped}.** Every row is evaluated as the steps it trained left it.", ""]
          if stopped else []),
        f"ELBO: one-sample ELBO in nats per point, averaged over {args.eval_points} fresh points (the same points for "
        f"every model), every normalising constant included. IWAE-{args.iwae_k}: the importance-weighted bound on the "
        f"first {args.iwae_points} of them. Mean ± std over seeds, and each seed's ELBO in seed order. Higher is "
        "better.",
        "",
        "LV-VAE, warm start (ours, not the paper's): trained as LS-VAE (the row 'LV-VAE, warm start (sigma-VAE)': as "
        "sigma-VAE), then handed over to the per-dimension sigma(z) head of LV-VAE (zero weights, bias at the warm "
        "phase's log sigma, sigma-VAE's running one: the same model before and after), in the same ensemble as LV-VAE "
        "from scratch, with the same initial weights, batches and noise. Hand-over "
        + (f"after {args.lv_warmup} steps." if args.lv_handover == "fixed" else
           "once the warm phase's losses settled (--lv-handover settled), at steps " + "; ".join(
               f"{' / '.join(str(s) for s in history[name]['handover_step'].tolist())} per seed ({name})"
               for name, _ in WARM_ROWS.values() if name in history) + " (-1: never)."
           if any(name in history for name, _ in WARM_ROWS.values()) else ""),
        "",
        "The paper's ELBO leaves out the Gaussian constant D/2 log 2pi (its F-VAE sigma=1 value, -1.14, is above the "
        "-1.84 that the constant alone would cap it at), so the column 'measured, paper's convention' adds "
        f"log 2pi = {half_log_2pi_d:.3f} nats (D = 2) to our measured ELBO. The paper's dataset formula is not "
        "published, so its numbers are not expected to match ours: compare orderings, not values.",
        "",
        "| setting | final sigma | ELBO (measured) | ELBO per seed | IWAE-k (measured) "
        "| ELBO, measured, paper's convention | ELBO in the paper (paper's numbers) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        sigma = mean_std(res["log_sigma"].exp(), "{:.4f}")
        if name.startswith("LV-VAE"):
            sigma = f"per dimension; geometric mean {sigma}"
        paper = PAPER_TABLE1.get(name, "not in the paper") if args.data == "sine" else "the paper has no such data"
        per_seed = " / ".join(f"{value:.3f}" for value in res["elbo"].tolist())
        lines.append(f"| {name} | {sigma} | {mean_std(res['elbo'])} | {per_seed} | {mean_std(res['iwae'])} "
                     f"| {mean_std(res['elbo'] + half_log_2pi_d)} | {paper} |")
    lines.append(f"| true log-density of the data (ceiling) | | {data_log_p.mean():.3f} | | | "
                 f"{data_log_p.mean() + half_log_2pi_d:.3f} | |")
    if ls_sigma is not None:
        tail = ls_sigma[-max(2, len(ls_sigma) // 10):]
        drift = (np.exp(tail[-1]) / np.exp(tail[0]) - 1) * 100
        lines += ["", f"LS-VAE's sigma over the last 10% of training changed by {mean_std(drift, '{:.1f}')} % "
                  "(mean ± std over seeds; Fig. 10 shows the whole curve)."]
    ranked = sorted(results, key=lambda name: -results[name]["elbo"].mean())
    lines += ["", "Ranking by mean measured ELBO: " + " > ".join(ranked), ""]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table1.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines[-len(results) - 8:]))


# --- figures ---


@torch.no_grad()
def write_figures(args, ensembles, history, x_eval, u_eval, command):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, n_show = args.out, 1000
    x_show = x_eval[:n_show]
    colours = np.select([u_eval[:n_show] < NOISE_EDGES[0], u_eval[:n_show] < NOISE_EDGES[1]], [0, 1], 2)

    # Fig. 3: the dataset.
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for region, (third, level) in enumerate(zip(["u < -1/3", "-1/3 <= u < 1/3", "u >= 1/3"], NOISE_LEVELS[args.data])):
        ax.scatter(*x_show[colours == region].T, s=3, label=f"{third}: noise {level}")
    ax.set(title=f"Fig. 3: the 2-D dataset ({args.data})", aspect="equal")
    ax.legend(fontsize=7, markerscale=3)
    save_figure(fig, f"{out}/fig3_dataset.png", command)

    # Figs. 4, 6, 7: reconstructions over data (left), generations and their means (right), first seed of each row.
    panels = {}
    device = next(ensembles[0].model.parameters()).device
    for ens in ensembles:
        ens.model.eval(), ens.obs.eval()
        members = len(ens.names) * len(ens.seeds)
        x_in = x_show.to(device).expand(members, -1, -1)
        mu, log_std = ens.model.encode(x_in)
        recon_mean, _ = ens.obs(ens.model.decode(mu + log_std.exp() * torch.randn_like(mu)), x_in)
        z_prior = torch.randn(members, n_show, args.latent_dim, device=device)
        gen_mean, gen_log_sigma = ens.obs(ens.model.decode(z_prior), x_in)
        gen_sample = gen_mean + gen_log_sigma.exp() * torch.randn_like(gen_mean)
        for name, rec, mean, sample in zip(ens.names, *(t.cpu()[:: len(ens.seeds)] for t in
                                                        (recon_mean, gen_mean, gen_sample))):
            panels[name] = (rec, mean, sample)
        ens.model.train(), ens.obs.train()
    figures = {
        "fig4_all_settings.png": list(panels),
        "fig6_learned_sigma.png": [n for n in ["LS-VAE", "F*-VAE", "LV-VAE", "LV-VAE, warm start", "F-sched",
                                               "sigma-VAE", "LV-VAE, warm start (sigma-VAE)"] if n in panels],
        "fig7_fixed_sigma.png": [n for n in panels if n.startswith("F-VAE sigma=")],
    }
    for filename, names in figures.items():
        if not names:
            continue
        fig, axes = plt.subplots(len(names), 2, figsize=(9, 2.6 * len(names)), squeeze=False)
        for row, name in zip(axes, names):
            rec, mean, sample = panels[name]
            row[0].scatter(*x_show.T, s=2, c="tab:blue", label="data")
            row[0].scatter(*rec.T, s=2, c="tab:orange", label="reconstruction (mean of p(x|z))")
            row[1].scatter(*mean.T, s=2, c="tab:orange", label="means of p(x|z), z ~ p(z)")
            row[1].scatter(*sample.T, s=2, c="tab:green", alpha=0.5, label="samples of p(x|z)")
            row[0].set_ylabel(name)
            for ax in row:
                ax.set(xlim=(-3, 3), ylim=(-2, 2))
        axes[0, 0].set_title("reconstruction")
        axes[0, 1].set_title("generation")
        axes[0, 0].legend(fontsize=6, markerscale=3, loc="lower right")
        axes[0, 1].legend(fontsize=6, markerscale=3, loc="lower right")
        fig.tight_layout(rect=(0, 0.02, 1, 1))
        save_figure(fig, f"{out}/{filename}", command)

    # Figs. 8, 9: reconstruction and latent losses along training, fixed sigma vs learned sigma.
    fixed = "F*-VAE" if "F*-VAE" in history else next((n for n in history if n.startswith("F-VAE")), None)
    for filename, name, fig_no in [("fig8_losses_fixed_sigma.png", fixed, "Fig. 8"),
                                   ("fig9_losses_learned_sigma.png", "LS-VAE", "Fig. 9")]:
        if name not in history:
            continue
        h = history[name]
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for key, colour in [("recon_nll", "tab:blue"), ("kl", "tab:red")]:
            ax.plot(h["step"], h[key], color=colour, alpha=0.15, lw=0.6)
            ax.plot(h["step"], np.median(h[key], axis=1), color=colour, lw=1.5, label=f"{key} (median over seeds)")
        sigma_note = f"sigma = {np.exp(h['log_sigma'][-1]).mean():.3g}" if name != "LS-VAE" else "sigma learned"
        ax.set(xlabel="step", ylabel="nats per point", title=f"{fig_no}: {name} ({sigma_note}), losses along training",
               ylim=(min(-6, np.percentile(h["recon_nll"], 1)), max(8, np.percentile(h["kl"], 99))))
        ax.legend(fontsize=8)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        save_figure(fig, f"{out}/{filename}", command)

    # Fig. 10: LS-VAE's sigma along training, every seed; beside it, the training ELBO of the rows that share it.
    if "LS-VAE" in history:
        h = history["LS-VAE"]
        fig, (ax, ax_elbo) = plt.subplots(1, 2, figsize=(12, 3.8))
        ax.semilogy(h["step"], np.exp(h["log_sigma"]), lw=0.8)
        ax.set(xlabel="step", ylabel="sigma", title=f"Fig. 10: LS-VAE's learned sigma, {args.seeds} seeds")
        ax.grid(True, which="both", alpha=0.3)
        window = max(1, len(h["step"]) // 50)
        for name in ["LS-VAE", "F-sched", "F*-VAE"]:
            if name in history:
                elbo = np.convolve(np.median(history[name]["elbo"], axis=1), np.ones(window) / window, mode="valid")
                ax_elbo.plot(history[name]["step"][window - 1:], elbo, label=name)
        ax_elbo.set(xlabel="step", ylabel="nats per point", ylim=(-4, None),
                    title=f"training ELBO (median over seeds, moving average of {window} records)")
        ax_elbo.legend(fontsize=8)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        save_figure(fig, f"{out}/fig10_ls_sigma.png", command)

    # Fig. 11 (ours): what the main latent of the LV rows encodes along training, every seed.
    names = [name for name in ["LV-VAE", "LV-VAE, warm start", "LV-VAE, warm start (sigma-VAE)"] if name in history]
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 3.8), squeeze=False, sharey=True)
        for ax, name in zip(axes[0], names):
            h = history[name]
            for seed, colour in zip(range(args.seeds), plt.rcParams["axes.prop_cycle"].by_key()["color"] * args.seeds):
                ax.plot(h["fold_step"], h["fold"][:, seed, 0], color=colour, lw=1.2, label=f"seed {args.seed + seed}")
                ax.plot(h["fold_step"], h["fold"][:, seed, 1], color=colour, lw=1.0, ls=":")
                if "handover_step" in h and h["handover_step"][seed] > 0:
                    ax.axvline(h["handover_step"][seed], color=colour, lw=1, ls="--")
            ax.set(xscale="log", xlabel="step", ylim=(0, 1.02), title=name)
            ax.grid(True, which="major", alpha=0.3)
        axes[0, 0].plot([], [], color="black", lw=1.2, label="with u")
        axes[0, 0].plot([], [], color="black", lw=1.0, ls=":", label="with x2")
        axes[0, 0].set_ylabel("|Spearman corr.| of the main latent")
        axes[0, -1].set_xlabel("step (dashed: the seed's hand-over)")
        axes[0, 0].legend(fontsize=7, loc="lower left", ncol=2)
        fig.suptitle(f"Fig. 11 (ours): what the main latent encodes on {args.data}, per seed; folded: dotted above "
                     "solid", fontsize=10)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        save_figure(fig, f"{out}/fig11_lv_fold.png", command)


if __name__ == "__main__":
    main(parse_args())
