// x @ W.T for a weight W kept in llama.cpp's blocks, computed on the blocks with integer dot products, as
// llama.cpp computes them. K-quants (Q2_K to Q6_K): each row of x is quantized to int8 per 256 columns (one
// scale per block, llama.cpp's Q8_K), a block's quants are multiplied with vpmaddubsw (unsigned weight quants
// times signed activations, pairs summed in int16) and vpdpwssd (times the block's integer sub-scales, summed
// in int32), and the block's sum is scaled once, in float. Blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, and
// IQ4_XS's sub-blocks, its non-linear values looked up with vpshufb): x quantized per 32 columns (llama.cpp's Q8_0
// / Q8_1), vpdpbusd per block, scaled per block. Many rows of x (prefill, batches): 16 weight rows are decoded
// into a panel first and multiplied with 8 rows of x at a time (see Panel). Built by
// autolm/kernels/native.py with the machine's own instruction set (-march=native) where it has AVX-512 VNNI;
// registered as torch.ops.autolm.ggml_mm, with a Meta kernel, so that it runs eagerly and inside
// ahead-of-time compiled graphs alike.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if !defined(__AVX512VNNI__) || !defined(__AVX512BW__) || !defined(__AVX512DQ__) || !defined(__AVX512VL__)
#error "ggml_mm.cpp needs AVX-512 VNNI, BW, DQ and VL"
#endif

namespace {

constexpr int64_t kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ2K = 10, kQ3K = 11, kQ4K = 12, kQ5K = 13,
                  kQ6K = 14, kIQ4NL = 20, kIQ4XS = 23, kBlock = 256;

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// Rows of activations quantized to int8: q (K per row), d (one scale per block of 256 columns for the K-quants,
// of 32 for the others). K-quants: for Q4_K and Q5_K the 32-column runs 1 and 2 of every 128 swapped (the order
// in which their nibbles come out of 64 bytes), bsum, the sums of each 16 quants (int16, natural order), and for
// the panels (many rows), low: each group's sum times its block's scale (a group: the columns that share a
// weight block's low term, 32 for Q4_K and Q5_K, else 16). The others: s, each block's sum, d times the sum of
// its quants (llama.cpp's Q8_1).
struct Acts {
  std::vector<int8_t> q;
  std::vector<float> d, s, low;
  std::vector<int16_t> bsum;
};

// split (IQ4_XS, one row at a time): each 128 columns' quants stored as its 4 blocks' first 16, then their last 16,
// the order in which 64 bytes of IQ4_XS's nibbles come out.
void quantize_row_32(const float* x, int64_t K, bool split, int8_t* q, float* d, float* s) {
  for (int64_t b = 0; b < K / 32; b++) {
    __m512 lo = _mm512_loadu_ps(x + 32 * b), hi = _mm512_loadu_ps(x + 32 * b + 16);
    float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    d[b] = m / 127.0f;
    __m512 inv = _mm512_set1_ps(m > 0 ? 127.0f / m : 0.0f);
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    __m512i a = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(lo, inv), kRound));
    __m512i c = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(hi, inv), kRound));
    s[b] = d[b] * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(a, c));
    int64_t first = split ? 128 * (b / 4) + 16 * (b % 4) : 32 * b, last = split ? first + 64 : first + 16;
    _mm_storeu_si128((__m128i*)(q + first), _mm512_cvtsepi32_epi8(a));
    _mm_storeu_si128((__m128i*)(q + last), _mm512_cvtsepi32_epi8(c));
  }
}

void quantize_row(const float* x, int64_t K, bool swap, int64_t group, int8_t* q, float* d, int16_t* bsum,
                  float* low) {
  for (int64_t b = 0; b < K / kBlock; b++) {
    const float* xb = x + b * kBlock;
    __m512 amax = _mm512_setzero_ps();
    for (int i = 0; i < kBlock; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(xb + i)));
    float m = _mm512_reduce_max_ps(amax);
    d[b] = m / 127.0f;
    __m512 inv = _mm512_set1_ps(m > 0 ? 127.0f / m : 0.0f);
    int8_t* qb = q + b * kBlock;
    for (int i = 0; i < kBlock; i += 16) {
      __m512i v = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(xb + i), inv),
                                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      int16_t sum = (int16_t)_mm512_reduce_add_epi32(v);
      bsum[b * 16 + i / 16] = sum;
      if (low) low[(b * kBlock + i) / group] = (i % group ? low[(b * kBlock + i) / group] : 0.0f) + d[b] * sum;
      int at = i;
      if (swap && ((i / 32) % 4 == 1 || (i / 32) % 4 == 2)) at = i + ((i / 32) % 4 == 1 ? 32 : -32);
      _mm_storeu_si128((__m128i*)(qb + at), _mm512_cvtsepi32_epi8(v));
    }
  }
}

// The int16 lanes' scale indices: lane i of a 64-byte vector of quants covers bytes 2i and 2i + 1.
// Q4_K, 64 bytes of nibbles h (0, 1) of block half `half`: low nibbles are sub-blocks 4 half + 0 and 4 half + 2
// (32 bytes each), high nibbles 4 half + 1 and 4 half + 3. Q6_K: the half's 128 weights in natural order, 16
// per scale.
__m512i lane_index(int first, int second, int width) {
  alignas(64) int16_t idx[32];
  for (int i = 0; i < 32; i++) idx[i] = (int16_t)(i < 16 ? first + i / width : second + (i - 16) / width);
  return _mm512_load_si512(idx);
}

