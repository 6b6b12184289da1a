// Measured rates: how fast this machine runs the float32 products the plan chooses between,
// measured in this process on first need and kept (plan.h reads them: gemm_library for the
// library of a product, fuse_input_projection for the fused step). Which library is faster
// differs by machine (on an AMD EPYC (Zen 4) MKL takes AVX2 kernels and oneDNN's matmul is
// 1.3x faster; on an Intel Xeon (Sapphire Rapids class) MKL's sgemm is as fast or faster), and
// so does whether a step can stream W_ih with W_hh at the GEMM's rate (a core with twice the
// FMA width needs twice the bandwidth): benchmarks/notes/float32-bound.md, "Intel Xeon: where
// the time goes".
//
// Every rate but one is one thread's, timed by that thread's CPU time (CLOCK_THREAD_CPUTIME_ID),
// the minimum of a few runs: a shared machine delays a thread, which wall time would count, but
// does not make its instructions slower. The libraries run single-threaded inside a parallel
// region (MKL and oneDNN then do not start threads of their own), so what is compared is their
// kernels. The exception: the libraries' rates on the process's thread count
// (library_rates_on_threads), for the products that run on every thread, timed by wall time.
// Part of the one translation unit lstm_cpu.cpp.
#pragma once

#include "blas.h"

#include <time.h>

#include <array>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

namespace fused_lstm {
namespace {

// The classes of products (blas.h's gemm, by its transposes): kNT A B^T (the input projection,
// the BLAS path's recurrent product, the projection by W_hr), kTN A^T B (the weight gradients),
// kNN A B (dL/dx, the BLAS path's dL/dh).
enum class GemmClass { kNT = 0, kTN = 1, kNN = 2 };
constexpr int kGemmClasses = 3;

inline GemmClass gemm_class(bool trans_a, bool trans_b) {
  if (trans_b && !trans_a) return GemmClass::kNT;
  if (trans_a && !trans_b) return GemmClass::kTN;
  return GemmClass::kNN;
}

inline const char* gemm_class_name(GemmClass c) {
  switch (c) {
    case GemmClass::kNT: return "A*B^T";
    case GemmClass::kTN: return "A^T*B";
    default: return "A*B";
  }
}

inline double thread_cpu_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

// The CPU seconds of one run of f() on this thread.
template <typename F>
double cpu_seconds(const F& f) {
  const double t0 = thread_cpu_seconds();
  f();
  return thread_cpu_seconds() - t0;
}

// The least CPU seconds of `runs` runs of f() on this thread, after one run not counted (it
// creates the library's kernel for the shape and brings the operands into the caches).
template <typename F>
double best_cpu_seconds(int runs, const F& f) {
  f();
  double best = 1e30;
  for (int r = 0; r < runs; ++r) {
    const double t0 = thread_cpu_seconds();
    f();
    best = std::min(best, thread_cpu_seconds() - t0);
  }
  return best;
}

// f() on one thread inside a parallel region where the process has several threads (the other
// threads return at once and wait at the region's end), else here.
template <typename F>
void on_one_thread_in_region(const F& f) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || at::in_parallel_region()) {
    f();
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t) {
    if (t0 == 0) f();
  });
}

// ---- The libraries: one thread's GFLOP/s per class of product ----
// Measured on a product of kRateProbeM x kRateProbeN x kRateProbeK multiply-adds (2^24: above
// the size from which oneDNN is considered, plan.h's kOneDnnMinWork, and ~0.1-0.2 ms at the
// rates of current cores), each library once to create its kernel and twice timed per class,
// interleaved: measured 25 ms in all on the Intel Xeon (2 threads, other work on the machine),
// once per process, at the first float32 call that asks.
constexpr int64_t kRateProbeM = 256, kRateProbeN = 256, kRateProbeK = 256;

struct LibraryRates {
  bool measured = false;  // false where the BLAS is not there (no sgemm_ exported)
  double blas[kGemmClasses] = {0, 0, 0};
  double onednn[kGemmClasses] = {0, 0, 0};
  double probe_ms = 0;  // what measuring took (wall)
};

