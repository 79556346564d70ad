// CPU kernels of the quadrature ops: head_node_energies, head_logz and their backward.
//
// The rows of the work are the (element, node) pairs: row (n, g) evaluates the head at
// x = t_g with context z_n, a plain forward pass (no jets): a_1 = z_n + u·t_g, h = φ(a),
// a_{l+1} = W_l h_l + b_l, E = w·h_L + ½α t_g². Rows are processed in chunks whose H-wide
// activations live in a small scratch buffer, so nothing N×G×H is ever stored; each hidden layer
// of a chunk is one (rows × H)·(H × H) product through the BLAS torch links.
//
// Parallel work units are groups of elements: a group holds whole elements (G <= chunk rows) or
// one element whose nodes are walked in several chunks, so every per-element reduction (the
// logsumexp, the gradient of z_n) stays within one thread. Weight gradients are accumulated per
// partition of the groups and summed in partition order: deterministic for a given thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../head_checks.h"
#include "../head_math.h"

namespace csm_ext {
namespace {

// Rows per chunk, given how many (rows × H) scratch blocks it needs: the scratch should stay in
// L2 (about 1 MiB of float32) and more rows make the chunk's products more efficient.
int64_t chunk_rows(int64_t H, int64_t blocks) {
  const int64_t rows = (int64_t{1} << 18) / (blocks * H);
  return std::clamp<int64_t>(rows / 16 * 16, 16, 2048);
}
constexpr int64_t forward_blocks() { return 2; }                // pre, post (reused per layer)
constexpr int64_t backward_blocks(int64_t L) { return 2 * L + 2; }  // h, φ' per layer; G, Gh

template <typename scalar_t>
at::Tensor as_matrix(scalar_t* data, int64_t rows, int64_t cols) {
  return at::from_blob(data, {rows, cols},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
}

template <typename scalar_t>
struct QuadParams {
  const scalar_t* z;   // (N, H)
  const scalar_t* u;   // (H,)
  const scalar_t* b;   // (L-1, H)
  const scalar_t* w;   // (H,)
  const scalar_t* t;   // (G,) nodes
  const scalar_t* lw;  // (G,) log-weights (logz only)
  scalar_t alpha;
  std::vector<at::Tensor> W, Wt;  // L-1 matrices (H, H) and their transposes, for the BLAS calls
  int64_t N, H, L, G;
};

// A chunk of rows: elements [n0, n0 + ne) × nodes [g0, g0 + ng), rows element-major.
struct Chunk {
  int64_t n0, ne, g0, ng;
  int64_t rows() const { return ne * ng; }
};

// The groups of elements (parallel units) and the chunks of one group.
struct Layout {
  int64_t T;    // rows per chunk
  int64_t per;  // elements per group (1 when G > T)
  int64_t num_groups;
  template <typename F>
  void for_each_chunk(int64_t group, int64_t N, int64_t G, F&& f) const {
    const int64_t n0 = group * per, ne = std::min(per, N - n0);
    if (G <= T) {
      f(Chunk{n0, ne, 0, G});
    } else {
      for (int64_t g0 = 0; g0 < G; g0 += T) f(Chunk{n0, 1, g0, std::min(T, G - g0)});
    }
  }
};

Layout make_layout(int64_t N, int64_t G, int64_t T) {
  const int64_t per = G <= T ? std::max<int64_t>(1, T / G) : 1;
  return {T, per, (N + per - 1) / per};
}

// Forward pass of a chunk. kKeep = false: `pre` and `post` are reused across layers and the
// energies go to E_out (rows,). kKeep = true (backward): layer l keeps h_l at post + l·block
// and φ'(a_l) at deriv + l·block.
template <Activation kAct, bool kKeep, typename scalar_t>
void chunk_forward(const QuadParams<scalar_t>& p, const Chunk& c, scalar_t* pre, scalar_t* post,
                   scalar_t* deriv, scalar_t* E_out) {
  const int64_t H = p.H, rows = c.rows(), block = rows * H;
  const int64_t stride = kKeep ? block : 0;
  for (int64_t l = 0; l < p.L; ++l) {
    scalar_t* __restrict h = post + l * stride;
    scalar_t* __restrict D = kKeep ? deriv + l * block : nullptr;
    if (l == 0) {
      const scalar_t* __restrict u = p.u;
      for (int64_t e = 0; e < c.ne; ++e) {
        const scalar_t* __restrict zr = p.z + (c.n0 + e) * H;
        for (int64_t j = 0; j < c.ng; ++j) {
          const scalar_t tg = p.t[c.g0 + j];
          const int64_t o = (e * c.ng + j) * H;
#pragma omp simd
          for (int64_t k = 0; k < H; ++k) {
            const ActivationDerivs<scalar_t> d = activation_derivs<kAct>(zr[k] + u[k] * tg);
            h[o + k] = d.f;
            if constexpr (kKeep) D[o + k] = d.d1;
          }
        }
      }
    } else {
      scalar_t* __restrict a = pre;
      at::Tensor a_mat = as_matrix(a, rows, H);
      at::mm_out(a_mat, as_matrix(post + (l - 1) * stride, rows, H), p.Wt[l - 1]);
      const scalar_t* __restrict bias = p.b + (l - 1) * H;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = r * H;
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) {
          const ActivationDerivs<scalar_t> d = activation_derivs<kAct>(a[o + k] + bias[k]);
          h[o + k] = d.f;
          if constexpr (kKeep) D[o + k] = d.d1;
        }
      }
    }
  }
  // Energies: E = w·h_L + ½α t².
  const scalar_t* hL = post + (p.L - 1) * stride;
  const scalar_t* __restrict w = p.w;
  for (int64_t e = 0; e < c.ne; ++e) {
    for (int64_t j = 0; j < c.ng; ++j) {
      const int64_t r = e * c.ng + j;
      const scalar_t* __restrict h = hL + r * H;
      scalar_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < H; ++k) s += w[k] * h[k];
      const scalar_t tg = p.t[c.g0 + j];
      E_out[r] = s + scalar_t(0.5) * p.alpha * tg * tg;
    }
  }
}

