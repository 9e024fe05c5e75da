// Fused CPU kernels for the kernel seam (runtime/kernels/__init__.py has the semantics, reference.py the
// oracle). Each use reads its adapter's weights in place from the slot buffer (Punica's BGMV shape): no
// gather of weights, no per-use temporaries beyond one activation row. Products accumulate in float32 and
// every output element is rounded once into y's dtype, after all of its row's uses. Rows that share a slot (a
// run of consecutive uses of one slot: callers sort uses by slot) are computed up to kTile at a time from one
// load of the weights, each row's sums in exactly the order they take when the row runs alone: a row's result,
// bit for bit, does not depend on how many other rows share its adapter. Work is split over such tiles of uses
// (shrink) or over tiles of rows, or (tile, column block) pairs when they are few (expand; the gathers go by
// row), so no two threads write one element.
// The hot loops are compiled for AVX-512, AVX2 and plain x86-64 and picked at load (target_clones), so a
// cached binary runs on any x86-64 CPU.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HUB_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HUB_CLONES
#endif

namespace {

// Multiply-adds per task, and below which a call stays on the calling thread. Small enough that a decode
// step's calls with many distinct adapters split over the cores (their weights stream from memory, and one
// core left the engine's decode step slower than the stacked batched matmuls it replaced, which use every
// thread); a decode call with one shared adapter stays on one thread. On a busy machine a parallel region
// waits for a descheduled thread (docs/benchmarks.md, "Kernels"): that cost is taken for the idle case.
constexpr int64_t kWork = 1 << 16;
constexpr int64_t kBlock = 256;      // output columns per expand/gather task when rows are too few to split by

#define HUB_INLINE inline __attribute__((always_inline))
// The vector helpers below return 64-byte vectors; they are always inlined, so the warning that such a return
// has another ABI without AVX-512 (the generic clones) concerns no call that exists.
#pragma GCC diagnostic ignored "-Wpsabi"

// Explicit vectors (GCC's extension: one zmm register under AVX-512, two ymm under AVX2, four xmm otherwise), so
// that every element's arithmetic is spelled out lane by lane and no compiler choice (vector width, unrolling,
// the order of a reduction) decides a sum's order.
typedef float vf __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef uint16_t vh __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(64)));
constexpr int64_t kVec = 16;

HUB_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

