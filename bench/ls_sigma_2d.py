"""Where LS-VAE's learned sigma comes to rest on the 2-D sine, and what its reconstructions keep of the noise.

In Table 1's runs LS-VAE's sigma falls from 1 to a plateau near 0.065 and some seeds later drop to about 0.044, at
steps that vary from seed to seed (Fig. 10). This trains LS-VAE alone with train_2d.py's ensemble, loop and data (its
decoder has one output per dimension, not Table 1's two, so its seeds start from other weights than that row's) and,
for each seed's final model, splits the reconstruction error at the encoder's mean into its components along the
curve and across it at each point's true u, per noise region, as fractions of that region's noise variance s^2 (the
noise is isotropic: s^2 in each direction):
    (1, 1): the reconstruction is the curve's point at the true u (the code knows u, not the noise);
    (0, 1): the reconstruction is the nearest point of the curve (the code follows the noise along the curve);
    normal < 1: the code also keeps some of the noise across the curve (only a second latent can).
It also gives each latent's KL (nats per point, the larger first), the step at which sigma first fell below 0.055,
a second table of each seed's sigma along training, and a third of what each seed's second latent encodes (its
correlation with u and with the noise across and along the curve, and the decoder swept along it).

    python bench/ls_sigma_2d.py                       # 10 seeds x 20,000 steps, 64-unit nets (~2 min on 2 CPU cores)
    python bench/ls_sigma_2d.py --hidden 200 --seeds 4 --steps 15000
    python bench/ls_sigma_2d.py --noise 0.05 0.05 0.05 --threshold 0.04   # the same noise everywhere
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_2d  # noqa: E402  (its ensemble, training loop and data)
from common import LearnedScalarSigma, gaussian_kl, hardware, write_file_atomically  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--seeds", type=int, default=10, help="seeds 0 .. N-1 (default 10)")
parser.add_argument("--steps", type=int, default=20000, help="training steps (default 20000, the paper's)")
parser.add_argument("--hidden", type=int, default=64, help="units per layer (default 64; the paper's is 200)")
parser.add_argument("--points", type=int, default=20000, help="fresh points for the measurements (default 20000)")
parser.add_argument("--threshold", type=float, default=0.055, help="sigma between the two resting values (0.055)")
parser.add_argument("--noise", type=float, nargs=3, default=list(train_2d.NOISE_LEVELS["sine"]), metavar="S",
                    help="noise s of the thirds u < -1/3, the middle one, u >= 1/3 (default the sine's 0.05 0.01 0.1)")
parser.add_argument("--logdir", default="runs", help="TensorBoard folder of the training run (default runs)")
parser.add_argument("--out", default="results/2d/ls_sigma_states.md", help="the table (default %(default)s)")


def frame(u, data="sine"):
    """The curve's unit tangent and normal at u, by central differences in float64: (N,) -> two (N, 2)."""
    h = 1e-4
    tangent = train_2d.manifold(u.double() + h, data) - train_2d.manifold(u.double() - h, data)
    tangent = (tangent / tangent.norm(dim=-1, keepdim=True)).float()
    return tangent, torch.stack([-tangent[:, 1], tangent[:, 0]], dim=-1)


def regions(u):
    """Each point's noise region: 0, 1, 2 for u < -1/3, the middle third, the rest."""
    return torch.bucketize(u, torch.tensor(train_2d.NOISE_EDGES), right=True)


def along_and_across(error, u, data="sine"):
    """Mean squared error along the curve and across it at each point's true u, per noise region, each divided by
    the region's s^2. error: (..., N, 2), u: (N,) -> (..., regions, 2)."""
    tangent, normal = frame(u, data)
    region = regions(u)
    parts = []
    for r, s in enumerate(train_2d.NOISE_LEVELS[data]):
        inside = region == r
        e = error[..., inside, :]
        along = ((e * tangent[inside]).sum(-1) ** 2).mean(-1)
        across = ((e * normal[inside]).sum(-1) ** 2).mean(-1)
        parts.append(torch.stack([along, across], dim=-1) / s**2)
    return torch.stack(parts, dim=-2)


SWEEP = (0.5, 1, 2)  # posterior standard deviations of the second latent, for the decoder's sweep along it


def sweep_across(decode_mean, mu, std, latent, normal):
    """The reconstruction's RMS move across the curve from the encoder's mean to t posterior standard deviations of
    one latent either side, for each t in SWEEP. decode_mean: z (S, N, L) -> (S, N, 2); mu: (S, N, L); std: (S, N),
    that latent's; latent: (S, 1, 1), its index per seed; normal: (N, 2) -> (len(SWEEP), S)."""
    at_mean, moves = decode_mean(mu), []
    for t in SWEEP:
        step = torch.zeros_like(mu).scatter_(-1, latent.expand(-1, mu.shape[1], 1), t * std.unsqueeze(-1))
        across = [((decode_mean(mu + sign * step) - at_mean) * normal).sum(-1) for sign in (1, -1)]
        moves.append(((across[0] ** 2 + across[1] ** 2) / 2).mean(-1).sqrt())
    return torch.stack(moves)


