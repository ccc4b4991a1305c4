#include "cli_common.h"

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

#include "core/error.h"
#include "core/units.h"
#include "quant/quant.h"
#ifdef SHARDLM_HAVE_MPI
#include "comm/mpi/mpi_comm.h"
#ifdef SHARDLM_HAVE_NCCL
#include "comm/nccl/nccl_comm.h"
#endif
#endif

namespace shardlm {
namespace {
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

std::vector<int32_t> parse_id_list(const std::string& s, const std::string& flag) {
  std::vector<int32_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (...) {
      used = 0;
    }
    if (used == 0 || used != item.size() || v < 0 || v > INT32_MAX)
      fail(flag, ": '", item, "' is not a token id (a whole number in [0, 2147483647])");
    out.push_back(static_cast<int32_t>(v));
  }
  if (out.empty()) fail(flag, ": no ids given (expected a comma-separated list like 1,2,3)");
  return out;
}

std::vector<double> parse_proportions(const std::string& s, const std::string& flag) {
  std::vector<double> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t used = 0;
    double v = 0;
    try {
      v = std::stod(item, &used);
    } catch (...) {
      used = 0;
    }
    if (used == 0 || used != item.size() || !std::isfinite(v) || v <= 0)
      fail(flag, ": '", item, "' is not a positive number");
    out.push_back(v);
  }
  if (out.empty()) fail(flag, ": no proportions given (expected e.g. 3,1)");
  return out;
}

std::string read_text_file(const std::string& path, const std::string& flag) {
  std::stringstream ss;
  if (path == "-") {
    ss << std::cin.rdbuf();
    if (std::cin.bad()) fail_kind(ErrorKind::kIo, flag, " -: cannot read standard input");
    return ss.str();
  }
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) fail_kind(ErrorKind::kIo, flag, " '", path, "' is a directory, not a file");
  std::ifstream f(path, std::ios::binary);
  if (!f) fail_kind(ErrorKind::kIo, flag, ": cannot read '", path, "' (", std::strerror(errno), ")");
  ss << f.rdbuf();
  return ss.str();
}

uint64_t random_seed() {
  std::random_device rd;
  // Below 2^53 so the seed survives JSON readers that hold numbers as doubles.
  return ((uint64_t(rd()) << 32) | uint64_t(rd())) & ((uint64_t{1} << 53) - 1);
}

namespace {
// The temporary file being written, for the signal handler: fixed buffers (no allocation in a handler).
// GgufWriter::write stages its output in "<path>.tmp" itself (renamed when complete, removed on an error,
// but not on a signal), so that file is removed too.
char g_tmp_path[4096] = {0};
char g_writer_tmp_path[4096 + 4] = {0};
extern "C" void remove_tmp_and_reraise(int sig) {
  if (g_tmp_path[0]) unlink(g_tmp_path);
  if (g_writer_tmp_path[0]) unlink(g_writer_tmp_path);
  signal(sig, SIG_DFL);
  raise(sig);
}
}  // namespace

void write_output_file(const std::string& path, const std::string& flag, const std::vector<std::string>& inputs,
                       const std::function<void(const std::string& tmp)>& write) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path out = fs::weakly_canonical(fs::absolute(path, ec), ec);
  for (const std::string& in : inputs) {
    std::error_code ec2;
    const bool same = (!ec && fs::weakly_canonical(fs::absolute(in, ec2), ec2) == out) ||
                      (fs::exists(path, ec2) && fs::equivalent(in, path, ec2));
    if (same) fail(flag, " '", path, "' is the input file '", in, "': write the output to another path");
  }
  if (fs::is_directory(path, ec)) fail(flag, " '", path, "' is a directory: give a file path");
  if (!write) return;  // only the checks
  // Same directory as the output, so the rename is atomic (one filesystem).
  std::string tmp = path + ".tmp-XXXXXX";
  const int fd = mkstemp(tmp.data());
  if (fd < 0) fail_kind(ErrorKind::kIo, flag, ": cannot create '", tmp, "' (", std::strerror(errno), ")");
  close(fd);
  if (tmp.size() < sizeof g_tmp_path) {
    std::memcpy(g_tmp_path, tmp.c_str(), tmp.size() + 1);
    const std::string writer_tmp = tmp + ".tmp";
    std::memcpy(g_writer_tmp_path, writer_tmp.c_str(), writer_tmp.size() + 1);
  }
  struct sigaction sa = {}, old_int = {}, old_term = {}, old_hup = {};
  sa.sa_handler = remove_tmp_and_reraise;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, &old_int);
  sigaction(SIGTERM, &sa, &old_term);
  sigaction(SIGHUP, &sa, &old_hup);
  auto restore = [&] {
    sigaction(SIGINT, &old_int, nullptr);
    sigaction(SIGTERM, &old_term, nullptr);
    sigaction(SIGHUP, &old_hup, nullptr);
    g_tmp_path[0] = 0;
    g_writer_tmp_path[0] = 0;
  };
  try {
    write(tmp);
    // mkstemp made it 0600; give the output the mode a plain create would (0666 less the umask).
    const mode_t mask = umask(0);
    umask(mask);
    chmod(tmp.c_str(), 0666 & ~mask);
    fs::rename(tmp, path);  // replaces an existing output only now, whole
  } catch (...) {
    std::error_code rm;
    fs::remove(tmp, rm);
    restore();
    throw;
  }
  restore();
}

