//! Calls back when watched files change, for hot reload.
//!
//! The parent directories are watched rather than the files: editors and deploy tools save
//! by writing a new file and renaming it over the old one, which replaces the inode a
//! file watch would follow. Bursts (write, rename, chmod) are debounced into one call.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use notify_debouncer_full::notify::{EventKind, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{new_debouncer, DebounceEventResult, Debouncer, RecommendedCache};

const DEBOUNCE: Duration = Duration::from_millis(200);

/// Watching stops when this is dropped.
pub struct WatchGuard {
    _debouncer: Debouncer<RecommendedWatcher, RecommendedCache>,
}

/// Calls `on_change` (on the watcher's thread) after any of `paths` is created, written,
/// renamed or removed. Each path's directory must exist.
pub fn watch(
    paths: Vec<PathBuf>,
    on_change: impl Fn() + Send + 'static,
) -> anyhow::Result<WatchGuard> {
    let mut targets = HashSet::new();
    let mut dirs = HashSet::new();
    for path in &paths {
        let name = path
            .file_name()
            .with_context(|| format!("cannot watch {}: not a file path", path.display()))?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => std::path::Path::new("."),
        };
        let dir = parent
            .canonicalize()
            .with_context(|| format!("cannot watch {}", parent.display()))?;
        targets.insert(dir.join(name));
        dirs.insert(dir);
    }
    let mut debouncer =
        new_debouncer(
            DEBOUNCE,
            None,
            move |result: DebounceEventResult| match result {
                Ok(events) => {
                    let relevant = events.iter().any(|e| {
                        !matches!(e.kind, EventKind::Access(_))
                            && e.paths.iter().any(|p| targets.contains(p))
                    });
                    if relevant {
                        on_change();
                    }
                }
                Err(errors) => {
                    for e in errors {
                        tracing::warn!("file watch: {e}");
                    }
                }
            },
        )?;
    for dir in &dirs {
        debouncer
            .watch(dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("cannot watch {}", dir.display()))?;
    }
    Ok(WatchGuard {
        _debouncer: debouncer,
    })
}
