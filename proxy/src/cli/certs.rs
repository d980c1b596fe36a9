//! `etcd-compat-proxy certs`: the operator's certificate runbook as commands (create a CA, issue
//! server, peer and client certificates for etcd, renew, inspect files and live endpoints).

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use etcd_compat_certs::{Authority, LeafSpec, San, Usage};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use time::OffsetDateTime;

const DAY: Duration = Duration::from_secs(86_400);
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// `etcd-compat-proxy certs` and its subcommands.
#[derive(Debug, Args)]
#[command(
    about = "Create, renew and inspect certificates for etcd and this proxy",
    long_about = "Create, renew and inspect certificates for etcd and this proxy.\n\n\
        Runbook: `certs ca` once; `certs server`, `certs peer` and `certs client` per member and client \
        (short validity, 90 days by default); `certs renew` before expiry, keeping the key, subject and SANs; \
        replace the files in place and the proxy reloads them (etcd reloads its own leaf certificates per \
        handshake, not its CA files). Keys are written mode 0600, files are replaced atomically."
)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub command: CertsCommand,
}

/// What `certs` can do.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a self-signed CA (ECDSA P-256).
    Ca(CaArgs),
    /// Issue a server certificate (serverAuth) for etcd's client URLs or the proxy's listener.
    Server(LeafArgs),
    /// Issue a peer certificate (serverAuth + clientAuth) for etcd's peer URLs.
    Peer(LeafArgs),
    /// Issue a client certificate (clientAuth); with etcd auth on, the CN is the user name.
    Client(LeafArgs),
    /// Renew a certificate from the same CA: same key, subject, SANs and usages, new validity.
    Renew(RenewArgs),
    /// Print subject, SANs, issuer, validity and days left of PEM files or of live TLS endpoints.
    Inspect(InspectArgs),
}

/// Output files shared by every issuing command.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Where to write the certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub out_cert: PathBuf,
    /// Where to write the private key (PKCS#8 PEM, mode 0600).
    #[arg(long, value_name = "FILE")]
    pub out_key: PathBuf,
    /// Replace existing output files.
    #[arg(long)]
    pub force: bool,
}

/// `certs ca`.
#[derive(Debug, Args)]
pub struct CaArgs {
    /// Subject CN of the CA, e.g. `etcd-ca-2026`.
    #[arg(long, value_name = "NAME")]
    pub cn: String,
    /// Validity in days.
    #[arg(long, value_name = "DAYS", default_value_t = 1825)]
    pub days: u32,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `certs server`, `certs peer`, `certs client`.
#[derive(Debug, Args)]
pub struct LeafArgs {
    /// CA certificate (PEM) to sign with.
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// CA private key (PKCS#8 PEM).
    #[arg(long, value_name = "FILE")]
    pub ca_key: PathBuf,
    /// Subject CN, e.g. the member name or, for client certificates, the etcd user.
    #[arg(long, value_name = "NAME")]
    pub cn: String,
    /// Subject alternative name: an IP address or a DNS name (repeatable or comma-separated); clients dialling an IP match only IP SANs.
    #[arg(long, value_name = "IP|DNS", value_delimiter = ',')]
    pub san: Vec<String>,
    /// Validity in days; the proxy warns 30 days before expiry.
    #[arg(long, value_name = "DAYS", default_value_t = 90)]
    pub days: u32,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `certs renew`.
#[derive(Debug, Args)]
pub struct RenewArgs {
    /// CA certificate (PEM) that issued `--cert`.
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// CA private key (PKCS#8 PEM).
    #[arg(long, value_name = "FILE")]
    pub ca_key: PathBuf,
    /// The certificate to renew (PEM; the first certificate in the file).
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,
    /// Its private key: when given, checked to belong to `--cert` (the key itself is kept as is).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Validity of the renewed certificate in days.
    #[arg(long, value_name = "DAYS", default_value_t = 90)]
    pub days: u32,
    /// Where to write the renewed certificate [default: replace `--cert` atomically].
    #[arg(long, value_name = "FILE")]
    pub out_cert: Option<PathBuf>,
}

/// `certs inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// PEM files to inspect (every certificate in each).
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Instead of files: TLS endpoints (`host:port` or `https://host:port`, comma-separated) whose served certificates to print.
    #[arg(long, value_name = "HOST:PORT", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// With `--endpoints`: also verify the served chain against this CA bundle.
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// With `--endpoints`: client certificate to present, for servers that require one.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// With `--endpoints`: private key of `--cert`.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
}

/// Runs a `certs` subcommand; errors go to stderr and give exit code 1.
pub fn run(args: CertsArgs) -> ExitCode {
    let result = match args.command {
        CertsCommand::Ca(args) => create_ca(&args),
        CertsCommand::Server(args) => issue(&args, Usage::Server),
        CertsCommand::Peer(args) => issue(&args, Usage::Peer),
        CertsCommand::Client(args) => issue(&args, Usage::Client),
        CertsCommand::Renew(args) => renew(&args),
        CertsCommand::Inspect(args) => inspect(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("etcd-compat-proxy certs: {error}");
            ExitCode::FAILURE
        }
    }
}

fn create_ca(args: &CaArgs) -> Result<(), String> {
    refuse_overwrite(&args.output)?;
    let ca = Authority::new(&args.cn, days(args.days)?).map_err(|e| e.to_string())?;
    write_file(&args.output.out_cert, ca.cert_pem(), false)?;
    write_file(&args.output.out_key, &ca.key_pem(), true)?;
    report_written(&args.output.out_cert, Some(&args.output.out_key))
}

fn issue(args: &LeafArgs, usage: Usage) -> Result<(), String> {
    refuse_overwrite(&args.output)?;
    if usage != Usage::Client && args.san.is_empty() {
        return Err("a server or peer certificate needs at least one --san (the IPs and DNS names clients dial, e.g. --san 127.0.0.1 --san etcd-0.example)".to_owned());
    }
    let sans = args.san.iter().map(|raw| parse_san(raw)).collect::<Result<Vec<_>, _>>()?;
    let ca = load_authority(&args.ca, &args.ca_key)?;
    let spec =
        LeafSpec { common_name: args.cn.clone(), sans, usage, validity: days(args.days)?, not_before_offset: None };
    let issued = ca.issue(&spec).map_err(|e| e.to_string())?;
    write_file(&args.output.out_cert, &issued.cert_pem, false)?;
    write_file(&args.output.out_key, &issued.key_pem, true)?;
    report_written(&args.output.out_cert, Some(&args.output.out_key))
}

fn renew(args: &RenewArgs) -> Result<(), String> {
    let ca = load_authority(&args.ca, &args.ca_key)?;
    let old = etcd_compat_certs::load_certs(&args.cert).map_err(|e| e.to_string())?.remove(0);
    if let Some(key_path) = &args.key {
        let key = etcd_compat_certs::load_private_key(key_path).map_err(|e| e.to_string())?;
        let signing_key = crate::tls::provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("cannot use the key in {}: {e}", key_path.display()))?;
        let cert_key = x509_public_key(&old)?;
        if signing_key.public_key().map(|spki| spki.as_ref().to_vec()) != Some(cert_key) {
            return Err(format!(
                "the key in {} does not belong to {}; pass the key file of this certificate",
                key_path.display(),
                args.cert.display()
            ));
        }
    }
    let renewed = ca.renew(&old, days(args.days)?).map_err(|e| format!("cannot renew {}: {e}", args.cert.display()))?;
    let out = args.out_cert.as_ref().unwrap_or(&args.cert);
    write_file(out, &renewed, false)?;
    report_written(out, None)
}

