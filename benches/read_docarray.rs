//! Streaming a 100,000-pair docarray v1 file: documents per second against a plain read of the
//! same bytes ("disk speed"), and peak memory, for the uncompressed protobuf-array format and the
//! lz4 protobuf stream format. Run with `cargo bench --bench read_docarray`.

use std::io::{Read, Write};
use std::time::Instant;

use clipft::docarray::file::DocReader;
use clipft::docarray::proto::{document_proto::Content, DocumentProto};
use prost::Message;

fn pair(i: usize) -> DocumentProto {
    let chunk = |id: String, content: Option<Content>, uri: String, modality: &str| DocumentProto {
        id,
        content,
        uri,
        modality: modality.into(),
        granularity: 1,
        parent_id: format!("pair-{i}"),
        ..Default::default()
    };
    DocumentProto {
        id: format!("pair-{i}"),
        chunks: vec![
            chunk(
                format!("t{i}"),
                Some(Content::Text(format!(
                    "a red striped dress, number {i}, with a long caption"
                ))),
                String::new(),
                "text",
            ),
            chunk(
                format!("i{i}"),
                None,
                format!("images/garment_{i:06}.jpg"),
                "image",
            ),
        ],
        ..Default::default()
    }
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn peak_rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn main() {
    let n = 100_000;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    std::fs::create_dir_all(&dir).unwrap();
    let array = dir.join("pairs.protobuf-array.bin");
    let stream = dir.join("pairs.protobuf.lz4.bin");
    {
        let mut a = std::io::BufWriter::new(std::fs::File::create(&array).unwrap());
        let mut s = std::io::BufWriter::new(std::fs::File::create(&stream).unwrap());
        s.write_all(&[1]).unwrap();
        s.write_all(&(n as u64).to_be_bytes()).unwrap();
        for i in 0..n {
            let bytes = pair(i).encode_to_vec();
            let mut rec = vec![0x0a];
            varint(bytes.len() as u64, &mut rec);
            a.write_all(&rec).unwrap();
            a.write_all(&bytes).unwrap();
            let mut enc = lz4_flex::frame::FrameEncoder::new(Vec::new());
            enc.write_all(&bytes).unwrap();
            let c = enc.finish().unwrap();
            s.write_all(&(c.len() as u32).to_be_bytes()).unwrap();
            s.write_all(&c).unwrap();
        }
    }
    let rss_start = peak_rss_mib();
    for path in [&array, &stream] {
        let size = std::fs::metadata(path).unwrap().len() as f64 / 1e6;
        let t = Instant::now();
        let mut f = std::fs::File::open(path).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        while f.read(&mut buf).unwrap() > 0 {}
        let raw = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut count = 0usize;
        for doc in DocReader::open(path).unwrap() {
            let d = doc.unwrap();
            count += d.chunks.len() / 2;
        }
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(count, n);
        println!(
            "{{\"file\": \"{}\", \"pairs\": {n}, \"mb\": {size:.1}, \"read_mb_per_s\": {:.0}, \"plain_read_mb_per_s\": {:.0}, \"pairs_per_s\": {:.0}, \"peak_rss_mib\": {:.1}, \"rss_before_mib\": {rss_start:.1}}}",
            path.file_name().unwrap().to_string_lossy(),
            size / secs,
            size / raw,
            n as f64 / secs,
            peak_rss_mib()
        );
    }
}
