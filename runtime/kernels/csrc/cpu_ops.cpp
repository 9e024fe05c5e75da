// Fused CPU kernels for the kernel seam (runtime/kernels/__init__.py has the semantics, reference.py the
// oracle). Each use reads its adapter's weights in place from the slot buffer (Punica's BGMV shape): no
// gather of weights, no per-use temporaries beyond one activation row. Products accumulate in float32 and
// every output element is rounded once into y's dtype, after all of its row's uses. Work is split over
// uses (shrink) or over rows, or (row, column block) pairs when rows are few (expand, gathers), so no two
// threads write one element.
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

// out[i] = sum_k w[i * ld + k] * x[k] for i < n: the weight rows are read where they lie.
HUB_CLONES void gemv_f32(const float* w, int64_t n, int64_t k, int64_t ld, const float* x, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float* row = w + i * ld;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < k; ++j) acc += row[j] * x[j];
    out[i] = acc;
  }
}

// The same for bfloat16 weights (bits widened to float32 in registers).
HUB_CLONES void gemv_bf16(const uint16_t* w, int64_t n, int64_t k, int64_t ld, const float* x, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t* row = w + i * ld;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < k; ++j) {
      uint32_t bits = static_cast<uint32_t>(row[j]) << 16;
      float v;
      std::memcpy(&v, &bits, sizeof v);
      acc += v * x[j];
    }
    out[i] = acc;
  }
}

// acc[j] += s * v[j] (float32 or bfloat16 v, contiguous).
HUB_CLONES void axpy_f32(float s, const float* v, int64_t n, float* acc) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += s * v[j];
}

HUB_CLONES void axpy_bf16(float s, const uint16_t* v, int64_t n, float* acc) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits = static_cast<uint32_t>(v[j]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    acc[j] += s * f;
  }
}

// acc[c] += s[0] * v[c] + s[1] * v[ld + c] + ... (r rows of v, added in row order), a chunk of columns at a
// time held in registers: the r rows stream side by side and acc is loaded and stored once, not once per row.
constexpr int64_t kChunk = 32;

HUB_CLONES void axpys_f32(const float* s, int64_t r, const float* v, int64_t ld, int64_t n, float* acc) {
  int64_t c0 = 0;
  for (; c0 + kChunk <= n; c0 += kChunk) {
    float t[kChunk];
#pragma omp simd
    for (int64_t c = 0; c < kChunk; ++c) t[c] = acc[c0 + c];
    for (int64_t j = 0; j < r; ++j) {
      const float sj = s[j];
      const float* vj = v + j * ld + c0;
#pragma omp simd
      for (int64_t c = 0; c < kChunk; ++c) t[c] += sj * vj[c];
    }
#pragma omp simd
    for (int64_t c = 0; c < kChunk; ++c) acc[c0 + c] = t[c];
  }
  for (int64_t j = 0; j < r; ++j)
    for (int64_t c = c0; c < n; ++c) acc[c] += s[j] * v[j * ld + c];
}

template <typename T>
void to_float(const T* src, int64_t stride, int64_t n, float* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j * stride]);
}

