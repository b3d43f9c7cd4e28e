// CPU kernels of the FusT masking ops: zero_masked_patches, masked_concat and
// masked_concat_backward (schemas and reference in avkernels/ops/masking/).
//
// The mask is the one defined in avkernels/ops/masking/reference.py, bit for bit: lowbias32 round keys
// from each row's int64 seed, a key per group that is a bijection of the group index (so keys
// never tie), and the k = floor(min(max(r, 0) * P, P)) groups with the smallest keys masked.
// Here the k-th smallest key comes from std::nth_element; any exact selection finds the same set.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace avkernels::masking {
namespace {

// --- the mask ----------------------------------------------------------------------------------

constexpr uint32_t kSeedMix = 0x9E3779B9u;
constexpr uint32_t kRoundMix = 0x85EBCA6Bu;

// lowbias32 (C. Wellons' hash-prospector): a bijection of 32-bit integers.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The keys of one row's groups.
struct GroupKeys {
  uint32_t k0, k1;

  explicit GroupKeys(int64_t seed) {
    const auto bits = static_cast<uint64_t>(seed);
    const auto low = static_cast<uint32_t>(bits), high = static_cast<uint32_t>(bits >> 32);
    k0 = mix32(low ^ mix32(high ^ kSeedMix));
    k1 = mix32(k0 ^ kRoundMix);
  }

  uint32_t operator()(int64_t group) const {
    return mix32(mix32(static_cast<uint32_t>(group) ^ k0) ^ k1);
  }
};

// floor(min(max(ratio, 0) * P, P)); NaN counts as 0.
inline int64_t masked_count(double ratio, int64_t num_groups) {
  const double positive = ratio > 0 ? ratio : 0.0;
  return static_cast<int64_t>(std::min(positive * static_cast<double>(num_groups),
                                       static_cast<double>(num_groups)));
}

// --- parallel split ------------------------------------------------------------------------------

// Work (in element copies) a parallel task gets at least: it must pay for waking a thread, which
// on a loaded machine can take milliseconds. Rows that mask nothing cost next to nothing.
constexpr int64_t kTaskWork = int64_t{1} << 22;
// Selecting a row's masked groups (hash + nth_element) costs about this many copies per group.
constexpr int64_t kSelectionWorkPerGroup = 16;

inline int64_t masking_work(double ratio, int64_t num_groups, int64_t row_elements) {
  const int64_t count = masked_count(ratio, num_groups);
  return count == 0 ? 0 : kSelectionWorkPerGroup * num_groups + row_elements * count / num_groups;
}

// Items per parallel task so that each task gets about kTaskWork of total_work.
inline int64_t grain_for(int64_t items, int64_t total_work) {
  const int64_t tasks = std::clamp<int64_t>(total_work / kTaskWork, 1, std::max<int64_t>(items, 1));
  return (items + tasks - 1) / tasks;
}

// Reusable per-thread buffers of select_masked_groups.
struct Selection {
  std::vector<uint32_t> keys, scratch;
  std::vector<uint8_t> masked;  // masked[g] != 0: group g is masked
};

// Fills selection.masked for a row; returns the number of masked groups (0: nothing filled).
int64_t select_masked_groups(int64_t seed, double ratio, int64_t num_groups, Selection& selection) {
  const int64_t count = masked_count(ratio, num_groups);
  if (count == 0) return 0;
  const GroupKeys key(seed);
  selection.keys.resize(num_groups);
  for (int64_t g = 0; g < num_groups; ++g) selection.keys[g] = key(g);
  uint32_t kth = std::numeric_limits<uint32_t>::max();
  if (count < num_groups) {
    selection.scratch = selection.keys;
    std::nth_element(selection.scratch.begin(), selection.scratch.begin() + (count - 1),
                     selection.scratch.end());
    kth = selection.scratch[count - 1];
  }
  selection.masked.resize(num_groups);
  for (int64_t g = 0; g < num_groups; ++g) selection.masked[g] = selection.keys[g] <= kth;
  return count;
}

// --- patches: zero in place --------------------------------------------------------------------

struct PatchGeometry {
  int64_t channels, frames, height, width;
  int64_t stride_b, stride_c, stride_t, stride_h, stride_w;
  int64_t patch_h, patch_w, grid_h, grid_w;
};

template <typename scalar_t>
inline void zero_run(scalar_t* start, int64_t length, int64_t stride) {
  if (stride == 1) {
    std::fill_n(start, length, scalar_t(0));
  } else {
    for (int64_t i = 0; i < length; ++i) start[i * stride] = scalar_t(0);
  }
}

// Zeroes the masked patches of one frame (all channels), walking memory in order.
template <typename scalar_t>
void zero_frame_patches(scalar_t* frame, const PatchGeometry& g, const uint8_t* masked) {
  for (int64_t c = 0; c < g.channels; ++c) {
    for (int64_t patch_row = 0; patch_row < g.grid_h; ++patch_row) {
      const uint8_t* row_masked = masked + patch_row * g.grid_w;
      if (std::none_of(row_masked, row_masked + g.grid_w, [](uint8_t m) { return m != 0; })) {
        continue;
      }
      for (int64_t h = patch_row * g.patch_h; h < (patch_row + 1) * g.patch_h; ++h) {
        scalar_t* line = frame + c * g.stride_c + h * g.stride_h;
        for (int64_t j = 0; j < g.grid_w; ++j) {
          if (row_masked[j]) zero_run(line + j * g.patch_w * g.stride_w, g.patch_w, g.stride_w);
        }
      }
    }
  }
}

void zero_masked_patches_cpu(const at::Tensor& x, const at::Tensor& ratio, const at::Tensor& seeds,
                             int64_t patch_h, int64_t patch_w) {
  TORCH_CHECK(x.dim() == 5, "zero_masked_patches: x must be (B, C, T, H, W), got ", x.sizes());
  TORCH_CHECK(patch_h > 0 && patch_w > 0, "zero_masked_patches: patch sizes must be positive");
  const int64_t batch = x.size(0), frames = x.size(2);
  TORCH_CHECK(ratio.scalar_type() == at::kDouble && ratio.dim() == 1 && ratio.size(0) == batch,
              "zero_masked_patches: ratio must be float64 of shape (B,) = (", batch, "), got ",
              ratio.scalar_type(), " ", ratio.sizes());
  TORCH_CHECK(seeds.scalar_type() == at::kLong && seeds.dim() == 2 && seeds.size(0) == batch &&
                  seeds.size(1) == frames,
              "zero_masked_patches: seeds must be int64 of shape (B, T) = (", batch, ", ", frames,
              "), got ", seeds.scalar_type(), " ", seeds.sizes());
  const PatchGeometry g{x.size(1),   frames,      x.size(3),   x.size(4),   x.stride(0),
                        x.stride(1), x.stride(2), x.stride(3), x.stride(4), patch_h,
                        patch_w,     x.size(3) / patch_h,      x.size(4) / patch_w};
  const int64_t num_groups = g.grid_h * g.grid_w;
  if (x.numel() == 0 || num_groups == 0) return;
  const auto ratio_c = ratio.contiguous();
  const auto seeds_c = seeds.contiguous();
  const double* ratios = ratio_c.data_ptr<double>();
  const int64_t* seed_values = seeds_c.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "zero_masked_patches",
                                  [&] {
    scalar_t* data = x.data_ptr<scalar_t>();
    int64_t work = 0;
    for (int64_t b = 0; b < batch; ++b) {
      work += frames * masking_work(ratios[b], num_groups, g.channels * g.height * g.width);
    }
    at::parallel_for(0, batch * frames, grain_for(batch * frames, work), [&](int64_t begin,
                                                                             int64_t end) {
      Selection selection;
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / frames, t = row % frames;
        if (select_masked_groups(seed_values[row], ratios[b], num_groups, selection) == 0) {
          continue;  // ratio 0: the frame is left untouched
        }
        zero_frame_patches(data + b * g.stride_b + t * g.stride_t, g, selection.masked.data());
      }
    });
  });
}

