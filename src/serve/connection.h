// Whether the client of an HTTP request is still connected, for an HTTP library that does not say:
// cpp-httplib 0.11 (Debian 12's) hands a handler the request's addresses but not its socket, and a
// non-streaming handler writes nothing until the end, so without this a client that leaves is never noticed
// and its sequences run to max_tokens. Newer cpp-httplib has Request::is_connection_closed for this.
//
// The socket is found by its two ends (the local and remote address and port the request names), which no
// other connected socket of the process shares; the socket stays the HTTP library's (never closed here), and
// stays open while the handler that asks runs.
#pragma once

#include <optional>
#include <string>

namespace shardlm::serve {

class ClientConnection {
 public:
  // The connected TCP socket of this process whose local end is local_addr:local_port and whose peer is
  // remote_addr:remote_port (numeric addresses, as getnameinfo(NI_NUMERICHOST) writes them), or nullopt
  // when there is none or the process's descriptors cannot be listed (/proc/self/fd): liveness unknown.
  static std::optional<ClientConnection> find(const std::string& local_addr, int local_port,
                                              const std::string& remote_addr, int remote_port);

  explicit ClientConnection(int fd) : fd_(fd) {}
  int fd() const { return fd_; }

  // True once the peer has closed (end of stream) or reset the connection; never blocks. Bytes the client
  // sent meanwhile (a pipelined next request) stay unread for the HTTP library. A client that only shuts
  // down its sending side after the request counts as gone, as newer cpp-httplib counts it.
  bool closed() const;

 private:
  int fd_ = -1;  // not owned
};

}  // namespace shardlm::serve
