// CPU kernels of avkernels::batch_norm_fwd / batch_norm_bwd (arguments in ../batch_norm.h; the
// contract and the PyTorch reference in avkernels/ops/batch_norm/), and of the parts synchronised
// BN runs around its collectives: batch_norm_stats (the forward's statistics pass),
// batch_norm_bwd_reduce (the backward's sums) and batch_norm_bwd_elemt (its grad_x pass).
//
// Passes over memory: training forward = one statistics read + one normalise read/write (the
// dead counts are taken in the normalise loop); eval forward = the normalise pass alone;
// training backward = one reduction over (x, dy) + one elementwise pass; eval backward = one
// pass. Per-channel work (affine folding, running statistics, parameter gradients) is done on
// C-element arrays without calling ATen ops, which matters for small layers.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../batch_norm.h"
#include "batch_norm_layout.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AVKERNELS_X86_BUILDS 1
#include <immintrin.h>
#endif

namespace avkernels::bn {
namespace {

// The same kernels, compiled for several instruction sets (see batch_norm_isa_kernels.h).
namespace baseline {
#include "batch_norm_isa_kernels.h"
}  // namespace baseline

#ifdef AVKERNELS_X86_BUILDS
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#define AVKERNELS_BUILD_AVX2 1
namespace avx2 {
#include "batch_norm_isa_kernels.h"
}  // namespace avx2
#undef AVKERNELS_BUILD_AVX2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c")
#define AVKERNELS_BUILD_AVX512 1
namespace avx512 {
#include "batch_norm_isa_kernels.h"
}  // namespace avx512
#undef AVKERNELS_BUILD_AVX512
#pragma GCC pop_options
#endif

constexpr const char* kForward = "batch_norm_fwd";
constexpr const char* kBackward = "batch_norm_bwd";
constexpr const char* kStats = "batch_norm_stats";
constexpr const char* kBackwardReduce = "batch_norm_bwd_reduce";
constexpr const char* kBackwardElemt = "batch_norm_bwd_elemt";

// --- kernel selection ---------------------------------------------------------------------------

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The widest build that both this CPU and ATen's choice allow (ATEN_CPU_CAPABILITY=default or
// avx2 therefore also limits these kernels).
Isa runtime_isa() {
#ifdef AVKERNELS_X86_BUILDS
  static const Isa isa = [] {
    const std::string aten = at::get_cpu_capability();
    __builtin_cpu_init();
    if (aten == "AVX512" && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq")) {
      return Isa::kAvx512;
    }
    if ((aten == "AVX512" || aten == "AVX2") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("f16c")) {
      return Isa::kAvx2;
    }
    return Isa::kBaseline;
  }();
  return isa;
#else
  return Isa::kBaseline;
#endif
}

template <typename scalar_t>
const KernelTable<scalar_t>& kernels() {
  static const KernelTable<scalar_t> table = [] {
    switch (runtime_isa()) {
#ifdef AVKERNELS_X86_BUILDS
      case Isa::kAvx512:
        return avx512::Kernels<scalar_t>::table();
      case Isa::kAvx2:
        return avx2::Kernels<scalar_t>::table();
#endif
      default:
        return baseline::Kernels<scalar_t>::table();
    }
  }();
  return table;
}

// Runs fn(begin, end) over the geometry's runs on ATen's thread pool.
template <typename F>
void for_runs(const Geometry& g, const F& fn) {
  at::parallel_for(0, g.num_runs, g.grain(), fn);
}

// --- non-temporal output stores ------------------------------------------------------------------
// An elementwise pass whose input and output together exceed the last-level cache cannot keep its
// output cached for the next layer anyway, and an ordinary store first reads every output line it
// writes. Such outputs (y in the forward, whose pass touches x and y; dx in the backward: dy, x
// and dx) are stored non-temporally, as glibc's memcpy does above a cache-sized threshold.
// Measured on 2 cores with 32 MiB of L3, float32, against ordinary stores in the same run:
// (32, 64, 56, 56) eval forward 0.86x, and 0.93x counting a next op that reads the output;
// channels_last training step 0.86x; (32, 128, 28, 28) channels_last training step (backward
// streams) 0.92x. A (32, 128, 28, 28) eval forward, whose input and output fit in L3, measured
// 1.02-1.06x with a next op reading the output when streamed, so that size is not.

constexpr const char* kStreamVariable = "AVKERNELS_NONTEMPORAL_STORES";
constexpr int64_t kStreamBlockBytes = 64;  // every build's vector size, and a cache line

// The size of the largest cache Linux reports for CPU 0 (sysfs), 0 where unknown. (glibc's
// sysconf(_SC_LEVEL3_CACHE_SIZE) reports 320 MiB on this project's 32 MiB cloud CPUs.)
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t largest = 0;
    for (int index = 0;; ++index) {
      std::ifstream file("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) +
                         "/size");
      if (!file) break;
      int64_t size = 0;
      std::string unit;
      if (!(file >> size)) continue;
      file >> unit;
      const int64_t scale = unit == "K" ? 1024 : unit == "M" ? 1024 * 1024 : 1;
      largest = std::max(largest, size * scale);
    }
    return largest;
  }();
  return bytes;
}