def correlation(a, b):
    """Pearson's correlation along the last dimension."""
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-12)


def what_a_latent_encodes(latent_mean, moved, x, u, data="sine"):
    """For one latent per seed: per noise region, the correlation of its posterior mean with the noise across the
    curve and along it (x - c(u) on the normal and tangent at the true u), and the RMS displacement of the
    reconstruction across and along the curve per posterior standard deviation of that latent, in units of s; and
    its correlation with u over all points. latent_mean: (S, N), moved: (S, N, 2) -> (S, regions, 4), (S,)."""
    tangent, normal = frame(u, data)
    noise = x - train_2d.manifold(u, data)
    across, along = (noise * normal).sum(-1), (noise * tangent).sum(-1)
    region = regions(u)
    with_noise = torch.stack([torch.stack([correlation(latent_mean[:, region == r], across[region == r]),
                                           correlation(latent_mean[:, region == r], along[region == r])], dim=-1)
                              for r in range(len(train_2d.NOISE_LEVELS[data]))], dim=-2)  # (S, regions, 2)
    moves = along_and_across(moved, u, data).sqrt().flip(-1)  # RMS move across, along, in units of s
    return torch.cat([with_noise, moves], dim=-1), correlation(latent_mean, u.expand_as(latent_mean))


def main(args):
    default = train_2d.NOISE_LEVELS["sine"]
    train_2d.NOISE_LEVELS["sine"] = tuple(args.noise)  # read at each call: training data, measurements, this table
    try:
        run(args)
    finally:
        train_2d.NOISE_LEVELS["sine"] = default


def run(args):
    train_args = train_2d.parse_args(["--settings", "LS", "--seeds", str(args.seeds), "--steps", str(args.steps),
                                      "--hidden", str(args.hidden), "--device", "cpu", "--logdir", args.logdir])
    seeds = list(range(args.seeds))
    started = time.time()
    ens = train_2d.Ensemble([("LS-VAE", LearnedScalarSigma((len(seeds), 1, 1)))], seeds, train_args, "cpu")
    _, ls_log_sigma = train_2d.train([ens], seeds, train_args, "cpu", "LS-VAE")
    train_minutes = (time.time() - started) / 60

    # --- measurements on fresh points, each with its true u ---
    x, u = train_2d.sample_data(args.points, torch.Generator().manual_seed(2**31 - 3), "sine", return_u=True)
    ens.model.eval(), ens.obs.eval()
    with torch.no_grad():
        xs = x.expand(len(seeds), -1, -1)
        mu, log_std = ens.model.encode(xs)  # (S, N, L)
        error = xs - ens.obs(ens.model.decode(mu), xs)[0]  # (S, N, 2), at the encoder's mean
        kl_per_latent = gaussian_kl(mu.unsqueeze(-1), log_std.unsqueeze(-1))  # (S, N, L): each latent on its own
        z = mu + torch.exp(log_std) * torch.randn(mu.shape, generator=torch.Generator().manual_seed(2**31 - 4))
        sampled_mse = ((xs - ens.obs(ens.model.decode(z), xs)[0]) ** 2).mean(dim=(1, 2))  # (S,) per dimension
        # The second latent by KL: its posterior mean, and the reconstruction's move per posterior std of it.
        second = kl_per_latent.mean(1).argsort(dim=-1, descending=True)[:, 1].view(-1, 1, 1)  # (S, 1, 1)
        pick = lambda t: t.gather(-1, second.expand(-1, t.shape[1], 1)).squeeze(-1)  # (S, N, L) -> (S, N)
        h = torch.zeros_like(mu[:, :1]).scatter_(-1, second, 1e-3)
        moved = (ens.obs(ens.model.decode(mu + h), xs)[0] - ens.obs(ens.model.decode(mu - h), xs)[0]) / 2e-3
        encodes, with_u = what_a_latent_encodes(pick(mu), moved * pick(log_std).exp().unsqueeze(-1), x, u)
        # The decoder along that latent in the noisiest third: the reconstruction's RMS move across the curve from the
        # encoder's mean to t posterior stds either side, in units of s (linear: proportional to t).
        inside = regions(u) == int(torch.tensor(train_2d.NOISE_LEVELS["sine"]).argmax())
        sweep = sweep_across(lambda z: ens.obs(ens.model.decode(z), xs[:, inside])[0], mu[:, inside],
                             pick(log_std[:, inside]).exp(), second, frame(u[inside])[1])
        sweep = sweep / max(train_2d.NOISE_LEVELS["sine"])
    fractions = along_and_across(error, u)  # (S, regions, 2)
    sigma = ens.group("LS-VAE").log_sigma.detach().reshape(len(seeds)).exp()
    below = ls_log_sigma.exp() < args.threshold  # (steps, S)
    rows = []
    for i, seed in enumerate(seeds):
        cells = [str(seed), f"{sigma[i]:.4f}",
                 str(int(below[:, i].float().argmax()) + 1) if below[:, i].any() else f"not in {args.steps}",
                 f"{(error[i] ** 2).mean().sqrt():.4f}", f"{sampled_mse[i].sqrt():.4f}"]
        cells += [f"{along:.2f}, {across:.2f}" for along, across in fractions[i].tolist()]
        cells.append(", ".join(f"{k:.2f}" for k in kl_per_latent[i].mean(0).sort(descending=True).values))
        rows.append("| " + " | ".join(cells) + " |")
    checkpoints = sorted({max(1, round(args.steps * f / 20)) for f in (1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20)})
    sigma_along = ls_log_sigma[[c - 1 for c in checkpoints]].exp()  # (checkpoints, S): used by step c
    trajectory = [f"| {seed} | " + " | ".join(f"{v:.4f}" for v in sigma_along[:, i].tolist()) + " |"
                  for i, seed in enumerate(seeds)]
    second_rows = [f"| {seed} | {with_u[i]:.2f} | " + " | ".join(
        f"{c_across:+.2f}, {c_along:+.2f}; {m_across:.2f}, {m_along:.2f}"
        for c_across, c_along, m_across, m_along in encodes[i].tolist()) + " | "
        + " | ".join(f"{move[i]:.2f}" for move in sweep) + " |" for i, seed in enumerate(seeds)]
    write_table(args, rows, train_minutes, checkpoints, trajectory, second_rows)


