//! Certificates for TLS tests, made with the openssl command: a CA, a server certificate it signs, a
//! self-signed one; and a key made readable by the PostgreSQL (or Patroni) server the harness runs.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs openssl with `args` in `dir`.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA: `<name>.crt` and `<name>.key` in `dir`.
pub fn ca(dir: &Path, name: &str) {
    let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
    openssl(
        dir,
        &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca"]
            .into_iter()
            .chain(["-keyout", &key, "-out", &crt])
            .collect::<Vec<_>>(),
    );
}

/// A server certificate signed by CA `ca` for `sans` (`subjectAltName`, e.g. `IP:127.0.0.1,DNS:localhost`):
/// `<name>.crt` and `<name>.key` in `dir`.
pub fn signed(dir: &Path, ca: &str, name: &str, sans: &str) {
    let (key, csr, crt, ext) =
        (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
    openssl(dir, &["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=server", "-keyout", &key, "-out", &csr]);
    std::fs::write(dir.join(&ext), format!("subjectAltName={sans}\n")).expect("an extensions file");
    let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &crt,
            "-extfile",
            &ext,
        ],
    );
}

/// A self-signed certificate for localhost and its key, in `dir`.
pub fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
        ],
    );
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// `<name>.key` and `<name>.crt` in `dir` made usable by a server the harness starts: the key 0600, both the
/// `postgres` user's when the tests run as root (servers run as that user then), the folder readable.
pub fn for_server(dir: &Path, name: &str) {
    let (key, crt) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.crt")));
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout == b"0\n");
    if root {
        Command::new("chmod").arg("755").arg(dir).status().expect("chmod");
        Command::new("chown").arg("postgres:").arg(&key).arg(&crt).status().expect("chown");
    }
    Command::new("chmod").arg("600").arg(&key).status().expect("chmod");
}
