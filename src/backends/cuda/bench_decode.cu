// shardlm_cuda_bench: how close the decode path runs to the memory bandwidth of the card.
//
//  1. the device-to-device copy bandwidth (1 GiB, bytes read + written): the roofline of everything below;
//  2. every matvec type on 4096x4096, 14336x4096 and 4096x14336 (rows x cols), each launch timed with its
//     own pair of events, median of many, rotating enough weight copies to defeat the 50 MB L2;
//  3. a whole Llama-3.1-8B-shaped decode step (32 layers + output head, distinct random weights per
//     layer, KV cache f16 at position ~1000) captured once in a CUDA graph and replayed: tokens/s.
//
// Usage: shardlm_cuda_bench [--quick] [--device N] [--matvec-only|--decode-only] [--types ...] [--no-pack]
//                           [--tokens 1,16,64] (the matmuls of steps of that many tokens; default 1)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "backends/cuda/cuda_backend_impl.cuh"

using namespace shardlm;
using namespace shardlm::cuda_detail;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double copy_bandwidth(cudaStream_t s) {
  const size_t bytes = size_t{1} << 30;
  DevMem a(bytes), b(bytes);
  SHARDLM_CUDA_CHECK(cudaMemsetAsync(a.get(), 1, bytes, s));
  Event e0, e1;
  std::vector<double> t;
  for (int i = 0; i < 23; ++i) {
    SHARDLM_CUDA_CHECK(cudaEventRecord(e0.get(), s));
    SHARDLM_CUDA_CHECK(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, s));
    SHARDLM_CUDA_CHECK(cudaEventRecord(e1.get(), s));
    SHARDLM_CUDA_CHECK(cudaEventSynchronize(e1.get()));
    float ms = 0;
    SHARDLM_CUDA_CHECK(cudaEventElapsedTime(&ms, e0.get(), e1.get()));
    if (i >= 3) t.push_back(ms);
  }
  return 2.0 * bytes / (median(t) * 1e-3) / 1e9;  // GB/s, read + write
}

struct Mat {
  std::vector<std::unique_ptr<DeviceBuffer>> bufs;
  WeightView view;
};

// Random weights as the loader would place them: through place_matmul_weight, so quantized types end up
// packed unless the backend's packing is off (--no-pack).
Mat make_weight(CudaBackend& be, GgmlType type, int64_t rows, int64_t cols, uint64_t seed) {
  Mat m;
  const size_t stride = static_cast<size_t>(row_bytes(type, cols));
  auto raw = be.alloc(stride * rows);
  launch_fill_random(type, raw->data(), rows, stride, cols, seed, be.stream());
  WeightView v{type, cols, rows, stride, raw->data()};
  if (block_size(type) == 1) {
    m.bufs.push_back(std::move(raw));
    m.view = v;
    return m;
  }
  std::vector<uint8_t> host(stride * rows);
  be.download(host.data(), raw->data(), host.size());
  raw.reset();
  v.data = host.data();
  m.view = be.place_matmul_weight(v, m.bufs);
  return m;
}

