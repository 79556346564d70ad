// Plain launcher API of the CUDA quadrature kernels (csrc/cuda/head_logz_cuda.cu):
// head_node_energies, head_logz and their backward.
//
// No torch here: head_logz_cuda_torch.cpp checks arguments, allocates outputs and scratch with
// torch's allocator, and calls these on the current stream. As for the head jets, a call is two
// steps: plan_quad_* picks the kernel, rows per chunk, grid and scratch sizes for this device;
// launch_quad_* runs it with the buffers the caller allocated.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../head_math.h"
#include "head_jets_cuda.h"  // Path, kMaxHidden
#include "head_logz_block.h"

namespace csm_ext {
namespace cuda {

template <typename S>
struct QuadArgs {
  const S* z;   // (N, H), contiguous
  const S* u;   // (H,)
  const S* W;   // (L-1, H, H)
  const S* b;   // (L-1, H)
  const S* w;   // (H,)
  const S* t;   // (G,) nodes
  const S* lw;  // (G,) log-weights (log Z only; null for the node energies)
  double alpha;
  int64_t N, H, L, G;
};

// Backward: exactly one of gE (node energies) or glogz + logz (log Z) is set.
template <typename S>
struct QuadGradArgs {
  const S* gE;     // (N, G)
  const S* glogz;  // (N,)
  const S* logz;   // (N,) the forward's output
  S* gz;           // (N, H)
  S* gu;           // (H,)
  S* gW;           // (L-1, H, H)
  S* gb;           // (L-1, H)
  S* gw;           // (H,)
};

struct QuadPlan {
  Path path = Path::None;  // None: N == 0, nothing to launch
  int hp = 0;              // padded width (tiled path: 32, 64, 128; generic: H)
  int rows = 0;            // rows per chunk
  int64_t grid = 0;        // persistent blocks, each owning a contiguous range of elements
  int64_t smem_bytes = 0;  // dynamic shared memory per block
  int64_t workspace_elems = 0;  // global scratch (generic path, block memory too big for smem)
  int64_t partial_elems = 0;    // backward: grid x per-block gradient record
  cuda_block::quad::Layout layout{};
};

// The largest G the kernels accept (node indices inside a chunk are 32-bit).
constexpr int64_t kMaxNodes = int64_t{1} << 30;

template <typename S>
cudaError_t plan_quad_forward(Activation act, int64_t N, int64_t H, int64_t L, int64_t G,
                              int device, QuadPlan* plan);
template <typename S>
cudaError_t plan_quad_backward(Activation act, int64_t N, int64_t H, int64_t L, int64_t G,
                               int device, QuadPlan* plan);

// logz == true: out is log Z (N,) and args.lw must be set; else out is the node energies (N, G).
// workspace: plan.workspace_elems values (may be null when 0).
template <typename S>
cudaError_t launch_quad_forward(const QuadPlan& plan, Activation act, const QuadArgs<S>& args,
                                bool logz, S* workspace, S* out, cudaStream_t stream);
// partial: plan.partial_elems values; every output of grads is written (nothing to zero).
template <typename S>
cudaError_t launch_quad_backward(const QuadPlan& plan, Activation act, const QuadArgs<S>& args,
                                 const QuadGradArgs<S>& grads, S* workspace, S* partial,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace csm_ext