// Forward of both ops. logz == nullptr: write the node energies E (N, G); else write log Z (N,).
template <Activation kAct, typename scalar_t>
void forward_impl(const QuadParams<scalar_t>& p, scalar_t* E, scalar_t* logz) {
  const Layout lay = make_layout(p.N, p.G, chunk_rows(p.H, forward_blocks()));
  at::parallel_for(0, lay.num_groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> scratch(forward_blocks() * lay.T * p.H + lay.T);
    scalar_t* pre = scratch.data();
    scalar_t* post = pre + lay.T * p.H;
    scalar_t* En = post + lay.T * p.H;
    std::vector<scalar_t> run_max(lay.per), run_sum(lay.per);
    for (int64_t grp = begin; grp < end; ++grp) {
      std::fill(run_max.begin(), run_max.end(), -std::numeric_limits<scalar_t>::infinity());
      std::fill(run_sum.begin(), run_sum.end(), scalar_t(0));
      const int64_t n_first = grp * lay.per;
      lay.for_each_chunk(grp, p.N, p.G, [&](const Chunk& c) {
        chunk_forward<kAct, false>(p, c, pre, post, static_cast<scalar_t*>(nullptr), En);
        for (int64_t e = 0; e < c.ne; ++e) {
          const scalar_t* Er = En + e * c.ng;
          if (logz == nullptr) {
            std::copy(Er, Er + c.ng, E + (c.n0 + e) * p.G + c.g0);
            continue;
          }
          // Online logsumexp of −E + log w over this chunk's nodes (a NaN anywhere stays NaN).
          scalar_t& m_run = run_max[c.n0 + e - n_first];
          scalar_t& s = run_sum[c.n0 + e - n_first];
          scalar_t m = m_run;
          bool nan = std::isnan(s);
          for (int64_t j = 0; j < c.ng; ++j) {
            const scalar_t v = p.lw[c.g0 + j] - Er[j];
            nan = nan || std::isnan(v);
            m = std::max(m, v);
          }
          if (nan) {
            s = std::numeric_limits<scalar_t>::quiet_NaN();
          } else if (m > -std::numeric_limits<scalar_t>::infinity()) {
            s = m_run > -std::numeric_limits<scalar_t>::infinity() ? s * std::exp(m_run - m)
                                                                   : scalar_t(0);
            for (int64_t j = 0; j < c.ng; ++j) s += std::exp(p.lw[c.g0 + j] - Er[j] - m);
          }
          m_run = m;
        }
      });
      if (logz != nullptr) {
        const int64_t ne = std::min(lay.per, p.N - n_first);
        for (int64_t e = 0; e < ne; ++e) logz[n_first + e] = run_max[e] + std::log(run_sum[e]);
      }
    }
  });
}

