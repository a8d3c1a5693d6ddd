"""The benchmark harness: generators behave as the protocol says, and
`otseg bench` prints the table, writes the results file and draws the plot."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from otseg.benchmark.generators import make_scores
from otseg.ops import mps

from helpers import import_bench_script


@pytest.mark.parametrize("case", ["voc", "context"])
def test_clip_scores_converge_in_about_four_reference_iterations(case):
    S = make_scores(case, "clip")
    assert S.dtype == torch.float32 and S.abs().max() <= 1
    _, info = mps(S.double(), backend="reference", return_info=True)
    assert 3 <= int(info.n_iter.flatten()[0]) <= 6


def test_hard_scores_need_many_iterations_and_are_seeded():
    S = make_scores("voc", "hard")
    torch.testing.assert_close(S, make_scores("voc", "hard"), rtol=0, atol=0)
    assert not torch.equal(S, make_scores("voc", "hard", seed=1))
    _, info = mps(S.double(), backend="reference", return_info=True)
    assert int(info.n_iter.flatten()[0]) >= 30


@pytest.mark.slow
def test_otseg_bench_quick_writes_table_results_and_plot(tmp_path):
    cmd = [sys.executable, "-m", "otseg", "bench", "--quick", "--generators", "clip",
           "--backends", "reference,cpu,pot,floor", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = proc.stdout
    for word in ("case", "fwd ms", "speedup fwd", "reference", "cpu", "pot", "floor"):
        assert word in table
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    by_backend = {r["backend"]: r for r in rows}
    assert set(by_backend) == {"reference", "cpu", "pot", "floor"}
    cpu = by_backend["cpu"]
    assert cpu["status"] == "ok" and cpu["fwd_ms"] > 0 and cpu["fwd_bwd_ms"] > 0 and cpu["peak_mb"] > 0
    assert cpu["max_err"] < 1e-4 and cpu["speedup_fwd"] > 1
    assert by_backend["reference"]["speedup_fwd"] == 1.0
    # The floor (scores.sum(-1) under the same harness) is timed, not scored.
    floor = by_backend["floor"]
    assert floor["status"] == "ok" and floor["fwd_bwd_ms"] > 0 and floor["speedup_fwd"] > 1
    assert floor["max_err"] is None and floor["iters_mean"] is None
    assert "floor: not a solver" in (tmp_path / "latest.md").read_text()
    assert cpu["machine"]["cores"] >= 1 and cpu["versions"]["torch"] == torch.__version__
    assert (tmp_path / "latest.md").read_text().count("| voc |") == 4
    assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_otseg_backends_lists_every_backend():
    proc = subprocess.run([sys.executable, "-m", "otseg", "backends"], capture_output=True, text=True, timeout=120,
                          env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    for name in ("reference", "cpu", "cuda", "triton"):
        assert name in proc.stdout


@pytest.mark.parametrize("args, says", [
    (["--cases", "nope"], "nope"),
    (["--generators", "clip,bogus"], "bogus"),
    (["--device", "tpu"], "tpu"),
])
def test_otseg_bench_rejects_bad_arguments_clearly(args, says):
    proc = subprocess.run([sys.executable, "-m", "otseg", "bench", *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert says in proc.stderr


def test_otseg_bench_checks_its_output_folder_before_measuring(tmp_path):
    (tmp_path / "a_file").write_text("")
    out = str(tmp_path / "a_file" / "sub")
    proc = subprocess.run([sys.executable, "-m", "otseg", "bench", "--quick", "--out", out],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "cannot write the results to" in proc.stderr and "a_file" in proc.stderr
    assert "reference" not in proc.stdout  # nothing was measured


def test_bandwidth_column_only_with_a_measured_copy_bandwidth():
    """GPU runs show the forward's GB/s against the copy bandwidth measured in
    the run; CPU runs (no copy bandwidth) have no such column."""
    from otseg.benchmark import report

    row = dict(case="coco16", generator="clip", mode="converged", backend="cuda", status="ok", note="",
               fwd_ms=0.05, fwd_bwd_ms=0.2, peak_mb=10.0, iters_mean=4.0, iters_max=5, max_err=1e-6,
               speedup_fwd=40.0, speedup_fwd_bwd=35.0, fwd_gbs=1720.0, machine=dict(copy_gbs=4300.0))
    gpu = report.format_table([row])
    assert "fwd GB/s (% copy)" in gpu and "1720 (40%)" in gpu
    assert "1720 (40%)" in report.markdown_table([row])
    cpu = dict(row, machine=dict(copy_gbs=None))
    assert "GB/s" not in report.format_table([cpu]) and "GB/s" not in report.markdown_table([cpu])
    failed = dict(row, status="failed", note="OOM")
    assert "1720" not in report.format_table([failed, row]).splitlines()[2]


def test_queued_columns_and_speedups_on_gpu_runs_only():
    """GPU rows carry the queued times; their speedups come from the
    reference's queued times, and CPU tables have no queued columns."""
    from otseg.benchmark import report

    gpu = dict(machine=dict(copy_gbs=4300.0))
    base = dict(case="coco", generator="clip", mode="converged", status="ok", note="", peak_mb=1.0,
                iters_mean=4.0, iters_max=4, max_err=0.0, fwd_gbs=100.0, **gpu)
    ref = dict(base, backend="reference", fwd_ms=1.2, fwd_bwd_ms=4.0, fwd_q_ms=1.2, fwd_bwd_q_ms=3.0)
    cuda = dict(base, backend="cuda", fwd_ms=0.08, fwd_bwd_ms=0.4, fwd_q_ms=0.02, fwd_bwd_q_ms=0.1)
    rows = [ref, cuda]
    report.add_speedups(rows)
    assert cuda["speedup_fwd"] == pytest.approx(15.0) and cuda["speedup_fwd_q"] == pytest.approx(60.0)
    assert cuda["speedup_fwd_bwd"] == pytest.approx(10.0) and cuda["speedup_fwd_bwd_q"] == pytest.approx(30.0)
    table = report.format_table(rows)
    assert "queued speedup fwd+bwd" in table and "60.0x" in table and "30.0x" in table
    cpu_rows = [dict(r, machine=dict(copy_gbs=None)) for r in rows]
    for r in cpu_rows:
        del r["fwd_q_ms"], r["fwd_bwd_q_ms"], r["speedup_fwd_q"], r["speedup_fwd_bwd_q"]
    report.add_speedups(cpu_rows)
    assert "speedup_fwd_q" not in cpu_rows[1]
    assert "queued" not in report.format_table(cpu_rows) and "queued" not in report.markdown_table(cpu_rows)


