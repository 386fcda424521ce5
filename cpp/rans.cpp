#include "rans.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>

#include "crc32c.h"
#include "errors.h"
#include "rans_internal.h"

namespace eoq {
namespace rans {
namespace {

// ---- little-endian byte I/O --------------------------------------------------------

template <typename T>
void put(std::vector<uint8_t>& out, T v) {
  uint8_t b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  out.insert(out.end(), b, b + sizeof(T));
}

// A cursor that refuses to read past the end: every length in a stream is untrusted.
struct Reader {
  const uint8_t* p;
  size_t len;
  size_t pos = 0;
  template <typename T>
  T get(const char* what) {
    if (len - pos < sizeof(T))
      throw CorruptStream("rANS stream truncated: header ends inside '" + std::string(what) +
                          "' at byte " + std::to_string(pos) + " of " + std::to_string(len));
    T v;
    std::memcpy(&v, p + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
};

// ---- encoder -----------------------------------------------------------------------

EncTable make_enc_table(const std::vector<uint32_t>& freq, int scale_bits) {
  EncTable tab;
  tab.scale_bits = scale_bits;
  tab.sym.resize(freq.size());
  tab.mult.assign(256, 0);
  tab.thr.assign(256, 0);
  tab.cc.assign(256, 0);
  uint32_t cum = 0;
  const uint32_t M = 1u << scale_bits;
  for (size_t s = 0; s < freq.size(); ++s) {
    const uint32_t f = freq[s];
    EncSymbol& e = tab.sym[s];
    e = EncSymbol{};
    e.cum = cum;
    e.cmpl = M - f;
    e.x_max = static_cast<uint64_t>(f) << (32 - scale_bits);
    if (f > 0) {
      uint32_t l = 0;
      while ((1ull << l) < f) ++l;  // l = ceil(log2 f)
      e.mult = static_cast<uint32_t>((((1ull << l) - f) << 32) / f + 1);
      e.sh1 = l > 0 ? 1 : 0;
      e.sh2 = l > 0 ? l - 1 : 0;
      // x >= x_max  <=>  (x >> 16) > (x_max >> 16) - 1, and x_max >> 16 <= 2^16
      tab.mult[s] = e.mult;
      tab.thr[s] = static_cast<uint32_t>((e.x_max >> 16) - 1) | e.sh2 << 16 | e.sh1 << 24;
      tab.cc[s] = e.cum | e.cmpl << 16;
    }
    cum += f;
  }
  return tab;
}

inline uint32_t div_by(uint32_t x, const EncSymbol& e) {
  const uint32_t t = static_cast<uint32_t>((static_cast<uint64_t>(x) * e.mult) >> 32);
  return (t + ((x - t) >> e.sh1)) >> e.sh2;
}

inline void encode_one(uint32_t& s, const EncSymbol& e, uint16_t* words, size_t& pos) {
  if (s >= e.x_max) {
    words[--pos] = static_cast<uint16_t>(s);
    s >>= 16;
  }
  s = s + e.cum + div_by(s, e) * e.cmpl;
}

void encode_groups_scalar(const EncTable& t, const uint8_t* sym, uint32_t n_groups, uint32_t* x,
                          uint16_t* words, size_t* pos) {
  size_t p = *pos;
  const EncSymbol* tab = t.sym.data();
  for (uint32_t i = n_groups * kLanes; i-- > 0;) encode_one(x[i % kLanes], tab[sym[i]], words, p);
  *pos = p;
}

// Codes one chunk; returns its payload (kLanes states, then the words in decode order).
std::vector<uint8_t> encode_chunk(const uint8_t* sym, uint32_t m, const EncTable& tab, GroupEncoder groups) {
  uint32_t x[kLanes];
  for (int j = 0; j < kLanes; ++j) x[j] = kL;
  // At most one 16-bit word per symbol (frequencies are >= 1 of <= 2^15 slots), plus the
  // 8 spare entries below the words that the SIMD group encoders may scribble on.
  constexpr size_t kSpare = 8;
  thread_local std::vector<uint16_t> words;  // reused: no page faults or zeroing per chunk
  if (words.size() < m + kSpare) words.resize(m + kSpare);
  size_t pos = m + kSpare;
  const uint32_t full = m / kLanes * kLanes;
  // The partial last group first (the encoder runs backwards), then whole groups.
  for (uint32_t i = m; i-- > full;) encode_one(x[i % kLanes], tab.sym[sym[i]], words.data(), pos);
  groups(tab, sym, full / kLanes, x, words.data(), &pos);
  const size_t n_words = m + kSpare - pos;
  std::vector<uint8_t> out(4 * kLanes + 2 * n_words);
  std::memcpy(out.data(), x, 4 * kLanes);
  std::memcpy(out.data() + 4 * kLanes, words.data() + pos, 2 * n_words);
  return out;
}

std::vector<uint64_t> histogram(const uint8_t* sym, uint64_t n, uint32_t chunk, uint32_t n_chunks) {
  std::vector<std::vector<uint64_t>> part(n_chunks, std::vector<uint64_t>(256, 0));
  at::parallel_for(0, n_chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const uint64_t lo = static_cast<uint64_t>(c) * chunk, hi = std::min<uint64_t>(n, lo + chunk);
      // Four sub-histograms: runs of one symbol would otherwise serialise on one counter.
      uint32_t h4[4][256] = {};
      uint64_t i = lo;
      for (; i + 8 <= hi; i += 8) {
        uint64_t v;
        std::memcpy(&v, sym + i, 8);
        ++h4[0][v & 0xFF], ++h4[1][(v >> 8) & 0xFF], ++h4[2][(v >> 16) & 0xFF], ++h4[3][(v >> 24) & 0xFF];
        ++h4[0][(v >> 32) & 0xFF], ++h4[1][(v >> 40) & 0xFF], ++h4[2][(v >> 48) & 0xFF], ++h4[3][v >> 56];
      }
      for (; i < hi; ++i) ++h4[0][sym[i]];
      uint64_t* h = part[c].data();
      for (int s = 0; s < 256; ++s) h[s] = uint64_t(h4[0][s]) + h4[1][s] + h4[2][s] + h4[3][s];
    }
  });
  std::vector<uint64_t> total(256, 0);
  for (const auto& p : part)
    for (int s = 0; s < 256; ++s) total[s] += p[s];
  return total;
}

void check_params(int scale_bits, uint32_t chunk_size) {
  if (scale_bits < kMinScaleBits || scale_bits > kMaxScaleBits)
    throw InvalidInput("rans_encode: scale_bits must be in [" + std::to_string(kMinScaleBits) + ", " +
                       std::to_string(kMaxScaleBits) + "], got " + std::to_string(scale_bits));
  if (chunk_size < kMinChunk || chunk_size > kMaxChunk || chunk_size % kLanes != 0)
    throw InvalidInput("rans_encode: chunk_size must be a multiple of 32 in [65536, 1048576], got " +
                       std::to_string(chunk_size));
}

// ---- decoder selection ---------------------------------------------------------------

struct Coder {
  const char* name;
  GroupDecoder decode;
  GroupEncoder encode;
};

// The fastest coder this CPU runs, or the one EOQ_RANS_DECODER=scalar|avx2|avx512 names
// (read once; a path the CPU lacks, or an unknown name, is an error at first use).
Coder choose_coder() {
  const Coder scalar{"scalar", decode_groups_scalar, encode_groups_scalar};
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
  const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
                          __builtin_cpu_supports("avx512vbmi2") &&
                          __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
  const Coder avx2{"avx2", decode_groups_avx2, encode_groups_avx2};
  const Coder avx512{"avx512", decode_groups_avx512, encode_groups_avx512};
#else
  const bool has_avx2 = false, has_avx512 = false;
  const Coder avx2 = scalar, avx512 = scalar;
#endif
  const char* env = std::getenv("EOQ_RANS_DECODER");
  if (env && *env) {
    const std::string want(env);
    if (want == "scalar") return scalar;
    if (want == "avx2" || want == "avx512") {
      if (want == "avx2" ? has_avx2 : has_avx512) return want == "avx2" ? avx2 : avx512;
      throw InvalidInput("EOQ_RANS_DECODER=" + want + ": this CPU does not support it");
    }
    throw InvalidInput("EOQ_RANS_DECODER=" + want + ": expected scalar, avx2 or avx512");
  }
  if (has_avx512) return avx512;
  if (has_avx2) return avx2;
  return scalar;
}

const Coder& coder() {
  static const Coder c = choose_coder();  // a throw leaves it unset: every call reports the error
  return c;
}

GroupDecoder pick_decoder(std::string* name) {
  const Coder& c = coder();
  if (name) *name = c.name;
  return c.decode;
}

}  // namespace

// ---- frequency normalisation ------------------------------------------------------------

std::vector<uint32_t> normalize_freqs(const std::vector<uint64_t>& counts, int scale_bits) {
  const uint32_t M = 1u << scale_bits;
  unsigned __int128 n = 0;
  for (uint64_t c : counts) n += c;
  std::vector<uint32_t> f(counts.size(), 0);
  if (n == 0) return f;
  int64_t sum = 0;
  for (size_t s = 0; s < counts.size(); ++s) {
    if (!counts[s]) continue;
    const uint64_t v = static_cast<uint64_t>((static_cast<unsigned __int128>(counts[s]) * M) / n);
    f[s] = static_cast<uint32_t>(std::max<uint64_t>(1, v));
    sum += f[s];
  }
  // Greedy repair of the total: each step moves the one slot whose move changes the
  // coded size sum(count * log2(M / f)) the least (ties: lowest symbol).
  while (sum != M) {
    const bool grow = sum < static_cast<int64_t>(M);
    size_t best = counts.size();
    double best_cost = 0;
    for (size_t s = 0; s < counts.size(); ++s) {
      if (!counts[s] || (!grow && f[s] <= 1)) continue;
      const double c = static_cast<double>(counts[s]);
      const double cost = grow ? -c * std::log2((f[s] + 1.0) / f[s]) : c * std::log2(f[s] / (f[s] - 1.0));
      if (best == counts.size() || cost < best_cost) {
        best = s;
        best_cost = cost;
      }
    }
    f[best] += grow ? 1 : -1;
    sum += grow ? 1 : -1;
  }
  return f;
}

// ---- stream encode ---------------------------------------------------------------------

size_t encode(const uint8_t* symbols, uint64_t n, int scale_bits, uint32_t chunk_size, const Allocator& alloc) {
  check_params(scale_bits, chunk_size);
  const uint64_t n_chunks64 = (n + chunk_size - 1) / chunk_size;
  if (n_chunks64 > 0xFFFFFFFFull) throw InvalidInput("rans_encode: too many symbols");
  const uint32_t n_chunks = static_cast<uint32_t>(n_chunks64);

  const std::vector<uint64_t> counts = histogram(symbols, n, chunk_size, n_chunks);
  uint32_t alphabet = 256;
  while (alphabet > 0 && counts[alphabet - 1] == 0) --alphabet;
  std::vector<uint64_t> used(counts.begin(), counts.begin() + alphabet);
  const std::vector<uint32_t> freq = normalize_freqs(used, scale_bits);
  const EncTable tab = make_enc_table(freq, scale_bits);
  const GroupEncoder groups = coder().encode;

  std::vector<std::vector<uint8_t>> payload(n_chunks);
  std::vector<uint32_t> crc(n_chunks);
  at::parallel_for(0, n_chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const uint64_t lo = static_cast<uint64_t>(c) * chunk_size;
      const uint32_t m = static_cast<uint32_t>(std::min<uint64_t>(n - lo, chunk_size));
      payload[c] = encode_chunk(symbols + lo, m, tab, groups);
      crc[c] = crc32c(symbols + lo, m);
    }
  });