// out[i] = W[i, :] . x for a [n, k] weight matrix with strides (si, sk), whatever its dtype and layout:
// the fast loops when its rows are contiguous, else each row widened into `scratch` first.
template <typename W>
void gemv(const W* w, int64_t n, int64_t k, int64_t si, int64_t sk, const float* x, float* out,
          std::vector<float>& scratch) {
  if (sk == 1 && std::is_same<W, float>::value) {
    gemv_f32(reinterpret_cast<const float*>(w), n, k, si, x, out);
  } else if (sk == 1 && std::is_same<W, at::BFloat16>::value) {
    gemv_bf16(reinterpret_cast<const uint16_t*>(w), n, k, si, x, out);
  } else {
    scratch.resize(k);
    for (int64_t i = 0; i < n; ++i) {
      to_float(w + i * si, sk, k, scratch.data());
      gemv_f32(scratch.data(), 1, k, k, x, out + i);
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

// Runs body(first use, end use, column begin, column end, float accumulator) over every (row group, column
// block), in parallel, then writes y[row, block] once: y + acc for a sum (acc starts at 0), y * acc for a
// product (acc starts at 1).
template <typename Y, typename Body>
void per_row_block(at::Tensor& y, const Uses& u, int64_t work_per_column, bool product, Body&& body) {
  const int64_t groups = static_cast<int64_t>(u.starts.size()) - 1, cols = y.size(1);
  if (groups <= 0 || cols == 0) return;
  // Whole rows when the row groups alone give every thread several tasks: a use's weights then stream in one
  // sweep (column blocks read each of a slot's r rows in short pieces, which the prefetchers follow badly).
  const int64_t block = groups >= 4 * at::get_num_threads() ? cols : kBlock;
  const int64_t blocks = (cols + block - 1) / block;
  Y* base = y.data_ptr<Y>();
  const int64_t s0 = y.stride(0), s1 = y.stride(1);
  const int64_t grain = std::max<int64_t>(1, kWork / std::max<int64_t>(1, work_per_column * block));
  at::parallel_for(0, groups * blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(block);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / blocks, c0 = (t % blocks) * block, c1 = std::min(cols, c0 + block);
      const int64_t row = u.rows[u.order[u.starts[g]]];
      Y* out = base + row * s0;
      std::fill(acc.begin(), acc.end(), product ? 1.f : 0.f);
      body(u.starts[g], u.starts[g + 1], c0, c1, acc.data());
      if (s1 == 1 && !product) {  // the common case, as one loop the compiler vectorizes
        for (int64_t j = c0; j < c1; ++j) out[j] = static_cast<Y>(static_cast<float>(out[j]) + acc[j - c0]);
        continue;
      }
      for (int64_t j = c0; j < c1; ++j) {
        const float old = static_cast<float>(out[j * s1]);
        out[j * s1] = static_cast<Y>(product ? old * acc[j - c0] : old + acc[j - c0]);
      }
    }
  });
}

at::Tensor lora_shrink(const at::Tensor& x, const at::Tensor& a, const at::Tensor& rows, const at::Tensor& slots) {
  const int64_t n = rows.numel(), r = a.size(1), d = a.size(2);
  Uses u = read_uses(rows, slots, nullptr, x.size(0), a.size(0), false);
  at::Tensor h = at::empty({n, r}, x.options().dtype(at::kFloat));
  if (n == 0 || r == 0) return h;
  float* hp = h.data_ptr<float>();
  with_type(x.scalar_type(), "x", [&](auto* xt) {
    using X = std::remove_pointer_t<decltype(xt)>;
    with_type(a.scalar_type(), "a", [&](auto* at_) {
      using A = std::remove_pointer_t<decltype(at_)>;
      const X* xp = x.data_ptr<X>();
      const A* ap = a.data_ptr<A>();
      const int64_t grain = std::max<int64_t>(1, kWork / std::max<int64_t>(1, r * d));
      at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
        std::vector<float> xf(d), scratch;
        for (int64_t i = begin; i < end; ++i) {
          to_float(xp + u.rows[i] * x.stride(0), x.stride(1), d, xf.data());
          gemv(ap + u.slots[i] * a.stride(0), r, d, a.stride(1), a.stride(2), xf.data(), hp + i * r, scratch);
        }
      });
    });
  });
  return h;
}