fn inspect(args: &InspectArgs) -> Result<(), String> {
    if args.files.is_empty() == args.endpoints.is_empty() {
        return Err("give PEM files or --endpoints (not both)".to_owned());
    }
    let now = OffsetDateTime::now_utc();
    let mut failures = Vec::new();
    for path in &args.files {
        match etcd_compat_certs::load_certs(path) {
            Ok(certs) => {
                for (index, cert) in certs.iter().enumerate() {
                    print_cert(
                        &format!("{} (certificate {} of {})", path.display(), index + 1, certs.len()),
                        cert,
                        now,
                    )?;
                }
            }
            Err(error) => failures.push(error.to_string()),
        }
    }
    for endpoint in &args.endpoints {
        match fetch_served_chain(endpoint, args) {
            Ok((chain, verdict)) => {
                for (index, cert) in chain.iter().enumerate() {
                    print_cert(
                        &format!("{endpoint} (served certificate {} of {})", index + 1, chain.len()),
                        cert,
                        now,
                    )?;
                }
                if let Some(verdict) = verdict {
                    println!("  verified against --cacert: {verdict}");
                }
            }
            Err(error) => failures.push(error),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

fn x509_public_key(cert: &CertificateDer<'_>) -> Result<Vec<u8>, String> {
    let parsed = rustls::server::ParsedCertificate::try_from(cert).map_err(|e| e.to_string())?;
    Ok(parsed.subject_public_key_info().as_ref().to_vec())
}

fn print_cert(title: &str, cert: &CertificateDer<'_>, now: OffsetDateTime) -> Result<(), String> {
    let info = etcd_compat_certs::inspect(cert).map_err(|e| format!("{title}: {e}"))?;
    let days_left = info.days_left(now);
    let left = if info.is_expired(now) {
        format!("EXPIRED {} days ago", -days_left.min(-1) - 1)
    } else {
        days_left.to_string()
    };
    let sans = match (info.sans.is_empty(), info.is_ca) {
        (false, _) => info.sans.join(", "),
        (true, true) => "none".to_owned(),
        (true, false) => "none (hosts are matched against the CN only by pre-2020 clients)".to_owned(),
    };
    let usages =
        if info.extended_key_usages.is_empty() { "any".to_owned() } else { info.extended_key_usages.join(", ") };
    println!("{title}");
    println!("  subject:    {}", info.subject);
    println!("  SANs:       {sans}");
    println!("  issuer:     {}", info.issuer);
    println!("  usages:     {usages}{}", if info.is_ca { " (CA)" } else { "" });
    println!("  serial:     {}", info.serial);
    println!("  not before: {}", format_time(info.not_before));
    println!("  not after:  {}", format_time(info.not_after));
    println!("  days left:  {left}");
    Ok(())
}

fn format_time(time: OffsetDateTime) -> String {
    crate::tls::format_unix(time.unix_timestamp())
}

/// Records the certificate chain `endpoint` serves and, with `--cacert`, verifies it (chain and
/// host name) the way the proxy would.
fn fetch_served_chain(
    endpoint: &str,
    args: &InspectArgs,
) -> Result<(Vec<CertificateDer<'static>>, Option<String>), String> {
    let client_cert = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
        _ => None,
    };
    let served = crate::tls::served::fetch_served_chain(endpoint, client_cert, DIAL_TIMEOUT)?;
    let verdict = match &args.cacert {
        None => None,
        Some(ca) => Some(verify_chain(&served.chain, ca, &served.server_name)?),
    };
    Ok((served.chain, verdict))
}

fn verify_chain(chain: &[CertificateDer<'static>], ca: &Path, server_name: &ServerName<'_>) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in etcd_compat_certs::load_ca_bundle(&[ca.to_owned()]).map_err(|e| e.to_string())? {
        roots.add(cert).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), crate::tls::provider())
        .build()
        .map_err(|e| e.to_string())?;
    Ok(match verifier.verify_server_cert(&chain[0], &chain[1..], server_name, &[], UnixTime::now()) {
        Ok(_) => "yes".to_owned(),
        Err(error) => format!("NO: {error}"),
    })
}

fn load_authority(cert: &Path, key: &Path) -> Result<Authority, String> {
    let read = |path: &Path| std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
    Authority::from_pem(&read(cert)?, &read(key)?)
        .map_err(|e| format!("{e} (CA {}, key {})", cert.display(), key.display()))
}

fn parse_san(raw: &str) -> Result<San, String> {
    let raw = raw.trim();
    if let Ok(ip) = raw.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return Ok(San::Ip(ip));
    }
    let valid_dns = !raw.is_empty()
        && raw
            .split('.')
            .all(|label| !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '*'));
    if valid_dns {
        Ok(San::Dns(raw.to_owned()))
    } else {
        Err(format!("--san {raw:?} is neither an IP address nor a DNS name"))
    }
}

