#include "security/tls.h"

#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include <fstream>
#include <memory>
#include <sstream>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"

namespace kvgate::security {

absl::StatusOr<std::string> ReadPem(const std::string& path, const std::string& flag) {
  std::ifstream in(path);
  if (!in) return absl::FailedPreconditionError(absl::StrCat(flag, ": cannot read '", path, "'"));
  std::stringstream ss;
  ss << in.rdbuf();
  std::string pem = ss.str();
  if (!absl::StrContains(pem, "-----BEGIN ")) {
    return absl::FailedPreconditionError(absl::StrCat(flag, ": '", path, "' is not PEM"));
  }
  return pem;
}

absl::Status TlsFiles::Validate() const {
  if (cert.empty() != key.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key come together");
  }
  if (!ca.empty() && cert.empty()) {
    return absl::InvalidArgumentError(
        "--tls-ca makes the cluster planes mutual: give this node's --tls-cert and --tls-key too");
  }
  for (const auto& [path, flag] : {std::pair<const std::string&, const char*>{cert, "--tls-cert"},
                                   {key, "--tls-key"},
                                   {ca, "--tls-ca"}}) {
    if (!path.empty()) {
      if (auto pem = ReadPem(path, flag); !pem.ok()) return pem.status();
    }
  }
  return absl::OkStatus();
}

absl::Status CheckCertificateNames(const std::string& cert_path, const std::string& host) {
  ASSIGN_OR_RETURN(const std::string pem, ReadPem(cert_path, "--tls-cert"));
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(
      BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())), &BIO_free);
  std::unique_ptr<X509, decltype(&X509_free)> cert(
      bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr) : nullptr, &X509_free);
  if (cert == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("--tls-cert: '", cert_path, "' holds no PEM certificate"));
  }
  // The names it has, for the message.
  std::vector<std::string> names;
  std::unique_ptr<GENERAL_NAMES, void (*)(GENERAL_NAMES*)> sans(
      static_cast<GENERAL_NAMES*>(
          X509_get_ext_d2i(cert.get(), NID_subject_alt_name, nullptr, nullptr)),
      [](GENERAL_NAMES* g) { GENERAL_NAMES_free(g); });
  for (int i = 0; sans != nullptr && i < sk_GENERAL_NAME_num(sans.get()); ++i) {
    const GENERAL_NAME* n = sk_GENERAL_NAME_value(sans.get(), i);
    if (n->type == GEN_DNS) {
      const ASN1_STRING* s = n->d.dNSName;
      names.emplace_back(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                         static_cast<size_t>(ASN1_STRING_length(s)));
    } else if (n->type == GEN_IPADD && n->d.iPAddress->length == 4) {
      const unsigned char* a = ASN1_STRING_get0_data(n->d.iPAddress);
      names.push_back(absl::StrCat(a[0], ".", a[1], ".", a[2], ".", a[3]));
    } else if (n->type == GEN_IPADD) {
      names.emplace_back("(an IPv6 address)");
    }
  }
  if (X509_check_ip_asc(cert.get(), host.c_str(), 0) == 1) return absl::OkStatus();
  if (X509_check_host(cert.get(), host.data(), host.size(), X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS,
                      nullptr) == 1) {
    return absl::OkStatus();
  }
  // OpenSSL, like gRPC, matches "*.a.b" but not "*.a": say so when that is the near miss.
  const size_t dot = host.find('.');
  for (const std::string& name : names) {
    if (dot != std::string::npos && absl::StartsWith(name, "*.") &&
        name.find('.', 2) == std::string::npos && host.substr(dot + 1) == name.substr(2)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--tls-cert names ", host, " only through the wildcard ", name,
          ", which TLS peers refuse (a wildcard must cover two labels or more, e.g. *.",
          name.substr(2), ".NAMESPACE.svc)"));
    }
  }
  return absl::FailedPreconditionError(absl::StrCat(
      "--tls-cert '", cert_path, "' does not name ", host,
      ", the address peers dial (set --advertise, or add it to the certificate; it names: ",
      names.empty() ? "nothing" : absl::StrJoin(names, ", "), ")"));
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsFiles& files, bool require_client_cert) {
  if (!files.serves_tls()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions options(
      require_client_cert && files.mutual()
          ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
          : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  auto cert = ReadPem(files.cert, "--tls-cert");
  if (!cert.ok()) return cert.status();
  auto key = ReadPem(files.key, "--tls-key");
  if (!key.ok()) return key.status();
  pair.cert_chain = *cert;
  pair.private_key = *key;
  options.pem_key_cert_pairs.push_back(pair);
  if (files.mutual()) {
    auto ca = ReadPem(files.ca, "--tls-ca");
    if (!ca.ok()) return ca.status();
    options.pem_root_certs = *ca;
  }
  return grpc::SslServerCredentials(options);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const TlsFiles& files) {
  if (files.ca.empty() && files.cert.empty()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions options;
  if (!files.ca.empty()) {
    auto ca = ReadPem(files.ca, "--tls-ca");
    if (!ca.ok()) return ca.status();
    options.pem_root_certs = *ca;
  }
  if (!files.cert.empty()) {
    auto cert = ReadPem(files.cert, "--tls-cert");
    if (!cert.ok()) return cert.status();
    auto key = ReadPem(files.key, "--tls-key");
    if (!key.ok()) return key.status();
    options.pem_cert_chain = *cert;
    options.pem_private_key = *key;
  }
  return grpc::SslCredentials(options);
}

}  // namespace kvgate::security