HUB_INLINE vf load(const uint16_t* p) {  // bfloat16 bits widened to float32
  vh h;
  std::memcpy(&h, p, sizeof h);
  vu w = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

HUB_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

HUB_INLINE float widen(float v) { return v; }

HUB_INLINE float widen(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The last n < kVec elements of a row, the other lanes zero (nothing past the row is read).
template <typename W>
HUB_INLINE vf load_part(const W* p, int64_t n) {
  W tmp[kVec] = {};
  std::memcpy(tmp, p, n * sizeof(W));
  return load(tmp);
}

// The sum of a dot product's lanes, always in this tree (halves, then quarters, then the last four pairwise).
HUB_INLINE float hsum(vf v) {
  vf8 lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  const vf8 s8 = lo + hi;
  vf4 a, b;
  std::memcpy(&a, &s8, sizeof a);
  std::memcpy(&b, reinterpret_cast<const char*>(&s8) + sizeof a, sizeof b);
  const vf4 s4 = a + b;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// Every dot product here runs one pattern: element j of a length-k dot goes to lane j % kVec of one vector
// accumulator (starting at zero, j in order, the tail padded with zeros), and the lanes are summed by `hsum`.
// dots_block computes N weight rows (stride ld) against R activation rows (x[t], float32, readable and zero up to a
// multiple of kVec) at once: the R x N products are independent chains that one load of each weight vector
// feeds, and each is the same chain, operation for operation, as when it runs alone (R = N = 1). So a row's
// result does not depend on how many neighbours share its weights. out[t * os + m] = W[m, :] . x[t].
template <int R, int N, typename W>
HUB_INLINE void dots_block(const W* w, int64_t ld, int64_t k, const float* const* x, float* out, int64_t os) {
  vf acc[N][R];
  for (int m = 0; m < N; ++m)
    for (int t = 0; t < R; ++t) acc[m][t] = vf{};
  const int64_t full = k / kVec * kVec;
  for (int64_t j = 0; j < full; j += kVec) {
    vf wv[N];
    for (int m = 0; m < N; ++m) wv[m] = load(w + m * ld + j);
    for (int t = 0; t < R; ++t) {
      const vf xv = load(x[t] + j);
      for (int m = 0; m < N; ++m) acc[m][t] += wv[m] * xv;
    }
  }
  if (full < k) {
    vf wv[N];
    for (int m = 0; m < N; ++m) wv[m] = load_part(w + m * ld + full, k - full);
    for (int t = 0; t < R; ++t) {
      const vf xv = load(x[t] + full);
      for (int m = 0; m < N; ++m) acc[m][t] += wv[m] * xv;
    }
  }
  for (int m = 0; m < N; ++m)
    for (int t = 0; t < R; ++t) out[t * os + m] = hsum(acc[m][t]);
}

// out[t * os + i] = W[i, :] . x[t] for i < n weight rows, t < rows (1 to kTile). One row reads the weight rows one
// at a time (a distinct adapter's weights stream from memory in one sweep); several read them in pairs.
template <int R, typename W>
HUB_INLINE void dots_rows(const W* w, int64_t n, int64_t k, int64_t ld, const float* const* x, float* out,
                          int64_t os) {
  int64_t i = 0;
  if (R > 1)
    for (; i + 2 <= n; i += 2) dots_block<R, 2>(w + i * ld, ld, k, x, out + i, os);
  for (; i < n; ++i) dots_block<R, 1>(w + i * ld, ld, k, x, out + i, os);
}

constexpr int64_t kTile = 4;  // activation rows that share one load of their adapter's weights

template <typename W>
HUB_INLINE void dots(int64_t rows, const W* w, int64_t n, int64_t k, int64_t ld, const float* const* x, float* out,
                     int64_t os) {
  switch (rows) {
    case 1: dots_rows<1>(w, n, k, ld, x, out, os); break;
    case 2: dots_rows<2>(w, n, k, ld, x, out, os); break;
    case 3: dots_rows<3>(w, n, k, ld, x, out, os); break;
    default: dots_rows<kTile>(w, n, k, ld, x, out, os); break;
  }
}

HUB_CLONES void dots_f32(int64_t rows, const float* w, int64_t n, int64_t k, int64_t ld, const float* const* x,
                         float* out, int64_t os) {
  dots(rows, w, n, k, ld, x, out, os);
}

HUB_CLONES void dots_bf16(int64_t rows, const uint16_t* w, int64_t n, int64_t k, int64_t ld, const float* const* x,
                          float* out, int64_t os) {
  dots(rows, w, n, k, ld, x, out, os);
}

// dst[t][c] += s[t * ss + 0] * v[c] + s[t * ss + 1] * v[ld + c] + ... for t < R rows: the r rows of v added in
// row order, a chunk of columns at a time held in registers (dst loaded and stored once per chunk, not once per
// row of v). Fresh: the chain starts from zero and its sum is added to dst at the end (dst is y itself);
// otherwise it continues from dst (an accumulator that a row's several uses add into). Each loaded chunk of v
// feeds all R rows, and each element's chain is the same whatever R is: a row's sum does not depend on its
// neighbours.
constexpr int64_t kChunk = 2 * kVec;

template <int R, bool Fresh, typename B>
HUB_INLINE void axpys_rows(const float* s, int64_t ss, int64_t r, const B* v, int64_t ld, int64_t n,
                           float* const* dst) {
  int64_t c0 = 0;
  for (; c0 + kChunk <= n; c0 += kChunk) {
    vf t0[R], t1[R];
    for (int t = 0; t < R; ++t) {
      t0[t] = Fresh ? vf{} : load(dst[t] + c0);
      t1[t] = Fresh ? vf{} : load(dst[t] + c0 + kVec);
    }
    for (int64_t j = 0; j < r; ++j) {
      const vf v0 = load(v + j * ld + c0), v1 = load(v + j * ld + c0 + kVec);
      for (int t = 0; t < R; ++t) {
        const float sj = s[t * ss + j];
        t0[t] += sj * v0;
        t1[t] += sj * v1;
      }
    }
    for (int t = 0; t < R; ++t) {
      store(dst[t] + c0, Fresh ? load(dst[t] + c0) + t0[t] : t0[t]);
      store(dst[t] + c0 + kVec, Fresh ? load(dst[t] + c0 + kVec) + t1[t] : t1[t]);
    }
  }
  for (int t = 0; t < R; ++t)
    for (int64_t c = c0; c < n; ++c) {
      float sum = Fresh ? 0.f : dst[t][c];
      for (int64_t j = 0; j < r; ++j) sum += s[t * ss + j] * widen(v[j * ld + c]);
      dst[t][c] = Fresh ? dst[t][c] + sum : sum;
    }
}

template <bool Fresh, typename B>
HUB_INLINE void axpys_tile(int64_t rows, const float* s, int64_t ss, int64_t r, const B* v, int64_t ld, int64_t n,
                           float* const* dst) {
  switch (rows) {
    case 1: axpys_rows<1, Fresh>(s, ss, r, v, ld, n, dst); break;
    case 2: axpys_rows<2, Fresh>(s, ss, r, v, ld, n, dst); break;
    case 3: axpys_rows<3, Fresh>(s, ss, r, v, ld, n, dst); break;
    default: axpys_rows<kTile, Fresh>(s, ss, r, v, ld, n, dst); break;
  }
}

template <typename B>
HUB_INLINE void axpys(bool fresh, int64_t rows, const float* s, int64_t ss, int64_t r, const B* v, int64_t ld,
                      int64_t n, float* const* dst) {
  if (fresh)
    axpys_tile<true>(rows, s, ss, r, v, ld, n, dst);
  else
    axpys_tile<false>(rows, s, ss, r, v, ld, n, dst);
}

HUB_CLONES void axpys_f32(bool fresh, int64_t rows, const float* s, int64_t ss, int64_t r, const float* v,
                          int64_t ld, int64_t n, float* const* dst) {
  axpys(fresh, rows, s, ss, r, v, ld, n, dst);
}

HUB_CLONES void axpys_bf16(bool fresh, int64_t rows, const float* s, int64_t ss, int64_t r, const uint16_t* v,
                           int64_t ld, int64_t n, float* const* dst) {
  axpys(fresh, rows, s, ss, r, v, ld, n, dst);
}

// out[j] += acc[j]: a row's sum written into a float32 y.
HUB_CLONES void add_f32(float* out, const float* acc, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] += acc[j];
}

// out[j] = bfloat16(float(out[j]) + acc[j]) for a bfloat16 y, rounded as c10::BFloat16 rounds (to nearest even,
// NaN to 0x7FC0), in a loop the compiler vectorizes (the conversion operator is not).
HUB_CLONES void add_bf16(uint16_t* out, const float* acc, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float f = widen(out[j]) + acc[j];
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    out[j] = f != f ? uint16_t{0x7FC0} : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
}

// acc[j] += s * v[j] (float32 or bfloat16 v, contiguous).
HUB_CLONES void axpy_f32(float s, const float* v, int64_t n, float* acc) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += s * v[j];
}

HUB_CLONES void axpy_bf16(float s, const uint16_t* v, int64_t n, float* acc) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += s * widen(v[j]);
}

