// CUDA kernels of the quadrature ops: head_node_energies, head_logz and their backward.
//
// Design (the algorithm itself is in head_logz_block.h, shared with a host emulator):
//  * the work is N·G rows, one per (element, node) pair; persistent blocks of 256 threads, block
//    b owning the contiguous elements [N·b/B, N·(b+1)/B) and walking their rows in chunks of R;
//  * tiled path (H <= 128, padded to HP in {32, 64, 128}): the head's weights staged once per
//    block in shared memory, a chunk's activations (R x HP) in shared memory, each hidden layer
//    one register-tiled product with W_l;
//  * generic path (any H, or when the tiled path's shared memory does not fit): the same stages
//    with plain loops, W read from global memory, block memory in shared memory when it fits,
//    else in a global workspace;
//  * log Z: a two-level logsumexp per chunk (16-row windows, then one thread per element merging
//    them), streamed across chunks with a running (max, sum): any G, one pass;
//  * backward: each chunk's forward is recomputed (nothing N×G×H is stored), grad_z summed by the
//    block that owns the element (block order, no atomics), weight gradients accumulated in a
//    per-block record and summed over blocks in block order by a second kernel: deterministic.
// Only the math of head_math.h is used for the pointwise work; no torch headers here.
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "../static_switch.h"
#include "head_logz_cuda.h"
#include "launch_utils.h"

namespace csm_ext {
namespace cuda {
namespace {

using namespace cuda_block;
namespace q = cuda_block::quad;

template <Activation A, class Cfg, typename S>
__global__ void __launch_bounds__(kThreads)
    quad_forward_kernel(Cfg cfg, q::QuadPtrs<S> p, q::Layout lay, S* workspace, bool logz,
                        S* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  S* base = workspace != nullptr ? workspace + int64_t(blockIdx.x) * lay.total
                                 : reinterpret_cast<S*>(smem_raw);
  const q::BlockMem<S> m = q::carve(base, lay, p, static_cast<S*>(nullptr));
  DeviceExec ex;
  q::forward_block<A>(ex, cfg, p, m, logz, out, blockIdx.x, gridDim.x);
}

template <Activation A, class Cfg, typename S>
__global__ void __launch_bounds__(kThreads)
    quad_backward_kernel(Cfg cfg, q::QuadPtrs<S> p, q::QuadGrads<S> g, q::Layout lay,
                         S* workspace, int64_t record_size) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  S* base = workspace != nullptr ? workspace + int64_t(blockIdx.x) * lay.total
                                 : reinterpret_cast<S*>(smem_raw);
  const q::BlockMem<S> m = q::carve(base, lay, p, g.partial + int64_t(blockIdx.x) * record_size);
  DeviceExec ex;
  q::backward_block<A>(ex, cfg, p, m, g, blockIdx.x, gridDim.x);
}

template <typename S>
__global__ void __launch_bounds__(kThreads)
    quad_reduce_records_kernel(const S* partial, int64_t nblocks, int H, int HP, int L, S* gu,
                               S* gW, S* gb, S* gw, int64_t count) {
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
    f(q::FastCfg<S, W, q::fast_rows<S>(W)>{});
  });
}

