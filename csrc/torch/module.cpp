// Python module object for `unigendet._C`.
//
// The ops themselves are registered with the dispatcher by static initialisers
// (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in the other files of csrc/torch), so importing
// this module is all it takes to make `torch.ops.unigendet.*` available. The module only carries
// build facts for `python -m unigendet.info`.
#include <Python.h>

#ifdef UNIGENDET_WITH_CUDA
static constexpr long kWithCuda = 1;
#else
static constexpr long kWithCuda = 0;
#endif

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "unigendet compiled kernels", -1,
                                   nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m != nullptr) {
    PyModule_AddIntConstant(m, "WITH_CUDA", kWithCuda);
  }
  return m;
}
