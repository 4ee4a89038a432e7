//! What permessage-deflate costs the gateway: memory per connection, CPU per MiB and the
//! compression ratio on a market-data-like JSON stream.
//!
//!     cargo bench -p wasmgate --bench deflate            # everything
//!     cargo bench -p wasmgate --bench deflate -- memory  # one part: memory | cpu
//!
//! Memory is measured in a fresh child process per setting (the allocator's state would
//! otherwise carry over), as the growth of the resident set for N connections, each with
//! a deflater and an inflater that handled one message each way.

use std::process::Command;
use std::time::Instant;

use wasmgate::compression::{CodecParams, Deflater, Inflater};

const CONNECTIONS: usize = 1000;
const MAX_MESSAGE: u64 = 16 << 20;

/// A deterministic xorshift generator: the same stream on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const SYMBOLS: &[&str] = &[
    "BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD", "ADA-USD", "DOGE-USD", "AVAX-USD", "DOT-USD",
    "LINK-USD", "MATIC-USD", "LTC-USD", "BCH-USD", "ATOM-USD", "UNI-USD", "ETC-USD", "XLM-USD",
];

/// Market data as exchanges stream it: tickers, trades and order-book deltas, 100–900 bytes.
fn market_data(count: usize) -> Vec<Vec<u8>> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut seq = 18_000_000u64;
    let mut ts = 1_718_000_000_000_000u64;
    let mut prices: Vec<f64> = SYMBOLS.iter().enumerate().map(|(i, _)| 10.0 + 1000.0 * (i as f64 + 1.0)).collect();
    (0..count)
        .map(|_| {
            seq += 1;
            ts += rng.below(5000);
            let s = rng.below(SYMBOLS.len() as u64) as usize;
            prices[s] *= 1.0 + (rng.below(2001) as f64 - 1000.0) / 1_000_000.0;
            let p = prices[s];
            let kind = rng.below(10);
            let msg = if kind < 5 {
                format!(
                    r#"{{"type":"ticker","sequence":{seq},"product_id":"{}","price":"{p:.2}","open_24h":"{:.2}","volume_24h":"{:.8}","low_24h":"{:.2}","high_24h":"{:.2}","best_bid":"{:.2}","best_bid_size":"{:.8}","best_ask":"{:.2}","best_ask_size":"{:.8}","side":"{}","time":"2024-06-10T06:{:02}:{:02}.{:06}Z","trade_id":{},"last_size":"{:.8}"}}"#,
                    SYMBOLS[s],
                    p * 0.98,
                    rng.below(100_000_000) as f64 / 1000.0,
                    p * 0.97,
                    p * 1.02,
                    p - 0.01,
                    rng.below(10_000_000) as f64 / 1e7,
                    p + 0.01,
                    rng.below(10_000_000) as f64 / 1e7,
                    if rng.below(2) == 0 { "buy" } else { "sell" },
                    (ts / 60_000_000) % 60,
                    (ts / 1_000_000) % 60,
                    ts % 1_000_000,
                    600_000_000 + seq,
                    rng.below(10_000_000) as f64 / 1e7,
                )
            } else if kind < 8 {
                format!(
                    r#"{{"type":"match","trade_id":{},"sequence":{seq},"maker_order_id":"{:016x}-{:08x}","taker_order_id":"{:016x}-{:08x}","side":"{}","size":"{:.8}","price":"{p:.2}","product_id":"{}","time":"2024-06-10T06:{:02}:{:02}.{:06}Z"}}"#,
                    600_000_000 + seq,
                    rng.next(),
                    rng.next() as u32,
                    rng.next(),
                    rng.next() as u32,
                    if rng.below(2) == 0 { "buy" } else { "sell" },
                    rng.below(10_000_000) as f64 / 1e7,
                    SYMBOLS[s],
                    (ts / 60_000_000) % 60,
                    (ts / 1_000_000) % 60,
                    ts % 1_000_000,
                )
            } else {
                let changes: Vec<String> = (0..1 + rng.below(12))
                    .map(|_| {
                        let side = if rng.below(2) == 0 { "buy" } else { "sell" };
                        let price = p + (rng.below(200) as f64 - 100.0) / 100.0;
                        format!(r#"["{side}","{price:.2}","{:.8}"]"#, rng.below(100_000_000) as f64 / 1e8)
                    })
                    .collect();
                format!(
                    r#"{{"type":"l2update","product_id":"{}","changes":[{}],"time":"2024-06-10T06:{:02}:{:02}.{:06}Z"}}"#,
                    SYMBOLS[s],
                    changes.join(","),
                    (ts / 60_000_000) % 60,
                    (ts / 1_000_000) % 60,
                    ts % 1_000_000,
                )
            };
            msg.into_bytes()
        })
        .collect()
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Child process: N connections at one setting, with a deflater, an inflater or both
/// (`parts`); prints the resident set "before lazy active released" in bytes.
fn memory_child(bits: u8, nct: bool, parts: &str) {
    let message = &market_data(1)[0];
    let params = CodecParams { window_bits: bits, no_context_takeover: nct };
    let mut wire = Vec::new();
    Deflater::new(params).compress(message, &mut wire);
    let mut out = Vec::with_capacity(message.len());
    let (deflate, inflate) = (parts != "inflate", parts != "deflate");
    let before = rss_bytes();
    let mut conns: Vec<(Deflater, Inflater)> = (0..CONNECTIONS)
        .map(|_| (Deflater::new(params), Inflater::new(params, MAX_MESSAGE)))
        .collect();
    let lazy = rss_bytes();
    for (deflater, inflater) in &mut conns {
        if deflate {
            let mut w = Vec::with_capacity(wire.len() + 64);
            deflater.compress(message, &mut w);
        }
        if inflate {
            out.clear();
            inflater.decompress(&wire, &mut out).unwrap();
        }
    }
    let active = rss_bytes();
    for (deflater, inflater) in &mut conns {
        deflater.release();
        inflater.release();
    }
    let released = rss_bytes();
    println!("{before} {lazy} {active} {released}");
    std::hint::black_box(&conns);
}

/// Runs a child; returns KiB per connection for (lazy, active, released).
fn measure(bits: u8, nct: bool, parts: &str, fixed_mmap_threshold: bool) -> [f64; 3] {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--memory-child", &bits.to_string(), if nct { "nct" } else { "takeover" }, parts]);
    if fixed_mmap_threshold {
        // glibc: a fixed threshold turns off the dynamic one, so every zlib state is its
        // own mapping and free() gives it back to the system.
        cmd.env("MALLOC_MMAP_THRESHOLD_", "131072");
    }
    let out = cmd.output().expect("run child");
    let v: Vec<f64> =
        String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|x| x.parse().ok()).collect();
    let per = |x: f64| (x - v[0]).max(0.0) / CONNECTIONS as f64 / 1024.0;
    [per(v[1]), per(v[2]), per(v[3])]
}

