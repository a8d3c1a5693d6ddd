"""``otseg bench --model``: the head training-step benchmark prints its table
(quick sizes), and its stand-in for the op is what the Sinkhorn share assumes."""

import subprocess
import sys

import pytest
import torch

import otseg
from otseg.benchmark import model as model_bench
from otseg.cli import main


def test_stand_in_is_the_uniform_plan_with_gradients_passed_through():
    S = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    score, plan, info = model_bench._no_sinkhorn(S, return_plan=True, return_info=True)
    assert torch.equal(score, S.sum(-1)) and info.n_iter.shape == (2, 3) and info.backend == model_bench.STUB
    assert torch.allclose(plan, torch.full_like(plan, 1 / 20))
    (plan * S.detach()).sum().backward()
    assert torch.equal(S.grad, S.detach())


def test_inputs_are_seeded_and_realistic():
    a = model_bench.make_inputs(2, "voc20", 4, 32, seed=0)
    b = model_bench.make_inputs(2, "voc20", 4, 32, seed=0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["text"].shape == (20, 6, 512) and a["patches"].shape == (2, 16, 512)
    assert torch.allclose(a["patches"].norm(dim=-1), torch.ones(2, 16)) and a["labels"].shape == (2, 32, 32)
    labels = a["labels"]
    assert (labels[:, :4] == 255).all() and ((labels[:, 4:] >= 0) & (labels[:, 4:] < 20)).all()
    assert all(labels[i][labels[i] != 255].unique().numel() <= 3 for i in range(2))


def test_otseg_bench_model_quick_prints_the_table():
    if not any(s.name == "cpu" and s.available for s in otseg.ops.backends()):
        pytest.skip("the cpu backend is unavailable here: the table would have the reference only")
    cmd = [sys.executable, "-m", "otseg", "bench", "--model", "--quick", "--repeats", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    for word in ("ms/step", "speedup", "Sinkhorn ms", "Sinkhorn share", "iters mean/max", "no Sinkhorn"):
        assert word in out, word
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in out.splitlines() if line.startswith("| ") and "backend" not in line}
    stubs = [f"{model_bench.STUB} (reference loss)", f"{model_bench.STUB} (cpu loss)"]
    assert set(rows) == {"reference", "cpu", *stubs}
    assert rows["reference"][1:3] == ["reference", "reference"] and rows["cpu"][1:3] == ["cpu", "cpu"]
    assert [rows[s][2] for s in stubs] == ["reference", "cpu"]
    assert rows["reference"][4] == "1.00x" and float(rows["cpu"][3]) > 0
    # Four Sinkhorn calls per step (3 decoder layers, the MPS path), each ran >= 1 iteration.
    iters = rows["cpu"][8].split()
    assert len(iters) == 4 and all(float(i.split("/")[0]) >= 1 for i in iters)
    assert "[otseg bench] model:" in proc.stderr


def test_otseg_bench_model_rejects_peers(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--model", "--backends", "pot"])
    assert exc.value.code == 2 and "--model compares otseg backends only" in capsys.readouterr().err
