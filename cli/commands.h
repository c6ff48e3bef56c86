// Subcommands of the `kvgate` binary. Each registers its flags on the app and returns the
// function to run when it is chosen; errors print one line on stderr and exit non-zero.
#pragma once

#include <functional>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kvgate::cli {

using Runner = std::function<int()>;

Runner AddGenerateCommand(CLI::App& app);
Runner AddTokenizeCommand(CLI::App& app);
Runner AddServeCommand(CLI::App& app);
Runner AddInfoCommand(CLI::App& app);
Runner AddAbortCommand(CLI::App& app);
Runner AddCoordinatorCommand(CLI::App& app);
Runner AddWorkerCommand(CLI::App& app);
Runner AddBudgetCommand(CLI::App& app);

// Prints "kvgate: <message>" as one line on stderr and returns 1.
int Fail(absl::string_view message);
inline int Fail(const absl::Status& status) { return Fail(status.message()); }

}  // namespace kvgate::cli
