//! Placement policy: which GPUs a request gets. Pure functions, shared by the SQLite
//! store (inside its transaction) and mirrored by the Redis Lua script; the
//! conformance tests check both against this module.
//!
//! Policy: exclude GPUs in use without reservation; among free GPUs prefer the ones
//! this user used most recently, then never-used ones, then the least recently
//! released (MRU-per-user with LRU fallback).

use std::collections::HashMap;

use crate::error::{Error, Holder, Result};
use crate::state::{GpuSlot, Liveness, Reservation, Selection, UnixTime};

/// A reservation that allocation found dead and frees as part of the same change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    pub gpu_id: u32,
    pub reservation: Reservation,
    pub ended_at: UnixTime,
}

/// What an allocation changes: the GPUs to claim, and dead reservations to end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub claim: Vec<u32>,
    pub ended: Vec<Ended>,
}

/// Inputs of a placement decision that do not come from the slots themselves.
pub struct PlanInput<'a> {
    pub selection: &'a Selection,
    /// GPUs in use without reservation (memory above the threshold, no reservation).
    pub unreserved: &'a [u32],
    /// Reservation IDs whose local supervisor is known to be gone.
    pub dead_ids: &'a [String],
    /// When the requesting user last used each GPU.
    pub user_last_used: &'a HashMap<u32, UnixTime>,
    /// The requesting Unix user, told apart from other holders.
    pub requester: &'a str,
    pub now: UnixTime,
}

/// Checks a selection against the pool size; errors that waiting cannot fix.
pub fn validate_selection(selection: &Selection, gpu_count: u32) -> Result<()> {
    match selection {
        Selection::Count(0) => Err(Error::Usage("--gpus must be at least 1".into())),
        Selection::Count(n) if *n > gpu_count => Err(Error::Usage(format!(
            "Requested {n} GPUs but this machine's pool has only {gpu_count}"
        ))),
        Selection::Count(_) => Ok(()),
        Selection::Ids(ids) => {
            if ids.is_empty() {
                return Err(Error::Usage("--gpu-ids must name at least one GPU".into()));
            }
            for (i, id) in ids.iter().enumerate() {
                if *id >= gpu_count {
                    return Err(Error::Usage(format!(
                        "GPU ID {id} is out of range (0-{})",
                        gpu_count.saturating_sub(1)
                    )));
                }
                if ids[..i].contains(id) {
                    return Err(Error::Usage(format!("duplicate GPU ID: {id}")));
                }
            }
            Ok(())
        }
    }
}

/// Decides which GPUs to claim. `slots[i]` is the state of GPU `i`.
pub fn plan(slots: &[GpuSlot], input: &PlanInput) -> Result<Plan> {
    validate_selection(input.selection, slots.len() as u32)?;
    let mut ended = Vec::new();
    let mut free = Vec::new();
    for (id, slot) in slots.iter().enumerate() {
        let id = id as u32;
        let last_released = match slot {
            GpuSlot::Free { last_released } => *last_released,
            GpuSlot::Corrupt(_) => continue,
            GpuSlot::Held(reservation) => match reservation.liveness(input.now, input.dead_ids) {
                Liveness::Active => continue,
                other => {
                    let ended_at = other.ended_at().unwrap_or(input.now);
                    ended.push(Ended {
                        gpu_id: id,
                        reservation: reservation.clone(),
                        ended_at,
                    });
                    Some(ended_at)
                }
            },
        };
        free.push((id, last_released));
    }

    let claim = match input.selection {
        Selection::Ids(ids) => {
            for &id in ids {
                if input.unreserved.contains(&id) {
                    return Err(Error::GpuTaken {
                        gpu: id,
                        holder: Holder::Unreserved,
                    });
                }
                match &slots[id as usize] {
                    GpuSlot::Corrupt(reason) => {
                        return Err(Error::Store(format!(
                            "GPU {id} has unreadable state: {reason}"
                        )));
                    }
                    GpuSlot::Held(r) if !free.iter().any(|(f, _)| *f == id) => {
                        let holder =
                            if crate::pool::account(&r.user, &r.actual_user) == input.requester {
                                Holder::Yourself
                            } else {
                                Holder::User(r.user.clone())
                            };
                        return Err(Error::GpuTaken { gpu: id, holder });
                    }
                    _ => {}
                }
            }
            let mut ids = ids.clone();
            ids.sort_unstable();
            ids
        }
        Selection::Count(count) => {
            let before = free.len();
            free.retain(|(id, _)| !input.unreserved.contains(id));
            if free.len() < *count as usize {
                let unreserved = before - free.len();
                return Err(Error::NotEnough {
                    requested: *count,
                    available: free.len() as u32,
                    unreserved: unreserved as u32,
                });
            }
            rank(&mut free, input.user_last_used);
            let mut chosen: Vec<u32> = free
                .iter()
                .take(*count as usize)
                .map(|(id, _)| *id)
                .collect();
            chosen.sort_unstable();
            chosen
        }
    };
    // Only reservations on claimed GPUs are ended now; others are left for their
    // own cleanup so that allocation touches nothing it does not need.
    ended.retain(|e| claim.contains(&e.gpu_id));
    Ok(Plan { claim, ended })
}

