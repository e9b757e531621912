// Launch configuration and 16-byte vector access shared by the CUDA kernels.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

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

}  // namespace igfast::cuda
