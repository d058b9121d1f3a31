// Shared command line of the C++ benchmarks, in the style of nccl-tests:
//   -b/--minlen N   -e/--maxlen N   -f/--stepfactor F   (lengths minlen, minlen*F, ... <= maxlen;
//                                                         N accepts K/M suffixes, 1K = 1024)
//   -n/--iters N    -w/--warmup N   -c/--check 0|1
//   -d/--headdim D  -H/--heads H    -K/--kv-heads HKV   -B/--batch B
//   --causal 0|1    --dtype float32|float64|bfloat16    -t/--threads T
//   --clock wall|cpu (cpu: process CPU time, steadier on a loaded machine at 1 thread)
//   --stat median|min  --fwd-only 0|1
//   --json PATH     -h/--help
// Header-only; benchmarks may add their own options by handling them before calling parse().
// Also the timing helpers the benchmarks share (now_ms, summary).
#pragma once

#include <time.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

namespace ring_attn {
namespace bench {

struct Options {
  int64_t minlen = 1024;
  int64_t maxlen = 4096;
  double stepfactor = 2.0;
  int iters = 10;
  int warmup = 2;
  bool check = true;
  int headdim = 64;
  int heads = 4;
  int kv_heads = 0;  // 0: same as heads
  int batch = 1;
  bool causal = false;
  std::string dtype = "float32";
  int threads = 0;  // 0: leave the runtime default
  bool cpu_clock = false;  // time with the process CPU clock instead of the wall clock
  bool stat_min = false;   // report the fastest iteration instead of the median
  bool run_bwd = true;     // --fwd-only 1: time the forward only (profiling)
  std::string json;

  int nheads_kv() const { return kv_heads > 0 ? kv_heads : heads; }

