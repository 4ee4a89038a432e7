//! Metrics on the gateway's admin `/metrics` page, named `wasmgate_plugin_<plugin>__<name>`
//! where `<plugin>` is the plugin's name in the gateway's config. Each plugin may have
//! `max_metric_series` series (default 256) with at most 8 labels of 128 bytes (256 bytes in
//! all); updates made by a hook call that fails are not recorded.
//!
//! Labels are `(name, value)` pairs: `metrics::counter_add("denied", &[("reason", "token")], 1)`.
//! Off Wasm they are recorded per thread so tests can read them back through
//! [`crate::testing`].

/// Adds `value` to a counter.
pub fn counter_add(name: &str, labels: &[(&str, &str)], value: u64) {
    #[cfg(target_arch = "wasm32")]
    host::counter_add(name, labels, value);
    #[cfg(not(target_arch = "wasm32"))]
    native::record(name, labels, |m| m.counter += value);
}

/// Sets a gauge.
pub fn gauge_set(name: &str, labels: &[(&str, &str)], value: f64) {
    #[cfg(target_arch = "wasm32")]
    host::gauge_set(name, labels, value);
    #[cfg(not(target_arch = "wasm32"))]
    native::record(name, labels, |m| m.gauge = Some(value));
}

/// Adds one observation to a histogram.
pub fn histogram_observe(name: &str, labels: &[(&str, &str)], value: f64) {
    #[cfg(target_arch = "wasm32")]
    host::histogram_observe(name, labels, value);
    #[cfg(not(target_arch = "wasm32"))]
    native::record(name, labels, |m| m.observations.push(value));
}

#[cfg(target_arch = "wasm32")]
use crate::bindings::wasmgate::plugin::metrics as host;

#[cfg(not(target_arch = "wasm32"))]
pub(crate) mod native {
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// Everything recorded under one name and label set.
    #[derive(Clone, Debug, Default)]
    pub struct Metric {
        pub counter: u64,
        pub gauge: Option<f64>,
        pub observations: Vec<f64>,
    }

    type Key = (String, Vec<(String, String)>);

    thread_local! {
        static METRICS: RefCell<HashMap<Key, Metric>> = RefCell::new(HashMap::new());
    }

    fn key(name: &str, labels: &[(&str, &str)]) -> Key {
        (
            name.to_string(),
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    pub fn record(name: &str, labels: &[(&str, &str)], update: impl FnOnce(&mut Metric)) {
        METRICS.with_borrow_mut(|m| update(m.entry(key(name, labels)).or_default()));
    }

    pub fn read(name: &str, labels: &[(&str, &str)]) -> Metric {
        METRICS.with_borrow(|m| m.get(&key(name, labels)).cloned().unwrap_or_default())
    }
}
