//! On-disk cache of compiled components. Compiling a 15 MiB Python component takes seconds;
//! loading its compiled form takes milliseconds.
//!
//! An entry is named by the SHA-256 of the wasm bytes and a hash of everything in the engine
//! that compiled code depends on (wasmtime version, target, settings), so a changed plugin or
//! a wasmtime upgrade simply misses. Entries are written to a temporary file and renamed, so
//! a reader never sees half an entry; one that fails to load is recompiled and replaced.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

use super::engine::wasm_error;

/// Hex SHA-256 of `bytes`.
pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) struct CompileCache {
    dir: Option<PathBuf>,
    /// Hex of the engine's precompile-compatibility hash.
    engine_key: String,
}

impl CompileCache {
    pub fn new(engine: &Engine, dir: Option<PathBuf>) -> anyhow::Result<CompileCache> {
        if let Some(d) = &dir {
            std::fs::create_dir_all(d)
                .with_context(|| format!("cannot create plugin cache {}", d.display()))?;
        }
        let mut h = Sha256Hasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut h);
        let engine_key = format!("{:016x}", h.finish());
        Ok(CompileCache { dir, engine_key })
    }

    /// The compiled component for `bytes` (whose hex SHA-256 is `hash`), from the cache when
    /// an entry is there and loads.
    pub fn load(&self, engine: &Engine, bytes: &[u8], hash: &str) -> anyhow::Result<Component> {
        let Some(dir) = &self.dir else {
            return Component::new(engine, bytes).map_err(wasm_error);
        };
        let path = dir.join(format!("{hash}-{}.cwasm", self.engine_key));
        if path.exists() {
            // SAFETY: the file was written by `store` below from `Component::serialize` with
            // an engine of the same compatibility hash (it is in the name), and is replaced
            // by rename, never modified in place. A damaged file fails to deserialize.
            match unsafe { Component::deserialize_file(engine, &path) } {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "recompiling, cached plugin does not load: {e}")
                }
            }
        }
        let component = Component::new(engine, bytes).map_err(wasm_error)?;
        if let Err(e) = store(&component, &path) {
            tracing::warn!(path = %path.display(), "cannot cache compiled plugin: {e:#}");
        }
        Ok(component)
    }
}

fn store(component: &Component, path: &Path) -> anyhow::Result<()> {
    let bytes = component.serialize().map_err(wasm_error)?;
    // Unique per writer, so two loads of one plugin never write the same temporary file.
    static WRITERS: AtomicU64 = AtomicU64::new(0);
    let n = WRITERS.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(())
}

/// Feeds `Hash` into SHA-256, so the key is stable across Rust releases (unlike
/// `DefaultHasher`).
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        u64::from_le_bytes(
            digest[..8]
                .try_into()
                .expect("a SHA-256 digest has 32 bytes"),
        )
    }
}
