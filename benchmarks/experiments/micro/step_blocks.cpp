// One thread's (or two threads' concurrently) CPU time per LSTM step of C[M, N] += A[M, K] B,
// B packed in column panels of 16 * LD columns, in register blocks of BD rows x LD vectors
// (benchmarks/notes/float32-bound.md, "Our own step kernel: 8 x 48 register blocks").
// Standalone: g++ -O3 -march=native -o /tmp/step_blocks step_blocks.cpp -lpthread && /tmp/step_blocks
#include <immintrin.h>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <thread>
#include <algorithm>
#include <time.h>
// C[M][N] += A[M][K] * Bp ; Bp: panels of NP=16*LD columns, each [K][NP]
template <int BD, int LD>
__attribute__((noinline)) void gemm(const float* __restrict a, int lda, const float* __restrict bp, int K, int M, int N, float* __restrict c, int ldc) {
  constexpr int NP = 16 * LD;
  for (int p = 0; p < N / NP; ++p) {
    const float* b = bp + (size_t)p * K * NP;
    for (int m0 = 0; m0 < M; m0 += BD) {
      __m512 acc[BD][LD];
#pragma GCC unroll 32
      for (int i = 0; i < BD; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < LD; ++j) acc[i][j] = _mm512_loadu_ps(c + (m0 + i) * ldc + p * NP + j * 16);
      const float* ar = a + m0 * lda;
#pragma GCC unroll 2
      for (int k = 0; k < K; ++k) {
        __m512 bv[LD];
#pragma GCC unroll 8
        for (int j = 0; j < LD; ++j) bv[j] = _mm512_loadu_ps(b + k * NP + j * 16);
#pragma GCC unroll 32
        for (int i = 0; i < BD; ++i) {
          __m512 av = _mm512_set1_ps(ar[i * lda + k]);
#pragma GCC unroll 8
          for (int j = 0; j < LD; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
        }
      }
#pragma GCC unroll 32
      for (int i = 0; i < BD; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < LD; ++j) _mm512_storeu_ps(c + (m0 + i) * ldc + p * NP + j * 16, acc[i][j]);
    }
  }
}
double cpu() { timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
template <int BD, int LD> void run(int M, int K, int N, int nthreads) {
  auto body = [&](int tid) {
    std::vector<float> bp((size_t)N * K), a(M * K), c(M * N);
    for (auto& v : bp) v = rand() / (float)RAND_MAX * 0.01f;
    for (auto& v : a) v = rand() / (float)RAND_MAX * 0.01f;
    double best = 1e9;
    for (int rep = 0; rep < 15; ++rep) {
      double t0 = cpu();
      for (int s = 0; s < 200; ++s) { gemm<BD, LD>(a.data(), K, bp.data(), K, M, N, c.data(), N); a[s % K] = c[s] * 1e-3f; }
      best = std::min(best, (cpu() - t0) / 200);
    }
    printf("BD=%d LD=%d M=%d K=%d N=%d thr%d: %.1f us, %.1f GFLOP/s\n", BD, LD, M, K, N, tid, best * 1e6, 2.0 * M * N * K / best / 1e9);
  };
  std::vector<std::thread> ts;
  for (int i = 0; i < nthreads; ++i) ts.emplace_back(body, i);
  for (auto& t : ts) t.join();
}
int main() {
  for (int r = 0; r < 2; ++r) {
  run<8, 3>(16, 256, 1008, 1); run<16, 1>(16, 256, 1024, 1); run<4, 6>(16, 256, 1056, 1); run<6,4>(18,256,1024,1);
  run<8, 2>(16, 256, 1024, 1); run<16, 1>(16, 256, 1024, 2); run<8,3>(16,256,1008,2); run<8,3>(32,512,2016,1);
  }
}
