//! Reservations with chosen start and end times, written through the `Store` API to
//! the same store (and with the same configuration) the binary of a `CliEnv` uses.

use canhazgpu::state::{ReservationKind, Selection, UnixTime};
use canhazgpu::store::{AllocRequest, NewReservation, ReleaseScope, Store};

use super::cli::CliEnv;

pub const HOUR: i64 = 3600;

pub fn now() -> UnixTime {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub struct History {
    store: Box<dyn Store>,
    next_id: u32,
}

impl History {
    /// Opens the store of `env`, configured by its variables as the binary would be.
    pub fn open(env: &CliEnv) -> Self {
        History {
            store: env.store(),
            next_id: 0,
        }
    }

    /// A reservation of `gpu` by `user` over `[start, end]`, ended by a release.
    pub fn finished(
        &mut self,
        user: &str,
        gpu: u32,
        kind: ReservationKind,
        start: UnixTime,
        end: UnixTime,
    ) {
        let id = self.hold(user, gpu, kind, start, Some(end + HOUR));
        if kind == ReservationKind::Run {
            self.store.heartbeat(&id, &[gpu], end).expect("heartbeat");
        }
        self.store
            .release(&ReleaseScope::Reservation { id }, end)
            .expect("release");
    }

    /// A manual reservation of `gpu` since `start`, expiring at `expiry`.
    pub fn manual_since(&mut self, user: &str, gpu: u32, start: UnixTime, expiry: UnixTime) {
        self.hold(user, gpu, ReservationKind::Manual, start, Some(expiry));
    }

    /// A run reservation of `gpu` since `start`, heartbeating now.
    pub fn run_since(&mut self, user: &str, gpu: u32, start: UnixTime) {
        let id = self.hold(user, gpu, ReservationKind::Run, start, None);
        self.store.heartbeat(&id, &[gpu], now()).expect("heartbeat");
    }

    fn hold(
        &mut self,
        user: &str,
        gpu: u32,
        kind: ReservationKind,
        start: UnixTime,
        expiry: Option<UnixTime>,
    ) -> String {
        self.next_id += 1;
        let id = format!("seed-{}", self.next_id);
        let reservation = NewReservation {
            id: id.clone(),
            user: user.into(),
            actual_user: user.into(),
            kind,
            expiry_time: expiry.filter(|_| kind == ReservationKind::Manual),
            note: None,
            owner: None,
            adopted: None,
        };
        let claimed = self
            .store
            .allocate(&AllocRequest {
                reservation,
                selection: Selection::Ids(vec![gpu]),
                unreserved: Vec::new(),
                dead_ids: Vec::new(),
                now: start,
                force: None,
                policy: Default::default(),
            })
            .expect("allocate");
        assert_eq!(claimed, [gpu]);
        id
    }
}
