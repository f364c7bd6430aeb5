/* inotify: watch a directory, make, write, rename and remove a file in it, and read
   the events back (names and masks), then remove the watch. */
#include <stdio.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>
#include <fcntl.h>

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : "/tmp";
    int fd = inotify_init1(IN_CLOEXEC);
    int wd = inotify_add_watch(fd, dir, IN_CREATE | IN_CLOSE_WRITE | IN_MOVED_FROM |
                                            IN_MOVED_TO | IN_DELETE);
    printf("watch %d\n", wd > 0);
    char a[512], b[512];
    snprintf(a, sizeof a, "%s/first", dir);
    snprintf(b, sizeof b, "%s/second", dir);
    int f = open(a, O_CREAT | O_WRONLY, 0644);
    write(f, "x", 1);
    close(f);
    rename(a, b);
    unlink(b);
    char buf[4096] __attribute__((aligned(8)));
    int seen = 0;
    while (seen < 5) {
        ssize_t n = read(fd, buf, sizeof buf);
        for (char *p = buf; p < buf + n;) {
            struct inotify_event *e = (struct inotify_event *)p;
            printf("event %#x %s cookie-set %d\n", e->mask, e->len ? e->name : "",
                   e->cookie != 0);
            p += sizeof *e + e->len;
            seen++;
        }
    }
    printf("rm_watch %d\n", inotify_rm_watch(fd, wd));
    return 0;
}
