// CPU kernels for the energy-head jets (forward) and their gradients (backward).
//
// Work is split into tiles of `rows` elements. A tile's jets live in a small scratch buffer laid
// out as three stacked (rows x H) blocks [values | first derivatives | second derivatives], so
// each hidden layer is ONE matrix product (3·rows x H) · W_lᵀ done by the BLAS torch links,
// and the pointwise jet math (head_math.h) runs vectorised over the same cache-resident
// buffer. Nothing H-wide leaves the tile: the backward recomputes the forward of its tile.
// Weight gradients are accumulated per chunk of tiles and summed in chunk order, so results
// are deterministic for a given thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "../head_checks.h"
#include "../head_math.h"

namespace csm_ext {
namespace {

// Elements per tile, given how many (3·rows x H) scratch blocks a tile needs: the scratch
// should stay in L2 (about 1 MiB of float32), and more rows make the tile's matrix products
// more efficient.
int64_t tile_rows(int64_t H, int64_t blocks) {
  const int64_t rows = (int64_t{1} << 18) / (blocks * 3 * H);
  return std::clamp<int64_t>(rows / 16 * 16, 16, 512);
}
// Scratch blocks: the forward reuses 2 (pre, post); the backward keeps 3 per layer plus 2.
constexpr int64_t forward_blocks() { return 2; }
constexpr int64_t backward_blocks(int64_t L) { return 3 * L + 2; }

// Fewest elements worth a thread of their own. Measured (benchmarks/bench_head.py --preset
// small, BENCHMARKS.md): on 2 threads the fused step is slower than on one below a few hundred
// elements per thread (the fork/join and the per-chunk weight-gradient buffers cost more than the
// work), and faster from about 500 elements per call.
constexpr int64_t kMinElementsPerThread = 256;

// Threads worth using for n elements in tiles of `rows`.
int64_t useful_chunks(int64_t n, int64_t rows) {
  const int64_t tiles = (n + rows - 1) / rows;
  return std::max<int64_t>(1, std::min({int64_t{at::get_num_threads()}, tiles,
                                        n / kMinElementsPerThread}));
}

// Calls of up to this many elements do their tile products with small_gemm below instead of the
// BLAS, which would otherwise spread even a tiny product over every thread (and, on a loaded
// machine, wait for a descheduled one); below 2·kMinElementsPerThread they also run as one
// chunk, on one thread from start to end. The choice depends on N only, and every larger call
// has at least two forward tiles, whose products run one per thread inside the parallel loop:
// per-element results do not depend on the thread count.
constexpr int64_t kInlineGemmUpTo = 2 * kMinElementsPerThread;

// Widths at which small_gemm's register-blocked products beat the BLAS on a tile at every N
// (measured, one thread, N = 50k, L = 2: 11 % faster at H = 64 and 8 % at H = 128; the BLAS
// repacks the same H×H matrix for every tile). Other widths use the BLAS above
// kInlineGemmUpTo elements.
inline bool use_small_gemm(int64_t N, int64_t H) {
  return N <= kInlineGemmUpTo || H == 64 || H == 128;
}

// C (M×N) = [C +] A·B with row-major B (K×N) and A row-major (M×K), or stored transposed
// (K×M) when a_transposed. For small calls only. kN > 0: N == kN is known at compile time, and
// kRows rows of C stay in registers while K is swept (the common widths; see small_gemm);
// kN == 0: any N, plain loops the compiler vectorises over N.
template <int kN, int kRows, typename scalar_t>
void small_gemm_rows(scalar_t* __restrict C, const scalar_t* __restrict A,
                     const scalar_t* __restrict B, int64_t M, int64_t K, int64_t N,
                     bool a_transposed, bool accumulate) {
  if constexpr (kN == 0) {
    for (int64_t i = 0; i < M; ++i) {
      scalar_t* __restrict c = C + i * N;
      if (!accumulate) std::fill(c, c + N, scalar_t(0));
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t a = a_transposed ? A[k * M + i] : A[i * K + k];
        const scalar_t* __restrict b = B + k * N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
      }
    }
  } else {
    int64_t i = 0;
    for (; i + kRows <= M; i += kRows) {
      scalar_t acc[kRows][kN];
      for (int r = 0; r < kRows; ++r)
        for (int j = 0; j < kN; ++j) acc[r][j] = accumulate ? C[(i + r) * kN + j] : scalar_t(0);
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* __restrict b = B + k * kN;
        for (int r = 0; r < kRows; ++r) {
          const scalar_t a = a_transposed ? A[k * M + i + r] : A[(i + r) * K + k];
#pragma omp simd
          for (int j = 0; j < kN; ++j) acc[r][j] += a * b[j];
        }
      }
      for (int r = 0; r < kRows; ++r)
        for (int j = 0; j < kN; ++j) C[(i + r) * kN + j] = acc[r][j];
    }
    for (; i < M; ++i) {  // the last M % kRows rows, one at a time
      scalar_t acc[kN];
      for (int j = 0; j < kN; ++j) acc[j] = accumulate ? C[i * kN + j] : scalar_t(0);
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t a = a_transposed ? A[k * M + i] : A[i * K + k];
        const scalar_t* __restrict b = B + k * kN;
#pragma omp simd
        for (int j = 0; j < kN; ++j) acc[j] += a * b[j];
      }
      for (int j = 0; j < kN; ++j) C[i * kN + j] = acc[j];
    }
  }
}

