// The only file that sees torch and pybind11: tensors in, raw pointers to the kernels,
// tensors out. Python-side validation and friendly names live in python/eoq/ops.py; the
// checks here are the last line of defence and raise ValueError.
#include <torch/extension.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "absmax.h"
#include "bitpack.h"
#include "code_histogram.h"
#include "crc32c.h"
#include "dequant.h"
#include "errors.h"
#include "gptq.h"
#include "hadamard.h"
#include "lloyd_max.h"
#include "rans.h"

namespace py = pybind11;
using torch::Tensor;

namespace {

void require(bool ok, const std::string& msg) {
  if (!ok) throw eoq::InvalidInput(msg);
}

void require_u8_1d(const Tensor& t, const char* what) {
  require(t.scalar_type() == torch::kUInt8 && t.dim() == 1 && t.is_contiguous() && t.device().is_cpu(),
          std::string(what) + " must be a contiguous 1-D uint8 CPU tensor");
}

void require_f32(const Tensor& t, int64_t dim, const char* what) {
  require(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.device().is_cpu() && (dim < 0 || t.dim() == dim),
          std::string(what) + " must be a contiguous float32 CPU tensor" +
              (dim >= 0 ? " with " + std::to_string(dim) + " dimensions" : ""));
}

Tensor rans_encode(const Tensor& symbols, int scale_bits, int64_t chunk_size) {
  require_u8_1d(symbols, "symbols");
  require(chunk_size > 0 && chunk_size <= 0xFFFFFFFFll, "chunk_size out of range");
  Tensor out;
  py::gil_scoped_release nogil;
  eoq::rans::encode(symbols.data_ptr<uint8_t>(), symbols.numel(), scale_bits, static_cast<uint32_t>(chunk_size),
                    [&](size_t size) {
                      out = torch::empty({static_cast<int64_t>(size)}, torch::kUInt8);
                      return out.data_ptr<uint8_t>();
                    });
  return out;
}

// The caller's count against the header's, before anything is sized from the header: a
// small valid stream can declare billions of (free, single-symbol) codes.
void check_expected(const eoq::rans::Header& h, const c10::optional<int64_t>& expected) {
  if (expected && (*expected < 0 || static_cast<uint64_t>(*expected) != h.n_symbols))
    throw eoq::CorruptStream("rANS stream declares " + std::to_string(h.n_symbols) + " symbols, expected " +
                             std::to_string(*expected));
}

// Decodes into `out` when given (a reused buffer skips the page faults of a fresh one).
Tensor rans_decode(const Tensor& stream, const c10::optional<Tensor>& out_opt, const c10::optional<int64_t>& expected) {
  require_u8_1d(stream, "stream");
  const uint8_t* p = stream.data_ptr<uint8_t>();
  const size_t len = stream.numel();
  const eoq::rans::Header h = eoq::rans::parse(p, len);
  check_expected(h, expected);
  require(h.n_symbols <= static_cast<uint64_t>(INT64_MAX), "rANS stream too long for a tensor");
  Tensor out;
  if (out_opt) {
    out = *out_opt;
    require_u8_1d(out, "out");
    require(static_cast<uint64_t>(out.numel()) == h.n_symbols,
            "out has " + std::to_string(out.numel()) + " elements, the stream holds " + std::to_string(h.n_symbols));
  } else {
    out = torch::empty({static_cast<int64_t>(h.n_symbols)}, torch::kUInt8);
  }
  py::gil_scoped_release nogil;
  eoq::rans::decode(p, len, h, out.data_ptr<uint8_t>());
  return out;
}

py::dict rans_info(const Tensor& stream) {
  require_u8_1d(stream, "stream");
  const eoq::rans::Header h = eoq::rans::parse(stream.data_ptr<uint8_t>(), stream.numel());
  py::dict d;
  d["version"] = eoq::rans::kVersion;
  d["scale_bits"] = h.scale_bits;
  d["lanes"] = eoq::rans::kLanes;
  d["n_symbols"] = h.n_symbols;
  d["chunk_size"] = h.chunk_size;
  d["n_chunks"] = h.n_chunks;
  d["alphabet"] = h.alphabet;
  d["freq"] = h.freq;
  d["chunk_bytes"] = h.chunk_bytes;
  d["chunk_crc"] = h.chunk_crc;
  d["header_bytes"] = h.header_bytes;
  return d;
}

Tensor pack_bits(const Tensor& codes, int k) {
  require_u8_1d(codes, "codes");
  const uint64_t n = codes.numel();
  Tensor out = torch::empty({static_cast<int64_t>(eoq::packed_size(n, k < 1 ? 1 : k))}, torch::kUInt8);
  py::gil_scoped_release nogil;
  eoq::pack_bits(codes.data_ptr<uint8_t>(), n, k, out.data_ptr<uint8_t>());
  return out;
}

Tensor unpack_bits(const Tensor& packed, int k, int64_t n) {
  require_u8_1d(packed, "packed");
  require(k >= 1 && k <= 8, "bit width must be in 1..8, got " + std::to_string(k));
  require(n >= 0, "n must be non-negative");
  const uint64_t want = eoq::packed_size(n, k);
  if (static_cast<uint64_t>(packed.numel()) != want)
    throw eoq::CorruptStream("packed buffer has " + std::to_string(packed.numel()) + " bytes, " + std::to_string(n) +
                             " codes of " + std::to_string(k) + " bits need " + std::to_string(want));
  Tensor out = torch::empty({n}, torch::kUInt8);
  py::gil_scoped_release nogil;
  eoq::unpack_bits(packed.data_ptr<uint8_t>(), n, k, out.data_ptr<uint8_t>());
  return out;
}

std::tuple<Tensor, Tensor> absmax_quantize(const Tensor& w, int bits, int block, const c10::optional<Tensor>& importance) {
  require_f32(w, 2, "weight");
  const int64_t rows = w.size(0), cols = w.size(1);
  const float* imp = nullptr;
  if (importance) {
    require_f32(*importance, 1, "importance");
    require(importance->numel() == cols, "importance must have one value per input column");
    imp = importance->data_ptr<float>();
  }
  require(block >= 16 && block <= 256, "absmax: block must be in 16..256, got " + std::to_string(block));
  Tensor codes = torch::empty({rows, cols}, torch::kUInt8);
  Tensor scales = torch::empty({rows, (cols + block - 1) / block}, torch::kFloat16);
  py::gil_scoped_release nogil;
  eoq::absmax_quantize(w.data_ptr<float>(), rows, cols, bits, block, imp, codes.data_ptr<uint8_t>(),
                       reinterpret_cast<c10::Half*>(scales.data_ptr<at::Half>()));
  return {codes, scales};
}

Tensor absmax_dequantize(const Tensor& codes, const Tensor& scales, int bits, int block) {
  require(codes.scalar_type() == torch::kUInt8 && codes.dim() == 2 && codes.is_contiguous(), "codes must be contiguous 2-D uint8");
  require(block >= 16 && block <= 256, "absmax: block must be in 16..256, got " + std::to_string(block));
  const int64_t rows = codes.size(0), cols = codes.size(1);
  require(scales.scalar_type() == torch::kFloat16 && scales.is_contiguous() && scales.dim() == 2 &&
              scales.size(0) == rows && scales.size(1) == (cols + block - 1) / block,
          "scales must be contiguous float16 of shape [rows, ceil(cols / block)]");
  Tensor out = torch::empty({rows, cols}, torch::kFloat32);
  py::gil_scoped_release nogil;
  eoq::absmax_dequantize(codes.data_ptr<uint8_t>(), reinterpret_cast<const c10::Half*>(scales.data_ptr<at::Half>()), rows,
                         cols, bits, block, out.data_ptr<float>());
  return out;
}

Tensor hadamard_signs(int64_t n, uint64_t seed) {
  require(n >= 0, "n must be non-negative");
  const std::vector<float> s = eoq::hadamard_signs(n, seed);
  Tensor out = torch::empty({n}, torch::kFloat32);
  std::memcpy(out.data_ptr<float>(), s.data(), sizeof(float) * n);
  return out;
}

// Transforms a float32 tensor in place along its last dimension, blocks of `block`.
void hadamard_(Tensor& x, int64_t block, const c10::optional<Tensor>& signs, bool inverse) {
  require_f32(x, -1, "x");
  require(x.dim() >= 1 && block > 0 && x.size(-1) % block == 0, "last dimension must be a multiple of the block");
  const float* s = nullptr;
  if (signs) {
    require_f32(*signs, 1, "signs");
    require(signs->numel() == block, "signs must have one value per block position");
    s = signs->data_ptr<float>();
  }
  py::gil_scoped_release nogil;
  eoq::hadamard_inplace(x.data_ptr<float>(), x.numel() / block, block, s, inverse);
}

py::tuple lloyd_max(const std::string& density, int bits, int64_t dim, int64_t grid, int iters, double tol) {
  eoq::Density d;
  if (density == "gaussian")
    d = eoq::Density::kGaussian;
  else if (density == "sphere")
    d = eoq::Density::kSphere;
  else
    throw eoq::InvalidInput("lloyd_max: density must be 'gaussian' or 'sphere', got '" + density + "'");
  eoq::LloydMax r;
  {
    py::gil_scoped_release nogil;
    r = eoq::lloyd_max(d, bits, dim, grid, iters, tol);
  }
  Tensor c = torch::from_blob(r.centroids.data(), {static_cast<int64_t>(r.centroids.size())}, torch::kFloat64).clone();
  Tensor b = torch::from_blob(r.boundaries.data(), {static_cast<int64_t>(r.boundaries.size())}, torch::kFloat64).clone();
  return py::make_tuple(c, b, r.mse, r.iterations);
}

Tensor codebook_quantize(const Tensor& x, const Tensor& boundaries) {
  require_f32(x, -1, "x");
  require_f32(boundaries, 1, "boundaries");
  require(boundaries.numel() < 256, "at most 255 boundaries (256 levels)");
  Tensor codes = torch::empty(x.sizes(), torch::kUInt8);
  py::gil_scoped_release nogil;
  eoq::codebook_quantize(x.data_ptr<float>(), x.numel(), boundaries.data_ptr<float>(),
                         static_cast<int>(boundaries.numel()), codes.data_ptr<uint8_t>());
  return codes;
}

// CRC32C of a contiguous CPU tensor's bytes (any dtype: its memory as it lies, which on
// this little-endian build is the safetensors byte order), extending `value`, the CRC32C
// of whatever came before. The GIL is released: checksumming a shard's tensors from
// several Python threads overlaps.
uint32_t crc32c(const Tensor& t, bool portable, uint32_t value) {
  require(t.is_contiguous() && t.device().is_cpu() && t.layout() == torch::kStrided,
          "data must be a contiguous strided CPU tensor");
  const uint8_t* p = static_cast<const uint8_t*>(t.data_ptr());
  const size_t n = t.nbytes();
  py::gil_scoped_release nogil;
  return portable ? eoq::crc32c_portable(p, n, value) : eoq::crc32c(p, n, value);
}

// Opt-in (EOQ_HUGE_PAGES=1, read once): ask for transparent huge pages on a fresh output's
// 2 MiB-aligned interior before the first write. Measured both ways on 2 cores: alone, a
// fused decode into fresh memory got ~1.5x faster (4 KiB page faults cost about as much as
// the decode), but inside from_pretrained of a 1.1 B model the kernel calls took 4.0-4.5 s
// with the advice against 2.9 s without, so it is off by default. Advice only: where THP is
// off the call changes nothing, and its failure is ignored.
void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* e = std::getenv("EOQ_HUGE_PAGES");
    return e && std::string(e) == "1";
  }();
  if (!enabled) return;
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr()), n = t.nbytes();
  const uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1), e = (p + n) & ~(kHuge - 1);
  if (n >= 2 * kHuge && e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#endif
}

