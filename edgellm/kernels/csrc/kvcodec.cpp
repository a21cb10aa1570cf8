// Quantize-on-store for packed KV caches (edgellm/kv/codec.py `quantize`) and the Walsh-Hadamard rotation of keys
// (`hadamard`), natively. In PyTorch, quantizing a 4K-token prefill took 14-136 ms per layer in a dozen passes over
// temporaries; here each group is read once and written once.
//
// Bit-exact with the PyTorch reference: the same fp32 operations in the same order (no reciprocal, no fused
// multiply-add: neither subtract-then-divide nor a butterfly leaves one to contract), round half to even
// (nearbyint under the default rounding mode, as torch.round), and fp16 zeros/scales rounded to nearest-even then
// stepped one ulp down (zeros) or up (scales) when the rounding went the wrong way.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <c10/util/Half.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <climits>
#include <tuple>
#include <sys/uio.h>
#include <unistd.h>
#include <vector>

#include "kvcodec.h"

namespace {

using kvcodec::code_of;
using kvcodec::group_grid;

// Per-token groups: x (rows, D) → data (rows, D * bits / 8), scales/zeros (rows, D / group).
void quantize_rows(const float* x, int64_t rows, int64_t D, int bits, int64_t group, uint8_t* data, uint16_t* sc,
                   uint16_t* ze) {
  const int64_t G = D / group, width = D * bits / 8;
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> codes(D);
    for (int64_t r = r0; r < r1; ++r)
      kvcodec::quantize_row(x + r * D, D, bits, group, codes.data(), data + r * width, sc + r * G, ze + r * G);
  });
}

// Per-channel groups along tokens: x (slices, T, D) → data (slices, T * bits / 8, D), scales/zeros (slices,
// T / group, D); byte row t * bits / 8 holds tokens of one channel lowest bits first.
void quantize_channels(const float* x, int64_t slices, int64_t T, int64_t D, int bits, int64_t group,
                       uint8_t* data, uint16_t* sc, uint16_t* ze) {
  const int levels = (1 << bits) - 1, per = 8 / bits;
  const int64_t G = T / group;
  at::parallel_for(0, slices * G, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> lo(D), hi(D), zero(D), step(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t s = i / G, g = i % G;
      const float* block = x + (s * T + g * group) * D;
      std::copy(block, block + D, lo.begin());
      std::copy(block, block + D, hi.begin());
      for (int64_t t = 1; t < group; ++t)
        for (int64_t d = 0; d < D; ++d) lo[d] = std::min(lo[d], block[t * D + d]), hi[d] = std::max(hi[d], block[t * D + d]);
      uint16_t* zrow = ze + (s * G + g) * D;
      uint16_t* srow = sc + (s * G + g) * D;
      for (int64_t d = 0; d < D; ++d) group_grid(lo[d], hi[d], levels, zrow + d, srow + d, &zero[d], &step[d]);
      uint8_t* out = data + (s * T + g * group) * bits / 8 * D;
      for (int64_t r = 0; r < group / per; ++r)
        for (int64_t d = 0; d < D; ++d) {
          uint8_t byte = 0;
          for (int j = 0; j < per; ++j)
            byte |= code_of(block[(r * per + j) * D + d], zero[d], step[d], levels) << (j * bits);
          out[r * D + d] = byte;
        }
    }
  });
}

