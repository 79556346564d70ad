// Host-side argument checking shared by the CPU and CUDA launchers (the compile-time switches
// are in static_switch.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <type_traits>

#include "head_math.h"
#include "static_switch.h"  // dispatch_activation

namespace csm_ext {

inline Activation parse_activation(const std::string& name) {
  if (name == "softplus") return Activation::Softplus;
  if (name == "tanh") return Activation::Tanh;
  if (name == "silu") return Activation::SiLU;
  TORCH_CHECK_VALUE(false, "csm_ext: activation must be one of 'softplus', 'tanh', 'silu'; got '",
                    name, "'");
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

// The head's inputs, checked and made contiguous: what every head-jets launcher (CPU, CUDA)
// starts from.
struct HeadInputs {
  at::Tensor z, x, u, W, b, w;
  HeadDims d;
};

inline HeadInputs prepare_head_inputs(const at::Tensor& z, const at::Tensor& x,
                                      const at::Tensor& u, const at::Tensor& W,
                                      const at::Tensor& b, const at::Tensor& w, double alpha) {
  const HeadDims d = check_head_args(z, x, u, W, b, w, alpha);
  return {z.contiguous(), x.contiguous(), u.contiguous(), W.contiguous(), b.contiguous(),
          w.contiguous(), d};
}

// Checks of the quadrature ops (node energies, log Z and their backwards), every backend;
// returns the head's dimensions.
inline HeadDims check_quad_args(const at::Tensor& z, const at::Tensor& u, const at::Tensor& W,
                         const at::Tensor& b, const at::Tensor& w, double alpha,
                         const at::Tensor& nodes, const at::Tensor* log_weights) {
  TORCH_CHECK_VALUE(nodes.dim() == 1 && nodes.size(0) >= 2,
                    "csm_ext: nodes must have shape (G,) with G >= 2; got ", nodes.sizes());
  TORCH_CHECK_VALUE(z.dim() == 2 && z.size(1) >= 1,
                    "csm_ext: z must have shape (N, H) with H >= 1; got ", z.sizes());
  // The head checks want an x of shape (N,): the element count is z's.
  const HeadDims d = check_head_args(z, z.select(1, 0), u, W, b, w, alpha);
  check_same(nodes, "nodes", z);
  if (log_weights != nullptr) {
    TORCH_CHECK_VALUE(log_weights->dim() == 1 && log_weights->size(0) == nodes.size(0),
                      "csm_ext: log_weights must have shape (", nodes.size(0), ",); got ",
                      log_weights->sizes());
    check_same(*log_weights, "log_weights", z);
  }
  return d;
}

// The quadrature ops' inputs made contiguous (lw undefined when there are no log-weights).
struct QuadInputs {
  at::Tensor z, u, W, b, w, t, lw;
};

inline QuadInputs contiguous_quad_inputs(const at::Tensor& z, const at::Tensor& u,
                                         const at::Tensor& W, const at::Tensor& b,
                                         const at::Tensor& w, const at::Tensor& nodes,
                                         const at::Tensor* log_weights) {
  return {z.contiguous(), u.contiguous(), W.contiguous(), b.contiguous(), w.contiguous(),
          nodes.contiguous(), log_weights != nullptr ? log_weights->contiguous() : at::Tensor()};
}

}  // namespace csm_ext