// Whether to store y non-temporally in a pass touching pass_bytes: float32/float64 output whose
// runs are whole vectors from a vector-aligned start; then AVKERNELS_NONTEMPORAL_STORES=1 or 0
// forces the choice, else pass_bytes above the last-level cache.
bool stream_output(const Geometry& g, const Tensor& y, int64_t pass_bytes) {
  const char* setting = std::getenv(kStreamVariable);
  const bool forced = setting != nullptr && *setting != '\0';
  TORCH_CHECK(!forced || std::strcmp(setting, "0") == 0 || std::strcmp(setting, "1") == 0,
              kStreamVariable, " must be 0 (never), 1 (whenever the layout allows) or unset "
              "(automatic: outputs that do not fit in cache with their input), got '", setting,
              "'");
  const bool eligible =
      (y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble) &&
      reinterpret_cast<uintptr_t>(y.const_data_ptr()) % kStreamBlockBytes == 0 &&
      g.runs_in_blocks(y.element_size(), kStreamBlockBytes);
  if (!eligible) return false;
  if (forced) return *setting == '1';
  const int64_t cache = last_level_cache_bytes();
  return cache > 0 && pass_bytes > cache;
}

// --- argument checks -----------------------------------------------------------------------------

bool is_supported_input(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_input(const char* op, const char* name, const Tensor& x) {
  TORCH_CHECK(x.dim() == 4, op, ": expected a 4-D (N, C, H, W) ", name, ", got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the C++ kernel, got ",
              x.device());
  TORCH_CHECK(is_supported_input(x.scalar_type()), op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", x.scalar_type());
}

// A per-channel vector: shape (C,), or also (1,) when allow_single.
void check_vector(const char* op, const char* name, const OptionalTensor& t, int64_t channels,
                  bool allow_single = false) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
  TORCH_CHECK(is_supported_input(t->scalar_type()), op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", t->scalar_type());
  const bool ok =
      t->dim() == 1 && (t->size(0) == channels || (allow_single && t->size(0) == 1));
  TORCH_CHECK(ok, op, ": ", name, " must have shape (C,) = (", channels, ",)",
              allow_single ? " or (1,)" : "", ", got ", t->sizes());
}

void check_together(const char* op, const OptionalTensor& a, const char* a_name,
                    const OptionalTensor& b, const char* b_name) {
  TORCH_CHECK(a.has_value() == b.has_value(), op, ": ", a_name, " and ", b_name,
              " must be given together (one is None)");
}

// The dtype mixes nn.BatchNorm2d accepts on CPU: every parameter and running statistic has x's
// dtype, or float32 with float16/bfloat16 x (docs/DESIGN.md, "Op contracts").
void check_parameter_dtypes(const char* op, const Tensor& x,
                            std::initializer_list<const OptionalTensor*> tensors) {
  std::optional<at::ScalarType> common;
  for (const OptionalTensor* t : tensors) {
    if (!t->has_value()) continue;
    TORCH_CHECK(!common || *common == (*t)->scalar_type(), op,
                ": the parameters and running statistics must share one dtype, got ", *common,
                " and ", (*t)->scalar_type(), "; convert the layer with module.to(dtype)");
    common = (*t)->scalar_type();
  }
  const bool low_precision = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(!common || *common == x.scalar_type() || (low_precision && *common == at::kFloat),
              op, ": mixed dtypes: input ", x.scalar_type(), " with parameters ", *common,
              "; use the input's dtype for the layer (module.to(x.dtype)), or float32 parameters "
              "with float16/bfloat16 input");
}

void check_counter(const OptionalTensor& t, const char* name, int64_t size) {
  TORCH_CHECK(t->device().is_cpu(), kForward, ": ", name, " must be a CPU tensor, got ",
              t->device());
  TORCH_CHECK(t->scalar_type() == at::kLong, kForward, ": ", name, " must be int64, got ",
              t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == size, kForward, ": ", name, " must have shape (",
              size, ",), got ", t->sizes());
}

// channels_last when x is channels_last-dense and not NCHW-dense, else NCHW (as
// output_memory_format in batch_norm.py).
at::MemoryFormat output_format(const Tensor& x) {
  if (!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

at::ScalarType accumulation_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// --- per-channel arrays --------------------------------------------------------------------------

// The values of t (any floating dtype and strides) converted to acc_t, appended to out.
template <typename acc_t>
void read_values(const Tensor& t, std::vector<acc_t>& out) {
  const Tensor dense = t.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, dense.scalar_type(), "read_values", [&] {
        const scalar_t* p = dense.const_data_ptr<scalar_t>();
        for (int64_t i = 0; i < dense.numel(); ++i) out.push_back(static_cast<acc_t>(p[i]));
      });
}

template <typename acc_t>
std::vector<acc_t> read_optional(const OptionalTensor& t) {
  std::vector<acc_t> values;
  if (t.has_value()) read_values(*t, values);
  return values;
}

// Writes values into t, rounded to t's dtype as Tensor.copy_ would.
template <typename acc_t>
void write_values(const Tensor& t, const acc_t* values) {
  const Tensor dense = t.is_contiguous() ? t : at::empty(t.sizes(), t.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "write_values", [&] {
    scalar_t* p = dense.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < dense.numel(); ++i) p[i] = static_cast<scalar_t>(values[i]);
  });
  if (!dense.is_same(t)) t.copy_(dense);
}

// The affine parameters as accumulation-type arrays; an empty array is an absent parameter.
template <typename acc_t>
struct Affine {
  std::vector<acc_t> weight, bias, abri_weight, abri_bias, alpha;  // alpha: 1 or C values

  Affine(const OptionalTensor& w, const OptionalTensor& b, const OptionalTensor& aw,
         const OptionalTensor& ab, const OptionalTensor& a)
      : weight(read_optional<acc_t>(w)),
        bias(read_optional<acc_t>(b)),
        abri_weight(read_optional<acc_t>(aw)),
        abri_bias(read_optional<acc_t>(ab)),
        alpha(read_optional<acc_t>(a)) {}

  bool abri() const { return !alpha.empty(); }
  acc_t alpha_at(int64_t c) const { return alpha[alpha.size() == 1 ? 0 : c]; }

  // Per-channel (scale, shift) with x * scale + shift = the pre-activation output, computed
  // with the operations, in the order, of effective_affine in batch_norm.py. mean and invstd
  // hold `sets` (K) rows of C: row 0 normalises the original BN, row K-1 the ABRi one.
  void fold(const acc_t* mean, const acc_t* invstd, int64_t sets, int64_t channels,
            acc_t* scale, acc_t* shift) const {
    const int64_t last = (sets - 1) * channels;
    for (int64_t c = 0; c < channels; ++c) {
      if (!abri()) {
        const acc_t term = invstd[c] * (weight.empty() ? acc_t(1) : weight[c]);
        scale[c] = term;
        shift[c] = acc_t(0) - mean[c] * term;
        if (!bias.empty()) shift[c] = shift[c] + bias[c];
      } else {
        const acc_t a = alpha_at(c), rest = acc_t(1) - a;
        const acc_t term = a * invstd[c] * (weight.empty() ? acc_t(1) : weight[c]);
        const acc_t abri_term =
            rest * invstd[last + c] * (abri_weight.empty() ? acc_t(1) : abri_weight[c]);
        scale[c] = term + abri_term;
        acc_t s = acc_t(0) - mean[c] * term;
        if (!bias.empty()) s = s + a * bias[c];
        s = s - mean[last + c] * abri_term;
        if (!abri_bias.empty()) s = s + rest * abri_bias[c];
        shift[c] = s;
      }
    }
  }
};

// Storage for per-run results (Geometry::value_index); every element is written by a kernel,
// so it is left uninitialised.
template <typename T>
std::unique_ptr<T[]> per_run(const Geometry& g) {
  return std::unique_ptr<T[]>(new T[g.num_values()]);
}

// --- merging per-run results (in run order: independent of the thread count) ----------------

// Calls fn(sample, part, channel, value index) for every per-run result, in memory order; for
// each channel that is (sample, part) order whatever the layout.
template <typename F>
void for_each_value(const Geometry& g, const F& fn) {
  const int64_t C = g.channels, P = g.parts;
  for (int64_t n = 0; n < g.batch; ++n) {
    if (g.rows) {
      for (int64_t part = 0; part < P; ++part) {
        for (int64_t c = 0; c < C; ++c) fn(n, part, c, g.result_index(n, part, c));
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t part = 0; part < P; ++part) fn(n, part, c, g.result_index(n, part, c));
      }
    }
  }
}

// Per-channel mean and biased variance from per-run means and squared-deviation sums (Chan et
// al.'s merge: M2 = sum over runs of m2 + count * (run mean - mean)^2).
void merge_stats(const Geometry& g, const double* run_mean, const double* run_m2,
                 std::vector<double>& mean, std::vector<double>& var) {
  const double total = static_cast<double>(g.batch * g.spatial);
  std::vector<double> weighted(g.channels, 0.0), m2(g.channels, 0.0);
  for_each_value(g, [&](int64_t, int64_t part, int64_t c, int64_t i) {
    weighted[c] += static_cast<double>(g.part_positions(part)) * run_mean[i];
  });
  for (int64_t c = 0; c < g.channels; ++c) mean[c] = weighted[c] / total;
  for_each_value(g, [&](int64_t, int64_t part, int64_t c, int64_t i) {
    const double d = run_mean[i] - mean[c];
    m2[c] += run_m2[i] + static_cast<double>(g.part_positions(part)) * d * d;
  });
  for (int64_t c = 0; c < g.channels; ++c) var[c] = m2[c] / total;
}

void merge_sums(const Geometry& g, const double* run_sum, std::vector<double>& sum) {
  std::fill(sum.begin(), sum.end(), 0.0);
  for_each_value(g, [&](int64_t, int64_t, int64_t c, int64_t i) { sum[c] += run_sum[i]; });
}

// Adds per-run counts of non-positive outputs to the dead counters; a sample is dead in a
// channel when the counts of all its parts add up to H*W. Serial (it runs after the parallel
// kernel), so every loop is unit-stride over channels and vectorises.
void add_dead_counts(const Geometry& g, const RunCount* counts, const Tensor& dead_count,
                     const Tensor& dead_sample_count) {
  // Locals, not g's members, in the loops: the int64 stores could alias those.
  const int64_t C = g.channels, P = g.parts, spatial = g.spatial;
  std::vector<int64_t> dead(C, 0), dead_samples(C, 0), parts_total(P > 1 ? C : 0);
  const auto add_sample = [&](const auto* sample) {  // C per-channel counts of one sample
    for (int64_t c = 0; c < C; ++c) {
      dead[c] += sample[c];
      dead_samples[c] += sample[c] == spatial;
    }
  };
  for (int64_t n = 0; n < g.batch; ++n) {
    const RunCount* sample_counts = counts + g.result_index(n, 0, 0);  // C * P values
    if (P == 1) {  // one run per channel (planes) or all channels (rows): C values in order
      add_sample(sample_counts);
      continue;
    }
    std::fill(parts_total.begin(), parts_total.end(), 0);
    for (int64_t part = 0; part < P; ++part) {
      for (int64_t c = 0; c < C; ++c) {
        parts_total[c] += sample_counts[g.rows ? part * C + c : c * P + part];
      }
    }
    add_sample(parts_total.data());
  }
  auto dead_a = dead_count.accessor<int64_t, 1>();
  auto dead_samples_a = dead_sample_count.accessor<int64_t, 1>();
  for (int64_t c = 0; c < C; ++c) {
    dead_a[c] += dead[c];
    dead_samples_a[c] += dead_samples[c];
  }
}

// --- forward -------------------------------------------------------------------------------------

// The run layout of the reductions and of grad_x: runs span samples where x's layout allows.
Geometry sample_spanning_geometry(const Tensor& x) {
  return Geometry::spanning_samples(x.size(0), x.size(1), x.size(2) * x.size(3),
                                    output_format(x) == at::MemoryFormat::ChannelsLast);
}

// Per-channel mean and biased variance of the batch in x (NaN for an empty batch).
template <typename scalar_t>
void batch_statistics(const Tensor& x, std::vector<double>& mean, std::vector<double>& var) {
  const int64_t C = x.size(1);
  mean.assign(C, std::numeric_limits<double>::quiet_NaN());
  var.assign(C, std::numeric_limits<double>::quiet_NaN());
  if (x.numel() == 0) return;
  const Geometry g = sample_spanning_geometry(x);
  auto run_mean = per_run<double>(g), run_m2 = per_run<double>(g);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  for_runs(g, [&](int64_t begin, int64_t end) {
    kernels<scalar_t>().batch_stats(g, xp, begin, end, run_mean.get(), run_m2.get());
  });
  merge_stats(g, run_mean.get(), run_m2.get(), mean, var);
}

// batch_norm_stats: (mean, biased var) per channel, in the accumulation dtype.
std::tuple<Tensor, Tensor> batch_norm_stats_cpu(const Tensor& input) {
  check_input(kStats, "input", input);
  const Tensor x = input.contiguous(output_format(input));
  const int64_t C = x.size(1);
  Tensor mean = at::empty({C}, x.options().dtype(accumulation_dtype(x)));
  Tensor var = at::empty({C}, mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), kStats, [&] {
    using acc_t = acc_type_t<scalar_t>;
    std::vector<double> batch_mean, batch_var;
    batch_statistics<scalar_t>(x, batch_mean, batch_var);
    acc_t* mean_p = mean.mutable_data_ptr<acc_t>();
    acc_t* var_p = var.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      mean_p[c] = static_cast<acc_t>(batch_mean[c]);
      var_p[c] = static_cast<acc_t>(batch_var[c]);
    }
  });
  return {mean, var};
}

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor> forward_impl(
    const Tensor& x, const Affine<acc_type_t<scalar_t>>& affine, const ForwardArgs& a) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const bool empty = x.numel() == 0;
  const bool channels_last = output_format(x) == at::MemoryFormat::ChannelsLast;
  const acc_t eps_acc = static_cast<acc_t>(a.eps);

  // Normalisation sets: 2 for ABRi with running statistics (each BN its own), else 1.
  const int64_t sets = (!a.use_batch_stats && affine.abri()) ? 2 : 1;
  Tensor mean = at::empty({sets, C}, x.options().dtype(accumulation_dtype(x)));
  Tensor invstd = at::empty({sets, C}, mean.options());
  acc_t* mean_p = mean.mutable_data_ptr<acc_t>();
  acc_t* invstd_p = invstd.mutable_data_ptr<acc_t>();

  if (a.use_batch_stats) {
    std::vector<double> batch_mean, batch_var;
    batch_statistics<scalar_t>(x, batch_mean, batch_var);
    std::vector<acc_t> var(C);
    for (int64_t c = 0; c < C; ++c) {
      mean_p[c] = static_cast<acc_t>(batch_mean[c]);
      var[c] = static_cast<acc_t>(batch_var[c]);
      invstd_p[c] = acc_t(1) / std::sqrt(var[c] + eps_acc);
    }
    // r = r * (1 - a.momentum) + batch_stat * a.momentum, with the unbiased variance.
    const int64_t count = N * HW;
    for (const auto& [r_mean, r_var] :
         {std::pair(a.running_mean, a.running_var), std::pair(a.abri_running_mean, a.abri_running_var)}) {
      // An empty batch leaves the running statistics as they are, as nn.BatchNorm2d does.
      if (!r_mean.has_value() || empty) continue;
      TORCH_CHECK_VALUE(count != 1, kForward,
                  ": cannot update running statistics from one value per channel (N*H*W = 1): "
                  "the unbiased variance is undefined");
      const acc_t keep = static_cast<acc_t>(1 - a.momentum);
      const acc_t take = static_cast<acc_t>(a.momentum);
      const acc_t take_var = static_cast<acc_t>(a.momentum * count / (count - 1));
      std::vector<acc_t> m, v;
      read_values(*r_mean, m);
      read_values(*r_var, v);
      for (int64_t c = 0; c < C; ++c) {
        m[c] = m[c] * keep + mean_p[c] * take;
        v[c] = v[c] * keep + var[c] * take_var;
      }
      write_values(*r_mean, m.data());
      write_values(*r_var, v.data());
    }
  } else {
    std::vector<acc_t> m, v;
    read_values(*a.running_mean, m);
    read_values(*a.running_var, v);
    if (sets == 2) {
      read_values(*a.abri_running_mean, m);
      read_values(*a.abri_running_var, v);
    }
    for (int64_t i = 0; i < sets * C; ++i) {
      mean_p[i] = m[i];
      invstd_p[i] = acc_t(1) / std::sqrt(v[i] + eps_acc);
    }
  }

  std::vector<acc_t> scale(C), shift(C);
  affine.fold(mean_p, invstd_p, sets, C, scale.data(), shift.data());

  Tensor y = at::empty_like(x);
  const bool track_dead = a.dead_count.has_value();
  if (!empty) {
    const Geometry g(N, C, HW, channels_last);
    std::unique_ptr<RunCount[]> counts = track_dead ? per_run<RunCount>(g) : nullptr;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const bool stream = stream_output(g, y, 2 * y.nbytes());
    for_runs(g, [&](int64_t begin, int64_t end) {
      kernels<scalar_t>().normalise(g, xp, yp, scale.data(), shift.data(), a.relu,
                                    track_dead ? counts.get() : nullptr, stream, begin, end);
    });
    if (track_dead) add_dead_counts(g, counts.get(), *a.dead_count, *a.dead_sample_count);
  } else if (track_dead && HW == 0) {
    // Every (empty) map of every sample is all <= 0, as torch's .all() over no elements.
    auto dead_samples = a.dead_sample_count->accessor<int64_t, 1>();
    for (int64_t c = 0; c < C; ++c) dead_samples[c] += N;
  }
  if (track_dead) {
    auto seen_a = a.seen->accessor<int64_t, 1>();
    seen_a[0] += N * HW;
    seen_a[1] += N;
  }
  return {y, mean, invstd};
}