// codec.quantize of fp32 x along its last dim (channel_groups false) or its second-to-last (true).
std::vector<torch::Tensor> quantize_packed(const torch::Tensor& x, int64_t bits, int64_t group, bool channel_groups) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() >= 2,
              "quantize_packed: x must be contiguous fp32 with at least 2 dims");
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 2, "quantize_packed: 8, 4 or 2 bits");
  const int64_t D = x.size(-1), T = x.size(-2), per = 8 / bits, n = channel_groups ? T : D;
  TORCH_CHECK(group > 0 && n % group == 0 && group % per == 0, "quantize_packed: group ", group, " must divide ", n,
              " and be a multiple of ", per);
  auto data_shape = x.sizes().vec(), scale_shape = x.sizes().vec();
  data_shape[x.dim() - (channel_groups ? 2 : 1)] = n * bits / 8;
  scale_shape[x.dim() - (channel_groups ? 2 : 1)] = n / group;
  auto data = torch::empty(data_shape, x.options().dtype(torch::kUInt8));
  auto scales = torch::empty(scale_shape, x.options().dtype(torch::kHalf));
  auto zeros = torch::empty(scale_shape, x.options().dtype(torch::kHalf));
  if (x.numel() == 0) return {data, scales, zeros};
  auto* sc = reinterpret_cast<uint16_t*>(scales.data_ptr<at::Half>());
  auto* ze = reinterpret_cast<uint16_t*>(zeros.data_ptr<at::Half>());
  if (channel_groups)
    quantize_channels(x.data_ptr<float>(), x.numel() / (T * D), T, D, static_cast<int>(bits), group,
                      data.data_ptr<uint8_t>(), sc, ze);
  else
    quantize_rows(x.data_ptr<float>(), x.numel() / D, D, static_cast<int>(bits), group, data.data_ptr<uint8_t>(),
                  sc, ze);
  return {data, scales, zeros};
}

// codec.quantize of fp32 x (B, H, n, D) along head_dim, written straight into a cache's (B, H, n, width) views of
// codes and scales/zeros (rows contiguous within each (batch, head)): no temporaries, no copies.
void quantize_into(const torch::Tensor& x, const torch::Tensor& data, const torch::Tensor& scales,
                   const torch::Tensor& zeros, int64_t bits, int64_t group) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 4,
              "quantize_into: x must be contiguous fp32 (B, H, n, D)");
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 2, "quantize_into: 8, 4 or 2 bits");
  const int64_t B = x.size(0), H = x.size(1), n = x.size(2), D = x.size(3);
  TORCH_CHECK(group > 0 && D % group == 0 && group % (8 / bits) == 0, "quantize_into: group must divide head_dim");
  const int64_t width = D * bits / 8, G = D / group;
  for (const auto& [t, w, dtype] : {std::tuple{data, width, torch::kUInt8}, std::tuple{scales, G, torch::kHalf},
                                    std::tuple{zeros, G, torch::kHalf}})
    TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == H && t.size(2) == n && t.size(3) == w &&
                    t.stride(3) == 1 && t.stride(2) == w && t.scalar_type() == dtype,
                "quantize_into: outputs must be (B, H, n, width) views with contiguous rows");
  const float* xp = x.data_ptr<float>();
  auto* dp = data.data_ptr<uint8_t>();
  auto* sp = reinterpret_cast<uint16_t*>(scales.data_ptr<at::Half>());
  auto* zp = reinterpret_cast<uint16_t*>(zeros.data_ptr<at::Half>());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      quantize_rows(xp + (b * H + h) * n * D, n, D, static_cast<int>(bits), group,
                    dp + b * data.stride(0) + h * data.stride(1), sp + b * scales.stride(0) + h * scales.stride(1),
                    zp + b * zeros.stride(0) + h * zeros.stride(1));
}

// Walsh-Hadamard transform of every last-dim row of fp32 x (a power-of-2 length), times `scale`: the butterfly of
// codec.hadamard, stage by stage, each a single add or subtract.
torch::Tensor hadamard_rows(const torch::Tensor& x, double scale) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() >= 1,
              "hadamard_rows: x must be contiguous fp32");
  const int64_t n = x.size(-1);
  TORCH_CHECK(n >= 1 && (n & (n - 1)) == 0, "hadamard_rows: a power-of-2 size, got ", n);
  auto out = x.clone();
  if (out.numel() == 0) return out;
  float* p = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, out.numel() / n, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) kvcodec::hadamard_row(p + r * n, n, s);
  });
  return out;
}

// zlib's CRC32 (reflected polynomial 0xEDB88320), byte at a time: for the ends a folded pass leaves.
uint32_t crc32_bytes(uint32_t crc, const uint8_t* p, int64_t n) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  for (int64_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return crc;
}

