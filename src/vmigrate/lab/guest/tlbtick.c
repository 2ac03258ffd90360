/*
 * tlbtick -- wake up in user space every 2 ms, forever.
 *
 * Why: under TCG, QEMU 7.2 misses guest writes made through TLB entries that were
 * cached before a dirty-bitmap sync (see docs/BENCHMARKS.md). The lab guest boots
 * with pti=on, so every return to user space reloads CR3, which flushes TCG's TLB.
 * A busy guest returns to user space all the time; an idle one sits in the kernel's
 * idle loop and can keep stale entries until the migration ends, and then arrives
 * with corrupted kernel data. This program bounds that window to about 2 ms.
 */
#define _GNU_SOURCE
#include <time.h>

int main(void)
{
    const struct timespec tick = {.tv_sec = 0, .tv_nsec = 2000000};
    for (;;)
        nanosleep(&tick, NULL);
}
