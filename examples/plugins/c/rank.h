/* The least-active ranking, free of any WIT type so it can be unit-tested natively. */
#ifndef LEAST_ACTIVE_RANK_H
#define LEAST_ACTIVE_RANK_H

#include <stddef.h>
#include <stdint.h>

/* What the ranking needs to know about one server. */
typedef struct {
    uint32_t active;          /* connections open now */
    uint32_t weight;          /* configured weight; 0 counts as 1 */
    uint32_t recent_failures; /* connect failures in a row */
} server_t;

/* Fills order[0..n) with indexes of servers, best first: servers with fewer than
 * max_failures recent failures (all servers when max_failures is 0) before the others;
 * within each group the fewest active connections per unit of weight, then the fewest
 * recent failures, then the lowest index. */
void rank_servers(const server_t *servers, size_t n, uint32_t max_failures, uint32_t *order);

/* Parses the plugin's config JSON: "", "null", "{}" or {"max_failures": N} with N in
 * 0..=1000000. Returns 0 and sets *max_failures (default 3), or -1 with a message in err. */
int parse_config(const char *json, size_t len, uint32_t *max_failures, const char **err);

#endif