template <typename scalar_t>
void small_gemm(scalar_t* C, const scalar_t* A, const scalar_t* B, int64_t M, int64_t K,
                int64_t N, bool a_transposed, bool accumulate) {
  switch (N) {
    case 16: return small_gemm_rows<16, 8>(C, A, B, M, K, N, a_transposed, accumulate);
    case 32: return small_gemm_rows<32, 8>(C, A, B, M, K, N, a_transposed, accumulate);
    case 64: return small_gemm_rows<64, 4>(C, A, B, M, K, N, a_transposed, accumulate);
    case 128: return small_gemm_rows<128, 2>(C, A, B, M, K, N, a_transposed, accumulate);
    default: return small_gemm_rows<0, 1>(C, A, B, M, K, N, a_transposed, accumulate);
  }
}

// Uninitialised scratch (every entry is written before it is read): zero-filling a tile's
// buffers would cost as much as the work of a small call.
template <typename scalar_t>
std::unique_ptr<scalar_t[]> scratch_buffer(int64_t n) {
  return std::unique_ptr<scalar_t[]>(new scalar_t[n]);
}

template <typename scalar_t>
at::Tensor as_matrix(scalar_t* data, int64_t rows, int64_t cols) {
  return at::from_blob(data, {rows, cols}, at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
}

// The parameters of one head, as raw pointers into contiguous tensors.
template <typename scalar_t>
struct HeadParams {
  const scalar_t* z;  // (N, H)
  const scalar_t* x;  // (N,)
  const scalar_t* u;  // (H,)
  const scalar_t* b;  // (L-1, H)
  const scalar_t* w;  // (H,)
  scalar_t alpha;
  std::vector<at::Tensor> W;   // L-1 matrices (H, H), as tensors for the BLAS calls
  std::vector<at::Tensor> Wt;  // their transposes (views)
  std::vector<at::Tensor> WtC;  // contiguous transposes, for small_gemm (small calls only)
  int64_t N, H, L;
  bool inline_gemm;  // use_small_gemm(N, H): tile products by small_gemm, not the BLAS
};

// Push the pre-activation jet of scratch entry i through φ and store what the caller needs
// (blocks are `block` values apart; see tile_forward).
template <Activation kAct, bool kKeep, typename scalar_t>
inline __attribute__((always_inline)) void apply_activation(
    int64_t i, int64_t block, scalar_t a0, scalar_t a1, scalar_t a2, scalar_t* __restrict h,
    scalar_t* __restrict a, scalar_t* __restrict D) {
  const ActivationDerivs<scalar_t> d = activation_derivs<kAct>(a0);
  const Jet<scalar_t> hj = jet_from_derivs(d, a1, a2);
  h[i] = hj.v;
  h[i + block] = hj.d1;
  h[i + 2 * block] = hj.d2;
  if constexpr (kKeep) {
    a[i + block] = a1;
    a[i + 2 * block] = a2;
    D[i] = d.d1;
    D[i + block] = d.d2;
    D[i + 2 * block] = d.d3;
  }
}

// Forward jets of one tile of elements [n0, n0 + rows). Scratch blocks hold 3·rows·H values.
// kKeep = false (forward op): `pre` and `post` are reused across layers; `derivs` is unused.
// kKeep = true (backward op): every layer l keeps its own blocks at offset l·3·rows·H of
//   pre    [a | a' | a'']      (a' and a'' are what the backward needs)
//   post   [h | h' | h'']      (inputs of the next layer's weight gradient)
//   derivs [φ' | φ'' | φ''']   (so the backward does not evaluate φ again)
template <Activation kAct, bool kKeep, typename scalar_t>
void tile_forward(const HeadParams<scalar_t>& p, int64_t n0, int64_t rows, scalar_t* pre,
                  scalar_t* post, scalar_t* derivs) {
  const int64_t H = p.H, block = rows * H;
  const int64_t stride = kKeep ? 3 * block : 0;
  for (int64_t l = 0; l < p.L; ++l) {
    scalar_t* __restrict a = pre + l * stride;
    scalar_t* __restrict h = post + l * stride;
    scalar_t* __restrict D = kKeep ? derivs + l * stride : nullptr;
    const scalar_t* __restrict u = p.u;
    if (l > 0) {
      // All three jet components pass through the same linear map: one product for the tile.
      if (p.inline_gemm) {
        small_gemm(a, post + (l - 1) * stride, p.WtC[l - 1].template data_ptr<scalar_t>(),
                   3 * rows, H, H, false, false);
      } else {
        at::Tensor a_mat = as_matrix(a, 3 * rows, H);
        at::mm_out(a_mat, as_matrix(post + (l - 1) * stride, 3 * rows, H), p.Wt[l - 1]);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t o = r * H;
      if (l == 0) {  // layer 1 starts from the jet (z + u·x, u, 0)
        const scalar_t* __restrict zr = p.z + (n0 + r) * H;
        const scalar_t xr = p.x[n0 + r];
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) {
          const Jet<scalar_t> aj = input_jet(zr[k], u[k], xr);
          apply_activation<kAct, kKeep>(o + k, block, aj.v, aj.d1, aj.d2, h, a, D);
        }
      } else {  // later layers from the tile's product plus the bias
        const scalar_t* __restrict bias = p.b + (l - 1) * H;
#pragma omp simd
        for (int64_t k = 0; k < H; ++k)
          apply_activation<kAct, kKeep>(o + k, block, a[o + k] + bias[k], a[o + k + block],
                                        a[o + k + 2 * block], h, a, D);
      }
    }
  }
}

template <typename scalar_t>
scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  scalar_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += a[k] * b[k];
  return s;
}

