// Just enough of CUDA, as C++17 declarations, for `g++ -fsyntax-only` to type-check the
// kernels' generated CUDA source on CI (no nvcc there). The GPU itself checks the real thing.
#pragma once
#include <cstdint>
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __grid_constant__
#define __align__(n) alignas(n)
// Dynamic shared memory (extern __shared__ in CUDA) as a block-scope array.
#define TQ_DYNAMIC_SHARED(T, name) alignas(16) static T name[1 << 16]
struct __half { __half() = default; };
float __half2float(__half);
__half __float2half_rn(float);
struct __nv_bfloat16 { __nv_bfloat16() = default; };
__nv_bfloat16 __float2bfloat16_rn(float);
float __bfloat162float(__nv_bfloat16);
struct uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
uint4 make_uint4(unsigned int, unsigned int, unsigned int, unsigned int);
struct dim3 { unsigned int x, y, z; };
extern dim3 threadIdx, blockIdx, gridDim, blockDim;
void __syncthreads();
template <typename T> T __shfl_xor_sync(unsigned int, T, int);
float __expf(float);
float sqrtf(float);
float fmaxf(float, float);
float fminf(float, float);
float rintf(float);
float __fmul_rn(float, float);
float __fadd_rn(float, float);
float __fsub_rn(float, float);
float __fdiv_rn(float, float);
float __fsqrt_rn(float);
float exp2f(float);
float log2f(float);
float __int_as_float(int);
// The MMA helpers' off-device hooks (inline PTX on the device; tests/metal/cuda_emu.h
// defines them for the CPU emulator).
void tq_emu_mma_16816(float (&)[4], unsigned int, unsigned int, unsigned int, unsigned int,
                      unsigned int, unsigned int);
unsigned int tq_emu_movmatrix_trans(unsigned int);
unsigned int tq_emu_pack_half2(float, float);
bool tq_emu_any(bool);
void tq_emu_fence();
int tq_emu_atomic_add(int*, int);
// The device branch (checked with -D__CUDA_ARCH__): intrinsics it names besides inline PTX.
unsigned int __byte_perm(unsigned int, unsigned int, unsigned int);
int __any_sync(unsigned int, int);
int atomicAdd(int*, int);
void __threadfence();
template <typename T> T __shfl_sync(unsigned int, T, int);
