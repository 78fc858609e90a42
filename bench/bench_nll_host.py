"""Host time of one forward + backward of the fused Gaussian NLL (Eq. 11): the Python around the Triton kernels.

bench/bench_nll.py times the GPU; this times the host. An eager call (a training step without CUDA graphs, an
evaluation pass) pays the wrapper's Python, dispatch and launches on every call, and when that is longer than the
GPU's work the GPU waits: on an H200 the kernels' call took 0.55-0.69 ms at CelebA N = 4,096 (results/bench_nll.md)
where moving the bytes takes ~0.4 ms. Rows, on tiny inputs (N = 2, MNIST's 1x28x28) so that no arithmetic counts:

- kernels, eager path: kernels.gaussian_nll.gaussian_nll(backend="triton"), which runs the launchers through a plain
  torch.autograd.Function;
- kernels, custom ops: the registered ops vae::gaussian_nll_fwd/_bwd called eagerly, the same launchers behind
  torch.library's dispatch (what an eager call went through before; what torch.compile traces);
- PyTorch reference: gaussian_nll_reference, ~20 small eager ops forward and backward.

On CUDA the kernels launch for real (tiny, so the host sets the pace; the time includes Triton's launcher). On the
CPU there is nothing to launch them on: the two kernels are replaced by launchers that do nothing, so the figure is
the wrapper alone (layout checks, allocations, the partial-sum reduction, autograd, dispatch), and Triton's own
launch (~10-20 us on a GPU host) is left out; the reference runs its real CPU ops. Median of --rounds rounds.
Writes results/bench_nll_host_<device>.md.

    python bench/bench_nll_host.py                        # CPU: the wrapper alone
    python bench/bench_nll_host.py --device cuda          # GPU host: the real launches (bench/gpu_suite.sh, nll)
"""

import argparse
import os
import platform
import statistics
import sys
import time

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto: cuda if there")
parser.add_argument("--calls", type=int, default=2000, help="forward + backward calls per round (default 2000)")
parser.add_argument("--rounds", type=int, default=7, help="timed rounds; the table gives their median (default 7)")
parser.add_argument("--out", default=None, help="default results/bench_nll_host_<device>.md")
args = parser.parse_args()

import torch  # noqa: E402

device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
if device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # lets backend="triton" take CPU tensors; the kernels are replaced below
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels.gaussian_nll as nll_module  # noqa: E402
from common import hardware  # noqa: E402

if not nll_module.TRITON_AVAILABLE:
    sys.exit("bench_nll_host: triton is not installed; the kernels' wrapper has nothing to time (pip install triton)")
if device == "cpu":

    class NoLaunch:  # kernel[grid](...) that does nothing: the CPU has no GPU to launch on
        def __getitem__(self, grid):
            return lambda *arguments, **options: None

    nll_module._gaussian_nll_forward_kernel = nll_module._gaussian_nll_backward_kernel = NoLaunch()

x = torch.rand(2, 1, 28, 28, device=device)  # (N, C, H, W)
mean = torch.rand(2, 1, 28, 28, device=device, requires_grad=True)
log_sigma = torch.rand(2, 1, 28, 28, device=device, requires_grad=True)
ROWS = {
    "kernels, eager path (gaussian_nll, backend='triton')": lambda: nll_module.gaussian_nll(
        x, mean, log_sigma, backend="triton"),
    "kernels, custom ops (vae::gaussian_nll_fwd/_bwd, eager)": lambda: nll_module._forward_launch(x, mean, log_sigma),
    "PyTorch reference (gaussian_nll_reference)": lambda: nll_module.gaussian_nll_reference(x, mean, log_sigma),
}


def microseconds_per_call(nll_function):
    for _ in range(args.calls // 10):  # warm-up: caches, the allocator, Triton's compilation on CUDA
        torch.autograd.grad(nll_function().sum(), (mean, log_sigma))
    rounds = []
    for _ in range(args.rounds):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.calls):
            torch.autograd.grad(nll_function().sum(), (mean, log_sigma))
        if device == "cuda":
            torch.cuda.synchronize()
        rounds.append((time.perf_counter() - start) / args.calls * 1e6)
    return statistics.median(rounds), min(rounds), max(rounds)


results = {name: microseconds_per_call(function) for name, function in ROWS.items()}
machine = hardware() if device == "cpu" else f"{torch.cuda.get_device_name()}, host {hardware()}"  # host: the CPU
versions = f"triton {nll_module.triton.__version__}, Python {platform.python_version()}"
out = args.out or f"results/bench_nll_host_{device}.md"
command = " ".join(["python", "bench/bench_nll_host.py", *sys.argv[1:]])
lines = [
    "# Host time of one forward + backward of the Gaussian NLL (Eq. 11), per call",
    "",
    f"Command: `{command}`",
    "",
    f"Hardware: {machine}, {versions}.",
    "",
    "Inputs (2, 1, 28, 28) fp32 with a per-pixel log_sigma; one call = the per-sample NLL and "
    "`torch.autograd.grad` of its sum with respect to mean and log_sigma. "
    + ("The kernels launched for real on the GPU; tiny inputs, so the host sets the pace (Triton's launch included)."
       if device == "cuda" else
       "On the CPU the two Triton kernels are replaced by launchers that do nothing: the kernel rows are the Python "
       "wrapper alone (checks, layout, allocations, the partial-sum reduction, autograd, dispatch), without Triton's "
       "own launch; the reference row runs its real CPU ops.")
    + f" Median of {args.rounds} rounds of {args.calls} calls (min and max beside it).",
    "",
    "| path | us per call, median | min | max |",
    "|---|---|---|---|",
    *(f"| {name} | {median:.1f} | {low:.1f} | {high:.1f} |" for name, (median, low, high) in results.items()),
]
os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines[-len(results) - 2:]))
print(f"wrote {out}")
