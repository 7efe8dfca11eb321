// The eager one-token step's small ops in one call each, where PyTorch's composites cost a dispatch per
// elementary op (an RMSNorm is five, RoPE six, attention over the cache a dozen): the same arithmetic, for any
// float input. Inside compiled graphs inductor fuses the composites instead; these run eagerly only.
// ATen's core headers, not ATen/ATen.h (every op's declarations: 3 s more of each build)
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
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
  float s = 0.f;
  for (; i < n; i++) s += q[i] * static_cast<float>(k[i]);
  for (int j = 0; j < 16; j++) s += acc[j];
  return s;
}

// x[i] = exp(x[i] - top) for n values, in a loop the compiler vectorizes: 2^k * exp(r) with k = round(x / ln 2),
// r = x - k ln 2 and Cephes' polynomial for exp(r) on [-ln 2 / 2, ln 2 / 2] (within 2 ulp of expf); 0 below
// -87.3 (-inf: a masked slot). Returns the sum of the results.
float exp_sum(float* x, int64_t n, float top) {
  float total = 0.f;
  for (int64_t i = 0; i < n; i++) {
    float v = x[i] - top;
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
    x[i] = v < -87.3f ? 0.f : p * scale;
    total += x[i];
  }
  return total;
}

// One query head over slots first .. first + span of its KV head's cache rows (strides in elements).
template <typename T>
void attend_head(const float* qh, const T* keys, const T* values, int64_t slot_stride, const Heads& h,
                 int64_t start, float sink, float* scores, float* qs, float* o) {
  constexpr float kNone = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < h.hd; i++) qs[i] = qh[i] * h.scale;
  float top = sink;
  for (int64_t w = 0; w < h.span; w++) {
    float s = h.first + w < start ? kNone : dot(qs, keys + (h.first + w) * slot_stride, h.hd);
    if (h.softcap > 0 && s != kNone) s = std::tanh(s / h.softcap) * h.softcap;
    scores[w] = s;
    top = std::max(top, s);
  }
  float total = exp_sum(scores, h.span, top) + (h.sinks ? std::exp(sink - top) : 0.f);
  std::fill(o, o + h.hd, 0.f);
  for (int64_t w = 0; w < h.span; w++) {
    if (scores[w] == 0.f) continue;
    const T* v = values + (h.first + w) * slot_stride;
    float p = scores[w] / total;
    for (int64_t i = 0; i < h.hd; i++) o[i] += p * static_cast<float>(v[i]);
  }
}

// One new token per row: q (B, nh, 1, hd) against the cache's keys and values (B, n_kv, capacity, hd; each
// slot's hd values contiguous) over slots first .. first + span; row b's slots before starts[b] are padding.
// Scores scaled, soft-capped (softcap > 0), softmax with an optional sink logit per head, all in fp32.
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
  at::Tensor out = at::empty({h.B, h.nh, h.hd}, qf.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, keys.scalar_type(), "decode_attention", [&] {
    const scalar_t* kp = keys.data_ptr<scalar_t>();
    const scalar_t* vp = values.data_ptr<scalar_t>();
    const float* qp = qf.data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, h.B * h.nh, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> scores(h.span), qs(h.hd);
      for (int64_t i = lo; i < hi; i++) {  // query head i % nh of row i / nh
        int64_t b = i / h.nh, kv = i % h.nh / (h.nh / h.n_kv);
        int64_t at = b * keys.stride(0) + kv * keys.stride(1);
        float sink = h.sinks ? h.sinks[i % h.nh] : -std::numeric_limits<float>::infinity();
        attend_head(qp + i * h.hd, kp + at, vp + at, keys.stride(2), h, h.starts ? h.starts[b] : 0, sink,
                    scores.data(), qs.data(), op + i * h.hd);
      }
    });
  });
  return out.view({h.B, 1, h.nh, h.hd}).to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(autolm, m) {
  m.def("rms_norm(Tensor x, float eps) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def(
      "decode_attention(Tensor q, Tensor keys, Tensor values, int first, int span, float scale, float softcap, "
      "Tensor? sinks, Tensor? starts) -> Tensor");
}
TORCH_LIBRARY_IMPL(autolm, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rotary", &rotary);
  m.impl("decode_attention", &decode_attention);
}
