// The shardlm binary on Hugging Face model directories, as a user runs it: generate (one rank, and tp 2 /
// pp 2 through its mpirun self-launch), plan and inspect on a directory; and the chat path: --chat renders
// the chat template (from tokenizer_config.json or GGUF tokenizer.chat_template) with the prompt as the
// user message, optional --system, add_generation_prompt, and tokenizes with special tokens parsed;
// --tokenizer pairs a tokenizer with a model and refuses one larger than the model's vocabulary.
// Expectations: transformers' reference.json, and chat_templates.json's renderings by Jinja2.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
// GCC 12-14 with -fsanitize=address: a false -Wmaybe-uninitialized inside <regex> itself (GCC bug 105616); clang
// has no such warning.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <regex>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#include <thread>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>

#include "hf_reference.h"
#include "hf_test_util.h"
#include "loader/gguf_export.h"
#include "loader/hf_source.h"
#include "tokenizer/hf_tokenizer.h"

namespace shardlm::test {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// A file or folder of tests/data/tokenizers; throws naming it when missing.
std::string tok_fixture(const std::string& rel) { return fixture_path("tokenizers/" + rel); }

std::string slurp(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

struct Result {
  int rc;
  std::string out, err;
};

std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) {
    if (c == '\'') {
      q.append("'\\''");
    } else {
      q.push_back(c);
    }
  }
  q.push_back('\'');
  return q;
}

Result run(const std::vector<std::string>& args) {
  static int n = 0;
  const std::string base = std::string(SHARDLM_BINARY_DIR) + "/hfcli-" + std::to_string(::getpid()) + "-" +
                           std::to_string(n++);
  std::string cmd = quote(std::string(SHARDLM_BINARY_DIR) + "/apps/shardlm/shardlm");
  for (const auto& a : args) cmd.append(" ").append(quote(a));
  cmd += " > " + base + ".out 2> " + base + ".err";
  const int st = std::system(cmd.c_str());
  Result r{WIFEXITED(st) ? WEXITSTATUS(st) : 128, slurp(base + ".out"), slurp(base + ".err")};
  std::remove((base + ".out").c_str());
  std::remove((base + ".err").c_str());
  return r;
}

json parse(const Result& r) {
  try {
    return json::parse(r.out);
  } catch (const std::exception&) {
    ADD_FAILURE() << "not JSON: " << r.out << "\nstderr: " << r.err;
    return json::object();
  }
}

std::string id_list(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t id : ids) {
    if (!s.empty()) s.push_back(',');
    s.append(std::to_string(id));
  }
  return s;
}

// generate -m DIR --prompt-ids ... --json gives transformers' 32 greedy tokens.
TEST(HfCli, GenerateOnDirectoryMatchesTransformers) {
  std::vector<std::vector<std::string>> layouts = {{}};
#ifdef SHARDLM_E2E_MPI
  layouts.push_back({"--tp", "2"});
  layouts.push_back({"--pp", "2"});
#endif
  for (const char* f : {"tiny-llama31-v4config", "tiny-qwen2"}) {
    const std::string dir = hf_fixture(f);
    const RefCase c = load_reference(dir)[1];
    for (const auto& l : layouts) {
      std::vector<std::string> args = {"generate", "-m", dir, "--prompt-ids", id_list(c.prompt_ids), "-n", "32",
                                       "--greedy", "--ignore-eos", "--json", "-q"};
      args.insert(args.end(), l.begin(), l.end());
      const Result r = run(args);
      ASSERT_EQ(r.rc, 0) << f << " " << (l.empty() ? "" : l[0]) << ": " << r.err;
      const json j = parse(r);
      EXPECT_EQ(j["generated_ids"].get<std::vector<int32_t>>(), c.greedy_32) << f << " " << (l.empty() ? "" : l[0]);
      EXPECT_EQ(j["prompt_ids"].get<std::vector<int32_t>>(), c.prompt_ids);
    }
  }
}

