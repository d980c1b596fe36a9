//! Telling systemd how the service is doing (`Type=notify`): `READY=1` once the proxy can serve,
//! `STOPPING=1` when it starts draining. Outside systemd (`NOTIFY_SOCKET` unset) nothing is sent.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (newline-separated `KEY=VALUE` lines) to the service manager, if there is one.
/// A failure is logged, never fatal: the proxy serves the same either way.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else { return };
    if let Err(error) = send(&socket, state) {
        tracing::warn!(%error, socket = %socket.to_string_lossy(), "could not notify systemd (NOTIFY_SOCKET)");
    }
}

fn send(socket: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    let datagram = UnixDatagram::unbound()?;
    let path = socket.as_encoded_bytes();
    match path.strip_prefix(b"@") {
        // An abstract socket: systemd names it with a leading '@'.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            datagram.send_to_addr(state.as_bytes(), &address)?;
        }
        None => {
            datagram.send_to(state.as_bytes(), socket)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_state_reaches_a_socket_path() {
        let path = std::env::temp_dir().join(format!("etcd-compat-proxy-notify-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        super::send(path.as_os_str(), "READY=1\nSTATUS=serving").expect("send");
        let mut buffer = [0u8; 64];
        let read = listener.recv(&mut buffer).expect("recv");
        assert_eq!(&buffer[..read], b"READY=1\nSTATUS=serving");
        let _ = std::fs::remove_file(&path);
    }
}
