//! A protected install for tests: a copy of the binary that is setgid to the group
//! `canhazgpu`, and a system configuration directory of the test's own. A setgid
//! canhazgpu reads its system configuration only from /etc/canhazgpu, so every
//! command runs in a mount namespace of its own (`unshare -m`) with the test's
//! directory bound over /etc/canhazgpu: tests run in parallel and the machine's own
//! /etc/canhazgpu is never touched.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::cli::{BIN, Run};

pub const GROUP: &str = "canhazgpu";
const SYSTEM_DIR: &str = "/etc/canhazgpu";

/// Creates the system group `canhazgpu` if missing; tolerant of a concurrent one.
pub fn ensure_group() -> u32 {
    for _ in 0..50 {
        if let Some(gid) = group_gid() {
            return gid;
        }
        let _ = Command::new("groupadd").args(["--system", GROUP]).output();
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("could not create group {GROUP}");
}

pub fn group_gid() -> Option<u32> {
    let out = Command::new("getent")
        .args(["group", GROUP])
        .output()
        .ok()?;
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    line.split(':').nth(2)?.trim().parse().ok()
}

/// The setgid copy of the binary under test, made once per build: root:canhazgpu 2755
/// in a directory every user can enter.
pub fn setgid_binary() -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let gid = ensure_group();
    let meta = std::fs::metadata(BIN).unwrap();
    let dir = PathBuf::from(format!(
        "/tmp/canhazgpu-setgid-test/{}-{}",
        meta.mtime(),
        meta.size()
    ));
    let bin = dir.join("canhazgpu");
    if bin.exists() {
        return bin;
    }
    std::fs::create_dir_all(&dir).unwrap();
    for path in [dir.parent().unwrap(), dir.as_path()] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let staging = dir.join(format!("canhazgpu.{}.new", std::process::id()));
    std::fs::copy(BIN, &staging).unwrap();
    std::os::unix::fs::chown(&staging, Some(0), Some(gid)).unwrap();
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o2755)).unwrap();
    std::fs::rename(&staging, &bin).unwrap();
    bin
}

/// One protected host: a system configuration directory and a state directory in a
/// temporary directory every user can traverse.
pub struct ProtectedHost {
    _dir: tempfile::TempDir,
    /// Bound over /etc/canhazgpu for every command.
    pub etc: PathBuf,
    /// The state directory the system configuration names (not created: `admin` does).
    pub state: PathBuf,
    pub bin: PathBuf,
    /// Extra `KEY=VALUE` settings for every command.
    pub vars: Vec<String>,
}

impl ProtectedHost {
    /// The embedded store at the state directory the system configuration names.
    pub fn sqlite() -> Self {
        let host = Self::empty();
        host.write_system_config(&format!("state_dir: {}\n", host.state.display()));
        host
    }

    /// A Redis server with a password, kept in a root:canhazgpu 0640 file that the
    /// system configuration names.
    pub fn redis(url: &str, password: &str) -> Self {
        let host = Self::empty();
        host.add_system_file("redis-password", format!("{password}\n").as_bytes(), true);
        host.write_system_config(&format!(
            "redis.url: {url}\nredis.password_file: {SYSTEM_DIR}/redis-password\n"
        ));
        host
    }

    /// A file in the system configuration directory: `root:canhazgpu 0640` when
    /// `secret`, else world-readable. Returns its path as canhazgpu sees it.
    pub fn add_system_file(&self, name: &str, content: &[u8], secret: bool) -> PathBuf {
        let file = self.etc.join(name);
        std::fs::write(&file, content).unwrap();
        let (group, mode) = match secret {
            true => (ensure_group(), 0o640),
            false => (0, 0o644),
        };
        std::os::unix::fs::chown(&file, Some(0), Some(group)).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        self.system_path(name)
    }

    /// No system configuration yet (`write_system_config` gives one).
    pub fn empty() -> Self {
        ensure_group();
        // The mount point; an empty system directory configures nothing.
        std::fs::create_dir_all(SYSTEM_DIR).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o755)).unwrap();
        ProtectedHost {
            state: dir.path().join("state"),
            etc,
            _dir: dir,
            bin: setgid_binary(),
            vars: Vec::new(),
        }
    }

    /// `admin --gpus N --provider fake`, as root.
    pub fn init_fake(&self, gpus: u32) {
        self.run(
            None,
            &["admin", "--gpus", &gpus.to_string(), "--provider", "fake"],
        )
        .assert_ok();
    }

    /// Replaces the system configuration file (world-readable, as in /etc).
    pub fn write_system_config(&self, text: &str) {
        let path = self.etc.join("config.yaml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    /// `path` as it is seen inside the namespace, under /etc/canhazgpu.
    pub fn system_path(&self, name: &str) -> PathBuf {
        Path::new(SYSTEM_DIR).join(name)
    }

    /// The setgid binary as `user` (root when `None`) with `vars`, in a namespace
    /// where the test's directory is /etc/canhazgpu.
    pub fn command(&self, user: Option<&str>, vars: &[&str], args: &[&str]) -> Command {
        self.program(user, vars, &self.bin, args)
    }

    /// Any program as `user` in this host's namespace.
    pub fn program(
        &self,
        user: Option<&str>,
        vars: &[&str],
        program: &Path,
        args: &[&str],
    ) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(format!("mount --bind \"$0\" {SYSTEM_DIR} && exec \"$@\""))
            .arg(&self.etc);
        if let Some(user) = user {
            cmd.args(["runuser", "-u", user, "--"]);
        }
        cmd.arg("env")
            .arg("HOME=/nonexistent")
            .arg("CANHAZGPU_NVML=0")
            .args(&self.vars)
            .args(vars)
            .arg(program)
            .args(args);
        for (key, _) in std::env::vars() {
            if key.starts_with("CANHAZGPU_") {
                cmd.env_remove(&key);
            }
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    pub fn run(&self, user: Option<&str>, args: &[&str]) -> Run {
        self.run_with(user, &[], args)
    }

    pub fn run_with(&self, user: Option<&str>, vars: &[&str], args: &[&str]) -> Run {
        self.command(user, vars, args)
            .output()
            .expect("run the setgid canhazgpu")
            .into()
    }
}

/// `owner:group mode` of a path, as `stat` shows them.
pub fn ownership(path: &Path) -> (u32, u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap();
    (meta.uid(), meta.gid(), meta.mode() & 0o7777)
}
