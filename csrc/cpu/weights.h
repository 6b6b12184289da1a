// Weight preparation: one layer and direction's weights as raw pointers, the summed bias,
// and W_ih / W_hh transposed and packed in panels for the brgemm micro-kernel.
// Part of the one translation unit lstm_cpu.cpp.
#pragma once

#include "plan.h"
#include <atomic>

namespace fused_lstm {
namespace {

// Weights of one layer and direction, as raw pointers into contiguous tensors: math dtype,
// except W_ih and W_hh where the op kept them bf16 (ih, hh).
template <typename T>
struct DirectionWeights {
  const T* w_ih;  // [4H, I_l]; null where W_ih is bf16 (ih)
  const T* w_hh;  // [4H, out]; null where W_hh is bf16 (hh)
  const T* b_ih;  // [4H] or null
  const T* b_hh;  // [4H] or null
  const T* w_hr;  // [out, H] or null
  // The brgemm path (float32 only; see use_brgemm), else null: [W_ih^T; W_hh^T] ([k_ih + out,
  // 4H]; W_hh^T alone where k_ih = 0) packed in column panels of kBrgemmPanelN columns.
  const T* w_packed = nullptr;
  int64_t k_ih = 0;  // the layer's input size where the input projection is fused (brgemm or
                     // bf16_gemm: each step computes x_t W_ih^T for its rows), else 0
  int64_t out = 0;            // rows of W_hh^T in the panels
  const T* bias = nullptr;    // [4H]: b_ih + b_hh, added by the cell pass (use_bias), or null
  // bfloat16 models on AVX512_BF16 machines (float32 math only): W_ih and W_hh packed for
  // bf16_gemm, which then computes the input projection and the recurrent product from bf16
  // operands with float32 sums, as oneDNN's bf16 LSTM does; null otherwise (and then w_packed
  // may be set instead).
  const uint16_t* w_ih_bf16 = nullptr;
  const uint16_t* w_hh_bf16 = nullptr;
  // W_ih and W_hh as given, in the math dtype or kept bf16 (then w_ih, w_hh are null).
  Operand<T> ih, hh;
  // The same on AMX tiles (amx.h: W^T packed by panels), instead of w_ih_bf16 / w_hh_bf16.
  const c10::BFloat16* amx_ih = nullptr;
  const c10::BFloat16* amx_hh = nullptr;
  // Where the projection is fused into the steps on the tiles: [W_ih^T; W_hh^T] as one B
  // (amx_pack_cat_t), K = k_ih + out, instead of amx_ih and amx_hh.
  const c10::BFloat16* amx_cat = nullptr;
  bool amx_steps() const { return amx_hh != nullptr || amx_cat != nullptr; }
  // Whether a step's recurrent product runs at full speed on one thread (brgemm, bf16_gemm or
  // AMX), so the batch can be split over threads at any step size (for_each_batch_slice).
  bool single_thread_product() const {
    return w_packed != nullptr || w_hh_bf16 != nullptr || amx_steps();
  }
};

template <typename T>
DirectionWeights<T> direction_weights(const LSTMShape& s, const std::vector<at::Tensor>& w,
                                      int64_t layer, int64_t direction) {
  const int64_t k = s.weight_index(layer, direction);
  const Operand<T> ih = operand<T>(w[k]), hh = operand<T>(w[k + 1]);
  DirectionWeights<T> dw{ih.f, hh.f, nullptr, nullptr, nullptr};
  dw.ih = ih;
  dw.hh = hh;
  int64_t next = k + 2;
  if (s.has_biases) {
    dw.b_ih = w[next].const_data_ptr<T>();
    dw.b_hh = w[next + 1].const_data_ptr<T>();
    next += 2;
  }
  if (s.proj_size > 0) dw.w_hr = w[next].const_data_ptr<T>();
  return dw;
}

// w.bias = b_ih + b_hh ([4H], in `holder`, allocated at the first call) where the layer has
// biases. The cell pass adds it, so the products write the gates without first filling them
// with it (benchmarks/notes/bf16.md, "The bias left to the cell pass").
template <typename T>
void use_bias(DirectionWeights<T>& w, int64_t G, at::Tensor& holder) {
  if (w.b_ih == nullptr) return;
  if (!holder.defined()) holder = cpu_cached_empty(G, c10::CppTypeToScalarType<T>::value);
  T* buf = holder.mutable_data_ptr<T>();
  for (int64_t j = 0; j < G; ++j) buf[j] = w.b_ih[j] + w.b_hh[j];
  w.bias = buf;
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols, in tiles that keep both
// sides' lines in cache.
template <typename T>
void transpose_tiles(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst,
                     int64_t ld_dst) {
  constexpr int64_t kTile = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ld_dst + r] = src[r * ld_src + c];
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#define FUSED_LSTM_AVX2_TRANSPOSE 1
// The same for float in 8 x 8 blocks transposed in AVX2 registers, the edges by transpose_tiles.
// The scalar tiles took ~1.1 ns per float at the fastrnns shape (their 32 source rows, 2 KB
// apart, fall into two L1 sets), these ~0.2 (benchmarks/notes/cpu-kernels.md, "Weight packing").
__attribute__((target("avx2"))) void transpose_avx2(const float* src, int64_t ld_src,
                                                    int64_t rows, int64_t cols, float* dst,
                                                    int64_t ld_dst) {
  const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
  for (int64_t r0 = 0; r0 < r8; r0 += 8)
    for (int64_t c0 = 0; c0 < c8; c0 += 8) {
      const float* s = src + r0 * ld_src + c0;
      float* d = dst + c0 * ld_dst + r0;
      __m256 r[8], t[8], u[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * ld_src);
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);  // rows i, i+1 interleaved, low halves
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
      }
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(d + i * ld_dst, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(d + (i + 4) * ld_dst, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
      }
    }
  transpose_tiles(src + r8 * ld_src, ld_src, rows - r8, cols, dst + r8, ld_dst);
  transpose_tiles(src + c8, ld_src, r8, cols - c8, dst + c8 * ld_dst, ld_dst);
}
#endif

template <typename T>
void transpose_block(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst,
                     int64_t ld_dst) {
#ifdef FUSED_LSTM_AVX2_TRANSPOSE
  if constexpr (std::is_same_v<T, float>) {
    static const bool avx2 = [] {
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") != 0;
    }();
    if (avx2) return transpose_avx2(src, ld_src, rows, cols, dst, ld_dst);
  }
#endif
  transpose_tiles(src, ld_src, rows, cols, dst, ld_dst);
}

// Layers (and directions) whose float32 brgemm steps ran with the input projection fused, in
// this process (the test hook fused_lstm::_fused_projection_layers reads it: whether a call
// fused leaves no other trace, the two often giving the same bits).
inline std::atomic<int64_t>& fused_projection_layers() {
  static std::atomic<int64_t> n{0};
  return n;
}

// Whether a forward's steps read W_hh: not with one step and no hx (h_{t-1} = 0 throughout).
inline bool forward_reads_w_hh(const LSTMShape& s, bool has_hx) {
  return has_hx || s.seq_len > 1;
}

// The brgemm path's weights of layer `layer`, packed into `buf` (see kBrgemmPanelN): each panel
// of columns [n0, n0 + nb) of the gates holds W_ih^T's rows (where the input projection is
// fused) then W_hh^T's, [k_ih + out, nb] row-major, at buf + n0 * (k_ih + out). `buf` is null
// (from brgemm_buffer) where that path does not apply. count_fused: whether a fused layer counts
// in fused_projection_layers (not the backward's recompute of the forward's steps). Without
// `with_w_hh` (forward_reads_w_hh false: no recurrent product) W_hh^T's rows are not packed.
template <typename T>
void use_brgemm(const CpuPlan& plan, const LSTMShape& s, DirectionWeights<T>& w, T* buf,
                int64_t layer, bool count_fused = true, bool with_w_hh = true) {
  if constexpr (std::is_same_v<T, float>) {
    if (buf == nullptr) return;
    const int64_t G = 4 * s.hidden_size, out = s.out_size;
    const int64_t k_ih =
        fuse_input_projection(plan, s, layer, sizeof(float)) ? s.layer_input_size(layer) : 0;
    if (k_ih > 0 && count_fused) fused_projection_layers().fetch_add(1, std::memory_order_relaxed);
    const int64_t K = k_ih + out;
    const int64_t panels = (G + kBrgemmPanelN - 1) / kBrgemmPanelN;
    // The panel's nb rows of W ([G, k] row-major): as stored, or 16-bit ones kept by the op
    // (CpuPlan::fp16_kept_inference; the backward's recompute where it widens a 16-bit model's
    // weights, CpuPlan::backward_widens_16bit) widened on this thread first (exact).
    auto rows_of = [](const T* f, const Operand<T>& kept, int64_t n0, int64_t nb,
                      int64_t k) -> const T* {
      if (f != nullptr) return f + n0 * k;
      const T* rows = nullptr;
      with_kept_16bit(kept, [&](auto w16) { rows = widened_on_this_thread(w16 + n0 * k, nb * k); });
      return rows;
    };
    auto pack = [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * kBrgemmPanelN, nb = std::min(kBrgemmPanelN, G - n0);
        T* panel = buf + n0 * K;
        if (k_ih > 0)
          transpose_block(rows_of(w.w_ih, w.ih, n0, nb, k_ih), k_ih, nb, k_ih, panel, nb);
        if (with_w_hh)
          transpose_block(rows_of(w.w_hh, w.hh, n0, nb, out), out, nb, out, panel + k_ih * nb,
                          nb);
      }
    };
    if (panels > 1 && !at::in_parallel_region()) at::parallel_for(0, panels, 1, pack);
    else pack(0, panels);
    w.w_packed = buf;
    w.k_ih = k_ih;
    w.out = out;
  }
}

// A float16 W_ih kept by the op (CpuPlan::fp16_kept_inference, fp16_kept_training) widened
// into `holder` where the unfused projection's GEMM reads it (k_ih == 0: after use_brgemm),
// a layer and direction's at a time.
template <typename T>
void widen_kept_w_ih(DirectionWeights<T>& w, int64_t G, int64_t in_size, at::Tensor& holder) {
  if (w.w_ih == nullptr && w.ih.h != nullptr && w.k_ih == 0)
    w.w_ih = widened_into<T>(w.ih.h, G * in_size, holder);
}

// Scratch for use_brgemm, or null where the plan's steps do not use brgemm: the largest
// layer's panels, W_hh^T's and, where that layer's projection is fused, W_ih^T's.
template <typename T>
T* brgemm_buffer(const CpuPlan& plan, const LSTMShape& s, at::Tensor& holder) {
  if (!std::is_same_v<T, float> || !plan.brgemm_steps) return nullptr;
  int64_t k_max = 0;
  for (int64_t l = 0; l < s.num_layers; ++l)
    k_max = std::max(k_max, fuse_input_projection(plan, s, l, sizeof(float))
                                ? s.layer_input_size(l) : int64_t{0});
  return scratch<T>(holder, 4 * s.hidden_size * (s.out_size + k_max));
}

}  // namespace
}  // namespace fused_lstm
