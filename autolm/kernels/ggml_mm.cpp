// x @ W.T for a weight W kept in llama.cpp's blocks, computed on the blocks with integer dot products, as
// llama.cpp computes them. K-quants (Q2_K to Q6_K): each row of x is quantized to int8 per 256 columns (one
// scale per block, llama.cpp's Q8_K), a block's quants are multiplied with vpmaddubsw (unsigned weight quants
// times signed activations, pairs summed in int16) and then by the block's integer sub-scales (summed in int32),
// and the block's sum is scaled once, in float. Blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, and IQ4_XS's
// sub-blocks, its non-linear values looked up with vpshufb): x quantized per 32 columns (llama.cpp's Q8_0 / Q8_1),
// an integer dot product per block, scaled per block. The instructions come from one of two files, as the machine
// has them: ggml_avx512.h (AVX-512 VNNI: vpdpbusd on unsigned bytes, 64 at a time; many rows of x in panels; from
// 16 rows on, where the CPU has AMX, the weight decoded to bf16 for the tile unit: ggml_amx.h) and ggml_avx2.h (AVX2,
// FMA and F16C: vpmaddubsw and vpmaddwd, 32 bytes at a time). Built by autolm/kernels/native.py with the machine's own instruction set
// (-march=native); registered as torch.ops.autolm.ggml_mm (and ggml_mm_id: each row of x with its own expert's
// weight), with Meta kernels, so that they run eagerly and inside ahead-of-time compiled graphs alike.
// ATen's core headers, not ATen/ATen.h (every op's declarations: 3 s more of each build)
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cpuid.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define AUTOLM_AVX512 1
#elif !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "ggml_mm.cpp needs AVX-512 VNNI, BW, DQ and VL, or AVX2, FMA and F16C"
#endif

namespace {

constexpr int64_t kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ2K = 10, kQ3K = 11, kQ4K = 12, kQ5K = 13,
                  kQ6K = 14, kIQ4NL = 20, kIQ4XS = 23, kMXFP4 = 39, kBlock = 256;

// The weights' quants as unsigned bytes (0..255, for vpdpbusd, which sums in int32) or, where vpmaddubsw's int16
// sums would saturate on bytes above 127 (Q8_0, IQ4_NL and IQ4_XS with AVX2), as signed bytes (their signs moved
// onto the activations with vpsignb).
#ifdef AUTOLM_AVX512
constexpr bool kUnsignedBytes = true;
#else
constexpr bool kUnsignedBytes = false;
#endif

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// Rows of activations quantized to int8: q (K per row), d (one scale per block of 256 columns for the K-quants,
// of 32 for the others). K-quants: bsum, the sums of each 16 quants (int16, natural order), and for the panels
// (many rows), low: each group's sum times its block's scale (a group: the columns that share a weight block's
// low term, 32 for Q4_K and Q5_K, else 16). The others: s, each block's sum, d times the sum of its quants
// (llama.cpp's Q8_1). Where a kernel takes several blocks' nibbles at a time, the quants come in the order in which
// they come out: for Q4_K and Q5_K, with kSwapQ45, the 32-column runs 1 and 2 of every 128 swapped; for blocks of
// 32 on the one-row path, runs of Kind::split blocks (IQ4_XS: kSplitIQ4XS; the nibble kinds' pairs: 2)
// as their first 16 quants each, then their last 16.
struct Acts {
  std::vector<int8_t> q;
  std::vector<float> d, s, low;
  std::vector<int16_t> bsum;
};

// Ask for the bytes kPrefetch ahead of a block (the row's next blocks, or the next row's) while this one is
// computed on: the hardware prefetcher alone left a one-row matmul at ~65% of the memory's bandwidth.
constexpr int64_t kPrefetch = 4096;
inline void prefetch(const uint8_t* w, int64_t bytes) {
  for (int64_t at = 0; at < bytes; at += 64) _mm_prefetch((const char*)(w + kPrefetch + at), _MM_HINT_T0);
}

inline __m256i nibbles(const uint8_t* p) {  // 16 bytes: the low nibbles are weights 0..15, the high 16..31
  const __m128i mask = _mm_set1_epi8(0x0F);
  __m128i v = _mm_loadu_si128((const __m128i*)p);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
}

inline __m256i fifth_bits(uint32_t h) {  // a 32-bit mask -> 16 in each byte whose bit is set
#ifdef AUTOLM_AVX512
  return _mm256_and_si256(_mm256_movm_epi8(h), _mm256_set1_epi8(0x10));
#else  // byte i takes mask byte i / 8, then tests its bit i % 8
  const __m256i spread = _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303);
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);
  __m256i bytes = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)h), spread), bit);
  return _mm256_and_si256(_mm256_cmpeq_epi8(bytes, bit), _mm256_set1_epi8(0x10));
