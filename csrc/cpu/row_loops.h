// Inner loops over one contiguous row of features, shared by the CPU kernels.
// They are written over raw __restrict pointers so that the compiler vectorises
// them (checked with -fopt-info-vec; see the note in interpolate_cpu.cpp).
//
// A portable build vectorises for SSE2 only, which leaves the accumulation
// compute-bound at half the speed of MKL's AVX gemv. On x86-64 with GCC each
// loop is therefore compiled three times (AVX-512, AVX2+FMA, baseline) and the
// loader picks the best one for the machine once (function multiversioning).
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define IGFAST_ROW_LOOP __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) __attribute__((noinline))
#else
#define IGFAST_ROW_LOOP inline
#endif

namespace igfast::cpu {

// Features per task: big enough to amortise a task, small enough that a row of
// differences (in opmath) stays in L1/L2 while it is reused for every step.
constexpr int64_t kFeatureBlock = 4096;

// Elements per interpolation block: base and difference of a block (2 x 128 KB in
// float) stay in L2 while the block is written for every step, and each step's
// write is a long contiguous run that the prefetchers stream well.
constexpr int64_t kPathBlock = 32768;

// A per-thread buffer of at least n elements, kept across calls: a fresh
// zero-filled vector of this size costs an mmap, page faults and a memset per call.
template <typename T, int Slot>
T* scratch_buffer(int64_t n) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// Broadcast baseline rows shorter than this are expanded over a block once, so the
// per-step loops stay long; longer rows are read in place, one run per example.
constexpr int64_t kMinRun = 1024;

// Tasks of at least this many element updates, so small calls stay on one thread.
constexpr int64_t kMinWorkPerTask = 32768;

inline int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, kMinWorkPerTask / std::max<int64_t>(1, work_per_task));
}

// difference = (x - b) in opmath, rounded to the input dtype first, as PyTorch
// and Captum form it.
template <typename scalar_t, typename opmath_t>
IGFAST_ROW_LOOP void difference_row(const scalar_t* __restrict x, const scalar_t* __restrict b,
                                    opmath_t* __restrict difference, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    difference[j] = static_cast<opmath_t>(static_cast<scalar_t>(x[j] - b[j]));
  }
}

// out = b + a * difference, rounded as PyTorch rounds Captum's baseline + alpha * (input
// - baseline): the product to the input dtype, then the sum; never one fused
// multiply-add (GCC contracted b + a * d into one in the x86-64-v3/v4 clones, and a path
// point that Captum rounds to exactly 0, or to a clamp's bound, came out 1 ulp off it:
// 1e7 instead of 1.25 at a log's singularity, 2% on a unit held at hardtanh's bound).
#if defined(__GNUC__) && !defined(__clang__)
#define IGFAST_NO_CONTRACTION __attribute__((optimize("fp-contract=off")))
#else
#define IGFAST_NO_CONTRACTION
#endif
template <typename scalar_t, typename opmath_t>
IGFAST_ROW_LOOP IGFAST_NO_CONTRACTION void interpolate_row(scalar_t* __restrict out, const scalar_t* __restrict b,
                                                           const opmath_t* __restrict difference, opmath_t a,
                                                           int64_t n) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  for (int64_t j = 0; j < n; ++j) {
    const opmath_t product = static_cast<opmath_t>(static_cast<scalar_t>(a * difference[j]));
    out[j] = static_cast<scalar_t>(static_cast<opmath_t>(b[j]) + product);
  }
}

// acc += w * g, in the accumulation dtype.
template <typename scalar_t, typename acc_t>
IGFAST_ROW_LOOP void axpy_row(acc_t* __restrict acc, const scalar_t* __restrict g, acc_t w, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    acc[j] += w * static_cast<acc_t>(g[j]);
  }
}

// acc += w0 g0 + w1 g1 + w2 g2 + w3 g3: four steps per pass over the accumulator,
// added in step order so the result equals four single-step passes.
template <typename scalar_t, typename acc_t>
IGFAST_ROW_LOOP void axpy4_row(acc_t* __restrict acc, const scalar_t* __restrict g0,
                               const scalar_t* __restrict g1, const scalar_t* __restrict g2,
                               const scalar_t* __restrict g3, const acc_t* __restrict w, int64_t n) {
  const acc_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  for (int64_t j = 0; j < n; ++j) {
    acc_t sum = acc[j];
    sum += w0 * static_cast<acc_t>(g0[j]);
    sum += w1 * static_cast<acc_t>(g1[j]);
    sum += w2 * static_cast<acc_t>(g2[j]);
    sum += w3 * static_cast<acc_t>(g3[j]);
    acc[j] = sum;
  }
}

// acc += sum, rounding a float64 sum once to the accumulation dtype.
template <typename acc_t>
IGFAST_ROW_LOOP void add_row(acc_t* __restrict acc, const double* __restrict sum, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    acc[j] = static_cast<acc_t>(static_cast<double>(acc[j]) + sum[j]);
  }
}

// out = acc * (x - b), the difference rounded to the input dtype first.
template <typename scalar_t, typename acc_t>
IGFAST_ROW_LOOP void scale_row(acc_t* __restrict out, const acc_t* __restrict acc,
                      const scalar_t* __restrict x, const scalar_t* __restrict b, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    out[j] = acc[j] * static_cast<acc_t>(static_cast<scalar_t>(x[j] - b[j]));
  }
}

}  // namespace igfast::cpu
