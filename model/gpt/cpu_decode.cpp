// AVX-512 kernels for CPU decoding (model/gpt/cpu_decode.py): the product of a few rows with a weight matrix,
// and a whole decoding step built on it.
//
// y (R, out) = x (R, in) · W (out, in)ᵀ + b for the few rows of a decoding step: each weight row is streamed
// from memory once for up to 4 input rows, with fp32 accumulation; output rows are split over torch's threads.
// The explicit prefetch 4 KB ahead keeps enough cache-line requests in flight for the weights to stream at close
// to the memory bandwidth (without it, 4 rows read at about torch's GEMM speed). It fills L2, not L1: L1 keeps
// the input rows (4 rows of 3072 floats fill it), and the hardware brings the lines on from L2.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

constexpr int kPrefetchBytes = 4096;
constexpr int64_t kChunkBytes = 1 << 18;  // weights per thread's share at least this: small layers stay on one

template <typename T>
static int64_t grain(int64_t in) { return std::max<int64_t>(16, kChunkBytes / (in * int64_t(sizeof(T)))); }

static inline void prefetch(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T1);
}

template <int R>
static void rows_f32(const float* w, const float* x, const float* b, float* y, int64_t in, int64_t out) {
  at::parallel_for(0, out, grain<float>(in), [&](int64_t j0, int64_t j1) {
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

template <int R, typename Out>
static void rows_bf16(const at::BFloat16* w, const at::BFloat16* x, const at::BFloat16* b, Out* y,
                      int64_t in, int64_t out) {
  at::parallel_for(0, out, grain<at::BFloat16>(in), [&](int64_t j0, int64_t j1) {
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
      for (int r = 0; r < R; ++r)  // a bf16 output is rounded once, at the end (round to nearest even)
        y[r * out + j] = Out(_mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1])) + bias);
    }
  });
}

// y (n, out) = x (n, in) · wᵀ + b, n <= 4 rows in one pass over w; Out is T, or float for a bf16 product
template <typename T, typename Out>
static void run_rows(int n, const T* w, const T* x, const T* b, Out* y, int64_t in, int64_t out) {
  if constexpr (std::is_same_v<T, float>) {
    switch (n) {
      case 1: return rows_f32<1>(w, x, b, y, in, out);
      case 2: return rows_f32<2>(w, x, b, y, in, out);
      case 3: return rows_f32<3>(w, x, b, y, in, out);
      default: return rows_f32<4>(w, x, b, y, in, out);
    }
  } else {
    switch (n) {
      case 1: return rows_bf16<1, Out>(w, x, b, y, in, out);
      case 2: return rows_bf16<2, Out>(w, x, b, y, in, out);
      case 3: return rows_bf16<3, Out>(w, x, b, y, in, out);
      default: return rows_bf16<4, Out>(w, x, b, y, in, out);
    }
  }
}

template <typename T>
static torch::Tensor linear_t(const torch::Tensor& x, const torch::Tensor& w, const std::optional<torch::Tensor>& b) {
  const int64_t R = x.size(0), in = x.size(1), out = w.size(0);
  auto y = torch::empty({R, out}, x.options());
  const T* bp = b ? b->data_ptr<T>() : nullptr;
  for (int64_t r0 = 0; r0 < R; r0 += 4)  // groups of 4 rows, each one pass over the weights
    run_rows<T, T>(static_cast<int>(std::min<int64_t>(4, R - r0)), w.data_ptr<T>(), x.data_ptr<T>() + r0 * in, bp,
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

// ---------------------------------------------------------------------------------------------------------
// A whole decoding step of R <= 4 rows at one new position (Decoder in decode.py): the function of
// GPT.forward(idx (R, 1), kv_cache) in one call instead of about 15 torch ops per layer, whose dispatch is what
// bounds small models. Activations stay in fp32; in bf16 the inputs of each matrix product and the cached keys
// and values are rounded to bf16, the weights' precision.

static inline __mmask16 first(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }
static inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 load16(const at::BFloat16* p, __mmask16 m) {  // bf16 is the top half of an fp32
  __m256i h = _mm512_castsi512_si256(_mm512_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline void store(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
static inline void store(at::BFloat16* dst, const float* src, int64_t n) {  // round to nearest even
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = first(n - i);
    __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + i));
    _mm512_mask_storeu_epi16(dst + i, m, _mm512_castsi256_si512(h));
  }
}

template <typename T>
static float dot(const float* a, const T* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = first(n - i);
    acc = _mm512_fmadd_ps(load16(a + i, m), load16(b + i, m), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

template <typename T>
static void add_scaled(float s, const T* x, float* y, int64_t n) {  // y += s x
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = first(n - i);
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(_mm512_set1_ps(s), load16(x + i, m), load16(y + i, m)));
  }
}

template <typename T>  // y = (x - mean) / sqrt(var + eps) · g + b over n values, var the biased variance
static void layer_norm(const float* x, const T* g, const T* b, float* y, int64_t n, float eps) {
  __m512 sum = _mm512_setzero_ps(), sq = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) sum = _mm512_add_ps(sum, load16(x + i, first(n - i)));
  const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / n);
  for (int64_t i = 0; i < n; i += 16) {
    __m512 d = _mm512_maskz_sub_ps(first(n - i), load16(x + i, first(n - i)), mean);
    sq = _mm512_fmadd_ps(d, d, sq);
  }
  const __m512 rstd = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(sq) / n + eps));
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = first(n - i);
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(load16(x + i, m), mean), rstd), load16(g + i, m));
    _mm512_mask_storeu_ps(y + i, m, b ? _mm512_add_ps(v, load16(b + i, m)) : v);
  }
}