// --- fusion: masked copy of feature rows -------------------------------------------------------

// One modality's rows: dst[b] = mask_b * src[b], features contiguous in both.
template <typename scalar_t>
struct FeatureRows {
  const scalar_t* src;
  scalar_t* dst;
  int64_t src_stride, dst_stride, features, group;
  const double* ratios;  // nullptr: not masked
};

template <typename scalar_t>
void masked_copy_row(const FeatureRows<scalar_t>& rows, int64_t row, int64_t seed,
                     Selection& selection) {
  const scalar_t* src = rows.src + row * rows.src_stride;
  scalar_t* dst = rows.dst + row * rows.dst_stride;
  const int64_t num_groups = rows.features / rows.group;
  if (rows.ratios == nullptr ||
      select_masked_groups(seed, rows.ratios[row], num_groups, selection) == 0) {
    std::memcpy(dst, src, rows.features * sizeof(scalar_t));
    return;
  }
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t offset = g * rows.group;
    if (selection.masked[g]) {
      std::fill_n(dst + offset, rows.group, scalar_t(0));
    } else {
      std::memcpy(dst + offset, src + offset, rows.group * sizeof(scalar_t));
    }
  }
  const int64_t tail = num_groups * rows.group;
  std::memcpy(dst + tail, src + tail, (rows.features - tail) * sizeof(scalar_t));
}

// Both modalities: (row, modality) pairs in parallel; seeds (B, 2) contiguous.
template <typename scalar_t>
void masked_copy_pair(const FeatureRows<scalar_t>& a, const FeatureRows<scalar_t>& v,
                      const int64_t* seeds, int64_t batch) {
  int64_t work = batch * (a.features + v.features);  // the copy
  for (int64_t b = 0; b < batch; ++b) {
    for (const FeatureRows<scalar_t>* rows : {&a, &v}) {
      if (rows->ratios != nullptr) {
        work += masking_work(rows->ratios[b], rows->features / rows->group, rows->features);
      }
    }
  }
  at::parallel_for(0, 2 * batch, grain_for(2 * batch, work), [&](int64_t begin, int64_t end) {
    Selection selection;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / 2, modality = item % 2;
      masked_copy_row(modality == 0 ? a : v, row, seeds[item], selection);
    }
  });
}