HUB_CLONES void widen_bf16(const uint16_t* src, int64_t n, float* dst) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = widen(src[j]);
}

// dst[j] = src[j * stride] as float32, j < n.
template <typename T>
void to_float(const T* src, int64_t stride, int64_t n, float* dst) {
  if (stride == 1 && std::is_same<T, float>::value) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if (stride == 1 && std::is_same<T, at::BFloat16>::value) {
    widen_bf16(reinterpret_cast<const uint16_t*>(src), n, dst);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j * stride]);
  }
}

// Lengths of activation buffers that `dots` reads whole vectors of: k rounded up to a vector, the rest zero.
int64_t padded(int64_t k) { return (k + kVec - 1) / kVec * kVec; }

// out[t * os + i] = W[i, :] . x[t] for a [n, k] weight matrix with strides (si, sk), whatever its dtype and
// layout, and `rows` activation rows (x[t], readable and zero from k up to `padded(k)`): the fast loops when its
// rows are contiguous, else each weight row widened into `scratch` (room for k) first. Every way runs
// `dots_block`'s one pattern.
template <typename W>
void gemv(int64_t rows, const W* w, int64_t n, int64_t k, int64_t si, int64_t sk, const float* const* x,
          float* out, int64_t os, float* scratch) {
  if (sk == 1 && std::is_same<W, float>::value) {
    dots_f32(rows, reinterpret_cast<const float*>(w), n, k, si, x, out, os);
  } else if (sk == 1 && std::is_same<W, at::BFloat16>::value) {
    dots_bf16(rows, reinterpret_cast<const uint16_t*>(w), n, k, si, x, out, os);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      to_float(w + i * si, sk, k, scratch);
      dots_f32(rows, scratch, 1, k, k, x, out + i, os);
    }
  }
}

template <typename W>
void axpy(float s, const W* v, int64_t stride, int64_t n, float* acc) {
  if (stride == 1 && std::is_same<W, float>::value) {
    axpy_f32(s, reinterpret_cast<const float*>(v), n, acc);
  } else if (stride == 1 && std::is_same<W, at::BFloat16>::value) {
    axpy_bf16(s, reinterpret_cast<const uint16_t*>(v), n, acc);
  } else {
    for (int64_t j = 0; j < n; ++j) acc[j] += s * static_cast<float>(v[j * stride]);
  }
}