ForwardResult batch_norm_fwd_cpu(const ForwardArgs& a) {
  check_input(kForward, "input", a.x);
  const int64_t C = a.x.size(1);
  check_vector(kForward, "weight", a.weight, C);
  check_vector(kForward, "bias", a.bias, C);
  check_vector(kForward, "abri_weight", a.abri_weight, C);
  check_vector(kForward, "abri_bias", a.abri_bias, C);
  check_vector(kForward, "abri_alpha", a.abri_alpha, C, /*allow_single=*/true);
  check_vector(kForward, "running_mean", a.running_mean, C);
  check_vector(kForward, "running_var", a.running_var, C);
  check_vector(kForward, "abri_running_mean", a.abri_running_mean, C);
  check_vector(kForward, "abri_running_var", a.abri_running_var, C);
  check_parameter_dtypes(kForward, a.x,
                         {&a.weight, &a.bias, &a.abri_weight, &a.abri_bias, &a.abri_alpha,
                          &a.running_mean, &a.running_var, &a.abri_running_mean,
                          &a.abri_running_var});
  check_together(kForward, a.running_mean, "running_mean", a.running_var, "running_var");
  check_together(kForward, a.abri_running_mean, "abri_running_mean", a.abri_running_var,
                 "abri_running_var");
  TORCH_CHECK(a.use_batch_stats || a.running_mean.has_value(), kForward,
              ": use_batch_stats=False normalises with running_mean/running_var, which are None");
  TORCH_CHECK(a.use_batch_stats || !a.abri_alpha.has_value() || a.abri_running_mean.has_value(),
              kForward,
              ": ABRi with use_batch_stats=False needs abri_running_mean/abri_running_var, "
              "which are None");
  TORCH_CHECK(a.dead_count.has_value() == a.dead_sample_count.has_value() &&
                  a.dead_count.has_value() == a.seen.has_value(),
              kForward,
              ": dead_count, dead_sample_count and seen must all be given or all be None");
  if (a.dead_count.has_value()) {
    check_counter(a.dead_count, "dead_count", C);
    check_counter(a.dead_sample_count, "dead_sample_count", C);
    check_counter(a.seen, "seen", 2);
  }

  const Tensor x = a.x.contiguous(output_format(a.x));
  std::tuple<Tensor, Tensor, Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), kForward, [&] {
    const Affine<acc_type_t<scalar_t>> affine(a.weight, a.bias, a.abri_weight, a.abri_bias, a.abri_alpha);
    result = forward_impl<scalar_t>(x, affine, a);
  });
  return result;
}

