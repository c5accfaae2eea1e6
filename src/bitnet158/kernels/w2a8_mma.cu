// Ternary weights (2 bits) times int8 activations for 2 to 64 rows: int8 mma.sync fed straight from the
// packed bytes in registers, with no shared-memory staging of the weights. Compiled at first use with
// NVRTC (`kernels/gpu_mma.py`), after the helpers of `cuda_common.cuh`.
//
// Weights are our layout (kernels/gpu.py): uint8 [R, Kp], byte (r, k) holding the codes t + 1 of rows
// r, r + R, r + 2R, r + 3R at column k, two bits each. A 16-byte load of packed row r therefore gives,
// after `(word >> 2i) & 0x03030303`, the int8 codes of row r + iR at 16 consecutive columns: four words
// of an mma A fragment (m16n8k32: each lane holds 4 consecutive columns of one row). The weights are the
// A operand (16 output rows per mma), the activations the B operand (8 tokens per mma).
//
// The sum over k does not care about the order of k, so each lane reads 16 consecutive bytes and the
// activations are read in the same permuted order: lane (g, q) (g = lane / 4, q = lane % 4) loads bytes
// [16q, 16q + 16) of a 64-byte chunk of packed rows g and g + 8, and of token g. Its four words feed two
// mma steps of 32 columns each. A warp thus reads 8 rows x 64 contiguous bytes per load: whole sectors.
//
// A block holds GROUPS row groups of 16 packed rows (64 output rows each) and 8 * NT tokens; the warps of a
// row group take turns over the 64-byte chunks of its part of K, DEPTH chunks at a time, and add their int32
// sums in shared memory. Few rows leave little work per weight byte, so a tile's K is cut into SPLITS parts,
// one block each, and these blocks form one thread-block cluster (Hopper): once all have their sums, each
// adds up its share of the tile's outputs from every block's shared memory and writes it. No workspace, no
// counters, no second pass through global memory. All sums are exact in int32; the scales are applied once, in the order of
// `reference.ternary_linear`.
//
// The kernel is launched to overlap the one before it (programmatic dependent launch): it has its weights
// copied into L2 and requests the weight scales, which no kernel writes, then waits for its predecessor
// before it reads the activations. The scales the output needs are requested before the main loop and
// parked in shared memory, so that the output step waits on no global load.

constexpr int kRows = 16;    // packed rows per block (64 output rows)
constexpr int kChunk = 64;   // bytes of K per warp step
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

struct Words {
  unsigned x, y, z, w;
};

__device__ __forceinline__ void mma_s8(int (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                       unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned field(unsigned word, int i) { return (word >> (2 * i)) & 0x03030303u; }

// Weights are read once: keep them out of L1, which holds the activations every block reads.
__device__ __forceinline__ Words load_weights(const unsigned char* ptr, bool ok) {
  Words v = {0, 0, 0, 0};
  if (ok) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(ptr));
  }
  return v;
}

__device__ __forceinline__ Words load_codes(const signed char* ptr, bool ok) {
  Words v = {0, 0, 0, 0};
  if (ok) {
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(ptr));
  }
  return v;
}

__device__ __forceinline__ void store(void* out, int kind, long long i, int total, float value) {
  if (kind == kInt32) {
    static_cast<int*>(out)[i] = total;
  } else if (kind == kFloat32) {
    static_cast<float*>(out)[i] = value;
  } else {
    static_cast<unsigned short*>(out)[i] = to_half_bits(kind, value);
  }
}

// Start copying `bytes` (a multiple of 16, from a 16-byte aligned address) into L2; nothing waits for it.
__device__ __forceinline__ void prefetch_to_l2(const void* ptr, int bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(ptr), "r"(bytes) : "memory");
}

// `*ptr` in the shared memory of block `rank` of this cluster.
__device__ __forceinline__ int load_from_block(const int* ptr, unsigned rank) {
  unsigned remote;
  int value;
  asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_address(ptr)), "r"(rank));
  asm volatile("ld.shared::cluster.u32 %0, [%1];" : "=r"(value) : "r"(remote) : "memory");
  return value;
}