// Ask for the bytes kPrefetch ahead of a block (the row's next blocks, or the next row's) while this one is
// computed on: the hardware prefetcher alone left a one-row matmul at ~65% of the memory's bandwidth.
constexpr int64_t kPrefetch = 4096;
inline void prefetch(const uint8_t* w, int64_t bytes) {
  for (int64_t at = 0; at < bytes; at += 64) _mm_prefetch((const char*)(w + kPrefetch + at), _MM_HINT_T0);
}

struct RowOut {
  __m512 acc;     // the blocks' dot products, scaled
  __m256 accmin;  // the K-quant blocks' low terms, scaled
};

inline __m256i nibbles(const uint8_t* p) {  // 16 bytes: the low nibbles are weights 0..15, the high 16..31
  const __m128i mask = _mm_set1_epi8(0x0F);
  __m128i v = _mm_loadu_si128((const __m128i*)p);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
}

inline __m256i fifth_bits(const uint8_t* p) {  // a 32-bit mask -> 16 in each byte whose bit is set
  uint32_t h;
  std::memcpy(&h, p, 4);
  return _mm256_and_si256(_mm256_movm_epi8(h), _mm256_set1_epi8(0x10));
}

// IQ4_NL / IQ4_XS's 16 values (llama.cpp's kvalues_iq4nl) plus 128, per nibble, in both 128-bit lanes.
const __m256i iq4_values = _mm256_setr_epi8(1, 24, 45, 63, 79, 93, 106, 118, (char)129, (char)141, (char)153,
                                            (char)166, (char)181, (char)197, (char)217, (char)241, 1, 24, 45, 63,
                                            79, 93, 106, 118, (char)129, (char)141, (char)153, (char)166, (char)181,
                                            (char)197, (char)217, (char)241);

// A block of 32 weights as unsigned quants, natural order (value = d * q + low; low = d * offset_of(kind) but for
// Q4_1 and Q5_1, which store theirs).
constexpr float offset_of(int64_t kind) { return kind == kQ4_0 ? -8.0f : kind == kQ5_0 ? -16.0f : -128.0f; }
template <int64_t kind>
inline __m256i quants32(const uint8_t* b) {
  if constexpr (kind == kQ4_0) return nibbles(b + 2);
  if constexpr (kind == kQ4_1) return nibbles(b + 4);
  if constexpr (kind == kQ5_0) return _mm256_or_si256(nibbles(b + 6), fifth_bits(b + 2));
  if constexpr (kind == kQ5_1) return _mm256_or_si256(nibbles(b + 8), fifth_bits(b + 4));
  if constexpr (kind == kQ8_0)
    return _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(b + 2)), _mm256_set1_epi8((char)0x80));
  if constexpr (kind == kIQ4NL) return _mm256_shuffle_epi8(iq4_values, nibbles(b + 2));
  if constexpr (kind == kIQ4XS) return _mm256_shuffle_epi8(iq4_values, nibbles(b));  // b: the sub-block's 16 bytes
}

// IQ4_XS: d (fp16), 2 high bits of each sub-block's 6-bit scale (uint16), their low 4 bits (4 bytes), 128 bytes of
// nibbles, per 32 weights as IQ4_NL's (low nibbles the first 16). value = d * (scale - 32) * kvalues[nibble]. The
// float scales of the n sub-blocks (8 per block) from w on.
constexpr int64_t kIQ4XSBytes = 136;  // per block of 256 weights

inline __m256 iq4_xs_block_scales(const uint8_t* b) {
  uint16_t high;
  uint32_t low;
  std::memcpy(&high, b + 2, 2);
  std::memcpy(&low, b + 4, 4);
  const __m256i by4 = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), by2 = _mm256_srli_epi32(by4, 1);
  __m256i lo = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)low), by4), _mm256_set1_epi32(0xF));
  __m256i hi = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(high), by2), _mm256_set1_epi32(3));
  __m256i ls = _mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), _mm256_set1_epi32(32));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(ls), _mm256_set1_ps(half_at(b)));
}

inline __m512 iq4_xs_scales(const uint8_t* w, int64_t n) {
  __m256 second = n > 8 ? iq4_xs_block_scales(w + kIQ4XSBytes) : _mm256_setzero_ps();
  return _mm512_insertf32x8(_mm512_castps256_ps512(iq4_xs_block_scales(w)), second, 1);
}

// Blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL; IQ4_XS's sub-blocks), 16 at a time: their scales (and low
// values) gathered into one vector each, then two blocks per vpdpbusd of the unsigned quants with the activations'
// int8 quants, each half times its block's scale; the low terms from the activations' block sums.
template <int64_t kind, int64_t bytes>
__attribute__((always_inline)) inline void rows_32(const uint8_t* w, int64_t nb, const Acts& a, int64_t K,
                                                   int64_t m0, int64_t m1, RowOut* out) {
  const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                        _mm512_set1_epi32((int)bytes));
  __m512i q[8], halves[8];
  for (int p = 0; p < 8; p++)  // each int32 lane's block (its sub-block for IQ4_XS: 4 per vector, see quants)
    for (int l = 0; l < 16; l++) ((int32_t*)&halves[p])[l] = kind == kIQ4XS ? 4 * (p / 2) + l / 4 : 2 * p + (l >= 8);
  for (int64_t b0 = 0; b0 < nb; b0 += 16, w += 16 * bytes) {
    prefetch(w, 16 * bytes);
    int64_t n = std::min<int64_t>(16, nb - b0);
    __mmask16 live = (__mmask16)((1u << n) - 1);
    __m512 d, low;
    if constexpr (kind == kIQ4XS) {  // n / 8 blocks of 256: each sub-block's scale from the block's, its quants
      d = iq4_xs_scales(w, n);  // 64 bytes of nibbles at a time: 4 sub-blocks' first 16 quants, then their last 16
      const __m512i nib = _mm512_set1_epi8(0x0F), values = _mm512_broadcast_i32x4(_mm256_castsi256_si128(iq4_values));
      for (int64_t p = 0; 2 * p < n; p++) {
        __m512i v = _mm512_loadu_si512(w + (p / 4) * kIQ4XSBytes + 8 + 64 * (p / 2 % 2));
        q[p] = _mm512_shuffle_epi8(values, _mm512_and_si512(p % 2 ? _mm512_srli_epi16(v, 4) : v, nib));
      }
    } else {
      __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, at, w, 1);  // bytes 0..3 of each block
      d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
      if constexpr (kind == kQ4_1 || kind == kQ5_1)
        low = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16)));
      for (int64_t p = 0; 2 * p < n; p++) {
        __m256i second = 2 * p + 1 < n ? quants32<kind>(w + (2 * p + 1) * bytes) : _mm256_setzero_si256();
        q[p] = _mm512_inserti64x4(_mm512_castsi256_si512(quants32<kind>(w + 2 * p * bytes)), second, 1);
      }
    }
    if constexpr (kind != kQ4_1 && kind != kQ5_1)
      low = _mm512_mul_ps(d, _mm512_set1_ps(offset_of(kind)));
    for (int64_t m = m0; m < m1; m++) {
      const int8_t* x = a.q.data() + m * K + 32 * b0;
      __m512 sc = _mm512_mul_ps(d, _mm512_maskz_loadu_ps(live, a.d.data() + m * (K / 32) + b0));
      __m512 acc = _mm512_fmadd_ps(low, _mm512_maskz_loadu_ps(live, a.s.data() + m * (K / 32) + b0), out[m - m0].acc);
      for (int64_t p = 0; 2 * p < n; p++) {
        __m512i xv = 2 * p + 1 < n ? _mm512_loadu_si512(x + 64 * p)
                                   : _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i*)(x + 64 * p)));
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[p], xv);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(halves[p], sc), acc);
      }
      out[m - m0].acc = acc;
    }
  }
}

// A decoded K-quant block: the quants as unsigned bytes in the order of the activations' quants, each int16
// lane's sub-scale, d, and the low term's integer factors per 16 weights with their scale.
struct KBlock {
  __m512i q[4], sc[4];
  __m256i low16;
  float d, low_scale;
};

// Block b of a weight row times rows m0..m1 of the activations, into out: d * the integer dot products, plus
// low_scale * the low term's factors times the activations' sums of 16.
__attribute__((always_inline)) inline void k_block_rows(const KBlock& k, const Acts& a, int64_t K, int64_t b,
                                                        int64_t m0, int64_t m1, RowOut* out) {
  for (int64_t m = m0; m < m1; m++) {
    const int8_t* x = a.q.data() + m * K + b * kBlock;
    __m512i s = _mm512_setzero_si512();
    for (int i = 0; i < 4; i++)
      s = _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(k.q[i], _mm512_loadu_si512(x + 64 * i)), k.sc[i]);
    float dx = a.d[m * (K / kBlock) + b];
    out[m - m0].acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(k.d * dx), out[m - m0].acc);
    __m256i bs = _mm256_loadu_si256((const __m256i*)(a.bsum.data() + m * (K / 16) + b * 16));
    __m256 low = _mm256_cvtepi32_ps(_mm256_madd_epi16(bs, k.low16));
    out[m - m0].accmin = _mm256_fmadd_ps(low, _mm256_set1_ps(k.low_scale * dx), out[m - m0].accmin);
  }
}

// Q4_K: d (fp16), dmin (fp16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles.
// value = d * sc[s] * q - dmin * mn[s] for sub-block s of 32 weights.
// Q5_K (kFive): the same with 32 bytes of fifth bits between the scales and the nibbles: bit 2j of byte l is
// weight 64j + l's (the low nibbles), bit 2j + 1 weight 64j + 32 + l's (the high nibbles).
const __m256i min_idx = _mm256_setr_epi16(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
const __m512i lo_idx[2] = {lane_index(0, 2, 16), lane_index(4, 6, 16)};
const __m512i hi_idx[2] = {lane_index(1, 3, 16), lane_index(5, 7, 16)};
__m512i byte_halves(int lo, int hi) {
  return _mm512_inserti64x4(_mm512_set1_epi8((char)lo), _mm256_set1_epi8((char)hi), 1);
}
const __m512i fifth_bit[4] = {byte_halves(0x01, 0x04), byte_halves(0x02, 0x08), byte_halves(0x10, 0x40),
                              byte_halves(0x20, 0x80)};
const __m512i high_bit[4] = {byte_halves(0x01, 0x02), byte_halves(0x04, 0x08), byte_halves(0x10, 0x20),
                             byte_halves(0x40, 0x80)};
template <bool kFive>
__attribute__((always_inline)) inline void decode_q45_k(const uint8_t* w, KBlock& k) {
  constexpr int64_t kNibbles = kFive ? 48 : 16;
  const __m512i nib = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(0x10);
  uint32_t u[4];
  std::memcpy(u, w + 4, 12);
  const uint32_t k1 = 0x3f3f3f3f, k2 = 0x0f0f0f0f, k3 = 0x03030303;
  u[3] = ((u[2] >> 4) & k2) | (((u[1] >> 6) & k3) << 4);
  uint32_t mins_lo = u[1] & k1;
  u[1] = (u[2] & k2) | (((u[0] >> 6) & k3) << 4);
  u[2] = mins_lo;
  u[0] &= k1;  // bytes of u[0..1]: the 8 scales; of u[2..3]: the 8 mins
  __m512i sm = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)u)));
  for (int h = 0; h < 2; h++) {
    __m512i v = _mm512_loadu_si512(w + kNibbles + 64 * h);
    k.q[2 * h] = _mm512_and_si512(v, nib);
    k.q[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
    if constexpr (kFive) {  // q[i]'s two 32-byte halves take bits 4h + e and 4h + 2 + e of the same 32 bytes
      __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(w + 16)));
      for (int e = 0; e < 2; e++) {
        __mmask64 set = _mm512_test_epi8_mask(qh, fifth_bit[2 * h + e]);
        k.q[2 * h + e] = _mm512_mask_add_epi8(k.q[2 * h + e], set, k.q[2 * h + e], sixteen);
      }
    }
    k.sc[2 * h] = _mm512_permutexvar_epi16(lo_idx[h], sm);
    k.sc[2 * h + 1] = _mm512_permutexvar_epi16(hi_idx[h], sm);
  }
  k.low16 = _mm256_permutexvar_epi16(min_idx, _mm512_castsi512_si256(sm));
  k.d = half_at(w), k.low_scale = -half_at(w + 2);
}

