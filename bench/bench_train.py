"""Training images/s of train_images.py's models, eager fp32 against the fast path, for each sigma mode, in one run.

Each row times train_images.py's own training step (`build_training`, `training_batch`, `forward_backward`, the NaN
guard and Adam's step) on random uint8 images of the dataset's shape, as the script runs it: the eager path copies
each batch from host memory and syncs once a step for its NaN guard; the fast path draws batches from images
resident on the device, with channels_last, bf16 autocast, torch.compile, the fused NLL kernel and fused Adam.
Warm-up steps (which include compilation, timed apart) are not counted. Peak memory is the device's peak allocation
during the timed steps (CUDA only). Writes results/bench_train.md with the hardware.

    python bench/bench_train.py                                     # both datasets, four sigma modes, both paths
    python bench/bench_train.py --datasets mnist --ablations        # + fast-path variants (compile mode, NLL kernel)
    python bench/bench_train.py --device cpu --datasets mnist --sigmas learned --steps 3 --warmup 1
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_images  # noqa: E402
from common import hardware, pick_device  # noqa: E402

TRAIN_IMAGES = {"mnist": 60000, "celeba": 162770}  # one epoch
TARGETS = {"mnist": 100000, "celeba": 9000}  # images/s on one H200 (MNIST 1,000 epochs in 10 min, CelebA 200 in 1 h)
EPOCHS = {"mnist": 1000, "celeba": 200}  # the paper's
# Fast-path variants for --ablations: what each trick is worth, to choose the defaults by measurement.
ABLATIONS = {"fast, compile default (no CUDA graphs)": ["--compile", "default"],
             "fast, no torch.compile": ["--compile", "none"],
             "fast, PyTorch NLL instead of the Triton kernel": ["--nll-kernel", "torch"]}

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--datasets", nargs="+", choices=list(TRAIN_IMAGES), default=list(TRAIN_IMAGES),
                    help="default both")
parser.add_argument("--sigmas", nargs="+", choices=list(train_images.SIGMA_NAMES),
                    default=list(train_images.SIGMA_NAMES), help="default all four")
parser.add_argument("--paths", nargs="+", choices=["eager", "fast"], default=["eager", "fast"],
                    help="eager: --fast off (fp32); fast: --fast on with its defaults (default both)")
parser.add_argument("--ablations", action="store_true",
                    help="also time fast-path variants for --sigma learned: " + "; ".join(ABLATIONS))
parser.add_argument("--profile", action="store_true", help="also profile 20 steps of the fast path for each dataset "
                    "(LV-VAE) and write the operations that take the most time to results/profile_train.md")
parser.add_argument("--batch-size", type=int, default=128, help="images per step (default 128, the script's)")
parser.add_argument("--steps", type=int, default=100, help="timed steps per row (default 100)")
parser.add_argument("--warmup", type=int, default=15,
                    help="untimed steps first, which include compilation and CUDA graph capture (default 15)")
parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto")
parser.add_argument("--out", default="results/bench_train.md", help="default results/bench_train.md")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step(dataset, sigma, flags, args, device):
    """train_images.py's training step on random images of the dataset's shape: step(i) runs step i; its guard and
    its torch.compile mode (None: eager)."""
    run_args = train_images.parse_args(["--dataset", dataset, "--sigma", sigma, "--device", device.type,
                                        "--batch-size", str(args.batch_size), *flags])
    fast = train_images.fast_path(run_args, device)
    mode = train_images.compile_mode(run_args, device)
    torch.manual_seed(0)
    model, obs, train_elbo, optimizer = train_images.build_training(run_args, device)
    parameters = list(model.parameters()) + list(obs.parameters())
    guard = train_images.AsyncGuard(optimizer, 0, device) if fast else None
    arch = train_images.ARCHITECTURES[dataset]
    shape = (8 * args.batch_size, arch["channels"], arch["size"], arch["size"])
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8, device=device if fast else "cpu")

    def step(i):
        index = torch.arange(i % 8 * args.batch_size, (i % 8 + 1) * args.batch_size, device=pixels.device)
        x = train_images.training_batch(pixels, index, fast).to(device)
        eps = torch.randn(args.batch_size, model.latent_dim, device=device)
        loss, _, _, _ = train_images.forward_backward(train_elbo, optimizer, x, eps, mode)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
        if guard is not None:
            guard.update(loss, grad_norm)
        else:  # the eager path's guard reads both flags every step (a sync)
            torch.stack([loss.detach().isfinite(), grad_norm.isfinite()]).tolist()
        optimizer.step()

    return step, guard, mode


def time_training(dataset, sigma, flags, args, device):
    """(images/s, compile and warm-up seconds, peak memory in GiB or None, compile mode) of train_images.py's step."""
    step, guard, mode = training_step(dataset, sigma, flags, args, device)
    started = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    synchronize(device)
    warmup_seconds = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for i in range(args.steps):
        step(i)
    synchronize(device)
    images_per_second = args.steps * args.batch_size / (time.perf_counter() - started)
    if guard is not None and guard.first_bad() is not None:
        raise SystemExit(f"error: {dataset} {sigma} {flags}: non-finite step {guard.first_bad()} in the benchmark")
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del step, guard
    torch._dynamo.reset()  # each row compiles afresh; without this the cache limit is soon reached
    return images_per_second, warmup_seconds, memory, mode


