// Subcommands of the `kvgate` binary. Each registers its flags on the app and returns the
// function to run when it is chosen; errors print one line on stderr and exit non-zero.
#pragma once

#include <functional>

#include "CLI/CLI.hpp"

namespace kvgate::cli {

using Runner = std::function<int()>;

Runner AddGenerateCommand(CLI::App& app);
Runner AddTokenizeCommand(CLI::App& app);

// Prints "kvgate: <message>" as one line on stderr and returns 1.
int Fail(std::string_view message);

}  // namespace kvgate::cli
