// Microbenchmark for benchmarks/notes/float32-bound.md, "The hidden split, measured before building
// (not built)" ("medium inference"): one LSTM step's work on each of
// `threads` std::threads, as the CPU kernel does it (csrc/cpu/lstm_cpu.cpp forward_step): bias
// rows, then g = x_t W_ih^T (K_ih rows of the packed weights) and += h W_hh^T (K_hh rows) as
// oneDNN brgemm calls over 64-column panels, then (optionally) the cell pass over the step's
// [M, N/4] units, then (optionally) a barrier with the other threads.
// cell = -1: no bias rows and no cell pass (the x part's brgemm overwrites g).
//   shared = 1: every thread reads the same packed weights (the batch split: each thread its
//               own rows, all 4H columns);
//   shared = 0: each thread its own weights (the hidden split: all rows, a slice of columns).
// Built by split_micro.py (torch.utils.cpp_extension.load, no torch/extension.h) and called
// through ctypes. Times: per thread, CPU time (CLOCK_THREAD_CPUTIME_ID) and wall per step,
// minimum over `trials` runs of `reps` steps.
#include "lstm_cell.h"
#include "cpu/fast_math.h"

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace at::native::cpublas {
void brgemm(int64_t M, int64_t N, int64_t K, int64_t ld_a, int64_t ld_b, int64_t ld_c,
            bool add_C, const float* A, const float* B, float* C, bool is_vnni);
void brgemm(int64_t M, int64_t N, int64_t K, int64_t ld_a, int64_t ld_b, int64_t ld_c,
            bool add_C, const c10::BFloat16* A, const c10::BFloat16* B, float* C, bool is_vnni);
void brgemm_release(bool is_vnni);
void pack(int64_t K, int64_t N, int64_t ld_in, int64_t ld_out, c10::ScalarType dt_in,
          c10::ScalarType dt_out, const void* in, void* out);
}  // namespace at::native::cpublas

namespace {
constexpr int64_t kPanel = 64;

__attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4"))) void cell_block(
    int64_t n, float* __restrict gi, float* __restrict gf, float* __restrict gg, float* __restrict go,
    float* __restrict c, float* __restrict h) {
  for (int64_t e = 0; e < n; ++e) {
    float c_new, h_new;
    const auto a = fused_lstm::cell_forward<float, fused_lstm::cpu::FastMath<float>>(
        gi[e], gf[e], gg[e], go[e], c[e], c_new, h_new);
    gi[e] = a.i;
    gf[e] = a.f;
    gg[e] = a.g;
    go[e] = a.o;
    c[e] = c_new;
    h[e] = h_new;
  }
}

double now(clockid_t id) {
  timespec ts;
  clock_gettime(id, &ts);
  return ts.tv_sec * 1e9 + ts.tv_nsec;
}

// Sense-reversing spin barrier; arrive and wait separately so that work can go between them.
struct Barrier {
  std::atomic<int> count{0};
  std::atomic<int> sense{0};
  int n = 1;
  int arrive(int local) {  // returns the sense to wait for
    const int target = !local;
    if (count.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
      count.store(0, std::memory_order_relaxed);
      sense.store(target, std::memory_order_release);
    }
    return target;
  }
  void wait(int target) {
    while (sense.load(std::memory_order_acquire) != target) _mm_pause();
  }
};

void packed_product(bool add, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                    const float* w, int64_t k_total, int64_t k0, float* c, int64_t ldc) {
  for (int64_t n0 = 0; n0 < n; n0 += kPanel) {
    const int64_t nb = std::min(kPanel, n - n0);
    at::native::cpublas::brgemm(m, nb, k, lda, nb, ldc, add, a, w + n0 * k_total + k0 * nb,
                                c + n0, false);
  }
}
// The same on AMX tiles: w holds bf16 panels of kPanel columns, each [K, kPanel] in oneDNN's
// VNNI layout (K even), panel n0 at n0 * k_total; a is float, rounded to bf16 rows first (as
// the kernel's amx_rows does), in blocks of 64 rows.
void amx_product(bool add, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                 const c10::BFloat16* w, int64_t k_total, int64_t k0, float* c, int64_t ldc,
                 std::vector<c10::BFloat16>& abuf) {
  abuf.resize(m * k);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = 0; j < k; ++j) abuf[r * k + j] = c10::BFloat16(a[r * lda + j]);
  for (int64_t m0 = 0; m0 < m; m0 += 64)
    for (int64_t n0 = 0; n0 < n; n0 += kPanel)
      at::native::cpublas::brgemm(std::min<int64_t>(64, m - m0), std::min(kPanel, n - n0), k, k,
                                  kPanel, ldc, add, abuf.data() + m0 * k,
                                  w + n0 * k_total + k0 * kPanel, c + m0 * ldc + n0, true);
}
}  // namespace

