"""Benchmark output: the environment of a run, the table (printed and
markdown), the JSON Lines results file and the speedup plot.

Files written to the output folder (default ``bench/results``):

- ``results.jsonl``: one JSON object per measurement, appended run after run;
- ``latest.md``: the table and notes of the last run;
- ``latest.png``: speedups against the reference of the last run.
"""

import importlib.metadata
import json
import os
import platform
import subprocess
import sys

import torch

from .._version import __version__

# (header, row key, format) of the table columns.
COLUMNS = (
    ("case", "case", str),
    ("generator/mode", None, None),
    ("backend", "backend", str),
    ("fwd ms", "fwd_ms", lambda v: _fmt_ms(v)),
    ("fwd+bwd ms", "fwd_bwd_ms", lambda v: _fmt_ms(v)),
    ("peak MB", "peak_mb", lambda v: f"{v:.1f}"),
    ("iters mean/max", None, None),
    ("max err", "max_err", lambda v: f"{v:.1e}"),
    ("fwd GB/s (% copy)", None, None),
    ("speedup fwd", "speedup_fwd", lambda v: _fmt_speedup(v)),
    ("speedup fwd+bwd", "speedup_fwd_bwd", lambda v: _fmt_speedup(v)),
    ("queued fwd ms", "fwd_q_ms", lambda v: _fmt_ms(v)),
    ("queued fwd+bwd ms", "fwd_bwd_q_ms", lambda v: _fmt_ms(v)),
    ("queued speedup fwd", "speedup_fwd_q", lambda v: _fmt_speedup(v)),
    ("queued speedup fwd+bwd", "speedup_fwd_bwd_q", lambda v: _fmt_speedup(v)),
    ("note", None, None),
)
# Columns of GPU runs only: the bandwidth and the queued times (measure.queued_ms).
GPU_COLUMNS = ("fwd GB/s (% copy)", "queued fwd ms", "queued fwd+bwd ms", "queued speedup fwd",
               "queued speedup fwd+bwd")
# The timed quantities whose speedups against the reference are set (row keys
# "<key>_ms"); the queued ones are measured on GPUs only.
QUEUED = ("fwd_q", "fwd_bwd_q")
TIMED = ("fwd", "fwd_bwd") + QUEUED


def _fmt_ms(v):
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def _fmt_speedup(v):
    return f"{v:.0f}x" if v >= 100 else f"{v:.1f}x" if v >= 1 else f"{v:.2f}x"


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(args, cwd):
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        raise OSError(out.stderr.strip())
    return out.stdout.strip()


def git_state():
    """(commit, dirty) of the checkout that holds the otseg package, or ("unknown", None);
    ($OTSEG_GIT_COMMIT, None) when that is set (the commit a copy was made from).

    ``dirty``: uncommitted changes (tracked or not) in otseg/, csrc/, kernels/
    or setup.py.
    """
    if os.environ.get("OTSEG_GIT_COMMIT"):
        # Set by bench/gpu_check.sh: a copy made by a remote runner may carry a stale .git.
        return os.environ["OTSEG_GIT_COMMIT"], None
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        top = _git(["rev-parse", "--show-toplevel"], here)
        commit = _git(["rev-parse", "HEAD"], top)
        dirty = bool(_git(["status", "--porcelain", "--", "otseg", "csrc", "kernels", "setup.py"], top))
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    return commit, dirty


def environment(device):
    """Where and with what a run happens: the fields every results row carries.

    Args:
        device: the torch.device of the run.

    Returns:
        dict with ``device``, ``machine`` (cpu, cores, torch_threads, gpu,
        name, load_avg: the 1-minute load average at the start), ``versions`` (python, torch, triton, POT, numpy, otseg),
        ``git_commit`` and ``git_dirty``.
    """
    cpu, cores = _cpu_model(), os.cpu_count()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    commit, dirty = git_state()
    return dict(
        device=device.type,
        machine=dict(cpu=cpu, cores=cores, torch_threads=torch.get_num_threads(), gpu=gpu,
                     name=gpu or f"{cpu} ({cores} cores)", load_avg=round(os.getloadavg()[0], 2)),
        versions=dict(python=platform.python_version(), torch=torch.__version__, triton=_version("triton"),
                      POT=_version("POT"), numpy=_version("numpy"), otseg=__version__),
        git_commit=commit,
        git_dirty=dirty,
    )


