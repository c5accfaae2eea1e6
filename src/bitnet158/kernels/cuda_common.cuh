// Device helpers shared by the CUDA kernels (`w2a8_mma.cu`, `w2a8_wgmma.cu`): `cuda_driver.compile_kernel` puts
// this file in front of each kernel's source, since NVRTC compiles them with no include path.

// Output element types (`out_kind`).
constexpr int kInt32 = 0, kFloat32 = 1, kBFloat16 = 2, kFloat16 = 3;

__device__ __forceinline__ unsigned smem_address(const void* ptr) {
  unsigned address;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(address) : "l"(ptr));
  return address;
}

__device__ __forceinline__ float load_float(const void* ptr, int kind, int i) {
  if (kind == kBFloat16) return __uint_as_float(static_cast<unsigned>(static_cast<const unsigned short*>(ptr)[i]) << 16);
  if (kind == kFloat16) {
    float v;
    asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(static_cast<const unsigned short*>(ptr)[i]));
    return v;
  }
  return static_cast<const float*>(ptr)[i];
}

// `value` rounded to bf16 or f16 (`kind`), as bits.
__device__ __forceinline__ unsigned short to_half_bits(int kind, float value) {
  unsigned short bits;
  if (kind == kBFloat16) {
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(value));
  } else {
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(value));
  }
  return bits;
}

// Block until the kernel before this one has finished and its writes are visible; then let the next start.
__device__ __forceinline__ void wait_for_previous_kernel() {
  asm volatile("griddepcontrol.wait;\ngriddepcontrol.launch_dependents;" ::: "memory");
}

// Every block's shared-memory writes before it are visible to the cluster's blocks after it.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// Only waits: no memory ordering, so no wait for this block's own memory traffic to drain.
__device__ __forceinline__ void cluster_sync_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\nbarrier.cluster.wait.aligned;" ::: "memory");
}