// n_tok > 1: the matmul of a step of n_tok tokens (batched decode), by whichever kernel the backend picks for
// it (the limits' environment switches choose another); TFLOP/s counts 2 * rows * cols * n_tok.
void bench_matvecs(CudaBackend& be, double copy_gbs, bool quick, const std::vector<GgmlType>& types, int64_t n_tok) {
  const int64_t shapes[][2] = {{4096, 4096}, {14336, 4096}, {4096, 14336}};
  std::printf("\n%-6s %-12s %6s %10s %10s %8s %8s %8s\n", "type", "rows x cols", "tokens", "MB", "us", "GB/s", "of copy",
              "TFLOP/s");
  auto x = be.alloc(n_tok * 14336 * sizeof(float));
  auto y = be.alloc(n_tok * 14336 * sizeof(float));
  launch_fill_random(GgmlType::F32, x->data(), 1, n_tok * 14336 * 4, n_tok * 14336, 7, be.stream());
  for (GgmlType t : types)
    for (const auto& sh : shapes) {
      const int64_t rows = sh[0], cols = sh[1];
      const double mb = static_cast<double>(row_bytes(t, cols)) * rows / 1e6;
      const int copies = static_cast<int>(std::max<double>(2, std::ceil(400.0 / mb)));
      std::vector<Mat> ws;
      for (int c = 0; c < copies; ++c) ws.push_back(make_weight(be, t, rows, cols, 100 + c));
      const int iters = quick ? 50 : 200;
      std::vector<Event> ev(2 * iters);
      for (int i = 0; i < 10; ++i) be.matmul(ws[i % copies].view, x->as<float>(), y->as<float>(), n_tok);
      for (int i = 0; i < iters; ++i) {
        SHARDLM_CUDA_CHECK(cudaEventRecord(ev[2 * i].get(), be.stream()));
        be.matmul(ws[i % copies].view, x->as<float>(), y->as<float>(), n_tok);
        SHARDLM_CUDA_CHECK(cudaEventRecord(ev[2 * i + 1].get(), be.stream()));
      }
      be.synchronize();
      std::vector<double> us;
      for (int i = 0; i < iters; ++i) {
        float ms = 0;
        SHARDLM_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[2 * i].get(), ev[2 * i + 1].get()));
        us.push_back(ms * 1e3);
      }
      const double m = median(us), gbs = mb * 1e6 / (m * 1e-6) / 1e9;
      std::printf("%-6s %5lldx%-6lld %6lld %10.1f %10.2f %8.0f %7.1f%% %8.1f\n", type_name(t),
                  static_cast<long long>(rows), static_cast<long long>(cols), static_cast<long long>(n_tok), mb, m, gbs,
                  100.0 * gbs / copy_gbs, 2.0 * rows * cols * n_tok / (m * 1e-6) / 1e12);
    }
}

