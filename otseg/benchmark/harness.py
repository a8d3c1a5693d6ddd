"""The benchmark run: every otseg backend of the device and the peers, per
(case, generator, mode), against the reference in the same process.

Methods (the ``backend`` column):

- otseg backends (``otseg.ops.backends()``) that run on the device; the
  "reference" is the baseline of the speedups;
- "pot": POT's ``ot.solve_batch(method="log_sinkhorn", grad="autodiff")`` on
  the torch tensors, the refined score taken from its plan;
- "compile": ``torch.compile`` of ``fixed_iteration_mps``, the log-domain loop
  with a fixed number of iterations and no host synchronisation;
- "floor" (only when asked for): not a solver: ``scores.sum(-1)`` in place
  of the Sinkhorn, timed the same way. It reads S once and writes a [B, K,
  M] result, and its backward writes the [B, K, M, N] gradient
  (AccumulateGrad's copy of the expanded gradient): the traffic any backend
  must have, with the loss, the autograd engine and one kernel each way
  around it. On a GPU its times are the harness's own cost, so the
  reference's time over the floor's bounds the speedup any backend can show
  on that row (where the host sets the time, that bound is the host's). On
  the CPU its backward's broadcast copy is slower than the cpu backend's
  whole backward (voc / clip: 5.2 against 1.2 ms forward+backward), so there
  it bounds the forward only. No error or iterations.
"""

import datetime
import functools
import math
import sys
import time
from dataclasses import dataclass

import torch

from .. import ops
from ..ops.mps import BACKEND_NAMES, naive
from . import report
from .generators import CASES, EPS, MODES, make_scores
from .measure import PeakMemory, copy_bandwidth_gbs, median_ms, queued_ms

PEERS = ("pot", "compile")  # run by default
METHOD_NAMES = BACKEND_NAMES + PEERS + ("floor",)
COMPILE_SCOPES = ("step", "loop")
# Fewest calls in a queued-time measurement (CUDA runs).
QUEUED_MIN_CALLS = 10


def _refined_score(scores, plan):
    """``M*N*sum_n T*S`` [..., M] from scores and plan [..., M, N] (SPEC section 1)."""
    M, N = scores.shape[-2:]
    return M * N * (plan * scores).sum(-1)


def _sinkhorn_step(f, g, cost, eps):
    """One log-domain (f, g) update of SPEC section 1, potentials in cost units."""
    M, N = cost.shape[-2:]
    f = eps * math.log(1.0 / M) - eps * torch.logsumexp((g.unsqueeze(-2) - cost) / eps, dim=-1)
    g = eps * math.log(1.0 / N) - eps * torch.logsumexp((f.unsqueeze(-1) - cost) / eps, dim=-2)
    return f, g


def fixed_iteration_mps(scores, eps, n_iter, step=_sinkhorn_step):
    """The reference iterations, exactly ``n_iter`` of them, with no stopping test.

    The torch.compile peer: nothing reads a value on the host, so the whole
    loop can be one graph.

    Args:
        scores: [..., M, N] scores S.
        eps: entropic regularisation.
        n_iter: iterations to run.
        step: the (f, g) update; the "step" compile scope passes a compiled one.

    Returns:
        refined score [..., M].
    """
    cost = 1 - scores
    f = scores.new_zeros(scores.shape[:-1])
    g = scores.new_zeros(scores.shape[:-2] + scores.shape[-1:])
    for _ in range(n_iter):
        f, g = step(f, g, cost, eps)
    return _refined_score(scores, torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / eps))


@dataclass
class Method:
    """One way to compute the refined score.

    Attributes:
        name: the ``backend`` column.
        run: scores [B, K, M, N] -> (refined score [B, K, M], iterations: an
            int, or an int tensor [B, K] per problem).
        note: shown in the table's note column.
        solves: whether ``run`` solves the problem (the floor does not: its
            error and iterations are not reported).
    """

    name: str
    run: callable
    note: str = ""
    solves: bool = True  # False: no error or iterations to report (the floor)


