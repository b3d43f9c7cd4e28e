// Autograd of avkernels::tracked_batch_norm, for every device: the forward calls batch_norm_fwd,
// the backward batch_norm_bwd, both through the dispatcher (so CPU runs the C++ kernels, CUDA the
// Triton ones, fake tensors the Python fake kernels). Semantics: avkernels/ops/batch_norm.py.
//
// Why C++: a Python torch.autograd.Function and its Python backward cost about 25 us per layer
// and training step more than nn.BatchNorm2d's C++ autograd node, as much as the whole kernel
// time of a (32, 512, 7, 7) layer's lead over ATen.

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace avkernels::bn {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSignature = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
    const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
    const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
    const OptionalTensor&, bool, double, double, bool);
using BackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&,
    const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&,
    const Tensor&, bool, bool);

const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("avkernels::batch_norm_fwd", "")
                             .typed<ForwardSignature>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("avkernels::batch_norm_bwd", "")
                             .typed<BackwardSignature>();
  return op;
}

// The differentiable arguments after x, in schema order: weight, bias, abri_weight, abri_bias,
// abri_alpha.
constexpr size_t kParameters = 5;
// Every argument of tracked_batch_norm: backward returns one gradient slot for each.
constexpr size_t kArguments = 17;

OptionalTensor optional(const Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

class TrackedBatchNorm : public torch::autograd::Function<TrackedBatchNorm> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const OptionalTensor& weight,
                        const OptionalTensor& bias, const OptionalTensor& abri_weight,
                        const OptionalTensor& abri_bias, const OptionalTensor& abri_alpha,
                        const OptionalTensor& running_mean, const OptionalTensor& running_var,
                        const OptionalTensor& abri_running_mean,
                        const OptionalTensor& abri_running_var, const OptionalTensor& dead_count,
                        const OptionalTensor& dead_sample_count, const OptionalTensor& seen,
                        bool use_batch_stats, double momentum, double eps, bool relu) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, invstd] = forward_op().call(
        x, weight, bias, abri_weight, abri_bias, abri_alpha, running_mean, running_var,
        abri_running_mean, abri_running_var, dead_count, dead_sample_count, seen,
        use_batch_stats, momentum, eps, relu);
    // Only x, the parameters and (mean, invstd): the ReLU mask is recomputed in backward.
    ctx->save_for_backward({x, weight.value_or(Tensor()), bias.value_or(Tensor()),
                            abri_weight.value_or(Tensor()), abri_bias.value_or(Tensor()),
                            abri_alpha.value_or(Tensor()), mean, invstd});
    ctx->saved_data["use_batch_stats"] = use_batch_stats;
    ctx->saved_data["relu"] = relu;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    std::array<OptionalTensor, kParameters> params;
    for (size_t i = 0; i < kParameters; ++i) params[i] = optional(saved[1 + i]);
    auto grads = backward_op().call(grad_outputs[0], x, params[0], params[1], params[2],
                                    params[3], params[4], saved[6], saved[7],
                                    ctx->saved_data["use_batch_stats"].toBool(),
                                    ctx->saved_data["relu"].toBool());
    variable_list result(kArguments);
    result[0] = std::get<0>(grads);
    const std::array<Tensor, kParameters> param_grads = {std::get<1>(grads), std::get<2>(grads),
                                                         std::get<3>(grads), std::get<4>(grads),
                                                         std::get<5>(grads)};
    // An absent parameter has an empty placeholder gradient: it gets none.
    for (size_t i = 0; i < kParameters; ++i) {
      if (params[i].has_value()) result[1 + i] = param_grads[i];
    }
    return result;
  }
};

// Below autograd (inference mode, or tensors that carry no autograd key): the forward alone.
Tensor tracked_batch_norm_forward(
    const Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias,
    const OptionalTensor& abri_weight, const OptionalTensor& abri_bias,
    const OptionalTensor& abri_alpha, const OptionalTensor& running_mean,
    const OptionalTensor& running_var, const OptionalTensor& abri_running_mean,
    const OptionalTensor& abri_running_var, const OptionalTensor& dead_count,
    const OptionalTensor& dead_sample_count, const OptionalTensor& seen, bool use_batch_stats,
    double momentum, double eps, bool relu) {
  return std::get<0>(forward_op().call(x, weight, bias, abri_weight, abri_bias, abri_alpha,
                                       running_mean, running_var, abri_running_mean,
                                       abri_running_var, dead_count, dead_sample_count, seen,
                                       use_batch_stats, momentum, eps, relu));
}

Tensor tracked_batch_norm_autograd(
    const Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias,
    const OptionalTensor& abri_weight, const OptionalTensor& abri_bias,
    const OptionalTensor& abri_alpha, const OptionalTensor& running_mean,
    const OptionalTensor& running_var, const OptionalTensor& abri_running_mean,
    const OptionalTensor& abri_running_var, const OptionalTensor& dead_count,
    const OptionalTensor& dead_sample_count, const OptionalTensor& seen, bool use_batch_stats,
    double momentum, double eps, bool relu) {
  const auto requires_grad = [](const OptionalTensor& t) {
    return t.has_value() && t->requires_grad();
  };
  if (!at::GradMode::is_enabled() ||
      !(x.requires_grad() || requires_grad(weight) || requires_grad(bias) ||
        requires_grad(abri_weight) || requires_grad(abri_bias) || requires_grad(abri_alpha))) {
    // Nothing to differentiate (inference, frozen layers): skip building an autograd node, a
    // few microseconds that matter to small eval layers.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return tracked_batch_norm_forward(x, weight, bias, abri_weight, abri_bias, abri_alpha,
                                      running_mean, running_var, abri_running_mean,
                                      abri_running_var, dead_count, dead_sample_count, seen,
                                      use_batch_stats, momentum, eps, relu);
  }
  return TrackedBatchNorm::apply(x, weight, bias, abri_weight, abri_bias, abri_alpha,
                                 running_mean, running_var, abri_running_mean, abri_running_var,
                                 dead_count, dead_sample_count, seen, use_batch_stats, momentum,
                                 eps, relu);
}

}  // namespace
}  // namespace avkernels::bn

TORCH_LIBRARY_IMPL(avkernels, Autograd, m) {
  m.impl("tracked_batch_norm", &avkernels::bn::tracked_batch_norm_autograd);
}

TORCH_LIBRARY_IMPL(avkernels, CompositeExplicitAutograd, m) {
  m.impl("tracked_batch_norm", &avkernels::bn::tracked_batch_norm_forward);
}
