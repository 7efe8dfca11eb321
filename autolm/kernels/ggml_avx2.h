// ggml_mm.cpp's instructions on CPUs with AVX2, FMA and F16C but not AVX-512 VNNI (included by ggml_mm.cpp, after
// the blocks' shared helpers): 32 bytes of quants at a time, unsigned weight quants times the activations' int8
// quants with vpmaddubsw (pairs summed in int16), then vpmaddwd (by ones, or by the K-quants' integer sub-scales)
// into int32 (with AVX-VNNI: vpdpbusd, vpdpwssd; see dot_u8s8). vpmaddubsw's int16 pair sums would saturate on
// unsigned bytes up to 255 (2 * 255 * 127 > 32767): Q8_0's and the IQ4 types' quants stay signed, their signs
// moved onto the activations (vpsignb), as llama.cpp's AVX2 kernels do. Many rows of x: in panels (below).

// 32 bytes of nibbles at a time: the activations' quants in their natural order, but for IQ4_XS's one-row path
// (two sub-blocks per 32 bytes: see rows_iq4_xs).
constexpr bool kSwapQ45 = false;
constexpr int64_t kSplitIQ4XS = 2;
// One row of x: blocks of 32 two weight rows at a time, a group_32 (8 blocks) of each in turn (row_range_32).
constexpr int64_t kTwoRows32 = 8;

// acc plus u's unsigned bytes times s's signed bytes, 4 products summed per int32 lane; acc plus a's and b's int16
// products, 2 summed per lane. With AVX-VNNI (Intel's cores from Alder Lake on, without AVX-512) one instruction
// each, vpdpbusd and vpdpwssd; else vpmaddubsw, vpmaddwd (by ones) and vpaddd, which give the same sums where
// vpmaddubsw's int16 pairs do not saturate (as in every use here).
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#ifdef __AVXVNNI__
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
inline __m256i dot_s16(__m256i acc, __m256i a, __m256i b) {
#ifdef __AVXVNNI__
  return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

inline float hsum(__m256 v) {
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

inline float absmax(const float* x, int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}

inline __m128i quant16(const float* x, float inv, int32_t& sum) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m256 s = _mm256_set1_ps(inv);
  __m256i a = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x), s), kRound));
  __m256i b = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8), s), kRound));
  __m256i t = _mm256_add_epi32(a, b);
  __m128i u = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
  u = _mm_add_epi32(u, _mm_shuffle_epi32(u, 0x4E));
  sum = _mm_cvtsi128_si32(_mm_add_epi32(u, _mm_shuffle_epi32(u, 0xB1)));
  __m128i lo = _mm_packs_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  __m128i hi = _mm_packs_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  return _mm_packs_epi16(lo, hi);  // |values| <= 127: no saturation, natural order
}

struct RowOut {
  __m256 acc;     // the blocks' dot products, scaled
  __m256 accmin;  // the blocks' low terms, scaled
};

float reduce(const RowOut& r) { return hsum(_mm256_add_ps(r.acc, r.accmin)); }

// 32 quants of a block of 32 times 32 int8 activations: 8 int32 sums of 4 products.
template <int64_t kind>
inline __m256i dot32(__m256i q, __m256i x) {
  if constexpr (kSignedQuants<kind>)
    return dot_u8s8(_mm256_setzero_si256(), _mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q));
  else
    return dot_u8s8(_mm256_setzero_si256(), q, x);
}

// MXFP4's scales: the E8M0 byte at byte 0 of each int32 lane of g, as e8m0_half gives it.
inline __m256 e8m0_halves(__m256i g) {
  __m256i e = _mm256_and_si256(g, _mm256_set1_epi32(0xFF));
  __m256i small = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), e);
  __m256i big = _mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23);
  __m256i is_big = _mm256_cmpgt_epi32(e, _mm256_set1_epi32(1));
  return _mm256_castsi256_ps(_mm256_blendv_epi8(small, big, is_big));
}

