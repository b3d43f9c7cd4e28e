// The avkernels operator library: every op schema is defined here, once.
//
// The schema strings must stay identical to the Python constants next to each op's reference
// implementation (avkernels/ops/*.py); the kernels register themselves per device in their own
// files with TORCH_LIBRARY_IMPL. The module init below only exists so that
// `from avkernels import _C` loads this shared library and runs the registrations.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(avkernels, m) {
  // avkernels/ops/batch_norm.py: FWD_SCHEMA, BWD_SCHEMA, TRACKED_SCHEMA
  m.def(
      "batch_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? abri_weight, "
      "Tensor? abri_bias, Tensor? abri_alpha, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? abri_running_mean, Tensor(d!)? abri_running_var, Tensor(e!)? dead_count, "
      "Tensor(f!)? dead_sample_count, Tensor(g!)? seen, bool use_batch_stats, float momentum, "
      "float eps, bool relu) -> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor? abri_weight, "
      "Tensor? abri_bias, Tensor? abri_alpha, Tensor mean, Tensor invstd, bool use_batch_stats, "
      "bool relu) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "tracked_batch_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor? abri_weight, "
      "Tensor? abri_bias, Tensor? abri_alpha, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? abri_running_mean, Tensor(d!)? abri_running_var, Tensor(e!)? dead_count, "
      "Tensor(f!)? dead_sample_count, Tensor(g!)? seen, bool use_batch_stats, float momentum, "
      "float eps, bool relu) -> Tensor");
  // avkernels/ops/masking.py: ZERO_MASKED_PATCHES_SCHEMA, MASKED_CONCAT_SCHEMA,
  // MASKED_CONCAT_BACKWARD_SCHEMA
  m.def(
      "zero_masked_patches(Tensor(a!) x, Tensor ratio, Tensor seeds, int patch_h, int patch_w) "
      "-> ()");
  m.def(
      "masked_concat(Tensor a, Tensor v, Tensor? ratio_a, Tensor? ratio_v, Tensor seeds, "
      "int group_a, int group_v) -> Tensor");
  m.def(
      "masked_concat_backward(Tensor grad, Tensor? ratio_a, Tensor? ratio_v, Tensor seeds, "
      "int features_a, int group_a, int group_v) -> (Tensor, Tensor)");
}

// An empty Python module named _C: importing it is what loads the library above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "avkernels CPU kernels; the ops live in torch.ops.avkernels.",
      -1,
      nullptr,
  };
  return PyModule_Create(&module);
}
