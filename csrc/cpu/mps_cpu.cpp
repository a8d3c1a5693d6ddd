// Fused Multi-Prompts Sinkhorn on the CPU.
//
// Each (b, k) problem is solved by one thread from start to finish while its
// M x N tile sits in cache: S is read once, every iteration and the
// per-problem stopping test run on the tile, and the refined score (and the
// plan when asked) is written once. Problems are spread over threads with
// at::parallel_for. The inner loop runs in the scaling domain (two
// matrix-vector products per iteration, no exp) with log-domain absorption;
// see otseg/ops/mps/README.md for the scheme and the backward derivation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/checks.h"
#include "../common/fast_math.h"
#include "../common/gauge_solve.h"

// Each hot loop is compiled for AVX-512, AVX2 and baseline x86-64 and picked at
// load time, so one binary runs everywhere and uses the widest vectors there.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define OTSEG_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define OTSEG_MULTIVERSION
#endif

namespace otseg {
namespace {

// Scalings leaving [e^-kAbsorb, e^kAbsorb] are absorbed into the log
// potentials and the kernel matrix is rebuilt in the log domain. Entries of the
// rebuilt kernel are at most 1, so products K*u*v stay far from overflow, and
// an entry that underflowed (< e^-87 in float) carries a plan mass below
// e^(2*30-87) ~ 1e-12 relative to the marginals.
constexpr double kAbsorb = 30.0;

template <typename acc_t>
struct ForwardWorkspace {
  // Leading dimension of the tiles: M padded so that the N rows do not map to
  // the same cache sets (M = 1024 floats is exactly 4 KiB).
  int64_t ld;
  // Transposed tiles [N, ld]: the scores S and the kernel K.
  std::vector<acc_t> St, K;
  // Per pixel [M]: absorbed potential alpha (in units of eps), scaling u,
  // previous full potential, and scratch.
  std::vector<acc_t> alpha, u, alpha_prev, tmp, tmp2;
  // Per prompt [N]: absorbed potential beta (in units of eps), scaling v, and
  // the column products K^T u.
  std::vector<acc_t> beta, v, z;
  acc_t inv_eps = 1;

