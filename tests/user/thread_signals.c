/* Signals and threads: pthread_kill reaches the named thread (its handler runs there,
   on that thread's alternate stack), per-thread masks steer a process-directed signal
   to the thread that does not block it, and a thread blocked in read() goes on reading
   after an SA_RESTART handler and fails with EINTR after another, while the others
   run on. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static __thread int who;
static volatile int handled_by[4];
static volatile int on_altstack[4];
static pthread_barrier_t ready;
static int pipefd[2];
static volatile int read_done;

static void handler(int sig) {
    int probe;
    stack_t ss;
    sigaltstack(NULL, &ss);
    int slot = sig == SIGUSR1 ? 0 : sig == SIGUSR2 ? 1 : sig == SIGHUP ? 2 : 3;
    handled_by[slot] = who;
    on_altstack[slot] =
        (ss.ss_flags & SS_ONSTACK) && (uintptr_t)&probe >= (uintptr_t)ss.ss_sp &&
        (uintptr_t)&probe < (uintptr_t)ss.ss_sp + ss.ss_size;
}

static void *second(void *arg) {
    (void)arg;
    who = 2;
    stack_t ss = {.ss_sp = malloc(65536), .ss_size = 65536, .ss_flags = 0};
    sigaltstack(&ss, NULL);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM); /* SIGTERM must go to the main thread */
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    pthread_barrier_wait(&ready);
    char c;
    ssize_t n = read(pipefd[0], &c, 1); /* interrupted by SIGHUP */
    int error = errno;
    read_done = 1;
    printf("second: read %zd %s\n", n, n < 0 && error == EINTR ? "EINTR" : "?");
    return NULL;
}

int main(void) {
    who = 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sa.sa_flags = SA_ONSTACK | SA_RESTART; /* the read goes on after these handlers */
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGUSR2, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sa.sa_flags = SA_ONSTACK; /* but ends with EINTR after this one */
    sigaction(SIGHUP, &sa, NULL);
    pipe(pipefd);
    pthread_barrier_init(&ready, NULL, 2);
    pthread_t t;
    pthread_create(&t, NULL, second, NULL);
    pthread_barrier_wait(&ready);
    usleep(20000); /* let it block in read */
    pthread_kill(t, SIGUSR1);
    pthread_kill(pthread_self(), SIGUSR2);
    kill(getpid(), SIGTERM);
    while (!read_done) { /* again, in case the first came before the read began */
        pthread_kill(t, SIGHUP);
        usleep(5000);
    }
    pthread_join(t, NULL);
    printf("SIGUSR1 ran on thread %d (altstack %d)\n", handled_by[0], on_altstack[0]);
    printf("SIGUSR2 ran on thread %d (altstack %d)\n", handled_by[1], on_altstack[1]);
    printf("SIGHUP ran on thread %d\n", handled_by[2]);
    printf("SIGTERM ran on thread %d\n", handled_by[3]);
    return 0;
}