// --- backward ------------------------------------------------------------------------------------

// A parameter's gradient in its dtype and shape; an empty (0,) tensor for an absent parameter.
template <typename acc_t>
Tensor parameter_grad(const OptionalTensor& param, const std::vector<double>& grad,
                      const at::TensorOptions& absent_options) {
  if (!param.has_value()) return at::empty({0}, absent_options);
  Tensor out = at::empty(param->sizes(), param->options());
  // Rounded to the accumulation type first, as the reference computes in it.
  std::vector<acc_t> values(grad.begin(), grad.end());
  write_values(out, values.data());
  return out;
}

// The forward as its backward sees it: the (K, C) statistics and the folded affine.
template <typename acc_t>
struct SavedForward {
  std::vector<acc_t> mean, invstd, scale, shift;
  int64_t sets, channels;

  SavedForward(const Tensor& mean_t, const Tensor& invstd_t, const Affine<acc_t>& affine,
               bool empty_batch)
      : sets(mean_t.size(0)), channels(mean_t.size(1)) {
    read_values(mean_t, mean);
    read_values(invstd_t, invstd);
    // An empty batch sums nothing: its (NaN) batch statistics must not turn the zero sums into
    // NaN parameter gradients (nn.BatchNorm2d gives zeros).
    if (empty_batch) {
      std::fill(mean.begin(), mean.end(), acc_t(0));
      std::fill(invstd.begin(), invstd.end(), acc_t(0));
    }
    scale.resize(channels);
    shift.resize(channels);
    affine.fold(mean.data(), invstd.data(), sets, channels, scale.data(), shift.data());
  }

