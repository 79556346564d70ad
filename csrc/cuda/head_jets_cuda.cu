// CUDA kernels of the energy-head jets (forward) and their gradients (backward).
//
// Design (the algorithm itself is in head_jets_block.h, shared with a host emulator):
//  * persistent blocks of 256 threads; a block walks tiles of T elements with a grid stride;
//  * tiled path (H <= 128, padded to HP in {32, 64, 128}): the head weights are staged once per
//    block in shared memory; a tile's jets (3T x HP: value, d/dx, d²/dx² rows) live in shared
//    memory and each layer is one register-tiled product with W_l (the jets pass linearly);
//  * generic path (any H, or when the tiled path's shared memory does not fit): same stages
//    with plain loops, W read from global memory (L1/L2), block memory in shared memory when it
//    fits, else in a global workspace;
//  * the backward recomputes its tile's forward, keeping the pre-activation jets of every layer
//    in block memory (nothing H-wide goes to global memory), and accumulates the weight
//    gradients in a per-block record (shared memory, or the block's slice of the partials);
//    a second kernel sums the records over blocks in block order: deterministic for a device.
// Only the math of head_math.h is used for the pointwise work; no torch headers here.
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "../static_switch.h"
#include "head_jets_cuda.h"
#include "launch_utils.h"

namespace csm_ext {
namespace cuda {
namespace {

using namespace cuda_block;

template <Activation A, class Cfg, typename S>
__global__ void __launch_bounds__(kThreads)
    head_jets_forward_kernel(Cfg cfg, HeadPtrs<S> p, Layout lay, S* workspace, S* E, S* dE,
                             S* d2E) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  S* base = workspace != nullptr ? workspace + int64_t(blockIdx.x) * lay.total
                                 : reinterpret_cast<S*>(smem_raw);
  const BlockMem<S> m = carve(base, lay, p, static_cast<S*>(nullptr));
  DeviceExec ex;
  forward_block<A>(ex, cfg, p, m, E, dE, d2E, blockIdx.x, gridDim.x);
}

template <Activation A, class Cfg, typename S>
__global__ void __launch_bounds__(kThreads)
    head_jets_backward_kernel(Cfg cfg, HeadPtrs<S> p, GradPtrs<S> g, Layout lay, S* workspace,
                              int64_t record_size) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  S* base = workspace != nullptr ? workspace + int64_t(blockIdx.x) * lay.total
                                 : reinterpret_cast<S*>(smem_raw);
  const BlockMem<S> m = carve(base, lay, p, g.partial + int64_t(blockIdx.x) * record_size);
  DeviceExec ex;
  backward_block<A>(ex, cfg, p, m, g, blockIdx.x, gridDim.x);
}

template <typename S>
__global__ void __launch_bounds__(kThreads)
    reduce_records_kernel(const S* partial, int64_t nblocks, int H, int HP, int L, S* gu, S* gW,
                          S* gb, S* gw, int64_t count) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) reduce_record_entry(i, partial, nblocks, H, HP, L, gu, gW, gb, gw);
}

// ---- compile-time dispatch (static_switch.h) ----------------------------------------------------

template <class F>
void with_activation(Activation act, F&& f) {
  dispatch_activation(act, f);
}

// f(Cfg{}) with the tiled configuration of padded width hp (32, 64 or 128).
template <typename S, class F>
void with_tiled_cfg(int hp, F&& f) {
  dispatch_tiled_width(hp, [&](auto width) {
    constexpr int W = decltype(width)::value;
    f(FastCfg<S, W, fast_tile<S>(W)>{});
  });
}

