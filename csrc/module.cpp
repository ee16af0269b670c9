// Python module entry for mi_crow._C. The ops themselves are registered with TORCH_LIBRARY_IMPL in the
// per-op files; importing this module is what loads them into the dispatcher. The module's own functions report
// and set the CPU kernels' instruction-set level (isa.h); mi_crow.ops.registration calls them.
#include <Python.h>

#include <cstring>

#include "isa.h"
#include "lowp_gemm.h"

namespace {

// The vector extensions the baseline build itself was compiled with: empty for the portable build, more with
// MI_CROW_NATIVE=1 (-march=native).
const char* baseline_target() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__AVX__)
  return "avx";
#else
  return "";
#endif
}

// cpu_isa() -> {"cpu": detected level, "selected": level in use, "kernels": build that runs,
//               "baseline_target": vector extensions of the baseline build, "native": built with -march=native,
//               "bf16_gemm" / "fp16_gemm": the product behind a bf16 / fp16 encoder (lowp_gemm.h)}
PyObject* cpu_isa(PyObject*, PyObject*) {
#if defined(MI_CROW_NATIVE_BUILD)
  PyObject* native = Py_True;
#else
  PyObject* native = Py_False;
#endif
  return Py_BuildValue("{s:s,s:s,s:s,s:s,s:O,s:s,s:s}", "cpu", mi_crow::isa_name(mi_crow::detected_isa()), "selected",
                       mi_crow::isa_name(mi_crow::selected_isa()), "kernels", mi_crow::isa_name(mi_crow::kernel_isa()),
                       "baseline_target", baseline_target(), "native", native, "bf16_gemm",
                       mi_crow::lowp_gemm_name(mi_crow::lowp_gemm(false)), "fp16_gemm",
                       mi_crow::lowp_gemm_name(mi_crow::lowp_gemm(true)));
}

// request_cpu_isa(name) -> the selected level's name (the request clamped to what the CPU supports).
PyObject* request_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  for (mi_crow::Isa isa : {mi_crow::Isa::baseline, mi_crow::Isa::avx512, mi_crow::Isa::avx512bf16, mi_crow::Isa::amx}) {
    if (std::strcmp(name, mi_crow::isa_name(isa)) == 0) {
      return PyUnicode_FromString(mi_crow::isa_name(mi_crow::request_isa(isa)));
    }
  }
  PyErr_Format(PyExc_ValueError, "request_cpu_isa: name must be baseline, avx512, avx512bf16 or amx, got '%s'", name);
  return nullptr;
}

// request_lowp_gemm(name) -> the product bf16 now uses ("auto" asks for the automatic choice; a product that
// is not available here falls back to it).
PyObject* request_lowp_gemm(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  for (mi_crow::LowpGemm g : {mi_crow::LowpGemm::automatic, mi_crow::LowpGemm::onednn, mi_crow::LowpGemm::mkl,
                              mi_crow::LowpGemm::fp32}) {
    if (std::strcmp(name, mi_crow::lowp_gemm_name(g)) == 0) {
      return PyUnicode_FromString(mi_crow::lowp_gemm_name(mi_crow::request_lowp_gemm(g)));
    }
  }
  PyErr_Format(PyExc_ValueError, "request_lowp_gemm: name must be auto, onednn, mkl or fp32, got '%s'", name);
  return nullptr;
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The CPU kernels' instruction-set levels, as a dict."},
    {"request_cpu_isa", request_cpu_isa, METH_O, "Ask for an instruction-set level; returns the one selected."},
    {"request_lowp_gemm", request_lowp_gemm, METH_O, "Ask for a low-precision encoder product; returns bf16's."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
