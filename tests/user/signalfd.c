/* signalfd in an epoll loop: SIGUSR1 and SIGUSR2 blocked and read from a signalfd, sent
   by the program itself, by a thread and by a forked child; the mask changed in place;
   a non-blocking read with nothing pending fails with EAGAIN. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

static void *sender(void *arg) {
    (void)arg;
    usleep(10000);
    kill(getpid(), SIGUSR2);
    return NULL;
}

static int next_signal(int ep, int sfd) {
    struct epoll_event ev;
    if (epoll_wait(ep, &ev, 1, 5000) != 1)
        return -1;
    struct signalfd_siginfo info;
    ssize_t n = read(sfd, &info, sizeof info);
    return n == sizeof info ? (int)info.ssi_signo : -2;
}

int main(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGUSR2);
    sigaddset(&set, SIGTERM);
    sigprocmask(SIG_BLOCK, &set, NULL);
    sigdelset(&set, SIGTERM);
    int sfd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = sfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &ev);
    struct signalfd_siginfo info;
    errno = 0;
    printf("empty read: %zd %s\n", read(sfd, &info, sizeof info),
           errno == EAGAIN ? "EAGAIN" : "?");

    raise(SIGUSR1);
    printf("own raise: %s\n", sigabbrev_np(next_signal(ep, sfd)));
    pthread_t t;
    pthread_create(&t, NULL, sender, NULL);
    printf("from a thread: %s\n", sigabbrev_np(next_signal(ep, sfd)));
    pthread_join(t, NULL);

    sigaddset(&set, SIGTERM);
    printf("mask changed: %d\n", signalfd(sfd, &set, 0) == sfd);
    pid_t child = fork();
    if (child == 0) {
        kill(getppid(), SIGTERM);
        _exit(0);
    }
    waitpid(child, NULL, 0);
    printf("from a child: %s\n", sigabbrev_np(next_signal(ep, sfd)));
    return 0;
}