// The 8 fp16 values in bytes 0..1 of each int32 lane of g, as floats.
inline __m256 halves(__m256i g) {
  const __m256i pick = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4, 5, 8, 9, 12,
                                        13, -1, -1, -1, -1, -1, -1, -1, -1);
  __m256i v = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(g, pick), 0x08);  // 64-bit lanes 0 and 2
  return _mm256_cvtph_ps(_mm256_castsi256_si128(v));
}

// IQ4_XS, a block of 256 (8 sub-blocks) at a time: 32 bytes of nibbles hold two sub-blocks' quants, their low
// nibbles (each sub-block's first 16) one vector and the high ones another, against the activations' quants in
// that order (kSplitIQ4XS); each pair's sums times the two sub-blocks' scales.
__attribute__((always_inline)) inline void rows_iq4_xs(const uint8_t* w, int64_t nb, const Acts& a, int64_t K,
                                                       int64_t m0, int64_t m1, RowOut* out) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  auto pair = [&](const uint8_t* blk, int p, __m256i* q) {  // sub-blocks 2p, 2p + 1
    __m256i v = _mm256_loadu_si256((const __m256i*)(blk + 8 + 32 * p));
    q[0] = _mm256_shuffle_epi8(iq4_values, _mm256_and_si256(v, nib));
    q[1] = _mm256_shuffle_epi8(iq4_values, _mm256_and_si256(_mm256_srli_epi16(v, 4), nib));
  };
  for (int64_t b0 = 0; b0 < nb; b0 += 8, w += kIQ4XSBytes) {
    prefetch(w, kIQ4XSBytes);
    __m256 d = iq4_xs_block_scales(w);
    __m256i q[8];  // many rows of x: the block decoded once
    const bool many = m1 - m0 > 1;
    for (int p = 0; p < 4 && many; p++) pair(w, p, q + 2 * p);
    for (int64_t m = m0; m < m1; m++) {
      const int8_t* x = a.q.data() + m * K + 32 * b0;
      __m256 sc = _mm256_mul_ps(d, _mm256_loadu_ps(a.d.data() + m * (K / 32) + b0));
      __m256 acc[2] = {out[m - m0].acc, _mm256_setzero_ps()};
      for (int p = 0; p < 4; p++) {
        __m256i one[2];
        if (!many) pair(w, p, one);
        const __m256i* qp = many ? q + 2 * p : one;
        __m256i dot = _mm256_add_epi32(dot32<kIQ4XS>(qp[0], _mm256_loadu_si256((const __m256i*)(x + 64 * p))),
                                       dot32<kIQ4XS>(qp[1], _mm256_loadu_si256((const __m256i*)(x + 64 * p + 32))));
        __m256i idx = _mm256_setr_epi32(2 * p, 2 * p, 2 * p, 2 * p, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1);
        acc[p % 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_permutevar8x32_ps(sc, idx), acc[p % 2]);
      }
      out[m - m0].acc = _mm256_add_ps(acc[0], acc[1]);
    }
  }
}

// Two blocks of 32 of a nibble kind at b, in the order the activations' quants take them (split 2): lo,
// both blocks' first 16 quants, hi, both blocks' last 16 (32 bytes of nibbles split once).
template <int64_t kind, int64_t bytes>
inline void pair32(const uint8_t* b, __m256i& lo, __m256i& hi) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)(b + kNibblesAt<kind>))),
                                      _mm_loadu_si128((const __m128i*)(b + bytes + kNibblesAt<kind>)), 1);
  lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
  if constexpr (kind == kQ5_0 || kind == kQ5_1) {
    uint64_t h = pair_fifth_bits<kind, bytes>(b);
    lo = _mm256_or_si256(lo, fifth_bits((uint32_t)h)), hi = _mm256_or_si256(hi, fifth_bits((uint32_t)(h >> 32)));
  }
  if constexpr (kind == kIQ4NL || kind == kMXFP4) {  // the code book's values
    const __m256i values = kind == kIQ4NL ? iq4_values : mxfp4_values;
    lo = _mm256_shuffle_epi8(values, lo), hi = _mm256_shuffle_epi8(values, hi);
  }
}

