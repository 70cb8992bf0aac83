/* Same-host block reads: preadv a piece of a payload file into its places and verify each
 * checksum chunk with XXH3-64 right after reading it, without the Python interpreter.
 *
 * Why: in Python the reader preadv'd a whole piece, then hashed it with xxhash's streaming
 * update(), which holds the GIL. So the hashes of a read's threads ran one at a time, and
 * each piece was walked through memory twice (16 MiB pieces do not stay in cache between the
 * read and the hash). Here a chunk (1 MiB by default: the store's checksum_chunk) is read and
 * at once hashed while it is still in cache, and ctypes releases the GIL for the whole piece,
 * so every thread hashes in parallel.
 *
 * The hash is the xxhash Python package's own XXH3 (its extension module exports the C API;
 * tqstore.native.read_verify passes the functions in and checks them against
 * xxhash.xxh3_64_intdigest once per process), so a digest here is the digest the daemon
 * stored, bit for bit.
 *
 * runs: where the piece's body bytes go, in file order (run i: run_lengths[i] bytes at
 * run_addresses[i]); chunks: consecutive chunk_lengths[j] bytes of that order, whose XXH3-64
 * must equal checksums[j]. Returns how many leading chunks were read and verified (a checksum
 * mismatch stops there), -1 where the file ended early or a read failed, -2 where memory for
 * the hash state ran out. Bytes of a chunk that did not verify are garbage the caller never
 * counts (tqstore.direct_read).
 */
#define _GNU_SOURCE
#define _FILE_OFFSET_BITS 64 /* 64-bit off_t on 32-bit builds too: payload files pass 2 GiB */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

typedef void *(*xxh_create_fn)(void);
typedef int (*xxh_free_fn)(void *);
typedef int (*xxh_reset_fn)(void *);
typedef int (*xxh_update_fn)(void *, const void *, size_t);
typedef uint64_t (*xxh_digest_fn)(const void *);

/* iovecs per preadv: below IOV_MAX (1024 on Linux and macOS). preadv: Linux, and macOS from 11
   (MLX itself needs a newer macOS). */
#define TQ_IOV_BATCH 512

/* Read iov[0, n) from fd at `at`, completing short reads. iov is consumed (advanced in place).
   0 on success, -1 at end of file or on an error other than EINTR. */
static int read_all(int fd, struct iovec *iov, int n, off_t at) {
    while (n > 0) {
        ssize_t got = preadv(fd, iov, n > TQ_IOV_BATCH ? TQ_IOV_BATCH : n, at);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return -1;
        at += got;
        while (n > 0 && (size_t)got >= iov->iov_len) {
            got -= (ssize_t)iov->iov_len;
            ++iov;
            --n;
        }
        if (n > 0 && got > 0) {
            iov->iov_base = (char *)iov->iov_base + got;
            iov->iov_len -= (size_t)got;
        }
    }
    return 0;
}

int64_t tq_read_verify(int fd, int64_t offset, const uint64_t *run_addresses,
                       const uint64_t *run_lengths, int64_t num_runs,
                       const uint64_t *chunk_lengths, const uint64_t *checksums,
                       int64_t num_chunks, void *create, void *destroy, void *reset,
                       void *update, void *digest) {
    xxh_create_fn create_state = (xxh_create_fn)create;
    xxh_free_fn free_state = (xxh_free_fn)destroy;
    xxh_reset_fn reset_state = (xxh_reset_fn)reset;
    xxh_update_fn update_state = (xxh_update_fn)update;
    xxh_digest_fn digest_state = (xxh_digest_fn)digest;
    /* A chunk spans at most (runs it touches) pieces; every run boundary adds one, so
       num_runs + num_chunks bounds the pieces of all chunks together and of any one. */
    const size_t cap = (size_t)(num_runs + num_chunks) + 1; /* + 1: never malloc(0) */
    struct iovec *pieces = malloc(2 * cap * sizeof(struct iovec));
    void *state = create_state();
    if (pieces == NULL || state == NULL) {
        free(pieces);
        if (state != NULL) free_state(state);
        return -2;
    }
    struct iovec *reading = pieces + cap;
    int64_t run = 0, verified = 0;
    uint64_t used = 0; /* bytes of run `run` already given to earlier chunks */
    off_t at = (off_t)offset;
    for (int64_t c = 0; c < num_chunks; ++c) {
        uint64_t need = chunk_lengths[c];
        int n = 0;
        while (need > 0) {
            if (run >= num_runs) goto done; /* fewer bytes than the chunks: not verified */
            uint64_t take = run_lengths[run] - used;
            if (take > need) take = need;
            pieces[n].iov_base = (void *)(uintptr_t)(run_addresses[run] + used);
            pieces[n].iov_len = (size_t)take;
            ++n;
            need -= take;
            used += take;
            if (used == run_lengths[run]) {
                ++run;
                used = 0;
            }
        }
        memcpy(reading, pieces, (size_t)n * sizeof(struct iovec));
        if (read_all(fd, reading, n, at) != 0) {
            verified = -1;
            goto done;
        }
        at += (off_t)chunk_lengths[c];
        reset_state(state);
        for (int i = 0; i < n; ++i) update_state(state, pieces[i].iov_base, pieces[i].iov_len);
        if (digest_state(state) != checksums[c]) goto done;
        ++verified;
    }
done:
    free_state(state);
    free(pieces);
    return verified;
}
