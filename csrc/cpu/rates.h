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

// Wall seconds since t0.
inline double wall_seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
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

// The operands of a product of class `cls`, C[M, N] = A[M, K] B[K, N] (as transposed for the
// class), and one run of it through the BLAS or oneDNN's matmul.
struct LibraryProduct {
  LibraryProduct(int cls, int64_t M, int64_t N, int64_t K)
      : M(M), N(N), K(K), ta(cls == int(GemmClass::kTN)), tb(cls == int(GemmClass::kNT)),
        a(M * K), b(K * N), cbuf(M * N) {
    // Operands of small integers: exact in any summation order, no denormals.
    for (int64_t i = 0; i < M * K; ++i) a[i] = float(i % 7) - 3.0f;
    for (int64_t i = 0; i < K * N; ++i) b[i] = float(i % 5) - 2.0f;
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    auto view = [&](float* p, int64_t rows, int64_t cols, bool trans) {
      at::Tensor t = at::from_blob(p, {trans ? cols : rows, trans ? rows : cols}, opts);
      return trans ? t.t() : t;
    };
    av = view(a.data(), M, K, ta);
    bv = view(b.data(), K, N, tb);
    c = at::from_blob(cbuf.data(), {M, N}, opts);
  }
  void run(bool onednn) {
    if (onednn) {
      at::native::mkldnn_matmul(av, bv, c, 0.0f, 1.0f);
      return;
    }
    fortran_gemm<float>(tb ? 'T' : 'N', ta ? 'T' : 'N', N, M, K, 1.0f, b.data(), tb ? K : N,
                        a.data(), ta ? M : K, 0.0f, cbuf.data(), N);
  }
  int64_t M, N, K;
  bool ta, tb;
  std::vector<float> a, b, cbuf;
  at::Tensor av, bv, c;
};

// The least time of `rounds` interleaved runs each of the BLAS's and oneDNN's matmul on a
// product of class `cls`, C[M, N] = A[M, K] B[K, N] (as transposed for the class), after one
// untimed run each (a library's first call of a shape creates its kernel); time_of(f) times
// one run. oneDNN's is 1e30 where it is not available.
template <typename Time>
std::pair<double, double> time_libraries(int cls, int64_t M, int64_t N, int64_t K,
                                         bool onednn_available, int rounds,
                                         const Time& time_of) {
  LibraryProduct product(cls, M, N, K);
  auto blas = [&] { product.run(false); };
  auto onednn = [&] { product.run(true); };
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
  r.probe_ms = 1e3 * wall_seconds_since(t0);
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

// One probe per key and process, kept; the probe runs outside the lock. Where two threads
// measure a key at once, both return the figures stored first, so that every plan of the
// process (a forward's and its backward's among them) reads the same ones. The values stay
// where they are stored (a map's nodes do not move), so a reference to one stays valid until
// the test hooks forget them.
template <typename Key, typename Value>
struct ProbeCache {
  std::mutex mutex;
  std::map<Key, Value> values;
  template <typename Probe>
  const Value& get(const Key& key, Probe probe) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      const auto it = values.find(key);
      if (it != values.end()) return it->second;
    }
    const Value measured = probe();
    std::lock_guard<std::mutex> lock(mutex);
    return values.emplace(key, measured).first->second;
  }
};

// The rates by thread count (lstm_cpu.cpp's test hooks record and forget entries).
using ThreadsRatesTable = ProbeCache<int64_t, LibraryRates>;
inline ThreadsRatesTable& threads_rates_table() {
  static ThreadsRatesTable table;
  return table;
}

// Rates on `threads` threads (measured false where not measured: the BLAS is missing, one
// thread, or asked inside a parallel region, where the products run on one thread).
inline const LibraryRates& library_rates_on_threads(int64_t threads, bool onednn_available) {
  static const LibraryRates none;
  if (sgemm_ == nullptr || threads <= 1 || at::in_parallel_region()) return none;
  return threads_rates_table().get(threads, [&] {
    return library_rates_of(kThreadsProbeM, kThreadsProbeN, kThreadsProbeK, onednn_available, 3,
                            [](const auto& f) {
                              const auto start = std::chrono::steady_clock::now();
                              f();
                              return wall_seconds_since(start);
                            });
  });
}

