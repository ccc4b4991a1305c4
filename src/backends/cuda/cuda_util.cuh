// Error checks and RAII owners for CUDA resources. Private to src/backends/cuda.
//
// Every runtime or cuBLAS call goes through SHARDLM_CUDA_CHECK / SHARDLM_CUBLAS_CHECK, which throw
// shardlm::Error naming file:line, the call, the error string and a hint. Destructors never throw: they
// release quietly (a failure there means the context is already lost, and the first failing call that
// the user made has reported it).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

#include "core/error.h"

namespace shardlm::cuda_detail {

inline const char* cuda_hint(cudaError_t e) {
  switch (e) {
    case cudaErrorMemoryAllocation:
      return "the GPU is out of memory: use a smaller model/context, a quantized type, or more devices";
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
      return "no usable GPU or driver: check nvidia-smi and that the driver supports this CUDA version";
    case cudaErrorInvalidDevice:
      return "the device index is out of range (see cuda_device_count())";
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
      return "a kernel faulted; the context is lost. Re-run under compute-sanitizer to find the access";
    case cudaErrorStreamCaptureUnsupported:
    case cudaErrorStreamCaptureInvalidated:
      return "an operation that cannot be captured ran inside a CUDA graph capture";
    case cudaErrorNoKernelImageForDevice:
      return "this binary has no code for this GPU: rebuild with its CMAKE_CUDA_ARCHITECTURES";
    default:
      return "see the CUDA runtime documentation for this error";
  }
}

[[noreturn]] inline void throw_cuda(cudaError_t e, const char* call, const char* file, int line) {
  ErrorKind kind = (e == cudaErrorMemoryAllocation) ? ErrorKind::kResource : ErrorKind::kInternal;
  throw Error(cat(file, ":", line, ": ", call, " failed: ", cudaGetErrorName(e), " (", cudaGetErrorString(e),
                  "). Hint: ", cuda_hint(e)),
              kind);
}

// Vectorized (16-byte) paths need their pointers aligned.
__host__ __device__ inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline void check_cuda(cudaError_t e, const char* call, const char* file, int line) {
  if (e != cudaSuccess) throw_cuda(e, call, file, line);
}

inline void check_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  ErrorKind kind = (s == CUBLAS_STATUS_ALLOC_FAILED) ? ErrorKind::kResource : ErrorKind::kInternal;
  throw Error(cat(file, ":", line, ": ", call, " failed: ", cublasGetStatusName(s), " (", cublasGetStatusString(s),
                  "). Hint: check the GEMM shapes/leading dimensions and that cuBLAS matches the driver"),
              kind);
}

#define SHARDLM_CUDA_CHECK(call) ::shardlm::cuda_detail::check_cuda((call), #call, __FILE__, __LINE__)
#define SHARDLM_CUBLAS_CHECK(call) ::shardlm::cuda_detail::check_cublas((call), #call, __FILE__, __LINE__)
// After every kernel launch: launch-configuration errors surface here, with the kernel's name.
#define SHARDLM_CUDA_CHECK_LAUNCH(what) \
  ::shardlm::cuda_detail::check_cuda(cudaGetLastError(), "launch of " what, __FILE__, __LINE__)

// Owning device allocation.
class DevMem {
 public:
  DevMem() = default;
  explicit DevMem(size_t bytes) : bytes_(bytes) {
    if (bytes) SHARDLM_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
  }
  ~DevMem() { reset(); }
  DevMem(DevMem&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DevMem& operator=(DevMem&& o) noexcept {
    if (this != &o) {
      reset();
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  void reset() {
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* get() const { return ptr_; }
  size_t size() const { return bytes_; }
  template <typename T>
  T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Owning page-locked host allocation (needed for copies that a graph may capture).
class PinnedMem {
 public:
  PinnedMem() = default;
  explicit PinnedMem(size_t bytes) { SHARDLM_CUDA_CHECK(cudaMallocHost(&ptr_, bytes)); }
  ~PinnedMem() {
    if (ptr_) cudaFreeHost(ptr_);
  }
  PinnedMem(PinnedMem&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)) {}
  PinnedMem& operator=(PinnedMem&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    return *this;
  }
  template <typename T>
  T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
};

class Stream {
 public:
  Stream() { SHARDLM_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~Stream() {
    if (s_) cudaStreamDestroy(s_);
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

class Event {
 public:
  explicit Event(unsigned flags = cudaEventDefault) { SHARDLM_CUDA_CHECK(cudaEventCreateWithFlags(&e_, flags)); }
  ~Event() {
    if (e_) cudaEventDestroy(e_);
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t get() const { return e_; }

 private:
  cudaEvent_t e_ = nullptr;
};

class CublasHandle {
 public:
  CublasHandle() { SHARDLM_CUBLAS_CHECK(cublasCreate(&h_)); }
  ~CublasHandle() {
    if (h_) cublasDestroy(h_);
  }
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  cublasHandle_t get() const { return h_; }

 private:
  cublasHandle_t h_ = nullptr;
};

class Graph {
 public:
  Graph() = default;
  ~Graph() { reset(); }
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  void reset() {
    if (exec_) cudaGraphExecDestroy(exec_);
    if (graph_) cudaGraphDestroy(graph_);
    exec_ = nullptr;
    graph_ = nullptr;
  }
  // Takes ownership of a captured graph and instantiates it.
  void adopt(cudaGraph_t g) {
    reset();
    graph_ = g;
    SHARDLM_CUDA_CHECK(cudaGraphInstantiate(&exec_, graph_, 0));
  }
  cudaGraphExec_t exec() const { return exec_; }
  bool valid() const { return exec_ != nullptr; }

 private:
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

// Makes `device` current for the calling thread for the scope (several backends may share a thread).
class DeviceGuard {
 public:
  // Makes `device` current for this thread and leaves it so: a rank works on one GPU, and restoring the
  // previous device would be harmful, since cudaSetDevice creates that device's context (CUDA >= 12):
  // on a thread that never chose a device that meant a ~0.5 GiB context on GPU 0 in every rank.
  explicit DeviceGuard(int device) {
    int cur = -1;
    SHARDLM_CUDA_CHECK(cudaGetDevice(&cur));
    if (cur != device) SHARDLM_CUDA_CHECK(cudaSetDevice(device));
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
};

}  // namespace shardlm::cuda_detail
