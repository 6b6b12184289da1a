// The forward drivers: training (forward_impl, which fills the reserve) and inference
// (inference_impl, which keeps nothing), layer by layer and direction by direction, each
// running the kernel variant plan.h chose.
// Part of the one translation unit lstm_cpu.cpp.
#pragma once

#include "bf16_products.h"
#include "hidden_split.h"
#include "small_hidden.h"
#include "thin.h"

namespace fused_lstm {
namespace {

// Gate elements per input-projection chunk of inference (4 MB in float32), where the
// projection runs over chunks of steps into one reused buffer. Measured: 2^18 cost fastrnns a
// quarter of its speed in small GEMMs; 2^22 was slower again than 2^20
// (benchmarks/notes/memory.md, "Page faults of a fresh reserve; inference without one").
constexpr int64_t kChunkElements = 1 << 20;

// Steps per chunk of the unfused input projection (`elements` gate elements at most, at least
// one step): chunk c holds steps [c * n, (c + 1) * n) in processing order.
inline int64_t projection_chunk_steps(const LSTMShape& s, int64_t elements = kChunkElements) {
  return std::max<int64_t>(1, elements / std::max<int64_t>(1, s.batch * 4 * s.hidden_size));
}
// The same for training without gates in the reserve (lstm.h, gates_in_reserve: forward_impl,
// and backward_impl, which projects the same chunks again), by chunks of half inference's gate
// elements, but at least kTrainingChunkMinRows rows: the backward holds a chunk's float32
// dgates, and at medium (float16) chunks of 2^20 elements left its peak 1% below nn.LSTM's
// float16, 2^19 11% below, at the same time; but a chunk's projection is a GEMM of the chunk's
// rows, done twice, which ran at 294 GFLOP/s at 256 rows against 334 at 512 (fastrnns' shape,
// 2 threads; benchmarks/notes/memory.md, "float16 training: no gates kept").
constexpr int64_t kTrainingChunkElements = kChunkElements / 2;
constexpr int64_t kTrainingChunkMinRows = 512;
inline int64_t training_chunk_steps(const LSTMShape& s) {
  const int64_t min_steps = (kTrainingChunkMinRows + s.batch - 1) / std::max<int64_t>(1, s.batch);
  return std::max(projection_chunk_steps(s, kTrainingChunkElements), min_steps);
}

// The rows of steps [first, last] (processing order) of direction d: consecutive in time
// ([t_lo, t_hi]), so one contiguous block [row0, row0 + rows).
struct StepBlock {
  int64_t row0, rows, t_lo, t_hi;
};
inline StepBlock step_block(const LSTMShape& s, int64_t d, int64_t first, int64_t last) {
  const int64_t t_lo = std::min(time_of(s, d, first), time_of(s, d, last));
  const int64_t t_hi = std::max(time_of(s, d, first), time_of(s, d, last));
  const int64_t row0 = s.step_offset[t_lo];
  return {row0, s.step_offset[t_hi] + s.batch_sizes[t_hi] - row0, t_lo, t_hi};
}

template <typename T>
void forward_impl(const CpuPlan& plan, const LSTMShape& s, Operand<T> input, const T* hx,
                  const T* cx, const std::vector<at::Tensor>& weights, const T* mask, T* hy,
                  T* cy, T* reserve) {
  if (plan.variant == Variant::kThin) {  // a training call of a few rows (plan.h)
    TORCH_INTERNAL_ASSERT(s.gates_in_reserve);
    return thin_forward<T>(plan, s, input, hx, cx, weights, mask, hy, cy, nullptr, reserve);
  }
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size, D = s.num_directions;
  const int64_t out_stride = D * out;  // row stride of layer_out
  at::Tensor tiny_buf, dropped_buf;
  const bool tiny = plan.variant == Variant::kSmallHidden;
  const TinyBuffers<T> tb = tiny ? tiny_buffers<T>(s, s.rows, tiny_buf) : TinyBuffers<T>{};
  at::Tensor w_packed_buf, bf16_buf, bias_buf, w_ih_buf, x_chunk_buf;
  uint16_t* bf16_weights = bf16_weight_buffer(plan, s, bf16_buf);
  T* w_packed = bf16_weights ? nullptr : brgemm_buffer<T>(plan, s, w_packed_buf);
  T* dropped = (mask && s.num_layers > 1) ? scratch<T>(dropped_buf, s.rows * out_stride) : nullptr;
  // Where the reserve keeps no gates (lstm.h, gates_in_reserve), the backward recomputes them:
  // the gates go to one reused scratch buffer, every row's for the small-hidden kernel, else a
  // step's rows where the projection is fused into the steps and a chunk's where it is not
  // (projected by the chunks of training_chunk_steps, as the backward projects them again).
  at::Tensor gates_buf;
  auto gates_for = [&](int64_t rows) {
    if (!gates_buf.defined() || gates_buf.numel() < rows * G) scratch<T>(gates_buf, rows * G);
    return gates_buf.mutable_data_ptr<T>();
  };
  for (int64_t l = 0; l < s.num_layers; ++l) {
    const Operand<T> x = layer_input(
        s, l, input, l > 0 ? reserve + s.layer_out_offset(l - 1) : nullptr, mask, dropped);
    T* layer_out = reserve + s.layer_out_offset(l);
    for (int64_t d = 0; d < D; ++d) {
      auto w = direction_weights<T>(s, weights, l, d);
      T* gates = s.gates_in_reserve ? reserve + s.gates_offset(l, d) : nullptr;
      T* cells = reserve + s.cells_offset(l, d);
      T* pre_proj = reserve + s.pre_proj_offset(l, d);  // used only with projection
      // State lives directly in the h_n / c_n outputs.
      const int64_t ld = l * D + d;
      T* h_state = hy + ld * s.batch * out;
      T* c_state = cy + ld * s.batch * H;
      copy_or_zero(hx ? hx + ld * s.batch * out : nullptr, s.batch * out, h_state);
      copy_or_zero(cx ? cx + ld * s.batch * H : nullptr, s.batch * H, c_state);
      if (tiny) {
        if (!gates) gates = gates_for(s.rows);
        const bool avx512 = plan.small_hidden_avx512;
        tiny_input_projection(w, x.f, s.rows, s.layer_input_size(l), G, tb.gT, tb.xT, avx512);
        tiny_transpose(hx ? hx + ld * s.batch * out : nullptr, out, s.batch, out, tb.hT, s.batch,
                       avx512);
        tiny_transpose(cx ? cx + ld * s.batch * H : nullptr, H, s.batch, H, tb.cT, s.batch,
                       avx512);
        for_each_batch_slice(s, s.seq_len, false, [&](int64_t r0, int64_t r1) {
          tiny_forward_steps(plan, s, w, d, 0, s.seq_len - 1, r0, r1, tb, gates, cells, pre_proj,
                             layer_out + d * out, hx == nullptr);
        });
        tiny_transpose(tb.hT, s.batch, out, s.batch, h_state, out, avx512);
        tiny_transpose(tb.cT, s.batch, H, s.batch, c_state, H, avx512);
        continue;
      }
      const int64_t in_size = s.layer_input_size(l);
      use_bf16_gemm(plan, s, l, w, bf16_weights);
      use_brgemm(plan, s, w, w_packed, l, true, forward_reads_w_hh(s, hx != nullptr));
      use_bias(w, G, bias_buf);
      widen_kept_w_ih(w, G, in_size, w_ih_buf);
      const bool fused = w.k_ih > 0;  // else the projection of a chunk's steps at once, here
      // One chunk of every step where the reserve keeps the gates (the projection of every row
      // into them), or where the projection is fused (a step's gates at a time in scratch).
      const int64_t chunk_steps =
          s.gates_in_reserve || fused ? s.seq_len : training_chunk_steps(s);
      T* step_gates = !gates && fused ? gates_for(s.batch) : nullptr;
      for (int64_t first = 0; first < s.seq_len; first += chunk_steps) {
        const int64_t last = std::min(first + chunk_steps, s.seq_len) - 1;
        const StepBlock block = step_block(s, d, first, last);
        // Row r's gates at chunk + (r - block.row0) * G (or at step_gates, the step's rows).
        T* chunk = gates ? gates + block.row0 * G : fused ? nullptr : gates_for(block.rows);
        if (!fused)
          input_projection(w, rows_for_product(x, block.row0, block.rows, in_size, x_chunk_buf),
                           block.rows, in_size, G, chunk);
        auto rows_of = [&](int64_t t) {
          const int64_t off = s.step_offset[t];
          return StepRows<T>{step_gates ? step_gates : chunk + (off - block.row0) * G,
                             cells + off * H, s.proj_size > 0 ? pre_proj + off * H : nullptr,
                             layer_out + off * out_stride + d * out,
                             fused ? x.at(off * in_size) : Operand<T>{}};
        };
        for_each_batch_slice(s, last - first + 1, w.single_thread_product(),
                             [&](int64_t r0, int64_t r1) {
          forward_steps(plan, s, w, d, first, last, r0, r1, h_state, c_state, rows_of, in_size,
                        hx == nullptr && first == 0);
        });
      }
    }
  }
}

// Forward without storing anything for backward (no grad needed): the input projection runs
// over chunks of steps into one reused buffer (or is fused into the steps), the cell pass keeps
// no gates and no c_t copies, each step's pre-projection goes to scratch,
// and layer outputs alternate between two buffers (the last layer writes `output`). Besides
// the work, this saves the first-touch page faults of a fresh reserve on every call
// (benchmarks/notes/memory.md, "Page faults of a fresh reserve; inference without one").
// output16 (output null): the output in `out_dtype`, bfloat16 or float16, written by the last
// layer's steps as they finish (CpuPlan::output_16bit: the row-wise variant).
template <typename T>
void inference_impl(const CpuPlan& plan, const LSTMShape& s, Operand<T> input, const T* hx,
                    const T* cx, const std::vector<at::Tensor>& weights, const T* mask, T* hy,
                    T* cy, T* output, void* output16 = nullptr,
                    at::ScalarType out_dtype = at::kFloat) {
  // (Both null for an empty output: no rows.)
  TORCH_INTERNAL_ASSERT(s.rows == 0 || (output == nullptr) == (output16 != nullptr));
  TORCH_INTERNAL_ASSERT(!output16 || (std::is_same_v<T, float> && is_16bit(out_dtype) &&
                                      plan.variant == Variant::kRowWise));
  if (plan.variant == Variant::kThin)
    return thin_forward<T>(plan, s, input, hx, cx, weights, mask, hy, cy, output, nullptr);
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size, D = s.num_directions;
  const int64_t out_stride = D * out;
  const int64_t chunk_steps = projection_chunk_steps(s);
  at::Tensor dropped_buf, chunk_buf, gates_buf, pre_proj_buf, layer_buf[2], hb_buf;
  T* dropped = (mask && s.num_layers > 1) ? scratch<T>(dropped_buf, s.rows * out_stride) : nullptr;
  const int64_t chunk_rows = std::min(chunk_steps, s.seq_len) * s.batch;
  const bool tiny = plan.variant == Variant::kSmallHidden;
  TinyBuffers<T> tb = tiny ? tiny_buffers<T>(s, chunk_rows, chunk_buf) : TinyBuffers<T>{};
  at::Tensor w_packed_buf, bf16_buf, bias_buf, w_ih_buf, x_chunk_buf;
  uint16_t* bf16_weights = bf16_weight_buffer(plan, s, bf16_buf);
  T* w_packed = bf16_weights ? nullptr : brgemm_buffer<T>(plan, s, w_packed_buf);
  // The gates of `rows` rows: one step's where the projection is fused into the steps (every
  // layer at medium and fastrnns), a chunk's otherwise; allocated at the first need.
  auto gates_for = [&](int64_t rows) {
    if (!gates_buf.defined() || gates_buf.numel() < rows * G) scratch<T>(gates_buf, rows * G);
    return gates_buf.mutable_data_ptr<T>();
  };
  T* pre_proj = (s.proj_size > 0 && !tiny) ? scratch<T>(pre_proj_buf, s.batch * H) : nullptr;
  const T* prev = nullptr;
  // Small hidden sizes: a layer below the last writes its output transposed ([D*out][rows]),
  // as the next layer's input projection reads it (tiny_input_projection's x_t), instead of
  // row-major and transposed back (without dropout; inputs the tiny product takes).
  const bool tiny_out_t = tiny && !mask && out_stride <= kTinyProjectionInput;
  bool prev_t = false;  // prev is transposed
  for (int64_t l = 0; l < s.num_layers; ++l) {
    const int64_t in_size = s.layer_input_size(l);
    const Operand<T> x = prev_t ? Operand<T>{} : layer_input(s, l, input, prev, mask, dropped);
    const bool last_layer = l + 1 == s.num_layers;
    // The hidden split (hidden_split.h): threads own units rather than batch rows.
    const bool hidden = !tiny && hidden_split_layer(plan, s, l);
    // A 16-bit output: the steps round their h_t rows into it (forward_steps' out_dtype), but
    // for the hidden split's, whose threads read each other's float32 h_t from the layer
    // output: that layer writes a float32 one, rounded into output16 after it.
    uint16_t* out16 = last_layer && !hidden ? static_cast<uint16_t*>(output16) : nullptr;
    const at::ScalarType step_out_dtype = out16 ? out_dtype : at::kFloat;
    T* layer_out = out16 ? nullptr
        : last_layer && output ? output
        : (layer_buf[l % 2].defined() ? layer_buf[l % 2].mutable_data_ptr<T>()
                                      : scratch<T>(layer_buf[l % 2], s.rows * out_stride));
    // Step rows `r` with their h_t rows at row `off` of the layer output, float32 or 16-bit.
    auto with_output = [&](StepRows<T> r, int64_t off, int64_t d) {
      const int64_t at = off * out_stride + d * out;
      if (out16) r.out16 = out16 + at;
      else r.layer_out = layer_out + at;
      return r;
    };
    const bool out_t = tiny_out_t && l + 1 < s.num_layers;  // layer_out transposed
    c10::BFloat16* hb = nullptr;
    if (hidden && plan.amx_products) {
      if (!hb_buf.defined()) hb_buf = cpu_cached_empty(hidden_split_scratch(s), at::kBFloat16);
      hb = hb_buf.mutable_data_ptr<c10::BFloat16>();
    }
    for (int64_t d = 0; d < D; ++d) {
      auto w = direction_weights<T>(s, weights, l, d);
      const int64_t ld = l * D + d;
      T* h_state = hy + ld * s.batch * out;
      T* c_state = cy + ld * s.batch * H;
      copy_or_zero(hx ? hx + ld * s.batch * out : nullptr, s.batch * out, h_state);
      copy_or_zero(cx ? cx + ld * s.batch * H : nullptr, s.batch * H, c_state);
      if (!tiny) {
        use_bf16_gemm(plan, s, l, w, bf16_weights);
        use_brgemm(plan, s, w, w_packed, l, true, forward_reads_w_hh(s, hx != nullptr));
        use_bias(w, G, bias_buf);
        widen_kept_w_ih(w, G, in_size, w_ih_buf);
      }
      if (w.k_ih > 0) {  // the projection fused into the steps: one pass over every step
        T* step_gates = gates_for(s.batch);
        auto rows_of = [&](int64_t t) {
          const int64_t off = s.step_offset[t];
          return with_output({step_gates, nullptr, pre_proj, nullptr, x.at(off * in_size)}, off,
                             d);
        };
        for_each_batch_slice(s, s.seq_len, true, [&](int64_t r0, int64_t r1) {
          forward_steps(plan, s, w, d, 0, s.seq_len - 1, r0, r1, h_state, c_state, rows_of, in_size,
                        hx == nullptr, step_out_dtype);
        });
        continue;
      }
      for (int64_t first = 0; first < s.seq_len; first += chunk_steps) {
        const int64_t last = std::min(first + chunk_steps, s.seq_len) - 1;
        const StepBlock block = step_block(s, d, first, last);
        const int64_t row0 = block.row0, rows = block.rows;
        if (tiny) {
          const bool avx512 = plan.small_hidden_avx512;
          if (first == 0) {
            tiny_transpose(hx ? hx + ld * s.batch * out : nullptr, out, s.batch, out, tb.hT,
                           s.batch, avx512);
            tiny_transpose(cx ? cx + ld * s.batch * H : nullptr, H, s.batch, H, tb.cT, s.batch,
                           avx512);
          }
          tb.ld_g = rows;
          tb.row0 = row0;
          if (prev_t)
            tiny_input_projection<T>(w, nullptr, rows, in_size, G, tb.gT, tb.xT, avx512,
                                     prev + row0, s.rows);
          else
            tiny_input_projection(w, x.f + row0 * in_size, rows, in_size, G, tb.gT, tb.xT,
                                  avx512);
          for_each_batch_slice(s, last - first + 1, false, [&](int64_t r0, int64_t r1) {
            tiny_forward_steps<T>(plan, s, w, d, first, last, r0, r1, tb, nullptr, nullptr, nullptr,
                                  out_t ? layer_out + d * out * s.rows : layer_out + d * out,
                                  hx == nullptr && first == 0, out_t ? s.rows : 0);
          });
          if (last + 1 == s.seq_len) {
            tiny_transpose(tb.hT, s.batch, out, s.batch, h_state, out, avx512);
            tiny_transpose(tb.cT, s.batch, H, s.batch, c_state, H, avx512);
          }
          continue;
        }
        T* chunk = gates_for(chunk_rows);
        input_projection(w, rows_for_product(x, row0, rows, in_size, x_chunk_buf), rows, in_size,
                         G, chunk);
        // The pre-projection goes to per-row scratch ([B, H]) that each step overwrites.
        auto rows_of = [&](int64_t t) {
          const int64_t off = s.step_offset[t];
          return with_output({chunk + (off - row0) * G, nullptr, pre_proj, nullptr}, off, d);
        };
        if constexpr (std::is_same_v<T, float>) {
          if (hidden) {
            hidden_steps(plan, s, w, d, first, last, h_state, c_state, rows_of,
                         hx == nullptr && first == 0, hb);
            continue;
          }
        }
        for_each_batch_slice(s, last - first + 1, w.single_thread_product(), [&](int64_t r0, int64_t r1) {
          forward_steps(plan, s, w, d, first, last, r0, r1, h_state, c_state, rows_of, 0,
                        hx == nullptr && first == 0, step_out_dtype);
        });
      }
    }
    if constexpr (std::is_same_v<T, float>) {
      if (last_layer && output16 && !out16)  // the hidden split's float32 layer output
        round_to(layer_out, s.rows * out_stride, out_dtype, output16);
    }
    prev = layer_out;
    prev_t = out_t;
  }
}

}  // namespace
}  // namespace fused_lstm