// Fused ecsq dequantization (dequant.h) of `codes`: an EOQR stream when rans, else plain
// rows x padded uint8 codes. Writes into `out` when given (contiguous [rows, cols] of dtype).
Tensor ecsq_dequantize(const Tensor& codes, bool rans, int64_t rows, int64_t cols, int64_t padded, int64_t block,
                       uint64_t seed, int64_t offset, const Tensor& steps, int64_t group_rows,
                       const c10::optional<Tensor>& awq, at::ScalarType dtype, const c10::optional<Tensor>& out_opt,
                       const c10::optional<Tensor>& low, int64_t low_bits, const c10::optional<Tensor>& recon) {
  require_u8_1d(codes, "codes");
  require_f32(steps, 1, "steps");
  eoq::EcsqParams p;
  if (dtype == torch::kFloat32)
    p.out_type = eoq::OutType::kFloat32;
  else if (dtype == torch::kFloat16)
    p.out_type = eoq::OutType::kFloat16;
  else if (dtype == torch::kBFloat16)
    p.out_type = eoq::OutType::kBFloat16;
  else
    throw eoq::InvalidInput("ecsq_dequantize: dtype must be float32, float16 or bfloat16");
  p.rows = rows;
  p.cols = cols;
  p.padded = padded;
  p.block = block;
  p.seed = seed;
  p.offset = offset;
  p.steps = steps.data_ptr<float>();
  p.n_steps = steps.numel();
  p.group_rows = group_rows;
  if (awq) {
    require_f32(*awq, 1, "awq_scales");
    require(awq->numel() == cols, "awq_scales must have one value per column");
    p.awq = awq->data_ptr<float>();
  }
  require(low_bits >= 0 && low_bits <= 8, "low_bits must be in [0, 8]");
  p.low_bits = static_cast<int>(low_bits);
  if (low) {
    require_u8_1d(*low, "low");
    p.low = low->data_ptr<uint8_t>();
  }
  if (recon) {
    require_f32(*recon, 1, "recon");
    require(recon->numel() >= 1 && recon->numel() <= 8, "recon must hold 1..8 values");
    p.recon = recon->data_ptr<float>();
    p.n_recon = static_cast<int>(recon->numel());
  }
  eoq::ecsq_check(p);  // before anything is sized from the arguments
  if (low) {
    const uint64_t n = static_cast<uint64_t>(rows) * static_cast<uint64_t>(padded);
    require(static_cast<uint64_t>(low->numel()) == eoq::packed_size(n, static_cast<int>(low_bits)),
            "low must hold rows * padded_cols values of low_bits bits, packed");
  }
  const uint8_t* src = codes.data_ptr<uint8_t>();
  const size_t len = codes.numel();
  eoq::rans::Header h;
  if (rans) {
    h = eoq::rans::parse(src, len);
    const uint64_t want = static_cast<uint64_t>(rows) * static_cast<uint64_t>(padded);
    if (h.n_symbols != want)
      throw eoq::CorruptStream("rANS stream declares " + std::to_string(h.n_symbols) + " codes, expected " +
                               std::to_string(want) + " (" + std::to_string(rows) + " x " + std::to_string(padded) + ")");
  } else {
    require(static_cast<uint64_t>(len) == static_cast<uint64_t>(rows) * static_cast<uint64_t>(padded),
            "codes must hold rows * padded_cols values");
  }
  Tensor out;
  if (out_opt) {
    out = *out_opt;
    require(out.scalar_type() == dtype && out.is_contiguous() && out.device().is_cpu() && out.dim() == 2 &&
                out.size(0) == rows && out.size(1) == cols,
            "out must be a contiguous CPU tensor of the output dtype and shape [rows, cols]");
  } else {
    out = torch::empty({rows, cols}, torch::TensorOptions().dtype(dtype));
    advise_huge_pages(out);
  }
  p.out = out.data_ptr();
  py::gil_scoped_release nogil;
  if (rans)
    eoq::ecsq_dequantize_rans(src, len, h, p);
  else
    eoq::ecsq_dequantize_codes(src, p);
  return out;
}

