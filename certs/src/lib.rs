//! Certificate handling for etcd-compat-proxy: loading PEM files for rustls,
//! inspecting certificates, and issuing certificates from a CA.
//!
//! Only the ring crypto backend is used; nothing here installs a process-wide
//! rustls provider.

mod dev_pki;
mod error;
mod inspect;
mod issue;
mod load;

pub use dev_pki::DevPki;
pub use error::CertError;
pub use inspect::{inspect, CertInfo};
pub use issue::{Authority, Issued, LeafSpec, San, Usage};
pub use load::{load_ca_bundle, load_certs, load_private_key};

pub use rustls_pki_types::{CertificateDer, PrivateKeyDer};
