// Dispatcher entry points of the tracked batch-norm ops, for C++ callers (the autograd kernel).

#include "batch_norm.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace avkernels::bn {
namespace {

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

}  // namespace

ForwardResult batch_norm_fwd(const ForwardArgs& a) {
  return forward_op().call(a.x, a.weight, a.bias, a.abri_weight, a.abri_bias, a.abri_alpha,
                           a.running_mean, a.running_var, a.abri_running_mean,
                           a.abri_running_var, a.dead_count, a.dead_sample_count, a.seen,
                           a.use_batch_stats, a.momentum, a.eps, a.relu);
}

BackwardResult batch_norm_bwd(const BackwardArgs& a) {
  return backward_op().call(a.grad_y, a.x, a.weight, a.bias, a.abri_weight, a.abri_bias,
                            a.abri_alpha, a.mean, a.invstd, a.use_batch_stats, a.relu);
}

}  // namespace avkernels::bn
