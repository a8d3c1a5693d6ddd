// The small linear solve of the implicit MPS backward (SPEC section 1, step 2),
// shared by the CPU and CUDA kernels.
//
// A = diag(b) - T^T diag(1/a) T is N x N, symmetric and singular along the
// all-ones vector. Fixing the gauge y[N-1] = 0 leaves an (N-1) x (N-1) system,
// solved here by Gaussian elimination with partial pivoting in double. A pivot
// that vanishes (a prompt column with no mass) leaves that component at 0.
#pragma once

#if defined(__CUDACC__)
#define OTSEG_HOST_DEVICE __host__ __device__
#else
#define OTSEG_HOST_DEVICE
#endif

namespace otseg {

// Largest N any kernel solves; the kernels check their own limits against it.
constexpr int kMaxPrompts = 64;

// A is row-major [n, n] (overwritten), rhs [n] (overwritten), y [n] (output).
// Solves A[:n-1, :n-1] y[:n-1] = rhs[:n-1] and sets y[n-1] = 0.
OTSEG_HOST_DEVICE inline void gauge_fixed_solve(double* A, double* rhs, double* y, int n) {
  const int k = n - 1;
  // Pivots below this are treated as zero: relative to the largest entry.
  double scale = 0.0;
  for (int i = 0; i < k * n; ++i) scale = A[i] > scale ? A[i] : (-A[i] > scale ? -A[i] : scale);
  const double tiny = 1e-13 * scale;
  for (int col = 0; col < k; ++col) {
    int piv = col;
    double best = A[col * n + col] < 0 ? -A[col * n + col] : A[col * n + col];
    for (int row = col + 1; row < k; ++row) {
      const double v = A[row * n + col] < 0 ? -A[row * n + col] : A[row * n + col];
      if (v > best) {
        best = v;
        piv = row;
      }
    }
    if (piv != col) {
      for (int j = 0; j < k; ++j) {
        const double t = A[col * n + j];
        A[col * n + j] = A[piv * n + j];
        A[piv * n + j] = t;
      }
      const double t = rhs[col];
      rhs[col] = rhs[piv];
      rhs[piv] = t;
    }
    const double d = A[col * n + col];
    if (d <= tiny && d >= -tiny) {
      A[col * n + col] = 0.0;
      continue;
    }
    for (int row = col + 1; row < k; ++row) {
      const double l = A[row * n + col] / d;
      if (l == 0.0) continue;
      for (int j = col; j < k; ++j) A[row * n + j] -= l * A[col * n + j];
      rhs[row] -= l * rhs[col];
    }
  }
  for (int row = k - 1; row >= 0; --row) {
    double acc = rhs[row];
    for (int j = row + 1; j < k; ++j) acc -= A[row * n + j] * y[j];
    const double d = A[row * n + row];
    y[row] = d == 0.0 ? 0.0 : acc / d;
  }
  y[n - 1] = 0.0;
}

}  // namespace otseg