// Mixtures of experts from the command line: transformers' greedy tokens on one rank and (with MPI) at tp 2
// with and without --enable-expert-parallel; inspect names the expert keys; plan counts the expert-parallel
// layout; the experts-in-RAM flags are refused where they cannot apply, naming the flag.
TEST(HfCli, MixtureOfExpertsCommands) {
  const std::string dir = hf_fixture("tiny-qwen3moe");
  const RefCase c = load_reference(dir)[0];
  std::vector<std::vector<std::string>> layouts = {{}};
#ifdef SHARDLM_E2E_MPI
  layouts.push_back({"--tp", "2"});
  layouts.push_back({"--tp", "2", "--enable-expert-parallel"});
#endif
  for (const auto& l : layouts) {
    std::vector<std::string> args = {"generate", "-m", dir, "--prompt-ids", id_list(c.prompt_ids), "-n", "32",
                                     "--greedy", "--ignore-eos", "--json", "-q"};
    args.insert(args.end(), l.begin(), l.end());
    const Result r = run(args);
    ASSERT_EQ(r.rc, 0) << l.size() << ": " << r.err;
    EXPECT_EQ(parse(r)["generated_ids"].get<std::vector<int32_t>>(), c.greedy_32) << l.size();
  }
  const Result i = run({"inspect", dir});
  ASSERT_EQ(i.rc, 0) << i.err;
  EXPECT_NE(i.out.find("expert_count"), std::string::npos) << i.out.substr(0, 600);
  const Result p = run({"plan", "-m", dir, "--gpus", "24G,24G", "--tp", "2", "--enable-expert-parallel", "--json"});
  ASSERT_EQ(p.rc, 0) << p.err;
  EXPECT_EQ(parse(p)["devices"].size(), 2u);
  const Result cpu_moe = run({"generate", "-m", dir, "--prompt-ids", "1,2", "-n", "2", "--cpu-moe", "-q"});
  EXPECT_EQ(cpu_moe.rc, 2);
  EXPECT_NE(cpu_moe.err.find("need --backend cuda"), std::string::npos) << cpu_moe.err;
  const Result ot = run({"plan", "-m", dir, "--gpus", "24G", "-ot", "exps"});
  EXPECT_EQ(ot.rc, 2);
  EXPECT_NE(ot.err.find("PATTERN=DEVICE"), std::string::npos) << ot.err;
  const Result dense = run({"plan", "-m", hf_fixture("tiny-qwen2"), "--gpus", "24G", "--n-cpu-moe", "2"});
  EXPECT_EQ(dense.rc, 2);
  EXPECT_NE(dense.err.find("no experts"), std::string::npos) << dense.err;
}

TEST(HfCli, PlanReadsDirectories) {
  const Result p = run({"plan", "-m", hf_fixture("tiny-qwen2"), "--json"});
  ASSERT_EQ(p.rc, 0) << p.err;
  EXPECT_FALSE(parse(p).empty());
}

TEST(HfCli, InspectReadsDirectories) {
  const std::string dir = hf_fixture("tiny-qwen2");
  const Result i = run({"inspect", dir, "--json"});
  ASSERT_EQ(i.rc, 0) << i.err;
  const json j = parse(i);
  EXPECT_NE(j.dump().find("qwen2"), std::string::npos) << j.dump().substr(0, 400);
  EXPECT_NE(j.dump().find("blk.3.attn_q.bias"), std::string::npos);
  const Result t = run({"inspect", dir});
  ASSERT_EQ(t.rc, 0) << t.err;
  EXPECT_NE(t.out.find("hf-safetensors"), std::string::npos) << t.out.substr(0, 400);
}

// A model the Llama 2 tokenizer fits (tiny-llama31's rows repeated to 32000) and tokenizer directories
// with the fixtures' tokenizer.json and a tokenizer_config.json carrying a chat template.
struct ChatSetup {
  TempDir tmp;
  std::string model, model_with_template;
  std::string tok_dir(const std::string& template_name) {
    const json t = json::parse(slurp(tok_fixture("chat_templates.json")));
    const std::string d = tmp.str() + "/tok-" + template_name;
    if (fs::exists(d)) return d;
    fs::create_directories(d);
    fs::copy_file(tok_fixture("llama2/tokenizer.json"), d + "/tokenizer.json");
    json cfg = json::parse(slurp(tok_fixture("llama2/tokenizer_config.json")));
    cfg["chat_template"] = t["templates"][template_name];
    std::ofstream(d + "/tokenizer_config.json") << cfg.dump(1);
    return d;
  }
  ChatSetup() {
    auto base = open_model_source(hf_fixture("tiny-llama31"));
    model = tmp.str() + "/llama2-vocab.gguf";
    export_gguf(PaddedVocabSource(*base, 32000), model, "");
    // The same model with the tokenizer and the Mistral template inside the GGUF.
    model_with_template = tmp.str() + "/llama2-vocab-chat.gguf";
    export_gguf(*with_tokenizer(std::make_unique<PaddedVocabSource>(*base, 32000), load_tokenizer_files(tok_dir("mistral"))),
                model_with_template, "");
  }
};

