// The energy head's pointwise math: one source of truth for the CPU and CUDA kernels.
//
// The head maps a projected context z (width H) and a scalar x to an energy E, and we carry
// the second-order Taylor jet (value, d/dx, d²/dx²) of every hidden unit through the network:
//
//   a1 = z + u·x                    a1' = u          a1'' = 0
//   h  = φ(a)                       h'  = φ'(a)·a'   h''  = φ''(a)·a'² + φ'(a)·a''
//   a_{l+1} = W_l h_l + b_l         (jets pass linearly through W_l)
//   E  = w·h_L + ½αx²               E'  = w·h_L' + αx   E'' = w·h_L'' + α
//
// Everything here is per element / per hidden unit; the matrix products live in the kernels.
// Functions are __host__ __device__ so the CPU tests exercise exactly what the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CSM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CSM_HOST_DEVICE inline
#endif

namespace csm_ext {

// Activation codes. The order is part of the ABI between C++ and the kernels only (Python
// passes the activation by name).
enum class Activation : int { Softplus = 0, Tanh = 1, SiLU = 2 };

// exp(x) for x <= 0, which is all the activations need (they are written in terms of
// e = exp(-|a|) so nothing overflows). On the GPU, and for float64, this is the library exp.
// For float32 on the CPU it is a branch-free Cephes-style polynomial (relative error ~1e-7)
// that compilers vectorise: a scalar libm call per hidden unit would cost more than the
// head's matrix products.
template <typename T>
CSM_HOST_DEVICE T exp_nonpositive(T x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return exp(x);
#else
  if constexpr (std::is_same_v<T, float>) {
    x = x < -87.0f ? -87.0f : x;  // NaN fails the comparison and passes through
    const float n = std::floor(x * 1.44269504088896341f + 0.5f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n·ln2, two-part ln2
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
  } else {
    return std::exp(x);
  }
#endif
}

// log1p(e) for e in [0, 1], as used by softplus. Host float32 uses the atanh series
// log(1+e) = 2·atanh(s), s = e/(2+e) <= 1/3, which vectorises; everything else uses log1p.
template <typename T>
CSM_HOST_DEVICE T log1p_unit(T e) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return log1p(e);
#else
  if constexpr (std::is_same_v<T, float>) {
    const float s = e / (2.0f + e);
    const float s2 = s * s;
    float p = 1.0f / 15.0f;
    p = p * s2 + 1.0f / 13.0f;
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return 2.0f * s * p;
  } else {
    return std::log1p(e);
  }
#endif
}

// φ and its first three derivatives at one point. φ''' is needed by the backward pass,
// because h'' depends on φ''(a) and its gradient with respect to a brings in φ'''(a).
template <typename T>
struct ActivationDerivs {
  T f, d1, d2, d3;
};

template <Activation kAct, typename T>
CSM_HOST_DEVICE ActivationDerivs<T> activation_derivs(T a) {
  const T one = T(1);
  const T abs_a = a < T(0) ? -a : a;
  if constexpr (kAct == Activation::Softplus) {
    // softplus(a) = max(a, 0) + log1p(exp(-|a|)) never overflows; σ written to stay finite.
    const T e = exp_nonpositive(-abs_a);
    const T s = a >= T(0) ? one / (one + e) : e / (one + e);
    const T q = s * (one - s);
    const T f = (a > T(0) ? a : T(0)) + log1p_unit(e);
    return {f, s, q, q * (one - T(2) * s)};
  } else if constexpr (kAct == Activation::Tanh) {
    // tanh(|a|) = (1 - e)/(1 + e) with e = exp(-2|a|); the sign is restored afterwards.
    const T e = exp_nonpositive(T(-2) * abs_a);
    const T t_abs = (one - e) / (one + e);
    const T t = a < T(0) ? -t_abs : t_abs;
    const T p = one - t * t;
    return {t, p, T(-2) * t * p, p * (T(6) * t * t - T(2))};
  } else {
    // SiLU: φ = a·σ(a). With q = σ(1-σ) and r = 1-2σ:
    //   φ' = σ + a·q,  φ'' = q·(2 + a·r),  φ''' = q·(r·(3 + a·r) - 2·a·q).
    const T e = exp_nonpositive(-abs_a);
    const T s = a >= T(0) ? one / (one + e) : e / (one + e);
    const T q = s * (one - s);
    const T r = one - T(2) * s;
    return {a * s, s + a * q, q * (T(2) + a * r), q * (r * (T(3) + a * r) - T(2) * a * q)};
  }
}

// A second-order jet: a value with its first and second derivative in the head's input x.
template <typename T>
struct Jet {
  T v, d1, d2;
};

// Push the jet of a pre-activation (a, a', a'') through φ.
template <typename T>
CSM_HOST_DEVICE Jet<T> jet_from_derivs(const ActivationDerivs<T>& D, T a1, T a2) {
  return {D.f, D.d1 * a1, D.d2 * a1 * a1 + D.d1 * a2};
}

template <Activation kAct, typename T>
CSM_HOST_DEVICE Jet<T> activation_jet(T a, T a1, T a2) {
  return jet_from_derivs(activation_derivs<kAct>(a), a1, a2);
}

// Reverse mode through activation_jet: given φ's derivatives at a, the pre-activation
// derivatives (a', a'') and the gradients (gh, gh', gh'') of the loss with respect to
// (h, h', h''), return the gradients with respect to (a, a', a''). Kernels that kept φ's
// derivatives from the forward recomputation call this directly.
template <typename T>
CSM_HOST_DEVICE Jet<T> jet_backward_from_derivs(T d1, T d2, T d3, T a1, T a2, T gh, T gh1, T gh2) {
  const T ga = gh * d1 + gh1 * d2 * a1 + gh2 * (d3 * a1 * a1 + d2 * a2);
  const T ga1 = gh1 * d1 + T(2) * gh2 * d2 * a1;
  const T ga2 = gh2 * d1;
  return {ga, ga1, ga2};
}

template <Activation kAct, typename T>
CSM_HOST_DEVICE Jet<T> activation_jet_backward(T a, T a1, T a2, T gh, T gh1, T gh2) {
  const ActivationDerivs<T> D = activation_derivs<kAct>(a);
  return jet_backward_from_derivs(D.d1, D.d2, D.d3, a1, a2, gh, gh1, gh2);
}

// The first layer's pre-activation jet for hidden unit k: a = z_k + u_k·x, a' = u_k, a'' = 0.
template <typename T>
CSM_HOST_DEVICE Jet<T> input_jet(T z_k, T u_k, T x) {
  return {z_k + u_k * x, u_k, T(0)};
}

// Output layer: add the confinement ½αx² to the three readouts w·h, w·h', w·h''.
template <typename T>
CSM_HOST_DEVICE Jet<T> energy_jet(T w_dot_h, T w_dot_h1, T w_dot_h2, T x, T alpha) {
  return {w_dot_h + T(0.5) * alpha * x * x, w_dot_h1 + alpha * x, w_dot_h2 + alpha};
}

// The confinement's direct contribution to dLoss/dx, given the gradients of (E, E', E'').
template <typename T>
CSM_HOST_DEVICE T confinement_grad_x(T gE, T gdE, T x, T alpha) {
  return alpha * (gE * x + gdE);
}

}  // namespace csm_ext
