// Host emulator of the CUDA head-jets kernels, for machines without a GPU.
//
// It runs the block algorithm of csrc/cuda/head_jets_block.h -- the very code the kernels run --
// with an executor that calls every stage for all 256 thread indices in turn (in a chosen
// order) between "barriers", block after block, and then the cross-block reduction. Block
// memory and the per-block records start as NaN, so a stage that reads memory no earlier stage
// wrote poisons the result; every array (inputs, outputs, block memory, records) ends at an
// inaccessible page, so an access past its end faults. tests/test_cuda_emulation.py builds
// this file with the system C++ compiler (no torch, no CUDA) and compares it with the CPU
// kernels. What it cannot see: real concurrency inside a stage, beyond what changing the thread
// order exposes, and anything specific to the GPU (occupancy, launch limits, device math).
// The quadrature kernels' block algorithm (csrc/cuda/head_logz_block.h) runs the same way
// (emu_quad_*; tests/test_cuda_emulation_logz.py).
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "cuda/head_jets_block.h"
#include "cuda/head_logz_block.h"

using namespace csm_ext;
using namespace csm_ext::cuda_block;

namespace {

// order 0: tid ascending; 1: descending; 2: a fixed permutation (97·t mod 256).
struct HostExec {
  int order;
  template <class F>
  void stage(F&& f) {
    for (int i = 0; i < kThreads; ++i) {
      const int tid = order == 0 ? i : order == 1 ? kThreads - 1 - i : (97 * i) % kThreads;
      f(tid);
    }
  }
};

// A copy of n values that ends exactly at a PROT_NONE page: access past the end faults.
template <typename S>
struct Guarded {
  void* map = nullptr;
  size_t map_bytes = 0;
  S* data = nullptr;
  int64_t n = 0;
  S* out = nullptr;  // copied back here on destruction (outputs)
  Guarded(const void* src, int64_t count, void* copy_back = nullptr) : n(count) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t bytes = static_cast<size_t>(n) * sizeof(S);
    map_bytes = (bytes + page - 1) / page * page + page;
    map = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) std::abort();
    char* guard = static_cast<char*>(map) + map_bytes - page;
    mprotect(guard, page, PROT_NONE);
    data = reinterpret_cast<S*>(guard - bytes);
    if (src != nullptr && n > 0) std::memcpy(data, src, bytes);
    out = static_cast<S*>(copy_back);
  }
  void poison() {
    for (int64_t i = 0; i < n; ++i) data[i] = std::numeric_limits<S>::quiet_NaN();
  }
  ~Guarded() {
    if (out != nullptr && n > 0) std::memcpy(out, data, static_cast<size_t>(n) * sizeof(S));
    munmap(map, map_bytes);
  }
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;
};

template <Activation A, class Cfg, typename S>
void run_forward(const Cfg& cfg, const HeadPtrs<S>& p, bool staged, S* E, S* dE, S* d2E,
                 int64_t nblocks, int order) {
  const Layout lay = make_layout(cfg.HP(), cfg.T(), cfg.RS(), p.L, VecWidth<S>::value, false,
                                 staged, false);
  Guarded<S> mem(nullptr, lay.total);  // 16-byte aligned: lay.total is a multiple of 16 bytes
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    mem.poison();
    const BlockMem<S> m = carve(mem.data, lay, p, static_cast<S*>(nullptr));
    HostExec ex{order};
    forward_block<A>(ex, cfg, p, m, E, dE, d2E, blk, nblocks);
  }
}

template <Activation A, class Cfg, typename S>
void run_backward(const Cfg& cfg, const HeadPtrs<S>& p, bool staged, bool acc_local,
                  const S* gE, const S* gdE, const S* gd2E, S* gz, S* gx, S* gu, S* gW, S* gb,
                  S* gw, int64_t nblocks, int order) {
  const Layout lay = make_layout(cfg.HP(), cfg.T(), cfg.RS(), p.L, VecWidth<S>::value, true,
                                 staged, acc_local);
  const Record rec = make_record(cfg.HP(), p.L);
  Guarded<S> mem(nullptr, lay.total);
  Guarded<S> partial(nullptr, nblocks * rec.size);
  partial.poison();
  const GradPtrs<S> g{gE, gdE, gd2E, gz, gx, partial.data};
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    mem.poison();
    const BlockMem<S> m = carve(mem.data, lay, p, partial.data + blk * rec.size);
    HostExec ex{order};
    backward_block<A>(ex, cfg, p, m, g, blk, nblocks);
  }
  const int64_t count = reduce_record_count(p.H, p.L);
  for (int64_t i = 0; i < count; ++i)
    reduce_record_entry(i, partial.data, nblocks, p.H, cfg.HP(), p.L, gu, gW, gb, gw);
}

