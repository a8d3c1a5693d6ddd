"""The triton backend's launches from C++ (csrc/triton/launch.h), checked
without a GPU.

A kernel registered with C++ under a key is launched for every later call
whose arguments give that key, with the parameters C++ packs. So:
- equal keys must mean the launch Triton would make itself: the same
  specialisation of every argument (Triton's own binder, run on the same
  arguments as ``launch_forward`` / ``launch_backward`` pass it) and the same
  constexprs and options;
- the packed parameters must be the kernel's: their sizes are compared with
  the parameters of the PTX entry that Triton compiles for sm_90 from that
  specialisation (the runtime arguments, then Triton's scratch pointers).
The launch itself needs a GPU: the tests marked ``gpu`` below compare the two
routes bitwise (the same kernel on the same arguments), and every Triton GPU
test of tests/test_triton_interpreter.py runs through C++ from the second call
of a kernel variant on.
"""

import itertools
import math
import re

import pytest
import torch

from otseg.ops.mps import fused
from otseg.ops.mps import triton as tb

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.otseg, "triton_launch_args_forward"),
                                reason="otseg._C is not built")


def _kernels():
    # The JIT functions themselves (not the interpreter's): this process has
    # no TRITON_INTERPRET.
    from otseg.kernels import mps as km
    return km._mps_fwd_kernel, km._mps_bwd_kernel


class _Recorder:
    """Stands in for wrap_triton(kernel)[grid]: keeps the launch's arguments."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((args, kwargs))
        return launch


def _launch_args(monkeypatch, launcher, kernel, *args):
    """(kernel, args, kwargs) that ``launcher`` (tb.launch_forward or
    launch_backward) passes to Triton."""
    rec = _Recorder(kernel)
    monkeypatch.setattr(tb, "wrap_triton", lambda k: rec, raising=False)
    launcher(*args)
    assert len(rec.calls) == 1
    return rec.calls[0]


def _target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", 90, 32)


def _triton_view(kernel, args, kwargs):
    """Triton's JIT specialisation of a launch: the cache key's ingredients
    (specialisation, options) and what it compiles from (signature,
    constexprs, attrs)."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(_target())
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    packed = kernel._pack_args(backend, dict(kwargs), bound, spec, options)
    return str(spec) + str(sorted(options.items())), packed


def _forward_case(dtype, P, M, N, max_iter, layout, plan):
    """Flat scores of a layout and the outputs, as _mps_forward_triton makes them."""
    if layout == "contiguous":
        flat = torch.randn(P, M, N, dtype=dtype)
    elif layout == "offset":  # contiguous, but 1 element into its storage
        flat = torch.randn(P * M * N + 1, dtype=dtype)[1:].view(P, M, N)
    elif layout == "transposed":  # [P, N, M] seen as [P, M, N]
        flat = torch.randn(P, N, M, dtype=dtype).transpose(1, 2)
    else:  # padded rows
        flat = torch.randn(P, M, N + 3, dtype=dtype)[..., :N]
    score, plan_t, f, g, n_iter = fused.empty_outputs(flat, plan)
    return flat, score, plan_t if plan else None, f, g, n_iter, max_iter


FORWARD_CASES = [
    (dtype, P, M, N, max_iter, layout, plan)
    for dtype, (P, M, N), max_iter, layout, plan in itertools.product(
        (torch.float32, torch.float16, torch.float64),
        ((3, 37, 8), (2, 16, 4), (1, 1, 1), (4, 5, 3), (2, 1, 16)),
        (1, 16, 100),
        ("contiguous", "offset", "transposed", "padded"),
        (False, True),
    )
]