// Q6_K: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, d (fp16).
// value = d * sc[s] * (q - 32) for sub-block s of 16 weights.
const __m512i q6_idx[4] = {lane_index(0, 2, 8), lane_index(4, 6, 8), lane_index(8, 10, 8),
                           lane_index(12, 14, 8)};
__attribute__((always_inline)) inline void decode_q6_k(const uint8_t* w, KBlock& k) {
  const __m512i nib = _mm512_set1_epi8(0x0F), two = _mm512_set1_epi8(3);
  const __m512i shift_lo = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
  const __m512i shift_hi = _mm512_add_epi16(shift_lo, _mm512_set1_epi16(4));
  __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + 192)));
  __m512i sm = _mm512_castsi256_si512(sc16);
  for (int h = 0; h < 2; h++) {
    __m512i ql = _mm512_loadu_si512(w + 64 * h);
    __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(w + 128 + 32 * h)));
    __m512i hl = _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, shift_lo), two), 4);
    __m512i hh = _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, shift_hi), two), 4);
    k.q[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, nib), hl);
    k.q[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), nib), hh);
    k.sc[2 * h] = _mm512_permutexvar_epi16(q6_idx[2 * h], sm);
    k.sc[2 * h + 1] = _mm512_permutexvar_epi16(q6_idx[2 * h + 1], sm);
  }
  k.d = half_at(w + 208), k.low16 = sc16, k.low_scale = -32.0f * k.d;
}

// Q2_K: 16 bytes of 4-bit scales (low nibble) and mins (high nibble) per 16 weights, 64 bytes of 2-bit quants,
// d (fp16), dmin (fp16). Weight 128h + 32j + l (l < 32) is bits 2j, 2j + 1 of byte 32h + l.
// value = d * sc[s] * q - dmin * mn[s].
// Q3_K (kThree): 32 bytes of high bits (bit 4h + j of byte l: weight 128h + 32j + l's), 64 bytes of 2-bit quants
// as Q2_K's, 12 bytes of 6-bit scales (minus 32), d (fp16). value = d * sc[s] * (q + 4 * high - 4).
template <bool kThree>
__attribute__((always_inline)) inline void decode_q23_k(const uint8_t* w, KBlock& k) {
  constexpr int64_t kQuants = kThree ? 32 : 16;
  const __m512i three = _mm512_set1_epi8(3), four = _mm512_set1_epi8(4);
  const __m512i shift[2] = {_mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1),
                            _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1)};
  __m256i sc16;
  if constexpr (kThree) {
    uint32_t u[4];
    std::memcpy(u, w + 96, 12);
    const uint32_t k1 = 0x03030303, k2 = 0x0f0f0f0f, t = u[2];
    u[2] = ((u[0] >> 4) & k2) | (((t >> 4) & k1) << 4);
    u[3] = ((u[1] >> 4) & k2) | (((t >> 6) & k1) << 4);
    u[0] = (u[0] & k2) | ((t & k1) << 4);
    u[1] = (u[1] & k2) | (((t >> 2) & k1) << 4);
    sc16 = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)u)), _mm256_set1_epi16(32));
    k.low16 = sc16;
    k.d = half_at(w + 108), k.low_scale = -4.0f * k.d;
  } else {
    __m128i s = _mm_loadu_si128((const __m128i*)w), nib = _mm_set1_epi8(0x0F);
    sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(s, nib));
    k.low16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(s, 4), nib));
    k.d = half_at(w + 80), k.low_scale = -half_at(w + 82);
  }
  __m512i sm = _mm512_castsi256_si512(sc16);
  for (int h = 0; h < 2; h++) {
    __m512i qs = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(w + kQuants + 32 * h)));
    for (int e = 0; e < 2; e++) {
      k.q[2 * h + e] = _mm512_and_si512(_mm512_srlv_epi16(qs, shift[e]), three);
      if constexpr (kThree) {
        __m512i hm = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)w));
        __mmask64 set = _mm512_test_epi8_mask(hm, high_bit[2 * h + e]);
        k.q[2 * h + e] = _mm512_mask_add_epi8(k.q[2 * h + e], set, k.q[2 * h + e], four);
      }
      k.sc[2 * h + e] = _mm512_permutexvar_epi16(q6_idx[2 * h + e], sm);
    }
  }
}