// Llama-3.1-8B shapes: n_embd 4096, n_head 32, n_head_kv 8, head_dim 128, n_ff 14336, 32 layers, vocab 128256.
void bench_decode(CudaBackend& be, GgmlType wt, GgmlType out_t, double copy_gbs, bool quick, int n_layers) {
  const int64_t E = 4096, H = 32, HKV = 8, D = 128, F = 14336, V = 128256, n_ctx = 4096;
  const int L = n_layers > 0 ? n_layers : (quick ? 8 : 32);
  struct Layer {
    Mat q, k, v, o, gate, up, down;
    std::unique_ptr<DeviceBuffer> n1, n2, kc, vc;
  };
  std::vector<Layer> layers(L);
  double bytes = 0;
  uint64_t seed = 1000;
  for (auto& l : layers) {
    l.q = make_weight(be, wt, E, E, seed++);
    l.k = make_weight(be, wt, HKV * D, E, seed++);
    l.v = make_weight(be, wt, HKV * D, E, seed++);
    l.o = make_weight(be, wt, E, E, seed++);
    l.gate = make_weight(be, wt, F, E, seed++);
    l.up = make_weight(be, wt, F, E, seed++);
    l.down = make_weight(be, wt, E, F, seed++);
    for (auto* m : {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down})
      bytes += static_cast<double>(m->view.row_stride) * m->view.n_rows;
    l.n1 = be.alloc(E * 4);
    l.n2 = be.alloc(E * 4);
    launch_fill_random(GgmlType::F32, l.n1->data(), 1, E * 4, E, seed++, be.stream());
    launch_fill_random(GgmlType::F32, l.n2->data(), 1, E * 4, E, seed++, be.stream());
    l.kc = be.alloc(n_ctx * HKV * D * 2);
    l.vc = be.alloc(n_ctx * HKV * D * 2);
    launch_fill_random(GgmlType::F16, l.kc->data(), 1, n_ctx * HKV * D * 2, n_ctx * HKV * D, seed++, be.stream());
    launch_fill_random(GgmlType::F16, l.vc->data(), 1, n_ctx * HKV * D * 2, n_ctx * HKV * D, seed++, be.stream());
  }
  Mat out = make_weight(be, out_t, V, E, seed++);
  bytes += static_cast<double>(out.view.row_stride) * V;
  auto fnorm = be.alloc(E * 4);
  launch_fill_random(GgmlType::F32, fnorm->data(), 1, E * 4, E, seed++, be.stream());
  auto x = be.alloc(E * 4), xn = be.alloc(E * 4), q = be.alloc(E * 4), k = be.alloc(HKV * D * 4),
       v = be.alloc(HKV * D * 4), att = be.alloc(E * 4), g = be.alloc(F * 4), u = be.alloc(F * 4),
       logits = be.alloc(V * 4), tok = be.alloc(4);
  launch_fill_random(GgmlType::F32, x->data(), 1, E * 4, E, 5, be.stream());
  std::vector<float> ff(D / 2, 1.0f);
  auto f = [](std::unique_ptr<DeviceBuffer>& b) { return b->as<float>(); };
  auto step = [&] {
    for (auto& l : layers) {
      // A pool of one block of n_ctx positions (the CUDA backend's block per sequence).
      KvLayerView kv{GgmlType::F16, 1, n_ctx, HKV, D, l.kc->data(), l.vc->data()};
      be.rms_norm(f(x), f(l.n1), f(xn), 1, E, 1e-5f);
      be.matmul(l.q.view, f(xn), f(q), 1);
      be.matmul(l.k.view, f(xn), f(k), 1);
      be.matmul(l.v.view, f(xn), f(v), 1);
      be.rope(f(q), 1, H, D, 500000.0f, ff.data());
      be.rope(f(k), 1, HKV, D, 500000.0f, ff.data());
      be.kv_store(kv, f(k), f(v), 1);
      be.attention(f(q), kv, 1, H, f(att));
      be.matmul(l.o.view, f(att), f(xn), 1);
      be.add(f(x), f(xn), E);
      be.rms_norm(f(x), f(l.n2), f(xn), 1, E, 1e-5f);
      be.matmul(l.gate.view, f(xn), f(g), 1);
      be.matmul(l.up.view, f(xn), f(u), 1);
      be.swiglu(f(g), f(u), f(g), F);
      be.matmul(l.down.view, f(g), f(xn), 1);
      be.add(f(x), f(xn), E);
      // keep the residual stream bounded over many replays (random weights would blow it up)
      be.rms_norm(f(x), f(l.n1), f(x), 1, E, 1e-5f);
    }
    be.rms_norm(f(x), f(fnorm), f(xn), 1, E, 1e-5f);
    be.matmul(out.view, f(xn), f(logits), 1);
    cuda_argmax_async(be, f(logits), V, tok->as<int32_t>());
  };
  CudaGraphRunner graph(be);
  // One sequence in pool block 0; only its position changes from step to step.
  BatchInfo batch = BatchInfo::single(1000, 1, {0}, false);
  auto at = [&batch](int32_t pos) -> const BatchInfo& {
    batch.seqs[0].pos0 = pos;
    return batch;
  };
  int32_t pos = 1000;
  for (int i = 0; i < 3; ++i) graph.run(at(pos++), step);  // eager, capture, replay
  be.synchronize();
  const int n = quick ? 5 : 100;
  Event e0, e1;
  SHARDLM_CUDA_CHECK(cudaEventRecord(e0.get(), be.stream()));
  for (int i = 0; i < n; ++i) graph.run(at(pos++), step);
  SHARDLM_CUDA_CHECK(cudaEventRecord(e1.get(), be.stream()));
  be.synchronize();
  float ms = 0;
  SHARDLM_CUDA_CHECK(cudaEventElapsedTime(&ms, e0.get(), e1.get()));
  const double per_tok = ms / n;
  const double scale = 32.0 / L;  // quick mode runs fewer layers; report the 32-layer estimate
  const double full_bytes = (bytes - static_cast<double>(out.view.row_stride) * V) * scale +
                            static_cast<double>(out.view.row_stride) * V;
  const double full_ms = per_tok * full_bytes / bytes;
  const double gbs = full_bytes / (full_ms * 1e-3) / 1e9;
  std::printf("decode %-5s (output %-5s) %2d layers: %7.3f ms/token -> 32 layers: %6.1f tok/s, %5.2f GB/token, "
              "%5.0f GB/s = %5.1f%% of copy, roofline %5.1f tok/s (graph captures %lld, replays %lld)\n",
              type_name(wt), type_name(out_t), L, per_tok, 1e3 / full_ms, full_bytes / 1e9, gbs,
              100.0 * gbs / copy_gbs, copy_gbs * 1e9 / full_bytes, static_cast<long long>(graph.captures()),
              static_cast<long long>(graph.replays()));
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, matvec = true, decode = true, pack = true;
  int device = 0, layers = 0;
  std::vector<int64_t> tokens = {1};
  std::vector<GgmlType> types = {GgmlType::F32,  GgmlType::F16,  GgmlType::BF16, GgmlType::Q8_0,
                                 GgmlType::Q6_K, GgmlType::Q4_K, GgmlType::Q4_0};
  std::vector<GgmlType> decode_types = {GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_K};
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--device") && i + 1 < argc) device = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--matvec-only")) decode = false;
    else if (!std::strcmp(argv[i], "--decode-only")) matvec = false;
    else if (!std::strcmp(argv[i], "--layers") && i + 1 < argc) layers = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--no-pack")) pack = false;
    else if (!std::strcmp(argv[i], "--tokens") && i + 1 < argc) {
      tokens.clear();
      for (const char* p = argv[++i]; *p;) {
        char* end = nullptr;
        const long n = std::strtol(p, &end, 10);
        if (end == p || n < 1 || n > 4096) {
          std::fprintf(stderr, "--tokens: '%s' is not a list of numbers in [1, 4096]\n", argv[i]);
          return 2;
        }
        tokens.push_back(n);
        p = *end == ',' ? end + 1 : end;
      }
    }
    else if (!std::strcmp(argv[i], "--types") && i + 1 < argc) {  // e.g. q4_0,bf16
      types.clear();
      std::string list = argv[++i];
      for (size_t p = 0; p <= list.size();) {
        const size_t e = std::min(list.find(',', p), list.size());
        if (auto t = parse_type(list.substr(p, e - p))) types.push_back(*t);
        p = e + 1;
      }
      decode_types = types;
    } else {
      std::fprintf(stderr, "usage: shardlm_cuda_bench [--quick] [--device N] [--matvec-only|--decode-only] "
                           "[--types q4_0,bf16,...] [--layers N] [--no-pack] [--tokens 1,16,64]\n");
      return 2;
    }
  }
  try {
    if (cuda_device_count() == 0) {
      std::printf("no CUDA device: nothing to measure\n");
      return 0;
    }
    auto backend = make_cuda_backend(device, GgmlType::F16, cuda_tuning_from_env());
    auto& be = as_cuda(*backend, "bench");
    be.set_pack_weights(pack);
    std::printf("device: %s; quantized weights %s\n", be.name().c_str(), pack ? "packed (int8 x, dp4a)" : "in ggml's layout");
    const double copy = copy_bandwidth(be.stream());
    std::printf("device-to-device copy (1 GiB, read+write): %.0f GB/s\n", copy);
    if (matvec)
      for (int64_t n : tokens) bench_matvecs(be, copy, quick, types, n);
    std::printf("\n");
    // Output head as llama.cpp's files carry it: Q6_K for the 4-bit types, else the weights' own type.
    if (decode)
      for (GgmlType t : decode_types)
        if (t != GgmlType::Q6_K)
          bench_decode(be, t, (t == GgmlType::Q4_0 || t == GgmlType::Q4_K) ? GgmlType::Q6_K : t, copy, quick, layers);
    std::printf("allocated at exit: %.1f MB\n", be.allocated_bytes() / 1e6);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
