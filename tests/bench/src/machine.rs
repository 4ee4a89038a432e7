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

/// The kernel's TCP counters that tell whether connection attempts waited on the kernel
/// rather than on a proxy: `ListenOverflows` (a SYN or a completed handshake dropped
/// because a listener's accept queue was full) and `TCPSynRetrans` (SYNs a client sent
/// again, each after a backoff of 1 s, then 2 s, 4 s...). They count for the whole network
/// namespace, so they are read around a run with nothing else connecting.
#[derive(Clone, Copy, Debug, Default)]
pub struct ListenCounters {
    pub listen_overflows: u64,
    pub syn_retransmits: u64,
}

impl ListenCounters {
    /// Now, from `/proc/net/netstat` (zeros where the kernel has no such counter).
    pub fn read() -> ListenCounters {
        let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let mut counters = ListenCounters::default();
        // Pairs of lines: "TcpExt: NAME NAME ..." then "TcpExt: VALUE VALUE ...".
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            if !names.starts_with("TcpExt:") {
                continue;
            }
            for (name, value) in names.split_whitespace().zip(values.split_whitespace()).skip(1) {
                let value = value.parse().unwrap_or(0);
                match name {
                    "ListenOverflows" => counters.listen_overflows = value,
                    "TCPSynRetrans" => counters.syn_retransmits = value,
                    _ => {}
                }
            }
        }
        counters
    }

    /// What was counted between `earlier` and now (`self`).
    pub fn since(self, earlier: ListenCounters) -> ListenCounters {
        ListenCounters {
            listen_overflows: self.listen_overflows.saturating_sub(earlier.listen_overflows),
            syn_retransmits: self.syn_retransmits.saturating_sub(earlier.syn_retransmits),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_counters_are_read_and_differenced() {
        // Every Linux kernel since 2.6 has both counters; a zero here would mean a misread.
        let now = ListenCounters::read();
        let later = ListenCounters { listen_overflows: now.listen_overflows + 3, syn_retransmits: now.syn_retransmits + 5 };
        let d = later.since(now);
        assert_eq!((d.listen_overflows, d.syn_retransmits), (3, 5));
        assert!(std::fs::read_to_string("/proc/net/netstat").unwrap().contains("ListenOverflows"));
    }
}
