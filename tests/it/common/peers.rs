//! Peers that are not a room-allocator, for connection-error tests: a port
//! nothing listens on, and an HTTP/1 server that answers 400 to anything.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

/// A loopback port that was free a moment ago: connecting is refused.
pub fn dead_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

/// An HTTP/1.1 server on a loopback port that reads what comes, answers
/// `400 Bad Request` and closes, like a web server or the metrics port would.
/// Its thread lives as long as the test process.
pub fn http1_peer() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buffer = [0u8; 4096];
                let _ = stream.read(&mut buffer);
                let _ = stream.write_all(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            });
        }
    });
    addr
}
