// The tracked batch-norm ops as C++ sees them. The schemas are defined once, from Python
// (avkernels/ops/batch_norm/schema.py); the dispatcher checks every kernel registered here
// against them. This header holds the same arguments by name (ForwardArgs, BackwardArgs), the
// positional signatures the dispatcher calls, and calls through the dispatcher.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace avkernels::bn {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

// batch_norm_fwd's (and tracked_batch_norm's) arguments, in schema order.
struct ForwardArgs {
  const Tensor& x;
  const OptionalTensor& weight;
  const OptionalTensor& bias;
  const OptionalTensor& abri_weight;
  const OptionalTensor& abri_bias;
  const OptionalTensor& abri_alpha;
  const OptionalTensor& running_mean;
  const OptionalTensor& running_var;
  const OptionalTensor& abri_running_mean;
  const OptionalTensor& abri_running_var;
  const OptionalTensor& dead_count;
  const OptionalTensor& dead_sample_count;
  const OptionalTensor& seen;
  bool use_batch_stats;
  double momentum;
  double eps;
  bool relu;
};
using ForwardResult = std::tuple<Tensor, Tensor, Tensor>;  // y, mean, invstd
using ForwardSignature = ForwardResult(
    const Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
    const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
    const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
    const OptionalTensor&, bool, double, double, bool);

// batch_norm_bwd's arguments, in schema order.
struct BackwardArgs {
  const Tensor& grad_y;
  const Tensor& x;
  const OptionalTensor& weight;
  const OptionalTensor& bias;
  const OptionalTensor& abri_weight;
  const OptionalTensor& abri_bias;
  const OptionalTensor& abri_alpha;
  const Tensor& mean;
  const Tensor& invstd;
  bool use_batch_stats;
  bool relu;
};
// grad_x, grad_weight, grad_bias, grad_abri_weight, grad_abri_bias, grad_abri_alpha
using BackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using BackwardSignature = BackwardResult(const Tensor&, const Tensor&, const OptionalTensor&,
                                         const OptionalTensor&, const OptionalTensor&,
                                         const OptionalTensor&, const OptionalTensor&,
                                         const Tensor&, const Tensor&, bool, bool);

// The ops through the dispatcher: each device (and fake tensors) gets its own kernel.
ForwardResult batch_norm_fwd(const ForwardArgs& a);
// batch_norm_fwd from differentiable PyTorch ops, for forward-mode AD (docs/DESIGN.md,
// "Double backward").
ForwardResult batch_norm_fwd_differentiable(const ForwardArgs& a);
BackwardResult batch_norm_bwd(const BackwardArgs& a);
// batch_norm_bwd from differentiable PyTorch ops, for a backward that builds a graph
// (docs/DESIGN.md, "Double backward").
BackwardResult batch_norm_bwd_differentiable(const BackwardArgs& a);

// A kernel written against an argument struct, as the positional function the dispatcher
// registers: Positional<ForwardSignature, ForwardArgs, kernel>::call.
template <typename Signature, typename Args, auto Kernel>
struct Positional;

template <typename Result, typename... Parameters, typename Args, auto Kernel>
struct Positional<Result(Parameters...), Args, Kernel> {
  static Result call(Parameters... parameters) { return Kernel(Args{parameters...}); }
};

}  // namespace avkernels::bn