def _forward_views(monkeypatch):
    fwd, _ = _kernels()
    monkeypatch.setattr(tb, "_mps_fwd_kernel", fwd, raising=False)
    views = []
    for case in FORWARD_CASES:
        flat, score, plan, f, g, n_iter, max_iter = _forward_case(*case)
        key, sizes, vec = torch.ops.otseg.triton_launch_args_forward(flat, score, plan, f, g, n_iter, max_iter,
                                                                      0.05, 1e-6)
        args, kwargs = _launch_args(monkeypatch, tb.launch_forward, fwd, flat, 0.05, max_iter, 1e-6, score, plan, f,
                                    g, n_iter)
        views.append((case, key, sizes, vec, _triton_view(fwd, args, kwargs), (args, kwargs)))
    return views


def _assert_keys_match(pairs, at_least):
    """pairs: (C++ key, Triton's key) of launches. Equal C++ keys must mean
    the same Triton specialisation (else C++ would launch a kernel compiled
    for other arguments); and the per-argument part of the C++ key (without
    the tags of the shape, vector width and optional inputs, which Triton's
    constexprs reflect) must follow Triton's exactly, no finer."""
    by_key, by_triton = {}, {}
    for key, triton_key in pairs:
        by_key.setdefault(key, set()).add(triton_key)
        by_triton.setdefault(triton_key, set()).add(re.sub(r"t-?\d+,", "", key))
    assert all(len(v) == 1 for v in by_key.values()), "a C++ key covers two Triton specialisations"
    assert all(len(v) == 1 for v in by_triton.values()), \
        [v for v in by_triton.values() if len(v) > 1][:3]
    assert len(by_key) >= at_least


def test_forward_keys_match_tritons_specialisation(monkeypatch):
    """C++ keys against Triton's own binder over dtypes, odd shapes, M or N
    equal to 1, max_iter 1 / 16 / 100, aligned and unaligned, strided and
    padded scores, with and without a plan; and the vector width is
    Python's."""
    views = _forward_views(monkeypatch)
    for case, key, sizes, vec, (triton_key, _), (args, kwargs) in views:
        assert vec == kwargs["VEC"], case
    _assert_keys_match([(key, view[0]) for _, key, _, _, view, _ in views], at_least=100)


def test_backward_keys_match_tritons_specialisation(monkeypatch):
    _, bwd = _kernels()
    monkeypatch.setattr(tb, "_mps_bwd_kernel", bwd, raising=False)
    pairs = []
    for dtype, (P, M, N), layout, has_ds, has_dp, dp_layout in itertools.product(
            (torch.float32, torch.bfloat16, torch.float64), ((3, 37, 8), (1, 1, 1), (4, 5, 3), (2, 16, 16)),
            ("contiguous", "offset", "transposed"), (False, True), (False, True), ("contiguous", "transposed")):
        if not (has_ds or has_dp) or (not has_dp and dp_layout != "contiguous"):
            continue
        flat = _forward_case(dtype, P, M, N, 1, layout, False)[0]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        f, g = torch.randn(P, M, dtype=acc), torch.randn(P, N, dtype=acc)
        ds = torch.randn(P, M, dtype=dtype) if has_ds else None
        dp = _forward_case(dtype, P, M, N, 1, dp_layout, False)[0] if has_dp else None
        grad = torch.empty(P, M, N, dtype=dtype)
        key, sizes, vec = torch.ops.otseg.triton_launch_args_backward(ds, dp, flat, f, g, grad, 0.05)
        args, kwargs = _launch_args(monkeypatch, tb.launch_backward, bwd, ds, dp, flat, f, g, 0.05, grad)
        assert vec == kwargs["VEC"]
        pairs.append((key, _triton_view(bwd, args, kwargs)[0]))
    _assert_keys_match(pairs, at_least=50)


def _compile(kernel, packed):
    from triton.compiler import ASTSource, compile as triton_compile
    options, signature, constexprs, attrs = packed
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton_compile(src, target=_target(), options=options.__dict__)