/// Orders free GPUs by preference: this user's most recently used first, then
/// never-used, then least recently released; ties by GPU ID.
pub fn rank(free: &mut [(u32, Option<UnixTime>)], user_last_used: &HashMap<u32, UnixTime>) {
    free.sort_by_key(
        |(id, last_released)| match (user_last_used.get(id), last_released) {
            (Some(used), _) => (0, -used, *id),
            (None, None) => (1, 0, *id),
            (None, Some(released)) => (2, *released, *id),
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ReservationKind;
    use proptest::prelude::*;

    fn held(user: &str, kind: ReservationKind, expiry: Option<i64>) -> GpuSlot {
        GpuSlot::Held(Reservation {
            id: format!("id-{user}"),
            user: user.into(),
            actual_user: user.into(),
            kind,
            start_time: 100,
            last_heartbeat: Some(100),
            expiry_time: expiry,
            note: None,
            owner: None,
            adopted: None,
            activity: None,
        })
    }

    fn input<'a>(
        selection: &'a Selection,
        unreserved: &'a [u32],
        used: &'a HashMap<u32, i64>,
    ) -> PlanInput<'a> {
        PlanInput {
            selection,
            unreserved,
            dead_ids: &[],
            user_last_used: used,
            requester: "carol",
            now: 200,
        }
    }

    #[test]
    fn prefers_mru_then_never_used_then_lru() {
        let slots = vec![
            GpuSlot::Free {
                last_released: Some(50),
            },
            GpuSlot::Free {
                last_released: Some(10),
            },
            GpuSlot::Free {
                last_released: None,
            },
            GpuSlot::Free {
                last_released: Some(90),
            },
        ];
        let used = HashMap::from([(3, 150), (0, 120)]);
        let sel = Selection::Count(1);
        assert_eq!(
            plan(&slots, &input(&sel, &[], &used)).unwrap().claim,
            vec![3]
        );
        let sel = Selection::Count(3);
        assert_eq!(
            plan(&slots, &input(&sel, &[], &used)).unwrap().claim,
            vec![0, 2, 3]
        );
        let none = HashMap::new();
        let sel = Selection::Count(2);
        assert_eq!(
            plan(&slots, &input(&sel, &[], &none)).unwrap().claim,
            vec![1, 2]
        );
    }

    #[test]
    fn not_enough_counts_free_and_unreserved() {
        let slots = vec![
            GpuSlot::Free {
                last_released: None,
            },
            GpuSlot::Free {
                last_released: None,
            },
            held("bob", ReservationKind::Manual, Some(1000)),
        ];
        let used = HashMap::new();
        let sel = Selection::Count(2);
        let err = plan(&slots, &input(&sel, &[1], &used)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Not enough GPUs available. Requested: 2, Available: 1 (1 GPUs in use without reservation - run 'canhazgpu status' for details)"
        );
    }

    #[test]
    fn expired_reservations_are_free_and_ended() {
        let slots = vec![held("bob", ReservationKind::Manual, Some(150))];
        let used = HashMap::new();
        let sel = Selection::Count(1);
        let p = plan(&slots, &input(&sel, &[], &used)).unwrap();
        assert_eq!(p.claim, vec![0]);
        assert_eq!(p.ended.len(), 1);
        assert_eq!(p.ended[0].ended_at, 150);
    }

    #[test]
    fn specific_ids_are_all_or_nothing() {
        let slots = vec![
            GpuSlot::Free {
                last_released: None,
            },
            held("bob", ReservationKind::Manual, Some(1000)),
        ];
        let used = HashMap::new();
        let sel = Selection::Ids(vec![0, 1]);
        let err = plan(&slots, &input(&sel, &[], &used)).unwrap_err();
        assert_eq!(err.to_string(), "GPU 1 is already reserved by user 'bob'");
        let sel = Selection::Ids(vec![0, 5]);
        let err = plan(&slots, &input(&sel, &[], &used)).unwrap_err();
        assert_eq!(err.to_string(), "GPU ID 5 is out of range (0-1)");
        let sel = Selection::Ids(vec![0]);
        let err = plan(&slots, &input(&sel, &[0], &used)).unwrap_err();
        assert_eq!(err.to_string(), "GPU 0 is in use without reservation");
    }

    proptest! {
        /// Claims are always free, never unreserved, never held by a live reservation,
        /// and exactly the requested number.
        #[test]
        fn never_claims_a_held_or_unreserved_gpu(
            states in prop::collection::vec(0u8..4, 1..9),
            unreserved_mask in prop::collection::vec(any::<bool>(), 9),
            count in 1u32..9,
        ) {
            let slots: Vec<GpuSlot> = states.iter().map(|s| match s {
                0 => GpuSlot::Free { last_released: None },
                1 => GpuSlot::Free { last_released: Some(42) },
                2 => held("x", ReservationKind::Manual, Some(1000)),
                _ => held("y", ReservationKind::Manual, Some(150)),
            }).collect();
            let unreserved: Vec<u32> = (0..slots.len() as u32).filter(|i| unreserved_mask[*i as usize]).collect();
            let used = HashMap::new();
            let sel = Selection::Count(count);
            match plan(&slots, &input(&sel, &unreserved, &used)) {
                Ok(p) => {
                    prop_assert_eq!(p.claim.len() as u32, count);
                    for id in &p.claim {
                        prop_assert!(!unreserved.contains(id));
                        prop_assert!(states[*id as usize] != 2);
                    }
                }
                Err(Error::NotEnough { available, .. }) => {
                    let free = states.iter().enumerate().filter(|(i, s)| **s != 2 && !unreserved.contains(&(*i as u32))).count();
                    prop_assert_eq!(available as usize, free);
                    prop_assert!(free < count as usize);
                }
                Err(Error::Usage(_)) => prop_assert!(count as usize > slots.len()),
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
    }
}
