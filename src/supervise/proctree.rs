//! The processes below a PID, read from `/proc`. A timeout must reach the command's
//! children and grandchildren, including those that left its process group or
//! session, so the tree is found by parent PID rather than by process group.

use std::collections::HashMap;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::gpu::procinfo::{self, Stat};

fn is_exited(stat: &Stat) -> bool {
    matches!(stat.state, 'Z' | 'X')
}

/// Every process with its stat, as far as it could be read.
fn all_processes() -> Vec<(u32, Stat)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        // The process may exit between listing and reading; skip it then.
        Some((pid, procinfo::stat(pid)?))
    })
    .collect()
}

/// Every process below `root` (not `root` itself) that has not exited yet, parents
/// before their children.
pub fn live_descendants(root: u32) -> Vec<u32> {
    descendants_in(&all_processes(), root)
}

fn descendants_in(processes: &[(u32, Stat)], root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (pid, stat) in processes {
        // An exited process has no children left to find: they were reparented.
        if !is_exited(stat) && *pid != root {
            children.entry(stat.parent_pid).or_default().push(*pid);
        }
    }
    let mut found = Vec::new();
    let mut queue = vec![root];
    while let Some(parent) = queue.pop() {
        for &child in children.get(&parent).into_iter().flatten() {
            found.push(child);
            queue.push(child);
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

/// Whether `pid`'s process group is the foreground group of its controlling terminal.
pub fn in_terminal_foreground(pid: u32) -> bool {
    procinfo::stat(pid).is_some_and(|stat| stat.process_group == stat.terminal_group)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pid: u32, parent_pid: u32, state: char) -> (u32, Stat) {
        let stat = Stat {
            state,
            parent_pid,
            process_group: 1,
            terminal_group: -1,
            start_time: 1,
        };
        (pid, stat)
    }

    #[test]
    fn finds_the_whole_subtree_and_nothing_else() {
        let procs = [
            entry(1, 0, 'S'),
            entry(10, 1, 'S'), // root
            entry(11, 10, 'R'),
            entry(12, 11, 'S'), // grandchild
            entry(13, 10, 'Z'), // exited child
            entry(20, 1, 'S'),  // unrelated
            entry(21, 20, 'S'),
        ];
        let mut found = descendants_in(&procs, 10);
        found.sort_unstable();
        assert_eq!(found, vec![11, 12]);
        assert!(descendants_in(&procs, 12).is_empty());
    }

    #[test]
    fn sees_and_signals_real_grandchildren() {
        let mut shell = crate::privilege::command("sh")
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

    #[test]
    fn a_process_without_terminal_is_not_in_its_foreground() {
        use std::os::unix::process::CommandExt;
        let child = crate::privilege::command("sleep")
            .arg("5")
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .spawn();
        let mut child = child.expect("spawn sleep");
        // Its own new group cannot be the foreground group of any terminal.
        assert!(!in_terminal_foreground(child.id()));
        child.kill().expect("kill sleep");
        child.wait().expect("reap sleep");
    }
}