@pytest.mark.parametrize("case", [
    (torch.float32, 3, 37, 8, 100, "contiguous", True),
    (torch.float16, 2, 16, 4, 1, "offset", False),
    (torch.float64, 1, 1, 1, 16, "transposed", True),
], ids=["fp32-plan", "fp16-max_iter1-unaligned", "fp64-M1-N1-strided"])
def test_forward_parameters_are_the_ptx_entrys(monkeypatch, case):
    """The parameters C++ packs have the sizes of those of the kernel Triton
    compiles for the same launch (sm_90, no GPU), followed by Triton's
    pointers; registration accepts exactly that."""
    fwd, _ = _kernels()
    monkeypatch.setattr(tb, "_mps_fwd_kernel", fwd, raising=False)
    flat, score, plan, f, g, n_iter, max_iter = _forward_case(*case)
    key, sizes, _ = torch.ops.otseg.triton_launch_args_forward(flat, score, plan, f, g, n_iter, max_iter, 0.05, 1e-6)
    args, kwargs = _launch_args(monkeypatch, tb.launch_forward, fwd, flat, 0.05, max_iter, 1e-6, score, plan, f, g,
                                n_iter)
    compiled = _compile(fwd, _triton_view(fwd, args, kwargs)[1])
    ptx_sizes = tb._ptx_param_sizes(compiled.asm["ptx"])
    assert ptx_sizes.startswith(sizes) and set(ptx_sizes[len(sizes):]) <= {"8"}, (sizes, ptx_sizes)
    assert tb._unregistrable(compiled) is None
    try:
        assert torch.ops.otseg.triton_launch_register(key, sizes, ptx_sizes, 1, 4, 0) == ""
        assert torch.ops.otseg.triton_launch_register(key, sizes, ptx_sizes[:-3], 1, 4, 0) != ""
        assert torch.ops.otseg.triton_launch_register(key, sizes, "4" + ptx_sizes[1:], 1, 4, 0) != ""
        assert torch.ops.otseg.triton_launch_stats()[0] == 1
    finally:
        torch.ops.otseg.triton_launch_clear()
    assert list(torch.ops.otseg.triton_launch_stats()) == [0, 0, 0, 0]


@pytest.mark.parametrize("has_ds,has_dp", [(True, False), (False, True), (True, True)])
def test_backward_parameters_are_the_ptx_entrys(monkeypatch, has_ds, has_dp):
    _, bwd = _kernels()
    monkeypatch.setattr(tb, "_mps_bwd_kernel", bwd, raising=False)
    P, M, N = 3, 37, 8
    flat = torch.randn(P, M, N)
    f, g = torch.randn(P, M), torch.randn(P, N)
    ds = torch.randn(P, M) if has_ds else None
    dp = torch.randn(P, N, M).transpose(1, 2) if has_dp else None
    grad = torch.empty(P, M, N)
    _key, sizes, _ = torch.ops.otseg.triton_launch_args_backward(ds, dp, flat, f, g, grad, 0.05)
    args, kwargs = _launch_args(monkeypatch, tb.launch_backward, bwd, ds, dp, flat, f, g, 0.05, grad)
    compiled = _compile(bwd, _triton_view(bwd, args, kwargs)[1])
    ptx_sizes = tb._ptx_param_sizes(compiled.asm["ptx"])
    assert ptx_sizes.startswith(sizes) and set(ptx_sizes[len(sizes):]) <= {"8"}, (sizes, ptx_sizes)


def test_ptx_param_sizes():
    ptx = """
.visible .entry _k(
	.param .u64 .ptr .global .align 1 _k_param_0,
	.param .u32 _k_param_1,
	.param .f32 _k_param_2,
	.param .align 8 .b8 _k_param_3[128],
	.param .u64 .ptr .global .align 1 _k_param_4
)
.reqntid 128
{"""
    assert tb._ptx_param_sizes(ptx) == "844?8"
    assert tb._ptx_param_sizes("no entry") == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU launches move to C++")
def test_launch_stats_without_a_gpu():
    stats = tb.launch_stats()
    assert stats["route"].startswith("Python (")
    assert stats["kernels"] == 0 and stats["cpp_forward"] == 0


# ------------------------------------------------------------------ on a GPU

