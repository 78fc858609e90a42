"""The circle's warm starts: does the state at the hand-over decide whether a seed leaves the collapse, or the batches
and noise after it?

Both warm starts hand over on the circle (train_2d.py --data circle) from a collapsed state, and most seeds then leave
it (results/2d/quick_circle_warm40); the code's KL at the hand-over does not say which (results/2d/circle_handover.md).
This trains the two warm-start rows with train_2d.py's ensemble, loop, data and evaluation up to the hand-over, copies
every member --replicas times (weights, observation model and Adam's state), and continues each copy to --steps with
batches and reparametrisation noise of its own; copy r of seed s sees the same continuation in both rows. If the state
decides, a seed's copies all leave or all stay; if the noise after the hand-over decides, every seed's copies leave at
the row's rate, binomially. Per row: how many seeds had mixed outcomes, and a permutation test of the spread of the
seeds' escape counts against shuffling the outcomes across seeds (the null: the state does not matter). The original
run (the same seeds, trained through with their own batches) gives each seed's first outcome, against which the
copies' escape fractions are compared (one-sided Mann-Whitney U: the seeds that left had more copies leave).

    python bench/circle_replay.py                       # 40 seeds x 2 rows x 8 copies, 64 units (~25 min, 2 cores)
    python bench/circle_replay.py --seeds 3 --replicas 2 --steps 300 --lv-warmup 100 --out /tmp/replay.md
"""

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch
from scipy.stats import mannwhitneyu, spearmanr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_2d  # noqa: E402  (its ensemble, training loop, data and evaluation)
from bench.circle_handover import ESCAPED, before_handover, warm_ensemble  # noqa: E402  (the same rows and measures)
from common import hardware, write_file_atomically  # noqa: E402

CONTINUATION_SEEDS = 10**6  # copy r of seed s draws its batches and noise from seed 10**6 + s x replicas + r

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--seeds", type=int, default=40, help="how many seeds (default 40)")
parser.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0: seeds 0 .. N-1)")
parser.add_argument("--replicas", type=int, default=8, help="copies of each seed's state at the hand-over (default 8)")
parser.add_argument("--steps", type=int, default=4000, help="training steps in all (default 4000, the quick preset's)")
parser.add_argument("--hidden", type=int, default=64, help="units per layer (default 64, the quick preset's)")
parser.add_argument("--lv-warmup", type=int, default=1000, help="steps before the hand-over (default 1000)")
parser.add_argument("--window", type=int, default=200,
                    help="the KL before the hand-over: mean of the records in its last WINDOW steps (default 200)")
parser.add_argument("--permutations", type=int, default=10000, help="shuffles of the permutation test (default 10000)")
parser.add_argument("--logdir", default="runs", help="TensorBoard folder of the training runs (default runs)")
parser.add_argument("--out", default="results/2d/circle_replay.md", help="the table (default %(default)s)")


@torch.no_grad()
def replicate(ens, replicas, train_args):
    """An ensemble whose member (row, seed, r) is a copy of `ens`'s (row, seed), r < replicas: weights, observation
    models (the warm phase's sigma, hand-over flags) and Adam's moments and step count."""
    rows, seeds = len(ens.names), len(ens.seeds)
    new = warm_ensemble([seed for seed in ens.seeds for _ in range(replicas)], train_args)
    member_index = torch.arange(rows * seeds).repeat_interleave(replicas)  # the model's members, row-major
    seed_index = torch.arange(seeds).repeat_interleave(replicas)  # each row's observation model has one per seed
    new.model.load_state_dict({key: value[member_index] for key, value in ens.model.state_dict().items()})
    new.obs.load_state_dict({key: value[seed_index] for key, value in ens.obs.state_dict().items()})
    indices = [member_index] * len(list(ens.model.parameters())) + [seed_index] * len(list(ens.obs.parameters()))
    old_params, new_params = ens.optimizer.param_groups[0]["params"], new.optimizer.param_groups[0]["params"]
    for old, new_param, index in zip(old_params, new_params, indices):
        new.optimizer.state[new_param] = {key: value.clone() if key == "step" else value[index].clone()
                                          for key, value in ens.optimizer.state[old].items()}
    return new


def permutation_p(escaped, permutations, generator):
    """escaped (seeds, replicas) bool: one-sided p of the variance of the seeds' escape counts under shuffling all
    outcomes across seeds (large when the seeds differ more than their copies' noise would make them)."""
    observed = escaped.sum(1).var()
    flat = escaped.reshape(-1)
    shuffled = np.stack([generator.permutation(flat) for _ in range(permutations)]).reshape(permutations,
                                                                                          *escaped.shape)
    return (1 + (shuffled.sum(2).var(1) >= observed - 1e-12).sum()) / (1 + permutations)