  GradCoefficients<acc_t> coefficients() const {
    return {scale.data(), shift.data(), mean.data(), scale.data(), nullptr, nullptr};
  }
};

// Runs pass(begin, end, run_dy, run_dy_xc) over the runs of g, which writes per-run sums of dy'
// and dy' * (x - mean[0]), and merges them in run order into sum_dy and sum_dy_xc.
template <typename Pass>
void summed_runs(const Geometry& g, const Pass& pass, std::vector<double>& sum_dy,
                 std::vector<double>& sum_dy_xc) {
  auto run_dy = per_run<double>(g), run_dy_xc = per_run<double>(g);
  for_runs(g, [&](int64_t begin, int64_t end) {
    pass(begin, end, run_dy.get(), run_dy_xc.get());
  });
  merge_sums(g, run_dy.get(), sum_dy);
  merge_sums(g, run_dy_xc.get(), sum_dy_xc);
}

// Batch statistics: sum_dy = sum(dy'), sum_dy_xc = sum(dy' * (x - mean[0])) over the batch, dy'
// the ReLU-masked dy.
template <typename scalar_t>
void batch_grad_sums(const Tensor& dy, const Tensor& x, const SavedForward<acc_type_t<scalar_t>>& saved,
                     bool relu, std::vector<double>& sum_dy, std::vector<double>& sum_dy_xc) {
  sum_dy.assign(saved.channels, 0.0);
  sum_dy_xc.assign(saved.channels, 0.0);
  if (x.numel() == 0) return;
  const Geometry g = sample_spanning_geometry(x);
  const auto coef = saved.coefficients();
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  summed_runs(g, [&](int64_t begin, int64_t end, double* run_dy, double* run_dy_xc) {
    kernels<scalar_t>().grad_sums(g, dyp, xp, coef, relu, begin, end, run_dy, run_dy_xc);
  }, sum_dy, sum_dy_xc);
}