def add_speedups(rows):
    """Set ``speedup_<key>`` (reference time / time) for each key of ``TIMED``
    that the rows have, on the rows of one problem, in place; None where there
    is no measured reference."""
    ref = next((r for r in rows if r["backend"] == "reference" and r["status"] == "ok"), None)
    for r in rows:
        for key in TIMED:
            if key in QUEUED and f"{key}_ms" not in r:
                continue
            ok = ref is not None and r["status"] == "ok" and ref.get(f"{key}_ms") is not None
            r[f"speedup_{key}"] = ref[f"{key}_ms"] / r[f"{key}_ms"] if ok else None


def _columns(rows):
    """COLUMNS, without GPU_COLUMNS unless a row has the copy bandwidth (CUDA runs)."""
    gpu = any(r.get("machine", {}).get("copy_gbs") for r in rows)
    return [c for c in COLUMNS if gpu or c[0] not in GPU_COLUMNS]


def _cells(row, columns=COLUMNS):
    cells = []
    for header, key, fmt in columns:
        if header == "fwd GB/s (% copy)":
            copy = row.get("machine", {}).get("copy_gbs")
            gbs = row.get("fwd_gbs") if row["status"] == "ok" else None
            cells.append("-" if gbs is None or not copy else f"{gbs:.0f} ({gbs / copy:.0%})")
        elif header == "generator/mode":
            cells.append(f"{row['generator']}/{row['mode']}")
        elif header == "iters mean/max":
            cells.append(f"{row['iters_mean']:.1f}/{row['iters_max']}"
                         if row["status"] == "ok" and row.get("iters_mean") is not None else "-")
        elif header == "note":
            cells.append(row["note"] if row["status"] == "ok" else f"{row['status']}: {row['note']}")
        else:
            value = row.get(key)
            cells.append("-" if value is None else fmt(value))
    return cells


def format_table(rows):
    """The rows as an aligned plain-text table."""
    columns = _columns(rows)
    table = [[h for h, _, _ in columns]] + [_cells(r, columns) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows):
    """The rows as a markdown table."""
    columns = _columns(rows)
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r, columns)) + " |" for r in rows]
    return "\n".join(lines)


def busy_warning(env):
    """A warning when other work loaded the machine at the start of a CPU run, else None."""
    machine = env["machine"]
    if env["device"] != "cpu" or machine["load_avg"] < 1.0:
        return None
    return (f"the machine was busy at the start (1-minute load average {machine['load_avg']} on {machine['cores']} "
            "cores): other processes compete with the timed calls, and with several threads a call can stall on "
            "every parallel region, so CPU times are noisy; rerun on an idle machine"
            + (" or with --threads 1." if machine["torch_threads"] > 1 else "."))


def _auto_text(rows):
    picks = dict.fromkeys((f"{r['case']}/{r['generator']}/{r['mode']}", r["auto_backend"]) for r in rows)
    if len({b for _, b in picks}) == 1:
        return f"{next(iter(picks))[1]} on every problem"
    return ", ".join(f"{p}: {b}" for p, b in picks)