// Calls f with a null pointer of the C++ type of `dtype` (float32, bfloat16 or float16).
template <typename F>
void with_type(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<at::BFloat16*>(nullptr)); break;
    case at::kHalf: f(static_cast<at::Half*>(nullptr)); break;
    default: TORCH_CHECK(false, "kernels: ", what, " must be float32, bfloat16 or float16, got ", dtype);
  }
}

struct Uses {
  std::vector<int64_t> rows, slots, order, starts;  // order: uses grouped by row; starts: each group's start
  std::vector<float> scale;
};

// The uses as host vectors, checked against the tensors they index, grouped by row (counting sort, keeping
// each row's uses in their given order, so a row's sum or product always runs in one order).
Uses read_uses(const at::Tensor& rows, const at::Tensor& slots, const at::Tensor* scale, int64_t n_rows,
               int64_t n_slots, bool group) {
  TORCH_CHECK(rows.device().is_cpu() && slots.device().is_cpu(), "kernels: rows and slots must be on the CPU");
  Uses u;
  auto r = rows.contiguous(), s = slots.contiguous();
  u.rows.assign(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + r.numel());
  u.slots.assign(s.data_ptr<int64_t>(), s.data_ptr<int64_t>() + s.numel());
  for (size_t i = 0; i < u.rows.size(); ++i) {
    TORCH_CHECK(u.rows[i] >= 0 && u.rows[i] < n_rows, "kernels: row ", u.rows[i], " out of range [0, ", n_rows, ")");
    TORCH_CHECK(u.slots[i] >= 0 && u.slots[i] < n_slots, "kernels: slot ", u.slots[i], " out of range [0, ",
                n_slots, ")");
  }
  if (scale != nullptr) {
    auto f = scale->to(at::kFloat).contiguous();
    u.scale.assign(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
  }
  if (group) {
    std::vector<int64_t> count(n_rows + 1, 0);
    for (int64_t row : u.rows) ++count[row + 1];
    for (int64_t i = 0; i < n_rows; ++i) count[i + 1] += count[i];
    std::vector<int64_t> next(count.begin(), count.end() - 1);
    u.order.resize(u.rows.size());
    for (size_t i = 0; i < u.rows.size(); ++i) u.order[next[u.rows[i]]++] = static_cast<int64_t>(i);
    for (int64_t i = 0; i < n_rows; ++i)
      if (count[i + 1] > count[i]) u.starts.push_back(count[i]);
    u.starts.push_back(static_cast<int64_t>(u.rows.size()));
  }
  return u;
}

// What the tasks of an op that writes rows go by: units, each a list of uses. A plain unit is one row's uses, in
// their order; a tiled unit is up to kTile rows with one use each, all of one slot, computed side by side.
struct Units {
  std::vector<int64_t> members, starts;  // unit i: uses members[starts[i]], ..., members[starts[i + 1] - 1]
  std::vector<uint8_t> tiled;
};

// One unit per row group.
Units row_units(const Uses& u) {
  Units out{u.order, u.starts, std::vector<uint8_t>(u.starts.empty() ? 0 : u.starts.size() - 1, 0)};
  return out;
}

// Rows with one use each go kTile at a time while consecutive such uses (in the given order, which callers sort
// by slot) name one slot; each row with several uses is a unit of its own.
Units tiled_units(const Uses& u) {
  Units out;
  const int64_t groups = static_cast<int64_t>(u.starts.size()) - 1;
  std::vector<uint8_t> alone(u.rows.size(), 0);
  for (int64_t g = 0; g < groups; ++g)
    if (u.starts[g + 1] - u.starts[g] == 1) alone[u.order[u.starts[g]]] = 1;
  int64_t open = -1;  // the slot of the tiled unit being filled, if it may take more
  for (size_t i = 0; i < u.rows.size(); ++i) {
    if (!alone[i]) continue;
    const int64_t size = static_cast<int64_t>(out.members.size()) - (out.starts.empty() ? 0 : out.starts.back());
    if (open != u.slots[i] || size == kTile) {
      out.starts.push_back(static_cast<int64_t>(out.members.size()));
      out.tiled.push_back(1);
      open = u.slots[i];
    }
    out.members.push_back(static_cast<int64_t>(i));
  }
  for (int64_t g = 0; g < groups; ++g) {
    if (u.starts[g + 1] - u.starts[g] == 1) continue;
    out.starts.push_back(static_cast<int64_t>(out.members.size()));
    out.tiled.push_back(0);
    out.members.insert(out.members.end(), u.order.begin() + u.starts[g], u.order.begin() + u.starts[g + 1]);
  }
  out.starts.push_back(static_cast<int64_t>(out.members.size()));
  return out;
}

// Runs body(uses, count, tiled, column begin, column end, destinations, fresh, scratch) over every (unit, column
// block), in parallel. A tiled unit's body adds one destination row per use, a plain one adds the row's uses
// into one. Destinations are accumulators that start at 0 for a sum (y + acc is written after the body) or 1 for
// a product (y * acc), except for tiled units when `direct`: then they are y's rows themselves (float32,
// contiguous) and `fresh` tells the body to add its sum into them once. `scratch` is the task's to use as the
// body likes (kept from unit to unit: no allocation per unit).
template <typename Y, typename Body>
void per_unit_block(at::Tensor& y, const Uses& u, const Units& units, int64_t work_per_column, bool product,
                    bool direct, Body&& body) {
  const int64_t count = static_cast<int64_t>(units.starts.size()) - 1, cols = y.size(1);
  if (count <= 0 || cols == 0) return;
  // Whole rows when the units alone give every thread several tasks: a use's weights then stream in one sweep
  // (column blocks read each of a slot's r rows in short pieces, which the prefetchers follow badly).
  const int64_t block = count >= 4 * at::get_num_threads() ? cols : kBlock;
  const int64_t blocks = (cols + block - 1) / block;
  Y* base = y.data_ptr<Y>();
  const int64_t s0 = y.stride(0), s1 = y.stride(1);
  const int64_t per_unit = std::max<int64_t>(1, static_cast<int64_t>(u.rows.size()) / count);
  const int64_t grain = std::max<int64_t>(1, kWork / std::max<int64_t>(1, work_per_column * block * per_unit));
  at::parallel_for(0, count * blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(kTile * block), scratch;
    float* dst[kTile];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / blocks, c0 = (t % blocks) * block, c1 = std::min(cols, c0 + block);
      const int64_t* uses = units.members.data() + units.starts[g];
      const int64_t n = units.starts[g + 1] - units.starts[g];
      const bool tiled = units.tiled[g];
      if (tiled && direct) {
        for (int64_t q = 0; q < n; ++q) dst[q] = reinterpret_cast<float*>(base + u.rows[uses[q]] * s0) + c0;
        body(uses, n, tiled, c0, c1, dst, true, scratch);
        continue;
      }
      const int64_t filled = tiled ? n : 1;
      for (int64_t q = 0; q < filled; ++q) {
        dst[q] = acc.data() + q * block;
        if (product)
          std::fill(dst[q], dst[q] + (c1 - c0), 1.f);
        else
          std::memset(dst[q], 0, (c1 - c0) * sizeof(float));
      }
      body(uses, n, tiled, c0, c1, dst, false, scratch);
      for (int64_t q = 0; q < filled; ++q) {
        Y* out = base + u.rows[uses[q]] * s0;
        const float* a = dst[q];
        if (s1 == 1 && !product && std::is_same<Y, float>::value) {  // the common case, in vector registers
          add_f32(reinterpret_cast<float*>(out) + c0, a, c1 - c0);
          continue;
        }
        if (s1 == 1 && !product && std::is_same<Y, at::BFloat16>::value) {
          add_bf16(reinterpret_cast<uint16_t*>(out) + c0, a, c1 - c0);
          continue;
        }
        if (s1 == 1 && !product) {  // as one loop the compiler vectorizes
          for (int64_t j = c0; j < c1; ++j) out[j] = static_cast<Y>(static_cast<float>(out[j]) + a[j - c0]);
          continue;
        }
        for (int64_t j = c0; j < c1; ++j) {
          const float old = static_cast<float>(out[j * s1]);
          out[j * s1] = static_cast<Y>(product ? old * a[j - c0] : old + a[j - c0]);
        }
      }
    }
  });
}