  std::vector<uint8_t> out;
  out.insert(out.end(), kMagic, kMagic + 4);
  put<uint8_t>(out, kVersion);
  put<uint8_t>(out, static_cast<uint8_t>(scale_bits));
  put<uint8_t>(out, kLanes);
  put<uint8_t>(out, 0);  // flags, reserved
  put<uint64_t>(out, n);
  put<uint32_t>(out, chunk_size);
  put<uint32_t>(out, n_chunks);
  put<uint16_t>(out, static_cast<uint16_t>(alphabet));
  for (uint32_t f : freq) put<uint16_t>(out, static_cast<uint16_t>(f));
  for (uint32_t c = 0; c < n_chunks; ++c) {
    put<uint32_t>(out, static_cast<uint32_t>(payload[c].size()));
    put<uint32_t>(out, crc[c]);
  }
  put<uint32_t>(out, crc32c(out.data(), out.size()));
  // One output buffer from the caller, filled in parallel: no serial copy of the payloads.
  std::vector<size_t> offset(n_chunks + 1, out.size());
  for (uint32_t c = 0; c < n_chunks; ++c) offset[c + 1] = offset[c] + payload[c].size();
  uint8_t* dst = alloc(offset[n_chunks]);
  std::memcpy(dst, out.data(), out.size());
  at::parallel_for(0, n_chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) std::memcpy(dst + offset[c], payload[c].data(), payload[c].size());
  });
  return offset[n_chunks];
}