ChatSetup& chat_setup() {
  static ChatSetup s;
  return s;
}

std::string expected_render(const std::string& tmpl, int conversation) {
  const json t = json::parse(slurp(tok_fixture("chat_templates.json")));
  for (const json& c : t["cases"])
    if (c["template"] == tmpl && c["conversation"] == conversation && c["add_generation_prompt"] == true)
      return c["rendered"];
  ADD_FAILURE() << "no case " << tmpl << " " << conversation;
  return {};
}

void expect_chat_ids(const json& j, const std::string& tok_dir, const std::string& rendered) {
  EXPECT_EQ(j["rendered"], rendered);
  const auto ids = j["prompt_ids"].get<std::vector<int32_t>>();
  // Special tokens written by the template are parsed ("<s>" is one id), none is added.
  if (!tok_dir.empty()) {
    EXPECT_EQ(ids, load_hf_tokenizer(tok_dir)->encode(rendered, false, true));
  }
  if (rendered.rfind("<s>", 0) == 0) {
    ASSERT_FALSE(ids.empty());
    EXPECT_EQ(ids[0], 1);
    EXPECT_EQ(std::count(ids.begin(), ids.end(), 1), 1) << "BOS twice";
  }
  EXPECT_EQ(j["generated_ids"].size(), 3u);
}

const std::vector<std::string> kChatGen = {"-n", "3", "--greedy", "--ignore-eos", "--json", "-q"};

std::vector<std::string> with_gen(std::vector<std::string> a) {
  a.insert(a.end(), kChatGen.begin(), kChatGen.end());
  return a;
}

TEST(HfCli, ChatRendersTheTokenizerConfigTemplate) {
  ChatSetup& s = chat_setup();
  const std::string tok = s.tok_dir("mistral");
  const Result r = run(with_gen({"generate", "-m", s.model, "--tokenizer", tok, "--chat", "-p", "Hello!"}));
  ASSERT_EQ(r.rc, 0) << r.err;
  expect_chat_ids(parse(r), tok, expected_render("mistral", 0));
  // The tokenizer given as its tokenizer.json path: the sibling tokenizer_config.json supplies the template.
  const Result r2 = run(with_gen({"generate", "-m", s.model, "--tokenizer", tok + "/tokenizer.json", "--chat", "-p",
                                  "Hello!"}));
  ASSERT_EQ(r2.rc, 0) << r2.err;
  EXPECT_EQ(parse(r2)["prompt_ids"], parse(r)["prompt_ids"]);
  // Llama 3's template with the same tokenizer: its header tokens are not in Llama 2's vocabulary and are
  // tokenized as text; <s> (bos_token) still becomes id 1.
  const std::string l3 = s.tok_dir("llama3");
  const Result r3 = run(with_gen({"generate", "-m", s.model, "--tokenizer", l3, "--chat", "-p", "Hello!"}));
  ASSERT_EQ(r3.rc, 0) << r3.err;
  std::string want = expected_render("llama3", 0);
  want.replace(0, std::string("<|begin_of_text|>").size(), "<s>");
  expect_chat_ids(parse(r3), l3, want);
}

TEST(HfCli, ChatUsesTheGgufTemplate) {
  ChatSetup& s = chat_setup();
  const Result r = run(with_gen({"generate", "-m", s.model_with_template, "--chat", "-p", "Hello!"}));
  ASSERT_EQ(r.rc, 0) << r.err;
  // The GGUF's tokenizer (exported from tokenizer.json) has llama.cpp's SentencePiece semantics, which
  // may place the leading space after "<s>" differently from Hugging Face's: ids are not compared here.
  expect_chat_ids(parse(r), "", expected_render("mistral", 0));
}

