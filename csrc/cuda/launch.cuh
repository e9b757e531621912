// Launch configuration and 16-byte vector access shared by the CUDA kernels.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

namespace igfast::cuda {

constexpr int kThreads = 256;
// Grid-stride loops cover any size; more blocks than this only add scheduling.
constexpr int64_t kMaxBlocks = 65535;

inline int blocks_for(int64_t work_items) {
  return static_cast<int>(std::max<int64_t>(1, std::min(kMaxBlocks, (work_items + kThreads - 1) / kThreads)));
}

// N elements moved with one 16-byte load or store.
template <typename T>
struct VectorWidth {
  static constexpr int value = 16 / sizeof(T) > 0 ? 16 / sizeof(T) : 1;
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

inline bool aligned16(const void* pointer) {
  return reinterpret_cast<std::uintptr_t>(pointer) % 16 == 0;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls launch(TypeTag<scalar_t>{}) for the four float dtypes. Unlike
// AT_DISPATCH it never throws (launchers.h says why): the plans have already
// refused other dtypes, so the error code is only a guard.
template <typename Launch>
cudaError_t dispatch_floating(c10::ScalarType dtype, Launch&& launch) {
  switch (dtype) {
    case c10::ScalarType::Double: return launch(TypeTag<double>{});
    case c10::ScalarType::Float: return launch(TypeTag<float>{});
    case c10::ScalarType::Half: return launch(TypeTag<c10::Half>{});
    case c10::ScalarType::BFloat16: return launch(TypeTag<c10::BFloat16>{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace igfast::cuda