extern "C" {

// out[2 * t] = thread t's CPU ns per step, out[2 * t + 1] its wall ns per step (minima).
// barrier: 0 none, 1 after the cell pass, 2 split phase (arrive after the cell pass, the next
// step's x part, then wait before the h part).
int sm_run(int threads, int64_t M, int64_t N, int64_t K_ih, int64_t K_hh, int reps, int trials,
           int shared, int cell, int barrier, int amx, double* out) {
  const int64_t K = K_ih + K_hh;
  std::vector<std::vector<float>> weights(shared ? 1 : threads);
  std::vector<std::vector<c10::BFloat16>> weights_bf16(weights.size());
  for (size_t i_w = 0; i_w < weights.size(); ++i_w) {
    auto& w = weights[i_w];
    w.resize(K * N);
    for (int64_t i = 0; i < K * N; ++i) w[i] = float((i * 7919) % 13) * 0.01f - 0.06f;
    if (amx) {  // each panel [K, kPanel] (w's panel layout, as bf16) packed to VNNI
      std::vector<c10::BFloat16> t(K * kPanel);
      auto& p = weights_bf16[i_w];
      p.resize(K * N);
      for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
        for (int64_t i = 0; i < K * kPanel; ++i) t[i] = c10::BFloat16(w[n0 * K + i]);
        at::native::cpublas::pack(K, kPanel, kPanel, kPanel, c10::kBFloat16, c10::kBFloat16,
                                  t.data(), p.data() + n0 * K);
      }
    }
  }
  Barrier bar;
  bar.n = threads;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      const float* w = weights[shared ? 0 : t].data();
      std::vector<float> x(M * K_ih), h(M * K_hh), g(M * N), c(M * (N / 4)), bias(N);
      for (int64_t i = 0; i < M * K_ih; ++i) x[i] = float(i % 11) * 0.05f - 0.2f;
      for (int64_t i = 0; i < M * K_hh; ++i) h[i] = float(i % 5) * 0.1f - 0.2f;
      for (int64_t i = 0; i < N; ++i) bias[i] = 0.01f * float(i % 3);
      const c10::BFloat16* wb = amx ? weights_bf16[shared ? 0 : t].data() : nullptr;
      std::vector<c10::BFloat16> abuf;
      // g (+)= a (rows of k) times rows [k0, k0 + k) of the weights
      auto product = [&](bool add, int64_t k, const float* a, int64_t k0) {
        if (k == 0) return;  // K_ih = 0: the projection is not in the step
        if (amx) amx_product(add, M, N, k, a, k, wb, K, k0, g.data(), N, abuf);
        else packed_product(add, M, N, k, a, k, w, K, k0, g.data(), N);
      };
      int local = 0, pending = -1;
      auto sync = [&] { local = bar.arrive(local); bar.wait(local); };
      auto x_part = [&] {
        if (cell >= 0)  // cell < 0: no bias rows, the x part overwrites g
          for (int64_t r = 0; r < M; ++r) std::memcpy(g.data() + r * N, bias.data(), 4 * N);
        product(cell >= 0, K_ih, x.data(), 0);
      };
      double best_cpu = 1e30, best_wall = 1e30;
      for (int trial = 0; trial < trials; ++trial) {
        if (barrier) sync();
        const double c0 = now(CLOCK_THREAD_CPUTIME_ID), w0 = now(CLOCK_MONOTONIC);
        if (barrier == 2) x_part();
        for (int rep = 0; rep < reps; ++rep) {
          if (barrier != 2) x_part();
          if (pending >= 0) bar.wait(pending);  // a real step reads the h the others wrote
          pending = -1;
          product(true, K_hh, h.data(), K_ih);
          if (cell > 0) {
            const int64_t U = N / 4;
            for (int64_t r = 0; r < M; ++r) {
              float* gr = g.data() + r * N;
              cell_block(U, gr, gr + U, gr + 2 * U, gr + 3 * U, c.data() + r * U,
                         h.data() + r * K_hh + (U * t) % K_hh);
            }
          }
          if (barrier == 1) sync();
          if (barrier == 2) {  // arrive now, then the next step's x part, then wait
            pending = local = bar.arrive(local);
            if (rep + 1 < reps) x_part();
          }
        }
        if (pending >= 0) bar.wait(pending);
        pending = -1;
        best_cpu = std::min(best_cpu, (now(CLOCK_THREAD_CPUTIME_ID) - c0) / reps);
        best_wall = std::min(best_wall, (now(CLOCK_MONOTONIC) - w0) / reps);
      }
      out[2 * t] = best_cpu;
      out[2 * t + 1] = best_wall;
      at::native::cpublas::brgemm_release(amx != 0);
    });
  for (auto& p : pool) p.join();
  return 0;
}
}

