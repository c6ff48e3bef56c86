// kvgate: one binary, one subcommand per job.
#include <cstdio>
#include <string>

#include "cli/commands.h"

namespace kvgate::cli {

int Fail(absl::string_view message) {
  std::string line(message);
  for (char& ch : line)
    if (ch == '\n') ch = ' ';
  std::fprintf(stderr, "kvgate: %s\n", line.c_str());
  return 1;
}

}  // namespace kvgate::cli

int main(int argc, char** argv) {
  CLI::App app{"kvgate: LLM inference with an eviction-gated, bounded KV cache"};
  app.require_subcommand(0, 1);
  app.set_version_flag("--version", "kvgate 0.1.0");
  kvgate::cli::Runner generate = kvgate::cli::AddGenerateCommand(app);
  kvgate::cli::Runner tokenize = kvgate::cli::AddTokenizeCommand(app);
  kvgate::cli::Runner serve = kvgate::cli::AddServeCommand(app);
  kvgate::cli::Runner info = kvgate::cli::AddInfoCommand(app);
  kvgate::cli::Runner abort_request = kvgate::cli::AddAbortCommand(app);
  kvgate::cli::Runner coordinator = kvgate::cli::AddCoordinatorCommand(app);
  kvgate::cli::Runner worker = kvgate::cli::AddWorkerCommand(app);
  kvgate::cli::Runner budget = kvgate::cli::AddBudgetCommand(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    return kvgate::cli::Fail(e.what());
  }
  if (app.got_subcommand("generate")) return generate();
  if (app.got_subcommand("tokenize")) return tokenize();
  if (app.got_subcommand("serve")) return serve();
  if (app.got_subcommand("info")) return info();
  if (app.got_subcommand("abort")) return abort_request();
  if (app.got_subcommand("coordinator")) return coordinator();
  if (app.got_subcommand("worker")) return worker();
  if (app.got_subcommand("budget")) return budget();
  return kvgate::cli::Fail(
      "no command given: use generate, serve, coordinator, worker, budget, info, abort or "
      "tokenize (try --help)");
}
