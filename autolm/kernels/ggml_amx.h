// The panels' products on CPUs with AMX (Intel's tile unit, Sapphire Rapids on), included by ggml_avx512.h: 16 rows
// of x at a time against a panel, each block's (or K-quant sub-block's) integer dot products for the 16 rows and the
// panel's 16 weight rows in one instruction (tdpbsud: the activations' signed quants times the panel's unsigned
// ones, whose groups of 4 columns are already laid out as the tile unit reads them), then scaled as the AVX-512
// panels scale theirs. A block of 32 against 16 rows: 8192 multiply-adds in one instruction where vpdpbusd does 64;
// the scaling after it now takes most of the time, and packing the panels (reading the weights) more. Measured here,
// 2 threads, a 1.1B model's forward, AVX-512 panels -> tiles: Q8_0, 32 tokens 207 -> 185 ms, 512 tokens 2.48 -> 2.20
// s; Q4_K_M, 32 tokens 271 -> 246 ms, 512 tokens 2.85 -> 2.45 s (before the prefetch of ggml_avx512.h's packing and
// the per-block sums below). Compiled where -march has AMX-INT8; used where the OS lets the process use the tile
// registers (Linux has each process ask for them once: arch_prctl ARCH_REQ_XCOMP_PERM), else the AVX-512 panels.

#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__linux__)
#define AUTOLM_AMX 1

constexpr int64_t kTileRows = 16;  // rows of x per tile

// Whether this process may use the tile registers (asked once: Linux's ARCH_REQ_XCOMP_PERM for XTILEDATA).
inline bool amx_ready() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

// The tile registers' shapes, per thread for the span of one panel_range: tiles 0 and 1 the int32 products (16
// rows of x by the panel's 16 weight rows), 2 and 3 the activations (16 rows of `sub` quants), 4 and 5 the
// panel's quants (sub / 4 groups of 4 columns by 16 weight rows).
struct TileScope {
  explicit TileScope(int64_t sub) {
    alignas(64) uint8_t cfg[64] = {1};  // palette 1; bytes 16.. the tiles' bytes per row (uint16), 48.. their rows
    for (int t = 0; t < 2; t++) {
      cfg[16 + 2 * t] = 64, cfg[48 + t] = 16;
      cfg[16 + 2 * (2 + t)] = (uint8_t)sub, cfg[48 + 2 + t] = 16;
      cfg[16 + 2 * (4 + t)] = 64, cfg[48 + 4 + t] = (uint8_t)(sub / 4);
    }
    asm volatile("" : : "r"(cfg) : "memory");  // GCC does not count ldtilecfg as reading cfg: keep the stores
    _tile_loadconfig(cfg);
  }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// Two runs of `sub` columns at k0 and k1 (rows x..x + 16, K apart) times the panel: c[0], c[1], each 16 rows of x
// by 16 weight rows of int32.
template <int64_t sub>
__attribute__((always_inline)) inline void tile_dots(const Panel& p, const int8_t* x, int64_t K, int64_t k0,
                                                     int64_t k1, int32_t (*c)[16][16]) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_loadd(2, x + k0, K);
  _tile_loadd(4, p.q.data() + k0 * kLanes, 64);
  _tile_loadd(3, x + k1, K);
  _tile_loadd(5, p.q.data() + k1 * kLanes, 64);
  _tile_dpbsud(0, 2, 4);
  _tile_dpbsud(1, 3, 5);
  _tile_stored(0, c[0], 64);
  _tile_stored(1, c[1], 64);
}

// panel_cols_32 for 16 rows of x (m0..m0 + 16), two blocks at a time (a last odd block computed twice, counted
// once).
template <int64_t kind>
__attribute__((always_inline)) inline void tile_cols_32(const Panel& p, const Acts& a, int64_t K, int64_t m0,
                                                        __m512* f) {
  const int8_t* x = a.q.data() + m0 * K;
  const int64_t nb = K / 32;
  alignas(64) int32_t c[2][16][16];
  for (int t = 0; t < kTileRows; t++) f[t] = _mm512_setzero_ps();
  for (int64_t s = 0; s < nb; s += 2) {
    tile_dots<32>(p, x, K, 32 * s, 32 * std::min(s + 1, nb - 1), c);
    for (int64_t j = 0; j < std::min<int64_t>(2, nb - s); j++) {
      __m512 dv = _mm512_loadu_ps(p.d.data() + (s + j) * kLanes);
      __m512 lv = _mm512_loadu_ps(p.low.data() + (s + j) * kLanes);
      for (int t = 0; t < kTileRows; t++) {
        __m512 scale = _mm512_mul_ps(dv, _mm512_set1_ps(a.d[(m0 + t) * nb + s + j]));
        f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c[j][t])), scale, f[t]);
        f[t] = _mm512_fmadd_ps(lv, _mm512_set1_ps(a.s[(m0 + t) * nb + s + j]), f[t]);
      }
    }
  }
}

// panel_cols for 16 rows of x: each sub-block's products times its integer scale, summed in float per block, times
// the block's d and the activations' block scale (two multiplies per sub-block and row where scaling each
// sub-block's sums by all three took four: a 1.1B model's 32-token forward, Q6_K 282 -> 258 ms, Q4_K_M 208 -> 197);
// then the low terms.
template <int64_t bytes, int64_t group, int64_t sub>
__attribute__((always_inline)) inline void tile_cols(const Panel& p, const Acts& a, int64_t K, int64_t m0,
                                                     __m512* f) {
  constexpr int64_t nsub = kBlock / sub;
  const int64_t nb = K / kBlock;
  const int8_t* x = a.q.data() + m0 * K;
  alignas(64) int32_t c[2][16][16];
  for (int t = 0; t < kTileRows; t++) f[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    __m512 h[kTileRows];  // the block's sums, each sub-block's times its scale
    for (int t = 0; t < kTileRows; t++) h[t] = _mm512_setzero_ps();
    for (int64_t s = 0; s < nsub; s += 2) {
      int64_t k0 = b * kBlock + s * sub;
      tile_dots<sub>(p, x, K, k0, k0 + sub, c);
      for (int64_t j = 0; j < 2; j++) {
        __m512 scale = _mm512_cvtepi32_ps(_mm512_loadu_si512(p.sc.data() + (b * nsub + s + j) * kLanes));
        for (int t = 0; t < kTileRows; t++)
          h[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c[j][t])), scale, h[t]);
      }
    }
    __m512 dv = _mm512_loadu_ps(p.d.data() + b * kLanes);
    for (int t = 0; t < kTileRows; t++)
      f[t] = _mm512_fmadd_ps(h[t], _mm512_mul_ps(dv, _mm512_set1_ps(a.d[(m0 + t) * nb + b])), f[t]);
  }
  add_low_terms<kTileRows>(p, a, K / group, m0, f);
}
#endif
