//! Metrics that plugins define (the `metrics` import): each plugin's under its own name
//! prefix, a bounded number of series per plugin, and recorded only when the hook call that
//! made them succeeds.
//!
//! - **Own names.** Plugin `limits` asking for `refused_total` gets
//!   `wasmgate_plugin_limits__refused_total`. The double underscore ends the plugin's part
//!   (which never holds one), so no plugin can name another's metric, and a name stays the
//!   type it was first registered as. Two plugins whose names would give the same prefix
//!   (`rate-limit` and `rate_limit`) are told so when the second loads; its metrics are
//!   refused rather than mixed with the first's.
//! - **Bounded.** Each plugin has a budget of series (`max_metric_series`, surviving reloads
//!   as the series do), and every series is bounded in size (`metrics::LabelLimits`), so
//!   `/metrics` stays small whatever a plugin puts in its labels.
//! - **Only from calls that succeed.** Updates wait in the instance until its call returns;
//!   a call that traps, times out or breaks the contract leaves no series behind, so a
//!   client cannot grow the registry by making a plugin fail.
//! - **Cheap when repeated.** Each instance keeps the series it updated before
//!   (`SeriesCache`), so a plugin counting every handshake pays a hash lookup, not the
//!   registry's name formatting, checks and shared lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::metrics::{Counter, Gauge, Histogram, MetricError, Registry, SeriesBudget, DEFAULT_BUCKETS};

/// Most metric updates one hook call may make; more are refused.
pub(super) const MAX_UPDATES_PER_CALL: usize = 64;

/// Most series one instance keeps handles to; past it, updates go to the registry each time.
const MAX_CACHED_SERIES: usize = 256;

const HELP: &str = "Defined by a plugin.";

/// One update a hook asked for, applied when the call succeeds.
pub(super) struct PendingUpdate {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: Value,
}

pub(super) enum Value {
    CounterAdd(u64),
    GaugeSet(f64),
    HistogramObserve(f64),
}

/// The series one instance has updated before, by the name and labels the plugin gave.
/// Measured in the `connect` benchmark, a plugin's two counter updates per handshake cost
/// about 6 µs through the registry (jwt-auth's call went from 11 to 17 µs), most of it
/// there: a formatted name, label checks and a key string, and a lock every worker shares.
/// A kept handle stays valid: the registry never drops a series, and a reload makes new
/// instances with empty caches.
#[derive(Default)]
pub(super) struct SeriesCache(HashMap<SeriesKey, Handle>);

#[derive(PartialEq, Eq, Hash)]
struct SeriesKey {
    kind: u8,
    name: String,
    labels: Vec<(String, String)>,
}

enum Handle {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
}

impl Value {
    fn kind(&self) -> u8 {
        match self {
            Value::CounterAdd(_) => 0,
            Value::GaugeSet(_) => 1,
            Value::HistogramObserve(_) => 2,
        }
    }

    fn record(&self, handle: &Handle) {
        match (self, handle) {
            (Value::CounterAdd(v), Handle::Counter(c)) => c.add(*v),
            (Value::GaugeSet(v), Handle::Gauge(g)) => g.set(*v),
            (Value::HistogramObserve(v), Handle::Histogram(h)) => h.observe(*v),
            _ => unreachable!("a handle is kept under its own kind"),
        }
    }
}

/// A plugin's metric names and series budget.
pub(super) struct Namespace {
    prefix: String,
    budget: Arc<SeriesBudget>,
}

impl Namespace {
    /// Applies the update to its series: the one `cache` kept, or the registry's (registered
    /// now if new, and then kept). A refusal comes back with the plugin's name for it.
    pub fn apply(
        &self,
        registry: &Registry,
        cache: &mut SeriesCache,
        update: PendingUpdate,
    ) -> Result<(), (String, MetricError)> {
        let PendingUpdate { name, labels, value } = update;
        let key = SeriesKey { kind: value.kind(), name, labels };
        if let Some(handle) = cache.0.get(&key) {
            value.record(handle);
            return Ok(());
        }
        let full_name = format!("{}{}", self.prefix, key.name);
        let (labels, budget) = (&key.labels, &*self.budget);
        let handle = match value {
            Value::CounterAdd(_) => registry.try_counter(&full_name, HELP, labels, budget).map(Handle::Counter),
            Value::GaugeSet(_) => registry.try_gauge(&full_name, HELP, labels, budget).map(Handle::Gauge),
            Value::HistogramObserve(_) => {
                registry.try_histogram(&full_name, HELP, labels, DEFAULT_BUCKETS, budget).map(Handle::Histogram)
            }
        };
        let handle = match handle {
            Ok(handle) => handle,
            Err(e) => return Err((key.name, e)),
        };
        value.record(&handle);
        if cache.0.len() < MAX_CACHED_SERIES {
            cache.0.insert(key, handle);
        }
        Ok(())
    }

    /// Series made so far, and the most allowed.
    pub fn usage(&self) -> (usize, usize) {
        (self.budget.used(), self.budget.limit())
    }
}

/// Which plugin owns each prefix, and its budget; one per runtime, so they outlive reloads.
#[derive(Default)]
pub(super) struct Namespaces(Mutex<HashMap<String, (String, Arc<SeriesBudget>)>>);

