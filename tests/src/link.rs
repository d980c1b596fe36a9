//! A TCP link between a client and one server that can lose what the server answers, or cut
//! every connection, on command: for faults that real processes cannot be made to show on
//! time, such as a request that the server applied while its answer never arrived.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

/// A loopback listener forwarding each connection to `upstream`, with faults switched on and
/// off by the test. Dropping it closes the listener and every connection.
pub struct FaultyLink {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// Bytes from the server are read and thrown away (the client never gets an answer).
    lose_answers: AtomicBool,
    /// Bytes that switch `lose_answers` on when a request carrying them passes, before it reaches
    /// the server: only that request's answer, and what follows, is lost.
    lose_answers_after: Mutex<Option<Vec<u8>>>,
    /// New connections are closed as soon as they are accepted.
    refuse: AtomicBool,
    stopped: AtomicBool,
    /// Both ends of every open connection, so that `cut` can shut them down.
    open: Mutex<Vec<TcpStream>>,
}

impl FaultyLink {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let accepting = Arc::clone(&shared);
        thread::spawn(move || accept(listener, upstream, &accepting));
        Ok(FaultyLink { addr, shared })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// While on, the server's bytes never reach the client; the client's still reach the server.
    pub fn lose_answers(&self, on: bool) {
        self.shared.lose_answers.store(on, Ordering::SeqCst);
    }

    /// Loses answers (as [`FaultyLink::lose_answers`]) from the first request that carries
    /// `marker` on: what the client sent before it is answered as usual.
    pub fn lose_answers_from_request_with(&self, marker: &[u8]) {
        *self.shared.lose_answers_after.lock().expect("link lock") = Some(marker.to_vec());
    }

    /// While on, every new connection is closed at once.
    pub fn refuse(&self, on: bool) {
        self.shared.refuse.store(on, Ordering::SeqCst);
    }

    /// Shuts down every open connection, both ways.
    pub fn cut(&self) {
        let open = std::mem::take(&mut *self.shared.open.lock().expect("link lock"));
        for stream in open {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for FaultyLink {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.cut();
        // Wakes the accept loop so that it sees `stopped`.
        let _ = TcpStream::connect(self.addr);
    }
}

fn accept(listener: TcpListener, upstream: SocketAddr, shared: &Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        if shared.refuse.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(server) = TcpStream::connect(upstream) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let (Ok(client_copy), Ok(server_copy)) = (client.try_clone(), server.try_clone()) else { continue };
        {
            let mut open = shared.open.lock().expect("link lock");
            open.extend([client_copy, server_copy]);
        }
        let (Ok(client_reader), Ok(server_writer)) = (client.try_clone(), server.try_clone()) else { continue };
        let requests = Arc::clone(shared);
        thread::spawn(move || pump(client_reader, server_writer, &requests, false));
        let answers = Arc::clone(shared);
        thread::spawn(move || pump(server, client, &answers, true));
    }
}

/// Copies `from` to `to` until either end closes; answers are dropped while `lose_answers` is on.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: &Shared, answers: bool) {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        if answers && shared.lose_answers.load(Ordering::SeqCst) {
            continue;
        }
        if !answers {
            let mut marker = shared.lose_answers_after.lock().expect("link lock");
            if marker.as_deref().is_some_and(|marker| buffer[..read].windows(marker.len()).any(|w| w == marker)) {
                *marker = None;
                shared.lose_answers.store(true, Ordering::SeqCst);
            }
        }
        if to.write_all(&buffer[..read]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
