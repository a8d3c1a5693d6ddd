"""``otseg bench --model``: one training step of the OTSeg head with each
otseg backend against the reference, measured in the same run.

The step is what training does after the image encoder: relation descriptor,
the 3-layer MPSA decoder, the MPS path, upsampling to the label size, focal +
dice losses on both paths, backward, and an AdamW step over the head's
parameters. The head's logits stay on the token grid and the loss upsamples
them (``otseg.model.losses``): the backend's fused loss
(``otseg.ops.mask_stats``, which never forms the upsampled logits: C++ for
the ``cpu`` backend, Triton for ``cuda`` and ``triton``), PyTorch for the
reference. Sizes are SPEC's COCO-Stuff ones (B=4,
K=171, N=8, M=1024 = 32x32 tokens, D=512, 512 x 512 labels); every Sinkhorn
runs with eps 0.05, tol 1e-6, at most 100 iterations.

Inputs (seeded): the shipped COCO-Stuff text embeddings, random normalised
global embeddings and patch tokens, and a label map with a few classes per
image and some ignored pixels. Dropout is on (training).

The Sinkhorn share of a step is measured by difference: the same step is
timed with ``otseg.ops.mps`` replaced by a stand-in that costs almost nothing
(the uniform plan ``T = 1/(M N)`` and ``S* = sum_n S``, gradients passed
through), so that everything else (projections, einsums, FFNs, upsampling,
losses, their backward, AdamW) stays: ``Sinkhorn ms = step - stand-in step``,
the op's forward, backward and dispatch, with one stand-in step per loss
implementation (each backend is paired with the one that runs its loss). The
variants are timed in turns (one step each per round) so that drift on a
shared machine hits them alike, and the speedups and differences are taken
round by round.
"""

import contextlib
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F

from .. import ops
from ..data import load_text_embeddings
from ..model.head import OTSegHead
from ..model.losses import otseg_loss
from ..ops.mask_stats import loss_backend
from ..nn.mpsa import sinkhorn_modules
from ..ops.mps import BACKEND_NAMES
from . import report
from .harness import _log
from .measure import synchronize, time_calls

__all__ = ["run", "make_inputs", "format_table", "BACKEND_NAMES", "STUB"]

# (B, dataset, grid h = w, image size, FFN width) of the full and the quick run.
FULL = dict(B=4, dataset="cocostuff171", grid=32, image=512, ffn_dim=2048, repeats=3)
QUICK = dict(B=1, dataset="voc20", grid=8, image=64, ffn_dim=2048, repeats=2)
EPS, TOL, MAX_ITER = 0.05, 1e-6, 100
NUM_LAYERS, DROPOUT, LR, WEIGHT_DECAY = 3, 0.1, 2e-4, 0.01
STUB = "no Sinkhorn"


def _no_sinkhorn(scores, eps=EPS, max_iter=MAX_ITER, tol=TOL, *, return_plan=False, backend="auto",
                 return_info=False, check_finite=True):
    """Stand-in for ``otseg.ops.mps``: the uniform plan and its refined score ``sum_n S``.

    The plan's value is the constant ``1/(M N)`` but its gradient passes to the
    scores unchanged, so that the backward of the attention's value
    aggregation still runs as with a real plan.
    """
    M, N = scores.shape[-2:]
    out = (scores.sum(-1),)
    if return_plan:
        out += (scores - scores.detach() + 1.0 / (M * N),)
    if return_info:
        out += (ops.SinkhornInfo(torch.zeros(scores.shape[:-2], dtype=torch.int32), STUB),)
    return out[0] if len(out) == 1 else out


