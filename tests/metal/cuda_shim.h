// Just enough of CUDA, as C++17 declarations, for `g++ -fsyntax-only` to type-check the
// kernels' generated CUDA source on CI (no nvcc there). The GPU itself checks the real thing.
#pragma once
#include <cstdint>
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __grid_constant__
struct __half { __half() = default; };
float __half2float(__half);
__half __float2half_rn(float);
struct uint2 { unsigned int x, y; };
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
