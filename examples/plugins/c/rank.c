#include "rank.h"

#include <string.h>

/* a before b? Compares active/weight as active_a * weight_b < active_b * weight_a. */
static int better(const server_t *a, size_t ia, const server_t *b, size_t ib, uint32_t max_failures) {
    int a_failing = max_failures && a->recent_failures >= max_failures;
    int b_failing = max_failures && b->recent_failures >= max_failures;
    if (a_failing != b_failing) return !a_failing;
    uint64_t wa = a->weight ? a->weight : 1, wb = b->weight ? b->weight : 1;
    uint64_t la = (uint64_t)a->active * wb, lb = (uint64_t)b->active * wa;
    if (la != lb) return la < lb;
    if (a->recent_failures != b->recent_failures) return a->recent_failures < b->recent_failures;
    return ia < ib;
}

void rank_servers(const server_t *servers, size_t n, uint32_t max_failures, uint32_t *order) {
    /* Insertion sort: pools are small, and it is stable and allocation-free. */
    for (size_t i = 0; i < n; i++) {
        size_t j = i;
        while (j > 0 && better(&servers[i], i, &servers[order[j - 1]], order[j - 1], max_failures)) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = (uint32_t)i;
    }
}

static size_t skip_space(const char *s, size_t len, size_t i) {
    while (i < len && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) i++;
    return i;
}

int parse_config(const char *json, size_t len, uint32_t *max_failures, const char **err) {
    static const char key[] = "\"max_failures\"";
    *max_failures = 3;
    size_t i = skip_space(json, len, 0);
    if (i == len) return 0;
    if (len - i >= 4 && memcmp(json + i, "null", 4) == 0 && skip_space(json, len, i + 4) == len) return 0;
    if (json[i] != '{') goto bad;
    i = skip_space(json, len, i + 1);
    if (i < len && json[i] == '}') return skip_space(json, len, i + 1) == len ? 0 : (*err = "bad config: trailing text", -1);
    if (len - i < sizeof key - 1 || memcmp(json + i, key, sizeof key - 1) != 0) {
        *err = "bad config: the only key is max_failures";
        return -1;
    }
    i = skip_space(json, len, i + sizeof key - 1);
    if (i >= len || json[i] != ':') goto bad;
    i = skip_space(json, len, i + 1);
    uint64_t value = 0;
    size_t digits = 0;
    while (i < len && json[i] >= '0' && json[i] <= '9' && digits < 8) {
        value = value * 10 + (uint64_t)(json[i] - '0');
        i++, digits++;
    }
    if (digits == 0 || value > 1000000 || (i < len && json[i] >= '0' && json[i] <= '9')) {
        *err = "bad config: max_failures must be an integer 0..=1000000";
        return -1;
    }
    i = skip_space(json, len, i);
    if (i >= len || json[i] != '}' || skip_space(json, len, i + 1) != len) goto bad;
    *max_failures = (uint32_t)value;
    return 0;
bad:
    *err = "bad config: expected {} or {\"max_failures\": N}";
    return -1;
}
