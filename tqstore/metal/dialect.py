"""The thin dialect layer: one kernel body, two GPU languages (Metal and CUDA).

Kernel bodies in this package are written once against the macros below; each dialect header
defines them for its language and is passed to MLX as the kernel's `header=`. The body never
names a language builtin directly (threadIdx, simd_shuffle_xor, __shared__, ...), so a fix or
a speed change lands in both backends at once.

The tensor-core kernel (attention_mma.py) is CUDA only: it adds inline-PTX helpers (mma.sync,
movmatrix) on top of the CUDA header. Metal's simdgroup_matrix has other fragment layouts;
Metal keeps the portable body.

Invariants the bodies rely on:
- SIMD width 32 (Apple GPUs and NVIDIA warps), and every lane of a warp reaches each
  TQ_SHFL_XOR (shuffles are never inside lane-divergent branches).
- The launch grid counts threads (MLX convention); threadgroups are 1-D in x. The body
  prologue binds tq_tid (thread in group), tq_gx/tq_gy/tq_gz (group index) and tq_ngx/tq_ngz
  (groups along x and z) as locals.
- Device pointers are cast to wider word types only at offsets that are multiples of the
  word size (the page rows are multiples of 4 bytes for every supported head_dim and bits).
"""

from __future__ import annotations

DIALECTS = ("metal", "cuda")

_METAL = r"""
// ---- tqstore dialect: Metal ----
#define TQ_DEVICE device
#define TQ_SHARED threadgroup
#define TQ_SHARED_PTR threadgroup
#define TQ_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define TQ_SHFL_XOR(v, m) simd_shuffle_xor((v), (ushort)(m))
#define TQ_EXP(x) metal::fast::exp(x)
#define TQ_EXP2(x) metal::fast::exp2(x)
#define TQ_SQRT(x) metal::sqrt(x)
#define TQ_HALF_TO_FLOAT(x) ((float)(x))
#define TQ_FLOAT_TO_HALF(x) ((half)(x))
#define TQ_FMAX(a, b) metal::max((a), (b))
#define TQ_FMIN(a, b) metal::min((a), (b))
#define TQ_LOG2(x) metal::log2(x)
#define TQ_NEG_INF (-INFINITY)
typedef ulong tq_u64;
typedef uint tq_u32;
typedef ushort tq_u16;
"""

_CUDA = r"""
// ---- tqstore dialect: CUDA ----
#define TQ_DEVICE
#define TQ_SHARED __shared__
#define TQ_SHARED_PTR
#define TQ_BARRIER() __syncthreads()
#define TQ_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
#define TQ_EXP(x) __expf(x)
#define TQ_EXP2(x) tq_exp2(x)
#define TQ_SQRT(x) sqrtf(x)
#define TQ_HALF_TO_FLOAT(x) __half2float(x)
#define TQ_FLOAT_TO_HALF(x) __float2half_rn(x)
#define TQ_FMAX(a, b) fmaxf((a), (b))
#define TQ_FMIN(a, b) fminf((a), (b))
#define TQ_LOG2(x) log2f(x)
#define TQ_NEG_INF (-__int_as_float(0x7f800000))
typedef unsigned long long tq_u64;
typedef unsigned int tq_u32;
typedef unsigned short tq_u16;
// 2^x in one MUFU.EX2 (exp2f adds denormal fix-ups); exact 0 for x <= -126, which is what the
// online softmax feeds it for masked or far-below-max scores.
__device__ __forceinline__ float tq_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}
"""

# Thread and group indices are bound as locals at the top of the body rather than as header
# macros: MLX's Metal signature generator adds an attribute parameter (thread_position_in_...)
# only when the BODY text mentions it, so the Metal prologue must spell the attribute names.
_PROLOGUE = {
    "metal": (
        "  const int tq_tid = (int)thread_position_in_threadgroup.x;\n"
        "  const int tq_gx = (int)threadgroup_position_in_grid.x;\n"
        "  const int tq_gy = (int)threadgroup_position_in_grid.y;\n"
        "  const int tq_gz = (int)threadgroup_position_in_grid.z;\n"
        "  const int tq_ngx = (int)threadgroups_per_grid.x;\n"
        "  const int tq_ngz = (int)threadgroups_per_grid.z;\n"
    ),
    "cuda": (
        "  const int tq_tid = (int)threadIdx.x;\n"
        "  const int tq_gx = (int)blockIdx.x;\n"
        "  const int tq_gy = (int)blockIdx.y;\n"
        "  const int tq_gz = (int)blockIdx.z;\n"
        "  const int tq_ngx = (int)gridDim.x;\n"
        "  const int tq_ngz = (int)gridDim.z;\n"
    ),
}

METAL_ATTRIBUTES = {
    "thread_position_in_threadgroup": "uint3",
    "threadgroup_position_in_grid": "uint3",
    "threadgroups_per_grid": "uint3",
    "thread_position_in_grid": "uint3",
    "threads_per_threadgroup": "uint3",
    "thread_index_in_simdgroup": "uint",
    "simdgroup_index_in_threadgroup": "uint",
}

# MLX's element type names per dialect (what its generated signatures use).
_TYPES = {
    "metal": {"float32": "float", "float16": "float16_t", "bfloat16": "bfloat16_t",
              "uint8": "uint8_t", "int32": "int32_t", "uint32": "uint32_t"},
    "cuda": {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16",
             "uint8": "uint8_t", "int32": "int32_t", "uint32": "uint32_t",
             "uint64": "uint64_t"},
}


# TQ_TO_FLOAT: any element type of a model's activations (float32, float16, bfloat16) as float.
# Only for the kernels that read activations (the batched epilogue and the query rotation):
# bfloat16's CUDA header is there in MLX's kernels but not in every build of our sources.
_TO_FLOAT = {
    "metal": "#define TQ_TO_FLOAT(x) static_cast<float>(x)\n",
    "cuda": ("__device__ __forceinline__ float tq_to_float(float x) { return x; }\n"
             "__device__ __forceinline__ float tq_to_float(__half x) { return __half2float(x); }\n"
             "__device__ __forceinline__ float tq_to_float(__nv_bfloat16 x) "
             "{ return __bfloat162float(x); }\n"
             "#define TQ_TO_FLOAT(x) tq_to_float(x)\n"),
}


def activations_header(dialect: str) -> str:
    """dialect_header plus TQ_TO_FLOAT (activations of any float dtype as float)."""
    return dialect_header(dialect) + _TO_FLOAT[dialect]


def dialect_header(dialect: str) -> str:
    """The macro layer for `dialect` ('metal' or 'cuda')."""
    if dialect == "metal":
        return _METAL
    if dialect == "cuda":
        return _CUDA
    raise ValueError(f"unknown dialect {dialect!r}: choose one of {DIALECTS}")


def body_prologue(dialect: str) -> str:
    """Lines that open every kernel body: bind tq_tid, tq_gx/gy/gz (threadgroup index) and
    tq_ngx/tq_ngz (threadgroups along x and z) for `dialect`."""
    dialect_header(dialect)  # validates the name
    return _PROLOGUE[dialect]


def element_type(dialect: str, dtype_name: str) -> str:
    return _TYPES[dialect][dtype_name]
