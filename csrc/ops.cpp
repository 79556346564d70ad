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
  // weight_grads=False: only grad_z and grad_x are computed (the weight gradients come back as
  // zeros), for callers whose head weights need no gradient.
  m.def(
      "head_jets_backward(Tensor grad_E, Tensor grad_dE, Tensor grad_d2E, Tensor z, Tensor x, "
      "Tensor u, Tensor W, Tensor b, Tensor w, float alpha, str activation, "
      "bool weight_grads=True) -> "
      "(Tensor grad_z, Tensor grad_x, Tensor grad_u, Tensor grad_W, Tensor grad_b, "
      "Tensor grad_w)");

  // Quadrature of the head's normaliser. `nodes` (G,) are points t_g of the support and
  // `log_weights` (G,) their log quadrature weights; nothing N×G×H is ever stored.
  // Energies at every node: E[n, g] = E(z_n, t_g), shape (N, G).
  m.def(
      "head_node_energies(Tensor z, Tensor u, Tensor W, Tensor b, Tensor w, float alpha, "
      "str activation, Tensor nodes) -> Tensor E");
  // Its vector-Jacobian product: gradients for (z, u, W, b, w) given grad_E (N, G).
  m.def(
      "head_node_energies_backward(Tensor grad_E, Tensor z, Tensor u, Tensor W, Tensor b, "
      "Tensor w, float alpha, str activation, Tensor nodes) -> (Tensor grad_z, Tensor grad_u, "
      "Tensor grad_W, Tensor grad_b, Tensor grad_w)");
  // log Z_n = logsumexp_g(−E(z_n, t_g) + log_weights_g), shape (N,).
  m.def(
      "head_logz(Tensor z, Tensor u, Tensor W, Tensor b, Tensor w, float alpha, "
      "str activation, Tensor nodes, Tensor log_weights) -> Tensor logz");
  // Its vector-Jacobian product, −Σ_g p_ng ∂E(z_n, t_g)/∂(z, u, W, b, w) · grad_logz_n with
  // p = softmax_g(−E + log_weights) = exp(−E + log_weights − logz): `logz` is the forward's output.
  m.def(
      "head_logz_backward(Tensor grad_logz, Tensor logz, Tensor z, Tensor u, Tensor W, Tensor b, "
      "Tensor w, float alpha, str activation, Tensor nodes, Tensor log_weights) -> "
      "(Tensor grad_z, Tensor grad_u, Tensor grad_W, Tensor grad_b, Tensor grad_w)");
}

