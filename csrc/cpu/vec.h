// Fixed-width SIMD values for the CPU kernel: GCC/Clang vector extensions.
//
// Vec<T, B>::V holds B bytes of T, and the kernels are templates on B: they
// are compiled once per instruction set with that set's register width
// (B = 64 for AVX-512, 32 for AVX2, 16 for the x86-64 baseline; see
// mps_cpu.h), so every value is one register and accumulators stay in
// registers, which the auto-vectoriser would not arrange. (A vector wider
// than the target's registers is lowered through the stack by GCC: five
// times slower on AVX2 when B = 64 was used for every target.)
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>

// Vector values are only passed between functions inlined into one
// ISA-specific entry point, so the psabi note (the calling convention of such
// values differs between ISAs) does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#define OTSEG_VEC_INLINE inline __attribute__((always_inline))

namespace otseg {
namespace vec {

template <typename T, int B>
struct Vec {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "float or double lanes");
  typedef T V __attribute__((vector_size(B)));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> IntLane;
  typedef IntLane I __attribute__((vector_size(B)));
  static constexpr int W = B / static_cast<int>(sizeof(T));
};

// The lane type and count of a vector type.
template <typename V>
using lane_t = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V>()[0])>>;
template <typename V>
inline constexpr int lanes_of = static_cast<int>(sizeof(V) / sizeof(lane_t<V>));

