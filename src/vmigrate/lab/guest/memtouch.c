/*
 * memtouch -- the lab guest's memory workload.
 *
 * Usage: memtouch [wss=SIZE] [rate=PAGES_PER_SECOND]
 *
 *   wss   working set size, bytes with an optional K/M/G suffix (default 64M)
 *   rate  pages written per second; 0 writes flat out (default 0)
 *
 * The working set is an anonymous mapping, locked in memory when possible.
 * Every page holds words derived from (page index, generation): word 0 is a
 * magic, word 1 the page index, word 2 the generation, and every further word
 * k is seed(index, generation) ^ (k * GOLDEN).  Pass 0 fills every page with
 * generation 1.  Pass N (N >= 1) then visits the pages in order and, for each
 * page, first VERIFIES that it holds exactly generation N, then rewrites it
 * with generation N + 1 -- verify and rewrite are one sweep over the page.
 *
 * Console output (stdout, one write(2) per line):
 *   MEMTOUCH start wss=<bytes> pages=<n> rate=<r> mlock=<yes|no>
 *   MEMCHECK pass=<N> ok                      at most about once per second
 *   MEMCHECK FAIL pass=<N> page=<i> word=<k> expected=0x.. got=0x..
 *                                             first few bad pages of a pass
 *   MEMCHECK FAIL pass=<N> bad_pages=<count>  end of every pass with a mismatch
 * A failing pass is always reported; the program keeps running.
 *
 * Pacing: pages are written in small batches against an absolute schedule
 * read from CLOCK_MONOTONIC, so the long-run rate is exact.  When the program
 * falls more than 100 ms behind (the VM was paused, e.g. at a migration
 * switchover), the schedule restarts from now instead of catching up in a
 * burst, so the dirty rate never exceeds the requested rate.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#define MAGIC UINT64_C(0x564d47544f554348) /* "VMGTOUCH" */
#define MAX_FAIL_LINES 5

static uint64_t page_seed(uint64_t index, uint64_t gen)
{
    return splitmix64(index * UINT64_C(0x100000001b3) ^ splitmix64(gen));
}

static void sleep_until(int64_t t)
{
    struct timespec ts = {.tv_sec = t / 1000000000LL, .tv_nsec = t % 1000000000LL};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

/* Write generation `gen` into page `index` (no verification). */
static void fill_page(uint64_t *p, size_t words, uint64_t index, uint64_t gen)
{
    uint64_t seed = page_seed(index, gen);
    p[0] = MAGIC;
    p[1] = index;
    p[2] = gen;
    for (size_t k = 3; k < words; k++)
        p[k] = seed ^ (k * GOLDEN);
}

/*
 * Check that page `index` holds generation `gen` and rewrite it with gen + 1.
 * Returns the first bad word index, or -1 when the page was intact.
 */
static long check_and_advance(uint64_t *p, size_t words, uint64_t index, uint64_t gen,
                              uint64_t *expected, uint64_t *got)
{
    long bad = -1;
    uint64_t old_seed = page_seed(index, gen);
    uint64_t new_seed = page_seed(index, gen + 1);
    uint64_t head_old[3] = {MAGIC, index, gen};
    uint64_t head_new[3] = {MAGIC, index, gen + 1};
    for (size_t k = 0; k < 3 && k < words; k++) {
        if (p[k] != head_old[k] && bad < 0) {
            bad = (long)k;
            *expected = head_old[k];
            *got = p[k];
        }
        p[k] = head_new[k];
    }
    for (size_t k = 3; k < words; k++) {
        uint64_t pattern = k * GOLDEN;
        uint64_t want = old_seed ^ pattern;
        if (p[k] != want && bad < 0) {
            bad = (long)k;
            *expected = want;
            *got = p[k];
        }
        p[k] = new_seed ^ pattern;
    }
    return bad;
}

static void usage(void)
{
    say("usage: memtouch [wss=SIZE] [rate=PAGES_PER_SECOND]");
}

int main(int argc, char **argv)
{
    uint64_t wss = UINT64_C(64) << 20;
    uint64_t rate = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "wss=", 4) == 0) {
            if (parse_num(a + 4, 1, &wss) != 0 || wss == 0) {
                say("MEMTOUCH error: bad wss '%s'", a + 4);
                return 2;
            }
        } else if (strncmp(a, "rate=", 5) == 0) {
            if (parse_num(a + 5, 0, &rate) != 0) {
                say("MEMTOUCH error: bad rate '%s'", a + 5);
                return 2;
            }
        } else {
            say("MEMTOUCH error: unknown option '%s'", a);
            usage();
            return 2;
        }
    }

    long pagesize = sysconf(_SC_PAGESIZE);
    if (pagesize <= 0)
        pagesize = 4096;
    size_t words = (size_t)pagesize / sizeof(uint64_t);
    uint64_t npages = (wss + (uint64_t)pagesize - 1) / (uint64_t)pagesize;
    size_t len = (size_t)(npages * (uint64_t)pagesize);

    unsigned char *mem = mmap(NULL, len, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED) {
        say("MEMTOUCH error: cannot map %zu bytes: %s", len, strerror(errno));
        return 1;
    }
    int locked = mlock(mem, len) == 0;
    say("MEMTOUCH start wss=%zu pages=%" PRIu64 " rate=%" PRIu64 " mlock=%s",
        len, npages, rate, locked ? "yes" : "no");

    /* Pass 0: fill with generation 1, flat out. */
    for (uint64_t i = 0; i < npages; i++)
        fill_page((uint64_t *)(mem + i * (uint64_t)pagesize), words, i, 1);

    /* Batches of about 5 ms of work between clock reads. */
    uint64_t batch = rate ? (rate / 200 ? rate / 200 : 1) : 64;
    int64_t sched_start = now_ns();
    uint64_t sched_done = 0; /* pages written since sched_start */
    int64_t last_print = 0;
    uint64_t in_batch = 0;

    for (uint64_t pass = 1;; pass++) {
        uint64_t bad_pages = 0;
        for (uint64_t i = 0; i < npages; i++) {
            uint64_t expected = 0, got = 0;
            long bad = check_and_advance((uint64_t *)(mem + i * (uint64_t)pagesize), words, i,
                                         pass, &expected, &got);
            if (bad >= 0) {
                if (bad_pages < MAX_FAIL_LINES)
                    say("MEMCHECK FAIL pass=%" PRIu64 " page=%" PRIu64
                        " word=%ld expected=0x%016" PRIx64 " got=0x%016" PRIx64,
                        pass, i, bad, expected, got);
                bad_pages++;
            }
            if (rate && ++in_batch >= batch) {
                in_batch = 0;
                sched_done += batch;
                int64_t due = sched_start + (int64_t)(sched_done / rate) * 1000000000LL +
                              (int64_t)((sched_done % rate) * 1000000000ULL / rate);
                int64_t now = now_ns();
                /* Far behind (the guest was starved), or far ahead: the clock stepped
                 * back, as it can across a migration. Either way restart the schedule
                 * rather than sprint or sleep for the difference. */
                if (now - due > BEHIND_RESET_NS || due - now > AHEAD_RESET_NS) {
                    sched_start = now;
                    sched_done = 0;
                } else if (due > now) {
                    sleep_until(due);
                }
            }
        }
        int64_t now = now_ns();
        if (bad_pages) {
            say("MEMCHECK FAIL pass=%" PRIu64 " bad_pages=%" PRIu64, pass, bad_pages);
            last_print = now;
        } else if (now - last_print >= 1000000000LL || now < last_print) {
            say("MEMCHECK pass=%" PRIu64 " ok", pass);
            last_print = now;
        }
    }
}