template <class F>
bool with_activation(int act, F&& f) {
  switch (act) {
    case 0:
      f(std::integral_constant<Activation, Activation::Softplus>{});
      return true;
    case 1:
      f(std::integral_constant<Activation, Activation::Tanh>{});
      return true;
    case 2:
      f(std::integral_constant<Activation, Activation::SiLU>{});
      return true;
  }
  return false;
}

// path 1: register-tiled (H <= 128), path 2: generic with `tile` elements per tile.
template <typename S, class F>
bool with_cfg(int path, int64_t H, int tile, F&& f) {
  if (path == 1) {
    if (H <= 32) {
      f(FastCfg<S, 32, fast_tile<S>(32)>{});
    } else if (H <= 64) {
      f(FastCfg<S, 64, fast_tile<S>(64)>{});
    } else if (H <= 128) {
      f(FastCfg<S, 128, fast_tile<S>(128)>{});
    } else {
      return false;
    }
    return true;
  }
  if (path == 2 && tile >= 1) {
    f(GenericCfg<S>{static_cast<int>(H), tile});
    return true;
  }
  return false;
}

template <typename S>
int forward_typed(int act, int path, int tile, int64_t N, int64_t H, int64_t L, const void* z,
                  const void* x, const void* u, const void* W, const void* b, const void* w,
                  double alpha, void* E, void* dE, void* d2E, int64_t nblocks, int order) {
  const Guarded<S> gz_(z, N * H), gx_(x, N), gu_(u, H), gW_(W, (L - 1) * H * H),
      gb_(b, (L - 1) * H), gw_(w, H);
  Guarded<S> oE(E, N, E), odE(dE, N, dE), od2E(d2E, N, d2E);
  const HeadPtrs<S> p{gz_.data, gx_.data, gu_.data, gW_.data, gb_.data, gw_.data,
                      static_cast<S>(alpha), N, static_cast<int>(H), static_cast<int>(L)};
  bool ok = false;
  with_activation(act, [&](auto A) {
    ok = with_cfg<S>(path, H, tile, [&](auto cfg) {
      run_forward<decltype(A)::value>(cfg, p, path == 1, oE.data, odE.data, od2E.data, nblocks,
                                      order);
    });
  });
  return ok ? 0 : -1;
}

template <typename S>
int backward_typed(int act, int path, int tile, int acc_local, int64_t N, int64_t H, int64_t L,
                   const void* gE, const void* gdE, const void* gd2E, const void* z, const void* x,
                   const void* u, const void* W, const void* b, const void* w, double alpha,
                   void* gz, void* gx, void* gu, void* gW, void* gb, void* gw, int64_t nblocks,
                   int order) {
  const Guarded<S> z_(z, N * H), x_(x, N), u_(u, H), W_(W, (L - 1) * H * H), b_(b, (L - 1) * H),
      w_(w, H), gE_(gE, N), gdE_(gdE, N), gd2E_(gd2E, N);
  Guarded<S> oz(gz, N * H, gz), ox(gx, N, gx), ou(gu, H, gu), oW(gW, (L - 1) * H * H, gW),
      ob(gb, (L - 1) * H, gb), ow(gw, H, gw);
  const HeadPtrs<S> p{z_.data, x_.data, u_.data, W_.data, b_.data, w_.data,
                      static_cast<S>(alpha), N, static_cast<int>(H), static_cast<int>(L)};
  bool ok = false;
  with_activation(act, [&](auto A) {
    ok = with_cfg<S>(path, H, tile, [&](auto cfg) {
      run_backward<decltype(A)::value>(cfg, p, path == 1, path == 1 && acc_local != 0, gE_.data,
                                       gdE_.data, gd2E_.data, oz.data, ox.data, ou.data, oW.data,
                                       ob.data, ow.data, nblocks, order);
    });
  });
  return ok ? 0 : -1;
}

// ---- the quadrature kernels (head_logz_block.h) ----------------------------------------------

template <Activation A, class Cfg, typename S>
void run_quad_forward(const Cfg& cfg, const quad::QuadPtrs<S>& p, bool staged, bool logz, S* out,
                      int64_t nblocks, int order) {
  const quad::Layout lay = quad::make_layout(cfg.HP(), cfg.R(), cfg.RS(), p.L, VecWidth<S>::value,
                                             false, staged, false);
  Guarded<S> mem(nullptr, lay.total);
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    mem.poison();
    const quad::BlockMem<S> m = quad::carve(mem.data, lay, p, static_cast<S*>(nullptr));
    HostExec ex{order};
    quad::forward_block<A>(ex, cfg, p, m, logz, out, blk, nblocks);
  }
}

