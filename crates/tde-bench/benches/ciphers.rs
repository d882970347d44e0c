//! Page-cipher and key-wrapping micro-benchmarks.
//!
//! One 8 KiB page per iteration, for every `pg_tde.cipher` value, encrypt and
//! decrypt (and encryption into a second buffer, what the write path does); WAL
//! AES-CTR over an 8 KiB page and over a small record; AES-GCM wrap and unwrap of
//! a relation key.  `scripts/bench-ciphers.sh`
//! runs this and OpenSSL's `speed` on the same machine and prints the ratios.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use tde_core::cipher::{Cipher, PageCipher, RelKey, PAGE_SIZE};
use tde_core::wal::WalCipher;
use tde_core::wrap;

/// A page buffer aligned like PostgreSQL's buffers (shared and local buffers, and pg_tde's
/// write scratch pages, are 4096-byte aligned); an unaligned one costs the 64-byte
/// loads and stores of the AVX-512 passes about 20%.
#[repr(C, align(4096))]
struct Page([u8; PAGE_SIZE]);

fn page() -> Box<Page> {
    let mut p = Box::new(Page([0; PAGE_SIZE]));
    for (i, b) in p.0.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    p
}

fn page_ciphers(c: &mut Criterion) {
    let mut group = c.benchmark_group("page");
    group.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    for cipher in Cipher::ALL {
        let key = RelKey::generate(cipher).expect("key");
        let pc = PageCipher::new(&key);
        let mut buf = page();
        group.bench_function(format!("encrypt/{}", cipher.name()), |b| {
            let mut block = 0u32;
            b.iter(|| {
                block = block.wrapping_add(1);
                pc.encrypt_page(0, black_box(block), &mut buf.0);
            })
        });
        let src = page();
        group.bench_function(format!("encrypt_into/{}", cipher.name()), |b| {
            let mut block = 0u32;
            b.iter(|| {
                block = block.wrapping_add(1);
                pc.encrypt_page_into(0, black_box(block), &src.0, &mut buf.0);
            })
        });
        group.bench_function(format!("decrypt/{}", cipher.name()), |b| {
            let mut block = 0u32;
            b.iter(|| {
                block = block.wrapping_add(1);
                pc.decrypt_page(0, black_box(block), &mut buf.0);
            })
        });
    }
    group.finish();
}

/// WAL AES-CTR (`pg_tde.wal_encrypt`): a whole WAL page, and a small record written on its own
/// (a commit record is ~50 bytes; 128 bytes starting mid-block).
fn wal_ctr(c: &mut Criterion) {
    let mut group = c.benchmark_group("wal");
    for (name, key_len) in [("aes_128_ctr", 16usize), ("aes_256_ctr", 32)] {
        let wc = WalCipher::new(&vec![0x5a; key_len], &[7u8; 16]).expect("WAL key");
        for (size, offset) in [(8192usize, 0u64), (128, 40)] {
            let mut buf = page();
            let buf = &mut buf.0[..size];
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_function(format!("{name}/{size}"), |b| {
                let mut lsn = offset;
                b.iter(|| {
                    lsn = lsn.wrapping_add(8192);
                    wc.apply(1, black_box(lsn), buf);
                })
            });
        }
    }
    group.finish();
}

fn key_wrapping(c: &mut Criterion) {
    let mut group = c.benchmark_group("wrap");
    let kek = [7u8; 32];
    let key = RelKey::generate(Cipher::Aes128Xts).expect("key");
    let plain = key.to_bytes();
    let wrapped = wrap::wrap(&kek, b"aad", &plain).expect("wrap");
    group.bench_function("wrap/aes_256_gcm", |b| b.iter(|| wrap::wrap(&kek, b"aad", black_box(&plain)).expect("wrap")));
    group.bench_function("unwrap/aes_256_gcm", |b| {
        b.iter(|| wrap::unwrap(&kek, b"aad", black_box(&wrapped)).expect("unwrap"))
    });
    group.finish();
}

criterion_group!(benches, page_ciphers, wal_ctr, key_wrapping);
criterion_main!(benches);