fn days(days: u32) -> Result<Duration, String> {
    if days == 0 {
        return Err("--days must be at least 1".to_owned());
    }
    Ok(DAY * days)
}

fn refuse_overwrite(output: &OutputArgs) -> Result<(), String> {
    if output.force {
        return Ok(());
    }
    for path in [&output.out_cert, &output.out_key] {
        if path.exists() {
            return Err(format!("{} exists; pass --force to replace it", path.display()));
        }
    }
    Ok(())
}

/// Writes through a temporary file in the same directory and renames it into place, so a
/// reloading reader (this proxy, etcd) never sees a half-written file. Keys are created 0600.
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let name = path.file_name().ok_or_else(|| format!("{} is not a file path", path.display()))?;
    let temporary = path.with_file_name(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true).mode(if secret { 0o600 } else { 0o644 });
    let mut file = options.open(&temporary).map_err(failed)?;
    let written = file.write_all(contents.as_bytes()).and_then(|()| file.sync_all());
    if let Err(error) = written.and_then(|()| std::fs::rename(&temporary, path)) {
        let _ = std::fs::remove_file(&temporary);
        return Err(failed(error));
    }
    Ok(())
}

fn report_written(cert: &Path, key: Option<&Path>) -> Result<(), String> {
    let pem = std::fs::read(cert).map_err(|e| format!("cannot read back {}: {e}", cert.display()))?;
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(&pem)
        .map_err(|e| format!("cannot read back {}: {e}", cert.display()))?;
    let info = etcd_compat_certs::inspect(&der).map_err(|e| e.to_string())?;
    println!(
        "wrote {}{}: {} valid until {}",
        cert.display(),
        key.map(|k| format!(" and {} (mode 0600)", k.display())).unwrap_or_default(),
        info.subject,
        format_time(info.not_after)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sans_are_ips_or_dns_names() {
        assert_eq!(parse_san("127.0.0.1").unwrap(), San::Ip("127.0.0.1".parse().unwrap()));
        assert_eq!(parse_san("[::1]").unwrap(), San::Ip("::1".parse().unwrap()));
        assert_eq!(parse_san("etcd-0.example").unwrap(), San::Dns("etcd-0.example".into()));
        assert_eq!(parse_san("a b").unwrap_err(), "--san \"a b\" is neither an IP address nor a DNS name");
    }
}
