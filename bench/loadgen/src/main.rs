//! skb-loadgen: the small-request side of skerry's benchmark (std only).
//!
//!   skb-loadgen serve ADDR [ADDR…]
//!       TCP and UDP echo server on each ADDR: echoes whatever arrives.
//!   skb-loadgen udpping ADDR
//!       one datagram to ADDR; exits 0 when its echo comes back (1 s).
//!   skb-loadgen rtt ADDR COUNT SIZE
//!       one connection, COUNT round trips of SIZE bytes (after a warm-up);
//!       prints JSON with the round-trip percentiles in microseconds.
//!   skb-loadgen connrate ADDR COUNT CONCURRENCY SIZE
//!       COUNT short-lived connections (connect, one SIZE-byte request and
//!       its echo, close) over CONCURRENCY threads; prints JSON with the rate.
//!
//! Every operation has a timeout, so a broken path ends the run with a
//! count of failures instead of hanging it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const IO_TIMEOUT: Duration = Duration::from_secs(3);
const WARMUP: usize = 100;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("serve") if args.len() >= 2 => serve(&args[1..]),
        Some("udpping") if args.len() == 2 => udpping(&args[1]),
        Some("rtt") if args.len() == 4 => rtt(&args[1], num(&args[2]), num(&args[3])),
        Some("connrate") if args.len() == 5 => connrate(
            &args[1],
            num(&args[2]),
            num(&args[3]),
            num(&args[4]),
        ),
        _ => Err("usage: skb-loadgen serve ADDR… | rtt ADDR COUNT SIZE | connrate ADDR COUNT CONCURRENCY SIZE".into()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skb-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn num(s: &str) -> usize {
    s.parse().unwrap_or_else(|_| {
        eprintln!("skb-loadgen: not a number: {s}");
        std::process::exit(2)
    })
}

fn addr(s: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("{s}: {e}"))?
        .next()
        .ok_or_else(|| format!("{s}: no address"))
}

fn serve(addrs: &[String]) -> Result<(), String> {
    let mut handles = Vec::new();
    for a in addrs {
        let sa = addr(a)?;
        let u = std::net::UdpSocket::bind(sa).map_err(|e| format!("bind udp {a}: {e}"))?;
        handles.push(std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok((n, from)) = u.recv_from(&mut buf) {
                let _ = u.send_to(&buf[..n], from);
            }
        }));
        let l = TcpListener::bind(sa).map_err(|e| format!("bind {a}: {e}"))?;
        handles.push(std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || {
                    let _ = s.set_nodelay(true);
                    let mut buf = [0u8; 16384];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        }));
    }
    eprintln!("skb-loadgen: serving on {}", addrs.join(" "));
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn udpping(a: &str) -> Result<(), String> {
    let a = addr(a)?;
    let u = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    u.set_read_timeout(Some(Duration::from_millis(300))).map_err(|e| e.to_string())?;
    u.connect(a).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        u.send(b"skb-udpping").map_err(|e| e.to_string())?;
        if let Ok(n) = u.recv(&mut buf) {
            if &buf[..n] == b"skb-udpping" {
                return Ok(());
            }
        }
    }
    Err(format!("no UDP echo from {a}"))
}

fn connect(a: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&a, IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

fn round_trip(s: &mut TcpStream, msg: &[u8], back: &mut [u8]) -> std::io::Result<()> {
    s.write_all(msg)?;
    s.read_exact(back)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rtt(a: &str, count: usize, size: usize) -> Result<(), String> {
    let a = addr(a)?;
    let mut s = connect(a).map_err(|e| format!("connect {a}: {e}"))?;
    let msg: Vec<u8> = (0..size).map(|i| (i * 7 + 1) as u8).collect();
    let mut back = vec![0u8; size];
    for _ in 0..WARMUP {
        round_trip(&mut s, &msg, &mut back).map_err(|e| format!("warm-up: {e}"))?;
    }
    let mut us = Vec::with_capacity(count);
    for i in 0..count {
        let t = Instant::now();
        round_trip(&mut s, &msg, &mut back).map_err(|e| format!("round trip {i}: {e}"))?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
        if back != msg {
            return Err(format!("round trip {i}: echo differs"));
        }
    }
    let mean = us.iter().sum::<f64>() / us.len().max(1) as f64;
    us.sort_by(f64::total_cmp);
    println!(
        "{{\"count\":{count},\"size\":{size},\"p50_us\":{:.1},\"p90_us\":{:.1},\"p99_us\":{:.1},\"mean_us\":{mean:.1},\"min_us\":{:.1},\"max_us\":{:.1}}}",
        pct(&us, 50.0),
        pct(&us, 90.0),
        pct(&us, 99.0),
        us.first().copied().unwrap_or(f64::NAN),
        us.last().copied().unwrap_or(f64::NAN),
    );
    Ok(())
}

fn connrate(a: &str, count: usize, conc: usize, size: usize) -> Result<(), String> {
    let a = addr(a)?;
    let conc = conc.max(1);
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut threads = Vec::new();
    for _ in 0..conc {
        let next = next.clone();
        let failed = failed.clone();
        threads.push(std::thread::spawn(move || {
            let msg = vec![0x5au8; size];
            let mut back = vec![0u8; size];
            let mut lat = Vec::new();
            let mut first_err: Option<String> = None;
            while next.fetch_add(1, Ordering::Relaxed) < count as u64 {
                let t = Instant::now();
                let r = connect(a).and_then(|mut s| {
                    round_trip(&mut s, &msg, &mut back)?;
                    drop(s);
                    Ok(())
                });
                match r {
                    Ok(()) => lat.push(t.elapsed().as_secs_f64() * 1e6),
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        first_err.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            (lat, first_err)
        }));
    }
    let mut lat = Vec::with_capacity(count);
    let mut err = None;
    for t in threads {
        let (l, e) = t.join().map_err(|_| "a client thread panicked".to_string())?;
        lat.extend(l);
        if err.is_none() {
            err = e;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let ok = lat.len();
    println!(
        "{{\"count\":{count},\"concurrency\":{conc},\"ok\":{ok},\"failed\":{},\"seconds\":{secs:.3},\"per_sec\":{:.1},\"p50_us\":{:.1},\"p99_us\":{:.1},\"first_error\":{}}}",
        failed.load(Ordering::Relaxed),
        ok as f64 / secs,
        pct(&lat, 50.0),
        pct(&lat, 99.0),
        err.map_or_else(|| "null".to_string(), |e| format!("{:?}", e)),
    );
    Ok(())
}
