/* A program that tries to leave the directory it was given (argv[1], preopened); each
 * attempt prints the error it got. Then, as argv[2] says, it hands the runtime a bad
 * pointer (iovec-array, buffer, result, path), exits with a status WASI does not allow
 * (exit200) or divides by zero (trap). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <wasi/api.h>

static char buf[512];

static const char *at(const char *dir, const char *name) {
    snprintf(buf, sizeof buf, "%s/%s", dir, name);
    return buf;
}

static void try_open(const char *what, const char *path) {
    int fd = open(path, O_RDONLY);
    printf("%-28s %s\n", what, fd < 0 ? strerror(errno) : "OPENED (escaped!)");
    if (fd >= 0) close(fd);
}

int main(int argc, char **argv) {
    const char *dir = argv[1];
    struct stat st;
    try_open("dotdot", at(dir, "../outside.txt"));
    try_open("deep dotdot", at(dir, "a/../../outside.txt"));
    try_open("absolute", "/etc/passwd");
    printf("symlink absolute: %s\n", symlink("/etc/passwd", at(dir, "abs")) ? strerror(errno) : "made");
    try_open("through absolute symlink", at(dir, "abs"));
    printf("symlink up: %s\n", symlink("../..", at(dir, "up")) ? strerror(errno) : "made");
    try_open("through relative symlink", at(dir, "up/etc/passwd"));
    printf("%-28s %s\n", "stat through symlink", stat(at(dir, "up"), &st) ? strerror(errno) : "escaped!");
    printf("%-28s %s\n", "lstat of symlink", lstat(at(dir, "up"), &st) ? strerror(errno) : "ok");
    printf("%-28s %s\n", "mkdir outside", mkdir(at(dir, "../escaped"), 0755) ? strerror(errno) : "escaped!");
    printf("%-28s %s\n", "unlink outside", unlink(at(dir, "../outside.txt")) ? strerror(errno) : "escaped!");
    int fd = open(at(dir, "inside.txt"), O_CREAT | O_WRONLY, 0644);
    close(fd);
    char renamed[512];
    snprintf(renamed, sizeof renamed, "%s/../moved.txt", dir);
    printf("%-28s %s\n", "rename outside", rename(at(dir, "inside.txt"), renamed) ? strerror(errno) : "escaped!");

    /* the raw interface, as a hostile module would call it */
    __wasi_fd_t opened;
    printf("path_open absolute: %d\n", __wasi_path_open(3, 0, "/etc/passwd", 0, __WASI_RIGHTS_FD_READ, 0, 0, &opened));
    printf("path_open dotdot: %d\n", __wasi_path_open(3, 0, "..", 0, __WASI_RIGHTS_FD_READ, 0, 0, &opened));
    __wasi_filestat_t fst;
    printf("filestat dotdot: %d\n", __wasi_path_filestat_get(3, 0, "..", &fst));
    fflush(stdout);
    /* a bad pointer ends the program (in wasmtime: an error, status 1) */
    const char *how = argc > 2 ? argv[2] : "";
    __wasi_size_t n;
    __wasi_ciovec_t far = {(const uint8_t *)0xffff0000, 100}, ok = {(const uint8_t *)"x\n", 2};
    if (strcmp(how, "iovec-array") == 0)
        n = __wasi_fd_write(1, (const __wasi_ciovec_t *)0xfffffff0, 1, &n);
    if (strcmp(how, "buffer") == 0)
        n = __wasi_fd_write(1, &far, 1, &n);
    if (strcmp(how, "result") == 0)
        n = __wasi_fd_write(1, &ok, 1, (__wasi_size_t *)0xfffffffe);
    if (strcmp(how, "path") == 0)
        n = __wasi_path_create_directory(3, (const char *)0xfffffff0);
    if (strcmp(how, "exit200") == 0)
        exit(200); /* WASI allows 0-125 */
    if (strcmp(how, "trap") == 0) {
        volatile int seven = 7, zero = 0;
        n = seven / zero;
    }
    printf("still running: %d\n", (int)n);
    return 0;
}
