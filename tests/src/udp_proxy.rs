//! A UDP forwarder between an agent and a relay that a test can cut, to partition the network
//! between them while both processes keep running (a relay that still holds its session).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug)]
pub struct UdpProxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpProxy {
    /// Forwards datagrams from one client (the first to send) to `upstream` and back.
    pub fn start(upstream: SocketAddr) -> anyhow::Result<UdpProxy> {
        let front = UdpSocket::bind("127.0.0.1:0")?;
        let back = UdpSocket::bind("127.0.0.1:0")?;
        back.connect(upstream)?;
        front.set_read_timeout(Some(Duration::from_millis(5)))?;
        back.set_read_timeout(Some(Duration::from_millis(5)))?;
        let port = front.local_addr()?.port();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (cut_flag, stop_flag) = (cut.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut client: Option<SocketAddr> = None;
            let mut buf = vec![0u8; 65_536];
            while !stop_flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = front.recv_from(&mut buf) {
                    client = Some(from);
                    if !cut_flag.load(Ordering::Relaxed) {
                        let _ = back.send(&buf[..n]);
                    }
                }
                if let (Ok(n), Some(to)) = (back.recv(&mut buf), client) {
                    if !cut_flag.load(Ordering::Relaxed) {
                        let _ = front.send_to(&buf[..n], to);
                    }
                }
            }
        });
        Ok(UdpProxy {
            port,
            cut,
            stop,
            thread: Some(thread),
        })
    }

    /// Drops every datagram in both directions until [`UdpProxy::heal`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::Relaxed);
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