def needs_gpu(fn):
    """Marked ``gpu`` (bench/gpu_check.sh runs ``-m gpu``); skipped without one."""
    skip = pytest.mark.skipif(not torch.cuda.is_available() or not tb.available,
                              reason="needs a CUDA GPU and the Triton kernels")
    return pytest.mark.gpu(skip(fn))


def _routes(scores, return_plan=True, seed=0, **kw):
    """(score, plan or None, grad of the scores) through mps with
    backend="triton", the scores' own layout kept (a view, not a copy)."""
    from otseg.ops import mps
    x = scores.detach().requires_grad_(scores.dtype.is_floating_point and scores.numel() > 0)
    assert x.stride() == scores.stride() and x.storage_offset() == scores.storage_offset()
    out = mps(x, return_plan=return_plan, backend="triton", **kw)
    score, plan = out if return_plan else (out, None)
    if not x.requires_grad:
        return score, plan, None
    gen = torch.Generator(device=scores.device).manual_seed(seed)
    loss = (score * torch.randn(score.shape, device=scores.device, generator=gen, dtype=score.dtype)).sum()
    if plan is not None:
        loss = loss + (plan * torch.randn(plan.shape, device=scores.device, generator=gen, dtype=plan.dtype)).sum()
    loss.backward()
    return score.detach(), None if plan is None else plan.detach(), x.grad


GPU_CASES = [
    pytest.param((4, 20, 1024, 8), torch.float32, "contiguous", True, 50, id="voc-fp32-plan"),
    pytest.param((4, 20, 1024, 8), torch.float32, "contiguous", False, 50, id="voc-fp32-score-only"),
    pytest.param((3, 5, 37, 6), torch.float32, "offset", True, 50, id="odd-offset-fp32"),
    pytest.param((2, 3, 129, 4), torch.float16, "transposed", True, 50, id="odd-transposed-fp16"),
    pytest.param((2, 7, 900, 16), torch.bfloat16, "padded", False, 50, id="N16-padded-bf16"),
    pytest.param((5, 64, 1), torch.float32, "contiguous", True, 50, id="N1-fp32"),
    pytest.param((6, 1, 8), torch.float32, "contiguous", True, 1, id="M1-max_iter1"),
    pytest.param((37, 5), torch.float64, "transposed", True, 50, id="2d-fp64"),
    pytest.param((0, 64, 8), torch.float32, "contiguous", True, 50, id="no-problems"),
]


def _gpu_scores(shape, dtype, layout):
    *batch, M, N = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    full = {"contiguous": (*batch, M, N), "offset": (math.prod(shape) + 1,), "transposed": (*batch, N, M),
            "padded": (*batch, M, N + 3)}[layout]
    base = (0.3 * torch.randn(full, device="cuda", generator=gen)).clamp(-1, 1).to(dtype)
    if layout == "offset":
        return base[1:].view(shape)
    if layout == "transposed":
        return base.transpose(-1, -2)
    return base[..., :N] if layout == "padded" else base


def _assert_same(want, got):
    for a, b in zip(want, got):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            assert torch.equal(a, b)


@needs_gpu
@pytest.mark.parametrize("shape,dtype,layout,plan,max_iter", GPU_CASES)
def test_cpp_launches_give_the_python_launches_results(shape, dtype, layout, plan, max_iter):
    """Forward (score, plan) and backward bitwise the same, with the same
    shapes, strides and dtypes, through C++ as through Python; C++ launches
    from the second call on."""
    from otseg.ops import mps
    scores = _gpu_scores(shape, dtype, layout)
    kw = dict(return_plan=plan, eps=0.05, max_iter=max_iter, tol=1e-6)
    launches = 0 if scores.numel() == 0 else 1
    try:
        assert tb.set_cpp_launch(False) is not None
        want = _routes(scores, **kw)
        assert tb.launch_stats()["cpp_forward"] == 0
        assert tb.set_cpp_launch(True) is None, tb.launch_stats()["route"]
        first = _routes(scores, **kw)  # registers both kernels
        stats = tb.launch_stats()
        assert stats["kernels"] == 2 * launches and not stats["refused"], stats
        assert stats["cpp_forward"] == 0 and stats["python_forward"] == launches, stats
        got = _routes(scores, **kw)
        with torch.inference_mode():
            out = mps(scores, backend="triton", **kw)
        inference = out if plan else (out, None)
        torch.cuda.synchronize()
        stats = tb.launch_stats()
        assert stats["cpp_forward"] == 2 * launches and stats["cpp_backward"] == launches, stats
        assert stats["python_forward"] == launches and stats["cpp_failed"] == 0, stats
    finally:
        tb.set_cpp_launch(True)
    _assert_same(want, first)
    _assert_same(want, got)
    _assert_same(want[:2], inference)


