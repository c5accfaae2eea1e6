// Ternary weights (2 bits) times int8 activations on Hopper's warpgroup tensor cores (wgmma), for the shapes and
// batches where it beats the mma.sync kernel (`w2a8_mma.cu`) and unpacking plus an int8 GEMM (`gpu_wgmma.PICKED`).
// Compiled at first use with NVRTC for sm_90a (`kernels/gpu_wgmma.py`), after the helpers of `cuda_common.cuh`.
//
// Weights are our layout (kernels/gpu.py): uint8 [R, Kp], byte (r, k) holding the codes t + 1 of rows
// r, r + R, r + 2R, r + 3R at column k, two bits each. The weights are wgmma's A operand, taken from
// registers: the copy engine (TMA) brings the packed bytes of ROWS packed rows into shared memory, each lane
// loads the words of its A fragment from there and keeps one 2-bit field, `(word >> 2w) & 0x03030303`, so
// that warp w of the warpgroup multiplies the output rows p + wR. The activations (the codes of TOKENS
// tokens) are the B operand, read by the tensor cores straight from shared memory. The packed weights thus
// never exist unpacked outside registers: a tile of K needs a quarter of the bytes an int8 weight tile would.
//
// A block is a producer warp, which keeps STAGES tiles of 128 bytes of K in flight (weights and activations,
// 128-byte swizzled, completing on mbarriers), and WARPGROUPS warpgroups of 4 consumer warps, each with its
// share of the row groups (16 packed rows, 64 output rows); with more warpgroups than row groups, the warpgroups
// of a row group take turns over K and add up their sums in shared memory at the end. A chunk of K is 4 steps
// of 32 columns: one wgmma m64nNk32 (N = 64 or 128 tokens) per step, row group and N tokens. A warpgroup loads
// the A fragments of two chunks, issues their wgmmas and waits for them (see `consume`); the other blocks or
// warpgroups on the multiprocessor keep its tensor cores busy meanwhile. Few tokens leave little work per weight
// byte, so a tile's K may be cut into SPLITS parts whose blocks form one thread-block cluster and add up their sums
// through each other's shared memory, as in `w2a8_mma.cu`. All sums are exact in int32; the scales are applied
// once, in the order of `reference.ternary_linear`.
//
// The kernel is launched to overlap the one before it (programmatic dependent launch): the producer starts
// the first stages' weight copies, which no kernel writes, before it waits for that kernel.

constexpr int kChunk = 128;          // bytes of K per stage: one 128-byte swizzle row
constexpr int kChunksPerBatch = 2;  // chunks whose wgmmas a warpgroup issues before it waits for them

struct alignas(64) TensorMap {  // CUtensorMap: opaque, 128 bytes, built on the host
  unsigned long long words[16];
};

struct Ints {
  int x, y, z, w;
};

__device__ __forceinline__ void barrier_init(unsigned long long* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_address(bar)), "r"(count) : "memory");
}

__device__ __forceinline__ void barrier_expect_bytes(unsigned long long* bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_address(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void barrier_arrive(unsigned long long* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_address(bar)) : "memory");
}

// Wait until the barrier's phase of this parity has completed.
__device__ __forceinline__ void barrier_wait(unsigned long long* bar, int parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}" ::"r"(smem_address(bar)),
      "r"(parity)
      : "memory");
}

// Copy the box at (column x, row y) of a 2-D tensor into shared memory; completes on `bar`.
__device__ __forceinline__ void tma_load(void* dst, const TensorMap* map, int x, int y, unsigned long long* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
      ::"r"(smem_address(dst)), "l"(map), "r"(x), "r"(y), "r"(smem_address(bar))
      : "memory");
}

