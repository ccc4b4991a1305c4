// Subcommands of the `shardlm` program. Each parses its own flags (CLI11) from argv, where argv[0] is
// "shardlm <name>", prints its --help, and either returns an exit status or throws shardlm::Error,
// which main() turns into a message on stderr and exit status 2 (bad input) or 1.
#pragma once

namespace shardlm {

int cmd_generate(int argc, const char* const* argv);
int cmd_tokenize(int argc, const char* const* argv);
int cmd_detokenize(int argc, const char* const* argv);
int cmd_inspect(int argc, const char* const* argv);
int cmd_convert(int argc, const char* const* argv);
int cmd_gen_model(int argc, const char* const* argv);
int cmd_bench(int argc, const char* const* argv);
int cmd_plan(int argc, const char* const* argv);
int cmd_serve(int argc, const char* const* argv);
int cmd_perplexity(int argc, const char* const* argv);
int cmd_chat(int argc, const char* const* argv);

}  // namespace shardlm