def make_inputs(B, dataset, grid, image, seed=0, device="cpu"):
    """Seeded inputs of the head.

    Returns:
        dict: g [B, 512], patches [B, M, 512] (normalised Gaussian), text
        [K, N, 512] (shipped embeddings), labels [B, image, image] int64
        (3 classes per image in 4x4 blocks of the image, the top eighth ignored).
    """
    gen = torch.Generator().manual_seed(seed)
    text = load_text_embeddings(dataset)
    K, _, D = text.shape
    g = F.normalize(torch.randn(B, D, generator=gen), dim=-1)
    patches = F.normalize(torch.randn(B, grid * grid, D, generator=gen), dim=-1)
    present = torch.stack([torch.randperm(K, generator=gen)[:3] for _ in range(B)])  # [B, 3]
    blocks = torch.gather(present, 1, torch.randint(0, 3, (B, 16), generator=gen)).view(B, 4, 4)
    labels = blocks.repeat_interleave(image // 4, 1).repeat_interleave(image // 4, 2)
    labels = F.pad(labels, (0, image - labels.shape[2], 0, image - labels.shape[1]), value=255)
    labels[:, : image // 8] = 255
    return {k: v.to(device) for k, v in dict(g=g, patches=patches, text=text, labels=labels).items()}


def _stub_name(loss):
    return f"{STUB} ({loss} loss)"


class _Trainer:
    """One head, its optimizer and its training step.

    ``backend`` is an otseg backend, or STUB for the Sinkhorn stand-in with
    the loss implementation ``loss`` ("cpu", "triton" or "reference").
    """

    def __init__(self, backend, inputs, grid, ffn_dim, seed, device, loss=None):
        self.backend = backend
        self.loss_backend = loss if backend == STUB else loss_backend(backend, device)
        self.name = _stub_name(self.loss_backend) if backend == STUB else backend
        torch.manual_seed(seed)
        D = inputs["text"].shape[-1]
        self.head = OTSegHead(D, NUM_LAYERS, ffn_dim, DROPOUT, EPS, MAX_ITER, TOL,
                              "reference" if backend == STUB else backend).to(device).train()
        for m in sinkhorn_modules(self.head):
            m.record_info = True
        self.opt = torch.optim.AdamW(self.head.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        self.inputs, self.grid = inputs, (grid, grid)
        self.times = []
        self.loss = None

    def step(self):
        x = self.inputs
        with mock.patch.object(ops, "mps", _no_sinkhorn) if self.backend == STUB else contextlib.nullcontext():
            self.opt.zero_grad(set_to_none=True)
            out = self.head(x["g"], x["patches"], x["text"], self.grid)  # token grid: the loss upsamples
            loss = otseg_loss(out, x["labels"], backend=self.loss_backend).total
            loss.backward()
            self.opt.step()
        self.loss = loss.detach()

    def infos(self):
        return [m.last_info for m in sinkhorn_modules(self.head)]


def _iters_text(infos):
    """Iterations per Sinkhorn call (decoder layers, then the MPS path): mean/max per problem."""
    parts = []
    for info in infos:
        n = info.n_iter.float()
        parts.append(f"{n.mean().item():.1f}/{int(n.max().item())}")
    return " ".join(parts)


def _fmt_ms(v):
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def format_table(rows):
    """The printed table: one row per backend, the stand-ins last."""
    header = ("backend", "ran", "loss ran", "ms/step", "speedup", "Sinkhorn ms", "Sinkhorn share", "loss",
              "iters mean/max (dec1 dec2 dec3 mps)")
    lines = [header]
    for r in rows:
        stub = r["ran"] == "-"
        lines.append((
            r["backend"], r["ran"], r["loss_ran"], _fmt_ms(r["ms"]),
            "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
            "-" if stub else _fmt_ms(r["sinkhorn_ms"]),
            "-" if stub else f"{100 * r['sinkhorn_share']:.1f}%",
            f"{r['loss']:.4f}", "-" if stub else r["iters"],
        ))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = []
    for i, line in enumerate(lines):
        out.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |")
        if i == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def run(quick=False, device="cpu", backends=None, repeats=None, seed=0):
    """Time one training step of the head per backend, print the table.

    Args:
        quick: small sizes (B=1, VOC's K=20 and N=6, 8x8 tokens, 64x64 labels), for tests.
        device: "cpu" or "cuda".
        backends: otseg backends to compare with the reference (default: every
            available one that runs on ``device``, "auto" excluded).
        repeats: timed steps per variant (default 3; 2 with ``quick``), after one warm-up step.
        seed: seed of the inputs and of the head's initialisation.

    Returns:
        list of row dicts (backend, ran, ms, speedup, sinkhorn_ms,
        sinkhorn_share, loss, iters, n_iter, times_ms).

    Raises:
        ValueError: a backend is unknown or does not run on ``device`` here.
    """
    t_start = time.perf_counter()
    device = torch.device(device)
    size = QUICK if quick else FULL
    repeats = repeats or size["repeats"]
    env = report.environment(device)
    _log(f"model: {env['machine']['name']}, {env['machine']['torch_threads']} torch threads, torch "
         f"{env['versions']['torch']}, otseg {env['versions']['otseg']}, commit {env['git_commit']}")
    busy = report.busy_warning(env)
    if busy:
        _log(f"WARNING: {busy}")
    if backends is None:
        backends = [s.name for s in ops.backends()
                    if s.available and device.type in s.devices and s.name != "reference"
                    and not (s.name == "triton" and device.type == "cpu")]
    names = ["reference"] + [b for b in backends if b != "reference"]
    # Before anything runs: an unavailable backend is a usage error (ValueError, saying why).
    for name in names:
        ops.resolve_backend(name, device)

    inputs = make_inputs(size["B"], size["dataset"], size["grid"], size["image"], seed, device)
    K, N, D = inputs["text"].shape
    M = size["grid"] ** 2
    shape = (f"B={size['B']} K={K} N={N} M={M} ({size['grid']}x{size['grid']}) D={D}, "
             f"labels {size['image']}x{size['image']}")
    _log(f"model: {shape}; {repeats} timed steps per variant after one warm-up")
    trainers = [_Trainer(n, inputs, size["grid"], size["ffn_dim"], seed, device) for n in names]
    losses = list(dict.fromkeys(tr.loss_backend for tr in trainers))
    trainers += [_Trainer(STUB, inputs, size["grid"], size["ffn_dim"], seed, device, loss)
                 for loss in losses]
    for tr in trainers:
        t0 = time.perf_counter()
        tr.step()
        synchronize(device)
        _log(f"model: warm-up {tr.name}: {time.perf_counter() - t0:.2f} s")
    for r in range(repeats):
        for tr in trainers:
            tr.times += time_calls(tr.step, 1, device)
        _log(f"model: round {r + 1}/{repeats}: " + ", ".join(f"{tr.name} {tr.times[-1]:.0f} ms" for tr in trainers))

    # Speedups and Sinkhorn times pair the steps of one round (run back to back, so under the same load)
    # and take the median over the rounds: steadier than ratios or differences of separate medians.
    times = {tr.name: tr.times for tr in trainers}
    rows = []
    for tr in trainers:
        stub = tr.backend == STUB
        infos = None if stub else tr.infos()
        paired = list(zip(times["reference"], tr.times, times[_stub_name(tr.loss_backend)]))
        rows.append(dict(
            backend=tr.name, ran="-" if stub else "/".join(dict.fromkeys(i.backend for i in infos)),
            loss_ran=tr.loss_backend,
            ms=statistics.median(tr.times),
            speedup=None if stub else statistics.median(r / t for r, t, _ in paired),
            sinkhorn_ms=None if stub else statistics.median(t - s for _, t, s in paired),
            sinkhorn_share=None if stub else statistics.median((t - s) / t for _, t, s in paired),
            loss=float(tr.loss), iters=None if stub else _iters_text(infos),
            n_iter=None if stub else [i.n_iter.float().mean().item() for i in infos],
            times_ms=tr.times,
        ))
    print(f"otseg bench --model: one training step of the OTSeg head (relation descriptor, {NUM_LAYERS} MPSA "
          f"decoder layers, MPS path, upsampling + focal + dice on both paths, backward, AdamW); {shape}; eps {EPS}, "
          f"tol {TOL}, "
          f"max_iter {MAX_ITER}; {env['machine']['name']}, {env['machine']['torch_threads']} torch threads")
    print(format_table(rows))
    print(f"ms/step: median of {repeats} steps after one warm-up; the variants run in turns, one step each per "
          f"round. speedup: reference step / this step; Sinkhorn ms: this step - the '{STUB}' step of the same "
          "round with the same loss implementation, where otseg.ops.mps is replaced by the uniform plan (S* = sum_n "
          "S, gradients passed through) and everything else runs as before; share: Sinkhorn ms / this step; all three are medians over the rounds "
          "(differences of noisy times: a few % of a step either way, negative when the op costs less than the "
          "noise). iters: per Sinkhorn call of the last step, mean/max over its B*K problems (the reference stops "
          "each call's batch together). ran: the backend otseg.ops reported; loss ran: the loss implementation (cpu, "
          "triton: fused upsampling + focal + dice, otseg.ops.mask_stats; reference: F.interpolate and PyTorch). loss: of the "
          "last step (dropout on). "
          f"Total {time.perf_counter() - t_start:.0f} s.")
    if busy:
        print(f"WARNING: {busy}")
    return rows
