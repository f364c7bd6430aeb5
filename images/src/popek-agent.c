/* popek-agent: runs commands for the VMM over the virtio console port "org.popek.agent.0"
 * (/dev/vportNp0, found by its name in /sys/class/virtio-ports), as QEMU's guest agent
 * does over its virtio-serial port.
 *
 * The port is a byte stream of frames: a type byte, a 32-bit little-endian length, then
 * that many bytes. One command at a time:
 *   host -> guest  'E' argv, each argument NUL-terminated: run it (PATH is searched)
 *                  'I' bytes for its stdin            'C' (empty) close its stdin
 *   guest -> host  'O' bytes of its stdout            'R' bytes of its stderr
 *                  'X' its status, 32-bit LE: the exit code, or 128 + the signal
 * Every byte passes unchanged (the port is a character device, not a terminal). A
 * program that cannot be run exits 127 with a message on its stderr, as in a shell.
 * Started by /init in the background; it never exits on its own. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define PORTS "/sys/class/virtio-ports"
#define PORT_NAME "org.popek.agent.0"
#define MAX_FRAME (1u << 20)
#define MAX_ARGS 256

static int port = -1;
static unsigned char buf[MAX_FRAME];

static int full_read(int fd, void *p, size_t n) {
    for (size_t done = 0; done < n;) {
        ssize_t r = read(fd, (char *)p + done, n - done);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        done += (size_t)r;
    }
    return 0;
}

static void full_write(int fd, const void *p, size_t n) {
    for (size_t done = 0; done < n;) {
        ssize_t r = write(fd, (const char *)p + done, n - done);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return;  /* the host went away: the frame is lost, as on a network */
        done += (size_t)r;
    }
}

static void send_frame(char type, const void *data, uint32_t n) {
    unsigned char head[5] = {(unsigned char)type, n & 0xff, (n >> 8) & 0xff,
                             (n >> 16) & 0xff, n >> 24};
    full_write(port, head, 5);
    full_write(port, data, n);
}

/* The next frame from the host into buf; its type, or 0 if the port read failed. */
static int read_frame(uint32_t *n) {
    unsigned char head[5];
    if (full_read(port, head, 5) < 0) return 0;
    *n = head[1] | head[2] << 8 | head[3] << 16 | (uint32_t)head[4] << 24;
    if (*n > MAX_FRAME || full_read(port, buf, *n) < 0) return 0;
    return head[0];
}

static void run(uint32_t n) {
    char *argv[MAX_ARGS + 1];
    int argc = 0;
    for (uint32_t i = 0; i < n && argc < MAX_ARGS; argc++) {
        argv[argc] = (char *)buf + i;
        i += strnlen((char *)buf + i, n - i) + 1;
    }
    argv[argc] = NULL;
    if (argc == 0 || buf[n - 1] != 0) {
        int32_t status = 127;
        const char *msg = "popek-agent: malformed command\n";
        send_frame('R', msg, strlen(msg));
        send_frame('X', &status, 4);
        return;
    }
    int in[2], out[2], err[2];
    if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC)) return;
    pid_t pid = fork();
    if (pid == 0) {
        dup2(in[0], 0);
        dup2(out[1], 1);
        dup2(err[1], 2);
        signal(SIGPIPE, SIG_DFL);
        execvp(argv[0], argv);
        dprintf(2, "popek-agent: %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(in[0]);
    close(out[1]);
    close(err[1]);
    fcntl(in[1], F_SETFL, O_NONBLOCK);
    int to_child = in[1], open_outputs = 2;
    unsigned char *pending = NULL;
    size_t pending_len = 0;
    static unsigned char pending_buf[MAX_FRAME];
    int fds[2] = {out[0], err[0]};
    /* Until the command has closed its outputs: copy them out, and feed its stdin a
     * frame at a time (the next is read only when the last is written: back-pressure). */
    while (open_outputs > 0) {
        struct pollfd p[3];
        int np = 0, port_at = -1, child_at = -1;
        for (int k = 0; k < 2; k++)
            if (fds[k] >= 0) p[np++] = (struct pollfd){fds[k], POLLIN, 0};
        if (to_child >= 0 && pending_len) {
            child_at = np;
            p[np++] = (struct pollfd){to_child, POLLOUT, 0};
        } else if (to_child >= 0) {
            port_at = np;
            p[np++] = (struct pollfd){port, POLLIN, 0};
        }
        if (poll(p, np, -1) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        for (int k = 0; k < np; k++) {
            if (!p[k].revents) continue;
            if (k == child_at) {
                ssize_t w = write(to_child, pending, pending_len);
                if (w > 0) { pending += w; pending_len -= (size_t)w; }
                if (w < 0 && errno != EAGAIN && errno != EINTR) pending_len = 0;  /* EPIPE */
            } else if (k == port_at) {
                uint32_t len;
                int type = read_frame(&len);
                if (type == 'I') {
                    memcpy(pending_buf, buf, len);
                    pending = pending_buf;
                    pending_len = len;
                } else if (type == 'C' || type == 0) {
                    close(to_child);
                    to_child = -1;
                }
            } else {
                int fd = p[k].fd;
                ssize_t r = read(fd, buf, 65536);
                if (r > 0) {
                    send_frame(fd == out[0] ? 'O' : 'R', buf, (uint32_t)r);
                } else if (r == 0 || errno != EINTR) {
                    close(fd);
                    fds[fd == out[0] ? 0 : 1] = -1;
                    open_outputs--;
                }
            }
        }
    }
    if (to_child >= 0) close(to_child);
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    int32_t code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    send_frame('X', &code, 4);
}

/* Open the port named PORT_NAME; -1 if there is none (yet). */
static int open_port(void) {
    DIR *dir = opendir(PORTS);
    if (!dir) return -1;
    int fd = -1;
    struct dirent *e;
    while (fd < 0 && (e = readdir(dir))) {
        char path[512], name[64] = "";
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, PORTS "/%s/name", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        if (fgets(name, sizeof name, f) && (name[strcspn(name, "\n")] = 0, 1)
                && strcmp(name, PORT_NAME) == 0) {
            snprintf(path, sizeof path, "/dev/%s", e->d_name);
            fd = open(path, O_RDWR | O_CLOEXEC);
        }
        fclose(f);
    }
    closedir(dir);
    return fd;
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    signal(SIGCHLD, SIG_DFL);
    for (;;) {
        if (port < 0) {
            port = open_port();
            if (port < 0) { sleep(1); continue; }
        }
        uint32_t n;
        int type = read_frame(&n);
        if (type == 'E') {
            run(n);
        } else if (type == 0) {  /* no host end, or the port went away: start again */
            close(port);
            port = -1;
            sleep(1);
        }
        /* 'I' and 'C' outside a command: leftovers of one the host gave up; dropped */
    }
}