def _otseg_method(backend, mode):
    def run(scores):
        score, info = ops.mps(scores, EPS, mode.max_iter, mode.tol, backend=backend, return_info=True,
                              check_finite=False)
        return score, info.n_iter

    return Method(backend, run)


def _pot_method(mode):
    try:
        import ot
    except ImportError as exc:
        raise ImportError(f"POT is not installed ({exc}); pip install POT") from exc

    def run(scores):
        M, N = scores.shape[-2:]
        res = ot.solve_batch((1 - scores).reshape(-1, M, N), reg=EPS, max_iter=mode.max_iter, tol=mode.tol,
                             method="log_sinkhorn", grad="autodiff")
        # POT's loop index of its last iteration.
        return _refined_score(scores, res.plan.reshape(scores.shape)), int(res.log["n_iter"]) + 1

    return Method("pot", run, f"POT {ot.__version__}")


def _compile_method(mode, n_iter, scope, compiled_step):
    if scope == "step":
        run_score = functools.partial(fixed_iteration_mps, eps=EPS, n_iter=n_iter, step=compiled_step)
    else:
        run_score = torch.compile(lambda scores: fixed_iteration_mps(scores, EPS, n_iter))
    why = " (the reference's count)" if mode.tol > 0 else ""
    return Method("compile", lambda scores: (run_score(scores), n_iter), f"{scope} scope, {n_iter} it{why}")


def _floor_method():
    return Method("floor", lambda scores: (scores.sum(-1), 0),
                  "scores.sum(-1) in place of the Sinkhorn: the harness's own cost, a bound on every speedup",
                  solves=False)


def _make_method(name, mode, device, ref_iters, compile_scope, compiled_step):
    """The Method called ``name`` for one problem.

    Args:
        name: a name from ``METHOD_NAMES``.
        mode: the Mode.
        device: the torch.device of the run.
        ref_iters: iterations the reference ran on this problem (the compile
            peer's count in converged mode).
        compile_scope, compiled_step: the compile peer's scope and, for the
            "step" scope, the compiled update.

    Raises:
        ImportError, ValueError: the method cannot run here (the message says why).
    """
    if name == "pot":
        return _pot_method(mode)
    if name == "floor":
        return _floor_method()
    if name == "compile":
        return _compile_method(mode, ref_iters if mode.tol > 0 else mode.max_iter, compile_scope, compiled_step)
    ops.resolve_backend(name, device)
    return _otseg_method(name, mode)


def _auto_backend(scores, mode):
    """The backend that ``backend="auto"`` runs on ``scores`` (it may depend on
    the input; one forward call when a fused backend is available)."""
    if ops.resolve_backend("auto", scores.device) == "reference":
        return "reference"
    _, info = ops.mps(scores, EPS, mode.max_iter, mode.tol, return_info=True, check_finite=False)
    return info.backend


def _iters(n):
    """(mean, max) of an iteration count: an int or a tensor of counts per problem."""
    if isinstance(n, torch.Tensor):
        n = n.float()
        return n.mean().item(), int(n.max().item())
    return float(n), int(n)


