//! The soak run's samples and its report: a Markdown table of samples, how RSS and
//! descriptors moved from the start window to the end window, and the verdict.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::clients::{Churn, Counters, CHURN_IN_FLIGHT};
use super::{WARMUP, WINDOW};
use crate::machine;
use crate::table::thousands;

/// Allowed change from start to end, either way.
const TOLERANCE: f64 = 0.10;

pub struct Sample {
    pub at: Duration,
    pub rss_kib: u64,
    pub fds: usize,
    /// `wasmgate_connections_active`, None if /metrics did not answer.
    pub gateway_conns: Option<u64>,
    pub pool_open: u64,
    pub churned: u64,
    pub echoes: u64,
    pub reloads: u64,
    pub kills: u64,
    pub errors: u64,
}

impl Sample {
    const HEADER: &'static str = "| time | RSS MiB | fds | gateway conns | long-lived open | churned | echoes | reloads | kills | errors | |\n\
                          |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|";

    pub fn row(&self, mark: &str) -> String {
        let conns = self.gateway_conns.map_or("?".into(), |c| c.to_string());
        format!(
            "| {} | {:.1} | {} | {conns} | {} | {} | {} | {} | {} | {} | {mark} |",
            clock(self.at),
            mib(self.rss_kib),
            self.fds,
            self.pool_open,
            thousands(self.churned as f64),
            thousands(self.echoes as f64),
            self.reloads,
            self.kills,
            self.errors,
        )
    }
}

pub fn clock(at: Duration) -> String {
    format!("{}:{:02}", at.as_secs() / 60, at.as_secs() % 60)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// How one quantity moved from the start window to the end window.
struct Change {
    start: f64,
    end: f64,
}

impl Change {
    fn of(start: &[Sample], end: &[Sample], value: impl Fn(&Sample) -> f64) -> Change {
        Change { start: median(start.iter().map(&value).collect()), end: median(end.iter().map(&value).collect()) }
    }

    fn ratio(&self) -> f64 {
        (self.end - self.start) / self.start.max(1.0)
    }

    fn holds(&self) -> bool {
        self.ratio().abs() <= TOLERANCE
    }

    fn describe(&self, what: &str, unit: &str, decimals: usize) -> String {
        format!(
            "{what}: start {:.*}{unit}, end {:.*}{unit} ({:+.1}%): {}",
            decimals,
            self.start,
            decimals,
            self.end,
            self.ratio() * 100.0,
            if self.holds() { "within 10%" } else { "NOT within 10%" }
        )
    }
}

pub struct Report<'a> {
    pub header: String,
    pub samples: Vec<Sample>,
    pub idle_before: Sample,
    pub idle_after: Sample,
    pub counters: &'a Counters,
    pub connections: u64,
    pub cpu_percent: f64,
    pub plugin_failures: Option<u64>,
    pub connect_failures: Option<u64>,
    pub gateway_log: String,
}

