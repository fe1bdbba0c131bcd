//! Helpers shared by the integration tests.
#![allow(dead_code)]

/// A one-file HTTP server on loopback: `/img.png` is the PNG, anything else 404.
pub fn http_server(png: Vec<u8>) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 2048];
            let n = s.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let ok = req.starts_with("GET /img.png ");
            let head = if ok {
                format!("HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", png.len())
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = s.write_all(head.as_bytes());
            if ok {
                let _ = s.write_all(&png);
            }
        }
    });
    Ok(format!("http://{addr}"))
}

/// The repository root.
pub fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The tiny CLIP fixture's folder.
pub fn tiny() -> String {
    root()
        .join("tests/fixtures/clip-tiny")
        .display()
        .to_string()
}

/// A reference image fixture's path.
pub fn image(name: &str) -> String {
    root()
        .join("tests/fixtures/reference/images")
        .join(name)
        .display()
        .to_string()
}
