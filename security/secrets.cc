#include "security/secrets.h"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace kvgate::security {

std::string RandomHex(size_t bytes) {
  std::string raw(bytes, '\0');
  size_t got = 0;
  while (got < bytes) {
    const ssize_t n = getrandom(raw.data() + got, bytes - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      // No entropy source at all: nothing safe to hand out.
      std::perror("kvgate: getrandom");
      std::abort();
    }
    got += static_cast<size_t>(n);
  }
  return absl::BytesToHexString(raw);
}

bool ConstantTimeEquals(std::string_view a, std::string_view b) {
  unsigned char da[SHA256_DIGEST_LENGTH], db[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(a.data()), a.size(), da);
  SHA256(reinterpret_cast<const unsigned char*>(b.data()), b.size(), db);
  return CRYPTO_memcmp(da, db, sizeof(da)) == 0;
}

bool PrivateEnough(unsigned mode, unsigned owner, unsigned reader) {
  if ((mode & S_IRWXO) != 0 || (mode & (S_IWGRP | S_IXGRP)) != 0) return false;
  return (mode & S_IRGRP) == 0 || (owner == 0 && reader != 0);
}

absl::StatusOr<std::string> ReadPrivateFile(const std::string& path, absl::string_view flag) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(flag, ": cannot read '", path, "': ", std::strerror(errno)));
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(flag, ": '", path, "' is not a file"));
  }
  if (!PrivateEnough(st.st_mode, st.st_uid, geteuid())) {
    return absl::FailedPreconditionError(
        absl::StrCat(flag, ": '", path, "' is readable by other users; chmod 600 it"));
  }
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  if (!in) {
    return absl::FailedPreconditionError(absl::StrCat(flag, ": cannot read '", path, "'"));
  }
  return ss.str();
}

absl::StatusOr<std::string> ReadSecretFile(const std::string& path, absl::string_view flag) {
  absl::StatusOr<std::string> text = ReadPrivateFile(path, flag);
  if (!text.ok()) return text.status();
  std::string secret(absl::StripAsciiWhitespace(*text));
  if (secret.size() < 16) {
    return absl::FailedPreconditionError(
        absl::StrCat(flag, ": '", path,
                     "' holds fewer than 16 characters (make one with: head -c 32 "
                     "/dev/urandom | od -An -tx1 | tr -d ' \\n' > FILE)"));
  }
  return secret;
}

absl::StatusOr<std::string> WriteSecretFile(const std::string& path) {
  const std::string secret = RandomHex(32);
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot create '", path, "': ", std::strerror(errno)));
  }
  const std::string line = secret + "\n";
  const bool ok = write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size());
  close(fd);
  if (!ok) return absl::FailedPreconditionError(absl::StrCat("cannot write '", path, "'"));
  return secret;
}

}  // namespace kvgate::security
