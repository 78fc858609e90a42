"""kernels/gaussian_nll.py: the Triton kernels against the PyTorch reference on CPU (Triton's interpreter), the
reference against gradcheck and common.gaussian_nll, the choice of path and the input checks."""

import ast
import math
import os
import subprocess
import sys
import types

import pytest
import torch

import common
from kernels import gaussian_nll as nll_module
from kernels.gaussian_nll import gaussian_nll, gaussian_nll_reference

# tests/conftest.py turns Triton's CPU interpreter on where there is no GPU; with a GPU it stays off (it would reach
# the compiled training step too) and tests/test_gpu.py runs the kernels on the GPU instead.
needs_triton = pytest.mark.skipif(
    not nll_module.TRITON_AVAILABLE or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton and its CPU interpreter (TRITON_INTERPRET=1, set where no GPU is visible); on a GPU machine "
    "tests/test_gpu.py runs the kernels on the GPU",
)

SHAPES = [(3, 1, 5, 7), (2, 3, 4, 4), (5, 37), (1, 1)]
# Forward sums are fp32 in both paths, from the same inputs, so they agree tightly whatever the input dtype.
# Gradients are computed in fp32 and rounded once to the input dtype; the interpreter rounds fp32 -> bf16 towards
# zero where a GPU and PyTorch round to nearest, so a bf16 gradient may be one unit in the last place (2**-7
# relative) off; fp16 has 2**-10. atol covers gradients near zero, where 1 - z**2 cancels.
FORWARD_TOL = dict(rtol=1e-5, atol=1e-5)
GRADIENT_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
}


