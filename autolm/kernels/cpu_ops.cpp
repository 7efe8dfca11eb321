// The eager one-token step's small ops in one call each, where PyTorch's composites cost a dispatch per
// elementary op (an RMSNorm is five, RoPE six, attention over the cache a dozen): the same arithmetic, for any
// float input. Inside compiled graphs inductor fuses the composites instead, but for the attention over the cache,
// which the CPU step's graphs call as an op (registered with a Meta kernel, its slots symbolic).
// ATen's core headers, not ATen/ATen.h (every op's declarations: 3 s more of each build)
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// One row of `n` values as fp32.
template <typename T>
void row_float(const T* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; i++) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
void rms_rows(const T* x, int64_t rows, int64_t n, double eps, float* y) {
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 14) / n), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; r++) {
      float* out = y + r * n;
      row_float(x + r * n, n, out);
      float sum = 0.f;
      for (int64_t i = 0; i < n; i++) sum += out[i] * out[i];
      float inv = 1.f / std::sqrt(sum / static_cast<float>(n) + static_cast<float>(eps));
      for (int64_t i = 0; i < n; i++) out[i] *= inv;
    }
  });
}

// x * rsqrt(mean(x^2) + eps) over the last dimension, in fp32 (F.rms_norm of x.float() without a weight).
at::Tensor rms_norm(const at::Tensor& x, double eps) {
  at::Tensor xc = x.contiguous();
  int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_rows(xc.data_ptr<scalar_t>(), rows, n, eps, y.data_ptr<float>());
  });
  return y;
}

template <typename T>
T rounded(float v) {
  return static_cast<T>(v);
}

// Products and sums rounded as written (gcc would otherwise fuse them into multiply-adds, one rounding instead of
// two: PyTorch's fp32 RoPE rounds twice; clang fuses only within one expression).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
// x * cos + rotate_half(x) * sin over the first rd of each row's hd values (the rest pass through), rounded to
// x's dtype after each product and after the sum, as PyTorch's elementwise ops round them: x (B, H, T, hd) with
// each row contiguous, cos and sin broadcasting to (B, H, T, rd) in x's dtype. Returns a contiguous tensor.
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && cos.scalar_type() == x.scalar_type() &&
                  sin.scalar_type() == x.scalar_type() && cos.size(-1) % 2 == 0 && cos.size(-1) <= x.size(3),
              "rotary: x ", x.sizes(), " and tables ", cos.sizes());
  int64_t B = x.size(0), H = x.size(1), T = x.size(2), hd = x.size(3), rd = cos.size(-1), half = rd / 2;
  at::Tensor c = cos.expand({B, H, T, rd}), s = sin.expand({B, H, T, rd});
  TORCH_CHECK(c.stride(3) == 1 && s.stride(3) == 1, "rotary: each table row contiguous");
  at::Tensor y = at::empty({B, H, T, hd}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary", [&] {
    using T_ = scalar_t;
    at::parallel_for(0, B * H * T, std::max<int64_t>(1, (1 << 14) / hd), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; r++) {
        int64_t b = r / (H * T), h = r / T % H, t = r % T;
        const T_* xr = x.data_ptr<T_>() + b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
        const T_* cr = c.data_ptr<T_>() + b * c.stride(0) + h * c.stride(1) + t * c.stride(2);
        const T_* sr = s.data_ptr<T_>() + b * s.stride(0) + h * s.stride(1) + t * s.stride(2);
        T_* yr = y.data_ptr<T_>() + r * hd;
        for (int64_t i = 0; i < rd; i++) {
          float rot = i < half ? -static_cast<float>(xr[i + half]) : static_cast<float>(xr[i - half]);
          float a = rounded<T_>(static_cast<float>(xr[i]) * static_cast<float>(cr[i]));
          float b2 = rounded<T_>(rot * static_cast<float>(sr[i]));
          yr[i] = rounded<T_>(a + b2);
        }
        for (int64_t i = rd; i < hd; i++) yr[i] = xr[i];
      }
    });
  });
  return y;
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

struct Heads {
  int64_t B, nh, n_kv, hd, first, span;
  float scale, softcap;
  const float* sinks;    // (nh,) or null
  const int64_t* starts;  // (B,) or null
};

