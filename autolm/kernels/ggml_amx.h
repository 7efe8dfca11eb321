// Prompts and batches on CPUs with AMX (Intel's tile unit, Sapphire Rapids on), included by ggml_avx512.h: the
// weight decoded to bf16 32-128 rows at a time (its blocks' scales folded in: d * sc * q + low, rounded once), x
// rounded to bf16, and their products summed in float32 in the tile registers over the whole row (tdpbf16ps:
// 16 x 16 x 32 multiply-adds per instruction), the sums never scaled per block. Where the int8 panels computed
// each (sub-)block's integer products and then scaled them in float per row of x, which took most of their time,
// here decoding the weight does: once for all rows of x. Activations in bf16 are closer to x
// than llama.cpp's int8 blocks (8 significant bits each against 8 for the block's largest), the weight within
// bf16's rounding of its dequantized value. Compiled where -march has AMX-BF16 and AVX512-BF16; used where the OS
// lets the process use the tile registers (Linux has each process ask for them once: arch_prctl
// ARCH_REQ_XCOMP_PERM), else the AVX-512 panels.

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__) && defined(__linux__)
#define AUTOLM_AMX 1

constexpr int64_t kTileRows = 16;     // rows of a tile: of x, or of the weight
constexpr int64_t kTilePanel = 32;    // weight rows against two tiles of x at a time (two tiles)
constexpr int64_t kTileFrom = 16;     // rows of x from which the tiles pay

// Whether this process may use the tile registers (asked once: Linux's ARCH_REQ_XCOMP_PERM for XTILEDATA).
inline bool amx_ready() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

// Every tile 16 rows of 64 bytes, per thread for the span of one tile_range: 0..3 the float sums (2 x 2: the
// panel's two 16-row halves by two 16-row tiles of x), 4 and 5 the weight (16 rows of 32 bf16), 6 and 7 x (16
// pairs of columns by 16 rows of x, each pair's two bf16 side by side, as tdpbf16ps reads its second operand).
struct TileScope {
  TileScope() {
    alignas(64) uint8_t cfg[64] = {1};  // palette 1; bytes 16.. the tiles' bytes per row (uint16), 48.. their rows
    for (int t = 0; t < 8; t++) cfg[16 + 2 * t] = 64, cfg[48 + t] = 16;
    asm volatile("" : : "r"(cfg) : "memory");  // GCC does not count ldtilecfg as reading cfg: keep the stores
    _tile_loadconfig(cfg);
  }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// 16 unsigned quants at q (bytes) as floats: d * q + low.
inline __m512 dequant16(__m128i q, float d, float low) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q)), _mm512_set1_ps(d), _mm512_set1_ps(low));
}
inline void store_bf16(uint16_t* out, __m512 first, __m512 second) {  // 32 floats rounded to bf16 (nearest even)
  _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(second, first));
}

// A row of K-quant blocks (K columns) as bf16: each 16 weights d * sc16 * q + low_scale * low16, from the block's
// decoding (KBlock: 64-byte runs of quants in the activations' order, which for Q4_K and Q5_K (kSwapQ45) has the
// 32-column runs 1 and 2 of every 128 swapped), put back in the columns' order.
template <auto decode, int64_t bytes, bool swapped>
void bf16_row_k(const uint8_t* w, int64_t K, uint16_t* out, int64_t step) {
  alignas(64) uint8_t q[256];
  alignas(64) float scale[16], low[16];  // per 16 columns
  for (int64_t b = 0; b < K / kBlock; b++, out += 8 * step) {
    KBlock k;
    prefetch(w + b * bytes, bytes);  // the rows' blocks come one after another: kPrefetch ahead
    decode(w + b * bytes, k);
    for (int i = 0; i < 4; i++) _mm512_store_si512(q + 64 * i, k.q[i]);
    _mm512_store_ps(scale, _mm512_mul_ps(_mm512_set1_ps(k.d), _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(k.sc16))));
    __m512 lows = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(k.low16));
    _mm512_store_ps(low, _mm512_mul_ps(_mm512_set1_ps(k.low_scale), lows));
    for (int i = 0; i < 4; i++)
      for (int half = 0; half < 2; half++) {
        int run = swapped ? 4 * (i / 2) + i % 2 + 2 * half : 2 * i + half;  // its 32 columns' place in the block
        const uint8_t* qs = q + 64 * i + 32 * half;
        store_bf16(out + run * step, dequant16(_mm_load_si128((const __m128i*)qs), scale[2 * run], low[2 * run]),
                   dequant16(_mm_load_si128((const __m128i*)(qs + 16)), scale[2 * run + 1], low[2 * run + 1]));
      }
  }
}

// A row of blocks of 32 (IQ4_XS: of 256, as 8 sub-blocks of 32 with their own scales) as bf16: d * q + low.
template <int64_t kind, int64_t bytes>
void bf16_row_32(const uint8_t* w, int64_t K, uint16_t* out, int64_t step) {
  alignas(32) float ds[8];
  for (int64_t s = 0; s < K / 32; s++, out += step) {
    const uint8_t* b = w + s * bytes;
    float d, low;
    if constexpr (kind == kIQ4XS) {  // sub-block s % 8 of block s / 8
      const uint8_t* blk = w + (s / 8) * kIQ4XSBytes;
      if (s % 8 == 0) _mm256_store_ps(ds, iq4_xs_block_scales(blk));
      b = blk + 8 + 16 * (s % 8), d = ds[s % 8];
    } else {
      d = block_scale<kind>(b);
    }
    if constexpr (kind == kQ4_1 || kind == kQ5_1)
      low = half_at(b + 2);
    else
      low = d * offset_of(kind);
    __m256i q = quants32<kind>(b);
    store_bf16(out, dequant16(_mm256_castsi256_si128(q), d, low), dequant16(_mm256_extracti128_si256(q, 1), d, low));
  }
}

