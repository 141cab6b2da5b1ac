//! A TCP proxy on loopback that a test controls: it forwards, holds every
//! byte in both directions (a partition: connections stay open, nothing
//! passes), or cuts every connection and refuses new ones.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PASS: u8 = 0;
const HOLD: u8 = 1;
const CUT: u8 = 2;

/// The proxy's switch; the forwarding tasks run until the runtime ends.
#[derive(Clone)]
pub struct Proxy {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    /// Bumped at each cut: connections of an older epoch close.
    epoch: Arc<AtomicU64>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let proxy = Self {
            addr: listener.local_addr().expect("proxy addr"),
            mode: Arc::default(),
            epoch: Arc::default(),
        };
        let (mode, epoch) = (proxy.mode.clone(), proxy.epoch.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if mode.load(Ordering::Acquire) == CUT {
                    drop(client);
                    continue;
                }
                let (mode, epoch) = (mode.clone(), epoch.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let born = epoch.load(Ordering::Acquire);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let up = pump(client_read, server_write, mode.clone(), epoch.clone(), born);
                    let down = pump(server_read, client_write, mode, epoch, born);
                    tokio::select! {
                        () = up => {}
                        () = down => {}
                    }
                });
            }
        });
        proxy
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Forward again (heal a partition or a cut).
    pub fn pass(&self) {
        self.mode.store(PASS, Ordering::Release);
    }

    /// Hold every byte, both ways, on every connection: a partition.
    pub fn hold(&self) {
        self.mode.store(HOLD, Ordering::Release);
    }

    /// Close every connection and refuse new ones.
    pub fn cut(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.mode.store(CUT, Ordering::Release);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<AtomicU8>,
    epoch: Arc<AtomicU64>,
    born: u64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if epoch.load(Ordering::Acquire) != born {
            return;
        }
        if mode.load(Ordering::Acquire) == HOLD {
            // Read nothing, write nothing: the peers' buffers fill up.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        match tokio::time::timeout(Duration::from_millis(50), from.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(n)) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