template <typename scalar_t>
HeadParams<scalar_t> make_params(const at::Tensor& z, const at::Tensor& x, const at::Tensor& u,
                                 const at::Tensor& W, const at::Tensor& b, const at::Tensor& w,
                                 double alpha, const HeadDims& d) {
  HeadParams<scalar_t> p{z.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
                         b.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), static_cast<scalar_t>(alpha),
                         {}, {}, {}, d.N, d.H, d.L, use_small_gemm(d.N, d.H)};
  // The BLAS calls below are plain kernels on raw data, never part of an autograd graph.
  const at::Tensor W_data = W.detach();
  for (int64_t l = 0; l + 1 < d.L; ++l) {
    p.W.push_back(W_data[l]);
    p.Wt.push_back(W_data[l].t());
    if (p.inline_gemm) p.WtC.push_back(W_data[l].t().contiguous());
  }
  return p;
}

template <Activation kAct, typename scalar_t>
void forward_impl(const HeadParams<scalar_t>& p, scalar_t* E, scalar_t* dE, scalar_t* d2E) {
  const int64_t T = std::min(tile_rows(p.H, forward_blocks()), p.N);
  const int64_t num_tiles = (p.N + T - 1) / T;
  const int64_t chunks = useful_chunks(p.N, T);
  at::parallel_for(0, num_tiles, (num_tiles + chunks - 1) / chunks, [&](int64_t t_begin, int64_t t_end) {
    const auto scratch = scratch_buffer<scalar_t>(forward_blocks() * 3 * T * p.H);
    scalar_t* pre = scratch.get();
    scalar_t* post = pre + 3 * T * p.H;
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t n0 = t * T, rows = std::min(T, p.N - n0), block = rows * p.H;
      tile_forward<kAct, false>(p, n0, rows, pre, post, static_cast<scalar_t*>(nullptr));
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* h = post + r * p.H;
        const Jet<scalar_t> e = energy_jet(dot(p.w, h, p.H), dot(p.w, h + block, p.H),
                                           dot(p.w, h + 2 * block, p.H), p.x[n0 + r], p.alpha);
        E[n0 + r] = e.v;
        dE[n0 + r] = e.d1;
        d2E[n0 + r] = e.d2;
      }
    }
  });
}

