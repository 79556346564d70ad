// Plain launcher API of the CUDA head-jets kernels (csrc/cuda/head_jets_cuda.cu).
//
// No torch here: the torch-facing side (head_jets_cuda_torch.cpp) checks arguments, allocates the
// outputs and scratch buffers with torch's allocator, and calls these on the current stream.
// A call is two steps: plan_* picks the kernel, tile, grid and the scratch sizes for this
// device; launch_* runs it with the buffers the caller allocated.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../head_math.h"
#include "head_jets_block.h"

namespace csm_ext {
namespace cuda {

template <typename S>
struct HeadArgs {
  const S* z;  // (N, H), contiguous
  const S* x;  // (N,)
  const S* u;  // (H,)
  const S* W;  // (L-1, H, H)
  const S* b;  // (L-1, H)
  const S* w;  // (H,)
  double alpha;
  int64_t N, H, L;
};

template <typename S>
struct HeadGrads {
  const S* gE;  // (N,) gradients of E, dE, d2E
  const S* gdE;
  const S* gd2E;
  S* gz;  // (N, H)
  S* gx;  // (N,)
  S* gu;  // (H,)
  S* gW;  // (L-1, H, H)
  S* gb;  // (L-1, H)
  S* gw;  // (H,)
};

enum class Path : int { None = 0, Tiled = 1, Generic = 2 };

struct Plan {
  Path path = Path::None;  // None: N == 0, nothing to launch
  int hp = 0;              // padded width of the tiled path (32, 64, 128)
  int tile = 0;            // elements per tile
  int64_t grid = 0;        // persistent blocks
  int64_t smem_bytes = 0;  // dynamic shared memory per block
  int64_t workspace_elems = 0;  // global scratch (generic path, block memory too big for smem)
  int64_t partial_elems = 0;    // backward: grid x per-block gradient record
  cuda_block::Layout layout{};
};

// The largest H the CUDA kernels accept (indices inside a tile are 32-bit).
constexpr int64_t kMaxHidden = 1 << 16;

template <typename S>
cudaError_t plan_forward(Activation act, int64_t N, int64_t H, int64_t L, int device, Plan* plan);
template <typename S>
cudaError_t plan_backward(Activation act, int64_t N, int64_t H, int64_t L, int device, Plan* plan);

// workspace: plan.workspace_elems values (may be null when 0).
template <typename S>
cudaError_t launch_forward(const Plan& plan, Activation act, const HeadArgs<S>& args, S* workspace,
                           S* E, S* dE, S* d2E, cudaStream_t stream);
// partial: plan.partial_elems values; every output of grads is written (nothing to zero).
template <typename S>
cudaError_t launch_backward(const Plan& plan, Activation act, const HeadArgs<S>& args,
                            const HeadGrads<S>& grads, S* workspace, S* partial,
                            cudaStream_t stream);

}  // namespace cuda
}  // namespace csm_ext
