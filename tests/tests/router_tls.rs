//! TLS for clients when `router-tls-cert` and `router-tls-key` are set: psql with `sslmode=require` gets a
//! TLS session through the router; a plain-text client is still served.

use std::process::Command;

use integration::Cluster;

#[test]
fn psql_over_tls() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let ok = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()?;
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let extra = format!("router-tls-cert,{}\nrouter-tls-key,{}\n", cert.display(), key.display());
    let c = Cluster::hash(2, &extra)?;
    let run = |sslmode: &str| {
        let out = Command::new("psql")
            .arg(format!("{} sslmode={sslmode}", c.conn_str()))
            .args(["-X", "-A", "-t", "-c", "\\conninfo", "-c", "SELECT 40 + 2"])
            .output()
            .expect("psql");
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (out, err) = run("require");
    assert!(out.contains("SSL connection") && out.contains("42"), "{out}{err}");
    let (out, err) = run("disable");
    assert!(!out.contains("SSL connection") && out.contains("42"), "{out}{err}");
    Ok(())
}