const double* optional_ratios(const std::optional<at::Tensor>& ratio, int64_t batch,
                              std::optional<at::Tensor>& keep_alive) {
  if (!ratio.has_value()) return nullptr;
  TORCH_CHECK(ratio->scalar_type() == at::kDouble && ratio->dim() == 1 && ratio->size(0) == batch,
              "masked_concat: ratios must be float64 of shape (B,) = (", batch, "), got ",
              ratio->scalar_type(), " ", ratio->sizes());
  keep_alive = ratio->contiguous();
  return keep_alive->data_ptr<double>();
}

at::Tensor checked_seeds(const at::Tensor& seeds, int64_t batch) {
  TORCH_CHECK(seeds.scalar_type() == at::kLong && seeds.dim() == 2 && seeds.size(0) == batch &&
                  seeds.size(1) == 2,
              "masked_concat: seeds must be int64 of shape (B, 2) = (", batch, ", 2), got ",
              seeds.scalar_type(), " ", seeds.sizes());
  return seeds.contiguous();
}

at::Tensor masked_concat_cpu(const at::Tensor& a, const at::Tensor& v,
                             const std::optional<at::Tensor>& ratio_a,
                             const std::optional<at::Tensor>& ratio_v, const at::Tensor& seeds,
                             int64_t group_a, int64_t group_v) {
  TORCH_CHECK(a.dim() == 2 && v.dim() == 2 && a.size(0) == v.size(0),
              "masked_concat: a and v must be (B, Fa) and (B, Fv), got ", a.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(a.scalar_type() == v.scalar_type(), "masked_concat: a and v must share a dtype");
  TORCH_CHECK(group_a > 0 && group_v > 0, "masked_concat: group sizes must be positive");
  const int64_t batch = a.size(0), features_a = a.size(1);
  const auto a_c = a.contiguous(), v_c = v.contiguous(), seeds_c = checked_seeds(seeds, batch);
  std::optional<at::Tensor> ratio_a_c, ratio_v_c;
  const double* ratios_a = optional_ratios(ratio_a, batch, ratio_a_c);
  const double* ratios_v = optional_ratios(ratio_v, batch, ratio_v_c);
  auto out = at::empty({batch, features_a + v.size(1)}, a.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "masked_concat", [&] {
    scalar_t* out_data = out.data_ptr<scalar_t>();
    const int64_t stride = out.size(1);
    const FeatureRows<scalar_t> rows_a{a_c.data_ptr<scalar_t>(), out_data, features_a, stride,
                                       features_a, group_a, ratios_a};
    const FeatureRows<scalar_t> rows_v{v_c.data_ptr<scalar_t>(), out_data + features_a, v.size(1),
                                       stride, v.size(1), group_v, ratios_v};
    masked_copy_pair(rows_a, rows_v, seeds_c.data_ptr<int64_t>(), batch);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> masked_concat_backward_cpu(
    const at::Tensor& grad, const std::optional<at::Tensor>& ratio_a,
    const std::optional<at::Tensor>& ratio_v, const at::Tensor& seeds, int64_t features_a,
    int64_t group_a, int64_t group_v) {
  TORCH_CHECK(grad.dim() == 2 && features_a >= 0 && features_a <= grad.size(1),
              "masked_concat_backward: grad must be (B, Fa + Fv) with Fa = ", features_a,
              ", got ", grad.sizes());
  TORCH_CHECK(group_a > 0 && group_v > 0, "masked_concat_backward: group sizes must be positive");
  const int64_t batch = grad.size(0), features = grad.size(1), features_v = features - features_a;
  const auto grad_c = grad.contiguous(), seeds_c = checked_seeds(seeds, batch);
  std::optional<at::Tensor> ratio_a_c, ratio_v_c;
  const double* ratios_a = optional_ratios(ratio_a, batch, ratio_a_c);
  const double* ratios_v = optional_ratios(ratio_v, batch, ratio_v_c);
  auto grad_a = at::empty({batch, features_a}, grad.options());
  auto grad_v = at::empty({batch, features_v}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "masked_concat_backward", [&] {
    const scalar_t* src = grad_c.data_ptr<scalar_t>();
    const FeatureRows<scalar_t> rows_a{src, grad_a.data_ptr<scalar_t>(), features, features_a,
                                       features_a, group_a, ratios_a};
    const FeatureRows<scalar_t> rows_v{src + features_a, grad_v.data_ptr<scalar_t>(), features,
                                       features_v, features_v, group_v, ratios_v};
    masked_copy_pair(rows_a, rows_v, seeds_c.data_ptr<int64_t>(), batch);
  });
  return {grad_a, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(avkernels, CPU, m) {
  m.impl("zero_masked_patches", &zero_masked_patches_cpu);
  m.impl("masked_concat", &masked_concat_cpu);
  m.impl("masked_concat_backward", &masked_concat_backward_cpu);
}

}  // namespace avkernels::masking
