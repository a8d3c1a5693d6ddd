"""Triton kernels of the fused Multi-Prompts Sinkhorn (backend "triton").

One program solves one (b, k) problem from start to finish: its [M, N] tile of
scores is loaded once into registers, every iteration and the per-problem
stopping test run there, and nothing is read back on the host. Each thread
holds whole pixel rows (a [NG, BLOCK_M, VEC] tile in the forward, prompt
n = g * VEC + j, with the VEC prompts of a group read as one vector when the
scores are contiguous), so the per-pixel sums over prompts of every iteration
stay in the thread and only the sums over pixels cross threads. The scheme
(scaling domain with log-domain absorption) and the implicit backward are derived in ``otseg/ops/mps/README.md``; the
launchers and the autograd glue are in ``otseg/ops/mps/triton.py``.

Compute type: float32 for float16/bfloat16/float32 scores, float64 for float64
scores; it is the element type of the potentials ``F``. Scalars that must be
exact in float64 (eps, tol) arrive as float32 pairs ``hi + lo``, as Triton
passes Python floats as float32. Under torch.compile, Inductor passes them as
float64: the kernels convert each part to the compute type before using it.

Written against the Triton language of 3.6 (no newer APIs).
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # a Triton without the interpreter
    InterpretedFunction = ()

# Scalings outside [e^-30, e^30] are absorbed into the log potentials (the CPU
# kernel's bound, csrc/cpu/mps_cpu_kernels.h): with rebuilt kernel entries <= 1,
# u * K * v cannot overflow, and an entry that underflowed carries a plan mass
# below e^(60-87) relative to the marginals. The bounds' product is 1, so x
# is in range where max(x, 1/x) <= e^30, or |log2 x| <= 30 log2(e).
_SAFE_HI = tl.constexpr(1.0686474581524463e13)  # e^30
_SAFE_LG2 = tl.constexpr(43.280851226668897)  # 30 log2(e)


@triton.jit
def _row_sum(x):
    """[NG, BM, VEC] -> [BM]: a sum over one pixel's prompts (in one thread)."""
    return tl.sum(tl.sum(x, axis=2), axis=0)


# The GPU's fast float32 logarithm and division (libdevice's __nv_fast_logf,
# lg2.approx times ln 2, and __nv_fast_fdividef, an approximate reciprocal
# times the dividend, flushing denormals), as the CUDA kernels use with
# --use_fast_math: 2 instructions each where tl.log and `/` compile to
# about 24 and 8 (sm_90, bench/triton_sass.py). Triton's interpreter cannot
# call libdevice, so there they are tl.log and `/`: the interpreter tests
# check the kernels' logic, and the GPU tests these functions' accuracy.
# float64 compute keeps tl.log and `/` everywhere, and so would a ROCm
# build of torch (HIP's libdevice has no fast_logf). Exponentials are
# tl.exp2 of pre-scaled arguments in both (one MUFU.EX2, where tl.exp adds
# a multiply and a denormal fix-up).
_INTERPRETED = tl.constexpr(isinstance(_row_sum, InterpretedFunction))
_HIP = tl.constexpr(torch.version.hip is not None)
_FAST_MATH = tl.constexpr(not _INTERPRETED and not _HIP)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _log(x, BASE2: tl.constexpr = False):
    """ln x, or log2 x where BASE2 (fast_log2f: lg2.approx alone)."""
    if _FAST_MATH and x.dtype == tl.float32:
        if BASE2:
            return libdevice.fast_log2f(x)
        else:
            return libdevice.fast_logf(x)
    else:
        if BASE2:
            return tl.log2(x)
        else:
            return tl.log(x)


