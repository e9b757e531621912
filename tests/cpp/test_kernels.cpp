// C++ tests of the CPU kernels, through the dispatcher, against ATen expressions
// in float64: run by ctest from the CMake build (no Python in the loop).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>

#include "igfast.h"

namespace {

int failures = 0;

void expect(bool condition, const std::string& what) {
  if (!condition) {
    std::fprintf(stderr, "FAILED: %s\n", what.c_str());
    ++failures;
  }
}

void expect_throws(const std::function<void()>& call, const std::string& word, const std::string& what) {
  try {
    call();
  } catch (const c10::Error& error) {
    expect(std::string(error.what()).find(word) != std::string::npos, what + ": message names " + word);
    return;
  }
  expect(false, what + ": no error raised");
}

at::Tensor interpolate_path(const at::Tensor& x, const at::Tensor& b, const at::Tensor& alphas, int64_t k0, int64_t k1) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("igfast::interpolate_path", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  return op.call(x, b, alphas, k0, k1);
}

void interpolate_path_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& b, const at::Tensor& alphas,
                           int64_t k0, int64_t k1) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("igfast::interpolate_path_into", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  op.call(out, x, b, alphas, k0, k1);
}

void accumulate_steps(at::Tensor& acc, const at::Tensor& grads, const at::Tensor& weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("igfast::accumulate_steps", "")
                       .typed<void(at::Tensor, const at::Tensor&, const at::Tensor&)>();
  op.call(acc, grads, weights);
}

void test_interpolate(at::ScalarType dtype, double tolerance, bool broadcast) {
  const auto options = at::TensorOptions().dtype(dtype);
  const at::Tensor x = at::randn({5, 3, 7}, options);
  const at::Tensor b = at::randn({broadcast ? 1 : 5, 3, 7}, options);
  const at::Tensor alphas = at::rand({9}, at::kDouble);
  const at::Tensor path = interpolate_path(x, b, alphas, 2, 6);
  const at::Tensor a = alphas.slice(0, 2, 6).view({4, 1, 1, 1});
  const at::Tensor expected = (b.to(at::kDouble) + a * (x.to(at::kDouble) - b.to(at::kDouble))).reshape({20, 3, 7});
  const double error = (path.to(at::kDouble) - expected).abs().max().item<double>();
  expect(path.sizes() == expected.sizes(), "interpolate_path shape");
  expect(error <= tolerance, "interpolate_path " + std::string(c10::toString(dtype)) + " error " + std::to_string(error));
  // The out-variant writes the same values into a poisoned buffer.
  at::Tensor out = at::full({20, 3, 7}, std::nan(""), options);
  interpolate_path_into(out, x, b, alphas, 2, 6);
  expect(at::equal(out, path), "interpolate_path_into equals interpolate_path " + std::string(c10::toString(dtype)));
}

void test_accumulate(at::ScalarType dtype, double tolerance) {
  const at::Tensor grads = at::randn({6 * 4, 9}, at::TensorOptions().dtype(dtype));
  const at::Tensor weights = at::rand({6}, at::kDouble);
  at::Tensor acc = at::randn({4, 9}, at::TensorOptions().dtype(igfast::accumulate_dtype(dtype)));
  const at::Tensor expected = acc.to(at::kDouble) + (weights.view({6, 1, 1}) * grads.to(at::kDouble).view({6, 4, 9})).sum(0);
  accumulate_steps(acc, grads, weights);
  const double error = (acc.to(at::kDouble) - expected).abs().max().item<double>();
  expect(error <= tolerance, "accumulate_steps " + std::string(c10::toString(dtype)) + " error " + std::to_string(error));
}

void test_errors() {
  const at::Tensor x = at::randn({2, 3});
  const at::Tensor alphas = at::rand({4}, at::kDouble);
  expect_throws([&] { interpolate_path(x, at::randn({2, 4}), alphas, 0, 4); }, "baselines", "baseline shape");
  expect_throws([&] { interpolate_path(x, x, alphas, 1, 5); }, "chunk", "chunk out of range");
  expect_throws([&] { interpolate_path(x.to(at::kLong), x.to(at::kLong), alphas, 0, 4); }, "inputs", "integer inputs");
  at::Tensor acc = at::zeros({2, 3});
  expect_throws([&] { accumulate_steps(acc, at::randn({5, 3}), alphas.slice(0, 0, 2)); }, "grads", "grads rows");
  at::Tensor small = at::empty({3, 3});
  expect_throws([&] { interpolate_path_into(small, x, x, alphas, 0, 2); }, "out", "out shape");
}

}  // namespace

int main() {
  at::manual_seed(0);
  expect(igfast::abi_version() >= 1, "abi_version");  // also keeps the library linked
  for (bool broadcast : {false, true}) {
    test_interpolate(at::kFloat, 1e-5, broadcast);
    test_interpolate(at::kDouble, 1e-12, broadcast);
    test_interpolate(at::kHalf, 1e-2, broadcast);
  }
  test_accumulate(at::kFloat, 1e-5);
  test_accumulate(at::kDouble, 1e-12);
  test_accumulate(at::kBFloat16, 1e-5);  // bfloat16 grads are exact in float32
  test_errors();
  std::printf(failures ? "%d checks failed\n" : "all kernel checks passed\n", failures);
  return failures ? 1 : 0;
}
