// The block-level algorithm of the CUDA quadrature kernels (head_node_energies, head_logz and
// their backward), written once for two executors, like head_jets_block.h (whose helpers,
// executors and gradient record it reuses).
//
// The work is a list of rows, one per (element, node) pair, flattened element-major: row
// q = n·G + g evaluates the head at x = t_g with context z_n (a plain forward, no jets):
//   a_1 = z_n + u·t_g,  h_l = φ(a_l),  a_{l+1} = W_l h_l + b_l,  E = w·h_L + ½α t_g².
// Block b of a grid of B owns the contiguous elements [N·b/B, N·(b+1)/B), i.e. the rows
// [n_begin·G, n_end·G), and walks them in chunks of R consecutive rows (a chunk may hold the
// end of one element, several whole ones and the start of another). So
//   * every element's rows stay inside one block, and are visited in order: its logsumexp is
//     merged online chunk by chunk (a running (max, sum) carried across chunk boundaries) and
//     its grad_z is summed in block order (first chunk writes, later ones add) -- no atomics;
//   * only the last chunk of a block is partial, whatever G is (no padding of small G);
//   * nothing N×G×H is stored: a chunk's activations (R × H) live in block memory.
// A chunk's activations are an R x RS row-major matrix and each hidden layer is one product
// with W_l: register-tiled with the weights staged in shared memory (padded width HP in
// {32, 64, 128}), or plain thread-strided loops reading W from global memory (any H).
// The backward recomputes the chunk's forward keeping every layer's pre-activations, then
// backpropagates; the weight gradients go into the block's record (make_record), summed over
// blocks in block order by reduce_record_entry: deterministic for a given grid.
//
// Every step is a stage (a function of the thread index, then a barrier) that keeps no
// register state across the barrier, so tests/cuda_emulator.cpp runs exactly this code on the
// host with all thread indices in turn. Plain C++17 + head_math.h only.
#pragma once

#include <cmath>
#include <cstdint>

#include "head_jets_block.h"

namespace csm_ext {
namespace cuda_block {
namespace quad {

// Rows of a chunk are cut into windows of this many for the logsumexp's first level.
constexpr int kWindow = 16;

template <typename T>
CSM_HD T q_exp(T x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  return std::exp(x);
#endif
}

template <typename T>
CSM_HD T q_log(T x) {
#if defined(__CUDA_ARCH__)
  return log(x);
#else
  return std::log(x);
#endif
}

// (The <cmath> macros, not std::numeric_limits: those are host-only constexpr functions.)
template <typename T>
CSM_HD T q_neg_inf() {
  return -static_cast<T>(INFINITY);
}

template <typename T>
CSM_HD T q_nan() {
  return static_cast<T>(NAN);
}

// ---------------------------------------------------------------------------------------------
// Configurations
// ---------------------------------------------------------------------------------------------

// Rows per chunk of the register-tiled path: as many as head_jets has jet rows per tile (3T),
// so the block memory (L + 1 blocks of R x RS in the backward) and the row tiling match.
template <typename S>
CSM_HD constexpr int fast_rows(int hp) {
  return 3 * fast_tile<S>(hp);
}

// Register-tiled path: compile-time padded width kHP in {32, 64, 128} and kR rows per chunk.
// Units k >= H are kept at exactly zero, so padding changes no result.
template <typename S, int kHP, int kR>
struct FastCfg {
  static constexpr bool kFast = true;
  static constexpr int V = VecWidth<S>::value;
  static constexpr int kRS = kHP + V;  // +16 bytes: consecutive rows start in other banks
  CSM_HD int HP() const { return kHP; }
  CSM_HD int R() const { return kR; }
  CSM_HD int RS() const { return kRS; }
  CSM_HD int WS() const { return kRS; }

