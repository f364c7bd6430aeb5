/* Sockets under popek exec and qemu-riscv64: a TCP echo server in a thread (its
   blocking accept and reads must not stop the client in the main thread), IPv6 and
   UDP on loopback, a Unix stream server in a forked child, a Unix datagram pair, and
   a descriptor passed with SCM_RIGHTS, batches, a receive timeout, and one write()
   larger than a socket holds, read by another thread. Prints nothing that varies
   between runs. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

static char accepted[64]; /* printed by main: the threads' order is not the program's */

static void *echo_server(void *arg) {
    int listener = *(int *)arg;
    struct sockaddr_in peer;
    socklen_t len = sizeof peer;
    int conn = accept4(listener, (struct sockaddr *)&peer, &len, SOCK_CLOEXEC);
    snprintf(accepted, sizeof accepted, "server: accepted from %s, len %u",
             inet_ntoa(peer.sin_addr), len);
    char buf[256];
    ssize_t n;
    while ((n = recv(conn, buf, sizeof buf, 0)) > 0) {
        for (ssize_t i = 0; i < n; i++)
            buf[i] = toupper((unsigned char)buf[i]);
        send(conn, buf, n, MSG_NOSIGNAL);
    }
    printf("server: end of stream (%zd)\n", n);
    close(conn);
    return NULL;
}

static void tcp(void) {
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1, value = 0;
    socklen_t vlen = sizeof value;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    getsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &value, &vlen);
    printf("SO_REUSEADDR %d (len %u)\n", value != 0, vlen);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(listener, (struct sockaddr *)&addr, sizeof addr);
    listen(listener, 4);
    socklen_t alen = sizeof addr;
    getsockname(listener, (struct sockaddr *)&addr, &alen);
    pthread_t t;
    pthread_create(&t, NULL, echo_server, &listener);
    usleep(10000); /* the server blocks in accept meanwhile */
    int client = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    printf("connect: %d\n", connect(client, (struct sockaddr *)&addr, sizeof addr));
    struct sockaddr_in peer;
    socklen_t plen = sizeof peer;
    getpeername(client, (struct sockaddr *)&peer, &plen);
    printf("peer is the listener: %d\n", peer.sin_port == addr.sin_port);
    const char *lines[] = {"hello", "threads and sockets"};
    for (int i = 0; i < 2; i++) {
        char buf[64];
        send(client, lines[i], strlen(lines[i]), 0);
        ssize_t got = 0, want = strlen(lines[i]);
        while (got < want) {
            ssize_t n = recv(client, buf + got, sizeof buf - got, 0);
            if (n <= 0)
                break;
            got += n;
        }
        printf("client: %.*s\n", (int)got, buf);
    }
    shutdown(client, SHUT_WR);
    pthread_join(t, NULL);
    printf("%s\n", accepted);
    char c;
    printf("client: after shutdown recv %zd\n", recv(client, &c, 1, 0));
    close(client);
    close(listener);
}

