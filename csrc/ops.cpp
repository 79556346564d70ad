// Operator schemas of csm_ext: one block for every backend.
//
// Kernels register themselves per dispatch key in csrc/cpu and csrc/cuda; Python adds the fake
// (meta) kernels and autograd formulas in csm_ext/ops.py. C++ users link this library (see
// CMakeLists.txt) and call the ops through the dispatcher.
#include <torch/library.h>

TORCH_LIBRARY(csm_ext, m) {
  // Energy-head jets: E, dE/dx, d²E/dx² for every element, from the projected context z (N, H),
  // the scalar inputs x (N,) and the head weights u (H,), W (L-1, H, H), b (L-1, H), w (H,).
  m.def(
      "head_jets(Tensor z, Tensor x, Tensor u, Tensor W, Tensor b, Tensor w, float alpha, "
      "str activation) -> (Tensor E, Tensor dE, Tensor d2E)");
  // Its vector-Jacobian product: gradients for (z, x, u, W, b, w) given those of (E, dE, d2E).
  m.def(
      "head_jets_backward(Tensor grad_E, Tensor grad_dE, Tensor grad_d2E, Tensor z, Tensor x, "
      "Tensor u, Tensor W, Tensor b, Tensor w, float alpha, str activation) -> "
      "(Tensor grad_z, Tensor grad_x, Tensor grad_u, Tensor grad_W, Tensor grad_b, "
      "Tensor grad_w)");
}