// The shapes an op indexes by, checked before any read: the techniques call the backend without the seam's Python
// checks (runtime/kernels/__init__.py), and a wrong size here would read or write past a tensor.
void check_shapes(const at::Tensor& y, const at::Tensor& w, int64_t w_dim, int64_t feature_dim, const char* what,
                  const at::Tensor& rows, const at::Tensor& slots, const at::Tensor* scale) {
  TORCH_CHECK(y.dim() == 2, "kernels: expected a 2-D [tokens, features] tensor, got ", y.dim(), " dimensions");
  TORCH_CHECK(w.dim() == w_dim && w.size(feature_dim) == y.size(1), "kernels: ", what, " of shape ", w.sizes(),
              " does not fit ", y.size(1), " features");
  TORCH_CHECK(rows.dim() == 1 && slots.dim() == 1 && rows.numel() == slots.numel() &&
                  (scale == nullptr || (scale->dim() == 1 && scale->numel() == rows.numel())),
              "kernels: rows, slots (and scale) must be 1-D of one length");
  TORCH_CHECK(rows.scalar_type() == at::kLong && slots.scalar_type() == at::kLong, "kernels: rows and slots must be int64");
}

// Uses [first, first + n) of one slot, consecutive in the given order, kTile at a time: the tasks of a shrink.
std::vector<int64_t> slot_tiles(const Uses& u) {
  std::vector<int64_t> starts;
  for (size_t i = 0; i < u.slots.size(); ++i)
    if (i == 0 || u.slots[i] != u.slots[i - 1] || static_cast<int64_t>(i) - starts.back() == kTile)
      starts.push_back(static_cast<int64_t>(i));
  starts.push_back(static_cast<int64_t>(u.slots.size()));
  return starts;
}

