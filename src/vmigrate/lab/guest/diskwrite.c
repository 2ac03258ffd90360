/*
 * diskwrite -- the lab guest's disk workload.
 *
 * Usage: diskwrite [dev=/dev/vdb] [rate=RECORDS_PER_SECOND] [size=BYTES_PER_RECORD]
 *
 *   dev   block device (or file) to write; its old content is overwritten
 *   rate  records per second; 0 writes flat out (default 50)
 *   size  bytes per record, a multiple of 512 from 512 to 1M, K/M suffix
 *         allowed (default 4096)
 *
 * RECORD LAYOUT (all integers little-endian; S = record size)
 *
 *   Record seq (seq = 1, 2, 3 ...) is written at byte offset (seq - 1) * S.
 *
 *   offset  size   field
 *   0       8      magic, the ASCII bytes "VMGDWR01"
 *   8       4      u32 record size S
 *   12      4      u32 reserved, 0
 *   16      8      u64 seq
 *   24      8      u64 run id: random, the same for every record of one run
 *   32      S-36   payload: the little-endian u64 words w[k] = s ^ (k * GOLDEN),
 *                  k = 0, 1, 2 ..., where s = splitmix64(seq) and
 *                  GOLDEN = 0x9e3779b97f4a7c15 (the last word is cut short
 *                  when S - 36 is not a multiple of 8)
 *   S-4     4      u32 CRC-32 (IEEE 802.3, as zlib.crc32) of bytes [0, S-4)
 *
 *   splitmix64(x): x += GOLDEN; x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9;
 *                  x = (x ^ (x >> 27)) * 0x94d049bb133111eb; return x ^ (x >> 31)
 *                  (all arithmetic modulo 2^64)
 *
 * A record is ACKNOWLEDGED once pwrite(2) of the whole record and the
 * following fdatasync(2) have both succeeded.  Records are written strictly in
 * order, one at a time, so after a crash or a migration every record 1..ack
 * must be on the disk and valid; record ack+1 may or may not be.  The host-side
 * check is vmigrate.lab.records.verify_diskwrite_records().
 *
 * Console output (stdout, one write(2) per line).  Every line names the device,
 * so that the lines of several writers (one per device) can be told apart; the
 * field after the tag comes first, as it did before dev= was added:
 *   DISKWRITE start dev=<dev> size=<S> rate=<r> run=<run id, 16 hex digits>
 *             capacity=<records>
 *   DISKWRITE ack=<seq> dev=<dev>       at most about once per second, and on exit
 *   DISKWRITE full ack=<seq> dev=<dev>  the device is full: the program stops (exit 0)
 *   DISKWRITE error dev=<dev>: ...      bad arguments (exit 2), or a write or
 *                                       sync failed (exit 1)
 * SIGTERM/SIGINT make it print the last ack and exit.
 * vmigrate.lab.records.last_acks() reads the ack lines back.
 *
 * Pacing: the same absolute CLOCK_MONOTONIC schedule as memtouch; more than
 * 100 ms behind restarts the schedule instead of catching up in a burst.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#define HEADER_SIZE 32
#define MIN_SIZE 512
#define MAX_SIZE (1024 * 1024)
#define OPEN_WAIT_S 15

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static uint32_t crc_table[256];

static void crc32_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32(const unsigned char *p, size_t n)
{
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++)
        c = crc_table[(c ^ p[i]) & 0xff] ^ (c >> 8);
    return c ^ 0xffffffffu;
}

static void put_le(unsigned char *p, uint64_t v, int bytes)
{
    for (int i = 0; i < bytes; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void build_record(unsigned char *r, uint32_t size, uint64_t seq, uint64_t run_id)
{
    memcpy(r, "VMGDWR01", 8);
    put_le(r + 8, size, 4);
    put_le(r + 12, 0, 4);
    put_le(r + 16, seq, 8);
    put_le(r + 24, run_id, 8);
    uint64_t s = splitmix64(seq);
    size_t payload = size - HEADER_SIZE - 4;
    unsigned char word[8];
    for (size_t off = 0, k = 0; off < payload; off += 8, k++) {
        put_le(word, s ^ (k * GOLDEN), 8);
        size_t n = payload - off < 8 ? payload - off : 8;
        memcpy(r + HEADER_SIZE + off, word, n);
    }
    put_le(r + size - 4, crc32(r, size - 4), 4);
}

static void sleep_until(int64_t t)
{
    struct timespec ts = {.tv_sec = t / 1000000000LL, .tv_nsec = t % 1000000000LL};
    while (!stop_requested &&
           clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

static uint64_t make_run_id(void)
{
    uint64_t id = 0;
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        if (read(fd, &id, sizeof(id)) != (ssize_t)sizeof(id))
            id = 0;
        close(fd);
    }
    if (id == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        id = splitmix64((uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec) | 1;
    }
    return id;
}

int main(int argc, char **argv)
{
    const char *dev = "/dev/vdb";
    uint64_t rate = 50;
    uint64_t size = 4096;
    /* The device first, so that even an argument error names it. */
    for (int i = 1; i < argc; i++) {
        if (strncmp(argv[i], "dev=", 4) == 0 && argv[i][4] != '\0')
            dev = argv[i] + 4;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "dev=", 4) == 0 && a[4] != '\0') {
            /* taken above */
        } else if (strncmp(a, "rate=", 5) == 0) {
            if (parse_num(a + 5, 0, &rate) != 0) {
                say("DISKWRITE error dev=%s: bad rate '%s'", dev, a + 5);
                return 2;
            }
        } else if (strncmp(a, "size=", 5) == 0) {
            if (parse_num(a + 5, 1, &size) != 0 || size < MIN_SIZE || size > MAX_SIZE ||
                size % 512 != 0) {
                say("DISKWRITE error dev=%s: bad size '%s' (a multiple of 512 from 512 "
                    "to 1M)", dev, a + 5);
                return 2;
            }
        } else {
            say("DISKWRITE error dev=%s: unknown option '%s'", dev, a);
            say("usage: diskwrite [dev=/dev/vdb] [rate=RECORDS_PER_SECOND] [size=BYTES]");
            return 2;
        }
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    crc32_init();

    /* The device may still be probing when the workload starts: wait for it. */
    int fd = -1;
    for (int tries = 0; tries < OPEN_WAIT_S * 10; tries++) {
        fd = open(dev, O_RDWR | O_CLOEXEC);
        if (fd >= 0 || (errno != ENOENT && errno != ENXIO && errno != ENODEV))
            break;
        usleep(100000);
    }
    if (fd < 0) {
        say("DISKWRITE error dev=%s: cannot open: %s", dev, strerror(errno));
        return 1;
    }
    off_t end = lseek(fd, 0, SEEK_END);
    if (end < 0) {
        say("DISKWRITE error dev=%s: cannot size: %s", dev, strerror(errno));
        return 1;
    }
    uint64_t capacity = (uint64_t)end / size;

    unsigned char *rec = NULL;
    if (posix_memalign((void **)&rec, 4096, (size_t)size) != 0) {
        say("DISKWRITE error dev=%s: out of memory", dev);
        return 1;
    }
    uint64_t run_id = make_run_id();
    say("DISKWRITE start dev=%s size=%" PRIu64 " rate=%" PRIu64 " run=%016" PRIx64
        " capacity=%" PRIu64, dev, size, rate, run_id, capacity);

    uint64_t ack = 0;
    int64_t sched_start = now_ns();
    uint64_t sched_done = 0;
    int64_t last_print = sched_start;
    int status = 0;

    for (uint64_t seq = 1; !stop_requested; seq++) {
        if (seq > capacity) {
            say("DISKWRITE full ack=%" PRIu64 " dev=%s", ack, dev);
            break;
        }
        build_record(rec, (uint32_t)size, seq, run_id);
        off_t off = (off_t)((seq - 1) * size);
        size_t done = 0;
        while (done < size) {
            ssize_t w = pwrite(fd, rec + done, (size_t)(size - done), off + (off_t)done);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0) {
                say("DISKWRITE error dev=%s: write seq=%" PRIu64 ": %s", dev, seq,
                    w < 0 ? strerror(errno) : "short write");
                status = 1;
                goto out;
            }
            done += (size_t)w;
        }
        while (fdatasync(fd) != 0) {
            if (errno == EINTR)
                continue;
            say("DISKWRITE error dev=%s: fdatasync seq=%" PRIu64 ": %s", dev, seq,
                strerror(errno));
            status = 1;
            goto out;
        }
        ack = seq;

        int64_t now = now_ns();
        if (now - last_print >= 1000000000LL || now < last_print) {
            say("DISKWRITE ack=%" PRIu64 " dev=%s", ack, dev);
            last_print = now;
        }
        if (rate) {
            sched_done++;
            int64_t due = sched_start + (int64_t)(sched_done / rate) * 1000000000LL +
                          (int64_t)((sched_done % rate) * 1000000000ULL / rate);
            if (now - due > BEHIND_RESET_NS || due - now > AHEAD_RESET_NS) {
                sched_start = now;
                sched_done = 0;
            } else if (due > now) {
                sleep_until(due);
            }
        }
    }
out:
    say("DISKWRITE ack=%" PRIu64 " dev=%s", ack, dev);
    close(fd);
    return status;
}