TEST(HfCli, ChatWithSystemMessage) {
  ChatSetup& s = chat_setup();
  const std::string tok = s.tok_dir("chatml");
  const Result r = run(with_gen({"generate", "-m", s.model, "--tokenizer", tok, "--chat", "--system",
                                 "You are terse.", "-p", "Name two GPUs."}));
  ASSERT_EQ(r.rc, 0) << r.err;
  // ChatML by hand: each message as <|im_start|>role\ncontent<|im_end|>\n, then the generation prompt.
  expect_chat_ids(parse(r), tok,
                  "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nName two GPUs.<|im_end|>\n"
                  "<|im_start|>assistant\n");
  // Mistral's template refuses a leading system message with its own raise_exception text.
  const Result m = run(with_gen({"generate", "-m", s.model, "--tokenizer", s.tok_dir("mistral"), "--chat", "--system",
                                 "x", "-p", "y"}));
  EXPECT_EQ(m.rc, 2) << m.err;
  EXPECT_NE(m.err.find("Conversation roles must alternate user/assistant/user/assistant/..."), std::string::npos)
      << m.err;
}

TEST(HfCli, TokenizerErrorsAreClear) {
  ChatSetup& s = chat_setup();
  auto expect_fail = [](const std::vector<std::string>& args, const std::vector<std::string>& words) {
    const Result r = run(args);
    EXPECT_EQ(r.rc, 2) << args[2] << "\n" << r.err;
    for (const auto& w : words) EXPECT_NE(r.err.find(w), std::string::npos) << "'" << w << "' not in: " << r.err;
  };
  // A fixture directory (512-row vocabulary) with the 32000-token Llama 2 tokenizer copied in.
  TempDir d;
  for (const auto& e : fs::directory_iterator(hf_fixture("tiny-llama2")))
    fs::copy_file(e.path(), d.path / e.path().filename());
  fs::copy_file(tok_fixture("llama2/tokenizer.json"), d.path / "tokenizer.json");
  expect_fail({"generate", "-m", d.str(), "--prompt-ids", "1,2", "-n", "2"}, {"32000 tokens", "vocab_size 512"});
  // The same pairing through --tokenizer.
  expect_fail({"generate", "-m", hf_fixture("tiny-llama2"), "--tokenizer", tok_fixture("llama2"), "--prompt-ids", "1",
               "-n", "2"},
              {"has 32000 tokens", "vocabulary of 512", "does not belong"});
  // A GGUF vocabulary works as --tokenizer; it has no chat template, which --chat names.
  const std::string spm = fixture_path("vocab/ggml-vocab-llama-spm.gguf");
  const Result ok = run(with_gen({"generate", "-m", s.model, "--tokenizer", spm, "-p", "Hello"}));
  ASSERT_EQ(ok.rc, 0) << ok.err;
  EXPECT_EQ(parse(ok)["prompt_ids"].get<std::vector<int32_t>>(), (std::vector<int32_t>{1, 15043}));  // <s> ▁Hello
  expect_fail({"generate", "-m", s.model, "--tokenizer", spm, "--chat", "-p", "Hello"}, {"no chat template"});
  expect_fail({"generate", "-m", s.model, "--system", "x", "-p", "Hello"}, {"--system needs --chat"});
  expect_fail({"generate", "-m", s.model, "--tokenizer", d.str() + "/nope.json", "-p", "Hello"}, {"nope.json"});
}

// ---- shardlm chat ----

// The "[N prompt tokens, C from the cache; G generated in S s]" line chat prints after each answer.
struct TurnStats {
  bool stopped = false;
  int64_t prompt = 0, cached = 0, generated = 0;
};
std::vector<TurnStats> turn_stats(const std::string& err) {
  std::vector<TurnStats> out;
  const std::regex re(R"(\[(stopped; )?(\d+) prompt tokens, (\d+) from the cache; (\d+) generated in)");
  for (auto it = std::sregex_iterator(err.begin(), err.end(), re); it != std::sregex_iterator(); ++it)
    out.push_back({(*it)[1].matched, std::stoll((*it)[2]), std::stoll((*it)[3]), std::stoll((*it)[4])});
  return out;
}