// A K-quant weight row's blocks (`bytes` each, decoded by `decode`) times rows m0..m1 of the activations.
template <auto decode, int64_t bytes>
__attribute__((always_inline)) inline void rows_k(const uint8_t* w, int64_t nb, const Acts& a, int64_t K, int64_t m0,
                                                  int64_t m1, RowOut* out) {
  for (int64_t b = 0; b < nb; b++, w += bytes) {
    prefetch(w, bytes);
    KBlock k;
    decode(w, k);
    k_block_rows(k, a, K, b, m0, m1, out);
  }
}

float reduce(const RowOut& r) {
  __m256 s = _mm256_add_ps(r.accmin, _mm256_add_ps(_mm512_castps512_ps256(r.acc), _mm512_extractf32x8_ps(r.acc, 1)));
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// Weight rows n0..n1 (row_bytes each) times rows m0..m1 of x, into y (N columns): one weight row's blocks by
// `rows` (inlined, so that its constants are set up once per call, not once per weight row), then reduced.
template <auto rows>
void row_range(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, int64_t nb, const Acts& a, int64_t K,
               int64_t m0, int64_t m1, RowOut* out, float* y, int64_t N) {
  for (int64_t n = n0; n < n1 && m1 - m0 == 1; n++) {  // one row of x (decode): its sums stay in registers
    RowOut one{_mm512_setzero_ps(), _mm256_setzero_ps()};
    rows(w + n * row_bytes, nb, a, K, m0, m0 + 1, &one);
    y[m0 * N + n] = reduce(one);
  }
  for (int64_t n = n0; n < n1 && m1 - m0 > 1; n++) {
    for (int64_t m = m0; m < m1; m++) out[m - m0] = {_mm512_setzero_ps(), _mm256_setzero_ps()};
    rows(w + n * row_bytes, nb, a, K, m0, m1, out);
    for (int64_t m = m0; m < m1; m++) y[m * N + n] = reduce(out[m - m0]);
  }
}

// Many rows of x (prefill, batches): 16 weight rows at a time (a panel) decoded once, each int32 lane of a vector
// one weight row's 4 quants of the same 4 columns (16 rows' blocks decoded, then transposed), and 8 rows of x
// against it at a time, their 4 quants broadcast, with vpdpbusd (64 multiply-adds per instruction, where the
// one-row path's pair of instructions does 32). K-quants: each sub-block's sums times its integer scales, each
// block's in float times d and the activations' scale, the low terms as float factors times the activations'
// group sums; blocks of 32: each block's sums in float times its scale and the activations', the low terms from
// the activations' block sums. One core, 2048 x 2048, ns per block of 256 weights and row of x, row path -> panels:
// 512 rows: Q4_K 3.65 -> 1.97, Q6_K 3.9 -> 2.5, Q8_0 5.2 -> 1.8, IQ4_XS 4.7 -> 1.85; 16 rows: Q4_K 4.0 -> 2.8,
// Q8_0 4.7 -> 2.45; 8 rows: Q8_0 4.5 -> 3.3, but Q4_K 3.5 -> 4.0 (`panel_from`).
constexpr int64_t kLanes = 16, kCols = 8;

struct Panel {
  std::vector<uint8_t> q;     // [4-column group][16 rows][4 quants]
  std::vector<int32_t> sc;    // K-quants: [block][sub-block][16 rows]
  std::vector<float> d, low;  // [block (of 256 or of 32)][16 rows]; [low group][16 rows]
};

// 16 rows of 16 uint32 (row i at src + stride * i) -> 16 vectors, vector j the rows' element j (at dst + 16 j).
inline void transpose16(const uint32_t* src, int64_t stride, uint32_t* dst) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(src + stride * i);
  for (int i = 0; i < 16; i += 2) {  // per 128-bit lane: elements 0, 1 of rows i, i + 1; then 2, 3
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + e]: element e of each 128-bit lane, of rows i..i + 3
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int e = 0; e < 4; e++) {  // lane k of r[e], r[4 + e], r[8 + e], r[12 + e]: element 4 k + e of all 16 rows
    __m512i a0 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0x88), a1 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0xDD);
    __m512i b0 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0x88), b1 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0xDD);
    _mm512_storeu_si512(dst + 16 * e, _mm512_shuffle_i32x4(a0, b0, 0x88));
    _mm512_storeu_si512(dst + 16 * (8 + e), _mm512_shuffle_i32x4(a0, b0, 0xDD));
    _mm512_storeu_si512(dst + 16 * (4 + e), _mm512_shuffle_i32x4(a1, b1, 0x88));
    _mm512_storeu_si512(dst + 16 * (12 + e), _mm512_shuffle_i32x4(a1, b1, 0xDD));
  }
}

