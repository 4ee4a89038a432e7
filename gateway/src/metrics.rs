//! A small metrics registry rendered in the Prometheus text exposition format (0.0.4).
//!
//! Registering a series (a metric name plus one set of label values) takes a lock and returns
//! a handle; the handle updates atomics, so the hot path never locks. Registering the same
//! series twice returns a handle to the same value, which is how a reloaded plugin keeps its
//! counters.
//!
//! `counter`, `gauge` and `histogram` are for the gateway's own, fixed series: a bad name or a
//! kind conflict is a bug there and panics. The `try_` forms are for untrusted callers
//! (plugins): they return an error instead, bound the size of what they register (name, label
//! count and label bytes, see [`LabelLimits`]), and count every new series against the
//! caller's own [`SeriesBudget`] as well as the registry's total, so a plugin that puts a
//! connection id or a megabyte in a label can neither grow `/metrics` without bound nor use up
//! the room of another.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
// The registry's lock guards maps that every change leaves whole (one insert after the
// checks), so a panic elsewhere while it was held does not make it unusable.
use std::sync::{Arc, PoisonError, RwLock};

/// Prometheus' default histogram buckets, in seconds.
pub const DEFAULT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Series the `try_` methods may create before they start refusing.
pub const DEFAULT_SERIES_LIMIT: usize = 10_000;

/// How much one untrusted series may carry: its name, its labels, and their bytes.
pub struct LabelLimits;

impl LabelLimits {
    pub const NAME_BYTES: usize = 128;
    pub const LABELS: usize = 8;
    pub const VALUE_BYTES: usize = 128;
    /// Label names and values of one series together.
    pub const SERIES_BYTES: usize = 256;
}

/// The series one untrusted caller (a plugin) may create, counted as it creates them.
/// Series are never removed, so neither is their count: a plugin reloaded keeps both.
#[derive(Debug)]
pub struct SeriesBudget {
    limit: AtomicUsize,
    used: AtomicUsize,
}

impl SeriesBudget {
    pub fn new(limit: usize) -> SeriesBudget {
        SeriesBudget { limit: AtomicUsize::new(limit), used: AtomicUsize::new(0) }
    }

    /// A reload may change the limit; series already made stay.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }
}

/// Why a series could not be registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricError {
    InvalidName(String),
    InvalidLabel(String),
    /// The name is already registered as another kind of metric.
    KindConflict {
        name: String,
        existing: &'static str,
    },
    TooManySeries(usize),
    /// The caller's own budget of series is used up.
    BudgetSpent(usize),
    /// A name or label set past [`LabelLimits`].
    TooLarge(String),
}

impl fmt::Display for MetricError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricError::InvalidName(n) => write!(f, "invalid metric name `{n}`"),
            MetricError::InvalidLabel(n) => write!(f, "invalid label name `{n}`"),
            MetricError::KindConflict { name, existing } => {
                write!(f, "metric `{name}` is already registered as a {existing}")
            }
            MetricError::TooManySeries(limit) => {
                write!(f, "the registry holds its limit of {limit} series")
            }
            MetricError::BudgetSpent(limit) => {
                write!(f, "this plugin holds its limit of {limit} series")
            }
            MetricError::TooLarge(what) => f.write_str(what),
        }
    }
}

impl std::error::Error for MetricError {}

/// A monotonically increasing count.
#[derive(Clone, Debug, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down; stored as f64 bits.
#[derive(Clone, Debug)]
pub struct Gauge(Arc<AtomicU64>);