  ForwardWorkspace(int64_t M, int64_t N)
      : ld(((M + 15) / 16) * 16 + 16), St(ld * N), K(ld * N), alpha(M), u(M), alpha_prev(M), tmp(M), tmp2(M), beta(N), v(N), z(N) {}
};

// The f half-step in the log domain from beta (v = 1): alpha and K such that
// K[n, m] = exp(alpha_m + beta_n - C[m, n]/eps), rows of K summing to mu.
template <typename acc_t>
OTSEG_MULTIVERSION void rebuild_rows(ForwardWorkspace<acc_t>& w, int64_t M, int64_t N, acc_t log_mu) {
  acc_t* __restrict rmax = w.tmp.data();
  acc_t* __restrict rsum = w.tmp2.data();
  std::fill(rmax, rmax + M, -std::numeric_limits<acc_t>::infinity());
  std::fill(rsum, rsum + M, acc_t(0));
  const acc_t ie = w.inv_eps;
  // -C/eps = (S - 1)/eps, formed on the fly.
  for (int64_t n = 0; n < N; ++n) {
    const acc_t b = w.beta[n] - ie;
    const acc_t* __restrict st = w.St.data() + n * w.ld;
    for (int64_t m = 0; m < M; ++m) rmax[m] = std::max(rmax[m], st[m] * ie + b);
  }
  for (int64_t n = 0; n < N; ++n) {
    const acc_t b = w.beta[n] - ie;
    const acc_t* __restrict st = w.St.data() + n * w.ld;
    acc_t* __restrict k = w.K.data() + n * w.ld;
    for (int64_t m = 0; m < M; ++m) {
      k[m] = fast::exp(st[m] * ie + b - rmax[m]);
      rsum[m] += k[m];
    }
  }
  const acc_t mu = fast::exp(log_mu);
  acc_t* __restrict alpha = w.alpha.data();
  for (int64_t m = 0; m < M; ++m) {
    alpha[m] = log_mu - rmax[m] - fast::log(rsum[m]);
    rsum[m] = mu / rsum[m];
  }
  for (int64_t n = 0; n < N; ++n) {
    acc_t* __restrict k = w.K.data() + n * w.ld;
    for (int64_t m = 0; m < M; ++m) k[m] *= rsum[m];
  }
}

// The g half-step in the log domain from alpha (u = 1): columns of K sum to nu.
template <typename acc_t>
OTSEG_MULTIVERSION void rebuild_cols(ForwardWorkspace<acc_t>& w, int64_t M, int64_t N, acc_t log_nu) {
  const acc_t* __restrict alpha = w.alpha.data();
  const acc_t nu = fast::exp(log_nu);
  const acc_t ie = w.inv_eps;
  for (int64_t n = 0; n < N; ++n) {
    const acc_t* __restrict st = w.St.data() + n * w.ld;
    acc_t* __restrict k = w.K.data() + n * w.ld;
    acc_t cmax = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : cmax)
    for (int64_t m = 0; m < M; ++m) cmax = std::max(cmax, st[m] * ie + alpha[m]);
    acc_t csum = 0;
    const acc_t shift = -cmax;  // max of alpha + S/eps; the -1/eps cancels here
#pragma omp simd reduction(+ : csum)
    for (int64_t m = 0; m < M; ++m) {
      k[m] = fast::exp(st[m] * ie + alpha[m] + shift);
      csum += k[m];
    }
    w.beta[n] = log_nu + ie - cmax - fast::log(csum);
    const acc_t s = nu / csum;
    for (int64_t m = 0; m < M; ++m) k[m] *= s;
  }
}

// v = nu / z for the column products z = K^T u; false when a scaling left
// the safe range.
template <typename acc_t>
bool scale_cols_from(ForwardWorkspace<acc_t>& w, int64_t N, acc_t nu) {
  bool ok = true;
  for (int64_t n = 0; n < N; ++n) {
    const acc_t vn = nu / w.z[n];
    w.v[n] = vn;
    ok = ok && vn >= acc_t(std::exp(-kAbsorb)) && vn <= acc_t(std::exp(kAbsorb));
  }
  return ok;
}

// v = nu / (K^T u); false when a scaling left the safe range (or K^T u
// underflowed to 0, giving inf).
template <typename acc_t>
OTSEG_MULTIVERSION bool scale_cols(ForwardWorkspace<acc_t>& w, int64_t M, int64_t N, acc_t nu) {
  const acc_t* __restrict u = w.u.data();
  for (int64_t n = 0; n < N; ++n) {
    const acc_t* __restrict k = w.K.data() + n * w.ld;
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t m = 0; m < M; ++m) s += k[m] * u[m];
    w.z[n] = s;
  }
  return scale_cols_from(w, N, nu);
}

// One whole iteration's products in a single sweep over K, block by block so
// that each block is reused from L1: u = mu / (K v), the new full potential
// alpha + log u into tmp2 with the summed |change| against alpha_prev into
// *change, and z = K^T u. Returns false when u left the safe range (then
// tmp2, *change and z are meaningless).
template <typename acc_t>
OTSEG_MULTIVERSION bool sweep(ForwardWorkspace<acc_t>& w, int64_t M, int64_t N, acc_t mu, acc_t* change) {
  constexpr int64_t kBlock = 256;
  acc_t* __restrict kv = w.tmp.data();
  acc_t* __restrict u = w.u.data();
  acc_t* __restrict a_new = w.tmp2.data();
  const acc_t* __restrict alpha = w.alpha.data();
  const acc_t* __restrict prev = w.alpha_prev.data();
  std::fill(w.z.begin(), w.z.end(), acc_t(0));
  acc_t lo = std::numeric_limits<acc_t>::infinity(), hi = 0, total = 0;
  for (int64_t m0 = 0; m0 < M; m0 += kBlock) {
    const int64_t m1 = std::min(M, m0 + kBlock);
    {
      const acc_t* __restrict k = w.K.data() + m0;
      const acc_t v0 = w.v[0];
      for (int64_t m = 0; m < m1 - m0; ++m) kv[m] = k[m] * v0;
    }
    for (int64_t n = 1; n < N; ++n) {
      const acc_t* __restrict k = w.K.data() + n * w.ld + m0;
      const acc_t vn = w.v[n];
      for (int64_t m = 0; m < m1 - m0; ++m) kv[m] += k[m] * vn;
    }
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(+ : total)
    for (int64_t m = m0; m < m1; ++m) {
      const acc_t um = mu / kv[m - m0];
      u[m] = um;
      lo = std::min(lo, um);
      hi = std::max(hi, um);
      const acc_t a = alpha[m] + fast::log(um);
      a_new[m] = a;
      total += std::abs(a - prev[m]);
    }
    for (int64_t n = 0; n < N; ++n) {
      const acc_t* __restrict k = w.K.data() + n * w.ld;
      acc_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t m = m0; m < m1; ++m) s += k[m] * u[m];
      w.z[n] += s;
    }
  }
  *change = total;
  return lo >= acc_t(std::exp(-kAbsorb)) && hi <= acc_t(std::exp(kAbsorb));
}