// ---- brgemm's step: one thread's seconds for C[rows, n] = A[rows, k] B[k, n], B packed ----
// The least of this many timed runs (after one untimed): the hidden split's rule compares two
// shapes whose difference (whether B stays in L2) other processes on the core blur.
constexpr int kStepProbeRuns = 4;
// A step's operands, written, not zero pages: B must occupy its own lines, as the packed
// weights do. Tensors, so 64-byte aligned as the op's buffers are (a std::vector's data is
// aligned to 16 bytes, its offset within a cache line depending on the heap's state).
struct StepOperands {
  StepOperands(int64_t rows, int64_t k, int64_t n)
      : rows(rows), k(k), n(n), a(at::empty({rows, k}).fill_(0.5)),
        b(at::empty({k, n}).fill_(0.25)),
        c(at::empty({rows, n})) {}
  void run() {
    const float* A = a.data_ptr<float>();
    const float* B = b.data_ptr<float>();
    float* C = c.data_ptr<float>();
    for (int64_t m0 = 0; m0 < rows; m0 += kBrgemmBlockM)
      for (int64_t n0 = 0; n0 < n; n0 += kBrgemmPanelN) {
        const int64_t nb = std::min(kBrgemmPanelN, n - n0);
        at::native::cpublas::brgemm(std::min(kBrgemmBlockM, rows - m0), nb, k, k, nb, n, false,
                                    A + m0 * k, B + n0 * k, C + m0 * n + n0, false);
      }
  }
  int64_t rows, k, n;
  at::Tensor a, b, c;
};

// The step of the row-wise path as the kernels run it (brgemm_packed: 64-column panels), on a
// B of the step's size: whether its panels stay in this core's caches from one step to the
// next or stream from further out is what the rate measures. Kept per shape; ~2-5 ms for each
// new shape of the hidden split's step (the batch split's are measured in step_pair_seconds).
inline double brgemm_step_seconds(int64_t rows, int64_t k, int64_t n) {
  static ProbeCache<std::tuple<int64_t, int64_t, int64_t>, double> cache;
  return cache.get(std::make_tuple(rows, k, n), [&] {
    double seconds = 0;
    StepOperands step(rows, k, n);
    on_one_thread_in_region(
        [&] { seconds = best_cpu_seconds(kStepProbeRuns, [&] { step.run(); }); });
    return seconds;
  });
}

// ---- The fused step against the unfused pair, measured together ----
// Whether a layer's input projection is fused into its steps (plan.h fused_step_rates) compares
// one thread's fused step, [rows, in + out] x [in + out, n], with its recurrent step alone,
// [rows, out] x [out, n], plus its rows' share of the projection GEMM. Measured apart, at
// different moments of the process (the projection's share from the libraries' rates at
// 256^3), the readings moved apart with what had run before: at fastrnns on the Intel Xeon the
// fused step's reading fell by up to 15% after nn.LSTM's training call and the unfused pair's
// by less, and the choice flipped to the fused step in about one process in ten
// (benchmarks/notes/float32-bound.md, "The fused step's one-thread probe across processes").
// So the three are timed in turn, round after round, each keeping its least: a slow or fast
// moment of the machine reaches all three. In a round each runs a few times in a row, the first
// not timed, as the op's steps follow steps of the same kind: what of the weights fits in the
// core's caches is there (medium's 1 MB of W_hh^T in a 2 MB L2) whatever the other two evicted,
// and a stream of weights larger than L2 ran faster after a few runs (fastrnns' 8 MB fused
// step: ~1,150-1,400 us timed right after one run, ~870-950 after two or three; the recurrent
// step alone moved less). The projection is timed on kStepPairProjectionRows rows
// ([rows, in] x [in, n]^T, A*B^T) through the library whose one-thread rate for that class is
// the faster, and counted per row. ~50 ms at fastrnns (once per process and layer shape).
constexpr int kStepPairRounds = 3;
constexpr int kStepPairRunsInARow = 3;
constexpr int64_t kStepPairProjectionRows = 256;

struct StepPairSeconds {
  double fused = 0;           // one thread's fused step
  double recurrent = 0;       // one thread's recurrent step alone
  double projection_row = 0;  // the projection's seconds per row, one thread
  double probe_ms = 0;        // what measuring took (wall)
};

inline StepPairSeconds step_pair_seconds(int64_t rows, int64_t in, int64_t out, int64_t n,
                                         bool projection_onednn) {
  static ProbeCache<std::tuple<int64_t, int64_t, int64_t, int64_t, bool>, StepPairSeconds> cache;
  return cache.get(std::make_tuple(rows, in, out, n, projection_onednn), [&] {
    StepPairSeconds t;
    const auto t0 = std::chrono::steady_clock::now();
    StepOperands fused(rows, in + out, n), recurrent(rows, out, n);
    LibraryProduct projection(int(GemmClass::kNT), kStepPairProjectionRows, n, in);
    on_one_thread_in_region([&] {
      // Each round: kStepPairRunsInARow runs of each, the first not timed (best_cpu_seconds).
      auto in_a_row = [](const auto& f) { return best_cpu_seconds(kStepPairRunsInARow - 1, f); };
      double least[3] = {1e30, 1e30, 1e30};
      for (int round = 0; round < kStepPairRounds; ++round) {
        least[0] = std::min(least[0], in_a_row([&] { fused.run(); }));
        least[1] = std::min(least[1], in_a_row([&] { recurrent.run(); }));
        least[2] = std::min(least[2], in_a_row([&] { projection.run(projection_onednn); }));
      }
      t.fused = least[0];
      t.recurrent = least[1];
      t.projection_row = least[2] / double(kStepPairProjectionRows);
    });
    t.probe_ms = 1e3 * wall_seconds_since(t0);
    return t;
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