template <Activation A, class Cfg, typename S>
void run_quad_backward(const Cfg& cfg, const quad::QuadPtrs<S>& p, bool staged, bool acc_local,
                       const S* gE, const S* glogz, const S* logz, S* gz, S* gu, S* gW, S* gb,
                       S* gw, int64_t nblocks, int order) {
  const quad::Layout lay = quad::make_layout(cfg.HP(), cfg.R(), cfg.RS(), p.L, VecWidth<S>::value,
                                             true, staged, acc_local);
  const Record rec = make_record(cfg.HP(), p.L);
  Guarded<S> mem(nullptr, lay.total);
  Guarded<S> partial(nullptr, nblocks * rec.size);
  partial.poison();
  const quad::QuadGrads<S> g{gE, glogz, logz, gz, partial.data};
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    mem.poison();
    const quad::BlockMem<S> m = quad::carve(mem.data, lay, p, partial.data + blk * rec.size);
    HostExec ex{order};
    quad::backward_block<A>(ex, cfg, p, m, g, blk, nblocks);
  }
  const int64_t count = reduce_record_count(p.H, p.L);
  for (int64_t i = 0; i < count; ++i)
    reduce_record_entry(i, partial.data, nblocks, p.H, cfg.HP(), p.L, gu, gW, gb, gw);
}

// path 1: register-tiled (H <= 128), path 2: generic with `rows` rows per chunk.
template <typename S, class F>
bool with_quad_cfg(int path, int64_t H, int rows, F&& f) {
  if (path == 1) {
    if (H <= 32) {
      f(quad::FastCfg<S, 32, quad::fast_rows<S>(32)>{});
    } else if (H <= 64) {
      f(quad::FastCfg<S, 64, quad::fast_rows<S>(64)>{});
    } else if (H <= 128) {
      f(quad::FastCfg<S, 128, quad::fast_rows<S>(128)>{});
    } else {
      return false;
    }
    return true;
  }
  if (path == 2 && rows >= 1) {
    f(quad::GenericCfg<S>{static_cast<int>(H), rows});
    return true;
  }
  return false;
}

template <typename S>
int quad_forward_typed(int act, int path, int rows, int logz, int64_t N, int64_t H, int64_t L,
                       int64_t G, const void* z, const void* u, const void* W, const void* b,
                       const void* w, double alpha, const void* t, const void* lw, void* out,
                       int64_t nblocks, int order) {
  const Guarded<S> z_(z, N * H), u_(u, H), W_(W, (L - 1) * H * H), b_(b, (L - 1) * H), w_(w, H),
      t_(t, G), lw_(lw, logz ? G : 0);
  const int64_t n_out = logz ? N : N * G;
  Guarded<S> o(out, n_out, out);
  const quad::QuadPtrs<S> p{z_.data, u_.data, W_.data, b_.data, w_.data, t_.data,
                            logz ? lw_.data : nullptr, static_cast<S>(alpha), N,
                            static_cast<int>(H), static_cast<int>(L), static_cast<int>(G)};
  bool ok = false;
  with_activation(act, [&](auto A) {
    ok = with_quad_cfg<S>(path, H, rows, [&](auto cfg) {
      run_quad_forward<decltype(A)::value>(cfg, p, path == 1, logz != 0, o.data, nblocks, order);
    });
  });
  return ok ? 0 : -1;
}

template <typename S>
int quad_backward_typed(int act, int path, int rows, int acc_local, int logz, int64_t N, int64_t H,
                        int64_t L, int64_t G, const void* grad, const void* logz_in, const void* z,
                        const void* u, const void* W, const void* b, const void* w, double alpha,
                        const void* t, const void* lw, void* gz, void* gu, void* gW, void* gb,
                        void* gw, int64_t nblocks, int order) {
  const Guarded<S> z_(z, N * H), u_(u, H), W_(W, (L - 1) * H * H), b_(b, (L - 1) * H), w_(w, H),
      t_(t, G), lw_(lw, logz ? G : 0), grad_(grad, logz ? N : N * G), lz_(logz_in, logz ? N : 0);
  Guarded<S> oz(gz, N * H, gz), ou(gu, H, gu), oW(gW, (L - 1) * H * H, gW),
      ob(gb, (L - 1) * H, gb), ow(gw, H, gw);
  const quad::QuadPtrs<S> p{z_.data, u_.data, W_.data, b_.data, w_.data, t_.data,
                            logz ? lw_.data : nullptr, static_cast<S>(alpha), N,
                            static_cast<int>(H), static_cast<int>(L), static_cast<int>(G)};
  bool ok = false;
  with_activation(act, [&](auto A) {
    ok = with_quad_cfg<S>(path, H, rows, [&](auto cfg) {
      run_quad_backward<decltype(A)::value>(
          cfg, p, path == 1, path == 1 && acc_local != 0, logz ? nullptr : grad_.data,
          logz ? grad_.data : nullptr, logz ? lz_.data : nullptr, oz.data, ou.data, oW.data,
          ob.data, ow.data, nblocks, order);
    });
  });
  return ok ? 0 : -1;
}

}  // namespace

