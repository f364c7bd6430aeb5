/* A WASI program that uses what C programs use: arguments, environment, stdin, files and
 * directories in the directory named by argv[1], symlinks, clocks, sleep, poll and randomness.
 * It prints only what any correct runtime prints the same (no times, inodes or random
 * bytes), so its output can be compared with wasmtime's. Exits with status 7. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static char path_buf[4][512];

static const char *at(int slot, const char *dir, const char *name) {
    snprintf(path_buf[slot], sizeof path_buf[slot], "%s/%s", dir, name);
    return path_buf[slot];
}

static int by_name(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void list(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) { printf("opendir %s: %s\n", dir, strerror(errno)); return; }
    char *names[64];
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < 64) {
        char kind = e->d_type == DT_DIR ? 'd' : e->d_type == DT_LNK ? 'l' :
                    e->d_type == DT_REG ? 'f' : '?';
        names[n] = malloc(strlen(e->d_name) + 3);
        sprintf(names[n++], "%c %s", kind, e->d_name);
    }
    closedir(d);
    qsort(names, n, sizeof names[0], by_name);
    printf("%s holds %d entries:\n", dir, n);
    for (int i = 0; i < n; i++) { printf("  %s\n", names[i]); free(names[i]); }
}

/* Entries and an order-free hash of their names, read twice (rewinddir): a directory
 * too large for one fd_readdir buffer is read on from the cookie where the last stopped. */
static void count_entries(const char *dir) {
    DIR *d = opendir(dir);
    for (int pass = 0; pass < 2; pass++) {
        unsigned long n = 0, hash = 0;
        struct dirent *e;
        while ((e = readdir(d))) {
            unsigned long h = 5381;
            for (const char *p = e->d_name; *p; p++) h = h * 33 + (unsigned char)*p;
            n++;
            hash += h;
        }
        printf("pass %d: %lu entries, hash %lx\n", pass, n, hash);
        rewinddir(d);
    }
    closedir(d);
}

static long file_size(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 ? (long)st.st_size : -errno;
}

