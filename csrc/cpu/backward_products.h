// The backward's products and their operands (backward.h's backward_impl calls them): W_hh in
// panels for the reverse recurrence's dL/dh_{t-1} (step_dh_product), h_{t-1} of a layer's rows
// (h_prev_rows, h_prev_chunk), the weight and input gradients of a layer's rows (bf16_chunk_
// products, backward_products, the few-row products), and the gates recomputed a chunk of rows
// at a time where the reserve keeps none (recompute_chunk_gates).
// Part of the one translation unit lstm_cpu.cpp.
#pragma once

#include "bf16_products.h"
#include "few_rows.h"
#include "forward.h"

namespace fused_lstm {
namespace {

// W_hh [G, out] as the backward's brgemm reads it: in column panels of kBrgemmPanelN columns,
// each panel a contiguous row-major [G, nb] block at buf + n0 * G. Read as stored, W_hh's rows
// are `out` floats apart (2 KB at hidden 512, a power of two), which maps a column block's rows
// onto a few cache sets, as the forward's packing found for W^T (blas.h, kBrgemmPanelN):
// measured one thread, [32, 2048] x [2048, 512] (fastrnns' dL/dh step), 70.6 GFLOP/s as stored
// against 155.8 in panels; at medium's [16, 1024] x [1024, 256], 186.6 against 191.7
// (Intel Xeon; benchmarks/notes/float32-bound.md, "Intel Xeon: where the time goes").
// A bf16 or fp16 W_hh (a 16-bit model whose backward widens its weights, CpuPlan::
// backward_widens_16bit) is widened to float as it is packed: the same panels as from its float
// copy, bit for bit.
template <typename S, typename T>
void pack_w_hh_panels(const S* w_hh, int64_t G, int64_t out, T* buf) {
  const int64_t panels = (out + kBrgemmPanelN - 1) / kBrgemmPanelN;
  auto pack = [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kBrgemmPanelN, nb = std::min(kBrgemmPanelN, out - n0);
      if constexpr (std::is_same_v<S, T>) {
        copy_rows(w_hh + n0, out, buf + n0 * G, nb, G, nb);
      } else if constexpr (std::is_same_v<T, float>) {  // F16C for fp16 (convert_16bit.h)
        for (int64_t g = 0; g < G; ++g) widen_16bit(w_hh + g * out + n0, nb, buf + n0 * G + g * nb);
      } else {
        for (int64_t g = 0; g < G; ++g)
          for (int64_t j = 0; j < nb; ++j)
            buf[n0 * G + g * nb + j] = static_cast<T>(w_hh[g * out + n0 + j]);
      }
    }
  };
  if (panels > 1 && !at::in_parallel_region()) at::parallel_for(0, panels, 1, pack);
  else pack(0, panels);
}

// dL/dh_{t-1} [bs, out] = dg_t [bs, G] W_hh, on this thread: on AMX tiles where bb.amx_w_hh is
// set (dg_t's rows rounded into dg16, which the chunk's later products read), bf16_gemm where
// `bb` is set, else
// brgemm (`brgemm`: float32 with the micro-kernel; W_hh in panels where `w_hh_panels` is set,
// pack_w_hh_panels), else BLAS.
template <typename T>
void step_dh_product(const Bf16Backward& bb, bool brgemm, int64_t bs, int64_t out, int64_t G,
                     const T* dg_t, const T* w_hh, const T* w_hh_panels, T* dh,
                     c10::BFloat16* dg16) {
  if constexpr (std::is_same_v<T, float>) {
    if (bb.amx_w_hh) {
      round_bf16_rows(dg_t, G, bs, G, dg16, G);
      amx_product(false, bs, out, G, dg16, G, bb.amx_w_hh, dh, out);
      return;
    }
    if (bb.w_hh_t) {
      bf16_gemm(bs, out, G, dg_t, G, bb.w_hh_t, dh, out, false);
      return;
    }
    if (brgemm && w_hh_panels) {
      for (int64_t m0 = 0; m0 < bs; m0 += kBrgemmBlockM)
        for (int64_t n0 = 0; n0 < out; n0 += kBrgemmPanelN) {
          const int64_t nb = std::min(kBrgemmPanelN, out - n0);
          at::native::cpublas::brgemm(std::min(kBrgemmBlockM, bs - m0), nb, G, G, nb, out, false,
                                      dg_t + m0 * G, w_hh_panels + n0 * G, dh + m0 * out + n0,
                                      false);
        }
      return;
    }
    if (brgemm) {
      brgemm_product(false, bs, out, G, dg_t, G, w_hh, out, dh, out);
      return;
    }
  }
  gemm<T>(false, false, bs, out, G, T(1), dg_t, G, w_hh, out, T(0), dh, out);
}

// h_{t-1} of rows [r0, r1) of a layer and direction (the rows of dgates): row r0's at h, the
// next rows `ld` elements apart. dW_hh = dgates^T h_prev sums over one or two such segments.
template <typename T>
struct HPrevSegment {
  const T* h;
  int64_t ld, r0, r1;
};

template <typename T>
struct HPrev {
  HPrevSegment<T> seg[2];
  int n = 0;
};

// h_{t-1} of the rows of steps whose times are [t_lo, t_hi] (consecutive rows) gathered into
// `buf` [rows, out], the first of them at buf: the previous step's layer output (direction d's
// columns) for rows that continue a sequence, h0 for rows that start at their step.
template <typename T>
HPrev<T> gather_h_prev(const LSTMShape& s, int64_t d, int64_t t_lo, int64_t t_hi,
                       const T* layer_out, const T* h0, T* buf) {
  const int64_t out = s.out_size, out_stride = s.num_directions * out;
  const int64_t row0 = s.step_offset[t_lo], row1 = s.step_offset[t_hi] + s.batch_sizes[t_hi];
  for (int64_t t = t_lo; t <= t_hi; ++t) {
    const int64_t bs = s.batch_sizes[t];
    const PrevStep prev = prev_step(s, d, t);
    T* dst = buf + (s.step_offset[t] - row0) * out;
    if (prev.continuing > 0)
      copy_rows(layer_out + s.step_offset[prev.t] * out_stride + d * out, out_stride, dst, out,
                prev.continuing, out);
    copy_rows(h0 + prev.continuing * out, out, dst + prev.continuing * out, out,
              bs - prev.continuing, out);
  }
  HPrev<T> hp;
  hp.seg[0] = {buf, out, row0, row1};
  hp.n = 1;
  return hp;
}

// h_{t-1} of every row of direction d. Where every step has every row, read in place: the
// layer output shifted by one step (its direction's columns), and h0 for the first step
// processed (time 0 forward, time T-1 backward). Otherwise gathered into `buf` [rows, out]:
// per step, the rows that continue from the previous step, then those that start from h0.
template <typename T>
HPrev<T> h_prev_rows(const LSTMShape& s, int64_t d, const T* layer_out, const T* h0, T* buf) {
  const int64_t out = s.out_size, out_stride = s.num_directions * out, B = s.batch;
  const int64_t rows = s.rows;
  HPrev<T> hp;
  if (every_step_full(s)) {
    const T* shifted = layer_out + d * out;  // row r of layer_out: h at row r's step
    if (d == 0) {
      hp.seg[0] = {h0, out, 0, B};
      hp.seg[1] = {shifted, out_stride, B, rows};
    } else {
      hp.seg[0] = {shifted + B * out_stride, out_stride, 0, rows - B};
      hp.seg[1] = {h0, out, rows - B, rows};
    }
    hp.n = 2;
    return hp;
  }
  return gather_h_prev(s, d, 0, s.seq_len - 1, layer_out, h0, buf);
}

// h_{t-1} of rows [row0, row1) of direction d, the rows of steps whose times are
// [t_lo, t_hi] (a chunk of the backward's steps, bf16_chunk_products): h_prev_rows' segments
// cut to those rows where every step has every row (read in place); else gathered into `buf`
// [row1 - row0, out], row r at buf + (r - row0) * out. Row r's h_{t-1} at seg.h + (r - seg.r0) *
// seg.ld, as h_prev_rows gives it.
template <typename T>
HPrev<T> h_prev_chunk(const LSTMShape& s, int64_t d, int64_t t_lo, int64_t t_hi, const T* layer_out,
                      const T* h0, T* buf) {
  const int64_t row0 = s.step_offset[t_lo], row1 = s.step_offset[t_hi] + s.batch_sizes[t_hi];
  HPrev<T> hp;
  if (every_step_full(s)) {
    const HPrev<T> all = h_prev_rows<T>(s, d, layer_out, h0, nullptr);
    for (int i = 0; i < all.n; ++i) {
      const HPrevSegment<T>& seg = all.seg[i];
      const int64_t r0 = std::max(seg.r0, row0), r1 = std::min(seg.r1, row1);
      if (r0 < r1) hp.seg[hp.n++] = {seg.h + (r0 - seg.r0) * seg.ld, seg.ld, r0, r1};
    }
    return hp;
  }
  return gather_h_prev(s, d, t_lo, t_hi, layer_out, h0, buf);
}

// The bf16 products of a chunk of a layer and direction's rows, [row0, row1) (the rows of
// consecutive steps), as soon as the recurrence has computed their dgates (`dgates`: row row0's
// at dgates, G apart): dW_ih += dgates^T x, dW_hh += dgates^T h_prev (written, not added, where
// `first`: the direction's first chunk), and dL/dx = dgates W_ih for those rows (added to dx
// when `add_dx`: the other direction's). The weight gradients sum over at most kBf16GradRows
// rows at a time, no piece across two segments of h_prev; the bf16 copies of dgates^T, x and
// h_prev are a piece's only (bb, its W_ih^T packed already).
inline void bf16_chunk_products(const LSTMShape& s, const Bf16Backward& bb, const float* dgates,
                                int64_t row0, int64_t row1, Operand<float> x, int64_t in_size,
                                const HPrev<float>& h_prev, float* gw_ih, float* gw_hh,
                                float* dx, bool add_dx, bool first) {
  const int64_t G = 4 * s.hidden_size, out = s.out_size, ld = bb.ld;
  for (int i = 0; i < h_prev.n; ++i) {
    const HPrevSegment<float>& seg = h_prev.seg[i];
    for (int64_t k0 = seg.r0; k0 < seg.r1;) {
      const int64_t kn = std::min(kBf16GradRows, seg.r1 - k0);
      const bool overwrite = first && k0 == row0, last = k0 + kn == row1;
      const Piecewise dgates_t{G, [&](int64_t m0, int64_t m1) {  // bf16 rows, zero-padded
        auto transpose = [&](const auto* from) {  // from dgates' row row0
          bf16_transpose_rows(from + (k0 - row0) * G + m0, kn, m1 - m0, G, bb.dgates_t + m0 * ld,
                              ld);
        };
        if (bb.dgates16) transpose(bb.dgates16);  // rounded already by the steps' products
        else transpose(dgates);
      }};
      const float* h_rows = seg.h + (k0 - seg.r0) * seg.ld;
      if (bb.amx_x) {  // x and h_prev as B [kn, in] and [kn, out] for the tiles
        split_over_threads({dgates_t});
        visit(x.at(k0 * in_size), [&](auto X) { amx_pack(X, in_size, kn, in_size, true, bb.amx_x); });
        amx_pack(h_rows, out, kn, seg.ld, true, bb.amx_h_prev);
      } else {
        split_over_threads({pack_t_job(x.at(k0 * in_size), in_size, kn, in_size, bb.x),
                            pack_t_job({h_rows}, out, kn, seg.ld, bb.h_prev), dgates_t});
      }
      const Piecewise weight_grads{G, [&](int64_t m0, int64_t m1) {  // rows of dW_ih, dW_hh
        const c10::BFloat16* a = bb.dgates_t + m0 * ld;
        if (bb.amx_x) {  // K rounded up to pairs: the zero column of A meets a zero row of B
          const int64_t k_even = amx_k_even(kn);
          amx_product(!overwrite, m1 - m0, in_size, k_even, a, ld, bb.amx_x, gw_ih + m0 * in_size,
                      in_size);
          amx_product(!overwrite, m1 - m0, out, k_even, a, ld, bb.amx_h_prev, gw_hh + m0 * out,
                      out);
          amx_release();
          return;
        }
        bf16_gemm(m1 - m0, in_size, kn, a, ld, bb.x, gw_ih + m0 * in_size, in_size, !overwrite);
        bf16_gemm(m1 - m0, out, kn, a, ld, bb.h_prev, gw_hh + m0 * out, out, !overwrite);
      }};
      // dL/dx (none where dx is null: the input needs no gradient, lstm_backward's input_grad)
      const Piecewise data_grads{last && dx ? row1 - row0 : 0, [&](int64_t r0, int64_t r1) {
        float* c = dx + (row0 + r0) * in_size;
        if (bb.amx_w_ih) {
          amx_product(add_dx, r1 - r0, in_size, G, bb.dgates16 + r0 * G, G, bb.amx_w_ih, c,
                      in_size);
          amx_release();
          return;
        }
        bf16_gemm(r1 - r0, in_size, G, dgates + r0 * G, G, bb.w_ih_t, c, in_size, add_dx);
      }};
      split_over_threads({weight_grads, data_grads});
      k0 += kn;
    }
  }
}

// A layer and direction's products where they are not bf16 ones (bf16_chunk_products), for
// its rows [row0, row0 + rows) (all of them after the recurrence, or a chunk's as soon as the
// recurrence has computed them: dgates, x_rows and dx_rows hold row row0's first): dW_ih =
// dgates^T x and dW_hh = dgates^T h_prev (added to what the gradients hold where `accumulate`:
// the chunks after a direction's first; none where gw_ih and gw_hh are null: the gradients
// apart, lstm.h), and dL/dx = dgates W_ih (added to dx when `add_dx`: the other direction's;
// none where dx_rows is null: lstm_backward's input_grad).
template <typename T>
void backward_products(const LSTMShape& s, const T* dgates, int64_t row0, int64_t rows,
                       const T* x_rows, int64_t in_size, const HPrev<T>& h_prev, const T* w_ih,
                       T* gw_ih, T* gw_hh, T* dx_rows, bool add_dx, bool accumulate) {
  const int64_t G = 4 * s.hidden_size, out = s.out_size;
  TORCH_INTERNAL_ASSERT(x_rows != nullptr || rows == 0,
                        "fused_lstm: float32 products read x in float");
  const T beta = accumulate ? T(1) : T(0);
  if (gw_ih)
    gemm<T>(true, false, G, in_size, rows, T(1), dgates, G, x_rows, in_size, beta, gw_ih, in_size);
  // (also for an empty batch: gemm zero-fills when k == 0)
  for (int i = 0; i < h_prev.n && gw_hh; ++i) {
    const HPrevSegment<T>& seg = h_prev.seg[i];
    gemm<T>(true, false, G, out, seg.r1 - seg.r0, T(1), dgates + (seg.r0 - row0) * G, G, seg.h,
            seg.ld, i == 0 ? beta : T(1), gw_hh, out);
  }
  if (dx_rows)
    gemm<T>(false, false, rows, in_size, G, T(1), dgates, G, w_ih, in_size, add_dx ? T(1) : T(0),
            dx_rows, in_size);
}

// step_dh_product and backward_products for the plan's backward_few_rows (float32 math; the
// weights W_ih and W_hh as stored, float32 or kept 16-bit: few_rows.h).
template <typename T>
void few_rows_dh(int64_t bs, int64_t out, int64_t G, const T* dg_t, const Operand<T>& w_hh,
                 T* dh) {
  if constexpr (std::is_same_v<T, float>) {
    visit_weights(w_hh,
                  [&](auto W) { few_rows_product(bs, out, G, dg_t, G, W, out, dh, out, false); });
  } else {
    TORCH_INTERNAL_ASSERT(false, "fused_lstm: few-row products are float32 only");
  }
}

template <typename T>
void few_rows_backward_products(const LSTMShape& s, const T* dgates, Operand<T> x,
                                int64_t in_size, const HPrev<T>& h_prev, const Operand<T>& w_ih,
                                at::Tensor& gw_ih, at::Tensor& gw_hh, T* dx, bool add_dx,
                                bool factors = false) {
  if constexpr (std::is_same_v<T, float>) {
    const int64_t G = 4 * s.hidden_size, out = s.out_size, rows = s.rows;
    TORCH_INTERNAL_ASSERT(rows <= kThinMaxBatch);
    // A bf16 input kept as given (the thin variant's training): its rows widened, exactly.
    std::vector<float> widened_x;
    if (!x.f && rows * in_size > 0) {  // (an empty batch's input has no data at all)
      widened_x.resize(rows * in_size);
      with_kept_16bit(x, [&](auto X) { widen_16bit(X, rows * in_size, widened_x.data()); });
    }
    const float* xf = x.f ? x.f : widened_x.data();
    const float* x_rows[kThinMaxBatch];
    const float* h_rows[kThinMaxBatch];
    for (int64_t r = 0; r < rows; ++r) x_rows[r] = xf + r * in_size;
    for (int i = 0; i < h_prev.n; ++i) {
      const HPrevSegment<T>& seg = h_prev.seg[i];
      for (int64_t r = seg.r0; r < seg.r1; ++r) h_rows[r] = seg.h + (r - seg.r0) * seg.ld;
    }
    if (factors) {  // gw_ih and gw_hh: the one tensor of the layer and direction's factors,
      // dgates [rows, G], x [rows, in_size], h_prev [rows, out] (lstm.h apart_factors_numel;
      // weight_grad_from_factors makes the gradients from them)
      TORCH_INTERNAL_ASSERT(gw_ih.is_same(gw_hh) && gw_ih.scalar_type() == at::kFloat &&
                            gw_ih.is_contiguous() && gw_ih.numel() == rows * (G + in_size + out));
      float* p = gw_ih.mutable_data_ptr<float>();
      std::copy_n(dgates, rows * G, p);
      for (int64_t r = 0; r < rows; ++r) {
        std::copy_n(x_rows[r], in_size, p + rows * G + r * in_size);
        std::copy_n(h_rows[r], out, p + rows * (G + in_size) + r * out);
      }
    } else {
      few_rows_outer(rows, G, in_size, dgates, G, x_rows, gw_ih);
      few_rows_outer(rows, G, out, dgates, G, h_rows, gw_hh);
    }
    visit_weights(w_ih, [&](auto W) {
      if (dx) few_rows_product(rows, in_size, G, dgates, G, W, in_size, dx, in_size, add_dx);
    });
  } else {
    TORCH_INTERNAL_ASSERT(false, "fused_lstm: few-row products are float32 only");
  }
}

// The activated gates of a chunk of a layer and direction's rows [row0, row0 + rows) (the rows
// of consecutive steps, `block`) into `gates` ([rows, 4H], row row0's first), as the forward's
// brgemm steps computed them, but for all of the chunk's rows at once: every h_{t-1} is in the
// reserve already, so the steps' products need not run one step after the other. On entry
// `gates` holds the chunk's input projection where the forward ran one (fw.k_ih == 0); else
// x_rows' product with W_ih^T's panels is computed here first, as the fused step does. Then
// h_{t-1} W_hh^T is added (h_prev: the chunk's segments; rows [skip0, skip1) have none, the
// first step's without hx, whose product the forward skipped), and the cell pass activates
// each row (its c_t and h_t go to scratch). The same micro-kernel on the same rows of A and
// panels of B, and the same cell pass, as the forward's steps: the same gates, bit for bit,
// with W_hh's panels read once per chunk and thread instead of once per step.
inline void recompute_chunk_gates(const CpuPlan& plan, const LSTMShape& s,
                                  const DirectionWeights<float>& fw, const StepBlock& block,
                                  const float* x_rows, int64_t in_size, const HPrev<float>& h_prev,
                                  int64_t skip0, int64_t skip1, float* gates) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size, row0 = block.row0;
  auto rows_job = [&](int64_t a, int64_t b) {  // chunk rows [a, b), counted from row0
    if (fw.k_ih > 0)
      brgemm_packed(false, b - a, G, in_size, x_rows + a * in_size, in_size, fw, 0,
                    gates + a * G, G);
    for (int i = 0; i < h_prev.n; ++i) {
      const HPrevSegment<float>& seg = h_prev.seg[i];
      auto add = [&](int64_t r0, int64_t r1) {  // absolute rows
        if (r0 >= r1) return;
        brgemm_packed(true, r1 - r0, G, out, seg.h + (r0 - seg.r0) * seg.ld, seg.ld, fw,
                      fw.k_ih, gates + (r0 - row0) * G, G);
      };
      const int64_t r0 = std::max(seg.r0, row0 + a), r1 = std::min(seg.r1, row0 + b);
      add(r0, std::min(r1, skip0));
      add(std::max(r0, skip1), r1);
    }
    std::vector<float> scratch(3 * H);  // c_{t-1} -> c_t, c_t kept, h_t: not read
    for (int64_t r = a; r < b; ++r) {
      float* g = gates + r * G;
      cell_forward_block(H, g, g + H, g + 2 * H, g + 3 * H, fw.bias, H, scratch.data(),
                         scratch.data() + H, scratch.data() + 2 * H, plan.vec16_cell);
    }
  };
  const int64_t grain = kBrgemmBlockM;
  if (block.rows * G * (in_size + out) >= kParallelElements && !at::in_parallel_region())
    at::parallel_for(0, block.rows, grain, rows_job);
  else
    rows_job(0, block.rows);
}

// Where the float-chunk backward widens W_ih next to W_hh (in one scratch buffer): at the first
// 64-byte boundary after W_hh's G * out floats, as the forward's own widened W_ih starts (the
// same product on operands placed alike).
inline int64_t w_ih_at(int64_t G, int64_t out) { return (G * out + 15) / 16 * 16; }

}  // namespace
}  // namespace fused_lstm