def main(args):
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    flags = ["--data", "circle", "--settings", "LVwarm", "LVwarmopt", "--seeds", str(args.seeds), "--hidden",
             str(args.hidden), "--device", "cpu", "--logdir", args.logdir]
    full_args = train_2d.parse_args([*flags, "--steps", str(args.steps), "--lv-warmup", str(args.lv_warmup)])
    x_eval = train_2d.sample_data(full_args.eval_points, torch.Generator().manual_seed(2**31 - 1), "circle")
    started = time.time()
    # The original run: each seed trained through with its own batches, as train_2d.py and circle_handover.py do
    original = warm_ensemble(seeds, full_args)
    train_2d.train([original], seeds, full_args, "cpu", "original")
    first = {name: result["elbo"].numpy() > ESCAPED for name, result in
             train_2d.evaluate(original, x_eval, full_args).items()}
    # The same training stopped at the hand-over (the same models: the loop draws each step's batches alike)
    before_args = copy.copy(full_args)
    before_args.steps = args.lv_warmup
    at_handover = warm_ensemble(seeds, before_args)
    history, _ = train_2d.train([at_handover], seeds, before_args, "cpu", "to the hand-over")
    # The code's information then, as circle_handover.py measures it: the mean recorded batch KL over the last steps
    kl_before = {name: before_handover(h, args.lv_warmup, args.window)[0] for name, h in history.items()}
    # The copies, handed over at their first step and trained on with batches of their own
    after_args = copy.copy(full_args)
    after_args.steps, after_args.lv_warmup = args.steps - args.lv_warmup, 0
    copies = replicate(at_handover, args.replicas, after_args)
    continuation_seeds = [CONTINUATION_SEEDS + s * args.replicas + r for s in seeds for r in range(args.replicas)]
    train_2d.train([copies], continuation_seeds, after_args, "cpu", "copies after the hand-over")
    train_minutes = (time.time() - started) / 60
    results = train_2d.evaluate(copies, x_eval, full_args)

    generator = np.random.default_rng(0)
    rows, summary = [], []
    for name in copies.names:
        elbo = results[name]["elbo"].numpy().reshape(len(seeds), args.replicas)
        escaped = elbo > ESCAPED
        counts = escaped.sum(1)
        for i, seed in enumerate(seeds):
            rows.append(f"| {name} | {seed} | {kl_before[name][i]:.4f} | {'yes' if first[name][i] else 'no'} "
                        f"| {counts[i]} of {args.replicas} "
                        f"| {' / '.join(f'{v:.2f}' for v in elbo[i])} |")
        mixed = int(((counts > 0) & (counts < args.replicas)).sum())
        fraction_left, fraction_stayed = counts[first[name]] / args.replicas, counts[~first[name]] / args.replicas
        p_first = mannwhitneyu(fraction_left, fraction_stayed, alternative="greater").pvalue \
            if len(fraction_left) and len(fraction_stayed) else None
        summary.append((name, int(first[name].sum()), int(escaped.sum()), mixed,
                        permutation_p(escaped, args.permutations, generator),
                        fraction_left.mean() if len(fraction_left) else None,
                        fraction_stayed.mean() if len(fraction_stayed) else None, p_first,
                        *(spearmanr(kl_before[name], counts) if counts.min() < counts.max() else (np.nan, np.nan))))
    write_table(args, rows, summary, train_minutes)


def write_table(args, rows, summary, train_minutes):
    command = "python " + " ".join([os.path.relpath(os.path.abspath(sys.argv[0]))] + sys.argv[1:])
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
    lines = [
        "# The circle's warm starts: does the state at the hand-over decide the escape?",
        "",
        f"Command: `{command}`",
        "",
        (f"The two warm-start rows of train_2d.py on the circle, {args.seeds} seeds from {args.first_seed}, ResNets of 4 blocks x "
         f"{args.hidden} units, train_2d.py's defaults otherwise. Original: each seed trained for {args.steps} steps "
         f"with its own batches, hand-over after {args.lv_warmup}. Copies: the same models at the hand-over, "
         f"{args.replicas} copies each (weights, sigma, Adam's state), each continued for "
         f"{args.steps - args.lv_warmup} steps with batches and noise of its own. Left: final ELBO (train_2d.py's) "
         f"above {ESCAPED} (collapsed: -2.150). Hardware: {hardware()}. Training took {train_minutes:.1f} min."),
        "",
        ("Mixed: seeds whose copies did not all end alike. Permutation p: how often the variance of the seeds' escape "
         f"counts is at least the observed one when all outcomes of the row are shuffled across seeds "
         f"({args.permutations} shuffles; small: the seeds differ more than the noise after the hand-over makes "
         "them). Copies that left: mean fraction over the seeds whose original run left, and over those whose "
         "original stayed, with the one-sided Mann-Whitney p of the first above the second. KL before: the mean "
         f"recorded batch KL (nats per point) in the {args.window} steps up to the hand-over, as circle_handover.py "
         "measures it; its Spearman correlation with the seeds' escape counts, and p."),
        "",
        ("| setting | original runs that left | copies that left | mixed seeds | permutation p | copies that left: "
         "seeds whose original left, stayed | Mann-Whitney p | Spearman (KL before, copies that left), p |"),
        "|---|---|---|---|---|---|---|---|",
        *[f"| {name} | {first} of {args.seeds} | {left} of {args.seeds * args.replicas} | {mixed} of {args.seeds} "
          f"| {p:.3g} | {fmt(f_left, '.2f')}, {fmt(f_stayed, '.2f')} | {fmt(p_first, '.3g')} "
          f"| {rho:.2f}, {p_rho:.2g} |"
          for name, first, left, mixed, p, f_left, f_stayed, p_first, rho, p_rho in summary],
        "",
        "| setting | seed | KL before | original left | copies that left | copies' final ELBO |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    write_file_atomically(args.out, lambda f: f.write("\n".join(lines).encode()))
    print("\n".join(lines[:14]))


if __name__ == "__main__":
    cli = parser.parse_args()
    if not 0 < cli.lv_warmup < cli.steps:
        parser.error(f"--lv-warmup {cli.lv_warmup} must be between 0 and --steps {cli.steps}")
    if cli.replicas < 2 or cli.seeds < 1:
        parser.error("--replicas must be >= 2 and --seeds >= 1")
    main(cli)
