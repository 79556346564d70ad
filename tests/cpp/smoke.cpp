// C++ smoke test of the libtorch build: find the op in the dispatcher, run it, and check its
// first and second x-derivatives against central finite differences of E (float64).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <string>
#include <tuple>

using JetsFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, double, c10::string_view);

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("csm_ext::head_jets", "")
                .typed<JetsFn>();
  torch::manual_seed(0);
  const int64_t N = 257, H = 24, L = 3;
  auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  auto z = torch::randn({N, H}, opts), x = torch::randn({N}, opts), u = torch::randn({H}, opts);
  auto W = torch::randn({L - 1, H, H}, opts) / std::sqrt(double(H));
  auto b = torch::randn({L - 1, H}, opts), w = torch::randn({H}, opts) / std::sqrt(double(H));
  const double alpha = 0.2, eps = 1e-4;
  int failures = 0;
  for (const std::string act : {"softplus", "tanh", "silu"}) {
    auto [E, dE, d2E] = op.call(z, x, u, W, b, w, alpha, act);
    auto Ep = std::get<0>(op.call(z, x + eps, u, W, b, w, alpha, act));
    auto Em = std::get<0>(op.call(z, x - eps, u, W, b, w, alpha, act));
    const double err1 = ((Ep - Em) / (2 * eps) - dE).abs().max().item<double>();
    const double err2 = ((Ep - 2 * E + Em) / (eps * eps) - d2E).abs().max().item<double>();
    const bool ok = err1 < 1e-6 && err2 < 1e-4;
    std::printf("%-8s |dE - fd| = %.2e  |d2E - fd| = %.2e  %s\n", act.c_str(), err1, err2,
                ok ? "ok" : "FAIL");
    failures += !ok;
  }
  return failures == 0 ? 0 : 1;
}
