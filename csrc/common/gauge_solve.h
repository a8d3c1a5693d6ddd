// The small linear solve of the implicit MPS backward (SPEC section 1, step 2),
// shared by the CPU and CUDA kernels.
//
// A = diag(b) - T^T diag(1/a) T is N x N, symmetric and singular along the
// all-ones vector. Fixing the gauge y[N-1] = 0 leaves an (N-1) x (N-1) system.
// Formed as written, A's diagonal subtracts nearly equal sums; both kernels
// instead pass the off-diagonal weights W = T^T diag(1/a) T (sums of positive
// terms; diag(b) - W_diag = sum_{j != i} W_ij exactly) to the Laplacian solve
// below, in double.
#pragma once

#if defined(__CUDACC__)
#define OTSEG_HOST_DEVICE __host__ __device__
#else
#define OTSEG_HOST_DEVICE
#endif

namespace otseg {

// Largest N any kernel solves; the kernels check their own limits against it.
constexpr int kMaxPrompts = 64;

// The gauge-fixed system given as a graph Laplacian: A[i][i] =
// sum_{j != i} w[i][j], A[i][j] = -w[i][j] for the symmetric non-negative
// weights w (row-major [n, n], diagonal ignored, overwritten). The nodes
// 0..n-2 are eliminated onto the ground node n-1 (Kron reduction); each pivot
// is the sum of the remaining weights of its row (the GTH variant of Gaussian
// elimination), so nothing is subtracted and the result is accurate however
// ill-conditioned the system. A pivot below 1e-30 of the largest degree (a
// prompt with no coupling left) leaves y at 0 there. inv_pivot is scratch [n].
OTSEG_HOST_DEVICE inline void laplacian_gauge_solve(double* w, double* rhs, double* y, double* inv_pivot, int n) {
  double degree = 0.0;
  for (int i = 0; i < n; ++i) {
    double d = 0.0;
    for (int j = 0; j < n; ++j) d += j == i ? 0.0 : w[i * n + j];
    degree = d > degree ? d : degree;
  }
  const double tiny = 1e-30 * degree;
  for (int k = 0; k < n - 1; ++k) {
    double pivot = 0.0;
    for (int j = k + 1; j < n; ++j) pivot += w[k * n + j];
    const double ip = pivot > tiny ? 1.0 / pivot : 0.0;
    inv_pivot[k] = ip;
    for (int i = k + 1; i < n; ++i) {
      const double wik = w[i * n + k] * ip;
      if (wik == 0.0) continue;
      for (int j = k + 1; j < n; ++j)
        if (j != i) w[i * n + j] += wik * w[k * n + j];
      rhs[i] += wik * rhs[k];
    }
  }
  y[n - 1] = 0.0;
  for (int k = n - 2; k >= 0; --k) {
    double acc = rhs[k];
    for (int j = k + 1; j < n; ++j) acc += w[k * n + j] * y[j];
    y[k] = acc * inv_pivot[k];
  }
}

#if defined(__CUDACC__)
// The same solve by one warp (the CUDA backward): lane i holds row i of w in
// registers (NP >= n columns, entries past n zero) and rhs[i]. Each
// elimination step broadcasts the pivot row by shuffles and every lower row
// is updated at once, so the n - 1 steps cost O(n) instructions a lane
// instead of O(n^2) on one thread, with no local memory. Pivots, updates and
// the tiny-pivot rule are the serial version's term for term; the back
// substitution adds the terms w[k][j] y[j] as the y arrive (j decreasing)
// rather than j increasing. Every lane of the warp calls it (convergent);
// returns y[lane] (0 from lane n - 1 on).
template <int NP>
__device__ inline double laplacian_gauge_solve_warp(double (&w)[NP], double rhs, int n) {
  constexpr unsigned kFull = 0xffffffffu;
  const int lane = threadIdx.x % 32;
  double degree = 0.0;
#pragma unroll
  for (int j = 0; j < NP; ++j) degree += j == lane ? 0.0 : w[j];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) degree = fmax(degree, __shfl_xor_sync(kFull, degree, off));
  const double tiny = 1e-30 * degree;
  double inv_pivot = 0.0;  // lane k: that of step k
#pragma unroll
  for (int k = 0; k < NP - 1; ++k) {
    if (k >= n - 1) break;  // uniform across the warp
    double pivot = 0.0;
#pragma unroll
    for (int j = k + 1; j < NP; ++j) pivot += w[j];
    pivot = __shfl_sync(kFull, pivot, k);
    const double ip = pivot > tiny ? 1.0 / pivot : 0.0;
    if (lane == k) inv_pivot = ip;
    const double wik = lane > k && lane < n ? w[k] * ip : 0.0;
#pragma unroll
    for (int j = k + 1; j < NP; ++j) {
      const double wkj = __shfl_sync(kFull, w[j], k);
      if (wik != 0.0 && j != lane) w[j] += wik * wkj;
    }
    const double bk = __shfl_sync(kFull, rhs, k);
    if (wik != 0.0) rhs += wik * bk;
  }
  double y = 0.0;
#pragma unroll
  for (int k = NP - 2; k >= 0; --k) {
    if (k > n - 2) continue;  // uniform: y[n - 1] = 0 adds nothing
    const double yk = __shfl_sync(kFull, rhs * inv_pivot, k);
    if (lane == k) y = yk;
    if (lane < k) rhs += w[k] * yk;
  }
  return y;
}
#endif

}  // namespace otseg
