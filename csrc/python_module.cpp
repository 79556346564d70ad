// The Python module stub: `import csm_ext._C` loads this library, which registers the ops
// (csrc/ops.cpp and the kernels), and records how the library was built. No pybind11 needed.
#include <Python.h>

#ifndef CSM_EXT_TORCH_VERSION
#define CSM_EXT_TORCH_VERSION "unknown"
#endif

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "csm_ext native library (ops register on import)", -1, nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
#ifdef _OPENMP
  const long with_openmp = 1;
#else
  const long with_openmp = 0;
#endif
  if (PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) < 0 ||
      PyModule_AddIntConstant(module, "WITH_OPENMP", with_openmp) < 0 ||
      PyModule_AddStringConstant(module, "TORCH_VERSION", CSM_EXT_TORCH_VERSION) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