def make_inputs(shape, dtype, log_sigma_range=10.0, log_sigma_shape=None, seed=0):
    """x, mean ~ N(0, 1) of `shape`, log_sigma ~ U(-range, range); mean and log_sigma require grad."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).to(dtype)
    mean = torch.randn(shape, generator=generator).to(dtype).requires_grad_()
    log_sigma_shape = shape if log_sigma_shape is None else log_sigma_shape
    log_sigma = ((2 * torch.rand(log_sigma_shape, generator=generator) - 1) * log_sigma_range).to(dtype)
    return x, mean, log_sigma.requires_grad_()


def nll_and_grads(function, x, mean, log_sigma, upstream):
    """Per-sample NLL and d(sum_n upstream_n * nll_n)/d(mean, log_sigma)."""
    nll = function(x, mean, log_sigma)
    return (nll, *torch.autograd.grad((nll * upstream).sum(), (mean, log_sigma)))


def assert_triton_matches_reference(x, mean, log_sigma, gradient_tol):
    upstream = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(1)) + 0.5  # (N,) per-sample weights
    nll, grad_mean, grad_log_sigma = nll_and_grads(
        lambda *inputs: gaussian_nll(*inputs, backend="triton"), x, mean, log_sigma, upstream
    )
    ref_nll, ref_grad_mean, ref_grad_log_sigma = nll_and_grads(gaussian_nll_reference, x, mean, log_sigma, upstream)
    assert nll.dtype == torch.float32 and nll.shape == (x.shape[0],)
    assert grad_mean.dtype == mean.dtype and grad_log_sigma.shape == log_sigma.shape
    torch.testing.assert_close(nll, ref_nll, **FORWARD_TOL)
    torch.testing.assert_close(grad_mean, ref_grad_mean, **gradient_tol)
    torch.testing.assert_close(grad_log_sigma, ref_grad_log_sigma, **gradient_tol)


# --- Triton kernels against the reference ---


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference_extreme_log_sigma(shape, dtype):
    # log_sigma in [-10, 10]: (x - mu) / sigma up to ~1e5, its square ~1e9, still finite in fp32 and bf16.
    assert_triton_matches_reference(*make_inputs(shape, dtype), GRADIENT_TOL[dtype])


@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference_fp16(shape):
    # fp16 tops out at 65504: with log_sigma = -10 the gradient (x - mu) / sigma**2 overflows in both paths alike,
    # so fp16 is checked on [-3, 3]. Train in bf16, not fp16, when sigma gets small.
    assert_triton_matches_reference(*make_inputs(shape, torch.float16, 3.0), GRADIENT_TOL[torch.float16])


@needs_triton
def test_triton_rows_split_into_many_chunks(monkeypatch):
    # Rows longer than one block: 37 = 4 full chunks of 8 and a masked tail of 5; 2 x 3 x 30 x 30 with the default.
    monkeypatch.setattr(nll_module, "MAX_BLOCK_SIZE", 8)
    assert_triton_matches_reference(*make_inputs((5, 37), torch.float32), GRADIENT_TOL[torch.float32])
    monkeypatch.undo()
    assert_triton_matches_reference(*make_inputs((2, 3, 30, 30), torch.float32, 3.0), GRADIENT_TOL[torch.float32])


@needs_triton
def test_triton_non_contiguous_inputs():
    base = torch.randn(6, 5, 4, 3)
    x = base.transpose(1, 3)[::2]  # (3, 3, 4, 5), a transposed view of every other sample
    mean = torch.randn(3, 5, 4, 3).transpose(1, 3).requires_grad_()
    log_sigma = torch.randn(3, 3, 4, 10)[..., 1::2].requires_grad_()  # strided, storage offset 1
    assert not (x.is_contiguous() or mean.is_contiguous() or log_sigma.is_contiguous())
    assert_triton_matches_reference(x, mean, log_sigma, GRADIENT_TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize(
    "log_sigma_shape", [(), (1, 3, 1, 1), (2, 1, 1, 1)], ids=["scalar", "per-channel", "per-sample"]
)
def test_triton_broadcast_log_sigma_gradient_is_reduced(log_sigma_shape):
    # A learned scalar (Eq. 10) or per-channel log_sigma: expanded for the kernel, its gradient summed by autograd.
    inputs = make_inputs((2, 3, 4, 4), torch.float32, 2.0, log_sigma_shape)
    assert_triton_matches_reference(*inputs, dict(rtol=1e-5, atol=1e-4))


@needs_triton
def test_triton_plain_sum_and_gradient_for_x():
    # loss.sum() hands the backward a stride-0 gradient; a requires_grad x gets dl/dx = -dl/dmu.
    x, mean, log_sigma = make_inputs((2, 3, 4, 4), torch.float32, 2.0)
    x.requires_grad_()
    grads = torch.autograd.grad(gaussian_nll(x, mean, log_sigma, backend="triton").sum(), (x, mean, log_sigma))
    ref_grads = torch.autograd.grad(gaussian_nll_reference(x, mean, log_sigma).sum(), (x, mean, log_sigma))
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


# --- memory layout: channels_last read in place ---

def as_layout(tensor, memory_format):
    return tensor.detach().contiguous(memory_format=memory_format).requires_grad_(tensor.requires_grad)


@needs_triton
@pytest.mark.parametrize(
    "shape, x_format, other_format",
    [
        ((2, 3, 4, 5), torch.channels_last, torch.channels_last),
        ((2, 3, 4, 5), torch.contiguous_format, torch.contiguous_format),
        ((2, 1, 4, 5), torch.channels_last, torch.contiguous_format),  # C = 1: other strides, same order in memory
    ],
    ids=["channels-last", "nchw", "one-channel-mixed"],
)
def test_sample_dense_inputs_are_not_copied(shape, x_format, other_format):
    x, mean, log_sigma = make_inputs(shape, torch.float32, 2.0)
    inputs = (as_layout(x, x_format), as_layout(mean, other_format), as_layout(log_sigma, other_format))
    assert all(kernel_input is t for kernel_input, t in zip(nll_module._in_kernel_layout(*inputs), inputs))


@needs_triton
def test_triton_channels_last_matches_contiguous_and_keeps_the_layout():
    x, mean, log_sigma = make_inputs((2, 3, 4, 5), torch.float32, 2.0)
    upstream = torch.tensor([0.7, 1.3])
    triton_nll = lambda *inputs: gaussian_nll(*inputs, backend="triton")  # noqa: E731
    nll, grad_mean, grad_log_sigma = nll_and_grads(triton_nll, x, mean, log_sigma, upstream)
    channels_last = [as_layout(t, torch.channels_last) for t in (x, mean, log_sigma)]
    cl_nll, cl_grad_mean, cl_grad_log_sigma = nll_and_grads(triton_nll, *channels_last, upstream)
    torch.testing.assert_close(cl_nll, nll, **FORWARD_TOL)
    torch.testing.assert_close(cl_grad_mean, grad_mean, **GRADIENT_TOL[torch.float32])
    torch.testing.assert_close(cl_grad_log_sigma, grad_log_sigma, **GRADIENT_TOL[torch.float32])
    assert cl_grad_mean.stride() == cl_grad_log_sigma.stride() == channels_last[1].stride() == (60, 1, 15, 3)


@needs_triton
@pytest.mark.parametrize("log_sigma_shape", [(), (1, 1, 1)], ids=["scalar", "ones"])
def test_triton_channels_last_with_broadcast_log_sigma(log_sigma_shape):
    x, mean, log_sigma = make_inputs((2, 3, 4, 5), torch.float32, 2.0, log_sigma_shape)
    x, mean = as_layout(x, torch.channels_last), as_layout(mean, torch.channels_last)
    # Materialised in x's layout, so x and mean are still read in place.
    kernel_inputs = nll_module._in_kernel_layout(x, mean, log_sigma.expand(x.shape))
    assert kernel_inputs[0] is x and kernel_inputs[1] is mean and kernel_inputs[2].stride() == x.stride()
    assert_triton_matches_reference(x, mean, log_sigma, dict(rtol=1e-5, atol=1e-4))
    grad_mean = torch.autograd.grad(gaussian_nll(x, mean, log_sigma, backend="triton").sum(), mean)[0]
    assert grad_mean.stride() == mean.stride()


@needs_triton
def test_triton_mixed_layouts_are_copied_to_x_layout():
    # The decoder in channels_last, the data in NCHW: mean and log_sigma are copied into x's layout.
    x, mean, log_sigma = make_inputs((2, 3, 4, 5), torch.float32, 2.0)
    mean, log_sigma = as_layout(mean, torch.channels_last), as_layout(log_sigma, torch.channels_last)
    assert_triton_matches_reference(x, mean, log_sigma, GRADIENT_TOL[torch.float32])


# --- custom ops: opcheck and torch.compile ---


@needs_triton
@pytest.mark.parametrize("layout", ["nchw", "channels-last", "strided", "broadcast-log-sigma"])
def test_custom_ops_pass_opcheck(layout):
    # Schema, autograd registration, fake functions (shapes, dtypes and strides against the real outputs) and
    # AOT dispatch, forward and backward op, on CPU tensors through the interpreter.
    x, mean, log_sigma = make_inputs((4, 3, 4, 5), torch.float32, 2.0)
    if layout == "channels-last":
        x, mean, log_sigma = (as_layout(t, torch.channels_last) for t in (x, mean, log_sigma))
    if layout == "strided":
        x, mean, log_sigma = (t.detach()[::2].requires_grad_(t.requires_grad) for t in (x, mean, log_sigma))
    if layout == "broadcast-log-sigma":
        x, mean = as_layout(x, torch.channels_last), as_layout(mean, torch.channels_last)
        log_sigma = torch.zeros((), requires_grad=True).expand(x.shape)
    torch.library.opcheck(nll_module._forward_launch, (x, mean, log_sigma))
    grad_nll = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(1))
    torch.library.opcheck(nll_module._backward_launch, (x, mean.detach(), log_sigma.detach(), grad_nll))


@needs_triton
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit._script")  # raised inside Inductor's own imports
def test_triton_under_torch_compile_fullgraph():
    # fullgraph=True fails on any graph break. The compiled graph calls the two custom ops; the values and gradients
    # must match eager PyTorch. channels_last inputs with a learned scalar log_sigma (Eq. 10), as the GPU training
    # step has.
    def loss(x, raw_mean, log_sigma, backend):
        return gaussian_nll(x, torch.tanh(raw_mean), log_sigma, backend=backend)

    x, raw_mean, _ = make_inputs((2, 3, 4, 5), torch.float32)
    x, raw_mean = as_layout(x, torch.channels_last), as_layout(raw_mean, torch.channels_last)
    log_sigma = torch.tensor(-0.5, requires_grad=True)
    upstream = torch.tensor([0.7, 1.3])
    compiled = torch.compile(lambda *inputs: loss(*inputs, backend="triton"), fullgraph=True)
    nll, grad_raw_mean, grad_log_sigma = nll_and_grads(compiled, x, raw_mean, log_sigma, upstream)
    eager = lambda *inputs: loss(*inputs, backend="torch")  # noqa: E731
    ref_nll, ref_grad_raw_mean, ref_grad_log_sigma = nll_and_grads(eager, x, raw_mean, log_sigma, upstream)
    torch.testing.assert_close(nll, ref_nll, **FORWARD_TOL)
    torch.testing.assert_close(grad_raw_mean, ref_grad_raw_mean, **GRADIENT_TOL[torch.float32])
    torch.testing.assert_close(grad_log_sigma, ref_grad_log_sigma, rtol=1e-5, atol=1e-4)


# --- the reference ---


@pytest.mark.parametrize("log_sigma_shape", [(2, 3, 4), ()], ids=["per-pixel", "scalar"])
def test_reference_gradcheck_float64(log_sigma_shape):
    x, mean, log_sigma = make_inputs((2, 3, 4), torch.float64, 2.0, log_sigma_shape)
    assert torch.autograd.gradcheck(gaussian_nll_reference, (x, mean, log_sigma))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("shape", [(3, 1, 5, 7), (5, 37)], ids=str)
def test_agrees_with_common_gaussian_nll(shape, backend):
    x, mean, log_sigma = make_inputs(shape, torch.float32, 3.0)
    expected = common.gaussian_nll(x, mean, log_sigma, event_dims=x.ndim - 1)
    torch.testing.assert_close(gaussian_nll(x, mean, log_sigma, backend=backend), expected, rtol=1e-5, atol=1e-4)


def test_reference_upcasts_half_precision_to_fp32():
    x, mean, log_sigma = make_inputs((2, 9), torch.bfloat16, 2.0)
    nll = gaussian_nll_reference(x, mean, log_sigma)
    assert nll.dtype == torch.float32
    torch.testing.assert_close(nll, gaussian_nll_reference(x.float(), mean.float(), log_sigma.float()))


# --- the choice of path ---


def fail_if_called(*args):
    raise AssertionError("the Triton launcher ran")


def forbid_triton(monkeypatch):
    # Both ways in: the custom op (traced by torch.compile) and the launcher an eager call runs.
    monkeypatch.setattr(nll_module, "_forward_launch", fail_if_called)
    monkeypatch.setattr(nll_module, "_forward_impl", fail_if_called)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cpu_tensors_take_the_reference_path(monkeypatch, backend):
    # Even with TRITON_INTERPRET=1 set, "auto" keeps CPU tensors on the reference: the interpreter is opt-in.
    forbid_triton(monkeypatch)
    x, mean, log_sigma = make_inputs((2, 3, 4, 4), torch.float32, 2.0)
    expected = gaussian_nll_reference(x, mean, log_sigma)
    torch.testing.assert_close(gaussian_nll(x, mean, log_sigma, backend=backend), expected)


@needs_triton
def test_eager_call_runs_the_launchers_without_the_custom_ops(monkeypatch):
    # Eager calls skip the custom ops' dispatch (host time), but run the same launchers, forward and backward.
    calls = []
    for name in ("_forward_impl", "_backward_impl"):
        launcher = getattr(nll_module, name)
        monkeypatch.setattr(nll_module, name, lambda *inputs, f=launcher, n=name: calls.append(n) or f(*inputs))
    for name in ("_forward_launch", "_backward_launch"):
        monkeypatch.setattr(nll_module, name, fail_if_called)
    x, mean, log_sigma = make_inputs((2, 5), torch.float32, 2.0)
    torch.autograd.grad(gaussian_nll(x, mean, log_sigma, backend="triton").sum(), (mean, log_sigma))
    assert calls == ["_forward_impl", "_backward_impl"]


@needs_triton
def test_torch_compile_traces_the_custom_op_and_agrees_with_the_eager_path():
    graphs = []

    def keep_graph(graph_module, example_inputs):  # a dynamo backend that runs the captured graph as it is
        graphs.append(str(graph_module.graph))
        return graph_module.forward

    x, mean, log_sigma = make_inputs((3, 2, 4, 5), torch.float32, 2.0)
    compiled = torch.compile(lambda *inputs: gaussian_nll(*inputs, backend="triton"), backend=keep_graph)
    upstream = torch.tensor([0.7, 1.3, 1.0])
    results = nll_and_grads(compiled, x, mean, log_sigma, upstream)
    eager_results = nll_and_grads(lambda *inputs: gaussian_nll(*inputs, backend="triton"), x, mean, log_sigma, upstream)
    assert len(graphs) == 1 and "vae.gaussian_nll_fwd" in graphs[0]
    for result, eager_result in zip(results, eager_results):
        torch.testing.assert_close(result, eager_result, rtol=0, atol=0)  # the same kernels on the same inputs


def test_float64_uses_the_reference_and_stays_float64(monkeypatch):
    forbid_triton(monkeypatch)
    assert gaussian_nll(*make_inputs((2, 5), torch.float64, 2.0)).dtype == torch.float64


# --- input checks ---


@pytest.mark.parametrize(
    "x, mean, log_sigma, message",
    [
        (torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3), "mean has shape"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), "does not broadcast"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 2, 3), "does not broadcast"),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3), "one floating dtype"),
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long),
         "one floating dtype"),
        (torch.zeros(2, 3), torch.zeros(2, 3, device="meta"), torch.zeros(2, 3), "one device"),
        (torch.zeros(()), torch.zeros(()), torch.zeros(()), "batch dimension"),
    ],
    ids=["mean-shape", "log-sigma-shape", "log-sigma-too-many-dims", "dtype", "integer", "device", "0-d"],
)
def test_mismatched_inputs_raise_value_error(x, mean, log_sigma, message):
    with pytest.raises(ValueError, match=message):
        gaussian_nll(x, mean, log_sigma)


def test_unknown_backend_raises_value_error():
    with pytest.raises(ValueError, match="backend must be"):
        gaussian_nll(*make_inputs((2, 5), torch.float32), backend="cuda")


def test_backend_triton_without_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(nll_module, "TRITON_AVAILABLE", False)
    inputs = make_inputs((2, 5), torch.float32, 2.0)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        gaussian_nll(*inputs, backend="triton")
    torch.testing.assert_close(gaussian_nll(*inputs), gaussian_nll_reference(*inputs))  # "auto" still works


@needs_triton
def test_backend_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        gaussian_nll(*make_inputs((2, 5), torch.float32), backend="triton")


@needs_triton
def test_backend_triton_rejects_float64():
    with pytest.raises(ValueError, match="backend='torch'"):
        gaussian_nll(*make_inputs((2, 5), torch.float64), backend="triton")


@needs_triton
def test_bench_nll_sweep_runs_every_launch_configuration_and_writes_after_each(monkeypatch):
    """bench/bench_nll.py's --sweep, which needs a GPU to time, is a script: its sweep() and nll_inputs() are taken
    from the file's own source and run with the kernels in the interpreter and a timer that only calls the step once.
    Every configuration must run the real kernels (finite gradients), give one row and rewrite the report; the
    defaults come back."""
    source = open(os.path.join(os.path.dirname(common.__file__), "bench", "bench_nll.py")).read()
    functions = [node for node in ast.parse(source).body
                 if isinstance(node, ast.FunctionDef) and node.name in ("nll_inputs", "sweep")]
    configurations, written = [], []

    def time_ms(step):
        assert all(torch.isfinite(gradient).all() for gradient in step())
        configurations.append((nll_module.MAX_BLOCK_SIZE, nll_module.NUM_WARPS))
        return 1.0, 0.5

    names = dict(args=types.SimpleNamespace(batch_sizes=[2], dtypes=["fp32", "bf16"]), device=torch.device("cpu"),
                 nll_module=nll_module, gaussian_nll=gaussian_nll, torch=torch, math=math, time_ms=time_ms,
                 copy_gbs=1000.0,
                 IMAGE_SHAPES={"celeba": (3, 64, 64)}, DTYPES={"fp32": torch.float32, "bf16": torch.bfloat16},
                 write_report=lambda lines: written.append(list(lines)))
    exec(compile(ast.Module(functions, []), "bench_nll.sweep", "exec"), names)
    names["sweep"](["# the main table"])
    default = (nll_module.MAX_BLOCK_SIZE, nll_module.NUM_WARPS)
    assert len(configurations) == len(written) == 2 * 13 and len(set(configurations)) == 12
    assert configurations[12] == (8192, 16) and default == (8192, None)  # the default again, last; then restored
    rows = [line for line in written[-1] if line.startswith(("| fp32 ", "| bf16 "))]
    assert len(rows) == 26 and written[-1][0] == "# the main table"
    assert sum("(default)" in row for row in rows) == 2 and sum("(default, again)" in row for row in rows) == 2


# bench/bench_nll.py as a GPU runs it, on the CPU: the CUDA calls it makes answer as a machine without CUDA graphs
# would (capture fails: the table keeps the launched times), do_bench calls once, the kernels run in the interpreter.
BENCH_ON_CPU = """
import os, sys, types
import torch, triton.testing
def no_stream(*args, **kwargs):
    raise RuntimeError("no CUDA streams on this CPU")
