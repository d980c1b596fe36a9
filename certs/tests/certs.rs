//! End-to-end checks of the public API: what we issue must load, inspect and
//! verify the way the proxy and rustls will use it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use etcd_compat_certs::{
    inspect, load_ca_bundle, load_certs, load_private_key, Authority, CertError, CertificateDer, DevPki, LeafSpec,
    PrivateKeyDer, San, Usage,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore};
use time::OffsetDateTime;

const DAY: Duration = Duration::from_secs(86_400);

fn ring() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn write(dir: &Path, file: &str, contents: &str) -> PathBuf {
    let path = dir.join(file);
    std::fs::write(&path, contents).unwrap();
    path
}

fn openssl(args: &[&str]) {
    let output = Command::new("openssl").args(args).output().unwrap();
    assert!(output.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
}

fn first_cert(path: &Path) -> CertificateDer<'static> {
    load_certs(path).unwrap().remove(0)
}

fn server_spec(common_name: &str) -> LeafSpec {
    LeafSpec {
        common_name: common_name.to_owned(),
        sans: vec![
            San::Dns("localhost".to_owned()),
            San::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            San::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ],
        usage: Usage::Server,
        validity: DAY,
        not_before_offset: None,
    }
}

fn verify_server(ca: &Path, leaf: &Path, name: &str, now: UnixTime) -> Result<(), rustls::Error> {
    let mut roots = RootCertStore::empty();
    for cert in load_ca_bundle(&[ca.to_owned()]).unwrap() {
        roots.add(cert).unwrap();
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), ring()).build().unwrap();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    verifier.verify_server_cert(&first_cert(leaf), &[], &name, &[], now).map(|_| ())
}

fn verify_client(ca: &Path, leaf: &Path) -> Result<(), rustls::Error> {
    let mut roots = RootCertStore::empty();
    roots.add(first_cert(ca)).unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), ring()).build().unwrap();
    verifier.verify_client_cert(&first_cert(leaf), &[], UnixTime::now()).map(|_| ())
}

#[test]
fn issued_certificate_round_trips_through_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::new("round-trip CA", 10 * DAY).unwrap();
    let issued = ca.issue(&server_spec("etcd-server")).unwrap();
    let cert_path = write(dir.path(), "server.pem", &issued.cert_pem);
    let key_path = write(dir.path(), "server-key.pem", &issued.key_pem);

    let certs = load_certs(&cert_path).unwrap();
    assert_eq!(certs.len(), 1);
    let key = load_private_key(&key_path).unwrap();
    assert!(matches!(key, PrivateKeyDer::Pkcs8(_)));
    ring().key_provider.load_private_key(key).unwrap();

    let now = OffsetDateTime::now_utc();
    let info = inspect(&certs[0]).unwrap();
    assert_eq!(info.subject, "CN=etcd-server");
    assert_eq!(info.issuer, "CN=round-trip CA");
    assert_eq!(info.sans, ["DNS:localhost", "IP:127.0.0.1", "IP:::1"]);
    assert!(!info.is_ca);
    assert!(!info.serial.is_empty());
    assert!((info.not_before - now).abs() < time::Duration::minutes(1));
    assert!((info.not_after - (now + time::Duration::DAY)).abs() < time::Duration::minutes(1));
    assert_eq!(info.days_left(now), 0, "just under one day left");
    assert_eq!(info.days_left(now - time::Duration::DAY), 1);
    assert!(!info.is_expired(now));
    assert!(info.is_expired(now + time::Duration::days(2)));
    assert!(info.days_left(now + time::Duration::days(2)) < 0);

    let ca_path = write(dir.path(), "ca.pem", ca.cert_pem());
    let ca_info = inspect(&first_cert(&ca_path)).unwrap();
    assert!(ca_info.is_ca);
    assert_eq!(ca_info.subject, "CN=round-trip CA");
    assert_eq!(ca_info.days_left(now), 9);
}

#[test]
fn pkcs1_sec1_and_pkcs8_keys_load_and_are_usable_by_ring() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::new("key format CA", DAY).unwrap();
    let pkcs8 = write(dir.path(), "pkcs8.pem", &ca.issue(&server_spec("k")).unwrap().key_pem);
    let sec1 = dir.path().join("sec1.pem");
    let pkcs1 = dir.path().join("pkcs1.pem");
    openssl(&["ec", "-in", path_str(&pkcs8), "-out", path_str(&sec1)]);
    openssl(&["genrsa", "-traditional", "-out", path_str(&pkcs1), "2048"]);

    for (path, label, expected_kind) in
        [(&pkcs8, "PRIVATE KEY", "PKCS#8"), (&sec1, "EC PRIVATE KEY", "SEC1"), (&pkcs1, "RSA PRIVATE KEY", "PKCS#1")]
    {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.contains(&format!("-----BEGIN {label}-----")), "{text}");
        let key = load_private_key(path).unwrap();
        assert_eq!(kind_of(&key), expected_kind);
        ring().key_provider.load_private_key(key).unwrap();
    }
}