// Per-chunk accumulators for the parameter gradients.
template <typename scalar_t>
struct ParamGrads {
  std::vector<scalar_t> u, w, b;  // (H,), (H,), (L-1)·H
  at::Tensor W;                   // (L-1, H, H)
};

// Elements per backward tile (never more than there are).
int64_t backward_tile_rows(int64_t N, int64_t H, int64_t L) {
  return std::max<int64_t>(1, std::min(tile_rows(H, backward_blocks(L)), N));
}

// kWeights = false: only the gradients for z and x (nothing needs the weights' gradients, e.g.
// a frozen head); the weight-gradient product and accumulations are skipped.
template <Activation kAct, bool kWeights, typename scalar_t>
void backward_chunk(const HeadParams<scalar_t>& p, const scalar_t* gE, const scalar_t* gdE,
                    const scalar_t* gd2E, int64_t t_begin, int64_t t_end, scalar_t* gz,
                    scalar_t* gx, ParamGrads<scalar_t>& acc) {
  const int64_t H = p.H, L = p.L, T = backward_tile_rows(p.N, H, L);
  // Per layer: pre-activation jets, activation jets, φ's derivatives (see tile_forward); then
  // G and Gh, the gradients with respect to a layer's pre- and post-activation jets.
  const auto scratch = scratch_buffer<scalar_t>(backward_blocks(L) * 3 * T * H);
  scalar_t* pre = scratch.get();
  scalar_t* post = pre + L * 3 * T * H;
  scalar_t* derivs = post + L * 3 * T * H;
  scalar_t* G = derivs + L * 3 * T * H;
  scalar_t* Gh = G + 3 * T * H;
  scalar_t* __restrict gw_acc = acc.w.data();
  scalar_t* __restrict gu_acc = acc.u.data();
  const scalar_t* __restrict w = p.w;
  const scalar_t* __restrict u = p.u;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t n0 = t * T, rows = std::min(T, p.N - n0), block = rows * H;
    tile_forward<kAct, true>(p, n0, rows, pre, post, derivs);

    // Output layer: E = w·h + ..., so dLoss/dh = gE·w (and likewise for h', h'').
    const scalar_t* hL = post + (L - 1) * 3 * block;
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t g0 = gE[n0 + r], g1 = gdE[n0 + r], g2 = gd2E[n0 + r];
      const scalar_t* __restrict h = hL + r * H;
      scalar_t* __restrict gh = Gh + r * H;
      if constexpr (kWeights) {
#pragma omp simd
        for (int64_t k = 0; k < H; ++k)
          gw_acc[k] += g0 * h[k] + g1 * h[k + block] + g2 * h[k + 2 * block];
      }
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) {
        gh[k] = g0 * w[k];
        gh[k + block] = g1 * w[k];
        gh[k + 2 * block] = g2 * w[k];
      }
    }

    for (int64_t l = L - 1; l >= 0; --l) {
      const scalar_t* __restrict a = pre + l * 3 * block;
      const scalar_t* __restrict D = derivs + l * 3 * block;
      if (l > 0) {
        // Through φ, then through a_l = W_{l-1} h_{l-1} + b_{l-1}.
        scalar_t* __restrict gb = kWeights ? acc.b.data() + (l - 1) * H : nullptr;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t o = r * H;
          const scalar_t* __restrict gh = Gh + o;
          scalar_t* __restrict g = G + o;
#pragma omp simd
          for (int64_t k = 0; k < H; ++k) {
            const Jet<scalar_t> ga = jet_backward_from_derivs(
                D[o + k], D[o + k + block], D[o + k + 2 * block], a[o + k + block],
                a[o + k + 2 * block], gh[k], gh[k + block], gh[k + 2 * block]);
            g[k] = ga.v;
            g[k + block] = ga.d1;
            g[k + 2 * block] = ga.d2;
            if constexpr (kWeights) gb[k] += ga.v;
          }
        }
        // dW = Σ_rows (ga ⊗ h + ga' ⊗ h' + ga'' ⊗ h''): one product over the stacked blocks;
        // then the gradient for the previous layer's jets, Gh = G·W.
        const scalar_t* h_prev = post + (l - 1) * 3 * block;
        if (p.inline_gemm) {
          if constexpr (kWeights)
            small_gemm(acc.W[l - 1].template data_ptr<scalar_t>(), G, h_prev, H, 3 * rows, H,
                       true, true);
          small_gemm(Gh, G, p.W[l - 1].template data_ptr<scalar_t>(), 3 * rows, H, H, false,
                     false);
        } else {
          at::Tensor G_mat = as_matrix(G, 3 * rows, H);
          if constexpr (kWeights)
            acc.W[l - 1].addmm_(G_mat.t(), as_matrix(const_cast<scalar_t*>(h_prev), 3 * rows, H));
          at::Tensor Gh_mat = as_matrix(Gh, 3 * rows, H);
          at::mm_out(Gh_mat, G_mat, p.W[l - 1]);
        }
      } else {
        // First layer: a = z + u·x, a' = u, a'' = 0.
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t n = n0 + r, o = r * H;
          const scalar_t* __restrict gh = Gh + o;
          const scalar_t xr = p.x[n];
          scalar_t* __restrict gzr = gz + n * H;
          scalar_t gx_dot = 0;
#pragma omp simd reduction(+ : gx_dot)
          for (int64_t k = 0; k < H; ++k) {
            const Jet<scalar_t> ga =
                jet_backward_from_derivs(D[o + k], D[o + k + block], D[o + k + 2 * block], u[k],
                                         scalar_t(0), gh[k], gh[k + block], gh[k + 2 * block]);
            gzr[k] = ga.v;
            if constexpr (kWeights) gu_acc[k] += ga.v * xr + ga.d1;
            gx_dot += ga.v * u[k];
          }
          gx[n] = gx_dot + confinement_grad_x(gE[n], gdE[n], xr, p.alpha);
        }
      }
    }
  }
}