int main(int argc, char **argv) {
    printf("argc=%d\n", argc);
    for (int i = 0; i < argc; i++) printf("argv[%d]=%s\n", i, argv[i]);
    const char *greeting = getenv("GREETING");
    printf("GREETING=%s HOME=%s\n", greeting ? greeting : "(unset)",
           getenv("HOME") ? getenv("HOME") : "(unset)");
    if (argc < 2) { fprintf(stderr, "usage: files DIR\n"); return 2; }
    const char *dir = argv[1];

    /* stdin to the end, then an upper-case copy in a new directory */
    static char input[1 << 16];
    size_t n = fread(input, 1, sizeof input, stdin);
    unsigned sum = 0, lines = 0;
    for (size_t i = 0; i < n; i++) { sum = sum * 31 + (unsigned char)input[i]; lines += input[i] == '\n'; }
    printf("stdin: %zu bytes, %u lines, hash %08x\n", n, lines, sum);
    struct pollfd ready[2] = {{0, POLLIN, 0}, {1, POLLOUT, 0}};
    int polled = poll(ready, 2, 1000);
    printf("poll %d: stdin readable %d, stdout writable %d\n", polled,
           (ready[0].revents & POLLIN) != 0, (ready[1].revents & POLLOUT) != 0);
    const char *out = at(0, dir, "out");
    printf("mkdir: %d\n", mkdir(out, 0755));
    printf("mkdir again: %s\n", mkdir(out, 0755) ? strerror(errno) : "ok");
    const char *upper = at(1, out, "upper.txt");
    FILE *f = fopen(upper, "w");
    for (size_t i = 0; i < n; i++) fputc(input[i] >= 'a' && input[i] <= 'z' ? input[i] - 32 : input[i], f);
    fclose(f);
    printf("size %ld\n", file_size(upper));
    f = fopen(upper, "a");
    fputs("TAIL\n", f);
    fclose(f);
    printf("size after append %ld\n", file_size(upper));

    /* seek and tell, pread, truncate */
    int fd = open(upper, O_RDWR);
    char five[6] = {0};
    printf("lseek end-5: %lld\n", (long long)lseek(fd, -5, SEEK_END));
    printf("read %zd: %.4s\n", read(fd, five, 5), five);
    printf("pread %zd: %.5s\n", pread(fd, five, 5, 0), five);
    printf("ftruncate: %d, size %ld\n", ftruncate(fd, 3), file_size(upper));
    close(fd);
    printf("read from closed fd: %s\n", read(fd, five, 1) < 0 ? strerror(errno) : "??");

    /* rename, symlinks, readlink, unlink, rmdir */
    const char *renamed = at(2, out, "renamed.txt");
    printf("rename: %d\n", rename(upper, renamed));
    printf("old name: %s\n", access(upper, F_OK) ? strerror(errno) : "still there");
    const char *link = at(3, out, "link");
    printf("symlink: %d\n", symlink("renamed.txt", link));
    char target[64] = {0};
    printf("readlink %zd: %s\n", readlink(link, target, sizeof target - 1), target);
    struct stat st;
    lstat(link, &st);
    printf("lstat is link: %d, stat size through it: %ld\n", S_ISLNK(st.st_mode) != 0, file_size(link));
    printf("open missing: %s\n", open(at(1, out, "missing"), O_RDONLY) < 0 ? strerror(errno) : "??");
    printf("O_EXCL on existing: %s\n", open(renamed, O_CREAT | O_EXCL | O_WRONLY, 0644) < 0 ? strerror(errno) : "??");
    printf("mkdir nested: %d\n", mkdir(at(1, out, "sub"), 0755));
    f = fopen(at(1, out, "sub/inner.txt"), "w");
    fprintf(f, "%s %.3f %e %g %x\n", "formatted", 3.14159, 1e-10, 2.5, 48879);
    fclose(f);
    list(dir);
    list(out);
    const char *many = at(1, out, "many");
    mkdir(many, 0755);
    for (int i = 0; i < 150; i++) {
        char name[600];
        snprintf(name, sizeof name, "%s/a-file-with-a-name-long-enough-to-fill-buffers-%03d", many, i);
        close(open(name, O_CREAT | O_WRONLY, 0644));
    }
    count_entries(many);
    printf("rmdir non-empty: %s\n", rmdir(at(1, out, "sub")) ? strerror(errno) : "??");
    printf("unlink dir: %s\n", unlink(at(1, out, "sub")) ? strerror(errno) : "??");
    printf("unlink: %d %d\n", unlink(link), unlink(at(1, out, "sub/inner.txt")));
    printf("rmdir: %d\n", rmdir(at(1, out, "sub")));
    list(out);
    f = fopen(renamed, "r");
    char line[64] = {0};
    printf("renamed holds: %s\n", fgets(line, sizeof line, f));
    fclose(f);

    /* clocks, sleep, randomness */
    struct timespec t0, t1, wall, res;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    struct timespec nap = {0, 20 * 1000 * 1000};
    nanosleep(&nap, NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    long slept = (t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec);
    printf("slept at least 20 ms: %d\n", slept >= 20 * 1000 * 1000);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    polled = poll(NULL, 0, 30);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    slept = (t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec);
    printf("poll timed out (%d) after at least 30 ms: %d\n", polled, slept >= 30 * 1000 * 1000);
    clock_gettime(CLOCK_REALTIME, &wall);
    printf("realtime after 2020: %d\n", wall.tv_sec > 1577836800);
    printf("monotonic resolution ok: %d\n", clock_getres(CLOCK_MONOTONIC, &res) == 0 && res.tv_sec == 0);
    unsigned char random[32] = {0};
    int nonzero = 0;
    printf("getentropy: %d\n", getentropy(random, sizeof random));
    for (int i = 0; i < 32; i++) nonzero |= random[i];
    printf("random bytes: %d\n", nonzero != 0);
    fflush(stdout);
    fputs("done on stderr\n", stderr);
    exit(7);
}