// Four ints at `ptr` in the shared memory of block `rank` of this cluster.
__device__ __forceinline__ Ints load_from_block(const int* ptr, unsigned rank) {
  unsigned remote;
  Ints v;
  asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_address(ptr)), "r"(rank));
  asm volatile("ld.shared::cluster.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(remote) : "memory");
  return v;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Shared-memory descriptor of a K-major operand tile in 128-byte swizzled rows: 8-row groups 1024 bytes apart.
__device__ __forceinline__ unsigned long long operand_descriptor(const void* tile) {
  const unsigned long long address = smem_address(tile);
  return ((address & 0x3FFFF) >> 4) | (1ull << 16) | ((1024ull >> 4) << 32) | (1ull << 62);
}

// d[64 x N] += a[64 x 32] (registers) * b[N x 32]^T (shared memory), int8 in, int32 sums; N = 64 or 128.
__device__ __forceinline__ void wgmma_s8(int (&d)[32], const unsigned (&a)[4], unsigned long long b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p;\n}"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

__device__ __forceinline__ void wgmma_s8(int (&d)[64], const unsigned (&a)[4], unsigned long long b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p;\n}"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]),
        "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]),
        "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]),
        "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]),
        "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]),
        "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]),
        "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]),
        "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

// A consumer warpgroup's batch of BATCH chunks, from chunk i on: its lanes load all their A fragments (the packed
// rows first_row.. of the warpgroup, field `shift`), then it issues the wgmmas and waits for them, and the stages
// go back to the producer. A registers written while any wgmma is in flight would make ptxas serialize every
// wgmma (C7513); the other warpgroups, or blocks, keep the tensor cores busy while this one loads.
// Lane (g, q) holds, per row group j, the A fragment of packed rows 16j + g and 16j + g + 8: columns 4q..4q+3
// and 16+4q..16+4q+3 of each 32. In a 128-byte swizzled row r, 16-byte chunk c sits at c ^ (r % 8).
template <int BATCH, int ROWS, int TOKENS, int STAGES, int GROUPS, int TOKEN_TILES, int N>
__device__ __forceinline__ void consume(int (&acc)[GROUPS][TOKEN_TILES][N], const unsigned char* smem,
                                        unsigned long long* full, unsigned long long* empty, int i, int first_row,
                                        int lane, int shift) {
  constexpr int kWeightBytes = ROWS * kChunk, kStageBytes = (ROWS + TOKENS) * kChunk, kN = 2 * N;
  const int g = lane / 4, q = lane % 4;
  unsigned a[BATCH][4][GROUPS][4];
#pragma unroll
  for (int b = 0; b < BATCH; ++b) {
    const int s = (i + b) % STAGES;
    barrier_wait(&full[s], ((i + b) / STAGES) & 1);
    const unsigned char* weights = smem + s * kStageBytes;
#pragma unroll
    for (int step = 0; step < 4; ++step) {
#pragma unroll
      for (int j = 0; j < GROUPS; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // h = 1: row g + 8
#pragma unroll
          for (int half = 0; half < 2; ++half) {  // columns 16 * half + 4q of the step
            const int row = first_row + 16 * j + g + 8 * h, c = 2 * step + half;
            const unsigned word =
                *reinterpret_cast<const unsigned*>(weights + row * kChunk + ((c ^ (row % 8)) * 16) + 4 * q);
            a[b][step][j][h + 2 * half] = (word >> shift) & 0x03030303u;
          }
        }
      }
    }
  }
  wgmma_fence();
#pragma unroll
  for (int b = 0; b < BATCH; ++b) {
    const unsigned long long codes = operand_descriptor(smem + (i + b) % STAGES * kStageBytes + kWeightBytes);
#pragma unroll
    for (int step = 0; step < 4; ++step) {
#pragma unroll
      for (int j = 0; j < GROUPS; ++j) {
#pragma unroll
        for (int t = 0; t < TOKEN_TILES; ++t) {
          wgmma_s8(acc[j][t], a[b][step][j], codes + ((t * kN * kChunk + 32 * step) >> 4));
        }
      }
    }
  }
  wgmma_commit();
  wgmma_wait<0>();
  if (lane == 0) {
#pragma unroll
    for (int b = 0; b < BATCH; ++b) barrier_arrive(&empty[(i + b) % STAGES]);
  }
}

