// How the batch-norm kernels walk an (N, C, H, W) tensor, and the table of kernel entry points
// that each instruction-set build of batch_norm_isa_kernels.h provides.
//
// The tensor is cut into runs, contiguous pieces of memory taken in memory order. Every
// reduction produces one partial result per run (and channel); partials are merged in run
// order, so results do not depend on how the runs are shared among threads.

#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace avkernels::bn {

// Per-run count of non-positive outputs (a run never covers 2^31 values).
using RunCount = int32_t;

// Accumulation type: float64 for float64 input, float32 for every other floating dtype.
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Run sizes. Data: at most kRunElements (128 KiB of float32), as the statistics kernel reads a
// run twice, the second time from L2 (larger runs mean fewer per-run results to merge).
// Accuracy: float32 sums are exact to about (values added per accumulator lane) * 2^-24 before
// their float64 merge, so a lane adds at most kLaneValues values: runs of a plane are at most
// kLaneValues * kPlaneLanes long (the span kernels keep 2 vectors of 16 lanes), runs of rows
// at most kLaneValues rows (each channel has its own lane).
constexpr int64_t kRunElements = 32768;
constexpr int64_t kLaneValues = 256;
constexpr int64_t kPlaneLanes = 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A run covers the positions [position_begin, position_end) of one sample, for one channel
// (planes: NCHW, element (n, c, s) at (n*C + c)*HW + s) or for all channels (rows:
// channels_last, element (n, c, s) at (n*HW + s)*C + c). Runs are numbered in memory order;
// `part` numbers the position ranges of one plane or sample.
struct Run {
  int64_t sample = 0, channel = 0, part = 0;  // channel is 0 for rows (all channels)
  int64_t position_begin = 0, position_end = 0;

  int64_t positions() const { return position_end - position_begin; }
};

struct Geometry {
  int64_t batch, channels, spatial;  // N, C, H*W, all >= 1
  bool rows;           // channels_last storage (or H*W == 1, where both layouts coincide)
  int64_t parts = 1;     // position ranges per plane (planes) or per sample (rows)
  int64_t part_len = 0;  // positions per range
  int64_t num_runs = 0;

  Geometry(int64_t batch_, int64_t channels_, int64_t spatial_, bool channels_last)
      : batch(batch_),
        channels(channels_),
        spatial(spatial_),
        rows(channels_last || spatial_ == 1) {
    const int64_t max_positions =
        rows ? std::clamp<int64_t>(kRunElements / channels, 1, kLaneValues)
             : kLaneValues * kPlaneLanes;
    parts = ceil_div(spatial, max_positions);
    part_len = ceil_div(spatial, parts);  // balanced
    parts = ceil_div(spatial, part_len);
    num_runs = (rows ? batch : batch * channels) * parts;
  }

  // The geometry for kernels that need no per-sample results (the reductions and grad_x): in
  // channels_last the N*H*W rows of all samples are one sequence, so a run may span samples:
  // fewer per-run results to write and merge serially where a sample holds few rows (measured:
  // the serial merges were about 8% of a (32, 512, 7, 7) op-level forward + backward with one
  // run per sample; spanning samples takes its runs from 32 to 25).
  static Geometry spanning_samples(int64_t batch, int64_t channels, int64_t spatial,
                                   bool channels_last) {
    if (channels_last || spatial == 1) return Geometry(1, channels, batch * spatial, true);
    return Geometry(batch, channels, spatial, false);
  }

  int64_t channels_per_run() const { return rows ? channels : 1; }
  int64_t max_run_elements() const { return part_len * channels_per_run(); }

  Run run(int64_t r) const {
    Run k;
    k.part = r % parts;
    const int64_t unit = r / parts;  // the sample (rows) or the plane (planes)
    k.sample = rows ? unit : unit / channels;
    k.channel = rows ? 0 : unit % channels;
    set_positions(k);
    return k;
  }
  // Moves k to the next run without divisions.
  void next(Run& k) const {
    if (++k.part == parts) {
      k.part = 0;
      if (rows || ++k.channel == channels) {
        k.channel = 0;
        ++k.sample;
      }
    }
    set_positions(k);
  }
  void set_positions(Run& k) const {
    k.position_begin = k.part * part_len;
    k.position_end = std::min(spatial, k.position_begin + part_len);
  }

