// The avkernels extension module. Every op is defined from Python (avkernels/ops/*/schema.py);
// the kernels in ops/ register themselves per dispatch key with TORCH_LIBRARY_IMPL. The module
// init below only exists so that `from avkernels import _C` loads this shared library and runs
// those registrations.

#include <Python.h>

// An empty Python module named _C: importing it is what loads the kernels.
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
