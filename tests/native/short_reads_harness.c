/* tq_read.c against a preadv that returns short reads and EINTR at random (a regular file
 * gives short reads only at its end; signals and network file systems give them anywhere).
 * Random layouts: up to 1,500 runs (more than one preadv batch), a quarter of them empty,
 * uneven chunks, a stand-in hash. Prints "fails=N calls=C eintrs=E"; exits 1 on any failure.
 * Built and run by tests/native/test_read_verify.py. */
#define _GNU_SOURCE
#define _FILE_OFFSET_BITS 64
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static unsigned char *file;
static size_t file_size;
static unsigned seed = 1;
static long calls, eintrs;

static unsigned next(void) {
    seed = seed * 1103515245u + 12345u;
    return seed >> 8;
}

static ssize_t flaky_preadv(int fd, const struct iovec *iov, int n, off_t at) {
    (void)fd;
    ++calls;
    if (next() % 5 == 0) {
        ++eintrs;
        errno = EINTR;
        return -1;
    }
    if ((size_t)at >= file_size) return 0;
    size_t total = 0;
    for (int i = 0; i < n; ++i) total += iov[i].iov_len;
    if (total > file_size - (size_t)at) total = file_size - (size_t)at;
    size_t want = total ? 1 + next() % total : 0, done = 0;
    for (int i = 0; i < n && done < want; ++i) {
        size_t k = iov[i].iov_len < want - done ? iov[i].iov_len : want - done;
        memcpy(iov[i].iov_base, file + at + done, k);
        done += k;
    }
    return (ssize_t)done;
}

#define preadv flaky_preadv
#include "tq_read.c"
#undef preadv

/* A stand-in streaming hash (FNV-1a) with XXH3's calling convention. */
typedef struct { uint64_t h; } fnv;
static void *create(void) { return calloc(1, sizeof(fnv)); }
static int destroy(void *s) { free(s); return 0; }
static int reset(void *s) { ((fnv *)s)->h = 1469598103934665603ull; return 0; }
static int update(void *s, const void *p, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        ((fnv *)s)->h ^= ((const unsigned char *)p)[i];
        ((fnv *)s)->h *= 1099511628211ull;
    }
    return 0;
}
static uint64_t digest(const void *s) { return ((const fnv *)s)->h; }

int main(int argc, char **argv) {
    int trials = argc > 1 ? atoi(argv[1]) : 500, fails = 0;
    for (int t = 0; t < trials; ++t) {
        int runs = 1 + (int)(next() % 1500);
        uint64_t *lengths = malloc(runs * sizeof(uint64_t));
        uint64_t *addresses = malloc(runs * sizeof(uint64_t));
        size_t body = 0;
        for (int i = 0; i < runs; ++i) {
            lengths[i] = next() % 4 == 0 ? 0 : 1 + next() % 40;
            body += lengths[i];
        }
        size_t header = next() % 9;
        file_size = header + body;
        file = malloc(file_size + 1);
        for (size_t i = 0; i < file_size; ++i) file[i] = (unsigned char)next();
        unsigned char *dest = malloc(body + runs + 1);
        size_t at = 0;
        for (int i = runs - 1; i >= 0; --i) { /* reversed, one byte apart */
            addresses[i] = (uint64_t)(uintptr_t)(dest + at);
            at += lengths[i] + 1;
        }
        uint64_t chunk_lengths[4096], sums[4096];
        int chunks = 0;
        for (size_t pos = 0; pos < body; ++chunks) {
            size_t c = 1 + next() % (next() % 2 ? 3000 : 50);
            if (c > body - pos) c = body - pos;
            fnv h;
            reset(&h);
            update(&h, file + header + pos, c);
            chunk_lengths[chunks] = c;
            sums[chunks] = digest(&h);
            pos += c;
        }
        int64_t got = tq_read_verify(3, (int64_t)header, addresses, lengths, runs, chunk_lengths,
                                     sums, chunks, create, destroy, reset, update, digest);
        int ok = got == chunks;
        size_t pos = 0;
        for (int i = 0; i < runs; ++i) {
            if (memcmp((void *)(uintptr_t)addresses[i], file + header + pos, lengths[i])) ok = 0;
            pos += lengths[i];
        }
        if (!ok) ++fails;
        free(file);
        free(dest);
        free(lengths);
        free(addresses);
    }
    printf("fails=%d calls=%ld eintrs=%ld\n", fails, calls, eintrs);
    return fails != 0;
}
