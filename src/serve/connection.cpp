#include "serve/connection.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <system_error>

namespace shardlm::serve {

namespace {

// The numeric host and port of a socket's end (getsockname or getpeername), as cpp-httplib reports them.
bool end_of(int fd, bool peer, std::string* host, int* port) {
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  const int rc = peer ? getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len)
                      : getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  if (rc != 0) return false;
  if (addr.ss_family == AF_INET) {
    *port = ntohs(reinterpret_cast<const sockaddr_in*>(&addr)->sin_port);
  } else if (addr.ss_family == AF_INET6) {
    *port = ntohs(reinterpret_cast<const sockaddr_in6*>(&addr)->sin6_port);
  } else {
    return false;  // a Unix socket, not a client's TCP connection
  }
  char buf[NI_MAXHOST];
  if (getnameinfo(reinterpret_cast<const sockaddr*>(&addr), len, buf, sizeof buf, nullptr, 0, NI_NUMERICHOST) != 0)
    return false;
  *host = buf;
  return true;
}

}  // namespace

std::optional<ClientConnection> ClientConnection::find(const std::string& local_addr, int local_port,
                                                       const std::string& remote_addr, int remote_port) {
  if (local_port < 0 || remote_port < 0) return std::nullopt;
  std::error_code ec;
  std::filesystem::directory_iterator it("/proc/self/fd", ec);
  if (ec) return std::nullopt;
  for (; it != std::filesystem::directory_iterator(); it.increment(ec)) {
    if (ec) return std::nullopt;
    char* end = nullptr;
    const std::string name = it->path().filename().string();
    const long fd = std::strtol(name.c_str(), &end, 10);
    if (end == name.c_str() || *end != '\0') continue;
    std::string host;
    int port = -1;
    // Ports first: most descriptors are not sockets, or not this connection, and fail cheaply.
    if (!end_of(static_cast<int>(fd), /*peer=*/true, &host, &port) || port != remote_port || host != remote_addr)
      continue;
    if (!end_of(static_cast<int>(fd), /*peer=*/false, &host, &port) || port != local_port || host != local_addr)
      continue;
    return ClientConnection(static_cast<int>(fd));
  }
  return std::nullopt;
}

bool ClientConnection::closed() const {
  pollfd p{fd_, POLLIN, 0};
  int rc = 0;
  do {
    rc = poll(&p, 1, 0);
  } while (rc < 0 && errno == EINTR);
  if (rc <= 0) return false;  // nothing to read: the client is waiting for the answer
  if (p.revents & (POLLERR | POLLNVAL)) return true;
  char c = 0;
  ssize_t n = 0;
  do {
    n = recv(fd_, &c, 1, MSG_PEEK | MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  if (n > 0) return false;  // the client sent more (a pipelined request): it is still there
  if (n == 0) return true;  // end of stream: it closed its end
  return errno != EAGAIN && errno != EWOULDBLOCK;  // ECONNRESET and the like
}

}  // namespace shardlm::serve