static void udp_and_ipv6(void) {
    int a = socket(AF_INET, SOCK_DGRAM, 0), b = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(b, (struct sockaddr *)&addr, sizeof addr);
    socklen_t len = sizeof addr;
    getsockname(b, (struct sockaddr *)&addr, &len);
    sendto(a, "datagram", 8, 0, (struct sockaddr *)&addr, sizeof addr);
    char buf[32];
    struct sockaddr_in from;
    socklen_t flen = sizeof from;
    ssize_t n = recvfrom(b, buf, sizeof buf, 0, (struct sockaddr *)&from, &flen);
    printf("udp: %.*s from %s\n", (int)n, buf, inet_ntoa(from.sin_addr));

    /* A batch each way, as glibc's resolver sends its queries. */
    struct iovec out[3] = {{"a", 1}, {"bb", 2}, {"ccc", 3}};
    struct mmsghdr batch[3];
    memset(batch, 0, sizeof batch);
    for (int i = 0; i < 3; i++) {
        batch[i].msg_hdr.msg_iov = &out[i];
        batch[i].msg_hdr.msg_iovlen = 1;
        batch[i].msg_hdr.msg_name = &addr;
        batch[i].msg_hdr.msg_namelen = sizeof addr;
    }
    printf("sendmmsg: %d\n", sendmmsg(a, batch, 3, 0));
    char slots[4][8];
    struct iovec in[4];
    struct mmsghdr got[4];
    memset(got, 0, sizeof got);
    for (int i = 0; i < 4; i++) {
        in[i] = (struct iovec){slots[i], sizeof slots[i]};
        got[i].msg_hdr.msg_iov = &in[i];
        got[i].msg_hdr.msg_iovlen = 1;
    }
    int m = recvmmsg(b, got, 4, MSG_WAITFORONE, NULL);
    printf("recvmmsg: %d:", m);
    for (int i = 0; i < m; i++)
        printf(" %.*s(%u)", (int)got[i].msg_len, slots[i], got[i].msg_len);
    printf("\n");

    struct timeval limit = {0, 20000};
    setsockopt(b, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
    errno = 0;
    printf("recv past SO_RCVTIMEO: %zd %s\n", recv(b, buf, sizeof buf, 0),
           errno == EAGAIN ? "EAGAIN" : "?");
    errno = 0;
    printf("read past SO_RCVTIMEO: %zd %s\n", read(b, buf, sizeof buf),
           errno == EAGAIN ? "EAGAIN" : "?");
    close(a);
    close(b);

    int s6 = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    if (s6 < 0 || bind(s6, (struct sockaddr *)&a6, sizeof a6) < 0) {
        printf("ipv6: unavailable\n");
        return;
    }
    listen(s6, 1);
    socklen_t l6 = sizeof a6;
    getsockname(s6, (struct sockaddr *)&a6, &l6);
    int c6 = socket(AF_INET6, SOCK_STREAM, 0);
    connect(c6, (struct sockaddr *)&a6, sizeof a6);
    int conn = accept(s6, NULL, NULL);
    write(c6, "six", 3);
    n = read(conn, buf, sizeof buf);
    char text[INET6_ADDRSTRLEN];
    printf("ipv6: %.*s on %s (len %u)\n", (int)n, buf,
           inet_ntop(AF_INET6, &a6.sin6_addr, text, sizeof text), l6);
    close(conn);
    close(c6);
    close(s6);
}

static void unix_sockets(const char *dir) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s/server.sock", dir);
    int listener = socket(AF_UNIX, SOCK_STREAM, 0);
    bind(listener, (struct sockaddr *)&addr, sizeof addr);
    listen(listener, 1);
    pid_t child = fork();
    if (child == 0) {
        int conn = accept(listener, NULL, NULL);
        char buf[64];
        ssize_t n = read(conn, buf, sizeof buf);
        dprintf(conn, "child got '%.*s'", (int)n, buf);
        close(conn);
        _exit(7);
    }
    int client = socket(AF_UNIX, SOCK_STREAM, 0);
    connect(client, (struct sockaddr *)&addr, sizeof addr);
    write(client, "over unix", 9);
    char buf[64];
    ssize_t n, got = 0;
    while ((n = read(client, buf + got, sizeof buf - got)) > 0)
        got += n;
    int status;
    waitpid(child, &status, 0);
    printf("unix stream: %.*s, child exit %d\n", (int)got, buf, WEXITSTATUS(status));
    struct sockaddr_un peer;
    socklen_t plen = sizeof peer;
    getpeername(client, (struct sockaddr *)&peer, &plen);
    printf("unix peer path ends in server.sock: %d\n",
           strcmp(peer.sun_path + strlen(peer.sun_path) - 11, "server.sock") == 0);
    close(client);
    close(listener);
    unlink(addr.sun_path);

    int dgram[2];
    socketpair(AF_UNIX, SOCK_DGRAM, 0, dgram);
    send(dgram[0], "one", 3, 0);
    send(dgram[0], "two!", 4, 0);
    printf("dgram sizes: %zd", recv(dgram[1], buf, sizeof buf, 0));
    printf(" %zd\n", recv(dgram[1], buf, sizeof buf, 0));

    /* SCM_RIGHTS: pass a pipe's read end; the receiver reads what was written. */
    int pair[2], pipefd[2];
    socketpair(AF_UNIX, SOCK_STREAM, 0, pair);
    pipe(pipefd);
    write(pipefd[1], "through a passed fd", 19);
    close(pipefd[1]);
    char cbuf[CMSG_SPACE(sizeof(int))];
    memset(cbuf, 0, sizeof cbuf);
    struct iovec iov = {.iov_base = "x", .iov_len = 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                         .msg_controllen = sizeof cbuf};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &pipefd[0], sizeof(int));
    printf("sendmsg: %zd\n", sendmsg(pair[0], &msg, 0));
    close(pipefd[0]);
    char mark, rbuf[CMSG_SPACE(sizeof(int))];
    struct iovec riov = {.iov_base = &mark, .iov_len = 1};
    struct msghdr rmsg = {.msg_iov = &riov, .msg_iovlen = 1, .msg_control = rbuf,
                          .msg_controllen = sizeof rbuf};
    printf("recvmsg: %zd mark %c\n", recvmsg(pair[1], &rmsg, MSG_CMSG_CLOEXEC), mark);
    struct cmsghdr *rcm = CMSG_FIRSTHDR(&rmsg);
    if (rcm == NULL || rcm->cmsg_len != CMSG_LEN(sizeof(int))) {
        printf("rights: no descriptor came\n");
        return;
    }
    int passed;
    memcpy(&passed, CMSG_DATA(rcm), sizeof(int));
    n = read(passed, buf, sizeof buf);
    printf("rights: level %d type %d: %.*s\n", rcm->cmsg_level, rcm->cmsg_type, (int)n, buf);
}

#define STREAMED (1024 * 1024)
static int stream_pair[2];

static void *stream_reader(void *arg) {
    static char buf[65536];
    long got = 0;
    ssize_t n;
    while ((n = read(stream_pair[1], buf, sizeof buf)) > 0)
        got += n;
    *(long *)arg = got;
    return NULL;
}

/* One write() of more than the socket holds, read by another thread. */
static void big_write_to_a_thread(void) {
    static char data[STREAMED];
    memset(data, 'z', sizeof data);
    socketpair(AF_UNIX, SOCK_STREAM, 0, stream_pair);
    long got = 0;
    pthread_t t;
    pthread_create(&t, NULL, stream_reader, &got);
    ssize_t written = write(stream_pair[0], data, sizeof data);
    shutdown(stream_pair[0], SHUT_WR);
    pthread_join(t, NULL);
    printf("big write: %zd written, %ld read\n", written, got);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    tcp();
    udp_and_ipv6();
    unix_sockets(argc > 1 ? argv[1] : "/tmp");
    big_write_to_a_thread();
    return 0;
}
