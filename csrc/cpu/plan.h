// The kernel choice of a CPU call, in one place: plan_cpu() returns which variant runs the call
// and why, from the sizes, the dtype, the CPU's features and the settings (settings.h), and
// nothing else. The kernels read the plan; they decide nothing themselves. describe() spells it
// out for fused_lstm.explain (the op fused_lstm::cpu_plan, lstm_cpu.cpp), including which
// library each product goes to (gemm_library).
//
// The variants (one file each):
//   small_hidden  H < kRowWiseHidden: the batch-fastest layout (small_hidden.h)
//   thin          inference of a few rows and steps: threads own hidden units (thin.h)
//   row_wise      everything else: gates row-major, one step at a time (row_wise.h), whose
//                 products go to brgemm (float32), bf16_gemm (bfloat16 models on AVX512_BF16,
//                 bf16_products.h), oneDNN's brgemm on AMX tiles (the forward's, for bfloat16
//                 models where the CPU has AMX-BF16, amx.h) or the BLAS / oneDNN matmul
//                 (gemm_library)
// Part of the one translation unit lstm_cpu.cpp.
#pragma once

#include "../settings.h"
#include "bf16_gemm.h"
#include "amx.h"
#include "blas.h"
#include "fast_math.h"
#include "rates.h"
#include "small_hidden_avx512.h"

#include <optional>
#include <string>