void lora_expand(at::Tensor y, const at::Tensor& h, const at::Tensor& b, const at::Tensor& rows,
                 const at::Tensor& slots, const at::Tensor& scale) {
  Uses u = read_uses(rows, slots, &scale, y.size(0), b.size(0), true);
  const int64_t r = b.size(2);
  at::Tensor hf = h.to(at::kFloat).contiguous();
  const float* hp = hf.data_ptr<float>();
  with_type(y.scalar_type(), "y", [&](auto* yt) {
    using Y = std::remove_pointer_t<decltype(yt)>;
    with_type(b.scalar_type(), "b", [&](auto* bt) {
      using B = std::remove_pointer_t<decltype(bt)>;
      const B* bp = b.data_ptr<B>();
      // b as a transposed view of [S, r, d_out] storage (stride 1 along d_out): r contiguous rows added per use
      // (float32 side by side, `axpys_f32`), no reductions; any other layout: one dot of length r per output
      // column.
      const bool by_columns = b.stride(1) == 1;
      per_row_block<Y>(y, u, r, false, [&](int64_t first, int64_t last, int64_t c0, int64_t c1, float* acc) {
        std::vector<float> hs(r), part(by_columns ? 0 : c1 - c0), scratch;
        for (int64_t k = first; k < last; ++k) {
          const int64_t i = u.order[k];
          const B* block = bp + u.slots[i] * b.stride(0) + c0 * b.stride(1);
          for (int64_t j = 0; j < r; ++j) hs[j] = u.scale[i] * hp[i * r + j];
          if (by_columns) {
            if (std::is_same<B, float>::value) {
              axpys_f32(hs.data(), r, reinterpret_cast<const float*>(block), b.stride(2), c1 - c0, acc);
            } else {
              for (int64_t j = 0; j < r; ++j) axpy(hs[j], block + j * b.stride(2), 1, c1 - c0, acc);
            }
            continue;
          }
          gemv(block, c1 - c0, r, b.stride(1), b.stride(2), hs.data(), part.data(), scratch);
          for (int64_t j = 0; j < c1 - c0; ++j) acc[j] += part[j];
        }
      });
    });
  });
}

void gather_add(at::Tensor y, const at::Tensor& v, const at::Tensor& rows, const at::Tensor& slots,
                const at::Tensor& scale) {
  Uses u = read_uses(rows, slots, &scale, y.size(0), v.size(0), true);
  with_type(y.scalar_type(), "y", [&](auto* yt) {
    using Y = std::remove_pointer_t<decltype(yt)>;
    with_type(v.scalar_type(), "v", [&](auto* vt) {
      using V = std::remove_pointer_t<decltype(vt)>;
      const V* vp = v.data_ptr<V>();
      per_row_block<Y>(y, u, 1, false, [&](int64_t first, int64_t last, int64_t c0, int64_t c1, float* acc) {
        for (int64_t k = first; k < last; ++k) {
          const int64_t i = u.order[k];
          axpy(u.scale[i], vp + u.slots[i] * v.stride(0) + c0 * v.stride(1), v.stride(1), c1 - c0, acc);
        }
      });
    });
  });
}

void gather_mul(at::Tensor y, const at::Tensor& v, const at::Tensor& rows, const at::Tensor& slots) {
  Uses u = read_uses(rows, slots, nullptr, y.size(0), v.size(0), true);
  with_type(y.scalar_type(), "y", [&](auto* yt) {
    using Y = std::remove_pointer_t<decltype(yt)>;
    with_type(v.scalar_type(), "v", [&](auto* vt) {
      using V = std::remove_pointer_t<decltype(vt)>;
      const V* vp = v.data_ptr<V>();
      per_row_block<Y>(y, u, 1, true, [&](int64_t first, int64_t last, int64_t c0, int64_t c1, float* acc) {
        for (int64_t k = first; k < last; ++k) {
          const V* src = vp + u.slots[u.order[k]] * v.stride(0) + c0 * v.stride(1);
          for (int64_t j = 0; j < c1 - c0; ++j) acc[j] *= static_cast<float>(src[j * v.stride(1)]);
        }
      });
    });
  });
}

}  // namespace

// The GIL is released while an op runs (its arguments are converted before, its result after): a server's other
// threads (request handlers, adapter loads) run Python meanwhile, as they do during ATen's own ops.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("lora_shrink", &lora_shrink, "h[u] = a[slots[u]] @ x[rows[u]] (float32)", release());
  m.def("lora_expand", &lora_expand, "y[rows[u]] += scale[u] * (b[slots[u]] @ h[u]), in place", release());
  m.def("gather_add", &gather_add, "y[rows[u]] += scale[u] * v[slots[u]], in place", release());
  m.def("gather_mul", &gather_mul, "y[rows[u]] *= v[slots[u]], in place", release());
}