def profile_training(dataset, sigma, flags, args, device, steps=20):
    """The operations that take the most time in `steps` steps (after the warm-up), as a Markdown code block."""
    step, _, _ = training_step(dataset, sigma, flags, args, device)
    for i in range(args.warmup):
        step(i)
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU] + \
        ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as profiler:
        for i in range(steps):
            step(i)
        synchronize(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=70)
    del step
    torch._dynamo.reset()
    return [f"## {dataset}, {train_images.SIGMA_NAMES[sigma]}, `{' '.join(flags)}`: {steps} steps, sorted by "
            f"{sort_by}", "", "```", table.rstrip(), "```", ""]


def main(args):
    device = pick_device(args.device)
    rows, eager_rate = [], {}
    configs = [(d, s, path, ["--fast", "off" if path == "eager" else "on"]) for d in args.datasets
               for s in args.sigmas for path in args.paths]
    if args.ablations:
        configs += [(d, "learned", name, ["--fast", "on", *flags]) for d in args.datasets
                    for name, flags in ABLATIONS.items()]
    for dataset, sigma, name, flags in configs:
        rate, warmup, memory, mode = time_training(dataset, sigma, flags, args, device)
        if name == "eager":
            eager_rate[dataset, sigma] = rate
        speedup = f"{rate / eager_rate[dataset, sigma]:.2f}x" if (dataset, sigma) in eager_rate else "n/a"
        minutes = EPOCHS[dataset] * TRAIN_IMAGES[dataset] / rate / 60
        rows.append(f"| {dataset} | {train_images.SIGMA_NAMES[sigma]} | {name} (`{' '.join(flags)}`; compile: {mode or 'none'}) | {rate:,.0f} "
                    f"| {speedup} | {minutes:,.0f} min | {'n/a' if memory is None else f'{memory:.2f} GiB'} "
                    f"| {warmup:.1f} s |")
        print(rows[-1], flush=True)

    lines = [
        "# Training throughput of train_images.py: eager fp32 against the fast path",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"Hardware: {hardware(device)}. Batch {args.batch_size}, {args.steps} timed steps after {args.warmup} "
        "warm-up steps (compilation included there, in the last column). Random uint8 images of each dataset's "
        "shape; the models are train_images.py's (MNIST 3.1 M parameters, CelebA 40 M). 'Paper-length run' is the "
        f"training time of the paper's epochs ({EPOCHS['mnist']:,} for MNIST's {TRAIN_IMAGES['mnist']:,} images, "
        f"{EPOCHS['celeba']} for CelebA's {TRAIN_IMAGES['celeba']:,}) at this rate, evaluation and checkpoints not "
        f"included. Targets on one H200: MNIST >= {TARGETS['mnist']:,} images/s, CelebA >= {TARGETS['celeba']:,}.",
        "",
    ]
    if device.type != "cuda":
        lines += ["**No CUDA device here: these are CPU figures, and the GPU figures are still to be measured** "
                  "(`python bench/bench_train.py` on a CUDA machine). On a CPU without native bf16 the fast path's "
                  "autocast is emulated and slower than fp32, which is why `--fast auto` leaves it off on the CPU.", ""]
    lines += ["| dataset | setting | path (train_images.py flags) | images/s | vs eager | paper-length run "
              "| peak memory | compile + warm-up |", "|---|---|---|---|---|---|---|---|", *rows, ""]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")
    if args.profile:
        path = os.path.join(os.path.dirname(args.out) or ".", "profile_train.md")
        lines = ["# Where the fast path's training step spends its time (torch.profiler)", "",
                 f"Command: `python {' '.join(sys.argv)}`", "", f"Hardware: {hardware(device)}. Batch "
                 f"{args.batch_size}, after {args.warmup} warm-up steps.", ""]
        for dataset in args.datasets:
            lines += profile_training(dataset, "learned", ["--fast", "on"], args, device)
        with open(path, "w") as f:
            f.write("\n".join(lines))
        print(f"wrote {path}")


if __name__ == "__main__":
    main(parser.parse_args())