// After a log-domain f half-step (u = 1): the mean |alpha - alpha_prev|, and
// alpha_prev <- alpha. In units of eps.
template <typename acc_t>
OTSEG_MULTIVERSION acc_t potential_change(ForwardWorkspace<acc_t>& w, int64_t M) {
  const acc_t* __restrict alpha = w.alpha.data();
  acc_t* __restrict prev = w.alpha_prev.data();
  acc_t total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t m = 0; m < M; ++m) {
    total += std::abs(alpha[m] - prev[m]);
    prev[m] = alpha[m];
  }
  return total / acc_t(M);
}

// [M, NC] rows (row stride sM) into [NC, ld] columns, NC known at compile time.
template <int NC, typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void rows_to_columns(const scalar_t* __restrict S, int64_t sM, int64_t M,
                                                           int64_t ld, acc_t* __restrict St) {
  for (int64_t m = 0; m < M; ++m)
    for (int n = 0; n < NC; ++n) St[n * ld + m] = static_cast<acc_t>(S[m * sM + n]);
}

// [NC, ld] columns into contiguous [M, NC] rows, NC known at compile time.
template <int NC, typename acc_t, typename scalar_t>
__attribute__((always_inline)) inline void columns_to_rows(const acc_t* __restrict Tt, int64_t ld, int64_t M,
                                                           scalar_t* __restrict out) {
  for (int64_t m = 0; m < M; ++m)
    for (int n = 0; n < NC; ++n) out[m * NC + n] = static_cast<scalar_t>(Tt[n * ld + m]);
}

template <typename acc_t, typename scalar_t>
OTSEG_MULTIVERSION void store_rows(const acc_t* Tt, int64_t ld, int64_t M, int64_t N, scalar_t* out) {
  switch (N) {
    case 6:
      return columns_to_rows<6>(Tt, ld, M, out);
    case 8:
      return columns_to_rows<8>(Tt, ld, M, out);
    case 16:
      return columns_to_rows<16>(Tt, ld, M, out);
    default:
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) out[m * N + n] = static_cast<scalar_t>(Tt[n * ld + m]);
  }
}

// Reads one problem's S [M, N] (any strides) into the transposed tile [N, M]
// in the compute type. With check_finite, returns false if it holds NaN or inf.
template <typename scalar_t, typename acc_t>
OTSEG_MULTIVERSION bool load_scores(const scalar_t* S, int64_t sM, int64_t sN, int64_t M, int64_t N, int64_t ld,
                                      acc_t* St, bool check_finite = true) {
  if (sN == 1) {
    // Rows are contiguous: stream them in order, writing N sequential outputs
    // (unrolled for the usual prompt counts).
    switch (N) {
      case 6:
        rows_to_columns<6>(S, sM, M, ld, St);
        break;
      case 8:
        rows_to_columns<8>(S, sM, M, ld, St);
        break;
      case 16:
        rows_to_columns<16>(S, sM, M, ld, St);
        break;
      default:
        for (int64_t m = 0; m < M; ++m) {
          const scalar_t* __restrict src = S + m * sM;
          for (int64_t n = 0; n < N; ++n) St[n * ld + m] = static_cast<acc_t>(src[n]);
        }
    }
  } else {
    for (int64_t n = 0; n < N; ++n) {
      acc_t* __restrict dst = St + n * ld;
      const scalar_t* src = S + n * sN;
      for (int64_t m = 0; m < M; ++m) dst[m] = static_cast<acc_t>(src[m * sM]);
    }
  }
  if (!check_finite) return true;
  // x * 0 is NaN exactly for NaN and inf; one vectorised pass over the tile.
  acc_t nonfinite = 0;
  const int64_t total = ld * N;  // the padding is zero
#pragma omp simd reduction(+ : nonfinite)
  for (int64_t i = 0; i < total; ++i) nonfinite += St[i] * acc_t(0);
  return nonfinite == acc_t(0);
}

