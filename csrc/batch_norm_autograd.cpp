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
#include <utility>

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

// Positions in tracked_batch_norm's argument list, which is batch_norm_fwd's.
constexpr size_t kFirstParameter = 1;  // weight, bias, abri_weight, abri_bias, abri_alpha
constexpr size_t kParameters = 5;
constexpr size_t kUseBatchStats = 13;
constexpr size_t kRelu = 16;
constexpr size_t kArguments = 17;  // backward returns one gradient slot for each

OptionalTensor optional(const Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

bool requires_grad(const Tensor& t) { return t.requires_grad(); }
bool requires_grad(const OptionalTensor& t) { return t.has_value() && t->requires_grad(); }
template <typename T>
bool requires_grad(const T&) {  // the flags and floats
  return false;
}

// x, the parameters (undefined where absent), mean and invstd.
template <typename Arguments, size_t... I>
variable_list saved_tensors(const Arguments& arguments, const Tensor& mean, const Tensor& invstd,
                            std::index_sequence<I...>) {
  return {std::get<0>(arguments), std::get<kFirstParameter + I>(arguments).value_or(Tensor())...,
          mean, invstd};
}

class TrackedBatchNorm : public torch::autograd::Function<TrackedBatchNorm> {
 public:
  // args: tracked_batch_norm's arguments.
  template <typename... Args>
  static Tensor forward(AutogradContext* ctx, const Args&... args) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, invstd] = forward_op().call(args...);
    const auto arguments = std::forward_as_tuple(args...);
    // Only x, the parameters and (mean, invstd): the ReLU mask is recomputed in backward.
    ctx->save_for_backward(saved_tensors(arguments, mean, invstd,
                                         std::make_index_sequence<kParameters>{}));
    ctx->saved_data["use_batch_stats"] = std::get<kUseBatchStats>(arguments);
    ctx->saved_data["relu"] = std::get<kRelu>(arguments);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    std::array<OptionalTensor, kParameters> params;
    for (size_t i = 0; i < kParameters; ++i) params[i] = optional(saved[1 + i]);
    auto grads = backward_op().call(grad_outputs[0], x, params[0], params[1], params[2],
                                    params[3], params[4], saved[1 + kParameters],
                                    saved[2 + kParameters],
                                    ctx->saved_data["use_batch_stats"].toBool(),
                                    ctx->saved_data["relu"].toBool());
    variable_list result(kArguments);
    result[0] = std::get<0>(grads);
    const std::array<Tensor, kParameters> param_grads = {std::get<1>(grads), std::get<2>(grads),
                                                         std::get<3>(grads), std::get<4>(grads),
                                                         std::get<5>(grads)};
    // An absent parameter has an empty placeholder gradient: it gets none.
    for (size_t i = 0; i < kParameters; ++i) {
      if (params[i].has_value()) result[kFirstParameter + i] = param_grads[i];
    }
    return result;
  }
};

// tracked_batch_norm's kernels, for the argument types of batch_norm_fwd's signature.
template <typename Signature>
struct Kernels;

template <typename Result, typename... Args>
struct Kernels<Result(Args...)> {
  static_assert(sizeof...(Args) == kArguments);

  // Below autograd (inference mode, or tensors that carry no autograd key): the forward alone.
  static Tensor forward(Args... args) { return std::get<0>(forward_op().call(args...)); }

  static Tensor autograd(Args... args) {
    if (!at::GradMode::is_enabled() || !(requires_grad(args) || ...)) {
      // Nothing to differentiate (inference, frozen layers): skip building an autograd node, a
      // few microseconds that matter to small eval layers.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return forward(args...);
    }
    return TrackedBatchNorm::apply(args...);
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
