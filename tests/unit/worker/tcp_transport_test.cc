// The host transport between stages: frames in step order, errors carried, a stranger on the
// data port ignored, the same over TLS (scripts/make_certs.sh makes the certificates).
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <thread>

#include "security/tls_stream.h"
#include "worker/transport.h"

namespace kvgate::worker {
namespace {

std::vector<float> Ramp(size_t n) {
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i) x[i] = static_cast<float>(i) * 0.5f;
  return x;
}

// Connects to `address` and writes `bytes` (a stranger on the data port).
int Stranger(const std::string& address, const std::string& bytes) {
  const int port = std::stoi(address.substr(address.rfind(':') + 1));
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  if (!bytes.empty())
    EXPECT_EQ(send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL), ssize_t(bytes.size()));
  return fd;
}

TEST(TcpTransport, CarriesActivationsAndErrorsInStepOrder) {
  auto b = TcpTransport::Listen("127.0.0.1", 0);
  ASSERT_TRUE(b.ok()) << b.status();
  auto a = TcpTransport::Listen("127.0.0.1", 0);
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE((*a)->ConnectNext((*b)->listen_address(), 5).ok());
  const std::vector<float> x = Ramp(1000);
  std::thread sender([&] {
    EXPECT_TRUE((*a)->Send(1, absl::OkStatus(), x).ok());  // a dropped step: skipped
    EXPECT_TRUE((*a)->Send(2, absl::OkStatus(), x).ok());
    EXPECT_TRUE((*a)->Send(3, absl::ResourceExhaustedError("KV full"), {}).ok());
  });
  std::vector<float> got;
  ASSERT_TRUE((*b)->Recv(2, &got).ok());
  EXPECT_EQ(got, x);
  absl::Status s = (*b)->Recv(3, &got);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s.message(), "KV full");
  sender.join();
  // The previous stage goes away: UNAVAILABLE, not a hang.
  a->reset();
  s = (*b)->Recv(4, &got);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  // An interrupted wait returns soon.
  (*b)->Interrupt();
  EXPECT_EQ((*b)->Recv(5, &got).code(), absl::StatusCode::kAborted);
}

TEST(TcpTransport, StrangersNeverReplaceTheStageInUse) {
  auto b = TcpTransport::Listen("127.0.0.1", 0);
  ASSERT_TRUE(b.ok());
  auto a = TcpTransport::Listen("127.0.0.1", 0);
  ASSERT_TRUE(a.ok());
  (*a)->set_data_token("wiring-secret-0123456789");
  (*b)->set_data_token("wiring-secret-0123456789");
  ASSERT_TRUE((*a)->ConnectNext((*b)->listen_address(), 5).ok());
  const std::vector<float> x = Ramp(64);
  std::vector<float> got;
  ASSERT_TRUE((*a)->Send(1, absl::OkStatus(), x).ok());
  ASSERT_TRUE((*b)->Recv(1, &got).ok());
  // Junk, a hello with the wrong token, a forged frame, one that says nothing.
  const std::string wrong_hello =
      std::string("HGvk", 4) + std::string("\x08\0\0\0", 4) + "guessed!";
  std::vector<int> fds = {Stranger((*b)->listen_address(), "junk junk junk"),
                          Stranger((*b)->listen_address(), wrong_hello),
                          Stranger((*b)->listen_address(), std::string(24, '\xff')),
                          Stranger((*b)->listen_address(), "")};
  // A stage of another wiring, with its own token.
  auto other = TcpTransport::Listen("127.0.0.1", 0);
  (*other)->set_data_token("another-wiring-secret");
  ASSERT_TRUE((*other)->ConnectNext((*b)->listen_address(), 5).ok());
  ASSERT_TRUE((*other)->Send(2, absl::OkStatus(), std::vector<float>(64, 9.f)).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  ASSERT_TRUE((*a)->Send(2, absl::OkStatus(), x).ok());
  ASSERT_TRUE((*b)->Recv(2, &got).ok());
  EXPECT_EQ(got, x);
  for (int fd : fds) close(fd);
}

TEST(TcpTransport, RefusesOversizedFrames) {
  auto b = TcpTransport::Listen("127.0.0.1", 0);
  ASSERT_TRUE(b.ok());
  // The hello of an empty token, then a header claiming 2^60 bytes.
  std::string bytes = std::string("HGvk", 4) + std::string(4, '\0');
  const uint32_t magic = 0x6b764731, code = 0;
  const uint64_t step = 1, size = uint64_t{1} << 60;
  bytes.append(reinterpret_cast<const char*>(&magic), 4);
  bytes.append(reinterpret_cast<const char*>(&code), 4);
  bytes.append(reinterpret_cast<const char*>(&step), 8);
  bytes.append(reinterpret_cast<const char*>(&size), 8);
  const int fd = Stranger((*b)->listen_address(), bytes);
  std::vector<float> got;
  EXPECT_EQ((*b)->Recv(1, &got).code(), absl::StatusCode::kDataLoss);
  close(fd);
}

class TlsTransport : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(std::filesystem::temp_directory_path() /
                           ("kvgate-tls-test-" + std::to_string(getpid())));
    for (const char* sub : {"/a", "/b"}) {
      const std::string cmd = "bash scripts/make_certs.sh " + *dir_ + sub + " >/dev/null";
      ASSERT_EQ(std::system(cmd.c_str()), 0) << "scripts/make_certs.sh failed (openssl?)";
    }
  }
  static void TearDownTestSuite() {
    std::filesystem::remove_all(*dir_);
    delete dir_;
  }
  static security::TlsFiles Files(const char* ca_dir) {
    return {*dir_ + "/a/node.pem", *dir_ + "/a/node.key", *dir_ + "/" + ca_dir + "/ca.pem"};
  }
  static std::string* dir_;
};
std::string* TlsTransport::dir_ = nullptr;

