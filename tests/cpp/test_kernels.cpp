// C++ tests of the CPU kernels, through the dispatcher, against ATen expressions
// in float64: run by ctest from the CMake build (no Python in the loop).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

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

using Kinks = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (With LeakyReLU's factors: slope below and at the kink, 1 above.)
Kinks scalar_kinks(const at::Tensor& z, const at::Tensor& dz, double kink, double margin, int64_t rows,
                   const std::optional<at::Tensor>& low, const std::optional<at::Tensor>& high) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("igfast::scalar_kinks", "")
                       .typed<Kinks(const at::Tensor&, const at::Tensor&, double, double, int64_t,
                                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
                                    double, double)>();
  return op.call(z, dz, kink, margin, rows, low, high, 0.125, 0.125, 1.0);
}

// scalar_kinks against the same float64 expressions in ATen: each unit's factor from
// its side of the kink, the tangent times it, its step to the kink, the steps inside each row's window (row-major), the nearest on
// each side and the rows with a unit on its kink.
void test_scalar_kinks(at::ScalarType dtype) {
  const int64_t rows = 7;
  const double kink = 0.25, margin = 1e-6;
  const auto options = at::TensorOptions().dtype(dtype);
  at::Tensor z = at::randn({rows * 2, 30}, options), dz = at::randn({rows * 2, 30}, options);
  z.index_put_({0, 0}, kink);  // on its kink at the point
  dz.index_put_({1, 1}, 0.0);  // never reaches it: an infinite step
  const at::Tensor low = -at::rand({rows}, at::kDouble), high = at::rand({rows}, at::kDouble);
  const auto [factor, scaled_tangent, kink_rows, kink_steps, ahead, behind, near] =
      scalar_kinks(z, dz, kink, margin, rows, low, high);
  const std::string name = "scalar_kinks " + std::string(c10::toString(dtype));
  const at::Tensor z64 = z.to(at::kDouble), dz64 = dz.to(at::kDouble);
  const at::Tensor side = at::add(z64, dz64, margin) - kink;
  const at::Tensor expected_factor = at::where(side > 0, 1.0, 0.125).to(dtype);
  expect(at::equal(factor, expected_factor), name + ": factors");
  expect(at::equal(scaled_tangent, dz * expected_factor), name + ": tangent times factor");
  const at::Tensor steps = ((kink - z64) / dz64).reshape({rows, -1});
  const at::Tensor clear = steps.abs() > margin;
  const at::Tensor inside = clear & (steps > (low + margin).unsqueeze(1)) & (steps < (high - margin).unsqueeze(1));
  const at::Tensor found = inside.nonzero();
  expect(at::equal(kink_rows, found.select(1, 0)), name + ": kink rows");
  expect(at::equal(kink_steps, steps.index({found.select(1, 0), found.select(1, 1)})), name + ": kink steps");
  const double inf = std::numeric_limits<double>::infinity();
  expect(at::equal(ahead, at::where(inside & (steps > 0), steps, inf).amin(1)), name + ": nearest ahead");
  expect(at::equal(behind, at::where(inside & (steps < 0), steps, -inf).amax(1)), name + ": nearest behind");
  expect(at::equal(near, (~clear).any(1)) && near[0].item<bool>(), name + ": units on their kink");
  expect(kink_rows.numel() > rows, name + ": kinks found");
  expect_throws([&] { scalar_kinks(z, dz, kink, margin, 3, low, high); }, "rows", name + ": rows");
}

at::Tensor overtakings(const at::Tensor& values, const at::Tensor& rates, const at::Tensor& winner_values,
                       const at::Tensor& winner_rates, double margin) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("igfast::overtakings", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         double)>();
  return op.call(values, rates, winner_values, winner_rates, margin);
}

