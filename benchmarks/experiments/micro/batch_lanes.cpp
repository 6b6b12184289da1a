// The step product with the batch in the 16 lanes: gates^T[rows][16 * NB * nbb] = W h^T, each
// weight broadcast against NB vectors of h^T, R rows per register block, the nbb blocks of batch
// columns inside each block of rows (its weights read from L1 after the first); and the core's
// FMA peak (benchmarks/notes/float32-bound.md, "Our own step kernel: 8 x 48 register blocks" and
// "The batch in the lanes, in the hidden split").
// Standalone: g++ -O3 -march=native -o /tmp/batch_lanes batch_lanes.cpp -lpthread && /tmp/batch_lanes
#include <immintrin.h>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <thread>
#include <algorithm>
#include <time.h>
template <int R, int NB>
__attribute__((noinline)) void step(const float* __restrict wp, const float* __restrict hT, int K, int rows, int nbb, const float* __restrict init, float* __restrict out) {
  const int ld = 16 * NB * nbb;  // hT, init and out: [K or rows][ld]
  for (int b = 0; b < rows; b += R) {
    const float* w = wp + (size_t)b * K;
    for (int bb = 0; bb < nbb; ++bb) {
      const int c0 = bb * 16 * NB;
      __m512 acc[R][NB];
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int n = 0; n < NB; ++n) acc[r][n] = _mm512_loadu_ps(init + (b + r) * ld + c0 + n * 16);
      for (int k = 0; k < K; ++k) {
        __m512 h[NB];
#pragma GCC unroll 4
        for (int n = 0; n < NB; ++n) h[n] = _mm512_loadu_ps(hT + k * ld + c0 + n * 16);
#pragma GCC unroll 32
        for (int r = 0; r < R; ++r) {
          __m512 wv = _mm512_set1_ps(w[k * R + r]);
#pragma GCC unroll 4
          for (int n = 0; n < NB; ++n) acc[r][n] = _mm512_fmadd_ps(wv, h[n], acc[r][n]);
        }
      }
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int n = 0; n < NB; ++n) _mm512_storeu_ps(out + (b + r) * ld + c0 + n * 16, acc[r][n]);
    }
  }
}
// peak: independent FMAs
__attribute__((noinline)) float peak(long n) {
  __m512 a[16]; __m512 x = _mm512_set1_ps(1.0001f), y = _mm512_set1_ps(0.9999f);
  for (int i = 0; i < 16; ++i) a[i] = _mm512_set1_ps(i);
  for (long j = 0; j < n; ++j)
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) a[i] = _mm512_fmadd_ps(a[i], x, y);
  __m512 s = a[0]; for (int i = 1; i < 16; ++i) s = _mm512_add_ps(s, a[i]);
  return _mm512_reduce_add_ps(s);
}
double cpu() { timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
template <int R, int NB> void run(int K, int rows, int nthreads, int nbb = 1) {
  auto body = [&](int tid) {
    const int ld = 16 * NB * nbb;
    std::vector<float> wp((size_t)rows * K), hT(K * ld), init(rows * ld), out(rows * ld);
    for (auto& v : wp) v = rand() / (float)RAND_MAX;
    for (auto& v : hT) v = rand() / (float)RAND_MAX * 0.01f;
    double best = 1e9;
    for (int rep = 0; rep < 10; ++rep) {
      double t0 = cpu();
      for (int s = 0; s < 200; ++s) { step<R, NB>(wp.data(), hT.data(), K, rows, nbb, init.data(), out.data()); hT[s % K] = out[s]; }
      best = std::min(best, (cpu() - t0) / 200);
    }
    printf("R=%d NB=%d x %d K=%d rows=%d thr%d: %.1f us/step, %.1f GFLOP/s\n", R, NB, nbb, K, rows, tid, best * 1e6, 2.0 * rows * K * ld / best / 1e9);
  };
  std::vector<std::thread> ts;
  for (int i = 0; i < nthreads; ++i) ts.emplace_back(body, i);
  for (auto& t : ts) t.join();
}
int main() {
  double t0 = cpu(); volatile float s = peak(20000000); double dt = cpu() - t0;
  printf("peak %.1f GFLOP/s\n", 20000000.0 * 16 * 32 / dt / 1e9);
  run<12, 2>(256, 1020, 1); run<14, 2>(256, 1022, 1); run<12, 2>(256, 516, 1); run<7,4>(256,511,1); run<6,4>(256,510,1);
  run<12, 2>(512, 1020, 1); run<12,2>(256,1020,2);
  // The hidden split's per-thread steps: medium (batch 32, 128 units: 512 gate rows, K 256) and
  // fastrnns (batch 64 as two blocks of 32 or one of 64, 256 units: 1024 gate rows, K 512).
  run<12, 2>(256, 516, 1); run<8, 2>(256, 512, 1); run<12, 2>(256, 516, 2);
  run<12, 2>(512, 1020, 1, 2); run<6, 4>(512, 1020, 1); run<4, 4>(512, 1024, 1);
  run<8, 2>(512, 1024, 1, 2); run<16, 1>(512, 1024, 1, 4);
}