// Unaligned load/store through memcpy (one vmovups; no aliasing questions).
template <typename V, typename T>
OTSEG_VEC_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V, typename T>
OTSEG_VEC_INLINE void store(T* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

// The first `rows` lanes from p converted to the lane type, zeros beyond (the
// last, partial block, or a narrower input type such as at::Half).
template <typename V, typename T>
OTSEG_VEC_INLINE V load_partial(const T* p, int rows) {
  using A = lane_t<V>;
  if constexpr (std::is_same_v<A, T>)
    if (rows == lanes_of<V>) return load<V>(p);
  V v = {};
  for (int i = 0; i < rows; ++i) v[i] = static_cast<A>(p[i]);
  return v;
}

// The first `rows` lanes of v to p, converted to T (the last, partial block,
// or a narrower output type such as at::Half).
template <typename V, typename T>
OTSEG_VEC_INLINE void store_partial(T* p, V v, int rows) {
  if constexpr (std::is_same_v<lane_t<V>, T>)
    if (rows == lanes_of<V>) return store(p, v);
  for (int i = 0; i < rows; ++i) p[i] = static_cast<T>(v[i]);
}

template <typename V, typename T>
OTSEG_VEC_INLINE V splat(T s) {
  return V{} + s;
}

// a < b ? a : b and a > b ? a : b (vminps / vmaxps): where either lane is
// NaN they return b's, so pass the value that may be NaN second for NaN to
// come through.
template <typename V>
OTSEG_VEC_INLINE V vmin(V a, V b) {
  return a < b ? a : b;
}

template <typename V>
OTSEG_VEC_INLINE V vmax(V a, V b) {
  return a > b ? a : b;
}

// |a|: the sign bit cleared (one AND; a compare and select would be two).
template <typename V>
OTSEG_VEC_INLINE V vabs(V a) {
  using Lanes = Vec<lane_t<V>, sizeof(V)>;
  using I = typename Lanes::I;
  return __builtin_bit_cast(V, __builtin_bit_cast(I, a) & std::numeric_limits<typename Lanes::IntLane>::max());
}

template <typename T, typename V>
OTSEG_VEC_INLINE T hsum(V v) {
  T s = 0;
  for (unsigned i = 0; i < sizeof(V) / sizeof(T); ++i) s += v[i];
  return s;
}

template <typename T, typename V>
OTSEG_VEC_INLINE T hmin(V v) {
  T s = v[0];
  for (unsigned i = 1; i < sizeof(V) / sizeof(T); ++i) s = v[i] < s ? v[i] : s;
  return s;
}

template <typename T, typename V>
OTSEG_VEC_INLINE T hmax(V v) {
  T s = v[0];
  for (unsigned i = 1; i < sizeof(V) / sizeof(T); ++i) s = v[i] > s ? v[i] : s;
  return s;
}

// 1 in the first `rows` lanes, 0 beyond: multiplying by it masks the last,
// partial block. (A data-dependent `mask ? a : b` is avoided: GCC lowers it
// lane by lane with branches.)
template <typename V>
OTSEG_VEC_INLINE V first_lanes(int rows) {
  using T = lane_t<V>;
  V m = {};
  if (rows >= lanes_of<V>) return m + T(1);
  for (int i = 0; i < rows; ++i) m[i] = T(1);
  return m;
}

// exp and log of float lanes, written without per-lane conditionals (GCC
// turns a data-dependent vector select into scalar compares here): log is
// the Cephes polynomial of fast_math.h, exp a shorter one (below) with the
// same float32 accuracy, since both kernels are bound by one exp per element.
// exp: arguments are clamped to [-87, 88], so anything below -87 gives
// e^-87 ~ 1.6e-38 rather than 0: a plan entry that small is 0 to every sum
// it enters (the largest entry of each row or column is at least e^-30).
// kNonPositive: the caller guarantees x <= 0 (e.g. x - max), so only the
// lower clamp is needed; same results for such x.
template <bool kNonPositive = false, typename V>
OTSEG_VEC_INLINE V exp_float(V x) {
  using I = typename Vec<float, sizeof(V)>::I;
  V xc = vmax(splat<V>(-87.0f), x);  // NaN stays NaN
  if constexpr (!kNonPositive) xc = vmin(splat<V>(88.0f), xc);
  // Round x / ln 2 to the nearest integer n with the 1.5*2^23 trick; adding
  // 127 in the same constant leaves n + 127 (in [1, 254]) in the low
  // mantissa bits of t, so the bits of 2^n are those bits shifted into the
  // exponent field (one shift instead of a conversion, an add and a shift).
  constexpr float kRound = 12582912.0f + 127.0f;
  const V t = xc * 1.44269504088896341f + kRound;
  const V fx = t - kRound;
  const V r = xc - fx * 0.693359375f + fx * 2.12194440e-4f;
  const V z = r * r;
  // e^r = 1 + r + r^2 P(r) on |r| <= ln(2)/2, P of degree 4 fitted to the
  // relative error (one term fewer than Cephes' degree 5: the same max
  // relative error in float32, 8.0e-8 against float64 over [-87, 0]).
  const V y = ((((1.3814613e-3f * r + 8.36871e-3f) * r + 4.166839e-2f) * r + 1.6666521e-1f) * r + 4.9999994e-1f) * z +
              r + 1.0f;
  const I e = __builtin_bit_cast(I, t) << 23;
  return y * __builtin_bit_cast(V, e);
}

// log of positive normal floats. The mantissa is split as in musl's logf:
// subtracting the bits of sqrt(1/2) makes the exponent field round to the
// nearest power of two, leaving m in [sqrt(1/2), sqrt(2)), which is where
// the Cephes polynomial in t = m - 1 is accurate.
template <typename V>
OTSEG_VEC_INLINE V log_float(V x) {
  using I = typename Vec<float, sizeof(V)>::I;
  const I i = __builtin_bit_cast(I, x) - 0x3f3504f3;
  const V ef = __builtin_convertvector(i >> 23, V);
  const V t = __builtin_bit_cast(V, (i & 0x007fffff) + 0x3f3504f3) - 1.0f;
  const V z = t * t;
  V y = ((((((((7.0376836292e-2f * t - 1.1514610310e-1f) * t + 1.1676998740e-1f) * t - 1.2420140846e-1f) * t +
             1.4249322787e-1f) * t - 1.6668057665e-1f) * t + 2.0000714765e-1f) * t - 2.4999993993e-1f) * t +
        3.3333331174e-1f) * t * z;
  y += -2.12194440e-4f * ef;
  y += -0.5f * z;
  return t + y + 0.693359375f * ef;
}

// float64 is the correctness path, not the fast one: the C library per lane.
template <bool kNonPositive = false, typename V>
OTSEG_VEC_INLINE V exp(V x) {
  if constexpr (std::is_same_v<lane_t<V>, float>) {
    return exp_float<kNonPositive>(x);
  } else {
    for (int i = 0; i < lanes_of<V>; ++i) x[i] = std::exp(x[i]);
    return x;
  }
}

template <typename V>
OTSEG_VEC_INLINE V log(V x) {
  if constexpr (std::is_same_v<lane_t<V>, float>) {
    return log_float(x);
  } else {
    for (int i = 0; i < lanes_of<V>; ++i) x[i] = std::log(x[i]);
    return x;
  }
}

// Transposition of one block between W contiguous rows of NC values (the
// [M, N] layout of the inputs and outputs) and NC vectors of W lanes, one per
// column (the transposed tiles), with register shuffles instead of 2*W*NC
// scalar loads and stores. Column n, lane r is element NC*r + n of the
// block: register (NC*r + n) / W, lane (NC*r + n) % W. For NC a power of two
// no larger than W, in butterfly stages (Network and BlockLayouts below:
// NC log2(NC) shuffles; coco clip backward, N = 8, in cache, 1 thread: 22%
// faster than with the gathers); otherwise each column is gathered from the NC registers by
// NC - 1 two-source shuffles, each taking the lanes that come from one more
// register (and the same the other way): NC (NC - 1) shuffles. (A two-stage
// network for NC = 6 through column pairs, 18 shuffles instead of 30, was
// measured no faster on voc clip, so N = 6 keeps the gathers.)
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define OTSEG_HAVE_SHUFFLES 1

// A transposition in stages, given as the sequence of layouts (which
// element each position k * W + l, register k, lane l, holds) from the
// input to the output. Each stage builds every register of the next layout
// by one two-source shuffle of the (at most two) registers of the previous
// one that hold its elements. The sources and shuffle indices are worked out
// at compile time from the layouts (Layouts::get()); a layout needing more
// sources fails to compile.
template <typename T, int B, int R, class Layouts>
struct Network {
  static constexpr int W = Vec<T, B>::W, E = R * W;
  static constexpr int S = static_cast<int>(Layouts::get().size()) - 1;  // stages
  using V = typename Vec<T, B>::V;
  using Layout = std::array<int, E>;

  struct Plan {
    int src[S][R][2];      // source registers of each output register (-1: none)
    int index[S][R][W];    // shuffle indices
    bool ok;               // every element found in at most two sources
  };
  static constexpr Plan plan() {
    const auto L = Layouts::get();
    Plan P{};
    P.ok = true;
    for (int s = 0; s < S; ++s) {
      Layout where{};  // position of each element in layout s
      for (int q = 0; q < E; ++q) where[L[s][q]] = q;
      for (int k = 0; k < R; ++k) {
        int* src = P.src[s][k];
        src[0] = src[1] = -1;
        for (int l = 0; l < W; ++l) {
          const int pos = where[L[s + 1][k * W + l]];
          const int reg = pos / W, lane = pos % W;
          const int j = src[0] < 0 || src[0] == reg ? 0 : 1;
          if (j == 1 && src[1] >= 0 && src[1] != reg) P.ok = false;
          src[j] = reg;
          P.index[s][k][l] = j * W + lane;
        }
      }
    }
    return P;
  }
  static constexpr Plan kPlan = plan();
  static_assert(kPlan.ok, "a stage's register needs more than two source registers");

  template <int s, int k, int... l>
  static OTSEG_VEC_INLINE V build(const V* X, std::integer_sequence<int, l...>) {
    constexpr int a = kPlan.src[s][k][0], b = kPlan.src[s][k][1];
    return __builtin_shufflevector(X[a], X[b < 0 ? a : b], kPlan.index[s][k][l]...);
  }
  template <int s, int... k>
  static OTSEG_VEC_INLINE void stage(V* X, std::integer_sequence<int, k...>) {
    const V Y[R] = {build<s, k>(X, std::make_integer_sequence<int, W>{})...};
    for (int i = 0; i < R; ++i) X[i] = Y[i];
  }
  template <int... s>
  static OTSEG_VEC_INLINE void stages(V* X, std::integer_sequence<int, s...>) {
    (stage<s>(X, std::make_integer_sequence<int, R>{}), ...);
  }
  // The R registers X from the first layout to the last.
  static OTSEG_VEC_INLINE void run(V* X) { stages(X, std::make_integer_sequence<int, S>{}); }
};

// Layouts of one block of W rows of NC values: row-major (position p holds
// element p = NC * r + n) and column-major (position n * W + r holds NC * r + n).
template <int NC, int W>
struct BlockLayouts {
  static constexpr int E = NC * W;
  using Layout = std::array<int, E>;
  static constexpr Layout rows() {
    Layout L{};
    for (int p = 0; p < E; ++p) L[p] = p;
    return L;
  }
  static constexpr Layout columns() {
    Layout L{};
    for (int p = 0; p < E; ++p) L[p] = (p % W) * NC + p / W;
    return L;
  }
  static constexpr int log2(int x) {
    int k = 0;
    while ((1 << k) < x) ++k;
    return k;
  }
  static constexpr int swap_bits(int p, int i, int j) {
    return ((p >> i) & 1) == ((p >> j) & 1) ? p : p ^ ((1 << i) | (1 << j));
  }
  // NC = 2^c <= W = 2^w: c butterfly stages, stage s exchanging register bit
  // s (position bit w + s) with a lane bit between the registers k and
  // k ^ 2^s (two sources each), the last stage also putting the lanes in
  // order: NC log2(NC) shuffles. Rows to columns pairs register bit s with
  // lane bit s, columns to rows with lane bit s + w - c.
  static constexpr bool butterfly = NC >= 2 && (1 << log2(NC)) == NC && NC <= W;
  template <bool kToColumns>
  static constexpr auto butterflies() {
    constexpr int c = log2(NC), w = log2(W);
    std::array<Layout, c + 1> L{};
    L[0] = kToColumns ? rows() : columns();
    for (int s = 0; s + 1 < c; ++s)
      for (int p = 0; p < E; ++p) L[s + 1][p] = L[s][swap_bits(p, w + s, s + (kToColumns ? 0 : w - c))];
    L[c] = kToColumns ? columns() : rows();
    return L;
  }
};

// The staged transposition of BlockTranspose, where one applies (else void).
template <typename T, int NC, int B, bool kToColumns>
struct StagedTranspose {
  static constexpr int W = Vec<T, B>::W;
  using L = BlockLayouts<NC, W>;
  struct Butterflies {
    static constexpr auto get() { return L::template butterflies<kToColumns>(); }
  };
  using type = std::conditional_t<L::butterfly, Network<T, B, NC, Butterflies>, void>;
};

template <typename T, int NC, int B>
struct BlockTranspose {
  static_assert(NC >= 2, "one column needs no transposition");
  static constexpr int W = Vec<T, B>::W;
  using V = typename Vec<T, B>::V;
  using Lanes = std::make_integer_sequence<int, W>;

  // Register `out` of a permutation of the NC registers X: its lane i is lane
  // Map::lane(out, i) of X[Map::reg(out, i)], built by NC - 1 two-source
  // shuffles.
  template <class Map, int out, int... i>
  static OTSEG_VEC_INLINE V first(V a, V b, std::integer_sequence<int, i...>) {
    return __builtin_shufflevector(a, b, (Map::reg(out, i) == 1 ? W + Map::lane(out, i) : Map::lane(out, i))...);
  }
  template <class Map, int out, int j, int... i>
  static OTSEG_VEC_INLINE V merge(V acc, V b, std::integer_sequence<int, i...>) {
    return __builtin_shufflevector(acc, b, (Map::reg(out, i) == j ? W + Map::lane(out, i) : i)...);
  }
  template <class Map, int out, int... j>
  static OTSEG_VEC_INLINE V gather(const V* X, std::integer_sequence<int, j...>) {
    V acc = first<Map, out>(X[0], X[1], Lanes{});
    ((acc = merge<Map, out, j + 2>(acc, X[j + 2], Lanes{})), ...);
    return acc;
  }
  template <class Map, int out>
  static OTSEG_VEC_INLINE V gather(const V* X) {
    return gather<Map, out>(X, std::make_integer_sequence<int, NC - 2>{});
  }
  // Rows to columns: lane r of column n is element NC * r + n of the rows.
  struct ToColumns {
    static constexpr int reg(int n, int r) { return (NC * r + n) / W; }
    static constexpr int lane(int n, int r) { return (NC * r + n) % W; }
  };
  // Columns to rows: lane p of row register k is element W * k + p, which is
  // column (W * k + p) % NC, lane (W * k + p) / NC.
  struct ToRows {
    static constexpr int reg(int k, int p) { return (W * k + p) % NC; }
    static constexpr int lane(int k, int p) { return (W * k + p) / NC; }
  };

  // W rows, W * NC contiguous values, into NC column vectors.
  static OTSEG_VEC_INLINE void columns(const T* src, V* out) {
    V R[NC];
    for (int k = 0; k < NC; ++k) R[k] = load<V>(src + k * W);
    using Staged = typename StagedTranspose<T, NC, B, true>::type;
    if constexpr (!std::is_void_v<Staged>) {
      Staged::run(R);
      for (int k = 0; k < NC; ++k) out[k] = R[k];
    } else {
      fill_columns(R, out, std::make_integer_sequence<int, NC>{});
    }
  }
  template <int... n>
  static OTSEG_VEC_INLINE void fill_columns(const V* R, V* out, std::integer_sequence<int, n...>) {
    ((out[n] = gather<ToColumns, n>(R)), ...);
  }
  // W rows, W * NC contiguous values, into NC column vectors stored at
  // dst + n * ld.
  static OTSEG_VEC_INLINE void rows_to_columns(const T* src, T* dst, int64_t ld) {
    V C[NC];
    columns(src, C);
    for (int n = 0; n < NC; ++n) store(dst + n * ld, C[n]);
  }

  // NC column vectors (registers) into W * NC contiguous values.
  static OTSEG_VEC_INLINE void rows(const V* C, T* dst) {
    using Staged = typename StagedTranspose<T, NC, B, false>::type;
    if constexpr (!std::is_void_v<Staged>) {
      V X[NC];
      for (int k = 0; k < NC; ++k) X[k] = C[k];
      Staged::run(X);
      for (int k = 0; k < NC; ++k) store(dst + k * W, X[k]);
    } else {
      store_rows(C, dst, std::make_integer_sequence<int, NC>{});
    }
  }
  template <int... k>
  static OTSEG_VEC_INLINE void store_rows(const V* C, T* dst, std::integer_sequence<int, k...>) {
    ((store(dst + k * W, gather<ToRows, k>(C))), ...);
  }
};
#endif

// A 64-byte aligned array (tiles and per-pixel vectors), uninitialised: the
// kernels write every lane they read (padding lanes included).
template <typename T>
class Buffer {
 public:
  explicit Buffer(int64_t n) {
    const size_t bytes = std::max<size_t>(64, ((static_cast<size_t>(n) * sizeof(T) + 63) / 64) * 64);
    p_ = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (p_ == nullptr) throw std::bad_alloc();
  }
  ~Buffer() { std::free(p_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* data() { return p_; }
  const T* data() const { return p_; }
  void swap(Buffer& other) { std::swap(p_, other.p_); }

 private:
  T* p_;
};

}  // namespace vec
}  // namespace otseg
