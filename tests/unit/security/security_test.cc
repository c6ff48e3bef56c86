// Secrets and API keys: constant-time comparison, files other users can read are refused, a
// key file reloads and keeps the keys in force when the new file is bad.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "security/key_ring.h"
#include "security/secrets.h"
#include "security/tls.h"

namespace kvgate::security {
namespace {

std::string Temp(const std::string& name) {
  return (std::filesystem::temp_directory_path() / (name + "-" + std::to_string(getpid())))
      .string();
}

void Write(const std::string& path, const std::string& text, mode_t mode = 0600) {
  std::filesystem::remove(path);
  std::ofstream(path) << text;
  chmod(path.c_str(), mode);
}

TEST(Secrets, RandomHexIsFreshAndHex) {
  std::set<std::string> seen;
  for (int i = 0; i < 100; ++i) {
    const std::string h = RandomHex(16);
    ASSERT_EQ(h.size(), 32u);
    EXPECT_EQ(h.find_first_not_of("0123456789abcdef"), std::string::npos);
    seen.insert(h);
  }
  EXPECT_EQ(seen.size(), 100u);
}

TEST(Secrets, ConstantTimeEquals) {
  EXPECT_TRUE(ConstantTimeEquals("abc", "abc"));
  EXPECT_FALSE(ConstantTimeEquals("abc", "abd"));
  EXPECT_FALSE(ConstantTimeEquals("abc", "abcd"));
  EXPECT_FALSE(ConstantTimeEquals("", "a"));
  EXPECT_TRUE(ConstantTimeEquals("", ""));
}

TEST(Secrets, SecretFilesMustBePrivateAndLongEnough) {
  const std::string path = Temp("kvgate-secret");
  Write(path, "  0123456789abcdef0123  \n");
  auto s = ReadSecretFile(path, "--cluster-token-file");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(*s, "0123456789abcdef0123");
  Write(path, "0123456789abcdef0123", 0644);
  s = ReadSecretFile(path, "--cluster-token-file");
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("chmod 600"), std::string::npos);
  Write(path, "short");
  EXPECT_FALSE(ReadSecretFile(path, "--cluster-token-file").ok());
  std::filesystem::remove(path);
  EXPECT_FALSE(ReadSecretFile(path, "--cluster-token-file").ok());
  // A written secret is private and reads back.
  auto w = WriteSecretFile(path);
  ASSERT_TRUE(w.ok());
  auto r = ReadSecretFile(path, "x");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, *w);
  EXPECT_FALSE(WriteSecretFile(path).ok());  // never overwritten
  std::filesystem::remove(path);
}

TEST(Secrets, GroupMayReadOnlyRootsSecretsMountedForIt) {
  EXPECT_TRUE(PrivateEnough(0100600, 1000, 1000));
  EXPECT_TRUE(PrivateEnough(0100400, 0, 0));
  EXPECT_FALSE(PrivateEnough(0100644, 1000, 1000));
  EXPECT_FALSE(PrivateEnough(0100604, 0, 1000));
  // A Kubernetes Secret for a pod's fsGroup: root's, 0440, read by the pod's non-root user.
  EXPECT_TRUE(PrivateEnough(0100440, 0, 10001));
  EXPECT_TRUE(PrivateEnough(0100640, 0, 10001));
  EXPECT_FALSE(PrivateEnough(0100640, 0, 0));        // root reads its own: no group needed
  EXPECT_FALSE(PrivateEnough(0100640, 1000, 1000));  // a user's file shared with a group
  EXPECT_FALSE(PrivateEnough(0100660, 0, 10001));    // writable by the group
}

// The names a certificate from scripts/make_certs.sh carries, checked as peers check them.
TEST(Tls, CertificateNamesAreCheckedAsPeersDialThem) {
  const std::string dir = Temp("kvgate-certs");
  const std::string cmd = "bash scripts/make_certs.sh " + dir +
                          " kvgate '*.workers.default.svc' '*.single' 10.1.2.3 >/dev/null";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << "scripts/make_certs.sh failed (openssl?)";
  const std::string cert = dir + "/node.pem";
  for (const char* ok :
       {"localhost", "127.0.0.1", "kvgate", "w-0.workers.default.svc", "10.1.2.3"}) {
    EXPECT_TRUE(CheckCertificateNames(cert, ok).ok()) << ok;
  }
  absl::Status s = CheckCertificateNames(cert, "w-0.single");  // gRPC refuses "*.single"
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("two labels or more"), std::string::npos) << s;
  s = CheckCertificateNames(cert, "other-host");
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("does not name other-host"), std::string::npos) << s;
  EXPECT_NE(s.message().find("kvgate"), std::string::npos) << s;              // the names it has
  EXPECT_FALSE(CheckCertificateNames(cert, "a.b.workers.default.svc").ok());  // one label only
  EXPECT_FALSE(CheckCertificateNames(cert, "10.1.2.4").ok());
  EXPECT_FALSE(CheckCertificateNames(dir + "/missing.pem", "kvgate").ok());
  std::filesystem::remove_all(dir);
}

TEST(KeyRing, LoadsReloadsAndKeepsKeysOnABadFile) {
  const std::string path = Temp("kvgate-keys");
  Write(path, "# operators\nfirst-key-0123456789\n\n  second-key-0123456789  \n");
  auto ring = KeyRing::Load(path, "--api-keys");
  ASSERT_TRUE(ring.ok()) << ring.status();
  EXPECT_EQ((*ring)->size(), 2u);
  EXPECT_TRUE((*ring)->Contains("first-key-0123456789"));
  EXPECT_TRUE((*ring)->Contains("second-key-0123456789"));
  EXPECT_FALSE((*ring)->Contains("first-key-012345678"));
  EXPECT_FALSE((*ring)->Contains(""));
  Write(path, "third-key-0123456789\n");
  ASSERT_TRUE((*ring)->Reload().ok());
  EXPECT_FALSE((*ring)->Contains("first-key-0123456789"));
  EXPECT_TRUE((*ring)->Contains("third-key-0123456789"));
  // A short key: the error names the line, never the key; the keys in force stay.
  Write(path, "third-key-0123456789\ntiny\n");
  absl::Status s = (*ring)->Reload();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("line 2"), std::string::npos);
  EXPECT_EQ(s.message().find("tiny"), std::string::npos);
  EXPECT_TRUE((*ring)->Contains("third-key-0123456789"));
  Write(path, "third-key-0123456789\n", 0640);
  EXPECT_FALSE((*ring)->Reload().ok());
  Write(path, "# nothing\n");
  EXPECT_FALSE(KeyRing::Load(path, "--api-keys").ok());
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace kvgate::security