// Refined score M*N*u_m*sum_n K[n, m] v_n S[m, n], and the plan u_m K[n, m] v_n.
template <typename scalar_t, typename acc_t>
OTSEG_MULTIVERSION void write_outputs(ForwardWorkspace<acc_t>& w, int64_t M, int64_t N, scalar_t* score,
                                      scalar_t* plan) {
  acc_t* __restrict acc = w.tmp.data();
  const acc_t* __restrict u = w.u.data();
  std::fill(acc, acc + M, acc_t(0));
  for (int64_t n = 0; n < N; ++n) {
    const acc_t* __restrict k = w.K.data() + n * w.ld;
    const acc_t* __restrict st = w.St.data() + n * w.ld;
    const acc_t vn = w.v[n];
    for (int64_t m = 0; m < M; ++m) acc[m] += k[m] * st[m] * vn;
  }
  const acc_t scale = acc_t(M) * acc_t(N);
  for (int64_t m = 0; m < M; ++m) score[m] = static_cast<scalar_t>(scale * u[m] * acc[m]);
  if (plan == nullptr) return;
  for (int64_t n = 0; n < N; ++n) {
    const acc_t* __restrict k = w.K.data() + n * w.ld;
    const acc_t vn = w.v[n];
    for (int64_t m = 0; m < M; ++m) plan[m * N + n] = static_cast<scalar_t>(u[m] * k[m] * vn);
  }
}

// One problem from S to outputs. Returns false (writing nothing) if S holds
// NaN or inf and check_finite is set.
template <typename scalar_t, typename acc_t>
bool forward_problem(const scalar_t* S, int64_t sM, int64_t sN, int64_t M, int64_t N, acc_t eps,
                     int64_t max_iter, acc_t tol, bool check_finite, scalar_t* score, scalar_t* plan,
                     acc_t* f_out, acc_t* g_out, int32_t* n_iter_out, ForwardWorkspace<acc_t>& w) {
  if (!load_scores(S, sM, sN, M, N, w.ld, w.St.data(), check_finite)) return false;
  w.inv_eps = acc_t(1) / eps;
  const acc_t log_mu = -std::log(acc_t(M)), log_nu = -std::log(acc_t(N));
  const acc_t mu = acc_t(1) / acc_t(M), nu = acc_t(1) / acc_t(N);
  std::fill(w.beta.begin(), w.beta.end(), acc_t(0));
  std::fill(w.v.begin(), w.v.end(), acc_t(1));
  std::fill(w.u.begin(), w.u.end(), acc_t(1));
  std::fill(w.alpha_prev.begin(), w.alpha_prev.end(), acc_t(0));

  int64_t it = 0;
  bool have_kernel = false;
  while (it < max_iter) {
    ++it;
    acc_t change = 0;
    if (have_kernel && sweep(w, M, N, mu, &change)) {
      // The common case: one sweep over K. alpha + log u is the new f/eps.
      std::swap(w.alpha_prev, w.tmp2);
      if (!scale_cols_from(w, N, nu)) {
        // Absorb u (alpha + log u is in alpha_prev) and redo the g half-step
        // in the log domain.
        std::copy(w.alpha_prev.begin(), w.alpha_prev.end(), w.alpha.begin());
        rebuild_cols(w, M, N, log_nu);
        std::fill(w.u.begin(), w.u.end(), acc_t(1));
        std::fill(w.v.begin(), w.v.end(), acc_t(1));
      }
    } else {
      // First iteration, or the f scalings left the safe range: the f
      // half-step in the log domain (rebuilding K), then the g half-step.
      if (have_kernel)
        for (int64_t n = 0; n < N; ++n) w.beta[n] += fast::log(w.v[n]);
      rebuild_rows(w, M, N, log_mu);
      std::fill(w.u.begin(), w.u.end(), acc_t(1));
      std::fill(w.v.begin(), w.v.end(), acc_t(1));
      have_kernel = true;
      if (!scale_cols(w, M, N, nu)) {
        rebuild_cols(w, M, N, log_nu);
        std::fill(w.v.begin(), w.v.end(), acc_t(1));
      }
      change = potential_change(w, M) * acc_t(M);
    }
    if (eps * change / acc_t(M) < tol) break;
  }
  *n_iter_out = static_cast<int32_t>(it);
  // alpha_prev holds the full f/eps.
  for (int64_t m = 0; m < M; ++m) f_out[m] = eps * w.alpha_prev[m];
  for (int64_t n = 0; n < N; ++n) g_out[n] = eps * (w.beta[n] + std::log(w.v[n]));
  write_outputs(w, M, N, score, plan);
  return true;
}

