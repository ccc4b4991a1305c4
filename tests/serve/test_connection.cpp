// ClientConnection (src/serve/connection.h) over real loopback TCP sockets: the server's end of a
// connection is found by its addresses, and a client that closes or resets is seen as gone while one that
// waits or sends more is not.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <string>

#include "serve/connection.h"

namespace shardlm::serve {
namespace {

// A socket closed when it goes out of scope.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { close_now(); }
  void close_now() {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
};

int port_of(int fd) {
  sockaddr_in a{};
  socklen_t len = sizeof a;
  EXPECT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len), 0);
  return ntohs(a.sin_port);
}

// A connected pair over 127.0.0.1: the client's socket and the server's accepted one.
struct Pair {
  Fd listener{socket(AF_INET, SOCK_STREAM, 0)};
  Fd client{socket(AF_INET, SOCK_STREAM, 0)};
  Fd server{-1};
  int server_port = -1, client_port = -1;
  Pair() {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    EXPECT_EQ(bind(listener.fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    EXPECT_EQ(listen(listener.fd, 4), 0);
    server_port = port_of(listener.fd);
    a.sin_port = htons(static_cast<uint16_t>(server_port));
    EXPECT_EQ(connect(client.fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    server.fd = accept(listener.fd, nullptr, nullptr);
    EXPECT_GE(server.fd, 0);
    client_port = port_of(client.fd);
  }
};

TEST(ClientConnection, FoundByItsTwoEnds) {
  Pair p;
  const auto c = ClientConnection::find("127.0.0.1", p.server_port, "127.0.0.1", p.client_port);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->fd(), p.server.fd);  // not the client's end, which has the same ports the other way round
  EXPECT_FALSE(ClientConnection::find("127.0.0.1", p.server_port, "127.0.0.1", p.client_port + 1).has_value());
  EXPECT_FALSE(ClientConnection::find("127.0.0.2", p.server_port, "127.0.0.1", p.client_port).has_value());
  EXPECT_FALSE(ClientConnection::find("127.0.0.1", -1, "127.0.0.1", p.client_port).has_value());
}

TEST(ClientConnection, ClosedOnlyOnceTheClientLeaves) {
  Pair p;
  ClientConnection c(p.server.fd);
  EXPECT_FALSE(c.closed());  // waiting for its answer
  // A pipelined next request: still there, and the bytes are left for the HTTP library to read.
  ASSERT_EQ(send(p.client.fd, "GET /", 5, 0), 5);
  for (int i = 0; i < 3; ++i) EXPECT_FALSE(c.closed());
  char buf[8] = {};
  EXPECT_EQ(recv(p.server.fd, buf, sizeof buf, 0), 5);
  EXPECT_EQ(std::string(buf, 5), "GET /");
  p.client.close_now();
  EXPECT_TRUE(c.closed());
  EXPECT_TRUE(c.closed());
}

TEST(ClientConnection, ClosedOnReset) {
  Pair p;
  ClientConnection c(p.server.fd);
  linger l{1, 0};  // close() sends RST instead of FIN
  ASSERT_EQ(setsockopt(p.client.fd, SOL_SOCKET, SO_LINGER, &l, sizeof l), 0);
  p.client.close_now();
  EXPECT_TRUE(c.closed());
}

}  // namespace
}  // namespace shardlm::serve
