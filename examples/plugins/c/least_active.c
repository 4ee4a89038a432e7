/* A wasmgate balancer plugin in C: the least-active server first.
 *
 * Built against the WIT world `balancer-plugin` with `wit-bindgen c` (the bindings land in
 * build/gen/), compiled by clang to a core Wasm module and wrapped into a component by
 * `wasm-tools component new`; see build.sh at examples/plugins/ and README.md here.
 *
 * Config: {} or { max_failures = N } (default 3): servers with N or more connect failures
 * in a row go last; 0 keeps them in the ranking. The ranking itself is in rank.c. */
#include <stdlib.h>
#include <string.h>

#include "balancer_plugin.h"
#include "rank.h"

/* Set by init; one value per instance, shared by every connection it serves. */
static uint32_t max_failures = 3;

static void log_line(wasmgate_plugin_host_level_t level, const char *text) {
    balancer_plugin_string_t message;
    balancer_plugin_string_set(&message, text); /* borrows `text`: nothing to free */
    wasmgate_plugin_host_log(level, &message);
}

/* Exported function arguments are owned by the callee: each function frees what it gets,
 * and drops the borrowed `connection` handle before returning (the component model traps
 * a call that returns with a borrow still held). */

bool exports_wasmgate_plugin_lifecycle_init(balancer_plugin_string_t *config,
                                            exports_wasmgate_plugin_lifecycle_hooks_t *ret,
                                            balancer_plugin_string_t *err) {
    const char *message = NULL;
    int parsed = parse_config((const char *)config->ptr, config->len, &max_failures, &message);
    balancer_plugin_string_free(config);
    if (parsed != 0) {
        balancer_plugin_string_dup(err, message); /* freed by the generated post-return */
        return false;
    }
    log_line(WASMGATE_PLUGIN_HOST_LEVEL_DEBUG, "least-active balancer ready");
    *ret = WASMGATE_PLUGIN_TYPES_HOOKS_BALANCER;
    return true;
}

void exports_wasmgate_plugin_lifecycle_on_close(exports_wasmgate_plugin_lifecycle_borrow_connection_t conn,
                                                uint16_t code,
                                                exports_wasmgate_plugin_lifecycle_connection_stats_t *stats) {
    /* Not declared in init's hooks, so never called. */
    (void)code, (void)stats;
    wasmgate_plugin_connection_connection_drop_borrow(conn);
}

void exports_wasmgate_plugin_balancer_select(exports_wasmgate_plugin_balancer_borrow_connection_t conn,
                                             exports_wasmgate_plugin_balancer_borrow_pool_t pool,
                                             exports_wasmgate_plugin_balancer_list_candidate_t *candidates,
                                             balancer_plugin_list_u32_t *ret) {
    /* Neither the connection nor the pool's addresses matter to this policy: candidates
     * carry the live numbers. */
    wasmgate_plugin_connection_connection_drop_borrow(conn);
    wasmgate_plugin_upstreams_pool_drop_borrow(pool);
    size_t n = candidates->len;
    server_t *servers = malloc(n * sizeof *servers + 1);
    uint32_t *order = malloc(n * sizeof *order + 1); /* freed by the generated post-return */
    if (servers == NULL || order == NULL) abort();   /* traps: the gateway falls back to round robin */
    for (size_t i = 0; i < n; i++) {
        const exports_wasmgate_plugin_balancer_candidate_t *c = &candidates->ptr[i];
        servers[i] = (server_t){c->active, c->weight, c->recent_failures};
    }
    rank_servers(servers, n, max_failures, order);
    free(servers);
    exports_wasmgate_plugin_balancer_list_candidate_free(candidates);
    if (n == 0) {
        free(order); /* an empty list is not freed by the post-return */
        order = NULL;
    }
    ret->ptr = order;
    ret->len = n;
}
