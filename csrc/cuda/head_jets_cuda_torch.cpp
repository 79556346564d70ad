// The torch-facing side of the CUDA head-jets kernels: argument checks (head_checks.h, the same
// as the CPU kernels), contiguous inputs, outputs and scratch from torch's caching allocator,
// the input's device made current, launches on the current stream, and every launch checked.
// Registered under the CUDA dispatch key of the schemas in csrc/ops.cpp. (Not named
// head_jets_cuda.cpp: torch's extension build names objects by file stem, and that would clash
// with head_jets_cuda.cu.)
// Per-operator ATen headers instead of <ATen/ATen.h>: this file then compiles in half the time.
#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "../head_checks.h"
#include "head_jets_cuda.h"

namespace csm_ext {
namespace {

void check_cuda_args(const at::Tensor& z, const HeadDims& d) {
  TORCH_CHECK_VALUE(z.is_cuda(), "csm_ext: z must be a CUDA tensor for the CUDA kernels; got ",
                    z.device());
  TORCH_CHECK_VALUE(d.H <= cuda::kMaxHidden, "csm_ext: the CUDA kernels support H <= ",
                    cuda::kMaxHidden, "; got H = ", d.H);
  TORCH_CHECK_VALUE(d.L <= (int64_t{1} << 20), "csm_ext: too many layers: L = ", d.L);
}

template <typename scalar_t>
cuda::HeadArgs<scalar_t> head_args(const at::Tensor& z, const at::Tensor& x, const at::Tensor& u,
                                   const at::Tensor& W, const at::Tensor& b, const at::Tensor& w,
                                   double alpha, const HeadDims& d) {
  return {z.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
          W.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
          alpha,                  d.N,                    d.H,
          d.L};
}

// A scratch buffer of n values (an undefined tensor, null pointer, when n == 0).
at::Tensor scratch(int64_t n, const at::Tensor& like) {
  return n > 0 ? at::empty({n}, like.options()) : at::Tensor();
}

template <typename scalar_t>
scalar_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> head_jets_cuda(
    const at::Tensor& z_in, const at::Tensor& x_in, const at::Tensor& u_in, const at::Tensor& W_in,
    const at::Tensor& b_in, const at::Tensor& w_in, double alpha, c10::string_view activation) {
  const Activation act = parse_activation(std::string(activation));
  const at::AutoDispatchBelowAutograd below_autograd;  // internal ops record no graph
  const HeadInputs in = prepare_head_inputs(z_in, x_in, u_in, W_in, b_in, w_in, alpha);
  const HeadDims d = in.d;
  check_cuda_args(z_in, d);
  const c10::cuda::CUDAGuard device_guard(z_in.device());
  const at::Tensor &z = in.z, &x = in.x, &u = in.u, &W = in.W, &b = in.b, &w = in.w;
  at::Tensor E = at::empty({d.N}, x.options());
  at::Tensor dE = at::empty({d.N}, x.options());
  at::Tensor d2E = at::empty({d.N}, x.options());
  if (d.N == 0) return {E, dE, d2E};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(z.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "head_jets_cuda", [&] {
    cuda::Plan plan;
    C10_CUDA_CHECK(cuda::plan_forward<scalar_t>(act, d.N, d.H, d.L, z.device().index(), &plan));
    const at::Tensor workspace = scratch(plan.workspace_elems, z);
    C10_CUDA_CHECK(cuda::launch_forward<scalar_t>(
        plan, act, head_args<scalar_t>(z, x, u, W, b, w, alpha, d), ptr_or_null<scalar_t>(workspace),
        E.data_ptr<scalar_t>(), dE.data_ptr<scalar_t>(), d2E.data_ptr<scalar_t>(), stream));
  });
  return {E, dE, d2E};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
head_jets_backward_cuda(const at::Tensor& grad_E, const at::Tensor& grad_dE,
                        const at::Tensor& grad_d2E, const at::Tensor& z_in, const at::Tensor& x_in,
                        const at::Tensor& u_in, const at::Tensor& W_in, const at::Tensor& b_in,
                        const at::Tensor& w_in, double alpha, c10::string_view activation,
                        bool /*weight_grads*/) {
  // The CUDA backward always computes the weight gradients (they come from the same block
  // reduction as grad_z); weight_grads=False is honoured by the CPU kernel only.
  const Activation act = parse_activation(std::string(activation));
  const at::AutoDispatchBelowAutograd below_autograd;
  const HeadInputs in = prepare_head_inputs(z_in, x_in, u_in, W_in, b_in, w_in, alpha);
  const HeadDims d = in.d;
  check_grad_arg(grad_E, "grad_E", z_in);
  check_grad_arg(grad_dE, "grad_dE", z_in);
  check_grad_arg(grad_d2E, "grad_d2E", z_in);
  check_cuda_args(z_in, d);
  const c10::cuda::CUDAGuard device_guard(z_in.device());
  const at::Tensor &z = in.z, &x = in.x, &u = in.u, &W = in.W, &b = in.b, &w = in.w;
  const at::Tensor gE = grad_E.contiguous(), gdE = grad_dE.contiguous(),
                   gd2E = grad_d2E.contiguous();
  at::Tensor gz = at::empty({d.N, d.H}, z.options());
  at::Tensor gx = at::empty({d.N}, x.options());
  if (d.N == 0) {
    return {gz, gx, at::zeros_like(u), at::zeros_like(W), at::zeros_like(b), at::zeros_like(w)};
  }
  // Every entry of the weight gradients is written by the reduction kernel.
  at::Tensor gu = at::empty_like(u), gW = at::empty_like(W), gb = at::empty_like(b),
             gw = at::empty_like(w);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(z.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "head_jets_backward_cuda", [&] {
    cuda::Plan plan;
    C10_CUDA_CHECK(cuda::plan_backward<scalar_t>(act, d.N, d.H, d.L, z.device().index(), &plan));
    const at::Tensor workspace = scratch(plan.workspace_elems, z);
    const at::Tensor partial = scratch(plan.partial_elems, z);
    const cuda::HeadGrads<scalar_t> grads{
        gE.data_ptr<scalar_t>(), gdE.data_ptr<scalar_t>(), gd2E.data_ptr<scalar_t>(),
        gz.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),  gu.data_ptr<scalar_t>(),
        gW.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>(),  gw.data_ptr<scalar_t>()};
    C10_CUDA_CHECK(cuda::launch_backward<scalar_t>(
        plan, act, head_args<scalar_t>(z, x, u, W, b, w, alpha, d), grads,
        ptr_or_null<scalar_t>(workspace), ptr_or_null<scalar_t>(partial), stream));
  });
  return {gz, gx, gu, gW, gb, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(csm_ext, CUDA, m) {
  m.impl("head_jets", &head_jets_cuda);
  m.impl("head_jets_backward", &head_jets_backward_cuda);
}

}  // namespace csm_ext