// A pair's dot products with its 64 activations' quants (x0: the first 16 of each block, x1 the last 16): lanes 0-3
// the first block's, 4-7 the second's. Unsigned nibbles (and fifth bits): both halves' int16 pairs summed before
// one vpmaddwd (2 * 2 * 31 * 127 fits in int16).
template <int64_t kind>
inline __m256i dot64(__m256i lo, __m256i hi, __m256i x0, __m256i x1) {
#ifndef __AVXVNNI__
  if constexpr (!kSignedQuants<kind>)
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1)),
                             _mm256_set1_epi16(1));
#endif
  if constexpr (kSignedQuants<kind>)
    return _mm256_add_epi32(dot32<kind>(lo, x0), dot32<kind>(hi, x1));
  return dot_u8s8(dot_u8s8(_mm256_setzero_si256(), lo, x0), hi, x1);
}

// Blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, MXFP4; IQ4_XS: above), 8 at a time (a group: blocks b0.. of a
// weight row, w at block b0): their scales (and low values) gathered into one vector each, each block's dot products
// times its scale and the activations' (two sums, so that the adds do not wait on each other); the low terms from
// the activations' block sums. kPaired: two blocks per vector of products (pair32, dot64), each lane times its
// block's scale.
template <int64_t kind, int64_t bytes, bool kPaired>
__attribute__((always_inline)) inline void group_32(const uint8_t* w, int64_t b0, int64_t nb, const Acts& a,
                                                    int64_t K, int64_t m0, int64_t m1, RowOut* out) {
  constexpr bool kLow = kind == kQ4_1 || kind == kQ5_1 || offset_of(kind) != 0.0f;
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i at = _mm256_mullo_epi32(lanes, _mm256_set1_epi32((int)bytes));
  prefetch(w, 8 * bytes);
  int64_t n = std::min<int64_t>(8, nb - b0);
  __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), lanes);
  __m256i g = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), (const int*)w, at, live, 1);  // bytes 0..3
  __m256 d = kind == kMXFP4 ? e8m0_halves(g) : halves(g);
  __m256 low = kind == kQ4_1 || kind == kQ5_1 ? halves(_mm256_srli_epi32(g, 16))
                                              : _mm256_mul_ps(d, _mm256_set1_ps(offset_of(kind)));
  __m256i q[8];  // many rows of x: each block decoded once (one row: as it is multiplied, which is faster)
  const bool many = m1 - m0 > 1;
  for (int64_t p = 0; p < n && many; p++) {
    if constexpr (kPaired) {
      if (p % 2 == 0) pair32<kind, bytes>(w + p * bytes, q[p], q[p + 1]);
    } else {
      q[p] = quants32<kind>(w + p * bytes);
    }
  }
  for (int64_t m = m0; m < m1; m++) {
    const int8_t* x = a.q.data() + m * K + 32 * b0;
    __m256 sc = _mm256_mul_ps(d, _mm256_maskload_ps(a.d.data() + m * (K / 32) + b0, live));
    if constexpr (kLow)
      out[m - m0].accmin =
          _mm256_fmadd_ps(low, _mm256_maskload_ps(a.s.data() + m * (K / 32) + b0, live), out[m - m0].accmin);
    __m256 acc[2] = {out[m - m0].acc, _mm256_setzero_ps()};
    for (int64_t p = 0; p < n && kPaired; p += 2) {
      __m256i lo = q[p], hi = q[p + 1];
      if (!many) pair32<kind, bytes>(w + p * bytes, lo, hi);
      __m256i dot = dot64<kind>(lo, hi, _mm256_loadu_si256((const __m256i*)(x + 32 * p)),
                                _mm256_loadu_si256((const __m256i*)(x + 32 * p + 32)));
      __m256 s = _mm256_permutevar8x32_ps(sc, _mm256_setr_epi32(p, p, p, p, p + 1, p + 1, p + 1, p + 1));
      acc[p / 2 % 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[p / 2 % 2]);
    }
    for (int64_t p = 0; p < n && !kPaired; p++) {
      __m256i qp = many ? q[p] : quants32<kind>(w + p * bytes);
      __m256i dot = dot32<kind>(qp, _mm256_loadu_si256((const __m256i*)(x + 32 * p)));
      __m256 s = _mm256_permutevar8x32_ps(sc, _mm256_set1_epi32((int)p));
      acc[p % 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[p % 2]);
    }
    out[m - m0].acc = _mm256_add_ps(acc[0], acc[1]);
  }
}