  // minlen, minlen * stepfactor, ... up to maxlen (always at least minlen).
  std::vector<int64_t> lengths() const {
    std::vector<int64_t> out;
    double len = static_cast<double>(minlen);
    while (static_cast<int64_t>(len) <= maxlen) {
      const int64_t l = static_cast<int64_t>(len);
      if (out.empty() || out.back() != l) out.push_back(l);
      if (stepfactor <= 1.0) break;
      len *= stepfactor;
    }
    if (out.empty()) out.push_back(minlen);
    return out;
  }
};

// A usage error: the message on one line, exit status 2.
[[noreturn]] inline void usage_error(const std::string& message) {
  std::fprintf(stderr, "%s\n", message.c_str());
  std::exit(2);
}

// The --json file, opened for writing; a usage error when it cannot be.
inline FILE* open_output(const std::string& path) {
  FILE* file = std::fopen(path.c_str(), "w");
  if (!file) usage_error("cannot write " + path);
  return file;
}

// 4096, 4K, 1M (binary suffixes), as in nccl-tests; anything else, or a size beyond int64, is a
// usage error.
inline int64_t parse_size(const char* s) {
  char* end = nullptr;
  const double v = std::strtod(s, &end);
  double mult = 1;
  if (end != s && *end) {
    switch (*end++) {
      case 'k': case 'K': mult = 1024; break;
      case 'm': case 'M': mult = 1024.0 * 1024; break;
      case 'g': case 'G': mult = 1024.0 * 1024 * 1024; break;
      default: end = nullptr;
    }
  }
  if (end == s || end == nullptr || *end || !(std::fabs(v * mult) < 9.2e18)) {
    usage_error(std::string("invalid size '") + s + "'");
  }
  return static_cast<int64_t>(v * mult);
}

// An int option's value: the whole text a decimal int, else a usage error naming the option.
inline int parse_int(const std::string& option, const char* s) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(s, &end, 10);
  if (end == s || *end || errno == ERANGE || v < INT_MIN || v > INT_MAX) {
    usage_error(option + " needs an int, got '" + s + "'");
  }
  return static_cast<int>(v);
}

// A 0|1 option's value.
inline bool parse_flag(const std::string& option, const char* s) {
  if (std::strcmp(s, "0") != 0 && std::strcmp(s, "1") != 0) {
    usage_error(option + " must be 0 or 1, got '" + s + "'");
  }
  return *s == '1';
}

// value when it is one of choices; otherwise exits with status 2, naming the option and the choices.
inline std::string one_of(const char* option, const std::string& value,
                          std::initializer_list<const char*> choices) {
  std::string listed;
  for (const char* choice : choices) {
    if (value == choice) return value;
    listed += (listed.empty() ? "" : ", ") + std::string(choice);
  }
  std::fprintf(stderr, "%s must be one of %s; got %s\n", option, listed.c_str(), value.c_str());
  std::exit(2);
}

inline void print_usage(const char* prog, const char* extra = nullptr) {
  std::printf(
      "usage: %s [options]\n"
      "  -b, --minlen N       smallest sequence length (K/M suffixes ok)   [1024]\n"
      "  -e, --maxlen N       largest sequence length                      [4096]\n"
      "  -f, --stepfactor F   multiply the length by F each step           [2]\n"
      "  -n, --iters N        timed iterations (median reported)           [10]\n"
      "  -w, --warmup N       untimed warmup iterations                    [2]\n"
      "  -c, --check 0|1      check against a reference                   [1]\n"
      "  -d, --headdim D      head dimension                               [64]\n"
      "  -H, --heads H        query heads                                  [4]\n"
      "  -K, --kv-heads HKV   key/value heads (0: = heads)                 [0]\n"
      "  -B, --batch B        batch size                                   [1]\n"
      "      --causal 0|1     causal mask                                  [0]\n"
      "      --dtype T        float32 | float64 | bfloat16                 [float32]\n"
      "  -t, --threads T      intra-op threads (0: runtime default)        [0]\n"
      "      --clock C        wall | cpu (process CPU time)                [wall]\n"
      "      --stat S         median | min over the timed iterations       [median]\n"
      "      --fwd-only 0|1   skip the backward (no check of it)           [0]\n"
      "      --json PATH      also write the results as JSON\n"
      "  -h, --help\n"
      "%s",
      prog, extra ? extra : "");
}

// Parses argv into opt. Unknown options are an error unless `unknown` handles them: it gets
// (name, value or nullptr) and returns how many arguments it consumed (0: not handled).
template <typename Unknown>
inline Options parse(int argc, char** argv, Unknown&& unknown, const char* extra_usage = nullptr) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const char* val = i + 1 < argc ? argv[i + 1] : nullptr;
    auto need = [&]() -> const char* {
      if (!val) {
        std::fprintf(stderr, "option %s needs a value\n", a.c_str());
        std::exit(2);
      }
      ++i;
      return val;
    };
    if (a == "-h" || a == "--help") {
      print_usage(argv[0], extra_usage);
      std::exit(0);
    } else if (a == "-b" || a == "--minlen") {
      o.minlen = parse_size(need());
    } else if (a == "-e" || a == "--maxlen") {
      o.maxlen = parse_size(need());
    } else if (a == "-f" || a == "--stepfactor") {
      const char* text = need();
      char* end = nullptr;
      o.stepfactor = std::strtod(text, &end);
      if (end == text || *end || !(o.stepfactor > 0)) {
        usage_error(a + " needs a positive number, got '" + text + "'");
      }
    } else if (a == "-n" || a == "--iters") {
      o.iters = parse_int(a, need());
    } else if (a == "-w" || a == "--warmup") {
      o.warmup = parse_int(a, need());
    } else if (a == "-c" || a == "--check") {
      o.check = parse_flag(a, need());
    } else if (a == "-d" || a == "--headdim") {
      o.headdim = parse_int(a, need());
    } else if (a == "-H" || a == "--heads") {
      o.heads = parse_int(a, need());
    } else if (a == "-K" || a == "--kv-heads") {
      o.kv_heads = parse_int(a, need());
    } else if (a == "-B" || a == "--batch") {
      o.batch = parse_int(a, need());
    } else if (a == "--causal") {
      o.causal = parse_flag(a, need());
    } else if (a == "--dtype") {
      o.dtype = one_of("--dtype", need(), {"float32", "float64", "bfloat16"});
    } else if (a == "-t" || a == "--threads") {
      o.threads = parse_int(a, need());
    } else if (a == "--clock") {
      o.cpu_clock = one_of("--clock", need(), {"wall", "cpu"}) == "cpu";
    } else if (a == "--stat") {
      o.stat_min = one_of("--stat", need(), {"median", "min"}) == "min";
    } else if (a == "--fwd-only") {
      o.run_bwd = !parse_flag(a, need());
    } else if (a == "--json") {
      o.json = need();
    } else {
      const int used = unknown(a.c_str(), val);
      if (used <= 0) {
        std::fprintf(stderr, "unknown option %s (-h for help)\n", a.c_str());
        std::exit(2);
      }
      i += used - 1;
    }
  }
  if (o.minlen < 1 || o.maxlen < o.minlen || o.iters < 1 || o.warmup < 0 || o.headdim < 1 ||
      o.heads < 1 || o.batch < 1 || o.nheads_kv() < 1 || o.heads % o.nheads_kv() != 0 ||
      o.threads < 0) {
    usage_error("invalid options (need 1 <= minlen <= maxlen, iters >= 1, warmup >= 0, headdim, "
                "heads, batch >= 1, heads % kv-heads == 0, threads >= 0)");
  }
  return o;
}

inline Options parse(int argc, char** argv) {
  return parse(argc, argv, [](const char*, const char*) { return 0; });
}

// Milliseconds on the wall clock, or of process CPU time (--clock cpu).
inline double now_ms(bool cpu_clock) {
  if (cpu_clock) {
    timespec ts{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
  }
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

// The median of the timed iterations, or their minimum (--stat min).
inline double summary(std::vector<double> samples, bool stat_min) {
  std::sort(samples.begin(), samples.end());
  const size_t n = samples.size();
  if (stat_min) return samples.front();
  return n % 2 ? samples[n / 2] : 0.5 * (samples[n / 2 - 1] + samples[n / 2]);
}

}  // namespace bench
}  // namespace ring_attn
