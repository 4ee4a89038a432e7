//! Named plugins that can be replaced while connections use them.
//!
//! A connection holds an `Arc<PluginSlot>` and asks it for the current version on every
//! call, so a reload reaches live connections at their next hook call, while a call in
//! progress finishes on the version it started with.
//!
//! A reload is staged, then committed: `stage` compiles and initialises what changed
//! without touching a live slot, the caller builds the rest of the configuration on the
//! staged slots, and only `commit` puts the new versions in place. A reload refused before
//! `commit` leaves every plugin as it was.

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
    /// One commit at a time; `get` never waits for it.
    committing: Mutex<()>,
}

/// Plugins loaded for a new configuration and not yet serving.
pub struct StagedPlugins {
    /// The registry's slots this was staged from; `commit` refuses if they changed since.
    base: Arc<HashMap<String, Arc<PluginSlot>>>,
    /// The slots after `commit`: existing slots (swapped or not) and new ones.
    slots: HashMap<String, Arc<PluginSlot>>,
    /// New versions for existing slots, put in place by `commit`.
    swaps: Vec<(Arc<PluginSlot>, Arc<Plugin>)>,
    report: ReloadReport,
}

impl StagedPlugins {
    /// The slot that serves `name` once committed; for a changed plugin, the live slot
    /// (which still serves the old version until `commit`).
    pub fn get(&self, name: &str) -> Option<Arc<PluginSlot>> {
        self.slots.get(name).cloned()
    }

    pub fn report(&self) -> &ReloadReport {
        &self.report
    }
}

/// What staging did with one plugin.
enum Staged {
    Unchanged(Arc<PluginSlot>),
    Loaded(Arc<Plugin>),
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
            committing: Mutex::new(()),
        }
    }

    /// Makes the registry match `specs` at once: `stage`, then `commit`.
    pub fn reconcile(&self, specs: &[PluginSpec]) -> ReloadReport {
        self.commit(self.stage(specs)).expect("nothing commits between this stage and commit")
    }

    /// Loads what is new or changed in `specs` (wasm bytes, config or limits), keeps what is
    /// not, leaves out what is gone; nothing serves differently until `commit`. A plugin that
    /// fails keeps its previous version. Blocking, and slow when something compiles: call
    /// from `spawn_blocking`.
    pub fn stage(&self, specs: &[PluginSpec]) -> StagedPlugins {
        let base = self.slots.load_full();
        let mut staged = StagedPlugins {
            base: base.clone(),
            slots: HashMap::with_capacity(specs.len()),
            swaps: Vec::new(),
            report: ReloadReport { plugins: Vec::with_capacity(specs.len()) },
        };
        let mut seen = HashSet::new();
        for spec in specs {
            let name = spec.name.clone();
            if !seen.insert(name.clone()) {
                let error = "configured more than once".to_string();
                staged.report.plugins.push(ReloadEntry {
                    name,
                    outcome: ReloadOutcome::Failed { error },
                });
                continue;
            }
            let existing = base.get(&spec.name);
            let outcome = match self.stage_one(spec, existing) {
                Ok(Staged::Unchanged(slot)) => {
                    staged.slots.insert(name.clone(), slot);
                    ReloadOutcome::Unchanged
                }
                Ok(Staged::Loaded(plugin)) => {
                    let hash = plugin.hash().to_string();
                    let slot = match existing {
                        Some(slot) => {
                            staged.swaps.push((slot.clone(), plugin));
                            slot.clone()
                        }
                        None => Arc::new(PluginSlot {
                            current: ArcSwap::new(plugin),
                        }),
                    };
                    staged.slots.insert(name.clone(), slot);
                    ReloadOutcome::Loaded { hash }
                }
                Err(error) => {
                    tracing::error!(target: "wasmgate::plugin", plugin = %name, "not loaded: {error}");
                    if let Some(slot) = existing {
                        staged.slots.insert(name.clone(), slot.clone());
                    }
                    ReloadOutcome::Failed { error }
                }
            };
            staged.report.plugins.push(ReloadEntry { name, outcome });
        }
        for name in base.keys().filter(|n| !seen.contains(*n)) {
            staged.report.plugins.push(ReloadEntry {
                name: name.clone(),
                outcome: ReloadOutcome::Removed,
            });
        }
        staged
    }

    /// Puts staged plugins in place: new versions into their slots, and the new set of
    /// slots. Refused, changing nothing, if another commit came after `staged` was staged.
    pub fn commit(&self, staged: StagedPlugins) -> Result<ReloadReport, String> {
        let _one_at_a_time = self.committing.lock().unwrap();
        if !Arc::ptr_eq(&self.slots.load(), &staged.base) {
            return Err("the plugins changed while this reload was staged".into());
        }
        for (slot, plugin) in staged.swaps {
            slot.current.store(plugin);
        }
        self.slots.store(Arc::new(staged.slots));
        Ok(staged.report)
    }

    /// Loads `spec` unless `existing` already serves the same bytes and settings.
    fn stage_one(&self, spec: &PluginSpec, existing: Option<&Arc<PluginSlot>>) -> Result<Staged, String> {
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
                    return Ok(Staged::Unchanged(slot.clone()));
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
        load().map(Staged::Loaded).map_err(|e| format!("{e:#}"))
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