std::string default_model_path() {
  if (const char* env = std::getenv("SHARDLM_DEFAULT_MODEL")) return env;
  std::error_code ec;
#ifdef SHARDLM_DEFAULT_MODEL_PATH
  if (std::filesystem::exists(SHARDLM_DEFAULT_MODEL_PATH, ec)) return SHARDLM_DEFAULT_MODEL_PATH;
#endif
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (auto dir = exe.parent_path(); !dir.empty() && dir != dir.root_path(); dir = dir.parent_path()) {
      const auto p = dir / "models" / "aidreams260K.gguf";
      if (std::filesystem::exists(p, ec)) return p.string();
    }
  }
  fail_kind(ErrorKind::kIo, "no model given (-m) and the bundled default model models/aidreams260K.gguf was not "
            "found; set SHARDLM_DEFAULT_MODEL or pass -m");
}

namespace {

// The shortest wall time of `reps` runs of part(0 .. threads-1), one std::thread per part, not counting the
// first `warmup` runs (they fault the pages in and warm the caches).
double best_parallel_s(int threads, int reps, int warmup, const std::function<void(int)>& part) {
  double best = 1e30;
  for (int rep = 0; rep < reps; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int k = 0; k < threads; ++k) pool.emplace_back(part, k);
    for (auto& t : pool) t.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (rep >= warmup) best = std::min(best, std::max(s, 1e-9));
  }
  return best;
}

// The largest CPU cache's size in bytes (sysfs, else sysconf), 0 if neither says.
uint64_t largest_cache_bytes() {
  uint64_t best = 0;
  for (int i = 0; i < 8; ++i) {
    std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/size");
    uint64_t v = 0;
    char unit = 0;
    if (!(f >> v)) continue;
    f >> unit;
    best = std::max(best, v << (unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0));
  }
  if (best == 0) best = static_cast<uint64_t>(std::max(0L, sysconf(_SC_LEVEL3_CACHE_SIZE)));
  return best;
}

CpuKernelRate time_cpu_kernels(GgmlType type, int threads) {
  constexpr int64_t kCols = 4096, kTok = 64, kPrefillRows = 2048;
  // 64 distinct rows of real quantized values (no NaN scales or denormals) repeated over four times the largest
  // cache, at least 128 MiB and at most 1 GiB: the timed passes must come from memory (a 16-core Xeon's cache
  // held much of 128 MiB: rates 1.5-2x its copy bandwidth).
  constexpr int64_t kDistinct = 64;
  static_assert(kDistinct % kPackRows == 0 && kPrefillRows % kDistinct == 0);
  const int64_t rb = row_bytes(type, kCols);
  const int64_t bytes = std::clamp<int64_t>(4 * static_cast<int64_t>(largest_cache_bytes()), int64_t{128} << 20,
                                            int64_t{1} << 30);
  const int64_t n_rows = std::max<int64_t>(kPrefillRows, bytes / rb / kDistinct * kDistinct);
  std::vector<uint8_t> distinct(static_cast<size_t>(kDistinct * rb));  // (kDistinct, rb) bytes
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> row(kCols);
  for (int64_t r = 0; r < kDistinct; ++r) {
    for (float& v : row) v = nd(rng);
    quantize_row(type, row.data(), distinct.data() + r * rb, kCols);
  }
  // Packed as the CPU backend packs it, where it does (quant.h's packs_rows): whole groups, so the packed
  // distinct rows repeat as they are.
  const bool packed = packs_rows(cpu_isa(), type);
  if (packed) {
    std::vector<uint8_t> p(distinct.size());
    pack_rows(type, distinct.data(), static_cast<size_t>(rb), kDistinct, kCols, p.data());
    distinct = std::move(p);
  }
  std::vector<uint8_t> w(static_cast<size_t>(n_rows * rb));  // (n_rows, rb) bytes
  for (int64_t r = 0; r < n_rows; r += kDistinct)
    std::memcpy(w.data() + r * rb, distinct.data(), distinct.size());
  std::vector<float> x(kCols * kTok);  // (kTok, kCols)
  for (float& v : x) v = nd(rng);
  std::vector<float> y(static_cast<size_t>(std::max(n_rows, kPrefillRows * kTok)));  // (n_tok, rows)
  // Each thread multiplies its slice of `rows` rows (whole packed groups) kPasses times; the better of 2 runs
  // after a warm-up, per pass.
  constexpr int kPasses = 4;
  const auto best_s = [&](int64_t rows, int64_t n_tok) {
    return best_parallel_s(threads, 3, 1, [&](int k) {
      const int64_t lo = rows * k / threads / kPackRows * kPackRows;
      const int64_t hi = k + 1 == threads ? rows : rows * (k + 1) / threads / kPackRows * kPackRows;
      const uint8_t* rows_lo = w.data() + lo * rb;
      for (int pass = 0; pass < kPasses; ++pass) {
        if (packed)
          matmul_packed_rows(type, rows_lo, hi - lo, kCols, x.data(), kCols, n_tok, y.data() + lo, rows);
        else
          matmul_rows(type, rows_lo, static_cast<size_t>(rb), hi - lo, kCols, x.data(), kCols, n_tok, y.data() + lo,
                      rows);
      }
    }) / kPasses;
  };
  CpuKernelRate k;
  k.type = type;
  k.threads = threads;
  k.decode_bytes_per_s = static_cast<double>(n_rows * rb) / best_s(n_rows, 1);
  k.prefill_flops = 2.0 * kPrefillRows * kCols * kTok / best_s(kPrefillRows, kTok);
  return k;
}

}  // namespace

