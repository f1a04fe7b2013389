/*
 * gcra.c: see gcra.h.  Mirrored line for line by the Lua script in script.c.
 */
#include "gcra.h"

#include <math.h>

static int64_t
clamp_us(double v)
{
    return v > RG_MAX_US ? (int64_t)RG_MAX_US : (int64_t)v;
}

int
rg_gcra_check(const rg_rate *rates, int n, double now, int64_t cost,
              double *tats, rg_result *out)
{
    double tat0[RG_MAX_RATES], nw[RG_MAX_RATES];
    int allowed = 1;
    int j;

    for (j = 0; j < n; j++) {
        double v = tats[j] < now ? now : tats[j];
        tat0[j] = v;
        nw[j] = v + (double)cost * rates[j].T;
        if (nw[j] - now > rates[j].tau + RG_SLACK(rates[j].T))
            allowed = 0;
    }

    out->allowed = allowed;
    out->rate = 0;
    out->remaining = -1;
    out->reset_us = 0;
    out->retry_us = 0;
    out->block_us = 0;

    if (allowed) {
        /* Report the rate with the fewest tokens left. */
        for (j = 0; j < n; j++) {
            double r = floor((rates[j].tau - (nw[j] - now) + RG_SLACK(rates[j].T)) / rates[j].T);
            int64_t rem = r < 0 ? 0 : (int64_t)r;
            if (out->remaining < 0 || rem < out->remaining) {
                out->remaining = rem;
                out->rate = j;
                out->reset_us = clamp_us(ceil(nw[j] - now));
            }
            if (cost > 0)
                tats[j] = nw[j];
        }
    } else {
        /* Report the rate that makes the caller wait longest; the cost-1
         * block is the longest over all rates, since all must allow. */
        double worst = -1.0, block = 0.0;
        int r = 0;
        for (j = 0; j < n; j++) {
            double w = nw[j] - now - rates[j].tau;
            double b = tat0[j] + rates[j].T - now - rates[j].tau - RG_SLACK(rates[j].T);
            if (w > worst) {
                worst = w;
                r = j;
            }
            if (b > block)
                block = b;
        }
        double rem = floor((rates[r].tau - (tat0[r] - now) + RG_SLACK(rates[r].T)) / rates[r].T);
        out->rate = r;
        out->remaining = rem < 0 ? 0 : (int64_t)rem;
        out->reset_us = clamp_us(ceil(tat0[r] - now));
        out->retry_us = clamp_us(ceil(worst));
        out->block_us = clamp_us(floor(block));
    }
    return allowed;
}

void
rg_gcra_charge(const rg_rate *rates, int n, double now, int64_t cost, double *tats,
               rg_result *out)
{
    int j;

    out->allowed = 1;
    out->rate = 0;
    out->remaining = -1;
    out->reset_us = out->retry_us = out->block_us = 0;
    for (j = 0; j < n; j++) {
        double v = (tats[j] < now ? now : tats[j]) + (double)cost * rates[j].T;
        double r;
        int64_t rem;
        if (v < now)
            v = now;
        if (v - now > RG_MAX_DEBT_US)
            v = now + RG_MAX_DEBT_US;
        tats[j] = v;
        r = floor((rates[j].tau - (v - now) + RG_SLACK(rates[j].T)) / rates[j].T);
        rem = r < 0 ? 0 : (int64_t)r;
        if (out->remaining < 0 || rem < out->remaining) {
            out->remaining = rem;
            out->rate = j;
            out->reset_us = clamp_us(ceil(v - now));
        }
    }
    if (out->remaining < 0)
        out->remaining = 0;
}
