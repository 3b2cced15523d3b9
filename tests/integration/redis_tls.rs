//! `rediss://` URLs: TLS to a real redis-server with a certificate from a private CA.

use std::path::Path;
use std::process::Command;

use crate::support::cli::CliEnv;
use crate::support::redis::{TestRedis, free_port};

/// Writes a CA, a server certificate for 127.0.0.1 and a client certificate
/// (`client.pem`, `client.key`) into `dir`.
pub fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=canhazgpu-client",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
    ]);
    // Version 3 (with extensions): rustls refuses version 1 certificates.
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-extfile",
        "client.ext",
        "-in",
        "client.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        "client.pem",
    ]);
}

/// A redis-server that speaks only TLS on a free port, with the certificates in
/// `dir`; `clients` says whether it asks clients for a certificate.
pub fn tls_server(dir: &Path, clients: bool) -> (TestRedis, String) {
    let port = free_port().to_string();
    let file = |name: &str| dir.join(name).display().to_string();
    let server = TestRedis::launch_with(&[
        "--tls-port",
        &port,
        "--tls-cert-file",
        &file("server.pem"),
        "--tls-key-file",
        &file("server.key"),
        "--tls-ca-cert-file",
        &file("ca.pem"),
        "--tls-auth-clients",
        if clients { "yes" } else { "no" },
    ]);
    (server, format!("rediss://127.0.0.1:{port}/0"))
}

#[test]
fn client_certificates_and_a_configured_ca() {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let (_server, url) = tls_server(certs.path(), true);
    let file = |name: &str| certs.path().join(name).display().to_string();
    let mut env = CliEnv::redis(&url);
    env.set_var("CANHAZGPU_REDIS_TLS_CA_FILE", &file("ca.pem"));
    // Without a client certificate the server refuses the handshake.
    let refused = env.run(["status"]);
    refused.assert_code(1);
    assert_eq!(refused.stderr.lines().count(), 1, "{refused:?}");
    assert!(
        refused
            .stderr
            .starts_with("Error: failed to connect to Redis"),
        "{refused:?}"
    );

    env.set_var("CANHAZGPU_REDIS_TLS_CLIENT_CERT", &file("client.pem"));
    let alone = env.run(["status"]);
    alone.assert_code(2);
    assert!(
        alone
            .stderr
            .contains("redis.tls_client_cert and redis.tls_client_key go together"),
        "{alone:?}"
    );
    env.set_var("CANHAZGPU_REDIS_TLS_CLIENT_KEY", &file("client.key"));
    env.init_fake(2);
    env.run(["reserve"]).assert_ok();
    assert_eq!(env.statuses(), ["IN_USE", "AVAILABLE"]);

    // The configured CA is the only one trusted: a CA of its own is refused.
    let other = tempfile::tempdir().unwrap();
    make_certificates(other.path());
    env.set_var(
        "CANHAZGPU_REDIS_TLS_CA_FILE",
        &other.path().join("ca.pem").display().to_string(),
    );
    env.run(["status"]).assert_code(1);
    env.set_var("CANHAZGPU_REDIS_TLS_CA_FILE", "/nonexistent/ca.pem");
    let missing = env.run(["status"]);
    missing.assert_code(2);
    assert_eq!(
        missing.stderr.trim(),
        "Error: cannot read the Redis TLS file /nonexistent/ca.pem: no such file or directory"
    );
}

#[test]
fn rediss_url_connects_with_a_trusted_ca_and_refuses_an_untrusted_one() {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let (_server, url) = tls_server(certs.path(), false);
    let file = |name: &str| certs.path().join(name).display().to_string();

    let mut trusted = CliEnv::redis(&url);
    trusted.set_var("SSL_CERT_FILE", &file("ca.pem"));
    trusted.init_fake(2);
    trusted.run(["reserve", "--gpu-ids", "1"]).assert_ok();
    assert_eq!(trusted.statuses(), ["AVAILABLE", "IN_USE"]);

    let untrusted = CliEnv::redis(&url);
    let run = untrusted.run(["status"]);
    run.assert_code(1);
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(
        run.stderr
            .starts_with(&format!("Error: failed to connect to Redis at {url}")),
        "{run:?}"
    );
}
