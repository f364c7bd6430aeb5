/* sigwait in a dedicated thread, the way servers take signals: every thread blocks
   SIGUSR1, SIGUSR2 and SIGTERM; one thread collects them with sigwaitinfo, whether
   sent to it (pthread_kill), to the process (kill) or from another process (a forked
   child's kill); sigtimedwait times out with EAGAIN when nothing comes. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static sigset_t set;

static void *collector(void *arg) {
    (void)arg;
    for (int i = 0; i < 3; i++) {
        siginfo_t info;
        int sig = sigwaitinfo(&set, &info);
        printf("collected %s (code %s)\n", sigabbrev_np(sig),
               info.si_code == SI_TKILL ? "SI_TKILL" : info.si_code == SI_USER ? "SI_USER" : "?");
    }
    struct timespec ten_ms = {0, 10 * 1000 * 1000};
    errno = 0;
    int none = sigtimedwait(&set, NULL, &ten_ms);
    printf("sigtimedwait: %d %s\n", none, errno == EAGAIN ? "EAGAIN" : "?");
    return NULL;
}

int main(void) {
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGUSR2);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    pthread_t t;
    pthread_create(&t, NULL, collector, NULL);
    pthread_kill(t, SIGUSR1);
    usleep(20000);
    kill(getpid(), SIGUSR2);
    usleep(20000);
    pid_t child = fork();
    if (child == 0) {
        kill(getppid(), SIGTERM);
        _exit(0);
    }
    waitpid(child, NULL, 0);
    pthread_join(t, NULL);
    return 0;
}