// The core's float32 FMA peak: 16 independent zmm accumulators, GFLOP/s over `iters` rounds of
// CPU time (the best of `trials`).
extern "C" __attribute__((target("avx512f"))) double sm_fma_peak(int64_t iters, int trials) {
  double best = 0;
  for (int trial = 0; trial < trials; ++trial) {
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(float(i) * 1e-3f);
    const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
    const double c0 = now(CLOCK_THREAD_CPUTIME_ID);
    for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
      asm volatile("" : "+v"(acc[0]), "+v"(acc[1]), "+v"(acc[2]), "+v"(acc[3]));
    }
    const double ns = now(CLOCK_THREAD_CPUTIME_ID) - c0;
    float sink = 0;
    for (int i = 0; i < 16; ++i) sink += _mm512_reduce_add_ps(acc[i]);
    if (sink == 12345.f) best = -1;
    best = std::max(best, 2.0 * 16 * 16 * iters / ns);
  }
  return best;
}

// One step's product g = a w (a [M, K], w in kPanel-column panels [K, kPanel] as above) on each
// of `threads` std::threads (each its own a and w) through brgemm calls of at most mc rows and
// kc of K at a time (kc < K: the later calls add to g), to see whether K in L1-sized blocks
// (a panel's kc x kPanel floats) beats brgemm's own loop over K
// (benchmarks/notes/float32-bound.md, "K in blocks; the layers on separate cores").
// Returns the slowest thread's CPU ns per product (least over `trials` runs of `reps`).
extern "C" double sm_k_blocks(int threads, int64_t M, int64_t N, int64_t K, int64_t kc,
                              int64_t mc, int reps, int trials) {
  std::vector<double> least(threads, 1e30);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      std::vector<float> w(K * N), a(M * K), g(M * N);
      for (int64_t i = 0; i < K * N; ++i) w[i] = float((i * 7919) % 13) * 0.01f - 0.06f;
      for (int64_t i = 0; i < M * K; ++i) a[i] = float(i % 11) * 0.05f - 0.2f;
      for (int trial = 0; trial < trials; ++trial) {
        const double c0 = now(CLOCK_THREAD_CPUTIME_ID);
        for (int rep = 0; rep < reps; ++rep)
          for (int64_t n0 = 0; n0 < N; n0 += kPanel)
            for (int64_t m0 = 0; m0 < M; m0 += mc)
              for (int64_t k0 = 0; k0 < K; k0 += kc)
                at::native::cpublas::brgemm(std::min(mc, M - m0), kPanel, std::min(kc, K - k0),
                                            K, kPanel, N, k0 > 0, a.data() + m0 * K + k0,
                                            w.data() + n0 * K + k0 * kPanel,
                                            g.data() + m0 * N + n0, false);
        least[t] = std::min(least[t], (now(CLOCK_THREAD_CPUTIME_ID) - c0) / reps);
      }
      at::native::cpublas::brgemm_release(false);
    });
  for (auto& p : pool) p.join();
  return *std::max_element(least.begin(), least.end());
}