// The least time of `rounds` interleaved runs each of the BLAS's and oneDNN's matmul on a
// product of class `cls`, C[M, N] = A[M, K] B[K, N] (as transposed for the class), after one
// untimed run each (a library's first call of a shape creates its kernel); time_of(f) times
// one run. oneDNN's is 1e30 where it is not available.
template <typename Time>
std::pair<double, double> time_libraries(int cls, int64_t M, int64_t N, int64_t K,
                                         bool onednn_available, int rounds,
                                         const Time& time_of) {
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  // Operands of small integers: exact in any summation order, no denormals.
  std::vector<float> a(M * K), b(K * N), cbuf(M * N);
  for (int64_t i = 0; i < M * K; ++i) a[i] = float(i % 7) - 3.0f;
  for (int64_t i = 0; i < K * N; ++i) b[i] = float(i % 5) - 2.0f;
  const float* A = a.data();
  const float* B = b.data();
  float* C = cbuf.data();
  const at::Tensor c = at::from_blob(C, {M, N}, opts);
  const bool ta = cls == int(GemmClass::kTN), tb = cls == int(GemmClass::kNT);
  auto blas = [&] {
    fortran_gemm<float>(tb ? 'T' : 'N', ta ? 'T' : 'N', N, M, K, 1.0f, B, tb ? K : N, A,
                        ta ? M : K, 0.0f, C, N);
  };
  auto view = [&](const float* p, int64_t rows, int64_t cols, bool trans) {
    at::Tensor t = at::from_blob(const_cast<float*>(p), {trans ? cols : rows,
                                 trans ? rows : cols}, opts);
    return trans ? t.t() : t;
  };
  const at::Tensor av = view(A, M, K, ta), bv = view(B, K, N, tb);
  auto onednn = [&] { at::native::mkldnn_matmul(av, bv, c, 0.0f, 1.0f); };
  blas();
  if (onednn_available) onednn();
  double t_blas = 1e30, t_onednn = 1e30;
  for (int round = 0; round < rounds; ++round) {  // interleaved, so a slow moment hits both
    t_blas = std::min(t_blas, time_of(blas));
    if (onednn_available) t_onednn = std::min(t_onednn, time_of(onednn));
  }
  return {t_blas, t_onednn};
}

// Every class's rates from time_libraries on M x N x K, with what measuring took (wall).
template <typename Time>
LibraryRates library_rates_of(int64_t M, int64_t N, int64_t K, bool onednn_available,
                              int rounds, const Time& time_of) {
  LibraryRates r;
  const double flop = 2.0 * M * N * K;
  const auto t0 = std::chrono::steady_clock::now();
  for (int cls = 0; cls < kGemmClasses; ++cls) {
    const auto [t_blas, t_onednn] =
        time_libraries(cls, M, N, K, onednn_available, rounds, time_of);
    r.blas[cls] = flop / t_blas * 1e-9;
    r.onednn[cls] = onednn_available ? flop / t_onednn * 1e-9 : 0.0;
  }
  r.probe_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  r.measured = true;
  return r;
}

inline LibraryRates measure_library_rates(bool onednn_available) {
  LibraryRates r;
  if (sgemm_ == nullptr) return r;
  on_one_thread_in_region([&] {
    r = library_rates_of(kRateProbeM, kRateProbeN, kRateProbeK, onednn_available, 2,
                         [](const auto& f) { return cpu_seconds(f); });
  });
  return r;
}

// ---- The libraries on the process's threads ----
// A large product outside a parallel region (the unfused input projection, training's weight
// and data gradients) runs on every thread, and there the libraries need not rank as one
// thread's do: on the Intel Xeon (Sapphire Rapids class, 2 threads) one thread's MKL and oneDNN
// measured within a few per cent at 256^3 (214 against 202 GFLOP/s; either ahead from process
// to process), while on both threads at medium's projection shape MKL ran 331-348 GFLOP/s
// against oneDNN's 288-294, and the processes whose one-thread probe picked oneDNN ran medium
// float32 inference at 1.11-1.12x of nn.LSTM against 1.15x with MKL
// (benchmarks/notes/float32-bound.md, "The library on all threads"). Measured per class on a
// product of this size (2^27 multiply-adds, ~1 ms on 2 threads), wall time (the other threads'
// work counts), the least of 3 interleaved runs; once per thread count and process.
constexpr int64_t kThreadsProbeM = 512, kThreadsProbeN = 1024, kThreadsProbeK = 256;

// The rates by thread count (lstm_cpu.cpp's test hooks record and forget entries).
struct ThreadsRatesTable {
  std::mutex mutex;
  std::map<int64_t, LibraryRates> rates;
};
inline ThreadsRatesTable& threads_rates_table() {
  static ThreadsRatesTable table;
  return table;
}

// Rates on `threads` threads (measured false where not measured: the BLAS is missing, one
// thread, or asked inside a parallel region, where the products run on one thread).
inline const LibraryRates& library_rates_on_threads(int64_t threads, bool onednn_available) {
  static const LibraryRates none;
  if (sgemm_ == nullptr || threads <= 1 || at::in_parallel_region()) return none;
  ThreadsRatesTable& table = threads_rates_table();
  {
    std::lock_guard<std::mutex> lock(table.mutex);
    const auto it = table.rates.find(threads);
    if (it != table.rates.end()) return it->second;
  }
  const LibraryRates r = library_rates_of(
      kThreadsProbeM, kThreadsProbeN, kThreadsProbeK, onednn_available, 3, [](const auto& f) {
        const auto start = std::chrono::steady_clock::now();
        f();
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      });
  std::lock_guard<std::mutex> lock(table.mutex);
  return table.rates.emplace(threads, r).first->second;  // (a thread that measured first wins)
}

