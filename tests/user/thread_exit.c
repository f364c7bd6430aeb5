/* How a threaded process ends: the main thread leaves with pthread_exit while the
   others run on; a thread blocked in read() and one spinning are ended by another
   thread's exit(4), whose status is the process's. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static int pipefd[2];

static void *blocked(void *arg) {
    char c;
    read(pipefd[0], &c, 1); /* nobody writes */
    return arg;
}

static void *spinning(void *arg) {
    for (volatile unsigned long i = 0;; i++)
        ;
    return arg;
}

static void *last(void *arg) {
    usleep(30000);
    printf("last thread: exit(4) with main gone\n");
    fflush(stdout);
    exit(4);
    return arg;
}

int main(void) {
    pthread_t t;
    pipe(pipefd);
    printf("main: pthread_exit\n"); /* first: a loaded host may run the others late */
    fflush(stdout);
    pthread_create(&t, NULL, blocked, NULL);
    pthread_create(&t, NULL, spinning, NULL);
    pthread_create(&t, NULL, last, NULL);
    pthread_exit(NULL);
}
