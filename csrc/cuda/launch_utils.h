// Host-side helpers shared by the CUDA launchers (head_jets_cuda.cu, head_logz_cuda.cu): device
// facts and occupancy, cached because plans run on every call; the generic-path switch; scratch
// budgets. No torch headers (the .cu files do not include them).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

namespace csm_ext {
namespace cuda {

struct DeviceInfo {
  int sms = 0;
  int smem_optin = 0;
};

inline std::mutex& launch_cache_mutex() {
  static std::mutex m;
  return m;
}

inline cudaError_t device_info(int device, DeviceInfo* out) {
  static std::map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(launch_cache_mutex());
  auto it = cache.find(device);
  if (it == cache.end()) {
    DeviceInfo info;
    cudaError_t err = cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    err = cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return err;
    it = cache.emplace(device, info).first;
  }
  *out = it->second;
  return cudaSuccess;
}

// Resident blocks per SM of `kernel` launched with `threads` threads and `smem` bytes of dynamic
// shared memory (0 when it does not fit). Raises the kernel's dynamic shared-memory limit to the
// device's opt-in maximum the first time (launches above 48 KB need it).
template <class Kernel>
cudaError_t blocks_per_sm(Kernel kernel, int threads, int64_t smem, int device,
                          const DeviceInfo& info, int* out) {
  *out = 0;
  if (smem > info.smem_optin) return cudaSuccess;
  static std::map<std::tuple<const void*, int, int64_t>, int> cache;
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, smem);
  std::lock_guard<std::mutex> lock(launch_cache_mutex());
  auto it = cache.find(key);
  if (it == cache.end()) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           info.smem_optin);
    if (err != cudaSuccess) return err;
    int n = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem);
    if (err != cudaSuccess) return err;
    it = cache.emplace(key, n).first;
  }
  *out = it->second;
  return cudaSuccess;
}

// CSM_EXT_CUDA_PATH=generic forces the generic kernels (tests use it to cover that path).
inline bool force_generic() {
  const char* v = std::getenv("CSM_EXT_CUDA_PATH");
  return v != nullptr && std::strcmp(v, "generic") == 0;
}

// Scratch caps for the generic path: beyond them the grid shrinks (correct, slower).
constexpr int64_t kWorkspaceBudgetBytes = int64_t(512) << 20;
constexpr int64_t kPartialBudgetBytes = int64_t(512) << 20;

}  // namespace cuda
}  // namespace csm_ext
