//! The accept loop the in-process test servers share (the delay proxy, the TLS terminator,
//! the SASL authenticator): a thread of its own with a current-thread runtime, a task per
//! connection, and all of it stopped, open connections included, when the server is dropped.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A running accept loop; dropping it stops the loop and every connection's task.
#[derive(Debug)]
pub struct AcceptLoop {
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AcceptLoop {
    /// Listens on `listen` and runs `serve` for each accepted connection, on a thread named
    /// `name`.
    pub fn start<F, Fut>(name: &str, listen: SocketAddr, serve: F) -> anyhow::Result<AcceptLoop>
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let std_listener = std::net::TcpListener::bind(listen)?;
        std_listener.set_nonblocking(true)?;
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(std_listener) else {
                        return;
                    };
                    loop {
                        let accepted = tokio::select! {
                            () = stopping.cancelled() => return,
                            accepted = listener.accept() => accepted,
                        };
                        let Ok((client, _)) = accepted else { continue };
                        let (connection, stopping) = (serve(client), stopping.clone());
                        tokio::spawn(async move {
                            tokio::select! {
                                () = stopping.cancelled() => {}
                                () = connection => {}
                            }
                        });
                    }
                });
            })?;
        Ok(AcceptLoop {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for AcceptLoop {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