// A two-layer LSTM inference call (T steps, B rows, input I, hidden H, h0 = c0 = 0) on two
// std::threads, every product through brgemm on kPanel-column panels
// (benchmarks/notes/float32-bound.md, "One layer per core, measured as a whole call"):
//   mode 0, the batch split: each thread B/2 rows through both layers (a layer's projection as
//     products of 32 rows over its rows, then its steps; a barrier between the layers);
//   mode 1, one layer per thread: thread 0 runs layer 0's steps with the projection fused
//     ([x_t | h_{t-1}], K = I + H), then columns [0, H) of layer 1's projection of that step,
//     and publishes the step; thread 1, a step behind, the other 3H columns of layer 1's
//     projection and layer 1's recurrent product. Both threads do the same multiply-adds.
// cell = 0 skips the cell pass (products alone; the output is then meaningless).
// out[0, trials): the wall ns of each call; out[trials + t]: thread t's CPU ns in the last.
// y: layer 1's output of the last call (T * B * H floats), to compare the two modes.
namespace {
std::vector<float> layers_panels(const std::vector<float>& a, int64_t ka,
                                 const std::vector<float>& b, int64_t kb, int64_t n) {
  // W^T in panels of kPanel columns, [a; b] stacked along K (W as PyTorch stores it, [n][k])
  const int64_t k_total = ka + kb;
  std::vector<float> p(n * k_total);
  for (int64_t n0 = 0; n0 < n; n0 += kPanel)
    for (int64_t k = 0; k < k_total; ++k)
      for (int64_t j = 0; j < kPanel; ++j)
        p[n0 * k_total + k * kPanel + j] =
            k < ka ? a[(n0 + j) * ka + k] : b[(n0 + j) * kb + k - ka];
  return p;
}
}  // namespace

