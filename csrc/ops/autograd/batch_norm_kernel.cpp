// Autograd of avkernels::tracked_batch_norm, for every device: the forward calls batch_norm_fwd,
// the backward batch_norm_bwd (batch_norm_bwd_differentiable under create_graph=True), all
// through the dispatcher (so CPU runs the C++ kernels, CUDA the Triton ones, fake tensors the
// Python fake kernels). Semantics: avkernels/ops/batch_norm/.
//
// Why C++: a Python torch.autograd.Function and its Python backward cost about 25 us per layer
// and training step more than nn.BatchNorm2d's C++ autograd node, as much as the whole kernel
// time of a (32, 512, 7, 7) layer's lead over ATen.

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>

#include "../batch_norm.h"

namespace avkernels::bn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
struct Arity;
template <typename Result, typename... Parameters>
struct Arity<Result(Parameters...)> {
  static constexpr size_t value = sizeof...(Parameters);
};

OptionalTensor optional(const Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }
Tensor defined_or_empty(const OptionalTensor& t) { return t.value_or(Tensor()); }

bool requires_grad(const Tensor& t) { return t.requires_grad(); }
bool requires_grad(const OptionalTensor& t) { return t.has_value() && t->requires_grad(); }
template <typename T>
bool requires_grad(const T&) {  // the flags and floats
  return false;
}

// A forward-mode tangent (level 0: forward AD's only level in ordinary use, as ATen's
// isFwGradDefined checks).
bool has_tangent(const Tensor& t) { return t._fw_grad(/*level=*/0).defined(); }
bool has_tangent(const OptionalTensor& t) { return t.has_value() && has_tangent(*t); }
template <typename T>
bool has_tangent(const T&) {
  return false;
}

// Saved for backward, in this order: x, the five parameters (undefined where absent), mean,
// invstd. The ReLU mask is recomputed in backward, so nothing else is kept.
enum Saved : size_t { kX, kWeight, kBias, kAbriWeight, kAbriBias, kAbriAlpha, kMean, kInvstd };

class TrackedBatchNorm : public torch::autograd::Function<TrackedBatchNorm> {
 public:
  // parameters: tracked_batch_norm's arguments (ForwardArgs, positionally).
  template <typename... Parameters>
  static Tensor forward(AutogradContext* ctx, const Parameters&... parameters) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const ForwardArgs a{parameters...};
    auto [y, mean, invstd] = batch_norm_fwd(a);
    ctx->save_for_backward({a.x, defined_or_empty(a.weight), defined_or_empty(a.bias),
                            defined_or_empty(a.abri_weight), defined_or_empty(a.abri_bias),
                            defined_or_empty(a.abri_alpha), mean, invstd});
    ctx->saved_data["use_batch_stats"] = a.use_batch_stats;
    ctx->saved_data["relu"] = a.relu;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const OptionalTensor weight = optional(saved[kWeight]), bias = optional(saved[kBias]),
                         abri_weight = optional(saved[kAbriWeight]),
                         abri_bias = optional(saved[kAbriBias]),
                         abri_alpha = optional(saved[kAbriAlpha]);
    const BackwardArgs a{grad_outputs[0], saved[kX],        weight,
                         bias,            abri_weight,      abri_bias,
                         abri_alpha,      saved[kMean],     saved[kInvstd],
                         ctx->saved_data["use_batch_stats"].toBool(),
                         ctx->saved_data["relu"].toBool()};
    // Grad mode is on in a backward only with create_graph=True: then the gradients must be
    // differentiable again (docs/DESIGN.md, "Double backward"); otherwise the fused kernels.
    auto [grad_x, grad_weight, grad_bias, grad_abri_weight, grad_abri_bias, grad_abri_alpha] =
        at::GradMode::is_enabled() ? batch_norm_bwd_differentiable(a) : batch_norm_bwd(a);
    // One slot per forward argument, in ForwardArgs' order; an absent parameter has an empty
    // placeholder gradient and gets none.
    variable_list result(Arity<ForwardSignature>::value);
    result[0] = grad_x;
    const OptionalTensor* params[] = {&weight, &bias, &abri_weight, &abri_bias, &abri_alpha};
    const Tensor grads[] = {grad_weight, grad_bias, grad_abri_weight, grad_abri_bias,
                            grad_abri_alpha};
    for (size_t i = 0; i < 5; ++i) {
      if (params[i]->has_value()) result[kWeight + i] = grads[i];
    }
    return result;
  }
};

// tracked_batch_norm's kernels, for the parameter types of ForwardSignature.
template <typename Signature>
struct Kernels;

template <typename Result, typename... Parameters>
struct Kernels<Result(Parameters...)> {
  // Below autograd (inference mode, or tensors that carry no autograd key): the forward alone.
  static Tensor forward(Parameters... parameters) {
    return std::get<0>(batch_norm_fwd(ForwardArgs{parameters...}));
  }

  static Tensor autograd(Parameters... parameters) {
    if ((has_tangent(parameters) || ...)) {
      // Forward-mode AD: a custom C++ Function has no jvp, so the forward is built from
      // differentiable PyTorch ops (docs/DESIGN.md, "Double backward").
      return std::get<0>(batch_norm_fwd_differentiable(ForwardArgs{parameters...}));
    }
    if (!at::GradMode::is_enabled() || !(requires_grad(parameters) || ...)) {
      // Nothing to differentiate (inference, frozen layers): skip building an autograd node, a
      // few microseconds that matter to small eval layers.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return forward(parameters...);
    }
    return TrackedBatchNorm::apply(parameters...);
  }
};

using TrackedBatchNormKernels = Kernels<ForwardSignature>;

}  // namespace
}  // namespace avkernels::bn

TORCH_LIBRARY_IMPL(avkernels, Autograd, m) {
  m.impl("tracked_batch_norm", &avkernels::bn::TrackedBatchNormKernels::autograd);
}

TORCH_LIBRARY_IMPL(avkernels, CompositeExplicitAutograd, m) {
  m.impl("tracked_batch_norm", &avkernels::bn::TrackedBatchNormKernels::forward);
}