#if defined(__PCLMUL__) && defined(__SSE4_1__)
// The same CRC over n >= 64 bytes, n a multiple of 16, by carry-less multiplication: four 128-bit lanes folded 64
// bytes at a time, then into one lane, then Barrett-reduced to 32 bits (Intel's "Fast CRC Computation for Generic
// Polynomials Using PCLMULQDQ"; the constants are Linux's crc32-pclmul ones). 10+ GB/s where zlib does ~1.5.
// With AVX-512 VPCLMULQDQ, four 512-bit lanes fold 256 bytes at a time first (constants x^(2048±32) mod P, as
// zlib-ng's), then fold into one 512-bit lane whose four 128-bit quarters are the four lanes above.
uint32_t crc32_folded(uint32_t crc, const uint8_t* p, int64_t n) {
  auto load = [](const uint8_t* q) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)); };
  auto fold = [](__m128i x, __m128i k) {
    return _mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11));
  };
  const __m128i r2r1 = _mm_set_epi64x(0x1c6e41596, 0x154442bd4);
  __m128i x1, x2, x3, x4;
#if defined(__VPCLMULQDQ__) && defined(__AVX512F__)
  if (n >= 256) {
    auto wide = [](const uint8_t* q) { return _mm512_loadu_si512(q); };
    auto fold_xor = [](__m512i x, __m512i k, __m512i y) {  // 0x96: three-way xor
      return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, k, 0x00), _mm512_clmulepi64_epi128(x, k, 0x11),
                                       y, 0x96);
    };
    __m512i z0 = _mm512_xor_si512(wide(p), _mm512_zextsi128_si512(_mm_cvtsi32_si128(static_cast<int>(crc))));
    __m512i z1 = wide(p + 64), z2 = wide(p + 128), z3 = wide(p + 192);
    p += 256, n -= 256;
    const __m512i k256 = _mm512_broadcast_i32x4(_mm_set_epi64x(0x1322d1430, 0x11542778a));
    for (; n >= 256; p += 256, n -= 256) {
      z0 = fold_xor(z0, k256, wide(p));
      z1 = fold_xor(z1, k256, wide(p + 64));
      z2 = fold_xor(z2, k256, wide(p + 128));
      z3 = fold_xor(z3, k256, wide(p + 192));
    }
    const __m512i k64 = _mm512_broadcast_i32x4(r2r1);
    z0 = fold_xor(fold_xor(fold_xor(z0, k64, z1), k64, z2), k64, z3);
    x1 = _mm512_extracti32x4_epi32(z0, 0), x2 = _mm512_extracti32x4_epi32(z0, 1);
    x3 = _mm512_extracti32x4_epi32(z0, 2), x4 = _mm512_extracti32x4_epi32(z0, 3);
  } else
#endif
  {
    x1 = _mm_xor_si128(load(p), _mm_cvtsi32_si128(static_cast<int>(crc)));
    x2 = load(p + 16), x3 = load(p + 32), x4 = load(p + 48);
    p += 64, n -= 64;
  }
  for (; n >= 64; p += 64, n -= 64) {
    x1 = _mm_xor_si128(fold(x1, r2r1), load(p));
    x2 = _mm_xor_si128(fold(x2, r2r1), load(p + 16));
    x3 = _mm_xor_si128(fold(x3, r2r1), load(p + 32));
    x4 = _mm_xor_si128(fold(x4, r2r1), load(p + 48));
  }
  const __m128i r4r3 = _mm_set_epi64x(0x0ccaa009e, 0x1751997d0);
  x1 = _mm_xor_si128(fold(x1, r4r3), x2);
  x1 = _mm_xor_si128(fold(x1, r4r3), x3);
  x1 = _mm_xor_si128(fold(x1, r4r3), x4);
  for (; n >= 16; p += 16, n -= 16) x1 = _mm_xor_si128(fold(x1, r4r3), load(p));
  // 128 -> 64 bits (also appending 32 zero bits), 64 -> 32 bits, then the Barrett reduction
  x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), _mm_clmulepi64_si128(r4r3, x1, 0x01));
  const __m128i mask32 = _mm_set_epi32(0, 0, 0, -1);
  x1 = _mm_xor_si128(_mm_srli_si128(x1, 4), _mm_clmulepi64_si128(_mm_and_si128(x1, mask32),
                                                                   _mm_set_epi64x(0, 0x163cd6124), 0x00));
  const __m128i poly = _mm_set_epi64x(0x1F7011641, 0x1DB710641);
  __m128i t = _mm_and_si128(_mm_clmulepi64_si128(_mm_and_si128(x1, mask32), poly, 0x10), mask32);
  x1 = _mm_xor_si128(x1, _mm_clmulepi64_si128(t, poly, 0x00));
  return static_cast<uint32_t>(_mm_extract_epi32(x1, 1));
}
#endif

