// Compile-time switches shared by every launcher (CPU kernels, CUDA launchers, the host
// emulator): a runtime value picks one template instantiation, and the callee receives it as a
// std::integral_constant. No torch or CUDA headers here, so .cu files include it too.
//
//   dispatch_activation(act, [&](auto A) { kernel<decltype(A)::value>(...); });
//   dispatch_tiled_width(tiled_width(H), [&](auto W) { kernel<decltype(W)::value>(...); });
#pragma once

#include <cstdint>
#include <type_traits>

#include "head_math.h"

namespace csm_ext {

template <Activation A>
using ActivationTag = std::integral_constant<Activation, A>;

// Calls f(ActivationTag<act>{}) so kernels get the activation at compile time.
template <typename F>
void dispatch_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::Softplus:
      f(ActivationTag<Activation::Softplus>{});
      break;
    case Activation::Tanh:
      f(ActivationTag<Activation::Tanh>{});
      break;
    case Activation::SiLU:
      f(ActivationTag<Activation::SiLU>{});
      break;
  }
}

// The padded widths the tiled CUDA kernels are compiled for (H <= 128 pads to one of them).
inline int tiled_width(int64_t H) { return H <= 32 ? 32 : H <= 64 ? 64 : 128; }

// Calls f(std::integral_constant<int, W>{}) for W = width in {32, 64, 128} (128 otherwise).
template <typename F>
void dispatch_tiled_width(int width, F&& f) {
  switch (width) {
    case 32:
      f(std::integral_constant<int, 32>{});
      break;
    case 64:
      f(std::integral_constant<int, 64>{});
      break;
    default:
      f(std::integral_constant<int, 128>{});
      break;
  }
}

}  // namespace csm_ext