template <int64_t kind, int64_t bytes, bool kPaired>
__attribute__((always_inline)) inline void rows_32(const uint8_t* w, int64_t nb, const Acts& a, int64_t K,
                                                   int64_t m0, int64_t m1, RowOut* out) {
  if constexpr (kind == kIQ4XS) return rows_iq4_xs(w, nb, a, K, m0, m1, out);
  for (int64_t b0 = 0; b0 < nb; b0 += 8, w += 8 * bytes) group_32<kind, bytes, kPaired>(w, b0, nb, a, K, m0, m1, out);
}

// A decoded K-quant block: the quants as unsigned bytes in natural order, 32 per vector, each int16 lane's
// sub-scale (lane i of vector j: weights 32 j + 2 i and 32 j + 2 i + 1), d, and the low term's integer factors
// per 16 weights with their scale.
struct KBlock {
  __m256i q[8], sc[8];
  __m256i low16;
  float d, low_scale;
};

// Block b of a weight row times rows m0..m1 of the activations, into out: d * the integer dot products, plus
// low_scale * the low term's factors times the activations' sums of 16.
__attribute__((always_inline)) inline void k_block_rows(const KBlock& k, const Acts& a, int64_t K, int64_t b,
                                                        int64_t m0, int64_t m1, RowOut* out) {
  for (int64_t m = m0; m < m1; m++) {
    const int8_t* x = a.q.data() + m * K + b * kBlock;
    __m256i s = _mm256_setzero_si256();
    for (int j = 0; j < 8; j++) {
      __m256i pairs = _mm256_maddubs_epi16(k.q[j], _mm256_loadu_si256((const __m256i*)(x + 32 * j)));
      s = dot_s16(s, pairs, k.sc[j]);
    }
    float dx = a.d[m * (K / kBlock) + b];
    out[m - m0].acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(k.d * dx), out[m - m0].acc);
    out[m - m0].accmin = k_low(a.bsum.data() + m * (K / 16) + b * 16, k.low16, k.low_scale * dx, out[m - m0].accmin);
  }
}

// Sub-scales from 16 int8 ones (s, one per 16 weights) as int16 lanes of 32 weights: `first` for the first 16,
// `second` for the last.
inline __m256i sub_scales(__m128i s, int first, int second) {
  const int64_t ones = 0x0101010101010101;
  return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(s, _mm_set_epi64x(ones * second, ones * first)));
}

// Q4_K: d (fp16), dmin (fp16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles: 32 bytes per 64 weights,
// the low nibbles the first 32 (sub-block 2c), the high ones the last (2c + 1).
// value = d * sc[s] * q - dmin * mn[s] for sub-block s of 32 weights.
// Q5_K (kFive): the same with 32 bytes of fifth bits between the scales and the nibbles: bit 2c of byte l is
// weight 64c + l's (the low nibbles), bit 2c + 1 weight 64c + 32 + l's (the high nibbles).
template <bool kFive>
__attribute__((always_inline)) inline void decode_q45_k(const uint8_t* w, KBlock& k) {
  constexpr int64_t kNibbles = kFive ? 48 : 16;
  const __m256i nib = _mm256_set1_epi8(0x0F);
  __m128i sm = scales_mins_k4(w + 4);  // bytes 0..7: the 8 scales; 8..15: the 8 mins
  __m256i s16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));  // the 8 scales as int16, in both halves
  __m256i qh = kFive ? _mm256_loadu_si256((const __m256i*)(w + 16)) : _mm256_setzero_si256();
  for (int c = 0; c < 4; c++) {
    __m256i v = _mm256_loadu_si256((const __m256i*)(w + kNibbles + 32 * c));
    k.q[2 * c] = _mm256_and_si256(v, nib);
    k.q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
    if constexpr (kFive)  // bit s of each byte moved to bit 4 (the 16-bit shifts carry nothing into it)
      for (int e = 0, s = 2 * c; e < 2; e++, s++) {
        __m256i at4 = s <= 4 ? _mm256_slli_epi16(qh, 4 - s) : _mm256_srli_epi16(qh, s - 4);
        k.q[2 * c + e] = _mm256_or_si256(k.q[2 * c + e], _mm256_and_si256(at4, _mm256_set1_epi8(0x10)));
      }
    for (int e = 0; e < 2; e++)  // sub-block 2c + e's scale in every int16 lane (bytes 2j, 2j + 1 of s16)
      k.sc[2 * c + e] = _mm256_shuffle_epi8(s16, _mm256_set1_epi16((short)(0x0100 + 0x0202 * (2 * c + e))));
  }
  k.low16 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(sm, _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14,
                                                                     14, 15, 15)));
  k.d = half_at(w), k.low_scale = -half_at(w + 2);
}