Result chat_run(const std::vector<std::string>& args, const std::string& input) {
  static int n = 0;
  const std::string in = std::string(SHARDLM_BINARY_DIR) + "/hfcli-chat-" + std::to_string(::getpid()) + "-" +
                         std::to_string(n++) + ".in";
  std::ofstream(in, std::ios::binary) << input;
  std::vector<std::string> a = {"chat"};
  a.insert(a.end(), args.begin(), args.end());
  std::string cmd = quote(std::string(SHARDLM_BINARY_DIR) + "/apps/shardlm/shardlm");
  for (const auto& x : a) cmd.append(" ").append(quote(x));
  const std::string base = in.substr(0, in.size() - 3);
  cmd += " < " + in + " > " + base + ".out 2> " + base + ".err";
  const int st = std::system(cmd.c_str());
  Result r{WIFEXITED(st) ? WEXITSTATUS(st) : 128, slurp(base + ".out"), slurp(base + ".err")};
  for (const char* ext : {".in", ".out", ".err"}) std::remove((base + ext).c_str());
  return r;
}

// A system message of several KV blocks (16 positions each), so that the conversation's shared start spans
// whole blocks.
const std::string kLongSystem =
    "You are a careful assistant for people who run language models on their own computers. Answer briefly, "
    "name the hardware you assume, and say when a figure is an estimate rather than a measurement.";

// Three turns (ChatML): the second's prompt (the whole conversation through the template) starts with the
// first turn's, whose full KV blocks the cache still holds; after /clear the first message again is answered
// as the first time, from the cache. The first answer is generate --chat's for the same message (greedy),
// and the answers are the same with prefix caching off (a cached row is the row that would be computed).
TEST(HfCli, ChatKeepsTheConversationInTheKvCache) {
  ChatSetup& s = chat_setup();
  const std::string tok = s.tok_dir("chatml");
  const std::string input = "Hello!\nName two GPUs.\n/clear\nHello!\n";
  const std::vector<std::string> flags = {"-m", s.model, "--tokenizer", tok, "--system", kLongSystem, "--greedy",
                                          "-n", "6"};
  const Result r = chat_run(flags, input);
  ASSERT_EQ(r.rc, 0) << r.err;
  const std::vector<TurnStats> t = turn_stats(r.err);
  ASSERT_EQ(t.size(), 3u) << r.err;
  ASSERT_GE(t[0].prompt, 40) << "the system message should span several blocks";
  EXPECT_EQ(t[0].cached, 0);
  EXPECT_GT(t[1].prompt, t[0].prompt + t[0].generated - 1) << "the second turn's prompt lacks the first turn";
  EXPECT_GE(t[1].cached, t[0].prompt / 16 * 16 - 16) << "the second turn computed the first turn again";
  EXPECT_EQ(t[2].prompt, t[0].prompt);
  EXPECT_EQ(t[2].cached, (t[0].prompt - 1) / 16 * 16) << "the first message again: all its full blocks";
  EXPECT_NE(r.err.find("(the conversation is cleared)"), std::string::npos) << r.err;
  const Result g = run({"generate", "-m", s.model, "--tokenizer", tok, "--chat", "--system", kLongSystem, "-p",
                        "Hello!", "--greedy", "-n", "6", "--json", "-q"});
  ASSERT_EQ(g.rc, 0) << g.err;
  const std::string first = parse(g)["text"].get<std::string>() + "\n";
  ASSERT_GE(r.out.size(), 2 * first.size());
  EXPECT_EQ(r.out.substr(0, first.size()), first) << r.out;
  EXPECT_EQ(r.out.substr(r.out.size() - first.size()), first) << r.out;
  std::vector<std::string> off = flags;
  off.push_back("--no-enable-prefix-caching");
  const Result o = chat_run(off, input);
  ASSERT_EQ(o.rc, 0) << o.err;
  EXPECT_EQ(o.out, r.out);
  for (const TurnStats& x : turn_stats(o.err)) EXPECT_EQ(x.cached, 0);
#ifdef SHARDLM_E2E_MPI
  // Any layout: the ranks started through mpirun follow rank 0's turns (its idle steps between lines keep
  // their watchdogs quiet) and the conversation is the same.
  for (const char* layout : {"--tp", "--pp"}) {
    std::vector<std::string> split = flags;
    split.push_back(layout);
    split.push_back("2");
    const Result m = chat_run(split, input);
    ASSERT_EQ(m.rc, 0) << layout << ": " << m.err;
    EXPECT_EQ(m.out, r.out) << layout;
    const std::vector<TurnStats> mt = turn_stats(m.err);
    ASSERT_EQ(mt.size(), 3u) << m.err;
    EXPECT_EQ(mt[1].cached, t[1].cached) << layout;
  }
#endif
  // Flags are checked before loading; a model without a chat template is refused by name.
  EXPECT_EQ(chat_run({"-m", s.model_with_template, "-n", "0"}, "").rc, 2);
  EXPECT_EQ(chat_run({"-m", s.model_with_template, "--greedy", "--temp", "0.7"}, "").rc, 2);
  const Result none = chat_run({"-m", s.model, "--tokenizer", tok_fixture("llama2")}, "Hello!\n");
  EXPECT_EQ(none.rc, 2);
  EXPECT_NE(none.err.find("no chat template"), std::string::npos) << none.err;
}