// GPTQ error feedback (gptq.h): int32 codes and the float32 reconstruction, both [rows, n].
// levels: None for the uniform grid [qmin, qmax], else the sorted codebook (codes = indices).
std::tuple<Tensor, Tensor> gptq_quantize(const Tensor& w, const Tensor& u, const Tensor& scale, int64_t group,
                                         const c10::optional<Tensor>& levels, int64_t qmin, int64_t qmax,
                                         int64_t block) {
  require_f32(w, 2, "w");
  require_f32(u, 2, "u");
  require_f32(scale, 2, "scale");
  const int64_t rows = w.size(0), n = w.size(1);
  require(u.size(0) == n && u.size(1) == n, "gptq: u must be [n, n] with n = " + std::to_string(n) +
                                                " (w's columns), got [" + std::to_string(u.size(0)) + ", " +
                                                std::to_string(u.size(1)) + "]");
  require(group >= 1, "gptq: group must be >= 1, got " + std::to_string(group));
  const int64_t groups = n / group + (n % group != 0);
  require(scale.size(0) == rows && scale.size(1) == groups,
          "gptq: scale must be [rows, ceil(n / group)] = [" + std::to_string(rows) + ", " + std::to_string(groups) +
              "], got [" + std::to_string(scale.size(0)) + ", " + std::to_string(scale.size(1)) + "]");
  const float* lv = nullptr;
  int64_t n_levels = 0;
  if (levels) {
    require_f32(*levels, 1, "levels");
    lv = levels->data_ptr<float>();
    n_levels = levels->numel();
  }
  Tensor codes = torch::empty({rows, n}, torch::kInt32);
  Tensor xhat = torch::empty({rows, n}, torch::kFloat32);
  py::gil_scoped_release nogil;
  eoq::gptq_quantize(w.data_ptr<float>(), rows, n, u.data_ptr<float>(), scale.data_ptr<float>(), group, lv, n_levels,
                     qmin, qmax, block, codes.data_ptr<int32_t>(), xhat.data_ptr<float>());
  return {codes, xhat};
}

