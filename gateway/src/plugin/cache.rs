//! On-disk cache of compiled components. Compiling a 15 MiB Python component takes seconds;
//! loading its compiled form takes milliseconds.
//!
//! An entry is named by the SHA-256 of the wasm bytes and a hash of everything in the engine
//! that compiled code depends on (wasmtime version, target, settings), so a changed plugin or
//! a wasmtime upgrade simply misses. Entries are written to a temporary file and renamed, so
//! a reader never sees half an entry; one that fails to load is recompiled and replaced.
//!
//! A cached entry is native code the gateway runs, so whoever can write to the directory can
//! run code in the gateway. The directory is created `0700`; one owned by another user, or
//! writable by group or others, is refused, and the gateway compiles without a cache (slower
//! starts, same behaviour) and says why. Temporary files are created exclusively, under
//! random names, `0600`, so nobody can plant or link one in the writer's way.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

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
    /// A cache in `dir`, or none when `dir` is None or cannot be trusted (logged).
    pub fn new(engine: &Engine, dir: Option<PathBuf>) -> anyhow::Result<CompileCache> {
        let dir = dir.and_then(|d| match private_dir(&d) {
            Ok(()) => Some(d),
            Err(e) => {
                tracing::error!(
                    dir = %d.display(),
                    "plugin cache refused, compiling plugins without it: {e:#}"
                );
                None
            }
        });
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

/// Creates `dir` (and missing parents) `0700`, then checks that this user owns it and that
/// neither group nor others may write to it.
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let meta = std::fs::metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        anyhow::bail!("it is owned by uid {}, not by this user (uid {me})", meta.uid());
    }
    if meta.mode() & 0o022 != 0 {
        anyhow::bail!(
            "group or others may write to it (mode {:o}); chmod 700 it",
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

fn store(component: &Component, path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let bytes = component.serialize().map_err(wasm_error)?;
    // A random name, created exclusively: never a file someone else made or linked there.
    let tmp = path.with_extension(format!("tmp.{:016x}", rand::random::<u64>()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let written = f.write_all(&bytes).and_then(|()| f.sync_all());
    let renamed = written.and_then(|()| std::fs::rename(&tmp, path));
    if renamed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(renamed?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wasmgate-cache-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_cache_directory_is_private() {
        let dir = scratch("new").join("nested");
        private_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // A directory others may write to is refused, and left as it is.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = private_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("group or others may write") && err.contains("777"), "{err}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir).unwrap();
        std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        // / belongs to root; when the tests run as root, nothing to show.
        if unsafe { libc::geteuid() } == 0 {
            return;
        }
        let err = private_dir(Path::new("/")).unwrap_err().to_string();
        assert!(err.contains("owned by uid 0"), "{err}");
    }

    #[test]
    fn entries_are_written_exclusively_and_privately() {
        let engine = Engine::default();
        let dir = scratch("store");
        private_dir(&dir).unwrap();
        // The smallest component: its preamble (magic, version 0x0d, layer 1).
        let component = Component::new(&engine, b"\0asm\x0d\x00\x01\x00").unwrap();
        let path = dir.join("entry.cwasm");
        store(&component, &path).unwrap();
        store(&component, &path).unwrap();
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["entry.cwasm"], "no temporary file left behind");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