def write_table(args, rows, train_minutes, checkpoints, trajectory, second_rows):
    levels = train_2d.NOISE_LEVELS["sine"]
    command = "python " + " ".join([os.path.relpath(os.path.abspath(sys.argv[0]))] + sys.argv[1:])
    noise_rms = sum(s**2 for s in levels) / len(levels)
    lines = [
        "# LS-VAE's resting sigma on the 2-D sine, and what its reconstructions keep of the noise",
        "",
        f"Command: `{command}`",
        "",
        (f"LS-VAE alone, {args.seeds} seeds x {args.steps} steps, ResNets of 4 blocks x {args.hidden} units, "
         f"train_2d.py's defaults otherwise. Hardware: {hardware()}. Training took {train_minutes:.1f} min. "
         f"Measured on {args.points} fresh points."),
        "",
        (f"Two reference values: sqrt(E s^2) = {noise_rms**0.5:.4f}, the error per dimension of a reconstruction at "
         f"the true u (the whole noise, in both directions), and sqrt(E s^2 / 2) = {(noise_rms / 2)**0.5:.4f}, that of "
         "the curve's nearest point (the noise across the curve only), for a curve that is straight at the noise's "
         "scale."),
        "",
        "Columns: final sigma; the first step with sigma below the threshold; the RMS reconstruction error per "
        "dimension at the encoder's mean, and at a sampled z (the error LS-VAE's sigma fits); per noise region (s = "
        + ", ".join(f"{s:g}" for s in levels) + " for u < -1/3, the middle third, u >= 1/3), the mean squared error "
        "along the curve and across it at the true u, each divided by s^2; each latent's KL, nats per point.",
        "",
        f"| seed | final sigma | first step with sigma < {args.threshold:g} | RMS error, mean z | "
        "RMS error, sampled z | " + " | ".join(f"s = {s:g}: along, across / s^2" for s in levels)
        + " | KL per latent |",
        "|" + "---|" * (6 + len(levels)),
        *rows,
        "",
        "Each seed's sigma along training: the sigma that the loss of the step in the column's head used.",
        "",
        "| seed | " + " | ".join(f"{c:,}" for c in checkpoints) + " |",
        "|" + "---|" * (1 + len(checkpoints)),
        *trajectory,
        "",
        ("What each seed's second latent (by KL) encodes, on the same points: its posterior mean's correlation with u, "
         "and per noise region its correlation with the noise across the curve and along it (x - c(u) on the normal "
         "and the tangent at the true u), then how far one posterior standard deviation of it moves the "
         "reconstruction across and along the curve (RMS, in units of the region's s; from the encoder's mean, by "
         "central differences). A latent that codes the noise across the curve: correlation near +-1 across and a "
         "move across near s. Last columns: the decoder along it in the noisiest third, the reconstruction's RMS move "
         "across the curve from the encoder's mean to t posterior standard deviations either side, in units of s: "
         "proportional to t for a decoder linear in it."),
        "",
        "| seed | correlation with u | " + " | ".join(f"s = {s:g}: with noise across, along; moves across, along / s"
                                                    for s in levels) + " | "
        + " | ".join(f"s = {max(levels):g}: move across at {t:g} std / s" for t in SWEEP) + " |",
        "|" + "---|" * (2 + len(levels) + len(SWEEP)),
        *second_rows,
        "",
    ]
    write_file_atomically(args.out, lambda f: f.write("\n".join(lines).encode()))
    print("\n".join(lines))


if __name__ == "__main__":
    cli = parser.parse_args()
    if min(cli.noise) <= 0:
        parser.error(f"--noise {' '.join(f'{s:g}' for s in cli.noise)}: every noise level must be > 0")
    main(cli)