namespace fused_lstm {
namespace {

// ---- What the CPU offers (probed once per process) ----
struct CpuFeatures {
  bool avx512 = false;         // AVX-512F and FMA: the 16-lane cell pass
  bool avx512_bf16 = false;    // bf16_gemm's micro-kernel
  bool brgemm = false;         // oneDNN's brgemm micro-kernel, as ATen exports it, works here
  bool onednn_matmul = false;  // oneDNN's matmul, as ATen exports it
};

inline const CpuFeatures& cpu_features() {
  static const CpuFeatures f = [] {
    CpuFeatures c;
#if defined(__GNUC__) && defined(__x86_64__)
    __builtin_cpu_init();
    c.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#endif
    c.avx512_bf16 = bf16_gemm_available();
    c.brgemm = brgemm_works();
    c.onednn_matmul = at::native::mkldnn_matmul != nullptr && at::hasMKLDNN();
    return c;
  }();
  return f;
}

// ---- The variant ----
// Gates are stored row-major, [rows, 4H]: gate k of row b is the run g[b*4H + kH, +H). From
// this hidden size on, each row's runs are long enough to vectorise in place; below it, a layer
// runs in the batch-fastest layout of tiny_forward_steps / tiny_backward_steps.
constexpr int64_t kRowWiseHidden = 16;

// The thin kernel (thin.h) serves batches of at most kThinMaxBatch rows, one step or up to
// kThinMaxSteps steps while the input is not larger than twice the hidden size: each step
// re-reads W_ih (the row-wise path projects every step's input in one GEMM), still measured
// faster than that path up to 32 steps (input 64, hidden 256, 2 layers, batch 1..8, 1 and 2
// threads; with and without brgemm).
constexpr int64_t kThinMaxBatch = 8;
static_assert(kDropGatesMinRows == kThinMaxBatch + 1 && kDropGatesMinHidden == kRowWiseHidden,
              "lstm.h's gates rule names these sizes");
constexpr int64_t kThinMaxSteps = 32;
// ...except a bfloat16 model's steps where the row-wise path would run them on AMX tiles (amx.h):
// the tiles take a row for much less than the thin kernel's dot products, and from more than
// this many rows in all (steps x batch) the row-wise path was measured as fast or faster (Intel
// Xeon with AMX-BF16, inference, 4 to 16 steps of batches 1 to 8, hidden 64 to 1024; from 64
// rows 1.0-2.2x faster, at 48 rows 0.95-1.25x; benchmarks/notes/thin-batch.md, "bfloat16 on
// AMX tiles: where the thin kernel stops"). Without AMX (AVX512_BF16's bf16_gemm), not measured:
// the thin kernel keeps its sizes.
constexpr int64_t kThinAmxMaxRows = 32;
// The thin kernel's rows per step at most (ThinStep's arrays): kThinMaxBatch, or a float16
// model's training of one step of up to this many rows, whose forward reads the float16
// weights as stored where the row-wise forward packs float32 panels from them (measured as fast
// or faster from 9 to 32 rows, hidden 64 to 1,024: benchmarks/notes/fp16.md, "One step of
// float16 training with large weights").
constexpr int64_t kThinMaxRows = 32;

enum class Variant { kSmallHidden, kThin, kRowWise };

inline const char* variant_name(Variant v) {
  switch (v) {
    case Variant::kSmallHidden: return "small_hidden";
    case Variant::kThin: return "thin";
    default: return "row_wise";
  }
}

// Whether the sizes are the thin kernel's (whatever the call: the forward and backward ops
// decide the 16-bit boundary alike, see keep_16bit).
inline bool thin_sizes(const LSTMShape& s) {
  return s.proj_size == 0 && s.hidden_size >= kRowWiseHidden && s.batch >= 1 &&
      s.batch <= kThinMaxBatch && s.seq_len >= 1 &&
      (s.seq_len == 1 || (s.seq_len <= kThinMaxSteps && s.input_size <= 2 * s.hidden_size));
}

struct CpuPlan {
  CpuSettings settings;
  Variant variant = Variant::kRowWise;
  const char* why = "";
  at::ScalarType model = at::kFloat;  // the caller's dtype
  bool is_float = false;      // math dtype float32 (else float64)
  bool brgemm_steps = false;  // the forward's step products through brgemm (W packed in panels)
  bool brgemm_dh = false;     // the backward's dL/dh_{t-1} products through brgemm
  bool bf16_products = false; // a bfloat16 model's products through bf16_gemm (bf16_products.h)
  bool amx_products = false;  // of those, the forward's on AMX tiles (amx.h)
  // The op keeps a bfloat16 model's input, W_ih and W_hh as given, or a float16 model's W_ih
  // and W_hh (lstm.h Keep16); a float16 model's input too where fp16_kept_inference.
  bool keep_16bit = false;
  // Inference of a float16 model on the row-wise path with brgemm's steps: the op keeps the
  // input, W_ih and W_hh as given (no float32 copy of each for the call); brgemm's panels are
  // packed from the float16 weights, and where a float32 product reads W_ih or the input
  // (the unfused projection, a fused step), a layer and direction's W_ih and a chunk's or a
  // step's rows are widened just before (weights.h use_brgemm, forward.h;
  // benchmarks/notes/memory.md, "16-bit inference: the output in its dtype").
  bool fp16_kept_inference = false;
  // The same for the training of a float16 model whose reserve keeps no gates (lstm.h
  // gates_in_reserve): the forward keeps the input, W_ih and W_hh as given, and the backward
  // the input and the upstream gradient (and W_ih and W_hh: backward_widens_16bit); each
  // widens what a product reads just before it, a chunk's or a step's rows at a time
  // (forward.h, backward.h; benchmarks/notes/memory.md, "float16 training: no gates kept").
  bool fp16_kept_training = false;
  // The training of a float16 model whose reserve keeps the gates, on the same kernels: the
  // forward keeps W_ih and W_hh as given (not the input), and packs brgemm's float32 panels
  // from them a layer and direction at a time, instead of a float32 copy of every weight for
  // the call (benchmarks/notes/memory.md, "float16 training from 9 rows up to ~1,000").
  bool fp16_kept_weights = false;
  // The backward of a bfloat16 or float16 model whose products are float32 (row-wise steps
  // without the bf16 products: float16, a single step, a CPU without AVX512_BF16, or the
  // setting off) reads W_ih and W_hh as given and widens one layer and direction's at a time
  // into a float32 scratch (backward.h), instead of a float32 copy of every weight for the
  // whole call; where backward_few_rows, its products read them in place and nothing is
  // widened (few_rows.h).
  bool backward_widens_16bit = false;
  // The backward of a call whose reserve keeps no gates (lstm.h gates_in_reserve) recomputes
  // them with float32 products by chunks of steps (backward.h): the row-wise kernels without
  // the bf16 products (which recompute them step by step) or the few-row backward. Elsewhere
  // the backward runs the forward again into a reserve that keeps them.
  bool recompute_float_chunks = false;
  // The backward of a training call of at most kThinMaxBatch rows in all (B x T): its products
  // read W_ih and W_hh as stored, float32 or 16-bit (few_rows.h), without brgemm's panels or a
  // widened copy, and the weight gradients are summed outer products.
  bool backward_few_rows = false;
  // Of those, a bfloat16 or float16 model's: the W_ih and W_hh gradients are written in the
  // model's dtype by the few-row outer products (rounded as torch rounds), not as float32
  // gradients rounded afterwards (lstm.h prepare_backward's grads_16bit).
  bool grads_16bit = false;
  // W_ih's and W_hh's gradients made by autograd nodes of their own, one weight at a time, from
  // the factors the backward leaves (lstm.h cpu_weight_grads_apart, csrc/autograd.cpp): where
  // every weight requires grad and the tensors are plain CPU ones, and the backward is the
  // few-row one, or (apart_rows) a float16 model's row-wise backward with the gates kept whose
  // factors are fewer floats than the float32 gradients it would hold
  // (benchmarks/notes/memory.md, "float16 training from 9 rows up to ~1,000").
  bool weight_grads_apart = false;
  // The small-hidden backward's weight and bias gradients summed a step at a time from each
  // step's gate-major dgates block, in 16-lane partial sums (small_hidden_backward.h
  // tiny_weight_lanes), instead of every row's dgates transposed into rows for products after
  // the loop: where the batch fills the lanes and the partial sums are fewer floats than the
  // dgates they replace (tiny_weight_lanes_fit below; benchmarks/notes/small-hidden.md, "The
  // weight gradients a step at a time").
  bool tiny_weight_lanes = false;
  // ... summed instead along each step's rows straight into the gradients (small_hidden_avx512.h
  // weight_rows16), where the 16-lane sums do not fit (a batch under 16 rows, or too few rows
  // for the sums' size): float32 on AVX-512 (small_hidden_avx512), a batch of at least
  // kWeightRowsMinBatch rows (each step's loads of the gradients amortised over its rows) and
  // inputs of at most kWeightRowsMaxInput.
  bool tiny_weight_rows = false;
  // Either: no dgates of every row, no weight products after the step loop.
  bool tiny_step_weight_grads() const { return tiny_weight_lanes || tiny_weight_rows; }
  bool vec16_cell = false;    // float32 cell pass on 16 lanes (cell_forward_vec16)
  // The small-hidden kernel's float32 products on 16 AVX-512 lanes with a masked tail, and its
  // narrow transposes by permutes (small_hidden_avx512.h; the same bits as the generic code).
  bool small_hidden_avx512 = false;
  bool inference = false;     // lstm_inference: nothing kept for backward
  // Inference of a bfloat16 or float16 model on the row-wise path: the last layer's h_t rows
  // are rounded into the model-dtype output as each step finishes (forward_steps), instead of
  // a float32 output for the whole call rounded at its end (the steps carry h in float32 in
  // h_n's rows, so the results are the same bits). benchmarks/notes/memory.md, "16-bit
  // inference: the output in its dtype".
  bool output_16bit = false;
};

// model: the caller's dtype (the math dtype is float32 but for float64); inference:
// lstm_inference (nothing kept for backward).
// The gradients apart from 9 rows (CpuPlan::weight_grads_apart): a float16 model's training on
// the row-wise backward (after the row-wise or, one step of up to 32 rows, the thin forward)
// with float32 products whose reserve keeps the gates (one backward pass,
// backward.h: the recurrence writes each layer and direction's dgates into its factors), where
// the layers' factors together (lstm.h apart_factors_numel) are no more floats than their W_ih's
// and W_hh's float32 gradients: then the backward holds the factors instead of those gradients,
// and autograd one float16 gradient at a time instead of all of them.
inline bool apart_rows(const LSTMShape& s, at::ScalarType model, bool inference,
                       const CpuPlan& p) {
  if (model != at::kHalf || inference || p.variant == Variant::kSmallHidden ||
      !s.gates_in_reserve || p.bf16_products || p.backward_few_rows || s.rows == 0)
    return false;
  int64_t factors = 0, grads = 0;
  for (int64_t l = 0; l < s.num_layers; ++l) {
    factors += apart_factors_numel(s, l);
    grads += 4 * s.hidden_size * (s.layer_input_size(l) + s.out_size);
  }
  return factors <= grads;
}

// CpuPlan::tiny_weight_lanes: a batch of at least 16 rows (a step's dgates fill the
// partial sums' 16 lanes), and the partial sums (4H x (widest input + out + 1) x 16 floats) no
// more than every row's dgates (rows x 4H), which they replace. A rule of sizes only: the same
// on every CPU.
inline bool tiny_weight_lanes_fit(const LSTMShape& s) {
  return s.batch >= 16 && 16 * (s.widest_layer_input() + s.out_size + 1) <= s.rows;
}
// CpuPlan::tiny_weight_rows' least batch (each step loads and stores its gradients once per
// 4 gate rows, against 12-24 multiply-adds per batch row) and widest layer input (a row of it
// in two 16-lane vectors).
constexpr int64_t kWeightRowsMinBatch = 8;
constexpr int64_t kWeightRowsMaxInput = 32;

inline CpuPlan plan_cpu(const LSTMShape& s, const CpuSettings& settings, at::ScalarType model,
                        bool inference) {
  const CpuFeatures& cpu = cpu_features();
  const bool is_float = model != at::kDouble, bf16_model = model == at::kBFloat16;
  const bool model_16bit = is_16bit(model);
  CpuPlan p;
  p.settings = settings;
  p.model = model;
  p.is_float = is_float;
  p.inference = inference;
  const bool row_sizes = s.hidden_size >= kRowWiseHidden;
  // (A bfloat16 model's several steps of more than kThinAmxMaxRows rows on AMX tiles: row-wise.)
  const bool amx_rows = bf16_model && row_sizes && s.seq_len >= 2 && s.rows > kThinAmxMaxRows &&
                        cpu.avx512_bf16 && settings.bf16_products && settings.amx &&
                        amx_sizes(s) && amx_bf16_available();
  const bool thin = thin_sizes(s) && settings.thin && !amx_rows;
  // A training call of at most kThinMaxBatch rows in all: the few-row backward (few_rows.h),
  // and, where the thin kernel is on, its forward too (its gates and c_t into the reserve).
  const bool few_rows = is_float && !inference && row_sizes && s.rows <= kThinMaxBatch &&
                        settings.few_rows;
  if (!row_sizes) {
    p.variant = Variant::kSmallHidden;
    p.why = "hidden_size < 16: gate rows too short to vectorise, so the batch-fastest layout";
  } else if (inference && thin) {
    p.variant = Variant::kThin;
    p.why = "inference of at most 8 rows, no projection, 1 step (or up to 32 with input_size "
            "<= 2 * hidden_size): bound by reading the weights, which threads split by units";
  } else if (!inference && model == at::kHalf && settings.thin && s.seq_len == 1 &&
             s.proj_size == 0 && s.rows > kThinMaxBatch && s.rows <= kThinMaxRows &&
             s.gates_in_reserve && row_sizes) {
    p.variant = Variant::kThin;
    p.why = "float16 training of one step of 9 to 32 rows: the thin kernel's forward reads "
            "the float16 weights as stored (gates and c_t into the reserve), the general backward";
  } else if (thin && few_rows && s.gates_in_reserve) {
    p.variant = Variant::kThin;
    p.why = "training of at most 8 rows in all, no projection: the thin kernel's forward "
            "(gates and c_t into the reserve), the few-row backward";
  } else {
    p.variant = Variant::kRowWise;
    p.why = !inference && thin_sizes(s) ? "hidden_size >= 16; the thin kernel trains only calls of at most 8 rows"
          : thin_sizes(s) && amx_rows   ? "hidden_size >= 16; a bfloat16 model's steps of more than 32 "
                                          "rows in all run faster on AMX tiles than in the thin kernel"
          : thin_sizes(s)               ? "hidden_size >= 16; the thin kernel is off (allow_thin)"
                                        : "hidden_size >= 16 and not thin-batch sizes";
  }
  // A single step does not pay for packing the weights, except a float16 model's training,
  // which would widen them anyway (fp16_kept_weights: packing is the widening).
  const bool packs = row_sizes && (s.seq_len >= 2 || (model == at::kHalf && !inference));
  p.bf16_products = bf16_model && packs && cpu.avx512_bf16 && settings.bf16_products &&
                    p.variant != Variant::kThin;
  p.amx_products = p.bf16_products && settings.amx && amx_sizes(s) && amx_bf16_available();
  // The thin kernel reads a bfloat16 or float16 model's W_ih and W_hh as they are (thin.h), on
  // any CPU.
  p.fp16_kept_inference = inference && model == at::kHalf && p.variant == Variant::kRowWise &&
                          is_float && packs && cpu.brgemm && settings.brgemm;
  p.fp16_kept_training = !inference && model == at::kHalf && !s.gates_in_reserve &&
                         p.variant == Variant::kRowWise && is_float && packs && cpu.brgemm &&
                         settings.brgemm;
  p.fp16_kept_weights = !inference && model == at::kHalf && s.gates_in_reserve &&
                        p.variant == Variant::kRowWise && is_float && packs && cpu.brgemm &&
                        settings.brgemm;
  p.keep_16bit = (p.bf16_products && !thin) || (model_16bit && p.variant == Variant::kThin) ||
                 p.fp16_kept_inference || p.fp16_kept_training || p.fp16_kept_weights;
  p.backward_few_rows = few_rows && p.variant != Variant::kSmallHidden && !p.bf16_products;
  p.recompute_float_chunks = !inference && !s.gates_in_reserve && !p.bf16_products &&
                             p.variant == Variant::kRowWise && !p.backward_few_rows;
  // (Not where the backward runs the forward again into a reserve with the gates: on float32
  // weights, backward.h.)
  p.backward_widens_16bit = model_16bit && !inference && !p.bf16_products &&
                            p.variant != Variant::kSmallHidden &&
                            (s.gates_in_reserve || p.recompute_float_chunks);
  p.brgemm_steps = is_float && packs && cpu.brgemm && settings.brgemm && !p.bf16_products;
  p.grads_16bit = p.backward_few_rows && model_16bit;
  p.weight_grads_apart = settings.weight_grads_apart &&
                         (p.backward_few_rows || apart_rows(s, model, inference, p));
  p.brgemm_dh = is_float && row_sizes && cpu.brgemm && settings.brgemm && !p.backward_few_rows;
  p.small_hidden_avx512 = is_float && p.variant == Variant::kSmallHidden && cpu.avx512 &&
                          settings.small_hidden_avx512 && kSmallHiddenAvx512Built;
  const bool small_hidden_training = !inference && p.variant == Variant::kSmallHidden;
  p.tiny_weight_lanes = small_hidden_training && tiny_weight_lanes_fit(s);
  p.tiny_weight_rows = small_hidden_training && !p.tiny_weight_lanes && p.small_hidden_avx512 &&
                       s.batch >= kWeightRowsMinBatch &&
                       s.widest_layer_input() <= kWeightRowsMaxInput;
  p.vec16_cell = is_float && cpu.avx512 && settings.vec16_cell;
  p.output_16bit = inference && model_16bit && p.variant == Variant::kRowWise;
  return p;
}

// Where a training call's backward gets its gates (lstm.h gates_in_reserve; backward.h acts on
// it, describe.h reports it): kept by the forward; recomputed a step at a time by the
// small-hidden kernel (every layer input at most kDropGatesMaxSmallInput wide, so the forward
// projected it with the small-hidden product too) or in the bf16 products' recurrence; by
// chunks of steps (recompute_float_chunks); else the forward runs again into a reserve with them.
enum class BackwardGates { kKept, kSmallHiddenSteps, kBf16Steps, kFloatChunks, kForwardAgain };
inline BackwardGates backward_gates(const CpuPlan& p, const LSTMShape& s) {
  if (s.gates_in_reserve) return BackwardGates::kKept;
  if (p.variant == Variant::kSmallHidden)
    return s.widest_layer_input() <= kDropGatesMaxSmallInput ? BackwardGates::kSmallHiddenSteps
                                                             : BackwardGates::kForwardAgain;
  if (p.bf16_products) return BackwardGates::kBf16Steps;
  if (p.recompute_float_chunks) return BackwardGates::kFloatChunks;
  return BackwardGates::kForwardAgain;
}

// ---- The library of a product (blas.h's gemm asks) ----
// From this many multiply-adds on, a float32 GEMM may go to oneDNN instead of the BLAS, where
// this machine's measured rates (rates.h) say oneDNN's kernel for its class of product is the
// faster: on the AMD EPYC dev box MKL takes its AVX2 kernels while oneDNN's are AVX-512, 1.3x
// faster from about this size on (1 and 2 threads); on the Intel Xeon (Sapphire Rapids class)
// MKL's are as fast or faster. Below this size oneDNN's fixed cost per call (~5 us) is lost
// (benchmarks/notes/cpu-kernels.md, "GEMM library: oneDNN's matmul for the large products";
// benchmarks/notes/float32-bound.md, "Intel Xeon: where the time goes").
constexpr int64_t kOneDnnMinWork = int64_t{1} << 22;
// Products of at most this many multiply-adds are computed in place: float32 ones on 16
// AVX-512 lanes (blas.h small_gemm), matrix-vector ones (a dimension of 1) elsewhere inline
// (blas.h inline_gemv): below it MKL's call (its sgemv opens an OpenMP parallel region, its
// sgemm runs thin shapes in scalar-rate kernels) costs more than the arithmetic, whatever the
// CPU.
constexpr int64_t kSmallProductWork = int64_t{1} << 14;

// The rates of the libraries on this machine, measured once per process at the first need.
inline const LibraryRates& library_rates() {
  static const LibraryRates r = measure_library_rates(cpu_features().onednn_matmul);
  return r;
}

// The measured rates that decide a large product's library: outside a parallel region
// (where it runs on every thread) those measured on the process's thread count, else (inside
// one, or on one thread) one thread's.
inline const LibraryRates& deciding_library_rates(bool in_region) {
  const int64_t threads = at::get_num_threads();
  if (!in_region && threads > 1) {
    const LibraryRates& r = library_rates_on_threads(threads, cpu_features().onednn_matmul);
    if (r.measured) return r;
  }
  return library_rates();
}

// Whether the measured rates send a large product of class `c` to oneDNN's matmul.
inline bool onednn_measured_faster(GemmClass c, bool in_region) {
  const LibraryRates& r = deciding_library_rates(in_region);
  return r.measured && r.onednn[int(c)] > r.blas[int(c)];
}
// Products of at most kColumnSplitMaxRows rows whose matrix has kColumnSplitMinWork elements or
// more are split by columns over the threads (benchmarks/notes/thin-batch.md, "Products of a few
// rows split by columns").
constexpr int64_t kColumnSplitMaxRows = 8;
constexpr int64_t kColumnSplitMinWork = int64_t{1} << 17;

// ---- Threads ----
// Multiply-adds of recurrent work from which the batch is split over threads (each thread runs
// all steps for its rows: one parallel region instead of two per step), as long as one step's
// product is below kOneDnnMinWork: larger ones run faster as one GEMM parallel inside
// (measured, 2 threads: fastrnns infer 159 ms unsplit vs 181 ms split;
// benchmarks/notes/cpu-kernels.md, "Splitting the batch over threads").
constexpr int64_t kSplitBatchWork = int64_t{1} << 20;

// How many slices of the batch the recurrence of `steps` steps runs in: one per thread when it
// is worth a parallel region, else 1. With brgemm or bf16_gemm (`single_thread_fast`) a
// slice's product runs at full speed at any size.
inline int64_t batch_slices(const LSTMShape& s, int64_t steps, bool single_thread_fast) {
  const int64_t threads = at::get_num_threads();
  const int64_t step_work = s.batch * 4 * s.hidden_size * (s.out_size + 8);
  if (threads > 1 && s.batch > 1 && steps * step_work >= kSplitBatchWork &&
      (single_thread_fast || step_work < kOneDnnMinWork) && !at::in_parallel_region())
    return std::min(threads, s.batch);
  return 1;
}

// body(r0, r1) over the slices of [0, batch) (batch_slices).
template <typename F>
void for_each_batch_slice(const LSTMShape& s, int64_t steps, bool single_thread_fast,
                          const F& body) {
  const int64_t slices = batch_slices(s, steps, single_thread_fast);
  if (slices > 1) at::parallel_for(0, s.batch, (s.batch + slices - 1) / slices, body);
  else body(0, s.batch);
}

// ---- The input projection: fused into the steps, or one GEMM before them ----
// The input projection fused into each step's brgemm (g_t = b + x_t W_ih^T + h_{t-1} W_hh^T on
// the thread that runs the step: all of a layer's arithmetic at the micro-kernel's rate in one
// parallel region, no projection GEMM, no chunk buffer), instead of one GEMM over every step
// before them. But each step then streams W_ih as well as W_hh, which a thread's slice of a few
// rows does not pay for once the weights spill out of its L2: fused only where the slice has a
// row per kFuseWeightBytesPerRow of packed weights (measured, 1 thread, hidden 512, 100 steps:
// 16 rows 76 vs 71 ms unfused, 32 rows even, 64 rows 259 vs 271 ms; hidden 256, 2 layers:
// 2 rows 6.7 vs 5.4 ms, 4 rows even, 8 rows 16.0 vs 17.2 ms).
// The same for bf16_gemm's bf16 weights (weight_size: bytes per packed weight, 2 against
// brgemm's 4). The setting allow_fused_input_projection = False turns it off.
constexpr int64_t kFuseWeightBytesPerRow = int64_t{1} << 18;
// The same for a bfloat16 model's products on AMX tiles, whose arithmetic is so fast that the
// weights' bytes streamed per step decide: on the Intel Xeon (family 6 model 167, 2 MB of L2
// per core, 2 threads; 100 steps, one layer, the fused and unfused steps alternated in one
// process) the fused step won by 2-15% at 24-48 KB of fused bf16 weights per slice row (hidden
// 256-384, 16 and 32 rows per thread) and lost by 3-29% from 96 KB per row on (hidden 384-512;
// fastrnns: 128 KB per row, 26.9 against 22.8 ms). At 64 KB a layer alone lost 5%, but medium's
// second layer (64 KB per row) won inside the two-layer model (unfused: +3% inference, +7%
// training), so the bound is 64 KB. Only CPUs with AMX-BF16 run these products
// (benchmarks/notes/bf16.md, "Fused or unfused projection on AMX tiles").
constexpr int64_t kAmxFuseWeightBytesPerRow = int64_t{64} << 10;

//
// For float32 (brgemm) also where this machine's measured rates say so (the setting
// fuse_by_measured_rates, on by default): the fused step, which streams W_ih with W_hh, must
// take no longer than the recurrent step alone plus the slice's share of the projection through
// the faster library, the three measured together (FusedStepRates; rates.h step_pair_seconds),
// give or take kUnfusedMustWinBy. On the AMD EPYC the micro-kernel ran at ~95% of the FMA
// peak whatever the weights' size, so the fused step always paid; on the Intel Xeon (twice the
// FMA width per core, 2 MB of L2) streaming 8 MB of weights per step ran at ~150 GFLOP/s per
// core against ~200 from L2, and one projection GEMM plus the recurrent step alone were faster
// at medium and fastrnns (benchmarks/notes/float32-bound.md, "Intel Xeon: where
// the time goes").
// The fused step is kept unless the unfused pair measures more than this much faster: the
// unfused projection also writes every step's gates and the step reads them back, which the
// two rates leave out, and on the AMD EPYC, where the two measure within a few percent of each
// other, the fused step measured 10% faster in the call (cpu-kernels.md, "The input projection
// fused into each step; packed weight panels").
constexpr double kUnfusedMustWinBy = 1.05;

struct FusedStepRates {
  bool measured = false;
  double fused_us = 0;     // one thread's fused step: [rows, in + out] x [in + out, 4H]
  double unfused_us = 0;   // the recurrent step alone plus the rows' share of the projection
  double recurrent_us = 0, projection_us = 0;  // the two parts of unfused_us
  double probe_ms = 0;     // what measuring the three took (wall)
};

// One thread's fused step, its recurrent step alone and its projection's seconds per row,
// measured together (rates.h step_pair_seconds); the projection through the library with the
// faster one-thread rate for A*B^T. None without the BLAS or brgemm.
inline std::optional<StepPairSeconds> step_pair(const LSTMShape& s, int64_t layer,
                                                int64_t slice_rows) {
  const LibraryRates& r = library_rates();
  if (!r.measured || !cpu_features().brgemm) return std::nullopt;
  const int c = int(GemmClass::kNT);
  return step_pair_seconds(slice_rows, s.layer_input_size(layer), s.out_size,
                           4 * s.hidden_size, r.onednn[c] > r.blas[c]);
}

inline FusedStepRates fused_step_rates(const LSTMShape& s, int64_t layer, int64_t slice_rows) {
  FusedStepRates f;
  const std::optional<StepPairSeconds> t = step_pair(s, layer, slice_rows);
  if (!t) return f;
  f.fused_us = t->fused * 1e6;
  f.recurrent_us = t->recurrent * 1e6;
  f.projection_us = double(slice_rows) * t->projection_row * 1e6;
  f.unfused_us = f.recurrent_us + f.projection_us;
  f.probe_ms = t->probe_ms;
  f.measured = true;
  return f;
}

inline int64_t fused_slice_rows(const LSTMShape& s) {
  const int64_t slices = batch_slices(s, s.seq_len, true);
  return (s.batch + slices - 1) / slices;
}

// Whether the sizes allow the fused step (the setting allowing it): each slice's rows share
// the weights' bytes (kFuseWeightBytesPerRow; kAmxFuseWeightBytesPerRow on AMX tiles).
inline bool fusion_sizes_allow(const CpuPlan& p, const LSTMShape& s, int64_t layer,
                               int64_t weight_size) {
  if (!p.settings.fused_input_projection) return false;
  const int64_t weight_bytes =
      weight_size * 4 * s.hidden_size * (s.layer_input_size(layer) + s.out_size);
  const int64_t per_row = p.amx_products && weight_size == int64_t(sizeof(uint16_t))
                              ? kAmxFuseWeightBytesPerRow
                              : kFuseWeightBytesPerRow;
  return fused_slice_rows(s) * per_row >= weight_bytes;
}

// Whether the measured rates decide the layer's choice (float32 steps on brgemm, the sizes
// allowing the fused step, fuse_by_measured_rates on, the rates measured).
inline bool fusion_by_rates(const CpuPlan& p, const LSTMShape& s, int64_t layer) {
  return p.brgemm_steps && p.settings.fuse_by_rates && fusion_sizes_allow(p, s, layer, 4) &&
      fused_step_rates(s, layer, fused_slice_rows(s)).measured;
}

// The choice for the batch split's steps (fuse_input_projection below: the hidden split's are
// never fused).
inline bool fuse_input_projection_in_batch_split(const CpuPlan& p, const LSTMShape& s,
                                                 int64_t layer, int64_t weight_size) {
  if (!fusion_sizes_allow(p, s, layer, weight_size)) return false;
  if (weight_size == int64_t(sizeof(float)) && p.settings.fuse_by_rates) {
    const FusedStepRates f = fused_step_rates(s, layer, fused_slice_rows(s));
    if (f.measured && f.fused_us > kUnfusedMustWinBy * f.unfused_us) return false;
  }
  return true;
}

// ---- The hidden split of inference steps (hidden_split.h) ----
// The batch split (for_each_batch_slice) has each thread read all of W_hh^T (and W_ih^T where
// fused) every step for its rows; the hidden split has each thread read its share of the gate
// columns for every row, a slice that can stay in the core's L2 between steps, at the cost of a
// barrier per step. Taken where the setting allow_hidden_split is on (the default) and, for
// float32, one thread's step measured on both shapes (rates.h: brgemm_step_seconds) says the
// hidden split's is faster by this margin (bf16 AMX steps: only forced, hidden_split_layer): the barrier, and a thread descheduled on a shared machine, are not in the rates.
// On the Intel Xeon (2 MB of L2 per core) the unfused fastrnns step measured 487 -> 397 us per
// thread in float32 and 96 -> 81 us on AMX tiles (one thread, CPU time); under other work on
// the machine the barrier lost more than that. On a machine whose step rate does not depend on
// the weights' size (the AMD EPYC's, float32: 94-97% of the FMA peak either way) the two
// shapes measure alike and the batch split stays
// (benchmarks/notes/float32-bound.md, "The hidden split on the Intel Xeon, float32 and bf16").
// Where the floor measures a call (below: large float32 and bf16 inference under the floor's
// "auto"), it also times the call with the other split end to end and keeps the faster
// (measures_other_split): the rule's guess, from one thread's step, is only the default there.
constexpr double kHiddenSplitMustWinBy = 1.1;
// Units go to threads in blocks of this many (whole 16-lane vectors for the cell pass).
constexpr int64_t kHiddenSplitUnitBlock = 16;

// Whether the call's sizes, dtype and threads allow the hidden split (the settings aside from
// the measured rule): inference on the row-wise path, every step with every row, no projection,
// float32 on brgemm or a bf16 model on AMX tiles, a parallel region of OpenMP threads (the
// barrier needs every slice running at once), at least two blocks of units.
inline bool hidden_split_applies(const CpuPlan& p, const LSTMShape& s) {
#if AT_PARALLEL_OPENMP && defined(_OPENMP)
  return p.settings.hidden_split && p.inference && p.variant == Variant::kRowWise &&
      s.proj_size == 0 && s.seq_len >= 2 && s.batch >= 1 && every_step_full(s) &&
      (p.brgemm_steps || p.amx_products) && at::get_num_threads() > 1 &&
      !at::in_parallel_region() && s.hidden_size >= 2 * kHiddenSplitUnitBlock;
#else
  (void)p;
  (void)s;
  return false;
#endif
}

struct HiddenSplitRates {
  bool measured = false;
  bool batch_fused = false;  // the batch split's step has the projection fused
  double batch_us = 0;       // one thread's step in the batch split (with its projection share)
  double hidden_us = 0;      // the same in the hidden split
};

// float32 steps on brgemm only (bf16 AMX steps are not rated: hidden_split_layer).
inline HiddenSplitRates hidden_split_rates(const CpuPlan& p, const LSTMShape& s, int64_t layer) {
  HiddenSplitRates r;
  const int64_t threads = at::get_num_threads();
  const int64_t B = s.batch, H = s.hidden_size, out = s.out_size;
  const int64_t slice_rows = fused_slice_rows(s);
  const int64_t hidden_cols = 4 * ((H + threads - 1) / threads);
  // Each thread's share of the unfused projection, per step: B / threads rows.
  const double proj_rows = double(B) / double(threads);
  const std::optional<StepPairSeconds> t = step_pair(s, layer, slice_rows);
  if (!t) return r;
  const double proj = proj_rows * t->projection_row;
  r.batch_fused = fuse_input_projection_in_batch_split(p, s, layer, 4);
  r.batch_us = 1e6 * (r.batch_fused ? t->fused : t->recurrent + proj);
  r.hidden_us = 1e6 * (brgemm_step_seconds(B, out, hidden_cols) + proj);
  r.measured = true;
  return r;
}

// Whether layer `layer` of an inference call runs the hidden split.
inline bool hidden_split_layer(const CpuPlan& p, const LSTMShape& s, int64_t layer) {
  if (!hidden_split_applies(p, s)) return false;
  if (!p.settings.hidden_split_by_rates) return true;
  // A bfloat16 model's AMX steps: only where forced (hidden_split_by_measured_rates off). Their
  // one-thread probe (amx_step_seconds, removed since: in git history at 5fa276f) measured
  // medium's fused batch-split step at 10.3 us in one process and 35.6 us in the next on the
  // quiet Intel Xeon, so the rule took the hidden split for medium's layer 0, which end to end
  // lost 7.1 against 6.1 ms (float32-bound.md, "The quiet-box check"); the float32 probes
  // agreed across processes.
  if (p.amx_products) return false;
  const HiddenSplitRates r = hidden_split_rates(p, s, layer);
  return r.measured && kHiddenSplitMustWinBy * r.hidden_us < r.batch_us;
}

// Whether layer `layer`'s input projection is fused into its steps (never in the hidden split).
inline bool fuse_input_projection(const CpuPlan& p, const LSTMShape& s, int64_t layer,
                                  int64_t weight_size) {
  if (hidden_split_layer(p, s, layer)) return false;
  return fuse_input_projection_in_batch_split(p, s, layer, weight_size);
}

// The library of a product (blas.h's gemm asks): the setting cpu.gemm_library where it names
// one (oneDNN's matmul serves float32 only), else oneDNN's matmul for a large product of a
// class whose measured rate is higher there, else the BLAS (split by columns for a few rows).
GemmLibrary gemm_library(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                         bool is_float, bool in_region, int64_t library_setting,
                         int64_t small_setting) {
  if (library_setting < 0) library_setting = cpu_settings().gemm_library;
  if (small_setting < 0) small_setting = cpu_settings().small_products;
  const bool onednn = is_float && cpu_features().onednn_matmul;
  if (onednn && library_setting == 2) return GemmLibrary::kOneDnn;
  // A small product costs more in the library call than in arithmetic: on 16 AVX-512 lanes
  // (blas.h small_gemm), or a matrix-vector one inline (inline_gemv) where the CPU or the dtype
  // has no such kernel or allow_small_products is off; with gemm_library "blas" both go to the
  // BLAS as before.
  if (library_setting == 0 && m * n * k <= kSmallProductWork && is_float &&
      cpu_features().avx512 && small_setting)
    return GemmLibrary::kSmallAvx512;
  if (library_setting == 0 && (m == 1 || n == 1) && m * n * k <= kSmallProductWork)
    return GemmLibrary::kInlineGemv;
  if (onednn && library_setting == 0 && m * n * k >= kOneDnnMinWork &&
      onednn_measured_faster(gemm_class(trans_a, trans_b), in_region))
    return GemmLibrary::kOneDnn;
  // A product of a few rows (streaming inference: one sequence, one step) is bound by reading
  // the matrix, and BLAS runs it on one thread: split its columns over the threads instead.
  const int64_t threads = at::get_num_threads();
  if (m <= kColumnSplitMaxRows && n * k >= kColumnSplitMinWork && n >= 32 * threads &&
      threads > 1 && !in_region)
    return GemmLibrary::kColumnSplit;
  return GemmLibrary::kBlas;
}

}  // namespace
}  // namespace fused_lstm
