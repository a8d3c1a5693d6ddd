// The CUDA forward's block reduction (csrc/cuda/block_reduce.h) run on the
// host: a block of kThreads std::threads, with shuffles and the block barrier
// emulated by barriers over the block, so that the reduce-scatter's lane and
// index arithmetic runs as it does on a GPU. Built and run by
// tests/test_build.py (g++ -std=c++20 -pthread); prints "ok" and exits 0, or
// names the first wrong result and exits 1.
//
// In the first rounds every thread's values are small integers (exact sums in
// float32), so each result must equal the serial sum or max exactly; in the
// last they are fractions, whose sums round, and every thread must still get
// bitwise the same results (as the kernels' uniform decisions need) within
// rounding of the serial sum.
#include <barrier>
#include <cmath>
#include <cstdio>
#include <thread>
#include <vector>

#include "cuda/block_reduce.h"

namespace {

// The policy block_reduce_scatter expects, for one emulated thread: a
// shuffle writes the thread's value to its slot, waits for the whole block,
// reads the partner's slot and waits again before the slots are reused.
struct HostBlock {
  int tid;
  std::barrier<>* bar;
  float* slots;  // one per thread of the block
  int lane() const { return tid % 32; }
  int warp() const { return tid / 32; }
  float exchange(float v, int src_lane) const {
    slots[tid] = v;
    bar->arrive_and_wait();
    const float got = slots[warp() * 32 + src_lane];
    bar->arrive_and_wait();
    return got;
  }
  float shfl_xor(float v, int off) const { return exchange(v, lane() ^ off); }
  float shfl(float v, int src) const { return exchange(v, src); }
  void sync() const { bar->arrive_and_wait(); }
};

constexpr int kRounds = 4;  // reductions in a row on alternate buffers, as BlockReducer does; the last of fractions

float value(int tid, int i, int round) {
  if (round == kRounds - 1) return std::sin(0.37f * static_cast<float>(tid) + 1.3f * static_cast<float>(i)) * 0.7f;
  return static_cast<float>((tid * 7 + i * 13 + round * 5) % 23 - 11);
}

template <int V, int kThreads, bool kMax>
bool check() {
  constexpr int kWarps = kThreads / 32;
  std::barrier<> bar(kThreads);
  std::vector<float> slots(kThreads), smem(2 * otseg::cuda::block_reduce_floats(V, kWarps), -1e30f);
  std::vector<float> out(static_cast<size_t>(kRounds) * kThreads * V);
  std::vector<std::thread> threads;
  for (int tid = 0; tid < kThreads; ++tid) {
    threads.emplace_back([&, tid] {
      HostBlock block{tid, &bar, slots.data()};
      for (int round = 0; round < kRounds; ++round) {
        float x[V];
        for (int i = 0; i < V; ++i) x[i] = value(tid, i, round);
        float* buf = smem.data() + (round % 2) * otseg::cuda::block_reduce_floats(V, kWarps);
        otseg::cuda::block_reduce_scatter<V, kWarps, kMax>(x, buf, block);
        for (int i = 0; i < V; ++i) out[(static_cast<size_t>(round) * kThreads + tid) * V + i] = x[i];
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int round = 0; round < kRounds; ++round) {
    for (int i = 0; i < V; ++i) {
      float want = value(0, i, round);
      for (int tid = 1; tid < kThreads; ++tid) {
        const float x = value(tid, i, round);
        want = kMax ? (x > want ? x : want) : want + x;
      }
      for (int tid = 0; tid < kThreads; ++tid) {
        const float got = out[(static_cast<size_t>(round) * kThreads + tid) * V + i];
        const float first = out[static_cast<size_t>(round) * kThreads * V + i];
        const bool fractions = round == kRounds - 1;
        if (fractions ? got != first || std::fabs(got - want) > 1e-4f * kThreads : got != want) {
          std::printf("V=%d threads=%d %s round %d: value %d of thread %d is %g, not %g\n", V, kThreads,
                      kMax ? "max" : "sum", round, i, tid, got, want);
          return false;
        }
      }
    }
  }
  return true;
}

}  // namespace

int main() {
  // The forward's reductions: NP + 1 sums (4, 8, 16 prompts), NP sums and
  // maxima, on 128 to 1024 threads; and V = 1, 2, 3, 32, 33 for the edges.
  const bool ok = check<5, 128, false>() && check<9, 128, false>() && check<17, 128, false>() &&
                  check<8, 128, true>() && check<8, 128, false>() && check<16, 128, true>() &&
                  check<4, 128, true>() && check<9, 256, false>() && check<9, 512, false>() &&
                  check<17, 1024, false>() && check<16, 1024, true>() && check<1, 128, false>() &&
                  check<2, 128, true>() && check<3, 128, false>() && check<32, 128, false>() &&
                  check<33, 256, true>();
  std::printf(ok ? "ok\n" : "FAILED\n");
  return ok ? 0 : 1;
}
