// The block-level algorithm of the CUDA head-jets kernels, written once for two executors.
//
// A thread block owns a tile of T elements at a time (persistent blocks walk the tiles with a
// grid stride). Inside a tile the jets of all three orders are stored as one matrix of 3T rows
// [values | first derivatives | second derivatives] x HP columns, so each hidden layer is ONE
// product with W_l, exactly like the CPU kernel. Every step of the algorithm is a *stage*: a
// function of the thread index that touches block memory, followed by a block barrier. A stage
// keeps no register state across the barrier, which lets the same code run
//   * on the GPU (DeviceExec: f(threadIdx.x); __syncthreads()), and
//   * on the host (an emulator calls f(tid) for every tid in turn, between "barriers"),
// so the index math, masking and barrier placement are tested on machines without a GPU.
//
// Plain C++17 + head_math.h only (no torch, no CUDA runtime): nvcc and g++ both compile it.
#pragma once

#include <cstdint>

#include "../head_math.h"

#if defined(__CUDACC__)
#define CSM_HD __host__ __device__ __forceinline__
#define CSM_UNROLL _Pragma("unroll")
#else
#define CSM_HD inline
#define CSM_UNROLL
#endif

namespace csm_ext {
namespace cuda_block {

constexpr int kThreads = 256;  // threads per block, every kernel

// Elements in one 16-byte vector: shared-memory rows are padded and aligned to this.
template <typename S>
struct VecWidth {
  static constexpr int value = 16 / static_cast<int>(sizeof(S));
};

template <typename S, int N>
struct alignas(sizeof(S) * N) Vec {
  S v[N];
};

// N contiguous values from p into out; 16-byte loads when N is a multiple of the vector width
// (p must then be 16-byte aligned, which the layouts below guarantee).
template <int N, typename S>
CSM_HD void load_row(const S* p, S* out) {
  constexpr int V = VecWidth<S>::value;
  if constexpr (N % V == 0) {
    CSM_UNROLL
    for (int i = 0; i < N / V; ++i) {
      const Vec<S, V> t = reinterpret_cast<const Vec<S, V>*>(p)[i];
      CSM_UNROLL
      for (int q = 0; q < V; ++q) out[i * V + q] = t.v[q];
    }
  } else {
    CSM_UNROLL
    for (int i = 0; i < N; ++i) out[i] = p[i];
  }
}

// ---------------------------------------------------------------------------------------------
// Configurations
// ---------------------------------------------------------------------------------------------

// Elements per tile of the register-tiled path, by padded width: 3T rows must split evenly
// over the row-threads of the GEMM tiling, and the backward's block memory must fit in shared
// memory with room for two blocks per SM at H = 64 (float).
template <typename S>
CSM_HD constexpr int fast_tile(int hp) {
  return (sizeof(S) == 4 ? 2 : 1) * (hp == 32 ? 32 : hp == 64 ? 16 : 8);
}

// Register-tiled path: compile-time padded width kHP in {32, 64, 128} and tile kT. Units
// k >= H (the real width) are kept at exactly zero, so padding changes no result.
template <typename S, int kHP, int kT>
struct FastCfg {
  static constexpr bool kFast = true;
  static constexpr int V = VecWidth<S>::value;
  static constexpr int kRS = kHP + V;  // row stride: +16 bytes so rows start in other banks
  CSM_HD int HP() const { return kHP; }
  CSM_HD int T() const { return kT; }
  CSM_HD int RS() const { return kRS; }
  CSM_HD int WS() const { return kRS; }  // row stride of W as the kernel reads it (shared)