// ---- stream parse and decode -------------------------------------------------------------

Header parse(const uint8_t* stream, size_t len) {
  Reader r{stream, len};
  uint8_t magic[4];
  for (int i = 0; i < 4; ++i) magic[i] = r.get<uint8_t>("magic");
  if (std::memcmp(magic, kMagic, 4) != 0) throw CorruptStream("not an EOQR rANS stream (bad magic)");
  const uint8_t version = r.get<uint8_t>("version");
  if (version != kVersion)
    throw CorruptStream("unsupported EOQR version " + std::to_string(version) + " (this build reads " +
                        std::to_string(kVersion) + ")");
  Header h;
  h.scale_bits = r.get<uint8_t>("scale_bits");
  if (h.scale_bits < kMinScaleBits || h.scale_bits > kMaxScaleBits)
    throw CorruptStream("bad scale_bits " + std::to_string(h.scale_bits));
  const uint8_t lanes = r.get<uint8_t>("lanes");
  if (lanes != kLanes) throw CorruptStream("bad lane count " + std::to_string(lanes));
  if (r.get<uint8_t>("flags") != 0) throw CorruptStream("reserved flags are set");
  h.n_symbols = r.get<uint64_t>("n_symbols");
  h.chunk_size = r.get<uint32_t>("chunk_size");
  if (h.chunk_size < kMinChunk || h.chunk_size > kMaxChunk || h.chunk_size % kLanes)
    throw CorruptStream("bad chunk_size " + std::to_string(h.chunk_size));
  h.n_chunks = r.get<uint32_t>("n_chunks");
  // ceil without the overflow of n + chunk - 1 (n near 2^64 would wrap to 0 chunks).
  if (h.n_chunks != h.n_symbols / h.chunk_size + (h.n_symbols % h.chunk_size != 0))
    throw CorruptStream("chunk count " + std::to_string(h.n_chunks) + " does not match " +
                        std::to_string(h.n_symbols) + " symbols");
  h.alphabet = r.get<uint16_t>("alphabet");
  if (h.alphabet > 256) throw CorruptStream("alphabet larger than 256");
  if ((h.alphabet == 0) != (h.n_symbols == 0)) throw CorruptStream("alphabet size inconsistent with length");
  h.freq.resize(h.alphabet);
  uint64_t fsum = 0;
  for (auto& f : h.freq) fsum += (f = r.get<uint16_t>("frequency table"));
  if (h.alphabet > 0 && (fsum != (1u << h.scale_bits) || h.freq.back() == 0))
    throw CorruptStream("frequency table does not sum to 2^scale_bits");
  // The index is 8 bytes a chunk: check it fits before sizing anything from n_chunks.
  if ((len - r.pos) / 8 < h.n_chunks) throw CorruptStream("rANS stream truncated inside the chunk index");
  h.chunk_bytes.resize(h.n_chunks);
  h.chunk_crc.resize(h.n_chunks);
  for (uint32_t c = 0; c < h.n_chunks; ++c) {
    h.chunk_bytes[c] = r.get<uint32_t>("chunk index");
    h.chunk_crc[c] = r.get<uint32_t>("chunk index");
  }
  const size_t crc_at = r.pos;
  if (r.get<uint32_t>("header crc") != crc32c(stream, crc_at)) throw CorruptStream("header checksum mismatch");
  h.header_bytes = r.pos;
  uint64_t total = h.header_bytes;
  for (uint32_t c = 0; c < h.n_chunks; ++c) {
    if (h.chunk_bytes[c] < 4u * kLanes || (h.chunk_bytes[c] - 4u * kLanes) % 2)
      throw CorruptStream("chunk " + std::to_string(c) + " has an impossible size");
    total += h.chunk_bytes[c];
  }
  if (total != len)
    throw CorruptStream(std::string("rANS stream is ") + (len < total ? "truncated" : "followed by extra bytes") +
                        ": header says " + std::to_string(total) + " bytes, got " + std::to_string(len));
  return h;
}