template <typename acc_t>
struct BackwardWorkspace {
  int64_t ld;                       // padded leading dimension, as in the forward
  std::vector<acc_t> St, T, H;      // transposed tiles [N, ld]
  std::vector<acc_t> r, inv_a, x;   // [M]
  std::vector<double> A, rhs, y;    // [N, N], [N], [N]
  BackwardWorkspace(int64_t M, int64_t N)
      : ld(((M + 15) / 16) * 16 + 16), St(ld * N), T(ld * N), H(ld * N), r(M), inv_a(M), x(M), A(N * N),
        rhs(N), y(N) {}
};

// sum_m x[m] * y[m] (* w[m]), vectorised, accumulated in double.
template <typename acc_t>
inline double dot(const acc_t* __restrict x, const acc_t* __restrict y, int64_t M) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t m = 0; m < M; ++m) s += static_cast<double>(x[m]) * static_cast<double>(y[m]);
  return s;
}

template <typename acc_t>
inline double dot3(const acc_t* __restrict x, const acc_t* __restrict y, const acc_t* __restrict w, int64_t M) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t m = 0; m < M; ++m) s += static_cast<double>(x[m] * w[m]) * static_cast<double>(y[m]);
  return s;
}

// The implicit gradient of one problem (README.md beside otseg/ops/mps), on
// transposed tiles so that every loop runs over pixels and vectorises.
template <typename scalar_t, typename acc_t>
OTSEG_MULTIVERSION void backward_problem(const scalar_t* dscore, const scalar_t* dplan, int64_t dpM, int64_t dpN,
                                         const scalar_t* S, int64_t sM, int64_t sN, const acc_t* f,
                                         const acc_t* g, int64_t M, int64_t N, acc_t eps, scalar_t* dS,
                                         BackwardWorkspace<acc_t>& w) {
  const acc_t ie = acc_t(1) / eps;
  const acc_t mn = acc_t(M) * acc_t(N);
  const int64_t ld = w.ld;
  load_scores(S, sM, sN, M, N, ld, w.St.data(), false);
  // H first holds the upstream plan gradient G_plan (transposed), if any.
  if (dplan != nullptr) load_scores(dplan, dpM, dpN, M, N, ld, w.H.data(), false);
  acc_t* __restrict r = w.r.data();
  acc_t* __restrict inv_a = w.inv_a.data();
  acc_t* __restrict x = w.x.data();
  std::fill(r, r + M, acc_t(0));
  std::fill(inv_a, inv_a + M, acc_t(0));  // row sums a for now
  // Pass 1: T = exp((f + g - C)/eps); H = -(T * G)/eps with
  // G = G_plan + M N S dS*; row sums a = T 1 and r = H 1.
  for (int64_t n = 0; n < N; ++n) {
    const acc_t* __restrict st = w.St.data() + n * ld;
    acc_t* __restrict t = w.T.data() + n * ld;
    acc_t* __restrict h = w.H.data() + n * ld;
    const acc_t shift = (g[n] - acc_t(1)) * ie;
    if (dscore != nullptr && dplan == nullptr) {
#pragma omp simd
      for (int64_t m = 0; m < M; ++m) {
        const acc_t tv = fast::exp(f[m] * ie + st[m] * ie + shift);
        const acc_t gv = mn * st[m] * static_cast<acc_t>(dscore[m]);
        t[m] = tv;
        h[m] = -tv * gv * ie;
        inv_a[m] += tv;
        r[m] += h[m];
      }
    } else if (dscore != nullptr) {
#pragma omp simd
      for (int64_t m = 0; m < M; ++m) {
        const acc_t tv = fast::exp(f[m] * ie + st[m] * ie + shift);
        const acc_t gv = h[m] + mn * st[m] * static_cast<acc_t>(dscore[m]);
        t[m] = tv;
        h[m] = -tv * gv * ie;
        inv_a[m] += tv;
        r[m] += h[m];
      }
    } else {
#pragma omp simd
      for (int64_t m = 0; m < M; ++m) {
        const acc_t tv = fast::exp(f[m] * ie + st[m] * ie + shift);
        t[m] = tv;
        h[m] = -tv * h[m] * ie;
        inv_a[m] += tv;
        r[m] += h[m];
      }
    }
  }
  for (int64_t m = 0; m < M; ++m) inv_a[m] = inv_a[m] > acc_t(0) ? acc_t(1) / inv_a[m] : acc_t(0);
  for (int64_t m = 0; m < M; ++m) x[m] = r[m] * inv_a[m];  // r / a, reused below
  // A = diag(b) - T^T diag(1/a) T and rhs = s - T^T (r / a), in double.
  for (int64_t n = 0; n < N; ++n) {
    const acc_t* __restrict t_n = w.T.data() + n * ld;
    const acc_t* __restrict h_n = w.H.data() + n * ld;
    double b = 0, hs = 0;
#pragma omp simd reduction(+ : b, hs)
    for (int64_t m = 0; m < M; ++m) {
      b += static_cast<double>(t_n[m]);
      hs += static_cast<double>(h_n[m]);
    }
    for (int64_t k = n; k < N; ++k) {
      const double v = -dot3(t_n, w.T.data() + k * ld, inv_a, M);
      w.A[n * N + k] = v;
      w.A[k * N + n] = v;
    }
    w.A[n * N + n] += b;
    w.rhs[n] = hs - dot(t_n, x, M);
  }
  gauge_fixed_solve(w.A.data(), w.rhs.data(), w.y.data(), static_cast<int>(N));
  // Pass 2: x = (r - T y)/a; dS = -dC + M N T dS* = T (x + y + M N dS*) - H.
  for (int64_t m = 0; m < M; ++m) x[m] = r[m];
  for (int64_t n = 0; n < N; ++n) {
    const acc_t* __restrict t = w.T.data() + n * ld;
    const acc_t yn = static_cast<acc_t>(w.y[n]);
    for (int64_t m = 0; m < M; ++m) x[m] -= t[m] * yn;
  }
  for (int64_t m = 0; m < M; ++m) x[m] *= inv_a[m];
  if (dscore != nullptr)
    for (int64_t m = 0; m < M; ++m) x[m] += mn * static_cast<acc_t>(dscore[m]);
  for (int64_t n = 0; n < N; ++n) {
    acc_t* __restrict t = w.T.data() + n * ld;
    const acc_t* __restrict h = w.H.data() + n * ld;
    const acc_t yn = static_cast<acc_t>(w.y[n]);
    for (int64_t m = 0; m < M; ++m) t[m] = t[m] * (x[m] + yn) - h[m];
  }
  store_rows(w.T.data(), ld, M, N, dS);
}

