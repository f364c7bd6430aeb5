/* pthreads under popek exec and qemu-riscv64: mutex, condition variable, barrier,
   thread-local storage, join with results, detached threads, cancellation, rwlock,
   once, timed waits, thread names, a pipe between two threads carrying more than it
   holds.
   Prints only what is deterministic. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define N 4
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static pthread_barrier_t barrier;
static pthread_rwlock_t rwlock = PTHREAD_RWLOCK_INITIALIZER;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static __thread int tls_value = 5;
static long counter, shared_total;
static int turn, once_calls, detached_done;

static void init_once(void) { once_calls++; }

static void *worker(void *arg) {
    int id = (int)(long)arg;
    pthread_once(&once, init_once);
    tls_value += id * 100;
    for (int i = 0; i < 3000; i++) {
        pthread_mutex_lock(&lock);
        counter++;
        pthread_mutex_unlock(&lock);
        if (i % 500 == 0)
            sched_yield();
    }
    pthread_rwlock_wrlock(&rwlock);
    shared_total += id;
    pthread_rwlock_unlock(&rwlock);
    pthread_barrier_wait(&barrier);
    pthread_mutex_lock(&lock);
    while (turn != id)
        pthread_cond_wait(&cond, &lock);
    char name[16], mine[16];
    snprintf(name, sizeof name, "worker%d", id);
    pthread_setname_np(pthread_self(), name);
    pthread_getname_np(pthread_self(), mine, sizeof mine);
    printf("thread %d tls %d counter %ld name %s\n", id, tls_value, counter, mine);
    turn++;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
    return (void *)(long)(id * 7);
}

static void *sleeper(void *arg) {
    (void)arg;
    for (;;)
        pause(); /* a cancellation point: pthread_cancel ends it here */
    return NULL;
}

static void *detached(void *arg) {
    (void)arg;
    pthread_mutex_lock(&lock);
    detached_done = 1;
    pthread_cond_signal(&cond);
    pthread_mutex_unlock(&lock);
    return NULL;
}

#define PIPED (256 * 1024)
static int pipefd[2];

static void *pipe_reader(void *arg) {
    unsigned long sum = 0, got = 0;
    static unsigned char buf[8192];
    ssize_t n;
    while ((n = read(pipefd[0], buf, sizeof buf)) > 0)
        for (ssize_t i = 0; i < n; i++, got++)
            sum = sum * 31 + buf[i];
    *(unsigned long *)arg = sum ^ got;
    return NULL;
}

static void pipe_between_threads(void) {
    static unsigned char data[PIPED];
    unsigned long expect = 0, result = 0;
    for (int i = 0; i < PIPED; i++) {
        data[i] = (unsigned char)(i * 7 + i / 1000);
        expect = expect * 31 + data[i];
    }
    pipe(pipefd);
    pthread_t r;
    pthread_create(&r, NULL, pipe_reader, &result);
    ssize_t written = write(pipefd[1], data, PIPED); /* one call, 4x the pipe's size */
    close(pipefd[1]);
    pthread_join(r, NULL);
    printf("pipe: wrote %zd, reader agrees %d\n", written, result == (expect ^ PIPED));
}

int main(void) {
    pthread_t t[N], s, d;
    pthread_barrier_init(&barrier, NULL, N);
    for (long i = 0; i < N; i++)
        pthread_create(&t[i], NULL, worker, (void *)i);
    long total = 0;
    for (int i = 0; i < N; i++) {
        void *r;
        pthread_join(t[i], &r);
        total += (long)r;
    }
    char name[16];
    pthread_getname_np(pthread_self(), name, sizeof name);
    /* (not the name itself: qemu-riscv64 reports its own) */
    printf("main tls %d total %ld counter %ld once %d rw %ld, own name kept %d\n", tls_value,
           total, counter, once_calls, shared_total, strncmp(name, "worker", 6) != 0);

    pthread_create(&s, NULL, sleeper, NULL);
    pthread_cancel(s);
    void *r;
    pthread_join(s, &r);
    printf("cancelled %d\n", r == PTHREAD_CANCELED);

    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_mutex_lock(&lock);
    pthread_create(&d, &attr, detached, NULL);
    while (!detached_done)
        pthread_cond_wait(&cond, &lock);
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_nsec += 20 * 1000 * 1000;
    if (deadline.tv_nsec >= 1000000000) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000;
    }
    int timed = pthread_cond_timedwait(&cond, &lock, &deadline);
    pthread_mutex_unlock(&lock);
    printf("detached %d timedwait %s\n", detached_done, timed == ETIMEDOUT ? "ETIMEDOUT" : "?");
    pipe_between_threads();
    return 0;
}