def _measure(method, scores, weight, truth, peak_memory, timing):
    """Forward and forward+backward times, peak memory, iterations and error of one method.

    Args:
        method: the Method.
        scores: [B, K, M, N] float32 scores.
        weight: [B, K, M] weights of the loss ``(score * weight).sum()``.
        truth: [B, K, M] float64 reference refined score.
        peak_memory: a PeakMemory.
        timing: keyword arguments of ``median_ms`` (repeats, budget_s, max_repeats).

    Returns:
        dict of the numbers (the row's measured fields); on a CUDA device also
        ``fwd_q_ms`` and ``fwd_bwd_q_ms``, the times per call of calls queued
        back to back (``measure.queued_ms``), and ``fwd_gbs`` from the queued
        forward time.
    """
    device = scores.device
    fwd_ms, fwd_repeats, fwd_warmup_s, (score, n_iter) = median_ms(lambda: method.run(scores), device, **timing)
    # What a forward must move at the least: read S once, write the refined score.
    fwd_bytes = scores.numel() * scores.element_size() + score.numel() * score.element_size()
    iters_mean, iters_max = _iters(n_iter) if method.solves else (None, None)
    max_err = (score.double() - truth).abs().max().item() if method.solves else None
    del score, n_iter

    x = scores.detach().clone().requires_grad_(True)

    def fwd_bwd():
        x.grad = None
        score, _ = method.run(x)
        (score * weight).sum().backward()

    fwd_bwd_ms, fwd_bwd_repeats, fwd_bwd_warmup_s, _ = median_ms(fwd_bwd, device, **timing)
    queued = {}
    if device.type == "cuda":
        # Calls queued back to back, as in a training loop (measure.queued_ms):
        # the host's work per call overlaps the GPU's.
        queued = dict(fwd_q_ms=queued_ms(lambda: method.run(scores), device, max(fwd_repeats, QUEUED_MIN_CALLS)),
                      fwd_bwd_q_ms=queued_ms(fwd_bwd, device, max(fwd_bwd_repeats, QUEUED_MIN_CALLS)))
    x.grad = None
    peak_mb = peak_memory(fwd_bwd)
    # The bandwidth of the GPU's work: from the queued time where there is one.
    gbs_ms = queued.get("fwd_q_ms", fwd_ms)
    return dict(
        fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms, **queued, peak_mb=peak_mb, iters_mean=iters_mean,
        iters_max=iters_max, max_err=max_err, fwd_gbs=fwd_bytes / (gbs_ms * 1e-3) / 1e9, fwd_repeats=fwd_repeats,
        fwd_bwd_repeats=fwd_bwd_repeats, warmup_s=round(fwd_warmup_s + fwd_bwd_warmup_s, 3),
    )