double measure_host_bandwidth(int threads, size_t bytes) {
  threads = std::max(1, threads);
  std::vector<uint8_t> a(bytes, 1), b(bytes, 2);
  // Read plus written bytes over the best of 5 copies.
  return 2.0 * double(bytes) / best_parallel_s(threads, 5, 0, [&](int k) {
           const size_t lo = bytes * size_t(k) / size_t(threads), hi = bytes * size_t(k + 1) / size_t(threads);
           std::memcpy(b.data() + lo, a.data() + lo, hi - lo);
         });
}

std::vector<CpuKernelRate> measure_cpu_kernels(const ModelDesc& m, int threads) {
  threads = std::max(1, threads);
  std::vector<CpuKernelRate> out;
  for (const ModelDesc::TypeShare& t : m.matmul_types()) {
    if (!can_quantize(t.type)) return {};
    out.push_back(time_cpu_kernels(t.type, threads));
  }
  return out;
}

std::unique_ptr<ModelSource> open_model(const std::string& path) { return open_model_source(path); }

int parse_cli(CLI::App& app, int argc, const char* const* argv) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "shardlm %s: %s\nRun 'shardlm %s --help' for the options.\n", app.get_name().c_str(),
                 e.what(), app.get_name().c_str());
    return 2;
  }
  return -1;
}

Progress::Progress(std::string label, bool enabled)
    : label_(std::move(label)), enabled_(enabled), tty_(isatty(2)), t0_(now_s()) {}

void Progress::operator()(uint64_t done, uint64_t total) {
  if (!enabled_ || total == 0) return;
  const int pct = static_cast<int>(100.0 * double(done) / double(total));
  if (tty_) {
    if (pct == last_pct_) return;
    std::fprintf(stderr, "\r%s %3d%%  %s / %s", label_.c_str(), pct, human_bytes(done).c_str(),
                 human_bytes(total).c_str());
  } else {
    if (pct / 25 == last_pct_ / 25 && last_pct_ >= 0) return;
    std::fprintf(stderr, "%s %3d%%  %s / %s\n", label_.c_str(), pct, human_bytes(done).c_str(),
                 human_bytes(total).c_str());
  }
  last_pct_ = pct;
  std::fflush(stderr);
}

void Progress::finish() {
  if (!enabled_) return;
  if (tty_ && last_pct_ >= 0) std::fprintf(stderr, "\n");
  std::fprintf(stderr, "%s done in %.2f s\n", label_.c_str(), now_s() - t0_);
}

#ifdef SHARDLM_HAVE_MPI
namespace {
volatile sig_atomic_t g_launched_pid = 0;  // mpirun, while a self-launch waits for it
volatile sig_atomic_t g_forward_as = 0;
extern "C" void forward_to_launched(int) {
  if (g_launched_pid > 0 && g_forward_as > 0) kill(static_cast<pid_t>(g_launched_pid), g_forward_as);
}
}  // namespace
#endif