// Batch statistics: grad_x = scale * (dy' - mean_dy - xhat * mean_dy_xhat), from the per-channel
// means of dy' and dy' * xhat over the batch (the global batch for synchronised BN).
template <typename scalar_t>
Tensor batch_stats_grad_input(const Tensor& dy, const Tensor& x,
                              const SavedForward<acc_type_t<scalar_t>>& saved, bool relu,
                              const std::vector<double>& mean_dy,
                              const std::vector<double>& mean_dy_xhat) {
  using acc_t = acc_type_t<scalar_t>;
  Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  const int64_t C = saved.channels;
  std::vector<acc_t> coef_xc(C), coef_const(C);
  for (int64_t c = 0; c < C; ++c) {
    coef_xc[c] = static_cast<acc_t>(-double(saved.scale[c]) * saved.invstd[c] * mean_dy_xhat[c]);
    coef_const[c] = static_cast<acc_t>(-double(saved.scale[c]) * mean_dy[c]);
  }
  GradCoefficients<acc_t> coef = saved.coefficients();
  coef.coef_xc = coef_xc.data();
  coef.coef_const = coef_const.data();
  const Geometry g = sample_spanning_geometry(x);
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const bool stream = stream_output(g, dx, 3 * dx.nbytes());
  for_runs(g, [&](int64_t begin, int64_t end) {
    kernels<scalar_t>().grad_input(g, dyp, xp, dxp, coef, relu, /*batch_stats=*/true, stream,
                                   begin, end, nullptr, nullptr);
  });
  return dx;
}

// Running statistics: grad_x = dy' * scale and the two sums, in one pass.
template <typename scalar_t>
Tensor running_stats_grad_input(const Tensor& dy, const Tensor& x,
                                const SavedForward<acc_type_t<scalar_t>>& saved, bool relu,
                                std::vector<double>& sum_dy, std::vector<double>& sum_dy_xc) {
  Tensor dx = at::empty_like(x);
  sum_dy.assign(saved.channels, 0.0);
  sum_dy_xc.assign(saved.channels, 0.0);
  if (x.numel() == 0) return dx;
  const Geometry g = sample_spanning_geometry(x);
  const auto coef = saved.coefficients();
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const bool stream = stream_output(g, dx, 3 * dx.nbytes());
  summed_runs(g, [&](int64_t begin, int64_t end, double* run_dy, double* run_dy_xc) {
    kernels<scalar_t>().grad_input(g, dyp, xp, dxp, coef, relu, /*batch_stats=*/false, stream,
                                   begin, end, run_dy, run_dy_xc);
  }, sum_dy, sum_dy_xc);
  return dx;
}

