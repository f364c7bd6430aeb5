/* What a program sees of its container: it tries to leave the root by every path trick
 * it knows and prints what it reached, then its identity, its /proc, its network and its
 * memory limit. The test that builds it places "inside" at the container's /marker and
 * "SECRET" beside the root directory on the host, where an escape would land. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

static void show_fd(const char *label, int fd) {
    char buf[64] = {0};
    if (fd < 0) {
        printf("%s: %s\n", label, strerrorname_np(errno));
        return;
    }
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n < 0) {
        printf("%s: read %s\n", label, strerrorname_np(errno));
        return;
    }
    buf[strcspn(buf, "\n")] = 0;
    printf("%s: %s\n", label, buf);
}

static void show(const char *label, const char *path) { show_fd(label, open(path, O_RDONLY)); }

static void show_link(const char *label, const char *path) {
    char buf[256];
    ssize_t n = readlink(path, buf, sizeof buf - 1);
    if (n < 0) {
        printf("%s: %s\n", label, strerrorname_np(errno));
        return;
    }
    buf[n] = 0;
    printf("%s: %s\n", label, buf);
}

static void escapes(void) {
    show("dotdot", "/../../../marker");
    chdir("/bin");
    show("relative dotdot", "../../../../marker");
    symlink("/", "/tmp/to-root");
    show("symlink to /", "/tmp/to-root/../marker");
    symlink("../../../../../..", "/tmp/up");
    show("relative symlink", "/tmp/up/marker");
    show("proc self root", "/proc/self/root/../marker");
    show("proc 1 root", "/proc/1/root/../../marker");
    show("proc self cwd", "/proc/self/cwd/../../marker");
    int root = open("/", O_DIRECTORY | O_RDONLY);
    show_fd("openat root dotdot", openat(root, "../marker", O_RDONLY));
    char through_fd[64];
    snprintf(through_fd, sizeof through_fd, "/proc/self/fd/%d/../marker", root);
    show("proc self fd", through_fd);
    int data = open("/data", O_DIRECTORY | O_RDONLY);
    show_fd("openat bind dotdot", openat(data, "../marker", O_RDONLY));
    show_fd("openat bind absolute", openat(data, "/marker", O_RDONLY));
    show_fd("bind file", openat(data, "volume.txt", O_RDONLY));
    show_fd("bind write", open("/data/new", O_WRONLY | O_CREAT, 0644));
    mkdir("/tmp/a", 0755);
    mkdir("/tmp/a/b", 0755);
    chdir("/tmp/a/b");
    rename("/tmp/a", "/tmp/moved");
    show("cwd moved dotdot", "../../../../../marker");
    char cwd[256];
    printf("getcwd: %s\n", getcwd(cwd, sizeof cwd) ? cwd : strerrorname_np(errno));
    chdir("/..");
    printf("getcwd after /..: %s\n", getcwd(cwd, sizeof cwd) ? cwd : strerrorname_np(errno));
    show_link("readlink proc self root", "/proc/self/root");
    show_link("readlink up", "/tmp/up");
    show("proc other pid", "/proc/2/status");
}

static void identity(void) {
    struct utsname u;
    uname(&u);
    printf("hostname: %s\n", u.nodename);
    printf("pid %d ppid %d uid %d gid %d\n", getpid(), getppid(), getuid(), getgid());
    struct stat st;
    stat("/marker", &st);
    printf("marker owner: %d\n", st.st_uid);
    DIR *proc = opendir("/proc");
    struct dirent *e;
    printf("proc pids:");
    while ((e = readdir(proc)) != NULL)
        if (e->d_name[0] >= '0' && e->d_name[0] <= '9')
            printf(" %s", e->d_name);
    printf("\n");
    closedir(proc);
    fflush(stdout);
}

static volatile sig_atomic_t urged;

static void on_urg(int sig) { (void)sig; urged = 1; }

static void processes(void) {
    signal(SIGURG, on_urg);
    sigset_t urg, old;
    sigemptyset(&urg);
    sigaddset(&urg, SIGURG);
    sigprocmask(SIG_BLOCK, &urg, &old);
    pid_t waiter = fork();
    if (waiter == 0) {
        while (!urged)
            sigsuspend(&old);
        _exit(7);
    }
    pid_t sender = fork();
    if (sender == 0) {
        usleep(200000);
        printf("child %d (parent %d): kill(-1) = %d\n", getpid(), getppid(), kill(-1, SIGURG));
        printf("kill(0) = %d, pgrp %d\n", kill(0, SIGURG), getpgrp());
        fflush(stdout);
        _exit(0);
    }
    int status;
    pid_t first = waitpid(sender, &status, 0);
    pid_t second = waitpid(waiter, &status, 0);
    printf("reaped %d and %d, status %d\n", first, second, WEXITSTATUS(status));
    printf("init urged: %d\n", (int)urged);
}

static void network(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(9)};
    inet_pton(AF_INET, "192.0.2.1", &a.sin_addr);
    printf("connect 192.0.2.1: %s\n", connect(s, (void *)&a, sizeof a) ? strerrorname_np(errno) : "ok");
    close(s);
    s = socket(AF_INET, SOCK_STREAM, 0);
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    a.sin_port = 0;
    printf("bind 127.0.0.1: %s\n", bind(s, (void *)&a, sizeof a) ? strerrorname_np(errno) : "ok");
    close(s);
}

static void memory(void) {
    void *small = mmap(NULL, 8 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    void *big = mmap(NULL, 256 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    printf("mmap 8 MiB: %s, 256 MiB: %s\n", small == MAP_FAILED ? strerrorname_np(errno) : "ok",
           big == MAP_FAILED ? strerrorname_np(errno) : "ok");
    void *reserve = mmap(NULL, 256 << 20, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    printf("reserve 256 MiB: %s\n", reserve == MAP_FAILED ? strerrorname_np(errno) : "ok");
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    identity();
    escapes();
    processes();
    network();
    memory();
    return 0;
}
