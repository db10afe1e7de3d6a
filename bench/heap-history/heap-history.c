/* Preloaded into an Envoy (FLEET_PRELOAD), before Envoy's main: gives its allocator (tcmalloc,
 * which Envoy exports as malloc) the heap a 1,000,000-route table leaves, without the table.
 * HEAP_HISTORY selects the history:
 *   ballast  65,536 blocks of 1,500 bytes, allocated once (the table's size, no history);
 *   churn    1,000,000 records of 60 bytes put one by one into 65,536 buckets, each put
 *            making its bucket anew (malloc the larger block, copy, free the old): the
 *            native filter's full load, allocation for allocation;
 *   compact  churn, then every bucket allocated once more at its size and the old one freed;
 *   doubling the same puts into buckets that grow as a vector does (capacity doubled from 64
 *            bytes when full): about 5 allocations a bucket instead of 15. */
#include <stdlib.h>
#include <string.h>

#define BUCKETS 65536
static unsigned char *bucket[BUCKETS];
static size_t len[BUCKETS];

static void ballast(void) {
    for (int b = 0; b < BUCKETS; b++) {
        bucket[b] = malloc(1500);
        if (bucket[b]) memset(bucket[b], 1, 1500);
    }
}

/* 1,000,000 records of 60 bytes put into buckets chosen at random. A bucket too small for the
 * next record is made anew (malloc, copy, free the old): at the exact size (`grow` 0, the
 * filter's put) or at twice its capacity, from 64 bytes (`grow` 1, as a vector grows). */
static void put_records(int grow) {
    static size_t cap[BUCKETS];
    unsigned long long x = 0x9e3779b97f4a7c15ULL;
    for (int r = 0; r < 1000000; r++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        int b = (int)(x & (BUCKETS - 1));
        if (len[b] + 60 > cap[b]) {
            size_t n = len[b] + 60;
            if (grow) {
                n = cap[b] ? cap[b] * 2 : 64;
                while (n < len[b] + 60) n *= 2;
            }
            unsigned char *p = malloc(n);
            if (!p) return;
            if (bucket[b]) {
                memcpy(p, bucket[b], len[b]);
                free(bucket[b]);
            }
            bucket[b] = p;
            cap[b] = n;
        }
        memset(bucket[b] + len[b], 1, 60);
        len[b] += 60;
    }
}

static void compact(void) {
    for (int b = 0; b < BUCKETS; b++) {
        unsigned char *p = malloc(len[b]);
        if (!p) return;
        memcpy(p, bucket[b], len[b]);
        free(bucket[b]);
        bucket[b] = p;
    }
}

__attribute__((constructor)) static void heap_history(void) {
    const char *mode = getenv("HEAP_HISTORY");
    if (!mode || !strcmp(mode, "ballast")) {
        ballast();
    } else if (!strcmp(mode, "churn")) {
        put_records(0);
    } else if (!strcmp(mode, "doubling")) {
        put_records(1);
    } else if (!strcmp(mode, "compact")) {
        put_records(0);
        compact();
    }
}
