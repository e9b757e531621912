// The one place that says what the igfast ops are: every schema of the
// `igfast` namespace is defined here; backends register implementations in
// their own translation units (csrc/cpu, csrc/cuda).
#include <Python.h>
#include <torch/library.h>

// Importing igfast._C from Python loads this library, which runs the
// TORCH_LIBRARY registrations below; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace igfast {

// Bumped whenever an op schema changes, so Python can refuse a stale build.
int64_t abi_version() { return 1; }

TORCH_LIBRARY(igfast, m) {
  m.def("abi_version() -> int", &abi_version);
}

}  // namespace igfast
