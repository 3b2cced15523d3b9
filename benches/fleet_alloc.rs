//! Fleet allocation throughput (issue 10): HOSTS simulated hosts on one Redis, two
//! clients per host (so each host's pool is contended), each reserving and
//! releasing one GPU through the library's Redis store as fast as it can for
//! SECONDS. Every GPU granted is checked against a shared table (entered after the
//! grant, left before the release), so a GPU held twice at once is counted.
//!
//! `cargo bench --bench fleet_alloc -- REDIS_URL [HOSTS] [SECONDS]` (the pools must
//! exist: `benches/fleet.sh` creates them). Prints allocations per second in total.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use canhazgpu::state::{ReservationKind, Selection};
use canhazgpu::store::redis::RedisStore;
use canhazgpu::store::{
    AllocRequest, NewReservation, RedisConfig, RedisLayout, ReleaseScope, Store,
};

const CLIENTS_PER_HOST: u32 = 2;

fn main() {
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let url = args
        .get(1)
        .expect("usage: fleet_alloc REDIS_URL [HOSTS] [SECONDS]");
    let hosts: u32 = args.get(2).map_or(256, |n| n.parse().expect("HOSTS"));
    let seconds: u64 = args.get(3).map_or(10, |n| n.parse().expect("SECONDS"));
    let config = RedisConfig {
        url: Some(url.clone()),
        host: String::new(),
        port: 0,
        db: 0,
        password: None,
        password_file: None,
        system: false,
        tls: Default::default(),
        layout: RedisLayout::Fleet,
        sentinel: None,
    };
    let allocations = Arc::new(AtomicU64::new(0));
    let held: Arc<Mutex<HashSet<(u32, u32)>>> = Arc::default();
    let doubles = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let threads: Vec<_> = (0..hosts * CLIENTS_PER_HOST)
        .map(|client| {
            let host = client / CLIENTS_PER_HOST;
            let (config, allocations, held, doubles) = (
                config.clone(),
                allocations.clone(),
                held.clone(),
                doubles.clone(),
            );
            std::thread::spawn(move || {
                let name = format!("h{host:03}");
                let mut store = RedisStore::connect(&config)
                    .expect("connect")
                    .with_host(&name);
                let user = format!("u{client}");
                while Instant::now() < deadline {
                    let request = AllocRequest {
                        reservation: NewReservation {
                            id: format!("{client}-{}", allocations.load(Ordering::Relaxed)),
                            user: user.clone(),
                            actual_user: user.clone(),
                            kind: ReservationKind::Manual,
                            expiry_time: Some(i64::MAX / 2),
                            note: None,
                            owner: None,
                            adopted: None,
                        },
                        selection: Selection::Count(1),
                        unreserved: Vec::new(),
                        dead_ids: Vec::new(),
                        now: now(),
                        force: None,
                        policy: Default::default(),
                    };
                    let Ok(gpus) = store.allocate(&request) else {
                        continue;
                    };
                    for &gpu in &gpus {
                        if !held.lock().unwrap().insert((host, gpu)) {
                            doubles.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    allocations.fetch_add(1, Ordering::Relaxed);
                    for &gpu in &gpus {
                        held.lock().unwrap().remove(&(host, gpu));
                    }
                    let scope = ReleaseScope::OwnIds {
                        actual_user: user.clone(),
                        ids: gpus,
                    };
                    store.release(&scope, now()).expect("release");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("a host thread failed");
    }
    let total = allocations.load(Ordering::Relaxed);
    println!(
        "{hosts} hosts: {total} allocations in {seconds} s = {:.0}/s, {} granted twice",
        total as f64 / seconds as f64,
        doubles.load(Ordering::Relaxed)
    );
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
