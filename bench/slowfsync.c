/*
 * A slow disk for the kill -9 soak (bench/kill_soak.py): an LD_PRELOAD shim
 * whose fsync() and fdatasync() first sleep SLOWFSYNC_MS milliseconds (read
 * at every call; unset, empty or 0: no delay), then call the real function
 * found with dlsym(RTLD_NEXT). errno is what the real call leaves.
 *
 *   gcc -O2 -shared -fPIC -o slowfsync.so slowfsync.c -ldl
 *   SLOWFSYNC_MS=100 LD_PRELOAD=$PWD/slowfsync.so python -m ops.cli run ...
 *
 * SQLite (synchronous=FULL) syncs through these two on Linux; the calling
 * thread sleeps, as it would on a slow SD card.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <time.h>

typedef int (*sync_fn)(int);

static void slow_down(void)
{
    const char *text = getenv("SLOWFSYNC_MS");
    long ms = text ? strtol(text, NULL, 10) : 0;
    if (ms <= 0)
        return;
    int saved = errno;
    struct timespec left = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&left, &left) == -1 && errno == EINTR)
        ;
    errno = saved;
}

static sync_fn real(const char *name)
{
    sync_fn fn = (sync_fn)dlsym(RTLD_NEXT, name);
    if (fn == NULL)
        abort();
    return fn;
}

int fsync(int fd)
{
    static sync_fn next;
    if (next == NULL)
        next = real("fsync");
    slow_down();
    return next(fd);
}

int fdatasync(int fd)
{
    static sync_fn next;
    if (next == NULL)
        next = real("fdatasync");
    slow_down();
    return next(fd);
}
