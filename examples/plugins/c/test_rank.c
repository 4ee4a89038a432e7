/* Native unit tests of rank.c: cc -Wall -Werror -o build/test_rank test_rank.c rank.c && build/test_rank
 * Prints "N passed, N failed"; exits non-zero on a failure. */
#include <stdio.h>
#include <string.h>

#include "rank.h"

static int passed, failed;

#define CHECK(cond)                                                        \
    do {                                                                   \
        if (cond) {                                                        \
            passed++;                                                      \
        } else {                                                           \
            failed++;                                                      \
            printf("FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond);       \
        }                                                                  \
    } while (0)

static int ranked(const server_t *s, size_t n, uint32_t max_failures, const uint32_t *want) {
    uint32_t order[16];
    rank_servers(s, n, max_failures, order);
    return memcmp(order, want, n * sizeof *want) == 0;
}

static int config(const char *json, uint32_t *out) {
    const char *err = NULL;
    return parse_config(json, strlen(json), out, &err);
}

int main(void) {
    server_t idle[3] = {{0, 1, 0}, {0, 1, 0}, {0, 1, 0}};
    CHECK(ranked(idle, 3, 3, (uint32_t[]){0, 1, 2}));

    server_t busy[3] = {{2, 1, 0}, {0, 1, 0}, {1, 1, 0}};
    CHECK(ranked(busy, 3, 3, (uint32_t[]){1, 2, 0}));

    /* Weight 2 carries twice the connections: 3/2 < 2/1. */
    server_t weighted[2] = {{2, 1, 0}, {3, 2, 0}};
    CHECK(ranked(weighted, 2, 3, (uint32_t[]){1, 0}));

    /* Failing servers go last however idle; ties go to fewer failures. */
    server_t failing[3] = {{0, 1, 5}, {4, 1, 0}, {4, 1, 1}};
    CHECK(ranked(failing, 3, 3, (uint32_t[]){1, 2, 0}));
    CHECK(ranked(failing, 3, 0, (uint32_t[]){0, 1, 2}));

    uint32_t max = 99;
    CHECK(config("", &max) == 0 && max == 3);
    CHECK(config(" null ", &max) == 0 && max == 3);
    CHECK(config("{}", &max) == 0 && max == 3);
    CHECK(config("{ \"max_failures\" : 7 }", &max) == 0 && max == 7);
    CHECK(config("{\"max_failures\":0}", &max) == 0 && max == 0);
    CHECK(config("{\"max_failures\":-1}", &max) == -1);
    CHECK(config("{\"max_failures\":99999999999}", &max) == -1);
    CHECK(config("{\"typo\":1}", &max) == -1);
    CHECK(config("[]", &max) == -1);
    CHECK(config("{} x", &max) == -1);

    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
