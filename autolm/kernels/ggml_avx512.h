// ggml_mm.cpp's instructions on CPUs with AVX-512 VNNI (included by ggml_mm.cpp, after the blocks' shared
// helpers): one row of x at a time 64 bytes of quants per instruction (vpdpbusd on unsigned bytes; K-quants
// vpmaddubsw, then vpdpwssd with the sub-scales), many rows in panels.

// 64 bytes of nibbles at a time: the activations' quants in their order (see Acts).
constexpr bool kSwapQ45 = true;
constexpr int64_t kSplitIQ4XS = 4;
// One row of x: blocks of 32 one weight row at a time (two at a time measured 8-10% slower here; see row_range_32).
constexpr int64_t kTwoRows32 = 0;

inline float absmax(const float* x, int64_t n) {
  __m512 m = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
  return _mm512_reduce_max_ps(m);
}

inline __m128i quant16(const float* x, float inv, int32_t& sum) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  __m512i v = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x), _mm512_set1_ps(inv)), kRound));
  sum = _mm512_reduce_add_epi32(v);
  return _mm512_cvtsepi32_epi8(v);
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

struct RowOut {
  __m512 acc;     // the blocks' dot products, scaled
  __m256 accmin;  // the K-quant blocks' low terms, scaled
};

inline __m512 iq4_xs_scales(const uint8_t* w, int64_t n) {
  __m256 second = n > 8 ? iq4_xs_block_scales(w + kIQ4XSBytes) : _mm256_setzero_ps();
  return _mm512_insertf32x8(_mm512_castps256_ps512(iq4_xs_block_scales(w)), second, 1);
}

// MXFP4's scales: the E8M0 byte at byte 0 of each int32 lane of g, as e8m0_half gives it.
inline __m512 e8m0_halves(__m512i g) {
  __m512i e = _mm512_and_si512(g, _mm512_set1_epi32(0xFF));
  __m512i small = _mm512_sllv_epi32(_mm512_set1_epi32(0x00200000), e);
  __m512i big = _mm512_slli_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(1)), 23);
  __mmask16 is_big = _mm512_cmpge_epi32_mask(e, _mm512_set1_epi32(2));
  return _mm512_castsi512_ps(_mm512_mask_blend_epi32(is_big, small, big));
}

// Two blocks of 32 of a nibble kind at b, in the order the activations' quants take them (split 2):
// both blocks' first 16 quants, then both blocks' last 16: 32 bytes of nibbles split once into 64 quants.
template <int64_t kind, int64_t bytes>
inline __m512i pair32(const uint8_t* b) {
  constexpr int64_t at = kNibblesAt<kind>;
  __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)(b + at))),
                                      _mm_loadu_si128((const __m128i*)(b + bytes + at)), 1);
  __m512i q = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1),
                               _mm512_set1_epi8(0x0F));
  if constexpr (kind == kQ5_0 || kind == kQ5_1)
    q = _mm512_or_si512(q, _mm512_maskz_mov_epi8(pair_fifth_bits<kind, bytes>(b), _mm512_set1_epi8(0x10)));
  if constexpr (kind == kIQ4NL || kind == kMXFP4)  // the code book's values
    q = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm256_castsi256_si128(kind == kIQ4NL ? iq4_values : mxfp4_values)),
                            q);
  return q;
}

// Bytes 0..3 of the n <= 16 blocks of `bytes` at w, one per int32 lane (0 beyond n): 16 loads and inserts, where
// AMD's Zen 4 gathers slowly (576-column rows of Q5_0, Q8_0, Q4_1 from memory, one row of x: 15-17% less time
// than with vpgatherdd, measured in one process against the gathering build; on Intel's cores the gather stays:
// rows_32's kGather).
template <int64_t bytes>
__attribute__((always_inline)) inline __m512i first_words(const uint8_t* w, int64_t n) {
  auto word = [&](int l) {
    uint32_t v = 0;
    if (l < n) std::memcpy(&v, w + l * bytes, 4);
    return (int)v;
  };
  __m128i part[4];
  for (int j = 0; j < 4; j++)
    part[j] = _mm_insert_epi32(_mm_insert_epi32(_mm_insert_epi32(_mm_cvtsi32_si128(word(4 * j)), word(4 * j + 1), 1),
                                                word(4 * j + 2), 2),
                               word(4 * j + 3), 3);
  __m512i g = _mm512_castsi128_si512(part[0]);
  g = _mm512_inserti32x4(g, part[1], 1);
  g = _mm512_inserti32x4(g, part[2], 2);
  return _mm512_inserti32x4(g, part[3], 3);
}

// Blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, MXFP4; IQ4_XS's sub-blocks), 16 at a time: their scales (and low
// values) gathered into one vector each, then two blocks per vpdpbusd of the unsigned quants with the activations'
// int8 quants, each int32 lane times its block's scale; the low terms from the activations' block sums. kPaired:
// the two blocks' quants interleaved by halves (pair32; for nibble kinds where the row's blocks pair up), else
// one block per 256-bit half.
template <int64_t kind, int64_t bytes, bool kPaired, bool kGather = true>
__attribute__((always_inline)) inline void rows_32(const uint8_t* w, int64_t nb, const Acts& a, int64_t K,
                                                   int64_t m0, int64_t m1, RowOut* out) {
  const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                        _mm512_set1_epi32((int)bytes));
  __m512i q[8], halves[8];
  for (int p = 0; p < 8; p++)  // each int32 lane's block (its sub-block for IQ4_XS: 4 per vector, see quants)
    for (int l = 0; l < 16; l++)
      ((int32_t*)&halves[p])[l] = kind == kIQ4XS ? 4 * (p / 2) + l / 4 : kPaired ? 2 * p + l / 4 % 2 : 2 * p + (l >= 8);
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
      __m512i g = kGather ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, at, w, 1)
                          : first_words<bytes>(w, n);  // bytes 0..3 of each block
      d = kind == kMXFP4 ? e8m0_halves(g) : _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
      if constexpr (kind == kQ4_1 || kind == kQ5_1)
        low = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16)));
      for (int64_t p = 0; 2 * p < n; p++) {
        if constexpr (kPaired) {
          q[p] = pair32<kind, bytes>(w + 2 * p * bytes);
          continue;
        }
        __m256i second = 2 * p + 1 < n ? quants32<kind>(w + (2 * p + 1) * bytes) : _mm256_setzero_si256();
        q[p] = _mm512_inserti64x4(_mm512_castsi256_si512(quants32<kind>(w + 2 * p * bytes)), second, 1);
      }
    }
    if constexpr (kind != kQ4_1 && kind != kQ5_1)
      low = _mm512_mul_ps(d, _mm512_set1_ps(offset_of(kind)));
    for (int64_t m = m0; m < m1; m++) {
      const int8_t* x = a.q.data() + m * K + 32 * b0;
      __m512 sc = _mm512_mul_ps(d, _mm512_maskz_loadu_ps(live, a.d.data() + m * (K / 32) + b0));
      auto pair = [&](int64_t p, __m512 acc) {  // blocks 2p and 2p + 1 (if any) times x, scaled, added to acc
        __m512i xv = 2 * p + 1 < n ? _mm512_loadu_si512(x + 64 * p)
                                   : _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i*)(x + 64 * p)));
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[p], xv);
        return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(halves[p], sc), acc);
      };
      // two chains of additions (one would wait on each one's latency), in two named registers: an array indexed
      // by p % 2 went through the stack, each addition waiting on a store and a load (Zen 4, one row of x:
      // 576-column Q4_1 / Q5_0 / Q8_0 rows 0.86-0.92x the time, Q4_0 at 2048 columns 0.91-0.92x)
      __m512 even = _mm512_fmadd_ps(low, _mm512_maskz_loadu_ps(live, a.s.data() + m * (K / 32) + b0), out[m - m0].acc);
      __m512 odd = _mm512_setzero_ps();
      for (int64_t p = 0; 2 * p < n; p += 2) {
        even = pair(p, even);
        if (2 * p + 2 < n) odd = pair(p + 1, odd);
      }
      out[m - m0].acc = _mm512_add_ps(even, odd);
    }
  }
}

// A decoded K-quant block: the quants as unsigned bytes in the order of the activations' quants, each int16
// lane's sub-scale, d, and per 16 weights in the columns' order the sub-scale (sc16) and the low term's integer
// factor (low16), with its scale.
struct KBlock {
  __m512i q[4], sc[4];
  __m256i sc16, low16;
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
    out[m - m0].accmin = k_low(a.bsum.data() + m * (K / 16) + b * 16, k.low16, k.low_scale * dx, out[m - m0].accmin);
  }
}