TEST_F(TlsTransport, CarriesFramesOverMutualTls) {
  auto ctx = security::TlsContext::Create(Files("a"));
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  auto b = TcpTransport::Listen("127.0.0.1", 0, *ctx);
  auto a = TcpTransport::Listen("127.0.0.1", 0, *ctx);
  ASSERT_TRUE(a.ok() && b.ok());
  (*a)->set_data_token("tls-wiring-secret");
  (*b)->set_data_token("tls-wiring-secret");
  ASSERT_TRUE((*a)->ConnectNext((*b)->listen_address(), 5).ok());
  const std::vector<float> x = Ramp(100000);  // several TLS records
  std::thread sender([&] {
    for (uint64_t step = 1; step <= 3; ++step)
      EXPECT_TRUE((*a)->Send(step, absl::OkStatus(), x).ok());
  });
  std::vector<float> got;
  for (uint64_t step = 1; step <= 3; ++step) {
    ASSERT_TRUE((*b)->Recv(step, &got).ok());
    EXPECT_EQ(got, x);
  }
  sender.join();
  // Plaintext on a TLS data port changes nothing.
  const int fd = Stranger((*b)->listen_address(), std::string("HGvk", 4) + std::string(4, '\0'));
  ASSERT_TRUE((*a)->Send(4, absl::OkStatus(), x).ok());
  ASSERT_TRUE((*b)->Recv(4, &got).ok());
  close(fd);
}

TEST_F(TlsTransport, ANextStageFromAnotherCaIsRefused) {
  // a trusts only CA "b"; b's certificate is from CA "a".
  auto ca = security::TlsContext::Create(Files("b"));
  auto cb = security::TlsContext::Create(Files("a"));
  ASSERT_TRUE(ca.ok() && cb.ok());
  auto b = TcpTransport::Listen("127.0.0.1", 0, *cb);
  auto a = TcpTransport::Listen("127.0.0.1", 0, *ca);
  ASSERT_TRUE(a.ok() && b.ok());
  absl::Status s = (*a)->ConnectNext((*b)->listen_address(), 1);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnauthenticated) << s;
}

}  // namespace
}  // namespace kvgate::worker
