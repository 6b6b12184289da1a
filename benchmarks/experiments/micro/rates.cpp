// Per-product rates of the libraries a float32 product can go to (benchmarks/notes/
// float32-bound.md, "Intel Xeon: where the time goes"): MKL's sgemm_ (as libtorch_cpu exports
// it), oneDNN's matmul (at::native::mkldnn_matmul) and oneDNN's brgemm micro-kernel on one
// thread (at::native::cpublas::brgemm, B packed in 64-column panels as the kernels pack it).
// Built and driven by rates.py (torch.utils.cpp_extension.load, no torch/extension.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

namespace at::native {
TORCH_API void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2,
                             const at::Tensor& result, float beta, float alpha);
}
namespace at::native::cpublas {
TORCH_API void brgemm(int64_t M, int64_t N, int64_t K, int64_t ld_a, int64_t ld_b, int64_t ld_c,
                      bool add_C, const float* A, const float* B, float* C, bool is_vnni);
TORCH_API void brgemm_release(bool is_vnni);
}  // namespace at::native::cpublas
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*,
                       const float*, const float*, const int*, const float*, const int*,
                       const float*, float*, const int*);

namespace {
double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

// Row-major C[m, n] = op(A)[m, k] op(B)[k, n]; lib 0: MKL sgemm_, 1: oneDNN matmul,
// 2: brgemm on the calling thread (no transposes; B in 64-column panels), 5: the same with B
// row-major as stored (blocks of 256 columns, as the backward's dL/dh product), 3: brgemm, each of
// the threads its share of the rows (the kernels' batch split), 4: brgemm, each thread its
// share of the 64-column panels (a hidden split, no barrier); 3 and 4 run all `reps` products
// in one parallel region, as the kernels run their steps. Returns the minimum seconds of one
// product over `trials` trials of `reps` products.
// 3 and 4 need at::parallel_for compiled with OpenMP; built with -fopenmp this file links the
// system's libgomp beside torch's and both spin on the same cores (all rates collapsed to
// 3-35 GFLOP/s), built without it they run on one thread. rates.py measures 0-2 only; the
// threads' rates come from split_micro.py (std::threads).
extern "C" double rt_product(int lib, int ta, int tb, int64_t m, int64_t n, int64_t k,
                             int reps, int trials) {
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor A = ta ? at::randn({k, m}, opts) : at::randn({m, k}, opts);
  at::Tensor B = tb ? at::randn({n, k}, opts) : at::randn({k, n}, opts);
  at::Tensor C = at::zeros({m, n}, opts);
  at::Tensor Bp = at::empty({k * n}, opts);  // 64-column panels of B [k, n]
  if (lib >= 2 && lib != 5) {
    const float* b = B.data_ptr<float>();
    float* p = Bp.data_ptr<float>();
    for (int64_t n0 = 0; n0 < n; n0 += 64) {
      const int64_t nb = std::min<int64_t>(64, n - n0);
      for (int64_t r = 0; r < k; ++r)
        for (int64_t j = 0; j < nb; ++j) p[n0 * k + r * nb + j] = b[r * n + n0 + j];
    }
  }
  auto once = [&] {
    if (lib == 0) {
      const int M = n, N = m, K = k;  // column-major C^T = op(B)^T op(A)^T
      const int lda = tb ? k : n, ldb = ta ? m : k, ldc = n;
      const float one = 1, zero = 0;
      const char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
      sgemm_(&tra, &trb, &M, &N, &K, &one, B.data_ptr<float>(), &lda, A.data_ptr<float>(), &ldb,
             &zero, C.data_ptr<float>(), &ldc);
    } else if (lib == 1) {
      at::native::mkldnn_matmul(ta ? A.t() : A, tb ? B.t() : B, C, 0.0f, 1.0f);
    } else {
      auto block = [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
        const float* a = A.data_ptr<float>();
        float* c = C.data_ptr<float>();
        for (int64_t m0 = r0; m0 < r1; m0 += 64)
          for (int64_t n0 = c0; n0 < c1; n0 += 64) {
            const int64_t nb = std::min<int64_t>(64, n - n0);
            at::native::cpublas::brgemm(std::min<int64_t>(64, r1 - m0), nb, k, k, nb, n, false,
                                        a + m0 * k, Bp.data_ptr<float>() + n0 * k,
                                        c + m0 * n + n0, false);
          }
      };
      const int64_t t = at::get_num_threads();
      if (lib == 5) {  // brgemm on this thread, B [k, n] row-major as stored (not in panels)
        for (int64_t m0 = 0; m0 < m; m0 += 64)
          for (int64_t n0 = 0; n0 < n; n0 += 256)
            at::native::cpublas::brgemm(std::min<int64_t>(64, m - m0), std::min<int64_t>(256, n - n0),
                                        k, k, n, n, false, A.data_ptr<float>() + m0 * k,
                                        B.data_ptr<float>() + n0, C.data_ptr<float>() + m0 * n + n0,
                                        false);
      } else if (lib == 2) block(0, m, 0, n);
      else if (lib == 3)
        at::parallel_for(0, m, (m + t - 1) / t, [&](int64_t r0, int64_t r1) {
          for (int r = 0; r < reps; ++r) block(r0, r1, 0, n);
        });
      else {
        const int64_t panels = (n + 63) / 64;
        at::parallel_for(0, panels, (panels + t - 1) / t, [&](int64_t p0, int64_t p1) {
          for (int r = 0; r < reps; ++r) block(0, m, p0 * 64, std::min(n, p1 * 64));
        });
      }
    }
  };
  once();
  double best = 1e30;
  for (int t = 0; t < trials; ++t) {
    const double t0 = now();
    if (lib == 3 || lib == 4) once();  // the repetitions inside the parallel region
    else
      for (int r = 0; r < reps; ++r) once();
    best = std::min(best, (now() - t0) / reps);
  }
  return best;
}