// overtakings against ATen: per window, the nearest step ahead and behind at which an
// element overtakes the window's winner, and 0 where one is level with it.
void test_overtakings() {
  const double margin = 1e-12, inf = std::numeric_limits<double>::infinity();
  const at::Tensor values = at::randn({5, 4, 9}, at::kDouble), rates = at::randn({5, 4, 9}, at::kDouble);
  const at::Tensor winner = values.argmax(0, true);
  const at::Tensor winner_values = values.gather(0, winner).squeeze(0), winner_rates = rates.gather(0, winner).squeeze(0);
  const at::Tensor result = overtakings(values, rates, winner_values, winner_rates, margin);
  const at::Tensor rate = rates - winner_rates, step = (winner_values - values) / rate;
  const at::Tensor ahead = at::where((rate > 0) & (step > margin), step, inf).amin(0);
  const at::Tensor behind = at::where((rate < 0) & (step < -margin), step, -inf).amax(0);
  expect(result.sizes() == at::IntArrayRef({4, 9, 3}), "overtakings: shape");
  expect(at::equal(result.select(-1, 0), ahead), "overtakings: ahead");
  expect(at::equal(result.select(-1, 1), at::where(at::isfinite(behind), behind, inf)), "overtakings: behind");
  expect(at::equal(result.select(-1, 2), at::full({4, 9}, inf, at::kDouble)), "overtakings: no ties");
  expect(at::isfinite(result.select(-1, 0)).any().item<bool>(), "overtakings: some ahead");
  expect_throws([&] { overtakings(values.to(at::kFloat), rates, winner_values, winner_rates, margin); }, "float64",
                "overtakings: float32 values");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cut_at_kinks(
    const at::Tensor& low, const at::Tensor& high, const at::Tensor& middle, const at::Tensor& piece_start,
    const at::Tensor& piece_end, const at::Tensor& kink_rows, const at::Tensor& kink_steps, double margin) {
  using Parts = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("igfast::cut_at_kinks", "")
                       .typed<Parts(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(low, high, middle, piece_start, piece_end, kink_rows, kink_steps, margin);
}

// cut_at_kinks on two segments written out by hand: [0, 1] around 0.5 with its piece
// [0.25, 0.75], kinks at 0.125, 0.625, 0.625 and 0.625 + margin / 2 (one cut), listed
// out of order; [2, 4] around 3, its piece the whole segment, no kink. (Dyadic places:
// middle + step is exact.)
void test_cut_at_kinks() {
  const double margin = 1e-9;
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor low = at::tensor({0.0, 2.0}, f64), high = at::tensor({1.0, 4.0}, f64);
  const at::Tensor middle = at::tensor({0.5, 3.0}, f64);
  const at::Tensor piece_start = at::tensor({0.25, 2.0}, f64), piece_end = at::tensor({0.75, 4.0}, f64);
  const at::Tensor rows = at::zeros({4}, at::kLong);
  const at::Tensor steps = at::tensor({0.125, -0.375, 0.125 + margin / 2, 0.125}, f64);
  const auto [segment, part_low, part_high, holds] =
      cut_at_kinks(low, high, middle, piece_start, piece_end, rows, steps, margin);
  expect(at::equal(segment, at::tensor(at::ArrayRef<int64_t>({0, 0, 0, 0, 0, 1}), at::kLong)), "cut_at_kinks: segments");
  const double cuts[] = {0.0, 0.125, 0.25, 0.625, 0.75, 1.0};
  for (int j = 0; j < 5; ++j) {
    expect(part_low[j].item<double>() == cuts[j] && part_high[j].item<double>() == cuts[j + 1],
           "cut_at_kinks: part " + std::to_string(j));
  }
  expect(part_low[5].item<double>() == 2.0 && part_high[5].item<double>() == 4.0, "cut_at_kinks: whole segment");
  expect(at::equal(holds, at::tensor(at::ArrayRef<uint8_t>({0, 0, 1, 0, 0, 1}), at::kByte).to(at::kBool)),
         "cut_at_kinks: holds");
  expect_throws([&] { cut_at_kinks(low, high, middle, piece_start, piece_end, rows + 2, steps, margin); },
                "kink_rows", "cut_at_kinks: a row out of range");
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
  test_scalar_kinks(at::kFloat);
  test_scalar_kinks(at::kDouble);
  test_overtakings();
  test_cut_at_kinks();
  std::printf(failures ? "%d checks failed\n" : "all kernel checks passed\n", failures);
  return failures ? 1 : 0;
}