impl Gauge {
    fn new() -> Gauge {
        Gauge(Arc::new(AtomicU64::new(0f64.to_bits())))
    }
    #[inline]
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    #[inline]
    pub fn add(&self, delta: f64) {
        add_f64(&self.0, delta);
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1.0);
    }
    #[inline]
    pub fn dec(&self) {
        self.add(-1.0);
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Counts of observations in fixed buckets, plus their sum.
#[derive(Clone, Debug)]
pub struct Histogram(Arc<HistogramCore>);

#[derive(Debug)]
struct HistogramCore {
    /// Upper bounds, ascending; the implicit last bucket is +Inf.
    bounds: Arc<[f64]>,
    /// Per-bucket (not cumulative) counts, one more than `bounds`.
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl Histogram {
    fn new(bounds: Arc<[f64]>) -> Histogram {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Histogram(Arc::new(HistogramCore {
            bounds,
            counts,
            sum: AtomicU64::new(0f64.to_bits()),
        }))
    }

    #[inline]
    pub fn observe(&self, v: f64) {
        let core = &*self.0;
        let i = core.bounds.partition_point(|&b| b < v);
        core.counts[i].fetch_add(1, Ordering::Relaxed);
        add_f64(&core.sum, v);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    pub fn sum(&self) -> f64 {
        f64::from_bits(self.0.sum.load(Ordering::Relaxed))
    }

    /// The upper bounds, and the count of each bucket (not cumulative; one more than the
    /// bounds: the last is above them all).
    pub fn buckets(&self) -> (&[f64], Vec<u64>) {
        (&self.0.bounds, self.0.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect())
    }
}

fn add_f64(cell: &AtomicU64, delta: f64) {
    let mut cur = cell.load(Ordering::Relaxed);
    loop {
        let new = (f64::from_bits(cur) + delta).to_bits();
        match cell.compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(actual) => cur = actual,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Clone)]
enum Series {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
}

struct Family {
    help: String,
    kind: Kind,
    /// Histogram bucket bounds, shared by every series of the family.
    buckets: Arc<[f64]>,
    /// Keyed by the rendered, sorted label set (`a="x",b="y"`), which is also what `render`
    /// prints.
    series: BTreeMap<String, Series>,
}

/// The set of all metrics; one per gateway, shared behind an `Arc`.
pub struct Registry {
    families: RwLock<BTreeMap<String, Family>>,
    series: AtomicUsize,
    series_limit: usize,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::with_series_limit(DEFAULT_SERIES_LIMIT)
    }
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// A registry whose `try_` methods refuse to create more than `limit` series in total.
    pub fn with_series_limit(limit: usize) -> Registry {
        Registry {
            families: RwLock::new(BTreeMap::new()),
            series: AtomicUsize::new(0),
            series_limit: limit,
        }
    }

    /// Panics on an invalid name or label, or a name registered as another kind.
    pub fn counter<K: AsRef<str>, V: AsRef<str>>(
        &self,
        name: &str,
        help: &str,
        labels: &[(K, V)],
    ) -> Counter {
        match self.series(Kind::Counter, name, help, labels, &[], None) {
            Ok(Series::Counter(c)) => c,
            Ok(_) => unreachable!("kind checked by `series`"),
            Err(e) => panic!("{e}"),
        }
    }

    /// Panics on an invalid name or label, or a name registered as another kind.
    pub fn gauge<K: AsRef<str>, V: AsRef<str>>(
        &self,
        name: &str,
        help: &str,
        labels: &[(K, V)],
    ) -> Gauge {
        match self.series(Kind::Gauge, name, help, labels, &[], None) {
            Ok(Series::Gauge(g)) => g,
            Ok(_) => unreachable!("kind checked by `series`"),
            Err(e) => panic!("{e}"),
        }
    }

    /// `buckets` are ascending upper bounds; the family's first registration decides them.
    /// Panics on an invalid name or label, or a name registered as another kind.
    pub fn histogram<K: AsRef<str>, V: AsRef<str>>(
        &self,
        name: &str,
        help: &str,
        labels: &[(K, V)],
        buckets: &[f64],
    ) -> Histogram {
        match self.series(Kind::Histogram, name, help, labels, buckets, None) {
            Ok(Series::Histogram(h)) => h,
            Ok(_) => unreachable!("kind checked by `series`"),
            Err(e) => panic!("{e}"),
        }
    }

    pub fn try_counter<K: AsRef<str>, V: AsRef<str>>(
        &self,
        name: &str,
        help: &str,
        labels: &[(K, V)],
        budget: &SeriesBudget,
    ) -> Result<Counter, MetricError> {
        match self.series(Kind::Counter, name, help, labels, &[], Some(budget))? {
            Series::Counter(c) => Ok(c),
            _ => unreachable!("kind checked by `series`"),
        }
    }

    pub fn try_gauge<K: AsRef<str>, V: AsRef<str>>(
        &self,
        name: &str,
        help: &str,
        labels: &[(K, V)],
        budget: &SeriesBudget,
    ) -> Result<Gauge, MetricError> {
        match self.series(Kind::Gauge, name, help, labels, &[], Some(budget))? {
            Series::Gauge(g) => Ok(g),
            _ => unreachable!("kind checked by `series`"),
        }
    }

    pub fn try_histogram<K: AsRef<str>, V: AsRef<str>>(
        &self,
        name: &str,
        help: &str,
        labels: &[(K, V)],
        buckets: &[f64],
        budget: &SeriesBudget,
    ) -> Result<Histogram, MetricError> {
        match self.series(Kind::Histogram, name, help, labels, buckets, Some(budget))? {
            Series::Histogram(h) => Ok(h),
            _ => unreachable!("kind checked by `series`"),
        }
    }

    fn series<K: AsRef<str>, V: AsRef<str>>(
        &self,
        kind: Kind,
        name: &str,
        help: &str,
        labels: &[(K, V)],
        buckets: &[f64],
        budget: Option<&SeriesBudget>,
    ) -> Result<Series, MetricError> {
        if budget.is_some() {
            check_size(name, labels)?;
        }
        if !valid_metric_name(name) {
            return Err(MetricError::InvalidName(name.to_string()));
        }
        let key = label_key(labels, kind)?;
        let check_kind = |family: &Family| {
            if family.kind == kind {
                Ok(())
            } else {
                Err(MetricError::KindConflict {
                    name: name.to_string(),
                    existing: family.kind.name(),
                })
            }
        };
        if let Some(family) = self.families.read().unwrap_or_else(PoisonError::into_inner).get(name) {
            check_kind(family)?;
            if let Some(s) = family.series.get(&key) {
                return Ok(s.clone());
            }
        }
        let mut families = self.families.write().unwrap_or_else(PoisonError::into_inner);
        let family = families.entry(name.to_string()).or_insert_with(|| Family {
            help: help.to_string(),
            kind,
            buckets: sorted_buckets(buckets),
            series: BTreeMap::new(),
        });
        check_kind(family)?;
        if let Some(s) = family.series.get(&key) {
            return Ok(s.clone());
        }
        if let Some(budget) = budget {
            if self.series.load(Ordering::Relaxed) >= self.series_limit {
                return Err(MetricError::TooManySeries(self.series_limit));
            }
            let limit = budget.limit();
            if budget.used.load(Ordering::Relaxed) >= limit {
                return Err(MetricError::BudgetSpent(limit));
            }
            // Checked and counted under the write lock: no two callers pass the check for
            // the last slot.
            budget.used.fetch_add(1, Ordering::Relaxed);
        }
        let series = match kind {
            Kind::Counter => Series::Counter(Counter::default()),
            Kind::Gauge => Series::Gauge(Gauge::new()),
            Kind::Histogram => Series::Histogram(Histogram::new(family.buckets.clone())),
        };
        family.series.insert(key, series.clone());
        self.series.fetch_add(1, Ordering::Relaxed);
        Ok(series)
    }

    /// Every series, in the Prometheus text format, families sorted by name.
    pub fn render(&self) -> String {
        let families = self.families.read().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::with_capacity(4096);
        for (name, family) in families.iter() {
            let _ = writeln!(out, "# HELP {name} {}", escape_help(&family.help));
            let _ = writeln!(out, "# TYPE {name} {}", family.kind.name());
            for (labels, series) in &family.series {
                match series {
                    Series::Counter(c) => {
                        write_sample(&mut out, name, "", labels, "", &c.get().to_string())
                    }
                    Series::Gauge(g) => {
                        write_sample(&mut out, name, "", labels, "", &fmt_f64(g.get()))
                    }
                    Series::Histogram(h) => render_histogram(&mut out, name, labels, h),
                }
            }
        }
        out
    }
}

fn render_histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let core = &*h.0;
    let mut cumulative = 0u64;
    for (i, count) in core.counts.iter().enumerate() {
        cumulative += count.load(Ordering::Relaxed);
        let le = match core.bounds.get(i) {
            Some(b) => format!("le=\"{}\"", fmt_f64(*b)),
            None => "le=\"+Inf\"".to_string(),
        };
        write_sample(out, name, "_bucket", labels, &le, &cumulative.to_string());
    }
    write_sample(out, name, "_sum", labels, "", &fmt_f64(h.sum()));
    // The +Inf bucket's total, so `_count` always agrees with it under concurrent updates.
    write_sample(out, name, "_count", labels, "", &cumulative.to_string());
}

fn write_sample(out: &mut String, name: &str, suffix: &str, labels: &str, extra: &str, v: &str) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() || !extra.is_empty() {
        out.push('{');
        out.push_str(labels);
        if !labels.is_empty() && !extra.is_empty() {
            out.push(',');
        }
        out.push_str(extra);
        out.push('}');
    }
    out.push(' ');
    out.push_str(v);
    out.push('\n');
}

