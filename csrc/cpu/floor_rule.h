// The nn.LSTM floor's rule (plan.h's plan decides the kernels; this decides whether an
// inference call runs them or at::lstm): which calls are candidates, their key, and the
// process-wide table of measured answers. lstm_cpu.cpp's measure_floor does the timing;
// describe.h reports the choice.
// Part of the one translation unit lstm_cpu.cpp.
#pragma once

#include "plan.h"

namespace fused_lstm {
namespace {

// ---- The nn.LSTM floor: at::lstm where it measures faster ----
// Never slower than nn.LSTM: where none of our kernels beats what nn.LSTM runs for a call
// (at::lstm: oneDNN's LSTM primitive, mkldnn_rnn, where ATen picks it; for bfloat16 on
// AMX-BF16 CPUs on AMX tiles), the inference op runs at::lstm itself, as nn.LSTM calls it, and
// returns its results. Whether it does is measured on this machine, not looked up by size: at
// the first inference call of a shape key (floor_key) the op times its own call and at::lstm's,
// interleaved (lstm_cpu.cpp's measure_floor), and keeps the answer for the process. Inference
// only: training calls run the fused kernels (they measured faster at every size on both
// benchmark machines, and timing a forward-and-backward pair at the first call is not cheap).
//
// Candidates only: calls large enough that both sides are bound by their GEMMs, so the
// measurement is worth its one-off cost (never the thin, small-hidden or tutorial sizes, where
// ours is several times faster) and where at::lstm would run what nn.LSTM runs for the same
// call: no packed input (nn.LSTM's step loop, several times slower), no dropout mask (at::lstm
// would draw its own), no projection (oneDNN's LSTM has none: ATen warns and runs its step
// loop), float32, bfloat16 and float16 models (what oneDNN's LSTM takes in inference: ATen
// runs a float16 call's at::lstm on it too, on AMX-FP16 tiles where the CPU has them, where
// ours computes in float32; benchmarks/notes/floor.md, "float16").
// kFloorMinStepWork: multiply-adds of the first layer's step, batch * 4H * (input + out)
// (medium, batch 32: 2^23.6; fastrnns: 2^27; below 2^22 one step is a few tens of us).
constexpr int64_t kFloorMinBatch = 16;
constexpr int64_t kFloorMinStepWork = int64_t{1} << 22;
// at::lstm runs a call only where ours measured more than 3% slower: a near tie keeps our
// kernels (and their results), while a real gap of 5% (fastrnns float32 inference on the Intel
// Xeon, quiet: 0.95x) still goes to at::lstm. No margin of a few percent absorbs the noise of
// a loaded machine: there the same call's ratio spread from 0.82 to 1.22 between measurements
// (benchmarks/notes/floor.md); the least of interleaved calls is what narrows that.
constexpr double kFloorMustWinBy = 1.03;
// Where the hidden split applies and the rule decides it (measures_other_split), the same
// measurement times our call with the other split of the steps too (the hidden split forced
// where the rule took the batch split for every layer, else the batch split), interleaved,
// and every call of the key runs the faster of our two; at::lstm must beat that one. So a
// bf16 model's AMX steps, which the rule never gives the hidden split, take it where it
// measured faster end to end, and a float32 choice within the rule's margin is settled by the
// call itself (benchmarks/notes/floor.md, "The split measured end to end").
// The measurement (lstm_cpu.cpp's measure_floor): our call (the user's), at::lstm's twice,
// then, unless at::lstm is more than kFloorFarBehind slower, ours again, and for calls shorter
// than kFloorLongCallSeconds ours and at::lstm's once more, then a fourth of at::lstm (it
// warms up over its first 3-4 calls), ours once more and at::lstm twice: the least of 4 calls
// of ours and 6 of at::lstm, the first calls of the shape (which create oneDNN's primitive and
// measure rates.h's rates) included. At most 9 calls more than the user's own (6 of at::lstm,
// 3 of ours), and 4 of ours with each other choice where it is timed, each shorter than
// kFloorLongCallSeconds; 3 (5) more for longer calls, 2 (of at::lstm) where it is far behind
// (benchmarks/notes/floor.md).
constexpr double kFloorLongCallSeconds = 0.2;
constexpr double kFloorFarBehind = 1.5;
// Keys measured per process at most; calls of further keys run our kernels unmeasured.
constexpr size_t kFloorMaxKeys = 64;

// The model dtypes the floor takes (see above).
inline bool floor_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// Why the floor cannot run a call, or nullptr where it can.
inline const char* floor_impossible(const CpuPlan& p, const LSTMShape& s, at::ScalarType dtype,
                                    bool has_mask) {
  if (!p.inference) return "a training call: the floor serves inference only";
  if (!floor_dtype(dtype)) return "float32, bfloat16 and float16 models only";
  if (s.packed) return "packed input: nn.LSTM runs it step by step";
  if (has_mask) return "a dropout mask: at::lstm would draw its own";
  if (s.proj_size > 0) return "proj_size > 0: oneDNN's LSTM has no projection";
  if (p.variant != Variant::kRowWise) return "the thin or small-hidden kernel's sizes";
  if (s.batch < kFloorMinBatch || s.seq_len < 2 ||
      s.batch * 4 * s.hidden_size * (s.input_size + s.out_size) < kFloorMinStepWork)
    return "too little work per step: batch < 16, one step, or batch * 4H * (input + hidden) "
           "< 2^22";
  return nullptr;
}

inline int64_t log2_bucket(int64_t n) {
  int64_t b = 0;
  while (n >>= 1) ++b;
  return b;
}

// The calls one measurement serves: the same dtype and sizes, batch and seq_len in the same
// power-of-two bucket (a user whose batch or sequence length varies measures a few times, not
// every call), the same threads, oneDNN on or off in torch.backends.mkldnn (nn.LSTM's path),
// and the same kernel settings (which change our side's speed).
inline FloorKey floor_key(const LSTMShape& s, at::ScalarType dtype, const CpuSettings& settings) {
  int64_t fingerprint = 0;
#define FUSED_LSTM_FLOOR_FINGERPRINT(field, name, dflt, lo, hi) \
  fingerprint = fingerprint * 4 + settings.field;
  FUSED_LSTM_CPU_SETTINGS(FUSED_LSTM_FLOOR_FINGERPRINT)
#undef FUSED_LSTM_FLOOR_FINGERPRINT
  return {int64_t(dtype), s.input_size, s.hidden_size, s.num_layers, s.num_directions,
          int64_t(s.has_biases), log2_bucket(s.batch), log2_bucket(s.seq_len),
          int64_t(at::get_num_threads()), int64_t(at::globalContext().userEnabledMkldnn()),
          fingerprint};
}

// Which of our measured calls runs the key: the rule's, the other split of the steps, or the
// other choice of the input projection, whichever measured fastest (the least of interleaved
// calls; the rule's on a tie; no margin: all are our kernels, with results within float32
// rounding of each other).
enum class OursRuns { kRule, kOtherSplit, kOtherFusion };

inline OursRuns fused_best(const FloorTimes& t) {
  OursRuns best = OursRuns::kRule;
  if (!t.measured) return best;
  double ms = t.fused_ms;
  if (t.other_split_measured && t.other_split_ms < ms) {
    best = OursRuns::kOtherSplit;
    ms = t.other_split_ms;
  }
  if (t.other_fusion_measured && t.other_fusion_ms < ms) best = OursRuns::kOtherFusion;
  return best;
}

inline bool other_split_measured_faster(const FloorTimes& t) {
  return fused_best(t) == OursRuns::kOtherSplit;
}

inline bool other_fusion_measured_faster(const FloorTimes& t) {
  return fused_best(t) == OursRuns::kOtherFusion;
}

// Our call's least measured time: the rule's, or another of ours where it measured faster.
inline double fused_best_ms(const FloorTimes& t) {
  switch (fused_best(t)) {
    case OursRuns::kOtherSplit: return t.other_split_ms;
    case OursRuns::kOtherFusion: return t.other_fusion_ms;
    default: return t.fused_ms;
  }
}

inline bool floor_measured_faster(const FloorTimes& t) {
  return t.measured && kFloorMustWinBy * t.aten_ms < fused_best_ms(t);
}

// The settings that give the other split of the steps than the rule's: the hidden split
// forced (by_rates off) where the rule took the batch split for every layer, else none.
inline CpuSettings other_split_settings(const CpuSettings& settings, bool hidden) {
  CpuSettings other = settings;
  if (hidden) other.hidden_split_by_rates = 0;
  else other.hidden_split = 0;
  return other;
}

// The settings that give the other choice of the input projection than the rule's: fused
// wherever the sizes allow (fuse_by_measured_rates off) where the rule fused no layer, else
// never fused (allow_fused_input_projection off); in the batch split, as the rule's
// (measures_other_fusion): the hidden split off, which the rule's choice of split would
// otherwise weigh anew against the other projection.
inline CpuSettings other_fusion_settings(const CpuSettings& settings, bool fused) {
  CpuSettings other = settings;
  other.hidden_split = 0;
  if (fused) other.fuse_by_rates = 0;
  else other.fused_input_projection = 0;
  return other;
}

// The settings our call runs with for a measured key (the rule's, or those of another of ours
// that measured faster).
inline CpuSettings settings_that_run(const CpuSettings& settings, const FloorTimes& t) {
  switch (fused_best(t)) {
    case OursRuns::kOtherSplit: return other_split_settings(settings, t.other_split_hidden);
    case OursRuns::kOtherFusion: return other_fusion_settings(settings, t.other_fusion_fused);
    default: return settings;
  }
}

// Whether the end-to-end measurement of the floor also times the other choice of the input
// projection, and which it is: where the measured rates of one thread's steps decide the
// choice for a layer in the batch split (fusion_by_rates), the batch split with the other
// choice than the batch split's rule makes (other_fusion_settings turns the hidden split off).
// So also where the rule takes the hidden split (by rates) for a layer: the floor then picks
// among the rule's call, the other split and the batch split with the other projection; a
// hidden split forced by the settings is left alone (its steps are never fused). The probe
// rates the two steps apart and can misjudge the call: medium float32 inference on the Intel
// Xeon fused layer 1 in about 1 of 6 processes, a call ~10% slower; where the rule took the
// hidden split for a layer, the other projection went untimed and a call 7% slower than the
// batch split with both projections unfused ran (benchmarks/notes/floor.md, "The input
// projection's choice measured end to end"; float32-bound.md, "fastrnns inference: 0.96x in a
// full run, 1.04x alone").
inline bool measures_other_fusion(const CpuPlan& p, const LSTMShape& s, bool& other_fused) {
  bool rated = false, fused = false;
  for (int64_t l = 0; l < s.num_layers; ++l) {
    if (!p.settings.hidden_split_by_rates && hidden_split_layer(p, s, l)) return false;
    if (!fusion_by_rates(p, s, l)) continue;
    rated = true;
    fused = fused || fuse_input_projection_in_batch_split(p, s, l, 4);
  }
  other_fused = !fused;
  return rated;
}

// Whether the end-to-end measurement of the floor also times the other split, and which it is
// (the hidden split where the rule takes the batch split for every layer): where the hidden
// split applies and the rule, not a setting, decides it.
inline bool measures_other_split(const CpuPlan& p, const LSTMShape& s, bool& other_hidden) {
  if (!p.settings.hidden_split_by_rates || !hidden_split_applies(p, s)) return false;
  other_hidden = true;
  for (int64_t l = 0; l < s.num_layers; ++l)
    if (hidden_split_layer(p, s, l)) other_hidden = false;
  return true;
}

enum class FloorRun { kFused, kAten, kMeasure };

struct FloorChoice {
  const char* impossible = nullptr;  // why the floor cannot run the call, or nullptr
  FloorRun run = FloorRun::kFused;
  FloorTimes times;                  // the key's measurement, where there is one
  bool table_full = false;           // auto, unmeasured, and kFloorMaxKeys keys measured
  FloorKey key{};
};

// The floor's choice for a call. `claim` (the kernel asks): an unmeasured key under "auto" is
// marked as being measured and kMeasure returned (the caller then measures and calls
// floor_store, or floor_abandon); while another thread measures the key, this one waits for
// its result. Without `claim` (explain asks) nothing waits or changes: an unmeasured key is
// kFused, reported as not measured yet.
inline FloorChoice floor_choice(const CpuPlan& p, const LSTMShape& s, at::ScalarType dtype,
                                bool has_mask, bool claim) {
  FloorChoice c;
  c.impossible = floor_impossible(p, s, dtype, has_mask);
  if (c.impossible != nullptr || p.settings.nn_lstm_floor == 1) return c;
  if (p.settings.nn_lstm_floor == 2) {
    c.run = FloorRun::kAten;
    return c;
  }
  c.key = floor_key(s, dtype, p.settings);
  FloorTable& table = floor_table();
  std::unique_lock<std::mutex> lock(table.mutex);
  if (claim)
    table.done.wait(lock, [&] { return table.pending.count(c.key) == 0; });
  const auto it = table.times.find(c.key);
  if (it != table.times.end()) {
    c.times = it->second;
    c.run = floor_measured_faster(c.times) ? FloorRun::kAten : FloorRun::kFused;
  } else if (table.times.size() + table.pending.size() >= kFloorMaxKeys) {
    c.table_full = true;
  } else if (claim) {
    table.pending[c.key] = true;
    c.run = FloorRun::kMeasure;
  }
  return c;
}

inline void floor_store(const FloorKey& key, const FloorTimes& t) {
  FloorTable& table = floor_table();
  {
    std::lock_guard<std::mutex> lock(table.mutex);
    table.times[key] = t;
    table.pending.erase(key);
  }
  table.done.notify_all();
}

inline void floor_abandon(const FloorKey& key) {
  FloorTable& table = floor_table();
  {
    std::lock_guard<std::mutex> lock(table.mutex);
    table.pending.erase(key);
  }
  table.done.notify_all();
}

}  // namespace
}  // namespace fused_lstm