// Q6_K: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, d (fp16). Per 128 weights h: 64 bytes
// of nibbles l0 (32), l1 (32) and 32 bytes of pairs p: weights 128h + l from l0's low nibbles and p's bits 0-1,
// + 32 from l1's low and bits 2-3, + 64 from l0's high and bits 4-5, + 96 from l1's high and bits 6-7.
// value = d * sc[s] * (q - 32) for sub-block s of 16 weights.
__attribute__((always_inline)) inline void decode_q6_k(const uint8_t* w, KBlock& k) {
  const __m256i nib = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(3);
  __m128i s8 = _mm_loadu_si128((const __m128i*)(w + 192));
  for (int h = 0; h < 2; h++) {
    __m256i l0 = _mm256_loadu_si256((const __m256i*)(w + 64 * h));
    __m256i l1 = _mm256_loadu_si256((const __m256i*)(w + 64 * h + 32));
    __m256i p = _mm256_loadu_si256((const __m256i*)(w + 128 + 32 * h));
    for (int j = 0; j < 4; j++) {
      __m256i low = _mm256_and_si256(j < 2 ? (j ? l1 : l0) : _mm256_srli_epi16(j == 2 ? l0 : l1, 4), nib);
      __m256i high = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(p, 2 * j), two), 4);
      k.q[4 * h + j] = _mm256_or_si256(low, high);
      k.sc[4 * h + j] = sub_scales(s8, 2 * (4 * h + j), 2 * (4 * h + j) + 1);
    }
  }
  k.d = half_at(w + 208), k.low16 = _mm256_cvtepi8_epi16(s8), k.low_scale = -32.0f * k.d;
}

