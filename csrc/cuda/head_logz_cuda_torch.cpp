// The torch-facing side of the CUDA quadrature kernels (head_node_energies, head_logz and their
// backward): the argument checks of the CPU kernels (head_checks.h, same messages), contiguous
// inputs, outputs and scratch from torch's caching allocator, the input's device made current,
// launches on the current stream, every launch checked. Registered under the CUDA dispatch key
// of the schemas in csrc/ops.cpp. (Not named head_logz_cuda.cpp: torch's extension build names
// objects by file stem, and that would clash with head_logz_cuda.cu.)
#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "../head_checks.h"
#include "head_logz_cuda.h"

namespace csm_ext {
namespace {

// The checks of the CPU kernels (head_checks.h), then the CUDA kernels' own limits.
HeadDims check_quad_cuda_args(const at::Tensor& z, const at::Tensor& u, const at::Tensor& W,
                              const at::Tensor& b, const at::Tensor& w, double alpha,
                              const at::Tensor& nodes, const at::Tensor* log_weights) {
  const HeadDims d = check_quad_args(z, u, W, b, w, alpha, nodes, log_weights);
  TORCH_CHECK_VALUE(z.is_cuda(), "csm_ext: z must be a CUDA tensor for the CUDA kernels; got ",
                    z.device());
  TORCH_CHECK_VALUE(d.H <= cuda::kMaxHidden, "csm_ext: the CUDA quadrature kernels support H <= ",
                    cuda::kMaxHidden, "; got H = ", d.H);
  TORCH_CHECK_VALUE(d.L <= (int64_t{1} << 20), "csm_ext: too many layers: L = ", d.L);
  TORCH_CHECK_VALUE(nodes.size(0) <= cuda::kMaxNodes,
                    "csm_ext: the CUDA quadrature kernels support G <= ", cuda::kMaxNodes,
                    " nodes; got G = ", nodes.size(0));
  return d;
}



template <typename scalar_t>
cuda::QuadArgs<scalar_t> quad_args(const QuadInputs& c, double alpha, const HeadDims& d, int64_t G) {
  return {c.z.data_ptr<scalar_t>(),
          c.u.data_ptr<scalar_t>(),
          c.W.data_ptr<scalar_t>(),
          c.b.data_ptr<scalar_t>(),
          c.w.data_ptr<scalar_t>(),
          c.t.data_ptr<scalar_t>(),
          c.lw.defined() ? c.lw.data_ptr<scalar_t>() : nullptr,
          alpha,
          d.N,
          d.H,
          d.L,
          G};
}

// A scratch buffer of n values (an undefined tensor, null pointer, when n == 0).
at::Tensor scratch(int64_t n, const at::Tensor& like) {
  return n > 0 ? at::empty({n}, like.options()) : at::Tensor();
}

template <typename scalar_t>
scalar_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

cudaStream_t current_stream(const at::Tensor& z) {
  return c10::cuda::getCurrentCUDAStream(z.device().index()).stream();
}

// Forward of both ops: log Z (N,) when log_weights is given, else the node energies (N, G).
at::Tensor forward_common(const at::Tensor& z_in, const at::Tensor& u, const at::Tensor& W,
                          const at::Tensor& b, const at::Tensor& w, double alpha,
                          c10::string_view activation, const at::Tensor& nodes,
                          const at::Tensor* log_weights) {
  const Activation act = parse_activation(std::string(activation));
  const at::AutoDispatchBelowAutograd below_autograd;  // internal ops record no graph
  const HeadDims d = check_quad_cuda_args(z_in, u, W, b, w, alpha, nodes, log_weights);
  const c10::cuda::CUDAGuard device_guard(z_in.device());
  const QuadInputs c = contiguous_quad_inputs(z_in, u, W, b, w, nodes, log_weights);
  const int64_t G = nodes.size(0);
  const bool logz = log_weights != nullptr;
  at::Tensor out = logz ? at::empty({d.N}, c.z.options()) : at::empty({d.N, G}, c.z.options());
  if (d.N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(c.z.scalar_type(), "head_quadrature_cuda", [&] {
    cuda::QuadPlan plan;
    C10_CUDA_CHECK(cuda::plan_quad_forward<scalar_t>(act, d.N, d.H, d.L, G, c.z.device().index(),
                                                     &plan));
    const at::Tensor workspace = scratch(plan.workspace_elems, c.z);
    C10_CUDA_CHECK(cuda::launch_quad_forward<scalar_t>(
        plan, act, quad_args<scalar_t>(c, alpha, d, G), logz, ptr_or_null<scalar_t>(workspace),
        out.data_ptr<scalar_t>(), current_stream(c.z)));
  });
  return out;
}

using WeightGradTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

WeightGradTuple backward_common(const at::Tensor* grad_E, const at::Tensor* grad_logz,
                                const at::Tensor* logz, const at::Tensor& z_in,
                                const at::Tensor& u, const at::Tensor& W, const at::Tensor& b,
                                const at::Tensor& w, double alpha, c10::string_view activation,
                                const at::Tensor& nodes, const at::Tensor* log_weights) {
  const Activation act = parse_activation(std::string(activation));
  const at::AutoDispatchBelowAutograd below_autograd;
  const HeadDims d = check_quad_cuda_args(z_in, u, W, b, w, alpha, nodes, log_weights);
  const int64_t G = nodes.size(0);
  at::Tensor gE, gl, lz;
  if (grad_E != nullptr) {
    TORCH_CHECK_VALUE(grad_E->dim() == 2 && grad_E->size(0) == d.N && grad_E->size(1) == G,
                      "csm_ext: grad_E must have shape (", d.N, ", ", G, "); got ",
                      grad_E->sizes());
    check_same(*grad_E, "grad_E", z_in);
    gE = grad_E->contiguous();
  } else {
    check_grad_arg(*grad_logz, "grad_logz", z_in);
    check_grad_arg(*logz, "logz", z_in);
    gl = grad_logz->contiguous();
    lz = logz->contiguous();
  }
  const c10::cuda::CUDAGuard device_guard(z_in.device());
  const QuadInputs c = contiguous_quad_inputs(z_in, u, W, b, w, nodes, log_weights);
  // grad_z: each element's first chunk writes its row; the weight gradients: every entry is
  // written by the reduction kernel.
  at::Tensor gz = at::empty({d.N, d.H}, c.z.options());
  if (d.N == 0) {
    return {gz, at::zeros_like(c.u), at::zeros_like(c.W), at::zeros_like(c.b),
            at::zeros_like(c.w)};
  }
  at::Tensor gu = at::empty_like(c.u), gW = at::empty_like(c.W), gb = at::empty_like(c.b),
             gw = at::empty_like(c.w);
  AT_DISPATCH_FLOATING_TYPES(c.z.scalar_type(), "head_quadrature_backward_cuda", [&] {
    cuda::QuadPlan plan;
    C10_CUDA_CHECK(cuda::plan_quad_backward<scalar_t>(act, d.N, d.H, d.L, G,
                                                      c.z.device().index(), &plan));
    const at::Tensor workspace = scratch(plan.workspace_elems, c.z);
    const at::Tensor partial = scratch(plan.partial_elems, c.z);
    const cuda::QuadGradArgs<scalar_t> grads{
        ptr_or_null<scalar_t>(gE), ptr_or_null<scalar_t>(gl), ptr_or_null<scalar_t>(lz),
        gz.data_ptr<scalar_t>(),   gu.data_ptr<scalar_t>(),   gW.data_ptr<scalar_t>(),
        gb.data_ptr<scalar_t>(),   gw.data_ptr<scalar_t>()};
    C10_CUDA_CHECK(cuda::launch_quad_backward<scalar_t>(
        plan, act, quad_args<scalar_t>(c, alpha, d, G), grads, ptr_or_null<scalar_t>(workspace),
        ptr_or_null<scalar_t>(partial), current_stream(c.z)));
  });
  return {gz, gu, gW, gb, gw};
}

at::Tensor node_energies_cuda(const at::Tensor& z, const at::Tensor& u, const at::Tensor& W,
                              const at::Tensor& b, const at::Tensor& w, double alpha,
                              c10::string_view activation, const at::Tensor& nodes) {
  return forward_common(z, u, W, b, w, alpha, activation, nodes, nullptr);
}

at::Tensor logz_cuda(const at::Tensor& z, const at::Tensor& u, const at::Tensor& W,
                     const at::Tensor& b, const at::Tensor& w, double alpha,
                     c10::string_view activation, const at::Tensor& nodes,
                     const at::Tensor& log_weights) {
  return forward_common(z, u, W, b, w, alpha, activation, nodes, &log_weights);
}

WeightGradTuple node_energies_backward_cuda(const at::Tensor& grad_E, const at::Tensor& z,
                                            const at::Tensor& u, const at::Tensor& W,
                                            const at::Tensor& b, const at::Tensor& w,
                                            double alpha, c10::string_view activation,
                                            const at::Tensor& nodes) {
  return backward_common(&grad_E, nullptr, nullptr, z, u, W, b, w, alpha, activation, nodes,
                         nullptr);
}

WeightGradTuple logz_backward_cuda(const at::Tensor& grad_logz, const at::Tensor& logz,
                                   const at::Tensor& z, const at::Tensor& u, const at::Tensor& W,
                                   const at::Tensor& b, const at::Tensor& w, double alpha,
                                   c10::string_view activation, const at::Tensor& nodes,
                                   const at::Tensor& log_weights) {
  return backward_common(nullptr, &grad_logz, &logz, z, u, W, b, w, alpha, activation, nodes,
                         &log_weights);
}

}  // namespace

TORCH_LIBRARY_IMPL(csm_ext, CUDA, m) {
  m.impl("head_node_energies", &node_energies_cuda);
  m.impl("head_node_energies_backward", &node_energies_backward_cuda);
  m.impl("head_logz", &logz_cuda);
  m.impl("head_logz_backward", &logz_backward_cuda);
}

}  // namespace csm_ext