at::Tensor lora_shrink(const at::Tensor& x, const at::Tensor& a, const at::Tensor& rows, const at::Tensor& slots) {
  check_shapes(x, a, 3, 2, "a", rows, slots, nullptr);
  const int64_t n = rows.numel(), r = a.size(1), d = a.size(2), dp = padded(d);
  Uses u = read_uses(rows, slots, nullptr, x.size(0), a.size(0), false);
  at::Tensor h = at::empty({n, r}, x.options().dtype(at::kFloat));
  if (n == 0 || r == 0) return h;
  float* hp = h.data_ptr<float>();
  const std::vector<int64_t> tiles = slot_tiles(u);
  const int64_t count = static_cast<int64_t>(tiles.size()) - 1;
  with_type(x.scalar_type(), "x", [&](auto* xt) {
    using X = std::remove_pointer_t<decltype(xt)>;
    with_type(a.scalar_type(), "a", [&](auto* at_) {
      using A = std::remove_pointer_t<decltype(at_)>;
      const X* xp = x.data_ptr<X>();
      const A* ap = a.data_ptr<A>();
      const int64_t grain = std::max<int64_t>(1, kWork * count / std::max<int64_t>(1, r * d * n));
      // float32 rows whose length is whole vectors are read where they lie, others copied and padded
      const bool in_place = std::is_same<X, float>::value && x.stride(1) == 1 && d == dp;
      at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
        std::vector<float> xf(kTile * dp, 0.f), scratch(d);  // the tile's activation rows, zero-padded
        const float* xr[kTile];
        for (int64_t t = begin; t < end; ++t) {
          const int64_t first = tiles[t], m = tiles[t + 1] - first;
          for (int64_t q = 0; q < m; ++q) {
            const X* row = xp + u.rows[first + q] * x.stride(0);
            if (in_place) {
              xr[q] = reinterpret_cast<const float*>(row);
              continue;
            }
            to_float(row, x.stride(1), d, xf.data() + q * dp);
            xr[q] = xf.data() + q * dp;
          }
          gemv(m, ap + u.slots[first] * a.stride(0), r, d, a.stride(1), a.stride(2), xr, hp + first * r, r,
               scratch.data());
        }
      });
    });
  });
  return h;
}

