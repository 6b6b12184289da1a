// The backward driver (backward_impl): the reverse recurrence per layer and direction, then
// the weight and input gradients as a few large products (backward_products.h), after the
// recurrence or a chunk of steps at a time.
// Part of the one translation unit lstm_cpu.cpp.
#pragma once

#include "backward_products.h"
#include "small_hidden_backward.h"

namespace fused_lstm {
namespace {

template <typename T>
void backward_impl(const CpuPlan& plan, const LSTMShape& s, Operand<T> input, const T* hx,
                   const T* cx, const std::vector<at::Tensor>& weights, const T* mask,
                   const T* reserve, Operand<T> grad_output, const T* grad_hy, const T* grad_cy,
                   T* grad_input, T* grad_hx, T* grad_cx,
                   std::vector<at::Tensor>& grad_weights, void* grad_input16 = nullptr,
                   bool weight_grads_apart = false, bool state_grad = true) {
  const int64_t H = s.hidden_size, G = 4 * H, out = s.out_size, D = s.num_directions;
  const int64_t out_stride = D * out;
  const bool has_proj = s.proj_size > 0;
  const bool tiny = plan.variant == Variant::kSmallHidden;
  // The small-hidden kernel's weight and bias gradients made a step at a time (no dgates of
  // every row, no products after the loop): plan.h tiny_step_weight_grads.
  const bool tiny_step_weights = tiny && plan.tiny_step_weight_grads();
  // A reserve without the gates (lstm.h gates_in_reserve; plan.h backward_gates): the
  // recurrence below recomputes them (bf16 products, and the small-hidden kernel where every
  // layer input takes its own product: step by step; float32 ones: by chunks,
  // plan.recompute_float_chunks); elsewhere
  // (a packed bfloat16 call's small-hidden kernel with a wider input, whose forward projected
  // it with one GEMM over every row; the few-row backward) the forward runs again into a
  // reserve that keeps them, and the backward reads that (the same gates: the forward is
  // deterministic).
  if (backward_gates(plan, s) == BackwardGates::kForwardAgain) {
    LSTMShape with_gates = s;
    with_gates.gates_in_reserve = true;
    at::Tensor full_buf, states_buf;
    T* full = scratch<T>(full_buf, with_gates.reserve_numel());
    const int64_t states = s.num_layers * D * s.batch;
    T* hy = scratch<T>(states_buf, states * (out + H));
    forward_impl(plan, with_gates, input, hx, cx, weights, mask, hy, hy + states * out, full);
    return backward_impl(plan, with_gates, input, hx, cx, weights, mask, full, grad_output,
                         grad_hy, grad_cy, grad_input, grad_hx, grad_cx, grad_weights,
                         grad_input16, weight_grads_apart, state_grad);
  }
  // Scratch, allocated once per call (ScratchPieces: the small pieces in one block).
  at::Tensor bf16_buf;
  ScratchPieces<T> pieces;
  const Bf16Backward bb = bf16_backward_buffers(plan, s, bf16_buf);
  const bool recompute = !s.gates_in_reserve;
  // dgates [rows, 4H]: every row's; where the products are bf16 ones, a chunk of steps' rows
  // only (at most kBf16GradRows, or one step's), whose products run as soon as the recurrence
  // has computed them (bf16_chunk_products).
  const bool chunked = bb.on && !tiny;
  // Recomputing the gates with float32 products: the recurrence runs by the forward's chunks
  // of training_chunk_steps steps, last first; each chunk's input projection is computed
  // again as the forward computed it (the same product over the same rows: the same gates),
  // and its dgates go to the products as soon as its steps are done (backward_products).
  const bool float_chunks = recompute && !bb.on && !tiny;
  TORCH_INTERNAL_ASSERT(!float_chunks || plan.recompute_float_chunks);
  const int64_t chunk_rows = chunked ? bf16_chunk_rows(s)
      : float_chunks ? std::min(training_chunk_steps(s), s.seq_len) * s.batch
      : s.rows;
  // grad_input16 (grad_input null): the op's dL/dx in float16 (lstm.cpp prepare_backward: a
  // one-direction float16 call whose input the op keeps), each chunk's rows summed into a
  // float32 chunk and rounded into it as the chunk is done, instead of a float32 dL/dx of
  // every row rounded at the end.
  TORCH_INTERNAL_ASSERT(!grad_input16 || (float_chunks && D == 1 && grad_input == nullptr));
  TORCH_INTERNAL_ASSERT(!weight_grads_apart || plan.weight_grads_apart);
  // W_ih's and W_hh's gradients apart (lstm.h) beyond the few-row backward: each layer and
  // direction's dgates are its factors' first rows * G floats (grad_weights[k], which W_ih's and
  // W_hh's entries share), the recurrence writes them there, and the products below make only
  // dL/dx; the rows of x and h_{t-1} are copied in after them.
  const bool rows_apart = weight_grads_apart && !plan.backward_few_rows;
  // Without state_grad (the caller needs no gradient of h0: hx is None or needs none; lstm.h
  // cpu_backward), the first step's dL/dh_{t-1} product, which only h0's gradient reads, is
  // skipped (grad_hx is then not computed), and with one step W_hh is not read at all: not
  // widened, not packed. (Not with the bf16 products: their dL/dh_{t-1} product also rounds the
  // step's dgates for the chunk's weight products.)
  const bool first_dh = state_grad || bb.on;
  const bool reads_w_hh = first_dh || s.seq_len > 1 || recompute;
  TORCH_INTERNAL_ASSERT(!rows_apart || (!bb.on && !tiny && !float_chunks && !grad_input16 &&
                                        std::is_same_v<T, float>));
  T* dx_chunk;
  T* dgates;
  pieces.add(&dgates, rows_apart || tiny_step_weights ? 0 : chunk_rows * G);
  // h_{t-1} of every row (or of a chunk's) gathered, only where steps have different rows
  // (h_prev_rows, h_prev_chunk).
  T* h_prev_buf_ptr;
  pieces.add(&h_prev_buf_ptr, every_step_full(s) || tiny_step_weights ? 0 : chunk_rows * out);
  // dy: the gradient of the current layer's output, read only. The top layer's is grad_output
  // itself (zeros when it is None; bf16 as the caller gave it where the op keeps it: lstm.h
  // Keep16); a lower layer's is the dL/dx of the layer above, written into one of two
  // buffers used in turn (layer l writes dx_bufs[l % 2], which the layer below reads as its
  // dy; a second buffer only from three layers on) and masked in place.
  const int64_t dy_numel = s.rows * out_stride;
  Operand<T> dy = grad_output;
  T* zero_dy;
  pieces.add(&zero_dy, dy ? 0 : dy_numel);
  T* dx_bufs[2];
  pieces.add(&dx_bufs[(s.num_layers - 1) % 2], s.num_layers > 1 ? dy_numel : 0);
  pieces.add(&dx_bufs[s.num_layers % 2], s.num_layers > 2 ? dy_numel : 0);
  T* dropped;
  pieces.add(&dropped, (mask && s.num_layers > 1) ? s.rows * out_stride : 0);
  T* dh_all;
  pieces.add(&dh_all, has_proj ? s.rows * out : 0);
  T *dh_buf, *c_prev_buf, *zeros_mut;
  pieces.add(&dh_buf, tiny ? 0 : s.batch * H);           // dL/dh_t, [bs, H]
  pieces.add(&c_prev_buf, tiny ? 0 : s.batch * H);       // c_{t-1} when pieced together
  pieces.add(&zeros_mut, hx && cx ? 0 : s.batch * std::max(H, out));  // h0 / c0 when None
  T* tiny_buf;
  pieces.add(&tiny_buf, tiny ? tiny_backward_layout(s).total : 0);
  // Recomputing the gates (recompute): W_ih and W_hh packed as the forward packs them (bf16
  // ones, or brgemm's float32 panels), the summed bias, and per batch row the step's gates [G],
  // h_{t-1} gathered [out], and what the forward's cell pass writes besides them (c, c_t,
  // pre-projection [H] each, h [out]); with float32 products, a chunk's input projection.
  at::Tensor fw_weights_buf, fw_packed_buf, fw_bias_buf, x_chunk_buf;
  uint16_t* fw_weights = recompute && bb.on ? bf16_weight_buffer(plan, s, fw_weights_buf) : nullptr;
  T* fw_packed = float_chunks ? brgemm_buffer<T>(plan, s, fw_packed_buf) : nullptr;
  // (Per batch row where the gates are recomputed step by step: the bf16 products', and
  // float32 library steps'; brgemm's are recomputed a chunk at a time, recompute_chunk_gates.)
  const int64_t rec_row = G + 2 * out + 3 * H;
  T* rec;
  pieces.add(&rec, recompute && !tiny && (bb.on || !plan.brgemm_steps) ? s.batch * rec_row : 0);
  // (A chunk's projection goes to its rows of dgates: the cell pass writes each row's dgates
  // over its gates, cell_backward_in_place.)
  // dL/dh_{t-1} = dgates_t W_hh through brgemm (W_hh is already its B[4H, out]).
  const bool brgemm = plan.brgemm_dh;
  T* w_hh_panels = nullptr;
  // A 16-bit model's W_ih and W_hh as given (plan.backward_widens_16bit): one layer and
  // direction's at a time in float, in one buffer: W_hh (in panels, or as stored) during the
  // recurrence, then W_ih for dL/dx.
  const bool few = plan.backward_few_rows;  // few_rows.h: the weights read as stored
  const bool widens = plan.backward_widens_16bit && !bb.on && !tiny && !few;
  T* widened_w = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    if (widens) {
      // W_hh (in panels, or as stored) during the recurrence, then W_ih; both at once where the
      // recurrence runs by chunks (float_chunks: each chunk's projection and dL/dx read W_ih),
      // with W_hh as stored too where the recomputed steps are library products.
      const int64_t in_max = std::max(s.input_size, s.num_directions * s.out_size);
      const bool library_steps = float_chunks && !plan.brgemm_steps && brgemm;
      pieces.add(&widened_w,
                 float_chunks ? w_ih_at(G, out) + G * (in_max + (library_steps ? out : 0))
                              : G * std::max(in_max, out));
    } else if (brgemm && !bb.on && !tiny) {
      pieces.add(&w_hh_panels, G * out);
    }
  }
  pieces.add(&dx_chunk, grad_input16 ? chunk_rows * s.input_size : 0);
  pieces.allocate();
  if (widens && brgemm) w_hh_panels = widened_w;
  if (!dy) {
    std::fill_n(zero_dy, dy_numel, T(0));
    dy = {zero_dy};
  }
  if (zeros_mut) std::fill_n(zeros_mut, s.batch * std::max(H, out), T(0));
  const T* zeros = zeros_mut;
  if (rec) std::fill_n(rec, s.batch * rec_row, T(0));
  T* rec_gates = rec;
  T* rec_h_prev = rec ? rec_gates + s.batch * G : nullptr;
  T* rec_h = rec ? rec_h_prev + s.batch * out : nullptr;
  T* rec_c = rec ? rec_h + s.batch * out : nullptr;
  T* rec_cells = rec ? rec_c + s.batch * H : nullptr;
  T* rec_pre_proj = rec ? rec_cells + s.batch * H : nullptr;

