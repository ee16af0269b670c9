// Python module entry for mi_crow._C. The ops themselves are registered with TORCH_LIBRARY_IMPL in the
// per-op files; importing this module is what loads them into the dispatcher.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