void lora_expand(at::Tensor y, const at::Tensor& h, const at::Tensor& b, const at::Tensor& rows,
                 const at::Tensor& slots, const at::Tensor& scale) {
  check_shapes(y, b, 3, 1, "b", rows, slots, &scale);
  TORCH_CHECK(h.dim() == 2 && h.size(0) == rows.numel() && h.size(1) == b.size(2), "kernels: h of shape ", h.sizes(),
              " does not fit ", rows.numel(), " uses of rank ", b.size(2));
  Uses u = read_uses(rows, slots, &scale, y.size(0), b.size(0), true);
  const int64_t r = b.size(2), rp = padded(r);
  at::Tensor hf = h.to(at::kFloat).contiguous();
  const float* hp = hf.data_ptr<float>();
  const Units units = tiled_units(u);
  with_type(y.scalar_type(), "y", [&](auto* yt) {
    using Y = std::remove_pointer_t<decltype(yt)>;
    with_type(b.scalar_type(), "b", [&](auto* bt) {
      using B = std::remove_pointer_t<decltype(bt)>;
      const B* bp = b.data_ptr<B>();
      // b as a transposed view of [S, r, d_out] storage (stride 1 along d_out), float32 or bfloat16: r contiguous
      // rows added side by side (`axpys_rows`), for all of a tiled unit's rows at once, no reductions. float16 in
      // that layout: r axpys of the column block; any other layout: a dot of length r per output column; both a
      // row at a time.
      const bool by_columns = b.stride(1) == 1;
      const bool fast = by_columns && (std::is_same<B, float>::value || std::is_same<B, at::BFloat16>::value);
      // tiled units add straight into a float32 y's rows (no accumulator to clear, fill and add)
      const bool direct = fast && std::is_same<Y, float>::value && y.stride(1) == 1;
      per_unit_block<Y>(y, u, units, r, false, direct, [&](const int64_t* uses, int64_t n, bool tiled, int64_t c0,
                                                           int64_t c1, float* const* dst, bool fresh,
                                                           std::vector<float>& work) {
        // the scaled h of up to kTile uses (rows of rp, zero-padded), then one column block of products, then what
        // `gemv` widens a weight row into
        work.resize(kTile * rp + (by_columns ? 0 : (c1 - c0) + r));
        float* hs = work.data();
        float* part = hs + kTile * rp;
        // one add of the products of uses[0, m) into rows[0, m) (a tiled unit), or into rows[0] (m = 1)
        auto add = [&](const int64_t* of, int64_t m, float* const* rows) {
          for (int64_t q = 0; q < m; ++q)
            for (int64_t j = 0; j < rp; ++j) hs[q * rp + j] = j < r ? u.scale[of[q]] * hp[of[q] * r + j] : 0.f;
          const B* block = bp + u.slots[of[0]] * b.stride(0) + c0 * b.stride(1);
          if (fast && std::is_same<B, float>::value) {
            axpys_f32(fresh, m, hs, rp, r, reinterpret_cast<const float*>(block), b.stride(2), c1 - c0, rows);
            return;
          }
          if (fast) {
            axpys_bf16(fresh, m, hs, rp, r, reinterpret_cast<const uint16_t*>(block), b.stride(2), c1 - c0, rows);
            return;
          }
          for (int64_t q = 0; q < m; ++q) {
            if (by_columns) {
              for (int64_t j = 0; j < r; ++j) axpy(hs[q * rp + j], block + j * b.stride(2), 1, c1 - c0, rows[q]);
              continue;
            }
            const float* hq = hs + q * rp;
            gemv(1, block, c1 - c0, r, b.stride(1), b.stride(2), &hq, part, 1, part + (c1 - c0));
            for (int64_t j = 0; j < c1 - c0; ++j) rows[q][j] += part[j];
          }
        };
        if (tiled) {
          add(uses, n, dst);
          return;
        }
        for (int64_t k = 0; k < n; ++k) add(uses + k, 1, dst);
      });
    });
  });
}

void gather_add(at::Tensor y, const at::Tensor& v, const at::Tensor& rows, const at::Tensor& slots,
                const at::Tensor& scale) {
  check_shapes(y, v, 2, 1, "v", rows, slots, &scale);
  Uses u = read_uses(rows, slots, &scale, y.size(0), v.size(0), true);
  with_type(y.scalar_type(), "y", [&](auto* yt) {
    using Y = std::remove_pointer_t<decltype(yt)>;
    with_type(v.scalar_type(), "v", [&](auto* vt) {
      using V = std::remove_pointer_t<decltype(vt)>;
      const V* vp = v.data_ptr<V>();
      per_unit_block<Y>(y, u, row_units(u), 1, false, false, [&](const int64_t* uses, int64_t n, bool, int64_t c0,
                                                                 int64_t c1, float* const* dst, bool,
                                                                 std::vector<float>&) {
        for (int64_t k = 0; k < n; ++k) {
          const int64_t i = uses[k];
          axpy(u.scale[i], vp + u.slots[i] * v.stride(0) + c0 * v.stride(1), v.stride(1), c1 - c0, dst[0]);
        }
      });
    });
  });
}