template <typename scalar_t>
struct WeightGrads {
  std::vector<scalar_t> u, w, b;  // (H,), (H,), (L-1)·H
  at::Tensor W;                   // (L-1, H, H)
};

// Backward of a range of groups. The upstream gradient of row (n, g)'s energy is
// grad_E[n, g] (node energies) or −grad_logz[n]·exp(lw_g − E_ng − logz_n) (log Z).
template <Activation kAct, typename scalar_t>
void backward_groups(const QuadParams<scalar_t>& p, const Layout& lay, int64_t begin,
                     int64_t end, const scalar_t* grad_E, const scalar_t* grad_logz,
                     const scalar_t* logz, scalar_t* gz, WeightGrads<scalar_t>& acc) {
  const int64_t H = p.H, L = p.L, T = lay.T;
  std::vector<scalar_t> scratch(backward_blocks(L) * T * H + T);
  scalar_t* post = scratch.data();
  scalar_t* deriv = post + L * T * H;
  scalar_t* Gbuf = deriv + L * T * H;
  scalar_t* Gh = Gbuf + T * H;
  scalar_t* gE = Gh + T * H;
  const scalar_t* __restrict w = p.w;
  // Vector gradients are summed per chunk first, then added to the partition's totals: a
  // partition holds millions of rows, and one running float32 sum over all of them would lose
  // about three digits (the weight matrices' products already sum per chunk).
  std::vector<scalar_t> chunk_u(H), chunk_w(H), chunk_b((L - 1) * H);
  scalar_t* __restrict gw_acc = chunk_w.data();
  scalar_t* __restrict gu_acc = chunk_u.data();
  for (int64_t grp = begin; grp < end; ++grp) {
    lay.for_each_chunk(grp, p.N, p.G, [&](const Chunk& c) {
      const int64_t rows = c.rows(), block = rows * H;
      std::fill(chunk_u.begin(), chunk_u.end(), scalar_t(0));
      std::fill(chunk_w.begin(), chunk_w.end(), scalar_t(0));
      std::fill(chunk_b.begin(), chunk_b.end(), scalar_t(0));
      // The forward's `pre` scratch is only needed between a product and its activation:
      // Gbuf serves as it here.
      chunk_forward<kAct, true>(p, c, Gbuf, post, deriv, gE);
      for (int64_t e = 0; e < c.ne; ++e) {
        const int64_t n = c.n0 + e;
        for (int64_t j = 0; j < c.ng; ++j) {
          const int64_t r = e * c.ng + j, g = c.g0 + j;
          gE[r] = grad_E != nullptr
                      ? grad_E[n * p.G + g]
                      : -grad_logz[n] * std::exp(p.lw[g] - gE[r] - logz[n]);
        }
      }
      // Output layer: dLoss/dh_L = gE·w, dLoss/dw = Σ gE·h_L.
      const scalar_t* hL = post + (L - 1) * block;
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t gr = gE[r];
        const scalar_t* __restrict h = hL + r * H;
        scalar_t* __restrict gh = Gh + r * H;
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) {
          gw_acc[k] += gr * h[k];
          gh[k] = gr * w[k];
        }
      }
      for (int64_t l = L - 1; l >= 0; --l) {
        const scalar_t* __restrict D = deriv + l * block;
        scalar_t* __restrict ga = Gbuf;
        const scalar_t* __restrict gh = Gh;
#pragma omp simd
        for (int64_t i = 0; i < block; ++i) ga[i] = gh[i] * D[i];
        if (l > 0) {
          scalar_t* __restrict gb = chunk_b.data() + (l - 1) * H;
          for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
            for (int64_t k = 0; k < H; ++k) gb[k] += ga[r * H + k];
          }
          at::Tensor G_mat = as_matrix(Gbuf, rows, H);
          acc.W[l - 1].addmm_(G_mat.t(), as_matrix(post + (l - 1) * block, rows, H));
          at::Tensor Gh_mat = as_matrix(Gh, rows, H);
          at::mm_out(Gh_mat, G_mat, p.W[l - 1]);
        } else {
          // First layer: a_1 = z_n + u·t_g.
          for (int64_t e = 0; e < c.ne; ++e) {
            scalar_t* __restrict gzr = gz + (c.n0 + e) * H;
            for (int64_t j = 0; j < c.ng; ++j) {
              const scalar_t tg = p.t[c.g0 + j];
              const scalar_t* __restrict gar = ga + (e * c.ng + j) * H;
#pragma omp simd
              for (int64_t k = 0; k < H; ++k) {
                gzr[k] += gar[k];
                gu_acc[k] += gar[k] * tg;
              }
            }
          }
        }
      }
      for (int64_t k = 0; k < H; ++k) {
        acc.u[k] += chunk_u[k];
        acc.w[k] += chunk_w[k];
      }
      for (int64_t i = 0; i < (L - 1) * H; ++i) acc.b[i] += chunk_b[i];
    });
  }
}