// x (M rows of K floats) for the tiles: rows padded with zeros to a whole number of 16-row tiles; per tile of rows
// and 32 columns (s), 16 pairs of columns by the 16 rows, at ((tile * K / 32) + s) * 256 uint32.
std::vector<uint32_t> tile_acts(const float* x, int64_t M, int64_t K) {
  const int64_t T = (M + kTileRows - 1) / kTileRows, S = K / 32;
  std::vector<uint32_t> out(T * S * 256);
  at::parallel_for(0, T * S, std::max<int64_t>(1, 64 / S), [&](int64_t lo, int64_t hi) {
    alignas(64) uint32_t rows[kTileRows][16];
    for (int64_t i = lo; i < hi; i++) {
      int64_t t = i / S, s = i % S;
      for (int64_t r = 0; r < kTileRows; r++) {
        int64_t m = t * kTileRows + r;
        if (m >= M) {
          _mm512_store_si512(rows[r], _mm512_setzero_si512());
          continue;
        }
        const float* xr = x + m * K + 32 * s;
        _mm512_store_si512(rows[r], (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xr + 16), _mm512_loadu_ps(xr)));
      }
      transpose16(&rows[0][0], 16, out.data() + i * 256);
    }
  });
  return out;
}

// The panel's 32 weight rows (bf16, K apart) times tiles of x at x0 (and, with kTwo, the next tile's at x1) over the
// whole row: c[h][t], weight row 16 h + ... by row ... of tile t (float32).
template <bool kTwo>
__attribute__((always_inline)) inline void tile_sums(const uint16_t* panel, const uint32_t* x0, const uint32_t* x1,
                                                     int64_t K, float (*c)[2][kTileRows][kTileRows]) {
  _tile_zero(0);
  _tile_zero(2);
  if constexpr (kTwo) {
    _tile_zero(1);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < K / 32; s++) {
    _tile_loadd(4, panel + 512 * s, 64);
    _tile_loadd(5, panel + 512 * (K / 32 + s), 64);
    _tile_loadd(6, x0 + s * 256, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if constexpr (kTwo) {
      _tile_loadd(7, x1 + s * 256, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c[0][0], 64);
  _tile_stored(2, c[1][0], 64);
  if constexpr (kTwo) {
    _tile_stored(1, c[0][1], 64);
    _tile_stored(3, c[1][1], 64);
  }
}

// How many weight rows to decode at a time (a multiple of 32): as many as keep them within ~512 KB (of the L2
// cache, with two tiles of x), up to 128, so that x comes from the L3 cache once per so many rows.
inline int64_t tile_height(int64_t K) { return kTilePanel * std::clamp<int64_t>((1 << 19) / (64 * K), 1, 4); }

// Weight rows height p0.. height p1 (of N) times all rows of x (tile_acts' xa, M rows), into y: `height` weight rows
// decoded to bf16, then each 32 of them against two tiles of x at a time, their sums over the whole row kept in
// the tiles.
void tile_range(Bf16RowFn row, const uint8_t* w, int64_t row_bytes, int64_t p0, int64_t p1, int64_t N,
                const uint32_t* xa, int64_t K, int64_t M, float* y) {
  const int64_t S = K / 32, T = (M + kTileRows - 1) / kTileRows, height = tile_height(K);
  std::vector<uint16_t> panel(height * K);
  alignas(64) float c[2][2][kTileRows][kTileRows];
  alignas(64) uint32_t cols[kTileRows][kTileRows];
  TileScope scope;
  for (int64_t n = p0 * height; n < std::min(N, p1 * height); n += height) {
    const int64_t rows = std::min(height, N - n);
    if (rows % kTilePanel) std::fill(panel.begin(), panel.end(), 0);
    for (int64_t r = 0; r < rows; r++)  // row r's 32 columns from 32 s on at (16 (r / 16) K + 512 s + 32 (r % 16))
      row(w + (n + r) * row_bytes, K, panel.data() + kTileRows * (r / kTileRows) * K + 32 * (r % kTileRows), 512);
    for (int64_t t = 0; t < T; t += 2) {
      const uint32_t* x0 = xa + t * S * 256;
      for (int64_t h = 0; h < rows; h += kTilePanel) {
        if (t + 1 < T)
          tile_sums<true>(panel.data() + h * K, x0, x0 + S * 256, K, c);
        else
          tile_sums<false>(panel.data() + h * K, x0, nullptr, K, c);
        for (int q = 0; q < 4; q++) {  // c[i][e]: weight rows (the tile's rows) by rows of x; y wants them crossed
          int64_t n0 = h + kTileRows * (q / 2), m0 = (t + q % 2) * kTileRows;
          if (n0 >= rows || m0 >= M) continue;
          transpose16((const uint32_t*)c[q / 2][q % 2], kTileRows, &cols[0][0]);
          __mmask16 live = (__mmask16)((1u << std::min(kTileRows, rows - n0)) - 1);
          for (int64_t j = 0; j < std::min(kTileRows, M - m0); j++)
            _mm512_mask_storeu_ps(y + (m0 + j) * N + n + n0, live, _mm512_load_ps(cols[j]));
        }
      }
    }
  }
}
#endif