// Half-precision inputs compute in float; float32 and float64 in their own type.
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mps_forward_cpu(
    const at::Tensor& scores, double eps, int64_t max_iter, double tol, bool return_plan, bool check_finite) {
  OTSEG_CHECK_SCORES(scores);
  OTSEG_CHECK_PARAMS(eps, max_iter, tol);
  TORCH_CHECK(scores.device().is_cpu(), "scores must be a CPU tensor");
  const int64_t P = scores.size(0), M = scores.size(1), N = scores.size(2);
  const auto acc_dtype = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto score = at::empty({P, M}, scores.options());
  auto plan = return_plan ? at::empty({P, M, N}, scores.options()) : at::empty({0}, scores.options());
  auto f = at::empty({P, M}, scores.options().dtype(acc_dtype));
  auto g = at::empty({P, N}, scores.options().dtype(acc_dtype));
  auto n_iter = at::empty({P}, scores.options().dtype(at::kInt));
  const int64_t sP = scores.stride(0), sM = scores.stride(1), sN = scores.stride(2);
  std::atomic<bool> nonfinite{false};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "mps_forward_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* S = scores.const_data_ptr<scalar_t>();
    scalar_t* score_p = score.mutable_data_ptr<scalar_t>();
    scalar_t* plan_p = return_plan ? plan.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* f_p = f.mutable_data_ptr<acc_t>();
    acc_t* g_p = g.mutable_data_ptr<acc_t>();
    int32_t* it_p = n_iter.mutable_data_ptr<int32_t>();
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
      ForwardWorkspace<acc_t> w(M, N);
      for (int64_t p = begin; p < end; ++p) {
        const bool ok = forward_problem<scalar_t, acc_t>(
            S + p * sP, sM, sN, M, N, static_cast<acc_t>(eps), max_iter, static_cast<acc_t>(tol),
            check_finite, score_p + p * M, plan_p ? plan_p + p * M * N : nullptr, f_p + p * M,
            g_p + p * N, it_p + p, w);
        if (!ok) nonfinite = true;
      }
    });
  });
  TORCH_CHECK_VALUE(!nonfinite, "the input contains NaN or inf; pass check_finite=False to skip this check");
  return {score, plan, f, g, n_iter};
}