  for (int64_t l = s.num_layers - 1; l >= 0; --l) {
    const int64_t in_size = s.layer_input_size(l);
    const Operand<T> x = layer_input(
        s, l, input, l > 0 ? reserve + s.layer_out_offset(l - 1) : nullptr, mask, dropped);
    const T* layer_out = reserve + s.layer_out_offset(l);
    // Gradient w.r.t. this layer's input: the op's grad_input, or the previous layer's output.
    T* dx_l = l == 0 ? grad_input : dx_bufs[l % 2];
    for (int64_t d = 0; d < D; ++d) {
      const auto w = direction_weights<T>(s, weights, l, d);
      const T* gates = reserve + s.gates_offset(l, d);  // where s.gates_in_reserve
      // The forward's weights for recomputing the gates: bf16 ones with every step's projection
      // fused (the forward's bf16 projection GEMM, where it ran one, gives each row the same
      // sums), or brgemm's panels as the forward packed them.
      auto fw = direction_weights<T>(s, weights, l, d);
      if (float_chunks || (recompute && bb.on)) {
        if (bb.on) use_bf16_gemm(plan, s, l, fw, fw_weights);
        else use_brgemm(plan, s, fw, fw_packed, l, /*count_fused=*/false);
        use_bias(fw, G, fw_bias_buf);
      }
      const T* cells = reserve + s.cells_offset(l, d);
      const T* pre_proj = reserve + s.pre_proj_offset(l, d);  // used only when has_proj
      const int64_t ld = l * D + d;
      const T* c0 = cx ? cx + ld * s.batch * H : zeros;
      T* dh_state = grad_hx + ld * s.batch * out;
      T* dc_state = grad_cx + ld * s.batch * H;
      copy_or_zero(grad_hy ? grad_hy + ld * s.batch * out : nullptr, s.batch * out, dh_state);
      copy_or_zero(grad_cy ? grad_cy + ld * s.batch * H : nullptr, s.batch * H, dc_state);
      if constexpr (std::is_same_v<T, float>) {
        if (bb.amx_w_hh) {  // W_hh and W_ih for the tiles, as stored: B [G, out], B [G, in]
          visit(w.hh, [&](auto W) { amx_pack(W, out, G, out, true, bb.amx_w_hh); });
          visit(w.ih, [&](auto W) { amx_pack(W, in_size, G, in_size, true, bb.amx_w_ih); });
        } else if (bb.w_hh_t) {
          split_over_threads({pack_t_job(w.hh, out, G, out, bb.w_hh_t),
                              pack_t_job(w.ih, in_size, G, in_size, bb.w_ih_t)});
        }
      }

      const T* h0 = hx ? hx + ld * s.batch * out : zeros;
      const int64_t k = s.weight_index(l, d);
      if (rows_apart) dgates = grad_weights[k].mutable_data_ptr<T>();
      // W_ih's and W_hh's gradients: in the math dtype, or a 16-bit model's dtype where the
      // few-row backward writes them rounded (plan.grads_16bit: few_rows_outer takes them).
      // (Neither where they are left as factors: weight_grads_apart, the few-row backward's.)
      const bool in_place = !plan.grads_16bit && !weight_grads_apart;
      T* gw_ih = in_place ? grad_weights[k].mutable_data_ptr<T>() : nullptr;
      T* gw_hh = in_place ? grad_weights[k + 1].mutable_data_ptr<T>() : nullptr;
      // The bias gradient (b_ih's; b_hh's is the same), summed over the rows' dgates.
      T* gb_ih = s.has_biases ? grad_weights[k + 2].mutable_data_ptr<T>() : nullptr;
      if (gb_ih) std::fill_n(gb_ih, G, T(0));
      // Columns over the threads, each column's rows summed in order as one thread sums them
      // (the same bits): one thread's pass ran at ~6.5 GB/s, 2 ms of a 49 ms float32 medium
      // backward (benchmarks/notes/measurement.md, "The baseline's page faults").
      auto add_bias_grad = [&](int64_t rows) {  // the first `rows` rows of dgates
        if (!gb_ih) return;
        auto columns = [&](int64_t j0, int64_t j1) {
          // (small_hidden_backward.h add_column_sums: the same sums, in registers)
          if (j1 - j0 <= kColumnSumsMaxCols)
            return add_column_sums(dgates + j0, G, rows, j1 - j0, gb_ih + j0);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = j0; j < j1; ++j) gb_ih[j] += dgates[r * G + j];
        };
        if (rows * G < kParallelElements || at::in_parallel_region()) columns(0, G);
        else at::parallel_for(0, G, 64, columns);
      };

      const T* w_hh = w.w_hh;
      if (reads_w_hh && widens) {
        with_kept_16bit(w.hh, [&](auto w16) {
          if (w_hh_panels) pack_w_hh_panels(w16, G, out, w_hh_panels);
          else w_hh = widened(w16, G * out, widened_w);
        });
      } else if (reads_w_hh && w_hh_panels) {
        pack_w_hh_panels(w.w_hh, G, out, w_hh_panels);
      }
      // W_ih in float for the chunks' projections and dL/dx (float_chunks), and the recomputed
      // steps' weights in float where they are library products.
      const T* w_ih_f = w.w_ih;
      if (float_chunks && widens) {
        T* more = widened_w + w_ih_at(G, out);
        with_kept_16bit(w.ih, [&](auto w16) { w_ih_f = widened(w16, G * in_size, more); });
        if (!fw.single_thread_product() && w_hh_panels)
          with_kept_16bit(w.hh,
                          [&](auto w16) { w_hh = widened(w16, G * out, more + G * in_size); });
      }
      if (float_chunks) {
        fw.w_ih = w_ih_f;
        if (!fw.single_thread_product()) fw.w_hh = w_hh;
      }
      if (tiny) {
        tiny_backward_steps(s, w, d, recompute ? nullptr : gates, cells, c0, dy.f, dh_all,
                            dgates, dh_state, dc_state, tiny_buf,
                            TinyDx<T>{dx_l, d > 0},
                            tiny_step_weights
                                ? TinyWeightGrads<T>{gw_ih, gw_hh, gb_ih, plan.tiny_weight_rows}
                                : TinyWeightGrads<T>{},
                            TinyRecompute<T>{x.f, in_size, layer_out + d * out, h0, hx == nullptr,
                                             plan.vec16_cell, plan.small_hidden_avx512});
      } else {
      // The reverse recurrence of steps step_hi down to step_lo (processing order), for batch
      // rows [r0, r1) (rows are independent sequences); row r's dgates at dgates + (r - dg_row0) * G.
      // The chunk's gates recomputed at once into dgates' rows (float_chunks with the forward's
      // brgemm steps: recompute_chunk_gates), else step by step below.
      const bool chunk_gates = float_chunks && fw.single_thread_product();
      auto steps = [&](int64_t step_hi, int64_t step_lo, int64_t dg_row0, int64_t r0, int64_t r1) {
        for (int64_t step = step_hi; step >= step_lo; --step) {
          const int64_t t = time_of(s, d, step);
          const int64_t bs = std::min(s.batch_sizes[t], r1) - r0;
          if (bs <= 0) continue;
          const int64_t off = s.step_offset[t] + r0;  // first row of the slice at step t
          const Operand<T> dy_t = dy.at(off * out_stride + d * out);
          T* dh_carried = dh_state + r0 * out;
          T* dc = dc_state + r0 * H;
          T* dh_t = dh_buf + r0 * H;
          // dL/dh_t before projection, [bs, H]: carried + from the output (through W_hr).
          T* dh_sum = has_proj ? dh_all + off * out : dh_t;
          if (dy_t.h) {  // a float16 upstream gradient kept by the op: each row widened first
            for (int64_t b = 0; b < bs; ++b) {
              const float* y = widened_on_this_thread(dy_t.h + b * out_stride, out);
              for (int64_t j = 0; j < out; ++j)
                dh_sum[b * out + j] = dh_carried[b * out + j] + static_cast<T>(y[j]);
            }
          } else {
            visit(dy_t, [&](auto y) {
              for (int64_t b = 0; b < bs; ++b)
                for (int64_t j = 0; j < out; ++j)
                  dh_sum[b * out + j] =
                      dh_carried[b * out + j] + static_cast<T>(y[b * out_stride + j]);
            });
          }
          if (has_proj) gemm<T>(false, false, bs, H, out, T(1), dh_sum, out, w.w_hr, H, T(0), dh_t, H);
          const T* c_prev = step_c_prev(s, d, t, r0, bs, cells, c0, c_prev_buf);
          const T* c_t = cells + off * H;
          T* dg_t = dgates + (off - dg_row0) * G;
          const T* g_t = gates + off * G;
          if (chunk_gates) {  // recomputed for the chunk already (recompute_chunk_gates)
            g_t = dg_t;
          } else if (recompute) {  // the forward's step again: its products and cell pass
            // h_{t-1} of the slice: the previous step's layer output for rows that continue,
            // h0 for rows that start here; none at the first step without hx (as forward_steps)
            const PrevStep prev = prev_step(s, d, t);
            const int64_t continuing = prev.continuing;
            const T* from_out = continuing > 0
                ? layer_out + (s.step_offset[prev.t] + r0) * out_stride + d * out : nullptr;
            const T* hp = h0 + r0 * out;
            int64_t ld_hp = out;
            if (step == 0 && hx == nullptr) {
              hp = nullptr;
            } else if (r0 + bs <= continuing) {
              hp = from_out;
              ld_hp = out_stride;
            } else if (r0 < continuing) {
              T* dst = rec_h_prev + r0 * out;
              copy_rows(from_out, out_stride, dst, out, continuing - r0, out);
              copy_rows(h0 + continuing * out, out, dst + (continuing - r0) * out, out,
                        r0 + bs - continuing, out);
              hp = dst;
            }
            // The step's gates: the projection fused into its products (every bf16 one), or
            // added to the chunk's projection rows (dgates' rows of the chunk).
            const bool fused = bb.on || fw.k_ih > 0;
            T* g = fused ? rec_gates + r0 * G : dg_t;
            forward_step(plan, s, fw, bs, g, hp, ld_hp, rec_h + r0 * out, out, rec_c + r0 * H,
                         rec_cells + r0 * H, has_proj ? rec_pre_proj + r0 * H : nullptr,
                         fused ? x.at(off * in_size) : Operand<T>{}, in_size);
            g_t = g;
          }
          for_each_row(bs, G, [&](int64_t b) {
            const T* g = g_t + b * G;
            T* dg = dg_t + b * G;
            if (g == dg)  // the recomputed gates in dgates' rows
              cell_backward_in_place(H, dg, dg + H, dg + 2 * H, dg + 3 * H, c_t + b * H,
                                     c_prev + b * H, dh_t + b * H, dc + b * H);
            else
              cell_backward_block(H, g, g + H, g + 2 * H, g + 3 * H, c_t + b * H, c_prev + b * H,
                                  dh_t + b * H, dc + b * H, dg, dg + H, dg + 2 * H, dg + 3 * H);
          });
          // dL/dh_{t-1} for the rows active at t; the others keep what they carry.
          if (step == 0 && !first_dh) continue;  // only h0's gradient would read it
          if (few) few_rows_dh(bs, out, G, dg_t, w.hh, dh_carried);
          else
            step_dh_product(bb, brgemm, bs, out, G, dg_t, w_hh, w_hh_panels, dh_carried,
                            bb.dgates16 ? bb.dgates16 + (off - dg_row0) * G : nullptr);
        }
        if (bb.amx_w_hh) amx_release();  // this thread's last product of the direction
      };
      if (float_chunks) {
        // The forward's chunks, last first: the chunk's projection again (where the forward
        // ran one), its gates (all at once where the forward's steps were brgemm's:
        // recompute_chunk_gates; else step by step in the recurrence), its steps, then its
        // products and its rows' bias gradient.
        const int64_t n = training_chunk_steps(s);
        const int64_t chunks = (s.seq_len + n - 1) / n;
        for (int64_t c = chunks - 1; c >= 0; --c) {
          const int64_t first = c * n, last = std::min(first + n, s.seq_len) - 1;
          const StepBlock block = step_block(s, d, first, last);
          // The chunk's rows of x in float (a kept float16 input's widened, as the forward did)
          const T* x_rows =
              rows_for_product(x, block.row0, block.rows, in_size, x_chunk_buf).f;
          if (fw.k_ih == 0)
            input_projection(fw, Operand<T>{x_rows}, block.rows, in_size, G, dgates);
          const HPrev<T> h_prev =
              h_prev_chunk(s, d, block.t_lo, block.t_hi, layer_out, h0, h_prev_buf_ptr);
          if constexpr (std::is_same_v<T, float>) {
            if (chunk_gates) {  // the first step without hx: no product (forward_steps)
              const int64_t t0 = time_of(s, d, 0);
              const bool skip = hx == nullptr && first == 0;
              const int64_t skip0 = skip ? s.step_offset[t0] : 0;
              recompute_chunk_gates(plan, s, fw, block, x_rows, in_size, h_prev, skip0,
                                    skip ? skip0 + s.batch_sizes[t0] : 0, dgates);
            }
          }
          // (Sliced as the forward sliced these steps: a library step's product over the same
          // rows.)
          for_each_batch_slice(s, last - first + 1, fw.single_thread_product(),
                               [&](int64_t r0, int64_t r1) {
            steps(last, first, block.row0, r0, r1);
          });
          T* dx_rows = dx_l ? dx_l + block.row0 * in_size : dx_chunk;  // (both null: no dL/dx)
          backward_products(s, dgates, block.row0, block.rows, x_rows, in_size, h_prev, w_ih_f,
                            gw_ih, gw_hh, dx_rows, d > 0, c < chunks - 1);
          if constexpr (std::is_same_v<T, float>) {
            if (!dx_l && grad_input16)
              round_to(dx_chunk, block.rows * in_size, at::kHalf,
                       static_cast<uint16_t*>(grad_input16) + block.row0 * in_size);
          }
          add_bias_grad(block.rows);
        }
      } else if (!chunked) {
        for_each_batch_slice(s, s.seq_len, brgemm || bb.on, [&](int64_t r0, int64_t r1) {
          steps(s.seq_len - 1, 0, 0, r0, r1);
        });
      } else if constexpr (std::is_same_v<T, float>) {
        // Chunks of consecutive steps, at most kBf16GradRows rows each (or one step): the
        // recurrence over a chunk, then its products and its rows' bias gradient. The weight
        // and bias gradients sum the chunks in the order the recurrence finishes them.
        if (s.rows == 0) {  // an empty batch: zero weight gradients, no dL/dx
          std::fill_n(gw_ih, G * in_size, 0.0f);
          std::fill_n(gw_hh, G * out, 0.0f);
        }
        bool first = true;
        for (int64_t step_hi = s.seq_len - 1; step_hi >= 0 && s.rows > 0;) {
          int64_t step_lo = step_hi, n = s.batch_sizes[time_of(s, d, step_hi)];
          while (step_lo > 0 && n + s.batch_sizes[time_of(s, d, step_lo - 1)] <= kBf16GradRows)
            n += s.batch_sizes[time_of(s, d, --step_lo)];
          const StepBlock block = step_block(s, d, step_lo, step_hi);
          const int64_t row0 = block.row0, row1 = block.row0 + block.rows;
          for_each_batch_slice(s, s.seq_len, true, [&](int64_t r0, int64_t r1) {
            steps(step_hi, step_lo, row0, r0, r1);
          });
          const HPrev<T> h_prev =
              h_prev_chunk(s, d, block.t_lo, block.t_hi, layer_out, h0, h_prev_buf_ptr);
          bf16_chunk_products(s, bb, dgates, row0, row1, x, in_size, h_prev, gw_ih, gw_hh, dx_l,
                              d > 0, first);
          add_bias_grad(row1 - row0);
          first = false;
          step_hi = step_lo - 1;
        }
      }
      }

      if (!chunked && !float_chunks && !tiny_step_weights) {
        const HPrev<T> h_prev = h_prev_rows(s, d, layer_out, h0, h_prev_buf_ptr);
        // dL/dx of this layer is summed over directions.
        // The recurrence is done with W_hh: W_ih widened into the same buffer.
        const T* w_ih = w.w_ih;
        if (widens)
          with_kept_16bit(w.ih, [&](auto w16) { w_ih = widened(w16, G * in_size, widened_w); });
        if (rows_apart) {  // x's and h_{t-1}'s rows into the factors, after dgates
          T* x_factors = dgates + s.rows * G;
          T* h_factors = x_factors + s.rows * in_size;
          copy_rows(x.f, in_size, x_factors, in_size, s.rows, in_size);
          for (int i = 0; i < h_prev.n; ++i) {
            const HPrevSegment<T>& seg = h_prev.seg[i];
            copy_rows(seg.h, seg.ld, h_factors + seg.r0 * out, out, seg.r1 - seg.r0, out);
          }
        }
        if (few)
          few_rows_backward_products(s, dgates, x, in_size, h_prev, w.ih, grad_weights[k],
                                     grad_weights[k + 1], dx_l, d > 0, weight_grads_apart);
        else backward_products(s, dgates, 0, s.rows, x.f, in_size, h_prev, w_ih, gw_ih, gw_hh,
                               tiny ? nullptr : dx_l, d > 0, false);  // (tiny: TinyDx)
        add_bias_grad(s.rows);
      }
      int64_t next = k + 2;
      if (s.has_biases) {
        std::memcpy(grad_weights[next + 1].mutable_data_ptr<T>(), gb_ih, sizeof(T) * G);
        next += 2;
      }
      if (has_proj) {  // also for an empty batch: gemm zero-fills when k == 0
        T* gw_hr = grad_weights[next].mutable_data_ptr<T>();
        gemm<T>(true, false, out, H, s.rows, T(1), dh_all, out, pre_proj, H, T(0), gw_hr, H);
      }
    }
    if (l > 0) {
      // Through the dropout mask into the previous layer's output gradient, in place.
      if (mask) {
        const T* m = mask + (l - 1) * dy_numel;
        at::parallel_for(0, dy_numel, kParallelElements, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) dx_l[i] *= m[i];
        });
      }
      dy = {dx_l};
    }
  }
}

}  // namespace
}  // namespace fused_lstm