// q . k in fp32, in 16 partial sums (which the compiler keeps in a vector register).
template <typename T>
float dot(const float* q, const T* k, int64_t n) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; j++) acc[j] += q[i + j] * static_cast<float>(k[i + j]);
  for (int w = 8; w >= 1; w /= 2)  // a tree of sums (one chain of 16 adds costs more than the products)
    for (int j = 0; j < w; j++) acc[j] += acc[j + w];
  float s = acc[0];
  for (; i < n; i++) s += q[i] * static_cast<float>(k[i]);
  return s;
}

// exp(v) as a loop the compiler vectorizes: 2^k * exp(r) with k = round(v / ln 2), r = v - k ln 2 and Cephes'
// polynomial for exp(r) on [-ln 2 / 2, ln 2 / 2] (within 2 ulp of expf); 0 below -87.3 (-inf: a masked slot).
inline float exp_of(float v) {
  float k = (v * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  float r = v - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  float scale = std::bit_cast<float>((static_cast<int32_t>(k) + 127) << 23);
  return v < -87.3f ? 0.f : p * scale;
}
// x[i] = exp(x[i] - top) for n values; returns their sum (16 partial sums, as dot's: the loop vectorizes).
float exp_sum(float* x, int64_t n, float top) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; j++) acc[j] += x[i + j] = exp_of(x[i + j] - top);
  for (int w = 8; w >= 1; w /= 2)
    for (int j = 0; j < w; j++) acc[j] += acc[j + w];
  for (; i < n; i++) acc[0] += x[i] = exp_of(x[i] - top);
  return acc[0];
}

// 8 cache values as fp32 (AVX2 and F16C, which every build of this library has).
template <typename T>
inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) return _mm256_loadu_ps(p);
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (std::is_same_v<T, at::Half>) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // bfloat16: the high half
}

// q . k for 8 keys (slot_stride apart) at once, hd a multiple of 8: 8 sums in registers, reduced together.
template <typename T>
inline __m256 dot8(const float* q, const T* k, int64_t slot_stride, int64_t hd) {
  __m256 a[8];
  for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
  for (int64_t c = 0; c < hd; c += 8) {
    __m256 qc = _mm256_loadu_ps(q + c);
    for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(qc, load8(k + j * slot_stride + c), a[j]);
  }
  __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// o (hd) += sum over n slots of p[w] * v[w], 64 columns at a time in registers, hd a multiple of 8.
template <typename T>
inline void weigh_values(const float* p, const T* v, int64_t slot_stride, int64_t n, int64_t hd, float* o) {
  for (int64_t c0 = 0; c0 < hd; c0 += 64) {
    int nv = static_cast<int>(std::min<int64_t>(64, hd - c0) / 8);
    __m256 acc[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++) acc[j] = j < nv ? _mm256_loadu_ps(o + c0 + 8 * j) : _mm256_setzero_ps();
    for (int64_t w = 0; w < n; w++) {
      if (p[w] == 0.f) continue;
      __m256 pw = _mm256_set1_ps(p[w]);
      const T* vw = v + w * slot_stride + c0;
#pragma GCC unroll 8
      for (int j = 0; j < 8; j++)
        if (j < nv) acc[j] = _mm256_fmadd_ps(pw, load8(vw + 8 * j), acc[j]);
    }
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++)
      if (j < nv) _mm256_storeu_ps(o + c0 + 8 * j, acc[j]);
  }
}