#endif
}
inline __m256i fifth_bits(const uint8_t* p) {
  uint32_t h;
  std::memcpy(&h, p, 4);
  return fifth_bits(h);
}

// A code book's 16 values per nibble, plus 128 where the quants are unsigned bytes, in both 128-bit lanes: IQ4_NL /
// IQ4_XS's (llama.cpp's kvalues_iq4nl) and MXFP4's (kvalues_mxfp4: FP4 E2M1's values, doubled).
inline __m256i table16(const int* values) {
  alignas(32) uint8_t t[32];
  for (int i = 0; i < 32; i++) t[i] = (uint8_t)(values[i % 16] + (kUnsignedBytes ? 128 : 256));
  return _mm256_load_si256((const __m256i*)t);
}
constexpr int kIQ4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
constexpr int kMXFP4Values[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
const __m256i iq4_values = table16(kIQ4Values), mxfp4_values = table16(kMXFP4Values);

// MXFP4's block scale: a power of two in one byte (E8M0), halved for the doubled values (ggml_e8m0_to_fp32_half).
inline float e8m0_half(uint8_t e) {
  uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// A block of 32's scale: its fp16 d (at byte 0), or MXFP4's byte.
template <int64_t kind>
inline float block_scale(const uint8_t* b) {
  if constexpr (kind == kMXFP4) return e8m0_half(b[0]);
  return half_at(b);
}

// A block of 32 weights as quants, natural order (value = d * q + low; low = d * offset_of(kind) but for Q4_1 and
// Q5_1, which store theirs).
constexpr float offset_of(int64_t kind) {
  return kind == kQ4_0 ? -8.0f : kind == kQ5_0 ? -16.0f : kUnsignedBytes ? -128.0f : 0.0f;
}
template <int64_t kind>
constexpr bool kSignedQuants = !kUnsignedBytes && (kind == kQ8_0 || kind == kIQ4NL || kind == kIQ4XS || kind == kMXFP4);
template <int64_t kind>
inline __m256i quants32(const uint8_t* b) {
  if constexpr (kind == kQ4_0) return nibbles(b + 2);
  if constexpr (kind == kQ4_1) return nibbles(b + 4);
  if constexpr (kind == kQ5_0) return _mm256_or_si256(nibbles(b + 6), fifth_bits(b + 2));
  if constexpr (kind == kQ5_1) return _mm256_or_si256(nibbles(b + 8), fifth_bits(b + 4));
  if constexpr (kind == kQ8_0) {
    __m256i q = _mm256_loadu_si256((const __m256i*)(b + 2));
    return kUnsignedBytes ? _mm256_xor_si256(q, _mm256_set1_epi8((char)0x80)) : q;
  }
  if constexpr (kind == kIQ4NL) return _mm256_shuffle_epi8(iq4_values, nibbles(b + 2));
  if constexpr (kind == kIQ4XS) return _mm256_shuffle_epi8(iq4_values, nibbles(b));  // b: the sub-block's 16 bytes
  if constexpr (kind == kMXFP4) return _mm256_shuffle_epi8(mxfp4_values, nibbles(b + 1));
}

// Two blocks of 32 of a nibble kind taken together (Kind::split 2): where each block's 16 bytes of
// nibbles start, and Q5_0's / Q5_1's fifth bits of blocks b and b + `bytes` in the pair's order, the first 16
// weights' of each block, then the last 16's.
template <int64_t kind>
constexpr int64_t kNibblesAt = kind == kMXFP4 ? 1 : kind == kQ4_1 ? 4 : kind == kQ5_0 ? 6 : kind == kQ5_1 ? 8 : 2;
template <int64_t kind, int64_t bytes>
inline uint64_t pair_fifth_bits(const uint8_t* b) {
  uint32_t h0, h1;
  std::memcpy(&h0, b + kNibblesAt<kind> - 4, 4);
  std::memcpy(&h1, b + bytes + kNibblesAt<kind> - 4, 4);
  return (h0 & 0xFFFFu) | (uint64_t)(h1 & 0xFFFFu) << 16 | (uint64_t)(h0 >> 16) << 32 | (uint64_t)(h1 >> 16) << 48;
}

// The K-quants' 6-bit scales in 12 bytes at p, as 16 bytes in a register (built there: four 4-byte stores read
// back by one 16-byte load cannot be forwarded, a stall of ~20 cycles per block on Intel's cores). Q4_K and Q5_K:
// the 8 scales, then the 8 mins (llama.cpp's get_scale_min_k4); Q3_K: its 16 scales, 0..63 (32 too many).
inline __m128i scales_mins_k4(const uint8_t* p) {
  uint32_t u[3];
  std::memcpy(u, p, 12);
  const uint32_t k1 = 0x3f3f3f3f, k2 = 0x0f0f0f0f, k3 = 0x03030303;
  return _mm_setr_epi32((int)(u[0] & k1), (int)((u[2] & k2) | (((u[0] >> 6) & k3) << 4)), (int)(u[1] & k1),
                        (int)(((u[2] >> 4) & k2) | (((u[1] >> 6) & k3) << 4)));
}
inline __m128i scales_k3(const uint8_t* p) {
  uint32_t u[3];
  std::memcpy(u, p, 12);
  const uint32_t k1 = 0x03030303, k2 = 0x0f0f0f0f, t = u[2];
  return _mm_setr_epi32((int)((u[0] & k2) | ((t & k1) << 4)), (int)((u[1] & k2) | (((t >> 2) & k1) << 4)),
                        (int)(((u[0] >> 4) & k2) | (((t >> 4) & k1) << 4)),
                        (int)(((u[1] >> 4) & k2) | (((t >> 6) & k1) << 4)));
}

// IQ4_XS: d (fp16), 2 high bits of each sub-block's 6-bit scale (uint16), their low 4 bits (4 bytes), 128 bytes of
// nibbles, per 32 weights as IQ4_NL's (low nibbles the first 16). value = d * (scale - 32) * kvalues[nibble].
constexpr int64_t kIQ4XSBytes = 136;  // per block of 256 weights

inline __m256 iq4_xs_block_scales(const uint8_t* b) {  // the float scales of a block's 8 sub-blocks
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

// A K-quant block's low term for one row of x: its integer factors per 16 weights (low16) times the row's sums of
// 16 quants (bsum), times `scale` (the block's low scale and the row's), added to acc.
inline __m256 k_low(const int16_t* bsum, __m256i low16, float scale, __m256 acc) {
  __m256i bs = _mm256_loadu_si256((const __m256i*)bsum);
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(bs, low16)), _mm256_set1_ps(scale), acc);
}

// Many rows of x (prefill, batches): panels of kLanes weight rows decoded once, each int32 lane of a vector one
// weight row's 4 quants of the same 4 columns, times kCols rows of x at a time (the activations padded with zeros
// to a multiple of kCols); kLanes and kCols as the instruction set has registers for them.
struct Panel {
  std::vector<uint8_t> q;     // [4-column group][kLanes rows][4 quants]
  std::vector<int32_t> sc;    // K-quants: [block][sub-block][kLanes rows]
  std::vector<float> d, low;  // [block (of 256 or of 32)][kLanes rows]; [low group][kLanes rows]
};
using PanelFn = void (*)(const uint8_t* w, int64_t row_bytes, int64_t p0, int64_t p1, int64_t N, const Acts& a,
                         int64_t K, int64_t M, float* y);
// A weight row as bf16 for the tile unit: its columns 32 s.. 32 s + 31 at out + s * step.
using Bf16RowFn = void (*)(const uint8_t* w, int64_t K, uint16_t* out, int64_t step);

// Whether this CPU's cores are AMD's (CPUID's vendor "AuthenticAMD"), asked once.
bool amd_cores() {
  static const bool amd = [] {
    unsigned a, b, c, d;
    return __get_cpuid(0, &a, &b, &c, &d) && b == 0x68747541 && d == 0x69746e65 && c == 0x444d4163;
  }();
  return amd;
}

#ifdef AUTOLM_AVX512
#include "ggml_avx512.h"
#else
#include "ggml_avx2.h"
#endif
// A weight's rows as bf16 for the tile unit (ggml_amx.h), by kind; none without it.
#ifdef AUTOLM_AMX
template <auto decode, int64_t bytes, bool swapped>
constexpr Bf16RowFn bf16_k = &bf16_row_k<decode, bytes, swapped>;
template <int64_t kind, int64_t bytes>
constexpr Bf16RowFn bf16_32 = &bf16_row_32<kind, bytes>;
#else
template <auto decode, int64_t bytes, bool swapped>
constexpr Bf16RowFn bf16_k = nullptr;
template <int64_t kind, int64_t bytes>
constexpr Bf16RowFn bf16_32 = nullptr;
#endif

// x's rows quantized to int8 as absmax (the largest |x| of n columns) and quant16 (16 columns times 1 / scale,
// rounded to the nearest integer, ties to even, and their sum) give them: per 32 columns (`split` > 0: runs of
// that many blocks, see Acts), each block's sum in s.
void quantize_row_32(const float* x, int64_t K, int64_t split, int8_t* q, float* d, float* s) {
  for (int64_t b = 0; b < K / 32; b++) {
    float m = absmax(x + 32 * b, 32);
    d[b] = m / 127.0f;
    float inv = m > 0 ? 127.0f / m : 0.0f;
    int64_t first = split ? 32 * split * (b / split) + 16 * (b % split) : 32 * b;
    int64_t last = split ? first + 16 * split : first + 16;
    int32_t s0, s1;
    _mm_storeu_si128((__m128i*)(q + first), quant16(x + 32 * b, inv, s0));
    _mm_storeu_si128((__m128i*)(q + last), quant16(x + 32 * b + 16, inv, s1));
    s[b] = d[b] * (float)(s0 + s1);
  }
}

// Per 256 columns (with `swap`: see Acts), the sums of 16 in bsum, and for the panels each group's sum times d.
void quantize_row(const float* x, int64_t K, bool swap, int64_t group, int8_t* q, float* d, int16_t* bsum,
                  float* low) {
  for (int64_t b = 0; b < K / kBlock; b++) {
    const float* xb = x + b * kBlock;
    float m = absmax(xb, kBlock);
    d[b] = m / 127.0f;
    float inv = m > 0 ? 127.0f / m : 0.0f;
    int8_t* qb = q + b * kBlock;
    for (int i = 0; i < kBlock; i += 16) {
      int32_t sum;
      int at = i;
      if (swap && ((i / 32) % 4 == 1 || (i / 32) % 4 == 2)) at = i + ((i / 32) % 4 == 1 ? 32 : -32);
      _mm_storeu_si128((__m128i*)(qb + at), quant16(xb + i, inv, sum));
      bsum[b * 16 + i / 16] = (int16_t)sum;
      if (low) low[(b * kBlock + i) / group] = (i % group ? low[(b * kBlock + i) / group] : 0.0f) + d[b] * sum;
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

// Weight rows n0..n1 (row_bytes each) times rows m0..m1 of x, into y (N columns): one weight row's blocks by
// `rows` (inlined, so that its constants are set up once per call, not once per weight row), then reduced.
template <auto rows>
void row_range(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, int64_t nb, const Acts& a, int64_t K,
               int64_t m0, int64_t m1, RowOut* out, float* y, int64_t N) {
  for (int64_t n = n0; n < n1 && m1 - m0 == 1; n++) {  // one row of x (decode): its sums stay in registers
    RowOut one{};
    rows(w + n * row_bytes, nb, a, K, m0, m0 + 1, &one);
    y[m0 * N + n] = reduce(one);
  }
  for (int64_t n = n0; n < n1 && m1 - m0 > 1; n++) {
    for (int64_t m = m0; m < m1; m++) out[m - m0] = RowOut{};
    rows(w + n * row_bytes, nb, a, K, m0, m1, out);
    for (int64_t m = m0; m < m1; m++) y[m * N + n] = reduce(out[m - m0]);
  }
}

// row_range for the K-quants: with one row of x (decode), on Intel's cores two weight rows at a time, their blocks
// decoded and multiplied alternately (two independent chains of work while the next bytes come from memory: a
// one-row matmul streaming Q4_K from memory on 2 of Intel's cores, 12 -> 27-31 GB/s; Q2_K, Q3_K, Q5_K, Q6_K 11-17 ->
// 21-26). AMD's Zen 4 streams the rows one at a time faster: the two rows' interleaved bytes took its Q6_K rows
// from 15-19 to 6-9 GB/s on one core (in the cache both 23), Q4_K's about alike.
template <auto decode, int64_t bytes>
void row_range_k(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, int64_t nb, const Acts& a, int64_t K,
                 int64_t m0, int64_t m1, RowOut* out, float* y, int64_t N) {
  int64_t n = n0;
  const bool two_rows = m1 - m0 == 1 && !amd_cores();
  for (; two_rows && n + 1 < n1; n += 2) {
    RowOut two[2]{};
    const uint8_t *p = w + n * row_bytes, *q = p + row_bytes;
    for (int64_t b = 0; b < nb; b++, p += bytes, q += bytes) {
      prefetch(q, bytes);  // the second row's next bytes: the first row's came a row earlier
      KBlock k1, k2;
      decode(p, k1);
      decode(q, k2);
      k_block_rows(k1, a, K, b, m0, m0 + 1, two);
      k_block_rows(k2, a, K, b, m0, m0 + 1, two + 1);
    }
    y[m0 * N + n] = reduce(two[0]), y[m0 * N + n + 1] = reduce(two[1]);
  }
  row_range<rows_k<decode, bytes>>(w, row_bytes, n, n1, nb, a, K, m0, m1, out, y, N);
}

// row_range for blocks of 32; with one row of x (decode), where kTwoRows32 > 0, for paired blocks (the nibble
// kinds), two weight rows at a time, a group of kTwoRows32 blocks of each in turn (group_32), as row_range_k: the
// AVX2 build streaming from memory on 2 of an Intel Xeon's cores, Q4_0 9.0 -> 16.8 GB/s, Q4_1 9.7 -> 18.5, IQ4_NL
// 7.5 -> 15.2 (Q8_0 10% slower so; the AVX-512 build 8-10% slower so, and one row at a time).
template <int64_t kind, int64_t bytes, bool kPaired>
void row_range_32(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, int64_t nb, const Acts& a, int64_t K,
                  int64_t m0, int64_t m1, RowOut* out, float* y, int64_t N) {
  int64_t n = n0;
  if constexpr (kTwoRows32 > 0 && kPaired) {
    for (; n + 1 < n1 && m1 - m0 == 1; n += 2) {
      RowOut two[2]{};
      const uint8_t *p = w + n * row_bytes, *q = p + row_bytes;
      for (int64_t b0 = 0; b0 < nb; b0 += kTwoRows32) {
        group_32<kind, bytes, kPaired>(p + b0 * bytes, b0, nb, a, K, m0, m0 + 1, two);
        group_32<kind, bytes, kPaired>(q + b0 * bytes, b0, nb, a, K, m0, m0 + 1, two + 1);
      }
      y[m0 * N + n] = reduce(two[0]), y[m0 * N + n + 1] = reduce(two[1]);
    }
  }
#ifdef AUTOLM_AVX512
  if (amd_cores())  // without the scales' gather (first_words)
    return row_range<rows_32<kind, bytes, kPaired, false>>(w, row_bytes, n, n1, nb, a, K, m0, m1, out, y, N);
#endif
  row_range<rows_32<kind, bytes, kPaired>>(w, row_bytes, n, n1, nb, a, K, m0, m1, out, y, N);
}

// Panels p0..p1 (weight rows kLanes p0 on) times all M rows of x (padded with zeros to kCols), into y: each panel
// packed by `pack`, then multiplied by `cols`, kCols rows of x at a time.
template <auto pack, auto cols>
void panel_range(const uint8_t* w, int64_t row_bytes, int64_t p0, int64_t p1, int64_t N, const Acts& a, int64_t K,
                 int64_t M, float* y) {
  Panel p{std::vector<uint8_t>((K + 32) * kLanes), std::vector<int32_t>(K / 16 * kLanes),
          std::vector<float>(K / 32 * kLanes), std::vector<float>(K / 16 * kLanes)};
  for (int64_t n = p0 * kLanes; n < std::min(N, p1 * kLanes); n += kLanes) {
    int64_t rows = std::min(kLanes, N - n);
    pack(w + n * row_bytes, row_bytes, rows, K, p);
    for (int64_t m0 = 0; m0 < M; m0 += kCols) {
      PanelOut f[kCols];
      cols(p, a, K, m0, f);
      for (int64_t t = 0; t < std::min(kCols, M - m0); t++) store_rows(y + (m0 + t) * N + n, f[t], rows);
    }
  }
}

template <auto decode, int64_t bytes, int64_t group, int64_t sub>
constexpr PanelFn k_panels_of() {  // none where the instruction set's panels do not pay for this K-quant
  if constexpr (panels_pay(bytes, sub))
    return &panel_range<pack_panel<decode, bytes, group, sub>, panel_cols<bytes, group, sub>>;
  else
    return nullptr;
}
template <auto decode, int64_t bytes, int64_t group, int64_t sub>
constexpr PanelFn k_panels = k_panels_of<decode, bytes, group, sub>();
template <int64_t kind, int64_t bytes>
constexpr PanelFn panels_32 = &panel_range<pack_panel_32<kind, bytes>, panel_cols_32<kind>>;

using RangeFn = decltype(&row_range<rows_k<decode_q6_k, 210>>);

struct Kind {
  int64_t columns, bytes;  // per block
  RangeFn range;
  PanelFn panel;              // none where the instruction set has no panels
  int64_t panel_from = kCols;  // rows of x from which panels pay (measured: 16 for the K-quants, else kCols)
  int64_t split = 0;           // blocks of 32, one row at a time: the activations' quants split in runs of this many
  Bf16RowFn tile = nullptr;    // the rows as bf16 for the tile unit; none without it
};

// Blocks of 32: paired (two blocks' nibbles split at once, the activations' quants split to match; pair32) where
// the kind is a nibble kind and the row's blocks pair up.
template <int64_t kind, int64_t bytes>
Kind kind_32(bool paired) {
  if constexpr (kind != kQ8_0 && kind != kIQ4XS)
    if (paired)
      return {32, bytes, row_range_32<kind, bytes, true>, panels_32<kind, bytes>, kCols, 2, bf16_32<kind, bytes>};
  return {32, bytes, row_range_32<kind, bytes, false>, panels_32<kind, bytes>, kCols,
          kind == kIQ4XS ? kSplitIQ4XS : 0, bf16_32<kind, bytes>};
}

// The kernels of a ggml type, for rows of K columns.
Kind kind_of(int64_t kind, int64_t K) {
  bool paired = K % 64 == 0;
  switch (kind) {
    case kQ4_0: return kind_32<kQ4_0, 18>(paired);
    case kQ4_1: return kind_32<kQ4_1, 20>(paired);
    case kQ5_0: return kind_32<kQ5_0, 22>(paired);
    case kQ5_1: return kind_32<kQ5_1, 24>(paired);
    case kQ8_0: return kind_32<kQ8_0, 34>(paired);
    case kIQ4NL: return kind_32<kIQ4NL, 18>(paired);
    case kMXFP4: return kind_32<kMXFP4, 17>(paired);
    case kIQ4XS: return kind_32<kIQ4XS, kIQ4XSBytes / 8>(paired);  // per sub-block
    case kQ2K: return {kBlock, 84, row_range_k<decode_q23_k<false>, 84>,
                          k_panels<decode_q23_k<false>, 84, 16, 16>, 16, 0, bf16_k<decode_q23_k<false>, 84, false>};
    case kQ3K: return {kBlock, 110, row_range_k<decode_q23_k<true>, 110>,
                          k_panels<decode_q23_k<true>, 110, 16, 16>, 16, 0, bf16_k<decode_q23_k<true>, 110, false>};
    case kQ4K: return {kBlock, 144, row_range_k<decode_q45_k<false>, 144>,
                          k_panels<decode_q45_k<false>, 144, 32, 32>, 16, 0,
                          bf16_k<decode_q45_k<false>, 144, kSwapQ45>};
    case kQ5K: return {kBlock, 176, row_range_k<decode_q45_k<true>, 176>,
                          k_panels<decode_q45_k<true>, 176, 32, 32>, 16, 0,
                          bf16_k<decode_q45_k<true>, 176, kSwapQ45>};
    case kQ6K: return {kBlock, 210, row_range_k<decode_q6_k, 210>,
                          k_panels<decode_q6_k, 210, 16, 16>, 16, 0, bf16_k<decode_q6_k, 210, false>};
  }
  TORCH_CHECK(false, "ggml_mm: ggml type ", kind, " is not computed natively");
}

// The activations as the weight's kind computes on them; for the panels (`panels`), padded with rows of zeros to
// a multiple of 8, and the low terms' group sums.
Acts quantize(const float* x, int64_t M, int64_t K, int64_t kind, bool panels, int64_t split) {
  bool k_quant = kind >= kQ2K && kind <= kQ6K, q45 = kind == kQ4K || kind == kQ5K;
  int64_t nb = K / (k_quant ? kBlock : 32), group = q45 ? 32 : 16;
  int64_t rows = panels ? (M + kCols - 1) / kCols * kCols : M;
  Acts a{std::vector<int8_t>(rows * K), std::vector<float>(rows * nb), std::vector<float>(k_quant ? 0 : rows * nb),
         std::vector<float>(panels ? rows * K / group : 0), std::vector<int16_t>(k_quant ? M * K / 16 : 0)};
  at::parallel_for(0, M, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; m++) {
      if (k_quant)
        quantize_row(x + m * K, K, q45 && kSwapQ45, group, a.q.data() + m * K, a.d.data() + m * nb,
                     a.bsum.data() + m * K / 16, panels ? a.low.data() + m * K / group : nullptr);
      else
        quantize_row_32(x + m * K, K, panels ? 0 : split, a.q.data() + m * K,
                        a.d.data() + m * nb, a.s.data() + m * nb);
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
  Kind k = kind_of(kind, x.size(-1));
  int64_t K = x.size(-1), N = raw.size(0), nb = K / k.columns;
  TORCH_CHECK(K % k.columns == 0 && (kind != kIQ4XS || K % kBlock == 0) && raw.dim() == 2 &&
                  raw.size(1) == nb * k.bytes && raw.scalar_type() == at::kByte,
              "ggml_mm: weight of ", raw.sizes(), " bytes does not hold ", K, " columns of type ", kind);
  TORCH_CHECK(raw.is_contiguous(), "ggml_mm: the weight's rows must be contiguous");
  TORCH_CHECK(heads >= 0 && (heads == 0 || N % (2 * heads) == 0), "ggml_mm: ", N, " rows in ", heads, " heads");
  bool plain = x.scalar_type() == at::kFloat && x.is_contiguous();  // else a float copy (ATen calls cost us)
  at::Tensor xf = plain ? x : x.to(at::kFloat).contiguous();
  int64_t M = x.numel() / K;
  auto shape = x.sizes().vec();
  shape.back() = N;
  at::Tensor y = at::empty(shape, xf.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = raw.data_ptr<uint8_t>();
#ifdef AUTOLM_AMX
  if (k.tile && M >= kTileFrom && amx_ready()) {
    std::vector<uint32_t> xa = tile_acts(xf.data_ptr<float>(), M, K);
    at::parallel_for(0, (N + tile_height(K) - 1) / tile_height(K), 1, [&](int64_t lo, int64_t hi) {
      tile_range(k.tile, wp, raw.size(1), lo, hi, N, xa.data(), K, M, yp);
    });
    if (heads) unpermute_heads(yp, M, N, heads);
    return plain ? y : y.to(x.scalar_type());
  }
#endif
  bool panels = k.panel && M >= k.panel_from;
  Acts a = quantize(xf.data_ptr<float>(), M, K, kind, panels, k.split);
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

// Each row r of x (R, K) times its own weight: expert ids[r]'s rows of blocks in raw (E, N, bytes per row) ->
// (R, N); llama.cpp's mul_mat_id, for the experts a mixture-of-experts layer routes each row to. Consecutive
// rows with the same expert (rows sorted by expert: a prompt's) are computed together, each weight row read once
// for all of them; the threads split the (row, weight row) pairs evenly.
at::Tensor ggml_mm_id(const at::Tensor& x, const at::Tensor& raw, const at::Tensor& ids, int64_t kind) {
  Kind k = kind_of(kind, x.size(-1));
  int64_t K = x.size(-1), R = x.numel() / K, E = raw.size(0), N = raw.size(1), nb = K / k.columns;
  TORCH_CHECK(K % k.columns == 0 && (kind != kIQ4XS || K % kBlock == 0) && raw.dim() == 3 &&
                  raw.size(2) == nb * k.bytes && raw.scalar_type() == at::kByte && raw.is_contiguous(),
              "ggml_mm_id: experts of ", raw.sizes(), " bytes do not hold ", K, " columns of type ", kind);
  TORCH_CHECK(ids.numel() == R && ids.scalar_type() == at::kLong, "ggml_mm_id: one expert id (int64) per row");
  at::Tensor xf = x.to(at::kFloat).contiguous(), idc = ids.contiguous();
  const int64_t* e = idc.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; r++) TORCH_CHECK(e[r] >= 0 && e[r] < E, "ggml_mm_id: expert ", e[r], " of ", E);
  Acts a = quantize(xf.data_ptr<float>(), R, K, kind, false, k.split);
  at::Tensor y = at::empty({R, N}, xf.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = raw.data_ptr<uint8_t>();
  int64_t row_bytes = nb * k.bytes, tile = std::clamp<int64_t>((1 << 15) / K, 1, 64);
  at::parallel_for(0, R * N, std::max<int64_t>(16, (1 << 17) / K), [&](int64_t lo, int64_t hi) {
    std::vector<RowOut> out(tile);
    for (int64_t r = lo / N, r1; r * N < hi; r = r1) {
      int64_t n0 = std::max(lo, r * N) - r * N, n1 = std::min(hi, (r + 1) * N) - r * N;
      for (r1 = r + 1; n0 == 0 && n1 == N && r1 < R && e[r1] == e[r] && (r1 + 1) * N <= hi;) r1++;
      for (int64_t m0 = r; m0 < r1; m0 += tile)
        k.range(wp + e[r] * N * row_bytes, row_bytes, n0, n1, nb, a, K, m0, std::min(r1, m0 + tile), out.data(),
                yp, N);
    }
  });
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape).to(x.scalar_type());
}

// From how many rows of x ggml_mm computes on the tile unit (in bf16: ggml_amx.h); 0 where it does not here.
int64_t ggml_tile_rows() {
#ifdef AUTOLM_AMX
  return amx_ready() ? kTileFrom : 0;
#else
  return 0;
#endif
}

at::Tensor ggml_mm_meta(const at::Tensor& x, const at::Tensor& raw, int64_t kind, int64_t heads) {
  auto shape = x.sym_sizes().vec();  // symbolic where a graph is exported for any batch size
  shape.back() = raw.sym_size(0);
  return at::empty_symint(shape, x.options());
}

at::Tensor ggml_mm_id_meta(const at::Tensor& x, const at::Tensor& raw, const at::Tensor& ids, int64_t kind) {
  auto shape = x.sym_sizes().vec();
  shape.back() = raw.sym_size(1);
  return at::empty_symint(shape, x.options());
}

}  // namespace

TORCH_LIBRARY(autolm, m) {
  m.def("ggml_mm(Tensor x, Tensor raw, int kind, int heads=0) -> Tensor");
  m.def("ggml_mm_id(Tensor x, Tensor raw, Tensor ids, int kind) -> Tensor");
  m.def("ggml_tile_rows() -> int", &ggml_tile_rows);
}
TORCH_LIBRARY_IMPL(autolm, CPU, m) {
  m.impl("ggml_mm", &ggml_mm);
  m.impl("ggml_mm_id", &ggml_mm_id);
}
TORCH_LIBRARY_IMPL(autolm, Meta, m) {
  m.impl("ggml_mm", &ggml_mm_meta);
  m.impl("ggml_mm_id", &ggml_mm_id_meta);
}
