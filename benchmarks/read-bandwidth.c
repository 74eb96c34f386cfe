// How fast this machine reads memory: the figure a decode's bytes bound divides by. Each thread sums its share of a
// 1 GiB buffer (far larger than any cache), all threads at once; printed: the best of 5 passes, in GB/s.
//   cc -O3 -march=native -pthread benchmarks/read-bandwidth.c -o read-bandwidth && ./read-bandwidth THREADS
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BYTES (1ull << 30)

struct share {
    const uint64_t * data;
    size_t n;
    uint64_t sum;
};

static void * read_share(void * arg) {
    struct share * s = arg;
    uint64_t acc[8] = {0};
    for (size_t i = 0; i < s->n; i += 8) {
        for (int k = 0; k < 8; ++k) {
            acc[k] += s->data[i + k];
        }
    }
    for (int k = 0; k < 8; ++k) {
        s->sum += acc[k];
    }
    return NULL;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(int argc, char ** argv) {
    const int threads = argc > 1 ? atoi(argv[1]) : 1;
    if (threads < 1 || threads > 256) {
        fprintf(stderr, "usage: %s THREADS\n", argv[0]);
        return 2;
    }
    uint64_t * data = aligned_alloc(1 << 21, BYTES);
    if (!data) {
        fprintf(stderr, "cannot allocate 1 GiB\n");
        return 1;
    }
    memset(data, 1, BYTES);
    pthread_t ids[256];
    struct share shares[256];
    const size_t per_thread = BYTES / sizeof(uint64_t) / threads / 8 * 8;
    double best = 0;
    uint64_t check = 0;
    for (int pass = 0; pass < 5; ++pass) {
        const double t0 = now();
        for (int t = 0; t < threads; ++t) {
            shares[t] = (struct share) {data + t * per_thread, per_thread, 0};
            pthread_create(&ids[t], NULL, read_share, &shares[t]);
        }
        for (int t = 0; t < threads; ++t) {
            pthread_join(ids[t], NULL);
            check += shares[t].sum;
        }
        const double gbps = threads * per_thread * sizeof(uint64_t) / (now() - t0) / 1e9;
        best = gbps > best ? gbps : best;
    }
    printf("%.1f\n", best);
    return check == 0;  // the sums are used, so the reads are not optimised away
}