template <Activation kAct, typename scalar_t>
void backward_impl(const HeadParams<scalar_t>& p, const scalar_t* gE, const scalar_t* gdE,
                   const scalar_t* gd2E, scalar_t* gz, scalar_t* gx, scalar_t* gu,
                   at::Tensor& gW, scalar_t* gb, scalar_t* gw, bool weight_grads) {
  const int64_t H = p.H, T = backward_tile_rows(p.N, H, p.L);
  const int64_t num_tiles = (p.N + T - 1) / T;
  const int64_t num_chunks = useful_chunks(p.N, T);
  std::vector<ParamGrads<scalar_t>> partial(num_chunks);
  if (weight_grads) {
    for (auto& acc : partial) {
      acc.u.assign(H, 0);
      acc.w.assign(H, 0);
      acc.b.assign((p.L - 1) * H, 0);
      acc.W = at::zeros_like(gW);
    }
  }
  at::parallel_for(0, num_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t t_begin = num_tiles * c / num_chunks, t_end = num_tiles * (c + 1) / num_chunks;
      if (weight_grads)
        backward_chunk<kAct, true>(p, gE, gdE, gd2E, t_begin, t_end, gz, gx, partial[c]);
      else
        backward_chunk<kAct, false>(p, gE, gdE, gd2E, t_begin, t_end, gz, gx, partial[c]);
    }
  });
  if (!weight_grads) return;
  // Fixed-order reduction over chunks: deterministic for a given thread count.
  for (const auto& acc : partial) {
    for (int64_t k = 0; k < H; ++k) {
      gu[k] += acc.u[k];
      gw[k] += acc.w[k];
    }
    for (int64_t i = 0; i < (p.L - 1) * H; ++i) gb[i] += acc.b[i];
    gW.add_(acc.W);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> head_jets_cpu(
    const at::Tensor& z_in, const at::Tensor& x_in, const at::Tensor& u_in, const at::Tensor& W_in,
    const at::Tensor& b_in, const at::Tensor& w_in, double alpha, c10::string_view activation) {
  const Activation act = parse_activation(std::string(activation));
  const at::AutoDispatchBelowAutograd below_autograd;  // internal matmuls record no graph
  const HeadInputs in = prepare_head_inputs(z_in, x_in, u_in, W_in, b_in, w_in, alpha);
  const at::Tensor &z = in.z, &x = in.x, &u = in.u, &W = in.W, &b = in.b, &w = in.w;
  const HeadDims d = in.d;
  at::Tensor E = at::empty({d.N}, x.options());
  at::Tensor dE = at::empty({d.N}, x.options());
  at::Tensor d2E = at::empty({d.N}, x.options());
  if (d.N == 0) return {E, dE, d2E};
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "head_jets_cpu", [&] {
    const auto p = make_params<scalar_t>(z, x, u, W, b, w, alpha, d);
    dispatch_activation(act, [&](auto tag) {
      forward_impl<decltype(tag)::value>(p, E.data_ptr<scalar_t>(), dE.data_ptr<scalar_t>(),
                                         d2E.data_ptr<scalar_t>());
    });
  });
  return {E, dE, d2E};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
head_jets_backward_cpu(const at::Tensor& grad_E, const at::Tensor& grad_dE,
                       const at::Tensor& grad_d2E, const at::Tensor& z_in, const at::Tensor& x_in,
                       const at::Tensor& u_in, const at::Tensor& W_in, const at::Tensor& b_in,
                       const at::Tensor& w_in, double alpha, c10::string_view activation,
                       bool weight_grads) {
  const Activation act = parse_activation(std::string(activation));
  const at::AutoDispatchBelowAutograd below_autograd;  // internal matmuls record no graph
  const HeadInputs in = prepare_head_inputs(z_in, x_in, u_in, W_in, b_in, w_in, alpha);
  check_grad_arg(grad_E, "grad_E", z_in);
  check_grad_arg(grad_dE, "grad_dE", z_in);
  check_grad_arg(grad_d2E, "grad_d2E", z_in);
  const at::Tensor &z = in.z, &x = in.x, &u = in.u, &W = in.W, &b = in.b, &w = in.w;
  const HeadDims d = in.d;
  const at::Tensor gE = grad_E.contiguous(), gdE = grad_dE.contiguous(),
                   gd2E = grad_d2E.contiguous();
  at::Tensor gz = at::empty({d.N, d.H}, z.options());
  at::Tensor gx = at::empty({d.N}, x.options());
  at::Tensor gu = at::zeros_like(u);
  at::Tensor gW = at::zeros_like(W);
  at::Tensor gb = at::zeros_like(b);
  at::Tensor gw = at::zeros_like(w);
  if (d.N == 0) return {gz, gx, gu, gW, gb, gw};
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "head_jets_backward_cpu", [&] {
    const auto p = make_params<scalar_t>(z, x, u, W, b, w, alpha, d);
    dispatch_activation(act, [&](auto tag) {
      backward_impl<decltype(tag)::value>(
          p, gE.data_ptr<scalar_t>(), gdE.data_ptr<scalar_t>(), gd2E.data_ptr<scalar_t>(),
          gz.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), gu.data_ptr<scalar_t>(), gW,
          gb.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(), weight_grads);
    });
  });
  return {gz, gx, gu, gW, gb, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(csm_ext, CPU, m) {
  m.impl("head_jets", &head_jets_cpu);
  m.impl("head_jets_backward", &head_jets_backward_cpu);
}

}  // namespace csm_ext
