/* An epoll event loop: a pipe fed by a worker thread, an eventfd the worker signals
   when done, and a timerfd; edge-triggered and one-shot registrations; epoll_data
   carried through; the loop ends when the eventfd fires. The worker blocks in read()
   for the loop's acknowledgement of each word while the loop blocks in epoll_wait. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

static int pipefd[2], ackfd[2], efd;

static void *worker(void *arg) {
    (void)arg;
    const char *words[] = {"alpha", "beta", "gamma"};
    for (int i = 0; i < 3; i++) {
        char ack;
        usleep(5000);
        write(pipefd[1], words[i], strlen(words[i]));
        read(ackfd[0], &ack, 1);
    }
    uint64_t one = 7;
    write(efd, &one, sizeof one);
    return NULL;
}

int main(void) {
    pipe(pipefd);
    pipe(ackfd);
    efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    struct itimerspec its = {.it_interval = {0, 5000000}, .it_value = {0, 5000000}};
    timerfd_settime(tfd, 0, &its, NULL);
    struct itimerspec now;
    timerfd_gettime(tfd, &now);
    printf("timer interval %ld ns\n", now.it_interval.tv_nsec);

    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0x1122334455667788ULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, pipefd[0], &ev);
    ev.events = EPOLLIN | EPOLLET;
    ev.data.u64 = 2;
    epoll_ctl(ep, EPOLL_CTL_ADD, efd, &ev);
    ev.events = EPOLLIN | EPOLLONESHOT;
    ev.data.u64 = 3;
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev);
    printf("add twice: %d\n", epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev));

    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    int timer_events = 0, done = 0, words = 0;
    while (!done) {
        struct epoll_event got[8];
        int n = epoll_wait(ep, got, 8, 10000);
        if (n == 0) {
            printf("timeout\n");
            break;
        }
        for (int i = 0; i < n; i++) {
            if (got[i].data.u64 == 0x1122334455667788ULL) {
                char buf[64];
                ssize_t len = read(pipefd[0], buf, sizeof buf);
                printf("pipe: %.*s\n", (int)len, buf);
                words++;
                write(ackfd[1], "k", 1);
            } else if (got[i].data.u64 == 2) {
                uint64_t value;
                read(efd, &value, sizeof value);
                printf("eventfd: %llu\n", (unsigned long long)value);
                done = 1;
            } else if (got[i].data.u64 == 3) {
                uint64_t expirations;
                read(tfd, &expirations, sizeof expirations);
                timer_events++;
            }
        }
    }
    pthread_join(t, NULL);
    struct epoll_event none[1];
    printf("words %d timer events %d (one-shot), after: %d\n", words, timer_events,
           epoll_wait(ep, none, 1, 0));
    return 0;
}
