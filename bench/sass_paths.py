"""Reading NVIDIA SASS (``nvdisasm -c`` output) without a GPU: instruction
counts and the instructions of one ordinary iteration of a kernel's main loop.

Shared by ``bench/triton_sass.py`` (the Triton kernels) and
``bench/cuda_ptxas.py --sass`` (the CUDA kernels). No imports beyond the
standard library, so that either script can use it without the other's
toolchain.
"""

import collections
import importlib.util
import os
import re

# A branch to a label: "BRA `(.L_x_3)", also with a second predicate, "BRA P3, `(.L_x_3)".
BRANCH = re.compile(r"\bBRA\s+(?:!?U?P\w+,\s*)?`?\(?(\.L_x_\d+)\)?")
INSTR = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", re.M)
# A function's start in nvdisasm's output: "        .text.<name>:" (its code follows).
_FUNCTION = re.compile(r"^\s*\.text\.(\S+):\s*$", re.M)


def triton_tool(name):
    """A CUDA binary tool (nvdisasm, cuobjdump) from the Triton wheel
    (backends/nvidia/bin), without importing Triton; None where there is
    none."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", name)
    return path if os.path.isfile(path) else None


def op_counts(sass):
    """Counter of the opcodes (FFMA, MUFU, SHFL, BAR, ...) in ``sass``."""
    return collections.Counter(op for _, op in INSTR.findall(sass))


def functions(sass):
    """{name: its SASS} for each function of an ``nvdisasm`` listing."""
    marks = list(_FUNCTION.finditer(sass))
    return {m.group(1): sass[m.end():(marks[k + 1].start() if k + 1 < len(marks) else len(sass))]
            for k, m in enumerate(marks)}


def _loop_paths(sass):
    """The paths through the main loop of a Sinkhorn forward, from the loop
    head (the target of the longest backward branch before the first EXIT)
    to the back edge: {(with a shuffle, with an exponential): (fewest,
    most instructions)} over the paths of each kind; None where there is no
    loop.

    One pass over the loop's lines in order (its forward branches make it a
    DAG), keeping for each line and kind of path the shortest and longest
    way there: linear in the loop's length, where walking every path took
    minutes on the CUDA kernels' many branches."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^\s*(\.L_x_\d+):", line))}
    branches = [(i, m.group(1)) for i, line in enumerate(lines) if (m := BRANCH.search(line))]
    # The loop's back edge: the longest backward branch before the first EXIT
    # (after it come out-of-line blocks that jump back into the body).
    first_exit = next((i for i, line in enumerate(lines) if re.search(r"\bEXIT\b", line)), len(lines))
    back = [(i, t) for i, t in branches if t in labels and labels[t] < i - 1 and i < first_exit]
    if not back:
        return None
    end, head = max(back, key=lambda b: b[0] - labels[b[1]])
    # arriving[i]: {(shuffled, exponential) so far: (fewest, most) instructions issued before line i}
    arriving = {labels[head]: {(False, False): (0, 0)}}
    for i in range(labels[head], end + 1):
        states = arriving.pop(i, None)
        if not states:
            continue
        line = lines[i]
        nexts = [i + 1]
        if INSTR.match(line):
            shfl, exp = "SHFL" in line, "MUFU.EX2" in line
            after = {}
            for (shuffled, exped), (lo, hi) in states.items():
                key = (shuffled or shfl, exped or exp)
                old = after.get(key)
                after[key] = (lo + 1, hi + 1) if old is None else (min(old[0], lo + 1), max(old[1], hi + 1))
            states = after
            m = BRANCH.search(line)
            if m and m.group(1) in labels and i < labels[m.group(1)] <= end:
                target = labels[m.group(1)]
                # Unconditional (or @PT): jump; @!PT: never taken; else taken or not.
                pred = re.search(r"@(!?)(U?P\w+)\s+BRA\s", line)
                if pred is None or pred.group(2) == "PT":
                    nexts = [i + 1] if pred is not None and pred.group(1) else [target]
                else:
                    nexts = [target, i + 1]
        if i == end:
            return states  # the back edge: every path ends here
        for j in nexts:
            slot = arriving.setdefault(j, {})
            for key, (lo, hi) in states.items():
                old = slot.get(key)
                slot[key] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
    return {}


def iteration_path(sass):
    """Instructions a thread issues in one ordinary iteration of the main
    loop of a Sinkhorn forward, along the path an iteration without
    absorption takes: of all the paths through the loop (_loop_paths), the
    longest with shuffles (the column sums of a sweep) and no exponential
    (MUFU.EX2: a log-domain rebuild of K, which the first iteration and an
    absorption run). None where there is no loop or no such path."""
    paths = _loop_paths(sass)
    hit = (paths or {}).get((True, False))
    return hit[1] if hit else None


def first_iteration_path(sass):
    """Instructions a thread issues in the first iteration of the main loop
    of a Sinkhorn forward, which every problem runs: the log-domain rebuild
    of K (exponentials) and the column sums, without an absorption or a
    check that a flag turns on: the shortest path through the loop with an
    exponential (in our forwards the other paths with exponentials, a sweep
    followed by an absorption, are longer). Where rows past M are skipped
    under a branch (the CUDA kernels that read the scores again from
    memory), the shortest path skips them too: an undercount there. None
    where there is no loop or no such path."""
    paths = _loop_paths(sass) or {}
    lows = [lo for (_, exped), (lo, _) in paths.items() if exped]
    return min(lows) if lows else None
