/* futex and thread identity, called directly: value mismatch, relative and absolute
   timeouts, requeue, bitsets, wake-op, a robust mutex whose owner died, gettid and
   membarrier. Each wake is retried until it finds its waiter, so the output does not
   depend on how fast the waiters get to their wait. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <linux/membarrier.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static uint32_t fa, fb, fc, fd_, fe;

static long futex(uint32_t *addr, int op, uint32_t val, const void *timeout_or_val2,
                  uint32_t *addr2, uint32_t val3) {
    return syscall(SYS_futex, addr, op, val, timeout_or_val2, addr2, val3);
}

static long retry(uint32_t *addr, int op, uint32_t val, const void *val2, uint32_t *addr2,
                  uint32_t val3) {
    long n;
    while ((n = futex(addr, op, val, val2, addr2, val3)) == 0)
        usleep(1000);
    return n;
}

static void *wait_on(void *arg) {
    uint32_t *addr = arg;
    long r = futex(addr, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
    return (void *)r;
}

static void *wait_bitset(void *arg) {
    uint32_t bits = (uint32_t)(uintptr_t)arg;
    return (void *)futex(&fc, FUTEX_WAIT_BITSET_PRIVATE, 0, NULL, NULL, bits);
}

static pthread_mutex_t robust;
static void *die_holding(void *arg) {
    (void)arg;
    pthread_mutex_lock(&robust);
    return NULL; /* ends without unlocking */
}

static pid_t thread_tid;
static void *report_tid(void *arg) {
    (void)arg;
    thread_tid = gettid();
    return NULL;
}

int main(void) {
    struct timespec ten_ms = {0, 10 * 1000 * 1000};
    errno = 0;
    printf("mismatch: %ld %s\n", futex(&fa, FUTEX_WAIT, 1, NULL, NULL, 0),
           errno == EAGAIN ? "EAGAIN" : "?");
    errno = 0;
    printf("relative timeout: %ld %s\n", futex(&fa, FUTEX_WAIT, 0, &ten_ms, NULL, 0),
           errno == ETIMEDOUT ? "ETIMEDOUT" : "?");
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_nsec += 10 * 1000 * 1000;
    if (deadline.tv_nsec >= 1000000000) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000;
    }
    errno = 0;
    printf("absolute timeout: %ld %s\n",
           futex(&fa, FUTEX_WAIT_BITSET, 0, &deadline, NULL, FUTEX_BITSET_MATCH_ANY),
           errno == ETIMEDOUT ? "ETIMEDOUT" : "?");

    /* Three waiters on fa, requeued to fb, then woken there. */
    pthread_t w[3];
    for (int i = 0; i < 3; i++)
        pthread_create(&w[i], NULL, wait_on, &fa);
    long moved = 0;
    while (moved < 3)
        moved += retry(&fa, FUTEX_CMP_REQUEUE_PRIVATE, 0, (void *)(uintptr_t)INT_MAX, &fb, 0);
    errno = 0;
    printf("cmp_requeue with a stale value: %ld %s\n",
           futex(&fa, FUTEX_CMP_REQUEUE_PRIVATE, 0, (void *)1, &fb, 1),
           errno == EAGAIN ? "EAGAIN" : "?");
    long on_a = futex(&fa, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    long on_b = futex(&fb, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    long results = 0;
    for (int i = 0; i < 3; i++) {
        void *r;
        pthread_join(w[i], &r);
        results += (long)r;
    }
    printf("requeued %ld, then woke %ld on a and %ld on b; waits returned %ld\n", moved, on_a,
           on_b, results);

    /* Bitsets: a wake for bit 2 finds only the waiter that asked for bit 2. */
    pthread_t b1, b2;
    pthread_create(&b1, NULL, wait_bitset, (void *)1);
    pthread_create(&b2, NULL, wait_bitset, (void *)2);
    long first = retry(&fc, FUTEX_WAKE_BITSET_PRIVATE, INT_MAX, NULL, NULL, 2);
    pthread_join(b2, NULL);
    long second = retry(&fc, FUTEX_WAKE_BITSET_PRIVATE, INT_MAX, NULL, NULL, 1);
    pthread_join(b1, NULL);
    printf("bitset 2 woke %ld, bitset 1 woke %ld\n", first, second);

    /* Wake-op: set fe to 7, wake fd_'s waiter, and fe's too if fe was 0 (none waits). */
    pthread_t wo;
    pthread_create(&wo, NULL, wait_on, &fd_);
    long op = retry(&fd_, FUTEX_WAKE_OP_PRIVATE, 1, (void *)1, &fe,
                    FUTEX_OP(FUTEX_OP_SET, 7, FUTEX_OP_CMP_EQ, 0));
    pthread_join(wo, NULL);
    printf("wake_op woke %ld, fe %u\n", op, fe);

    /* A robust mutex whose owner thread ended while holding it. */
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&robust, &attr);
    pthread_t holder;
    pthread_create(&holder, NULL, die_holding, NULL);
    pthread_join(holder, NULL);
    int locked = pthread_mutex_lock(&robust);
    printf("robust lock: %s\n", locked == EOWNERDEAD ? "EOWNERDEAD" : "?");
    pthread_mutex_consistent(&robust);
    pthread_mutex_unlock(&robust);

    pthread_t t;
    pthread_create(&t, NULL, report_tid, NULL);
    pthread_join(t, NULL);
    printf("main tid is pid %d, thread tid differs %d\n", gettid() == getpid(),
           thread_tid != getpid() && thread_tid > 0);
    long query = syscall(SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0);
    printf("membarrier: global %d, register private expedited %ld\n",
           (int)(query & MEMBARRIER_CMD_GLOBAL) != 0,
           syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0));
    printf("private expedited %ld\n",
           syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0));
    return 0;
}
