//! Named plugins that can be replaced while connections use them.
//!
//! A connection holds an `Arc<PluginSlot>` and asks it for the current version on every
//! call, so a reload reaches live connections at their next hook call, while a call in
//! progress finishes on the version it started with.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, Guard};
use serde::Serialize;

use super::cache::sha256_hex;
use super::engine::{PluginRuntime, PluginSpec};
use super::hooks::{Plugin, PluginInfo};

/// The current version of one named plugin.
pub struct PluginSlot {
    current: ArcSwap<Plugin>,
}

impl PluginSlot {
    /// The version to call now. Cheap (no reference count is touched in the common case);
    /// hold it for one call, not across awaits.
    pub fn current(&self) -> Guard<Arc<Plugin>> {
        self.current.load()
    }
}

pub struct PluginRegistry {
    runtime: Arc<PluginRuntime>,
    slots: ArcSwap<HashMap<String, Arc<PluginSlot>>>,
    /// One reconcile at a time; `get` never waits for it.
    reconciling: Mutex<()>,
}

/// What `reconcile` did with each plugin.
#[derive(Clone, Debug, Serialize)]
pub struct ReloadReport {
    pub plugins: Vec<ReloadEntry>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReloadEntry {
    pub name: String,
    #[serde(flatten)]
    pub outcome: ReloadOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ReloadOutcome {
    /// New, or changed and replaced.
    Loaded {
        hash: String,
    },
    Unchanged,
    /// Not loaded; the previous version, if any, keeps serving.
    Failed {
        error: String,
    },
    /// No longer configured; connections holding its slot keep using it.
    Removed,
}

impl ReloadReport {
    pub fn is_ok(&self) -> bool {
        self.failures().next().is_none()
    }

    /// `(name, error)` of each plugin that failed to load.
    pub fn failures(&self) -> impl Iterator<Item = (&str, &str)> {
        self.plugins.iter().filter_map(|p| match &p.outcome {
            ReloadOutcome::Failed { error } => Some((p.name.as_str(), error.as_str())),
            _ => None,
        })
    }
}

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.plugins.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            match &p.outcome {
                ReloadOutcome::Loaded { hash } => write!(f, "{}: loaded {}", p.name, &hash[..12])?,
                ReloadOutcome::Unchanged => write!(f, "{}: unchanged", p.name)?,
                ReloadOutcome::Failed { error } => write!(f, "{}: failed: {error}", p.name)?,
                ReloadOutcome::Removed => write!(f, "{}: removed", p.name)?,
            }
        }
        Ok(())
    }
}

impl PluginRegistry {
    pub fn new(runtime: Arc<PluginRuntime>) -> PluginRegistry {
        PluginRegistry {
            runtime,
            slots: ArcSwap::from_pointee(HashMap::new()),
            reconciling: Mutex::new(()),
        }
    }

    /// Makes the registry match `specs`: loads what is new or changed (wasm bytes, config or
    /// limits), keeps what is not, drops what is gone. A plugin that fails keeps its previous
    /// version. Blocking, and slow when something compiles: call from `spawn_blocking`.
    pub fn reconcile(&self, specs: &[PluginSpec]) -> ReloadReport {
        let _one_at_a_time = self.reconciling.lock().unwrap();
        let old = self.slots.load_full();
        let mut slots = HashMap::with_capacity(specs.len());
        let mut report = Vec::with_capacity(specs.len());
        let mut seen = HashSet::new();
        for spec in specs {
            let name = spec.name.clone();
            if !seen.insert(name.clone()) {
                let error = "configured more than once".to_string();
                report.push(ReloadEntry {
                    name,
                    outcome: ReloadOutcome::Failed { error },
                });
                continue;
            }
            let existing = old.get(&spec.name);
            let outcome = match self.reconcile_one(spec, existing) {
                Ok((outcome, slot)) => {
                    slots.insert(name.clone(), slot);
                    outcome
                }
                Err(error) => {
                    tracing::error!(target: "wasmgate::plugin", plugin = %name, "not loaded: {error}");
                    if let Some(slot) = existing {
                        slots.insert(name.clone(), slot.clone());
                    }
                    ReloadOutcome::Failed { error }
                }
            };
            report.push(ReloadEntry { name, outcome });
        }
        for name in old.keys().filter(|n| !seen.contains(*n)) {
            report.push(ReloadEntry {
                name: name.clone(),
                outcome: ReloadOutcome::Removed,
            });
        }
        self.slots.store(Arc::new(slots));
        ReloadReport { plugins: report }
    }

    /// Loads `spec` unless `existing` already serves the same bytes and settings; the
    /// outcome and the slot that serves the plugin from now on.
    fn reconcile_one(
        &self,
        spec: &PluginSpec,
        existing: Option<&Arc<PluginSlot>>,
    ) -> Result<(ReloadOutcome, Arc<PluginSlot>), String> {
        let bytes = std::fs::read(&spec.wasm_path).map_err(|e| {
            format!(
                "plugin `{}`: cannot read {}: {e}",
                spec.name,
                spec.wasm_path.display()
            )
        })?;
        let hash = sha256_hex(&bytes);
        // Same bytes with other settings: reuse the compiled component.
        let mut compiled = None;
        if let Some(slot) = existing {
            let current = slot.current();
            if current.hash() == hash {
                if current.spec() == spec {
                    return Ok((ReloadOutcome::Unchanged, slot.clone()));
                }
                compiled = Some(current.component().clone());
            }
        }
        let load = || {
            let component = match compiled {
                Some(c) => c,
                None => self.runtime.compile(spec, &bytes, &hash)?,
            };
            self.runtime.load_compiled(spec, component, hash.clone())
        };
        let plugin = load().map_err(|e| format!("{e:#}"))?;
        let slot = match existing {
            Some(slot) => {
                slot.current.store(plugin);
                slot.clone()
            }
            None => Arc::new(PluginSlot {
                current: ArcSwap::new(plugin),
            }),
        };
        Ok((ReloadOutcome::Loaded { hash }, slot))
    }

    /// The slot of a configured plugin that has loaded at least once.
    pub fn get(&self, name: &str) -> Option<Arc<PluginSlot>> {
        self.slots.load().get(name).cloned()
    }

    /// Every plugin, sorted by name.
    pub fn list(&self) -> Vec<PluginInfo> {
        let mut list: Vec<PluginInfo> = self
            .slots
            .load()
            .values()
            .map(|s| s.current().info())
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }
}
