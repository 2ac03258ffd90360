/*
 * tlbtick [MICROSECONDS] -- wake up in user space every MICROSECONDS (default 500),
 * forever.
 *
 * Why: under TCG, QEMU 7.2 misses guest writes made through TLB entries that were
 * cached before a dirty-bitmap sync (see docs/BENCHMARKS.md). The lab guest boots
 * with pti=on, so every return to user space reloads CR3, which flushes TCG's TLB.
 * A busy guest returns to user space all the time; an idle one sits in the kernel's
 * idle loop and can keep stale entries until the migration ends, and then arrives
 * with corrupted kernel data. This program bounds that window to one period.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv)
{
    long us = argc > 1 ? atol(argv[1]) : 500;
    if (us < 50)
        us = 50;
    if (us > 1000000)
        us = 1000000;
    const struct timespec tick = {.tv_sec = us / 1000000, .tv_nsec = (us % 1000000) * 1000};
    for (;;)
        nanosleep(&tick, NULL);
}