@triton.jit
def _max_nan(a, b):
    """max(a, b), NaN where either is NaN (tl.max drops NaNs)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _div(x, y):
    """x / y (y a tensor of the compute type)."""
    if _FAST_MATH and y.dtype == tl.float32:
        return libdevice.fast_dividef(x, y)
    else:
        return x / y


@triton.jit
def _row_max(x):
    return tl.max(tl.max(x, axis=2), axis=0)


# Sums of products within a thread as one chain of FMAs each: tl.sum of a
# product compiles there to partial chains joined by adds (triton 3.6: a
# chain a group of VEC prompts; 3.8: a tree of pairs, a multiply and an FMA
# each), 11 instructions for 8 products (3.6: 9 over NG * VEC = 2 * 4) where
# one chain takes 8. The sweep's two sums (sm_90, 1024 x 8, 4 warps): 431 ->
# 383 instructions a thread an ordinary iteration with triton 3.8, 388 -> 380
# with 3.6 (bench/triton_sass.py). The elements are taken apart by tl.split
# of the last dim, halves of halves, which moves nothing within a thread.
@triton.jit
def _dot_cols(x, y, W: tl.constexpr):
    """[R, W] x [R, W] -> [R]: sum_j x[:, j] y[:, j], a multiply and W - 1 FMAs in a chain."""
    if W == 1:
        return tl.reshape(x, [x.shape[0]]) * tl.reshape(y, [y.shape[0]])
    else:
        x0, x1 = tl.split(tl.reshape(x, [x.shape[0], W // 2, 2]))
        y0, y1 = tl.split(tl.reshape(y, [y.shape[0], W // 2, 2]))
        return _dot_cols_acc(x1, y1, _dot_cols(x0, y0, W // 2), W // 2)


@triton.jit
def _dot_cols_acc(x, y, acc, W: tl.constexpr):
    """acc + sum_j x[:, j] y[:, j] ([R, W], acc [R]): W FMAs in a chain."""
    if W == 1:
        return tl.fma(tl.reshape(x, [x.shape[0]]), tl.reshape(y, [y.shape[0]]), acc)
    else:
        x0, x1 = tl.split(tl.reshape(x, [x.shape[0], W // 2, 2]))
        y0, y1 = tl.split(tl.reshape(y, [y.shape[0], W // 2, 2]))
        return _dot_cols_acc(x1, y1, _dot_cols_acc(x0, y0, acc, W // 2), W // 2)


@triton.jit
def _row_dot(x, v, T: tl.constexpr):
    """[NG, BM, VEC] x [NG, VEC] -> [BM]: sum_n x[n, m] v[n], one pixel's
    prompts (in one thread) as one chain; T: the program's threads."""
    NG: tl.constexpr = x.shape[0]
    BM: tl.constexpr = x.shape[1]
    VEC: tl.constexpr = x.shape[2]
    if BM < T:
        # Threads share a pixel's prompts (the tile's rows are fewer than the
        # threads): taken apart they were exchanged (16 x 2: 50 -> 67
        # instructions an iteration).
        return _row_sum(x * v[:, None, :])
    else:
        xr = tl.reshape(tl.permute(x, (1, 0, 2)), [BM, NG * VEC])
        vr = tl.reshape(tl.permute(tl.broadcast_to(v[:, None, :], [NG, BM, VEC]), (1, 0, 2)), [BM, NG * VEC])
        return _dot_cols(xr, vr, NG * VEC)


@triton.jit
def _col_dot(x, u, T: tl.constexpr):
    """[NG, BM, VEC] x [BM] -> [NG, VEC]: sum_m x[:, m] u[m]; the R = BM / T
    pixels of a thread (m = r T + t, T threads, as _load_tile lays them) as
    one chain each, then the sum over the threads."""
    NG: tl.constexpr = x.shape[0]
    BM: tl.constexpr = x.shape[1]
    VEC: tl.constexpr = x.shape[2]
    R: tl.constexpr = BM // T
    if R <= 1:
        return tl.sum(x * u[None, :, None], axis=1)
    else:
        xr = tl.reshape(tl.permute(tl.reshape(x, [NG, R, T, VEC]), (0, 2, 3, 1)), [NG * T * VEC, R])
        ub = tl.broadcast_to(tl.reshape(u, [1, R, T, 1]), [NG, R, T, VEC])
        ur = tl.reshape(tl.permute(ub, (0, 2, 3, 1)), [NG * T * VEC, R])
        return tl.sum(tl.reshape(_dot_cols(xr, ur, R), [NG, T, VEC]), axis=1)


@triton.jit
def _exp_rows(s, beta, inv_eps, inv_eps2, mask_m):
    """The log-domain f half-step's exponentials: (2^(z - max_n z), max_n z)
    of z = (S/eps + beta - 1/eps) log2(e), the row maxima 0 past M."""
    z = s * inv_eps2 + ((beta - inv_eps) * _LOG2E)[:, None, :]
    z_max = tl.where(mask_m, _row_max(z), 0.0)
    return tl.exp2(z - z_max[None, :, None]), z_max


