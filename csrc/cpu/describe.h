// describe(): a CPU plan in words, for fused_lstm.explain (the op fused_lstm::cpu_plan): one
// "key=value" line per fact, the variant and why, then where each product of the call goes.
// Part of the one translation unit lstm_cpu.cpp.
#pragma once

#include "floor_rule.h"
#include "forward.h"

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

namespace fused_lstm {
namespace {

// Where layer `layer`'s input projection goes.
inline std::string input_projection_of(const CpuPlan& p, const LSTMShape& s, int64_t layer,
                                       int64_t rows) {
  const int64_t G = 4 * s.hidden_size, in = s.layer_input_size(layer);
  if (p.variant == Variant::kThin) return "thin kernel (dot products, every step)";
  if (p.variant == Variant::kSmallHidden)
    return in <= kTinyProjectionInput
        ? "small-hidden product (inline)"
        : library_name(gemm_library(false, true, G, rows, in, p.is_float, false,
                                    p.settings.gemm_library, p.settings.small_products));
  if (p.bf16_products) {
    const std::string library = p.amx_products ? "amx_brgemm" : "bf16_gemm";
    return fuse_input_projection(p, s, layer, 2) ? library + ", fused into the steps" : library;
  }
  if (p.brgemm_steps && fuse_input_projection(p, s, layer, 4))
    return "brgemm, fused into the steps";
  return library_name(
      gemm_library(false, true, rows, G, in, p.is_float, false, p.settings.gemm_library,
                   p.settings.small_products));
}

// measured_split: "hidden" or "batch" where the floor's end-to-end measurement chose a call of
// ours other than the rule's (lstm_cpu.cpp's cpu_plan_op), the split it runs, and `why`; else
// nullptr.
inline std::string describe(const CpuPlan& p, const LSTMShape& s,
                            const char* measured_split = nullptr, const char* why = "") {
  const int64_t G = 4 * s.hidden_size, H = s.hidden_size, out = s.out_size;
  const bool single_thread = p.brgemm_steps || p.bf16_products;
  const int64_t slices = batch_slices(s, s.seq_len, single_thread);
  const int64_t slice_rows = (s.batch + slices - 1) / slices;
  // The rows the input projection GEMM takes at once: a chunk's in inference and in training
  // without gates in the reserve, else every step's.
  const int64_t proj_rows =
      p.inference           ? std::min(projection_chunk_steps(s), s.seq_len) * s.batch
      : !s.gates_in_reserve ? std::min(training_chunk_steps(s), s.seq_len) * s.batch
                            : s.rows;
  // in_region: the product runs inside the batch slices' parallel region (a step's products)
  // rather than on every thread (the backward's weight and data products).
  auto library = [&](bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                     bool in_region) {
    return std::string(library_name(gemm_library(trans_a, trans_b, m, n, k, p.is_float,
                                                 in_region, p.settings.gemm_library,
                                                 p.settings.small_products)));
  };
  std::ostringstream o;
  o << "variant=" << variant_name(p.variant) << "\n";
  o << "why=" << p.why << "\n";
  o << "threads=" << at::get_num_threads() << "\n";
  o << "batch_slices=" << slices << "\n";
  // The inference steps' split over the threads, per layer (hidden_split.h), and the rates
  // that chose it.
  if (measured_split != nullptr) {
    for (int64_t l = 0; l < s.num_layers; ++l)
      o << "step_split." << l << "=" << measured_split << " (" << why << ")\n";
  } else if (hidden_split_applies(p, s)) {
    for (int64_t l = 0; l < s.num_layers; ++l) {
      o << "step_split." << l << "=" << (hidden_split_layer(p, s, l) ? "hidden" : "batch");
      if (p.settings.hidden_split_by_rates && p.amx_products) {
        o << " (AMX steps: the hidden split only with hidden_split_by_measured_rates off)";
      } else if (p.settings.hidden_split_by_rates) {
        const HiddenSplitRates r = hidden_split_rates(p, s, l);
        if (r.measured)
          o << " (one thread's step: batch split " << r.batch_us << " us"
            << (r.batch_fused ? " fused" : "") << ", hidden split " << r.hidden_us << " us)";
      } else {
        o << " (hidden_split_by_measured_rates off)";
      }
      o << "\n";
    }
  }
  if (p.model == at::kHalf) {  // convert_16bit.cpp's float16 conversions, by the CPU's F16C
    static const char* const kConversions[] = {"scalar (c10)", "f16c (8 lanes)",
                                               "f16c (16 lanes, avx512)"};
    o << "fp16_conversions=" << kConversions[half_conversion_isa()] << "\n";
  }
  o << "cell_pass=" << (p.vec16_cell ? "avx512 (16 lanes)" : "vectorised loops (target_clones)")
    << "\n";
  if (p.variant == Variant::kSmallHidden)
    o << "small_hidden_kernels="
      << (p.small_hidden_avx512 ? "avx512 (masked 16-lane products, permute transposes)"
          : !p.is_float ? "target_clones (16/8/4/2/1-lane products, element-wise transposes)"
          : cpu_features().avx512
              ? "target_clones (16/8/4/2/1-lane products, gather transposes)"
              : "target_clones (16/8/4/2/1-lane products, 8x8 transposes)")
      << "\n";
  for (int64_t l = 0; l < s.num_layers; ++l)
    o << "input_projection." << l << "=" << input_projection_of(p, s, l, proj_rows) << "\n";
  std::string recurrent;
  if (p.variant == Variant::kThin)
    recurrent = !p.keep_16bit                ? "thin kernel (dot products)"
              : p.model == at::kBFloat16 ? "thin kernel (dot products, bf16 weights widened to float32)"
                                         : "thin kernel (dot products, fp16 weights widened to float32)";
  else if (p.variant == Variant::kSmallHidden) recurrent = "small-hidden product (inline)";
  else if (p.amx_products) recurrent = "amx_brgemm";
  else if (p.bf16_products) recurrent = "bf16_gemm";
  else if (p.brgemm_steps) recurrent = "brgemm";
  else recurrent = library(false, true, slice_rows, G, out, slices > 1);
  o << "recurrent_product=" << recurrent << "\n";
  if (s.proj_size > 0)
    o << "projection="
      << (p.variant == Variant::kSmallHidden ? "small-hidden product (inline)"
                                             : library(false, true, slice_rows, out, H, slices > 1))
      << "\n";
  o << "keep_16bit=" << (p.keep_16bit ? "true" : "false") << "\n";
  if (p.inference) o << "output_16bit=" << (p.output_16bit ? "true" : "false") << "\n";
  if (!p.inference && p.model == at::kHalf) {
    o << "fp16_kept_training=" << (p.fp16_kept_training ? "true" : "false") << "\n";
    o << "fp16_kept_weights=" << (p.fp16_kept_weights ? "true" : "false") << "\n";
  }
  if (!p.inference) {
    static const char* const kGates[] = {
        "kept by the forward", "recomputed a step at a time (small-hidden kernel)",
        "recomputed a step at a time (bf16 products)", "recomputed by chunks of steps",
        "the forward run again into a reserve with them"};
    o << "backward_gates=" << kGates[int(backward_gates(p, s))] << "\n";
    o << "backward_widens_16bit=" << (p.backward_widens_16bit ? "true" : "false") << "\n";
    std::string dh;
    if (p.variant == Variant::kSmallHidden) dh = "small-hidden product (inline)";
    else if (p.amx_products) dh = "amx_brgemm";
    else if (p.bf16_products) dh = "bf16_gemm";
    else if (p.backward_few_rows) dh = "few_rows (weights as stored)";
    else if (p.brgemm_dh) dh = "brgemm";
    else dh = library(false, false, slice_rows, out, G, slices > 1);
    o << "backward_dh_product=" << dh << "\n";
    // Every layer's products, by size (the small ones and the rest may go to different
    // libraries): the libraries that run them, in the order of first use, comma-separated.
    auto libraries = [&](bool weights) {
      std::vector<std::string> seen;
      std::string names;
      auto add = [&](const std::string& name) {
        if (std::find(seen.begin(), seen.end(), name) != seen.end()) return;
        names += (seen.empty() ? "" : ",") + name;
        seen.push_back(name);
      };
      for (int64_t l = 0; l < s.num_layers; ++l) {
        const int64_t in = s.layer_input_size(l);
        if (weights) {
          add(library(true, false, G, in, s.rows, false));
          // dW_hh over h_{t-1}'s segments (backward_products.h h_prev_rows): in place where every step
          // has every row (h0's rows, then the layer output's), else gathered (one product)
          if (every_step_full(s)) {
            add(library(true, false, G, out, s.batch, false));
            if (s.rows > s.batch) add(library(true, false, G, out, s.rows - s.batch, false));
          } else {
            add(library(true, false, G, out, s.rows, false));
          }
        } else {
          add(library(false, false, s.rows, in, G, false));
        }
      }
      return names;
    };
    o << "backward_weight_products="
      << (p.amx_products    ? std::string("amx_brgemm")
          : p.bf16_products ? std::string("bf16_gemm")
          : p.backward_few_rows ? std::string("few_rows (outer products)")
          : p.tiny_weight_rows ? std::string("small-hidden steps (along rows, avx512)")
          : p.tiny_weight_lanes ? std::string("small-hidden steps (16-lane sums)")
                            : libraries(true))
      << "\n";
    o << "weight_grads_apart=" << (p.weight_grads_apart ? "true" : "false") << "\n";
    if (!p.bf16_products)
      o << "backward_data_product="
        << (p.backward_few_rows ? std::string("few_rows (weights as stored)")
            : p.variant == Variant::kSmallHidden ? std::string("small-hidden product (inline)")
                                                 : libraries(false))
        << "\n";
  }
  o << "settings=allow_brgemm:" << p.settings.brgemm
    << " allow_vec16_cell:" << p.settings.vec16_cell
    << " allow_small_hidden_avx512:" << p.settings.small_hidden_avx512
    << " allow_fused_input_projection:" << p.settings.fused_input_projection
    << " allow_thin:" << p.settings.thin << " allow_bf16_products:" << p.settings.bf16_products
    << " allow_amx:" << p.settings.amx << " gemm_library:"
    << (p.settings.gemm_library == 1   ? "blas"
        : p.settings.gemm_library == 2 ? "onednn_matmul"
                                       : "auto")
    << " fuse_by_measured_rates:" << p.settings.fuse_by_rates
    << " allow_hidden_split:" << p.settings.hidden_split
    << " hidden_split_by_measured_rates:" << p.settings.hidden_split_by_rates
    << " allow_few_rows:" << p.settings.few_rows
    << " allow_weight_grads_apart:" << p.settings.weight_grads_apart
    << " allow_small_products:" << p.settings.small_products << "\n";
  // The measured rates behind the choices (rates.h), where they were measured for this call.
  if (p.is_float && p.variant == Variant::kRowWise) {
    auto rates_line = [&](const char* key, const LibraryRates& r, const std::string& on) {
      if (!r.measured) return;
      o << key << "=";
      for (int c = 0; c < kGemmClasses; ++c)
        o << (c ? "; " : "") << gemm_class_name(GemmClass(c)) << " blas "
          << int(r.blas[c] + 0.5) << " onednn_matmul " << int(r.onednn[c] + 0.5);
      o << " (GFLOP/s, " << on << "; measured in " << int(r.probe_ms + 0.5) << " ms)\n";
    };
    rates_line("library_rates", library_rates(), "one thread");
    // What decides a large product outside a parallel region (plan.h deciding_library_rates).
    const int64_t threads = at::get_num_threads();
    rates_line("library_rates_threads",
               library_rates_on_threads(threads, cpu_features().onednn_matmul),
               std::to_string(threads) + " threads");
    if (p.brgemm_steps && p.settings.fuse_by_rates && p.settings.fused_input_projection) {
      for (int64_t l = 0; l < s.num_layers; ++l) {
        const FusedStepRates f = fused_step_rates(s, l, fused_slice_rows(s));
        if (f.measured)
          o << "fused_step_rates." << l << "=fused " << f.fused_us << " us, unfused "
            << f.unfused_us << " us (one thread's step: recurrent " << f.recurrent_us
            << " us + projection " << f.projection_us << " us; measured together in "
            << int(f.probe_ms + 0.5) << " ms)\n";
      }
    }
  }
  const CpuFeatures& f = cpu_features();
  o << "cpu=avx512:" << f.avx512 << " avx512_bf16:" << f.avx512_bf16 << " brgemm:" << f.brgemm
    << " onednn_matmul:" << f.onednn_matmul << " amx_bf16:" << amx_bf16_available();
  return o.str();
}


// The nn.LSTM floor's lines (floor_rule.h): whether at::lstm runs the call, why, and the measured
// times behind an "auto" choice. nn_lstm_floor_runs=true exactly where the op runs at::lstm.
inline std::string describe_floor(const CpuPlan& p, const LSTMShape& s, at::ScalarType dtype,
                                  bool has_mask) {
  const FloorChoice c = floor_choice(p, s, dtype, has_mask, /*claim=*/false);
  std::ostringstream o;
  const bool runs = c.run == FloorRun::kAten;
  o << "nn_lstm_floor=";
  if (c.impossible != nullptr) o << "not possible: " << c.impossible;
  else if (p.settings.nn_lstm_floor == 1) o << "never (setting nn_lstm_floor)";
  else if (p.settings.nn_lstm_floor == 2) o << "always (setting nn_lstm_floor): at::lstm runs the call";
  else if (c.times.measured)
    o << (runs ? "at::lstm: measured faster than the fused kernels by more than 3%"
               : "fused kernels: at::lstm not measured faster by more than 3%");
  else if (c.table_full) o << "fused kernels: not measured (" << kFloorMaxKeys
                           << " shapes measured already)";
  else o << "not measured yet: the first inference call of this shape measures";
  o << "\nnn_lstm_floor_runs=" << (runs ? "true" : "false");
  if (c.times.measured) {
    o << "\nnn_lstm_floor_times=fused " << c.times.fused_ms << " ms, at::lstm " << c.times.aten_ms
      << " ms (" << (c.times.injected ? "recorded by a test, not measured"
                                      : "wall time, least of interleaved calls")
      << "; calls: " << c.times.samples << " of ours, " << c.times.aten_samples
      << " of at::lstm, at batch " << c.times.batch << ", seq_len " << c.times.seq_len << ")";
    if (c.times.other_split_measured) {
      const char* other = c.times.other_split_hidden ? "hidden" : "batch";
      o << "\nstep_split_times=the rule's split " << c.times.fused_ms << " ms, the " << other
        << " split " << c.times.other_split_ms << " ms (least of interleaved calls): "
        << (other_split_measured_faster(c.times) ? std::string("the ") + other + " split"
                                                 : std::string("the rule's split"))
        << " runs";
    }
    if (c.times.other_fusion_measured) {
      const char* other =
          c.times.other_fusion_fused ? "fused where the sizes allow" : "never fused";
      o << "\ninput_projection_times=the rule's " << c.times.fused_ms << " ms, " << other << " "
        << c.times.other_fusion_ms << " ms (least of interleaved calls): "
        << (other_fusion_measured_faster(c.times) ? std::string(other) + " runs"
                                                   : std::string("the rule's runs"));
    }
  }
  return o.str();
}

}  // namespace
}  // namespace fused_lstm
