"""Training images/s of train_images.py's models, fp32 eager against the script's defaults, per sigma mode, in one run.

Each row times train_images.py's own training step (`build`, `train_step`: forward, backward, the NaN guard and
fused Adam) on random uint8 images of the dataset's shape, resident on the device as in the script. Rows: `fp32`
(`--dtype fp32 --compile none`, the reference) and `default` (the script's defaults on this device: bf16 autocast and
the whole step as one CUDA graph on one GPU; fp32 eager on the CPU); `--ablations` adds variants of the default for
--sigma learned.
Warm-up steps (which include compilation, timed apart) are not counted. Peak memory is the device's peak allocation
during the timed steps (CUDA only). Writes results/bench_train.md with the hardware.

    python bench/bench_train.py                                     # both datasets, four sigma modes
    python bench/bench_train.py --datasets mnist --ablations        # + variants (compile mode, NLL kernel)
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
TARGETS = {"mnist": 100000, "celeba": 30000}  # images/s on one H200 (MNIST 1,000 epochs in 10 min, CelebA 200 in 18)
EPOCHS = {"mnist": 1000, "celeba": 200}  # the paper's
# Variants of the default for --ablations: what each choice is worth, to choose the defaults by measurement. In
# priority order, each for every dataset before the next: a time box may stop the run (the table keeps what ran).
CONFIGS = {"fp32": ["--dtype", "fp32", "--compile", "none"], "default": []}
# On one GPU the default is the whole step (and Adam) as one CUDA graph (--compile whole-step, since 2026-11-28).
ABLATIONS = {"default, batch 512": ["--batch-size", "512"],
             "reduce-overhead: CUDA graphs of forward and backward only (the default before 2026-11-28)":
                 ["--compile", "reduce-overhead"],
             "reduce-overhead, batch 512": ["--compile", "reduce-overhead", "--batch-size", "512"],
             "default, the Triton NLL kernel inside the compiled step": ["--nll-kernel", "triton"],
             "default, compile default (no CUDA graphs)": ["--compile", "default"],
             "default, no torch.compile": ["--compile", "none"]}

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--datasets", nargs="+", choices=list(TRAIN_IMAGES), default=list(TRAIN_IMAGES),
                    help="default both")
parser.add_argument("--sigmas", nargs="+", choices=list(train_images.SIGMA_NAMES),
                    default=list(train_images.SIGMA_NAMES), help="default all four")
parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                    help="fp32: --dtype fp32 --compile none; default: the script's defaults here (default both)")
parser.add_argument("--ablations", action="store_true",
                    help="also time variants of the default for --sigma learned: " + "; ".join(ABLATIONS))
parser.add_argument("--profile", action="store_true", help="also profile 20 default steps for each dataset "
                    "(LV-VAE; on CUDA MNIST also with --compile reduce-overhead) and write the operations that take "
                    "the most time to profile_train.md beside --out")
parser.add_argument("--batch-size", type=int, default=128, help="images per step (default 128, the script's)")
parser.add_argument("--steps", type=int, default=100, help="timed steps per row (default 100)")
parser.add_argument("--row-seconds", type=float, default=60.0,
                    help="time cap of a row's timed steps: it stops early and counts the steps it took (default 60)")
parser.add_argument("--warmup", type=int, default=15,
                    help="untimed steps first, which include compilation and CUDA graph capture (default 15)")
parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto")
parser.add_argument("--out", default="results/bench_train.md", help="default results/bench_train.md")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step(dataset, sigma, flags, args, device):
    """train_images.py's training step on random images of the dataset's shape: step(i) runs step i; its guard and
    its torch.compile mode."""
    run_args = train_images.parse_args(["--dataset", dataset, "--sigma", sigma, "--device", device.type,
                                        "--batch-size", str(args.batch_size), *flags])
    train_images.resolve_defaults(run_args, device, 1)
    torch.manual_seed(0)
    model, obs, step_module, optimizer = train_images.build(run_args, device)
    guard = train_images.NanGuard(optimizer, 0, device)
    arch = train_images.ARCHITECTURES[dataset]
    shape = (8 * run_args.batch_size, arch["channels"], arch["size"], arch["size"])
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    order = torch.randperm(len(pixels), device=device)[: 8 * run_args.batch_size].view(8, run_args.batch_size)

    step_fn = train_images.step_function(run_args)

    def step(i):
        eps = torch.randn(run_args.batch_size, model.latent_dim, device=device)
        step_fn(step_module, optimizer, guard, pixels[order[i % 8]], eps, run_args.compile == "reduce-overhead")

    return step, guard, f"{run_args.dtype}, compile {run_args.compile}", run_args.batch_size


def time_training(dataset, sigma, flags, args, device):
    """(images/s, compile and warm-up seconds, peak memory in GiB or None, dtype and compile mode, timed steps)."""
    step, guard, mode, batch_size = training_step(dataset, sigma, flags, args, device)
    started = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    synchronize(device)
    warmup_seconds = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started, steps = time.perf_counter(), 0
    while steps < args.steps and (steps % 10 or time.perf_counter() - started < args.row_seconds):
        step(steps)
        steps += 1
    synchronize(device)
    images_per_second = steps * batch_size / (time.perf_counter() - started)
    if guard.read() is not None:
        raise SystemExit(f"error: {dataset} {sigma} {flags}: non-finite step {guard.read()} in the benchmark")
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del step, guard
    torch._dynamo.reset()  # each row compiles afresh; without this the cache limit is soon reached
    return images_per_second, warmup_seconds, memory, mode, steps


def profile_training(dataset, sigma, flags, args, device, steps=20):
    """The operations that take the most time in `steps` steps (after the warm-up), as a Markdown code block."""
    step = training_step(dataset, sigma, flags, args, device)[0]
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


def write_table(rows, planned, args, device):
    """--out with the rows measured so far, of `planned`: rewritten after every row, so a time box keeps them."""
    lines = [
        "# Training throughput of train_images.py: fp32 eager against the defaults",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"Hardware: {hardware(device)}. Batch {args.batch_size} unless the row says otherwise, up to {args.steps} "
        f"timed steps or {args.row_seconds:g} s a row, after {args.warmup} warm-up steps (compilation included there, "
        "in its own column). Random uint8 images of each dataset's "
        "shape; the models are train_images.py's (MNIST 3.1 M parameters, CelebA 40 M). 'Paper-length run' is the "
        f"training time of the paper's epochs ({EPOCHS['mnist']:,} for MNIST's {TRAIN_IMAGES['mnist']:,} images, "
        f"{EPOCHS['celeba']} for CelebA's {TRAIN_IMAGES['celeba']:,}) at this rate, evaluation and checkpoints not "
        f"included. Targets on one H200: MNIST >= {TARGETS['mnist']:,} images/s, CelebA >= {TARGETS['celeba']:,}.",
        "",
    ]
    if device.type != "cuda":
        lines += ["**No CUDA device here: these are CPU figures, and the GPU figures are still to be measured** "
                  "(`python bench/bench_train.py` on a CUDA machine). On a CPU without native bf16, bf16 autocast is "
                  "emulated and slower than fp32, which is why `--dtype auto` is fp32 on the CPU.", ""]
    if len(rows) < planned:
        lines += [f"Rows measured so far: {len(rows)} of {planned} (the run was stopped, or is still running).", ""]
    lines += ["| dataset | setting | configuration (train_images.py flags: dtype, compile) | images/s | vs fp32 "
              "| paper-length run | peak memory | compile + warm-up | timed steps |", "|" + "---|" * 9, *rows, ""]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))


def main(args):
    device = pick_device(args.device)
    rows, fp32_rate = [], {}
    configs = [(d, s, name, CONFIGS[name]) for d in args.datasets for s in args.sigmas for name in args.configs]
    if args.ablations:
        configs += [(d, "learned", name, flags) for name, flags in ABLATIONS.items() for d in args.datasets
                    if device.type == "cuda" or "reduce-overhead" not in flags]  # CUDA graphs need CUDA
    for dataset, sigma, name, flags in configs:
        setting = f"| {dataset} | {train_images.SIGMA_NAMES[sigma]} | {name} (`{' '.join(flags) or 'no flags'}`"
        try:
            rate, warmup, memory, mode, steps = time_training(dataset, sigma, flags, args, device)
        except (Exception, SystemExit) as error:  # one row's failure is a finding, not the end of the table
            rows.append(f"{setting}) | failed: {type(error).__name__}: {(str(error) or '?').splitlines()[0][:150]} "
                        "| | | | | |")
            torch._dynamo.reset()
        else:
            if name == "fp32":
                fp32_rate[dataset, sigma] = rate
            speedup = f"{rate / fp32_rate[dataset, sigma]:.2f}x" if (dataset, sigma) in fp32_rate else "n/a"
            minutes = EPOCHS[dataset] * TRAIN_IMAGES[dataset] / rate / 60
            rows.append(f"{setting}: {mode}) | {rate:,.0f} | {speedup} | {minutes:,.0f} min "
                        f"| {'n/a' if memory is None else f'{memory:.2f} GiB'} | {warmup:.1f} s | {steps} |")
        print(rows[-1], flush=True)
        write_table(rows, len(configs), args, device)
    print(f"wrote {args.out}")
    if args.profile:
        path = os.path.join(os.path.dirname(args.out) or ".", "profile_train.md")
        lines = ["# Where the default training step spends its time (torch.profiler)", "",
                 f"Command: `python {' '.join(sys.argv)}`", "", f"Hardware: {hardware(device)}. Batch "
                 f"{args.batch_size}, after {args.warmup} warm-up steps.", ""]
        profiles = [(dataset, []) for dataset in args.datasets]
        if "mnist" in args.datasets and device.type == "cuda":  # the host-bound one under the old default
            profiles.append(("mnist", ["--compile", "reduce-overhead"]))
        for dataset, flags in profiles:
            lines += profile_training(dataset, "learned", flags, args, device)
            with open(path, "w") as f:
                f.write("\n".join(lines))
        print(f"wrote {path}")


if __name__ == "__main__":
    main(parser.parse_args())