// (qmin, counts int64 [span], per-row squared errors float64 [rows] or None): one pass of
// the uniform quantizer at `step` (code_histogram.h).
std::tuple<int64_t, Tensor, c10::optional<Tensor>> code_histogram(const Tensor& x, double step, double xmin, double xmax,
                                                                 bool row_error) {
  require_f32(x, 2, "x");
  int64_t qmin = 0, span = 0;
  eoq::code_range(static_cast<float>(xmin), static_cast<float>(xmax), static_cast<float>(step), &qmin, &span);
  Tensor hist = torch::empty({span}, torch::kInt64);
  c10::optional<Tensor> err;
  if (row_error) err = torch::empty({x.size(0)}, torch::kFloat64);
  py::gil_scoped_release nogil;
  eoq::code_histogram(x.data_ptr<float>(), x.size(0), x.size(1), static_cast<float>(step), qmin, span,
                      hist.data_ptr<int64_t>(), row_error ? err->data_ptr<double>() : nullptr);
  return {qmin, hist, err};
}

// ecsq's fitted-reconstruction sums (code_histogram.h recon_sums): float64 [3 top + 1].
// `start`: sums to add onto (the previous row chunk's), else zeros.
Tensor recon_sums(const Tensor& x, const Tensor& q, const Tensor& row_step, int64_t top,
                  const c10::optional<Tensor>& start) {
  require_f32(x, 2, "x");
  require_f32(q, 2, "q");
  require_f32(row_step, 1, "row_step");
  require(q.sizes() == x.sizes(), "q must have x's shape");
  require(row_step.numel() == x.size(0), "row_step must hold one step per row");
  require(top >= 1 && top <= 64, "top must be in 1..64");
  Tensor sums = torch::zeros({3 * top + 1}, torch::kFloat64);
  if (start.has_value()) {
    require(start->scalar_type() == torch::kFloat64 && start->dim() == 1 && start->numel() == 3 * top + 1,
            "start must be float64 [3 top + 1]");
    sums.copy_(*start);
  }
  py::gil_scoped_release nogil;
  eoq::recon_sums(x.data_ptr<float>(), q.data_ptr<float>(), row_step.data_ptr<float>(), x.size(0), x.size(1),
                  static_cast<int>(top), sums.data_ptr<double>());
  return sums;
}