  // Row GEMMs (R x HP outputs): TR row-threads x TC column-threads, MR rows x NR columns each.
  static constexpr int NR = 4;
  static constexpr int TC = kHP / NR;
  static constexpr int TR = kThreads / TC;
  static constexpr int MR = kR / TR;
  static_assert(TC * NR == kHP && TR * TC == kThreads && MR * TR == kR, "bad row tiling");
  static_assert(NR % V == 0 || V % NR == 0, "bad vector width");
  // Weight-gradient GEMM (HP x HP outputs): TK x TJ threads, KR x JR each.
  static constexpr int JR = kHP >= 128 ? 8 : 4;
  static constexpr int KR = kHP * kHP / (kThreads * JR);
  static constexpr int TJ = kHP / JR;
  static constexpr int TK = kThreads / TJ;
  static_assert(TK * KR == kHP && TJ * JR == kHP && JR % V == 0, "bad weight-grad tiling");
};

// Generic path: any H, any rows per chunk, W read from global memory.
template <typename S>
struct GenericCfg {
  static constexpr bool kFast = false;
  int H, rows;
  CSM_HD int HP() const { return H; }
  CSM_HD int R() const { return rows; }
  CSM_HD int RS() const { return H; }
  CSM_HD int WS() const { return H; }
};

// ---------------------------------------------------------------------------------------------
// Arguments, block memory
// ---------------------------------------------------------------------------------------------

template <typename S>
struct QuadPtrs {
  const S* z;   // (N, H)
  const S* u;   // (H,)
  const S* W;   // (L-1, H, H)
  const S* b;   // (L-1, H)
  const S* w;   // (H,)
  const S* t;   // (G,) nodes
  const S* lw;  // (G,) log-weights (log Z only; may be null otherwise)
  S alpha;
  int64_t N;
  int H, L, G;
};

// Backward inputs and outputs. Exactly one of gE (node energies) or glogz/logz (log Z) is set.
template <typename S>
struct QuadGrads {
  const S* gE;     // (N, G) upstream gradient of the node energies
  const S* glogz;  // (N,) upstream gradient of log Z
  const S* logz;   // (N,) the forward's log Z
  S* gz;           // (N, H)
  S* partial;      // (nblocks, record_size) per-block weight-gradient records
};

// Element offsets of a block's buffers (16-byte aligned); -1 where absent.
struct Layout {
  int64_t W, u, b, w;  // staged weights (register-tiled path only)
  int64_t ts;          // R: the node t of each row
  int64_t gq;          // R: forward, lw − E per row (log Z); backward, dLoss/dE per row
  int64_t pm, ps;      // forward: per-window partial (max, sum) of the logsumexp
  int64_t carry;       // forward: (max, sum) of an element continuing into the next chunk, x2
  int64_t pre;         // pre-activations: L blocks of R x RS (backward), 1 or 0 (forward)
  int64_t post;        // activations (and gradients flowing down, backward): R x RS
  int64_t acc;         // the block's gradient record, when it lives in block memory
  int64_t total;
};

CSM_HD int num_windows(int R) { return (R + kWindow - 1) / kWindow; }

CSM_HD Layout make_layout(int HP, int R, int RS, int L, int V, bool backward, bool stage_weights,
                          bool acc_local) {
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
  lay.ts = take(R);
  lay.gq = take(R);
  const int64_t slots = int64_t(num_windows(R)) * kWindow;
  lay.pm = backward ? -1 : take(slots);
  lay.ps = backward ? -1 : take(slots);
  lay.carry = backward ? -1 : take(4);
  lay.pre = take(int64_t(backward ? L : (L > 1 ? 1 : 0)) * R * RS);
  lay.post = take(int64_t(R) * RS);
  lay.acc = (backward && acc_local) ? take(make_record(HP, L).size) : -1;
  lay.total = off;
  return lay;
}

template <typename S>
struct BlockMem {
  const S* W;  // (L-1) layers of HP rows with stride WS (staged) or the global W
  const S* u;
  const S* b;
  const S* w;
  S* ts;
  S* gq;
  S* pm;
  S* ps;
  S* carry;
  S* pre;
  S* post;
  S* acc;      // the record being accumulated (block memory or the block's global slice)
  S* acc_out;  // where the record goes at the end (nullptr when acc already is it)
  S* W_stage;  // writable views of the staged weights (nullptr: weights read globally)
  S* u_stage;
  S* b_stage;
  S* w_stage;
};

template <typename S>
CSM_HD BlockMem<S> carve(S* base, const Layout& lay, const QuadPtrs<S>& p, S* partial_slice) {
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
  m.ts = base + lay.ts;
  m.gq = base + lay.gq;
  m.pm = lay.pm >= 0 ? base + lay.pm : nullptr;
  m.ps = lay.ps >= 0 ? base + lay.ps : nullptr;
  m.carry = lay.carry >= 0 ? base + lay.carry : nullptr;
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
// Chunks of rows
// ---------------------------------------------------------------------------------------------

// The rows [q0, q0 + rows) of a block's range; row r is element n_first + e, node g with
// g_first + r = e·G + g. The chunk touches elements e = 0 .. ne-1.
struct Chunk {
  int64_t q0;
  int64_t n_first;
  int g_first;
  int rows;
  int ne;
};

CSM_HD Chunk make_chunk(int64_t q0, int64_t q_end, int G, int R) {
  Chunk c;
  c.q0 = q0;
  c.n_first = q0 / G;
  c.g_first = static_cast<int>(q0 - c.n_first * G);
  c.rows = static_cast<int>(q_end - q0 < R ? q_end - q0 : R);
  c.ne = static_cast<int>((int64_t(c.g_first) + c.rows - 1) / G + 1);
  return c;
}

// Element offset e and node g of row r (< rows) of the chunk.
CSM_HD void row_coords(const Chunk& c, int r, int G, int* e, int* g) {
  const int q = c.g_first + r;
  *e = q / G;
  *g = q - *e * G;
}

// Rows [seg_begin, seg_end) of the chunk belong to its element e.
CSM_HD int seg_begin(const Chunk& c, int e, int G) {
  const int64_t s = int64_t(e) * G - c.g_first;
  return s < 0 ? 0 : static_cast<int>(s);
}
CSM_HD int seg_end(const Chunk& c, int e, int G) {
  const int64_t s = int64_t(e + 1) * G - c.g_first;
  return s > c.rows ? c.rows : static_cast<int>(s);
}
// Element e's first row is in this chunk / its last row is in this chunk.
CSM_HD bool seg_starts(const Chunk& c, int e) { return e > 0 || c.g_first == 0; }
CSM_HD bool seg_ends(const Chunk& c, int e, int G) {
  return int64_t(e + 1) * G - c.g_first <= c.rows;
}

// The rows of block `block` of `nblocks`: those of its elements [N·b/B, N·(b+1)/B).
template <typename S>
CSM_HD void block_rows(const QuadPtrs<S>& p, int64_t block, int64_t nblocks, int64_t* q_begin,
                       int64_t* q_end) {
  const int64_t n0 = p.N * block / nblocks, n1 = p.N * (block + 1) / nblocks;
  *q_begin = n0 * p.G;
  *q_end = n1 * p.G;
}

// ---------------------------------------------------------------------------------------------
// Streaming logsumexp pieces. A NaN anywhere makes the result NaN (as on the CPU); a part whose
// values are all −inf is (−inf, 0).
// ---------------------------------------------------------------------------------------------

template <typename S>
CSM_HD void lse_merge(S& M, S& Ssum, S m, S s) {
  if (M != M || m != m) {
    M = q_nan<S>();
    Ssum = q_nan<S>();
    return;
  }
  const S mx = M > m ? M : m;
  if (mx == q_neg_inf<S>()) return;  // both empty: stays (−inf, 0)
  Ssum = Ssum * q_exp(M - mx) + s * q_exp(m - mx);
  M = mx;
}

// ---------------------------------------------------------------------------------------------
// Stages. Buffers are R x RS row-major; row r is row q0 + r of the block's range.
// ---------------------------------------------------------------------------------------------

// Once per block: stage the weights (zero-padded to HP) and zero the gradient record.
template <class Cfg, typename S>
CSM_HD void stage_init(int tid, const Cfg& cfg, const QuadPtrs<S>& p, const BlockMem<S>& m,
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

// Layer 1 of a chunk: a = z_n + u·t_g (kept in pre0 when not null) and h = φ(a) in POST; the
// node of every row in TS. Rows past the chunk and padded units are zero.
template <Activation A, class Cfg, typename S>
CSM_HD void stage_layer0(int tid, const Cfg& cfg, const QuadPtrs<S>& p, const BlockMem<S>& m,
                         const Chunk& c, S* pre0) {
  const int H = p.H, HP = cfg.HP(), R = cfg.R(), RS = cfg.RS();
  for (int idx = tid; idx < R * HP; idx += kThreads) {
    const int r = idx / HP, k = idx - (idx / HP) * HP;
    S a = S(0), h = S(0), tg = S(0);
    if (r < c.rows) {
      int e, g;
      row_coords(c, r, p.G, &e, &g);
      tg = p.t[g];
      if (k < H) {
        a = p.z[(c.n_first + e) * H + k] + m.u[k] * tg;
        h = activation_derivs<A>(a).f;
      }
    }
    if (pre0 != nullptr) pre0[int64_t(r) * RS + k] = a;
    m.post[int64_t(r) * RS + k] = h;
    if (k == 0) m.ts[r] = tg;
  }
}

// OUT = IN · W_lᵀ + b_l (every row). Padded columns are written as zero.
template <class Cfg, typename S>
CSM_HD void stage_gemm_forward(int tid, const Cfg& cfg, const QuadPtrs<S>& p,
                               const BlockMem<S>& m, int l, const S* in, S* out) {
  const int H = p.H, HP = cfg.HP(), R = cfg.R(), RS = cfg.RS(), WS = cfg.WS();
  const S* Wl = m.W + int64_t(l) * HP * WS;
  const S* bias = m.b + int64_t(l) * HP;
  if constexpr (Cfg::kFast) {
    // As head_jets' stage_gemm_forward: thread (tr, tc) owns rows tr + i·TR and columns
    // tc + q·TC; both operands are read along the reduction index with 16-byte loads.
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
        out[r * RS + k] = k < H ? acc[i][q] + bias[k] : S(0);
      }
    }
  } else {
    (void)HP;
    for (int64_t idx = tid; idx < int64_t(R) * H; idx += kThreads) {
      const int r = static_cast<int>(idx / H), k = static_cast<int>(idx - idx / H * H);
      const S* a = in + int64_t(r) * RS;
      const S* wr = Wl + int64_t(k) * WS;
      S s = S(0);
      for (int j = 0; j < H; ++j) s += a[j] * wr[j];
      out[int64_t(r) * RS + k] = s + bias[k];
    }
  }
}

// OUT = IN · W_l: the gradients of the previous layer's activations. Padded columns zero.
template <class Cfg, typename S>
CSM_HD void stage_gemm_backward(int tid, const Cfg& cfg, const QuadPtrs<S>& p,
                                const BlockMem<S>& m, int l, const S* in, S* out) {
  const int H = p.H, HP = cfg.HP(), R = cfg.R(), RS = cfg.RS(), WS = cfg.WS();
  const S* Wl = m.W + int64_t(l) * HP * WS;
  if constexpr (Cfg::kFast) {
    // As head_jets' stage_gemm_backward: columns in vector groups, reduction down W's rows.
    constexpr int V = Cfg::V, NR = Cfg::NR, TC = Cfg::TC, TR = Cfg::TR, MR = Cfg::MR;
    constexpr int NG = NR / V;
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
        for (int gi = 0; gi < NG; ++gi)
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
      for (int gi = 0; gi < NG; ++gi)
        CSM_UNROLL
        for (int v = 0; v < V; ++v) {
          const int j = gi * TC * V + tc * V + v;
          out[r * RS + j] = j < H ? acc[i][gi * V + v] : S(0);
        }
    }
  } else {
    (void)HP;
    for (int64_t idx = tid; idx < int64_t(R) * H; idx += kThreads) {
      const int r = static_cast<int>(idx / H), j = static_cast<int>(idx - idx / H * H);
      const S* a = in + int64_t(r) * RS;
      S s = S(0);
      for (int k = 0; k < H; ++k) s += a[k] * Wl[int64_t(k) * WS + j];
      out[int64_t(r) * RS + j] = s;
    }
  }
}

// POST = φ(PRE), zero in padded units.
template <Activation A, class Cfg, typename S>
CSM_HD void stage_activate(int tid, const Cfg& cfg, const QuadPtrs<S>& p, const S* pre, S* post) {
  const int H = p.H, HP = cfg.HP(), R = cfg.R(), RS = cfg.RS();
  for (int idx = tid; idx < R * HP; idx += kThreads) {
    const int r = idx / HP, k = idx - (idx / HP) * HP;
    const int64_t i = int64_t(r) * RS + k;
    post[i] = k < H ? activation_derivs<A>(pre[i]).f : S(0);
  }
}

// E of row r (< rows) from the last layer's activations in POST. The dot product starts at
// unit r mod H so that the threads of a warp read different banks; the order is fixed.
template <class Cfg, typename S>
CSM_HD S row_energy(const Cfg& cfg, const QuadPtrs<S>& p, const BlockMem<S>& m, int r) {
  const int H = p.H, RS = cfg.RS();
  const S* h = m.post + int64_t(r) * RS;
  S s = S(0);
  int k = r % H;
  for (int i = 0; i < H; ++i) {
    s += m.w[k] * h[k];
    if (++k == H) k = 0;
  }
  const S tg = m.ts[r];
  return s + S(0.5) * p.alpha * tg * tg;
}

// Forward readout: node energies straight to E_out (rows are contiguous there), or, for log Z,
// v = lw_g − E into GQ.
template <class Cfg, typename S>
CSM_HD void stage_readout(int tid, const Cfg& cfg, const QuadPtrs<S>& p, const BlockMem<S>& m,
                          const Chunk& c, bool logz, S* E_out) {
  for (int r = tid; r < c.rows; r += kThreads) {
    const S E = row_energy(cfg, p, m, r);
    if (logz) {
      int e, g;
      row_coords(c, r, p.G, &e, &g);
      m.gq[r] = p.lw[g] - E;
    } else {
      E_out[c.q0 + r] = E;
    }
  }
}

// Logsumexp, level 1: for every window of kWindow rows and every element segment inside it,
// (max, Σ exp(v − max)) into slot window·kWindow + (element − the window's first element).
template <typename S>
CSM_HD void stage_lse_windows(int tid, const QuadPtrs<S>& p, const BlockMem<S>& m,
                              const Chunk& c) {
  const int nw = num_windows(c.rows);
  for (int wi = tid; wi < nw; wi += kThreads) {
    const int r0 = wi * kWindow, r1 = r0 + kWindow < c.rows ? r0 + kWindow : c.rows;
    const int e0 = (c.g_first + r0) / p.G;
    int a = r0;
    while (a < r1) {
      const int e = (c.g_first + a) / p.G;
      const int end = seg_end(c, e, p.G);
      const int b = end < r1 ? end : r1;
      S mx = q_neg_inf<S>();
      for (int r = a; r < b; ++r) {
        const S v = m.gq[r];
        mx = (v > mx || v != v) ? v : mx;  // a NaN sticks
      }
      S s = S(0);
      if (mx != q_neg_inf<S>()) {
        for (int r = a; r < b; ++r) s += q_exp(m.gq[r] - mx);
      }
      m.pm[wi * kWindow + (e - e0)] = mx;
      m.ps[wi * kWindow + (e - e0)] = s;
      a = b;
    }
  }
}

// Logsumexp, level 2: element e of the chunk merges its windows' partials, in order, into its
// running (max, sum): fresh when the element starts in this chunk, else the carry the previous
// chunk left in slot (parity ^ 1). An element that ends here writes log Z; one that goes on
// leaves its carry in slot `parity` (two slots: the element that continues is the chunk's last,
// the one that reads the carry its first -- different threads of the same stage).
template <typename S>
CSM_HD void stage_lse_merge(int tid, const QuadPtrs<S>& p, const BlockMem<S>& m, const Chunk& c,
                            int parity, S* logz) {
  for (int e = tid; e < c.ne; e += kThreads) {
    S M = q_neg_inf<S>(), Ssum = S(0);
    if (!seg_starts(c, e)) {
      M = m.carry[2 * (parity ^ 1)];
      Ssum = m.carry[2 * (parity ^ 1) + 1];
    }
    const int rs = seg_begin(c, e, p.G), re = seg_end(c, e, p.G);
    for (int wi = rs / kWindow; wi <= (re - 1) / kWindow; ++wi) {
      const int e0 = (c.g_first + wi * kWindow) / p.G;
      lse_merge(M, Ssum, m.pm[wi * kWindow + (e - e0)], m.ps[wi * kWindow + (e - e0)]);
    }
    if (seg_ends(c, e, p.G)) {
      logz[c.n_first + e] = M + q_log(Ssum);
    } else {
      m.carry[2 * parity] = M;
      m.carry[2 * parity + 1] = Ssum;
    }
  }
}

// Backward: dLoss/dE of every row into GQ (zero past the chunk): grad_E[n, g] for the node
// energies, −grad_logz[n]·exp(lw_g − E − logz[n]) for log Z (E from the last activations).
template <class Cfg, typename S>
CSM_HD void stage_row_grads(int tid, const Cfg& cfg, const QuadPtrs<S>& p, const BlockMem<S>& m,
                            const QuadGrads<S>& g, const Chunk& c) {
  const int R = cfg.R();
  for (int r = tid; r < R; r += kThreads) {
    S v = S(0);
    if (r < c.rows) {
      if (g.gE != nullptr) {
        v = g.gE[c.q0 + r];
      } else {
        int e, gn;
        row_coords(c, r, p.G, &e, &gn);
        const int64_t n = c.n_first + e;
        const S E = row_energy(cfg, p, m, r);
        v = -g.glogz[n] * q_exp(p.lw[gn] - E - g.logz[n]);
      }
    }
    m.gq[r] = v;
  }
}

// Backward, output layer: acc_w[k] += Σ_r gE_r·h_L[r][k].
template <class Cfg, typename S>
CSM_HD void stage_output_grad(int tid, const Cfg& cfg, const QuadPtrs<S>& p, const BlockMem<S>& m,
                              const Chunk& c, S* acc_w) {
  const int H = p.H, RS = cfg.RS();
  for (int k = tid; k < H; k += kThreads) {
    S s = S(0);
    for (int r = 0; r < c.rows; ++r) s += m.gq[r] * m.post[int64_t(r) * RS + k];
    acc_w[k] += s;
  }
}

// Backward through φ for one layer, in place: PRE (pre-activations) becomes GA, the gradients
// with respect to them, given the gradients of the activations: gE_r·w_k when gh == nullptr,
// else gh (R x RS). When pre_prev != nullptr the previous layer's activations are rebuilt into
// POST from it (post and gh may alias: each thread reads its gh entry before writing it).
template <Activation A, class Cfg, typename S>
CSM_HD void stage_activation_backward(int tid, const Cfg& cfg, const QuadPtrs<S>& p,
                                      const BlockMem<S>& m, S* pre, const S* gh,
                                      const S* pre_prev) {
  const int H = p.H, HP = cfg.HP(), R = cfg.R(), RS = cfg.RS();
  for (int idx = tid; idx < R * HP; idx += kThreads) {
    const int r = idx / HP, k = idx - (idx / HP) * HP;
    const int64_t i = int64_t(r) * RS + k;
    S ga = S(0);
    if (k < H) {
      const S g = gh == nullptr ? m.gq[r] * m.w[k] : gh[i];
      ga = g * activation_derivs<A>(pre[i]).d1;
    }
    pre[i] = ga;
    if (pre_prev != nullptr) m.post[i] = k < H ? activation_derivs<A>(pre_prev[i]).f : S(0);
  }
}

// acc_W[k][j] += Σ_{r < rows} GA[r][k]·POST[r][j] and acc_b[k] += Σ_r GA[r][k].
template <class Cfg, typename S>
CSM_HD void stage_weight_grads(int tid, const Cfg& cfg, const QuadPtrs<S>& p, const S* ga,
                               const S* post, int rows, S* acc_W, S* acc_b) {
  const int H = p.H, HP = cfg.HP(), RS = cfg.RS();
  if constexpr (Cfg::kFast) {
    // As head_jets' stage_weight_grads: thread (tk, tj) owns rows tk·KR + a and columns
    // g·(TJ·V) + tj·V + v of the HP x HP block.
    constexpr int V = Cfg::V, KR = Cfg::KR, JR = Cfg::JR, TJ = Cfg::TJ;
    constexpr int NG = JR / V;
    const int tk = tid / TJ, tj = tid - (tid / TJ) * TJ;
    S acc[KR][JR];
    CSM_UNROLL
    for (int a = 0; a < KR; ++a)
      CSM_UNROLL
      for (int q = 0; q < JR; ++q) acc[a][q] = S(0);
    for (int r = 0; r < rows; ++r) {
      S gv[KR], pv[JR];
      load_row<KR>(ga + r * RS + tk * KR, gv);
      CSM_UNROLL
      for (int gi = 0; gi < NG; ++gi) load_row<V>(post + r * RS + gi * TJ * V + tj * V, &pv[gi * V]);
      CSM_UNROLL
      for (int a = 0; a < KR; ++a)
        CSM_UNROLL
        for (int q = 0; q < JR; ++q) acc[a][q] += gv[a] * pv[q];
    }
    CSM_UNROLL
    for (int a = 0; a < KR; ++a) {
      const int k = tk * KR + a;
      CSM_UNROLL
      for (int gi = 0; gi < NG; ++gi)
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
      for (int r = 0; r < rows; ++r) s += ga[int64_t(r) * RS + k] * post[int64_t(r) * RS + j];
      acc_W[int64_t(k) * HP + j] += s;
    }
  }
  for (int k = tid; k < H; k += kThreads) {
    S s = S(0);
    for (int r = 0; r < rows; ++r) s += ga[int64_t(r) * RS + k];
    acc_b[k] += s;
  }
}

// Backward, first layer (GA_1 in ga0): grad_z of the chunk's elements (the first chunk of an
// element writes, later ones add: block order, no atomics) and the chunk's sum for grad_u.
template <class Cfg, typename S>
CSM_HD void stage_input_grads(int tid, const Cfg& cfg, const QuadPtrs<S>& p, const BlockMem<S>& m,
                              const QuadGrads<S>& g, const Chunk& c, const S* ga0, S* acc_u) {
  const int H = p.H, RS = cfg.RS();
  for (int64_t idx = tid; idx < int64_t(c.ne) * H; idx += kThreads) {
    const int e = static_cast<int>(idx / H), k = static_cast<int>(idx - idx / H * H);
    const int rs = seg_begin(c, e, p.G), re = seg_end(c, e, p.G);
    S s = S(0);
    for (int r = rs; r < re; ++r) s += ga0[int64_t(r) * RS + k];
    S* dst = g.gz + (c.n_first + e) * H + k;
    *dst = seg_starts(c, e) ? s : *dst + s;
  }
  for (int k = tid; k < H; k += kThreads) {
    S s = S(0);
    for (int r = 0; r < c.rows; ++r) s += ga0[int64_t(r) * RS + k] * m.ts[r];
    acc_u[k] += s;
  }
}

// ---------------------------------------------------------------------------------------------
// Block drivers
// ---------------------------------------------------------------------------------------------

// Forward of block `block`: node energies into out (N, G), or log Z into out (N,).
template <Activation A, class Cfg, class Exec, typename S>
CSM_HD void forward_block(Exec& ex, const Cfg& cfg, const QuadPtrs<S>& p, const BlockMem<S>& m,
                          bool logz, S* out, int64_t block, int64_t nblocks) {
  const int R = cfg.R(), L = p.L;
  ex.stage([&](int tid) { stage_init(tid, cfg, p, m, 0); });
  int64_t q_begin, q_end;
  block_rows(p, block, nblocks, &q_begin, &q_end);
  int parity = 0;
  for (int64_t q0 = q_begin; q0 < q_end; q0 += R) {
    const Chunk c = make_chunk(q0, q_end, p.G, R);
    ex.stage([&](int tid) { stage_layer0<A>(tid, cfg, p, m, c, static_cast<S*>(nullptr)); });
    for (int l = 1; l < L; ++l) {
      ex.stage([&](int tid) { stage_gemm_forward(tid, cfg, p, m, l - 1, m.post, m.pre); });
      ex.stage([&](int tid) { stage_activate<A>(tid, cfg, p, m.pre, m.post); });
    }
    ex.stage([&](int tid) { stage_readout(tid, cfg, p, m, c, logz, out); });
    if (logz) {
      ex.stage([&](int tid) { stage_lse_windows(tid, p, m, c); });
      ex.stage([&](int tid) { stage_lse_merge(tid, p, m, c, parity, out); });
      parity ^= 1;
    }
  }
}

template <Activation A, class Cfg, class Exec, typename S>
CSM_HD void backward_block(Exec& ex, const Cfg& cfg, const QuadPtrs<S>& p, const BlockMem<S>& m,
                           const QuadGrads<S>& g, int64_t block, int64_t nblocks) {
  const int HP = cfg.HP(), R = cfg.R(), RS = cfg.RS(), L = p.L;
  const Record rec = make_record(HP, L);
  const int64_t layer = int64_t(R) * RS;  // elements of one activation block
  ex.stage([&](int tid) { stage_init(tid, cfg, p, m, rec.size); });
  int64_t q_begin, q_end;
  block_rows(p, block, nblocks, &q_begin, &q_end);
  for (int64_t q0 = q_begin; q0 < q_end; q0 += R) {
    const Chunk c = make_chunk(q0, q_end, p.G, R);
    // Recompute the forward, keeping every layer's pre-activations (PRE_0 .. PRE_{L-1}).
    ex.stage([&](int tid) { stage_layer0<A>(tid, cfg, p, m, c, m.pre); });
    for (int l = 1; l < L; ++l) {
      ex.stage([&](int tid) { stage_gemm_forward(tid, cfg, p, m, l - 1, m.post, m.pre + l * layer); });
      ex.stage([&](int tid) { stage_activate<A>(tid, cfg, p, m.pre + l * layer, m.post); });
    }
    ex.stage([&](int tid) { stage_row_grads(tid, cfg, p, m, g, c); });
    ex.stage([&](int tid) { stage_output_grad(tid, cfg, p, m, c, m.acc + rec.w); });
    ex.stage([&](int tid) {
      stage_activation_backward<A>(tid, cfg, p, m, m.pre + (L - 1) * layer,
                                   static_cast<const S*>(nullptr),
                                   L >= 2 ? m.pre + (L - 2) * layer : static_cast<const S*>(nullptr));
    });
    for (int l = L - 1; l >= 1; --l) {
      S* ga = m.pre + l * layer;  // GA_l; POST holds the activations of layer l-1
      ex.stage([&](int tid) {
        stage_weight_grads(tid, cfg, p, ga, m.post, c.rows,
                           m.acc + rec.W + int64_t(l - 1) * HP * HP,
                           m.acc + rec.b + int64_t(l - 1) * HP);
      });
      ex.stage([&](int tid) { stage_gemm_backward(tid, cfg, p, m, l - 1, ga, m.post); });
      ex.stage([&](int tid) {
        stage_activation_backward<A>(tid, cfg, p, m, m.pre + (l - 1) * layer, m.post,
                                     l >= 2 ? m.pre + (l - 2) * layer : static_cast<const S*>(nullptr));
      });
    }
    ex.stage([&](int tid) { stage_input_grads(tid, cfg, p, m, g, c, m.pre, m.acc + rec.u); });
  }
  if (m.acc_out != nullptr) {
    ex.stage([&](int tid) {
      for (int64_t i = tid; i < rec.size; i += kThreads) m.acc_out[i] = m.acc[i];
    });
  }
}

}  // namespace quad
}  // namespace cuda_block
}  // namespace csm_ext