extern "C" {

// Elements per tile of the tiled path for (dtype 0 = float32, 1 = float64) and width H.
int emu_tiled_tile(int dtype, int64_t H) {
  const int hp = H <= 32 ? 32 : H <= 64 ? 64 : 128;
  return dtype == 0 ? fast_tile<float>(hp) : fast_tile<double>(hp);
}

int emu_head_jets(int dtype, int act, int path, int tile, int64_t N, int64_t H, int64_t L,
                  const void* z, const void* x, const void* u, const void* W, const void* b,
                  const void* w, double alpha, void* E, void* dE, void* d2E, int64_t nblocks,
                  int order) {
  if (dtype == 0)
    return forward_typed<float>(act, path, tile, N, H, L, z, x, u, W, b, w, alpha, E, dE, d2E,
                                nblocks, order);
  return forward_typed<double>(act, path, tile, N, H, L, z, x, u, W, b, w, alpha, E, dE, d2E,
                               nblocks, order);
}

int emu_head_jets_backward(int dtype, int act, int path, int tile, int acc_local, int64_t N,
                           int64_t H, int64_t L, const void* gE, const void* gdE,
                           const void* gd2E, const void* z, const void* x, const void* u,
                           const void* W, const void* b, const void* w, double alpha, void* gz,
                           void* gx, void* gu, void* gW, void* gb, void* gw, int64_t nblocks,
                           int order) {
  if (dtype == 0)
    return backward_typed<float>(act, path, tile, acc_local, N, H, L, gE, gdE, gd2E, z, x, u, W,
                                 b, w, alpha, gz, gx, gu, gW, gb, gw, nblocks, order);
  return backward_typed<double>(act, path, tile, acc_local, N, H, L, gE, gdE, gd2E, z, x, u, W, b,
                                w, alpha, gz, gx, gu, gW, gb, gw, nblocks, order);
}

// Rows per chunk of the quadrature kernels' tiled path for (dtype 0 = float32, 1 = float64), H.
int emu_quad_tiled_rows(int dtype, int64_t H) {
  const int hp = H <= 32 ? 32 : H <= 64 ? 64 : 128;
  return dtype == 0 ? quad::fast_rows<float>(hp) : quad::fast_rows<double>(hp);
}

// logz = 1: log Z (N,) into out, else the node energies (N, G).
int emu_quad_forward(int dtype, int act, int path, int rows, int logz, int64_t N, int64_t H,
                     int64_t L, int64_t G, const void* z, const void* u, const void* W,
                     const void* b, const void* w, double alpha, const void* t, const void* lw,
                     void* out, int64_t nblocks, int order) {
  if (dtype == 0)
    return quad_forward_typed<float>(act, path, rows, logz, N, H, L, G, z, u, W, b, w, alpha, t,
                                     lw, out, nblocks, order);
  return quad_forward_typed<double>(act, path, rows, logz, N, H, L, G, z, u, W, b, w, alpha, t,
                                    lw, out, nblocks, order);
}

// logz = 1: grad is grad_logz (N,) and logz_in the forward's log Z; else grad is grad_E (N, G).
int emu_quad_backward(int dtype, int act, int path, int rows, int acc_local, int logz, int64_t N,
                      int64_t H, int64_t L, int64_t G, const void* grad, const void* logz_in,
                      const void* z, const void* u, const void* W, const void* b, const void* w,
                      double alpha, const void* t, const void* lw, void* gz, void* gu, void* gW,
                      void* gb, void* gw, int64_t nblocks, int order) {
  if (dtype == 0)
    return quad_backward_typed<float>(act, path, rows, acc_local, logz, N, H, L, G, grad, logz_in,
                                      z, u, W, b, w, alpha, t, lw, gz, gu, gW, gb, gw, nblocks,
                                      order);
  return quad_backward_typed<double>(act, path, rows, acc_local, logz, N, H, L, G, grad, logz_in,
                                     z, u, W, b, w, alpha, t, lw, gz, gu, gW, gb, gw, nblocks,
                                     order);
}

}  // extern "C"