template <auto decode, int64_t bytes, int64_t group, int64_t sub>
void pack_panel(const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t K, Panel& p) {
  constexpr int64_t nsub = kBlock / sub, ngroup = kBlock / group;
  const int64_t nb = K / kBlock;
  alignas(64) uint32_t tile[kLanes][64];  // a block of the 16 rows, decoded
  alignas(64) int16_t scs[128], low16[16];
  for (int64_t b = 0; b < nb; b++) {
    for (int64_t r = 0; r < kLanes; r++) {
      if (r >= rows) {  // rows past the weight's end: zeros
        std::memset(tile[r], 0, sizeof(tile[r]));
        p.d[b * kLanes + r] = 0.0f;
        for (int64_t j = 0; j < ngroup; j++) p.low[(b * ngroup + j) * kLanes + r] = 0.0f;
        for (int64_t s = 0; s < nsub; s++) p.sc[(b * nsub + s) * kLanes + r] = 0;
        continue;
      }
      KBlock k;
      decode(w + r * row_bytes + b * bytes, k);
      for (int i = 0; i < 4; i++) {
        _mm512_store_si512(tile[r] + 16 * i, k.q[i]);
        _mm512_store_si512(scs + 32 * i, k.sc[i]);
      }
      _mm256_store_si256((__m256i*)low16, k.low16);
      p.d[b * kLanes + r] = k.d;
      for (int64_t j = 0; j < ngroup; j++) p.low[(b * ngroup + j) * kLanes + r] = k.low_scale * low16[j * group / 16];
      for (int64_t s = 0; s < nsub; s++) p.sc[(b * nsub + s) * kLanes + r] = scs[s * sub / 2];  // lane: 2 bytes
    }
    uint32_t* pq = (uint32_t*)p.q.data() + b * 64 * kLanes;
    for (int c = 0; c < 64; c += 16) transpose16(&tile[0][c], 64, pq + c * kLanes);
  }
}

inline __m512i broadcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm512_set1_epi32(v);
}

// The integer dot products of the panel's columns k0..k0 + n with rows x..x + 8 (K apart): acc[t], one lane per
// weight row.
template <int64_t n>
__attribute__((always_inline)) inline void run_dots(const Panel& p, const int8_t* x, int64_t K, int64_t k0,
                                                    __m512i* acc) {
  for (int t = 0; t < kCols; t++) acc[t] = _mm512_setzero_si512();
#pragma GCC unroll 8
  for (int64_t k = k0; k < k0 + n; k += 4) {
    __m512i wv = _mm512_loadu_si512(p.q.data() + k * kLanes);
    for (int t = 0; t < kCols; t++) acc[t] = _mm512_dpbusd_epi32(acc[t], wv, broadcast4(x + t * K + k));
  }
}

// The panel times rows m0..m0 + 8 of x: f[t], the 16 weight rows' results for row m0 + t.
template <int64_t group, int64_t sub>
__attribute__((always_inline)) inline void panel_cols(const Panel& p, const Acts& a, int64_t K, int64_t m0,
                                                      __m512* f) {
  constexpr int64_t nsub = kBlock / sub;
  const int64_t nb = K / kBlock;
  const int8_t* x = a.q.data() + m0 * K;
  for (int t = 0; t < kCols; t++) f[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    __m512i s1[kCols];
    for (int t = 0; t < kCols; t++) s1[t] = _mm512_setzero_si512();
    for (int64_t s = 0; s < nsub; s++) {
      __m512i acc[kCols];
      run_dots<sub>(p, x, K, b * kBlock + s * sub, acc);
      __m512i scv = _mm512_loadu_si512(p.sc.data() + (b * nsub + s) * kLanes);
      for (int t = 0; t < kCols; t++) s1[t] = _mm512_add_epi32(s1[t], _mm512_mullo_epi32(acc[t], scv));
    }
    __m512 dv = _mm512_loadu_ps(p.d.data() + b * kLanes);
    for (int t = 0; t < kCols; t++)
      f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1[t]), _mm512_mul_ps(dv, _mm512_set1_ps(a.d[(m0 + t) * nb + b])),
                             f[t]);
  }
  const int64_t nl = K / group;
  for (int64_t i = 0; i < nl; i++) {
    __m512 lv = _mm512_loadu_ps(p.low.data() + i * kLanes);
    for (int t = 0; t < kCols; t++) f[t] = _mm512_fmadd_ps(lv, _mm512_set1_ps(a.low[(m0 + t) * nl + i]), f[t]);
  }
}

// Blocks of 32 (sub-blocks of IQ4_XS) in a panel: the unsigned quants, each block's scale and low value (the
// offset of the quants, or Q4_1 / Q5_1's m) per weight row.
template <int64_t kind, int64_t bytes>
void pack_panel_32(const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t K, Panel& p) {
  const int64_t nb = K / 32;
  alignas(64) uint32_t tile[kLanes][16];  // two blocks of the 16 rows (p.q has room for a last odd one's pair)
  for (int64_t s0 = 0; s0 < nb; s0 += 2) {
    for (int64_t r = 0; r < kLanes; r++) {
      for (int64_t s = s0; s < s0 + 2; s++) {
        uint32_t* qs = tile[r] + 8 * (s - s0);
        float d = 0.0f, low = 0.0f;
        if (r >= rows || s >= nb) {
          std::memset(qs, 0, 32);
          if (s < nb) p.d[s * kLanes + r] = 0.0f, p.low[s * kLanes + r] = 0.0f;
          continue;
        }
        const uint8_t* b = w + r * row_bytes + s * bytes;
        if constexpr (kind == kIQ4XS) {  // sub-block s % 8 of block s / 8
          const uint8_t* blk = w + r * row_bytes + (s / 8) * kIQ4XSBytes;
          alignas(32) float ds[8];
          _mm256_store_ps(ds, iq4_xs_block_scales(blk));
          b = blk + 8 + 16 * (s % 8), d = ds[s % 8];
        } else {
          d = half_at(b);
        }
        _mm256_store_si256((__m256i*)qs, quants32<kind>(b));
        if constexpr (kind == kQ4_1 || kind == kQ5_1)
          low = half_at(b + 2);
        else
          low = d * offset_of(kind);
        p.d[s * kLanes + r] = d, p.low[s * kLanes + r] = low;
      }
    }
    transpose16(&tile[0][0], 16, (uint32_t*)p.q.data() + s0 * 8 * kLanes);
  }
}

