// taylor_reduce_accumulate_ on the CPU.
//
// Stage 1 computes z[n, c] = sum_s act * grad for every (sample, channel) in one pass over both
// tensors, reading them in their own layout: a dot product per row for NCHW, a running vector of
// channel sums for channels_last. Stage 2 applies the per-sample scale and the batch reduction into
// `out`. Each z[n, c] is summed by one thread in a fixed order, so results do not depend on the
// number of threads: the same input gives the same bits on the same machine.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../taylor_reduce.h"

namespace polyprune {
namespace {

// The hot loops are built twice, for AVX2+FMA (x86-64-v3) and for the baseline, and the better
// one is picked when the library loads; the wheel then needs no -march flag.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(_WIN32)
#define POLYPRUNE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define POLYPRUNE_CPU_CLONES
#endif

constexpr int kLanes = 16;           // independent partial sums in a dot product (SIMD width)
constexpr int64_t kBlock = 4096;     // elements summed per block before joining the running total
constexpr int64_t kChannels = 256;   // channels held in one channels_last task

inline float float_from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t bits_from_float(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// float16 -> float32 without branches or float denormals, so the loops below vectorize (c10's
// scalar conversion does not, and ran at a tenth of the memory bandwidth). Normal numbers, inf
// and NaN: move exponent and mantissa into place and rescale the exponent by 2^-112. Subnormals:
// place the mantissa under the exponent of 0.5 and subtract 0.5.
inline float half_to_float(c10::Half h) {
  const uint32_t w = static_cast<uint32_t>(h.x) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;  // exponent and mantissa, sign shifted out
  const float normal = float_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float subnormal = float_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  // Select by mask rather than `?:`, which GCC turns into a branch that stops vectorization.
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(two_w < (1u << 27));
  return float_from_bits(sign | (bits_from_float(subnormal) & is_subnormal) |
                         (bits_from_float(normal) & ~is_subnormal));
}

template <typename Acc, typename T>
inline Acc to_acc(T x) {
  return static_cast<Acc>(x);
}

template <>
inline float to_acc<float, c10::Half>(c10::Half x) {
  return half_to_float(x);
}

// sum_s a[s * sa] * g[s * sg]: blocked, kLanes-way partial sums (SIMD-friendly and more accurate
// than one running sum).
template <typename T, typename Acc>
__attribute__((always_inline)) inline Acc strided_dot(const T* a, int64_t sa, const T* g, int64_t sg,
                                                      int64_t S) {
  Acc total = 0;
  for (int64_t b = 0; b < S; b += kBlock) {
    const int64_t e = std::min(S, b + kBlock);
    Acc lane[kLanes] = {};
    int64_t s = b;
    if (sa == 1 && sg == 1) {
      for (; s + kLanes <= e; s += kLanes)
        for (int k = 0; k < kLanes; ++k)
          lane[k] += to_acc<Acc>(a[s + k]) * to_acc<Acc>(g[s + k]);
    }
    // The rest (and strided runs) in a scalar of its own: indexing `lane` by a run-time value
    // would keep it in memory instead of registers.
    Acc rest = 0;
    for (; s < e; ++s) rest += to_acc<Acc>(a[s * sa]) * to_acc<Acc>(g[s * sg]);
    for (int w = kLanes / 2; w > 0; w /= 2)
      for (int k = 0; k < w; ++k) lane[k] += lane[k + w];
    total += lane[0] + rest;
  }
  return total;
}

// z[r] for rows r in [begin, end) of the (N * C) rows, each a strided dot product. One call per
// chunk of rows, not per row: short rows (11 x 11 maps) would otherwise pay a call each.
template <typename T, typename Acc>
POLYPRUNE_CPU_CLONES void row_dots(const T* a, NCSView va, const T* g, NCSView vg, int64_t C,
                                   int64_t S, int64_t begin, int64_t end, Acc* z) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / C, c = r % C;
    z[r] = strided_dot<T, Acc>(a + n * va.n_stride + c * va.c_stride, va.s_stride,
                               g + n * vg.n_stride + c * vg.c_stride, vg.s_stride, S);
  }
}

// z[c] = sum_s a[s * sa + c] * g[s * sg + c] for c < nc <= kChannels: channels innermost
// (channels_last), so each spatial position adds a contiguous run of channels.
template <typename T, typename Acc>
POLYPRUNE_CPU_CLONES void channel_sums(const T* a, int64_t sa, const T* g, int64_t sg, int64_t S,
                                       int64_t nc, Acc* z) {
  Acc total[kChannels] = {};
  for (int64_t b = 0; b < S; b += kBlock / 8) {
    const int64_t e = std::min(S, b + kBlock / 8);
    Acc part[kChannels] = {};
    for (int64_t s = b; s < e; ++s) {
      const T* ar = a + s * sa;
      const T* gr = g + s * sg;
      for (int64_t c = 0; c < nc; ++c)
        part[c] += to_acc<Acc>(ar[c]) * to_acc<Acc>(gr[c]);
    }
    for (int64_t c = 0; c < nc; ++c) total[c] += part[c];
  }
  std::copy(total, total + nc, z);
}

// Stage 1: z (N x C, contiguous) from act and grad of any strides (see NCSView).
template <typename T, typename Acc>
void channel_dots(const at::Tensor& act, const at::Tensor& grad, Acc* z) {
  const int64_t N = act.size(0), C = act.size(1), S = spatial_numel(act);
  const NCSView va = ncs_view(act), vg = ncs_view(grad);
  const T* a = act.const_data_ptr<T>();
  const T* g = grad.const_data_ptr<T>();
  const bool channels_inner = va.c_stride == 1 && vg.c_stride == 1 && C > 1 &&
                              !(va.s_stride == 1 && vg.s_stride == 1 && S > 1);
  if (channels_inner) {
    const int64_t blocks = (C + kChannels - 1) / kChannels;
    at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / blocks, c0 = (t % blocks) * kChannels;
        channel_sums<T, Acc>(a + n * va.n_stride + c0, va.s_stride, g + n * vg.n_stride + c0,
                             vg.s_stride, S, std::min(kChannels, C - c0), z + n * C + c0);
      }
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(S, 1));
    at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
      row_dots<T, Acc>(a, va, g, vg, C, S, begin, end, z);
    });
  }
}