// The running (pre-inverted) CRC32 state after n more bytes: folded in bulk where the CPU can, then byte at a time.
uint32_t crc32_update(uint32_t crc, const uint8_t* p, int64_t n) {
#if defined(__PCLMUL__) && defined(__SSE4_1__)
  if (n >= 64) {
    const int64_t bulk = n & ~int64_t{15};
    crc = crc32_folded(crc, p, bulk);
    p += bulk, n -= bulk;
  }
#endif
  return crc32_bytes(crc, p, n);
}

// zlib.crc32(bytes of t, init): the checksum of a memory file's tensors, at memory speed.
int64_t crc32(const torch::Tensor& t, int64_t init) {
  TORCH_CHECK(t.is_contiguous() && t.is_cpu(), "crc32: a contiguous CPU tensor");
  return ~crc32_update(~static_cast<uint32_t>(init), static_cast<const uint8_t*>(t.data_ptr()),
                       t.numel() * t.element_size());
}

constexpr int64_t kReadChunk = 256 << 10;  // checksummed right after it lands, while still in L2

// A contiguous run of a view's bytes, cut at chunk size.
struct Piece {
  uint8_t* p;
  int64_t n;
  size_t view;
};

constexpr int64_t kStaged = 4 << 10;  // pieces this small are read through a staging buffer

// Read pieces [first, last) from fd starting at `offset`, one preadv per chunk of up to kReadChunk bytes, each chunk
// checksummed into its pieces' views' running CRCs right after it lands. Short reads are retried. Runs of small
// pieces (a pool block's per-head scales are 512 bytes) are read into a staging buffer as one iovec, checksummed
// there in one call per view and copied out from L1: per iovec and per CRC call, a q4 restore into a pool's blocks
// was ~10% slower than into a contiguous cache.
void read_pieces(int fd, int64_t offset, const std::vector<Piece>& pieces, size_t first, size_t last,
                 std::vector<uint32_t>& crcs) {
  std::vector<iovec> iov;
  std::vector<uint8_t> staging(kReadChunk);
  struct Copy {
    const uint8_t* from;
    uint8_t* to;
    int64_t n;
  };
  std::vector<Copy> staged;  // each staged piece: its place in `staging` and in its view
  std::vector<Piece> sums;  // what to checksum, in file order: runs of one view's bytes contiguous in memory
  while (first < last) {
    size_t end = first;
    int64_t bytes = 0, used = 0;
    iov.clear(), staged.clear(), sums.clear();
    while (end < last && iov.size() < IOV_MAX && (end == first || bytes + pieces[end].n <= kReadChunk)) {
      const Piece& piece = pieces[end++];
      bytes += piece.n;
      uint8_t* at = piece.p;
      if (piece.n < kStaged) {
        at = staging.data() + used;
        used += piece.n;
        staged.push_back({at, piece.p, piece.n});
      }
      if (!iov.empty() && static_cast<uint8_t*>(iov.back().iov_base) + iov.back().iov_len == at)
        iov.back().iov_len += piece.n;  // right after the last piece in memory: the same iovec
      else
        iov.push_back({at, static_cast<size_t>(piece.n)});
      if (!sums.empty() && sums.back().view == piece.view && sums.back().p + sums.back().n == at)
        sums.back().n += piece.n;  // staged pieces are checksummed from `staging`, many per call
      else
        sums.push_back({at, piece.n, piece.view});
    }
    for (size_t at = 0; at < iov.size();) {
      const ssize_t n = preadv(fd, iov.data() + at, static_cast<int>(iov.size() - at), offset);
      TORCH_CHECK(n > 0, n == 0 ? "read_into: the file ended early" : "read_into: read failed");
      offset += n;
      for (size_t left = n; left;) {
        const size_t step = std::min(left, iov[at].iov_len);
        iov[at].iov_base = static_cast<uint8_t*>(iov[at].iov_base) + step, iov[at].iov_len -= step, left -= step;
        if (!iov[at].iov_len) ++at;
      }
    }
    for (const Copy& c : staged) std::memcpy(c.to, c.from, c.n);
    for (const Piece& sum : sums) crcs[sum.view] = crc32_update(crcs[sum.view], sum.p, sum.n);
    first = end;
  }
}