for name, value in dict(is_available=lambda: True, synchronize=lambda *a: None, memory_allocated=lambda *a: 0,
                        reset_peak_memory_stats=lambda *a: None, max_memory_allocated=lambda *a: 2**20,
                        Stream=no_stream, get_device_properties=lambda d: types.SimpleNamespace(
                            name="a CPU standing in", total_memory=2**30)).items():
    setattr(torch.cuda, name, value)
triton.testing.do_bench = lambda fn, warmup=0, rep=0, return_mode="median": (fn(), 1.0)[1]
source = open("bench/bench_nll.py").read().replace('torch.device("cuda")', 'torch.device("cpu")')
sys.argv = ["bench/bench_nll.py", "--datasets", "mnist", "--batch-sizes", "2", "--dtypes", "fp32", "--methods",
            "eager", "triton", "--copy-mib", "1", "--sweep", "--out", sys.argv[1]]
exec(compile(source, "bench/bench_nll.py", "exec"), {"__name__": "__main__", "__file__": "bench/bench_nll.py"})
"""


@needs_triton
def test_bench_nll_runs_end_to_end_and_rewrites_its_file_after_every_row(tmp_path):
    out = tmp_path / "bench_nll.md"
    result = subprocess.run([sys.executable, "-c", BENCH_ON_CPU, str(out)], cwd=os.path.dirname(common.__file__),
                            capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    assert "| mnist | 2 | fp32 | eager | 1.0000 |" in table and "| mnist | 2 | fp32 | triton | 1.0000 |" in table
    assert "CUDA graph capture failed once: RuntimeError: no CUDA streams on this CPU" in table
    assert table.count("\n| fp32 | ") == 13 and "| fp32 | 8192 | 16 (default, again) |" in table
    # Written after each of the 2 rows, after the table, and after each of the 13 configurations of the sweep.
    assert result.stdout.count(f"wrote {out}") == 2 + 1 + 13


@pytest.mark.skipif(not nll_module.TRITON_AVAILABLE, reason="bench/bench_nll_host.py needs triton")
def test_bench_nll_host_writes_its_three_rows(tmp_path):
    out = tmp_path / "host.md"
    result = subprocess.run([sys.executable, "bench/bench_nll_host.py", "--device", "cpu", "--calls", "20",
                             "--rounds", "2", "--out", str(out)], cwd=os.path.dirname(common.__file__),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    assert "`python bench/bench_nll_host.py --device cpu --calls 20 --rounds 2 --out " in table
    rows = [line.strip("| ").split(" | ") for line in table.splitlines() if line.startswith(("| kernels", "| PyTorch"))]
    assert len(rows) == 3 and all(0 < float(low) <= float(median) <= float(high) for _, median, low, high in rows)
