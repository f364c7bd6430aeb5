/* The errors of calls that fail, as C programs meet them: wrong kinds of file, links,
 * descriptors opened for the other direction. In the directory named by argv[1]; prints
 * each call's strerror, which must be wasmtime's. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *e(int r) { return r < 0 ? strerror(errno) : "ok"; }
int main(int argc, char **argv) {
    if (argc < 2 || chdir(argv[1])) return 2;
    close(open("file", O_CREAT | O_WRONLY, 0644));
    mkdir("dir", 0755);
    symlink("file", "lnk");
    symlink("nowhere", "dangling");
    printf("open dir for writing: %s\n", e(open("dir", O_WRONLY)));
    printf("O_DIRECTORY on file: %s\n", e(open("file", O_RDONLY | O_DIRECTORY)));
    printf("rmdir on file: %s\n", e(rmdir("file")));
    printf("rename dir onto file: %s\n", e(rename("dir", "file")));
    printf("rename file onto dir: %s\n", e(rename("file", "dir")));
    char buf[64];
    printf("readlink on file: %s\n", e((int)readlink("file", buf, sizeof buf)));
    printf("file with trailing slash: %s\n", e(open("file/", O_RDONLY)));
    printf("stat file/: %s\n", e(stat("file/", &(struct stat){0})));
    printf("mkdir existing: %s\n", e(mkdir("file", 0755)));
    printf("open dangling: %s\n", e(open("dangling", O_RDONLY)));
    printf("create through dangling: %s\n", e(open("dangling", O_CREAT | O_WRONLY, 0644)));
    printf("O_NOFOLLOW on link: %s\n", e(open("lnk", O_RDONLY | O_NOFOLLOW)));
    printf("unlink missing: %s\n", e(unlink("missing")));
    printf("link: %s\n", e(link("file", "hard")));
    printf("link onto existing: %s\n", e(link("file", "hard")));
    printf("linkat follow: %s\n", e(linkat(AT_FDCWD, "lnk", AT_FDCWD, "hard2", AT_SYMLINK_FOLLOW)));
    printf("unlink dir: %s\n", e(unlink("dir")));
    printf("rmdir dot: %s\n", e(rmdir(".")));
    printf("opendir file: %s\n", opendir("file") ? "ok" : strerror(errno));
    printf("getcwd: %s\n", getcwd(buf, sizeof buf));
    int fd = open("file", O_RDONLY);
    printf("write to read-only fd: %s\n", e((int)write(fd, "x", 1)));
    printf("ftruncate read-only fd: %s\n", e(ftruncate(fd, 0)));
    printf("lseek negative: %s\n", e((int)lseek(fd, -10, SEEK_SET)));
    fd = open("dir", O_RDONLY);
    printf("read dir fd: %s\n", e((int)read(fd, buf, 1)));
    printf("isatty file: %d %s\n", isatty(fd), strerror(errno));
    printf("chdir missing: %s\n", e(chdir("missing")));
    printf("access W_OK: %s\n", e(access("file", W_OK)));
    return 0;
}