  // Tiling of the row GEMMs (3T x HP outputs): TR row-threads x TC column-threads, each
  // thread MR rows x NR columns.
  static constexpr int NR = 4;
  static constexpr int TC = kHP / NR;
  static constexpr int TR = kThreads / TC;
  static constexpr int M = 3 * kT;
  static constexpr int MR = M / TR;
  static_assert(TC * NR == kHP && TR * TC == kThreads && MR * TR == M, "bad row tiling");
  static_assert(NR % V == 0 || V % NR == 0, "bad vector width");
  // Tiling of the weight-gradient GEMM (HP x HP outputs): TK x TJ threads, KR x JR each.
  static constexpr int JR = kHP >= 128 ? 8 : 4;
  static constexpr int KR = kHP * kHP / (kThreads * JR);
  static constexpr int TJ = kHP / JR;
  static constexpr int TK = kThreads / TJ;
  static_assert(TK * KR == kHP && TJ * JR == kHP && JR % V == 0, "bad weight-grad tiling");
};

// Generic path: any H, plain thread-strided loops, W read from global memory.
template <typename S>
struct GenericCfg {
  static constexpr bool kFast = false;
  int H, tile;
  CSM_HD int HP() const { return H; }
  CSM_HD int T() const { return tile; }
  CSM_HD int RS() const { return H; }
  CSM_HD int WS() const { return H; }
};

// ---------------------------------------------------------------------------------------------
// Memory: the head's arguments, the block's memory layout, and the per-block gradient record
// ---------------------------------------------------------------------------------------------

template <typename S>
struct HeadPtrs {
  const S* z;  // (N, H)
  const S* x;  // (N,)
  const S* u;  // (H,)
  const S* W;  // (L-1, H, H)
  const S* b;  // (L-1, H)
  const S* w;  // (H,)
  S alpha;
  int64_t N;
  int H, L;
};

template <typename S>
struct GradPtrs {
  const S* gE;
  const S* gdE;
  const S* gd2E;
  S* gz;       // (N, H)
  S* gx;       // (N,)
  S* partial;  // (nblocks, record_size): each block's sums of the weight gradients
};

// Per-block record of the weight gradients, padded layout: [u (HP) | W (L-1,HP,HP) |
// b (L-1,HP) | w (HP)].
struct Record {
  int64_t u, W, b, w, size;
};

CSM_HD Record make_record(int HP, int L) {
  Record r;
  r.u = 0;
  r.W = HP;
  r.b = r.W + int64_t(L - 1) * HP * HP;
  r.w = r.b + int64_t(L - 1) * HP;
  r.size = r.w + HP;
  return r;
}

// Element offsets of the block's buffers inside its memory (shared memory, or a slice of a
// global workspace); -1 where a buffer is absent. Each offset is 16-byte aligned.
struct Layout {
  int64_t W, u, b, w;  // staged weights (register-tiled path only)
  int64_t xs, g0, g1, g2;  // per-element x and output gradients of the tile
  int64_t pre;   // pre-activation jets: 1 (forward) or L (backward) blocks of 3T x RS
  int64_t post;  // activation jets (and, in the backward, gradients flowing down): 3T x RS
  int64_t acc;   // the block's gradient record, when it lives in block memory
  int64_t total;
};

// V: elements per 16 bytes.
CSM_HD Layout make_layout(int HP, int T, int RS, int L, int V, bool backward,
                          bool stage_weights, bool acc_local) {
  Layout lay;
  int64_t off = 0;
  auto take = [&](int64_t n) {
    const int64_t at = off;
    off += (n + V - 1) / V * V;
    return at;
  };
  lay.W = stage_weights ? take(int64_t(L - 1) * HP * RS) : -1;
  lay.u = stage_weights ? take(HP) : -1;
  lay.b = stage_weights ? take(int64_t(L - 1) * HP) : -1;
  lay.w = stage_weights ? take(HP) : -1;
  lay.xs = take(T);
  lay.g0 = backward ? take(T) : -1;
  lay.g1 = backward ? take(T) : -1;
  lay.g2 = backward ? take(T) : -1;
  lay.pre = take(int64_t(backward ? L : 1) * 3 * T * RS);
  lay.post = take(int64_t(3) * T * RS);
  lay.acc = (backward && acc_local) ? take(make_record(HP, L).size) : -1;
  lay.total = off;
  return lay;
}

// Pointers of one block's buffers.
template <typename S>
struct BlockMem {
  const S* W;  // (L-1) layers of HP rows with stride WS (staged) or the global W
  const S* u;
  const S* b;  // (L-1) rows of HP (staged) or H (global)
  const S* w;
  S* xs;
  S* g0;
  S* g1;
  S* g2;
  S* pre;
  S* post;
  S* acc;          // the gradient record being accumulated (block memory or global slice)
  S* acc_out;      // where the record goes at the end (nullptr when acc already is it)
  S* W_stage;      // writable views of the staged weights (nullptr: weights read globally)
  S* u_stage;
  S* b_stage;
  S* w_stage;
};

// Carve a block's buffers from its memory `base` (layout offsets), pointing the weights at
// the global tensors when they are not staged and the record at the block's global slice when
// it is not local.
template <typename S>
CSM_HD BlockMem<S> carve(S* base, const Layout& lay, const HeadPtrs<S>& p, S* partial_slice) {
  BlockMem<S> m;
  const bool staged = lay.W >= 0;
  m.W_stage = staged ? base + lay.W : nullptr;
  m.u_stage = staged ? base + lay.u : nullptr;
  m.b_stage = staged ? base + lay.b : nullptr;
  m.w_stage = staged ? base + lay.w : nullptr;
  m.W = staged ? m.W_stage : p.W;
  m.u = staged ? m.u_stage : p.u;
  m.b = staged ? m.b_stage : p.b;
  m.w = staged ? m.w_stage : p.w;
  m.xs = base + lay.xs;
  m.g0 = lay.g0 >= 0 ? base + lay.g0 : nullptr;
  m.g1 = lay.g1 >= 0 ? base + lay.g1 : nullptr;
  m.g2 = lay.g2 >= 0 ? base + lay.g2 : nullptr;
  m.pre = base + lay.pre;
  m.post = base + lay.post;
  if (lay.acc >= 0) {
    m.acc = base + lay.acc;
    m.acc_out = partial_slice;
  } else {
    m.acc = partial_slice;
    m.acc_out = nullptr;
  }
  return m;
}

// ---------------------------------------------------------------------------------------------
// Executors: how a stage runs
// ---------------------------------------------------------------------------------------------

// On the GPU: every thread runs the stage for its own index, then the block synchronises.
// (The host branch exists only so this compiles as __host__ __device__; it is never called.)
struct DeviceExec {
  template <class F>
  CSM_HD void stage(F&& f) {
#if defined(__CUDA_ARCH__)
    f(static_cast<int>(threadIdx.x));
    __syncthreads();
#else
    (void)f;
#endif
  }
};

// ---------------------------------------------------------------------------------------------
// Stages. Buffers are 3T x RS row-major; row c*T + e holds order c of element e.
// ---------------------------------------------------------------------------------------------

// Once per block: stage the weights (zero-padded to HP) and zero the gradient record.
template <class Cfg, typename S>
CSM_HD void stage_init(int tid, const Cfg& cfg, const HeadPtrs<S>& p, const BlockMem<S>& m,
                       int64_t record_size) {
  const int H = p.H, HP = cfg.HP(), WS = cfg.WS();
  if (m.W_stage != nullptr) {
    const int64_t per_layer = int64_t(HP) * WS;
    for (int64_t i = tid; i < int64_t(p.L - 1) * per_layer; i += kThreads) {
      const int64_t l = i / per_layer;
      const int r = static_cast<int>(i - l * per_layer);
      const int k = r / WS, j = r - (r / WS) * WS;
      m.W_stage[i] = (k < H && j < H) ? p.W[(l * H + k) * H + j] : S(0);
    }
    for (int k = tid; k < HP; k += kThreads) {
      m.u_stage[k] = k < H ? p.u[k] : S(0);
      m.w_stage[k] = k < H ? p.w[k] : S(0);
    }
    for (int64_t i = tid; i < int64_t(p.L - 1) * HP; i += kThreads) {
      const int64_t l = i / HP;
      const int k = static_cast<int>(i - l * HP);
      m.b_stage[i] = k < H ? p.b[l * H + k] : S(0);
    }
  }
  if (m.acc != nullptr) {
    for (int64_t i = tid; i < record_size; i += kThreads) m.acc[i] = S(0);
  }
}

// Layer 0 of a tile: pre-activation jet (z + u·x, u, 0) and its activation jet. Outside the
// tile (e >= rows) and in padded units everything is zero. Also caches x (and, backward, the
// output gradients, zero outside the tile) per element.
template <Activation A, class Cfg, typename S>
CSM_HD void stage_layer0(int tid, const Cfg& cfg, const HeadPtrs<S>& p, const BlockMem<S>& m,
                         int64_t n0, int rows, S* pre0, const GradPtrs<S>* g) {
  const int H = p.H, HP = cfg.HP(), T = cfg.T(), RS = cfg.RS();
  for (int idx = tid; idx < T * HP; idx += kThreads) {
    const int e = idx / HP, k = idx - (idx / HP) * HP;
    const int64_t n = n0 + e;
    Jet<S> a{S(0), S(0), S(0)}, h{S(0), S(0), S(0)};
    if (e < rows && k < H) {
      a = input_jet(p.z[n * H + k], m.u[k], p.x[n]);
      h = activation_jet<A>(a.v, a.d1, a.d2);
    }
    if (pre0 != nullptr) {
      pre0[e * RS + k] = a.v;
      pre0[(T + e) * RS + k] = a.d1;
      pre0[(2 * T + e) * RS + k] = a.d2;
    }
    m.post[e * RS + k] = h.v;
    m.post[(T + e) * RS + k] = h.d1;
    m.post[(2 * T + e) * RS + k] = h.d2;
    if (k == 0) {
      const bool in = e < rows;
      m.xs[e] = in ? p.x[n] : S(0);
      if (g != nullptr) {
        m.g0[e] = in ? g->gE[n] : S(0);
        m.g1[e] = in ? g->gdE[n] : S(0);
        m.g2[e] = in ? g->gd2E[n] : S(0);
      }
    }
  }
}

// OUT = IN · W_lᵀ (+ b_l on the value rows): the pre-activation jets of the next layer.
// Padded columns are written as zero.
template <class Cfg, typename S>
CSM_HD void stage_gemm_forward(int tid, const Cfg& cfg, const HeadPtrs<S>& p,
                               const BlockMem<S>& m, int l, const S* in, S* out) {
  const int H = p.H, HP = cfg.HP(), T = cfg.T(), RS = cfg.RS(), WS = cfg.WS();
  const S* Wl = m.W + int64_t(l) * HP * WS;
  const S* bias = m.b + int64_t(l) * HP;
  if constexpr (Cfg::kFast) {
    // Thread (tr, tc) owns rows tr + i·TR and columns tc + q·TC (interleaved so that the lanes
    // of a quarter-warp read 8 different W rows: conflict-free 16-byte loads). Both operands
    // are read along the reduction index j.
    constexpr int V = Cfg::V, NR = Cfg::NR, TC = Cfg::TC, TR = Cfg::TR, MR = Cfg::MR;
    const int tr = tid / TC, tc = tid - (tid / TC) * TC;
    S acc[MR][NR];
    CSM_UNROLL
    for (int i = 0; i < MR; ++i)
      CSM_UNROLL
      for (int q = 0; q < NR; ++q) acc[i][q] = S(0);
    for (int j0 = 0; j0 < cfg.HP(); j0 += V) {
      S wv[NR][V];
      CSM_UNROLL
      for (int q = 0; q < NR; ++q) load_row<V>(Wl + (tc + q * TC) * WS + j0, wv[q]);
      CSM_UNROLL
      for (int i = 0; i < MR; ++i) {
        S iv[V];
        load_row<V>(in + (tr + i * TR) * RS + j0, iv);
        CSM_UNROLL
        for (int q = 0; q < NR; ++q)
          CSM_UNROLL
          for (int v = 0; v < V; ++v) acc[i][q] += iv[v] * wv[q][v];
      }
    }
    CSM_UNROLL
    for (int i = 0; i < MR; ++i) {
      const int r = tr + i * TR;
      CSM_UNROLL
      for (int q = 0; q < NR; ++q) {
        const int k = tc + q * TC;
        const S val = acc[i][q] + (r < T ? bias[k] : S(0));
        out[r * RS + k] = k < H ? val : S(0);
      }
    }
  } else {
    (void)HP;
    for (int64_t idx = tid; idx < int64_t(3) * T * H; idx += kThreads) {
      const int r = static_cast<int>(idx / H), k = static_cast<int>(idx - idx / H * H);
      const S* a = in + int64_t(r) * RS;
      const S* wr = Wl + int64_t(k) * WS;
      S s = S(0);
      for (int j = 0; j < H; ++j) s += a[j] * wr[j];
      out[int64_t(r) * RS + k] = s + (r < T ? bias[k] : S(0));
    }
  }
}

// OUT = IN · W_l: the gradients of the previous layer's activation jets. Padded columns zero.
template <class Cfg, typename S>
CSM_HD void stage_gemm_backward(int tid, const Cfg& cfg, const HeadPtrs<S>& p,
                                const BlockMem<S>& m, int l, const S* in, S* out) {
  const int H = p.H, HP = cfg.HP(), T = cfg.T(), RS = cfg.RS(), WS = cfg.WS();
  const S* Wl = m.W + int64_t(l) * HP * WS;
  if constexpr (Cfg::kFast) {
    // Thread (tr, tc) owns rows tr + i·TR and columns g·(TC·V) + tc·V + v (vector groups, so a
    // quarter-warp reads 128 contiguous bytes of a W row). Reduction index k runs along IN's
    // rows (16-byte loads) and down W's rows.
    constexpr int V = Cfg::V, NR = Cfg::NR, TC = Cfg::TC, TR = Cfg::TR, MR = Cfg::MR;
    constexpr int G = NR / V;
    const int tr = tid / TC, tc = tid - (tid / TC) * TC;
    S acc[MR][NR];
    CSM_UNROLL
    for (int i = 0; i < MR; ++i)
      CSM_UNROLL
      for (int q = 0; q < NR; ++q) acc[i][q] = S(0);
    for (int k0 = 0; k0 < cfg.HP(); k0 += V) {
      S wr[V][NR];
      CSM_UNROLL
      for (int v = 0; v < V; ++v)
        CSM_UNROLL
        for (int gi = 0; gi < G; ++gi)
          load_row<V>(Wl + (k0 + v) * WS + gi * TC * V + tc * V, &wr[v][gi * V]);
      CSM_UNROLL
      for (int i = 0; i < MR; ++i) {
        S iv[V];
        load_row<V>(in + (tr + i * TR) * RS + k0, iv);
        CSM_UNROLL
        for (int v = 0; v < V; ++v)
          CSM_UNROLL
          for (int q = 0; q < NR; ++q) acc[i][q] += iv[v] * wr[v][q];
      }
    }
    CSM_UNROLL
    for (int i = 0; i < MR; ++i) {
      const int r = tr + i * TR;
      CSM_UNROLL
      for (int gi = 0; gi < G; ++gi)
        CSM_UNROLL
        for (int v = 0; v < V; ++v) {
          const int j = gi * TC * V + tc * V + v;
          out[r * RS + j] = j < H ? acc[i][gi * V + v] : S(0);
        }
    }
  } else {
    (void)HP;
    (void)T;
    for (int64_t idx = tid; idx < int64_t(3) * T * H; idx += kThreads) {
      const int r = static_cast<int>(idx / H), j = static_cast<int>(idx - idx / H * H);
      const S* a = in + int64_t(r) * RS;
      S s = S(0);
      for (int k = 0; k < H; ++k) s += a[k] * Wl[int64_t(k) * WS + j];
      out[int64_t(r) * RS + j] = s;
    }
  }
}

// acc_W[k][j] += Σ over the tile's rows (all three orders, e < rows) of GA[r][k]·POST[r][j],
// and acc_b[k] += Σ_e GA[e][k] (value rows): the gradients of W_l and b_l.
template <class Cfg, typename S>
CSM_HD void stage_weight_grads(int tid, const Cfg& cfg, const HeadPtrs<S>& p, const S* ga,
                               const S* post, int rows, S* acc_W, S* acc_b) {
  const int H = p.H, HP = cfg.HP(), T = cfg.T(), RS = cfg.RS();
  if constexpr (Cfg::kFast) {
    // Thread (tk, tj) owns rows tk·KR + a and columns g·(TJ·V) + tj·V + v of the HP x HP block.
    constexpr int V = Cfg::V, KR = Cfg::KR, JR = Cfg::JR, TJ = Cfg::TJ;
    constexpr int G = JR / V;
    const int tk = tid / TJ, tj = tid - (tid / TJ) * TJ;
    S acc[KR][JR];
    CSM_UNROLL
    for (int a = 0; a < KR; ++a)
      CSM_UNROLL
      for (int q = 0; q < JR; ++q) acc[a][q] = S(0);
    for (int c = 0; c < 3; ++c) {
      for (int e = 0; e < rows; ++e) {
        const int r = c * T + e;
        S gv[KR], pv[JR];
        load_row<KR>(ga + r * RS + tk * KR, gv);
        CSM_UNROLL
        for (int gi = 0; gi < G; ++gi) load_row<V>(post + r * RS + gi * TJ * V + tj * V, &pv[gi * V]);
        CSM_UNROLL
        for (int a = 0; a < KR; ++a)
          CSM_UNROLL
          for (int q = 0; q < JR; ++q) acc[a][q] += gv[a] * pv[q];
      }
    }
    CSM_UNROLL
    for (int a = 0; a < KR; ++a) {
      const int k = tk * KR + a;
      CSM_UNROLL
      for (int gi = 0; gi < G; ++gi)
        CSM_UNROLL
        for (int v = 0; v < V; ++v) {
          const int j = gi * TJ * V + tj * V + v;
          acc_W[k * HP + j] += acc[a][gi * V + v];
        }
    }
  } else {
    for (int64_t idx = tid; idx < int64_t(H) * H; idx += kThreads) {
      const int k = static_cast<int>(idx / H), j = static_cast<int>(idx - idx / H * H);
      S s = S(0);
      for (int c = 0; c < 3; ++c)
        for (int e = 0; e < rows; ++e) {
          const int64_t r = int64_t(c) * T + e;
          s += ga[r * RS + k] * post[r * RS + j];
        }
      acc_W[int64_t(k) * HP + j] += s;
    }
  }
  for (int k = tid; k < H; k += kThreads) {
    S s = S(0);
    for (int e = 0; e < rows; ++e) s += ga[int64_t(e) * RS + k];
    acc_b[k] += s;
  }
}

// POST = φ-jet(PRE), zero in padded units.
template <Activation A, class Cfg, typename S>
CSM_HD void stage_activate(int tid, const Cfg& cfg, const HeadPtrs<S>& p, const S* pre, S* post) {
  const int H = p.H, HP = cfg.HP(), T = cfg.T(), RS = cfg.RS();
  for (int idx = tid; idx < T * HP; idx += kThreads) {
    const int e = idx / HP, k = idx - (idx / HP) * HP;
    const int64_t i0 = int64_t(e) * RS + k, i1 = int64_t(T + e) * RS + k,
                  i2 = int64_t(2 * T + e) * RS + k;
    Jet<S> h{S(0), S(0), S(0)};
    if (k < H) h = activation_jet<A>(pre[i0], pre[i1], pre[i2]);
    post[i0] = h.v;
    post[i1] = h.d1;
    post[i2] = h.d2;
  }
}

// Forward readout: E, E', E'' of the tile's elements from the last activation jets. Each
// element's dot product starts at a different unit (k = e mod H first) so that the threads of
// a warp read different banks; the order is fixed, so results are deterministic.
template <class Cfg, typename S>
CSM_HD void stage_readout(int tid, const Cfg& cfg, const HeadPtrs<S>& p, const BlockMem<S>& m,
                          int64_t n0, int rows, S* E, S* dE, S* d2E) {
  const int H = p.H, T = cfg.T(), RS = cfg.RS();
  for (int e = tid; e < rows; e += kThreads) {
    const S* h0 = m.post + int64_t(e) * RS;
    const S* h1 = m.post + int64_t(T + e) * RS;
    const S* h2 = m.post + int64_t(2 * T + e) * RS;
    S s0 = S(0), s1 = S(0), s2 = S(0);
    int k = e % H;
    for (int i = 0; i < H; ++i) {
      const S wk = m.w[k];
      s0 += wk * h0[k];
      s1 += wk * h1[k];
      s2 += wk * h2[k];
      if (++k == H) k = 0;
    }
    const Jet<S> out = energy_jet(s0, s1, s2, m.xs[e], p.alpha);
    const int64_t n = n0 + e;
    E[n] = out.v;
    dE[n] = out.d1;
    d2E[n] = out.d2;
  }
}

// Backward, output layer: acc_w[k] += Σ_e gE·h + gdE·h' + gd2E·h'' (reads the last layer's
// activation jets in POST).
template <class Cfg, typename S>
CSM_HD void stage_output_grad(int tid, const Cfg& cfg, const HeadPtrs<S>& p, const BlockMem<S>& m,
                              int rows, S* acc_w) {
  const int H = p.H, T = cfg.T(), RS = cfg.RS();
  for (int k = tid; k < H; k += kThreads) {
    S s = S(0);
    for (int e = 0; e < rows; ++e) {
      s += m.g0[e] * m.post[int64_t(e) * RS + k] + m.g1[e] * m.post[int64_t(T + e) * RS + k] +
           m.g2[e] * m.post[int64_t(2 * T + e) * RS + k];
    }
    acc_w[k] += s;
  }
}

// Backward through φ for layer l, in place: PRE_l (pre-activation jets) becomes GA_l, the
// gradients with respect to them, given the gradients of the activation jets: from the output
// weights (gh = (gE, gdE, gd2E)·w_k) when gh == nullptr, else read from gh (3T x RS).
// When pre_prev != nullptr the previous layer's activation jets are rebuilt into POST from
// PRE_{l-1} (post and gh may alias: each thread reads its gh entries before writing them).
template <Activation A, class Cfg, typename S>
CSM_HD void stage_activation_backward(int tid, const Cfg& cfg, const HeadPtrs<S>& p,
                                      const BlockMem<S>& m, S* pre, const S* gh,
                                      const S* pre_prev) {
  const int H = p.H, HP = cfg.HP(), T = cfg.T(), RS = cfg.RS();
  for (int idx = tid; idx < T * HP; idx += kThreads) {
    const int e = idx / HP, k = idx - (idx / HP) * HP;
    const int64_t i0 = int64_t(e) * RS + k, i1 = int64_t(T + e) * RS + k,
                  i2 = int64_t(2 * T + e) * RS + k;
    Jet<S> ga{S(0), S(0), S(0)};
    if (k < H) {
      S gh0, gh1, gh2;
      if (gh == nullptr) {
        const S wk = m.w[k];
        gh0 = m.g0[e] * wk;
        gh1 = m.g1[e] * wk;
        gh2 = m.g2[e] * wk;
      } else {
        gh0 = gh[i0];
        gh1 = gh[i1];
        gh2 = gh[i2];
      }
      ga = activation_jet_backward<A>(pre[i0], pre[i1], pre[i2], gh0, gh1, gh2);
    }
    pre[i0] = ga.v;
    pre[i1] = ga.d1;
    pre[i2] = ga.d2;
    if (pre_prev != nullptr) {
      Jet<S> h{S(0), S(0), S(0)};
      if (k < H) h = activation_jet<A>(pre_prev[i0], pre_prev[i1], pre_prev[i2]);
      m.post[i0] = h.v;
      m.post[i1] = h.d1;
      m.post[i2] = h.d2;
    }
  }
}

// Backward, first layer (GA_0 in pre0): grad_z, and the tile's sums for grad_u and grad_x.
template <class Cfg, typename S>
CSM_HD void stage_input_grads(int tid, const Cfg& cfg, const HeadPtrs<S>& p, const BlockMem<S>& m,
                              const GradPtrs<S>& g, int64_t n0, int rows, const S* ga0,
                              S* acc_u) {
  const int H = p.H, T = cfg.T(), RS = cfg.RS();
  // grad_z: the value component of GA_0, row by row (coalesced stores).
  for (int64_t idx = tid; idx < int64_t(rows) * H; idx += kThreads) {
    const int e = static_cast<int>(idx / H), k = static_cast<int>(idx - idx / H * H);
    g.gz[(n0 + e) * H + k] = ga0[int64_t(e) * RS + k];
  }
  // grad_u[k] += Σ_e ga·x + ga' (a = z + u·x, a' = u).
  for (int k = tid; k < H; k += kThreads) {
    S s = S(0);
    for (int e = 0; e < rows; ++e)
      s += ga0[int64_t(e) * RS + k] * m.xs[e] + ga0[int64_t(T + e) * RS + k];
    acc_u[k] += s;
  }
  // grad_x = Σ_k ga_k·u_k + the confinement's term (rotated start as in stage_readout).
  for (int e = tid; e < rows; e += kThreads) {
    const S* gr = ga0 + int64_t(e) * RS;
    S s = S(0);
    int k = e % H;
    for (int i = 0; i < H; ++i) {
      s += gr[k] * m.u[k];
      if (++k == H) k = 0;
    }
    g.gx[n0 + e] = s + confinement_grad_x(m.g0[e], m.g1[e], m.xs[e], p.alpha);
  }
}

// ---------------------------------------------------------------------------------------------
// Block drivers
// ---------------------------------------------------------------------------------------------

template <Activation A, class Cfg, class Exec, typename S>
CSM_HD void forward_block(Exec& ex, const Cfg& cfg, const HeadPtrs<S>& p, const BlockMem<S>& m,
                          S* E, S* dE, S* d2E, int64_t block, int64_t nblocks) {
  const int T = cfg.T(), L = p.L;
  ex.stage([&](int tid) { stage_init(tid, cfg, p, m, 0); });
  const int64_t num_tiles = (p.N + T - 1) / T;
  for (int64_t tile = block; tile < num_tiles; tile += nblocks) {
    const int64_t n0 = tile * T;
    const int rows = static_cast<int>(p.N - n0 < T ? p.N - n0 : T);
    ex.stage([&](int tid) {
      stage_layer0<A>(tid, cfg, p, m, n0, rows, static_cast<S*>(nullptr),
                      static_cast<const GradPtrs<S>*>(nullptr));
    });
    for (int l = 1; l < L; ++l) {
      ex.stage([&](int tid) { stage_gemm_forward(tid, cfg, p, m, l - 1, m.post, m.pre); });
      ex.stage([&](int tid) { stage_activate<A>(tid, cfg, p, m.pre, m.post); });
    }
    ex.stage([&](int tid) { stage_readout(tid, cfg, p, m, n0, rows, E, dE, d2E); });
  }
}

template <Activation A, class Cfg, class Exec, typename S>
CSM_HD void backward_block(Exec& ex, const Cfg& cfg, const HeadPtrs<S>& p, const BlockMem<S>& m,
                           const GradPtrs<S>& g, int64_t block, int64_t nblocks) {
  const int HP = cfg.HP(), T = cfg.T(), RS = cfg.RS(), L = p.L;
  const Record rec = make_record(HP, L);
  const int64_t layer = int64_t(3) * T * RS;  // elements of one jet block
  ex.stage([&](int tid) { stage_init(tid, cfg, p, m, rec.size); });
  const int64_t num_tiles = (p.N + T - 1) / T;
  for (int64_t tile = block; tile < num_tiles; tile += nblocks) {
    const int64_t n0 = tile * T;
    const int rows = static_cast<int>(p.N - n0 < T ? p.N - n0 : T);
    // Recompute the forward, keeping every layer's pre-activation jets (PRE_0 .. PRE_{L-1}).
    ex.stage([&](int tid) { stage_layer0<A>(tid, cfg, p, m, n0, rows, m.pre, &g); });
    for (int l = 1; l < L; ++l) {
      ex.stage([&](int tid) { stage_gemm_forward(tid, cfg, p, m, l - 1, m.post, m.pre + l * layer); });
      ex.stage([&](int tid) { stage_activate<A>(tid, cfg, p, m.pre + l * layer, m.post); });
    }
    // Output layer, then down through the hidden layers.
    ex.stage([&](int tid) { stage_output_grad(tid, cfg, p, m, rows, m.acc + rec.w); });
    ex.stage([&](int tid) {
      stage_activation_backward<A>(tid, cfg, p, m, m.pre + (L - 1) * layer,
                                   static_cast<const S*>(nullptr),
                                   L >= 2 ? m.pre + (L - 2) * layer : static_cast<const S*>(nullptr));
    });
    for (int l = L - 1; l >= 1; --l) {
      S* ga = m.pre + l * layer;  // GA_l; POST holds the activation jets of layer l-1
      ex.stage([&](int tid) {
        stage_weight_grads(tid, cfg, p, ga, m.post, rows, m.acc + rec.W + int64_t(l - 1) * HP * HP,
                           m.acc + rec.b + int64_t(l - 1) * HP);
      });
      ex.stage([&](int tid) { stage_gemm_backward(tid, cfg, p, m, l - 1, ga, m.post); });
      ex.stage([&](int tid) {
        stage_activation_backward<A>(tid, cfg, p, m, m.pre + (l - 1) * layer, m.post,
                                     l >= 2 ? m.pre + (l - 2) * layer : static_cast<const S*>(nullptr));
      });
    }
    ex.stage([&](int tid) { stage_input_grads(tid, cfg, p, m, g, n0, rows, m.pre, m.acc + rec.u); });
  }
  if (m.acc_out != nullptr) {
    ex.stage([&](int tid) {
      for (int64_t i = tid; i < rec.size; i += kThreads) m.acc_out[i] = m.acc[i];
    });
  }
}

// Output i of the cross-block reduction (i over the real-size gradients [u | W | b | w]):
// the sum over blocks, in block order, of the padded records.
template <typename S>
CSM_HD void reduce_record_entry(int64_t i, const S* partial, int64_t nblocks, int H, int HP, int L,
                                S* gu, S* gW, S* gb, S* gw) {
  const Record rec = make_record(HP, L);
  const int64_t nW = int64_t(L - 1) * H * H, nb = int64_t(L - 1) * H;
  int64_t src;
  S* dst;
  if (i < H) {
    src = rec.u + i;
    dst = gu + i;
  } else if (i < H + nW) {
    const int64_t r = i - H, l = r / (int64_t(H) * H), kj = r - l * H * H;
    src = rec.W + (l * HP + kj / H) * HP + kj % H;
    dst = gW + r;
  } else if (i < H + nW + nb) {
    const int64_t r = i - H - nW, l = r / H;
    src = rec.b + l * HP + r % H;
    dst = gb + r;
  } else {
    const int64_t r = i - H - nW - nb;
    src = rec.w + r;
    dst = gw + r;
  }
  S s = S(0);
  for (int64_t blk = 0; blk < nblocks; ++blk) s += partial[blk * rec.size + src];
  *dst = s;
}

CSM_HD int64_t reduce_record_count(int H, int L) {
  return 2 * int64_t(H) + int64_t(L - 1) * H * (H + 1);
}

}  // namespace cuda_block
}  // namespace csm_ext