// Ctrl-C while an answer is written stops that answer (the program goes on and answers the next message);
// end of input then ends the program with status 0. The signal goes to the whole process group, as a
// terminal sends it; with MPI also under --pp 2, where mpirun would end the job if it received the SIGINT.
TEST(HfCli, ChatCtrlCStopsTheAnswerNotTheProgram) {
  ChatSetup& s = chat_setup();
  const std::string tok = s.tok_dir("chatml");
  std::vector<std::vector<std::string>> layouts = {{}};
#ifdef SHARDLM_E2E_MPI
  layouts.push_back({"--pp", "2"});
#endif
  for (const auto& layout : layouts) {
    SCOPED_TRACE(layout.empty() ? "one rank" : "--pp 2");
    const std::string base = std::string(SHARDLM_BINARY_DIR) + "/hfcli-ctrlc-" + std::to_string(::getpid());
    std::vector<std::string> args = {std::string(SHARDLM_BINARY_DIR) + "/apps/shardlm/shardlm",
                                     "chat", "-m", s.model, "--tokenizer", tok, "--system", kLongSystem, "--greedy",
                                     "-c", "512"};
    args.insert(args.end(), layout.begin(), layout.end());
    int in[2];
    ASSERT_EQ(pipe(in), 0);
    const pid_t pid = fork();
    if (pid == 0) {
      setpgid(0, 0);  // a job of its own, as a shell starts it
      dup2(in[0], 0);
      close(in[1]);
      const int o = open((base + ".out").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      const int e = open((base + ".err").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(o, 1);
      dup2(e, 2);
      std::vector<char*> c;
      for (auto& a : args) c.push_back(a.data());
      c.push_back(nullptr);
      execv(c[0], c.data());
      _exit(127);
    }
    setpgid(pid, pid);
    close(in[0]);
    const auto write_line = [&](const std::string& l) {
      ASSERT_EQ(write(in[1], l.data(), l.size()), static_cast<ssize_t>(l.size()));
    };
    const auto wait_for = [&](const std::function<bool()>& cond, double seconds) {
      const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
      while (!cond()) {
        if (std::chrono::steady_clock::now() > end) return false;
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
      return true;
    };
    const auto err = [&] { return slurp(base + ".err"); };
    write_line("Hello!\n");
    // The answer (up to ~450 tokens) has begun: interrupt it as a terminal's Ctrl-C does.
    const bool begun = wait_for([&] { return !slurp(base + ".out").empty(); }, 90);
    if (!begun) kill(-pid, SIGKILL);
    ASSERT_TRUE(begun) << err();
    kill(-pid, SIGINT);
    const bool one_turn = wait_for([&] { return turn_stats(err()).size() == 1; }, 30);
    if (!one_turn) kill(-pid, SIGKILL);
    ASSERT_TRUE(one_turn) << err();
    const TurnStats first = turn_stats(err())[0];
    EXPECT_TRUE(first.stopped) << err();
    EXPECT_LT(first.generated, 512 - first.prompt) << "the answer ran to the end of the context";
    write_line("Name two GPUs.\n");
    close(in[1]);
    int status = 0;
    const bool exited = wait_for([&] { return waitpid(pid, &status, WNOHANG) == pid; }, 120);
    if (!exited) {
      kill(-pid, SIGKILL);
      waitpid(pid, &status, 0);
    }
    ASSERT_TRUE(exited) << err();
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << err();
    const std::vector<TurnStats> t = turn_stats(err());
    ASSERT_EQ(t.size(), 2u) << err();
    EXPECT_FALSE(t[1].stopped);
    EXPECT_GT(t[1].cached, 0) << "the interrupted turn's prompt was not reused";
    std::remove((base + ".out").c_str());
    std::remove((base + ".err").c_str());
  }
}

}  // namespace
}  // namespace shardlm::test