// Stage 2: out += reduce_n(scale[n] * z[n, c]), n in order.
template <typename Acc>
void reduce_batch(const Acc* z, const ScaleArg& scale, ReduceMode mode, int64_t N, int64_t C,
                  Acc* out) {
  if (mode == ReduceMode::PerSample) {
    for (int64_t r = 0; r < N * C; ++r) out[r] += scaled(scale, r / C, z[r]);
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    Acc t = 0;
    for (int64_t n = 0; n < N; ++n) {
      const Acc v = scaled(scale, n, z[n * C + c]);
      t += mode == ReduceMode::Sum ? v : mode == ReduceMode::SumAbs ? std::abs(v) : v * v;
    }
    out[c] += t;
  }
}

void taylor_reduce_accumulate_cpu(at::Tensor out, const at::Tensor& act, const at::Tensor& grad,
                                  const c10::optional<at::Tensor>& scale, c10::string_view mode_name) {
  const ReduceMode mode = parse_mode(std::string(mode_name));
  check_reduce_inputs(out, act, grad, scale, mode);
  // Layouts whose spatial dims do not form one run (rare: slices, odd permutations) are copied.
  const bool flat = ncs_view(act).collapsible && ncs_view(grad).collapsible;
  const at::Tensor a = flat ? act : act.contiguous();
  const at::Tensor g = flat ? grad : grad.contiguous();
  const int64_t N = a.size(0), C = a.size(1);
  const at::ScalarType acc = out.scalar_type();
  const at::Tensor s = kernel_scale(scale, out);  // undefined: no scale, a factor of 1
  at::Tensor z = at::empty({N, C}, a.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "taylor_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    channel_dots<scalar_t, acc_t>(a, g, z.data_ptr<acc_t>());
    reduce_batch<acc_t>(z.const_data_ptr<acc_t>(), scale_arg(s), mode, N, C, out.data_ptr<acc_t>());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(polyprune_ext, CPU, m) {
  m.impl("taylor_reduce_accumulate_", &taylor_reduce_accumulate_cpu);
}

}  // namespace polyprune