template <typename S, bool kBackward>
cudaError_t make_plan(Activation act, int64_t N, int64_t H, int64_t L, int device, Plan* plan) {
  *plan = Plan{};
  if (N == 0) return cudaSuccess;
  DeviceInfo info;
  cudaError_t err = device_info(device, &info);
  if (err != cudaSuccess) return err;
  constexpr int V = VecWidth<S>::value;
  const int h = static_cast<int>(H), layers = static_cast<int>(L);

  // Tiled path: every buffer (weights, jets, and if it costs no occupancy the gradient record)
  // in shared memory.
  if (!force_generic() && H <= 128) {
    const int hp = tiled_width(H);
    with_activation(act, [&](auto A) {
      with_tiled_cfg<S>(hp, [&](auto cfg) {
        using Cfg = decltype(cfg);
        int best = 0;
        for (int acc_local = kBackward ? 1 : 0; acc_local >= 0 && err == cudaSuccess; --acc_local) {
          const Layout lay = make_layout(cfg.HP(), cfg.T(), cfg.RS(), layers, V, kBackward, true,
                                         acc_local != 0);
          const int64_t bytes = lay.total * int64_t(sizeof(S));
          int nb = 0;
          if constexpr (kBackward) {
            err = blocks_per_sm(head_jets_backward_kernel<decltype(A)::value, Cfg, S>, kThreads, bytes,
                                device, info, &nb);
          } else {
            err = blocks_per_sm(head_jets_forward_kernel<decltype(A)::value, Cfg, S>, kThreads, bytes,
                                device, info, &nb);
          }
          if (nb > best) {  // the local record is tried first and kept on a tie
            best = nb;
            plan->path = Path::Tiled;
            plan->hp = cfg.HP();
            plan->tile = cfg.T();
            plan->smem_bytes = bytes;
            plan->layout = lay;
            plan->grid = int64_t(nb) * info.sms;
          }
        }
      });
    });
    if (err != cudaSuccess) return err;
  }

  if (plan->path == Path::None) {
    // Generic path: the largest tile whose block memory fits in shared memory, else a global
    // workspace per block.
    with_activation(act, [&](auto A) {
      using Cfg = GenericCfg<S>;
      auto occupancy = [&](int64_t bytes, int* nb) {
        if constexpr (kBackward) {
          return blocks_per_sm(head_jets_backward_kernel<decltype(A)::value, Cfg, S>, kThreads, bytes,
                               device, info, nb);
        } else {
          return blocks_per_sm(head_jets_forward_kernel<decltype(A)::value, Cfg, S>, kThreads, bytes,
                               device, info, nb);
        }
      };
      for (int tile = 32; tile >= 1 && err == cudaSuccess; tile /= 2) {
        const Layout lay = make_layout(h, tile, h, layers, V, kBackward, false, false);
        const int64_t bytes = lay.total * int64_t(sizeof(S));
        int nb = 0;
        err = occupancy(bytes, &nb);
        if (nb > 0) {
          plan->path = Path::Generic;
          plan->hp = h;
          plan->tile = tile;
          plan->smem_bytes = bytes;
          plan->layout = lay;
          plan->grid = int64_t(nb) * info.sms;
          break;
        }
      }
      if (err == cudaSuccess && plan->path == Path::None) {
        const int tile = 8;
        const Layout lay = make_layout(h, tile, h, layers, V, kBackward, false, false);
        int nb = 0;
        err = occupancy(0, &nb);
        const int64_t per_block = lay.total * int64_t(sizeof(S));
        const int64_t cap = kWorkspaceBudgetBytes / per_block;
        const int64_t grid = int64_t(nb > 0 ? nb : 1) * info.sms;
        plan->path = Path::Generic;
        plan->hp = h;
        plan->tile = tile;
        plan->smem_bytes = 0;
        plan->layout = lay;
        plan->grid = grid < cap ? grid : cap;  // clamped to >= 1 below
        plan->workspace_elems = -1;           // sized below, once the grid is final
      }
    });
    if (err != cudaSuccess) return err;
  }

  const int64_t tiles = (N + plan->tile - 1) / plan->tile;
  if (plan->grid > tiles) plan->grid = tiles;
  if (kBackward) {
    const int64_t record = make_record(plan->hp, layers).size;
    const int64_t cap = kPartialBudgetBytes / (record * int64_t(sizeof(S)));
    if (plan->grid > cap) plan->grid = cap > 1 ? cap : 1;
    plan->partial_elems = plan->grid * record;
  }
  if (plan->grid < 1) plan->grid = 1;
  if (plan->workspace_elems != 0) plan->workspace_elems = plan->grid * plan->layout.total;
  return cudaSuccess;
}

template <typename S>
HeadPtrs<S> head_ptrs(const HeadArgs<S>& a) {
  return HeadPtrs<S>{a.z, a.x, a.u, a.W, a.b, a.w, static_cast<S>(a.alpha), a.N,
                     static_cast<int>(a.H), static_cast<int>(a.L)};
}

}  // namespace