template <int ROWS, int TOKENS, int STAGES, int SPLITS, int WARPGROUPS>
__global__ void __cluster_dims__(1, 1, SPLITS) __launch_bounds__(128 * WARPGROUPS + 32, 1) w2a8_wgmma(
    const __grid_constant__ TensorMap weight_map, const __grid_constant__ TensorMap codes_map,
    const float* __restrict__ x_scale, const int* __restrict__ x_sum, const float* __restrict__ w_scale,
    int w_scale_stride, const void* __restrict__ bias, int has_bias, void* __restrict__ out, int out_kind, int M,
    int R, int N, int Kp, int stride_out) {
  static_assert(ROWS % 16 == 0 && TOKENS % 64 == 0 && TOKENS <= 256, "whole wgmma tiles, one TMA box of tokens");
  // Warpgroups beyond the row groups share rows and take turns over K: kShares warpgroups hold each row group.
  constexpr int kShares = WARPGROUPS > ROWS / 16 ? WARPGROUPS / (ROWS / 16) : 1;
  static_assert(ROWS % (16 * WARPGROUPS / kShares) == 0 && WARPGROUPS % kShares == 0,
                "whole row groups per warpgroup, or whole warpgroups per row group");
  static_assert(STAGES >= kShares, "a stage in flight per share");
  constexpr int kRowWarpgroups = WARPGROUPS / kShares;
  constexpr int kConsumers = 128 * WARPGROUPS, kThreads = kConsumers + 32;
  constexpr int kGroups = ROWS / 16 / kRowWarpgroups;  // row groups of a warpgroup: one wgmma each per step
  constexpr int kN = TOKENS % 128 == 0 ? 128 : 64;  // tokens per wgmma
  constexpr int kTokenTiles = TOKENS / kN;
  constexpr int kCols = 4 * ROWS;           // output columns of the block, field-major: c = w * ROWS + r
  constexpr int kPitch = kCols + 4;         // ints per token row of the sums tile (+4: no bank conflicts)
  constexpr int kWeightBytes = ROWS * kChunk, kCodeBytes = TOKENS * kChunk;
  constexpr int kStageBytes = kWeightBytes + kCodeBytes;
  constexpr int kTileBytes = TOKENS * kPitch * 4;
  constexpr int kDataBytes = STAGES * kStageBytes > kTileBytes ? STAGES * kStageBytes : kTileBytes;

  extern __shared__ unsigned char raw_smem[];
  // Swizzled TMA boxes must start at 1024-byte boundaries.
  unsigned char* smem = raw_smem + ((1024 - smem_address(raw_smem) % 1024) % 1024);
  int* tile = reinterpret_cast<int*>(smem);  // after the main loop: the block's int32 sums [TOKENS][kPitch]
  unsigned long long* full = reinterpret_cast<unsigned long long*>(smem + kDataBytes);
  unsigned long long* empty = full + STAGES;
  float* col_scale = reinterpret_cast<float*>(empty + STAGES);
  float* col_bias = col_scale + kCols;
  float* token_scale = col_bias + kCols;
  int* token_sum = reinterpret_cast<int*>(token_scale + TOKENS);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int p0 = blockIdx.x * ROWS, m0 = blockIdx.y * TOKENS;
  const int chunks = Kp / kChunk;
  const int per_split = (chunks + SPLITS - 1) / SPLITS;
  const int first = blockIdx.z * per_split, end = min(chunks, first + per_split);

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      barrier_init(&full[s], 1);
      barrier_init(&empty[s], kConsumers / 32 / kShares);  // a stage's chunk goes to one share
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  // The weight scales and bias, which no kernel writes, before the wait.
  for (int c = threadIdx.x; c < kCols; c += kThreads) {
    const int p = p0 + c % ROWS, col = p + c / ROWS * R;
    const bool ok = p < R && col < N;
    col_scale[c] = ok ? w_scale[col * w_scale_stride] : 0.0f;
    col_bias[c] = ok && has_bias ? load_float(bias, out_kind, col) : 0.0f;
  }
  __syncthreads();

  int acc[kGroups][kTokenTiles][kN / 2] = {};
  if (warp == kConsumers / 32) {
    // Producer: one lane issues every copy. The first stages' weights go out before the wait.
    if (lane == 0) {
      const int early = min(STAGES, end - first);
      for (int i = 0; i < early; ++i) {
        barrier_expect_bytes(&full[i], kStageBytes);
        tma_load(smem + i * kStageBytes, &weight_map, (first + i) * kChunk, p0, &full[i]);
      }
      wait_for_previous_kernel();
      for (int i = 0; i < early; ++i) {
        tma_load(smem + i * kStageBytes + kWeightBytes, &codes_map, (first + i) * kChunk, m0, &full[i]);
      }
      for (int i = early; first + i < end; ++i) {
        const int s = i % STAGES;
        barrier_wait(&empty[s], (i / STAGES - 1) & 1);
        barrier_expect_bytes(&full[s], kStageBytes);
        tma_load(smem + s * kStageBytes, &weight_map, (first + i) * kChunk, p0, &full[s]);
        tma_load(smem + s * kStageBytes + kWeightBytes, &codes_map, (first + i) * kChunk, m0, &full[s]);
      }
    } else {
      wait_for_previous_kernel();
    }
  } else {
    wait_for_previous_kernel();
    // Consumer warp w of warpgroup v keeps 2-bit field w of its packed rows: its output rows are p + wR. Share
    // `share` of those rows takes every kShares-th batch of chunks.
    const int shift = 2 * (warp % 4), first_row = warp / 4 % kRowWarpgroups * kGroups * 16;
    const int share = warp / 4 / kRowWarpgroups, chunks_here = end - first;
    constexpr int kBatch = kChunksPerBatch < STAGES / kShares ? kChunksPerBatch : STAGES / kShares;
    for (int i = share * kBatch; i < chunks_here; i += kShares * kBatch) {
      if (i + kBatch <= chunks_here) {
        consume<kBatch, ROWS, TOKENS, STAGES>(acc, smem, full, empty, i, first_row, lane, shift);
      } else {
        for (int c = i; c < chunks_here; ++c) {
          consume<1, ROWS, TOKENS, STAGES>(acc, smem, full, empty, c, first_row, lane, shift);
        }
      }
    }
  }

  // The sums of this block into its tile, one share after the other; the pipeline's shared memory is free once
  // every consumer is done. C fragment of wgmma (j, t) at warp w: d[4b], d[4b+1] at the warpgroup's row 16j + g,
  // tokens Nt + 8b + 2q and + 1; d[4b+2], d[4b+3] at row 16j + g + 8.
  for (int share = 0; share < kShares; ++share) {
    __syncthreads();
    if (warp < kConsumers / 32 && warp / 4 / kRowWarpgroups == share) {
      const int g = lane / 4, q = lane % 4;
#pragma unroll
      for (int j = 0; j < kGroups; ++j) {
#pragma unroll
        for (int t = 0; t < kTokenTiles; ++t) {
#pragma unroll
          for (int b = 0; b < kN / 8; ++b) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int token = kN * t + 8 * b + 2 * q + e % 2;
              const int c = warp % 4 * ROWS + warp / 4 % kRowWarpgroups * kGroups * 16 + 16 * j + g + 8 * (e / 2);
              int* sum = tile + token * kPitch + c;
              *sum = (share > 0 ? *sum : 0) + acc[j][t][4 * b + e];
            }
          }
        }
      }
    }
  }
  for (int t = threadIdx.x; t < TOKENS; t += kThreads) {
    const int m = m0 + t;
    token_scale[t] = m < M ? x_scale[m] : 0.0f;
    token_sum[t] = m < M ? x_sum[m] : 0;
  }
  if (SPLITS > 1) {
    cluster_sync();  // every block of the tile has its sums
  } else {
    __syncthreads();
  }

  // Output: 8 consecutive columns of one field per unit, token-major; block z takes every SPLITS-th unit.
  constexpr int kUnitsPerToken = kCols / 8;
  for (int u = blockIdx.z * kThreads + threadIdx.x; u < TOKENS * kUnitsPerToken; u += SPLITS * kThreads) {
    const int token = u / kUnitsPerToken, c0 = u % kUnitsPerToken * 8;
    const int m = m0 + token, p = p0 + c0 % ROWS, col0 = p + c0 / ROWS * R;
    const int count = min(8, min(R - p, N - col0));
    if (m >= M || count <= 0) continue;
    int total[8];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      Ints sum = {0, 0, 0, 0};
#pragma unroll
      for (int s = 0; s < SPLITS; ++s) {
        const Ints v = SPLITS > 1 ? load_from_block(tile + token * kPitch + c0 + 4 * h, s)
                                  : *reinterpret_cast<const Ints*>(tile + token * kPitch + c0 + 4 * h);
        sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
      }
      total[4 * h] = sum.x, total[4 * h + 1] = sum.y, total[4 * h + 2] = sum.z, total[4 * h + 3] = sum.w;
    }
    const long long at = static_cast<long long>(m) * stride_out + col0;
    if (out_kind == kInt32) {
      int* dst = static_cast<int*>(out) + at;
      for (int e = 0; e < count; ++e) dst[e] = total[e] - token_sum[token];
      continue;
    }
    float value[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      value[e] = __fmul_rn(static_cast<float>(total[e] - token_sum[token]),
                           __fmul_rn(token_scale[token], col_scale[c0 + e]));
      if (has_bias) value[e] = __fadd_rn(value[e], col_bias[c0 + e]);
    }
    if (out_kind == kFloat32) {
      float* dst = static_cast<float*>(out) + at;
      for (int e = 0; e < count; ++e) dst[e] = value[e];
      continue;
    }
    unsigned short* dst = static_cast<unsigned short*>(out) + at;
    if (count == 8 && reinterpret_cast<unsigned long long>(dst) % 16 == 0) {
      unsigned words[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        words[e] = to_half_bits(out_kind, value[2 * e]) | static_cast<unsigned>(to_half_bits(out_kind, value[2 * e + 1])) << 16;
      }
      asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(words[0]), "r"(words[1]),
                   "r"(words[2]), "r"(words[3]) : "memory");
    } else {
      for (int e = 0; e < count; ++e) dst[e] = to_half_bits(out_kind, value[e]);
    }
  }
  if (SPLITS > 1) cluster_sync_relaxed();  // each block's shared memory stays until the others have read it
}
