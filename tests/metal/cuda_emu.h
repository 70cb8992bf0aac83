// A CPU emulator of the CUDA subset the attention kernels use, for CI without a GPU: every
// GPU thread is a std::thread, a warp's collectives (shuffles, votes, mma.sync, movmatrix)
// exchange registers through per-warp slots between two barrier phases, __syncthreads is a
// block barrier, and __shared__ arrays are function statics (blocks run one after another).
// Blocks run one after another (a legal schedule), so the fused split-K merge's "last
// threadgroup" is the last split; atomics and fences are real (threads of a block overlap).
// Fragment layouts follow the PTX ISA (mma.m16n8k16 .f16 -> .f32, movmatrix.m8n8.trans.b16).
// It checks the kernels' logic and data layout, not their speed; the GPU checks the rest.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) alignas(n)
#define __grid_constant__
#define TQ_DYNAMIC_SHARED(T, name) alignas(16) static T name[1 << 16]

struct __half { uint16_t bits; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.bits, 2); return (float)f; }
inline __half __float2half_rn(float x) { _Float16 f = (_Float16)x; __half h; std::memcpy(&h.bits, &f, 2); return h; }
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t w = (uint32_t)b.bits << 16; float f; std::memcpy(&f, &w, 4); return f; }
struct uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }
struct dim3 { unsigned int x = 1, y = 1, z = 1; };
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 gridDim, blockDim;

namespace tq_emu {
struct Warp {
  std::barrier<> bar{32};
  uint32_t slot[32][8];
};
inline std::unique_ptr<std::barrier<>> block_bar;
inline std::vector<std::unique_ptr<Warp>> warps;
inline Warp& warp() { return *warps[threadIdx.x / 32]; }
inline int lane() { return threadIdx.x % 32; }
template <typename T> uint32_t bits(T v) { uint32_t u = 0; std::memcpy(&u, &v, sizeof(T)); return u; }
template <typename T> T from_bits(uint32_t u) { T v; std::memcpy(&v, &u, sizeof(T)); return v; }
inline float h(uint32_t word, int hi) {  // half hi (0 = low 16 bits) of a half2 word
  __half x{(uint16_t)(hi ? word >> 16 : word & 0xffffu)};
  return __half2float(x);
}

// Run a grid: blocks in order (x descending with -DTQ_EMU_REVERSE_X=1: another legal
// schedule), each with blockDim.x threads.
#ifndef TQ_EMU_REVERSE_X
#define TQ_EMU_REVERSE_X 0
#endif
template <typename F> void launch(dim3 grid, unsigned threads, F&& kernel) {
  gridDim = grid;
  blockDim = dim3{threads, 1, 1};
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned xi = 0; xi < grid.x; ++xi) {
        const unsigned x = TQ_EMU_REVERSE_X ? grid.x - 1 - xi : xi;
        block_bar = std::make_unique<std::barrier<>>(threads);
        warps.clear();
        for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<Warp>());
        std::vector<std::thread> pool;
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([&, t, x, y, z] {
            threadIdx = dim3{t, 0, 0};
            blockIdx = dim3{x, y, z};
            kernel();
          });
        for (auto& th : pool) th.join();
      }
}
}  // namespace tq_emu

inline void __syncthreads() { tq_emu::block_bar->arrive_and_wait(); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T> T __shfl_xor_sync(unsigned int, T v, int m) {
  auto& w = tq_emu::warp();
  const int l = tq_emu::lane();
  w.slot[l][0] = tq_emu::bits(v);
  w.bar.arrive_and_wait();
  const T r = tq_emu::from_bits<T>(w.slot[l ^ m][0]);
  w.bar.arrive_and_wait();
  return r;
}

inline bool tq_emu_any(bool p) {
  auto& w = tq_emu::warp();
  const int l = tq_emu::lane();
  w.slot[l][0] = p;
  w.bar.arrive_and_wait();
  bool r = false;
  for (int i = 0; i < 32; ++i) r = r || w.slot[i][0];
  w.bar.arrive_and_wait();
  return r;
}

inline void tq_emu_mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                             uint32_t b0, uint32_t b1) {
  auto& w = tq_emu::warp();
  const int l = tq_emu::lane();
  const uint32_t mine[6] = {a0, a1, a2, a3, b0, b1};
  std::memcpy(w.slot[l], mine, sizeof(mine));
  w.bar.arrive_and_wait();
  // A[r][c]: lane (r % 8) * 4 + (c % 8) / 2, register (r >= 8) + 2 * (c >= 8), half c % 2.
  // B[k][n]: lane n * 4 + (k % 8) / 2, register 4 + (k >= 8), half k % 2.
  auto A = [&](int r, int c) { return tq_emu::h(w.slot[(r % 8) * 4 + (c % 8) / 2][(r >= 8) + 2 * (c >= 8)], c % 2); };
  auto B = [&](int k, int n) { return tq_emu::h(w.slot[n * 4 + (k % 8) / 2][4 + (k >= 8)], k % 2); };
  const int g = l / 4, t = l % 4;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  float out[4];
  for (int i = 0; i < 4; ++i) {
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A(rows[i], k) * B(k, cols[i]);
    out[i] = acc;
  }
  w.bar.arrive_and_wait();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

inline uint32_t tq_emu_movmatrix_trans(uint32_t x) {
  auto& w = tq_emu::warp();
  const int l = tq_emu::lane();
  w.slot[l][0] = x;
  w.bar.arrive_and_wait();
  // Element (r, c) of the source lives in lane r * 4 + c / 2, half c % 2. Lane (g, t) gets
  // row g of the transpose: source elements (2t, g) and (2t + 1, g).
  const int g = l / 4, t = l % 4;
  auto elem = [&](int r, int c) {
    const uint32_t word = w.slot[r * 4 + c / 2][0];
    return (c % 2) ? word >> 16 : word & 0xffffu;
  };
  const uint32_t r = elem(2 * t, g) | (elem(2 * t + 1, g) << 16);
  w.bar.arrive_and_wait();
  return r;
}

inline uint32_t tq_emu_pack_half2(float lo, float hi) {
  return (uint32_t)__float2half_rn(lo).bits | ((uint32_t)__float2half_rn(hi).bits << 16);
}

inline float __expf(float x) { return std::exp(x); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }

inline void tq_emu_fence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int tq_emu_atomic_add(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