def notes(rows, env, peak_memory, compile_scope):
    """The explanations printed under the table and written to ``latest.md``."""
    timer = "CUDA events" if env["device"] == "cuda" else "time.perf_counter"
    busy = busy_warning(env)
    ran = {r["backend"] for r in rows if r["status"] == "ok"}
    lines = ([f"WARNING: {busy}"] if busy else []) + [
        f"Machine: {env['machine']['name']}, torch threads {env['machine']['torch_threads']}, load average "
        f"{env['machine']['load_avg']} at the start; torch "
        f"{env['versions']['torch']}, otseg {env['versions']['otseg']}, commit {env['git_commit']}"
        + (" (uncommitted changes)" if env["git_dirty"] else "") + f". backend='auto' ran {_auto_text(rows)}.",
        f"Times: median of the timed calls ({timer}) after one untimed warm-up call; repeats per measurement are "
        "in results.jsonl (fwd_repeats, fwd_bwd_repeats). fwd+bwd: loss (score * w).sum() with fixed w ~ N(0, 1) "
        "[B, K, M], gradient with respect to the scores.",
        f"Peak MB (MiB) of one fwd+bwd call: {peak_memory.method}"
        + (f"; self-test: a {peak_memory.SELF_TEST_MIB} MiB tensor read {peak_memory.self_test_mib:.1f} MiB"
           if peak_memory.self_test_mib is not None else "")
        + ". It counts the result and the gradient, not the input scores"
        + ("; on the CPU it includes the C allocator's slack, which varies by tens of percent between calls."
           if env["device"] == "cpu" else "."),
        "Max err: max |score - float64 reference| (naive.mps in float64, same eps/tol/max_iter; it stops the "
        "batch on the batch-mean error, fused backends stop each problem on its own).",
        "Speedup: reference time / time, both measured in this run. otseg backends run with check_finite=False "
        "(the published algorithm has no such check).",
        "Iterations: reference: the same for the whole batch; fused backends: per problem; pot: POT tests "
        "max_b ||T 1 - a||_2 < tol every 10 iterations (a host sync each time), a different stopping rule; "
        "compile: a fixed count, in converged mode the reference's count of this problem.",
    ]
    copy = env["machine"].get("copy_gbs")
    if copy:
        lines.append("queued: the mean time per call of at least 10 calls queued back to back, one CUDA event "
                     "before the first and one after the last, as in a training loop: the host prepares the next "
                     "call while the GPU runs the last, so the mean tends to the longer of the two's work per call "
                     "(the reference reads its stopping test on the host every iteration, so it waits each time); "
                     "a host stall in the window counts in full, so it can exceed the median latency. The other "
                     "times are the median latency of one call, the host's work included.")
        lines.append(f"fwd GB/s: the bytes a forward must move at the least (read the float32 scores S once, write "
                     f"the refined score; no plan) / queued fwd time; in brackets, the share of this device's "
                     f"device-to-device copy bandwidth measured at the start of this run, {copy:.0f} GB/s "
                     "(bytes read + written, 1 GiB copy, median of 10).")
    launch = env.get("triton_launch")
    if launch:
        refused = "; ".join(sorted(set(launch["refused"].values())))
        lines.append(
            f"triton launches: {launch['route']}; in this run {launch['cpp_forward']} forward and "
            f"{launch['cpp_backward']} backward launches from C++ ({launch['kernels']} kernel variants registered, "
            f"{launch['cpp_failed']} failed), {launch['python_forward']} forward and {launch['python_backward']} "
            "backward through Triton's Python launcher ("
            + ("each variant's first call" + (", and every call of a refused variant" if refused else "")
               if launch["route"].startswith("C++") else "every launch")
            + ")" + (f"; refused: {refused}" if refused else "") + ".")
    if "compile" in ran:
        scope = ("one compiled (f, g) update called in a Python loop; compile time does not grow with the "
                 "iterations" if compile_scope == "step" else "the whole unrolled loop is one graph")
        lines.append(f"compile: torch.compile of the fixed-iteration loop, {compile_scope} scope ({scope}); compile "
                     "time is in the warm-up, not in the times (warmup_s in results.jsonl).")
    if "floor" in ran:
        lines.append("floor: not a solver: scores.sum(-1) in place of the Sinkhorn, under the same loss, timing and "
                     "autograd. It reads S once, writes the [B, K, M] result and, backward, the [B, K, M, N] "
                     "gradient, one kernel each way: on a GPU the least any backend's call costs in this harness, so "
                     "its speedup column bounds every backend's on the row (where the host sets a call's time, "
                     "that bound is the host's); on the CPU its backward's broadcast copy is slow, and it bounds "
                     "the forward only.")
    if "pot" in ran:
        lines.append("pot: ot.solve_batch(1 - S, reg=eps, method='log_sinkhorn', grad='autodiff') on [B*K, M, N]; "
                     "grad='autodiff' differentiates the plan through the unrolled loop, like the reference.")
    return lines