template <Activation kAct, typename scalar_t>
void backward_impl(const QuadParams<scalar_t>& p, const scalar_t* grad_E,
                   const scalar_t* grad_logz, const scalar_t* logz, scalar_t* gz, scalar_t* gu,
                   at::Tensor& gW, scalar_t* gb, scalar_t* gw) {
  const Layout lay = make_layout(p.N, p.G, chunk_rows(p.H, backward_blocks(p.L)));
  const int64_t parts =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), lay.num_groups));
  std::vector<WeightGrads<scalar_t>> partial(parts);
  for (auto& acc : partial) {
    acc.u.assign(p.H, 0);
    acc.w.assign(p.H, 0);
    acc.b.assign((p.L - 1) * p.H, 0);
    acc.W = at::zeros_like(gW);
  }
  at::parallel_for(0, parts, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      backward_groups<kAct>(p, lay, lay.num_groups * c / parts, lay.num_groups * (c + 1) / parts,
                            grad_E, grad_logz, logz, gz, partial[c]);
    }
  });
  for (const auto& acc : partial) {  // fixed order: deterministic for a thread count
    for (int64_t k = 0; k < p.H; ++k) {
      gu[k] += acc.u[k];
      gw[k] += acc.w[k];
    }
    for (int64_t i = 0; i < (p.L - 1) * p.H; ++i) gb[i] += acc.b[i];
    gW.add_(acc.W);
  }
}



template <typename scalar_t>
QuadParams<scalar_t> make_params(const QuadInputs& c, double alpha, const HeadDims& d, int64_t G) {
  QuadParams<scalar_t> p{c.z.data_ptr<scalar_t>(), c.u.data_ptr<scalar_t>(),
                         c.b.data_ptr<scalar_t>(), c.w.data_ptr<scalar_t>(),
                         c.t.data_ptr<scalar_t>(),
                         c.lw.defined() ? c.lw.data_ptr<scalar_t>() : nullptr,
                         static_cast<scalar_t>(alpha), {}, {}, d.N, d.H, d.L, G};
  const at::Tensor W_data = c.W.detach();
  for (int64_t l = 0; l + 1 < d.L; ++l) {
    p.W.push_back(W_data[l]);
    p.Wt.push_back(W_data[l].t());
  }
  return p;
}


at::Tensor node_energies_cpu(const at::Tensor& z, const at::Tensor& u, const at::Tensor& W,
                             const at::Tensor& b, const at::Tensor& w, double alpha,
                             c10::string_view activation, const at::Tensor& nodes) {
  const Activation act = parse_activation(std::string(activation));
  const at::AutoDispatchBelowAutograd below_autograd;
  const HeadDims d = check_quad_args(z, u, W, b, w, alpha, nodes, nullptr);
  const QuadInputs c = contiguous_quad_inputs(z, u, W, b, w, nodes, nullptr);
  const int64_t G = nodes.size(0);
  at::Tensor E = at::empty({d.N, G}, z.options());
  if (d.N == 0) return E;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "head_node_energies_cpu", [&] {
    const auto p = make_params<scalar_t>(c, alpha, d, G);
    dispatch_activation(act, [&](auto tag) {
      forward_impl<decltype(tag)::value>(p, E.data_ptr<scalar_t>(), static_cast<scalar_t*>(nullptr));
    });
  });
  return E;
}

