//! `rediss://` URLs: TLS to a real redis-server with a certificate from a private CA.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use crate::support::cli::CliEnv;
use crate::support::redis::TestRedis;

/// Writes a CA and a server certificate for 127.0.0.1 into `dir`.
fn make_certificates(dir: &Path) {
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
}

#[test]
fn rediss_url_connects_with_a_trusted_ca_and_refuses_an_untrusted_one() {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let file = |name: &str| certs.path().join(name).display().to_string();
    let _server = TestRedis::launch_with(&[
        "--tls-port",
        &port,
        "--tls-cert-file",
        &file("server.pem"),
        "--tls-key-file",
        &file("server.key"),
        "--tls-ca-cert-file",
        &file("ca.pem"),
        "--tls-auth-clients",
        "no",
    ]);
    let url = format!("rediss://127.0.0.1:{port}/0");

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