at::Tensor mps_backward_cpu(const std::optional<at::Tensor>& grad_score,
                            const std::optional<at::Tensor>& grad_plan, const at::Tensor& scores,
                            const at::Tensor& f, const at::Tensor& g, double eps) {
  OTSEG_CHECK_SCORES(scores);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "eps must be finite and > 0, got ", eps);
  const int64_t P = scores.size(0), M = scores.size(1), N = scores.size(2);
  const auto acc_dtype = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  OTSEG_CHECK_SHAPE(f, P, M);
  OTSEG_CHECK_SHAPE(g, P, N);
  TORCH_CHECK(f.scalar_type() == acc_dtype && g.scalar_type() == acc_dtype,
              "f and g must be ", acc_dtype, " for ", scores.scalar_type(), " scores");
  auto fc = f.contiguous(), gc = g.contiguous();
  at::Tensor ds, dp;
  std::tie(ds, dp) = upstream_grads(grad_score, grad_plan, scores);
  auto grad = at::empty({P, M, N}, scores.options());
  if (!ds.defined() && !dp.defined()) return grad.zero_();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "mps_backward_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* S = scores.const_data_ptr<scalar_t>();
    const scalar_t* ds_p = ds.defined() ? ds.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* dp_p = dp.defined() ? dp.const_data_ptr<scalar_t>() : nullptr;
    const int64_t dpP = dp.defined() ? dp.stride(0) : 0, dpM = dp.defined() ? dp.stride(1) : 0,
                  dpN = dp.defined() ? dp.stride(2) : 0;
    const acc_t* f_p = fc.const_data_ptr<acc_t>();
    const acc_t* g_p = gc.const_data_ptr<acc_t>();
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    const int64_t sP = scores.stride(0), sM = scores.stride(1), sN = scores.stride(2);
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
      BackwardWorkspace<acc_t> w(M, N);
      for (int64_t p = begin; p < end; ++p) {
        backward_problem<scalar_t, acc_t>(ds_p ? ds_p + p * M : nullptr, dp_p ? dp_p + p * dpP : nullptr,
                                          dpM, dpN, S + p * sP, sM, sN, f_p + p * M, g_p + p * N, M, N,
                                          static_cast<acc_t>(eps), out + p * M * N, w);
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(otseg, CPU, m) {
  m.impl("mps_forward", &mps_forward_cpu);
  m.impl("mps_backward", &mps_backward_cpu);
}

}  // namespace otseg