def test_notes_say_how_the_triton_rows_were_launched():
    """A run with triton rows says which route launched its kernels, with the
    counts of launch_stats(), and which variants were refused; others do not."""
    from otseg.benchmark import report
    from otseg.benchmark.measure import PeakMemory
    from otseg.ops.mps import triton as tb

    env = report.environment(torch.device("cpu"))
    row = dict(case="coco", generator="clip", mode="converged", backend="triton", status="ok", auto_backend="cpu",
               **env)
    assert not any("triton launches" in n for n in report.notes([row], env, PeakMemory(torch.device("cpu")), "step"))
    stats = dict(tb.launch_stats(), route="C++", kernels=3, cpp_forward=40, cpp_backward=20, cpp_failed=0,
                 python_forward=3, python_backward=1, refused={"k": "the kernel needs scratch memory"})
    env["triton_launch"] = stats
    notes = report.notes([dict(row, **env)], env, PeakMemory(torch.device("cpu")), "step")
    line = next(n for n in notes if n.startswith("triton launches"))
    assert line.startswith("triton launches: C++; in this run 40 forward and 20 backward launches from C++ "
                           "(3 kernel variants registered, 0 failed), 3 forward and 1 backward"), line
    assert "(each variant's first call, and every call of a refused variant)" in line, line
    assert "refused: the kernel needs scratch memory" in line, line
    env["triton_launch"] = dict(stats, route="Python (OTSEG_TRITON_LAUNCH=python)", kernels=0, cpp_forward=0,
                                cpp_backward=0, python_forward=64, python_backward=21, refused={})
    notes = report.notes([dict(row, **env)], env, PeakMemory(torch.device("cpu")), "step")
    line = next(n for n in notes if n.startswith("triton launches"))
    assert line == ("triton launches: Python (OTSEG_TRITON_LAUNCH=python); in this run 0 forward and 0 backward "
                    "launches from C++ (0 kernel variants registered, 0 failed), 64 forward and 21 backward through "
                    "Triton's Python launcher (every launch)."), line


def test_queued_ms_times_every_call_and_refuses_no_calls():
    from otseg.benchmark.measure import queued_ms

    calls = []
    ms = queued_ms(lambda: calls.append(time.sleep(0.002)), "cpu", 5)
    assert len(calls) == 6  # one untimed first call
    assert 2.0 <= ms < 50.0
    with pytest.raises(ValueError, match="repeats"):
        queued_ms(lambda: None, "cpu", 0)


def test_gpu_smoke_script_passes_a_correct_backend():
    # bench/gpu_smoke.py, which bench/gpu_check.sh runs before timing
    # anything, on the CPU: the cpu backend in float32 and bfloat16 against
    # itself in float64, run as the check script runs it.
    proc = subprocess.run([sys.executable, "bench/gpu_smoke.py", "cpu", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300,
                          cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("ok   cpu ") for line in lines) == 3, proc.stdout
    assert lines[-1] == "gpu_smoke cpu: passed"


@pytest.mark.parametrize("fault", ["wrong score", "calls differ", "raises"])
def test_gpu_smoke_script_fails_a_wrong_backend(monkeypatch, capsys, fault):
    # The smoke test must fail a backend that returns a wrong result, whose
    # two calls disagree, or that raises, and go on to the next problem.
    smoke = import_bench_script("gpu_smoke")
    run, calls = smoke._run, []

    def faulty(backend, x, w):
        out = run(backend, x, w)
        if x.dtype == torch.float64:  # the float64 cpu reference stays right
            return out
        calls.append(1)
        if fault == "raises":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if fault == "wrong score" or len(calls) % 2 == 0:
            return (out[0] * 1.1,) + out[1:]
        return out

    monkeypatch.setattr(smoke, "_run", faulty)
    assert smoke.main(["cpu", "--device", "cpu", "--small"]) == 1
    text = capsys.readouterr().out
    assert text.count("FAIL cpu ") == len(smoke.SMALL_PROBLEMS), text
    says = {"wrong score": "score err", "calls differ": "the two calls differ",
            "raises": "RuntimeError: CUDA error: an illegal memory access"}[fault]
    assert says in text and "FAILED on 2 problem(s)" in text, text
