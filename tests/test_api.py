"""Public API: argument validation, backend discovery and dispatch, and the
SinkhornInfo each call returns (every backend available on the CPU)."""

import importlib
import math
import warnings

import pytest
import torch

import otseg
from otseg import _extension
from otseg.ops import BackendStatus, SinkhornInfo, backends, mps, resolve_backend, sinkhorn

from helpers import hard_scores

# The dispatch module (the name otseg.ops.mps is the function).
dispatch = importlib.import_module("otseg.ops.mps")

CPU_BACKENDS = ["reference", "cpu", "auto"]
FUNCS = {
    "mps": (mps, "scores"),
    "sinkhorn": (sinkhorn, "cost"),
}


def call(func, x, backend, **kw):
    fn, _ = FUNCS[func]
    return fn(x, backend=backend, **kw)


def good(shape=(2, 7, 3), dtype=torch.float32):
    return hard_scores(shape, seed=1, dtype=dtype)


# ------------------------------------------------------------- bad arguments

BAD_SHAPES = {
    "0d": (),
    "1d": (5,),
    "M0": (0, 4),
    "N0": (4, 0),
    "batched-M0": (2, 0, 3),
    "batched-N0": (2, 3, 0),
}


@pytest.mark.parametrize("shape", list(BAD_SHAPES.values()), ids=list(BAD_SHAPES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("func", list(FUNCS))
def test_bad_shape_raises_value_error_naming_argument(func, backend, shape):
    with pytest.raises(ValueError, match=FUNCS[func][1]):
        call(func, torch.zeros(shape), backend)


BAD_DTYPES = [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("func", list(FUNCS))
def test_bad_dtype_raises_type_error_naming_argument(func, backend, dtype):
    with pytest.raises(TypeError, match=FUNCS[func][1]):
        call(func, torch.zeros(2, 4, 3, dtype=dtype), backend)


@pytest.mark.parametrize("func", list(FUNCS))
def test_non_tensor_raises_type_error(func):
    with pytest.raises(TypeError, match=FUNCS[func][1]):
        call(func, [[0.1, 0.2], [0.3, 0.4]], "auto")


BAD_PARAMS = [
    ("eps", 0.0, ValueError),
    ("eps", -0.1, ValueError),
    ("eps", math.nan, ValueError),
    ("eps", math.inf, ValueError),
    ("eps", -math.inf, ValueError),
    ("eps", "0.05", TypeError),
    ("eps", None, TypeError),
    ("eps", True, TypeError),
    ("max_iter", 0, ValueError),
    ("max_iter", -3, ValueError),
    ("max_iter", 2.5, TypeError),
    ("max_iter", None, TypeError),
    ("max_iter", True, TypeError),
    ("tol", -1e-6, ValueError),
    ("tol", math.nan, ValueError),
    ("tol", "0", TypeError),
]


@pytest.mark.parametrize(
    "name,value,exc", [pytest.param(n, v, e, id=f"{n}={v!r}") for n, v, e in BAD_PARAMS]
)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("func", list(FUNCS))
def test_bad_parameter_raises_naming_it(func, backend, name, value, exc):
    with pytest.raises(exc, match=name):
        call(func, good(), backend, **{name: value})


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_numpy_and_integral_parameters_are_accepted(backend):
    np = pytest.importorskip("numpy")
    x = good(dtype=torch.float64)
    a = mps(x, np.float64(0.1), np.int64(7), np.float32(0.0), backend=backend)
    b = mps(x, 0.1, 7, 0.0, backend=backend)
    assert torch.equal(a, b)
    # An integral eps is a real number too.
    assert torch.isfinite(mps(x, 1, 7, backend=backend)).all()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_infinite_tol_stops_after_one_iteration(backend):
    _, info = mps(good(), tol=math.inf, return_info=True, backend=backend)
    assert (info.n_iter == 1).all()


NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("value", list(NONFINITE.values()), ids=list(NONFINITE))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("func", list(FUNCS))
def test_nonfinite_input_raises_value_error(func, backend, value, dtype):
    x = good((3, 9, 4), dtype=dtype)
    x[1, 5, 2] = value
    with pytest.raises(ValueError, match="NaN or inf"):
        call(func, x, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("func", list(FUNCS))
def test_nonfinite_error_names_the_argument(func, backend):
    x = good((3, 9, 4))
    x[1, 5, 2] = math.nan
    with pytest.raises(ValueError, match=rf"\b{FUNCS[func][1]}\b"):
        call(func, x, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("func", list(FUNCS))
def test_check_finite_false_skips_the_check(func, backend):
    x = good((3, 9, 4))
    x[1, 5, 2] = math.nan
    out = call(func, x, backend, check_finite=False)
    assert out.shape[:1] == (3,)


@pytest.mark.parametrize("func", list(FUNCS))
def test_unknown_backend_lists_available_ones(func):
    with pytest.raises(ValueError, match="backend") as exc:
        call(func, good(), "gpu")
    assert "'reference'" in str(exc.value) and "'cpu'" in str(exc.value)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("func", list(FUNCS))
def test_unavailable_backend_says_why_and_lists_available(func, backend):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: unavailability is not guaranteed")
    status = {s.name: s for s in backends()}[backend]
    if status.available:
        pytest.skip(f"{backend} is available here")
    with pytest.raises(ValueError, match=backend) as exc:
        call(func, good(), backend)
    assert "unavailable" in str(exc.value)
    assert "'reference'" in str(exc.value) and "'cpu'" in str(exc.value)


@pytest.mark.parametrize("backend", [None, 3, ("cpu",)], ids=["None", "int", "tuple"])
def test_backend_of_wrong_type_raises_type_error(backend):
    with pytest.raises(TypeError, match="backend"):
        mps(good(), backend=backend)


def test_backend_on_the_wrong_device_raises():
    with pytest.raises(ValueError, match="cpu") as exc:
        resolve_backend("cpu", "cuda")
    assert "cuda" in str(exc.value)
    # A meta tensor is on no device the cpu kernel or the reference runs on.
    meta = torch.empty(2, 7, 3, device="meta")
    for backend in ("cpu", "reference"):
        with pytest.raises(ValueError, match=backend):
            mps(meta, backend=backend)


# ------------------------------------------------------------------ backends


def test_the_cpu_extension_is_built():
    # The suite must fail, not skip, if the extension silently failed to build.
    assert _extension.available, f"otseg._C did not load: {_extension.error}"
    assert _extension.error is None
    assert hasattr(torch.ops.otseg, "mps_forward") and hasattr(torch.ops.otseg, "mps_backward")


def test_backends_lists_every_backend_in_order():
    status = backends()
    assert [s.name for s in status] == ["reference", "cpu", "cuda", "triton"]
    for s in status:
        assert isinstance(s, BackendStatus)
        assert isinstance(s.available, bool)
        assert s.devices and all(d in ("cpu", "cuda") for d in s.devices)
        assert isinstance(s.reason, str) and s.reason
        assert s.name in str(s)
    by_name = {s.name: s for s in status}
    assert by_name["reference"].available
    assert set(by_name["reference"].devices) == {"cpu", "cuda"}
    assert by_name["cpu"].available
    assert by_name["cpu"].devices == ("cpu",)


def test_auto_on_cpu_resolves_to_the_fused_kernel():
    assert resolve_backend("auto", "cpu") == "cpu"
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert resolve_backend("reference", "cpu") == "reference"
    assert resolve_backend("cpu", "cpu") == "cpu"


def test_auto_falls_back_to_the_reference_with_a_warning(monkeypatch):
    monkeypatch.setattr(_extension, "available", False)
    monkeypatch.setattr(_extension, "error", "pretend the extension is missing")
    monkeypatch.setattr(dispatch, "_warned_fallback", set())
    with pytest.warns(RuntimeWarning, match="pretend the extension is missing") as record:
        assert resolve_backend("auto", "cpu") == "reference"
    assert record[0].filename == __file__, "the warning should name the caller's line"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        _, info = mps(good(), return_info=True)
    assert info.backend == "reference"
    with pytest.raises(ValueError, match="unavailable"):
        mps(good(), backend="cpu")


@pytest.mark.parametrize("backend,expected", [("auto", "cpu"), ("cpu", "cpu"), ("reference", "reference")])
@pytest.mark.parametrize("func", list(FUNCS))
def test_info_reports_the_backend_that_ran(func, backend, expected):
    out = call(func, good(), backend, return_info=True)
    info = out[-1]
    assert isinstance(info, SinkhornInfo)
    assert info.backend == expected


# ---------------------------------------------------------- return structure

LAYOUTS = {"MN": (), "PMN": (5,), "BKMN": (2, 3), "2x3x4xMN": (2, 3, 4)}


@pytest.mark.parametrize("batch", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_return_structure_and_n_iter_shape(backend, batch):
    M, N = 7, 3
    x = hard_scores(batch + (M, N), seed=2, dtype=torch.float32)
    score = mps(x, backend=backend)
    assert isinstance(score, torch.Tensor) and score.shape == batch + (M,) and score.dtype == x.dtype
    score, plan = mps(x, return_plan=True, backend=backend)
    assert plan.shape == batch + (M, N) and plan.dtype == x.dtype
    score, info = mps(x, return_info=True, backend=backend)
    assert score.shape == batch + (M,)
    score, plan, info = mps(x, return_plan=True, return_info=True, backend=backend)
    assert info.n_iter.shape == batch
    assert info.n_iter.dtype == torch.int32
    assert info.n_iter.device == x.device
    plan = sinkhorn(x, backend=backend)
    assert plan.shape == batch + (M, N) and plan.dtype == x.dtype
    plan, info = sinkhorn(x, backend=backend, return_info=True)
    assert info.n_iter.shape == batch


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_tol_zero_runs_max_iter_on_every_problem(backend):
    x = hard_scores((3, 2, 11, 4), seed=4, dtype=torch.float64)
    for max_iter in (1, 5, 33):
        _, info = mps(x, max_iter=max_iter, tol=0.0, return_info=True, backend=backend)
        assert (info.n_iter == max_iter).all()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_loose_tol_stops_earlier_than_tight(backend):
    x = hard_scores((2, 37, 6), seed=17)
    counts = [mps(x, 0.05, 10000, tol, return_info=True, backend=backend)[1].n_iter for tol in (1e-2, 1e-5, 1e-10)]
    assert (counts[0] < counts[1]).all() and (counts[1] < counts[2]).all() and (counts[2] < 10000).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_outputs_keep_the_input_dtype(backend, dtype):
    x = hard_scores((2, 9, 4), seed=3, dtype=dtype)
    score, plan = mps(x, max_iter=5, return_plan=True, backend=backend)
    assert score.dtype == plan.dtype == dtype
    assert sinkhorn(1 - x, max_iter=5, backend=backend).dtype == dtype


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_empty_batch_gives_empty_outputs(backend):
    score, plan, info = mps(torch.zeros(0, 5, 3), return_plan=True, return_info=True, backend=backend)
    assert score.shape == (0, 5) and plan.shape == (0, 5, 3) and info.n_iter.shape == (0,)


@pytest.mark.parametrize("eps", [1e-40, 1e-46, 1e40])
@pytest.mark.parametrize("func", list(FUNCS))
def test_eps_outside_float32_raises_where_the_kernel_computes_in_float32(func, eps):
    # The cpu kernel computes float32 (and half) scores in float32, where
    # such an eps is 0 or inf: a clear error, not NaN.
    with pytest.raises(ValueError, match="outside the float32 range"):
        call(func, good(dtype=torch.float32), "cpu", eps=eps)
    with pytest.raises(ValueError, match="outside the float32 range"):
        call(func, good(dtype=torch.float32), "auto", eps=eps)
    # float64 scores are computed in float64.
    x = good(dtype=torch.float64)
    out = call(func, x, "cpu", eps=eps, max_iter=50)
    assert torch.isfinite(out).all()
    if eps > 1:
        # Far beyond every cost the plan is uniform; the reference agrees.
        ref = call(func, x, "reference", eps=eps, max_iter=50)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_huge_max_iter_runs_on_the_fused_kernel():
    # The operator's int is 64 bits and the kernels count in int32: a
    # max_iter beyond both is capped, as no problem runs 2^31 iterations.
    x = good(dtype=torch.float64)
    for max_iter in (2**31, 2**63, 2**70):
        score, info = mps(x, max_iter=max_iter, tol=1e-12, backend="cpu", return_info=True)
        ref, ref_info = mps(x, max_iter=max_iter, tol=1e-12, backend="reference", return_info=True)
        torch.testing.assert_close(score, ref, rtol=1e-9, atol=1e-9)
        assert int(info.n_iter.max()) < 10_000


def test_more_than_64_prompts_on_the_cpu_backend_by_name_is_a_value_error():
    with pytest.raises(ValueError, match=r"cpu takes N <= 64 prompts, got N = 65; use backend='reference'$"):
        mps(good((2, 9, 65)), backend="cpu")


def test_reference_under_vmap_says_why_it_cannot_run():
    x = good((4, 9, 6), dtype=torch.float64)
    for check in (True, False):
        with pytest.raises(RuntimeError, match="reference backend cannot run under torch.vmap"):
            torch.func.vmap(lambda s: mps(s, backend="reference", check_finite=check))(x)
    # The fused backend does, and matches the float64 reference on each problem.
    out = torch.func.vmap(lambda s: mps(s, tol=1e-12, max_iter=1000, backend="cpu"))(x)
    for b in range(4):
        torch.testing.assert_close(out[b], mps(x[b], tol=1e-12, max_iter=1000, backend="reference"),
                                   rtol=1e-9, atol=1e-9)


def test_package_docstring_example_runs():
    scores = hard_scores((2, 3, 64, 6), seed=0, dtype=torch.float32)
    refined = otseg.ops.mps(scores)
    assert refined.shape == (2, 3, 64)
    assert torch.isfinite(refined).all()


@pytest.mark.parametrize("shape,dtype,error,says", [
    ((2, 10, 4), torch.float64, TypeError, "float64"),
    ((2, 10, 17), torch.float32, ValueError, "N <= 16"),
    ((1, 4097, 4), torch.float32, ValueError, "M <= 4096"),
])
def test_cuda_backend_limits_are_checked_in_python(shape, dtype, error, says):
    """Asked for by name, the cuda backend's dtype and size limits raise in
    Python, before the kernel sees the input (checked here on meta tensors;
    test_cuda_kernel.py checks the same through mps on a GPU)."""
    from otseg.ops.mps import _check_takes

    with pytest.raises(error, match=says):
        _check_takes("cuda", torch.empty(shape, dtype=dtype, device="meta"))
    _check_takes("cuda", torch.empty(2, 10, 4, device="meta"))  # fits: no error


def test_mps_checks_the_cuda_backend_before_its_kernel(monkeypatch):
    """mps(..., backend="cuda") raises the cuda backend's dtype, size and
    finiteness errors in Python: the kernel is never called (here a stand-in
    that fails the test, on a machine made to look as if cuda ran)."""
    import sys

    pkg = sys.modules["otseg.ops.mps"]

    def kernel(*args):
        raise AssertionError("the cuda kernel was called")

    monkeypatch.setattr(pkg, "resolve_backend", lambda backend, device: "cuda")
    monkeypatch.setitem(pkg._FUSED, "cuda", kernel)
    with pytest.raises(TypeError, match="float64"):
        mps(torch.rand(2, 10, 4, dtype=torch.float64), backend="cuda")
    with pytest.raises(ValueError, match="N <= 16"):
        mps(torch.rand(2, 10, 17), backend="cuda")
    with pytest.raises(ValueError, match="M <= 4096"):
        mps(torch.rand(1, 4097, 4), backend="cuda")
    x = torch.rand(2, 10, 4)
    x[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        mps(x, backend="cuda")


def test_repeated_calls_skip_the_checks_but_not_their_errors(monkeypatch):
    """A call like an earlier one (same backend asked for, device, dtype,
    M and N, eps, max_iter, tol, check_finite and plan; any batch shape)
    reuses its backend choice without checking its arguments again: the host's
    work before a kernel starts. Anything else, and every call that fails a
    check, goes through the checks and raises their errors."""
    resolved = []
    resolve = dispatch._resolve

    def counting(*args):
        resolved.append(args[5])
        return resolve(*args)

    monkeypatch.setattr(dispatch, "_resolve", counting)
    x = hard_scores((2, 3, 9, 4), dtype=torch.float32)
    first = mps(x, backend="cpu")
    assert torch.equal(mps(x, backend="cpu"), first)
    mps(hard_scores((5, 9, 4), dtype=torch.float32), backend="cpu")  # another batch shape: same choice
    assert len(resolved) == 1
    mps(x, eps=0.1, backend="cpu")
    mps(x.double(), backend="cpu")
    mps(x[..., :3], backend="cpu")
    mps(x, backend="auto")
    mps(x, backend="cpu", check_finite=False)
    mps(x, backend="cpu", return_plan=True)
    sinkhorn(1 - x, backend="cpu")
    assert len(resolved) == 8
    # Equal to cached arguments, but of the wrong type: the checks still run.
    with pytest.raises(TypeError, match="max_iter must be an integer"):
        mps(x, max_iter=100.0, backend="cpu")
    mps(x, max_iter=1, backend="cpu")
    with pytest.raises(TypeError, match="max_iter must be an integer"):
        mps(x, max_iter=True, backend="cpu")
    with pytest.raises(TypeError, match="eps must be a real number"):
        mps(x, eps=[0.05], backend="cpu")  # unhashable
    with pytest.raises(ValueError, match="NaN or inf"):  # the values are checked on every call
        mps(torch.where(x > 0.9, float("nan"), x), backend="cpu")
    n = len(resolved)
    for _ in range(2):  # a failed check is not remembered
        with pytest.raises(ValueError, match="runs on cpu tensors, got a meta tensor"):
            mps(x.to("meta"), backend="cpu")
    assert len(resolved) == n + 2
    before = len(dispatch._resolved)
    dispatch.forget_resolutions()
    assert before > 0 and not dispatch._resolved


def test_auto_warns_at_the_callers_line_when_no_fused_backend_takes_the_input(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned_fallback", set())
    with pytest.warns(RuntimeWarning, match="no fused backend takes this input") as record:
        _, info = mps(hard_scores((2, 9, 70), dtype=torch.float32), return_info=True)
    assert info.backend == "reference"
    assert [w.filename for w in record] == [__file__], "the warning should name the caller's line"


def test_triton_forward_variant_is_eager_only_where_launches_run():
    # The triton forward's register cap (FWD_MAXNREG) goes to eager launches
    # only: torch.compile's tracing would take it for a kernel argument, so a
    # launch on fake or functional tensors, or under any dispatch mode, keeps
    # the traced variant (otseg/ops/mps/triton.py, launch_forward).
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from otseg.ops.mps import triton as tb

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    x = torch.zeros(2, 3, 4)
    assert not tb._traced_launch(x)
    assert tb._traced_launch(torch.nn.Parameter(x))
    with FakeTensorMode() as mode:
        assert tb._traced_launch(mode.from_tensor(x))
    with Passthrough():
        assert tb._traced_launch(x)
    assert not tb._traced_launch(x)


def test_triton_forward_register_cap_only_where_the_threads_can_have_it():
    # An H200 run of 1ce472b failed the largest problem (4096 x 16, 32 warps):
    # 168 registers for 1024 threads exceed an SM's 65536. The cap goes to
    # launches of up to 12 warps (the 1024 x 8 problems it was measured on
    # launch 4), eager ones only; the variant is the same either way, so that
    # compiled and eager calls agree.
    from otseg.ops.mps import triton as tb

    assert tb._blocks(1024, 8).fwd_warps == 4 and tb._blocks(4096, 16).fwd_warps == 32
    assert tb._fwd_variant(4, traced=False) == (tb.FWD_HOLD_S, tb.FWD_MAXNREG)
    assert tb._fwd_variant(12, traced=False) == (tb.FWD_HOLD_S, tb.FWD_MAXNREG)
    assert tb._fwd_variant(16, traced=False) == (tb.FWD_HOLD_S, None)
    assert tb._fwd_variant(32, traced=False) == (tb.FWD_HOLD_S, None)
    assert tb._fwd_variant(4, traced=True) == (tb.FWD_HOLD_S, None)