extern "C" int sm_layers(int mode, int64_t T, int64_t B, int64_t I, int64_t H, int cell,
                         int trials, double* out, float* y) {
  const int64_t G = 4 * H, bs = B / 2;
  auto fill = [](int64_t n, uint32_t s) {
    std::vector<float> v(n);
    for (auto& e : v) {
      s = s * 1664525u + 1013904223u;
      e = (float((s >> 8) & 0xffff) / 65536.0f - 0.5f) * 0.25f;
    }
    return v;
  };
  const auto x = fill(T * B * I, 1), w_ih0 = fill(G * I, 2), w_hh0 = fill(G * H, 3),
             w_ih1 = fill(G * H, 4), w_hh1 = fill(G * H, 5), b0 = fill(G, 6), b1 = fill(G, 7);
  const std::vector<float> none;
  const auto p_ih0 = layers_panels(w_ih0, I, none, 0, G),
             p_hh0 = layers_panels(w_hh0, H, none, 0, G),
             p_ih1 = layers_panels(w_ih1, H, none, 0, G),
             p_hh1 = layers_panels(w_hh1, H, none, 0, G),
             p_fused0 = layers_panels(w_ih0, I, w_hh0, H, G);
  std::vector<float> y0(T * B * H), y1(T * B * H), p1(T * B * H);
  // Each thread's buffers, allocated once (outside the timed calls): the batch split's
  // projection rows and their input rows; every mode's gates, h, c and [x_t | h] rows.
  std::vector<float> proj[2], rows_in[2], gates[2], hs[2], cs[2], xhs[2];
  for (int t = 0; t < 2; ++t) {
    proj[t].assign(mode == 0 ? T * bs * G : 0, 0.f);
    rows_in[t].assign(mode == 0 ? T * bs * std::max(I, H) : 0, 0.f);
    gates[t].assign(B * G, 0.f);
    hs[t].assign(B * H, 0.f);
    cs[t].assign(B * H, 0.f);
    xhs[t].assign(B * (I + H), 0.f);
  }
  auto cell_rows = [&](int64_t rows, float* g, float* c, float* h) {
    if (!cell) return;
    for (int64_t r = 0; r < rows; ++r) {
      float* gr = g + r * G;
      cell_block(H, gr, gr + H, gr + 2 * H, gr + 3 * H, c + r * H, h + r * H);
    }
  };
  std::atomic<int64_t> ready{0};
  Barrier bar;
  bar.n = 2;
  for (int trial = 0; trial < trials; ++trial) {
    ready.store(0);
    double start = 0, end[2] = {0, 0};
    std::vector<std::thread> pool;
    for (int th = 0; th < 2; ++th)
      pool.emplace_back([&, th] {
        int local = 0;
        local = bar.arrive(local);
        bar.wait(local);
        const double w0 = now(CLOCK_MONOTONIC), c0 = now(CLOCK_THREAD_CPUTIME_ID);
        if (th == 0) start = w0;
        std::vector<float>& g = gates[th];
        std::vector<float>& h = hs[th];
        std::vector<float>& c = cs[th];
        std::vector<float>& xh = xhs[th];
        std::fill(h.begin(), h.end(), 0.f);  // h0 = c0 = 0 in every call
        std::fill(c.begin(), c.end(), 0.f);
        if (mode == 0) {
          const int64_t r0 = th * bs;
          for (int layer = 0; layer < 2; ++layer) {
            const int64_t K = layer ? H : I;
            const float* src = layer ? y0.data() : x.data();
            float* in = rows_in[th].data();
            float* P = proj[th].data();
            for (int64_t t = 0; t < T; ++t)
              std::memcpy(in + t * bs * K, src + (t * B + r0) * K, 4 * bs * K);
            for (int64_t r = 0; r < T * bs; ++r)
              std::memcpy(P + r * G, (layer ? b1 : b0).data(), 4 * G);
            for (int64_t m0 = 0; m0 < T * bs; m0 += 32)
              packed_product(true, std::min<int64_t>(32, T * bs - m0), G, K, in + m0 * K, K,
                             (layer ? p_ih1 : p_ih0).data(), K, 0, P + m0 * G, G);
            std::fill(h.begin(), h.end(), 0.f);
            std::fill(c.begin(), c.end(), 0.f);
            float* out_l = layer ? y1.data() : y0.data();
            for (int64_t t = 0; t < T; ++t) {
              float* gt = P + t * bs * G;
              packed_product(true, bs, G, H, h.data(), H, (layer ? p_hh1 : p_hh0).data(), H, 0,
                             gt, G);
              cell_rows(bs, gt, c.data(), h.data());
              for (int64_t r = 0; r < bs; ++r)
                std::memcpy(out_l + (t * B + r0 + r) * H, h.data() + r * H, 4 * H);
            }
            local = bar.arrive(local);  // layer 1 reads every row of layer 0's output
            bar.wait(local);
          }
        } else if (th == 0) {
          for (int64_t t = 0; t < T; ++t) {
            for (int64_t r = 0; r < B; ++r) {
              std::memcpy(xh.data() + r * (I + H), x.data() + (t * B + r) * I, 4 * I);
              std::memcpy(xh.data() + r * (I + H) + I, h.data() + r * H, 4 * H);
              std::memcpy(g.data() + r * G, b0.data(), 4 * G);
            }
            packed_product(true, B, G, I + H, xh.data(), I + H, p_fused0.data(), I + H, 0,
                           g.data(), G);
            cell_rows(B, g.data(), c.data(), h.data());
            float* yt = y0.data() + t * B * H;
            std::memcpy(yt, h.data(), 4 * B * H);
            float* pt = p1.data() + t * B * H;
            for (int64_t r = 0; r < B; ++r) std::memcpy(pt + r * H, b1.data(), 4 * H);
            packed_product(true, B, H, H, yt, H, p_ih1.data(), H, 0, pt, H);
            ready.store(t + 1, std::memory_order_release);
          }
        } else {
          for (int64_t t = 0; t < T; ++t) {
            while (ready.load(std::memory_order_acquire) <= t) _mm_pause();
            const float* pt = p1.data() + t * B * H;
            for (int64_t r = 0; r < B; ++r) {
              std::memcpy(g.data() + r * G, pt + r * H, 4 * H);
              std::memcpy(g.data() + r * G + H, b1.data() + H, 4 * (G - H));
            }
            const float* yt = y0.data() + t * B * H;
            packed_product(true, B, G - H, H, yt, H, p_ih1.data() + H * H, H, 0, g.data() + H, G);
            packed_product(true, B, G, H, h.data(), H, p_hh1.data(), H, 0, g.data(), G);
            cell_rows(B, g.data(), c.data(), h.data());
            std::memcpy(y1.data() + t * B * H, h.data(), 4 * B * H);
          }
        }
        end[th] = now(CLOCK_MONOTONIC);
        out[trials + th] = now(CLOCK_THREAD_CPUTIME_ID) - c0;
        at::native::cpublas::brgemm_release(false);
      });
    for (auto& p : pool) p.join();
    out[trial] = std::max(end[0], end[1]) - start;
  }
  std::memcpy(y, y1.data(), 4 * T * B * H);
  return 0;
}
