/* Bad arguments to the thread, futex, event and socket calls: each must fail with the
   errno Linux gives (bad pointers EFAULT, bad sizes and flags EINVAL...), and nothing
   may bring the emulator down. Prints each call's result and errno. (Left out: where
   qemu-riscv64 7.2 itself differs from Linux: set_robust_list and clone3, which it
   lacks, and bind with an oversized address length, EFAULT there, EINVAL in Linux.) */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/inotify.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

static void *volatile bad_pointer = (void *)0x10; /* volatile: gcc must not see it */
#define BAD bad_pointer
#define TRY(label, call)                                                        \
    do {                                                                        \
        errno = 0;                                                              \
        long r_ = (long)(call);                                                 \
        printf("%-28s %ld %s\n", label, r_, r_ < 0 ? strerrorname_np(errno) : ""); \
    } while (0)

int main(void) {
    static uint32_t word;
    setvbuf(stdout, NULL, _IONBF, 0);
    TRY("futex bad address", syscall(SYS_futex, BAD, FUTEX_WAIT, 0, NULL, NULL, 0));
    TRY("futex misaligned", syscall(SYS_futex, (char *)&word + 1, FUTEX_WAKE, 1, NULL, NULL, 0));
    TRY("futex unknown op", syscall(SYS_futex, &word, 99, 0, NULL, NULL, 0));
    TRY("futex bad timeout", syscall(SYS_futex, &word, FUTEX_WAIT, 0, BAD, NULL, 0));
    TRY("futex zero bitset", syscall(SYS_futex, &word, FUTEX_WAIT_BITSET, 0, NULL, NULL, 0));
    TRY("tgkill no such thread", syscall(SYS_tgkill, getpid(), 0x3fffffff, 0));
    TRY("membarrier bad command", syscall(SYS_membarrier, 12345, 0, 0));
    TRY("sched_getaffinity bad mask", syscall(SYS_sched_getaffinity, 0, 128, BAD));

    int ep = epoll_create1(0);
    TRY("epoll_create1 bad flags", epoll_create1(12345));
    TRY("epoll_ctl bad event", epoll_ctl(ep, EPOLL_CTL_ADD, 0, BAD));
    TRY("epoll_ctl itself", epoll_ctl(ep, EPOLL_CTL_ADD, ep, &(struct epoll_event){0}));
    TRY("epoll_wait zero max", epoll_wait(ep, (struct epoll_event *)&word, 0, 0));
    TRY("epoll_wait bad events", epoll_wait(ep, BAD, 4, 0));
    TRY("eventfd2 bad flags", syscall(SYS_eventfd2, 0, 12345));
    TRY("timerfd_settime bad value", syscall(SYS_timerfd_settime, -1, 0, BAD, NULL));
    TRY("inotify_add_watch bad path", syscall(SYS_inotify_add_watch, inotify_init1(0), BAD, 1));

    TRY("socket bad domain", socket(12345, SOCK_STREAM, 0));
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    char big[256] = {0};
    TRY("bind bad address", bind(s, BAD, 16));
    TRY("connect bad address", connect(s, BAD, 16));
    TRY("sendto bad buffer", sendto(s, BAD, 10, 0, NULL, 0));
    TRY("sendmsg bad msghdr", sendmsg(s, BAD, 0));
    struct msghdr m = {.msg_iov = BAD, .msg_iovlen = 100000};
    TRY("sendmsg huge iovlen", sendmsg(s, &m, 0));
    TRY("recvfrom bad buffer", recvfrom(s, BAD, 10, MSG_DONTWAIT, NULL, NULL));
    struct iovec one = {.iov_base = big, .iov_len = 1};
    TRY("recvmsg nothing waiting",
        recvmsg(s, &(struct msghdr){.msg_iov = &one, .msg_iovlen = 1}, MSG_DONTWAIT));
    socklen_t len = 4;
    TRY("getsockopt bad length", getsockopt(s, SOL_SOCKET, SO_TYPE, &word, BAD));
    TRY("getsockopt unknown", getsockopt(s, SOL_SOCKET, 12345, &word, &len));
    TRY("setsockopt huge", setsockopt(s, SOL_SOCKET, SO_RCVBUF, big, 1 << 30));
    TRY("getsockname bad length", getsockname(s, (struct sockaddr *)big, BAD));
    TRY("accept on udp", accept(s, NULL, NULL));
    TRY("shutdown not connected", shutdown(s, SHUT_RDWR));
    TRY("socketpair bad vector", socketpair(AF_UNIX, SOCK_STREAM, 0, BAD));
    TRY("listen on a pipe end", listen(0, 1));
    return 0;
}
