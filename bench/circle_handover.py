"""Why a warm start leaves the circle's collapse after its hand-over, or stays there: each seed's code before it.

On the circle (train_2d.py --data circle) a learned scalar sigma collapses at R/sqrt(D): decoder means at the centre,
ELBO -2.150. Both warm starts hand over from that state (sigma ~0.708) to LV-VAE's per-dimension sigma(z) head, and
most seeds then leave the collapse, the sigma-VAE warm start's more often (results/2d/quick_circle_warm40). This
trains the two warm-start rows alone with train_2d.py's ensemble, loop, data and evaluation (the same ensemble as
`train_2d.py --data circle --settings LVwarm LVwarmopt`, so the same models) and gives, per seed: the code's KL
over the last steps before the hand-over (the mean of the recorded batch KLs, nats per point), the warm phase's sigma
then, the KL at the end, and the final ELBO; a seed has left the collapse if its ELBO is above -2.0. Then, for the
question whether the code's information at the hand-over decides it: the KL before the hand-over of the seeds that
left against those that stayed (one-sided Mann-Whitney U, both rows pooled and each row).

    python bench/circle_handover.py                           # 40 seeds x 4,000 steps, 64 units (~3 min, 2 cores)
    python bench/circle_handover.py --seeds 3 --steps 300 --lv-warmup 100 --out /tmp/handover.md
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
from scipy.stats import mannwhitneyu

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_2d  # noqa: E402  (its ensemble, training loop, data and evaluation)
from common import hardware, write_file_atomically  # noqa: E402

ESCAPED = -2.0  # final ELBO above this: the seed has left the collapse (collapsed: -2.150)

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--seeds", type=int, default=40, help="seeds 0 .. N-1 (default 40)")
parser.add_argument("--steps", type=int, default=4000, help="training steps (default 4000, the quick preset's)")
parser.add_argument("--hidden", type=int, default=64, help="units per layer (default 64, the quick preset's)")
parser.add_argument("--lv-warmup", type=int, default=1000, help="steps before the hand-over (default 1000)")
parser.add_argument("--window", type=int, default=200,
                    help="the KL before the hand-over: mean of the records in its last WINDOW steps (default 200)")
parser.add_argument("--logdir", default="runs", help="TensorBoard folder of the training run (default runs)")
parser.add_argument("--out", default="results/2d/circle_handover.md", help="the table (default %(default)s)")


def warm_ensemble(seeds, train_args):
    """train_2d.py's two warm-start rows (LVwarm, LVwarmopt) for these seeds, as one ensemble on the CPU."""
    groups = [(name, train_2d.WarmStartSigma(len(seeds), warm=warm)) for name, warm in train_2d.WARM_ROWS.values()]
    return train_2d.Ensemble(groups, seeds, train_args, "cpu")


def before_handover(history, warmup, window):
    """Per seed: the mean recorded KL in steps (warmup - window, warmup], and sigma at the last record <= warmup."""
    steps = history["step"]
    inside = (steps > warmup - window) & (steps <= warmup)
    last = np.flatnonzero(steps <= warmup)[-1]
    return history["kl"][inside].mean(0), np.exp(history["log_sigma"][last])


def left_against_stayed(kl, escaped):
    """The KL before the hand-over of the seeds that left against those that stayed: (medians, one-sided p), the
    alternative that the seeds that left had more; p is None where either group is empty."""
    left, stayed = kl[escaped], kl[~escaped]
    if not len(left) or not len(stayed):
        return (np.median(left) if len(left) else None, np.median(stayed) if len(stayed) else None), None
    return (np.median(left), np.median(stayed)), mannwhitneyu(left, stayed, alternative="greater").pvalue


def main(args):
    train_args = train_2d.parse_args(["--data", "circle", "--settings", "LVwarm", "LVwarmopt", "--seeds",
                                      str(args.seeds), "--steps", str(args.steps), "--hidden", str(args.hidden),
                                      "--lv-warmup", str(args.lv_warmup), "--device", "cpu", "--logdir", args.logdir])
    seeds = list(range(args.seeds))
    started = time.time()
    ens = warm_ensemble(seeds, train_args)
    history, _ = train_2d.train([ens], seeds, train_args, "cpu", "warm starts")
    train_minutes = (time.time() - started) / 60
    x_eval = train_2d.sample_data(train_args.eval_points, torch.Generator().manual_seed(2**31 - 1), "circle")
    results = train_2d.evaluate(ens, x_eval, train_args)  # the points and noise train_2d.py's Table 1 uses

    rows, pooled_kl, pooled_escaped, summary = [], [], [], []
    for name in ens.names:
        kl, sigma = before_handover(history[name], args.lv_warmup, args.window)
        elbo = results[name]["elbo"].numpy()
        escaped = elbo > ESCAPED
        pooled_kl.append(kl), pooled_escaped.append(escaped)
        for i, seed in enumerate(seeds):
            rows.append(f"| {name} | {seed} | {kl[i]:.4f} | {sigma[i]:.3f} | {history[name]['kl'][-1, i]:.3f} "
                        f"| {elbo[i]:.3f} | {'yes' if escaped[i] else 'no'} |")
        summary.append((name, int(escaped.sum()), len(escaped), *left_against_stayed(kl, escaped)))
    pooled_kl, pooled_escaped = np.concatenate(pooled_kl), np.concatenate(pooled_escaped)
    summary.append(("both rows", int(pooled_escaped.sum()), len(pooled_escaped),
                    *left_against_stayed(pooled_kl, pooled_escaped)))
    write_table(args, rows, summary, train_minutes, len(seeds))


def write_table(args, rows, summary, train_minutes, n_seeds):
    command = "python " + " ".join([os.path.relpath(os.path.abspath(sys.argv[0]))] + sys.argv[1:])
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
    lines = [
        "# The circle's warm starts: each seed's code before the hand-over, and whether it leaves the collapse",
        "",
        f"Command: `{command}`",
        "",
        (f"The two warm-start rows of train_2d.py on the circle, {n_seeds} seeds x {args.steps} steps, hand-over "
         f"after {args.lv_warmup}, ResNets of 4 blocks x {args.hidden} units, train_2d.py's defaults otherwise. "
         f"Hardware: {hardware()}. Training took {train_minutes:.1f} min."),
        "",
        (f"KL before: the mean of the recorded batch KLs (nats per point) in the {args.window} steps up to the "
         "hand-over; sigma: the warm phase's sigma at the last record before it; KL at the end: the last record; "
         f"ELBO: train_2d.py's final ELBO; left: ELBO above {ESCAPED} (collapsed: -2.150)."),
        "",
        "| setting | seeds that left | median KL before: left, stayed | one-sided Mann-Whitney p (left > stayed) |",
        "|---|---|---|---|",
        *[f"| {name} | {count} of {total} | {fmt(medians[0], '.4f')}, {fmt(medians[1], '.4f')} | {fmt(p, '.3g')} |"
          for name, count, total, medians, p in summary],
        "",
        "| setting | seed | KL before | sigma | KL at the end | ELBO | left |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    write_file_atomically(args.out, lambda f: f.write("\n".join(lines).encode()))
    print("\n".join(lines[:16]))


if __name__ == "__main__":
    cli = parser.parse_args()
    if not 0 < cli.lv_warmup < cli.steps:
        parser.error(f"--lv-warmup {cli.lv_warmup} must be between 0 and --steps {cli.steps}")
    main(cli)
