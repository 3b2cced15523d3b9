//! The processes below a PID, read from `/proc`. A timeout must reach the command's
//! children and grandchildren, including those that left its process group or
//! session, so the tree is found by parent PID rather than by process group.

use std::collections::HashMap;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// One process as `/proc/PID/stat` describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ProcEntry {
    pid: u32,
    ppid: u32,
    zombie: bool,
}

/// Parses `/proc/PID/stat`: `pid (comm) state ppid ...`. The command name may hold
/// spaces and parentheses, so the fields are read after its last `)`.
fn parse_stat(text: &str) -> Option<ProcEntry> {
    let (head, rest) = text.rsplit_once(')')?;
    let pid = head.split_once('(')?.0.trim().parse().ok()?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some(ProcEntry {
        pid,
        ppid,
        zombie: state == "Z" || state == "X",
    })
}

/// Whether `pid`'s process group is the foreground group of its controlling
/// terminal (`/proc/PID/stat` fields `pgrp` and `tpgid`; -1 without a terminal).
pub fn in_terminal_foreground(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| foreground_fields(&stat))
        .is_some_and(|(pgrp, tpgid)| pgrp == tpgid)
}

/// `(pgrp, tpgid)` from a stat line: fields 5 and 8.
fn foreground_fields(text: &str) -> Option<(i64, i64)> {
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields.get(2)?.parse().ok()?, fields.get(5)?.parse().ok()?))
}

fn all_processes() -> Vec<ProcEntry> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let name = entry.ok()?.file_name();
        let pid: u32 = name.to_str()?.parse().ok()?;
        // The process may exit between listing and reading; skip it then.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        parse_stat(&stat)
    })
    .collect()
}

/// Every process below `root` (not `root` itself) that has not exited yet, parents
/// before their children.
pub fn live_descendants(root: u32) -> Vec<u32> {
    descendants_in(&all_processes(), root)
}

fn descendants_in(processes: &[ProcEntry], root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<&ProcEntry>> = HashMap::new();
    for entry in processes {
        children.entry(entry.ppid).or_default().push(entry);
    }
    let mut found = Vec::new();
    let mut queue = vec![root];
    while let Some(parent) = queue.pop() {
        for child in children.get(&parent).into_iter().flatten() {
            // A zombie has no children of its own left to find: they were reparented.
            if !child.zombie && child.pid != root {
                found.push(child.pid);
                queue.push(child.pid);
            }
        }
    }
    found
}

/// Sends `signal` to every live process below `root`; returns how many it reached.
pub fn signal_descendants(root: u32, signal: Signal) -> usize {
    live_descendants(root)
        .into_iter()
        .filter(|pid| kill(Pid::from_raw(*pid as i32), signal).is_ok())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pid: u32, ppid: u32, zombie: bool) -> ProcEntry {
        ProcEntry { pid, ppid, zombie }
    }

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let text = "4242 (my (odd) prog) S 17 4242 4242 0 -1 4194560 ...";
        assert_eq!(parse_stat(text), Some(entry(4242, 17, false)));
        assert_eq!(
            parse_stat("7 (a b) Z 1 7 7"),
            Some(entry(7, 1, true)),
            "zombies are recognised"
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("12 (x) S notanumber"), None);
    }

    #[test]
    fn reads_the_terminal_foreground_group() {
        // pid (comm) state ppid pgrp session tty_nr tpgid
        assert_eq!(
            foreground_fields("9 (vim) S 8 9 8 34816 9 4194304"),
            Some((9, 9))
        );
        assert_eq!(foreground_fields("9 (x) S 1 9 9 0 -1 0"), Some((9, -1)));
        assert_eq!(foreground_fields("9 (x) S 1"), None);
    }

    #[test]
    fn finds_the_whole_subtree_and_nothing_else() {
        let procs = [
            entry(1, 0, false),
            entry(10, 1, false), // root
            entry(11, 10, false),
            entry(12, 11, false), // grandchild
            entry(13, 10, true),  // exited child
            entry(20, 1, false),  // unrelated
            entry(21, 20, false),
        ];
        let mut found = descendants_in(&procs, 10);
        found.sort_unstable();
        assert_eq!(found, vec![11, 12]);
        assert!(descendants_in(&procs, 12).is_empty());
    }

    #[test]
    fn sees_real_grandchildren() {
        let mut shell = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30; wait"])
            .spawn()
            .expect("spawn sh");
        let root = shell.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while live_descendants(root).len() < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(live_descendants(root).len(), 2, "both sleeps are found");
        assert_eq!(signal_descendants(root, Signal::SIGKILL), 2);
        shell.kill().expect("kill sh");
        shell.wait().expect("reap sh");
    }
}
