//! Certificates and keys from PEM files, with errors that name the file.
//!
//! Parsing is `rustls-pki-types`' (`PemObject`): `rustls-pemfile` is archived and has an
//! advisory. A key file may hold a PKCS#8, PKCS#1 (RSA) or SEC1 (EC) key; the first key in
//! the file is used.

use std::path::Path;

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Every certificate in the PEM file at `path`, in file order (a chain: the leaf first).
/// A file without one is an error.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {}", path.display(), describe(e)))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file", path.display()));
    }
    Ok(certs)
}

/// The private key in the PEM file at `path`.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        pem::Error::NoItemsFound => format!(
            "{}: no PEM private key (PKCS#8 \"PRIVATE KEY\", PKCS#1 \"RSA PRIVATE KEY\" or SEC1 \"EC PRIVATE KEY\") in the file",
            path.display()
        ),
        e => format!("{}: {}", path.display(), describe(e)),
    })
}

fn describe(e: pem::Error) -> String {
    match e {
        pem::Error::Io(e) => format!("cannot read: {e}"),
        pem::Error::NoItemsFound => "no PEM item of the expected kind in the file".into(),
        e => format!("not valid PEM: {e:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("wasmgate-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn errors_name_the_file() {
        let missing = Path::new("/nonexistent/wasmgate/chat.pem");
        let err = load_certs(missing).unwrap_err();
        assert!(err.starts_with("/nonexistent/wasmgate/chat.pem: cannot read"), "{err}");
        let err = load_key(missing).unwrap_err();
        assert!(err.starts_with("/nonexistent/wasmgate/chat.pem: cannot read"), "{err}");

        let empty = temp_file("empty.pem", "not pem at all\n");
        let err = load_certs(&empty).unwrap_err();
        assert!(err.contains("empty.pem: no PEM certificate"), "{err}");
        let err = load_key(&empty).unwrap_err();
        assert!(err.contains("empty.pem: no PEM private key"), "{err}");
        std::fs::remove_dir_all(empty.parent().unwrap()).unwrap();
    }
}