impl Namespaces {
    /// The namespace of `plugin`, allowed `max_series` series; an error when another plugin
    /// already has the same prefix.
    pub fn claim(&self, plugin: &str, max_series: usize) -> Result<Namespace, String> {
        let part = name_part(plugin);
        let prefix = format!("wasmgate_plugin_{part}__");
        let mut owners = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (owner, budget) = owners
            .entry(part)
            .or_insert_with(|| (plugin.to_string(), Arc::new(SeriesBudget::new(max_series))));
        if owner != plugin {
            return Err(format!(
                "its metrics would be named {prefix}*, as those of plugin `{owner}` are: rename one of them"
            ));
        }
        budget.set_limit(max_series);
        Ok(Namespace { prefix, budget: budget.clone() })
    }
}

/// A plugin's name as a metric name part: letters, digits and single underscores.
fn name_part(plugin: &str) -> String {
    let mut part = String::with_capacity(plugin.len());
    for c in plugin.chars() {
        let c = if c.is_ascii_alphanumeric() { c } else { '_' };
        if !(c == '_' && (part.is_empty() || part.ends_with('_'))) {
            part.push(c);
        }
    }
    while part.ends_with('_') {
        part.pop();
    }
    if part.is_empty() || part.starts_with(|c: char| c.is_ascii_digit()) {
        part.insert(0, 'p');
    }
    part
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_parts_hold_no_double_underscore() {
        assert_eq!(name_part("rate-limit"), "rate_limit");
        assert_eq!(name_part("a--b__c"), "a_b_c");
        assert_eq!(name_part("_x_"), "x");
        assert_eq!(name_part("9lives"), "p9lives");
        assert_eq!(name_part("ünï"), "n");
        assert_eq!(name_part("--"), "p");
    }

    #[test]
    fn a_prefix_belongs_to_one_plugin() {
        let spaces = Namespaces::default();
        let limits = spaces.claim("rate-limit", 10).unwrap();
        assert_eq!(limits.prefix, "wasmgate_plugin_rate_limit__");
        let err = spaces.claim("rate_limit", 10).err().unwrap();
        assert!(err.contains("plugin `rate-limit`"), "{err}");
        // A reload of the owner keeps its budget.
        let again = spaces.claim("rate-limit", 20).unwrap();
        assert!(Arc::ptr_eq(&limits.budget, &again.budget));
        assert_eq!(again.usage(), (0, 20));
    }

    #[test]
    fn one_plugin_cannot_take_another_plugins_name_or_type() {
        let registry = Registry::new();
        let spaces = Namespaces::default();
        let (hostile, limits) = (spaces.claim("hostile", 10).unwrap(), spaces.claim("limits", 10).unwrap());
        let update = |name: &str, value| PendingUpdate { name: name.into(), labels: vec![], value };
        let (mut hostile_cache, mut limits_cache) = (SeriesCache::default(), SeriesCache::default());
        hostile.apply(&registry, &mut hostile_cache, update("refused_total", Value::GaugeSet(1.0))).unwrap();
        limits.apply(&registry, &mut limits_cache, update("refused_total", Value::CounterAdd(2))).unwrap();
        // Within its own names a plugin keeps the type it chose first, with or without a
        // handle kept for the first type.
        let (name, err) =
            limits.apply(&registry, &mut limits_cache, update("refused_total", Value::GaugeSet(1.0))).unwrap_err();
        assert!(matches!(err, MetricError::KindConflict { .. }), "{err}");
        assert_eq!(name, "refused_total");
        let err = limits.apply(&registry, &mut SeriesCache::default(), update("refused_total", Value::GaugeSet(1.0)));
        assert!(matches!(err, Err((_, MetricError::KindConflict { .. }))));
        let text = registry.render();
        assert!(text.contains("wasmgate_plugin_limits__refused_total 2\n"), "{text}");
        assert!(text.contains("wasmgate_plugin_hostile__refused_total 1\n"), "{text}");
    }

    #[test]
    fn a_kept_series_counts_on_and_other_labels_are_other_series() {
        let registry = Registry::new();
        let spaces = Namespaces::default();
        let auth = spaces.claim("auth", 2).unwrap();
        let mut cache = SeriesCache::default();
        let update = |result: &str| PendingUpdate {
            name: "total".into(),
            labels: vec![("result".into(), result.into())],
            value: Value::CounterAdd(1),
        };
        for _ in 0..3 {
            auth.apply(&registry, &mut cache, update("ok")).unwrap();
        }
        auth.apply(&registry, &mut cache, update("denied")).unwrap();
        assert_eq!(cache.0.len(), 2);
        // The budget of 2 series is spent: a third is refused, kept handles still count.
        let (_, err) = auth.apply(&registry, &mut cache, update("expired")).unwrap_err();
        assert!(matches!(err, MetricError::BudgetSpent(2)), "{err}");
        auth.apply(&registry, &mut cache, update("ok")).unwrap();
        let text = registry.render();
        assert!(text.contains("wasmgate_plugin_auth__total{result=\"ok\"} 4\n"), "{text}");
        assert!(text.contains("wasmgate_plugin_auth__total{result=\"denied\"} 1\n"), "{text}");
        assert!(!text.contains("expired"), "{text}");
    }
}
