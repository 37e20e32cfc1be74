// y (R, out) = x (R, in) · W (out, in)ᵀ + b for the few rows of a decoding step (model/gpt/cpu_gemv.py).
// Each weight row is streamed from memory once for up to 4 input rows, with fp32 accumulation; output rows are
// split over torch's threads. The explicit prefetch 4 KB ahead keeps enough cache-line requests in flight for
// the weights to stream at close to the memory bandwidth (without it, 4 rows read at about torch's GEMM speed).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

constexpr int kPrefetchBytes = 4096;

static inline void prefetch(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
}

template <int R>
static void rows_f32(const float* w, const float* x, const float* b, float* y, int64_t in, int64_t out) {
  at::parallel_for(0, out, 16, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const float* wr = w + j * in;
      __m512 acc[R][2];
      for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      int64_t i = 0;
      for (; i + 32 <= in; i += 32) {  // two 64-byte lines of the weight row per step
        prefetch(wr + i);
        prefetch(wr + i + 16);
        __m512 w0 = _mm512_loadu_ps(wr + i), w1 = _mm512_loadu_ps(wr + i + 16);
        for (int r = 0; r < R; ++r) {
          acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * in + i), acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * in + i + 16), acc[r][1]);
        }
      }
      for (; i < in; i += 16) {  // the tail, masked
        __mmask16 m = in - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (in - i)) - 1);
        __m512 w0 = _mm512_maskz_loadu_ps(m, wr + i);
        for (int r = 0; r < R; ++r)
          acc[r][0] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, x + r * in + i), acc[r][0]);
      }
      for (int r = 0; r < R; ++r)
        y[r * out + j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1])) + (b ? b[j] : 0.f);
    }
  });
}

template <int R>
static void rows_bf16(const at::BFloat16* w, const at::BFloat16* x, const at::BFloat16* b, at::BFloat16* y,
                      int64_t in, int64_t out) {
  at::parallel_for(0, out, 16, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const at::BFloat16* wr = w + j * in;
      __m512 acc[R][2];
      for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      int64_t i = 0;
      for (; i + 64 <= in; i += 64) {  // two lines; each dpbf16 adds 16 pairs of bf16 products into fp32
        prefetch(wr + i);
        prefetch(wr + i + 32);
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + i), w1 = (__m512bh)_mm512_loadu_si512(wr + i + 32);
        for (int r = 0; r < R; ++r) {
          acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, (__m512bh)_mm512_loadu_si512(x + r * in + i));
          acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, (__m512bh)_mm512_loadu_si512(x + r * in + i + 32));
        }
      }
      for (; i < in; i += 32) {
        __mmask32 m = in - i >= 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1u << (in - i)) - 1);
        __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(m, wr + i);
        for (int r = 0; r < R; ++r)
          acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, (__m512bh)_mm512_maskz_loadu_epi16(m, x + r * in + i));
      }
      const float bias = b ? static_cast<float>(b[j]) : 0.f;
      for (int r = 0; r < R; ++r)  // rounded to bf16 once, at the end (round to nearest even)
        y[r * out + j] = at::BFloat16(_mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1])) + bias);
    }
  });
}

template <typename T>
static void run_rows(int n, const T* w, const T* x, const T* b, T* y, int64_t in, int64_t out);

template <>
void run_rows<float>(int n, const float* w, const float* x, const float* b, float* y, int64_t in, int64_t out) {
  switch (n) {
    case 1: return rows_f32<1>(w, x, b, y, in, out);
    case 2: return rows_f32<2>(w, x, b, y, in, out);
    case 3: return rows_f32<3>(w, x, b, y, in, out);
    default: return rows_f32<4>(w, x, b, y, in, out);
  }
}

template <>
void run_rows<at::BFloat16>(int n, const at::BFloat16* w, const at::BFloat16* x, const at::BFloat16* b,
                            at::BFloat16* y, int64_t in, int64_t out) {
  switch (n) {
    case 1: return rows_bf16<1>(w, x, b, y, in, out);
    case 2: return rows_bf16<2>(w, x, b, y, in, out);
    case 3: return rows_bf16<3>(w, x, b, y, in, out);
    default: return rows_bf16<4>(w, x, b, y, in, out);
  }
}

template <typename T>
static torch::Tensor linear_t(const torch::Tensor& x, const torch::Tensor& w, const std::optional<torch::Tensor>& b) {
  const int64_t R = x.size(0), in = x.size(1), out = w.size(0);
  auto y = torch::empty({R, out}, x.options());
  const T* bp = b ? b->data_ptr<T>() : nullptr;
  for (int64_t r0 = 0; r0 < R; r0 += 4)  // groups of 4 rows, each one pass over the weights
    run_rows<T>(static_cast<int>(std::min<int64_t>(4, R - r0)), w.data_ptr<T>(), x.data_ptr<T>() + r0 * in, bp,
                y.data_ptr<T>() + r0 * out, in, out);
  return y;
}

torch::Tensor linear(torch::Tensor x, torch::Tensor w, std::optional<torch::Tensor> b) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x (R, in) and w (out, in) expected");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && (!b || b->is_contiguous()), "contiguous tensors expected");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && (!b || b->scalar_type() == w.scalar_type()), "one dtype expected");
  TORCH_CHECK(!b || b->numel() == w.size(0), "b (out,) expected");
  if (x.scalar_type() == torch::kFloat32) return linear_t<float>(x, w, b);
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "float32 or bfloat16 expected");
  return linear_t<at::BFloat16>(x, w, b);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x wᵀ + b for a few rows x (R, in), w (out, in)",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("b") = pybind11::none());
}
