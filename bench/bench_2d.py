"""Steps per second of the batched ensemble (train_2d.py) against a Python loop over the same models, in one run.

Each of the M models is the paper's 2-D VAE (ResNet MLPs of 4 blocks x 200 units, batch 100, Adam). The ensemble
trains all M as one `MLPVAE` with batched weights; the loop trains M one-member `MLPVAE`s one after the other, each
with its own Adam. Both do the same arithmetic. Writes results/bench_2d.md.

    python bench/bench_2d.py
    python bench/bench_2d.py --members 10 40 --hidden 200 --device cuda
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import LearnedScalarSigma, MLPVAE, elbo_terms, hardware, pick_device  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--members", type=int, nargs="+", default=[10, 40], help="ensemble sizes M (default 10 40)")
parser.add_argument("--hidden", type=int, default=200, help="units per layer (default 200, the paper's)")
parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement (default 20)")
parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto")
parser.add_argument("--out", default="results/bench_2d.md", help="where the table goes (default results/bench_2d.md)")
args = parser.parse_args()
device = pick_device(args.device)


def make(seeds):
    model = MLPVAE(seeds, 2, 2, 2, args.hidden, 4).to(device)
    obs = LearnedScalarSigma((len(seeds), 1, 1)).to(device)
    return model, obs, torch.optim.Adam(list(model.parameters()) + list(obs.parameters()), 1e-3, fused=True)


def step(model, obs, optimizer, x, eps):
    loss = -elbo_terms(model, obs, x, eps)[2].mean(1).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def steps_per_second(run_one_step):
    for _ in range(3):  # warm-up
        run_one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        run_one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps / (time.perf_counter() - started)


rows = []
for members in args.members:
    x, eps = torch.randn(members, 100, 2, device=device), torch.randn(members, 100, 2, device=device)
    ensemble = make(list(range(members)))
    singles = [make([seed]) for seed in range(members)]
    ensemble_rate = steps_per_second(lambda: step(*ensemble, x, eps))
    loop_rate = steps_per_second(lambda: [step(*single, x[m : m + 1], eps[m : m + 1])
                                          for m, single in enumerate(singles)])
    rows.append(f"| {members} | {ensemble_rate:.2f} | {loop_rate:.2f} | {ensemble_rate / loop_rate:.1f}x "
                f"| {ensemble_rate * members:.0f} | {loop_rate * members:.0f} |")
    print(rows[-1], flush=True)

table = "\n".join([
    "# Batched ensemble vs a loop over the same models (2-D VAE, train_2d.py)",
    "",
    f"Command: `python {' '.join(sys.argv)}`",
    "",
    f"Hardware: {hardware(device)}. Model: ResNet MLPs of 4 blocks x {args.hidden} units, "
    f"batch 100, LS-VAE loss, Adam. {args.steps} timed steps after 3 warm-up steps. A step trains all M models once.",
    "",
    "| models M | ensemble steps/s | loop steps/s | speed-up | ensemble model-steps/s | loop model-steps/s |",
    "|---|---|---|---|---|---|",
    *rows,
    "",
])
os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
with open(args.out, "w") as f:
    f.write(table)
print(f"wrote {args.out}")
