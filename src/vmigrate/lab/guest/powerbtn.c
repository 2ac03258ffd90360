/*
 * powerbtn -- wait for a press of the power button, then exit 0.
 *
 * Usage: powerbtn [ready=PATH]
 *
 *   ready  a file to create once the power-button devices are open: from then
 *          on no press is missed (the guest's /init waits for it)
 *
 * The ACPI power button reaches user space as an input device: the kernel's
 * ACPI button driver (button.ko) registers it and evdev.ko gives it a
 * /dev/input/eventN node.  powerbtn opens every /dev/input/event* whose key
 * bits include KEY_POWER (the PS/2 keyboard advertises it too: its Power key
 * counts as a press), waits up to WAIT_S seconds for at least one to appear,
 * then blocks in poll(2) until one reports KEY_POWER going down.  QEMU's
 * system_powerdown (QMP) presses the ACPI one.
 *
 * Exit status: 0 the button was pressed; 1 no power-button device, or a read
 * failed; 2 bad arguments.  What to do on a press is the caller's business
 * (/init powers the guest off).
 *
 * Console output (stdout, one write(2) per line), only on failure:
 *   POWERBTN error: ...
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define MAX_DEVICES 32
#define WAIT_S 3
#define BITS_PER_LONG (8 * sizeof(unsigned long))
#define NLONGS(n) (((n) + BITS_PER_LONG - 1) / BITS_PER_LONG)

static void say(const char *fmt, ...)
{
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof(line) - 2)
        n = (int)sizeof(line) - 2;
    line[n++] = '\n';
    for (ssize_t off = 0; off < n;) {
        ssize_t w = write(STDOUT_FILENO, line + off, (size_t)(n - off));
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        off += w;
    }
}

/* Whether the input device open on fd can report KEY_POWER. */
static int has_power_key(int fd)
{
    unsigned long keys[NLONGS(KEY_CNT)];
    memset(keys, 0, sizeof(keys));
    if (ioctl(fd, EVIOCGBIT(EV_KEY, sizeof(keys)), keys) < 0)
        return 0;
    return (keys[KEY_POWER / BITS_PER_LONG] >> (KEY_POWER % BITS_PER_LONG)) & 1;
}

/* Open every /dev/input/event* with a power key; return how many (fds in fds). */
static int open_buttons(struct pollfd *fds)
{
    int n = 0;
    DIR *dir = opendir("/dev/input");
    if (dir == NULL)
        return 0;
    struct dirent *de;
    while ((de = readdir(dir)) != NULL && n < MAX_DEVICES) {
        if (strncmp(de->d_name, "event", 5) != 0)
            continue;
        char path[300];
        snprintf(path, sizeof(path), "/dev/input/%s", de->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
        if (fd < 0)
            continue;
        if (!has_power_key(fd)) {
            close(fd);
            continue;
        }
        fds[n].fd = fd;
        fds[n].events = POLLIN;
        n++;
    }
    closedir(dir);
    return n;
}

int main(int argc, char **argv)
{
    const char *ready = NULL;
    for (int i = 1; i < argc; i++) {
        if (strncmp(argv[i], "ready=", 6) == 0 && argv[i][6] != '\0') {
            ready = argv[i] + 6;
        } else {
            say("POWERBTN error: unknown option '%s'", argv[i]);
            say("usage: powerbtn [ready=PATH]");
            return 2;
        }
    }

    struct pollfd fds[MAX_DEVICES];
    int n = 0;
    for (int tries = 0; tries <= WAIT_S * 10; tries++) {
        n = open_buttons(fds);
        if (n > 0)
            break;
        usleep(100000);
    }
    if (n == 0) {
        say("POWERBTN error: no input device with a power key in /dev/input "
            "(are button.ko and evdev.ko loaded?)");
        return 1;
    }
    if (ready != NULL) {
        int fd = open(ready, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        if (fd >= 0)
            close(fd);
    }

    int open_count = n;
    for (;;) {
        int r = poll(fds, (nfds_t)n, -1);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            say("POWERBTN error: poll: %s", strerror(errno));
            return 1;
        }
        for (int i = 0; i < n; i++) {
            if (fds[i].revents & (POLLERR | POLLHUP | POLLNVAL)) {
                /* The device went away: poll skips a negative fd. */
                close(fds[i].fd);
                fds[i].fd = -1;
                if (--open_count == 0) {
                    say("POWERBTN error: every power-button device went away");
                    return 1;
                }
                continue;
            }
            if (!(fds[i].revents & POLLIN))
                continue;
            struct input_event ev[16];
            ssize_t got = read(fds[i].fd, ev, sizeof(ev));
            if (got < 0) {
                if (errno == EINTR || errno == EAGAIN)
                    continue;
                say("POWERBTN error: read: %s", strerror(errno));
                return 1;
            }
            for (size_t k = 0; k < (size_t)got / sizeof(ev[0]); k++) {
                if (ev[k].type == EV_KEY && ev[k].code == KEY_POWER && ev[k].value == 1)
                    return 0;
            }
        }
    }
}