using ParameterGrads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// The affine parameters' gradients from sum_dy and sum_dy_xc (see batch_grad_sums).
template <typename acc_t>
ParameterGrads parameter_grads(const Affine<acc_t>& affine, const BackwardArgs& a,
                               const SavedForward<acc_t>& saved,
                               const std::vector<double>& sum_dy,
                               const std::vector<double>& sum_dy_xc) {
  const int64_t C = saved.channels, last = (saved.sets - 1) * C;
  const auto& mean = saved.mean;
  const auto& invstd = saved.invstd;
  // sum(dy' * xhat_k) for the first and the last normalisation row:
  // sum(dy' * (x - mean_k)) = sum_dy_xc + (mean_0 - mean_k) * sum_dy.
  std::vector<double> s2(C), abri_s2(C);
  for (int64_t c = 0; c < C; ++c) {
    s2[c] = sum_dy_xc[c] * invstd[c];
    abri_s2[c] = (sum_dy_xc[c] + (double(mean[c]) - mean[last + c]) * sum_dy[c]) * invstd[last + c];
  }
  const at::TensorOptions absent = a.x.options().dtype(accumulation_dtype(a.x));
  if (!affine.abri()) {
    return {parameter_grad<acc_t>(a.weight, s2, absent),
            parameter_grad<acc_t>(a.bias, sum_dy, absent),
            at::empty({0}, absent),
            at::empty({0}, absent),
            at::empty({0}, absent)};
  }
  // ABRi (docs/DESIGN.md, "ABRi as one BatchNorm"): dg1 = a*S2, db1 = a*S1, dg2 = (1-a)*S2', db2 = (1-a)*S1,
  // da = (g1*S2 + b1*S1) - (g2*S2' + b2*S1), summed over channels for a layer-wise alpha.
  std::vector<double> g_w(C), g_b(C), g_aw(C), g_ab(C), g_alpha(C);
  const auto value_or_one = [](const std::vector<acc_t>& v, int64_t c) {
    return v.empty() ? 1.0 : double(v[c]);
  };
  const auto value_or_zero = [](const std::vector<acc_t>& v, int64_t c) {
    return v.empty() ? 0.0 : double(v[c]);
  };
  for (int64_t c = 0; c < C; ++c) {
    const double alpha = affine.alpha_at(c);
    g_w[c] = alpha * s2[c];
    g_b[c] = alpha * sum_dy[c];
    g_aw[c] = (1 - alpha) * abri_s2[c];
    g_ab[c] = (1 - alpha) * sum_dy[c];
    g_alpha[c] =
        (s2[c] * value_or_one(affine.weight, c) + sum_dy[c] * value_or_zero(affine.bias, c)) -
                 (abri_s2[c] * value_or_one(affine.abri_weight, c) +
                  sum_dy[c] * value_or_zero(affine.abri_bias, c));
  }
  if (affine.alpha.size() == 1) {
    double total = 0;
    for (int64_t c = 0; c < C; ++c) total += g_alpha[c];
    g_alpha.assign(1, total);
  }
  return {parameter_grad<acc_t>(a.weight, g_w, absent),
          parameter_grad<acc_t>(a.bias, g_b, absent),
          parameter_grad<acc_t>(a.abri_weight, g_aw, absent),
          parameter_grad<acc_t>(a.abri_bias, g_ab, absent),
          parameter_grad<acc_t>(a.abri_alpha, g_alpha, absent)};
}

template <typename scalar_t>
BackwardResult backward_impl(const Tensor& dy, const Tensor& x,
                             const Affine<acc_type_t<scalar_t>>& affine, const BackwardArgs& a) {
  const SavedForward<acc_type_t<scalar_t>> saved(a.mean, a.invstd, affine, x.numel() == 0);
  std::vector<double> sum_dy, sum_dy_xc;
  Tensor dx;
  if (a.use_batch_stats) {
    batch_grad_sums<scalar_t>(dy, x, saved, a.relu, sum_dy, sum_dy_xc);
    const double count = static_cast<double>(x.numel() / x.size(1));
    std::vector<double> mean_dy(saved.channels), mean_dy_xhat(saved.channels);
    for (int64_t c = 0; c < saved.channels; ++c) {
      mean_dy[c] = sum_dy[c] / count;
      mean_dy_xhat[c] = sum_dy_xc[c] * saved.invstd[c] / count;
    }
    dx = batch_stats_grad_input<scalar_t>(dy, x, saved, a.relu, mean_dy, mean_dy_xhat);
  } else {
    dx = running_stats_grad_input<scalar_t>(dy, x, saved, a.relu, sum_dy, sum_dy_xc);
  }
  return std::tuple_cat(std::make_tuple(dx),
                        parameter_grads(affine, a, saved, sum_dy, sum_dy_xc));
}

// The checks of batch_norm_bwd (and of its reduce and elementwise parts, `op`).
void check_backward(const char* op, const BackwardArgs& a) {
  check_input(op, "input", a.x);
  check_input(op, "grad_y", a.grad_y);
  TORCH_CHECK(a.grad_y.sizes() == a.x.sizes(), op, ": grad_y must have the input's shape ",
              a.x.sizes(), ", got ", a.grad_y.sizes());
  const int64_t C = a.x.size(1);
  check_vector(op, "weight", a.weight, C);
  check_vector(op, "bias", a.bias, C);
  check_vector(op, "abri_weight", a.abri_weight, C);
  check_vector(op, "abri_bias", a.abri_bias, C);
  check_vector(op, "abri_alpha", a.abri_alpha, C, /*allow_single=*/true);
  const at::ScalarType acc = accumulation_dtype(a.x);
  // Batch statistics (the reduce and elementwise parts) have one row; running ones K = 1 or 2.
  const int64_t max_rows = a.use_batch_stats ? 1 : 2;
  for (const auto& [t, name] : {std::pair(&a.mean, "mean"), std::pair(&a.invstd, "invstd")}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ",
                t->device());
    TORCH_CHECK(t->dim() == 2 && t->size(0) >= 1 && t->size(0) <= max_rows && t->size(1) == C,
                op, ": ", name, " must have shape (K, C) with K = 1", (max_rows == 2 ? " or 2" : ""),
                " and C = ", C, ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == acc, op, ": ", name, " must have the accumulation dtype ",
                acc, " of a ", a.x.scalar_type(), " input, got ", t->scalar_type());
  }
  TORCH_CHECK(a.mean.sizes() == a.invstd.sizes(), op,
              ": mean and invstd must have the same shape, got ",
              a.mean.sizes(), " and ", a.invstd.sizes());
}

