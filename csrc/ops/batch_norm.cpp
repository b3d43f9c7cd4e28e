// Dispatcher entry points of the tracked batch-norm ops, for C++ callers (the autograd kernel).

#include "batch_norm.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace avkernels::bn {
namespace {

c10::TypedOperatorHandle<ForwardSignature> forward_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<ForwardSignature>();
}

ForwardResult call_forward(const c10::TypedOperatorHandle<ForwardSignature>& op,
                           const ForwardArgs& a) {
  return op.call(a.x, a.weight, a.bias, a.abri_weight, a.abri_bias, a.abri_alpha,
                 a.running_mean, a.running_var, a.abri_running_mean, a.abri_running_var,
                 a.dead_count, a.dead_sample_count, a.seen, a.use_batch_stats, a.momentum, a.eps,
                 a.relu);
}

c10::TypedOperatorHandle<BackwardSignature> backward_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<BackwardSignature>();
}

BackwardResult call_backward(const c10::TypedOperatorHandle<BackwardSignature>& op,
                             const BackwardArgs& a) {
  return op.call(a.grad_y, a.x, a.weight, a.bias, a.abri_weight, a.abri_bias, a.abri_alpha,
                 a.mean, a.invstd, a.use_batch_stats, a.relu);
}

}  // namespace

ForwardResult batch_norm_fwd(const ForwardArgs& a) {
  static const auto op = forward_op("avkernels::batch_norm_fwd");
  return call_forward(op, a);
}

ForwardResult batch_norm_fwd_differentiable(const ForwardArgs& a) {
  static const auto op = forward_op("avkernels::batch_norm_fwd_differentiable");
  return call_forward(op, a);
}

BackwardResult batch_norm_bwd(const BackwardArgs& a) {
  static const auto op = backward_op("avkernels::batch_norm_bwd");
  return call_backward(op, a);
}

BackwardResult batch_norm_bwd_differentiable(const BackwardArgs& a) {
  static const auto op = backward_op("avkernels::batch_norm_bwd_differentiable");
  return call_backward(op, a);
}

}  // namespace avkernels::bn