// One probe per (rows, k, n) and process, kept; the probe runs outside the lock.
struct StepProbeCache {
  std::mutex mutex;
  std::map<std::tuple<int64_t, int64_t, int64_t>, double> seconds;
  template <typename Probe>
  double get(int64_t rows, int64_t k, int64_t n, Probe probe) {
    const auto key = std::make_tuple(rows, k, n);
    {
      std::lock_guard<std::mutex> lock(mutex);
      const auto it = seconds.find(key);
      if (it != seconds.end()) return it->second;
    }
    const double measured = probe();
    std::lock_guard<std::mutex> lock(mutex);
    seconds.emplace(key, measured);
    return measured;
  }
};

// ---- brgemm's step: one thread's seconds for C[rows, n] = A[rows, k] B[k, n], B packed ----
// The least of this many timed runs (after one untimed): the hidden split's rule compares two
// shapes whose difference (whether B stays in L2) other processes on the core blur.
constexpr int kStepProbeRuns = 4;
// The step of the row-wise path as the kernels run it (brgemm_packed: 64-column panels), on a
// B of the step's size: whether its panels stay in this core's caches from one step to the
// next or stream from further out is what the rate measures. Kept per shape; ~2-5 ms for each
// new shape of a layer (the fused step, the recurrent step alone, the hidden split's step).
inline double brgemm_step_seconds(int64_t rows, int64_t k, int64_t n) {
  static StepProbeCache cache;
  return cache.get(rows, k, n, [&] {
    double seconds = 0;
    // Written, not zero pages: B must occupy its own lines, as the packed weights do.
    std::vector<float> a(rows * k, 0.5f), b(k * n, 0.25f), cbuf(rows * n);
    const float* A = a.data();
    const float* B = b.data();
    float* C = cbuf.data();
    on_one_thread_in_region([&] {
      seconds = best_cpu_seconds(kStepProbeRuns, [&] {
        for (int64_t m0 = 0; m0 < rows; m0 += kBrgemmBlockM)
          for (int64_t n0 = 0; n0 < n; n0 += kBrgemmPanelN) {
            const int64_t nb = std::min(kBrgemmPanelN, n - n0);
            at::native::cpublas::brgemm(std::min(kBrgemmBlockM, rows - m0), nb, k, k, nb, n, false,
                                        A + m0 * k, B + n0 * k, C + m0 * n + n0, false);
          }
      });
    });
    return seconds;
  });
}

// ---- The nn.LSTM floor: our inference call against at::lstm's, per shape key ----
// Unlike the rates above, these are wall times of whole calls on the calling thread, every
// thread of the process taking part: the floor is about how long the user waits, and both
// implementations run parallel inside (our batch slices, oneDNN's own threads), which one
// thread's CPU time would not see. A loaded machine delays both alike only on average, so
// the calls are interleaved and the least of each kept (floor_rule.h's rule, lstm_cpu.cpp's
// measure_floor). Kept per key (floor_rule.h's floor_key) for the process.
struct FloorTimes {
  bool measured = false;
  bool injected = false;     // set by the test hook fused_lstm::_floor_record, not measured
  double fused_ms = 0;       // least wall time of our inference call (as the rule plans it)
  double aten_ms = 0;        // least wall time of at::lstm's
  int samples = 0;           // calls of ours timed
  int aten_samples = 0;      // calls of at::lstm timed
  // Our call with the other split of the steps (plan.h, "The hidden split"): the hidden split
  // forced where the rule took the batch split, or the reverse; measured where the hidden
  // split applies and the rule decides it (hidden_split_by_measured_rates on).
  bool other_split_measured = false;
  bool other_split_hidden = false;  // the other split is the hidden split (else the batch split)
  double other_split_ms = 0;        // its least wall time
  // Our call with the other choice of the input projection where the rule's rests on the
  // measured rates of one thread's step (plan.h, measures_other_fusion): fused into the steps
  // wherever the sizes allow it where the rule fused no layer, else never fused.
  bool other_fusion_measured = false;
  bool other_fusion_fused = false;  // the other choice fuses (else it never fuses)
  double other_fusion_ms = 0;       // its least wall time
  int64_t batch = 0, seq_len = 0;  // the call that was measured
};

using FloorKey = std::array<int64_t, 11>;

// The table of measured keys. A key being measured is in `pending`: another thread with the
// same key waits for the result rather than measuring again.
struct FloorTable {
  std::mutex mutex;
  std::condition_variable done;
  std::map<FloorKey, FloorTimes> times;
  std::map<FloorKey, bool> pending;
};

inline FloorTable& floor_table() {
  static FloorTable t;
  return t;
}

}  // namespace
}  // namespace fused_lstm