// The same for blocks of 32: each block's sums in float times its scale and the activations' (one per 32).
__attribute__((always_inline)) inline void panel_cols_32(const Panel& p, const Acts& a, int64_t K, int64_t m0,
                                                         __m512* f) {
  const int8_t* x = a.q.data() + m0 * K;
  const int64_t nb = K / 32;
  for (int t = 0; t < kCols; t++) f[t] = _mm512_setzero_ps();
  for (int64_t s = 0; s < nb; s++) {
    __m512i acc[kCols];
    run_dots<32>(p, x, K, 32 * s, acc);
    __m512 dv = _mm512_loadu_ps(p.d.data() + s * kLanes), lv = _mm512_loadu_ps(p.low.data() + s * kLanes);
    for (int t = 0; t < kCols; t++) {
      __m512 scale = _mm512_mul_ps(dv, _mm512_set1_ps(a.d[(m0 + t) * nb + s]));
      f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t]), scale, f[t]);
      f[t] = _mm512_fmadd_ps(lv, _mm512_set1_ps(a.s[(m0 + t) * nb + s]), f[t]);
    }
  }
}

// Panels p0..p1 (weight rows 16 p0 on) times all M rows of x (padded with zeros to 8), into y: each panel packed
// by `pack`, then multiplied by `cols`.
template <auto pack, auto cols>
void panel_range(const uint8_t* w, int64_t row_bytes, int64_t p0, int64_t p1, int64_t N, const Acts& a, int64_t K,
                 int64_t M, float* y) {
  Panel p{std::vector<uint8_t>((K + 32) * kLanes), std::vector<int32_t>(K / 16 * kLanes),
          std::vector<float>(K / 32 * kLanes), std::vector<float>(K / 16 * kLanes)};
  for (int64_t n = p0 * kLanes; n < std::min(N, p1 * kLanes); n += kLanes) {
    int64_t rows = std::min(kLanes, N - n);
    pack(w + n * row_bytes, row_bytes, rows, K, p);
    for (int64_t m0 = 0; m0 < M; m0 += kCols) {
      __m512 f[kCols];
      cols(p, a, K, m0, f);
      for (int64_t t = 0; t < std::min(kCols, M - m0); t++)
        _mm512_mask_storeu_ps(y + (m0 + t) * N + n, (__mmask16)((1u << rows) - 1), f[t]);
    }
  }
}

template <auto decode, int64_t bytes, int64_t group, int64_t sub>
constexpr auto k_panels = panel_range<pack_panel<decode, bytes, group, sub>, panel_cols<group, sub>>;
template <int64_t kind, int64_t bytes>
constexpr auto panels_32 = panel_range<pack_panel_32<kind, bytes>, panel_cols_32>;

using PanelFn = decltype(&panel_range<pack_panel_32<kQ8_0, 34>, panel_cols_32>);

using RangeFn = decltype(&row_range<rows_k<decode_q6_k, 210>>);

struct Kind {
  int64_t columns, bytes;  // per block
  RangeFn range;
  PanelFn panel;
  int64_t panel_from = kCols;  // rows of x from which panels pay (measured: 16 for the K-quants, 8 for the others)
};

Kind kind_of(int64_t kind) {
  switch (kind) {
    case kQ4_0: return {32, 18, row_range<rows_32<kQ4_0, 18>>, panels_32<kQ4_0, 18>};
    case kQ4_1: return {32, 20, row_range<rows_32<kQ4_1, 20>>, panels_32<kQ4_1, 20>};
    case kQ5_0: return {32, 22, row_range<rows_32<kQ5_0, 22>>, panels_32<kQ5_0, 22>};
    case kQ5_1: return {32, 24, row_range<rows_32<kQ5_1, 24>>, panels_32<kQ5_1, 24>};
    case kQ8_0: return {32, 34, row_range<rows_32<kQ8_0, 34>>, panels_32<kQ8_0, 34>};
    case kIQ4NL: return {32, 18, row_range<rows_32<kIQ4NL, 18>>, panels_32<kIQ4NL, 18>};
    case kIQ4XS: return {32, kIQ4XSBytes / 8, row_range<rows_32<kIQ4XS, kIQ4XSBytes / 8>>,
                                   panels_32<kIQ4XS, kIQ4XSBytes / 8>};  // per sub-block
    case kQ2K: return {kBlock, 84, row_range<rows_k<decode_q23_k<false>, 84>>,
                          k_panels<decode_q23_k<false>, 84, 16, 16>, 16};
    case kQ3K: return {kBlock, 110, row_range<rows_k<decode_q23_k<true>, 110>>,
                          k_panels<decode_q23_k<true>, 110, 16, 16>, 16};
    case kQ4K: return {kBlock, 144, row_range<rows_k<decode_q45_k<false>, 144>>,
                          k_panels<decode_q45_k<false>, 144, 32, 32>, 16};
    case kQ5K: return {kBlock, 176, row_range<rows_k<decode_q45_k<true>, 176>>,
                          k_panels<decode_q45_k<true>, 176, 32, 32>, 16};
    case kQ6K: return {kBlock, 210, row_range<rows_k<decode_q6_k, 210>>,
                          k_panels<decode_q6_k, 210, 16, 16>, 16};
  }
  TORCH_CHECK(false, "ggml_mm: ggml type ", kind, " is not computed natively");
}