// Q2_K: 16 bytes of 4-bit scales (low nibble) and mins (high nibble) per 16 weights, 64 bytes of 2-bit quants,
// d (fp16), dmin (fp16). Weight 128h + 32j + l (l < 32) is bits 2j, 2j + 1 of byte 32h + l.
// value = d * sc[s] * q - dmin * mn[s].
// Q3_K (kThree): 32 bytes of high bits (bit 4h + j of byte l: weight 128h + 32j + l's), 64 bytes of 2-bit quants
// as Q2_K's, 12 bytes of 6-bit scales (minus 32), d (fp16). value = d * sc[s] * (q + 4 * high - 4).
template <bool kThree>
__attribute__((always_inline)) inline void decode_q23_k(const uint8_t* w, KBlock& k) {
  constexpr int64_t kQuants = kThree ? 32 : 16;
  const __m256i three = _mm256_set1_epi8(3);
  __m128i s8;
  if constexpr (kThree) {
    s8 = _mm_sub_epi8(scales_k3(w + 96), _mm_set1_epi8(32));
    k.low16 = _mm256_cvtepi8_epi16(s8);
    k.d = half_at(w + 108), k.low_scale = -4.0f * k.d;
  } else {
    __m128i s = _mm_loadu_si128((const __m128i*)w), nib = _mm_set1_epi8(0x0F);
    s8 = _mm_and_si128(s, nib);
    k.low16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(s, 4), nib));
    k.d = half_at(w + 80), k.low_scale = -half_at(w + 82);
  }
  __m256i hm = kThree ? _mm256_loadu_si256((const __m256i*)w) : _mm256_setzero_si256();
  for (int h = 0; h < 2; h++) {
    __m256i qs = _mm256_loadu_si256((const __m256i*)(w + kQuants + 32 * h));
    for (int j = 0; j < 4; j++) {
      __m256i q = _mm256_and_si256(_mm256_srli_epi16(qs, 2 * j), three);
      if constexpr (kThree) {  // bit s of each byte moved to bit 2, as Q5_K's to bit 4
        const int s = 4 * h + j;
        __m256i at2 = s <= 2 ? _mm256_slli_epi16(hm, 2 - s) : _mm256_srli_epi16(hm, s - 2);
        q = _mm256_or_si256(q, _mm256_and_si256(at2, _mm256_set1_epi8(4)));
      }
      k.q[4 * h + j] = q;
      k.sc[4 * h + j] = sub_scales(s8, 2 * (4 * h + j), 2 * (4 * h + j) + 1);
    }
  }
}

// Many rows of x (prefill, batches), for the blocks of 32: 8 weight rows at a time (a panel) decoded once, each
// int32 lane one weight row's 4 quants of the same 4 columns (8 rows' blocks decoded, then transposed), and 4
// rows of x against it at a time, their 4 quants broadcast: vpmaddubsw and vpmaddwd per 32 multiply-adds, each
// block's sums scaled once per 8 weight rows (the one-row path converts and scales each block of each row). The
// K-quants' panels sum vpmaddubsw's pairs in int16 over several steps before one vpmaddwd by the sub-scales.
constexpr int64_t kLanes = 8, kCols = 4;

// 8 rows of 8 uint32 (row i at src + stride * i) -> 8 vectors, vector j the rows' element j (at dst + 8 j).
inline void transpose8(const uint32_t* src, int64_t stride, uint32_t* dst) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; i++) r[i] = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i*)(src + stride * i)));
  for (int i = 0; i < 8; i += 2) {  // per 128-bit lane: elements 0, 1 of rows i, i + 1; then 2, 3
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // r[i + e]: element e (low lane) and 4 + e (high lane) of rows i..i + 3
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int e = 0; e < 4; e++) {
    _mm256_storeu_ps((float*)dst + 8 * e, _mm256_permute2f128_ps(r[e], r[4 + e], 0x20));
    _mm256_storeu_ps((float*)dst + 8 * (4 + e), _mm256_permute2f128_ps(r[e], r[4 + e], 0x31));
  }
}

// Blocks of 32 (sub-blocks of IQ4_XS) in a panel: the quants, each block's scale and low value per weight row.
template <int64_t kind, int64_t bytes>
void pack_panel_32(const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t K, Panel& p) {
  alignas(32) uint32_t tile[kLanes][8];  // a block of the 8 rows
  for (int64_t s = 0; s < K / 32; s++) {
    for (int64_t r = 0; r < kLanes; r++) {
      float d = 0.0f, low = 0.0f;
      if (r < rows) {
        const uint8_t* b = w + r * row_bytes + s * bytes;
        if constexpr (kind == kIQ4XS) {  // sub-block s % 8 of block s / 8
          const uint8_t* blk = w + r * row_bytes + (s / 8) * kIQ4XSBytes;
          alignas(32) float ds[8];
          _mm256_store_ps(ds, iq4_xs_block_scales(blk));
          b = blk + 8 + 16 * (s % 8), d = ds[s % 8];
        } else {
          d = block_scale<kind>(b);
        }
        _mm256_store_si256((__m256i*)tile[r], quants32<kind>(b));
        low = kind == kQ4_1 || kind == kQ5_1 ? half_at(b + 2) : d * offset_of(kind);
      } else {  // rows past the weight's end: zeros
        _mm256_store_si256((__m256i*)tile[r], _mm256_setzero_si256());
      }
      p.d[s * kLanes + r] = d, p.low[s * kLanes + r] = low;
    }
    transpose8(&tile[0][0], 8, (uint32_t*)p.q.data() + s * 8 * kLanes);
  }
}

