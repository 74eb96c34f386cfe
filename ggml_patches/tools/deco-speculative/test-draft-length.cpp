// The draft length controller (draft-length.h) against simulation: drafts whose tokens are each kept with
// probability p (given the ones before), iterations that take t0 + t1 k (+-10% noise). The truth is the
// simulated throughput of every fixed draft length: the controller must come within a few percent of the best
// of them, and must not lose to one token more than the last verification accepted (its rule before it has
// timed two lengths). At p = 1 it keeps the longest drafts, at p = 0 it falls to one token.
#include "draft-length.h"

#include <cstdio>
#include <functional>
#include <random>

struct scenario {
    double p, t0, t1;
    int32_t n_draft;
};

struct run {
    double tokens = 0, seconds = 0;
    std::vector<int64_t> lengths; // how often each draft length was drafted
    double rate() const { return tokens / seconds; }
};

// n_iter iterations with the draft length `choose` returns; `seen` tells it what happened
static run simulate(const scenario & sc, int n_iter, uint32_t seed, const std::function<int32_t()> & choose,
                    const std::function<void(int32_t, int32_t, double)> & seen) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<double> u(0, 1), noise(0.9, 1.1);
    run r;
    r.lengths.assign(sc.n_draft + 1, 0);
    for (int i = 0; i < n_iter; ++i) {
        const int32_t k = choose();
        int32_t kept = 0;
        while (kept < k && u(rng) < sc.p) {
            ++kept;
        }
        const double s = (sc.t0 + sc.t1 * k) * noise(rng);
        seen(k, kept, s);
        r.tokens += kept + 1, r.seconds += s, r.lengths[k] += 1;
    }
    return r;
}

static run with_controller(const scenario & sc, int n_iter, uint32_t seed) {
    draft_length length(sc.n_draft);
    return simulate(sc, n_iter, seed, [&] { return length.next(sc.n_draft); },
                    [&](int32_t k, int32_t kept, double s) { length.observe(k, kept, s); });
}

static run with_rule(const scenario & sc, int n_iter, uint32_t seed) {
    int32_t n = sc.n_draft;
    return simulate(sc, n_iter, seed, [&] { return n; },
                    [&](int32_t, int32_t kept, double) { n = std::min(sc.n_draft, kept + 1); });
}

static int n_failed = 0;

static void check(bool ok, const char * what, const scenario & sc) {
    printf("%s  p %.2f  t1/t0 %.2f  n_draft %d: %s\n", ok ? "ok    " : "FAILED", sc.p, sc.t1 / sc.t0, sc.n_draft, what);
    n_failed += ok ? 0 : 1;
}

int main() {
    const int n_iter = 4000;
    const scenario cases[] = {
        {0.8, 1.0, 0.17, 8}, // speculation on a fast target: rows nearly free
        {0.8, 1.0, 0.30, 8}, // rows at a third of a step (one thread)
        {0.5, 1.0, 0.30, 4}, // a poor draft
        {0.9, 1.0, 0.05, 8}, // a good draft, cheap rows: long drafts
        {0.5, 1.0, 0.60, 8}, // a draft model whose steps cost more than half a target step
        {0.3, 1.0, 0.10, 8},
    };
    for (const scenario & sc : cases) {
        double best_fixed = 0;
        int32_t best_k = 0;
        for (int32_t k = 1; k <= sc.n_draft; ++k) {
            const double rate = simulate(sc, n_iter, 1, [&] { return k; }, [](int32_t, int32_t, double) {}).rate();
            if (rate > best_fixed) {
                best_fixed = rate, best_k = k;
            }
        }
        const run ctl  = with_controller(sc, n_iter, 2);
        const run rule = with_rule(sc, n_iter, 2);
        printf("       best fixed length %d: %.3f tokens/s; controller %.3f; rule %.3f\n", best_k, best_fixed, ctl.rate(), rule.rate());
        check(ctl.rate() >= 0.97 * best_fixed, "within 3% of the best fixed length", sc);
        check(ctl.rate() >= 0.99 * rule.rate(), "not slower than the accepted + 1 rule", sc);
    }

    // p = 1: every draft as long as allowed; p = 0: the first draft as long as allowed, then one token
    for (const double p : {1.0, 0.0}) {
        const scenario sc = {p, 1.0, 0.3, 4};
        const run r = with_controller(sc, 200, 3);
        const bool ok = p == 1 ? r.lengths[4] == 200 : r.lengths[4] == 1 && r.lengths[1] == 199;
        check(ok, p == 1 ? "always 4 tokens" : "4 tokens once, then 1", sc);
    }

    // the cap of the moment (the room left in the context and the budget) is kept
    draft_length length(8);
    for (int i = 0; i < 20; ++i) {
        length.observe(i % 2 ? 8 : 2, i % 2 ? 8 : 2, i % 2 ? 1.4 : 1.1);
    }
    const scenario sc = {1.0, 1.0, 0.05, 8};
    check(length.next(8) == 8 && length.next(3) == 3 && length.next(1) == 1, "next(n_max) <= n_max", sc);

    printf("%d failed\n", n_failed);
    return n_failed == 0 ? 0 : 1;
}