  // Offset of the run's first element and its number of elements.
  int64_t offset(const Run& k) const {
    return rows ? (k.sample * spatial + k.position_begin) * channels
                : (k.sample * channels + k.channel) * spatial + k.position_begin;
  }
  int64_t elements(const Run& k) const { return k.positions() * channels_per_run(); }

  // Per-run results: one per run (planes) or one per run and channel (rows), in memory order.
  int64_t num_values() const { return num_runs * channels_per_run(); }
  int64_t value_index(int64_t r, int64_t c) const { return rows ? r * channels + c : r; }
  // The same index, from the run's sample and part.
  int64_t result_index(int64_t n, int64_t part, int64_t c) const {
    return rows ? (n * parts + part) * channels + c : (n * channels + c) * parts + part;
  }
  int64_t part_positions(int64_t part) const {
    return std::min(spatial, (part + 1) * part_len) - part * part_len;
  }
  int64_t first_channel(const Run& k) const { return rows ? 0 : k.channel; }
  int64_t end_channel(const Run& k) const { return rows ? channels : k.channel + 1; }

  // Whether every run, and every chunk a kernel cuts from it, is a whole number of `bytes`-sized
  // blocks from the tensor's start, for elements of element_size bytes.
  bool runs_in_blocks(int64_t element_size, int64_t bytes) const {
    const auto whole = [&](int64_t elements) { return elements * element_size % bytes == 0; };
    return rows ? whole(channels) : whole(spatial) && whole(part_len);
  }

  // Fewest runs worth handing to a thread (about 32768 elements, ATen's own grain size).
  int64_t grain() const { return std::max<int64_t>(1, 32768 / max_run_elements()); }
};

// Per-channel inputs of the backward kernels (each points at C accumulation-type values).
// The pre-activation output is x * scale + shift; the input gradient is
//   grad_x = coef_dy * dy' + coef_xc * (x - mean) + coef_const     (batch statistics)
//   grad_x = coef_dy * dy'                                           (running statistics)
// where dy' is dy with the fused ReLU's mask applied.
template <typename acc_t>
struct GradCoefficients {
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* mean;
  const acc_t* coef_dy;
  const acc_t* coef_xc;     // batch statistics only
  const acc_t* coef_const;  // batch statistics only
};

// Kernel entry points for one input dtype; each processes the runs [begin, end) and writes
// per-run results at Geometry::value_index.
template <typename scalar_t>
struct KernelTable {
  using acc_t = acc_type_t<scalar_t>;
  // Mean and sum of squared deviations of x.
  void (*batch_stats)(const Geometry& g, const scalar_t* x, int64_t begin, int64_t end,
                      double* run_mean, double* run_m2);
  // y = act(x * scale + shift); unless counts is null, counts = #(x * scale + shift <= 0).
  // stream: store y with non-temporal stores (float32/float64; y satisfies streams_output).
  void (*normalise)(const Geometry& g, const scalar_t* x, scalar_t* y, const acc_t* scale,
                    const acc_t* shift, bool relu, RunCount* counts, bool stream, int64_t begin,
                    int64_t end);
  // sum(dy') and sum(dy' * (x - mean)).
  void (*grad_sums)(const Geometry& g, const scalar_t* dy, const scalar_t* x,
                    const GradCoefficients<acc_t>& coef, bool relu, int64_t begin, int64_t end,
                    double* run_sum_dy, double* run_sum_dy_xc);
  // grad_x; with running statistics also grad_sums' results, from the same pass. stream: as in
  // normalise, for dx.
  void (*grad_input)(const Geometry& g, const scalar_t* dy, const scalar_t* x, scalar_t* dx,
                     const GradCoefficients<acc_t>& coef, bool relu, bool batch_stats,
                     bool stream, int64_t begin, int64_t end, double* run_sum_dy,
                     double* run_sum_dy_xc);
};

}  // namespace avkernels::bn