template <typename T>  // out (hs) = softmax(q · Kᵀ / sqrt(hs)) · V over S cached positions; p: S floats of room
static void attend(const float* q, const T* K, const T* V, int64_t S, int64_t hs, float* p, float* out) {
  const float scale = 1.f / std::sqrt(static_cast<float>(hs));
  float top = -INFINITY, sum = 0.f;
  const int64_t row = hs * int64_t(sizeof(T));  // each position's key (value): a row of the cache, read once
  for (int64_t j = 0; j < S; ++j) {
    for (int64_t b = 0; b < row; b += 64) prefetch(reinterpret_cast<const char*>(K + j * hs) + b);
    top = std::max(top, p[j] = dot(q, K + j * hs, hs) * scale);
  }
  for (int64_t j = 0; j < S; ++j) sum += p[j] = std::exp(p[j] - top);
  std::fill(out, out + hs, 0.f);
  for (int64_t j = 0; j < S; ++j) {
    for (int64_t b = 0; b < row; b += 64) prefetch(reinterpret_cast<const char*>(V + j * hs) + b);
    add_scaled(p[j] / sum, V + j * hs, out, hs);
  }
}

template <typename T>  // the R x n activations as a matrix product's input: fp32 as is, else rounded into `room`
static const T* as_input(const float* a, T* room, int64_t n) {
  if constexpr (std::is_same_v<T, float>) return a;
  store(room, a, n);
  return room;
}

// The parameters, in this order: wte (V, C), position table (P, C), ln_f weight and bias, head (V, C), then
// per layer ln_1 weight and bias, c_attn weight (3C, C) and bias, attn c_proj (C, C) and bias, ln_2 weight and
// bias, c_fc (4C, C) and bias, mlp c_proj (C, 4C) and bias. Biases may be None.
constexpr size_t kFirst = 5, kPerLayer = 12;