// One KV head's G query heads (qs: G x hd, scaled) over its slots w0 .. w1 (strides in elements), each key and
// value read once for all of them (the values 64 slots at a time, which stay in the L1 cache while each head
// weighs them): per head its largest score m, the sum l of exp(score - m) and the unnormalised output
// o = sum exp(score - m) v (G x hd), merged with the other runs of slots by merge_runs. The 8-wide loops take
// fp32, fp16 and bf16 caches with head sizes in multiples of 8; the scalar loops the rest (fp64 too).
template <typename T>
void attend_run(const float* qs, int64_t G, const T* keys, const T* values, int64_t slot_stride, const Heads& h,
                int64_t w0, int64_t w1, int64_t start, float* scores, float* m, float* l, float* o) {
  constexpr float kNone = -std::numeric_limits<float>::infinity();
  constexpr bool kWide = !std::is_same_v<T, double>;
  int64_t n = w1 - w0;
  bool vec = kWide && h.hd % 8 == 0;
  for (int64_t w = w0; w < w1; w++) {
    const T* k = keys + w * slot_stride;
    if constexpr (kWide) {
      if (vec && w + 8 <= w1 && (w - w0) % 8 == 0) {
        for (int64_t g = 0; g < G; g++)
          _mm256_storeu_ps(scores + g * n + w - w0, dot8(qs + g * h.hd, k, slot_stride, h.hd));
        w += 7;
        continue;
      }
    }
    for (int64_t g = 0; g < G; g++) scores[g * n + w - w0] = dot(qs + g * h.hd, k, h.hd);
  }
  for (int64_t g = 0; g < G; g++) {
    float* sg = scores + g * n;
    for (int64_t w = w0; w < std::min(w1, start); w++) sg[w - w0] = kNone;  // a left-padded row's padding
    if (h.softcap > 0)
      for (int64_t i = 0; i < n; i++) sg[i] = sg[i] == kNone ? kNone : std::tanh(sg[i] / h.softcap) * h.softcap;
    m[g] = *std::max_element(sg, sg + n);
    if (m[g] == kNone) std::fill(sg, sg + n, 0.f);  // every slot padding: no weight
    l[g] = m[g] == kNone ? 0.f : exp_sum(sg, n, m[g]);
  }
  std::fill(o, o + G * h.hd, 0.f);
  for (int64_t b0 = 0; b0 < n; b0 += 64) {
    int64_t nb = std::min<int64_t>(64, n - b0);
    const T* v = values + (w0 + b0) * slot_stride;
    for (int64_t g = 0; g < G; g++) {
      const float* p = scores + g * n + b0;
      float* og = o + g * h.hd;
      if constexpr (kWide) {
        if (vec) {
          weigh_values(p, v, slot_stride, nb, h.hd, og);
          continue;
        }
      }
      for (int64_t w = 0; w < nb; w++)
        if (p[w] != 0.f)
          for (int64_t i = 0; i < h.hd; i++) og[i] += p[w] * static_cast<float>(v[w * slot_stride + i]);
    }
  }
}

// One query head's output from its runs' (m, l, o) (`runs` of them, `step` floats apart in m and l, `step * hd`
// in o) and its sink logit: softmax's normalisation over all of them.
void merge_runs(const float* m, const float* l, const float* o, int64_t runs, int64_t step, int64_t hd, float sink,
                float* out) {
  float top = sink;
  for (int64_t c = 0; c < runs; c++) top = std::max(top, m[c * step]);
  float total = std::isinf(sink) ? 0.f : std::exp(sink - top);
  std::fill(out, out + hd, 0.f);
  for (int64_t c = 0; c < runs; c++) {
    if (l[c * step] == 0.f) continue;
    float f = std::exp(m[c * step] - top);
    total += f * l[c * step];
    for (int64_t i = 0; i < hd; i++) out[i] += f * o[c * step * hd + i];
  }
  for (int64_t i = 0; i < hd; i++) out[i] /= total;
}