void gather_mul(at::Tensor y, const at::Tensor& v, const at::Tensor& rows, const at::Tensor& slots) {
  check_shapes(y, v, 2, 1, "v", rows, slots, nullptr);
  Uses u = read_uses(rows, slots, nullptr, y.size(0), v.size(0), true);
  with_type(y.scalar_type(), "y", [&](auto* yt) {
    using Y = std::remove_pointer_t<decltype(yt)>;
    with_type(v.scalar_type(), "v", [&](auto* vt) {
      using V = std::remove_pointer_t<decltype(vt)>;
      const V* vp = v.data_ptr<V>();
      per_unit_block<Y>(y, u, row_units(u), 1, true, false, [&](const int64_t* uses, int64_t n, bool, int64_t c0,
                                                                int64_t c1, float* const* dst, bool,
                                                                std::vector<float>&) {
        for (int64_t k = 0; k < n; ++k) {
          const V* src = vp + u.slots[uses[k]] * v.stride(0) + c0 * v.stride(1);
          for (int64_t j = 0; j < c1 - c0; ++j) dst[0][j] *= static_cast<float>(src[j * v.stride(1)]);
        }
      });
    });
  });
}

// Both halves in one call: a site's LoRA costs one crossing from Python, not two (each costs more than the
// arithmetic of a one-adapter decode call). When every row has one use (no stacking) and everything is float32 in
// the fast layouts, which is a decode or prefill step without stacks, each task takes a tile of uses of one slot
// through both halves at once: h stays in the task's registers and cache, one parallel region instead of two. The
// products are those of the two halves, operation for operation (the same `dots` and `axpys` chains), so the bits
// are too.
void lora(const at::Tensor& x, at::Tensor y, const at::Tensor& a, const at::Tensor& b, const at::Tensor& rows,
          const at::Tensor& slots, const at::Tensor& scale) {
  check_shapes(x, a, 3, 2, "a", rows, slots, nullptr);
  check_shapes(y, b, 3, 1, "b", rows, slots, &scale);
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(1) == b.size(2), "kernels: a of shape ", a.sizes(), " and b of shape ",
              b.sizes(), " are not one slot buffer's");
  const int64_t r = a.size(1), d = a.size(2), n_out = y.size(1);
  const bool fast = x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat &&
                    a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && x.stride(1) == 1 &&
                    d == padded(d) && y.stride(1) == 1 && a.stride(2) == 1 && b.stride(1) == 1;
  auto halves = [&] { lora_expand(y, lora_shrink(x, a, rows, slots), b, rows, slots, scale); };
  if (!fast) return halves();
  Uses u = read_uses(rows, slots, &scale, y.size(0), a.size(0), false);
  std::vector<uint8_t> seen(y.size(0), 0);  // a row in several uses (a stack) goes through the two halves
  for (int64_t row : u.rows) {
    if (seen[row]) return halves();
    seen[row] = 1;
  }
  const int64_t n = static_cast<int64_t>(u.rows.size()), rp = padded(r);
  if (n == 0 || r == 0) return;
  const std::vector<int64_t> tiles = slot_tiles(u);
  const int64_t count = static_cast<int64_t>(tiles.size()) - 1;
  const float* xp = x.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kWork * count / std::max<int64_t>(1, r * (d + n_out) * n));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> h(kTile * r), hs(kTile * rp, 0.f);
    const float* xr[kTile];
    float* dst[kTile];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first = tiles[t], m = tiles[t + 1] - first, slot = u.slots[first];
      for (int64_t q = 0; q < m; ++q) {
        xr[q] = xp + u.rows[first + q] * x.stride(0);
        dst[q] = yp + u.rows[first + q] * y.stride(0);
      }
      dots_f32(m, ap + slot * a.stride(0), r, d, a.stride(1), xr, h.data(), r);
      for (int64_t q = 0; q < m; ++q)
        for (int64_t j = 0; j < r; ++j) hs[q * rp + j] = u.scale[first + q] * h[q * r + j];
      axpys_f32(true, m, hs.data(), rp, r, bp + slot * b.stride(0), b.stride(2), n_out, dst);
    }
  });
}

}  // namespace

// The GIL is released while an op runs (its arguments are converted before, its result after): a server's other
// threads (request handlers, adapter loads) run Python meanwhile, as they do during ATen's own ops.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("lora_shrink", &lora_shrink, "h[u] = a[slots[u]] @ x[rows[u]] (float32)", release());
  m.def("lora_expand", &lora_expand, "y[rows[u]] += scale[u] * (b[slots[u]] @ h[u]), in place", release());
  m.def("lora", &lora, "y[rows[u]] += scale[u] * (b[slots[u]] @ (a[slots[u]] @ x[rows[u]])), in place", release());
  m.def("gather_add", &gather_add, "y[rows[u]] += scale[u] * v[slots[u]], in place", release());
  m.def("gather_mul", &gather_mul, "y[rows[u]] *= v[slots[u]], in place", release());
}