def _log(msg):
    print(f"[otseg bench] {msg}", file=sys.stderr, flush=True)


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run(cases, generators, modes, methods=None, device="cpu", repeats=None, budget_s=1.0, max_repeats=20,
        seed=0, compile_scope="step", out_dir="bench/results", plot=True, quick=False, command=None):
    """Run the benchmark, print the table and write the results.

    Args:
        cases: case names (keys of ``generators.CASES``).
        generators: generator names ("clip", "hard").
        modes: iteration modes (keys of ``generators.MODES``).
        methods: names from ``METHOD_NAMES`` to run; None (default): the
            peers and the otseg backends that run on ``device`` (unavailable
            ones get a row saying why).
        device: "cpu" or "cuda".
        repeats: timed calls per measurement; None chooses them from
            ``budget_s`` and ``max_repeats`` (after one warm-up call).
        budget_s, max_repeats: see ``measure.median_ms``.
        seed: seed of the score generators and the loss weights.
        compile_scope: "step" compiles one (f, g) update and loops in Python
            (compile time independent of the iterations); "loop" compiles the
            whole unrolled loop (compile time grows with the iterations).
        out_dir: folder of ``results.jsonl``, ``latest.md`` and ``latest.png``.
        plot: draw ``latest.png``.
        quick: recorded in the rows (the caller chose the quick settings).
        command: the command line, shown in ``latest.md``.

    Returns:
        list of row dicts, as appended to ``results.jsonl``.
    """
    device = torch.device(device)
    env = report.environment(device)
    peak_memory = PeakMemory(device)
    if device.type == "cuda":
        # The ceiling of the GB/s column; a field of every row (env).
        env["machine"]["copy_gbs"] = round(copy_bandwidth_gbs(device), 1)
    timing = dict(repeats=repeats, budget_s=budget_s, max_repeats=max_repeats)
    _log(f"{env['machine']['name']}, {env['machine']['torch_threads']} torch threads, torch "
         f"{env['versions']['torch']}, otseg {env['versions']['otseg']}, commit {env['git_commit']}")
    busy = report.busy_warning(env)
    if busy:
        _log(f"WARNING: {busy}")
    _log(f"backend 'auto' prefers {ops.resolve_backend('auto', device)!r} on {device.type} (what it runs on each "
         f"problem is logged below); peak memory: {peak_memory.method}"
         + (f" (self-test: a {PeakMemory.SELF_TEST_MIB} MiB tensor reads {peak_memory.self_test_mib:.1f} MiB)"
            if peak_memory.self_test_mib is not None else ""))

    if methods is None:
        runs_here = {s.name for s in ops.backends() if device.type in s.devices}
        names = [n for n in METHOD_NAMES if n in PEERS or n in runs_here]
    else:
        names = [n for n in METHOD_NAMES if n in methods]
    problems = [(c, g, m) for c in cases for g in generators for m in modes]
    run_id = _now()
    rows = []
    compiled_step = compiled_for = None
    for i, (case_name, gen, mode_name) in enumerate(problems, 1):
        case, mode = CASES[case_name], MODES[mode_name]
        where = f"[{i}/{len(problems)}] {case_name}/{gen}/{mode_name}"
        scores = make_scores(case, gen, seed, device)
        weight = torch.randn(case.shape[:-1], generator=torch.Generator().manual_seed(seed + 1)).to(device)
        with torch.no_grad():
            truth, _, truth_iters = naive.mps(scores.double(), EPS, mode.max_iter, mode.tol)
        auto = _auto_backend(scores, mode)
        _log(f"{where}: float64 reference ran {truth_iters} iterations; backend 'auto' runs {auto!r}")
        # Fresh compile caches per case (per problem for the loop scope, whose
        # graph bakes in the iteration count), under dynamo's recompile limit.
        compile_key = (case_name, gen, mode_name) if compile_scope == "loop" else case_name
        if "compile" in names and compile_key != compiled_for:
            torch._dynamo.reset()
            compiled_step, compiled_for = torch.compile(_sinkhorn_step), compile_key
        base = dict(run_id=run_id, case=case_name, B=case.B, K=case.K, M=case.M, N=case.N, generator=gen,
                    mode=mode_name, eps=EPS, tol=mode.tol, max_iter=mode.max_iter, seed=seed, quick=quick,
                    auto_backend=auto, mem_method=peak_memory.method)
        problem_rows = []
        for name in names:
            row = dict(base, backend=name, status="ok", note="")
            ref_iters = next((r["iters_max"] for r in problem_rows
                              if r["backend"] == "reference" and r["status"] == "ok"), truth_iters)
            try:
                method = _make_method(name, mode, device, ref_iters, compile_scope, compiled_step)
            except (ImportError, ValueError) as exc:
                row.update(status="unavailable", note=str(exc))
                _log(f"{where} {name}: unavailable: {exc}")
            else:
                row["note"] = method.note
                _log(f"{where} {name} ...")
                t0 = time.perf_counter()
                try:
                    row.update(_measure(method, scores, weight, truth, peak_memory, timing))
                except Exception as exc:  # noqa: BLE001  (OOM, a peer's own error: a row says why)
                    row.update(status="failed", note=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
                if row["status"] == "failed":
                    _log(f"{where} {name}: failed: {row['note']}")
                    # After the except block, which kept the failed call's tensors alive.
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                else:
                    _log(f"{where} {name}: fwd {row['fwd_ms']:.2f} ms, fwd+bwd {row['fwd_bwd_ms']:.2f} ms, "
                         f"{time.perf_counter() - t0:.1f} s")
            row["timestamp"] = _now()
            problem_rows.append(row)
        report.add_speedups(problem_rows)
        rows += problem_rows

    if any(r["backend"] == "triton" and r["status"] == "ok" for r in rows):
        # How the triton rows' kernels were launched (C++ or Python), with counts.
        from ..ops.mps import triton as triton_backend

        env["triton_launch"] = triton_backend.launch_stats()
    rows = [dict(r, **env) for r in rows]
    notes = report.notes(rows, env, peak_memory, compile_scope)
    print(report.format_table(rows))
    print("\n".join(notes))
    for path in report.write(rows, env, notes, out_dir, plot, command):
        _log(f"wrote {path}")
    return rows