@needs_gpu
def test_cpp_launches_on_the_current_stream_in_a_cuda_graph_and_from_a_new_thread():
    import threading
    from otseg.ops import mps
    scores = _gpu_scores((4, 20, 1024, 8), torch.float32, "contiguous")
    other = _gpu_scores((4, 20, 1024, 8), torch.float32, "transposed").contiguous()
    tb.set_cpp_launch(True)
    want, want_other = mps(scores, backend="triton"), mps(other, backend="triton")  # registers
    # A side stream that must wait for a long kernel on it: a launch on
    # another stream would not.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        busy = torch.randn(4096, 4096, device="cuda")
        for _ in range(20):
            busy = busy @ busy
            busy /= busy.norm()
        staged = scores.clone()
        on_side = mps(staged, backend="triton", check_finite=False)
    torch.cuda.synchronize()
    assert torch.equal(on_side, want)
    # Captured, then replayed on other inputs copied into the captured ones.
    before = tb.launch_stats()["cpp_forward"]
    static = scores.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.otseg.mps_triton(static, 0.05, 100, 1e-6, False)[0]
    assert tb.launch_stats()["cpp_forward"] == before + 1
    static.copy_(other)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, want_other)
    # From a thread that has made no CUDA call yet (the operator first).
    result = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("score", torch.ops.otseg.mps_triton(scores, 0.05, 100, 1e-6, False)[0]))
    thread.start()
    thread.join()
    torch.cuda.synchronize()
    assert torch.equal(result["score"], want)
    assert tb.launch_stats()["cpp_forward"] == before + 2


@needs_gpu
def test_a_refused_kernel_stays_in_python_and_says_so(monkeypatch):
    from otseg.ops import mps
    scores = _gpu_scores((2, 3, 64, 8), torch.float32, "contiguous")
    tb.set_cpp_launch(True)
    monkeypatch.setattr(tb, "_ptx_param_sizes", lambda ptx: "4")
    try:
        want = mps(scores, backend="triton")
        got = mps(scores, backend="triton")
        stats = tb.launch_stats()
        assert stats["kernels"] == 0 and stats["cpp_forward"] == 0 and stats["python_forward"] == 2, stats
        assert len(stats["refused"]) == 1 and "PTX parameters" in next(iter(stats["refused"].values()))
        assert "except 1 kernel variant" in stats["route"]
        assert torch.equal(want, got)
    finally:
        tb.set_cpp_launch(True)


@needs_gpu
def test_dispatch_modes_see_the_python_operators():
    """Under a TorchDispatchMode the launches stay in Python, so that the
    mode sees the Triton operators."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from otseg.ops import mps

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    scores = _gpu_scores((2, 3, 64, 8), torch.float32, "contiguous")
    tb.set_cpp_launch(True)
    mps(scores, backend="triton")
    mps(scores, backend="triton")
    assert tb.launch_stats()["cpp_forward"] == 1
    with Record() as rec:
        mps(scores, backend="triton", check_finite=False)
    assert any("mps_forward_triton" in op for op in rec.ops), rec.ops
    assert tb.launch_stats()["cpp_forward"] == 1