// The kernel's roundings on a float32 tensor, for tests: bf16 / fp16 bits as int32.
Tensor round_bits(const Tensor& x, bool bf16) {
  require_f32(x, 1, "x");
  Tensor out = torch::empty({x.numel()}, torch::kInt32);
  const float* a = x.data_ptr<float>();
  int32_t* o = out.data_ptr<int32_t>();
  for (int64_t i = 0; i < x.numel(); ++i) o[i] = bf16 ? eoq::float_to_bf16(a[i]) : eoq::float_to_fp16(a[i]);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "eoq C++ kernels (use the wrappers in eoq.ops)";
  py::register_exception<eoq::CorruptStream>(m, "CorruptStreamError", PyExc_ValueError);
  m.def("rans_encode", &rans_encode);
  m.def("rans_decode", &rans_decode, py::arg("stream"), py::arg("out") = py::none(), py::arg("expected") = py::none());
  m.def("rans_info", &rans_info);
  m.def("rans_decoder_name", &eoq::rans::decoder_name);
  m.def("pack_bits", &pack_bits);
  m.def("unpack_bits", &unpack_bits);
  m.def("absmax_quantize", &absmax_quantize);
  m.def("absmax_dequantize", &absmax_dequantize);
  m.def("hadamard_signs", &hadamard_signs);
  m.def("hadamard_", &hadamard_);
  m.def("lloyd_max", &lloyd_max);
  m.def("codebook_quantize", &codebook_quantize);
  m.def("ecsq_dequantize", &ecsq_dequantize, py::arg("codes"), py::arg("rans"), py::arg("rows"), py::arg("cols"),
        py::arg("padded"), py::arg("block"), py::arg("seed"), py::arg("offset"), py::arg("steps"),
        py::arg("group_rows"), py::arg("awq"), py::arg("dtype"), py::arg("out"), py::arg("low") = py::none(),
        py::arg("low_bits") = 0, py::arg("recon") = py::none());
  m.def("dequant_kernel_name", &eoq::dequant_kernel_name);
  m.def("round_bits", &round_bits);
  m.def("crc32c", &crc32c, py::arg("data"), py::arg("portable") = false, py::arg("value") = 0u);
  m.def("gptq_quantize", &gptq_quantize);
  m.def("code_histogram", &code_histogram);
  m.def("recon_sums", &recon_sums, py::arg("x"), py::arg("q"), py::arg("row_step"), py::arg("top"),
        py::arg("start") = py::none());
  m.attr("RANS_DEFAULT_SCALE_BITS") = eoq::rans::kDefaultScaleBits;
  m.attr("RANS_DEFAULT_CHUNK") = eoq::rans::kDefaultChunk;
}