fn sorted_buckets(buckets: &[f64]) -> Arc<[f64]> {
    let mut b: Vec<f64> = buckets.iter().copied().filter(|b| b.is_finite()).collect();
    b.sort_by(f64::total_cmp);
    b.dedup();
    b.into()
}

/// Refuses an untrusted name or label set past [`LabelLimits`], before anything is built
/// from it.
fn check_size<K: AsRef<str>, V: AsRef<str>>(name: &str, labels: &[(K, V)]) -> Result<(), MetricError> {
    let too_large = |what: String| Err(MetricError::TooLarge(what));
    if name.len() > LabelLimits::NAME_BYTES {
        return too_large(format!("metric name longer than {} bytes", LabelLimits::NAME_BYTES));
    }
    if labels.len() > LabelLimits::LABELS {
        return too_large(format!("{} labels, more than {}", labels.len(), LabelLimits::LABELS));
    }
    let mut total = 0;
    for (k, v) in labels {
        let (k, v) = (k.as_ref(), v.as_ref());
        if v.len() > LabelLimits::VALUE_BYTES {
            return too_large(format!("label {k}: a value of {} bytes, more than {}", v.len(), LabelLimits::VALUE_BYTES));
        }
        total += k.len() + v.len();
    }
    if total > LabelLimits::SERIES_BYTES {
        return too_large(format!("labels of {total} bytes, more than {}", LabelLimits::SERIES_BYTES));
    }
    Ok(())
}