int maybe_self_launch(int tp, int pp, int argc, const char* const* argv, int forward_term_as) {
  const int world = tp * pp;
  if (world <= 1) return -1;
#ifdef SHARDLM_HAVE_MPI
  if (launched_by_mpi()) return -1;
  std::vector<std::string> args = {"mpirun", "-np", std::to_string(world), "--oversubscribe", "--bind-to", "none",
                                   "--mca", "mpi_yield_when_idle", "1"};
  if (geteuid() == 0) args.insert(args.begin() + 1, "--allow-run-as-root");
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  args.push_back(ec ? std::string(argv[0]) : exe.string());
  // argv[0] is "shardlm <command>": split back into program and command words.
  const std::string first = argv[0];
  if (const auto sp = first.find(' '); sp != std::string::npos) args.push_back(first.substr(sp + 1));
  for (int i = 1; i < argc; ++i) args.push_back(argv[i]);
  std::fflush(stdout);
  std::fflush(stderr);
  // With signals to forward, mpirun runs in a process group of its own: a terminal's Ctrl-C then reaches
  // this process alone, which passes it on as `forward_term_as` (mpirun itself would abort the whole job on
  // SIGINT). A background group that reads the terminal is stopped (SIGTTIN), so mpirun's standard input
  // is a pipe that a thread of this process fills from ours.
  const bool own_group = forward_term_as > 0;
  int in_pipe[2] = {-1, -1};
  if (own_group && pipe(in_pipe) != 0) fail_kind(ErrorKind::kResource, "cannot start mpirun: pipe failed");
  const pid_t pid = fork();
  if (pid < 0) fail_kind(ErrorKind::kResource, "cannot start mpirun: fork failed");
  if (pid == 0) {
    if (own_group) {
      setpgid(0, 0);
      dup2(in_pipe[0], 0);
      close(in_pipe[0]);
      close(in_pipe[1]);
    }
    std::vector<char*> cargs;
    for (auto& a : args) cargs.push_back(a.data());
    cargs.push_back(nullptr);
    execvp("mpirun", cargs.data());
    std::fprintf(stderr, "shardlm: cannot run mpirun (%s); install openmpi-bin or launch with mpirun yourself\n",
                 std::strerror(errno));
    _exit(127);
  }
  if (own_group) {
    close(in_pipe[0]);
    signal(SIGPIPE, SIG_IGN);  // mpirun gone: a failed write, not the end of this process and its exit status
    std::thread([fd = in_pipe[1]] {
      char buf[4096];
      for (;;) {
        const ssize_t n = read(0, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        for (ssize_t off = 0; off < n;) {
          const ssize_t w = write(fd, buf + off, static_cast<size_t>(n - off));
          if (w < 0 && errno == EINTR) continue;
          if (w <= 0) {
            close(fd);
            return;
          }
          off += w;
        }
      }
      close(fd);  // end of our input: rank 0 reads end of file
    }).detach();
  }
  if (forward_term_as > 0) {
    g_launched_pid = pid;
    g_forward_as = forward_term_as;
    struct sigaction sa = {};
    sa.sa_handler = forward_to_launched;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, nullptr);
    sigaction(SIGINT, &sa, nullptr);
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return 1;
#else
  (void)argc;
  (void)argv;
  (void)forward_term_as;
  fail_kind(ErrorKind::kUnsupported, "--tp ", tp, " --pp ", pp, " needs ", world,
            " ranks, but this build has no MPI (configure with -DSHARDLM_MPI=ON)");
#endif
}

std::unique_ptr<Communicator> make_communicator(double timeout_s) {
#ifdef SHARDLM_HAVE_MPI
  if (const LaunchEnv launch = launch_env(); launch.launched()) {
    auto mpi = make_mpi_communicator(nullptr, nullptr, timeout_s);
    // srun without a PMI plugin that this MPI library speaks starts tasks that each see a world of one.
    if (launch.world_size > 0 && launch.world_size != mpi->world_size())
      fail_kind(ErrorKind::kComm, launcher_name(launch.launcher), " started ", launch.world_size,
                " ranks, but MPI connected ", mpi->world_size(), " of them",
                launch.launcher == Launcher::kSlurm ? " (give srun the --mpi plugin this MPI library speaks, e.g. "
                                                      "--mpi=pmix)" : "");
#ifdef SHARDLM_HAVE_NCCL
    // NCCL carries GPU buffers once the engine binds a CUDA backend's stream; host buffers, and every
    // buffer of CPU ranks, stay on MPI. SHARDLM_COMM=mpi stages GPU data through host memory instead.
    const char* want = std::getenv("SHARDLM_COMM");
    if (want && std::string(want) != "mpi" && std::string(want) != "nccl")
      fail("SHARDLM_COMM='", want, "' is not mpi or nccl");
    if (mpi->world_size() > 1 && !(want && std::string(want) == "mpi"))
      return make_nccl_communicator(std::move(mpi), timeout_s);
#endif
    return mpi;
  }
#endif
  (void)timeout_s;
  return make_single_rank_communicator();
}

}  // namespace shardlm
