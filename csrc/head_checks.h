// Host-side argument checking and activation dispatch shared by the CPU and CUDA launchers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <type_traits>

#include "head_math.h"

namespace csm_ext {

inline Activation parse_activation(const std::string& name) {
  if (name == "softplus") return Activation::Softplus;
  if (name == "tanh") return Activation::Tanh;
  if (name == "silu") return Activation::SiLU;
  TORCH_CHECK_VALUE(false, "csm_ext: activation must be one of 'softplus', 'tanh', 'silu'; got '",
                    name, "'");
}

// Calls f(std::integral_constant<Activation, A>{}) so kernels get the activation at compile time.
template <typename F>
void dispatch_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::Softplus:
      f(std::integral_constant<Activation, Activation::Softplus>{});
      break;
    case Activation::Tanh:
      f(std::integral_constant<Activation, Activation::Tanh>{});
      break;
    case Activation::SiLU:
      f(std::integral_constant<Activation, Activation::SiLU>{});
      break;
  }
}

// Shapes of the head's parameters, checked once here for every backend:
//   z (N, H), x (N,), u (H,), W (L-1, H, H), b (L-1, H), w (H,).
struct HeadDims {
  int64_t N, H, L;
};

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), "csm_ext: ", name, " has dtype ",
                    t.scalar_type(), " but z has dtype ", ref.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), "csm_ext: ", name, " is on ", t.device(),
                    " but z is on ", ref.device());
}

inline HeadDims check_head_args(const at::Tensor& z, const at::Tensor& x, const at::Tensor& u,
                                const at::Tensor& W, const at::Tensor& b, const at::Tensor& w,
                                double alpha) {
  TORCH_CHECK_VALUE(z.dim() == 2, "csm_ext: z must have shape (N, H); got ", z.sizes());
  const int64_t N = z.size(0), H = z.size(1);
  TORCH_CHECK_VALUE(H >= 1, "csm_ext: z must have H >= 1 columns; got ", z.sizes());
  TORCH_CHECK_VALUE(
      z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
      "csm_ext: z must be float32 or float64; got ", z.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 1 && x.size(0) == N, "csm_ext: x must have shape (", N,
                    ",) to match z; got ", x.sizes());
  TORCH_CHECK_VALUE(u.dim() == 1 && u.size(0) == H, "csm_ext: u must have shape (", H,
                    ",); got ", u.sizes());
  TORCH_CHECK_VALUE(W.dim() == 3 && W.size(1) == H && W.size(2) == H,
                    "csm_ext: W must have shape (L-1, ", H, ", ", H, "); got ", W.sizes());
  TORCH_CHECK_VALUE(b.dim() == 2 && b.size(0) == W.size(0) && b.size(1) == H,
                    "csm_ext: b must have shape (", W.size(0), ", ", H, "); got ", b.sizes());
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == H, "csm_ext: w must have shape (", H,
                    ",); got ", w.sizes());
  TORCH_CHECK_VALUE(alpha >= 0.0, "csm_ext: alpha (confinement) must be >= 0; got ", alpha);
  check_same(x, "x", z);
  check_same(u, "u", z);
  check_same(W, "W", z);
  check_same(b, "b", z);
  check_same(w, "w", z);
  return {N, H, W.size(0) + 1};
}

inline void check_grad_arg(const at::Tensor& g, const char* name, const at::Tensor& z) {
  TORCH_CHECK_VALUE(g.dim() == 1 && g.size(0) == z.size(0), "csm_ext: ", name,
                    " must have shape (", z.size(0), ",); got ", g.sizes());
  check_same(g, name, z);
}

}  // namespace csm_ext
