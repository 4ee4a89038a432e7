//! Test fixture: abuses the `metrics` import and the log from `on_handshake`, then accepts
//! (or panics, for `fail-after-metric`). Config `{ "op": "<op>" }`:
//! - `huge-label`: a counter whose label value is 4 MiB;
//! - `many-series`: a counter with the connection id as a label, a new series per call;
//! - `steal`: a gauge named `rate_limit_refused_total`, as the rate-limit plugin's counter;
//! - `fail-after-metric`: a counter with a new label per call, then a panic;
//! - `many-updates`: 10,000 counter updates in one call;
//! - `log-forge`: log lines with newlines and escape sequences that imitate the gateway's
//!   records, and one of 1 MiB.

use serde::Deserialize;
use wasmgate_sdk::metrics;
use wasmgate_sdk::{Conn, Hooks, Plugin, Request, Verdict};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    op: String,
}

pub struct HostileMetrics {
    op: String,
}

impl Plugin for HostileMetrics {
    type Config = Config;
    const HOOKS: Hooks = Hooks::HANDSHAKE;

    fn new(c: Config) -> Result<Self, String> {
        let ops = ["huge-label", "many-series", "steal", "fail-after-metric", "many-updates", "log-forge"];
        if !ops.contains(&c.op.as_str()) {
            return Err(format!("bad config: op {:?} is not one of {ops:?}", c.op));
        }
        Ok(HostileMetrics { op: c.op })
    }

    fn on_handshake(&mut self, conn: &Conn, _: &Request) -> Verdict {
        let id = conn.id().to_string();
        match self.op.as_str() {
            "huge-label" => metrics::counter_add("huge_total", &[("blob", &"x".repeat(4 << 20))], 1),
            "many-series" => metrics::counter_add("per_conn_total", &[("conn", &id)], 1),
            "steal" => metrics::gauge_set("rate_limit_refused_total", &[("what", "connection")], -1.0),
            "fail-after-metric" => {
                metrics::counter_add("failed_total", &[("conn", &id)], 1);
                panic!("hostile-metrics: failing after a metric on purpose");
            }
            "many-updates" => {
                for i in 0..10_000 {
                    metrics::counter_add("burst_total", &[("i", &(i % 100).to_string())], 1);
                }
            }
            "log-forge" => {
                wasmgate_sdk::error!(
                    "innocent\n2030-01-01T00:00:00.000000Z ERROR wasmgate: FORGED RECORD\r\x1b[2J\u{202E}"
                );
                wasmgate_sdk::error!("{}", "y".repeat(1 << 20));
            }
            _ => unreachable!("checked in new"),
        }
        Verdict::accept()
    }
}

wasmgate_sdk::export_plugin!(HostileMetrics);