// One new token per row: q (B, nh, 1, hd) against the cache's keys and values (B, n_kv, capacity, hd; each
// slot's hd values contiguous) over slots first .. first + span; row b's slots before starts[b] are padding.
// Scores scaled, soft-capped (softcap > 0), softmax with an optional sink logit per head, all in fp32. The
// threads take (row, KV head, run of slots) units, each run's keys and values read once for the KV head's query
// heads; the runs are then merged per query head (split-K "flash decoding").
// Returns (B, 1, nh, hd) in q's dtype (kernels.attention.decode_attention's eager arithmetic).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, int64_t first,
                            int64_t span, double scale, double softcap, const std::optional<at::Tensor>& sinks,
                            const std::optional<at::Tensor>& starts) {
  TORCH_CHECK(keys.dim() == 4 && keys.sizes() == values.sizes() && keys.strides() == values.strides() &&
                  keys.scalar_type() == values.scalar_type() && keys.stride(3) == 1,
              "decode_attention: keys and values of one layout, each slot contiguous");
  TORCH_CHECK(first >= 0 && span >= 1 && first + span <= keys.size(2), "decode_attention: slots out of range");
  at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor sf = sinks ? sinks->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor st = starts ? starts->to(at::kLong).contiguous() : at::Tensor();
  Heads h{keys.size(0), q.size(1), keys.size(1), keys.size(3), first, span, static_cast<float>(scale),
          static_cast<float>(softcap), sinks ? sf.data_ptr<float>() : nullptr,
          starts ? st.data_ptr<int64_t>() : nullptr};
  TORCH_CHECK(q.size(0) == h.B && q.size(3) == h.hd && h.nh % h.n_kv == 0, "decode_attention: q ", q.sizes());
  int64_t G = h.nh / h.n_kv, heads = h.B * h.n_kv, threads = at::get_num_threads();
  // runs of at least 32 slots, enough of them for 8 units per thread
  int64_t runs = std::clamp<int64_t>((8 * threads + heads - 1) / heads, 1, (span + 31) / 32);
  int64_t len = (span + runs - 1) / runs;
  runs = (span + len - 1) / len;  // none empty
  std::vector<float> m(heads * runs * G), l(heads * runs * G), o(heads * runs * G * h.hd);
  at::Tensor out = at::empty({h.B, h.nh, h.hd}, qf.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, keys.scalar_type(), "decode_attention", [&] {
    const scalar_t* kp = keys.data_ptr<scalar_t>();
    const scalar_t* vp = values.data_ptr<scalar_t>();
    const float* qp = qf.data_ptr<float>();
    at::parallel_for(0, heads * runs, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> scores(G * len), qs(G * h.hd);
      for (int64_t u = lo; u < hi; u++) {  // run u % runs of KV head u / runs % n_kv of row u / runs / n_kv
        int64_t b = u / runs / h.n_kv, kv = u / runs % h.n_kv, c = u % runs;
        int64_t w0 = first + c * len, w1 = std::min(first + span, w0 + len);
        for (int64_t i = 0; i < G * h.hd; i++) qs[i] = qp[(b * h.nh + kv * G) * h.hd + i] * h.scale;
        int64_t at = b * keys.stride(0) + kv * keys.stride(1), k = u * G;  // (row, KV head, run, query head)
        attend_run(qs.data(), G, kp + at, vp + at, keys.stride(2), h, w0, w1,
                   h.starts ? h.starts[b] : 0, scores.data(), &m[k], &l[k], &o[k * h.hd]);
      }
    });
  });
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < h.B * h.nh; i++) {  // query head i % nh of row i / nh: its KV head's runs
    int64_t b = i / h.nh, kv = i % h.nh / G, g = i % G, k = ((b * h.n_kv + kv) * runs) * G + g;
    float sink = h.sinks ? h.sinks[i % h.nh] : -std::numeric_limits<float>::infinity();
    merge_runs(&m[k], &l[k], &o[k * h.hd], runs, G, h.hd, sink, op + i * h.hd);
  }
  return out.view({h.B, 1, h.nh, h.hd}).to(q.scalar_type());
}

at::Tensor decode_attention_meta(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                 c10::SymInt first, c10::SymInt span, double scale, double softcap,
                                 const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& starts) {
  return at::empty_symint({q.sym_size(0), 1, q.sym_size(1), q.sym_size(3)}, q.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(autolm, m) {
  m.def("rms_norm(Tensor x, float eps) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def(
      "decode_attention(Tensor q, Tensor keys, Tensor values, SymInt first, SymInt span, float scale, "
      "float softcap, "
      "Tensor? sinks, Tensor? starts) -> Tensor");
}
TORCH_LIBRARY_IMPL(autolm, Meta, m) { m.impl("decode_attention", &decode_attention_meta); }
TORCH_LIBRARY_IMPL(autolm, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rotary", &rotary);
  m.impl("decode_attention", &decode_attention);
}
