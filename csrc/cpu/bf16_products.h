// bfloat16 models on CPUs with AVX512_BF16: the weights packed for bf16_gemm (forward), and
// the backward's buffers and parallel jobs for its bf16 products.
// Part of the one translation unit lstm_cpu.cpp.
#pragma once

#include "weights.h"

#include <functional>
#include <initializer_list>

namespace fused_lstm {
namespace {

// Packed size of an [N, K] weight for the forward's bf16 products: bf16_gemm's or, on AMX, the
// micro-kernel's (amx.h).
inline int64_t forward_packed_size(const CpuPlan& plan, int64_t N, int64_t K) {
  return plan.amx_products ? amx_packed_size(N, K) : static_cast<int64_t>(bf16_packed_size(N, K));
}

// Room for one layer and direction's W_ih and W_hh packed for the forward's bf16 products (the
// largest), or null where the bf16 products are not used.
inline uint16_t* bf16_weight_buffer(const CpuPlan& plan, const LSTMShape& s, at::Tensor& holder) {
  if (!plan.bf16_products) return nullptr;
  const int64_t G = 4 * s.hidden_size;
  int64_t most = 0;
  for (int64_t l = 0; l < s.num_layers; ++l)
    most = std::max(most, forward_packed_size(plan, G, s.layer_input_size(l)));
  holder = cpu_cached_empty(most + forward_packed_size(plan, G, s.out_size), at::kBFloat16);
  return reinterpret_cast<uint16_t*>(holder.mutable_data_ptr());
}

// Packs layer `layer`'s W_ih and W_hh into `buf` (from bf16_weight_buffer) for bf16_gemm, or
// for the micro-kernel on AMX tiles where the plan says so: the bf16 model's weights as given
// (kept bf16) or converted to float32, which packs back exactly.
template <typename T>
void use_bf16_gemm(const CpuPlan& plan, const LSTMShape& s, int64_t layer, DirectionWeights<T>& w,
                   uint16_t* buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (buf == nullptr) return;
    const int64_t G = 4 * s.hidden_size, in = s.layer_input_size(layer), out = s.out_size;
    // bf16_gemm's packed sizes are multiples of 32 elements: 64-byte blocks.
    uint16_t* hh = buf + forward_packed_size(plan, G, in);
    if (plan.amx_products) {
      auto* ih_amx = reinterpret_cast<c10::BFloat16*>(buf);
      auto* hh_amx = reinterpret_cast<c10::BFloat16*>(hh);
      if (fuse_input_projection(plan, s, layer, sizeof(uint16_t))) {
        // One B for the fused step (amx_pack_cat_t), in the room of the two.
        // (W_ih and W_hh are both kept bf16 or both float: lstm.h Keep16.)
        TORCH_INTERNAL_ASSERT((w.ih.b != nullptr) == (w.hh.b != nullptr));
        if (w.ih.b) amx_pack_cat_t(w.ih.b, in, w.hh.b, out, G, ih_amx);
        else amx_pack_cat_t(w.ih.f, in, w.hh.f, out, G, ih_amx);
        w.amx_cat = ih_amx;
        w.k_ih = in;
        return;
      }
      visit(w.ih, [&](auto W) { amx_pack_weight_t(W, G, in, in, ih_amx); });
      visit(w.hh, [&](auto W) { amx_pack_weight_t(W, G, out, out, hh_amx); });
      w.amx_ih = ih_amx;
      w.amx_hh = hh_amx;
    } else {
      visit(w.ih, [&](auto W) { bf16_pack_weight(W, G, in, in, buf); });
      visit(w.hh, [&](auto W) { bf16_pack_weight(W, G, out, out, hh); });
      w.w_ih_bf16 = buf;
      w.w_hh_bf16 = hh;
    }
    if (fuse_input_projection(plan, s, layer, sizeof(uint16_t))) w.k_ih = in;
  }
}

// ---- The backward's products of bfloat16 models through bf16_gemm ----
// As in the forward (and in oneDNN's bf16 LSTM): bf16 operands, float32 sums. Per layer and
// direction, with G = 4H:
//   per step   dL/dh_{t-1} = dgates_t W_hh    A = dgates_t, W' = W_hh^T (packed from W_hh)
//   then       dL/dx       = dgates W_ih      A = dgates,   W' = W_ih^T (packed from W_ih)
//              dW_ih       = dgates^T x       A = dgates^T, W' = x^T    (packed from x)
//              dW_hh       = dgates^T h_prev  A = dgates^T, W' = h_prev^T
// Every W' is packed from the matrix as it is stored, [K, N] (bf16_pack_weight_t). The weight
// gradients need A = dgates^T, stored the other way round: it is converted once into bf16 rows
// (bf16_transpose_rows) that both products read in place; the alternative, dW^T = x^T dgates,
// would pack dgates (as large) and transpose x, h_prev and both results. dW_hr stays float32.
// The weight gradients sum over kBf16GradRows rows at a time (float32 sums carried in dW), so
// that the bf16 copies of dgates^T, x and h_prev are those rows' only: whole, they put bf16
// training's peak memory above nn.LSTM's (medium: 89.3 vs 88.2 MB; benchmarks/notes/memory.md,
// "bf16 weight gradients in chunks of rows").
constexpr int64_t kBf16GradRows = 1024;

// Rows of dgates the chunked backward holds at a time: kBf16GradRows, or one step's where a
// step has more rows.
inline int64_t bf16_chunk_rows(const LSTMShape& s) {
  return std::min(s.rows, std::max(kBf16GradRows, s.batch));
}

struct Bf16Backward {
  bool on = false;             // the backward's products are bf16 ones (the plan's bf16_products)
  // bf16_gemm's operands, where the products are not on AMX tiles (else null):
  uint16_t* w_hh_t = nullptr;  // W_hh^T [out, G] packed; null where the bf16 products are off
  uint16_t* w_ih_t = nullptr;  // W_ih^T [in, G]
  uint16_t* x = nullptr;       // x^T [in, chunk] for a chunk of at most kBf16GradRows rows
  uint16_t* h_prev = nullptr;  // h_prev^T [out, chunk]
  c10::BFloat16* dgates_t = nullptr;  // dgates^T [G, chunk] as bf16 rows, row stride ld
  int64_t ld = 0;
  // On AMX (the plan's amx_products): W_hh as B [G, out] packed for the per-step dL/dh_{t-1}
  // product on the tiles (amx.h), and W_ih as B [G, in] for dL/dx, which then replace w_hh_t
  // and w_ih_t.
  c10::BFloat16* amx_w_hh = nullptr;
  c10::BFloat16* amx_w_ih = nullptr;
  // And the weight gradients' B operands for a chunk of rows: x [chunk, in], h_prev [chunk, out].
  c10::BFloat16* amx_x = nullptr;
  c10::BFloat16* amx_h_prev = nullptr;
  // And a chunk's dgates [chunk rows, G] as bf16 rows: rounded once, by the step's dL/dh_{t-1}
  // product (its A), then read by dL/dx and transposed into dgates_t.
  c10::BFloat16* dgates16 = nullptr;
};

inline Bf16Backward bf16_backward_buffers(const CpuPlan& plan, const LSTMShape& s,
                                          at::Tensor& holder) {
  Bf16Backward b;
  if (!plan.bf16_products) return b;
  const int64_t G = 4 * s.hidden_size, out = s.out_size;
  const int64_t rows = std::min(s.rows, kBf16GradRows);
  const int64_t in_max = std::max(s.input_size, s.num_directions * out);
  b.on = true;
  b.ld = bf16_row_stride(rows);
  // The four B operands, packed for the tiles or for bf16_gemm (whose packed sizes are
  // multiples of 32 elements: each part starts on a 64-byte boundary); then dgates^T's rows.
  const bool amx = plan.amx_products;
  auto packed = [&](int64_t N, int64_t K) {
    return amx ? amx_packed_size(N, K) : static_cast<int64_t>(bf16_packed_size(N, K));
  };
  const int64_t sizes[] = {packed(out, G), packed(in_max, G), packed(in_max, rows),
                           packed(out, rows)};
  const int64_t dgates16 = amx ? bf16_chunk_rows(s) * G : 0;
  holder = cpu_cached_empty(sizes[0] + sizes[1] + sizes[2] + sizes[3] + G * b.ld + dgates16,
                            at::kBFloat16);
  uint16_t* part[5];
  part[0] = reinterpret_cast<uint16_t*>(holder.mutable_data_ptr());
  for (int i = 0; i < 4; ++i) part[i + 1] = part[i] + sizes[i];
  b.dgates_t = reinterpret_cast<c10::BFloat16*>(part[4]);
  if (amx) {
    auto bf16 = [](uint16_t* p) { return reinterpret_cast<c10::BFloat16*>(p); };
    b.amx_w_hh = bf16(part[0]);
    b.amx_w_ih = bf16(part[1]);
    b.amx_x = bf16(part[2]);
    b.amx_h_prev = bf16(part[3]);
    b.dgates16 = bf16(part[4] + G * b.ld);
  } else {
    b.w_hh_t = part[0];
    b.w_ih_t = part[1];
    b.x = part[2];
    b.h_prev = part[3];
  }
  return b;
}

// Part of the work of a parallel region: f(i0, i1) over pieces of [0, n) cut at multiples of
// kBf16GemmBlockN.
struct Piecewise {
  int64_t n;
  std::function<void(int64_t, int64_t)> f;
};

// Every job split evenly over the threads, in ONE parallel region (each thread runs its piece of
// each job): a region per job adds a barrier each, and on a loaded machine a barrier can cost a
// time slice.
inline void split_over_threads(std::initializer_list<Piecewise> jobs) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  auto piece = [&](int64_t t) {
    for (const Piecewise& j : jobs) {
      const int64_t units = (j.n + kBf16GemmBlockN - 1) / kBf16GemmBlockN;
      const int64_t i0 = units * t / threads * kBf16GemmBlockN;
      const int64_t i1 = std::min(j.n, units * (t + 1) / threads * kBf16GemmBlockN);
      if (i0 < i1) j.f(i0, i1);
    }
  };
  if (threads > 1) {
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) piece(t);
    });
  } else {
    piece(0);
  }
}

// bf16_pack_weight_t as a Piecewise job: 16-column blocks are packed independently.
inline Piecewise pack_t_job(Operand<float> Wt, int64_t N, int64_t K, int64_t ldw,
                            uint16_t* out) {
  return {N, [=](int64_t n0, int64_t n1) {
            visit(Wt.at(n0), [&](auto W) {
              bf16_pack_weight_t(W, n1 - n0, K, ldw, out + bf16_packed_size(n0, K));
            });
          }};
}

}  // namespace
}  // namespace fused_lstm