/// The canonical form of a label set: sorted by name, values escaped.
fn label_key<K: AsRef<str>, V: AsRef<str>>(
    labels: &[(K, V)],
    kind: Kind,
) -> Result<String, MetricError> {
    let mut sorted: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_ref(), v.as_ref()))
        .collect();
    sorted.sort_unstable_by_key(|(k, _)| *k);
    let mut key = String::new();
    for (i, (k, v)) in sorted.iter().enumerate() {
        let reserved = kind == Kind::Histogram && *k == "le";
        let duplicate = i > 0 && sorted[i - 1].0 == *k;
        if !valid_label_name(k) || reserved || duplicate {
            return Err(MetricError::InvalidLabel(k.to_string()));
        }
        if i > 0 {
            key.push(',');
        }
        let _ = write!(key, "{k}=\"{}\"", escape_label_value(v));
    }
    Ok(key)
}

fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    !name.starts_with("__")
        && matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn escape_label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

fn fmt_f64(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_string()
    } else if v == f64::INFINITY {
        "+Inf".to_string()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_string()
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_LABELS: &[(&str, &str)] = &[];

    #[test]
    fn renders_every_kind() {
        let r = Registry::new();
        let c = r.counter("conns_total", "Connections.", &[("route", "/a")]);
        c.add(3);
        r.counter("conns_total", "ignored", &[("route", "/b\"x")])
            .inc();
        r.gauge("open", "Open now.", NO_LABELS).set(2.5);
        let h = r.histogram("lat_seconds", "Latency.", &[("x", "y")], &[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let text = r.render();
        let expected = "\
# HELP conns_total Connections.
# TYPE conns_total counter
conns_total{route=\"/a\"} 3
conns_total{route=\"/b\\\"x\"} 1
# HELP lat_seconds Latency.
# TYPE lat_seconds histogram
lat_seconds_bucket{x=\"y\",le=\"0.1\"} 1
lat_seconds_bucket{x=\"y\",le=\"1\"} 2
lat_seconds_bucket{x=\"y\",le=\"+Inf\"} 3
lat_seconds_sum{x=\"y\"} 5.55
lat_seconds_count{x=\"y\"} 3
# HELP open Open now.
# TYPE open gauge
open 2.5
";
        assert_eq!(text, expected);
    }

    #[test]
    fn same_series_shares_its_value_and_label_order_does_not_matter() {
        let r = Registry::new();
        r.counter("c", "", &[("a", "1"), ("b", "2")]).inc();
        r.counter("c", "", &[("b", "2"), ("a", "1")]).inc();
        assert_eq!(r.counter("c", "", &[("a", "1"), ("b", "2")]).get(), 2);
    }

    #[test]
    fn try_methods_report_errors_and_enforce_the_limit() {
        let r = Registry::with_series_limit(2);
        let b = SeriesBudget::new(100);
        assert!(matches!(
            r.try_counter("bad name", "", NO_LABELS, &b),
            Err(MetricError::InvalidName(_))
        ));
        assert!(matches!(
            r.try_counter("x", "", &[("1a", "v")], &b),
            Err(MetricError::InvalidLabel(_))
        ));
        assert!(matches!(
            r.try_counter("x", "", &[("a", "v"), ("a", "w")], &b),
            Err(MetricError::InvalidLabel(_))
        ));
        assert!(matches!(
            r.try_histogram("h", "", &[("le", "1")], DEFAULT_BUCKETS, &b),
            Err(MetricError::InvalidLabel(_))
        ));
        r.try_counter("x", "", &[("a", "1")], &b).unwrap();
        assert!(matches!(
            r.try_gauge("x", "", NO_LABELS, &b),
            Err(MetricError::KindConflict { .. })
        ));
        r.try_gauge("g", "", NO_LABELS, &b).unwrap();
        assert_eq!(
            r.try_counter("x", "", &[("a", "2")], &b).unwrap_err(),
            MetricError::TooManySeries(2)
        );
        // Existing series are still handed out at the limit.
        r.try_counter("x", "", &[("a", "1")], &b).unwrap();
    }

    #[test]
    fn each_budget_is_its_own_and_sizes_are_bounded() {
        let r = Registry::new();
        let (greedy, other) = (SeriesBudget::new(3), SeriesBudget::new(3));
        for i in 0..3 {
            r.try_counter("hits_total", "", &[("id", i.to_string())], &greedy).unwrap();
        }
        assert_eq!(
            r.try_counter("hits_total", "", &[("id", "3")], &greedy).unwrap_err(),
            MetricError::BudgetSpent(3)
        );
        assert_eq!(greedy.used(), 3);
        // The greedy caller's spent budget costs the other nothing.
        r.try_counter("mine_total", "", NO_LABELS, &other).unwrap();
        // A failed registration spends nothing.
        let huge = "v".repeat(4 << 20);
        assert!(matches!(r.try_gauge("g", "", &[("k", huge.as_str())], &other), Err(MetricError::TooLarge(_))));
        let many: Vec<(String, String)> = (0..9).map(|i| (format!("l{i}"), "v".into())).collect();
        assert!(matches!(r.try_gauge("g", "", &many, &other), Err(MetricError::TooLarge(_))));
        let wide: Vec<(String, String)> = (0..3).map(|i| (format!("l{i}"), "v".repeat(100))).collect();
        assert!(matches!(r.try_gauge("g", "", &wide, &other), Err(MetricError::TooLarge(_))));
        assert!(matches!(r.try_gauge(&"n".repeat(200), "", NO_LABELS, &other), Err(MetricError::TooLarge(_))));
        assert_eq!(other.used(), 1);
        assert!(r.render().len() < 1024);
    }

    #[test]
    fn gauge_arithmetic_and_special_values() {
        let r = Registry::new();
        let g = r.gauge("g", "", NO_LABELS);
        g.inc();
        g.inc();
        g.dec();
        assert_eq!(g.get(), 1.0);
        g.set(f64::INFINITY);
        assert!(r.render().contains("g +Inf\n"));
    }
}
