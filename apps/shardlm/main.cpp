// shardlm: run one language model split across several devices.
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "commands.h"
#include "core/error.h"

namespace {

struct Command {
  const char* name;
  int (*run)(int, const char* const*);
  const char* help;
};

const Command kCommands[] = {
    {"generate", shardlm::cmd_generate, "generate text from a prompt (on one rank or split with --tp/--pp)"},
    {"chat", shardlm::cmd_chat, "an interactive conversation with the model's chat template (any layout)"},
    {"serve", shardlm::cmd_serve, "an OpenAI-compatible HTTP server (completions, chat, streaming, metrics)"},
    {"plan", shardlm::cmd_plan, "will it run, and how fast? memory per device and the split, before loading"},
    {"bench", shardlm::cmd_bench, "prompt-processing and generation tokens/s"},
    {"perplexity", shardlm::cmd_perplexity, "perplexity of a model on a text (llama-perplexity's method and output)"},
    {"inspect", shardlm::cmd_inspect, "architecture, hyper-parameters and tensors of a model"},
    {"tokenize", shardlm::cmd_tokenize, "text to token ids"},
    {"detokenize", shardlm::cmd_detokenize, "token ids to text"},
    {"convert", shardlm::cmd_convert, "llama2.c or Hugging Face checkpoints to GGUF"},
    {"gen-model", shardlm::cmd_gen_model, "write a GGUF with deterministic random weights for a preset"},
};

// llama.cpp's single-dash long flags, which CLI11 does not accept as names, mapped to our long forms.
const char* llama_cpp_alias(const char* arg) {
  static const std::pair<const char*, const char*> kAliases[] = {
      {"-ts", "--tensor-split"}, {"-sm", "--split-mode"},   {"-ngl", "--n-gpu-layers"},
      {"-mg", "--main-gpu"},     {"-ctk", "--cache-type-k"}, {"-ctv", "--cache-type-v"},
      {"-npl", "--n-parallel"},  {"-ot", "--override-tensor"}, {"-cmoe", "--cpu-moe"},
      {"-ncmoe", "--n-cpu-moe"},
  };
  for (const auto& [from, to] : kAliases)
    if (!std::strcmp(arg, from)) return to;
  return arg;
}

void usage(FILE* out) {
  std::fprintf(out,
               "shardlm: run one language model split across several devices.\n\n"
               "Usage: shardlm <command> [options]    (shardlm <command> --help or shardlm help <command> for its "
               "options)\n\n"
               "Commands:\n");
  for (const auto& c : kCommands) std::fprintf(out, "  %-11s %s\n", c.name, c.help);
  std::fprintf(out,
               "\nExamples:\n"
               "  shardlm generate -p \"Once upon a time\"            # bundled model, one rank\n"
               "  shardlm generate --tp 2 -p \"Once upon a time\"     # two tensor-parallel ranks (mpirun)\n"
               "  shardlm serve -m model.gguf --port 8080             # OpenAI API on http://127.0.0.1:8080/v1\n"
               "  shardlm plan -m llama-3.1-70b --quant q4_k_m --gpus 24G,24G\n");
}

}  // namespace

int main(int argc, char** argv) {
  // `shardlm help COMMAND` is `shardlm COMMAND --help`.
  std::vector<char*> help_args;
  char help_flag[] = "--help";
  if (argc == 3 && !std::strcmp(argv[1], "help")) {
    bool known = false;
    for (const auto& c : kCommands) known = known || !std::strcmp(argv[2], c.name);
    if (!known) {
      std::fprintf(stderr, "shardlm: unknown command '%s'\n\n", argv[2]);
      usage(stderr);
      return 2;
    }
    help_args = {argv[0], argv[2], help_flag, nullptr};
    argv = help_args.data();
    argc = 3;
  } else if (argc > 3 && !std::strcmp(argv[1], "help")) {
    std::fprintf(stderr, "shardlm: 'help' takes one command name\n\n");
    usage(stderr);
    return 2;
  }
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "help")) {
    usage(argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  if (!std::strcmp(argv[1], "--version")) {
    std::printf("shardlm 0.1.0\n");
    return 0;
  }
  for (const auto& c : kCommands) {
    if (std::strcmp(argv[1], c.name) != 0) continue;
    // Sub-commands see argv[0] = "shardlm <name>" so their help and errors name themselves.
    std::string self = std::string("shardlm ") + c.name;
    std::vector<const char*> args = {self.c_str()};
    for (int i = 2; i < argc; ++i) args.push_back(llama_cpp_alias(argv[i]));
    try {
      return c.run(static_cast<int>(args.size()), args.data());
    } catch (const shardlm::Error& e) {
      std::fprintf(stderr, "shardlm %s: error: %s\n", c.name, e.what());
      return e.exit_code();
    } catch (const std::bad_alloc&) {
      std::fprintf(stderr, "shardlm %s: error: out of memory\n", c.name);
      return 1;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "shardlm %s: error: %s\n", c.name, e.what());
      return 1;
    }
  }
  std::fprintf(stderr, "shardlm: unknown command '%s'\n\n", argv[1]);
  usage(stderr);
  return 2;
}