fn memory() {
    println!("## Memory per connection ({CONNECTIONS} connections in a fresh process per cell; resident set growth)");
    println!();
    println!("| window bits | context takeover | created, no message | deflater only | inflater only | both, after one message each way | both, after release() | same, glibc MALLOC_MMAP_THRESHOLD_=131072 |");
    println!("|---|---|---|---|---|---|---|---|");
    for bits in [9u8, 12, 15] {
        for nct in [false, true] {
            let both = measure(bits, nct, "both", false);
            let deflate = measure(bits, nct, "deflate", false);
            let inflate = measure(bits, nct, "inflate", false);
            let fixed = measure(bits, nct, "both", true);
            println!(
                "| {bits} | {} | {:.1} KiB | {:.1} KiB | {:.1} KiB | {:.1} KiB | {:.1} KiB | {:.1} KiB |",
                if nct { "no" } else { "yes" },
                both[0],
                deflate[1],
                inflate[1],
                both[1],
                both[2],
                fixed[2],
            );
        }
    }
    println!();
    println!("release() frees nothing with context takeover: the state is the shared window.");
    println!();
}

fn cpu() {
    let messages = market_data(20_000);
    let total: usize = messages.iter().map(Vec::len).sum();
    let mib = total as f64 / (1 << 20) as f64;
    println!(
        "## CPU and ratio: {} market-data JSON messages, {:.2} MiB, {} bytes on average",
        messages.len(),
        mib,
        total / messages.len()
    );
    println!();
    println!("| level | window bits | context takeover | ratio (compressed/plain) | deflate ms/MiB | inflate ms/MiB | deflate µs/msg | inflate µs/msg |");
    println!("|---|---|---|---|---|---|---|---|");
    for level in [1u32, 6] {
        for bits in [9u8, 12, 15] {
            for (nct, release) in [(false, false), (true, false), (true, true)] {
                let params = CodecParams { window_bits: bits, no_context_takeover: nct };
                let mut deflater = Deflater::with_level(params, level);
                let mut payloads = Vec::with_capacity(messages.len());
                let started = Instant::now();
                for m in &messages {
                    let mut out = Vec::with_capacity(m.len() / 2 + 64);
                    deflater.compress(m, &mut out);
                    if release {
                        deflater.release();
                    }
                    payloads.push(out);
                }
                let deflate = started.elapsed();
                let compressed: usize = payloads.iter().map(Vec::len).sum();
                let mut inflater = Inflater::new(params, MAX_MESSAGE);
                let mut out = Vec::with_capacity(64 * 1024);
                let started = Instant::now();
                for p in &payloads {
                    out.clear();
                    inflater.decompress(p, &mut out).unwrap();
                    if release {
                        inflater.release();
                    }
                }
                let inflate = started.elapsed();
                let takeover = match (nct, release) {
                    (false, _) => "yes",
                    (true, false) => "no",
                    (true, true) => "no, release() after each message",
                };
                let n = messages.len() as f64;
                println!(
                    "| {level} | {bits} | {takeover} | {:.3} | {:.1} | {:.1} | {:.2} | {:.2} |",
                    compressed as f64 / total as f64,
                    deflate.as_secs_f64() * 1000.0 / mib,
                    inflate.as_secs_f64() * 1000.0 / mib,
                    deflate.as_secs_f64() * 1e6 / n,
                    inflate.as_secs_f64() * 1e6 / n,
                );
            }
        }
    }
    println!();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--memory-child") {
        memory_child(args[1].parse().unwrap(), args[2] == "nct", &args[3]);
        return;
    }
    // cargo bench passes --bench; anything else names a part.
    let parts: Vec<&str> = args.iter().map(String::as_str).filter(|a| !a.starts_with("--")).collect();
    if parts.is_empty() || parts.contains(&"memory") {
        memory();
    }
    if parts.is_empty() || parts.contains(&"cpu") {
        cpu();
    }
}