at::Tensor logz_cpu(const at::Tensor& z, const at::Tensor& u, const at::Tensor& W,
                    const at::Tensor& b, const at::Tensor& w, double alpha,
                    c10::string_view activation, const at::Tensor& nodes,
                    const at::Tensor& log_weights) {
  const Activation act = parse_activation(std::string(activation));
  const at::AutoDispatchBelowAutograd below_autograd;
  const HeadDims d = check_quad_args(z, u, W, b, w, alpha, nodes, &log_weights);
  const QuadInputs c = contiguous_quad_inputs(z, u, W, b, w, nodes, &log_weights);
  at::Tensor logz = at::empty({d.N}, z.options());
  if (d.N == 0) return logz;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "head_logz_cpu", [&] {
    const auto p = make_params<scalar_t>(c, alpha, d, nodes.size(0));
    dispatch_activation(act, [&](auto tag) {
      forward_impl<decltype(tag)::value>(p, static_cast<scalar_t*>(nullptr),
                                         logz.data_ptr<scalar_t>());
    });
  });
  return logz;
}

using WeightGradTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

WeightGradTuple backward_common(const at::Tensor* grad_E, const at::Tensor* grad_logz,
                                const at::Tensor* logz, const at::Tensor& z, const at::Tensor& u,
                                const at::Tensor& W, const at::Tensor& b, const at::Tensor& w,
                                double alpha, c10::string_view activation,
                                const at::Tensor& nodes, const at::Tensor* log_weights) {
  const Activation act = parse_activation(std::string(activation));
  const at::AutoDispatchBelowAutograd below_autograd;
  const HeadDims d = check_quad_args(z, u, W, b, w, alpha, nodes, log_weights);
  const int64_t G = nodes.size(0);
  at::Tensor gE, gl, lz;
  if (grad_E != nullptr) {
    TORCH_CHECK_VALUE(grad_E->dim() == 2 && grad_E->size(0) == d.N && grad_E->size(1) == G,
                      "csm_ext: grad_E must have shape (", d.N, ", ", G, "); got ",
                      grad_E->sizes());
    check_same(*grad_E, "grad_E", z);
    gE = grad_E->contiguous();
  } else {
    check_grad_arg(*grad_logz, "grad_logz", z);
    check_grad_arg(*logz, "logz", z);
    gl = grad_logz->contiguous();
    lz = logz->contiguous();
  }
  const QuadInputs c = contiguous_quad_inputs(z, u, W, b, w, nodes, log_weights);
  at::Tensor gz = at::zeros({d.N, d.H}, z.options());
  at::Tensor gu = at::zeros_like(c.u), gW = at::zeros_like(c.W), gb = at::zeros_like(c.b),
             gw = at::zeros_like(c.w);
  if (d.N == 0) return {gz, gu, gW, gb, gw};
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "head_quadrature_backward_cpu", [&] {
    const auto p = make_params<scalar_t>(c, alpha, d, G);
    dispatch_activation(act, [&](auto tag) {
      backward_impl<decltype(tag)::value>(
          p, gE.defined() ? gE.data_ptr<scalar_t>() : nullptr,
          gl.defined() ? gl.data_ptr<scalar_t>() : nullptr,
          lz.defined() ? lz.data_ptr<scalar_t>() : nullptr, gz.data_ptr<scalar_t>(),
          gu.data_ptr<scalar_t>(), gW, gb.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>());
    });
  });
  return {gz, gu, gW, gb, gw};
}

WeightGradTuple node_energies_backward_cpu(const at::Tensor& grad_E, const at::Tensor& z,
                                           const at::Tensor& u, const at::Tensor& W,
                                           const at::Tensor& b, const at::Tensor& w,
                                           double alpha, c10::string_view activation,
                                           const at::Tensor& nodes) {
  return backward_common(&grad_E, nullptr, nullptr, z, u, W, b, w, alpha, activation, nodes,
                         nullptr);
}

WeightGradTuple logz_backward_cpu(const at::Tensor& grad_logz, const at::Tensor& logz,
                                  const at::Tensor& z, const at::Tensor& u, const at::Tensor& W,
                                  const at::Tensor& b, const at::Tensor& w, double alpha,
                                  c10::string_view activation, const at::Tensor& nodes,
                                  const at::Tensor& log_weights) {
  return backward_common(nullptr, &grad_logz, &logz, z, u, W, b, w, alpha, activation, nodes,
                         &log_weights);
}

}  // namespace

TORCH_LIBRARY_IMPL(csm_ext, CPU, m) {
  m.impl("head_node_energies", &node_energies_cpu);
  m.impl("head_node_energies_backward", &node_energies_backward_cpu);
  m.impl("head_logz", &logz_cpu);
  m.impl("head_logz_backward", &logz_backward_cpu);
}

}  // namespace csm_ext
