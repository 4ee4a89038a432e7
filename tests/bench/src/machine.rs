//! Facts about the machine for the table header, so a result can be read in its context.

use std::process::Command;

/// Date, cores, CPU model, kernel and load average (other work on a 2-core machine moves the
/// numbers, so it belongs next to them).
pub fn describe() -> String {
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "unknown date".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = read_trimmed("/proc/sys/kernel/osrelease");
    format!("{date} · nproc {nproc} · {cpu} · Linux {kernel} · load average {}", load_average())
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    read_trimmed("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The 1-minute load average.
pub fn load_1min() -> f64 {
    load_average().split_whitespace().next().and_then(|l| l.parse().ok()).unwrap_or(0.0)
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_else(|_| "?".into())
}