@triton.jit
def _load_tile(S, pid, M, N, stride_sp, stride_sm, stride_sn, other,
               BLOCK_M: tl.constexpr, NG: tl.constexpr, VEC: tl.constexpr, ACC: tl.constexpr,
               FULL: tl.constexpr = False):
    """A problem's [M, N] scores as an [NG, BLOCK_M, VEC] tile in ACC, padding
    ``other`` (where FULL, M = BLOCK_M and N = NG * VEC: no mask, no padding).
    The tile is read as [NG * BM, VEC] rows r = g * BM + m and
    reshaped: with the vector dim the only contiguous one, Triton (3.6 and 3.8
    alike) lays the rows r over the threads, so that each thread holds all the
    prompts of its pixels and row reductions need no communication."""
    offs_j = tl.arange(0, VEC)
    r_g, r_m = _group_rows(NG, BLOCK_M)
    mask_r = (r_m < M)[:, None] & (r_g < N // VEC)[:, None]  # [NG * BM, 1]
    if VEC > 1 and FULL:
        # Contiguous [P, BLOCK_M, NG * VEC] scores: the offsets of a thread's
        # rows differ by compile-time constants, so that one address and
        # immediate offsets serve all its loads (where run-time M and N
        # left a 64-bit address a load in registers across the loop). Not
        # one expression with the branch below: its addresses as this
        # scalar-plus-int32 form spilled 1.5-2 KB a thread (sm_90, 1000 x 8
        # and 1024 x 6, triton 3.6), where the int64 form spills none.
        base = tl.multiple_of(r_m * (NG * VEC) + r_g * VEC, [VEC])  # [NG * BM], int32
        s_ptrs = (S + pid * (BLOCK_M * NG * VEC)) + base[:, None] + offs_j[None, :]
    elif VEC > 1:
        # Contiguous [P, M, N] scores: each group of VEC prompts is an
        # aligned vector.
        base = tl.multiple_of((pid * M + r_m) * N + r_g * VEC, [VEC])  # [NG * BM]
        s_ptrs = S + base[:, None] + offs_j[None, :]
    else:
        s_ptrs = (S + pid * stride_sp + r_m.to(tl.int64)[:, None] * stride_sm
                  + (r_g * VEC).to(tl.int64)[:, None] * stride_sn + offs_j[None, :])
    if FULL:
        tile = tl.load(s_ptrs)
    else:
        tile = tl.load(s_ptrs, mask=mask_r, other=other)
    return tl.reshape(tile.to(ACC), [NG, BLOCK_M, VEC])


@triton.jit(do_not_specialize=["stride_sm", "stride_sn"])
def _mps_fwd_kernel(
    S, SCORE, PLAN, F, G, NITER,
    stride_sp, stride_sm, stride_sn,
    M, N, max_iter,
    eps_hi, eps_lo, tol_hi, tol_lo,
    HAS_PLAN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NG: tl.constexpr,
    VEC: tl.constexpr,
    HOLD_S: tl.constexpr,
    EVEN_M: tl.constexpr = False,
    EVEN_N: tl.constexpr = False,
):
    ACC: tl.constexpr = F.dtype.element_ty
    FULL: tl.constexpr = EVEN_M & EVEN_N
    pid = tl.program_id(0).to(tl.int64)
    # The program's threads, for _row_dot and _col_dot. The interpreter has
    # none (nor a warp count): 32 there, so that its tests run the chains.
    # ROCm: wavefronts of 64 (RDNA's 32 leaves half a thread's pixels to tl.sum).
    if _INTERPRETED:
        THREADS: tl.constexpr = 32
    else:
        THREADS: tl.constexpr = tl.extra.cuda.num_warps() * (64 if _HIP else 32)
    offs_m = tl.arange(0, BLOCK_M)
    offs_g = tl.arange(0, NG)
    offs_j = tl.arange(0, VEC)
    # EVEN_M, EVEN_N: launched for M = BLOCK_M, N = NG * VEC only (the full
    # tile, launch_forward: 1024 x 8, the case of every benchmark and of the
    # model), so that the masks of padding rows and prompts are decided at
    # compile time (sm_90, 1024 x 8, 4 warps: 462 -> 431 instructions a
    # thread an ordinary iteration and 828 -> 762 in the first with triton
    # 3.8, 426 -> 394 and 859 -> 782 with 3.6, before the sweep's FMA
    # chains; bench/triton_sass.py).
    if EVEN_M:
        mask_m = offs_m < BLOCK_M  # [BM], all true
    else:
        mask_m = offs_m < M  # [BM]
    # Prompt n = g * VEC + j; with VEC > 1, N is a multiple of VEC, so the
    # mask is constant along j (vector loads).
    if EVEN_N:
        mask_c = tl.broadcast_to(offs_g[:, None] < NG, [NG, VEC])  # [NG, VEC], all true
    else:
        mask_c = tl.broadcast_to(offs_g[:, None] < N // VEC, [NG, VEC])  # [NG, VEC]

    one = tl.full([], 1.0, ACC)
    # M and N may arrive as compile-time 1; multiplying keeps both cases typed.
    m_f = one * M
    n_f = one * N
    # .to(ACC): Inductor passes float arguments as float64 (see the header).
    eps = (one * eps_hi).to(ACC) + (one * eps_lo).to(ACC)
    tol = (one * tol_hi).to(ACC) + (one * tol_lo).to(ACC)
    inv_eps = one / eps
    mu = one / m_f
    nu = one / n_f
    log_mu = -tl.log(m_f)
    log_nu = -tl.log(n_f)

    # HOLD_S: the scores stay in registers for the whole loop, read from
    # memory once (padding reads as S = -inf: every exponential of it is 0,
    # so the loop needs no mask over the tile). Else the loop carries only
    # the kernel matrix K, and the scores are read again (from L2, which they
    # have just passed through) where a log-domain half-step rebuilds K and
    # for the refined score at the end: about 55 fewer registers a thread
    # (sm_90, 1024 x 8: 198 against 255 and 16 B of spills), which can make
    # room for a third problem on an SM (Nsight Compute on an H100, commit
    # 8667a72: 255 registers, 12.5% occupancy, limited by registers). Which
    # is faster is for a GPU to say (bench/gpu_profile.py compares them).
    if HOLD_S:
        s_held = _load_tile(S, pid, M, N, stride_sp, stride_sm, stride_sn, float("-inf"), BLOCK_M, NG, VEC, ACC, FULL)

    # True potentials: f = eps (alpha + log u), g = eps (beta + log v); the
    # kernel matrix K = exp(alpha + beta - C/eps) is built at the first
    # iteration, in the log domain (no sweep runs before it: it > 0), and
    # again where a scaling leaves the safe range, or a product K v or K^T u
    # is not > 0 (underflow, NaN).
    # alpha changes only where K is rebuilt (the first iteration and an
    # absorption): it lives in this problem's row of F, an output, rather
    # than in registers across the loop, read and written in those steps
    # alone, each write between barriers (another thread may read a value
    # back). The scaling u is not carried either: past the loop it is
    # 2^lg_u_prev (1 where K was just rebuilt). 16 fewer values a thread
    # live across the loop (1024 x 8, 4 warps: 8 rows each); with the full
    # tile's unmasked loads (contiguous scores: one address and compile-time
    # offsets, _load_tile), a register cap of
    # 128, which fits a fourth problem on an SM, spills 24 B instead of 168
    # with triton 3.8 and 128 B instead of 192 with 3.6 (bench/triton_sass.py).
    f_ptrs = F + pid * M + offs_m
    beta = tl.zeros([NG, VEC], ACC)
    v = tl.full([NG, VEC], 1.0, ACC)
    k_mat = tl.zeros([NG, BLOCK_M, VEC], ACC)
    # The previous f/eps is alpha + lg_u_prev ln 2 (alpha is the same at the
    # top of every iteration): while alpha is unchanged the change is the
    # difference of the log scalings alone (no cancellation against a large
    # alpha). The log scalings lg_u are base-2 logarithms (log2 u: one
    # MUFU.LG2, with no multiply by ln 2 a row), converted where they meet
    # alpha.
    lg_u_prev = tl.zeros([BLOCK_M], ACC)
    # Exponentials as exp2 of arguments in units of log2(e) (see _FAST_MATH).
    inv_eps2 = inv_eps * _LOG2E
    # err = eps * mean_m |f/eps change| = (eps / M) total, where a sweep's
    # total is ln 2 sum_m |lg_u change|.
    err_scale = eps / m_f
    err = tl.full([], float("inf"), ACC)
    it = 0
    # Stop when err < tol (a NaN err keeps going, as in the reference) or
    # after max_iter iterations.
    while (it < max_iter) & ((err >= tol) | (err != err)):
        if it > 0:
            # f half-step in the scaling domain, u = mu / (K v), and at once
            # the column products K^T u of the g half-step: one pass, two
            # reductions. Padding rows have K = 0 and keep u = 1, log u = 0,
            # so that they add 0 to every sum (one select a row).
            kv = _row_dot(k_mat, v, THREADS)  # [BM]
            u = tl.where(mask_m, _div(mu, kv), 1.0)
            lg_u = tl.where(mask_m, _log(u, True), 0.0)
            # A scaling out of range, u outside [e^-30, e^30] (|log2 u| >
            # 30 log2(e)), or not > 0 (mu / 0 = inf, NaN: log2 of them is
            # +-inf or NaN), makes the sum inf: absorb.
            ok_u = tl.abs(lg_u) <= _SAFE_LG2
            total = tl.sum(tl.where(ok_u, tl.abs(lg_u - lg_u_prev), float("inf")), axis=0) * _LN2
            ktu = _col_dot(k_mat, u, THREADS)  # [NG, VEC]
        else:
            total = tl.full([], float("inf"), ACC)
            lg_u = tl.zeros([BLOCK_M], ACC)
            ktu = tl.zeros([NG, VEC], ACC)
        if (total >= float("inf")) | (total != total):
            # The first iteration, or absorb v into beta: the f half-step in
            # the log domain, rebuilding K with rows summing to mu (u = v = 1).
            if HOLD_S:
                s = s_held
                # One copy of this step (with the first iteration's below too,
                # the held scores spilled: sm_90, 1024 x 8, no cap, 16 -> 296 B).
                # (v = 1 at the first iteration: beta stays 0 without a log of 1.)
                beta = tl.where(mask_c & (it > 0), beta + _log(v), beta)
                e, z_max = _exp_rows(s, beta, inv_eps, inv_eps2, mask_m)
            elif it == 0:
                # beta = 0: the exponent z = (S/eps - 1/eps) log2(e) is
                # largest where S is (the same affine map for every
                # prompt), and z - max(z) = (S - max S) log2(e)/eps is one
                # FMA an entry, where _exp_rows takes an FMA and a
                # subtraction (sm_90, 1024 x 8, 4 warps: the first iteration
                # 907 -> 828 instructions a thread, bench/triton_sass.py).
                # The scores are read in each branch: read before it, they
                # were moved into place for both (64 MOVs, 35 instructions
                # more, and 72 B spilled with triton 3.6 instead of 32).
                s = _load_tile(S, pid, M, N, stride_sp, stride_sm, stride_sn, float("-inf"), BLOCK_M, NG, VEC, ACC, FULL)
                s_max = tl.where(mask_m, _row_max(s), 0.0)
                z_max = s_max * inv_eps2 - inv_eps * _LOG2E
                e = tl.exp2(s * inv_eps2 + (-s_max * inv_eps2)[None, :, None])
            else:
                s = _load_tile(S, pid, M, N, stride_sp, stride_sm, stride_sn, float("-inf"), BLOCK_M, NG, VEC, ACC, FULL)
                beta = tl.where(mask_c, beta + _log(v), beta)
                e, z_max = _exp_rows(s, beta, inv_eps, inv_eps2, mask_m)
            e_sum = tl.where(mask_m, _row_sum(e), 1.0)
            alpha_new = tl.where(mask_m, log_mu - z_max * _LN2 - _log(e_sum), 0.0)
            alpha = tl.load(f_ptrs, mask=mask_m & (it > 0), other=0.0)
            total = tl.sum(tl.where(mask_m, tl.abs((alpha_new - alpha) - lg_u_prev * _LN2), 0.0), axis=0)
            tl.debug_barrier()  # every read of F above precedes the write
            tl.store(f_ptrs, alpha_new, mask=mask_m)
            tl.debug_barrier()
            k_mat = e * _div(mu, e_sum)[None, :, None]
            v = tl.full([NG, VEC], 1.0, ACC)
            lg_u = tl.zeros([BLOCK_M], ACC)
            ktu = tl.sum(k_mat, axis=1)
        err = err_scale * total
        lg_u_prev = lg_u

        # g half-step: v = nu / (K^T u); padding prompts keep v = 1.
        v = tl.where(mask_c, _div(nu, ktu), 1.0)
        # Out of range: v or 1/v = N K^T u above e^30 (the bounds' product
        # is 1), or NaN (kept by the NaN-propagating max). Padding prompts:
        # v = 1, K^T u = 0.
        v_out = tl.reduce(tl.reduce(_max_nan(v, ktu * n_f), 1, _max_nan), 0, _max_nan)
        if not (v_out <= _SAFE_HI):
            # Absorb u into alpha and redo the g half-step in the log domain,
            # rebuilding K with columns summing to nu. The -1/eps of -C/eps
            # cancels inside the column max and reappears in beta.
            if HOLD_S:
                s = s_held
            else:
                s = _load_tile(S, pid, M, N, stride_sp, stride_sm, stride_sn, float("-inf"), BLOCK_M, NG, VEC, ACC, FULL)
            alpha = tl.where(mask_m, tl.load(f_ptrs, mask=mask_m, other=0.0) + lg_u * _LN2, 0.0)
            # w = (S/eps + alpha) log2(e)
            w = s * inv_eps2 + (alpha * _LOG2E)[None, :, None]
            w_max = tl.where(mask_c, tl.max(w, axis=1), 0.0)
            e = tl.exp2(w - w_max[:, None, :])
            e_sum = tl.where(mask_c, tl.sum(e, axis=1), 1.0)
            beta = tl.where(mask_c, log_nu + inv_eps - w_max * _LN2 - _log(e_sum), 0.0)
            k_mat = e * _div(nu, e_sum)[:, None, :]
            tl.debug_barrier()
            tl.store(f_ptrs, alpha, mask=mask_m)
            tl.debug_barrier()
            lg_u_prev = tl.zeros([BLOCK_M], ACC)
            v = tl.full([NG, VEC], 1.0, ACC)
        it += 1

    tl.store(NITER + pid, it)
    # (max_iter = 0: no iteration ran, F holds nothing; alpha = 0.)
    alpha = tl.load(f_ptrs, mask=mask_m & (it > 0), other=0.0)
    tl.debug_barrier()
    tl.store(f_ptrs, eps * (alpha + lg_u_prev * _LN2), mask=mask_m)
    c_offs = offs_g[:, None] * VEC + offs_j[None, :]
    # log v as log2 v ln 2 (the fast logarithm where _FAST_MATH): every
    # thread computes the NG * VEC values, where tl.log's accurate
    # logarithm took about 20 instructions each (sm_90). Its absolute error,
    # about 2^-22 in log2 v, is eps 2^-22 ln 2 in g (8e-9 at eps = 0.05).
    tl.store(G + pid * N + c_offs, eps * (beta + _log(v, True) * _LN2), mask=mask_c)
    if HOLD_S:
        s = tl.where(mask_m[None, :, None] & mask_c[:, None, :], s_held, 0.0)
    else:
        s = _load_tile(S, pid, M, N, stride_sp, stride_sm, stride_sn, 0.0, BLOCK_M, NG, VEC, ACC, FULL)
    # The refined score M N sum_n T S with T = u K v: u taken out of the sum
    # (two operations an entry instead of three where no plan is written).
    kv = k_mat * v[:, None, :]
    u = tl.exp2(lg_u_prev)
    score = (m_f * n_f) * u * _row_sum(kv * s)
    tl.store(SCORE + pid * M + offs_m, score.to(SCORE.dtype.element_ty), mask=mask_m)
    if HAS_PLAN:
        plan = u[None, :, None] * kv
        r_g, r_m = _group_rows(NG, BLOCK_M)
        mask_r = (r_m < M)[:, None] & (r_g < N // VEC)[:, None]  # [NG * BM, 1]
        p_base = tl.multiple_of((pid * M + r_m) * N + r_g * VEC, [VEC])
        tl.store(PLAN + p_base[:, None] + offs_j[None, :],
                 tl.reshape(plan, [NG * BLOCK_M, VEC]).to(PLAN.dtype.element_ty), mask=mask_r)


@triton.jit
def _group_rows(NG: tl.constexpr, BLOCK_M: tl.constexpr):
    """Group g and pixel m of the rows r = g * BLOCK_M + m of a [NG * BLOCK_M,
    VEC] read of a tile (see the forward)."""
    r = tl.arange(0, NG * BLOCK_M)
    return r // BLOCK_M, r % BLOCK_M


@triton.jit
def _to_rows(x, NG: tl.constexpr, BLOCK_M: tl.constexpr, VEC: tl.constexpr):
    """[NG * BLOCK_M, VEC] rows r = g * BLOCK_M + m -> [BLOCK_M, NG * VEC]."""
    return tl.reshape(tl.permute(tl.reshape(x, [NG, BLOCK_M, VEC]), (1, 0, 2)), [BLOCK_M, NG * VEC])


@triton.jit
def _from_rows(x, NG: tl.constexpr, BLOCK_M: tl.constexpr, VEC: tl.constexpr):
    """The inverse of ``_to_rows``."""
    return tl.reshape(tl.permute(tl.reshape(x, [BLOCK_M, NG, VEC]), (1, 0, 2)), [NG * BLOCK_M, VEC])


@triton.jit(do_not_specialize=["stride_sm", "stride_sn", "stride_dpm", "stride_dpn"])
def _mps_bwd_kernel(
    S, F, G, DSCORE, DPLAN, DS,
    stride_sp, stride_sm, stride_sn,
    stride_dsp, stride_dsm,
    stride_dpp, stride_dpm, stride_dpn,
    M, N,
    eps_hi, eps_lo,
    HAS_DSCORE: tl.constexpr,
    HAS_DPLAN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NG: tl.constexpr,
    VEC: tl.constexpr,
    W_ONE_PASS: tl.constexpr,
):
    # Tiles [BLOCK_M, BLOCK_N] with whole pixel rows in each thread, read and
    # written as [NG * BLOCK_M, VEC] vectors as in the forward (VEC > 1: the
    # scores are contiguous and N is a multiple of VEC).
    BLOCK_N: tl.constexpr = NG * VEC
    ACC = F.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, VEC)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    r_g, r_m = _group_rows(NG, BLOCK_M)
    mask_r = (r_m < M)[:, None] & (r_g < N // VEC)[:, None]  # [NG * BM, 1]
    r_n64 = (r_g * VEC).to(tl.int64)[:, None] + offs_j[None, :]  # [NG * BM, VEC]: the prompt
    r_m64 = r_m.to(tl.int64)[:, None]
    if VEC > 1:
        base = tl.multiple_of((pid * M + r_m) * N + r_g * VEC, [VEC])  # [NG * BM]
        s_ptrs = S + base[:, None] + offs_j[None, :]
    else:
        s_ptrs = S + pid * stride_sp + r_m64 * stride_sm + r_n64 * stride_sn

    one = tl.full([], 1.0, ACC)
    mn = (one * M) * N
    eps = (one * eps_hi).to(ACC) + (one * eps_lo).to(ACC)  # float64 parts under Inductor
    inv_eps = one / eps

    s = _to_rows(tl.load(s_ptrs, mask=mask_r, other=0.0).to(ACC), NG, BLOCK_M, VEC)  # [BM, BN]
    f = tl.load(F + pid * M + offs_m, mask=mask_m, other=0.0).to(ACC)  # [BM]
    g = tl.load(G + pid * N + offs_n, mask=mask_n, other=0.0).to(ACC)  # [BN]
    # T = exp((f + g - C) / eps), as exp2 (see _FAST_MATH).
    t = tl.where(mask, tl.exp2((f[:, None] + g[None, :] - 1.0 + s) * (inv_eps * _LOG2E)), 0.0)  # [BM, BN]

    # G = dplan + M N S dS*  (the upstream gradient of the plan).
    grad_t = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    if HAS_DPLAN:
        dp = tl.load(DPLAN + pid * stride_dpp + r_m64 * stride_dpm + r_n64 * stride_dpn, mask=mask_r, other=0.0)
        grad_t += _to_rows(dp.to(ACC), NG, BLOCK_M, VEC)
    if HAS_DSCORE:
        ds = mn * tl.load(DSCORE + pid * stride_dsp + offs_m.to(tl.int64) * stride_dsm, mask=mask_m,
                          other=0.0).to(ACC)
        grad_t += s * ds[:, None]
    h = -(t * grad_t) * inv_eps  # [BM, BN]
    a = tl.sum(t, axis=1)  # [BM]
    r = tl.sum(h, axis=1)  # [BM]
    inv_a = tl.where(a > 0, _div(one, tl.where(a > 0, a, 1.0)), 0.0)
    rhs = tl.sum(h - t * (r * inv_a)[:, None], axis=0)  # [BN]: s - T^T (r / a)

    # A = diag(b) - T^T diag(1/a) T is the Laplacian of the prompt graph with
    # weights W_ij = sum_m T_mi T_mj / a_m (i != j): its diagonal is the sum of
    # the off-diagonal weights of its row, so A is formed without cancellation.
    rows = offs_n[:, None]
    cols = offs_n[None, :]
    t_scaled = t * inv_a[:, None]
    if W_ONE_PASS:
        # All the weights in one sum over the pixels: the [BN, BN] result is
        # held whole by every thread, so the elimination below needs no
        # communication (BN^2 accumulators a thread: for BN <= 8 in float32).
        w = tl.sum(tl.reshape(t_scaled, [BLOCK_M, BLOCK_N, 1]) * tl.reshape(t, [BLOCK_M, 1, BLOCK_N]), axis=0)
    else:
        # Column by column: fewer registers, one sum over the pixels each.
        w = tl.zeros([BLOCK_N, BLOCK_N], ACC)
        for j in tl.static_range(BLOCK_N):
            t_j = tl.sum(tl.where(cols == j, t, 0.0), axis=1)  # [BM] column j of T
            w_j = tl.sum(t_scaled * t_j[:, None], axis=0)  # [BN] W[:, j]
            w = tl.where(cols == j, w_j[:, None], w)
    w = tl.where((rows != cols) & (rows < N) & (cols < N), w, 0.0)
    tiny = 1e-30 * tl.max(tl.sum(w, axis=1), axis=0)

    # Gauge y[N-1] = 0: eliminate the nodes 0..N-2 onto the ground node N-1
    # (Kron reduction). Each pivot is the sum of the remaining weights of its
    # row (the GTH variant of Gaussian elimination): no subtraction, so the
    # (N-1)x(N-1) solve is accurate in float32 however ill-conditioned. A
    # vanishing pivot (a prompt with no coupling left) leaves y at 0 there.
    upper = tl.zeros([BLOCK_N, BLOCK_N], ACC)  # row k: the weights at the time of eliminating k
    inv_pivot = tl.zeros([BLOCK_N], ACC)
    for k in tl.static_range(BLOCK_N - 1):
        w_row = tl.sum(tl.where(rows == k, w, 0.0), axis=0)  # [BN] W[k, :]
        w_col = tl.sum(tl.where(cols == k, w, 0.0), axis=1)  # [BN] W[:, k]
        rest = (offs_n > k) & mask_n
        pivot = tl.sum(tl.where(rest, w_row, 0.0), axis=0)
        live = (pivot > tiny) & (k < N - 1)
        inv_p = tl.where(live, one / tl.where(live, pivot, 1.0), 0.0)
        rest_2d = (rows > k) & (cols > k) & (rows < N) & (cols < N) & (rows != cols)
        w = tl.where(rest_2d, w + w_col[:, None] * w_row[None, :] * inv_p, w)
        rhs_k = tl.sum(tl.where(offs_n == k, rhs, 0.0), axis=0)
        rhs = tl.where(rest, rhs + w_row * (rhs_k * inv_p), rhs)
        upper = tl.where(rows == k, tl.where(rest, w_row, 0.0)[None, :], upper)
        inv_pivot = tl.where(offs_n == k, inv_p, inv_pivot)
    y = tl.zeros([BLOCK_N], ACC)
    for i in tl.static_range(BLOCK_N - 1):
        k = BLOCK_N - 2 - i
        u_k = tl.sum(tl.where(rows == k, upper, 0.0), axis=0)  # [BN]
        rhs_k = tl.sum(tl.where(offs_n == k, rhs, 0.0), axis=0)
        inv_p = tl.sum(tl.where(offs_n == k, inv_pivot, 0.0), axis=0)
        y_k = (rhs_k + tl.sum(u_k * y, axis=0)) * inv_p
        y = tl.where(offs_n == k, y_k, y)

    # x = (r - T y) / a;  dS = -dC + M N T dS*,  dC = H - T (x 1^T + 1 y^T).
    x = (r - tl.sum(t * y[None, :], axis=1)) * inv_a  # [BM]
    grad_s = t * (x[:, None] + y[None, :]) - h
    if HAS_DSCORE:
        grad_s += t * ds[:, None]
    out = tl.multiple_of((pid * M + r_m) * N + r_g * VEC, [VEC])  # DS is contiguous
    tl.store(DS + out[:, None] + offs_j[None, :], _from_rows(grad_s.to(DS.dtype.element_ty), NG, BLOCK_M, VEC),
             mask=mask_r)