DecodeTable make_decode_table(const Header& h) {
  DecodeTable t;
  t.scale_bits = h.scale_bits;
  t.mask = (1u << h.scale_bits) - 1;
  t.info.resize(size_t(1) << h.scale_bits);
  t.sym.assign((size_t(1) << h.scale_bits) + 4, 0);
  const bool packed = h.scale_bits <= 12;
  if (packed) t.packed.resize(size_t(1) << h.scale_bits);
  uint32_t cum = 0;
  for (uint32_t s = 0; s < h.alphabet; ++s) {
    for (uint32_t k = 0; k < h.freq[s]; ++k) {
      t.info[cum + k] = h.freq[s] | (k << 16);
      t.sym[cum + k] = static_cast<uint8_t>(s);
      if (packed) t.packed[cum + k] = (h.freq[s] - 1) | k << 12 | s << 24;
    }
    cum += h.freq[s];
  }
  if (h.alphabet <= 64) {
    t.search_steps = 0;
    while ((1u << t.search_steps) < h.alphabet) ++t.search_steps;
    cum = 0;
    for (uint32_t s = 0; s < 64; ++s) {
      t.cum16[s] = static_cast<uint16_t>(s < h.alphabet ? cum : 0xFFFFu);
      t.freq16[s] = static_cast<uint16_t>(s < h.alphabet ? h.freq[s] : 0);
      if (s < h.alphabet) cum += h.freq[s];
    }
  }
  return t;
}

