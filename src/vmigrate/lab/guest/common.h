/* Helpers shared by the lab guest's workload programs (included, not linked). */
#ifndef VMIGRATE_GUEST_COMMON_H
#define VMIGRATE_GUEST_COMMON_H

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define GOLDEN UINT64_C(0x9e3779b97f4a7c15)

/* Pacing: a schedule more than BEHIND_RESET_NS late (the guest was starved) or more
 * than AHEAD_RESET_NS early (the monotonic clock stepped back, as it can across a
 * migration under TCG) is restarted instead of sprinting or sleeping the difference. */
#define BEHIND_RESET_NS 100000000LL
#define AHEAD_RESET_NS 1000000000LL

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
    ssize_t off = 0;
    while (off < n) {
        ssize_t w = write(STDOUT_FILENO, line + off, (size_t)(n - off));
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        off += w;
    }
}

/* Parse a decimal integer, with a K/M/G (binary) suffix when allow_suffix. */
static int parse_num(const char *s, int allow_suffix, uint64_t *out)
{
    char *end;
    if (*s < '0' || *s > '9')
        return -1;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s)
        return -1;
    uint64_t mult = 1;
    if (!allow_suffix && *end != '\0')
        return -1;
    switch (*end) {
    case '\0': break;
    case 'k': case 'K': mult = UINT64_C(1) << 10; end++; break;
    case 'm': case 'M': mult = UINT64_C(1) << 20; end++; break;
    case 'g': case 'G': mult = UINT64_C(1) << 30; end++; break;
    default: return -1;
    }
    if (*end != '\0')
        return -1;
    *out = (uint64_t)v * mult;
    return 0;
}

static uint64_t splitmix64(uint64_t x)
{
    x += GOLDEN;
    x = (x ^ (x >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)) * UINT64_C(0x94d049bb133111eb);
    return x ^ (x >> 31);
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#endif