template <int NT, int DEPTH, int SPLITS, int GROUPS>
__global__ void __cluster_dims__(1, 1, SPLITS) __launch_bounds__(kThreads) w2a8_mma(
    const signed char* __restrict__ codes, const float* __restrict__ x_scale, const int* __restrict__ x_sum,
    const unsigned char* __restrict__ weight, const float* __restrict__ w_scale, int w_scale_stride,
    const void* __restrict__ bias, int has_bias, void* __restrict__ out, int out_kind, int M, int R, int N,
    int Kp, int stride_codes, int stride_out) {
  // The block's warps form GROUPS row groups of kRows packed rows; the kGroupWarps warps of a group take turns
  // over its chunks of K. The groups read the same activations at about the same time: all but the first read
  // of each comes from L1.
  static_assert(kWarps % GROUPS == 0, "whole warps per row group");
  constexpr int kGroupWarps = kWarps / GROUPS;
  constexpr int kSlotsPerGroup = kGroupWarps > 1 ? kGroupWarps / 2 : 1;
  constexpr int kTokens = 8 * NT;
  constexpr int kRegs = 4 * NT * 4;  // each lane's sums: acc[2-bit field][token tile][C fragment register]
  constexpr int kSlot = kRegs * 32;
  constexpr int kCols = 4 * kRows * GROUPS;  // output columns of the block
  constexpr int kColsPerThread = (kCols + kThreads - 1) / kThreads;
  static_assert(GROUPS * kSlotsPerGroup * kSlot * 4 <= 32768,
                "the partial sums must leave room in 48 KB of shared memory (gpu_mma.fits)");
  static_assert(kTokens <= kThreads, "one thread per token");
  __shared__ int partial[GROUPS * kSlotsPerGroup * kSlot];
  // The output's scales: per column (c = group * 4 * kRows + i * kRows + j) the weight scale and bias, per token
  // its scale and code sum.
  __shared__ float col_scale[kCols], col_bias[kCols], token_scale[kTokens];
  __shared__ int token_sum[kTokens];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = warp / kGroupWarps, group_warp = warp % kGroupWarps;
  const int g = lane / 4, q = lane % 4;
  const int p0 = blockIdx.x * kRows * GROUPS, m0 = blockIdx.y * kTokens;

  // Each thread fetches the scales of its columns at once, and of its token after the wait.
  float own_col_scale[kColsPerThread], own_col_bias[kColsPerThread];
#pragma unroll
  for (int s = 0; s < kColsPerThread; ++s) {
    const int c = threadIdx.x + s * kThreads;
    const int p = p0 + c / (4 * kRows) * kRows + c % kRows, col = p + c / kRows % 4 * R;
    const bool ok = c < kCols && p < R && col < N;
    own_col_scale[s] = ok ? w_scale[col * w_scale_stride] : 0.0f;
    own_col_bias[s] = ok && has_bias ? load_float(bias, out_kind, col) : 0.0f;
  }
  const int own_token = m0 + static_cast<int>(threadIdx.x);
  const bool token_ok = threadIdx.x < kTokens && own_token < M;

  const int row = p0 + group * kRows + g;
  const bool lo_ok = row < R, hi_ok = row + 8 < R;
  const unsigned char* w_lo = weight + static_cast<long long>(lo_ok ? row : 0) * Kp + 16 * q;
  const unsigned char* w_hi = weight + static_cast<long long>(hi_ok ? row + 8 : 0) * Kp + 16 * q;
  const signed char* a_row[NT];
  bool a_ok[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int m = m0 + 8 * t + g;
    a_ok[t] = m < M;
    a_row[t] = codes + static_cast<long long>(a_ok[t] ? m : 0) * stride_codes + 16 * q;
  }
  int acc[4][NT][4] = {};

  const int chunks = Kp / kChunk;
  const int per_split = (chunks + SPLITS - 1) / SPLITS;
  const int first = blockIdx.z * per_split, end = min(chunks, first + per_split);
  // The block's weights do not depend on the previous kernel: the copy engine brings them all into L2 while
  // it ends, and the loads below then wait on L2 rather than on device memory.
  if (blockIdx.y == 0 && threadIdx.x < kRows * GROUPS && p0 + threadIdx.x < R && first < end) {
    prefetch_to_l2(weight + static_cast<long long>(p0 + threadIdx.x) * Kp + first * kChunk, (end - first) * kChunk);
  }
  wait_for_previous_kernel();
  const float own_token_scale = token_ok ? x_scale[own_token] : 0.0f;
  const int own_token_sum = token_ok ? x_sum[own_token] : 0;
  for (int base = first + group_warp; base < end; base += kGroupWarps * DEPTH) {
    Words lo[DEPTH], hi[DEPTH], act[DEPTH][NT];
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {  // every load first, so that DEPTH of them are in flight
      const int c = base + d * kGroupWarps;
      lo[d] = load_weights(w_lo + c * kChunk, lo_ok && c < end);
      hi[d] = load_weights(w_hi + c * kChunk, hi_ok && c < end);
#pragma unroll
      for (int t = 0; t < NT; ++t) act[d][t] = load_codes(a_row[t] + c * kChunk, a_ok[t] && c < end);
    }
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          mma_s8(acc[i][t], field(lo[d].x, i), field(hi[d].x, i), field(lo[d].y, i), field(hi[d].y, i),
                 act[d][t].x, act[d][t].y);
          mma_s8(acc[i][t], field(lo[d].z, i), field(hi[d].z, i), field(lo[d].w, i), field(hi[d].w, i),
                 act[d][t].z, act[d][t].w);
        }
      }
    }
  }
