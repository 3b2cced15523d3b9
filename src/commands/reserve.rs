//! `canhazgpu reserve`: hold GPUs for interactive work until released or expired.

use crate::config::Config;
use crate::duration::{format_duration, parse_duration};
use crate::error::Result;
use crate::session::{Session, new_reservation_id, now};
use crate::state::ReservationKind;
use crate::store::NewReservation;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReserveArgs {
    pub gpus: Option<u32>,
    pub gpu_ids: Option<Vec<u32>>,
    pub duration: String,
}

pub fn execute(args: &ReserveArgs, config: &Config) -> Result<()> {
    let selection = super::selection(args.gpus, args.gpu_ids.clone())?;
    let seconds = parse_duration(&args.duration)?;
    let mut session = Session::open(config)?;
    let reservation = NewReservation {
        id: new_reservation_id(),
        user: session.user.clone(),
        actual_user: session.user.clone(),
        kind: ReservationKind::Manual,
        expiry_time: Some(now() + seconds as i64),
        note: None,
        owner: None,
    };
    let ids = session.claim(reservation, selection)?;
    let list: Vec<String> = ids.iter().map(u32::to_string).collect();
    println!(
        "Reserved {} GPU(s): {} for {}",
        ids.len(),
        super::id_list(&ids),
        format_duration(seconds as i64)
    );
    println!();
    println!("Run the following command to run only on these GPUs:");
    println!("export CUDA_VISIBLE_DEVICES={}", list.join(","));
    Ok(())
}