#[test]
fn bad_inputs_give_errors_naming_the_file_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = write(dir.path(), "garbage.pem", "this is not a certificate\n");

    let error = load_certs(&garbage).unwrap_err();
    assert!(matches!(error, CertError::NoCertificate { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.starts_with(&format!("no CERTIFICATE block in {}", garbage.display())));
    assert!(message.contains("openssl x509 -inform der"), "{message}");

    let error = load_private_key(&garbage).unwrap_err();
    assert!(matches!(error, CertError::NoPrivateKey { .. }), "{error:?}");
    assert!(error.to_string().contains(&garbage.display().to_string()));

    let missing = dir.path().join("missing.pem");
    for error in [
        load_certs(&missing).unwrap_err(),
        load_private_key(&missing).unwrap_err(),
        load_ca_bundle(std::slice::from_ref(&missing)).unwrap_err(),
    ] {
        let message = error.to_string();
        assert!(message.contains(&missing.display().to_string()), "{message}");
        assert!(message.contains("No such file or directory"), "{message}");
    }

    let truncated = write(dir.path(), "truncated.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n");
    let error = load_certs(&truncated).unwrap_err();
    assert!(matches!(error, CertError::Pem { .. }), "{error:?}");
    assert!(error.to_string().contains("truncated.pem"));

    let not_x509 =
        write(dir.path(), "not-x509.pem", "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n");
    let error = load_certs(&not_x509).unwrap_err();
    assert!(matches!(error, CertError::BadCertificate { number: 1, .. }), "{error:?}");

    let plain = write(dir.path(), "plain.pem", &Authority::new("x", DAY).unwrap().key_pem());
    let encrypted = dir.path().join("encrypted.pem");
    openssl(&["pkcs8", "-topk8", "-in", path_str(&plain), "-out", path_str(&encrypted), "-passout", "pass:secret"]);
    let error = load_private_key(&encrypted).unwrap_err();
    assert!(matches!(error, CertError::EncryptedKey { .. }), "{error:?}");

    assert!(matches!(load_ca_bundle(&[]), Err(CertError::NoCaFiles)));
    assert!(inspect(&CertificateDer::from(vec![1, 2, 3])).is_err());
}

#[test]
fn ca_bundle_concatenates_files_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let first = write(dir.path(), "a.pem", Authority::new("A", DAY).unwrap().cert_pem());
    let both =
        format!("{}{}", Authority::new("B", DAY).unwrap().cert_pem(), Authority::new("C", DAY).unwrap().cert_pem());
    let second = write(dir.path(), "bc.pem", &both);
    let subjects: Vec<String> =
        load_ca_bundle(&[first, second]).unwrap().iter().map(|cert| inspect(cert).unwrap().subject).collect();
    assert_eq!(subjects, ["CN=A", "CN=B", "CN=C"]);
}

#[test]
fn dev_pki_verifies_with_rustls_webpki() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::create(&dir.path().join("pki"), "test").unwrap();
    assert_eq!(pki.server_cert, dir.path().join("pki/test-server.pem"));
    assert_eq!(pki.server_key, dir.path().join("pki/test-server-key.pem"));

    for name in ["127.0.0.1", "localhost", "::1"] {
        verify_server(&pki.ca_cert, &pki.server_cert, name, UnixTime::now()).unwrap();
        verify_server(&pki.ca_cert, &pki.peer_cert, name, UnixTime::now()).unwrap();
    }
    let wrong_name = verify_server(&pki.ca_cert, &pki.server_cert, "etcd.example", UnixTime::now());
    assert!(
        matches!(wrong_name, Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. }))),
        "{wrong_name:?}"
    );

    verify_client(&pki.ca_cert, &pki.client_cert).unwrap();
    verify_client(&pki.ca_cert, &pki.peer_cert).unwrap();
    assert!(verify_client(&pki.ca_cert, &pki.server_cert).is_err(), "server cert lacks clientAuth");

    let client = inspect(&first_cert(&pki.client_cert)).unwrap();
    assert_eq!(client.subject, "CN=root");
    assert!(client.sans.is_empty());

    #[cfg(unix)]
    for key in [&pki.ca_key, &pki.server_key, &pki.client_key, &pki.peer_key] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", key.display());
        load_private_key(key).unwrap();
    }
}

#[test]
fn dev_pki_ca_issues_expired_and_not_yet_valid_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::create(dir.path(), "skew").unwrap();
    let ca = Authority::from_pem(
        &std::fs::read_to_string(&pki.ca_cert).unwrap(),
        &std::fs::read_to_string(&pki.ca_key).unwrap(),
    )
    .unwrap();

    let cases = [("expired", -2, "expired.pem"), ("future", 2, "future.pem"), ("current", 0, "current.pem")];
    for (common_name, offset_days, file) in cases {
        let issued = ca
            .issue(&LeafSpec { not_before_offset: Some(time::Duration::days(offset_days)), ..server_spec(common_name) })
            .unwrap();
        let path = write(dir.path(), file, &issued.cert_pem);
        let info = inspect(&first_cert(&path)).unwrap();
        assert_eq!(info.issuer, "CN=skew dev CA");
        assert_eq!(info.is_expired(OffsetDateTime::now_utc()), offset_days < 0);

        let result = verify_server(&pki.ca_cert, &path, "localhost", UnixTime::now());
        match offset_days {
            ..0 => assert!(
                matches!(result, Err(rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. }))),
                "{result:?}"
            ),
            1.. => assert!(
                matches!(result, Err(rustls::Error::InvalidCertificate(CertificateError::NotValidYetContext { .. }))),
                "{result:?}"
            ),
            0 => result.unwrap(),
        }
    }
}