#pragma unroll
  for (int s = 0; s < kColsPerThread; ++s) {
    const int c = threadIdx.x + s * kThreads;
    if (c < kCols) {
      col_scale[c] = own_col_scale[s];
      col_bias[c] = own_col_bias[s];
    }
  }
  if (threadIdx.x < kTokens) {
    token_scale[threadIdx.x] = own_token_scale;
    token_sum[threadIdx.x] = own_token_sum;
  }
  // Add each group's warp sums through shared memory in two steps: the upper half of its warps stores its
  // registers as they are (conflict-free), the lower half adds its own to them; then every thread adds up the
  // slots for its share of the sums and leaves them in the group's first slot. A tree of halvings took three
  // times the barriers with fewer warps at work. The barriers also publish the scales above.
  int* own_slot = partial + (group * kSlotsPerGroup + group_warp % kSlotsPerGroup) * kSlot;
  if (kGroupWarps == 1 || group_warp >= kGroupWarps / 2) {
#pragma unroll
    for (int j = 0; j < kRegs; ++j) own_slot[j * 32 + lane] = acc[j / (4 * NT)][j / 4 % NT][j % 4];
  }
  __syncthreads();
  if (kGroupWarps > 1) {
    if (group_warp < kGroupWarps / 2) {
#pragma unroll
      for (int j = 0; j < kRegs; ++j) own_slot[j * 32 + lane] += acc[j / (4 * NT)][j / 4 % NT][j % 4];
    }
    __syncthreads();
  }
  if (kSlotsPerGroup > 1) {
    for (int idx = threadIdx.x; idx < GROUPS * kSlot; idx += kThreads) {
      int* slots = partial + idx / kSlot * kSlotsPerGroup * kSlot + idx % kSlot;
      int total = 0;
#pragma unroll
      for (int slot = 0; slot < kSlotsPerGroup; ++slot) total += slots[slot * kSlot];
      slots[0] = total;  // only this thread reads or writes this column of the slots
    }
  }
  if (SPLITS > 1) {
    cluster_sync();  // every block of the tile has its sums
  } else {
    __syncthreads();
  }

  // Output: token-major, kRows * GROUPS consecutive output columns per i; block z writes every SPLITS-th.
  // C fragment of mma (i, t): c0, c1 at packed row g, tokens 8t + 2q and 8t + 2q + 1; c2, c3 at row g + 8.
  constexpr int kRowsOfBlock = kRows * GROUPS;
  for (int idx = blockIdx.z * kThreads + threadIdx.x; idx < GROUPS * kSlot; idx += SPLITS * kThreads) {
    const int token = idx / (4 * kRowsOfBlock), i = idx / kRowsOfBlock % 4, jj = idx % kRowsOfBlock;
    const int grp = jj / kRows, j = jj % kRows;
    const int m = m0 + token, col = p0 + jj + i * R;
    if (m >= M || p0 + jj >= R || col >= N) continue;
    const int reg = (i * NT + token / 8) * 4 + (j >= 8) * 2 + token % 2;
    const int* own = partial + grp * kSlotsPerGroup * kSlot + reg * 32 + (j % 8) * 4 + token % 8 / 2;
    int total = -token_sum[token];
#pragma unroll
    for (int s = 0; s < SPLITS; ++s) total += SPLITS > 1 ? load_from_block(own, s) : *own;
    float value = 0.0f;
    if (out_kind != kInt32) {
      const int c = grp * 4 * kRows + i * kRows + j;
      value = __fmul_rn(static_cast<float>(total), __fmul_rn(token_scale[token], col_scale[c]));
      if (has_bias) value = __fadd_rn(value, col_bias[c]);
    }
    store(out, out_kind, static_cast<long long>(m) * stride_out + col, total, value);
  }
  if (SPLITS > 1) cluster_sync_relaxed();  // each block's shared memory stays until the others have read it
}