template <typename T>
static torch::Tensor step_t(const torch::Tensor& idx, int64_t pos, const std::vector<std::optional<torch::Tensor>>& p,
                            torch::Tensor& kc, torch::Tensor& vc, int64_t nh, bool tanh_gelu, double eps) {
  auto P = [&](size_t i) -> const T* { return p[i] ? p[i]->template data_ptr<T>() : nullptr; };
  const int64_t R = idx.size(0), V = p[0]->size(0), C = p[0]->size(1), hs = C / nh, S = pos + 1;
  const int64_t L = (p.size() - kFirst) / kPerLayer;
  auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  auto x = torch::empty({R, C}, f32), a = torch::empty({R, C}, f32), y = torch::empty({R, C}, f32);  // residual, work
  auto qkv = torch::empty({R, 3 * C}, f32), fc = torch::empty({R, 4 * C}, f32), logits = torch::empty({R, V}, f32);
  auto scores = torch::empty({R * nh, S}, f32);  // each (row, head)'s attention weights
  auto room = torch::empty({R, 4 * C}, kc.options());
  float *xp = x.data_ptr<float>(), *ap = a.data_ptr<float>(), *yp = y.data_ptr<float>();
  float *qp = qkv.data_ptr<float>(), *fp = fc.data_ptr<float>();
  T* rp = room.data_ptr<T>();
  for (int64_t r = 0; r < R; ++r) {  // token embedding + position
    const int64_t id = idx.data_ptr<int64_t>()[r * idx.stride(0)];
    TORCH_CHECK(0 <= id && id < V, "token id out of range");
    for (int64_t c = 0; c < C; ++c) xp[r * C + c] = float(P(0)[id * C + c]) + float(P(1)[pos * C + c]);
  }
  auto residual_add = [&]() { for (int64_t i = 0; i < R * C; ++i) xp[i] += yp[i]; };
  for (int64_t l = 0; l < L; ++l) {
    auto W = [&](size_t k) { return P(kFirst + kPerLayer * l + k); };
    for (int64_t r = 0; r < R; ++r) layer_norm(xp + r * C, W(0), W(1), ap + r * C, C, eps);
    run_rows<T, float>(R, W(2), as_input(ap, rp, R * C), W(3), qp, C, 3 * C);  // (R, 3C)
    T* kl = kc.data_ptr<T>() + l * kc.stride(0);
    T* vl = vc.data_ptr<T>() + l * vc.stride(0);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t h = 0; h < nh; ++h) {  // this position's key and value into the cache
        const int64_t at = r * kc.stride(1) + h * kc.stride(2) + pos * hs;
        store(kl + at, qp + r * 3 * C + C + h * hs, hs);
        store(vl + at, qp + r * 3 * C + 2 * C + h * hs, hs);
      }
    const int64_t heads_per_task = std::max<int64_t>(1, kChunkBytes / (2 * S * hs * int64_t(sizeof(T))));
    at::parallel_for(0, R * nh, heads_per_task, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r = t / nh, h = t % nh, at = r * kc.stride(1) + h * kc.stride(2);
        attend(qp + r * 3 * C + h * hs, kl + at, vl + at, S, hs, scores.data_ptr<float>() + t * S, ap + r * C + h * hs);
      }
    });
    run_rows<T, float>(R, W(4), as_input(ap, rp, R * C), W(5), yp, C, C);
    residual_add();
    for (int64_t r = 0; r < R; ++r) layer_norm(xp + r * C, W(6), W(7), ap + r * C, C, eps);
    run_rows<T, float>(R, W(8), as_input(ap, rp, R * C), W(9), fp, C, 4 * C);  // (R, 4C)
    at::gelu_(fc, tanh_gelu ? "tanh" : "none");
    run_rows<T, float>(R, W(10), as_input(fp, rp, R * 4 * C), W(11), yp, 4 * C, C);
    residual_add();
  }
  for (int64_t r = 0; r < R; ++r) layer_norm(xp + r * C, P(2), P(3), ap + r * C, C, eps);
  run_rows<T, float>(R, P(4), as_input(ap, rp, R * C), nullptr, logits.data_ptr<float>(), C, V);  // (R, V)
  return logits;
}

torch::Tensor step(torch::Tensor idx, int64_t pos, std::vector<std::optional<torch::Tensor>> params, torch::Tensor k,
                   torch::Tensor v, int64_t n_head, bool tanh_gelu, double eps) {
  TORCH_CHECK(params.size() >= kFirst && (params.size() - kFirst) % kPerLayer == 0,
              "parameter list of 5 + 12·L expected");
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == torch::kLong, "idx (R,) int64 expected");
  TORCH_CHECK(1 <= idx.size(0) && idx.size(0) <= 4 && idx.size(0) == k.size(1), "1 to 4 rows, one per cache row");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes() && k.dim() == 5, "k, v caches");
  TORCH_CHECK(0 <= pos && pos < k.size(3), "position outside the cache");
  const auto dtype = k.scalar_type();
  for (const auto& t : params)
    TORCH_CHECK(!t || (t->is_contiguous() && t->scalar_type() == dtype), "contiguous parameters in the cache's dtype");
  if (dtype == torch::kFloat32) return step_t<float>(idx, pos, params, k, v, n_head, tanh_gelu, eps);
  TORCH_CHECK(dtype == torch::kBFloat16, "float32 or bfloat16 expected");
  return step_t<at::BFloat16>(idx, pos, params, k, v, n_head, tanh_gelu, eps);
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x wᵀ + b for a few rows x (R, in), w (out, in)",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("b") = pybind11::none());
  m.def("step", &step, "next-token logits (R, V) fp32 of R <= 4 rows at position pos; writes the caches' pos");
}