// Fill each target in turn, in C order, from the file's bytes at `offset` onwards, and return each target's zlib.crc32
// continuing from inits[i]. A target is a (possibly strided) view (tokens[i] < 0), or a block pool's field (blocks,
// heads, block_tokens, width) holding tokens[i] >= 0 tokens in the blocks tables[i] lists: the file's (1, heads,
// tokens, width) tensor, each head's rows spread over those blocks. A restore reads a memory file straight into a
// cache's buffers, or a pool's blocks, this way: one pass, no copy of the file. The runs are gathered into one preadv
// per chunk (a cache's per-head scales are runs of a few KiB), and each chunk is checksummed from L2 right after it
// lands (the folded CRC runs at 50+ GB/s there). The targets are split at their boundaries into one byte-balanced range
// per intra-op thread, each read and checksummed by its thread: one core copies from the page cache well below DRAM
// bandwidth, two copied 1.2-1.3x faster on a Zen 4 host, and a restore runs between decode steps, when those threads
// are idle. (A second thread only checksumming behind one reader saved ~10%, and only while a core was idle.)
std::vector<int64_t> read_into(int64_t fd, int64_t offset, const std::vector<torch::Tensor>& views,
                               const std::vector<int64_t>& inits, const std::vector<std::vector<int64_t>>& tables,
                               const std::vector<int64_t>& tokens) {
  TORCH_CHECK(views.size() == inits.size() && tables.size() == views.size() && tokens.size() == views.size(),
              "read_into: one init, table and token count per view");
  std::vector<Piece> pieces;  // every run, cut at chunk size, in file order
  std::vector<size_t> starts;  // each view's first piece
  std::vector<int64_t> before;  // each view's file offset from `offset`
  int64_t total = 0;
  const auto add = [&](uint8_t* p, int64_t bytes, size_t i) {
    for (int64_t done = 0; done < bytes; done += kReadChunk)
      pieces.push_back({p + done, std::min(kReadChunk, bytes - done), i});
    total += bytes;
  };
  for (size_t i = 0; i < views.size(); ++i) {
    const auto& v = views[i];
    TORCH_CHECK(v.is_cpu(), "read_into: CPU tensors");
    starts.push_back(pieces.size()), before.push_back(total);
    const int64_t elem = v.element_size();
    auto* base = static_cast<uint8_t*>(v.data_ptr());
    if (tokens[i] >= 0) {  // a pool field: head by head, each head's rows block by block
      TORCH_CHECK(v.dim() == 4 && v.stride(3) == 1 && v.stride(2) == v.size(3), "read_into: a pool field has "
                  "contiguous (block_tokens, width) rows per block and head");
      const int64_t bt = v.size(2), n = tokens[i], row = v.size(3) * elem;
      TORCH_CHECK(static_cast<int64_t>(tables[i].size()) * bt >= n, "read_into: ", n,
                  " tokens do not fit ", tables[i].size(), " blocks");
      for (int64_t b : tables[i]) TORCH_CHECK(0 <= b && b < v.size(0), "read_into: block ", b, " is not in the pool");
      for (int64_t h = 0; h < v.size(1); ++h)
        for (int64_t j = 0; j * bt < n; ++j)
          add(base + (tables[i][j] * v.stride(0) + h * v.stride(1)) * elem, std::min(bt, n - j * bt) * row, i);
      continue;
    }
    if (v.numel() == 0) continue;
    // the innermost dims laid out contiguously form one run; the outer ones are walked
    int64_t run = 1, k = v.dim();
    while (k > 0 && (v.size(k - 1) == 1 || v.stride(k - 1) == run)) run *= v.size(--k);
    std::vector<int64_t> index(k, 0);
    for (int64_t r = 0, runs = v.numel() / run; r < runs; ++r) {
      int64_t at = 0;
      for (int64_t d = 0; d < k; ++d) at += index[d] * v.stride(d);
      add(base + at * elem, run * elem, i);
      for (int64_t d = k - 1; d >= 0 && ++index[d] == v.size(d); --d) index[d] = 0;
    }
  }
  starts.push_back(pieces.size()), before.push_back(total);
  std::vector<uint32_t> crcs(views.size());
  for (size_t i = 0; i < views.size(); ++i) crcs[i] = ~static_cast<uint32_t>(inits[i]);
  // range t: views [cut[t], cut[t + 1]), the first view starting at or after t / T of the bytes
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total / (kReadChunk * 4)));
  std::vector<size_t> cut(T + 1, views.size());
  for (int64_t t = 0, v = 0; t < T; ++t) {
    while (static_cast<size_t>(v) < views.size() && before[v] * T < total * t) ++v;
    cut[t] = v;
  }
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      read_pieces(static_cast<int>(fd), offset + before[cut[t]], pieces, starts[cut[t]], starts[cut[t + 1]], crcs);
  });
  std::vector<int64_t> out;
  for (uint32_t crc : crcs) out.push_back(~crc);
  return out;
}