// The panel times rows m0..m0 + 4 of x: f[t], the 8 weight rows' results for row m0 + t.
template <int64_t kind>
__attribute__((always_inline)) inline void panel_cols_32(const Panel& p, const Acts& a, int64_t K, int64_t m0,
                                                         __m256* f) {
  const int8_t* x = a.q.data() + m0 * K;
  const int64_t nb = K / 32;
  for (int t = 0; t < kCols; t++) f[t] = _mm256_setzero_ps();
  for (int64_t s = 0; s < nb; s++) {
    __m256i acc[kCols] = {};
    for (int j = 0; j < 8; j++) {
      __m256i wv = _mm256_loadu_si256((const __m256i*)(p.q.data() + (32 * s + 4 * j) * kLanes));
      __m256i wa = kSignedQuants<kind> ? _mm256_sign_epi8(wv, wv) : wv;
      for (int t = 0; t < kCols; t++) {
        int32_t v;
        std::memcpy(&v, x + t * K + 32 * s + 4 * j, 4);
        __m256i xv = kSignedQuants<kind> ? _mm256_sign_epi8(_mm256_set1_epi32(v), wv) : _mm256_set1_epi32(v);
        acc[t] = dot_u8s8(acc[t], wa, xv);
      }
    }
    __m256 dv = _mm256_loadu_ps(p.d.data() + s * kLanes), lv = _mm256_loadu_ps(p.low.data() + s * kLanes);
    for (int t = 0; t < kCols; t++) {
      __m256 scale = _mm256_mul_ps(dv, _mm256_set1_ps(a.d[(m0 + t) * nb + s]));
      f[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), scale, f[t]);
      f[t] = _mm256_fmadd_ps(lv, _mm256_set1_ps(a.s[(m0 + t) * nb + s]), f[t]);
    }
  }
}

// K-quants in a panel: each row's block decoded (natural order), then transposed; d, the low terms' factors and
// each sub-block's scale per weight row, the scale in both int16 halves of an int32 (for vpmaddwd).
template <auto decode, int64_t bytes, int64_t group, int64_t sub>
void pack_panel(const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t K, Panel& p) {
  constexpr int64_t nsub = kBlock / sub, ngroup = kBlock / group;
  alignas(32) uint32_t tile[kLanes][64];  // a block of the 8 rows, decoded
  alignas(32) int16_t scs[8][16], low16[16];
  for (int64_t b = 0; b < K / kBlock; b++) {
    for (int64_t r = 0; r < kLanes; r++) {
      KBlock k{};
      if (r < rows) decode(w + r * row_bytes + b * bytes, k);  // rows past the weight's end: zeros
      for (int j = 0; j < 8; j++) {
        _mm256_store_si256((__m256i*)(tile[r] + 8 * j), k.q[j]);
        _mm256_store_si256((__m256i*)scs[j], k.sc[j]);
      }
      _mm256_store_si256((__m256i*)low16, k.low16);
      p.d[b * kLanes + r] = k.d;
      for (int64_t g = 0; g < ngroup; g++) p.low[(b * ngroup + g) * kLanes + r] = k.low_scale * low16[g * group / 16];
      for (int64_t s = 0; s < nsub; s++) {  // lane i of vector j: weights 32 j + 2 i, + 1
        uint16_t sc = (uint16_t)scs[s * sub / 32][s * sub % 32 / 2];
        p.sc[(b * nsub + s) * kLanes + r] = (int32_t)(sc | (uint32_t)sc << 16);
      }
    }
    uint32_t* pq = (uint32_t*)p.q.data() + b * 64 * kLanes;
    for (int c = 0; c < 64; c += 8) transpose8(&tile[0][c], 64, pq + c * kLanes);
  }
}