namespace {

void decode_groups_scalar_one(const DecodeTable& t, ChunkCursor& c) {
  const int sb = t.scale_bits;
  const uint32_t mask = t.mask;
  const uint32_t* info = t.info.data();
  const uint8_t* sym = t.sym.data();
  const uint8_t* w = c.w;
  uint32_t x[kLanes];
  std::memcpy(x, c.x, sizeof x);
  size_t rp = c.rp;
  uint8_t* out = c.out + c.i;
  for (uint32_t k; (k = safe_groups(c)) > 0;) {
    for (uint32_t g = 0; g < k; ++g, out += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        uint32_t s = x[j];
        const uint32_t slot = s & mask, e = info[slot];
        out[j] = sym[slot];
        s = (e & 0xFFFFu) * (s >> sb) + (e >> 16);
        uint16_t word;
        std::memcpy(&word, w + 2 * rp, 2);
        const bool need = s < kL;
        x[j] = need ? (s << 16) | word : s;
        rp += need;
      }
    }
    c.i += k * kLanes;
    c.rp = rp;
  }
  std::memcpy(c.x, x, sizeof x);
}

}  // namespace

void decode_groups_scalar(const DecodeTable& t, ChunkCursor* const* c, int n) {
  for (int k = 0; k < n; ++k) decode_groups_scalar_one(t, *c[k]);
}

