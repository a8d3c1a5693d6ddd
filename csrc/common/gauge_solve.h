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

// The same gauge-fixed system given as a graph Laplacian: A[i][i] =
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

}  // namespace otseg