// How many steps of 4 columns sum in int16 (vpmaddubsw's pairs, at most 2 * 127 * the largest quant each) without
// overflowing, for the K-quant of `bytes` per block (its largest quant: Q2_K 3, Q3_K 7, Q4_K 15, Q5_K 31, Q6_K 63),
// within a sub-block of `sub` columns.
constexpr int64_t int16_steps(int64_t bytes, int64_t sub) {
  int64_t top = bytes == 84 ? 3 : bytes == 110 ? 7 : bytes == 144 ? 15 : bytes == 176 ? 31 : 63;
  return std::min<int64_t>(sub / 4, 32767 / (2 * 127 * top));
}

// The K-quant panel times rows m0..m0 + 4 of x: per run of int16_steps steps of 4 columns the products summed in
// int16, then by vpmaddwd times their sub-block's scales into int32; each block's sums in float times d and the
// activations' scale; the low terms as float factors times the activations' group sums.
template <int64_t bytes, int64_t group, int64_t sub>
__attribute__((always_inline)) inline void panel_cols(const Panel& p, const Acts& a, int64_t K, int64_t m0,
                                                      __m256* f) {
  constexpr int64_t nsub = kBlock / sub, steps = int16_steps(bytes, sub);
  const int64_t nb = K / kBlock;
  const int8_t* x = a.q.data() + m0 * K;
  for (int t = 0; t < kCols; t++) f[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    __m256i s1[kCols] = {};
    for (int64_t s = 0; s < nsub; s++) {
      __m256i scv = _mm256_loadu_si256((const __m256i*)(p.sc.data() + (b * nsub + s) * kLanes));
      for (int64_t k0 = b * kBlock + s * sub; k0 < b * kBlock + (s + 1) * sub; k0 += 4 * steps) {
        __m256i acc[kCols] = {};
        for (int64_t k = k0; k < k0 + 4 * steps; k += 4) {
          __m256i wv = _mm256_loadu_si256((const __m256i*)(p.q.data() + k * kLanes));
          for (int t = 0; t < kCols; t++) {
            int32_t v;
            std::memcpy(&v, x + t * K + k, 4);
            acc[t] = _mm256_add_epi16(acc[t], _mm256_maddubs_epi16(wv, _mm256_set1_epi32(v)));
          }
        }
        for (int t = 0; t < kCols; t++) s1[t] = dot_s16(s1[t], acc[t], scv);
      }
    }
    __m256 dv = _mm256_loadu_ps(p.d.data() + b * kLanes);
    for (int t = 0; t < kCols; t++)
      f[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1[t]), _mm256_mul_ps(dv, _mm256_set1_ps(a.d[(m0 + t) * nb + b])),
                             f[t]);
  }
  const int64_t nl = K / group;
  for (int64_t i = 0; i < nl; i++) {
    __m256 lv = _mm256_loadu_ps(p.low.data() + i * kLanes);
    for (int t = 0; t < kCols; t++) f[t] = _mm256_fmadd_ps(lv, _mm256_set1_ps(a.low[(m0 + t) * nl + i]), f[t]);
  }
}

// The panels' results for one row of x (kLanes floats), and how they are stored for the weight's first `rows`.
using PanelOut = __m256;
inline void store_rows(float* y, __m256 f, int64_t rows) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  _mm256_maskstore_ps(y, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)rows), lanes), f);
}

// One core, 2048 x 2048, ns per block of 256 weights and row of x, one-row path -> panels: 64 rows: Q4_K 5.0 -> 3.2,
// Q5_K 4.8 -> 3.3, Q2_K 4.6 -> 3.9, Q3_K 5.1 -> 4.2, Q6_K 4.7 -> 4.6; 16 rows: Q4_K 4.8 -> 4.0, Q6_K 4.8 -> 6.3. Q6_K,
// whose int16 sums span only 2 steps, keeps the one-row path.
constexpr bool panels_pay(int64_t bytes, int64_t sub) { return int16_steps(bytes, sub) >= 4; }