// Write back and evict every cache line of each tensor: a planner's timed decode step then reads these weights from
// DRAM while the step's own small state (activations, cache, plan) stays cached, as in a model larger than the cache.
// A sweep through a big buffer evicts that state too, and charged its misses to every layer of a calibration model.
// Returns false where it cannot (off x86), for the caller to sweep the cache instead.
bool evict_lines(const std::vector<torch::Tensor>& tensors) {
#if defined(__x86_64__)
  for (const auto& t : tensors) {
    TORCH_CHECK(t.is_cpu() && t.is_contiguous(), "evict_lines: contiguous CPU tensors");
    const auto* p = static_cast<const char*>(t.data_ptr());
    for (int64_t i = 0, n = t.numel() * t.element_size(); i < n; i += 64) _mm_clflush(p + i);
  }
  _mm_mfence();
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_packed", &quantize_packed,
        "group-wise affine quantization of fp32 x into packed 8/4/2-bit codes and fp16 scales/zeros, bit-exact "
        "with edgellm.kv.codec; returns (data, scales, zeros)");
  m.def("quantize_into", &quantize_into,
        "quantize_packed of fp32 (B, H, n, D) along head_dim, written into (B, H, n, width) views of a cache");
  m.def("crc32", &crc32, "zlib.crc32 of a contiguous tensor's bytes, continuing from init",
        py::call_guard<py::gil_scoped_release>());
  m.def("read_into", &read_into,
        "fill each view (or pool field, through its block table) from fd at offset in C order; returns each "
        "view's crc32 from its init",
        py::call_guard<py::gil_scoped_release>());
  m.def("evict_lines", &evict_lines, "evict every cache line of the tensors (clflush); false off x86",
        py::call_guard<py::gil_scoped_release>());
  m.def("hadamard_rows", &hadamard_rows, "Walsh-Hadamard butterfly of every last-dim row of fp32 x, times scale");
}