ChunkDecoder::ChunkDecoder(const uint8_t* stream, size_t len, const Header& h)
    : stream_(stream), h_(h), table_(make_decode_table(h)), groups_(pick_decoder(nullptr)), offset_(h.n_chunks) {
  uint64_t off = h.header_bytes;
  for (uint32_t c = 0; c < h.n_chunks; ++c) {
    offset_[c] = off;
    off += h.chunk_bytes[c];
  }
  if (off != len) throw InvalidInput("ChunkDecoder: header does not describe this stream");  // parse checked it
}

void ChunkDecoder::decode_chunks(uint32_t c0, int n, uint8_t* out, std::string* err) const {
  ChunkCursor cur[kBatch];
  ChunkCursor* ok[kBatch];
  int n_ok = 0;
  for (int k = 0; k < n; ++k) {
    const uint32_t c = c0 + k;
    err[k].clear();
    try {
      start_chunk(cur[k], stream_ + offset_[c], h_.chunk_bytes[c], chunk_len(c),
                  out + static_cast<size_t>(k) * h_.chunk_size);
      ok[n_ok++] = &cur[k];
    } catch (const std::exception& ex) {
      err[k] = ex.what();
    }
  }
  groups_(table_, ok, n_ok);
  for (int j = 0; j < n_ok; ++j) {
    const int k = static_cast<int>(ok[j] - cur);
    try {
      finish_chunk(table_, *ok[j]);
      if (crc32c(ok[j]->out, ok[j]->m) != h_.chunk_crc[c0 + k]) throw CorruptStream("checksum of decoded symbols mismatch");
    } catch (const std::exception& ex) {
      err[k] = ex.what();
    }
  }
}

bool ChunkDecoder::decode_prefix(uint32_t c, uint32_t m, uint8_t* out) const {
  ChunkCursor cur;
  try {
    start_chunk(cur, stream_ + offset_[c], h_.chunk_bytes[c], std::min(m, chunk_len(c)), out);
    ChunkCursor* p = &cur;
    groups_(table_, &p, 1);  // safe_groups bounds it by m and by the words left
    decode_tail_checked(table_, cur);
  } catch (const std::exception&) {
    return false;
  }
  return true;
}

void decode(const uint8_t* stream, size_t len, const Header& h, uint8_t* out) {
  if (h.n_symbols == 0) return;
  const ChunkDecoder dec(stream, len, h);
  std::vector<std::string> error(h.n_chunks);
  // Each thread takes a fixed range of chunks and decodes them kBatch at a time, side by
  // side (see ChunkCursor): the output and the errors do not depend on the batching.
  at::parallel_for(0, h.n_chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c0 = b; c0 < e; c0 += kBatch) {
      const int n = static_cast<int>(std::min<int64_t>(kBatch, e - c0));
      dec.decode_chunks(static_cast<uint32_t>(c0), n, out + dec.chunk_begin(static_cast<uint32_t>(c0)), &error[c0]);
    }
  });
  for (uint32_t c = 0; c < h.n_chunks; ++c)
    if (!error[c].empty())
      throw CorruptStream("rANS chunk " + std::to_string(c) + " of " + std::to_string(h.n_chunks) + ": " + error[c]);
}

std::string decoder_name() {
  std::string name;
  pick_decoder(&name);
  return name;
}

}  // namespace rans
}  // namespace eoq