// Q4_K: d (fp16), dmin (fp16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles.
// value = d * sc[s] * q - dmin * mn[s] for sub-block s of 32 weights.
// Q5_K (kFive): the same with 32 bytes of fifth bits between the scales and the nibbles: bit 2j of byte l is
// weight 64j + l's (the low nibbles), bit 2j + 1 weight 64j + 32 + l's (the high nibbles).
const __m256i min_idx = _mm256_setr_epi16(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
const __m256i scale_idx = _mm256_sub_epi16(min_idx, _mm256_set1_epi16(8));
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
  __m512i sm = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(scales_mins_k4(w + 4)));  // the 8 scales, the 8 mins
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
  k.sc16 = _mm256_permutexvar_epi16(scale_idx, _mm512_castsi512_si256(sm));
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
  k.d = half_at(w + 208), k.sc16 = k.low16 = sc16, k.low_scale = -32.0f * k.d;
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
    sc16 = _mm256_sub_epi16(_mm256_cvtepu8_epi16(scales_k3(w + 96)), _mm256_set1_epi16(32));
    k.low16 = sc16;
    k.d = half_at(w + 108), k.low_scale = -4.0f * k.d;
  } else {
    __m128i s = _mm_loadu_si128((const __m128i*)w), nib = _mm_set1_epi8(0x0F);
    sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(s, nib));
    k.low16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(s, 4), nib));
    k.d = half_at(w + 80), k.low_scale = -half_at(w + 82);
  }
  __m512i sm = _mm512_castsi256_si512(sc16);
  k.sc16 = sc16;
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

float reduce(const RowOut& r) {
  __m256 s = _mm256_add_ps(r.accmin, _mm256_add_ps(_mm512_castps512_ps256(r.acc), _mm512_extractf32x8_ps(r.acc, 1)));
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
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
// Packing a panel reads its 16 weight rows side by side, a block of each at a time; asking for the bytes 512 ahead in
// each row (256 alike, 1024 slower) took a 1.1B model's 32-token forward from 194 to 170 ms for Q8_0 and 238 to
// 204 ms for Q4_K_M (2 threads).
constexpr int64_t kPanelPrefetch = 512;

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
      const uint8_t* block = w + r * row_bytes + b * bytes;
      for (int64_t at = 0; at < bytes; at += 64) _mm_prefetch((const char*)(block + kPanelPrefetch + at), _MM_HINT_T0);
      decode(block, k);
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

// The K-quants' low terms of rows m0..m0 + rows of x, added to f: the panel's factors per group of columns (`nl` of
// them) times the rows' group sums.
template <int rows>
__attribute__((always_inline)) inline void add_low_terms(const Panel& p, const Acts& a, int64_t nl, int64_t m0,
                                                         __m512* f) {
  for (int64_t i = 0; i < nl; i++) {
    __m512 lv = _mm512_loadu_ps(p.low.data() + i * kLanes);
    for (int t = 0; t < rows; t++) f[t] = _mm512_fmadd_ps(lv, _mm512_set1_ps(a.low[(m0 + t) * nl + i]), f[t]);
  }
}

// The panel times rows m0..m0 + 8 of x: f[t], the 16 weight rows' results for row m0 + t.
template <int64_t bytes, int64_t group, int64_t sub>
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
  add_low_terms<kCols>(p, a, K / group, m0, f);
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
        if (s == s0) _mm_prefetch((const char*)(b + kPanelPrefetch), _MM_HINT_T0);
        if constexpr (kind == kIQ4XS) {  // sub-block s % 8 of block s / 8
          const uint8_t* blk = w + r * row_bytes + (s / 8) * kIQ4XSBytes;
          alignas(32) float ds[8];
          _mm256_store_ps(ds, iq4_xs_block_scales(blk));
          b = blk + 8 + 16 * (s % 8), d = ds[s % 8];
        } else {
          d = block_scale<kind>(b);
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
template <int64_t kind>  // every kind alike: unsigned bytes
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

// The panels' results for one row of x (kLanes floats), and how they are stored for the weight's first `rows`.
using PanelOut = __m512;
inline void store_rows(float* y, __m512 f, int64_t rows) {
  _mm512_mask_storeu_ps(y, (__mmask16)((1u << rows) - 1), f);
}
constexpr bool panels_pay(int64_t, int64_t) { return true; }  // every K-quant (see panel_from)

#include "ggml_amx.h"