// The activations as the weight's kind computes on them; for the panels (`panels`), padded with rows of zeros to
// a multiple of 8, and the low terms' group sums.
Acts quantize(const float* x, int64_t M, int64_t K, int64_t kind, bool panels) {
  bool k_quant = kind >= kQ2K && kind <= kQ6K, q45 = kind == kQ4K || kind == kQ5K;
  int64_t nb = K / (k_quant ? kBlock : 32), group = q45 ? 32 : 16;
  int64_t rows = panels ? (M + kCols - 1) / kCols * kCols : M;
  Acts a{std::vector<int8_t>(rows * K), std::vector<float>(rows * nb), std::vector<float>(k_quant ? 0 : rows * nb),
         std::vector<float>(panels ? rows * K / group : 0), std::vector<int16_t>(k_quant ? M * K / 16 : 0)};
  at::parallel_for(0, M, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; m++) {
      if (k_quant)
        quantize_row(x + m * K, K, q45, group, a.q.data() + m * K, a.d.data() + m * nb, a.bsum.data() + m * K / 16,
                     panels ? a.low.data() + m * K / group : nullptr);
      else
        quantize_row_32(x + m * K, K, kind == kIQ4XS && !panels, a.q.data() + m * K, a.d.data() + m * nb,
                        a.s.data() + m * nb);
    }
  });
  return a;
}

// llama.cpp's permuted q/k rows (each head's rows stored (half, 2), so that RoPE rotates adjacent pairs): each
// row of y (M rows of N) put back in the model's order, (2, half) per head.
void unpermute_heads(float* y, int64_t M, int64_t N, int64_t heads) {
  int64_t half = N / heads / 2;
  std::vector<float> row(N);
  for (int64_t m = 0; m < M; m++) {
    float* ym = y + m * N;
    std::copy(ym, ym + N, row.begin());
    for (int64_t h = 0; h < heads; h++)
      for (int64_t i = 0; i < half; i++) {
        ym[2 * h * half + i] = row[2 * (h * half + i)];
        ym[(2 * h + 1) * half + i] = row[2 * (h * half + i) + 1];
      }
  }
}

// x @ W.T, W's N rows of blocks in `raw`; `heads` > 0: W's rows are llama.cpp's permuted q/k rows of that many
// heads, y's columns come in the model's order.
at::Tensor ggml_mm(const at::Tensor& x, const at::Tensor& raw, int64_t kind, int64_t heads) {
  Kind k = kind_of(kind);
  int64_t K = x.size(-1), N = raw.size(0), nb = K / k.columns;
  TORCH_CHECK(K % k.columns == 0 && (kind != kIQ4XS || K % kBlock == 0) && raw.dim() == 2 &&
                  raw.size(1) == nb * k.bytes && raw.scalar_type() == at::kByte,
              "ggml_mm: weight of ", raw.sizes(), " bytes does not hold ", K, " columns of type ", kind);
  TORCH_CHECK(raw.is_contiguous(), "ggml_mm: the weight's rows must be contiguous");
  TORCH_CHECK(heads >= 0 && (heads == 0 || N % (2 * heads) == 0), "ggml_mm: ", N, " rows in ", heads, " heads");
  bool plain = x.scalar_type() == at::kFloat && x.is_contiguous();  // else a float copy (ATen calls cost us)
  at::Tensor xf = plain ? x : x.to(at::kFloat).contiguous();
  int64_t M = x.numel() / K;
  bool panels = M >= k.panel_from;
  Acts a = quantize(xf.data_ptr<float>(), M, K, kind, panels);
  auto shape = x.sizes().vec();
  shape.back() = N;
  at::Tensor y = at::empty(shape, xf.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = raw.data_ptr<uint8_t>();
  // Threads for matrices of more than about 2^17 weights (a parallel region costs microseconds).
  if (panels) {
    at::parallel_for(0, (N + kLanes - 1) / kLanes, std::max<int64_t>(1, (1 << 13) / K), [&](int64_t lo, int64_t hi) {
      k.panel(wp, raw.size(1), lo, hi, N, a, K, M, yp);
    });
  } else {
    // Rows of x a tile at a time (about 32 KB of their quants, which stay in the L1 cache while every weight
    // row of the thread's part passes by).
    int64_t tile = std::clamp<int64_t>((1 << 15) / K, 1, 64);
    at::parallel_for(0, N, std::max<int64_t>(16, (1 << 17) / K), [&](int64_t lo, int64_t hi) {
      std::vector<RowOut> out(tile);
      for (int64_t m0 = 0; m0 < M; m0 += tile) {
        int64_t m1 = std::min(M, m0 + tile);
        k.range(wp, nb * k.bytes, lo, hi, nb, a, K, m0, m1, out.data(), yp, N);
      }
    });
  }
  if (heads) unpermute_heads(yp, M, N, heads);
  return plain ? y : y.to(x.scalar_type());
}

at::Tensor ggml_mm_meta(const at::Tensor& x, const at::Tensor& raw, int64_t kind, int64_t heads) {
  auto shape = x.sym_sizes().vec();  // symbolic where a graph is exported for any batch size
  shape.back() = raw.sym_size(0);
  return at::empty_symint(shape, x.options());
}

}  // namespace

TORCH_LIBRARY(autolm, m) { m.def("ggml_mm(Tensor x, Tensor raw, int kind, int heads=0) -> Tensor"); }
TORCH_LIBRARY_IMPL(autolm, CPU, m) { m.impl("ggml_mm", &ggml_mm); }
TORCH_LIBRARY_IMPL(autolm, Meta, m) { m.impl("ggml_mm", &ggml_mm_meta); }