def write(rows, env, notes, out_dir, plot=True, command=None):
    """Append the rows to ``results.jsonl`` and write ``latest.md`` (and ``latest.png``).

    Args:
        rows: the row dicts of the run.
        env: ``environment()`` of the run.
        notes: lines written under the table.
        out_dir: the output folder (made if missing).
        plot: draw ``latest.png``; skipped with a message if matplotlib is missing.
        command: the command line, shown in ``latest.md``.

    Returns:
        list of the paths written.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.jsonl"), os.path.join(out_dir, "latest.md")]
    with open(paths[0], "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    header = [f"# otseg benchmark, {rows[0]['run_id'] if rows else ''}", ""]
    if command:
        header += [f"Command: `{command}`", ""]
    with open(paths[1], "w") as f:
        f.write("\n".join(header + [markdown_table(rows), ""] + [f"- {n}" for n in notes]) + "\n")
    if plot and any(r.get("speedup_fwd") is not None and r["backend"] != "reference" for r in rows):
        try:
            paths.append(plot_speedups(rows, env, os.path.join(out_dir, "latest.png")))
        except ImportError as exc:
            print(f"[otseg bench] no plot: {exc} (pip install matplotlib)", file=sys.stderr)
    return paths


def plot_speedups(rows, env, path):
    """Grouped bars of the fwd and fwd+bwd speedups against the reference, log axis.

    Args:
        rows: the row dicts of one run.
        env: ``environment()`` of the run (machine and commit in the title).
        path: the PNG file to write.

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = list(dict.fromkeys(f"{r['case']}/{r['generator']}/{r['mode']}" for r in rows))
    methods = list(dict.fromkeys(r["backend"] for r in rows
                                 if r["backend"] != "reference" and r.get("speedup_fwd") is not None))
    fig = Figure(figsize=(max(6.0, 1.6 * len(groups) + 2), 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, sharex=True)
    width = 0.8 / max(1, len(methods))
    for ax, key, title in zip(axes, ("speedup_fwd", "speedup_fwd_bwd"), ("forward", "forward + backward")):
        for j, name in enumerate(methods):
            xs, ys = [], []
            for i, group in enumerate(groups):
                value = next((r[key] for r in rows if r["backend"] == name and r[key] is not None
                              and f"{r['case']}/{r['generator']}/{r['mode']}" == group), None)
                if value is not None:
                    xs.append(i + (j - (len(methods) - 1) / 2) * width)
                    ys.append(value)
            bars = ax.bar(xs, ys, width, label=name)
            ax.bar_label(bars, labels=[_fmt_speedup(y) for y in ys], fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel(f"{title}: speedup vs reference")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[1].set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    axes[0].legend(ncols=max(1, len(methods)), fontsize=8)
    commit = env["git_commit"][:10] + ("+dirty" if env["git_dirty"] else "")
    threads = f", {env['machine']['torch_threads']} threads" if env["device"] == "cpu" else ""
    busy = f" (busy machine: load {env['machine']['load_avg']}, noisy times)" if busy_warning(env) else ""
    fig.suptitle(f"otseg bench on {env['device']}: {env['machine']['name']}{threads}, commit {commit}{busy}",
                 fontsize=9)
    fig.savefig(path, dpi=120)
    return path