template <typename S, bool kBackward>
cudaError_t make_plan(Activation act, int64_t N, int64_t H, int64_t L, int64_t G, int device,
                      QuadPlan* plan) {
  *plan = QuadPlan{};
  if (N == 0) return cudaSuccess;
  DeviceInfo info;
  cudaError_t err = device_info(device, &info);
  if (err != cudaSuccess) return err;
  constexpr int V = VecWidth<S>::value;
  const int h = static_cast<int>(H), layers = static_cast<int>(L);

  // Tiled path: weights, activations and (if it costs no occupancy) the record in shared memory.
  if (!force_generic() && H <= 128) {
    const int hp = tiled_width(H);
    with_activation(act, [&](auto A) {
      with_tiled_cfg<S>(hp, [&](auto cfg) {
        using Cfg = decltype(cfg);
        int best = 0;
        for (int acc_local = kBackward ? 1 : 0; acc_local >= 0 && err == cudaSuccess; --acc_local) {
          const q::Layout lay = q::make_layout(cfg.HP(), cfg.R(), cfg.RS(), layers, V, kBackward,
                                               true, acc_local != 0);
          const int64_t bytes = lay.total * int64_t(sizeof(S));
          int nb = 0;
          if constexpr (kBackward) {
            err = blocks_per_sm(quad_backward_kernel<decltype(A)::value, Cfg, S>, kThreads, bytes, device,
                                info, &nb);
          } else {
            err = blocks_per_sm(quad_forward_kernel<decltype(A)::value, Cfg, S>, kThreads, bytes, device,
                                info, &nb);
          }
          if (nb > best) {  // the local record is tried first and kept on a tie
            best = nb;
            plan->path = Path::Tiled;
            plan->hp = cfg.HP();
            plan->rows = cfg.R();
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
    // Generic path: the most rows per chunk whose block memory fits in shared memory, else a
    // global workspace per block.
    with_activation(act, [&](auto A) {
      using Cfg = q::GenericCfg<S>;
      auto occupancy = [&](int64_t bytes, int* nb) {
        if constexpr (kBackward) {
          return blocks_per_sm(quad_backward_kernel<decltype(A)::value, Cfg, S>, kThreads, bytes, device,
                               info, nb);
        } else {
          return blocks_per_sm(quad_forward_kernel<decltype(A)::value, Cfg, S>, kThreads, bytes, device,
                               info, nb);
        }
      };
      for (int rows = 128; rows >= 1 && err == cudaSuccess; rows /= 2) {
        const q::Layout lay = q::make_layout(h, rows, h, layers, V, kBackward, false, false);
        const int64_t bytes = lay.total * int64_t(sizeof(S));
        int nb = 0;
        err = occupancy(bytes, &nb);
        if (nb > 0) {
          plan->path = Path::Generic;
          plan->hp = h;
          plan->rows = rows;
          plan->smem_bytes = bytes;
          plan->layout = lay;
          plan->grid = int64_t(nb) * info.sms;
          break;
        }
      }
      if (err == cudaSuccess && plan->path == Path::None) {
        const int rows = 16;
        const q::Layout lay = q::make_layout(h, rows, h, layers, V, kBackward, false, false);
        int nb = 0;
        err = occupancy(0, &nb);
        const int64_t per_block = lay.total * int64_t(sizeof(S));
        const int64_t cap = kWorkspaceBudgetBytes / per_block;
        const int64_t grid = int64_t(nb > 0 ? nb : 1) * info.sms;
        plan->path = Path::Generic;
        plan->hp = h;
        plan->rows = rows;
        plan->smem_bytes = 0;
        plan->layout = lay;
        plan->grid = grid < cap ? grid : cap;  // clamped to >= 1 below
        plan->workspace_elems = -1;           // sized below, once the grid is final
      }
    });
    if (err != cudaSuccess) return err;
  }

  // Every block owns at least one element; more blocks than chunks of rows would idle.
  const int64_t chunks = (N * G + plan->rows - 1) / plan->rows;
  if (plan->grid > N) plan->grid = N;
  if (plan->grid > chunks) plan->grid = chunks;
  if (kBackward) {
    const int64_t record = make_record(plan->hp, layers).size;
    const int64_t cap = kPartialBudgetBytes / (record * int64_t(sizeof(S)));
    if (plan->grid > cap) plan->grid = cap > 1 ? cap : 1;
    if (plan->grid < 1) plan->grid = 1;
    plan->partial_elems = plan->grid * record;
  }
  if (plan->grid < 1) plan->grid = 1;
  if (plan->workspace_elems != 0) plan->workspace_elems = plan->grid * plan->layout.total;
  return cudaSuccess;
}

template <typename S>
q::QuadPtrs<S> quad_ptrs(const QuadArgs<S>& a) {
  return q::QuadPtrs<S>{a.z,  a.u,  a.W, a.b, a.w, a.t, a.lw, static_cast<S>(a.alpha), a.N,
                        static_cast<int>(a.H), static_cast<int>(a.L), static_cast<int>(a.G)};
}

}  // namespace

template <typename S>
cudaError_t plan_quad_forward(Activation act, int64_t N, int64_t H, int64_t L, int64_t G,
                              int device, QuadPlan* plan) {
  return make_plan<S, false>(act, N, H, L, G, device, plan);
}

template <typename S>
cudaError_t plan_quad_backward(Activation act, int64_t N, int64_t H, int64_t L, int64_t G,
                               int device, QuadPlan* plan) {
  return make_plan<S, true>(act, N, H, L, G, device, plan);
}

template <typename S>
cudaError_t launch_quad_forward(const QuadPlan& plan, Activation act, const QuadArgs<S>& args,
                                bool logz, S* workspace, S* out, cudaStream_t stream) {
  if (plan.path == Path::None) return cudaSuccess;
  if (logz && args.lw == nullptr) return cudaErrorInvalidValue;
  const q::QuadPtrs<S> p = quad_ptrs(args);
  const dim3 grid(static_cast<unsigned>(plan.grid)), block(kThreads);
  const size_t smem = static_cast<size_t>(plan.smem_bytes);
  S* ws = plan.workspace_elems > 0 ? workspace : nullptr;
  with_activation(act, [&](auto A) {
    constexpr Activation kA = decltype(A)::value;
    if (plan.path == Path::Tiled) {
      with_tiled_cfg<S>(plan.hp, [&](auto cfg) {
        quad_forward_kernel<kA, decltype(cfg), S>
            <<<grid, block, smem, stream>>>(cfg, p, plan.layout, nullptr, logz, out);
      });
    } else {
      const q::GenericCfg<S> cfg{p.H, plan.rows};
      quad_forward_kernel<kA, q::GenericCfg<S>, S>
          <<<grid, block, smem, stream>>>(cfg, p, plan.layout, ws, logz, out);
    }
  });
  return cudaGetLastError();
}

template <typename S>
cudaError_t launch_quad_backward(const QuadPlan& plan, Activation act, const QuadArgs<S>& args,
                                 const QuadGradArgs<S>& grads, S* workspace, S* partial,
                                 cudaStream_t stream) {
  if (plan.path == Path::None) return cudaSuccess;
  const bool logz = grads.gE == nullptr;
  if (logz && (grads.glogz == nullptr || grads.logz == nullptr || args.lw == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const q::QuadPtrs<S> p = quad_ptrs(args);
  const q::QuadGrads<S> g{grads.gE, logz ? grads.glogz : nullptr, logz ? grads.logz : nullptr,
                          grads.gz, partial};
  const int64_t record = make_record(plan.hp, p.L).size;
  const dim3 grid(static_cast<unsigned>(plan.grid)), block(kThreads);
  const size_t smem = static_cast<size_t>(plan.smem_bytes);
  S* ws = plan.workspace_elems > 0 ? workspace : nullptr;
  with_activation(act, [&](auto A) {
    constexpr Activation kA = decltype(A)::value;
    if (plan.path == Path::Tiled) {
      with_tiled_cfg<S>(plan.hp, [&](auto cfg) {
        quad_backward_kernel<kA, decltype(cfg), S>
            <<<grid, block, smem, stream>>>(cfg, p, g, plan.layout, nullptr, record);
      });
    } else {
      const q::GenericCfg<S> cfg{p.H, plan.rows};
      quad_backward_kernel<kA, q::GenericCfg<S>, S>
          <<<grid, block, smem, stream>>>(cfg, p, g, plan.layout, ws, record);
    }
  });
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t count = reduce_record_count(p.H, p.L);
  const int64_t rgrid = (count + kThreads - 1) / kThreads;
  quad_reduce_records_kernel<S><<<static_cast<unsigned>(rgrid), kThreads, 0, stream>>>(
      partial, plan.grid, p.H, plan.hp, p.L, grads.gu, grads.gW, grads.gb, grads.gw, count);
  return cudaGetLastError();
}

#define CSM_INSTANTIATE(S)                                                                      \
  template cudaError_t plan_quad_forward<S>(Activation, int64_t, int64_t, int64_t, int64_t,    \
                                            int, QuadPlan*);                                    \
  template cudaError_t plan_quad_backward<S>(Activation, int64_t, int64_t, int64_t, int64_t,   \
                                             int, QuadPlan*);                                   \
  template cudaError_t launch_quad_forward<S>(const QuadPlan&, Activation, const QuadArgs<S>&, \
                                              bool, S*, S*, cudaStream_t);                      \
  template cudaError_t launch_quad_backward<S>(const QuadPlan&, Activation, const QuadArgs<S>&, \
                                               const QuadGradArgs<S>&, S*, S*, cudaStream_t);
CSM_INSTANTIATE(float)
CSM_INSTANTIATE(double)
#undef CSM_INSTANTIATE

}  // namespace cuda
}  // namespace csm_ext
