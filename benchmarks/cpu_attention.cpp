// The decode step's attention scores and softmax on AVX-512 (csrc/decode.cpp), against the way the step
// computed them before: scores through the lm_head's kernels (4 keys x 4 queries, one horizontal sum per
// score) and a scalar softmax. One thread, float32 keys, the embedded model's shapes (head 64, 4 query heads
// per key/value head), 32 rows x 2 key/value heads x 12 layers per "step", the best of 200 runs. Prints a
// table and writes JSON.
//
//   g++ -O3 -std=c++17 -ffp-contract=off -Icsrc $(python3-config --includes) benchmarks/cpu_attention.cpp \
//       csrc/threadpool.cpp csrc/kernels.cpp -pthread $(python3-config --ldflags --embed) -o /tmp/cpu_attention
//   /tmp/cpu_attention [OUTPUT_JSON]     (default benchmarks/results/cpu_attention.json)
#include "../csrc/decode.cpp"

#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace bitnet158 {
std::mutex& kernel_lock() {  // module.cpp's, which this program does not link
  static std::mutex lock;
  return lock;
}
}  // namespace bitnet158

using namespace bitnet158;

int main(int argc, char** argv) {
  if (!has_avx512(detected_isa())) {
    std::printf("this CPU has no AVX-512\n");
    return 1;
  }
  const std::string output = argc > 1 ? argv[1] : "benchmarks/results/cpu_attention.json";
  constexpr int64_t kHead = 64, kGroup = 4, kPairs = 64, kLayers = 12, kMaxLen = 1024;
  std::mt19937 random(1);
  std::normal_distribution<float> normal(0, 1);
  std::vector<float> queries(kPairs * kGroup * kHead), keys(kPairs * kMaxLen * kHead), scores(kGroup * kMaxLen);
  for (float& v : queries) v = normal(random);
  for (float& v : keys) v = normal(random);
  const ScoresFn before_scores = scores_by_rows<kF32, head_avx512<kF32>, rows_avx512<kF32, 1>>;
  const ScoresFn scores_fns[] = {before_scores, scores_avx512<kF32>};
  const SoftmaxFn softmax_fns[] = {softmax_portable, softmax_avx512};
  std::string json = "{\n  \"method\": \"one thread, best of 200, 32 rows x 2 kv heads x 12 layers\",\n  \"rows\": [";
  std::printf("%8s %12s %12s %8s\n", "keys", "before us", "now us", "ratio");
  for (int64_t count : {24, 66, 200, 1000}) {
    double best[2] = {1e30, 1e30};
    for (int rep = 0; rep < 200; ++rep)
      for (int v = 0; v < 2; ++v) {
        const auto start = std::chrono::steady_clock::now();
        for (int64_t layer = 0; layer < kLayers; ++layer)
          for (int64_t p = 0; p < kPairs; ++p) {
            scores_fns[v](queries.data() + p * kGroup * kHead, kGroup, keys.data() + p * kMaxLen * kHead, count, kHead,
                          scores.data(), kMaxLen);
            softmax_fns[v](scores.data(), kGroup, kMaxLen, count, 0.125f);
          }
        best[v] = std::min(best[v], std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count());
      }
    std::printf("%8lld %12.0f %12.0f %7.2fx\n", static_cast<long long>(count), best[0], best[1], best[0] / best[1]);
    json += std::string(count == 24 ? "" : ",") + "\n    {\"keys\": " + std::to_string(count) + ", \"before_us\": " +
            std::to_string(best[0]) + ", \"now_us\": " + std::to_string(best[1]) + "}";
  }
  json += "\n  ]\n}\n";
  if (FILE* file = std::fopen(output.c_str(), "w")) {
    std::fputs(json.c_str(), file);
    std::fclose(file);
  }
  return 0;
}