#[test]
fn authority_from_pem_signs_for_an_openssl_rsa_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca_cert = dir.path().join("ca.pem");
    let ca_key = dir.path().join("ca-key.pem");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/C=US/O=Legacy Etcd/CN=legacy etcd CA",
        "-keyout",
        path_str(&ca_key),
        "-out",
        path_str(&ca_cert),
    ]);
    let ca =
        Authority::from_pem(&std::fs::read_to_string(&ca_cert).unwrap(), &std::fs::read_to_string(&ca_key).unwrap())
            .unwrap();
    let issued = ca.issue(&server_spec("renewed")).unwrap();
    let leaf = write(dir.path(), "leaf.pem", &issued.cert_pem);
    verify_server(&ca_cert, &leaf, "127.0.0.1", UnixTime::now()).unwrap();
    assert_eq!(inspect(&first_cert(&leaf)).unwrap().issuer, inspect(&first_cert(&ca_cert)).unwrap().subject);
}

#[test]
fn authority_from_pem_rejects_unusable_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::new("real CA", DAY).unwrap();
    let other = Authority::new("other CA", DAY).unwrap();
    let leaf = ca.issue(&server_spec("leaf")).unwrap();

    let reasons = [
        (Authority::from_pem(&leaf.cert_pem, &leaf.key_pem), "not a CA"),
        (Authority::from_pem(ca.cert_pem(), &other.key_pem()), "does not match"),
        (Authority::from_pem("garbage", &ca.key_pem()), "no usable CERTIFICATE"),
    ];
    for (result, reason) in reasons {
        let message = result.unwrap_err().to_string();
        assert!(message.contains(reason), "{message}");
    }

    let pkcs8 = write(dir.path(), "ca-key.pem", &ca.key_pem());
    let sec1 = dir.path().join("ca-key-sec1.pem");
    openssl(&["ec", "-in", path_str(&pkcs8), "-out", path_str(&sec1)]);
    let sec1_pem = std::fs::read_to_string(&sec1).unwrap();
    let message = Authority::from_pem(ca.cert_pem(), &sec1_pem).unwrap_err().to_string();
    assert!(message.contains("openssl pkcs8 -topk8 -nocrypt"), "{message}");
}

fn kind_of(key: &PrivateKeyDer) -> &'static str {
    match key {
        PrivateKeyDer::Pkcs1(_) => "PKCS#1",
        PrivateKeyDer::Sec1(_) => "SEC1",
        PrivateKeyDer::Pkcs8(_) => "PKCS#8",
        _ => "unknown",
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn renewal_keeps_key_subject_sans_and_usages_with_a_new_validity() {
    let ca = Authority::new("renew CA", 10 * DAY).unwrap();
    let spec = LeafSpec {
        common_name: "etcd-0".into(),
        sans: vec![San::Dns("etcd-0.local".into()), San::Ip(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)))],
        usage: Usage::Peer,
        validity: DAY,
        not_before_offset: Some(time::Duration::days(-2)),
    };
    let old = ca.issue(&spec).unwrap();
    let old_der = CertificateDer::from_pem_slice(old.cert_pem.as_bytes()).unwrap();
    assert!(inspect(&old_der).unwrap().is_expired(OffsetDateTime::now_utc()));

    let renewed_pem = ca.renew(&old_der, 90 * DAY).unwrap();
    let renewed_der = CertificateDer::from_pem_slice(renewed_pem.as_bytes()).unwrap();
    let (before, after) = (inspect(&old_der).unwrap(), inspect(&renewed_der).unwrap());
    assert_eq!(after.subject, "CN=etcd-0");
    assert_eq!(after.sans, before.sans);
    assert_eq!(after.extended_key_usages, ["serverAuth", "clientAuth"]);
    assert_eq!(after.days_left(OffsetDateTime::now_utc()), 89);
    assert_ne!(after.serial, before.serial);

    // The old private key still goes with the renewed certificate.
    let key = PrivateKeyDer::from_pem_slice(old.key_pem.as_bytes()).unwrap();
    rustls::ServerConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![renewed_der], key)
        .expect("renewed certificate matches the old key");

    let other = Authority::new("other CA", DAY).unwrap();
    let error = other.renew(&old_der, DAY).unwrap_err().to_string();
    assert!(error.contains("was issued by CN=renew CA, not by this CA (CN=other CA)"), "{error}");
}