// Runs body(scalar_t(), dy, x, affine) on x and grad_y in x's layout (dtypes already checked).
template <typename Body>
auto dispatch_backward(const BackwardArgs& a, const Body& body) {
  const at::MemoryFormat format = output_format(a.x);
  const Tensor x = a.x.contiguous(format);
  // An expanded (stride-0) or differently laid out gradient is materialised in x's layout.
  const Tensor dy = a.grad_y.to(x.scalar_type()).contiguous(format);
  decltype(body(at::Half(), dy, x, Affine<float>(a.weight, a.bias, a.abri_weight, a.abri_bias,
                                                 a.abri_alpha))) result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), kBackward, [&] {
    const Affine<acc_type_t<scalar_t>> affine(a.weight, a.bias, a.abri_weight, a.abri_bias,
                                              a.abri_alpha);
    result = body(scalar_t(), dy, x, affine);
  });
  return result;
}

BackwardResult batch_norm_bwd_cpu(const BackwardArgs& a) {
  check_backward(kBackward, a);
  return dispatch_backward(a, [&](auto tag, const Tensor& dy, const Tensor& x,
                                             const auto& affine) {
    return backward_impl<decltype(tag)>(dy, x, affine, a);
  });
}

// batch_norm_bwd_reduce: (sums, parameter gradients) of the batch-statistics backward, sums =
// [S1 = sum(dy'), S2 = sum(dy' * xhat)] as (2, C) in the accumulation dtype.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> batch_norm_bwd_reduce_cpu(
    const Tensor& grad_y, const Tensor& input, const OptionalTensor& weight,
    const OptionalTensor& bias, const OptionalTensor& abri_weight, const OptionalTensor& abri_bias,
    const OptionalTensor& abri_alpha, const Tensor& mean, const Tensor& invstd, bool relu) {
  const BackwardArgs a{grad_y, input, weight, bias, abri_weight, abri_bias, abri_alpha,
                       mean, invstd, /*use_batch_stats=*/true, relu};
  check_backward(kBackwardReduce, a);
  return dispatch_backward(a, [&](auto tag, const Tensor& dy, const Tensor& x,
                                                   const auto& affine) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type_t<scalar_t>;
    const SavedForward<acc_t> saved(a.mean, a.invstd, affine, x.numel() == 0);
    std::vector<double> sum_dy, sum_dy_xc;
    batch_grad_sums<scalar_t>(dy, x, saved, relu, sum_dy, sum_dy_xc);
    const int64_t C = saved.channels;
    Tensor sums = at::empty({2, C}, x.options().dtype(accumulation_dtype(x)));
    acc_t* sums_p = sums.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      sums_p[c] = static_cast<acc_t>(sum_dy[c]);
      sums_p[C + c] = static_cast<acc_t>(sum_dy_xc[c] * saved.invstd[c]);
    }
    return std::tuple_cat(std::make_tuple(sums),
                          parameter_grads(affine, a, saved, sum_dy, sum_dy_xc));
  });
}

// batch_norm_bwd_elemt: the batch-statistics grad_x from grad_means = [S1 / M, S2 / M], (2, C)
// per-channel means over the (global) batch of M elements per channel.
Tensor batch_norm_bwd_elemt_cpu(const Tensor& grad_y, const Tensor& input,
                                const OptionalTensor& weight, const OptionalTensor& bias,
                                const OptionalTensor& abri_weight, const OptionalTensor& abri_bias,
                                const OptionalTensor& abri_alpha, const Tensor& mean,
                                const Tensor& invstd, const Tensor& grad_means, bool relu) {
  const BackwardArgs a{grad_y, input, weight, bias, abri_weight, abri_bias, abri_alpha,
                       mean, invstd, /*use_batch_stats=*/true, relu};
  check_backward(kBackwardElemt, a);
  const int64_t C = input.size(1);
  TORCH_CHECK(grad_means.device().is_cpu() && grad_means.dim() == 2 && grad_means.size(0) == 2 &&
                  grad_means.size(1) == C && grad_means.scalar_type() == mean.scalar_type(),
              kBackwardElemt, ": grad_means must be a (2, C) CPU tensor of mean's dtype ",
              mean.scalar_type(), " with C = ", C, ", got ", grad_means.sizes(), " ",
              grad_means.scalar_type(), " on ", grad_means.device());
  return dispatch_backward(a, [&](auto tag, const Tensor& dy, const Tensor& x,
                                                  const auto& affine) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type_t<scalar_t>;
    const SavedForward<acc_t> saved(a.mean, a.invstd, affine, x.numel() == 0);
    std::vector<acc_t> means;
    read_values(grad_means, means);
    const std::vector<double> mean_dy(means.begin(), means.begin() + C);
    const std::vector<double> mean_dy_xhat(means.begin() + C, means.end());
    return batch_stats_grad_input<scalar_t>(dy, x, saved, relu, mean_dy, mean_dy_xhat);
  });
}

}  // namespace
}  // namespace avkernels::bn

TORCH_LIBRARY_IMPL(avkernels, CPU, m) {
  using namespace avkernels::bn;
  m.impl("batch_norm_fwd", &Positional<ForwardSignature, ForwardArgs, batch_norm_fwd_cpu>::call);
  m.impl("batch_norm_bwd",
         &Positional<BackwardSignature, BackwardArgs, batch_norm_bwd_cpu>::call);
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("batch_norm_bwd_reduce", &batch_norm_bwd_reduce_cpu);
  m.impl("batch_norm_bwd_elemt", &batch_norm_bwd_elemt_cpu);
}