template <typename S>
cudaError_t plan_forward(Activation act, int64_t N, int64_t H, int64_t L, int device, Plan* plan) {
  return make_plan<S, false>(act, N, H, L, device, plan);
}

template <typename S>
cudaError_t plan_backward(Activation act, int64_t N, int64_t H, int64_t L, int device, Plan* plan) {
  return make_plan<S, true>(act, N, H, L, device, plan);
}

template <typename S>
cudaError_t launch_forward(const Plan& plan, Activation act, const HeadArgs<S>& args, S* workspace,
                           S* E, S* dE, S* d2E, cudaStream_t stream) {
  if (plan.path == Path::None) return cudaSuccess;
  const HeadPtrs<S> p = head_ptrs(args);
  const dim3 grid(static_cast<unsigned>(plan.grid)), block(kThreads);
  const size_t smem = static_cast<size_t>(plan.smem_bytes);
  S* ws = plan.workspace_elems > 0 ? workspace : nullptr;
  with_activation(act, [&](auto A) {
    constexpr Activation kA = decltype(A)::value;
    if (plan.path == Path::Tiled) {
      with_tiled_cfg<S>(plan.hp, [&](auto cfg) {
        head_jets_forward_kernel<kA, decltype(cfg), S>
            <<<grid, block, smem, stream>>>(cfg, p, plan.layout, nullptr, E, dE, d2E);
      });
    } else {
      const GenericCfg<S> cfg{p.H, plan.tile};
      head_jets_forward_kernel<kA, GenericCfg<S>, S>
          <<<grid, block, smem, stream>>>(cfg, p, plan.layout, ws, E, dE, d2E);
    }
  });
  return cudaGetLastError();
}

template <typename S>
cudaError_t launch_backward(const Plan& plan, Activation act, const HeadArgs<S>& args,
                            const HeadGrads<S>& grads, S* workspace, S* partial,
                            cudaStream_t stream) {
  if (plan.path == Path::None) return cudaSuccess;
  const HeadPtrs<S> p = head_ptrs(args);
  const GradPtrs<S> g{grads.gE, grads.gdE, grads.gd2E, grads.gz, grads.gx, partial};
  const int64_t record = make_record(plan.hp, p.L).size;
  const dim3 grid(static_cast<unsigned>(plan.grid)), block(kThreads);
  const size_t smem = static_cast<size_t>(plan.smem_bytes);
  S* ws = plan.workspace_elems > 0 ? workspace : nullptr;
  with_activation(act, [&](auto A) {
    constexpr Activation kA = decltype(A)::value;
    if (plan.path == Path::Tiled) {
      with_tiled_cfg<S>(plan.hp, [&](auto cfg) {
        head_jets_backward_kernel<kA, decltype(cfg), S>
            <<<grid, block, smem, stream>>>(cfg, p, g, plan.layout, nullptr, record);
      });
    } else {
      const GenericCfg<S> cfg{p.H, plan.tile};
      head_jets_backward_kernel<kA, GenericCfg<S>, S>
          <<<grid, block, smem, stream>>>(cfg, p, g, plan.layout, ws, record);
    }
  });
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t count = reduce_record_count(p.H, p.L);
  const int64_t rgrid = (count + kThreads - 1) / kThreads;
  reduce_records_kernel<S><<<static_cast<unsigned>(rgrid), kThreads, 0, stream>>>(
      partial, plan.grid, p.H, plan.hp, p.L, grads.gu, grads.gW, grads.gb, grads.gw, count);
  return cudaGetLastError();
}

#define CSM_INSTANTIATE(S)                                                                       \
  template cudaError_t plan_forward<S>(Activation, int64_t, int64_t, int64_t, int, Plan*);      \
  template cudaError_t plan_backward<S>(Activation, int64_t, int64_t, int64_t, int, Plan*);     \
  template cudaError_t launch_forward<S>(const Plan&, Activation, const HeadArgs<S>&, S*, S*, S*, \
                                         S*, cudaStream_t);                                      \
  template cudaError_t launch_backward<S>(const Plan&, Activation, const HeadArgs<S>&,          \
                                          const HeadGrads<S>&, S*, S*, cudaStream_t);
CSM_INSTANTIATE(float)
CSM_INSTANTIATE(double)
#undef CSM_INSTANTIATE

}  // namespace cuda
}  // namespace csm_ext
