// TLS identities and trust for moeserve's listeners and clients, named by PEM files, turned into
// gRPC credentials.
//
// Server side: a certificate chain and key; with a client CA, clients must present a certificate
// it signed (mutual TLS). Client side: the CA that signed the server's certificate (the system's
// roots when empty), optionally a client certificate and key, and the name to verify when the
// address is not the name in the certificate (e.g. 127.0.0.1). Files are read once, when the
// credentials are made; they must be regular files.
//
// Pure functions; thread-safe.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"

namespace moeserve::base {

struct TlsServerFiles {
  std::string cert;       // PEM certificate chain of the server
  std::string key;        // PEM private key of the certificate
  std::string client_ca;  // PEM CA bundle; set: clients must present a certificate it signed
  bool enabled() const { return !cert.empty() || !key.empty() || !client_ca.empty(); }
};

struct TlsClientFiles {
  bool enabled = false;     // speak TLS (implied by any file below)
  std::string ca;           // PEM CA bundle that signed the server's certificate; empty: system
  std::string cert;         // PEM client certificate, for servers that require one
  std::string key;          // its private key
  std::string server_name;  // the name the server's certificate must carry; empty: the host
  bool use_tls() const { return enabled || !ca.empty() || !cert.empty() || !key.empty(); }
};

// Insecure credentials when !files.enabled(); INVALID_ARGUMENT naming the flag-level problem (a
// certificate without its key, a client CA without a certificate) or an unreadable file.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsServerFiles& files);

// A channel to `address`: plaintext unless files.use_tls(). INVALID_ARGUMENT as above.
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& address,
                                                           const TlsClientFiles& files);

// A PEM file's content (at most 1 MiB; a regular file).
absl::StatusOr<std::string> ReadPemFile(const std::string& path, const char* what);

}  // namespace moeserve::base
