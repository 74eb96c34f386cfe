// How many tokens to draft before the next verification (docs/speculative.md, "How long a draft is").
//
// When each drafted token is kept with probability p given that the ones before it were, a draft of k tokens
// yields E(k) = 1 + p + ... + p^k tokens per verification (the accepted ones and the target's own next token),
// and an iteration (drafting k tokens, then the target's batch of 1 + k rows) takes about t0 + t1 k. The
// controller estimates p from recent verifications and t0, t1 from the times of recent iterations of each
// draft length, and drafts the k in [1, n_max] that maximises E(k) / (t0 + t1 k): long drafts where rows are
// cheap and drafts are good, one token where they are not. Until two draft lengths have been timed twice each,
// it drafts one token more than the last verification accepted, so that a draft that keeps failing shrinks to
// one token and one that keeps being kept stays long.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

class draft_length {
public:
    explicit draft_length(int32_t n_draft) : n_draft(n_draft), n_rule(n_draft), seconds(n_draft + 1), timed(n_draft + 1) {}

    // the length of the next draft, at most n_max (>= 1)
    int32_t next(int32_t n_max) const {
        double t0 = 0, t1 = 0;
        if (kept + rejected == 0 || !fit_cost(t0, t1)) {
            return std::min(n_rule, n_max);
        }
        const double p = kept / (kept + rejected);
        int32_t best   = 1;
        double  best_rate = 0, tokens = 1, p_k = 1;
        for (int32_t k = 1; k <= std::min(n_max, n_draft); ++k) {
            p_k    *= p;
            tokens += p_k;
            const double rate = tokens / (t0 + t1 * k);
            if (rate > best_rate) {
                best = k, best_rate = rate;
            }
        }
        return best;
    }

    // an iteration that drafted k tokens, of which n_kept were accepted, in s seconds (drafting and verifying)
    void observe(int32_t k, int32_t n_kept, double s) {
        seconds[k] = timed[k] == 0 ? s : (1 - NEW_TIME) * seconds[k] + NEW_TIME * s;
        timed[k] += 1;
        if (k > 0) {
            kept     = DECAY * kept + n_kept;
            rejected = DECAY * rejected + (n_kept < k ? 1 : 0);
            n_rule   = std::min(n_draft, n_kept + 1);
        }
    }

private:
    static constexpr double DECAY    = 0.9;  // weight of earlier verifications in the estimate of p
    static constexpr double NEW_TIME = 0.25; // weight of the newest iteration in a draft length's time

    const int32_t n_draft;
    int32_t n_rule;
    double kept = 0, rejected = 0;  // decayed counts of kept drafted tokens and of verifications that rejected one
    std::vector<double>  seconds;   // per draft length: recent mean time of an iteration
    std::vector<int32_t> timed;     // per draft length: iterations seen

    // t0 + t1 k through the times of the draft lengths timed at least twice (least squares); false until there
    // are two, or when the fit is not a cost (an iteration that drafts nothing must take time, a row cannot save it)
    bool fit_cost(double & t0, double & t1) const {
        double w = 0, wk = 0, wt = 0, wkk = 0, wkt = 0;
        int32_t lengths = 0;
        for (int32_t k = 0; k <= n_draft; ++k) {
            if (timed[k] < 2) {
                continue;
            }
            const double wi = std::min(timed[k], 8);
            w += wi, wk += wi * k, wt += wi * seconds[k], wkk += wi * k * k, wkt += wi * k * seconds[k];
            lengths += 1;
        }
        if (lengths < 2) {
            return false;
        }
        t1 = (w * wkt - wk * wt) / (w * wkk - wk * wk);
        t0 = (wt - t1 * wk) / w;
        t1 = std::max(t1, 0.0);
        return t0 > 0;
    }
};