impl Report<'_> {
    /// The Markdown report and whether the run passed: RSS and descriptors within 10%, every
    /// long-lived connection open in both windows, and no unexpected client error.
    pub fn render(&self) -> (String, bool) {
        let samples = &self.samples;
        let first = samples.iter().position(|s| s.at == WARMUP).expect("the schedule samples at the end of warm-up");
        let start = &samples[first..first + WINDOW];
        let end = &samples[samples.len() - WINDOW..];
        let rss = Change::of(start, end, |s| mib(s.rss_kib));
        let fds = Change::of(start, end, |s| s.fds as f64);

        let mut out = format!("{}\n{}\n", self.header, Sample::HEADER);
        // Every sample for short runs, a sample a minute for long ones, and both windows.
        let stride = if samples.len() > 40 { 6 } else { 1 };
        for (i, sample) in samples.iter().enumerate() {
            let mark = if (first..first + WINDOW).contains(&i) {
                "start"
            } else if i >= samples.len() - WINDOW {
                "end"
            } else {
                ""
            };
            if i % stride == 0 || !mark.is_empty() {
                let _ = writeln!(out, "{}", sample.row(mark));
            }
        }
        let range = |value: &dyn Fn(&Sample) -> f64| {
            let values: Vec<f64> = samples.iter().map(value).collect();
            (values.iter().copied().fold(f64::INFINITY, f64::min), values.iter().copied().fold(0.0, f64::max))
        };
        let (rss_min, rss_max) = range(&|s| mib(s.rss_kib));
        let (fds_min, fds_max) = range(&|s| s.fds as f64);
        let open_in = |window: &[Sample]| {
            let open: Vec<String> = window.iter().map(|s| s.pool_open.to_string()).collect();
            format!("{} of {}", open.join("/"), self.connections)
        };
        let c = self.counters;
        let count = |n: u64| thousands(n as f64);
        let churn: Vec<String> = Churn::ALL
            .iter()
            .map(|k| format!("{} {}", count(c.churned[*k as usize].load(Relaxed)), k.describe()))
            .collect();
        let errors = c.errors.load(Relaxed);
        let optional = |v: Option<u64>| v.map_or("?".into(), |v| v.to_string());

        let _ = writeln!(
            out,
            "\nStart is the median of the {WINDOW} samples from {} (after {} s of warm-up), end the median \
             of the last {WINDOW}; long-lived connections open in them: {} at the start, {} at the end.\n",
            clock(WARMUP),
            WARMUP.as_secs(),
            open_in(start),
            open_in(end),
        );
        let _ = writeln!(out, "- {}", rss.describe("RSS", " MiB", 1));
        let _ = writeln!(out, "- {}", fds.describe("open descriptors", "", 0));
        let _ = writeln!(
            out,
            "- over the run: RSS {rss_min:.1}–{rss_max:.1} MiB, descriptors {fds_min}–{fds_max}; idle before the \
             load {:.1} MiB and {} descriptors, idle after every client closed {:.1} MiB and {} descriptors \
             ({} gateway connections left)",
            mib(self.idle_before.rss_kib),
            self.idle_before.fds,
            mib(self.idle_after.rss_kib),
            self.idle_after.fds,
            optional(self.idle_after.gateway_conns),
        );
        let last = samples.last().expect("samples");
        let _ = writeln!(
            out,
            "- work: {} echoes on long-lived connections ({} connects, {} closed by the gateway with 1011 when \
             their backend was killed); new connections: {} ({} ticks skipped with {CHURN_IN_FLIGHT} in flight); \
             reloads: {}; backend kills: {}",
            count(last.echoes),
            count(c.pool_connects.load(Relaxed)),
            count(c.pool_upstream_gone.load(Relaxed)),
            churn.join(", "),
            count(c.churn_skipped.load(Relaxed)),
            last.reloads,
            last.kills,
        );
        let _ = writeln!(
            out,
            "- gateway: {:.1}% of one core on average; {} failed plugin calls (handled by their on_error), {} \
             failed upstream connects (the killed backends; clients were failed over); log: {}",
            self.cpu_percent,
            optional(self.plugin_failures),
            optional(self.connect_failures),
            self.gateway_log,
        );
        let first_errors = c.first_errors.lock().unwrap();
        let _ = writeln!(
            out,
            "- unexpected client errors: {errors}{}",
            if first_errors.is_empty() { String::new() } else { format!("; first: {}", first_errors.join(" | ")) }
        );
        let _ = writeln!(out, "- load average at the end: {}", machine::load_average());
        let mut failures = Vec::new();
        if !rss.holds() {
            failures.push("RSS did not end within 10% of the start".to_string());
        }
        if !fds.holds() {
            failures.push("open descriptors did not end within 10% of the start".to_string());
        }
        if !start.iter().chain(end).all(|s| s.pool_open == self.connections) {
            failures.push("some long-lived connections were not open in a window, so start and end differ".into());
        }
        if errors > 0 {
            failures.push(format!("{errors} unexpected client errors"));
        }
        let verdict = if failures.is_empty() {
            "PASS: RSS and open descriptors ended within 10% of the start, every long-lived connection open, \
             no unexpected error"
                .to_string()
        } else {
            format!("FAIL: {}", failures.join("; "))
        };
        let _ = writeln!(out, "\n**{verdict}.**");
        (out, failures.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3-minute run whose last three samples have `end_rss_kib`, `end_fds` and `end_open`.
    fn verdict(end_rss_kib: u64, end_fds: usize, end_open: u64, counters: &Counters) -> (String, bool) {
        let sample = |secs: u64, rss_kib: u64, fds: usize, pool_open: u64| Sample {
            at: Duration::from_secs(secs),
            rss_kib,
            fds,
            gateway_conns: Some(pool_open),
            pool_open,
            churned: secs * 40,
            echoes: secs * 200,
            reloads: secs / 60,
            kills: 0,
            errors: 0,
        };
        let samples = (0..=18)
            .map(|n| match n {
                16.. => sample(n * 10, end_rss_kib, end_fds, end_open),
                _ => sample(n * 10, 40_000, 400, 200),
            })
            .collect();
        let report = Report {
            header: "## soak".into(),
            samples,
            idle_before: sample(0, 39_000, 16, 0),
            idle_after: sample(180, 39_500, 16, 0),
            counters,
            connections: 200,
            cpu_percent: 5.0,
            plugin_failures: Some(0),
            connect_failures: Some(0),
            gateway_log: "no warnings or errors".into(),
        };
        report.render()
    }

    #[test]
    fn verdict_needs_every_condition() {
        let quiet = Counters::default();
        let (text, passed) = verdict(43_000, 430, 200, &quiet);
        assert!(passed, "{text}");
        assert!(text.contains("| 1:00 | 39.1 | 400 | 200 | 200 | 2,400 | 12,000 | 1 | 0 | 0 | start |"), "{text}");
        assert!(text.contains("RSS: start 39.1 MiB, end 42.0 MiB (+7.5%): within 10%"), "{text}");

        let (text, passed) = verdict(45_000, 400, 200, &quiet);
        assert!(!passed && text.contains("FAIL: RSS did not end within 10%"), "{text}");
        let (text, passed) = verdict(40_000, 355, 200, &quiet);
        assert!(!passed && text.contains("FAIL: open descriptors did not end within 10%"), "{text}");
        let (text, passed) = verdict(40_000, 400, 190, &quiet);
        assert!(!passed && text.contains("190/190/190 of 200 at the end"), "{text}");

        let troubled = Counters::default();
        troubled.error("long-lived connection", anyhow::anyhow!("no echo within 5s"));
        let (text, passed) = verdict(40_000, 400, 200, &troubled);
        assert!(!passed && text.contains("FAIL: 1 unexpected client errors"), "{text}");
        assert!(text.contains("first: long-lived connection: no echo within 5s"), "{text}");
    }

    #[test]
    fn change_is_relative_to_the_start() {
        assert!(Change { start: 100.0, end: 109.0 }.holds());
        assert!(!Change { start: 100.0, end: 89.0 }.holds());
        assert!(!Change { start: 100.0, end: 111.0 }.holds());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
